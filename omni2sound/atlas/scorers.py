"""Scorer plug-ins: the audio-video agreement score that routes a clip, and the text-audio score (CLAP) that
drives the handoff and the post-hoc filter.

A scorer is named by a spec string in the config:
    "toy"                  the toy world's content-based scorers (`atlas.toy`)
    "const:0.42"           a constant (tests, benchmarks, or a corpus already known to agree)
    "imagebind:PATH"       ImageBind's audio-video cosine (`evaluation.embedders.imagebind`)
    "laion-clap:PATH"      LAION-CLAP's text-audio cosine; "ms-clap:PATH" MS-CLAP's
    "package.module:name"  any object with score(clip) (audio-video) or score(clip, caption) (text-audio),
                           or a factory returning one
A scorer with `score_batch(clips, captions=None) -> list[float]` (the model scorers here) is fed in batches:
`Batcher` gathers the requests of the clips in flight (up to `max_batch`, waiting at most `max_wait` s for
more) and runs one batched forward in a worker thread; other scorers are called once per clip in a thread.
"""
from __future__ import annotations

import asyncio
import importlib
import threading
from typing import Optional

import numpy as np

from .types import Clip


class ConstScorer:
    inline = True          # costs nothing: called on the event loop, not in a worker thread

    def __init__(self, value: float):
        self.value = float(value)
        self.name = f"const:{value:g}"

    def score(self, clip: Clip, caption: str | None = None) -> float:
        return self.value


class ImageBindAVScorer:
    """cos(ImageBind audio embedding, ImageBind video embedding) of a clip."""

    def __init__(self, path: str):
        from ..evaluation.embedders.imagebind import ImageBind
        self.model = ImageBind.from_checkpoint(path)
        self.name = f"imagebind:{path}"
        self._lock = threading.Lock()

    def score(self, clip: Clip) -> float:
        return self.score_batch([clip])[0]

    def score_batch(self, clips: list, captions=None) -> list:
        """One forward per group of clips whose audio length and frame shape agree."""
        import torch
        out = [0.0] * len(clips)
        groups: dict = {}
        for i, c in enumerate(clips):
            if c.frames is not None:
                groups.setdefault((len(c.audio), c.frames.shape, c.frames_fps), []).append(i)
        with self._lock:
            for (_, _, fps), idx in groups.items():
                a = self.model.embed_audio(torch.from_numpy(np.stack([clips[i].audio for i in idx]).astype(np.float32)))
                v = self.model.embed_video(torch.from_numpy(np.stack([clips[i].frames for i in idx])), fps=fps)
                for i, x in zip(idx, (a.float() * v.float()).sum(-1).tolist()):
                    out[i] = float(x)
        return out


class ClapScorer:
    """cos(CLAP text embedding of the caption, CLAP audio embedding of the clip)."""

    def __init__(self, kind: str, path: str):
        from ..evaluation.embedders import clap
        cls = clap.LaionClap if kind == "laion-clap" else clap.MsClap
        self.model = cls.from_checkpoint(path)
        self.name = f"{kind}:{path}"
        self._lock = threading.Lock()

    def score(self, clip: Clip, caption: str) -> float:
        return self.score_batch([clip], [caption])[0]

    def score_batch(self, clips: list, captions: list) -> list:
        """One text forward for all captions, one audio forward per group of equal-length clips."""
        import torch
        audio = []
        for c in clips:
            a = np.asarray(c.audio, np.float32)
            if c.sample_rate != self.model.sample_rate:
                import soxr
                a = soxr.resample(a, c.sample_rate, self.model.sample_rate).astype(np.float32)
            audio.append(a)
        groups: dict = {}
        for i, a in enumerate(audio):
            groups.setdefault(len(a), []).append(i)
        out = [0.0] * len(clips)
        with self._lock:
            t = self.model.embed_text(list(captions)).float()
            for idx in groups.values():
                a = self.model.embed_audio(torch.from_numpy(np.stack([audio[i] for i in idx]))).float()
                for i, x in zip(idx, (a * t[idx]).sum(-1).tolist()):
                    out[i] = float(x)
        return out


def load_scorer(spec: str, kind: str):
    """A scorer from its spec; kind is "av" or "clap" (what "toy" means)."""
    if spec == "toy":
        from .toy import ToyAVScorer, ToyClapScorer
        return ToyAVScorer() if kind == "av" else ToyClapScorer()
    name, _, arg = spec.partition(":")
    if name == "const":
        return ConstScorer(float(arg))
    if name == "imagebind":
        return ImageBindAVScorer(arg)
    if name in ("laion-clap", "ms-clap"):
        return ClapScorer(name, arg)
    if arg and "." in name or (arg and name.isidentifier()):
        obj = getattr(importlib.import_module(name), arg)
        if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "score")):
            obj = obj()
        if not hasattr(obj, "score"):
            raise ValueError(f"scorer {spec!r}: {obj!r} has no score() method")
        return obj
    raise ValueError(f"unknown scorer spec {spec!r}: toy, const:X, imagebind:PATH, laion-clap:PATH, ms-clap:PATH "
                     f"or module:name")


class Batcher:
    """Feeds a scorer from many concurrent clips: `await batcher(clip)` / `await batcher(clip, caption)`.
    With `score_batch`, requests are gathered (up to max_batch, at most max_wait seconds) into one call in a
    worker thread; without it, each request is one `score` call in a worker thread."""

    def __init__(self, scorer, executor, max_batch: int = 32, max_wait: float = 0.005):
        self.scorer, self.executor = scorer, executor
        self.max_batch, self.max_wait = max_batch, max_wait
        self.batched = hasattr(scorer, "score_batch")
        self._pending: list = []
        self._flush: Optional[asyncio.TimerHandle] = None
        self.calls = 0

    async def __call__(self, clip: Clip, caption: Optional[str] = None) -> float:
        loop = asyncio.get_running_loop()
        if getattr(self.scorer, "inline", False):
            self.calls += 1
            return float(self.scorer.score(clip) if caption is None else self.scorer.score(clip, caption))
        if not self.batched:
            self.calls += 1
            args = (clip,) if caption is None else (clip, caption)
            return float(await loop.run_in_executor(self.executor, self.scorer.score, *args))
        fut = loop.create_future()
        self._pending.append((clip, caption, fut))
        if len(self._pending) >= self.max_batch:
            self._run(loop)
        elif self._flush is None:
            self._flush = loop.call_later(self.max_wait, self._run, loop)
        return await fut

    def _run(self, loop) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        batch, self._pending = self._pending, []
        if not batch:
            return
        self.calls += 1
        clips = [b[0] for b in batch]
        captions = None if batch[0][1] is None else [b[1] for b in batch]
        task = loop.run_in_executor(self.executor, self.scorer.score_batch, clips, captions)

        def done(t):
            for i, (_, _, fut) in enumerate(batch):
                if fut.done():
                    continue
                if t.exception() is not None:
                    fut.set_exception(t.exception())
                else:
                    fut.set_result(float(t.result()[i]))
        task.add_done_callback(done)
