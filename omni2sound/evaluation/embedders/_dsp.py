"""Filterbanks and framing shared by the audio embedders (numpy, float64; the models cast them)."""
from __future__ import annotations

import numpy as np


def hz_to_mel_htk(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def mel_to_hz_htk(m):
    return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


def hz_to_mel_slaney(f):
    """Slaney's auditory-toolbox scale (librosa's default, htk=False): linear below 1 kHz, log above."""
    f = np.asarray(f, np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    mel = f / f_sp
    return np.where(f >= min_log_hz, min_log_hz / f_sp + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mel)


def mel_to_hz_slaney(m):
    m = np.asarray(m, np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank_slaney(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """[n_fft // 2 + 1, n_mels] triangular filters on the Slaney mel scale with Slaney area normalisation
    (librosa.filters.mel(htk=False, norm="slaney"), transposed as torchlibrosa stores it)."""
    fft_freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    mel_f = mel_to_hz_slaney(np.linspace(hz_to_mel_slaney(fmin), hz_to_mel_slaney(fmax), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    w = np.maximum(0, np.minimum(lower, upper))
    w *= (2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels]))[:, None]
    return w.T


def mel_filterbank_htk(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """[n_fft // 2 + 1, n_mels] triangular filters on the HTK mel scale, unnormalised, with the DC bin
    zeroed: VGGish's `spectrogram_to_mel_matrix` (mel_features.py of the released model)."""
    n_bins = n_fft // 2 + 1
    spec_mel = hz_to_mel_htk(np.linspace(0.0, sr / 2.0, n_bins))
    edges = np.linspace(hz_to_mel_htk(fmin), hz_to_mel_htk(fmax), n_mels + 2)
    w = np.zeros((n_bins, n_mels))
    for i in range(n_mels):
        lo, c, hi = edges[i:i + 3]
        lower = (spec_mel - lo) / (c - lo)
        upper = (hi - spec_mel) / (hi - c)
        w[:, i] = np.maximum(0.0, np.minimum(lower, upper))
    w[0, :] = 0.0
    return w


def periodic_hann(n: int) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)
