"""Manifests from real corpora: the VGGSound CSV with a folder of clips, and SoundAtlas-style records.

    python -m omni2sound.data.corpora vggsound --csv vggsound.csv --clips /data/vggsound/video \\
        --out data/vggsound.jsonl [--pattern '{id}_{start:06d}.mp4'] [--audio-pattern '{id}_{start:06d}.wav']
    python -m omni2sound.data.corpora soundatlas --records soundatlas_train.jsonl --audio /data/vggsound/audio \\
        --out data/soundatlas.jsonl [--audio-pattern '{stem}.wav']

VGGSound's CSV (``youtube_id, start_seconds, label, split``; the official file has no header, one is
recognised and skipped) names clips by YouTube id and start second; the clips on disk follow a naming pattern
(placeholders ``{id} {start} {end} {label} {split}``, format specs allowed: ``{start:06d}``). Several patterns
may be given; the first that names an existing file wins. The audio is the clip's own soundtrack (decoded by
PyAV) unless ``--audio-pattern`` names separate audio files. The label becomes the caption (``--no-caption``:
none). Each row becomes a record of ``duration`` seconds from the start of its clip file (the clips are cut).

SoundAtlas-style records (JSON Lines or a JSON list; fields ``task, clip_feature, sync_feature, text_prompt,
seconds_start, seconds_total``) carry precomputed CLIP (8 fps) and Synchformer (24 / s) features as .npy
files: the manifest points at them (``features.video`` / ``features.sync``), so extraction runs only the VAE
and the text encoder. The audio is the record's ``audio`` / ``path`` field, or ``--audio-pattern`` over the
feature file's stem (``{stem}``) in ``--audio``.

Every bad row (wrong field count, a start that is not a number, an unknown split, a missing clip or feature
file, a duplicate id) is reported with its file and line and counted; nothing is dropped silently.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence

from .manifest import ClipRecord, ManifestError, write_manifest

VGGSOUND_PATTERNS = ("{id}_{start:06d}.mp4", "{id}_{start}.mp4", "{id}_{start:06d}_{end:06d}.mp4")
SPLIT_NAMES = {"train": "train", "test": "test", "val": "val", "valid": "val", "validation": "val"}


@dataclass
class CorpusReport:
    """What a builder kept and what it left out, each left-out row with its file and line."""
    source: str
    rows: int = 0
    kept: int = 0
    errors: List[ManifestError] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)        # reason -> rows (missing clip, bad start, ...)

    def bad(self, path: str, line: int, reason: str, detail: str) -> None:
        self.errors.append(ManifestError(path, line, f"{reason}: {detail}"))
        self.counts[reason] += 1

    @property
    def skipped(self) -> int:
        return len(self.errors)

    def summary(self, limit: int = 20) -> str:
        head = f"{self.source}: {self.kept} of {self.rows} rows kept, {self.skipped} left out"
        if self.counts:
            head += " (" + ", ".join(f"{n} {r}" for r, n in self.counts.most_common()) + ")"
        more = [f"  ... {self.skipped - limit} more"] if self.skipped > limit else []
        return "\n".join([head] + [f"  {e}" for e in self.errors[:limit]] + more)


def _fill(pattern: str, **values) -> str:
    try:
        return pattern.format(**values)
    except (KeyError, IndexError) as e:
        raise ValueError(f"pattern {pattern!r} uses an unknown placeholder {e}; known: {sorted(values)}") from None


def _first_existing(root: str, patterns: Sequence[str], values: dict) -> tuple:
    """(path, tried): the first pattern's file that exists under root, else (None, the paths tried)."""
    tried = []
    for p in patterns:
        path = os.path.join(root, _fill(p, **values))
        if os.path.isfile(path):
            return path, tried
        tried.append(path)
    return None, tried


def _is_header(row: list) -> bool:
    try:
        float(row[1])
        return False
    except (ValueError, IndexError):
        return True


