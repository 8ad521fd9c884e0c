"""Self-attention backends, measured in the same run. Two tables:

    python bench/bench_attention.py [--quick] [--threads N] [--no-compile] [--out f.json]        # CPU kernel
    python bench/bench_attention.py --device cuda [--quick] [--out f.json]                       # backend table
    python bench/bench_attention.py --device cpu --backends --tiny                               # its check here

CPU kernel (the default on the CPU): the C++ forward (``ops.attention`` / ``ops.cross_attention``'s cpu backend)
against aten's SDPA (the reference backend, what the model ran before) and torch.compile of the SDPA call.

Shapes, 10 s of audio (250 latent frames), CFG sampling batch (2 rows; 1 row conditioned), fp32, no gradient:
  self  S [2, 250, 12, 64] and L [2, 250, 24, 64], q / k / v as the strided slices of the fused qkv projection,
        out [B, T, H, Dh] reshaped to [B, T, D] for the output projection (SDPA's head-major output is copied there;
        the kernel's is already in that layout, so the copy is part of what each side pays);
  cross S [1, 250, 12, 64] over 96 packed condition keys (80 video + 16 text), the conditioned row of a CFG pair.
Each row: median us per call of each variant, timed interleaved (round r runs every variant once), GFLOP/s of the
4 B Tq Tk D multiply-adds of the two products, and SDPA / kernel. The kernel's largest error against a float64
softmax is printed beside SDPA's.

Backend table (the default on a GPU; ``--backends`` elsewhere): the DiT's self-attention, L heads [B, 250, 24, 64]
with q / k / v the strided slices of the fused qkv projection, bf16 on a GPU: sampling (B = 2, the CFG pair; B = 16,
a serving batch) forward, training (B = 32) forward and forward + backward (dq, dk, dv). Variants, each called as the
model calls it, output in the model's [B, T, H, Dh] layout:
  omni2sound[<backend>]  ops.attention under every backend available here (reference: SDPA with torch's choice of
                         kernel; flash: the flash-attn package, FA3 on Hopper where importable, else FA2)
  sdpa[<kernel>]         SDPA pinned to one of torch's kernels (flash, efficient, cudnn) with
                         torch.nn.attention.sdpa_kernel; a kernel that cannot take the case is reported, not fatal
  flash_attn_func        the flash-attn package's own function, where importable
Each row: us per call (CUDA-graph replays on a GPU), TFLOP/s (4 B H T^2 Dh per forward; the backward counts 2.5x
the forward), the ratio to omni2sound[reference] (x_ref) and, forward only, the largest error against float64.
The faster of reference and flash at the model's shapes decides the GPU default (``ops.attention``'s
default_order)."""
from __future__ import annotations

import math

import torch
from _timing import hardware, interleaved_medians, op_bench_args, print_table, write_rows

from omni2sound import ops


def truth(q, k, v):
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.double())


