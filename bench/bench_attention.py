"""The C++ CPU attention forward (``ops.attention`` / ``ops.cross_attention``'s cpu backend) against aten's SDPA
(the reference backend, what the model ran before) and torch.compile of the SDPA call, measured in the same run.

    python bench/bench_attention.py [--quick] [--threads N] [--no-compile] [--out f.json]

Shapes, 10 s of audio (250 latent frames), CFG sampling batch (2 rows; 1 row conditioned), fp32, no gradient:
  self  S [2, 250, 12, 64] and L [2, 250, 24, 64], q / k / v as the strided slices of the fused qkv projection,
        out [B, T, H, Dh] reshaped to [B, T, D] for the output projection (SDPA's head-major output is copied there;
        the kernel's is already in that layout, so the copy is part of what each side pays);
  cross S [1, 250, 12, 64] over 96 packed condition keys (80 video + 16 text), the conditioned row of a CFG pair.
Each row: median us per call of each variant, timed interleaved (round r runs every variant once), GFLOP/s of the
4 B Tq Tk D multiply-adds of the two products, and SDPA / kernel. The kernel's largest error against a float64
softmax is printed beside SDPA's.
"""
from __future__ import annotations

import math

import torch
from _timing import hardware, interleaved_medians, op_bench_args, print_table, write_rows

from omni2sound import ops


def truth(q, k, v):
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.double())


def main(argv=None):
    args = op_bench_args(__doc__, "S shapes only, no torch.compile", argv)
    if args.device != "cpu":
        raise SystemExit("bench_attention times the CPU kernel; the GPU runs SDPA / the Triton cross-attention")
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
