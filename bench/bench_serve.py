"""Serving throughput (``omni2sound.serving.Server``): clips per second at fixed batch sizes, and a mixed-duration
workload batched into buckets against the same workload all padded to the longest bucket, same run, same weights.

    python bench/bench_serve.py --device cuda                      # L, 10 s clips at batch 1, 8, 32 + mixed
    python bench/bench_serve.py --quick                             # CPU: tiny, 1 s, 2 steps: proves it runs

Fixed: ``--batches`` requests of ``--duration`` s each (25 steps, CFG 4.5, video + text conditions), one bucket of
that duration; every (bucket, batch size) graph is captured at start-up (``Server.warm_up``, timed apart). Per
batch size: median seconds of sampling and of the whole request (sampling + VAE decode + copy to the host) over
``--repeats``, clips / s and seconds of audio per second.
Mixed: ``--mixed`` requests with durations drawn uniformly from [``--min-duration``, ``--duration``] s, served through
the ``--buckets`` list and, as the baseline, through one bucket of ``--duration`` s (every request padded to it);
clips / s of each and the ratio.
Random conditions and random N(0, 0.02) weights; the VAE is the paper preset on a GPU (tiny with ``--quick``).
The GPU's name, clocks, driver, memory and power (``nvidia-ml-py``) are written with the rows.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import print_table  # noqa: E402  (bench/ on sys.path)
from bench_generate import random_dit  # noqa: E402

from omni2sound.gpu_info import provenance  # noqa: E402
from omni2sound.pipeline import Omni2SoundPipeline, PipelineConfig  # noqa: E402
from omni2sound.serving import Request, ServeConfig, Server  # noqa: E402


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def requests(cfg, durations, text_tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, d in enumerate(durations):
        nv, ns = int(-(-d * cfg.video_rate // 1)), int(-(-d * cfg.sync_rate // 1))
        out.append(Request(duration=d, seed=i, text_tokens=torch.randn(text_tokens, cfg.text_dim, generator=g),
                           video_features=torch.randn(nv, cfg.video_dim, generator=g),
                           sync_features=torch.randn(ns, cfg.sync_dim, generator=g)))
    return out


def timed(server: Server, reqs, device) -> tuple:
    """(sampling seconds, total seconds) of serving ``reqs``."""
    _sync(device)
    t0 = time.perf_counter()
    lat = server.sample(reqs)
    _sync(device)
    t1 = time.perf_counter()
    server.decode(lat, [r.duration for r in reqs])
    _sync(device)
    return t1 - t0, time.perf_counter() - t0


@torch.no_grad()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--preset", default="L")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--min-duration", type=float, default=2.0)
    ap.add_argument("--buckets", default="2.5,5,7.5,10", help="the mixed workload's buckets (seconds)")
    ap.add_argument("--mixed", type=int, default=64, help="requests of the mixed workload (0: none)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", "--cfg", dest="guidance", type=float, default=4.5,
                    help="joint classifier-free guidance scale (--cfg is the same flag)")
    ap.add_argument("--text-tokens", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fp8", action="store_true", help="the DiT blocks' projections in fp8 (SamplingOptions.fp8)")
    ap.add_argument("--vae", choices=("tiny", "paper"), default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.batches, args.duration, args.min_duration = "tiny", "1,2", 1.0, 0.3
        args.buckets, args.mixed, args.steps, args.repeats = "0.5,1", 6, 2, 1
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    from omni2sound.vae import VAE_PRESETS, AudioVAE
    vae_name = args.vae or ("paper" if device.type == "cuda" and not args.quick else "tiny")
    vae = AudioVAE(VAE_PRESETS[vae_name]).to(device).eval()
    dit = random_dit(args.preset, device, dtype, vae.config.latent_dim)
    from dataclasses import replace
    dit.config = replace(dit.config, max_duration=max(dit.config.max_duration, args.duration))
    pipe = Omni2SoundPipeline(dit, vae, PipelineConfig())
    cfg = dit.config
    batches = [int(b) for b in args.batches.split(",")]
    common = dict(steps=args.steps, guidance=args.guidance, fp8=args.fp8)
    rows = []

    fixed = Server(pipe, ServeConfig(buckets=(args.duration,), batch_sizes=tuple(batches), **common))
    warm = fixed.warm_up(args.text_tokens)
    print(f"start-up: {len(batches)} graphs in {warm:.1f} s", flush=True)
    for b in batches:
        reqs = requests(cfg, [args.duration] * b, args.text_tokens)
        timed(fixed, reqs, device)                                    # decode graph capture for this shape
        runs = [timed(fixed, reqs, device) for _ in range(args.repeats)]
        s, t = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        rows.append({"workload": f"fixed {args.duration:g} s", "batch": b, "sample_ms": round(s * 1e3, 1),
                     "total_ms": round(t * 1e3, 1), "clips_per_s": round(b / t, 2),
                     "audio_s_per_s": round(b * args.duration / t, 1)})
        print(json.dumps(rows[-1]), flush=True)

    if args.mixed:
        g = torch.Generator().manual_seed(7)
        durs = (args.min_duration + (args.duration - args.min_duration) * torch.rand(args.mixed, generator=g)).tolist()
        durs = [round(d, 2) for d in durs]
        reqs = requests(cfg, durs, args.text_tokens, seed=1)
        buckets = tuple(float(x) for x in args.buckets.split(","))
        bucketed = Server(pipe, ServeConfig(buckets=buckets, batch_sizes=tuple(batches), **common))
        warm_b = bucketed.warm_up(args.text_tokens)
        print(f"start-up (buckets {buckets}): {len(buckets) * len(batches)} graphs in {warm_b:.1f} s", flush=True)
        for name, server in (("mixed, one bucket", fixed), (f"mixed, buckets {args.buckets}", bucketed)):
            timed(server, reqs, device)
            runs = [timed(server, reqs, device) for _ in range(args.repeats)]
            s, t = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
            rows.append({"workload": name, "batch": f"<= {batches[-1]}", "sample_ms": round(s * 1e3, 1),
                         "total_ms": round(t * 1e3, 1), "clips_per_s": round(len(reqs) / t, 2),
                         "audio_s_per_s": round(sum(durs) / t, 1)})
            print(json.dumps(rows[-1]), flush=True)
        rows[-1]["x one bucket"] = round(rows[-1]["clips_per_s"] / rows[-2]["clips_per_s"], 2)
    for r in rows:
        r.setdefault("x one bucket", "")
    rec = provenance(device)
    hw, card = rec["hardware"], rec["gpu"]
    print(f"\nserving {args.preset}{' fp8' if args.fp8 else ''}, {args.steps} steps, guidance {args.guidance}, "
          f"VAE {vae_name}, on {hw}, torch {torch.__version__}; start-up {warm:.1f} s\n")
    print_table(rows, ["workload", "batch", "sample_ms", "total_ms", "clips_per_s", "audio_s_per_s", "x one bucket"])
    if card:
        print(f"\ncard: {card}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**rec, "startup_s": round(warm, 2), "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
