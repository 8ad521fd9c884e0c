"""Command line generation:

    python -m omni2sound.generate --model DIR --video x.mp4 --text "a dog barks" --out out.wav
    python -m omni2sound.generate --model DIR --text "rain on a tin roof" --duration 5 --guidance 4.5 --out rain.flac
    python -m omni2sound.generate --model DIR --clip-features c.npy --sync-features s.npy --out out.wav
    python -m omni2sound.generate --model DIR --video x.mp4 --out x_with_sound.mp4
    python -m omni2sound.generate --model DIR --manifest items.csv --out-dir generated/

An --out ending in .mp4 / .mov / .mkv / .m4v / .webm writes the input video with the generated audio as its
sound track (the video stream copied, not re-encoded; AAC audio cut to the video's length). Without
--duration the audio is as long as the video (from its packets' timestamps), or 10 s without video.
--manifest runs batch generation (omni2sound/batch.py): a CSV or JSON-lines file with columns id, video,
text, duration, seed; outputs, results.jsonl and a resumable, torchrun-shardable run under --out-dir.

DIR holds dit/ and vae/, or dit/ and a pipeline.json naming the VAE's folder: every finished DiT stage of
``python -m omni2sound.train`` is one (``--model runs/toy/stage3``; see omni2sound/pipeline.py). ``--guidance 3,5``
gives separate video and text scales (``--cfg`` is the same flag).
Several --text (and/or --video) values make a batch; outputs are OUT, OUT_1, OUT_2, ... Timings per phase
are printed as JSON on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

import torch

from .device import default_device, device_arg
from .files import check_writable, remove_stale_temps
from .pipeline import MAX_DURATION_S


def _guidance(s: str):
    if s.lower() in ("none", "off", "0"):
        return None
    parts = [float(p) for p in s.split(",")]
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return (parts[0], parts[1])
    raise argparse.ArgumentTypeError(f"--guidance takes a scale or 'video,text' scales, got {s!r}")


def _out_paths(out: str, n: int) -> List[str]:
    root, ext = os.path.splitext(out)
    return [out] + [f"{root}_{i}{ext}" for i in range(1, n)]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m omni2sound.generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="pipeline directory: dit/ and vae/, or a training stage folder (e.g. runs/toy/stage3)")
    p.add_argument("--video", action="append", default=None, help="input video (repeat for a batch)")
    p.add_argument("--text", action="append", default=None,
                   help="text prompt (repeat for a batch); at most the model's max_text_tokens tokens (DiTConfig: "
                        "128 by default, 64 in the tiny preset), longer ones are refused unless --truncate")
    p.add_argument("--truncate", action="store_true",
                   help="cut prompts longer than the model's max_text_tokens instead of refusing them")
    p.add_argument("--clip-features", default=None, help="precomputed semantic video features (.npy/.safetensors)")
    p.add_argument("--sync-features", default=None, help="precomputed sync features (.npy/.safetensors)")
    p.add_argument("--duration", type=float, default=None,
                   help=f"seconds (default: the video's duration, the longest one's in a batch; 10 without video; "
                        f"at most {MAX_DURATION_S:g}, and refused up front when its estimated memory exceeds the "
                        "device's free memory)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", "--cfg", dest="guidance", type=_guidance, default=4.5,
                   help="classifier-free guidance: a scale, 'video,text' scales or none (--cfg is the same flag); "
                        "default joint 4.5, chosen on the toy world's validation prompts; '4.5,6' follows "
                        "off-screen sounds in the text better at 1.5x the compute per step (README, Default guidance)")
    p.add_argument("--method", choices=("euler", "heun"), default="euler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=default_device(), type=device_arg, help="default: cuda if visible, else cpu")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    p.add_argument("--plain", action="store_true", help="turn every latency optimisation off")
    p.add_argument("--out", help="output .wav or .flac, or .mp4 / .mov / .mkv (with --video): the video with "
                                 "the generated sound track")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (shown for requests over a second)")
    b = p.add_argument_group("batch generation (--manifest)")
    b.add_argument("--manifest", help="CSV (with a header) or JSON-lines file; columns id, video, text, duration, "
                                      "seed, any of them empty (video paths relative to the manifest's folder)")
    b.add_argument("--out-dir", help="folder for the outputs (ID.wav, or ID.mp4 for rows with a video), results.jsonl")
    b.add_argument("--batch-size", type=int, default=8, help="requests per forward (default 8)")
    b.add_argument("--bucket-seconds", type=float, default=1.0,
                   help="requests whose durations round up to the same multiple of this share a batch (default 1)")
    b.add_argument("--format", choices=("auto", "wav", "flac", "mp4"), default="auto",
                   help="auto: ID.mp4 for rows with a video, ID.wav otherwise")
    args = p.parse_args(argv)

    if args.manifest is not None:
        if args.out_dir is None:
            p.error("--manifest needs --out-dir")
        try:                # before the generation, whose results would otherwise be lost at the end
            check_writable(os.path.join(args.out_dir, "results.jsonl"))
            remove_stale_temps(args.out_dir)
        except OSError as e:
            p.error(f"--out-dir: {e.strerror or e}")
        if args.video or args.text or args.out:
            p.error("--manifest takes its requests from the file: drop --video / --text / --out")
        from .batch import run_manifest
        try:
            return run_manifest(args)
        except (ValueError, FileNotFoundError) as e:
            p.exit(2, f"{p.prog}: error: {e}\n")
    if args.out is None:
        p.error("--out is required (or --manifest with --out-dir)")

    if args.duration is not None and not (0 < args.duration <= MAX_DURATION_S):
        p.error(f"--duration must be in (0, {MAX_DURATION_S:g}] seconds, got {args.duration:g}")
    from .mux import VIDEO_SUFFIXES, is_video_path
    if is_video_path(args.out):
        if not args.video:
            p.error(f"--out {args.out}: a video output needs --video (the picture to put the sound under)")
    elif not args.out.lower().endswith((".wav", ".flac")):
        p.error(f"--out must end in .wav or .flac (audio) or {' / '.join(VIDEO_SUFFIXES)} (video), got {args.out}")
    try:                    # before the generation, whose result would otherwise be lost at the end
        check_writable(args.out)
        remove_stale_temps(os.path.dirname(os.path.abspath(args.out)))
    except OSError as e:
        p.error(f"--out: {e.strerror or e}")
    for path in (args.video or []) + [args.clip_features, args.sync_features]:
        if path is not None and not os.path.isfile(path):
            p.error(f"no such file: {path}")
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as e:    # a corrupt video / audio, a bad model folder, bad features
        p.exit(2, f"{p.prog}: error: {e}\n")       # the reason, not a traceback


def _run(args) -> int:
    from .audio import save_audio
    from .pipeline import Omni2SoundPipeline

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    from .mux import default_duration, is_video_path, mux_audio
    pipe = Omni2SoundPipeline.from_pretrained(args.model, device=args.device, dtype=dtype)
    pipe.truncate_text = args.truncate
    duration = args.duration
    if duration is None:
        duration = default_duration(args.video)
    opts = dict(steps=args.steps, guidance=args.guidance, seed=args.seed, method=args.method, plain=args.plain,
                progress=not args.no_progress)
    if args.clip_features or args.sync_features:
        from .encoders import load_features
        mcfg = pipe.dit.config
        clip = load_features(args.clip_features, dim=mcfg.video_dim) if args.clip_features else None
        sync = load_features(args.sync_features, dim=mcfg.sync_dim) if args.sync_features else None
        text = args.text or [None]
        cond = pipe.conditions_from_features(video_features=[clip] * len(text), sync_features=[sync] * len(text),
                                             text=text, duration=duration)
        result = pipe.generate_from_conditions(cond, **opts)
    else:
        result = pipe.generate(video=args.video, text=args.text, duration=duration, **opts)
    paths = _out_paths(args.out, result.audio.shape[0])
    videos = args.video or []
    for i, (path, wav) in enumerate(zip(paths, result.audio)):
        if is_video_path(path):
            mux_audio(videos[i] if i < len(videos) else videos[0], wav, result.sample_rate, path)
        else:
            save_audio(path, wav, result.sample_rate)
    print(json.dumps({"outputs": paths, "sample_rate": result.sample_rate, "duration": duration,
                      "timings_s": {k: round(v, 4) for k, v in result.timings.items()}}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
