"""ImageBind (Girdhar et al. 2023) audio and video towers, loading the released `imagebind_huge.pth`.

Our port of the two towers the IB score needs, with the release's parameter names, so the released state
dict (a plain `torch.save(model.state_dict())` of every modality) loads with its audio and vision tensors
as they are. `imagebind-packaged` is not used: `imagebind_huge(pretrained=True)` downloads the weights, its
data loading needs torchaudio, torchvision and pytorchvideo at versions pinned to torch 1.x/2.0-era builds,
and the towers are small to write out:

  vision: frames -> PadIm2Video (repeat to 2 frames) -> Conv3d (2, 14, 14) patches (no bias) -> [CLS] +
          learned space-time position embedding -> LayerNorm -> 32 pre-norm blocks (nn.MultiheadAttention,
          GELU MLP x4, LayerNorm eps 1e-6) -> LayerNorm -> CLS -> Linear (no bias) -> L2 normalise;
  audio:  16 kHz -> Kaldi fbank (128 mel, 25 ms / 10 ms, Hann, htk-compatible) of 2 s clips, 204 frames,
          (x + 4.268) / 9.138 -> Conv2d 16x16 stride 10 (no bias) + LayerNorm -> [CLS] + position embedding
          -> 12 blocks (attention with learned bias_k / bias_v) -> LayerNorm -> CLS -> Linear -> L2 normalise.

Inputs follow ImageBind's own data code: audio as 3 clips of 2 s spread evenly over the clip, video as 5
clips of 2 s spread evenly, each 2 frames (the first and last of its window), short side resized to 224
(bilinear), CLIP mean/std, 3 spatial crops (left/centre/right); the embeddings of a clip's crops and windows
are averaged (as the release does for [B, S, ...] inputs) and normalised again. Batched; bf16 on CUDA;
under torch.inference_mode().
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import load_torch_checkpoint, sha256_file

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
AUDIO_MEAN, AUDIO_STD = -4.268, 9.138


@dataclass
class ImageBindConfig:
    """imagebind_huge's audio and vision towers (the defaults)."""
    vision_embed_dim: int = 1280
    vision_num_blocks: int = 32
    vision_num_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    video_frames: int = 2
    audio_embed_dim: int = 768
    audio_num_blocks: int = 12
    audio_num_heads: int = 12
    audio_num_mel_bins: int = 128
    audio_target_len: int = 204
    audio_kernel: int = 16
    audio_stride: int = 10
    out_embed_dim: int = 1024


class _Mlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    """ImageBind's BlockWithMasking at inference: pre-norm attention and MLP, no layer scale."""

    def __init__(self, dim: int, heads: int, add_bias_kv: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, bias=True, add_bias_kv=add_bias_kv, batch_first=True)
        self.norm_1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim)
        self.norm_2 = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:                     # [B, L, D]
        h = self.norm_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm_2(x))


class _Trunk(nn.Module):
    def __init__(self, dim: int, blocks: int, heads: int, pre_ln: bool, add_bias_kv: bool):
        super().__init__()
        self.pre_transformer_layer = nn.Sequential(nn.LayerNorm(dim, eps=1e-6) if pre_ln else nn.Identity())
        self.blocks = nn.ModuleList([_Block(dim, heads, add_bias_kv) for _ in range(blocks)])

    def forward(self, x: Tensor) -> Tensor:
        x = self.pre_transformer_layer(x)
        for b in self.blocks:
            x = b(x)
        return x


class _Stem(nn.Module):
    def __init__(self, proj: list, norm: Optional[nn.Module] = None):
        super().__init__()
        self.proj = nn.Sequential(*proj)
        if norm is not None:
            self.norm_layer = norm

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)             # [B, patches, D]
        return self.norm_layer(x) if hasattr(self, "norm_layer") else x


class _PosEmbed(nn.Module):
    def __init__(self, n: int, dim: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, n, dim))


class _Preprocessor(nn.Module):
    def __init__(self, stem: _Stem, n_patches: int, dim: int):
        super().__init__()
        self.rgbt_stem = stem
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding_helper = _PosEmbed(n_patches + 1, dim)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.rgbt_stem(x)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        return tokens + self.pos_embedding_helper.pos_embed


