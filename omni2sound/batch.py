"""Batch generation from a manifest: ``python -m omni2sound.generate --model DIR --manifest items.csv --out-dir OUT``.

The manifest is a CSV file with a header row, or a JSON-lines file (one object per line), with the columns

    id        the output's name: OUT/<id>.wav (or .mp4 for a row with a video); default item<line>
    video     a video path (relative paths are read from the manifest's folder); empty: no video
    text      a prompt; empty: no text (a row needs a video or a text)
    duration  seconds; empty: the video's duration, else --duration, else 10
    seed      the initial noise's seed; empty: --seed

Requests are grouped by duration bucket (durations rounded up to a multiple of --bucket-seconds share a batch,
made at the bucket's longest duration and each output cut to its own), --batch-size at a time. Every output is
written atomically (a temporary file renamed into place), so a run killed at any point leaves only complete
outputs; run the same command again and the finished ones are skipped. ``OUT/results.jsonl`` gets one row per
manifest row (in manifest order): id, line, status ("ok", "failed"), output, duration, seed, seconds, and the
error for a failed row (a bad row, an unreadable video: the run goes on). Under ``torchrun`` each rank takes
every WORLD_SIZE-th request (after bucketing), and rank 0 writes results.jsonl when all ranks are done.
"""
from __future__ import annotations

import csv
import glob
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from .files import atomic_write, remove_stale_temps

COLUMNS = ("id", "video", "text", "duration", "seed")
RESULTS = "results.jsonl"
PARTS = ".results"                       # per-rank row logs, merged into results.jsonl at the end
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=@-]{0,199}$")


@dataclass
class Item:
    line: int                            # the manifest line the request comes from (1-based)
    id: str
    video: Optional[str]
    text: Optional[str]
    duration: float
    seed: int


class RowError(ValueError):
    """A manifest row that cannot be generated; the message names the file, the line and the reason."""


def _field(row: dict, key: str) -> Optional[str]:
    v = row.get(key)
    if v is None:
        return None
    v = str(v).strip()
    return v or None


