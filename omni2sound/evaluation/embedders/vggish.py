"""VGGish (Hershey et al. 2017), the embedder of av-benchmark's FD_VGG (the "FAD" of the papers' tables).

Our port of the architecture and of its `vggish_input` front end, loading the PyTorch release of the weights
(`vggish-10086976.pth`, torchvggish's plain state dict). `torchvggish` is not on PyPI (it is a torch.hub
repository that downloads its weights). No PCA post-processing, as av-benchmark: the 128-d output of the
last ReLU. Frame level: each clip gives one 128-d vector per 0.96 s example (no overlap), and the FD pools the
frames of all clips.

Front end: 16 kHz, 25 ms periodic Hann window, 10 ms hop, no padding, |rfft| over 512 bins, 64 HTK mel bands
125-7500 Hz (unnormalised), log(mel + 0.01); examples of 96 frames with hop 96.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ._dsp import mel_filterbank_htk, periodic_hann
from .base import AudioEmbedder, AudioFeatures, load_strict, load_torch_checkpoint, sha256_file

_LAYERS = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M")


class VGGishNet(nn.Module):
    def __init__(self):
        super().__init__()
        layers, cin = [], 1
        for v in _LAYERS:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.embeddings = nn.Sequential(nn.Linear(512 * 4 * 6, 4096), nn.ReLU(True), nn.Linear(4096, 4096),
                                        nn.ReLU(True), nn.Linear(4096, 128), nn.ReLU(True))

    def forward(self, x: Tensor) -> Tensor:              # x [E, 1, 96, 64] log-mel examples -> [E, 128]
        x = self.features(x)                              # [E, 512, 6, 4]
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1) # the TensorFlow (NHWC) flattening the weights expect
        return self.embeddings(x)


class VGGishFrontEnd:
    sample_rate = 16000

    def __init__(self, device="cpu"):
        self.win, self.hop, self.n_fft = 400, 160, 512
        self.window = torch.from_numpy(periodic_hann(self.win)).float().to(device)
        self.mel = torch.from_numpy(mel_filterbank_htk(16000, self.n_fft, 64, 125.0, 7500.0)).float().to(device)

    def examples(self, audio: Tensor) -> tuple[Tensor, list]:
        """audio [B, N] -> (examples [sum E_i, 1, 96, 64], E_i per clip)."""
        B, N = audio.shape
        n_frames = 0 if N < self.win else 1 + (N - self.win) // self.hop
        n_ex = 0 if n_frames < 96 else 1 + (n_frames - 96) // 96
        if n_ex == 0:
            return audio.new_zeros(0, 1, 96, 64), [0] * B
        frames = audio.float().unfold(1, self.win, self.hop)[:, :n_frames] * self.window    # [B, F, 400]
        mag = torch.fft.rfft(frames, n=self.n_fft).abs()                                     # [B, F, 257]
        logmel = torch.log(mag @ self.mel + 0.01)                                           # [B, F, 64]
        ex = logmel[:, : n_ex * 96].reshape(B * n_ex, 1, 96, 64)
        return ex, [n_ex] * B


class VGGish(AudioEmbedder):
    name = "VGG"
    sample_rate = 16000
    frame_level = True

    def __init__(self, model: VGGishNet, checkpoint: Optional[str] = None):
        self.model = model.eval()
        self.checkpoint = checkpoint
        self.front = VGGishFrontEnd()
        self.dtype = torch.float32

    @classmethod
    def from_checkpoint(cls, path: str) -> "VGGish":
        sd = load_torch_checkpoint(path, "VGGish")
        sd = {k: v for k, v in sd.items() if not k.startswith("pproc.")}          # PCA parameters: unused
        model = VGGishNet()
        load_strict(model, sd, path, "VGGish")
        emb = cls(model, path)
        emb.sha256 = sha256_file(path)
        return emb

    def to(self, device, dtype: Optional[torch.dtype] = None) -> "VGGish":
        self.model.to(device)
        self.front = VGGishFrontEnd(device)
        self.dtype = dtype or torch.float32
        return self

    @torch.no_grad()
    def embed(self, audio: Tensor) -> AudioFeatures:
        dev = next(self.model.parameters()).device
        ex, counts = self.front.examples(audio.to(dev))
        if ex.shape[0]:
            with torch.autocast(dev.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                e = self.model(ex).float().cpu().double()
        else:
            e = torch.zeros(0, 128, dtype=torch.float64)
        return AudioFeatures(embedding=list(torch.split(e, counts)))
