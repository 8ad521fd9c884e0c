"""The benchmark metrics against independent computations: closed forms, hand-computed distributions, and a
loop-by-loop reimplementation of av-benchmark's FD / KL / IS formulas."""
import math

import numpy as np
import pytest

from omni2sound.evaluation import metrics as M


# ---- an independent implementation of av-benchmark's formulas (plain loops, no shared code) ----------
def ref_mean_cov(x):
    n, d = len(x), len(x[0])
    mu = [sum(x[i][j] for i in range(n)) / n for j in range(d)]
    cov = [[sum((x[i][a] - mu[a]) * (x[i][b] - mu[b]) for i in range(n)) / (n - 1) for b in range(d)]
           for a in range(d)]
    return np.array(mu), np.array(cov)


def ref_frechet(x, y):
    """|mu1 - mu2|^2 + Tr S1 + Tr S2 - 2 Tr sqrt(S1 S2), the last term as sum sqrt(eig(S1^1/2 S2 S1^1/2)):
    the same trace by similarity, computed through symmetric eigendecompositions, not scipy.linalg.sqrtm."""
    m1, s1 = ref_mean_cov(x)
    m2, s2 = ref_mean_cov(y)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr = sum(math.sqrt(max(lv, 0.0)) for lv in lam)
    d2 = sum((a - b) ** 2 for a, b in zip(m1, m2))
    return d2 + sum(s1[i][i] for i in range(len(s1))) + sum(s2[i][i] for i in range(len(s2))) - 2 * tr


def ref_softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def ref_kl(ref_logits, gen_logits):
    total = 0.0
    for r, g in zip(ref_logits, gen_logits):
        p, q = ref_softmax(r), ref_softmax(g)
        total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    return total / len(ref_logits)


def ref_is(logits, splits=10, seed=2020):
    n = len(logits)
    perm = np.random.RandomState(seed).permutation(n)
    rows = [ref_softmax(list(logits[i])) for i in perm]
    scores = []
    for k in range(splits):
        chunk = rows[k * n // splits:(k + 1) * n // splits]
        c = len(chunk[0])
        py = [sum(r[j] for r in chunk) / len(chunk) for j in range(c)]
        kl = [sum(r[j] * (math.log(r[j]) - math.log(py[j])) for j in range(c)) for r in chunk]
        scores.append(math.exp(sum(kl) / len(kl)))
    mean = sum(scores) / splits
    return mean, math.sqrt(sum((s - mean) ** 2 for s in scores) / splits)


# ---- tests -----------------------------------------------------------------------------------------
def test_fd_kl_is_agree_with_independent_implementation():
    rng = np.random.default_rng()
    d = int(rng.integers(3, 9))
    x = rng.standard_normal((60, d)) @ rng.standard_normal((d, d))
    y = rng.standard_normal((45, d)) * rng.uniform(0.5, 2, d) + rng.standard_normal(d)
    assert abs(M.frechet_distance(x, y) - ref_frechet(x.tolist(), y.tolist())) < 1e-6
    a, b = rng.standard_normal((37, 11)) * 3, rng.standard_normal((37, 11)) * 3
    assert abs(M.kl_divergence(a, b) - ref_kl(a.tolist(), b.tolist())) < 1e-6
    lg = rng.standard_normal((53, 7)) * 2
    mean, std = M.inception_score(lg)
    rm, rs = ref_is(lg)
    assert abs(mean - rm) < 1e-6 and abs(std - rs) < 1e-6


def test_fd_closed_form_gaussians():
    rng = np.random.default_rng()
    d = 4
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    v1, v2 = rng.uniform(0.2, 3, d), rng.uniform(0.2, 3, d)
    # diagonal covariances commute: d^2 = |mu1 - mu2|^2 + sum (sqrt v1 - sqrt v2)^2
    closed = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum())
    assert M.frechet_distance_from_stats(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(closed, abs=1e-9)
    # a rotated pair: FD is invariant to a common rotation of both Gaussians
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    rot = M.frechet_distance_from_stats(q @ mu1, q @ np.diag(v1) @ q.T, q @ mu2, q @ np.diag(v2) @ q.T)
    assert rot == pytest.approx(closed, abs=1e-8)
    # sampled: the estimate converges to the closed form
    n = 40000
    x = mu1 + rng.standard_normal((n, d)) * np.sqrt(v1)
    y = mu2 + rng.standard_normal((n, d)) * np.sqrt(v2)
    assert M.frechet_distance(x, y) == pytest.approx(closed, abs=0.15 + 0.05 * closed)
    # a set metric: row order is irrelevant
    assert M.frechet_distance(x[::-1], y[rng.permutation(n)]) == pytest.approx(M.frechet_distance(x, y), abs=1e-6)


def test_fd_retry_and_imaginary_rules():
    # sqrtm of a nilpotent product is not finite: retried with 1e-6 on both diagonals
    s1, s2, mu = np.array([[0.0, 1.0], [0.0, 0.0]]), np.eye(2), np.zeros(2)
    eps = 1e-6
    import scipy.linalg
    expected = np.trace(s1) + np.trace(s2) - 2 * np.trace(
        scipy.linalg.sqrtm((s1 + eps * np.eye(2)) @ (s2 + eps * np.eye(2)))).real
    assert M.frechet_distance_from_stats(mu, s1, mu, s2) == pytest.approx(expected, abs=1e-9)
    # a large imaginary diagonal is an error, not a number
    with pytest.raises(M.FrechetError, match="imaginary"):
        M.frechet_distance_from_stats(mu, np.diag([1.0, -1.0]), mu, np.eye(2))
    with pytest.raises(ValueError, match="at least 2"):
        M.frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="NaN"):
        M.frechet_distance(np.full((3, 2), np.nan), np.zeros((5, 2)))


