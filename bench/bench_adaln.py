"""Benchmark the fused AdaLN chain against eager PyTorch and torch.compile of the same math, same run.

    python bench/bench_adaln.py            # CPU: fp32; GPU: bf16 (forward under CUDA graphs)
    python bench/bench_adaln.py --quick    # fewer repeats

Modulations per sample, per token, and as the DiT passes them each step: a per-token part plus a per-sample
part (rows "token+sample pair": the baselines and "<backend>+add" sum the parts first, "<backend> pairs" passes the
pair to the op, which adds them in the kernel).

Reports us per call, the ratio to eager and to torch.compile, and GB/s of the bytes the op must move against a
copy of the same bytes measured in the same run: on a GPU a device-to-device copy; on the CPU ``copy_`` on one and on
two threads (columns pct_copy_1t / pct_copy_2t), and the CPU times are best of the repeats (a shared box's noise
only ever adds time). Shapes: inference [2, 250, 1536], training
[32, 250, 1536], and (GPU) the bandwidth shape [16, 4096, 1536].
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
import torch.nn.functional as F
from _timing import card, copy_gbs_cpu, interleaved_rounds, print_table, time_gpu  # bench/: the script's folder

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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = ap.parse_args()

    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    cpu_name = f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    hw = torch.cuda.get_device_name() if gpu else cpu_name
    shapes = [("inference", (2, 250, 1536)), ("training", (32, 250, 1536))]
    if gpu:
        shapes.append(("bandwidth", (16, 4096, 1536)))
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
        if args.quick and not gpu:
            break

    print(f"\n# bench_adaln on {hw}, {dtype}, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}"
          + (f", measured copy bandwidth {copy_gbs:.0f} GB/s" if copy_gbs else ""))
    cols = ["label", "shape", "op", "modulation", "variant", "us", "x_eager", "x_compile", "GB/s"]
    if copy_gbs:
        cols.append("pct_copy_bw")
    else:
        cols += ["copy_1t_GB/s", "pct_copy_1t", "copy_2t_GB/s", "pct_copy_2t"]
    print_table(rows, cols)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"hardware": hw, "gpu": card(dev), "copy_GBps": copy_gbs, "torch": torch.__version__,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