def vggsound_records(csv_path: str, clips_dir: str, patterns: Sequence[str] = VGGSOUND_PATTERNS,
                     audio_dir: Optional[str] = None, audio_patterns: Sequence[str] = (),
                     duration: float = 10.0, splits: Optional[Iterable[str]] = None, caption: bool = True,
                     ) -> tuple:
    """(records, CorpusReport) of the VGGSound CSV's rows whose clip exists. splits: keep only these."""
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"no such VGGSound CSV: {csv_path}")
    if not os.path.isdir(clips_dir):
        raise FileNotFoundError(f"no such clips folder: {clips_dir}")
    for p in list(patterns) + list(audio_patterns):       # a typo in a pattern is one error, not 200k
        _fill(p, id="x", start=0, end=10, label="", split="train")
    keep = {SPLIT_NAMES.get(s, s) for s in splits} if splits else None
    report = CorpusReport(source=csv_path)
    records, seen = [], {}
    with open(csv_path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row or all(not c.strip() for c in row) or row[0].lstrip().startswith("#"):
                continue
            if lineno == 1 and _is_header(row):
                continue
            report.rows += 1
            if len(row) != 4:
                report.bad(csv_path, lineno, "bad row", f"expected 4 fields (youtube_id, start_seconds, label, "
                                                        f"split), got {len(row)}: {row!r}")
                continue
            yid, start_s, label, split = (c.strip() for c in row)
            try:
                start_f = float(start_s)
                if not math.isfinite(start_f) or start_f < 0 or start_f != int(start_f):
                    raise ValueError
                start = int(start_f)
            except ValueError:
                report.bad(csv_path, lineno, "bad start", f"start_seconds must be a whole number >= 0, got {start_s!r}")
                continue
            if not yid:
                report.bad(csv_path, lineno, "bad row", "empty youtube_id")
                continue
            if split not in SPLIT_NAMES:
                report.bad(csv_path, lineno, "bad split", f"split must be train or test, got {split!r}")
                continue
            split = SPLIT_NAMES[split]
            if keep is not None and split not in keep:
                continue
            clip_id = f"{yid}_{start}"
            if clip_id in seen:
                report.bad(csv_path, lineno, "duplicate", f"{clip_id} (first on line {seen[clip_id]})")
                continue
            values = dict(id=yid, start=start, end=start + int(round(duration)), label=label, split=split)
            video, tried = _first_existing(clips_dir, patterns, values)
            if video is None:
                report.bad(csv_path, lineno, "missing clip", f"{clip_id}: none of {tried}")
                continue
            audio = video
            if audio_patterns:
                audio, tried = _first_existing(audio_dir or clips_dir, audio_patterns, values)
                if audio is None:
                    report.bad(csv_path, lineno, "missing audio", f"{clip_id}: none of {tried}")
                    continue
            seen[clip_id] = lineno
            records.append(ClipRecord(clip_id=clip_id, audio=os.path.abspath(audio), video=os.path.abspath(video),
                                      duration=float(duration), caption=label if caption and label else None,
                                      source="vggsound", split=split))
    report.kept = len(records)
    return records, report


def _read_records(path: str) -> Iterable[tuple]:
    """(line, object or an error string) for each record of a JSON Lines file or a JSON list."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            yield e.lineno, f"invalid JSON: {e.msg}"
            return
        # a JSON list: the record's index stands in for its line
        for i, obj in enumerate(items, 1):
            yield i, obj
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        try:
            yield lineno, json.loads(s)
        except json.JSONDecodeError as e:
            yield lineno, f"invalid JSON: {e.msg} at column {e.colno}"


SOUNDATLAS_TASKS = ("v2a", "t2a", "vt2a", "va2a", "tv2a")


def soundatlas_records(records_path: str, audio_dir: Optional[str] = None,
                       audio_patterns: Sequence[str] = ("{stem}.wav", "{stem}.flac", "{stem}.mp4"),
                       split: str = "train") -> tuple:
    """(records, CorpusReport) of SoundAtlas-style records whose feature and audio files exist. Relative
    paths are relative to the records file's folder."""
    if not os.path.isfile(records_path):
        raise FileNotFoundError(f"no such records file: {records_path}")
    base = os.path.dirname(os.path.abspath(records_path))
    resolve = lambda p: p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))
    report = CorpusReport(source=records_path)
    records, seen = [], {}
    for lineno, obj in _read_records(records_path):
        report.rows += 1
        if isinstance(obj, str):
            report.bad(records_path, lineno, "bad row", obj)
            continue
        if not isinstance(obj, dict):
            report.bad(records_path, lineno, "bad row", f"a record must be an object, got {type(obj).__name__}")
            continue
        task = str(obj.get("task") or "").lower()
        if task and task not in SOUNDATLAS_TASKS:
            report.bad(records_path, lineno, "bad row", f"unknown task {obj.get('task')!r}")
            continue
        try:
            start = float(obj.get("seconds_start", 0.0) or 0.0)
            total = float(obj["seconds_total"])
            if not (math.isfinite(start) and start >= 0 and math.isfinite(total) and total > 0):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            report.bad(records_path, lineno, "bad row", "seconds_start must be >= 0 and seconds_total positive, got "
                                                        f"{obj.get('seconds_start')!r}, {obj.get('seconds_total')!r}")
            continue
        feats, missing = {}, []
        for key, name in (("clip_feature", "video"), ("sync_feature", "sync")):
            p = obj.get(key)
            if p:
                p = resolve(str(p))
                (feats.__setitem__(name, p) if os.path.isfile(p) else missing.append(f"{key} {p}"))
        if missing:
            report.bad(records_path, lineno, "missing feature", ", ".join(missing))
            continue
        if len(feats) == 1:
            report.bad(records_path, lineno, "bad row", f"has {next(iter(feats))} features only: clip_feature and "
                                                        "sync_feature come together")
            continue
        if task in ("v2a", "vt2a") and not feats:
            report.bad(records_path, lineno, "bad row", f"task {task} without clip_feature / sync_feature")
            continue
        feature_file = feats.get("video")
        stem = os.path.splitext(os.path.basename(feature_file))[0] if feature_file else None
        audio = obj.get("audio") or obj.get("path") or obj.get("audio_path")
        if audio:
            audio = resolve(str(audio))
            if not os.path.isfile(audio):
                report.bad(records_path, lineno, "missing audio", audio)
                continue
        else:
            if stem is None or audio_dir is None:
                report.bad(records_path, lineno, "missing audio", "the record names no audio file (audio / path) "
                                                                  "and no --audio folder and feature stem locate it")
                continue
            audio, tried = _first_existing(audio_dir, audio_patterns, {"stem": stem})
            if audio is None:
                report.bad(records_path, lineno, "missing audio", f"none of {tried}")
                continue
        clip_id = str(obj.get("id") or obj.get("clip_id") or stem or os.path.splitext(os.path.basename(audio))[0])
        if start:
            clip_id = f"{clip_id}@{start:g}"
        if task:
            clip_id = f"{clip_id}/{task}"
        if clip_id in seen:
            report.bad(records_path, lineno, "duplicate", f"{clip_id} (first on line {seen[clip_id]})")
            continue
        seen[clip_id] = lineno
        prompt = obj.get("text_prompt")
        records.append(ClipRecord(clip_id=clip_id, audio=os.path.abspath(audio), duration=total, start=start,
                                  caption=str(prompt) if prompt and task != "v2a" else None, source="soundatlas",
                                  split=split, features=feats or None))
    report.kept = len(records)
    return records, report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m omni2sound.data.corpora", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="corpus", required=True)
    v = sub.add_parser("vggsound", help="the VGGSound CSV plus a folder of clips")
    v.add_argument("--csv", required=True)
    v.add_argument("--clips", required=True, help="folder of the clips")
    v.add_argument("--pattern", action="append", help=f"clip file name (repeatable; default {VGGSOUND_PATTERNS})")
    v.add_argument("--audio", help="folder of separate audio files (default: the clips' own soundtrack)")
    v.add_argument("--audio-pattern", action="append", default=[], help="audio file name, e.g. '{id}_{start:06d}.wav'")
    v.add_argument("--duration", type=float, default=10.0)
    v.add_argument("--split", action="append", choices=("train", "test"), help="keep only this split (repeatable)")
    v.add_argument("--no-caption", action="store_true", help="no caption (default: the class label)")
    s = sub.add_parser("soundatlas", help="SoundAtlas-style records with released clip / sync features")
    s.add_argument("--records", required=True, help="JSON Lines (or a JSON list) of records")
    s.add_argument("--audio", help="folder of the audio files")
    s.add_argument("--audio-pattern", action="append", help="audio file name over {stem} (default {stem}.wav, "
                                                            ".flac, .mp4)")
    s.add_argument("--split", default="train", choices=("train", "val", "test"))
    for q in (v, s):
        q.add_argument("--out", required=True, help="the manifest to write (.jsonl)")
        q.add_argument("--strict", action="store_true", help="write nothing if any row is bad")
    a = p.parse_args(argv)
    try:
        if a.corpus == "vggsound":
            recs, rep = vggsound_records(a.csv, a.clips, a.pattern or VGGSOUND_PATTERNS, a.audio, a.audio_pattern,
                                         a.duration, a.split, not a.no_caption)
        else:
            recs, rep = soundatlas_records(a.records, a.audio, a.audio_pattern or ("{stem}.wav", "{stem}.flac",
                                                                                   "{stem}.mp4"), a.split)
    except (ValueError, FileNotFoundError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    print(rep.summary(), file=sys.stderr)
    if a.strict and rep.skipped:
        p.exit(1, f"{p.prog}: --strict: {rep.skipped} bad rows, nothing written\n")
    if not recs:
        p.exit(1, f"{p.prog}: no usable rows, nothing written\n")
    write_manifest(a.out, recs)
    print(json.dumps({"out": a.out, "records": len(recs), "left_out": rep.skipped, "reasons": dict(rep.counts)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
