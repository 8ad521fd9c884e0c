"""Benchmark the fused AdaLN chain against eager PyTorch and torch.compile of the same math, same run.

    python bench/bench_adaln.py            # CPU: fp32; GPU: bf16 (forward under CUDA graphs)
    python bench/bench_adaln.py --quick    # fewer repeats (CPU: the inference shape only)
    OMP_NUM_THREADS=1 python bench/bench_adaln.py --quick --threads 1,2 --shapes inference,training
                                           # CPU: both shapes on 1 and 2 threads, then the summary table

Modulations per sample, per token, and as the DiT passes them each step: a per-token part plus a per-sample
part (rows "token+sample pair": the baselines and "<backend>+add" sum the parts first, "<backend> pairs" passes the
pair to the op, which adds them in the kernel).

Reports us per call, the ratio to eager and to torch.compile, and GB/s of the bytes the op must move against a
copy of the same bytes measured in the same run: on a GPU a device-to-device copy; on the CPU ``copy_`` on one and on
two threads (columns pct_copy_1t / pct_copy_2t), and the CPU times are best of the repeats (a shared box's noise
only ever adds time). Shapes: inference [2, 250, 1536], training
[32, 250, 1536], and (GPU) the bandwidth shape [16, 4096, 1536]. On the CPU, ``--threads`` runs the whole set on each
intra-op thread count (torch.compile recompiled for each: its generated loops are parallel or not by the count at
compile time) and ends with a summary: per layout, the C++ op against torch.compile and against both copies.

    python bench/bench_adaln.py --modulation-grads [--quick]
                                           # the backward of the DiT's AdaLN chain, modulation gradients stacked
                                           # (unbind) against written into one buffer (ops.split_modulation)

``--modulation-grads`` times the backward of the AdaLN chain of a few DiT blocks as the model runs it in training
(bf16: adaln_modulate, then three gated_residual_adaln per block on the slices of each block's [B, T, 6, D]
modulation and the final layer's [B, T, 2, D], paired with per-sample parts; the sublayers between them a scaling),
in interleaved rounds: the only difference between the two is unbind's stack against the buffer, and the kernels'
copies of dy into the shift slots.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from _timing import (  # bench/: the script's folder
    copy_gbs_cpu,
    interleaved_rounds,
    print_table,
    provenance,
    time_gpu,
)

from omni2sound import ops


def eager_gated(x, h, gate, shift, scale, eps=1e-6):
    x2 = x + gate * h
    return x2, F.layer_norm(x2, (x.shape[-1],), eps=eps) * (1 + scale) + shift


def eager_modulate(x, shift, scale, eps=1e-6):
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale) + shift


MODULATION = {True: "per-token", False: "per-sample", "pair": "token+sample pair"}


def eager_gated_pairs(x, h, tok, per, eps=1e-6):
    """The DiT's per-step form: modulation = per-token part [3, B, L, D] + per-sample part [3, B, 1, D], summed
    first (what the model did before the ops took pairs)."""
    m = tok + per
    return eager_gated(x, h, m[0], m[1], m[2], eps)


def fused_pairs(backend, presum):
    def run(x, h, tok, per):
        with ops.use_backend(backend):
            if presum:
                m = tok + per
                return ops.gated_residual_adaln(x, h, m[0], m[1], m[2])
            return ops.gated_residual_adaln(x, h, (tok[0], per[0]), (tok[1], per[1]), (tok[2], per[2]))
    return run


def fused(backend, fn):
    def run(*args):
        with ops.use_backend(backend):
            return fn(*args)
    return run


def copy_bandwidth_gbs(nbytes=1 << 30):
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    us, _ = time_gpu(lambda: dst.copy_(src), repeats=10, inner=5, graphs=False)
    return 2 * nbytes / (us * 1e-6) / 1e9


def make(shape, dtype, device, per_token):
    B, L, D = shape
    Lm = L if per_token else 1
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return mk(B, L, D), mk(B, L, D), mk(B, Lm, D), mk(B, Lm, D), 0.5 * mk(B, Lm, D)


def modulation_grads(args) -> list:
    """Rows: seconds of the AdaLN chain's backward with the modulation gradients stacked and in one buffer, same
    run, interleaved rounds (median and best)."""
    dev, dt = args.device, torch.bfloat16
    cuda = dev.startswith("cuda")
    B, T, D, depth = (2, 250, 1536, 4) if args.quick or not cuda else (32, 250, 1536, 4)
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(dev, dt)                 # noqa: E731
    mods0 = [r(B, T, 6, D) for _ in range(depth)] + [r(B, T, 2, D)]
    per, x0, dy, dx2 = [r(B, 1, D) for _ in range(6)], r(B, T, D), r(B, T, D), r(B, T, D)

    def backward_seconds(buffer: bool) -> float:
        mods = [m.clone().requires_grad_() for m in mods0]
        x = x0.clone().requires_grad_()
        with ops.modulation_grad_buffer(buffer):
            tok = [ops.split_modulation(m) for m in mods]
            y = ops.adaln_modulate(x, (tok[0][0], per[0]), (tok[0][1], per[1]))
            ones, zeros = torch.ones_like(per[0]), torch.zeros_like(per[0])
            for i in range(depth):
                x, y = ops.gated_residual_adaln(x, 0.5 * y, (tok[i][2], per[2]), zeros, zeros)
                x, y = ops.gated_residual_adaln(x, 0.5 * y, ones, (tok[i][3], per[3]), (tok[i][4], per[4]))
                x, y = ops.gated_residual_adaln(x, 0.5 * y, (tok[i][5], per[5]), (tok[i + 1][0], per[0]),
                                                (tok[i + 1][1], per[1]))
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.autograd.backward([y, x], [dy, dx2])
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    res = interleaved_rounds({"stack": lambda: backward_seconds(False), "buffer": lambda: backward_seconds(True)},
                             rounds=6 if args.quick else 20, warmup=2)
    hw = f"{torch.cuda.get_device_name()}" if cuda else \
        f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    rows = [{"op": "adaln chain backward", "layout": k, "shape": [B, T, D], "depth": depth, "dtype": "bfloat16",
             "hardware": hw, "median_ms": statistics.median(v) * 1e3, "best_ms": min(v) * 1e3, "rounds_ms":
             [x * 1e3 for x in v]} for k, v in res.items()]
    s, b = rows
    print(f"AdaLN chain backward, {depth} blocks, bf16 [{B}, {T}, {D}], {hw}: stacked {s['median_ms']:.2f} ms "
          f"(best {s['best_ms']:.2f}), one buffer {b['median_ms']:.2f} ms (best {b['best_ms']:.2f}): "
          f"{s['median_ms'] / b['median_ms']:.2f}x by medians, {s['best_ms'] / b['best_ms']:.2f}x by bests")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--threads", help="CPU: comma-separated intra-op thread counts to run in turn (default: as set)")
    ap.add_argument("--shapes", help="comma-separated labels among inference, training (default: both; --quick on "
                                     "the CPU: inference)")
    ap.add_argument("--modulation-grads", action="store_true",
                    help="only the chain's backward, modulation gradients stacked against in one buffer")
    args = ap.parse_args()
    if args.modulation_grads:
        rows = modulation_grads(args)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({**provenance(args.device), "rows": rows}, f, indent=1)
        return
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    rows = []
    for k in threads:
        if not args.device.startswith("cuda"):
            torch.set_num_threads(k)
            torch._dynamo.reset()
        rows += run(args)
    summary(rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**provenance(args.device), "hardware": rows[0]["hardware"] if rows else None, "rows": rows},
                      f, indent=1)


def summary(rows):
    """One line per shape, thread count and layout: the C++ op (the pairs variant for the pair layout) against
    torch.compile and against the 1- and 2-thread copy_ of the same bytes."""
    ours = [r for r in rows if r["variant"] in ("cpu", "cpu pairs")]
    if not ours:
        return
    print(f"\n# summary: C++ op vs torch.compile and copy_, load average {os.getloadavg()[0]:.1f} "
          f"(read the ratios, not the times, on a shared box)")
    out = []
    for r in ours:
        comp = next((c for c in rows if c["variant"] == "compile" and c["shape"] == r["shape"] and
                     c["threads"] == r["threads"] and c["op"] == r["op"] and c["modulation"] == r["modulation"]), None)
        out.append({"shape": r["shape"], "threads": r["threads"], "op": r["op"], "modulation": r["modulation"],
                    "C++ us": r["us"], "compile us": comp["us"] if comp else None, "C++ vs compile": r["x_compile"],
                    "C++ GB/s": r["GB/s"], "% copy 1t": r.get("pct_copy_1t"), "% copy 2t": r.get("pct_copy_2t")})
    print_table(out, list(out[0]))


def run(args):
    """Every shape, layout and variant on the current thread count: the rows (and their markdown table)."""
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    cpu_name = f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    hw = torch.cuda.get_device_name() if gpu else cpu_name
    shapes = [("inference", (2, 250, 1536)), ("training", (32, 250, 1536))]
    if gpu:
        shapes.append(("bandwidth", (16, 4096, 1536)))
    if args.shapes:
        want = args.shapes.split(",")
        shapes = [s for s in shapes if s[0] in want]
    elif args.quick and not gpu:
        shapes = shapes[:1]
    repeats = 5 if args.quick else 20
    copy_gbs = copy_bandwidth_gbs() if gpu else None
    backends = [b for b in ops.available_backends("gated_residual_adaln", dev) if b != "reference"]
    rows = []
    for label, shape in shapes:
        for op_name, per_token in (("gated_residual_adaln", False), ("gated_residual_adaln", True),
                                   ("gated_residual_adaln", "pair"), ("adaln_modulate", False),
                                   ("adaln_modulate", True)):
            x, h, gate, shift, scale = make(shape, dtype, dev, per_token is True)
            if per_token == "pair":
                # gate/shift/scale = per-token part + per-sample part, as the DiT passes them each step
                B, L, D = shape
                tok = torch.stack([gate, shift, scale]).expand(3, B, L, D).contiguous()
                per = 0.1 * tok[:, :, :1].clone()
                fargs, eager_fn = (x, h, tok, per), eager_gated_pairs
                nbytes = x.element_size() * (4 * x.numel() + 3 * x.numel())
            elif op_name == "gated_residual_adaln":
                fargs, eager_fn, op = (x, h, gate, shift, scale), eager_gated, ops.gated_residual_adaln
                # read x, h, gate, shift, scale; write x2, y
                nbytes = x.element_size() * (4 * x.numel() + 3 * gate.numel())
            else:
                fargs, eager_fn, op = (x, shift, scale), eager_modulate, ops.adaln_modulate
                nbytes = x.element_size() * (2 * x.numel() + 2 * shift.numel())
            variants = {"eager": eager_fn}
            if not args.no_compile:
                variants["compile"] = torch.compile(eager_fn, fullgraph=True, dynamic=False)
            for b in backends:
                if per_token == "pair":
                    variants[f"{b}+add"] = fused_pairs(b, presum=True)
                    variants[f"{b} pairs"] = fused_pairs(b, presum=False)
                else:
                    variants[b] = fused(b, op)
            numel = x.numel()
            inner = max(1, min(50, int(2e7 // numel))) if gpu else max(1, int(2e6 // numel))
            times = {}
            with torch.no_grad():
                if gpu:
                    for name, fn in variants.items():
                        # Graph capture for every variant at the inference shape (launch-bound there).
                        times[name], _ = time_gpu(lambda: fn(*fargs), repeats, inner, graphs=True)
                else:
                    # Interleaved rounds (every variant once per round, alternating order), best of the rounds.
                    def timed(fn):
                        def measure():
                            t0 = time.perf_counter()
                            for _ in range(inner):
                                fn(*fargs)
                            return (time.perf_counter() - t0) / inner * 1e6
                        return measure
                    per_round = interleaved_rounds({k: timed(f) for k, f in variants.items()}, repeats, warmup=2)
                    times = {k: min(v) for k, v in per_round.items()}
            copy_cpu = {} if gpu else {k: copy_gbs_cpu(nbytes, k, repeats) for k in (1, 2)}
            for name, us in times.items():
                row = {
                    "hardware": hw, "dtype": str(dtype).replace("torch.", ""), "shape": list(shape),
                    "label": label, "op": op_name, "modulation": MODULATION[per_token],
                    "threads": None if gpu else torch.get_num_threads(),
                    "variant": name, "us": round(us, 2),
                    "x_eager": round(times["eager"] / us, 2),
                    "x_compile": round(times["compile"] / us, 2) if "compile" in times else None,
                    "GB/s": round(nbytes / (us * 1e-6) / 1e9, 1),
                }
                if copy_gbs:
                    row["pct_copy_bw"] = round(100 * row["GB/s"] / copy_gbs, 1)
                for k, gbs in copy_cpu.items():
                    row[f"copy_{k}t_GB/s"] = round(gbs, 1)
                    row[f"pct_copy_{k}t"] = round(100 * row["GB/s"] / gbs, 1)
                rows.append(row)

    print(f"\n# bench_adaln on {hw}, {dtype}, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}"
          + (f", measured copy bandwidth {copy_gbs:.0f} GB/s" if copy_gbs else ""))
    cols = ["label", "shape", "threads", "op", "modulation", "variant", "us", "x_eager", "x_compile", "GB/s"]
    if copy_gbs:
        cols.append("pct_copy_bw")
    else:
        cols += ["copy_1t_GB/s", "pct_copy_1t", "copy_2t_GB/s", "pct_copy_2t"]
    print_table(rows, cols)
    for r in rows:
        r["copy_GBps"] = copy_gbs
    return rows


if __name__ == "__main__":
    main()