def test_kl_and_is_hand_computed():
    p, q = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    kl = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert M.kl_divergence(np.log(p)[None], np.log(q)[None]) == pytest.approx(kl, abs=1e-12)
    # the reference comes first: KL(p || q) != KL(q || p)
    assert M.kl_divergence(np.log(q)[None], np.log(p)[None]) != pytest.approx(kl, abs=1e-3)
    # mean over pairs, not the last pair (av-benchmark's loop quirk)
    both = M.kl_divergence(np.log(np.stack([p, p])), np.log(np.stack([q, p])))
    assert both == pytest.approx(kl / 2, abs=1e-12)
    assert M.kl_divergence(np.log(np.stack([p, q])), np.log(np.stack([p, q]))) == pytest.approx(0, abs=1e-15)
    # confident, evenly spread predictions over C classes: IS = C; one class everywhere: IS = 1
    c = 4
    logits = np.tile(np.eye(c) * 60.0, (5, 1))                 # 20 clips, 5 per class
    assert M.inception_score(logits, splits=1, seed=None)[0] == pytest.approx(c, rel=1e-9)
    same = np.tile(np.eye(c)[:1] * 60.0, (20, 1))
    assert M.inception_score(same, splits=2)[0] == pytest.approx(1.0, abs=1e-9)
    # 10 splits of a shuffled set: each split (2 clips) sees at most 2 classes
    mean, std = M.inception_score(logits)
    assert 1.0 <= mean <= 2.0 + 1e-9 and std >= 0
    with pytest.raises(ValueError, match="splits"):
        M.inception_score(logits[:5])


def test_cosine_scores():
    rng = np.random.default_rng()
    a = rng.standard_normal((6, 5))
    assert M.clap_score(a, 3 * a) == pytest.approx(1.0, abs=1e-12)
    assert M.imagebind_score(a, -a) == pytest.approx(-100.0, abs=1e-9)
    b = rng.standard_normal((6, 5))
    manual = np.mean([x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a, b)])
    assert M.mean_cosine(a, b) == pytest.approx(manual, abs=1e-12)
    assert M.desync([-0.2, 0.4, 0.0]) == pytest.approx(0.2, abs=1e-12)
