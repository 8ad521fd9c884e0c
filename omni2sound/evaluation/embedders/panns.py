"""PANNs Cnn14 (Kong et al. 2020), the 16 kHz model av-benchmark's FD_PANNs / KL_PANNs / IS use.

Our port of the architecture, loading the released checkpoint (`Cnn14_16k_mAP=0.438.pth`: a torch pickle
{"model": state_dict} with torchlibrosa's parameter names). `panns-inference` is not used: importing it
fetches the AudioSet label CSV with wget, and its constructor downloads the weights when the path is absent.

Input: 16 kHz mono, mean removed (as av-benchmark does). Front end (torchlibrosa's, whose weights the checkpoint
holds): STFT as two convolutions (Hann 512, hop 160, centred, reflect padding), power, 64 Slaney mel bands
50-8000 Hz, 10 log10(max(x, 1e-10)). Outputs: the 2048-d embedding relu(fc1(.)) and the 527 AudioSet logits
fc_audioset(.) before the sigmoid.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._dsp import mel_filterbank_slaney
from .base import AudioEmbedder, AudioFeatures, load_strict, load_torch_checkpoint, sha256_file


class _STFT(nn.Module):
    """torchlibrosa.stft.STFT's parameters: the real and imaginary DFT rows times the window, as conv kernels."""

    def __init__(self, n_fft: int, hop: int):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        bins = n_fft // 2 + 1
        self.conv_real = nn.Conv1d(1, bins, n_fft, stride=hop, bias=False)
        self.conv_imag = nn.Conv1d(1, bins, n_fft, stride=hop, bias=False)
        n = np.arange(n_fft)
        window = 0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)              # scipy.signal.get_window("hann", fftbins)
        w = np.exp(-2j * np.pi * np.outer(n, np.arange(bins)) / n_fft) * window[:, None]      # [n_fft, bins]
        with torch.no_grad():
            self.conv_real.weight.copy_(torch.from_numpy(w.real.T[:, None, :]).float())
            self.conv_imag.weight.copy_(torch.from_numpy(w.imag.T[:, None, :]).float())

    def forward(self, x: Tensor) -> Tensor:                              # x [B, N] -> power [B, 1, T, bins]
        x = F.pad(x[:, None, :], (self.n_fft // 2, self.n_fft // 2), mode="reflect")
        real, imag = self.conv_real(x), self.conv_imag(x)                # [B, bins, T]
        return (real ** 2 + imag ** 2).transpose(1, 2)[:, None]


class _Spectrogram(nn.Module):
    def __init__(self, n_fft: int, hop: int):
        super().__init__()
        self.stft = _STFT(n_fft, hop)

    def forward(self, x: Tensor) -> Tensor:
        return self.stft(x)


class _LogMel(nn.Module):
    def __init__(self, sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float):
        super().__init__()
        self.melW = nn.Parameter(torch.from_numpy(mel_filterbank_slaney(sr, n_fft, n_mels, fmin, fmax)).float(),
                                 requires_grad=False)                   # [bins, n_mels]

    def forward(self, x: Tensor) -> Tensor:
        return 10.0 * torch.log10(torch.clamp(x @ self.melW, min=1e-10))


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn1, self.bn2 = nn.BatchNorm2d(cout), nn.BatchNorm2d(cout)

    def forward(self, x: Tensor, pool) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, pool)


class Cnn14(nn.Module):
    """Cnn14 at 16 kHz: window 512, hop 160, 64 mels 50-8000 Hz; conv widths 64..2048; 527 classes."""

    def __init__(self, sample_rate: int = 16000, window: int = 512, hop: int = 160, mel_bins: int = 64,
                 fmin: float = 50.0, fmax: float = 8000.0, classes: int = 527, widths=(64, 128, 256, 512, 1024, 2048)):
        super().__init__()
        self.spectrogram_extractor = _Spectrogram(window, hop)
        self.logmel_extractor = _LogMel(sample_rate, window, mel_bins, fmin, fmax)
        self.bn0 = nn.BatchNorm2d(mel_bins)
        chans = (1,) + tuple(widths)
        for i in range(6):
            setattr(self, f"conv_block{i + 1}", ConvBlock(chans[i], chans[i + 1]))
        self.fc1 = nn.Linear(widths[-1], widths[-1])
        self.fc_audioset = nn.Linear(widths[-1], classes)

    def forward(self, audio: Tensor) -> tuple[Tensor, Tensor]:
        """audio [B, N] at 16 kHz -> (embedding [B, 2048], logits [B, 527]); the front end runs in fp32."""
        with torch.autocast(audio.device.type, enabled=False):
            x = self.logmel_extractor(self.spectrogram_extractor(audio.float()))     # [B, 1, T, mels]
            x = self.bn0(x.transpose(1, 3)).transpose(1, 3)
        for i in range(6):
            x = getattr(self, f"conv_block{i + 1}")(x, (2, 2) if i < 5 else (1, 1))
        x = x.mean(dim=3)                                                           # [B, C, T']
        x = x.max(dim=2).values + x.mean(dim=2)
        emb = F.relu(self.fc1(x))
        return emb, self.fc_audioset(emb)


class PannsCnn14(AudioEmbedder):
    """FD_PANNs / KL_PANNs / IS_PANNs embedder over a local `Cnn14_16k_mAP=0.438.pth`."""
    name = "PANNs"
    sample_rate = 16000
    has_logits = True

    def __init__(self, model: Cnn14, checkpoint: Optional[str] = None, max_seconds: Optional[float] = None):
        self.model = model.eval()
        self.checkpoint = checkpoint
        self.max_seconds = max_seconds
        self.dtype = torch.float32

    @classmethod
    def from_checkpoint(cls, path: str, max_seconds: Optional[float] = None) -> "PannsCnn14":
        sd = load_torch_checkpoint(path, "PANNs Cnn14")
        classes = sd["fc_audioset.weight"].shape[0] if "fc_audioset.weight" in sd else 527
        model = Cnn14(classes=classes)
        load_strict(model, sd, path, "Cnn14 (16 kHz)")
        emb = cls(model, path, max_seconds)
        emb.sha256 = sha256_file(path)
        return emb

    def to(self, device, dtype: Optional[torch.dtype] = None) -> "PannsCnn14":
        self.model.to(device)
        self.dtype = dtype or torch.float32
        return self

    @torch.no_grad()
    def embed(self, audio: Tensor) -> AudioFeatures:
        dev = next(self.model.parameters()).device
        x = audio.to(dev, torch.float32)
        if self.max_seconds:
            x = x[:, : int(round(self.max_seconds * self.sample_rate))]
        x = x - x.mean(dim=1, keepdim=True)
        with torch.autocast(dev.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            emb, logits = self.model(x)
        return AudioFeatures(embedding=emb.float().cpu().double(), logits=logits.float().cpu().double())
