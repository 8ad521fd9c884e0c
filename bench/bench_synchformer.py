"""Benchmark of Synchformer's visual feature extraction (``SyncFeatureExtractor.features``): the batched path
against a naive per-segment fp32 loop, same run, same random weights, same clip.

    python bench/bench_synchformer.py [--config tiny|full] [--seconds 10] [--device cpu|cuda]
                                      [--batch-segments 32] [--repeats 3] [--out f.json]

  batched  ``features(frames, fps, batch_segments=B)``: segmentation, then B segments per forward under
           ``torch.inference_mode()``, bf16 autocast on CUDA (fp32 on the CPU)
  naive    the same segmentation, then one segment per forward in fp32 under ``torch.no_grad()``
Both include decoding-free preprocessing (resample to 25 fps, resize, crop) of a random uint8 clip. Reports
segments per second (best of ``--repeats``), the ratio, and the largest difference between the two outputs
relative to the features' scale (bf16 against fp32 on a GPU). Random weights: the timing does not depend on them.
Defaults: the full-size model on a GPU; on the CPU the tiny config, or ``--config full --seconds 1.28`` (3
segments) since a full-size segment is ~0.35 TFLOP.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from _timing import hardware, provenance  # bench/ is the script's folder, on sys.path

from omni2sound.synchformer import SyncFeatureExtractor, SynchformerConfig, segment_video


def best_time(fn, repeats: int, device: str):
    best, out = float("inf"), None
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=["tiny", "full"], default=None)
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--fps", type=float, default=25.0)
    ap.add_argument("--size", default="360x640", help="frame height x width of the random clip")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-segments", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = args.device
    config = args.config or ("full" if dev == "cuda" else "tiny")
    cfg = SynchformerConfig() if config == "full" else SynchformerConfig.tiny()
    seconds = args.seconds if args.seconds is not None else (10.0 if dev == "cuda" or config == "tiny" else 1.28)
    h, w = (int(v) for v in args.size.split("x"))

    torch.manual_seed(0)
    model = SyncFeatureExtractor(cfg).to(dev).eval()
    frames = np.random.default_rng(0).integers(0, 256, (int(round(seconds * args.fps)), h, w, 3), dtype=np.uint8)
    n_seg = segment_video(frames, args.fps, cfg).shape[0]

    def batched():
        return model.features(frames, args.fps, batch_segments=args.batch_segments)

    def naive():
        with torch.no_grad():
            segs = segment_video(frames, args.fps, cfg, device=dev)
            return torch.cat([model.vfeat_extractor(segs[i][None, None].contiguous())[0, 0]
                              for i in range(segs.shape[0])])

    t_naive, f_naive = best_time(naive, args.repeats, dev)
    t_batch, f_batch = best_time(batched, args.repeats, dev)
    rel = float((f_batch.float() - f_naive.float()).abs().max() / f_naive.float().abs().max())
    res = {
        "hardware": hardware(dev), "device": dev, "config": config, "seconds": seconds, "fps": args.fps,
        "frame_size": [h, w], "segments": n_seg, "features": list(f_batch.shape),
        "batch_segments": args.batch_segments, "batched_dtype": "bf16 autocast" if dev == "cuda" else "fp32",
        "naive_s": t_naive, "batched_s": t_batch,
        "naive_segments_per_s": n_seg / t_naive, "batched_segments_per_s": n_seg / t_batch,
        "speedup": t_naive / t_batch, "max_rel_diff": rel,
    }
    print(f"Synchformer visual features, {config} config, {seconds:g} s clip ({n_seg} segments -> "
          f"{tuple(f_batch.shape)}), {res['hardware']}")
    print("| path | s per clip | segments/s |")
    print("|---|---|---|")
    print(f"| naive (per segment, fp32) | {t_naive:.3f} | {n_seg / t_naive:.2f} |")
    print(f"| batched ({args.batch_segments}/forward, {res['batched_dtype']}) | {t_batch:.3f} | "
          f"{n_seg / t_batch:.2f} |")
    print(f"speedup {t_naive / t_batch:.2f}x; max |batched - naive| / max |naive| = {rel:.2e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**provenance(), **res}, f, indent=1)


if __name__ == "__main__":
    main()
