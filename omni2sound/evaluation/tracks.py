"""VGGSound-Omni tracks: a test set of (video, audio, caption) clips -> the T2A, V2A, VT2A and off-screen items.

    T2A        the caption only                       reference: the clip's audio
    V2A        the video only                         reference: the clip's audio
    VT2A       video and caption                      reference: the clip's audio
    off-screen the target's video (unchanged) and its caption + ", and off-screen <description of a second
               source>"; reference: the target's audio + the second source's audio at `level_db` (its RMS
               relative to the target's), scaled down to a 0.95 peak if the sum exceeds it

The second source of an off-screen item is another test clip, or a music clip when a music pool is given
(the paper's track mixes natural events and synthetic music); it must be `compatible` with the target (a
different label / toy classes that do not overlap) so the mix adds a sound the video does not show. The
choice is a pure function of `seed`. T2A, V2A and VT2A hold every clip; the off-screen track holds
`n_offscreen` targets (all by default). Item ids are "<track>/<clip_id>".

The same builder makes the toy world's benchmark (`toy_benchmark`), the harness's embedded default; the toy
items carry the true events, so the oracle scores them. `python -m omni2sound.evaluation.tracks` builds the
track files of a real test set (a SoundAtlas manifest, or the VGGSound CSV + clip folder + captions).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

TRACKS = ("t2a", "v2a", "vt2a", "offscreen")
TASK = {"t2a": "t2a", "v2a": "v2a", "vt2a": "vt2a", "offscreen": "vt2a"}
PEAK = 0.95


@dataclass
class Source:
    """One test clip as the builder sees it. description: what is appended to another clip's caption when
    this one plays off-screen (default: its caption); label: compatibility key (VGGSound class, or the
    toy's set of classes); kind: "event" or "music"."""
    clip_id: str
    caption: Optional[str]
    description: Optional[str] = None
    label: object = None
    kind: str = "event"

    def describe(self) -> str:
        return (self.description or self.caption or "").strip()


@dataclass
class TrackItem:
    item_id: str
    track: str
    task: str
    clip_id: str
    text: Optional[str] = None
    video: Optional[str] = None          # path (real data); the toy keeps frames in memory
    audio: Optional[str] = None          # the reference audio (real data; the off-screen track: the mix)
    duration: float = 10.0
    start: float = 0.0
    offscreen: Optional[dict] = None     # {"clip_id", "description", "level_db", "kind"}
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v not in (None, {})}, ensure_ascii=False)


def offscreen_caption(caption: Optional[str], description: str) -> str:
    caption = (caption or "").strip().rstrip(".")
    return f"{caption}, and off-screen {description}" if caption else f"off-screen {description}"


def pair_offscreen(sources: Sequence[Source], seed: int, n_offscreen: Optional[int] = None,
                   pool: Optional[Sequence[Source]] = None,
                   compatible: Optional[Callable[[Source, Source], bool]] = None) -> list:
    """[(target, partner)] for the off-screen track, deterministic in `seed`: targets are the first
    `n_offscreen` sources of a seeded permutation, partners drawn (seeded) from `pool` (default: the other
    sources) among those `compatible` with the target (default: a different label). A target with no
    compatible partner is left out."""
    compatible = compatible or (lambda t, p: p.clip_id != t.clip_id and (t.label is None or p.label != t.label))
    rng = np.random.default_rng([seed, 0x0FF5])
    order = rng.permutation(len(sources))
    pool = list(pool) if pool is not None else list(sources)
    n = len(sources) if n_offscreen is None else min(n_offscreen, len(sources))
    pairs = []
    for i in order:
        if len(pairs) == n:
            break
        t = sources[int(i)]
        cands = [p for p in pool if p.clip_id != t.clip_id and compatible(t, p)]
        if cands:
            pairs.append((t, cands[int(rng.integers(len(cands)))]))
    # items in the sources' order, so the track file reads like the test list
    rank = {s.clip_id: k for k, s in enumerate(sources)}
    return sorted(pairs, key=lambda tp: rank[tp[0].clip_id])


