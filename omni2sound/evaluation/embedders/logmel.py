"""The embedded offline audio embedding: deterministic log-mel statistics (no learned weights).

Per clip: the power spectrogram (16 kHz, 32 ms periodic Hann window, 10 ms hop), 16 Slaney mel bands
50-8000 Hz, log10(power + 1e-10); the embedding is the per-band mean and standard deviation over time
(32-d) and the "logits" are the per-band mean log power x ln(10) (16-d), so softmax(logits) is the clip's
band-power distribution (geometric mean over time, normalised). The metrics over it are named FD_logmel,
KL_logmel and IS_logmel: they measure spectral-envelope and loudness-dynamics agreement, and are no
substitute for PaSST/PANNs/VGGish numbers, which need those models' weights.

16 bands keep the embedding (32-d) below the toy benchmark's 48 clips per track: a Frechet distance needs
N > D, else the covariances are singular and sqrtm(S1 S2) carries errors of order sqrt(eps) |S| (a perfect
system then scores about -5e-6 instead of ~1e-8).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._dsp import mel_filterbank_slaney, periodic_hann
from .base import AudioEmbedder, AudioFeatures


class LogMelStats(AudioEmbedder):
    name = "logmel"
    sample_rate = 16000
    has_logits = True

    def __init__(self, n_fft: int = 512, hop: int = 160, n_mels: int = 16, fmin: float = 50.0, fmax: float = 8000.0):
        self.n_fft, self.hop = n_fft, hop
        self.window = torch.from_numpy(periodic_hann(n_fft)).float()                          # [n_fft]
        self.mel = torch.from_numpy(mel_filterbank_slaney(self.sample_rate, n_fft, n_mels, fmin, fmax)).float()
        self.device = torch.device("cpu")

    def to(self, device, dtype=None) -> "LogMelStats":
        self.device = torch.device(device)
        self.window, self.mel = self.window.to(self.device), self.mel.to(self.device)
        return self

    @torch.no_grad()
    def log_mel(self, audio: Tensor) -> Tensor:
        """audio [B, N] -> log10 mel power [B, F, n_mels] (float32: statistics of logs need the mantissa)."""
        x = audio.to(self.device, torch.float32)
        if x.shape[-1] < self.n_fft:
            x = torch.nn.functional.pad(x, (0, self.n_fft - x.shape[-1]))
        spec = torch.stft(x, self.n_fft, self.hop, window=self.window, center=True, return_complex=True)
        power = spec.real ** 2 + spec.imag ** 2                                                # [B, bins, F]
        return torch.log10(torch.einsum("bkf,km->bfm", power, self.mel) + 1e-10)

    @torch.no_grad()
    def embed(self, audio: Tensor) -> AudioFeatures:
        lm = self.log_mel(audio)                                                              # [B, F, M]
        mean, std = lm.mean(1), lm.std(1, unbiased=False)
        return AudioFeatures(embedding=torch.cat([mean, std], 1).cpu().double(),
                             logits=(mean * math.log(10.0)).cpu().double())
