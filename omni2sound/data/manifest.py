"""Manifests: one SoundAtlas-style clip record per line (JSON Lines).

A record (fields in the order of the SoundAtlas pipeline; only clip_id, audio and duration are required):

    {"clip_id": "vggsound/---g-f_I2yQ_1", "audio": "audio/---g-f_I2yQ_1.flac", "video": "video/---g-f_I2yQ_1.mp4",
     "start": 0.0, "duration": 10.0, "caption": "a dog barks twice while a car passes",
     "offscreen": "a man speaks off-screen", "av_score": 0.34, "route": "audio-visual",
     "source": "vggsound", "split": "train",
     "features": {"latent": "feats/x.safetensors", "text": "...", "video": "...", "sync": "..."}}

Relative paths are relative to the manifest's folder. `route` is SoundAtlas's audio-visual consistency
route: "audio-visual" (ImageBind score > 0.30) or "audio-only" (0.20-0.30); clips under 0.20 are discarded
upstream and are rejected here if their score says so.

Validation never stops a long run for one bad clip: every bad record is reported with its file and line
and skipped; `ManifestReport` counts them. `strict=True` raises with the full list instead.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

from ..files import atomic_write

SPLITS = ("train", "val", "test")
ROUTES = ("audio-visual", "audio-only")
FEATURE_KEYS = ("latent", "text", "video", "sync")
AV_DISCARD = 0.20     # SoundAtlas: clips with an audio-visual score under this are discarded


@dataclass
class ClipRecord:
    clip_id: str
    audio: str
    duration: float
    video: Optional[str] = None
    start: float = 0.0
    caption: Optional[str] = None
    offscreen: Optional[str] = None
    av_score: Optional[float] = None
    route: Optional[str] = None
    source: Optional[str] = None
    split: str = "train"
    features: Optional[dict] = None

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, ensure_ascii=False)


@dataclass
class ManifestError:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclass
class ManifestReport:
    path: str
    total: int = 0
    kept: int = 0
    errors: list = field(default_factory=list)     # list[ManifestError]

    @property
    def skipped(self) -> int:
        return len(self.errors)

    def summary(self) -> str:
        head = f"{self.path}: {self.kept} of {self.total} records kept, {self.skipped} skipped"
        return "\n".join([head] + [f"  {e}" for e in self.errors[:20]] +
                         ([f"  ... {self.skipped - 20} more"] if self.skipped > 20 else []))


class ManifestValidationError(ValueError):
    pass


_TYPES = {"clip_id": str, "audio": str, "video": str, "caption": str, "offscreen": str, "route": str,
          "source": str, "split": str, "start": (int, float), "duration": (int, float),
          "av_score": (int, float), "features": dict}


def parse_record(obj, base_dir: str, check_files: bool) -> ClipRecord:
    """One record from a decoded JSON object; raises ValueError naming the field that is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"a record must be a JSON object, got {type(obj).__name__}")
    known = {f.name for f in fields(ClipRecord)}
    unknown = sorted(set(obj) - known)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; known: {sorted(known)}")
    for name in ("clip_id", "audio", "duration"):
        if obj.get(name) is None:
            raise ValueError(f"missing required field {name!r}")
    for name, value in obj.items():
        if value is not None and (not isinstance(value, _TYPES[name]) or isinstance(value, bool)):
            raise ValueError(f"field {name!r} must be {getattr(_TYPES[name], '__name__', 'a number')}, "
                             f"got {type(value).__name__} {value!r}")
    rec = ClipRecord(**obj)
    if not rec.clip_id.strip():
        raise ValueError("clip_id is empty")
    if not (math.isfinite(rec.duration) and rec.duration > 0):
        raise ValueError(f"duration must be positive seconds, got {rec.duration}")
    if not (math.isfinite(rec.start) and rec.start >= 0):
        raise ValueError(f"start must be >= 0 seconds, got {rec.start}")
    if rec.split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {rec.split!r}")
    if rec.route is not None and rec.route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {rec.route!r}")
    if rec.av_score is not None:
        if not (math.isfinite(rec.av_score) and -1.0 <= rec.av_score <= 1.0):
            raise ValueError(f"av_score must be a cosine similarity in [-1, 1], got {rec.av_score}")
        if rec.av_score < AV_DISCARD:
            raise ValueError(f"av_score {rec.av_score} is under the SoundAtlas discard threshold {AV_DISCARD}")
    if rec.features is not None:
        bad = sorted(set(rec.features) - set(FEATURE_KEYS))
        if bad:
            raise ValueError(f"features has unknown key(s) {bad}; known: {list(FEATURE_KEYS)}")
    # paths relative to the manifest's folder
    resolve = lambda p: p if os.path.isabs(p) else os.path.normpath(os.path.join(base_dir, p))
    rec.audio = resolve(rec.audio)
    if rec.video is not None:
        rec.video = resolve(rec.video)
    if rec.features is not None:
        rec.features = {k: resolve(v) for k, v in rec.features.items()}
    if check_files:
        for name, p in [("audio", rec.audio), ("video", rec.video)] + list((rec.features or {}).items()):
            if p is not None and not os.path.isfile(p):
                raise ValueError(f"{name} file not found: {p}")
    return rec


def read_manifest(path: str, check_files: bool = True, strict: bool = False,
                  split: Optional[str] = None) -> tuple[list, ManifestReport]:
    """Records of a JSON Lines manifest (blank lines and lines starting with '#' are skipped).

    Bad records (unparseable JSON, missing or mistyped fields, missing files, duplicate clip ids) are
    reported with file and line and left out; with strict=True a ManifestValidationError lists them all.
    `split` keeps only that split."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"manifest not found: {path}")
    base = os.path.dirname(os.path.abspath(path))
    report = ManifestReport(path=path)
    records, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            report.total += 1
            try:
                obj = json.loads(s)
            except json.JSONDecodeError as e:
                report.errors.append(ManifestError(path, lineno, f"invalid JSON: {e.msg} at column {e.colno}"))
                continue
            try:
                rec = parse_record(obj, base, check_files)
            except (ValueError, TypeError) as e:
                report.errors.append(ManifestError(path, lineno, str(e)))
                continue
            if rec.clip_id in seen:
                report.errors.append(ManifestError(path, lineno, f"duplicate clip_id {rec.clip_id!r} "
                                                                 f"(first on line {seen[rec.clip_id]})"))
                continue
            seen[rec.clip_id] = lineno
            if split is None or rec.split == split:
                records.append(rec)
    report.kept = len(records)
    if strict and report.errors:
        raise ManifestValidationError(report.summary())
    return records, report


def write_manifest(path: str, records) -> None:
    """Write records (ClipRecord or dicts) as JSON Lines, atomically. Paths are written as given."""
    atomic_write(path, "".join((r.to_json() if isinstance(r, ClipRecord) else json.dumps(r, ensure_ascii=False))
                               + "\n" for r in records))
