"""Benchmark of the Snake ops against eager PyTorch and torch.compile, measured in the same run.

    python bench/bench_snake.py [--quick] [--device cpu|cuda] [--dtype float32|bfloat16|float16] [--out f.json]

Shapes are the VAE decoder's activations (paper preset, 1 s of audio, batch 1): [1, W, T] per stage. Reports us per
call and GB/s (bytes every op must move: read x [+ residual], write y [+ s]); ratios against eager.
"""
from __future__ import annotations

import argparse
import time

import torch
from _timing import add_copy_pct, hardware, time_gpu, write_rows  # bench/ is the script's folder, on sys.path

from omni2sound import ops
from omni2sound.ops.snake import snake_reference, snake_residual_reference


def eager_snake(x, a, b, eps=1e-9):
    return x + (1.0 / (b.view(1, -1, 1) + eps)) * torch.sin(a.view(1, -1, 1) * x).pow(2)


def eager_snake_residual(x, a, b, r, eps=1e-9):
    s = x + r
    return s, eager_snake(s, a, b, eps)


def timeit(fn, warmup, iters, device):
    if device == "cuda":                         # median of CUDA-graph replays of 20 calls (no launch gaps)
        return time_gpu(fn, repeats=max(iters // 3, 3), inner=20)[0]
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(iters):                       # best of single calls: robust on a shared machine
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best * 1e6


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on the CPU, bfloat16 on a GPU")
    p.add_argument("--quick", action="store_true", help="two shapes, few iterations, no torch.compile")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", default=None, help="write the rows as JSON")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    dev, dtype = args.device, getattr(torch, args.dtype)
    shapes = [(1, 64, 16000), (1, 128, 8000), (1, 256, 2000), (1, 512, 250)]   # paper decoder stages, 1 s
    if args.quick:
        shapes = shapes[:2]
    iters, warmup = (5, 2) if args.quick else (30, 5)
    use_compile = not (args.quick or args.no_compile)
    backends = [b for b in ops.available_backends("snake", torch.device(dev)) if b != "reference"]
    rows = []
    for B, C, T in shapes:
        x = torch.randn(B, C, T, device=dev, dtype=dtype)
        r = torch.randn_like(x)
        a = torch.rand(C, device=dev) + 0.5
        b = torch.rand(C, device=dev) + 0.5
        for op, n_io in (("snake", 2), ("snake_residual", 4)):
            if op == "snake":
                eager = lambda: eager_snake(x, a, b)                        # noqa: E731
                fused = lambda: ops.snake(x, a, b)                          # noqa: E731
                comp_fn = torch.compile(snake_reference) if use_compile else None
                comp = (lambda: comp_fn(x, a, b)) if comp_fn else None      # noqa: E731
            else:
                eager = lambda: eager_snake_residual(x, a, b, r)            # noqa: E731
                fused = lambda: ops.snake_residual(x, a, b, r)              # noqa: E731
                comp_fn = torch.compile(snake_residual_reference) if use_compile else None
                comp = (lambda: comp_fn(x, a, b, r)) if comp_fn else None   # noqa: E731
            with torch.no_grad():
                t_eager = timeit(eager, warmup, iters, dev)
                t_comp = timeit(comp, warmup, iters, dev) if comp else float("nan")
                for backend in backends:
                    def run(backend=backend):
                        with ops.use_backend(snake=backend):
                            return fused()
                    t_fused = timeit(run, warmup, iters, dev)
                    nbytes = n_io * x.numel() * x.element_size()
                    rows.append(add_copy_pct(dict(op=op, shape=f"{B}x{C}x{T}", dtype=args.dtype, backend=backend,
                                                  eager_us=t_eager, compile_us=t_comp, fused_us=t_fused,
                                                  fused_gbps=nbytes / t_fused / 1e3,
                                                  speedup_vs_eager=t_eager / t_fused,
                                                  speedup_vs_compile=t_comp / t_fused), nbytes, dev))
    print(f"\nSnake ops on {hardware(dev)}, torch {torch.__version__}, {args.dtype}\n")
    print("| op | shape | backend | eager us | compile us | fused us | fused GB/s | x eager | x compile "
          "| % copy_ 1t | % copy_ 2t |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['op']} | {row['shape']} | {row['backend']} | {row['eager_us']:.0f} | {row['compile_us']:.0f} | "
              f"{row['fused_us']:.0f} | {row['fused_gbps']:.1f} | {row['speedup_vs_eager']:.2f} | "
              f"{row['speedup_vs_compile']:.2f} | {row.get('pct_copy_1t', float('nan')):.0f} | "
              f"{row.get('pct_copy_2t', float('nan')):.0f} |")
    write_rows(args.out, dev, rows)
    return rows


if __name__ == "__main__":
    main()