class _RepeatTo2Frames(nn.Module):
    """PadIm2Video(pad_type="repeat", ntimes=2): an image [B, 3, H, W] becomes a 2-frame clip."""

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :, None].repeat(1, 1, 2, 1, 1) if x.ndim == 4 else x


class _Head(nn.Sequential):
    def __init__(self, dim: int, out: int):
        super().__init__(nn.LayerNorm(dim, eps=1e-6), nn.Identity(), nn.Linear(dim, out, bias=False))

    def forward(self, x: Tensor) -> Tensor:                       # SelectElement(index=0): the CLS token
        return self[2](self[0](x)[:, 0])


class _Scale(nn.Module):
    """LearnableLogitScaling(logit_scale_init=20, learnable=False): a buffer in the release."""

    def __init__(self):
        super().__init__()
        self.register_buffer("log_logit_scale", torch.tensor([math.log(20.0)]))


class ImageBindTowers(nn.Module):
    """The audio and vision towers, under the release's module names (modality_*.{audio,vision})."""

    def __init__(self, c: ImageBindConfig):
        super().__init__()
        self.config = c
        vk = (c.video_frames, c.patch_size, c.patch_size)
        n_vis = (c.image_size // c.patch_size) ** 2
        n_aud = ((c.audio_num_mel_bins - c.audio_kernel) // c.audio_stride + 1) * \
                ((c.audio_target_len - c.audio_kernel) // c.audio_stride + 1)
        self.modality_preprocessors = nn.ModuleDict({
            "vision": _Preprocessor(_Stem([_RepeatTo2Frames(), nn.Conv3d(3, c.vision_embed_dim, vk, vk, bias=False)]),
                                    n_vis, c.vision_embed_dim),
            "audio": _Preprocessor(_Stem([nn.Conv2d(1, c.audio_embed_dim, c.audio_kernel, c.audio_stride, bias=False)],
                                         nn.LayerNorm(c.audio_embed_dim)), n_aud, c.audio_embed_dim)})
        self.modality_trunks = nn.ModuleDict({
            "vision": _Trunk(c.vision_embed_dim, c.vision_num_blocks, c.vision_num_heads, True, False),
            "audio": _Trunk(c.audio_embed_dim, c.audio_num_blocks, c.audio_num_heads, False, True)})
        self.modality_heads = nn.ModuleDict({"vision": _Head(c.vision_embed_dim, c.out_embed_dim),
                                             "audio": _Head(c.audio_embed_dim, c.out_embed_dim)})
        self.modality_postprocessors = nn.ModuleDict({"audio": nn.Sequential(nn.Identity(), _Scale())})

    def encode(self, modality: str, x: Tensor) -> Tensor:
        """x: vision [N, 3, 2, 224, 224] or audio [N, 1, 128, 204] -> [N, out] unit vectors."""
        t = self.modality_trunks[modality](self.modality_preprocessors[modality](x))
        return F.normalize(self.modality_heads[modality](t), dim=-1)


def config_from_state_dict(sd: dict) -> ImageBindConfig:
    """The towers' sizes read from the release's tensors (imagebind_huge gives the defaults)."""
    def count(prefix):
        return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})
    v = sd["modality_preprocessors.vision.rgbt_stem.proj.1.weight"]         # [D, 3, T, p, p]
    a = sd["modality_preprocessors.audio.rgbt_stem.proj.0.weight"]          # [D, 1, k, k]
    n_vis = sd["modality_preprocessors.vision.pos_embedding_helper.pos_embed"].shape[1] - 1
    c = ImageBindConfig(vision_embed_dim=v.shape[0], vision_num_blocks=count("modality_trunks.vision.blocks."),
                        patch_size=v.shape[-1], video_frames=v.shape[2],
                        image_size=int(round(math.sqrt(n_vis))) * v.shape[-1],
                        audio_embed_dim=a.shape[0], audio_num_blocks=count("modality_trunks.audio.blocks."),
                        audio_kernel=a.shape[-1], out_embed_dim=sd["modality_heads.vision.2.weight"].shape[0])
    c.vision_num_heads = max(1, c.vision_embed_dim // 80)       # ViT-H: 1280 / 16
    c.audio_num_heads = max(1, c.audio_embed_dim // 64)         # 768 / 12
    return c


# ------------------------------------------------------------------------------------------------ audio front end
def _kaldi_mel_banks(n_mels: int, n_fft: int, sr: float, low: float = 20.0, high: float = 0.0) -> np.ndarray:
    """Kaldi's triangular mel filters (in the mel domain, mel = 1127 ln(1 + f / 700)) -> [n_mels, n_fft // 2 + 1]."""
    nyq = sr / 2
    high = high if high > 0 else nyq + high
    mel = lambda f: 1127.0 * np.log(1.0 + np.asarray(f, np.float64) / 700.0)
    lo, hi = mel(low), mel(high)
    delta = (hi - lo) / (n_mels + 1)
    left = lo + delta * np.arange(n_mels)[:, None]
    center, right = left + delta, left + 2 * delta
    m = mel(sr / n_fft * np.arange(n_fft // 2))[None]                        # [1, n_fft/2]
    up, down = (m - left) / (center - left), (right - m) / (right - center)
    banks = np.maximum(0.0, np.minimum(up, down))
    return np.pad(banks, ((0, 0), (0, 1)))                                    # the Nyquist bin gets no weight


def kaldi_fbank(wave: Tensor, sr: int = 16000, n_mels: int = 128) -> Tensor:
    """torchaudio.compliance.kaldi.fbank with ImageBind's arguments (htk_compat, no energy, Hann window, no
    dither, 25 ms frames every 10 ms, snip_edges, DC removal, pre-emphasis 0.97, 512-point FFT, power,
    20 Hz - Nyquist, log floored at float32 eps): wave [N] -> [frames, n_mels]."""
    x = wave.double()
    flen, shift = int(sr * 0.025), int(sr * 0.010)
    if len(x) < flen:
        return torch.zeros(0, n_mels)
    n = 1 + (len(x) - flen) // shift
    frames = x.as_strided((n, flen), (shift, 1)).clone()
    frames = frames - frames.mean(dim=1, keepdim=True)
    prev = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - 0.97 * prev
    n_fft = 1 << (flen - 1).bit_length()
    frames = frames * torch.hann_window(flen, periodic=False, dtype=torch.float64)
    power = torch.fft.rfft(F.pad(frames, (0, n_fft - flen)), dim=1).abs() ** 2       # [n, n_fft/2 + 1]
    banks = torch.from_numpy(_kaldi_mel_banks(n_mels, n_fft, sr))
    mel = power @ banks.T
    return torch.log(torch.clamp(mel, min=float(torch.finfo(torch.float32).eps))).float()


def audio_clips(wave: np.ndarray, sr: int = 16000, clip_s: float = 2.0, n_clips: int = 3) -> list:
    """ConstantClipsPerVideoSampler(2 s, 3 clips): windows starting at i * (duration - 2) / (n - 1)."""
    dur = len(wave) / sr
    span = max(dur - clip_s, 0.0)
    starts = [span * i / (n_clips - 1) for i in range(n_clips)] if n_clips > 1 else [0.0]
    return [wave[int(round(s * sr)): int(round(s * sr)) + int(clip_s * sr)] for s in starts]


def audio_input(wave: np.ndarray, cfg: ImageBindConfig, sr: int = 16000) -> Tensor:
    """One clip's audio [N] at 16 kHz -> [3, 1, 128, 204] normalised fbanks."""
    out = []
    for w in audio_clips(np.asarray(wave, np.float32), sr):
        w = torch.from_numpy(np.ascontiguousarray(w)).double()
        fb = kaldi_fbank(w - w.mean(), sr, cfg.audio_num_mel_bins).T          # [mels, frames]
        t = fb.shape[1]
        fb = F.pad(fb, (0, cfg.audio_target_len - t)) if t < cfg.audio_target_len else fb[:, :cfg.audio_target_len]
        out.append(((fb - AUDIO_MEAN) / AUDIO_STD)[None])
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------ video front end
def video_input(frames: np.ndarray, fps: float, cfg: ImageBindConfig, clip_s: float = 2.0, n_clips: int = 5) -> Tensor:
    """One clip's frames [T, H, W, 3] uint8 at fps -> [n_clips * 3, 3, 2, 224, 224] (5 windows x 3 crops)."""
    T = len(frames)
    dur = T / fps
    span = max(dur - clip_s, 0.0)
    size = cfg.image_size
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1, 1)
    out = []
    for i in range(n_clips):
        s = span * i / (n_clips - 1)
        idx = [j for j in range(T) if s - 1e-9 <= j / fps < s + clip_s - 1e-9] or [min(int(s * fps), T - 1)]
        pick = [idx[int(round(k))] for k in np.linspace(0, len(idx) - 1, cfg.video_frames)]
        x = torch.from_numpy(np.ascontiguousarray(frames[pick])).permute(3, 0, 1, 2).float() / 255.0   # [3, t, H, W]
        h, w = x.shape[-2:]
        nh, nw = (int(math.floor(h / w * size)), size) if w < h else (size, int(math.floor(w / h * size)))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)    # ShortSideScale(224)
        x = (x - mean) / std
        for k in range(3):      # SpatialCrop(224, 3): left/top, centre (offset rounded up), right/bottom
            if nh > nw:
                off = [0, int(math.ceil((nh - size) / 2)), nh - size][k]
                out.append(x[..., off:off + size, :size])
            else:
                off = [0, int(math.ceil((nw - size) / 2)), nw - size][k]
                out.append(x[..., :size, off:off + size])
    return torch.stack(out)


class ImageBind:
    name = "ImageBind"
    sample_rate = 16000

    def __init__(self, towers: ImageBindTowers, checkpoint: Optional[str] = None, device: Optional[str] = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = towers.to(self.device, self.dtype).eval()
        self.config = towers.config
        self.checkpoint = checkpoint
        self.sha256 = sha256_file(checkpoint) if checkpoint and os.path.isfile(checkpoint) else None

    @classmethod
    def from_checkpoint(cls, path: str, device: Optional[str] = None,
                        config: Optional[ImageBindConfig] = None) -> "ImageBind":
        """The released `imagebind_huge.pth` (or any state dict with the release's names): only the audio and
        vision tensors are read; the other modalities' are left out."""
        sd = load_torch_checkpoint(path, "ImageBind")
        keep = {k: v for k, v in sd.items() if k.split(".")[1:2] in (["audio"], ["vision"])}
        if "modality_preprocessors.vision.rgbt_stem.proj.1.weight" not in keep:
            raise ValueError(f"{path}: not an ImageBind checkpoint (no modality_preprocessors.vision.rgbt_stem.proj.1"
                             f".weight)")
        cfg = config or config_from_state_dict(keep)
        towers = ImageBindTowers(cfg)
        keep.pop("modality_postprocessors.audio.1.log_logit_scale", None)
        missing, unexpected = towers.load_state_dict(keep, strict=False)
        missing = [k for k in missing if not k.endswith("log_logit_scale")]
        if missing or unexpected:
            raise ValueError(f"{path}: ImageBind tensors do not match the towers {asdict(cfg)}: missing "
                             f"{missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
        return cls(towers, path, device)

    def to(self, device, dtype=None) -> "ImageBind":
        self.device = torch.device(device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.model.to(self.device, self.dtype)
        return self

    @torch.inference_mode()
    def embed_audio(self, audio: Tensor) -> Tensor:
        """audio [B, N] mono at 16 kHz -> [B, D] unit vectors (fp32, CPU): the mean over 3 windows of 2 s."""
        a = torch.as_tensor(audio, dtype=torch.float32).reshape(len(audio), -1).cpu().numpy()
        x = torch.stack([audio_input(w, self.config) for w in a])             # [B, 3, 1, 128, 204]
        b, s = x.shape[:2]
        e = self.model.encode("audio", x.flatten(0, 1).to(self.device, self.dtype)).float()
        return F.normalize(e.view(b, s, -1).mean(1), dim=-1).cpu()

    @torch.inference_mode()
    def embed_video(self, frames, fps: float) -> Tensor:
        """frames uint8 [B, T, H, W, 3] at fps -> [B, D] unit vectors (fp32, CPU): the mean over 5 windows x 3
        crops."""
        f = frames.cpu().numpy() if isinstance(frames, Tensor) else np.asarray(frames)
        x = torch.stack([video_input(v, fps, self.config) for v in f])        # [B, 15, 3, 2, 224, 224]
        b, s = x.shape[:2]
        e = self.model.encode("vision", x.flatten(0, 1).to(self.device, self.dtype)).float()
        return F.normalize(e.view(b, s, -1).mean(1), dim=-1).cpu()
