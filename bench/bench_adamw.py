"""Benchmark of the master-weight AdamW step (``ops.adamw_step_``: fp32 master, moments and the bf16 copy the model
trains with, one pass) against torch's own AdamW followed by the cast that makes the same bf16 copy, same run.

    python bench/bench_adamw.py [--quick] [--device cpu|cuda] [--dtype float32|bfloat16] [--threads N] [--out f.json]

Shapes: one DiT projection weight of the S preset ([3072, 768]) and of L ([6144, 1536]). --dtype is the gradient's
dtype (bf16 is what the model's bf16 copies receive; default float32 on the CPU, bfloat16 on a GPU).

Columns (the op benches' table): "eager" is ``torch.optim.AdamW(foreach=False)`` (the for-loop step) plus
``copy.copy_(param)``; "compile" is ``torch.optim.AdamW(fused=True)`` plus the same cast (torch's fastest AdamW,
not torch.compile); "fused" is ``ops.adamw_step_`` on the backend named in the row. GB/s counts the bytes the step
must move: param, exp_avg and exp_avg_sq read and written (24 bytes a parameter), the gradient read and the bf16
copy written. On the CPU the last columns are that rate as % of a 1- and a 2-thread ``copy_`` of the same bytes.
"""
from __future__ import annotations

import torch
from _timing import (  # bench/ is the script's folder, on sys.path
    OP_ROW_HEADER,
    add_copy_pct,
    hardware,
    op_bench_args,
    print_op_row,
    time_cpu,
    time_gpu,
    write_rows,
)

from omni2sound import ops

SHAPES = {"S": (3072, 768), "L": (6144, 1536)}
HYPER = dict(lr=1e-4, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)


def torch_step(shape, device, grad_dtype, **kind):
    """torch's AdamW on one fp32 weight whose gradient arrives in ``grad_dtype``, then the bf16 copy cast."""
    p = torch.nn.Parameter(torch.randn(shape, device=device))
    g = torch.randn(shape, device=device).to(grad_dtype)
    copy = torch.empty(shape, device=device, dtype=torch.bfloat16)
    opt = torch.optim.AdamW([p], **HYPER, **kind)

    def step():
        p.grad = g.float() if grad_dtype != torch.float32 else g      # torch's AdamW takes the param's dtype
        opt.step()
        copy.copy_(p.detach())
    return step


def ours_step(shape, device, grad_dtype):
    p = torch.randn(shape, device=device)
    g = torch.randn(shape, device=device).to(grad_dtype)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    copy = torch.empty(shape, device=device, dtype=torch.bfloat16)
    t = torch.zeros(1, device=device)
    # lr as a tensor on the device, as MasterWeightAdamW passes it on a GPU: a float would make every call copy it
    # from the host, which a CUDA-graph capture does not take (time_gpu would then time this side eagerly)
    lr = torch.tensor(HYPER["lr"], device=device) if str(device).startswith("cuda") else HYPER["lr"]

    def step():
        t.add_(1)
        ops.adamw_step_(p, g, m, v, copy, t, lr, *HYPER["betas"], HYPER["eps"], HYPER["weight_decay"])
    return step


def main(argv=None):
    args = op_bench_args(__doc__, "the S shape only, fewer repeats", argv)
    device, grad_dtype = args.device, getattr(torch, args.dtype)
    repeats = 5 if args.quick else 15

    def timer(fn):
        return time_gpu(fn, 20, 10)[0] if device == "cuda" else time_cpu(fn, repeats, 3)

    print(f"# master-weight AdamW step, {hardware(device)}, torch {torch.__version__}, gradient {args.dtype}")
    print(OP_ROW_HEADER)
    rows = []
    for name, shape in SHAPES.items():
        if args.quick and name != "S":
            continue
        n = shape[0] * shape[1]
        nbytes = n * (24 + grad_dtype.itemsize + 2)
        eager_us = timer(torch_step(shape, device, grad_dtype, foreach=False))
        torch_fused_us = timer(torch_step(shape, device, grad_dtype, fused=True))
        for backend in ops.available_backends("adamw", device):
            with ops.use_backend(adamw=backend):
                us = timer(ours_step(shape, device, grad_dtype))
            row = {"shape": f"{name} {list(shape)}", "mode": f"step, grad {args.dtype}", "backend": backend,
                   "eager_us": eager_us, "compile_us": torch_fused_us, "fused_us": us,
                   "fused_gbps": nbytes / (us * 1e-6) / 1e9, "speedup_vs_eager": eager_us / us,
                   "speedup_vs_compile": torch_fused_us / us}
            rows.append(add_copy_pct(row, nbytes, device))
            print_op_row(row)
    write_rows(args.out, device, rows, baseline_compile="torch.optim.AdamW(fused=True) + bf16 cast")


if __name__ == "__main__":
    main()
