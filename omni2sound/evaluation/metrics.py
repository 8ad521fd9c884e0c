"""The field's audio-generation metrics, each a small function of embeddings, logits or scores.

The formulas follow av-benchmark (hkchengrex/av-benchmark, the protocol MMAudio and Omni2Sound report), so
numbers computed on the same embedder checkpoints are comparable with published tables. Where av-benchmark
has a quirk, the intended value is computed deterministically and the difference is documented on the
function. Everything is computed in float64 on the CPU: these are reductions over a few thousand vectors.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import scipy.linalg

# av-benchmark's rule: an imaginary part of sqrtm(S1 S2) larger than this on the diagonal is a failure
IMAG_TOLERANCE = 1e-3
# av-benchmark's Inception Score: 10 splits of the rows shuffled with RandomState(2020)
IS_SPLITS = 10
IS_SEED = 2020


class FrechetError(ValueError):
    """The matrix square root of the covariance product has a non-negligible imaginary part."""


def _as_2d(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array [N, D], got shape {a.shape}")
    if a.shape[0] < 2:
        raise ValueError(f"{name}: a covariance needs at least 2 vectors, got {a.shape[0]}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: the embeddings hold NaN or infinite values")
    return a


def gaussian_stats(x) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] of embeddings x [N, D] (rows are samples: np.cov(rowvar=False), the
    unbiased N-1 normalisation), as av-benchmark computes them."""
    a = _as_2d(x, "gaussian_stats")
    return a.mean(axis=0), np.atleast_2d(np.cov(a, rowvar=False))


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):

        d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2))

    Source: Heusel et al. 2017 (FID), as implemented by pytorch-fid and av-benchmark: `scipy.linalg.sqrtm` of
    the product; when the result is not finite, `eps` is added to both diagonals and it is retried; a
    complex result is accepted when its diagonal's imaginary part is within 1e-3 of zero and then its real
    part is used. Where av-benchmark returns -1 for a larger imaginary part, this raises FrechetError: a
    sentinel number in a table is easily misread as a distance."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"frechet_distance: mismatched shapes mu {mu1.shape} / {mu2.shape}, "
                         f"sigma {s1.shape} / {s2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.all(np.isfinite(covmean)):
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAG_TOLERANCE):
            raise FrechetError(f"frechet_distance: sqrtm(S1 S2) has an imaginary component "
                               f"{np.max(np.abs(covmean.imag)):.3g} (> {IMAG_TOLERANCE})")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def frechet_distance(reference, generated) -> float:
    """Frechet distance between two sets of embeddings [N1, D] and [N2, D] (a set metric: the order of the
    rows does not matter). See `frechet_distance_from_stats` for the formula and its source."""
    return frechet_distance_from_stats(*gaussian_stats(reference), *gaussian_stats(generated))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl_per_pair(reference_logits, generated_logits) -> np.ndarray:
    """KL(p_ref || p_gen) per paired clip [N], with p = softmax over the classes (527 AudioSet classes):

        KL_i = sum_c p_ref[i, c] (log p_ref[i, c] - log p_gen[i, c])

    Source: av-benchmark's `kl_div(log_softmax(gen), log_softmax(ref), log_target=True, reduction="sum")`
    (torch's kl_div(input, target) is KL(target || input): the reference comes first)."""
    r = np.asarray(reference_logits, np.float64)
    g = np.asarray(generated_logits, np.float64)
    if r.shape != g.shape or r.ndim != 2:
        raise ValueError(f"kl: expected paired logits [N, C] of equal shape, got {r.shape} and {g.shape}")
    lr, lg = _log_softmax(r), _log_softmax(g)
    return (np.exp(lr) * (lr - lg)).sum(axis=1)


def kl_divergence(reference_logits, generated_logits) -> float:
    """Mean over paired clips of KL(softmax(ref) || softmax(gen)), summed over classes (`kl_per_pair`).

    Difference from av-benchmark: its loop over clips assigns rather than accumulates, so the number it
    reports is the last pair's KL; this is the mean over all pairs, the value the metric is meant to be
    (and what the papers describe)."""
    return float(kl_per_pair(reference_logits, generated_logits).mean())


def inception_score(logits, splits: int = IS_SPLITS, seed: Optional[int] = IS_SEED) -> tuple[float, float]:
    """Inception Score (mean, std over splits) of classifier logits [N, C]:

        IS_k = exp( mean_{i in split k} KL(p(y|x_i) || p_k(y)) ),  p_k(y) = mean_{i in split k} p(y|x_i)

    Source: Salimans et al. 2016 as implemented by torch-fidelity and av-benchmark: the rows are shuffled
    with `np.random.RandomState(2020).permutation(N)`, split into 10 consecutive chunks
    [k N // 10, (k + 1) N // 10), and the mean and (population, ddof 0) std of the 10 scores reported.
    seed=None keeps the order."""
    x = np.asarray(logits, np.float64)
    if x.ndim != 2:
        raise ValueError(f"inception_score: expected logits [N, C], got shape {x.shape}")
    n = x.shape[0]
    if n < splits:
        raise ValueError(f"inception_score: {n} clips cannot make {splits} splits")
    if seed is not None:
        x = x[np.random.RandomState(seed).permutation(n)]
    logp = _log_softmax(x)
    p = np.exp(logp)
    scores = []
    for k in range(splits):
        a, b = k * n // splits, (k + 1) * n // splits
        pk, lk = p[a:b], logp[a:b]
        logq = np.log(pk.mean(axis=0, keepdims=True))
        scores.append(math.exp(float((pk * (lk - logq)).sum(axis=1).mean())))
    return float(np.mean(scores)), float(np.std(scores))


def mean_cosine(a, b) -> float:
    """Mean over pairs of cos(a_i, b_i) for a, b [N, D] (the CLAP text-audio and ImageBind video-audio
    scores: av-benchmark's `cosine_similarity(...).mean()`). Rows are L2-normalised here, so already
    normalised embeddings give the same value."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"mean_cosine: expected paired embeddings [N, D] of equal shape, got {a.shape}, {b.shape}")
    na = np.linalg.norm(a, axis=1).clip(min=1e-12)
    nb = np.linalg.norm(b, axis=1).clip(min=1e-12)
    return float(((a * b).sum(axis=1) / (na * nb)).mean())


def imagebind_score(video_embeddings, audio_embeddings) -> float:
    """IB-score: mean cosine of ImageBind video and audio embeddings, printed x100 as MMAudio and
    av-benchmark tables do (Omni2Sound's table prints the raw cosine: divide by 100 to compare)."""
    return 100.0 * mean_cosine(video_embeddings, audio_embeddings)


def clap_score(text_embeddings, audio_embeddings) -> float:
    """CLAP score: mean cosine of CLAP text and audio embeddings of paired (caption, clip)."""
    return mean_cosine(text_embeddings, audio_embeddings)


def desync(offsets: Sequence[float]) -> float:
    """DeSync (seconds): mean over clips of the per-clip |offset| from the Synchformer offset classifier.
    Per clip, av-benchmark averages the absolute predicted offset (argmax over linspace(-2, 2, 21)) of the
    first and the last 4.8 s; `omni2sound.synchformer.Synchformer.desync` returns that per-clip value."""
    o = np.abs(np.asarray(list(offsets), np.float64))
    if o.size == 0:
        raise ValueError("desync: no clips")
    return float(o.mean())
