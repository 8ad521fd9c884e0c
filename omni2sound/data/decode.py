"""Decoding clips for extraction in DataLoader workers: audio (soundfile / PyAV) and the frames each video
encoder asks for (PyAV), or the clip's precomputed features (.npy / .safetensors), one clip per item.

Workers only decode (CPU); the encoders run in the main process on batches of whole shards, so the GPU
sees large batches while the next clips decode. Items come back in manifest order (the DataLoader keeps
order), which the extractor needs to write shard k from exactly the records of shard k.
"""
from __future__ import annotations

import os
import sys
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import DataLoader, Dataset

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4a", ".aac", ".mp3")


def load_media_audio(path: str, sample_rate: int) -> np.ndarray:
    """Mono float32 [N] at ``sample_rate`` from a media container's first audio stream (PyAV: an mp4's AAC, as
    VGGSound ships its clips), resampled by FFmpeg; a clear error naming the file when there is none."""
    import av

    from ..audio import AudioError
    try:
        with av.open(os.fspath(path)) as c:
            if not c.streams.audio:
                raise AudioError(f"{path}: no audio stream")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            parts = []
            for frame in c.decode(c.streams.audio[0]):
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                parts.append(out.to_ndarray().reshape(-1))
    except av.error.FFmpegError as e:
        raise AudioError(f"{path}: cannot decode its audio: {e}") from e
    if not parts:
        raise AudioError(f"{path}: the audio stream holds no samples")
    return np.concatenate(parts).astype(np.float32)


def read_audio(path: str, sample_rate: int) -> np.ndarray:
    """Mono float32 [N] at ``sample_rate`` from an audio file (soundfile) or a media container (PyAV)."""
    if os.fspath(path).lower().endswith(VIDEO_SUFFIXES):
        return load_media_audio(path, sample_rate)
    from ..audio import load_audio
    return load_audio(path, sample_rate).numpy()


def load_clip(rec, sample_rate: int, video_req=None, sync_req=None) -> dict:
    """A manifest record -> the extractor's raw item: audio [N] float32 at ``sample_rate``, uint8 frames
    (frames_semantic [T8, s, s, 3], frames_sync [T25, s', s', 3]) or precomputed video / sync features."""
    from ..encoder_spec import read_frames, source_size
    wav = read_audio(rec.audio, sample_rate)
    a = int(round(rec.start * sample_rate))
    wav = wav[a:a + int(round(rec.duration * sample_rate))]
    if len(wav) == 0:
        raise ValueError(f"{rec.audio}: no audio in [{rec.start}, {rec.start + rec.duration}] s")
    out = {"clip_id": rec.clip_id, "audio": wav.astype(np.float32), "frames_semantic": None, "frames_sync": None,
           "caption": rec.caption, "duration": len(wav) / sample_rate}
    feats = rec.features or {}
    if feats.get("video") or feats.get("sync"):
        from ..encoders import load_features
        if not (feats.get("video") and feats.get("sync")):
            raise ValueError(f"{rec.clip_id}: precomputed features need both video and sync files, got {sorted(feats)}")
        out["video"] = load_features(feats["video"])
        out["sync"] = load_features(feats["sync"])
    elif rec.video and video_req is not None:
        hw = source_size(rec.video) if (video_req.crop or sync_req.crop) else None
        out["frames_semantic"] = read_frames(rec.video, video_req, rec.start, rec.duration, hw)
        out["frames_sync"] = read_frames(rec.video, sync_req, rec.start, rec.duration, hw)
    return out


class ClipDecodeDataset(Dataset):
    """items[i] = (shard k, record) -> (k, clip_id, raw item or None, error message or None)."""

    def __init__(self, items: Sequence[Tuple[int, object]], sample_rate: int, video_req, sync_req):
        self.items, self.sample_rate, self.video_req, self.sync_req = list(items), sample_rate, video_req, sync_req

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        k, rec = self.items[i]
        try:
            return k, rec.clip_id, load_clip(rec, self.sample_rate, self.video_req, self.sync_req), None
        except Exception as e:          # one bad clip never stops a long run: reported by the extractor
            return k, rec.clip_id, None, f"{type(e).__name__}: {e}"


def _first(batch):
    return batch


def iter_shards(records: list, shards: List[int], shard_size: int, sample_rate: int, video_req, sync_req,
                workers: int = 4, failed: Optional[list] = None) -> Iterator[Tuple[int, list]]:
    """(k, raw items of shard k) for each k of ``shards`` in order, decoded ahead by ``workers`` processes.
    Clips that fail to decode are appended to ``failed`` as 'clip_id: reason' and left out of their shard."""
    items = [(k, r) for k in shards for r in records[k * shard_size:(k + 1) * shard_size]]
    ds = ClipDecodeDataset(items, sample_rate, video_req, sync_req)
    loader = DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_first,
                        prefetch_factor=2 if workers else None, persistent_workers=False)
    pending = {k: [] for k in shards}
    left = {k: 0 for k in shards}
    for k, _ in items:
        left[k] += 1
    order = iter(shards)
    current = next(order, None)
    # shards with no records at all (cannot happen for k < n_shards) would never be yielded; skip them
    while current is not None and left[current] == 0:
        yield current, []
        current = next(order, None)
    for k, clip_id, raw, err in loader:
        if err is not None:
            msg = f"{clip_id}: {err}"
            if failed is not None:
                failed.append(msg)
            print(f"[extract] skipped {msg}", file=sys.stderr)
        else:
            pending[k].append(raw)
        left[k] -= 1
        while current is not None and left[current] == 0:
            yield current, pending.pop(current)
            current = next(order, None)


def default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = 2
    return max(0, min(8, n - 1))

