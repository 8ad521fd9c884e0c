"""Benchmark varlen cross-attention (audio queries over ragged video + text keys) against its baselines.

    python bench/bench_cross_attention.py            # GPU: bf16, under CUDA graphs; CPU: fp32
    python bench/bench_cross_attention.py --quick    # fewer repeats, (CPU) inference shape only

Shapes (H = 24 heads of D = 64): inference q [2, 250, 24, 64] with keys [208, 0] per sample (CFG batch:
the conditional sample has all 80 video + 128 text tokens, the null sample none); training
q [32, 250, 24, 64] with 80..208 keys per sample; forward, and forward + backward for training.

Variants, all given the inputs in their own layout, prepared outside the timing:
  omni2sound[<backend>]  ops.cross_attention on packed K/V (every backend available here)
  sdpa_padded            F.scaled_dot_product_attention on K/V padded to the longest sample with a
                         boolean key-padding mask (what a model without varlen kernels does)
  sdpa_flash_nomask      SDPA's flash backend on the padded K/V without a mask: wrong for ragged keys,
                         shown as the dense lower bound (GPU only)
  eager                  einsum, masked_fill, softmax, einsum on the padded K/V
  compile                torch.compile of eager
  varlen_attn            torch.nn.attention.varlen.varlen_attn (queries packed too), where it exists
  flash_attn_varlen      flash_attn.flash_attn_varlen_func, where the package is importable
Reports us per call, the speed-up over sdpa_padded (x_sdpa) and useful TFLOP/s (4 Lq H D sum(keys) per
forward; the backward counts 2.5x the forward).
"""
from __future__ import annotations

import argparse
import json
import math
import platform

import torch
import torch.nn.functional as F
from _timing import print_table, provenance, time_cpu, time_gpu  # bench/ is the script's folder, on sys.path

from omni2sound import ops


def make_case(B, lens, Lq, H, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.as_tensor(lens, dtype=torch.int64)
    cu = F.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
    total, Lk = int(cu[-1]), max(int(lens.max()), 1)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    q, k, v = mk(B, Lq, H, D), mk(total, H, D), mk(total, H, D)
    # The padded layout of the same keys, for the baselines.
    kp = torch.zeros(B, Lk, H, D, device=device, dtype=dtype)
    vp = torch.zeros_like(kp)
    for b in range(B):
        n = int(lens[b])
        kp[b, :n], vp[b, :n] = k[int(cu[b]):int(cu[b]) + n], v[int(cu[b]):int(cu[b]) + n]
    mask = (torch.arange(Lk)[None, :] < lens[:, None]).to(device)                  # [B, Lk]
    return dict(q=q, k=k, v=v, cu=cu.to(device), max_k=int(lens.max()), kp=kp, vp=vp, mask=mask, lens=lens)


def eager_padded(q, kp, vp, mask):
    s = torch.einsum("bqhd,bkhd->bhqk", q, kp) / math.sqrt(q.shape[-1])
    p = s.float().masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1).nan_to_num(0.0).to(q.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", p, vp)


def variants(c, device, no_compile):
    q, k, v, cu, max_k, kp, vp, mask = (c[n] for n in ("q", "k", "v", "cu", "max_k", "kp", "vp", "mask"))
    B, Lq, H, D = q.shape
    out = {}
    for b in ops.available_backends("cross_attention", device):
        def ours(q=q, k=k, v=v, b=b):
            with ops.use_backend(cross_attention=b):
                return ops.cross_attention(q, k, v, cu, max_k)
        out[f"omni2sound[{b}]"] = (ours, (q, k, v))
    qt, kt, vt, m4 = q.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), mask[:, None, None, :]
    out["sdpa_padded"] = (lambda qt=qt, kt=kt, vt=vt: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=m4),
                          (qt, kt, vt))
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def flash(qt=qt, kt=kt, vt=vt):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt)
        out["sdpa_flash_nomask"] = (flash, (qt, kt, vt))
    out["eager"] = (lambda q=q, kp=kp, vp=vp: eager_padded(q, kp, vp, mask), (q, kp, vp))
    if not no_compile:
        compiled = torch.compile(eager_padded, fullgraph=True, dynamic=False)
        out["compile"] = (lambda q=q, kp=kp, vp=vp: compiled(q, kp, vp, mask), (q, kp, vp))
    try:
        from torch.nn.attention.varlen import varlen_attn

        qp = q.reshape(B * Lq, H, D)
        cu_q = torch.arange(0, (B + 1) * Lq, Lq, dtype=torch.int32, device=device)
        varlen_attn(qp, k, v, cu_q, cu, Lq, max_k)  # probe: some builds lack a kernel for this device
        out["varlen_attn"] = (lambda qp=qp, k=k, v=v: varlen_attn(qp, k, v, cu_q, cu, Lq, max_k), (qp, k, v))
    except Exception:
        pass
    try:
        from flash_attn import flash_attn_varlen_func

        qp = q.reshape(B * Lq, H, D)
        cu_q = torch.arange(0, (B + 1) * Lq, Lq, dtype=torch.int32, device=device)
        out["flash_attn_varlen"] = (lambda qp=qp, k=k, v=v: flash_attn_varlen_func(qp, k, v, cu_q, cu, Lq, max_k),
                                    (qp, k, v))
    except Exception:
        pass
    return out