def build_items(sources: Sequence[Source], pairs: list, level_db: float, duration: Callable[[Source], float],
                tracks: Sequence[str] = TRACKS) -> Dict[str, List[TrackItem]]:
    """The four tracks' items (without paths: the caller sets video/audio)."""
    out: Dict[str, List[TrackItem]] = {}
    for track in tracks:
        items = []
        if track == "offscreen":
            for t, p in pairs:
                items.append(TrackItem(f"offscreen/{t.clip_id}", "offscreen", "vt2a", t.clip_id,
                                       offscreen_caption(t.caption, p.describe()), duration=duration(t),
                                       offscreen={"clip_id": p.clip_id, "description": p.describe(),
                                                  "level_db": level_db, "kind": p.kind}))
        else:
            for s in sources:
                items.append(TrackItem(f"{track}/{s.clip_id}", track, TASK[track], s.clip_id,
                                       None if track == "v2a" else s.caption, duration=duration(s)))
        out[track] = items
    return out


def mix(target: np.ndarray, partner: np.ndarray, level_db: float) -> np.ndarray:
    """target [N] + partner (cut or zero-padded to N) scaled so its RMS is `level_db` relative to the target's;
    scaled down to a 0.95 peak when the sum exceeds it (float32)."""
    t = np.asarray(target, np.float64)
    p = np.zeros_like(t)
    src = np.asarray(partner, np.float64)[: len(t)]
    p[: len(src)] = src
    rt, rp = math.sqrt(float(np.mean(t ** 2))), math.sqrt(float(np.mean(p ** 2)))
    gain = 0.0 if rp == 0 else (10 ** (level_db / 20) * rt / rp if rt > 0 else 1.0)
    y = t + gain * p
    peak = float(np.abs(y).max()) if y.size else 0.0
    if peak > PEAK:
        y *= PEAK / peak
    return y.astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# The benchmark object the harness reads
# ----------------------------------------------------------------------------------------------------
class Benchmark:
    """Items per track plus access to each item's reference audio and video frames."""
    name = "benchmark"
    sample_rate = 16000
    has_truth = False

    def __init__(self, tracks: Dict[str, List[TrackItem]], meta: Optional[dict] = None):
        self.tracks, self.meta = tracks, meta or {}

    def reference(self, item: TrackItem) -> np.ndarray:
        raise NotImplementedError

    def frames(self, item: TrackItem, fps: float) -> Optional[np.ndarray]:
        """uint8 [T, H, W, 3] at `fps` (None for an item without video)."""
        raise NotImplementedError

    def truth(self, item: TrackItem) -> Optional[list]:
        return None


class ToyBenchmark(Benchmark):
    """The toy world's test clips as the four tracks (in memory, rebuilt identically from the seed)."""
    name = "toy"
    has_truth = True

    def __init__(self, n: int = 48, seed: int = 0, duration: float = 2.0, level_db: float = 0.0,
                 n_offscreen: Optional[int] = None, start: int = 0):
        from ..toy import Event, ToyConfig, ToyWorld, caption_of
        self.world = ToyWorld(ToyConfig(seed=seed, duration=duration))
        self.sample_rate = self.world.cfg.sample_rate
        clips = self.world.clips(n, "test", start=start)
        self.clips = {c.clip_id: c for c in clips}
        sources = []
        for c in clips:
            off = [Event(e.cls, e.onset, onscreen=False) for e in c.events]
            sources.append(Source(c.clip_id, c.caption, description=caption_of(off)[1],
                                  label=frozenset(e.cls for e in c.events)))
        # targets: clips with nothing off-screen yet; partners: clips sharing no class with the target
        targets = [s for s, c in zip(sources, clips) if c.offscreen is None]
        pairs = pair_offscreen(targets, seed, n_offscreen, pool=sources,
                               compatible=lambda t, p: not (t.label & p.label))
        tracks = build_items(sources, [], level_db, lambda s: duration)
        tracks["offscreen"] = build_items(sources, pairs, level_db, lambda s: duration, ("offscreen",))["offscreen"]
        self._partner = {t.clip_id: p.clip_id for t, p in pairs}
        self.level_db = level_db
        super().__init__(tracks, {"kind": "toy", "n": n, "seed": seed, "duration": duration, "level_db": level_db,
                                  "start": start, "n_offscreen": len(pairs)})

    def reference(self, item: TrackItem) -> np.ndarray:
        c = self.clips[item.clip_id]
        if item.track != "offscreen":
            return c.audio
        return mix(c.audio, self.clips[self._partner[item.clip_id]].audio, self.level_db)

    def frames(self, item: TrackItem, fps: float) -> Optional[np.ndarray]:
        if item.task == "t2a":
            return None
        c = self.clips[item.clip_id]
        if abs(fps - self.world.cfg.sync_fps) < 1e-6:
            return c.frames_sync
        if abs(fps - self.world.cfg.semantic_fps) < 1e-6:
            return c.frames_semantic
        from ..toy import render
        t = np.arange(int(round(c.duration * fps))) / fps
        s = self.world.cfg.size
        layout = {e.cls: ((s * 0.3, s * 0.5) if e.impulsive else (s * 0.72, s * 0.5)) for e in c.events if e.onscreen}
        return render(c.events, t, s, layout)

    def frames_semantic(self, item: TrackItem) -> Optional[np.ndarray]:
        return None if item.task == "t2a" else self.clips[item.clip_id].frames_semantic

    def truth(self, item: TrackItem) -> list:
        c = self.clips[item.clip_id]
        ev = [{"cls": e.cls, "onset": e.onset, "onscreen": e.onscreen} for e in c.events]
        if item.track == "offscreen":
            p = self.clips[self._partner[item.clip_id]]
            ev += [{"cls": e.cls, "onset": e.onset, "onscreen": False} for e in p.events]
        return ev


