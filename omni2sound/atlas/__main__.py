"""python -m omni2sound.atlas --manifest M --out DIR [--config C.json | --preset P] [--set k=v] [--shard K/N]

With no --manifest, writes a toy-world manifest (`--toy N` clips) under DIR/toy and captions it with the
rule-based toy agents: the embedded default, which needs no model and no network.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def build_config(args):
    from .config import AtlasConfig, preset
    cfg = AtlasConfig.load(args.config) if args.config else preset(args.preset)
    d = cfg.to_dict()
    for s in args.set or []:
        k, eq, v = s.partition("=")
        if not eq:
            raise SystemExit(f"--set expects key=value, got {s!r}")
        try:
            val = json.loads(v)
        except json.JSONDecodeError:
            val = v
        target, parts = d, k.split(".")
        for p in parts[:-1]:
            if not isinstance(target.get(p), dict):
                raise SystemExit(f"--set {k}: {p!r} is not a section of the config")
            target = target[p]
        if parts[-1] not in target:
            raise SystemExit(f"--set {k}: unknown field {parts[-1]!r}")
        target[parts[-1]] = val
    return AtlasConfig.from_dict(d)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m omni2sound.atlas", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", help="input JSON Lines manifest (clip_id, audio, video, start, duration, ...)")
    ap.add_argument("--out", required=True, help="output folder: records*.jsonl, manifest.jsonl, summary.json")
    ap.add_argument("--config", help="AtlasConfig JSON")
    ap.add_argument("--preset", default="toy", help="toy, toy-junior-only, toy-senior-only, openai")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a config field (JSON value), e.g. --set clap_handoff=0.3 "
                         "--set agents.junior.base_url=http://127.0.0.1:8000/v1")
    ap.add_argument("--shard", help="K/N: this process captions manifest lines K, K+N, K+2N, ...")
    ap.add_argument("--workers", type=int, default=1,
                    help="N processes on this machine, each captioning shard k of N with a 1/N share of the bounds "
                         "in flight (one Python process uses one core); outputs are finalized once at the end")
    ap.add_argument("--toy", type=int, default=200, help="toy clips to make when no --manifest is given")
    ap.add_argument("--limit", type=int, help="only the first LIMIT records of the manifest")
    ap.add_argument("--retry-failed", action="store_true", help="caption again the clips recorded as failed")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    from .config import AtlasConfig
    from .runner import Runner, parse_shard, read_input_manifest, run_workers
    try:
        cfg = build_config(args)
        shard = parse_shard(args.shard)
        if args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
        if args.workers > 1 and shard != (0, 1):
            raise ValueError("--workers splits the whole manifest on this machine; with --shard, run one process "
                             "per shard instead")
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    manifest = args.manifest
    if manifest is None:
        from .toy import write_toy_manifest
        manifest = os.path.join(args.out, "toy", "manifest.jsonl")
        if not os.path.exists(manifest):
            write_toy_manifest(os.path.dirname(manifest), args.toy, seed=cfg.seed)
    try:
        records, problems = read_input_manifest(manifest)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in problems[:20]:
        print(f"skipped: {p}", file=sys.stderr)
    if len(problems) > 20:
        print(f"skipped: ... {len(problems) - 20} more", file=sys.stderr)
    if args.limit:
        records = records[: args.limit]
    cfg_path = os.path.join(args.out, "config.json")
    if os.path.exists(cfg_path) and AtlasConfig.load(cfg_path).content_hash() != cfg.content_hash():
        print(f"note: {cfg_path} holds another config; records of both are kept, keyed by config", file=sys.stderr)
    cfg.save(cfg_path)
    if args.workers > 1:
        try:
            summary = run_workers(cfg, args.out, records, args.workers, retry_failed=args.retry_failed,
                                  progress=not args.no_progress)
        except (ValueError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    else:
        summary = Runner(cfg, args.out, shard, progress=not args.no_progress,
                         retry_failed=args.retry_failed).run(records)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
