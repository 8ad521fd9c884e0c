"""Benchmark of the fused q/k RMSNorm + RoPE against the unfused chain it replaces (eager, and torch.compile of
the same chain), measured in the same run.

    python bench/bench_qk_norm_rope.py [--quick] [--device cpu|cuda] [--dtype ...] [--threads N] [--out f.json]

Shapes: the self-attention input of 10 s (250 latent frames) at the sizes that sample (CFG batch 2) and train
(batch 32): S (12 heads x 64) and L (24 x 64). The input is the strided q/k slice of a [B, T, 3, H, Dh]
projection, as in the model. The unfused chain is what the model ran before this op: F.rms_norm in the input
dtype, the q/k weights, RoPE as a complex multiply in fp32 and a cast back. Second row per shape ("head norm"): the
same op with one group and no RoPE (``ops.head_rms_norm``, the cross-attention's q norm) on [B, T, H, Dh], against
F.rms_norm with the weight, which the model ran before. Reports us per call and GB/s of the bytes the op must move
(read the input, write the output; fwd+bwd also reads dy and the input again and writes the input's gradient);
forward alone and forward + backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from _timing import (  # bench/ is the script's folder, on sys.path
    OP_ROW_HEADER,
    add_copy_pct,
    fwd_or_fwd_bwd,
    hardware,
    op_bench_args,
    print_op_row,
    time_cpu,
    time_gpu,
    write_rows,
)

from omni2sound import ops
from omni2sound.model import rope_table


def unfused(qk, w, cis, eps=1e-6):
    """The model's chain before the fused op (three to five passes over q/k)."""
    n = F.rms_norm(qk, (qk.shape[-1],), None, eps) * w.to(qk.dtype)[:, None]
    xc = torch.view_as_complex(n.float().reshape(*n.shape[:-1], -1, 2))
    return torch.view_as_real(xc * cis[None, :, None, None]).flatten(-2).to(qk.dtype)


def unfused_head_norm(x, w, eps=1e-6):
    """The cross-attention's q norm before the fused op: torch's rms_norm with the weight in x's dtype."""
    return F.rms_norm(x, (x.shape[-1],), w.to(x.dtype), eps)


def main(argv=None):
    args = op_bench_args(__doc__, "inference shapes only, no torch.compile", argv)
    dev, dtype = args.device, getattr(torch, args.dtype)
    gpu = dev == "cuda"
    T = 250
    shapes = [("S sample", 2, 12, 64), ("L sample", 2, 24, 64), ("S train", 32, 12, 64), ("L train", 32, 24, 64)]
    if args.quick or not gpu:
        shapes = [s for s in shapes if "sample" in s[0]] if args.quick else shapes[:3]
    use_compile = not (args.quick or args.no_compile)
    backends = [b for b in ops.available_backends("qk_norm_rope", torch.device(dev)) if b != "reference"]
    timer = (lambda fn: time_gpu(fn, repeats=7, inner=20)[0]) if gpu else (lambda fn: time_cpu(fn, 5, 3))
    rows = []
    print(f"\nqk_norm_rope on {hardware(dev)}, torch {torch.__version__}, {args.dtype}"
          f"{' (CUDA-graph replays)' if gpu else ''}\n")
    print(OP_ROW_HEADER, flush=True)
    for name, B, H, Dh in shapes:
        qkv = torch.randn(B, T, 3, H, Dh, device=dev, dtype=dtype)
        w = (1 + 0.1 * torch.randn(2, Dh, device=dev)).to(dtype)
        cis = rope_table(T, Dh, 10000.0, dev)
        cs = torch.view_as_real(cis).contiguous()
        cases = [  # (label, input [from the projection], weight, unfused chain, fused op, elements moved per pass)
            ("q/k + RoPE", lambda leaf: leaf[:, :, :2], w, lambda q, ww: unfused(q, ww, cis),
             lambda q, ww: ops.qk_norm_rope(q, ww, cs), B * T * 2 * H * Dh),
            ("head norm", lambda leaf: leaf[:, :, 0], w[0], unfused_head_norm, ops.head_rms_norm, B * T * H * Dh),
        ]
        for label, take, wc, chain, op, numel in cases:
            comp = torch.compile(chain) if use_compile else None
            for mode in ("fwd", "fwd+bwd"):
                grad = mode == "fwd+bwd"
                leaf = qkv.clone().requires_grad_(grad)
                wl = wc.clone().requires_grad_(grad)
                dy = torch.randn(take(qkv).shape, device=dev, dtype=dtype)

                def call(fn):   # the input is a view of the projection leaf, taken inside the timed call
                    return fwd_or_fwd_bwd(fn, lambda: (take(leaf), wl), (leaf, wl), dy, grad)

                with torch.set_grad_enabled(grad):
                    t_eager = timer(call(chain))
                    t_comp = timer(call(comp)) if comp else float("nan")
                    nbytes = (2 if not grad else 6) * numel * qkv.element_size()
                    for backend in backends:
                        def fused(q, ww, backend=backend):
                            with ops.use_backend(qk_norm_rope=backend):
                                return op(q, ww)
                        t = timer(call(fused))
                        r = dict(shape=f"{name} {label} {list(take(qkv).shape)}", mode=mode, dtype=args.dtype,
                                 backend=backend, eager_us=t_eager, compile_us=t_comp, fused_us=t,
                                 fused_gbps=nbytes / t / 1e3, speedup_vs_eager=t_eager / t,
                                 speedup_vs_compile=t_comp / t)
                        add_copy_pct(r, nbytes, dev)
                        rows.append(r)
                        print_op_row(r)
    write_rows(args.out, dev, rows)
    return rows


if __name__ == "__main__":
    main()