def fwd_bwd(fn, leaves):
    """A callable running forward + backward (grads of every leaf) of fn."""
    leaves = [t.detach().requires_grad_() for t in leaves]

    def run():
        o = fn(*leaves)
        return torch.autograd.grad(o, leaves, torch.ones_like(o))
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--threads", type=int, help="CPU threads (default: torch's); 1 is steadier on a busy box")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    hw = torch.cuda.get_device_name() if gpu else f"{platform.processor() or platform.machine()} " \
                                                  f"x{torch.get_num_threads()} threads"
    H, D, Lq = 24, 64, 250
    g = torch.Generator().manual_seed(1)
    cases = [("inference", 2, [208, 0], ("fwd",))]
    if gpu or not args.quick:
        cases.append(("training", 32, torch.randint(80, 209, (32,), generator=g).tolist(), ("fwd", "fwd+bwd")))
    repeats = 5 if args.quick else 20
    rows = []
    for label, B, lens, modes in cases:
        c = make_case(B, lens, Lq, H, D, dtype, device)
        flops_fwd = 4 * Lq * H * D * sum(lens)
        for mode in modes:
            times, graphed = {}, {}
            for name, (fn, leaves) in variants(c, device, args.no_compile).items():
                if mode == "fwd":
                    call = lambda fn=fn, leaves=leaves: fn(*leaves)  # noqa: E731
                else:
                    call = fwd_bwd(fn, leaves)
                try:
                    with torch.inference_mode(mode == "fwd"):
                        if gpu:
                            times[name], graphed[name] = time_gpu(call, repeats, 10 if label == "inference" else 3)
                        else:
                            times[name], graphed[name] = time_cpu(call, repeats, 1), False
                except Exception as e:  # a baseline that cannot run this case is reported, not fatal
                    print(f"<!-- {name} {label} {mode}: {type(e).__name__}: {str(e)[:200]} -->")
            base = times.get("sdpa_padded")
            flops = flops_fwd * (3.5 if mode == "fwd+bwd" else 1.0)
            for name, us in times.items():
                rows.append({
                    "hardware": hw, "dtype": str(dtype).replace("torch.", ""), "case": label,
                    "q": [B, Lq, H, D], "keys": f"{min(lens)}..{max(lens)} (sum {sum(lens)})", "mode": mode,
                    "variant": name, "us": round(us, 1), "cuda_graph": graphed[name],
                    "x_sdpa": round(base / us, 2) if base else None, "TFLOP/s": round(flops / (us * 1e-6) / 1e12, 3),
                })

    print(f"\n# bench_cross_attention on {hw}, {dtype}, torch {torch.__version__}")
    cols = ["case", "q", "keys", "mode", "variant", "us", "x_sdpa", "TFLOP/s", "cuda_graph"]
    print_table(rows, cols)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**provenance(device), "hardware": hw, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
