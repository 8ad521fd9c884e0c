"""Scorer plug-ins: the audio-video agreement score that routes a clip, and the text-audio score (CLAP) that
drives the handoff and the post-hoc filter.

A scorer is named by a spec string in the config:
    "toy"                  the toy world's content-based scorers (`atlas.toy`)
    "const:0.42"           a constant (tests, benchmarks, or a corpus already known to agree)
    "imagebind:PATH"       ImageBind's audio-video cosine (`evaluation.embedders.imagebind`)
    "laion-clap:PATH"      LAION-CLAP's text-audio cosine; "ms-clap:PATH" MS-CLAP's
    "package.module:name"  any object with score(clip) (audio-video) or score(clip, caption) (text-audio),
                           or a factory returning one
Model scorers run in worker threads, one call at a time per model.
"""
from __future__ import annotations

import importlib
import threading

import numpy as np

from .types import Clip


class ConstScorer:
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
        import torch
        if clip.frames is None:
            return 0.0
        with self._lock:
            a = self.model.embed_audio(torch.from_numpy(np.asarray(clip.audio, np.float32))[None])
            v = self.model.embed_video(torch.from_numpy(clip.frames)[None], fps=clip.frames_fps)
        return float((a.float() * v.float()).sum())


class ClapScorer:
    """cos(CLAP text embedding of the caption, CLAP audio embedding of the clip)."""

    def __init__(self, kind: str, path: str):
        from ..evaluation.embedders import clap
        cls = clap.LaionClap if kind == "laion-clap" else clap.MsClap
        self.model = cls.from_checkpoint(path)
        self.name = f"{kind}:{path}"
        self._lock = threading.Lock()

    def score(self, clip: Clip, caption: str) -> float:
        import torch
        audio = np.asarray(clip.audio, np.float32)
        if clip.sample_rate != self.model.sample_rate:
            import soxr
            audio = soxr.resample(audio, clip.sample_rate, self.model.sample_rate).astype(np.float32)
        with self._lock:
            a = self.model.embed_audio(torch.from_numpy(audio)[None])
            t = self.model.embed_text([caption])
        return float((a.float() * t.float()).sum())


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
