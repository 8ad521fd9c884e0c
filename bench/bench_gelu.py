"""Benchmark of the fused bias + tanh-GELU and of the MLP first layer built on it, against eager PyTorch and
torch.compile of the same chain, measured in the same run.

    python bench/bench_gelu.py [--quick] [--device cpu|cuda] [--dtype ...] [--threads N] [--out f.json]

Shapes: the DiT MLP's hidden activations for 10 s (250 latent frames): S (hidden 3072) and L (6144) at the CFG
sampling batch (2 x 250 rows) and, on a GPU, the training batch (32 x 250).

Rows:
  op        bias + GELU alone on the first layer's bias-less output [M, N]: eager ``F.gelu(x + b)`` (two passes),
            compile of that chain, the fused op (out of place); fwd and fwd + bwd (dx and dbias). GB/s counts the
            bytes the op must move (fwd: read x, write y; fwd+bwd: + read dy, x, write dx).
  inplace   the fused op in place (inference: the GEMM output is overwritten, no new [M, N] tensor).
  layer     the whole first layer, no grad, as sampling runs it: eager ``gelu(linear(y, W, b))`` against
            ``ops.linear_gelu`` with a reused output buffer (GEMM without bias + in-place fused op; on a GPU also
            backend ``cublaslt``: one cuBLASLt GEMM with bias + GELU in its epilogue): what the model gains per
            MLP, GEMM included.
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


def unfused(x, b):
    return F.gelu(x + b, approximate="tanh")


def main(argv=None):
    args = op_bench_args(__doc__, "S sampling shape only, no torch.compile", argv)
    dev, dtype = args.device, getattr(torch, args.dtype)
    gpu = dev == "cuda"
    shapes = [("S sample", 500, 768, 3072), ("L sample", 500, 1536, 6144), ("L train", 8000, 1536, 6144)]
    shapes = shapes[:1] if args.quick else (shapes if gpu else shapes[:2])
    use_compile = not (args.quick or args.no_compile)
    backends = [b for b in ops.available_backends("bias_gelu", torch.device(dev)) if b != "reference"]
    # cublaslt is the first layer's GEMM epilogue: it has layer rows only (bias_gelu alone runs the reference under it)
    elementwise = [b for b in backends if b != "cublaslt"]
    timer = (lambda fn: time_gpu(fn, repeats=7, inner=20)[0]) if gpu else (lambda fn: time_cpu(fn, 5, 5))
    comp = torch.compile(unfused) if use_compile else None
    rows = []
    print(f"\nbias_gelu on {hardware(dev)}, torch {torch.__version__}, {args.dtype}"
          f"{' (CUDA-graph replays)' if gpu else ''}\n")
    print(OP_ROW_HEADER, flush=True)

    def emit(r):
        rows.append(r)
        print_op_row(r)

    for name, M, K, N in shapes:
        x = torch.randn(M, N, device=dev, dtype=dtype)
        b = torch.randn(N, device=dev, dtype=dtype)
        esz = x.element_size()
        for mode in ("fwd", "fwd+bwd"):
            grad = mode == "fwd+bwd"
            xl, bl = x.clone().requires_grad_(grad), b.clone().requires_grad_(grad)
            dy = torch.randn_like(x)

            def call(fn):
                return fwd_or_fwd_bwd(fn, lambda: (xl, bl), (xl, bl), dy, grad)

            with torch.set_grad_enabled(grad):
                t_eager = timer(call(unfused))
                t_comp = timer(call(comp)) if comp else float("nan")
                nbytes = (2 if not grad else 5) * M * N * esz
                for backend in elementwise:
                    def fused(xx, bb, backend=backend):
                        with ops.use_backend(bias_gelu=backend):
                            return ops.bias_gelu(xx, bb)
                    t = timer(call(fused))
                    emit(add_copy_pct(dict(shape=f"{name} [{M},{N}]", mode=mode, dtype=args.dtype, backend=backend,
                                           eager_us=t_eager, compile_us=t_comp, fused_us=t,
                                           fused_gbps=nbytes / t / 1e3, speedup_vs_eager=t_eager / t,
                                           speedup_vs_compile=t_comp / t), nbytes, dev))
        with torch.no_grad():
            buf = x.clone()
            for backend in elementwise:
                def inplace(backend=backend):
                    with ops.use_backend(bias_gelu=backend):
                        ops.bias_gelu(buf, b, inplace=True)
                t = timer(inplace)
                t_eager = timer(lambda: unfused(x, b))
                t_comp = timer(lambda: comp(x, b)) if comp else float("nan")
                emit(add_copy_pct(dict(shape=f"{name} [{M},{N}]", mode="inplace", dtype=args.dtype, backend=backend,
                                       eager_us=t_eager, compile_us=t_comp, fused_us=t,
                                       fused_gbps=2 * M * N * esz / t / 1e3, speedup_vs_eager=t_eager / t,
                                       speedup_vs_compile=t_comp / t), 2 * M * N * esz, dev))
            # the whole first layer (GEMM included), as sampling runs it
            y = torch.randn(M, K, device=dev, dtype=dtype)
            lin = torch.nn.Linear(K, N, device=dev, dtype=dtype)
            out = torch.empty(M, N, device=dev, dtype=dtype)
            comp_layer = torch.compile(lambda v: F.gelu(lin(v), approximate="tanh")) if use_compile else None
            t_eager = timer(lambda: F.gelu(lin(y), approximate="tanh"))
            t_comp = timer(lambda: comp_layer(y)) if comp_layer else float("nan")
            for backend in backends:
                def layer(backend=backend):
                    with ops.use_backend(bias_gelu=backend):
                        return ops.linear_gelu(y, lin.weight, lin.bias, out=out)
                t = timer(layer)
                emit(dict(shape=f"{name} [{M},{K}]x[{K},{N}]", mode="layer", dtype=args.dtype, backend=backend,
                          eager_us=t_eager, compile_us=t_comp, fused_us=t,
                          fused_gbps=float("nan"), speedup_vs_eager=t_eager / t, speedup_vs_compile=t_comp / t,
                          fused_tflops=2 * M * K * N / t / 1e6))
    write_rows(args.out, dev, rows)
    return rows


if __name__ == "__main__":
    main()
