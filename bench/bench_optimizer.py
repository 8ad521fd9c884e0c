"""AdamW implementations inside a real training step: fused (one vectorised pass per parameter group, what the
trainer uses on CPU and CUDA) against the default for-loop and foreach implementations, same run.

    python bench/bench_optimizer.py [--preset S] [--batch 4] [--seconds 4] [--rounds 5] [--device cpu]

Each implementation steps its own copy of one randomly initialised DiT; the copies are alternated step by step for
``--rounds`` rounds (order flipped every round), so a shared box's drift hits every variant alike. Reports the median
whole-step time (flow-matching loss + backward + optimiser step), the median optimiser time and the median paired
ratio against fused.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from _timing import hardware, interleaved_rounds, write_rows  # bench/ is the script's folder, on sys.path
from bench_generate import random_conditions, random_dit

from omni2sound.flow import FlowMatching

VARIANTS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="S")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", default="fused,for-loop", help=f"comma list of {','.join(VARIANTS)}")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    base = random_dit(a.preset, dev, torch.float32, 64).train()
    names = a.variants.split(",")
    runs = {}
    for n in names:
        m = copy.deepcopy(base)
        runs[n] = (m, torch.optim.AdamW(m.parameters(), lr=1e-4, **VARIANTS[n]))
    del base
    cond = random_conditions(runs[names[0]][0].config, a.batch, a.seconds, 20).to(dev)
    x1 = torch.randn(a.batch, int(round(a.seconds * 25)), 64, device=dev)
    fm = FlowMatching()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step(n):
        model, opt = runs[n]
        sync()
        t0 = time.perf_counter()
        loss, _ = fm.loss(model, x1, cond, generator=torch.Generator().manual_seed(0))
        loss.backward()
        sync()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t2 = time.perf_counter()
        return t2 - t0, t2 - t1

    # one warm-up each (optimiser state allocation, first-touch), then the interleaved rounds
    res = interleaved_rounds({n: (lambda n=n: step(n)) for n in names}, a.rounds)
    rows = []
    print(f"\nAdamW in an {a.preset} training step (batch {a.batch} x {a.seconds:g} s, fp32), {hardware(a.device)}, "
          f"torch {torch.__version__}, {a.rounds} rounds\n")
    print("| AdamW | step s | optimiser s | step / fused step |")
    print("|---|---|---|---|")
    for n in names:
        ratio = statistics.median(x[0] / f[0] for x, f in zip(res[n], res.get("fused", res[n])))
        row = dict(variant=n, step_s=statistics.median(x[0] for x in res[n]),
                   optimizer_s=statistics.median(x[1] for x in res[n]), ratio_vs_fused=ratio)
        rows.append(row)
        print(f"| {n} | {row['step_s']:.3f} | {row['optimizer_s']:.3f} | {ratio:.3f} |")
    write_rows(a.out, a.device, rows, args=vars(a))
    return rows


if __name__ == "__main__":
    main()