def self_attention_variants(device: torch.device) -> dict:
    """name -> f(q, k, v) -> [B, T, H, Dh], for q, k, v [B, T, H, Dh] (strided slices of one qkv tensor)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def via_ops(backend):
        def f(q, k, v):
            with ops.use_backend(attention=backend):
                return ops.attention(q, k, v)
        return f

    def pinned(kernel):
        def f(q, k, v):
            with sdpa_kernel(kernel):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                      v.transpose(1, 2)).transpose(1, 2)
        return f

    out = {f"omni2sound[{b}]": via_ops(b) for b in ops.available_backends("attention", device)}
    kernels = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        kernels["cudnn"] = SDPBackend.CUDNN_ATTENTION
    out.update({f"sdpa[{name}]": pinned(kernel) for name, kernel in kernels.items()})
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        pass
    else:
        out["flash_attn_func"] = lambda q, k, v: flash_attn_func(q, k, v, softmax_scale=q.shape[-1] ** -0.5)
    return out


def backend_table(device: torch.device, dtype: torch.dtype, quick: bool = False, tiny: bool = False) -> list:
    """The backend table's rows (see the module doc). tiny: small shapes, few repeats (a check of the table on a
    CPU, not a measurement)."""
    from _timing import time_cpu, time_gpu

    gpu = device.type == "cuda"
    H, Dh, T = (2, 16, 9) if tiny else (24, 64, 250)
    cases = [("sampling", 2, ("fwd",)), ("serving", 16, ("fwd",)), ("training", 32, ("fwd", "fwd+bwd"))]
    if tiny:
        cases = [("sampling", 2, ("fwd",)), ("training", 3, ("fwd", "fwd+bwd"))]
    elif quick:
        cases = [cases[0], cases[2]]
    repeats = 3 if (quick or tiny) else 10
    rows = []
    for label, B, modes in cases:
        g = torch.Generator().manual_seed(B)
        qkv = torch.randn(B, T, 3, H, Dh, generator=g).to(device, dtype)                # the fused projection
        want = truth(*qkv.unbind(2)).cpu() if "fwd" in modes else None               # compared on the host
        flop_fwd = 4 * B * H * T * T * Dh
        for mode in modes:
            times, errs = {}, {}
            for name, fn in self_attention_variants(device).items():
                if mode == "fwd":
                    q, k, v = qkv.unbind(2)
                    call = lambda fn=fn, q=q, k=k, v=v: fn(q, k, v)                        # noqa: E731
                else:
                    leaf = qkv.detach().clone().requires_grad_()
                    dy = torch.randn(B, T, H, Dh, generator=g).to(device, dtype)

                    def call(fn=fn, leaf=leaf, dy=dy):
                        return torch.autograd.grad(fn(*leaf.unbind(2)), leaf, dy)
                try:
                    with torch.inference_mode(mode == "fwd"):
                        if mode == "fwd":
                            errs[name] = (call().double().cpu() - want).abs().max().item()
                        if gpu:
                            times[name] = time_gpu(call, repeats, 10 if B <= 16 else 3)[0]
                        else:
                            times[name] = time_cpu(call, repeats, 1)
                except Exception as e:   # a kernel that cannot take this case (dtype, device, head dim): reported
                    print(f"<!-- {name} {label} {mode}: {type(e).__name__}: {str(e).splitlines()[0][:160]} -->")
            base = times.get("omni2sound[reference]")
            flop = flop_fwd * (3.5 if mode == "fwd+bwd" else 1.0)
            for name, us in times.items():
                rows.append({"case": label, "shape": f"[{B}, {T}, {H}, {Dh}]", "dtype": str(dtype)[6:], "mode": mode,
                             "variant": name, "us": round(us, 1), "TFLOP/s": round(flop / us / 1e6, 3),
                             "x_ref": round(base / us, 2) if base else None,
                             "err": f"{errs[name]:.1e}" if name in errs else ""})
    return rows


def main(argv=None):
    import argparse

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--backends", action="store_true", help="the backend table (the default on a GPU)")
    pre.add_argument("--tiny", action="store_true", help="backend table on small shapes: a check, not a measurement")
    extra, rest = pre.parse_known_args(argv)
    args = op_bench_args(__doc__, "S shapes only, no torch.compile (backend table: sampling and training only)", rest)
    if args.device != "cpu" or extra.backends or extra.tiny:
        device, dtype = torch.device(args.device), getattr(torch, args.dtype)
        rows = backend_table(device, dtype, quick=args.quick, tiny=extra.tiny)
        print(f"\nself-attention backends, {args.dtype}, on {hardware(device)}, torch {torch.__version__}"
              f"{' (CUDA-graph replays)' if device.type == 'cuda' else ''}\n")
        print_table(rows, ["case", "shape", "mode", "variant", "us", "TFLOP/s", "x_ref", "err"])
        write_rows(args.out, device.type, rows)
        return rows
    torch.manual_seed(0)
    T = 250
    cases = [("S self", 2, 12, "self"), ("S cross", 1, 12, "cross")]
    if not args.quick:
        cases.insert(1, ("L self", 2, 24, "self"))
    use_compile = not (args.quick or args.no_compile)
    rows = []
    with torch.no_grad():
        for name, B, H, kind in cases:
            D = H * 64
            if kind == "self":
                q, k, v = torch.randn(B, T, 3, H, 64).unbind(2)
                Tk = T

                def run(backend, q=q, k=k, v=v, B=B, D=D):
                    with ops.use_backend(attention=backend):
                        return ops.attention(q, k, v).reshape(B, T, D)
                sdpa_call = lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2).reshape(B, T, D)
                want = truth(q, k, v)
            else:
                Tk = 96
                q = torch.randn(B, T, H, 64)
                k, v = torch.randn(Tk, H, 64), torch.randn(Tk, H, 64)
                cu = torch.tensor([0, Tk], dtype=torch.int32)

                def run(backend, q=q, k=k, v=v, cu=cu, B=B, D=D):
                    with ops.use_backend(attention=backend):
                        return ops.cross_attention(q, k, v, cu, Tk).reshape(B, T, D)
                sdpa_call = None
                want = truth(q, k[None], v[None])
            fns = {"kernel": lambda run=run: run("cpu"), "sdpa": lambda run=run: run("reference")}
            if use_compile and sdpa_call is not None:
                fns["compile"] = torch.compile(sdpa_call)
            errs = {n: (fns[n]().double().view(B, T, H, 64) - want).abs().max().item() for n in ("kernel", "sdpa")}

            med = interleaved_medians(fns, 3 if args.quick else 7, inner=10)
            flop = 4 * B * H * T * Tk * 64
            row = {"case": name, "shape": f"[{B}, {T}, {H}, 64] x {Tk} keys"}
            for n in fns:
                us = med[n] * 1e6
                row[f"{n} us"] = round(us, 1)
                row[f"{n} GFLOP/s"] = round(flop / us / 1e3, 1)
            row["sdpa / kernel"] = round(row["sdpa us"] / row["kernel us"], 2)
            if "compile us" in row:
                row["compile / kernel"] = round(row["compile us"] / row["kernel us"], 2)
            row["kernel err"], row["sdpa err"] = f"{errs['kernel']:.1e}", f"{errs['sdpa']:.1e}"
            rows.append(row)
            print(row, flush=True)
    print(f"\nattention forward, fp32, no grad, on {hardware('cpu')}, torch {torch.__version__}\n")
    cols = ["case", "shape", "kernel us", "kernel GFLOP/s", "sdpa us", "sdpa GFLOP/s", "sdpa / kernel"]
    if use_compile:
        cols += ["compile us", "compile / kernel"]
    print_table(rows, cols + ["kernel err", "sdpa err"])
    write_rows(args.out, "cpu", rows)
    return rows


if __name__ == "__main__":
    main()
