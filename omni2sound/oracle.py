"""The oracle: reads the toy world's events (class, onset) back from audio, and scores them.

Each toy class sounds in its own frequency band (`toy.SOUNDS`), so the analysis is a band-energy one:
a short-time Fourier transform (16 ms Hann window, 5 ms hop), the energy of each class band per frame
in dB, then
  - impulsive classes: an onset where the band energy rises by more than `rise_db` within 30 ms and the
    peak that follows is louder than `floor_db` (absolute, re full scale); rises closer than 120 ms are
    one onset;
  - continuous classes: present when the band's median energy over the clip is above `floor_db`.
The thresholds are physical (dB re full scale) and fixed once for real toy clips; they are not fitted
to generated audio. `score(...)` matches events to the truth: same class, onset within 40 ms.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .toy import CLASSES, CONTINUOUS, IMPULSIVE, SOUNDS


@dataclass
class OracleConfig:
    sample_rate: int = 16000
    n_fft: int = 256           # 16 ms
    hop: int = 80              # 5 ms
    rise_db: float = 9.0       # an onset: the band gets this much louder ...
    rise_frames: int = 6       # ... within 30 ms
    floor_db: float = -30.0    # band energy (per frame, dB re a full-scale sine in the band) that counts as sound
    merge_s: float = 0.12      # rises closer than this are one onset
    tolerance_s: float = 0.040


class Oracle:
    def __init__(self, cfg: OracleConfig | None = None):
        self.cfg = cfg or OracleConfig()
        c = self.cfg
        freqs = np.fft.rfftfreq(c.n_fft, 1.0 / c.sample_rate)
        self.bands = {k: (freqs >= SOUNDS[k][2][0]) & (freqs <= SOUNDS[k][2][1]) for k in CLASSES}
        self.window = np.hanning(c.n_fft + 1)[:-1]
        # energy of a full-scale sine in one frame: the dB reference
        self.ref = (self.window.sum() / 2) ** 2

    def band_db(self, audio: np.ndarray) -> tuple[np.ndarray, dict]:
        """Frame times [F] (s) and per-class band energies {cls: [F] dB re full scale}."""
        c = self.cfg
        x = np.asarray(audio, np.float64).reshape(-1)
        pad = c.n_fft // 2
        x = np.pad(x, (pad, pad))
        n_frames = 1 + (len(x) - c.n_fft) // c.hop
        idx = np.arange(c.n_fft)[None, :] + c.hop * np.arange(n_frames)[:, None]
        spec = np.abs(np.fft.rfft(x[idx] * self.window, axis=1)) ** 2          # [F, bins]
        times = np.arange(n_frames) * c.hop / c.sample_rate                    # window centres
        return times, {k: 10 * np.log10(spec[:, m].sum(1) / self.ref + 1e-12) for k, m in self.bands.items()}

    def analyse(self, audio: np.ndarray) -> list[dict]:
        """Events heard in `audio` [N]: [{"cls", "onset"}] (continuous sources with onset 0)."""
        c = self.cfg
        times, db = self.band_db(audio)
        events = []
        for k in IMPULSIVE:
            e = np.maximum(db[k], c.floor_db - 20)   # below the floor is silence: no rises out of noise
            # rise over the previous 30 ms, and the loudest level over the next 30 ms
            padded = np.concatenate([np.full(c.rise_frames, e[0]), e, np.full(c.rise_frames, e[-1])])
            win = np.lib.stride_tricks.sliding_window_view(padded, c.rise_frames)     # [F + R + 1, R]
            prev_min = win[: len(e)].min(1)
            nxt_max = win[c.rise_frames:c.rise_frames + len(e)].max(1)
            nxt_max = np.maximum(nxt_max, e)
            rise = e - prev_min
            cand = np.where((rise > c.rise_db) & (nxt_max > c.floor_db))[0]
            # one onset per run of candidates (rises closer than merge_s): its first frame
            last = -1e9
            for j in cand:
                t = times[j]
                if t - last > c.merge_s:
                    events.append({"cls": k, "onset": float(t)})
                last = t
        for k in CONTINUOUS:
            if np.median(db[k]) > c.floor_db:
                events.append({"cls": k, "onset": 0.0})
        return events


def match_events(pred: list, truth: list, tolerance: float = 0.040) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) of impulsive events: same class, |dt| <= tolerance,
    each truth event matched once (greedy by distance)."""
    pred = [p for p in pred if p["cls"] in IMPULSIVE]
    truth = [t for t in truth if t["cls"] in IMPULSIVE]
    pairs = sorted((abs(p["onset"] - t["onset"]), i, j) for i, p in enumerate(pred) for j, t in enumerate(truth)
                   if p["cls"] == t["cls"] and abs(p["onset"] - t["onset"]) <= tolerance)
    used_p, used_t = set(), set()
    for _, i, j in pairs:
        if i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
    tp = len(used_p)
    return tp, len(pred) - tp, len(truth) - tp


def f1(tp: int, fp: int, fn: int) -> float:
    return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def classes_of(events: list) -> set:
    return {e["cls"] for e in events}


def score(preds: list, truths: list, tolerance: float = 0.040) -> dict:
    """Scores of a set of clips. preds/truths: lists (one per clip) of event lists [{"cls", "onset", ...}].
    onset_f1: impulsive events, class right and onset within tolerance; class_acc: fraction of clips whose
    set of heard classes equals the truth; class_f1: per (clip, class) presence F1;
    offscreen_recall: fraction of off-screen classes (truth events with onscreen False) that are heard."""
    tp = fp = fn = 0
    exact = 0
    ctp = cfp = cfn = 0
    off_hit = off_n = 0
    for p, t in zip(preds, truths):
        a, b, c = match_events(p, t, tolerance)
        tp, fp, fn = tp + a, fp + b, fn + c
        pc, tc = classes_of(p), classes_of(t)
        exact += pc == tc
        ctp, cfp, cfn = ctp + len(pc & tc), cfp + len(pc - tc), cfn + len(tc - pc)
        for k in {e["cls"] for e in t if not e.get("onscreen", True)}:
            off_n += 1
            off_hit += k in pc
    n = max(1, len(truths))
    return {"n_clips": len(truths), "onset_f1": f1(tp, fp, fn), "onset_tp": tp, "onset_fp": fp, "onset_fn": fn,
            "class_acc": exact / n, "class_f1": f1(ctp, cfp, cfn),
            "offscreen_recall": (off_hit / off_n) if off_n else None, "offscreen_n": off_n}
