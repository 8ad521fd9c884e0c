"""Embedding extraction throughput for the benchmark metrics: clips/s per embedder, batched (and bf16 on a GPU)
against the naive per-clip fp32 loop, measured in the same run, interleaved.

    python bench/bench_evaluate.py                     # CPU: 16 clips of 2 s
    python bench/bench_evaluate.py --device cuda --clips 128 --seconds 10 --batch 32

The PANNs Cnn14, VGGish and PaSST models are full size with random weights (throughput does not depend on the
weights); the log-mel statistics embedding has none.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from omni2sound.evaluation.embedders.logmel import LogMelStats  # noqa: E402
from omni2sound.evaluation.embedders.panns import Cnn14, PannsCnn14  # noqa: E402
from omni2sound.evaluation.embedders.passt import PaSST, PasstNet  # noqa: E402
from omni2sound.evaluation.embedders.vggish import VGGish, VGGishNet  # noqa: E402
from omni2sound.evaluation.runner import embed_all  # noqa: E402


def build(name, device, dtype):
    if name == "logmel":
        return LogMelStats().to(device)
    if name == "PANNs":
        return PannsCnn14(Cnn14()).to(device, dtype)
    if name == "VGG":
        return VGGish(VGGishNet()).to(device, dtype)
    if name == "PaSST":
        return PaSST(PasstNet()).to(device, dtype)
    raise ValueError(name)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--embedders", nargs="+", default=["logmel", "PANNs", "VGG", "PaSST"],
                    choices=["logmel", "PANNs", "VGG", "PaSST"])
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    clips = [np.random.default_rng(i).standard_normal(int(args.seconds * 16000)).astype(np.float32) * 0.1
             for i in range(args.clips)]
    rows = []
    for name in args.embedders:
        fast_dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        fast = build(name, args.device, fast_dtype)
        naive = build(name, args.device, torch.float32)
        for attr in ("model", "net"):
            if hasattr(naive, attr):
                getattr(naive, attr).load_state_dict(getattr(fast, attr).state_dict())

        def run_batched():
            embed_all(fast, clips, 16000, args.batch)
            sync(args.device)

        def run_naive():
            for c in clips:                                    # one clip per forward, fp32
                naive.embed(torch.from_numpy(c)[None])
            sync(args.device)

        run_batched()
        run_naive()
        t = {"batched": [], "naive": []}
        for _ in range(args.rounds):                           # interleaved: both see the same box state
            for k, fn in (("batched", run_batched), ("naive", run_naive)):
                t0 = time.perf_counter()
                fn()
                t[k].append(time.perf_counter() - t0)
        b, n = statistics.median(t["batched"]), statistics.median(t["naive"])
        row = {"embedder": name, "clips": args.clips, "seconds": args.seconds, "batch": args.batch,
               "dtype_batched": str(fast_dtype).replace("torch.", ""), "batched_clips_per_s": args.clips / b,
               "naive_clips_per_s": args.clips / n, "speedup": n / b}
        rows.append(row)
        print(f"{name:8s} batched {row['batched_clips_per_s']:8.2f} clips/s ({row['dtype_batched']}, batch "
              f"{args.batch})  per-clip loop {row['naive_clips_per_s']:8.2f} clips/s (fp32)  x{row['speedup']:.2f}",
              flush=True)
    hw = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    meta = {"hardware": hw, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python bench/bench_evaluate.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    print(json.dumps(meta))
    if args.out:
        with open(args.out, "w") as f:
            from omni2sound.gpu_info import provenance
            json.dump({**provenance(), "meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
