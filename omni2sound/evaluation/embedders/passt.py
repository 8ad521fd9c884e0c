"""PaSST (Koutini et al. 2022), `passt_s_swa_p16_128_ap476`: av-benchmark's FD_PaSST / KL_PaSST / IS_PaSST model.

Our port of the network and of its `AugmentMelSTFT` front end (evaluation mode: no frequency / time masking, no
random mel-range jitter), loading the released timm state dict `passt-s-f128-p16-s10-ap.476-swa.pt` (or
hear21passt's wrapper, whose network keys start with "net."). `hear21passt` is not used: it imports torchaudio
for the Kaldi mel banks, whose wheels pin one torch build, and downloads the weights itself.

Input: 32 kHz mono, padded with zeros or cut to 10 s (320,000 samples), as av-benchmark does. Front end:
pre-emphasis [-0.97, 1], |STFT|^2 (n_fft 1024, win 800 symmetric Hann, hop 320, centred, reflect), 128 Kaldi
mel bands 0-15,000 Hz, log(x + 1e-5), (x + 4.5) / 5. Network: 16x16 patches with stride 10 (12 x 99 for 10 s),
separate frequency and time positional embeddings, class and distillation tokens, 12 ViT-B blocks (768-d, 12
heads), final LayerNorm. Outputs (av-benchmark's `mode="all"` split): the 768-d embedding = mean of the class and
distillation tokens after the final norm; the 527 logits = mean of head(class token) and head_dist(distillation).
"""
from __future__ import annotations

import re
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import AudioEmbedder, AudioFeatures, load_strict, load_torch_checkpoint, sha256_file

SAMPLE_RATE = 32000
CLIP_SAMPLES = 320000