def _rows(path: str):
    """(line, dict or RowError) per request of a CSV or JSON-lines manifest."""
    if path.lower().endswith((".jsonl", ".ndjson", ".json")):
        with open(path, encoding="utf-8") as f:
            for n, text in enumerate(f, 1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    yield n, RowError(f"{path}:{n}: not a JSON object ({e.msg})")
                    continue
                if not isinstance(row, dict):
                    yield n, RowError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
                    continue
                unknown = sorted(set(row) - set(COLUMNS))
                if unknown:
                    yield n, RowError(f"{path}:{n}: unknown field(s) {unknown}; the columns are {list(COLUMNS)}")
                    continue
                yield n, row
        return
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        unknown = sorted(set(header) - set(COLUMNS))
        if not header or unknown:
            raise ValueError(f"{path}:1: the header must name columns among {list(COLUMNS)}"
                             + (f"; unknown: {unknown}" if unknown else "; the file is empty"))
        reader.fieldnames = header
        start = reader.line_num + 1
        for row in reader:
            if None in row:                  # more cells than header columns
                yield start, RowError(f"{path}:{start}: {len(header) + len(row[None])} cells, the header has "
                                      f"{len(header)}")
            elif any(v is not None and str(v).strip() for v in row.values()):
                yield start, row
            start = reader.line_num + 1


def read_manifest(path: str, default_seed: int = 0, default_duration: Optional[float] = None
                  ) -> Tuple[List[Item], List[dict]]:
    """(requests, failures): every row checked (ids unique and file-safe, video readable, numbers valid);
    a failure is a results row {"id", "line", "status": "failed", "error"} naming the file and line."""
    from .mux import DEFAULT_SECONDS, video_duration

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such manifest")
    base = os.path.dirname(os.path.abspath(path))
    items, failures, seen = [], [], {}
    for n, row in _rows(path):
        rid = None
        try:
            if isinstance(row, RowError):
                raise row
            rid = _field(row, "id") or f"item{n:05d}"
            if not _ID.match(rid):
                raise RowError(f"{path}:{n}: id {rid!r} is not a file name (letters, digits and ._+=@- only)")
            if rid in seen:
                raise RowError(f"{path}:{n}: id {rid!r} repeats line {seen[rid]}")
            seen[rid] = n
            video, text = _field(row, "video"), _field(row, "text")
            if video is None and text is None:
                raise RowError(f"{path}:{n}: neither video nor text (the audio would be unconditional)")
            if video is not None:
                video = os.path.join(base, os.path.expanduser(video))
                if not os.path.isfile(video):
                    raise RowError(f"{path}:{n}: no such video file: {video}")
            seed_s = _field(row, "seed")
            try:
                seed = default_seed if seed_s is None else int(seed_s)
            except ValueError:
                raise RowError(f"{path}:{n}: seed {seed_s!r} is not an integer") from None
            dur_s = _field(row, "duration")
            if dur_s is not None:
                try:
                    duration = float(dur_s)
                except ValueError:
                    raise RowError(f"{path}:{n}: duration {dur_s!r} is not a number of seconds") from None
            elif video is not None:
                try:
                    duration = video_duration(video)
                except ValueError as e:
                    raise RowError(f"{path}:{n}: {e}") from None
            else:
                duration = default_duration or DEFAULT_SECONDS
            if not (duration > 0 and math.isfinite(duration)):
                raise RowError(f"{path}:{n}: duration must be positive seconds, got {duration}")
            items.append(Item(n, rid, video, text, duration, seed))
        except RowError as e:
            failures.append({"id": rid, "line": n, "status": "failed", "error": str(e)})
    return items, failures


def output_path(out_dir: str, item: Item, fmt: str = "auto") -> str:
    ext = {"wav": ".wav", "flac": ".flac", "mp4": ".mp4"}.get(fmt)
    if ext is None:
        ext = ".mp4" if item.video else ".wav"
    if ext == ".mp4" and not item.video:
        ext = ".wav"                     # no picture to put the sound under
    return os.path.join(out_dir, item.id + ext)


def plan(items: List[Item], batch_size: int, bucket_seconds: float, rank: int = 0, world: int = 1
         ) -> List[List[Item]]:
    """This rank's batches: items sorted by duration bucket, dealt round-robin to ranks, cut into batches of
    at most ``batch_size`` within a bucket."""
    if batch_size < 1 or not bucket_seconds > 0:
        raise ValueError(f"batch size must be >= 1 and bucket seconds > 0, got {batch_size}, {bucket_seconds}")
    bucket = lambda it: math.ceil(it.duration / bucket_seconds - 1e-9)
    mine = sorted(items, key=lambda it: (bucket(it), it.line))[rank::world]
    batches: List[List[Item]] = []
    for it in mine:
        if batches and bucket(batches[-1][0]) == bucket(it) and len(batches[-1]) < batch_size:
            batches[-1].append(it)
        else:
            batches.append([it])
    return batches


def _append_row(path: str, row: dict) -> None:
    """One results row, flushed to disk (a kill loses at most the row being written, never an earlier one)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _read_rows(path: str) -> List[dict]:
    rows = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for text in f:
                try:
                    rows.append(json.loads(text))
                except json.JSONDecodeError:      # the line a kill cut short
                    pass
    return rows


def _write_results(out_dir: str, items: List[Item], failures: List[dict], fmt: str) -> str:
    """results.jsonl: one row per manifest row in line order, the latest of every run's rows; an output found on
    disk without a row (killed between writing it and its row) gets one."""
    latest: Dict[tuple, dict] = {}
    for p in [os.path.join(out_dir, RESULTS)] + sorted(glob.glob(os.path.join(out_dir, PARTS, "*.jsonl"))):
        for row in _read_rows(p):
            if row.get("id") is not None:
                latest[row["id"], row.get("line")] = row
    rows = []
    for it in items:
        row = latest.get((it.id, it.line))
        out = output_path(out_dir, it, fmt)
        if os.path.isfile(out) and (row is None or row.get("status") != "ok"):
            row = {"id": it.id, "line": it.line, "status": "ok", "output": out, "duration": it.duration,
                   "seed": it.seed, "seconds": None, "note": "output found from an earlier run"}
        if row is None:
            row = {"id": it.id, "line": it.line, "status": "missing", "error": "not generated (a rank stopped?)"}
        rows.append(row)
    rows += failures
    rows.sort(key=lambda r: r["line"])
    path = os.path.join(out_dir, RESULTS)
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def _save(item: Item, wav, sample_rate: int, out: str) -> None:
    from .audio import save_audio
    from .mux import is_video_path, mux_audio
    n = int(round(item.duration * sample_rate))
    wav = wav[:n]
    if is_video_path(out):
        mux_audio(item.video, wav, sample_rate, out)
    else:
        save_audio(out, wav, sample_rate)


def _dist() -> Tuple[int, int]:
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import datetime

        import torch.distributed as dist
        if not dist.is_initialized():        # gloo: only for the final barrier; the work needs no communication
            dist.init_process_group("gloo", timeout=datetime.timedelta(days=2))
    return rank, world


def run_manifest(args) -> int:
    """The CLI's --manifest mode (arguments as omni2sound.generate parses them)."""
    import torch
    from tqdm import tqdm

    from .pipeline import Omni2SoundPipeline

    rank, world = _dist()
    out_dir = args.out_dir
    os.makedirs(os.path.join(out_dir, PARTS), exist_ok=True)
    items, failures = read_manifest(args.manifest, args.seed, args.duration)
    if rank == 0:
        for f in failures:
            print(f"[batch] skipped: {f['error']}", file=sys.stderr)
    part = os.path.join(out_dir, PARTS, f"rank{rank}.jsonl")
    batches = plan(items, args.batch_size, args.bucket_seconds, rank, world)
    mine = [it for b in batches for it in b]
    remove_stale_temps(out_dir)          # a killed run's temporary files (only those whose writer is gone)
    todo = [[it for it in b if not os.path.isfile(output_path(out_dir, it, args.format))] for b in batches]
    todo = [b for b in todo if b]
    n_todo = sum(len(b) for b in todo)
    if rank == 0:
        print(f"[batch] {len(items)} requests, {len(failures)} bad rows, {len(mine) - n_todo} already made on rank "
              f"{rank}; {n_todo} to make", file=sys.stderr)
    device = args.device
    if world > 1 and str(device).startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    made = failed = 0
    if todo:
        pipe = Omni2SoundPipeline.from_pretrained(args.model, device=device, dtype=dtype)
        pipe.truncate_text = getattr(args, "truncate", False)
        bar = tqdm(total=n_todo, unit="item", desc=f"rank {rank}" if world > 1 else "batch", dynamic_ncols=True,
                   disable=getattr(args, "no_progress", False))
        for batch in todo:
            for group in _generate(pipe, batch, args):
                for it, outcome in group:
                    row = {"id": it.id, "line": it.line, "duration": round(it.duration, 6), "seed": it.seed}
                    if isinstance(outcome, Exception):
                        row.update(status="failed", error=f"{args.manifest}:{it.line}: {outcome}")
                        failed += 1
                        print(f"[batch] failed: {row['error']}", file=sys.stderr)
                    else:
                        row.update(status="ok", **outcome)
                        made += 1
                    _append_row(part, row)
                    bar.update(1)
                bar.set_postfix(failed=failed, refresh=False)
        bar.close()
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
    if rank == 0:
        path = _write_results(out_dir, items, failures, args.format)
        rows = _read_rows(path)
        ok = sum(r["status"] == "ok" for r in rows)
        print(json.dumps({"results": path, "ok": ok, "failed": len(rows) - ok, "made_now": made}), file=sys.stderr)
    if world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    return 0


def _generate(pipe, batch: List[Item], args):
    """Yield [(item, {"output", "seconds", ...} or the exception)] for ``batch``; a failing batch is retried one
    request at a time so that one bad video fails only its own row."""
    t0 = time.perf_counter()
    try:
        outs = _generate_batch(pipe, batch, args)
        dt = time.perf_counter() - t0
        yield [(it, {**o, "seconds": round(dt / len(batch), 4), "batch": len(batch)}) for it, o in zip(batch, outs)]
        return
    except Exception as e:               # noqa: BLE001 - any failure of a request is reported, the run goes on
        if len(batch) == 1:
            yield [(batch[0], e)]
            return
    for it in batch:
        yield from _generate(pipe, [it], args)


def _generate_batch(pipe, batch: List[Item], args) -> List[dict]:
    import warnings
    duration = max(it.duration for it in batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)      # the rows were checked: none is unconditional
        result = pipe.generate(video=[it.video for it in batch], text=[it.text for it in batch], duration=duration,
                               steps=args.steps, guidance=args.guidance, seed=[it.seed for it in batch],
                               method=args.method, plain=args.plain)
    outs = []
    for it, wav in zip(batch, result.audio):
        out = output_path(args.out_dir, it, args.format)
        _save(it, wav, result.sample_rate, out)
        outs.append({"output": out})
    return outs
