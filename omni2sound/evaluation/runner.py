"""Scoring: generated audio per track item -> every metric per track.

Clip length policy (av-benchmark's): each generated clip is cut to its reference's length or zero-padded to
it, then each embedder's own input rule applies (PaSST: padded or cut to 10 s at 32 kHz; PANNs: mean removed;
VGGish: whole 0.96 s examples). Audio is resampled to each embedder's rate with soxr (HQ).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np
import soxr
import torch

from . import metrics as M
from .embedders.base import AudioEmbedder
from .tracks import Benchmark, TrackItem

SYNC_FPS = 25.0
ORACLE_WINDOW_S = 1.0     # an on-screen onset with no generated onset of its class within 1 s counts as 1 s off


def fit_length(gen: np.ndarray, n: int) -> np.ndarray:
    """Cut a generated clip to n samples or zero-pad it to n (the reference's length)."""
    g = np.asarray(gen, np.float32).reshape(-1)
    if len(g) >= n:
        return g[:n]
    return np.concatenate([g, np.zeros(n - len(g), np.float32)])


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    return x if sr_in == sr_out else soxr.resample(np.asarray(x, np.float32), sr_in, sr_out, quality="HQ")


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def embed_all(embedder: AudioEmbedder, clips: Sequence[np.ndarray], sr: int, batch_size: int = 32):
    """(embedding [N, D] or a list of per-clip frame arrays, logits [N, C] or None) of clips at rate sr, batched
    by equal length (a batch never mixes lengths: no padding enters an embedding)."""
    xs = [resample(c, sr, embedder.sample_rate) for c in clips]
    order = sorted(range(len(xs)), key=lambda i: len(xs[i]))
    embs: List = [None] * len(xs)
    logits: List = [None] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j < len(order) and j - i < batch_size and len(xs[order[j]]) == len(xs[order[i]]):
            j += 1
        idx = order[i:j]
        f = embedder.embed(torch.from_numpy(np.stack([xs[k] for k in idx])))
        for k, pos in enumerate(idx):
            embs[pos] = f.embedding[k]
            if f.logits is not None:
                logits[pos] = f.logits[k]
        i = j
    if embedder.frame_level:
        emb = [torch.as_tensor(e).double().numpy() for e in embs]
    else:
        emb = torch.stack([torch.as_tensor(e) for e in embs]).double().numpy()
    lg = None if logits[0] is None else torch.stack(logits).double().numpy()
    return emb, lg


def audio_metrics(embedder: AudioEmbedder, refs, gens, sr: int, batch_size: int = 32, cache: Optional[dict] = None,
                  cache_key=None, warnings: Optional[list] = None) -> Dict[str, float]:
    """FD_<name> (frames pooled for a frame-level embedder), and with logits KL_<name> (paired, mean) and
    IS_<name> (+ IS_<name>_std) of the generated clips. A set with no more vectors than dimensions has a
    singular covariance, where sqrtm(S1 S2) is unreliable: that FD is reported with a warning appended."""
    n = embedder.name
    if cache is not None and cache_key in cache:
        er, lr = cache[cache_key]
    else:
        er, lr = embed_all(embedder, refs, sr, batch_size)
        if cache is not None:
            cache[cache_key] = (er, lr)
    eg, lg = embed_all(embedder, gens, sr, batch_size)
    if embedder.frame_level:
        er, eg = np.concatenate(er), np.concatenate(eg)
    out = {f"FD_{n}": M.frechet_distance(er, eg)}
    if warnings is not None and min(len(er), len(eg)) <= er.shape[1]:
        warnings.append(f"FD_{n}: {min(len(er), len(eg))} vectors of {er.shape[1]} dimensions: the covariance is "
                        "singular and the distance unreliable (a Frechet distance needs more clips than dimensions)")
    if lr is not None and lg is not None:
        out[f"KL_{n}"] = M.kl_divergence(lr, lg)
        if len(gens) >= M.IS_SPLITS:
            out[f"IS_{n}"], out[f"IS_{n}_std"] = M.inception_score(lg)
    return out


def oracle_offset(ref_heard: list, gen_heard: list, onscreen: set, window: float = ORACLE_WINDOW_S) -> float:
    """Toy stand-in for DeSync (seconds): for each impulsive onset the oracle hears in the reference from an
    on-screen class, the distance to the nearest generated onset of the same class, capped at `window`;
    averaged. 0 for a perfectly synchronised clip."""
    ds = []
    for e in ref_heard:
        if e["cls"] not in onscreen or e["cls"] not in _impulsive():
            continue
        cands = [abs(g["onset"] - e["onset"]) for g in gen_heard if g["cls"] == e["cls"]]
        ds.append(min([window] + cands))
    return float(np.mean(ds)) if ds else float("nan")


def _impulsive():
    from ..toy import IMPULSIVE
    return IMPULSIVE


def oracle_metrics(bench: Benchmark, items: List[TrackItem], refs, gens,
                   ref_cache: Optional[dict] = None) -> Dict[str, float]:
    """The toy oracle's scores: onset F1, class accuracy / F1, off-screen recall (off-screen track), and the
    oracle sync offset (tracks with video). ref_cache: item_id -> events heard in the reference, kept across
    systems scored with one Scorer."""
    from ..oracle import Oracle, score
    o = Oracle()
    ref_cache = {} if ref_cache is None else ref_cache
    truths = [bench.truth(it) for it in items]
    gen_heard = [o.analyse(g) for g in gens]
    s = score(gen_heard, truths)
    out = {"oracle_onset_f1": s["onset_f1"], "oracle_class_acc": s["class_acc"], "oracle_class_f1": s["class_f1"]}
    if items and items[0].track == "offscreen":
        out["oracle_offscreen_recall"] = s["offscreen_recall"]
    if items and items[0].task != "t2a":
        for it, r in zip(items, refs):
            if it.item_id not in ref_cache:
                ref_cache[it.item_id] = o.analyse(r)
        offs = [oracle_offset(ref_cache[it.item_id], g, {e["cls"] for e in t if e["onscreen"]})
                for it, g, t in zip(items, gen_heard, truths)]
        offs = [x for x in offs if math.isfinite(x)]
        out["oracle_offset_s"] = float(np.mean(offs)) if offs else float("nan")
    return out


class Scorer:
    """Every metric of one run. audio_embedders: FD/KL/IS embedders; clap: text-audio models (.name,
    .sample_rate, .embed_audio, .embed_text); imagebind: .embed_audio (16 kHz), .embed_video(frames, fps);
    synchformer: .desync(frames, fps, audio, sample_rate)."""

    def __init__(self, audio_embedders: Sequence[AudioEmbedder] = (), clap: Sequence = (), imagebind=None,
                 synchformer=None, oracle: bool = True, batch_size: int = 32):
        self.audio_embedders, self.clap, self.imagebind = list(audio_embedders), list(clap), imagebind
        self.synchformer, self.oracle, self.batch_size = synchformer, oracle, batch_size
        self._ref_cache: dict = {}
        self.warnings: List[str] = []
        self._oracle_cache: dict = {}

    def score_track(self, bench: Benchmark, items: List[TrackItem], gens: List[np.ndarray]) -> Dict[str, float]:
        sr = bench.sample_rate
        refs = [np.asarray(bench.reference(it), np.float32) for it in items]
        gens = [fit_length(g, len(r)) for g, r in zip(gens, refs)]
        out: Dict[str, float] = {"n": len(items)}
        key = tuple(it.item_id for it in items)
        for emb in self.audio_embedders:
            warn: List[str] = []
            out.update(audio_metrics(emb, refs, gens, sr, self.batch_size, self._ref_cache, (emb.name, key), warn))
            self.warnings += [f"{items[0].track}: {w}" for w in warn]
        texts = [it.text for it in items]
        if self.clap and all(texts):
            for c in self.clap:
                a, t = [], []
                for sl in _batches(len(items), self.batch_size):
                    x = torch.from_numpy(np.stack([resample(g, sr, c.sample_rate) for g in gens[sl]]))
                    a.append(torch.as_tensor(c.embed_audio(x)).double().cpu())
                    t.append(torch.as_tensor(c.embed_text(list(texts[sl]))).double().cpu())
                out[f"CLAP_{c.name}"] = M.clap_score(torch.cat(t).numpy(), torch.cat(a).numpy())
        with_video = items[0].task != "t2a"
        if with_video and (self.imagebind is not None or self.synchformer is not None):
            frames = [bench.frames(it, SYNC_FPS) for it in items]
            if self.imagebind is not None:
                v, a = [], []
                for sl in _batches(len(items), self.batch_size):
                    g16 = np.stack([resample(g, sr, 16000) for g in gens[sl]])
                    a.append(torch.as_tensor(self.imagebind.embed_audio(torch.from_numpy(g16))).double().cpu())
                    fr = frames[sl]
                    t_min = min(len(f) for f in fr)
                    v.append(torch.as_tensor(self.imagebind.embed_video(
                        torch.from_numpy(np.stack([f[:t_min] for f in fr])), SYNC_FPS)).double().cpu())
                out["IB"] = M.imagebind_score(torch.cat(v).numpy(), torch.cat(a).numpy())
            if self.synchformer is not None:
                out["DeSync"] = M.desync([self.synchformer.desync(f, SYNC_FPS, torch.from_numpy(g), sr)
                                          for f, g in zip(frames, gens)])
        if self.oracle and bench.has_truth:
            out.update(oracle_metrics(bench, items, refs, gens, self._oracle_cache))
        return out

    def describe(self) -> dict:
        d = {}
        for e in list(self.audio_embedders) + list(self.clap) + [self.imagebind, self.synchformer]:
            if e is None:
                continue
            name = getattr(e, "name", type(e).__name__)
            d[name] = {"class": type(e).__name__, "checkpoint": getattr(e, "checkpoint", None),
                       "sha256": getattr(e, "sha256", None), "sample_rate": getattr(e, "sample_rate", None)}
        if self.oracle:
            d["oracle"] = {"class": "omni2sound.oracle.Oracle", "checkpoint": None, "sha256": None}
        return d


# direction of each metric family: True if higher is better
def higher_is_better(metric: str) -> Optional[bool]:
    if metric.endswith("_std") or metric == "n":
        return None
    if metric.startswith(("FD_", "KL_", "DeSync")) or metric == "oracle_offset_s":
        return False
    if metric.startswith(("IS_", "CLAP_", "IB", "oracle_")):
        return True
    return None