def kaldi_mel_banks(n_mels: int, n_fft: int, sr: int, fmin: float, fmax: float) -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] triangles on the Kaldi mel scale 1127 ln(1 + f / 700) over the first n_fft / 2
    bins, the last (Nyquist) column zero: torchaudio.compliance.kaldi.get_mel_banks without VTLN, padded as
    PaSST pads it."""
    mel = lambda f: 1127.0 * np.log(1.0 + np.asarray(f, np.float64) / 700.0)
    n_bins = n_fft // 2
    lo, hi = mel(fmin), mel(fmax)
    delta = (hi - lo) / (n_mels + 1)
    b = np.arange(n_mels)[:, None]
    left, centre, right = lo + b * delta, lo + (b + 1) * delta, lo + (b + 2) * delta
    m = mel(sr / n_fft * np.arange(n_bins))[None, :]
    w = np.maximum(0.0, np.minimum((m - left) / (centre - left), (right - m) / (right - centre)))
    return np.pad(w, ((0, 0), (0, 1)))


class PasstMel(nn.Module):
    def __init__(self, n_mels: int = 128, sr: int = SAMPLE_RATE, win: int = 800, hop: int = 320, n_fft: int = 1024,
                 fmin: float = 0.0, fmax: Optional[float] = None, fmax_aug_range: int = 2000):
        super().__init__()
        self.n_fft, self.hop, self.win = n_fft, hop, win
        fmax = fmax if fmax is not None else sr // 2 - fmax_aug_range // 2
        self.register_buffer("window", torch.hann_window(win, periodic=False), persistent=False)
        self.register_buffer("preemphasis", torch.tensor([[[-0.97, 1.0]]]), persistent=False)
        self.register_buffer("mel", torch.from_numpy(kaldi_mel_banks(n_mels, n_fft, sr, fmin, fmax)).float(),
                             persistent=False)

    def forward(self, x: Tensor) -> Tensor:                            # [B, N] -> [B, 1, n_mels, frames]
        x = F.conv1d(x[:, None], self.preemphasis)[:, 0]
        spec = torch.stft(x, self.n_fft, self.hop, self.win, window=self.window, center=True, return_complex=True)
        power = spec.real ** 2 + spec.imag ** 2
        mel = torch.log(self.mel @ power + 1e-5)
        return ((mel + 4.5) / 5.0)[:, None]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PasstNet(nn.Module):
    """The network of passt_s_swa_p16_128_ap476 (timm parameter names)."""

    def __init__(self, depth: int = 12, dim: int = 768, heads: int = 12, n_mels: int = 128, frames: int = 998,
                 patch: int = 16, stride: int = 10, classes: int = 527):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(1, dim, patch, stride)
        fp, tp = (n_mels - patch) // stride + 1, (frames - patch) // stride + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.new_pos_embed = nn.Parameter(torch.zeros(1, 2, dim))
        self.freq_new_pos_embed = nn.Parameter(torch.zeros(1, dim, fp, 1))
        self.time_new_pos_embed = nn.Parameter(torch.zeros(1, dim, 1, tp))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, classes))
        self.head_dist = nn.Linear(dim, classes)
        for p in (self.cls_token, self.dist_token, self.new_pos_embed, self.freq_new_pos_embed,
                  self.time_new_pos_embed):
            nn.init.trunc_normal_(p, std=0.02)

    def forward(self, mel: Tensor) -> tuple[Tensor, Tensor]:          # [B, 1, 128, T] -> ([B, 768], [B, 527])
        x = self.patch_embed.proj(mel)                                  # [B, D, F', T']
        t = x.shape[-1]
        if t > self.time_new_pos_embed.shape[-1]:
            raise ValueError(f"PaSST: {t} time patches, the model has positions for "
                             f"{self.time_new_pos_embed.shape[-1]} (10 s)")
        x = x + self.time_new_pos_embed[..., :t] + self.freq_new_pos_embed
        x = x.flatten(2).transpose(1, 2)
        B = x.shape[0]
        cls = (self.cls_token + self.new_pos_embed[:, :1]).expand(B, -1, -1)
        dist = (self.dist_token + self.new_pos_embed[:, 1:]).expand(B, -1, -1)
        x = torch.cat([cls, dist, x], 1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        c, d = x[:, 0], x[:, 1]
        return (c + d) / 2, (self.head(c) + self.head_dist(d)) / 2


class PaSST(AudioEmbedder):
    name = "PaSST"
    sample_rate = SAMPLE_RATE
    has_logits = True

    def __init__(self, net: PasstNet, checkpoint: Optional[str] = None):
        self.net = net.eval()
        self.mel = PasstMel()
        self.checkpoint = checkpoint
        self.dtype = torch.float32

    @classmethod
    def from_checkpoint(cls, path: str) -> "PaSST":
        sd = load_torch_checkpoint(path, "PaSST")
        if any(k.startswith("net.") for k in sd):                      # hear21passt's PasstBasicWrapper
            sd = {k[4:]: v for k, v in sd.items() if k.startswith("net.")}
        depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
        if depth == 0 or "time_new_pos_embed" not in sd:
            raise ValueError(f"{path}: not a PaSST checkpoint (no blocks.* / time_new_pos_embed)")
        dim = sd["cls_token"].shape[-1]
        frames = (sd["time_new_pos_embed"].shape[-1] - 1) * 10 + 16
        net = PasstNet(depth=depth, dim=dim, heads=max(1, dim // 64), frames=frames,
                       classes=sd["head_dist.weight"].shape[0])
        load_strict(net, sd, path, "PaSST")
        emb = cls(net, path)
        emb.sha256 = sha256_file(path)
        return emb

    def to(self, device, dtype: Optional[torch.dtype] = None) -> "PaSST":
        self.net.to(device)
        self.mel.to(device)
        self.dtype = dtype or torch.float32
        return self

    @torch.no_grad()
    def embed(self, audio: Tensor) -> AudioFeatures:
        dev = next(self.net.parameters()).device
        x = audio.to(dev, torch.float32)[:, :CLIP_SAMPLES]
        if x.shape[1] < CLIP_SAMPLES:
            x = F.pad(x, (0, CLIP_SAMPLES - x.shape[1]))
        mel = self.mel(x)
        with torch.autocast(dev.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            emb, logits = self.net(mel)
        return AudioFeatures(embedding=emb.float().cpu().double(), logits=logits.float().cpu().double())