class FileBenchmark(Benchmark):
    """Track files written by `write_tracks` (folder with <track>.jsonl and tracks.json)."""
    name = "files"

    def __init__(self, directory: str, sample_rate: int = 16000):
        self.directory = directory
        self.sample_rate = sample_rate
        meta_path = os.path.join(directory, "tracks.json")
        meta = json.load(open(meta_path)) if os.path.isfile(meta_path) else {}
        tracks = {}
        for track in TRACKS:
            p = os.path.join(directory, f"{track}.jsonl")
            if not os.path.isfile(p):
                continue
            items = []
            with open(p, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        d = json.loads(line)
                        item = TrackItem(**d)
                    except (json.JSONDecodeError, TypeError) as e:
                        raise ValueError(f"{p}:{lineno}: not a track item: {e}") from e
                    for k in ("audio", "video"):
                        v = getattr(item, k)
                        if v is not None and not os.path.isabs(v):
                            setattr(item, k, os.path.normpath(os.path.join(directory, v)))
                    items.append(item)
            tracks[track] = items
        if not tracks:
            raise FileNotFoundError(f"{directory}: no track files ({', '.join(t + '.jsonl' for t in TRACKS)})")
        super().__init__(tracks, meta)

    def reference(self, item: TrackItem) -> np.ndarray:
        from ..audio import load_audio
        return load_audio(item.audio, self.sample_rate).numpy()

    def frames(self, item: TrackItem, fps: float) -> Optional[np.ndarray]:
        if item.video is None or item.task == "t2a":
            return None
        from ..video import read_video
        return read_video(item.video, fps=fps, max_seconds=item.duration, start=item.start)


# ----------------------------------------------------------------------------------------------------
# Real test sets -> track files
# ----------------------------------------------------------------------------------------------------
def records_from_vggsound(csv_path: str, clips_dir: str, captions: Optional[str] = None,
                          split: str = "test", duration: float = 10.0) -> list:
    """ClipRecords of the VGGSound CSV's `split` rows (youtube_id, start_seconds, label, split; no header)
    whose clip files exist as <clips_dir>/<youtube_id>_<start:06d>.{mp4, flac, wav}; captions: a JSONL
    ({"clip_id", "caption"}) or CSV (clip_id,caption) file; without one the VGGSound label is the caption.
    Missing clips are reported on stderr and skipped."""
    from ..data.manifest import ClipRecord
    caps = {}
    if captions:
        with open(captions, encoding="utf-8") as f:
            if captions.endswith(".jsonl"):
                for line in f:
                    if line.strip():
                        d = json.loads(line)
                        caps[d["clip_id"]] = d["caption"]
            else:
                caps = {r[0]: r[1] for r in csv.reader(f) if len(r) >= 2}
    out, missing = [], 0
    with open(csv_path, encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if len(row) < 4 or row[3].strip() != split:
                continue
            try:
                cid = f"{row[0]}_{int(float(row[1])):06d}"
            except ValueError:
                raise ValueError(f"{csv_path}:{lineno}: start_seconds {row[1]!r} is not a number") from None
            video = os.path.join(clips_dir, cid + ".mp4")
            audio = next((os.path.join(clips_dir, cid + e) for e in (".flac", ".wav") if
                          os.path.isfile(os.path.join(clips_dir, cid + e))), video)
            if not os.path.isfile(video):
                missing += 1
                continue
            out.append(ClipRecord(clip_id=cid, audio=audio, video=video, duration=duration,
                                  caption=caps.get(cid, row[2]), source=row[2], split="test"))
    if missing:
        print(f"[tracks] {csv_path}: {missing} {split} clips not found under {clips_dir}, skipped", file=sys.stderr)
    return out


def write_tracks(records: list, out_dir: str, seed: int = 0, level_db: float = 0.0,
                 n_offscreen: Optional[int] = None, music: Sequence = (), sample_rate: int = 16000) -> dict:
    """Track files of a real test set: <out_dir>/{t2a,v2a,vt2a,offscreen}.jsonl, the off-screen mixes as
    FLAC under <out_dir>/offscreen_audio/, and tracks.json (seed, level, counts). records: ClipRecords with
    video and caption; music: ClipRecords of music clips allowed as off-screen sources. Returns the counts."""
    import torch

    from ..audio import load_audio, save_audio
    os.makedirs(out_dir, exist_ok=True)
    recs = [r for r in records if r.video is not None]
    by_id = {r.clip_id: r for r in list(recs) + list(music)}
    sources = [Source(r.clip_id, r.caption, description=r.offscreen, label=r.source) for r in recs]
    pool = sources + [Source(r.clip_id, r.caption, label=("music", r.clip_id), kind="music") for r in music]
    pairs = pair_offscreen(sources, seed, n_offscreen, pool=pool)
    tracks = build_items(sources, pairs, level_db, lambda s: by_id[s.clip_id].duration)
    mix_dir = os.path.join(out_dir, "offscreen_audio")
    for track, items in tracks.items():
        for it in items:
            r = by_id[it.clip_id]
            it.start, it.video, it.audio = r.start, (r.video if track != "t2a" else None), r.audio
            if track == "offscreen":
                p = by_id[it.offscreen["clip_id"]]
                y = mix(load_audio(r.audio, sample_rate).numpy(), load_audio(p.audio, sample_rate).numpy(), level_db)
                safe = it.clip_id.replace("/", "__")
                it.audio = os.path.abspath(save_audio(os.path.join(mix_dir, safe + ".flac"), torch.from_numpy(y),
                                                      sample_rate))
        _write_jsonl(os.path.join(out_dir, f"{track}.jsonl"), [it.to_json() for it in items])
    meta = {"kind": "files", "seed": seed, "level_db": level_db, "sample_rate": sample_rate,
            "counts": {t: len(v) for t, v in tracks.items()}, "music_sources": len(music)}
    _write_jsonl(os.path.join(out_dir, "tracks.json"), [json.dumps(meta, indent=2)])
    return meta


def _write_jsonl(path: str, lines: list) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + ("\n" if lines else ""))
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m omni2sound.evaluation.tracks",
                                 description="Build VGGSound-Omni track files from a test set.")
    ap.add_argument("--manifest", help="SoundAtlas JSONL manifest of the test clips (split test)")
    ap.add_argument("--vggsound-csv", help="vggsound.csv (youtube_id,start,label,split)")
    ap.add_argument("--clips", help="folder of <youtube_id>_<start:06d>.mp4 (and .flac/.wav) clips")
    ap.add_argument("--captions", help="JSONL {clip_id, caption} or CSV clip_id,caption (dense captions)")
    ap.add_argument("--music", help="JSONL manifest of music clips allowed as off-screen sources")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--level-db", type=float, default=0.0, help="off-screen source RMS relative to the target's")
    ap.add_argument("--n-offscreen", type=int, default=None)
    args = ap.parse_args(argv)
    from ..data.manifest import read_manifest
    if args.manifest:
        records, report = read_manifest(args.manifest, split="test")
        if report.errors:
            print(report.summary(), file=sys.stderr)
    elif args.vggsound_csv and args.clips:
        records = records_from_vggsound(args.vggsound_csv, args.clips, args.captions)
    else:
        ap.error("give --manifest, or --vggsound-csv with --clips")
    music = read_manifest(args.music)[0] if args.music else []
    meta = write_tracks(records, args.out, args.seed, args.level_db, args.n_offscreen, music)
    print(f"[tracks] {args.out}: {meta['counts']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
