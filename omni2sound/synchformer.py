"""Synchformer (Iashin, Xie, Rahtu, Zisserman, ICASSP 2024): audio-visual synchronisation features and the
offset classifier, in the layout of the released weights.

Pieces (full-size numbers; ``SynchformerConfig`` holds them):

    segment_video(frames, fps)      video at any rate -> 25 fps, 224 px centre crop, mean = std = 0.5,
                                    16-frame segments with stride 8 (0.64 s windows every 0.32 s)
                                    -> [S, 3, 16, 224, 224],  S = (T25 - 16) // 8 + 1
    MotionFormer                    ViT-B/16 with divided space-time attention over one segment: tubelets of
                                    2 x 16 x 16 (8 x 14 x 14 tokens + CLS), 12 blocks of time attention, space
                                    attention and MLP (768-d, 12 heads), a final LayerNorm, then per frame a
                                    transformer layer with a CLS query pools the 14 x 14 patches
                                    -> [B, S, 8, 768]: 8 tokens per 0.64 s segment, 24 per second at stride 8
    SyncFeatureExtractor            MotionFormer loaded from a released state dict; ``features(frames, fps)``
                                    -> [S * 8, 768], the conditioning MMAudio and Omni2Sound train on
    segment_audio(audio, sr)        16 kHz mono, 10,240-sample segments (0.64 s) with stride 5,120; per segment
                                    a power mel spectrogram (n_fft 1024, Hann window 400, hop 160, 128 HTK mels,
                                    centred with reflect padding) -> log(x + 1e-6) -> 65 frames padded with 0 to
                                    66 -> (x + 4.2677393) / (2 * 4.5689974)  -> [S, 128, 66]
    ASTSegmentEncoder               the audio branch: an AST (ViT-B on 16 x 16 spectrogram patches at stride 10:
                                    12 x 6 patches + CLS + distillation token, 12 blocks, LayerNorm eps 1e-12),
                                    then per time step a transformer layer with a CLS query pools the 12 frequency
                                    patches -> [B, S, 6, 768]
    Synchformer                     both branches, linear projections, the synchronisation transformer (3 GPT
                                    blocks, 8 heads, over [OFF, 14 x 8 video tokens, MOD, 14 x 6 audio tokens]
                                    with a learned position embedding of 198) and the offset head: logits over
                                    21 offsets, linspace(-2, 2, 21) seconds, for a 4.8 s window (14 segments).
                                    ``predict_offset`` and ``desync`` (av-benchmark's DeSync) run on raw media.

Offset sign (the training convention): a positive offset means the audio runs ahead of the video, i.e. the sound
heard with the frame at time t is the one recorded at t + offset.

Attention: every attention of the three transformers runs through ``omni2sound.ops.attention`` ([B, T, H, Dh]
layout): SDPA (FlashAttention / cuDNN) on a GPU, the package's C++ kernel on the CPU without gradients, SDPA
with them. The two pooling layers only need their CLS output, so they compute attention for that one query.

Weights: nothing is downloaded. ``SyncFeatureExtractor.from_state_dict`` and ``Synchformer.from_checkpoint``
read a local file with ``torch.load(weights_only=True)`` (or a ``.safetensors`` file), so no pickled code runs;
the loaded keys must match the model exactly (strict), otherwise the error lists the missing and the unexpected
keys and names the file. See ``Synchformer.from_checkpoint`` for the key layout.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .ops import attention

PathLike = Union[str, os.PathLike]
ArrayLike = Union[np.ndarray, Tensor]

# Key prefixes of the released audio-visual state dict (``synchformer_state_dict.pth``, MMAudio / av-benchmark).
VISUAL_PREFIX = "vfeat_extractor."
NON_VISUAL_PREFIXES = ("afeat_extractor.", "vproj.", "aproj.", "transformer.")


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class SynchformerConfig:
    """Sizes of the released Synchformer (the AudioSet-trained sync model MMAudio and av-benchmark load).

    Media front-ends (shared by every size, since they fix the feature rate): video at ``fps`` (25),
    ``segment_frames`` (16) per segment every ``segment_stride`` (8) frames; audio at ``sample_rate`` (16 kHz),
    the same 0.64 s windows every 0.32 s.
    """
    # media
    fps: float = 25.0
    segment_frames: int = 16
    segment_stride: int = 8
    image_size: int = 224
    pixel_mean: float = 0.5
    pixel_std: float = 0.5
    sample_rate: int = 16000
    n_fft: int = 1024
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 128
    spec_frames: int = 66
    spec_mean: float = -4.2677393
    spec_std: float = 4.5689974
    # visual branch (MotionFormer, ViT-B/16, divided space-time attention)
    patch_size: int = 16
    tubelet: int = 2
    vis_dim: int = 768
    vis_depth: int = 12
    vis_heads: int = 12
    vis_mlp_ratio: int = 4
    # audio branch (AST)
    audio_patch: int = 16
    audio_patch_stride: int = 10
    aud_dim: int = 768
    aud_depth: int = 12
    aud_heads: int = 12
    aud_mlp_dim: int = 3072
    # synchronisation transformer and offset head
    sync_dim: int = 768
    sync_depth: int = 3
    sync_heads: int = 8
    sync_segments: int = 14
    num_offsets: int = 21
    max_offset: float = 2.0

    @classmethod
    def tiny(cls) -> "SynchformerConfig":
        """Small widths and depths for tests; the media front-ends (and so every count and rate) are the
        released ones except the picture size (32 px) and the mel bands (32)."""
        return cls(image_size=32, vis_dim=32, vis_depth=1, vis_heads=2, vis_mlp_ratio=2, n_mels=32,
                   aud_dim=32, aud_depth=1, aud_heads=2, aud_mlp_dim=64, sync_dim=32, sync_depth=1, sync_heads=2)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SynchformerConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"SynchformerConfig: unknown fields {unknown}")
        return cls(**d)

    # derived sizes ---------------------------------------------------------------------------------------------
    @property
    def tokens_per_segment(self) -> int:
        """Visual tokens per segment after temporal pooling: frames / tubelet (8)."""
        return self.segment_frames // self.tubelet

    @property
    def grid(self) -> int:
        """Patches per side of a frame (14)."""
        return self.image_size // self.patch_size

    @property
    def token_rate(self) -> float:
        """Visual tokens per second of the segment grid: tokens_per_segment * fps / segment_stride (25: 8 tokens per
        0.32 s step). A clip of d seconds gives 8 * ((25 d - 16) // 8 + 1) tokens, one segment's worth fewer than
        25 d: 192 for 8 s and 240 for 10 s, the "24 per second" of MMAudio and Omni2Sound."""
        return self.tokens_per_segment * self.fps / self.segment_stride

    @property
    def audio_segment_samples(self) -> int:
        """Samples of one 0.64 s audio segment (10,240)."""
        return int(round(self.segment_frames / self.fps * self.sample_rate))

    @property
    def audio_segment_stride(self) -> int:
        """Samples between audio segments (5,120)."""
        return int(round(self.segment_stride / self.fps * self.sample_rate))

    @property
    def freq_patches(self) -> int:
        return (self.n_mels - self.audio_patch) // self.audio_patch_stride + 1

    @property
    def time_patches(self) -> int:
        """Audio tokens per segment after frequency pooling (6)."""
        return (self.spec_frames - self.audio_patch) // self.audio_patch_stride + 1

    @property
    def sync_tokens(self) -> int:
        """Length of the synchronisation transformer's sequence: OFF + video + MOD + audio tokens (198)."""
        return 2 + self.sync_segments * (self.tokens_per_segment + self.time_patches)

    @property
    def window_seconds(self) -> float:
        """Seconds covered by the offset classifier's ``sync_segments`` segments (4.8)."""
        return ((self.sync_segments - 1) * self.segment_stride + self.segment_frames) / self.fps

    def offset_grid(self) -> Tensor:
        """The classes' offsets in seconds: linspace(-max_offset, max_offset, num_offsets), float32 [21]."""
        return torch.from_numpy(np.linspace(-self.max_offset, self.max_offset, self.num_offsets)).float()


def num_segments(frames_25fps: int, cfg: Optional[SynchformerConfig] = None) -> int:
    """Segments of a clip with ``frames_25fps`` frames at the model's rate: (T - 16) // 8 + 1, 0 when shorter
    than one segment."""
    cfg = cfg or SynchformerConfig()
    if frames_25fps < cfg.segment_frames:
        return 0
    return (frames_25fps - cfg.segment_frames) // cfg.segment_stride + 1


# ----------------------------------------------------------------------------------------------------------------
# Video front-end
# ----------------------------------------------------------------------------------------------------------------
def resample_indices(num_frames: int, fps: float, target_fps: float = 25.0) -> Tensor:
    """Source frame of each output frame when video at ``fps`` is shown at ``target_fps``: output frame n (time
    n / target_fps) takes the source frame nearest in time, round(n * fps / target_fps), as ffmpeg's ``fps``
    filter (the decoder MMAudio and av-benchmark read through) does. Output frames are those whose whole display
    interval lies inside the clip: floor(num_frames * target_fps / fps). int64 [T_out]."""
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"resample_indices: fps must be a positive number, got {fps}")
    n_out = int(math.floor(num_frames * target_fps / fps + 1e-6))
    if n_out <= 0:
        return torch.zeros(0, dtype=torch.long)
    src = torch.floor(torch.arange(n_out, dtype=torch.float64) * (fps / target_fps) + 0.5).long()
    return src.clamp_(max=num_frames - 1)


def _as_frames(frames: ArrayLike, where: str) -> Tuple[Tensor, bool]:
    """uint8 [T, H, W, 3] (numpy or torch) or float [T, 3, H, W] in [0, 1] -> (tensor, is_uint8_hwc)."""
    t = frames if isinstance(frames, Tensor) else torch.as_tensor(np.asarray(frames))
    if t.dim() == 4 and t.dtype == torch.uint8 and t.shape[-1] == 3:
        return t, True
    if t.dim() == 4 and t.is_floating_point() and t.shape[1] == 3:
        return t, False
    raise ValueError(f"{where}: frames must be uint8 [T, H, W, 3] or float [T, 3, H, W] in [0, 1], "
                     f"got {t.dtype} {tuple(t.shape)}")


def preprocess_frames(frames: ArrayLike, cfg: Optional[SynchformerConfig] = None, device=None,
                      chunk: int = 32) -> Tensor:
    """Frames (already at the model's rate) -> the network's input pictures, float32 [T, 3, S, S] (S = 224):
    the short side resized to S (bicubic with antialiasing, long side int(S * long / short)), centre crop S x S
    (offsets rounded as torchvision's ``CenterCrop``), uint8 input rounded back to 8 bits as torchvision's
    ``Resize`` on uint8 tensors does, then x / 255, (x - 0.5) / 0.5. Works in chunks of ``chunk`` frames so a
    1080p clip never sits in memory as floats."""
    cfg = cfg or SynchformerConfig()
    x, is_u8 = _as_frames(frames, "preprocess_frames")
    T = x.shape[0]
    H, W = (x.shape[1], x.shape[2]) if is_u8 else (x.shape[2], x.shape[3])
    S = cfg.image_size
    if H < 1 or W < 1:
        raise ValueError(f"preprocess_frames: empty pictures {H} x {W}")
    short, long = (H, W) if H <= W else (W, H)
    new_long = int(S * long / short)
    new_h, new_w = (S, new_long) if H <= W else (new_long, S)
    top, left = int(round((new_h - S) / 2.0)), int(round((new_w - S) / 2.0))
    device = torch.device(device) if device is not None else x.device
    out = torch.empty((T, 3, S, S), dtype=torch.float32, device=device)
    for i in range(0, T, chunk):
        c = x[i:i + chunk].to(device)
        c = c.permute(0, 3, 1, 2).float() if is_u8 else c.float()
        if (new_h, new_w) != (H, W):
            c = F.interpolate(c, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        if is_u8:
            c = c.round_().clamp_(0, 255).div_(255.0)
        c = c[:, :, top:top + S, left:left + S]
        out[i:i + chunk] = (c - cfg.pixel_mean) / cfg.pixel_std
    return out


def segment_video(frames: ArrayLike, fps: float, cfg: Optional[SynchformerConfig] = None,
                  device=None) -> Tensor:
    """A clip at any frame rate -> the model's segments, float32 [S, 3, 16, 224, 224].

    frames: uint8 [T, H, W, 3] (numpy or torch, as decoders give) or float [T, 3, H, W] in [0, 1].
    1. resampled to 25 fps (``resample_indices``: 29.97, 30, 50, 60 fps ... -> 25; nearest frame in time);
    2. ``preprocess_frames``: short side to 224, centre crop, mean = std = 0.5;
    3. 16-frame segments every 8 frames: S = (T25 - 16) // 8 + 1 (MMAudio's segmentation); frames after the last
       full segment are not used. The result is a strided view of the T25 pictures (no copy).

    Counts (the same at 25, 29.97 and 60 fps): 1 s -> 25 frames -> 2 segments -> 16 features; 4.8 s -> 120 -> 14
    -> 112; 8 s -> 200 -> 24 -> 192; 10 s -> 250 -> 30 -> 240 (x 768 with the released model).
    A clip shorter than one segment (0.64 s) is an error."""
    cfg = cfg or SynchformerConfig()
    x, is_u8 = _as_frames(frames, "segment_video")
    idx = resample_indices(x.shape[0], fps, cfg.fps)
    if idx.numel() < cfg.segment_frames:
        raise ValueError(f"segment_video: {x.shape[0]} frames at {fps} fps are {idx.numel()} frames at "
                         f"{cfg.fps:g} fps, fewer than one segment ({cfg.segment_frames} frames, "
                         f"{cfg.segment_frames / cfg.fps:.2f} s)")
    pics = preprocess_frames(x.index_select(0, idx.to(x.device)), cfg, device=device)   # [T25, 3, S, S]
    s = num_segments(pics.shape[0], cfg)
    pics = pics[:(s - 1) * cfg.segment_stride + cfg.segment_frames]
    # unfold: [S, 3, S, S, 16] -> [S, 3, 16, S, S]
    return pics.unfold(0, cfg.segment_frames, cfg.segment_stride).permute(0, 1, 4, 2, 3)


# ----------------------------------------------------------------------------------------------------------------
# Audio front-end
# ----------------------------------------------------------------------------------------------------------------
def mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int, f_min: float = 0.0,
                   f_max: Optional[float] = None) -> Tensor:
    """Triangular filters on the HTK mel scale (mel = 2595 log10(1 + f / 700)), unnormalised, over the
    ``n_freqs`` bins of a one-sided spectrum: float32 [n_freqs, n_mels] (torchaudio's ``melscale_fbanks`` with
    its defaults, the filterbank Synchformer was trained with)."""
    f_max = sample_rate / 2 if f_max is None else f_max
    freqs = torch.linspace(0, sample_rate // 2, n_freqs, dtype=torch.float64)
    to_mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)
    m = torch.linspace(to_mel(f_min), to_mel(f_max), n_mels + 2, dtype=torch.float64)
    f_pts = 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts.unsqueeze(0) - freqs.unsqueeze(1)             # [n_freqs, n_mels + 2]
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return torch.clamp(torch.minimum(down, up), min=0.0).float()


def log_mel(audio: Tensor, cfg: Optional[SynchformerConfig] = None) -> Tensor:
    """Power mel spectrogram of 16 kHz audio [..., N] -> log(mel + 1e-6), float32 [..., n_mels, 1 + N // hop]
    (centred frames, reflect padding, periodic Hann window of ``win_length`` inside ``n_fft``)."""
    cfg = cfg or SynchformerConfig()
    lead = audio.shape[:-1]
    x = audio.reshape(-1, audio.shape[-1]).float()
    window = torch.hann_window(cfg.win_length, periodic=True, device=x.device)
    spec = torch.stft(x, cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length, window=window,
                      center=True, pad_mode="reflect", normalized=False, onesided=True, return_complex=True)
    power = spec.real.square() + spec.imag.square()                 # [B, n_freqs, frames]
    fb = mel_filterbank(cfg.n_fft // 2 + 1, cfg.n_mels, cfg.sample_rate).to(x.device)
    mel = torch.matmul(power.transpose(1, 2), fb).transpose(1, 2)   # [B, n_mels, frames]
    return torch.log(mel + 1e-6).reshape(*lead, cfg.n_mels, mel.shape[-1])


def _as_mono(audio: ArrayLike, where: str) -> Tensor:
    a = audio if isinstance(audio, Tensor) else torch.as_tensor(np.asarray(audio))
    if not a.is_floating_point():
        raise ValueError(f"{where}: audio must be floating point samples, got {a.dtype}")
    if a.dim() == 2:
        if a.shape[0] > a.shape[1]:
            raise ValueError(f"{where}: audio must be [N] or [channels, N], got {tuple(a.shape)} "
                             "(pass soundfile's [N, channels] transposed)")
        a = a.mean(dim=0)       # av-benchmark downmixes by the mean of the channels
    elif a.dim() != 1:
        raise ValueError(f"{where}: audio must be [N] or [channels, N], got {tuple(a.shape)}")
    return a.float()


def resample_audio(audio: Tensor, sample_rate: int, target: int) -> Tensor:
    """Mono float audio [N] from ``sample_rate`` to ``target`` (soxr, high quality)."""
    if int(sample_rate) == int(target):
        return audio
    import soxr
    y = soxr.resample(audio.detach().cpu().numpy().astype(np.float32), int(sample_rate), int(target), quality="HQ")
    return torch.from_numpy(np.ascontiguousarray(y)).to(audio.device)


def segment_audio(audio: ArrayLike, sample_rate: int, cfg: Optional[SynchformerConfig] = None) -> Tensor:
    """Audio at any rate -> the audio branch's input, float32 [S, n_mels, spec_frames] = [S, 128, 66].

    audio: [N] or [channels, N] (downmixed by the mean), resampled to 16 kHz with soxr; segments of 10,240
    samples every 5,120 (S = (N16 - 10240) // 5120 + 1, the video's count for the same duration); per segment
    ``log_mel`` (65 frames), padded with zeros to 66 frames in the log domain, then (x - mean) / (2 std) with
    AudioSet's mean -4.2677393 and std 4.5689974 (Synchformer's / av-benchmark's front-end)."""
    cfg = cfg or SynchformerConfig()
    a = resample_audio(_as_mono(audio, "segment_audio"), sample_rate, cfg.sample_rate)
    seg, step = cfg.audio_segment_samples, cfg.audio_segment_stride
    if a.shape[0] < seg:
        raise ValueError(f"segment_audio: {a.shape[0]} samples at {cfg.sample_rate} Hz are fewer than one segment "
                         f"({seg} samples, {seg / cfg.sample_rate:.2f} s)")
    s = (a.shape[0] - seg) // step + 1
    x = log_mel(a.unfold(0, seg, step)[:s], cfg)                   # [S, n_mels, 65]
    pad = cfg.spec_frames - x.shape[-1]
    x = F.pad(x, (0, pad)) if pad > 0 else x[..., :cfg.spec_frames]
    return (x - cfg.spec_mean) / (2 * cfg.spec_std)


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------
def _split_heads(x: Tensor, heads: int) -> Tensor:
    """[B, T, H * Dh] -> [B, T, H, Dh] (a view)."""
    return x.unflatten(-1, (heads, x.shape[-1] // heads))


class _PackedSelfAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameters (packed in-projection, ``out_proj``), as the released pooling layers
    store them."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)


class _ClsPooling(nn.Module):
    """A pre-norm transformer encoder layer (GELU MLP, LayerNorm eps 1e-6) run on [CLS, tokens]; only the CLS
    output is kept, so only the CLS query is computed (the other tokens' outputs would be discarded).
    Same parameters and result as ``nn.TransformerEncoderLayer(norm_first=True, activation=GELU)`` on the
    sequence with the CLS token prepended, read at position 0. x [B, N, D] -> [B, D]."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.self_attn = _PackedSelfAttention(dim, heads)
        self.linear1 = nn.Linear(dim, mlp_dim)
        self.linear2 = nn.Linear(mlp_dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        H = self.self_attn.heads
        x = torch.cat((self.cls_token.expand(B, 1, D).to(x.dtype), x), dim=1)       # [B, 1 + N, D]
        h = self.norm1(x)
        w, b = self.self_attn.in_proj_weight, self.self_attn.in_proj_bias
        q = F.linear(h[:, :1], w[:D], b[:D])                                          # [B, 1, D]
        kv = F.linear(h, w[D:], b[D:])                                                # [B, 1 + N, 2D]
        k, v = kv[..., :D], kv[..., D:]
        o = attention(_split_heads(q, H), _split_heads(k, H), _split_heads(v, H))     # [B, 1, H, Dh]
        c = x[:, 0] + self.self_attn.out_proj(o.reshape(B, D))
        return c + self.linear2(F.gelu(self.linear1(self.norm2(c))))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _DividedAttention(nn.Module):
    """Attention along one axis of the [frames, patches] token grid, with a CLS token.

    x [B, 1 + F * N, D] (CLS then frame-major patches). The CLS query attends to every token. Along ``time`` a
    patch token attends to the CLS and to the same patch in every frame; along ``space`` to the CLS and to every
    patch of its own frame. One fused qkv projection ``qkv`` and an output projection ``proj``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, frames: int, axis: str) -> Tensor:
        B, L, D = x.shape
        H, N = self.heads, (L - 1) // frames
        q, k, v = _split_heads(self.qkv(x), 3 * H).chunk(3, dim=2)                  # [B, L, H, Dh] each
        cls_out = attention(q[:, :1], k, v)                                           # [B, 1, H, Dh]

        def grid(t: Tensor) -> Tensor:                                                # [B', n, H, Dh]
            t = t[:, 1:].unflatten(1, (frames, N))                                    # [B, F, N, H, Dh]
            if axis == "time":
                t = t.transpose(1, 2)                                                 # [B, N, F, H, Dh]
            return t.reshape(-1, *t.shape[2:])

        def with_cls(t: Tensor, rows: Tensor) -> Tensor:
            r = rows.shape[0] // B
            c = t[:, :1].unsqueeze(1).expand(B, r, 1, H, t.shape[-1]).reshape(B * r, 1, H, t.shape[-1])
            return torch.cat((c, rows), dim=1)

        qg = grid(q).contiguous()
        kg, vg = with_cls(k, grid(k)), with_cls(v, grid(v))
        o = attention(qg, kg, vg)                                                     # [B', n, H, Dh]
        if axis == "time":
            o = o.unflatten(0, (B, N)).transpose(1, 2)                                # [B, F, N, H, Dh]
        else:
            o = o.unflatten(0, (B, frames))
        o = torch.cat((cls_out, o.reshape(B, frames * N, H, -1)), dim=1)             # [B, L, H, Dh]
        return self.proj(o.reshape(B, L, D))


class _DividedSpaceTimeBlock(nn.Module):
    """x + time attention (norm3), + space attention (norm1), + MLP (norm2); LayerNorm eps 1e-6."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _DividedAttention(dim, heads)
        self.timeattn = _DividedAttention(dim, heads)
        self.mlp = _Mlp(dim, mlp_dim)

    def forward(self, x: Tensor, frames: int) -> Tensor:
        x = x + self.timeattn(self.norm3(x), frames, "time")
        x = x + self.attn(self.norm1(x), frames, "space")
        return x + self.mlp(self.norm2(x))


class _Proj(nn.Module):
    """Holds a patch convolution as ``proj`` (the released key names)."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.proj = conv


def _init_vit(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------------------------
# Visual branch
# ----------------------------------------------------------------------------------------------------------------
class MotionFormer(nn.Module):
    """The visual feature extractor: segments [B, S, 3, 16, 224, 224] (normalised, ``segment_video``) ->
    [B, S, 8, 768].

    Per segment: tubelet embedding (Conv3d 2 x 16 x 16, stride = kernel) -> 8 x 196 tokens, a CLS token, the
    position embedding = spatial ``pos_embed`` (CLS + 196, tiled over frames) + temporal ``temp_embed`` (one per
    frame); 12 divided space-time blocks; LayerNorm (``norm``); the CLS dropped; per frame the 196 patches pooled
    by ``spatial_attn_agg`` (a transformer layer with a CLS query) -> 8 tokens.
    ``patch_embed`` (a 2-D 16 x 16 patch convolution) is part of the released layout but unused: video is
    tokenised by ``patch_embed_3d``. Attention runs through ``omni2sound.ops.attention``."""

    def __init__(self, cfg: Optional[SynchformerConfig] = None):
        super().__init__()
        cfg = cfg or SynchformerConfig()
        self.cfg = cfg
        D, P, g, t = cfg.vis_dim, cfg.patch_size, cfg.grid, cfg.tokens_per_segment
        if cfg.image_size % P or cfg.segment_frames % cfg.tubelet or D % cfg.vis_heads:
            raise ValueError(f"MotionFormer: image_size {cfg.image_size} must divide by patch_size {P}, "
                             f"segment_frames {cfg.segment_frames} by tubelet {cfg.tubelet}, vis_dim {D} by "
                             f"vis_heads {cfg.vis_heads}")
        self.patch_embed = _Proj(nn.Conv2d(3, D, kernel_size=P, stride=P))
        self.patch_embed.requires_grad_(False)
        self.patch_embed_3d = _Proj(nn.Conv3d(3, D, kernel_size=(cfg.tubelet, P, P), stride=(cfg.tubelet, P, P)))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, g * g + 1, D))
        self.temp_embed = nn.Parameter(torch.zeros(1, t, D))
        self.blocks = nn.ModuleList([_DividedSpaceTimeBlock(D, cfg.vis_heads, cfg.vis_mlp_ratio * D)
                                     for _ in range(cfg.vis_depth)])
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.spatial_attn_agg = _ClsPooling(D, cfg.vis_heads, cfg.vis_mlp_ratio * D)
        self.apply(_init_vit)
        for p in (self.cls_token, self.pos_embed, self.temp_embed):
            nn.init.trunc_normal_(p, std=0.02)

    def check_input(self, segments: Tensor) -> None:
        c = self.cfg
        want = (3, c.segment_frames, c.image_size, c.image_size)
        if segments.dim() != 6 or tuple(segments.shape[2:]) != want:
            raise ValueError(f"MotionFormer: segments must be [B, S, {', '.join(map(str, want))}], "
                             f"got {tuple(segments.shape)}")

    def forward(self, segments: Tensor) -> Tensor:
        self.check_input(segments)
        B, S = segments.shape[:2]
        t, g = self.cfg.tokens_per_segment, self.cfg.grid
        x = segments.reshape(B * S, *segments.shape[2:])
        # the residual stream in the parameters' dtype (fp32 under autocast: only the matmuls run in bf16)
        x = self.patch_embed_3d.proj(x.to(self.cls_token.dtype)).to(self.cls_token.dtype)
        x = x.flatten(2).transpose(1, 2)                                              # [BS, t*g*g, D]
        D = x.shape[-1]
        pos = self.pos_embed[:, 1:].repeat(1, t, 1) + self.temp_embed.repeat_interleave(g * g, dim=1)
        pos = torch.cat((self.pos_embed[:, :1], pos), dim=1)
        x = torch.cat((self.cls_token.expand(B * S, 1, D), x), dim=1) + pos
        for blk in self.blocks:
            x = blk(x, t)
        x = self.norm(x[:, 1:])                                                       # [BS, t*g*g, D]
        x = self.spatial_attn_agg(x.reshape(B * S * t, g * g, D))                     # [BS*t, D]
        return x.reshape(B, S, t, D)


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------
def load_state_dict_file(path: PathLike) -> Dict[str, Tensor]:
    """Tensors of a checkpoint file without running pickled code: ``.safetensors`` through safetensors, anything
    else through ``torch.load(weights_only=True)`` (tensors, containers and numbers only; a file holding other
    objects is refused with an error naming the file). A training checkpoint ``{"model": state_dict, ...}``
    (Synchformer's own) gives its ``model`` entry."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(path)
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:     # pickle.UnpicklingError (disallowed globals) and corrupt files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{path}: not loadable as plain tensors with torch.load(weights_only=True) "
                             f"(refused: it holds pickled objects other than tensors, or is corrupt): {first}") from e
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in sd.items()):
        raise ValueError(f"{path}: expected a state dict (names -> tensors), got {type(sd).__name__}")
    return sd


def _key_error(path: str, what: str, missing: Iterable[str], unexpected: Iterable[str]) -> ValueError:
    def show(keys: List[str]) -> str:
        return ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
    missing, unexpected = sorted(missing), sorted(unexpected)
    parts = []
    if missing:
        parts.append(f"missing keys: {show(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {show(unexpected)}")
    return ValueError(f"{path}: does not match {what} ({'; '.join(parts)})")


def load_strict(module: nn.Module, sd: Dict[str, Tensor], path: str, what: str) -> None:
    """``module.load_state_dict(sd, strict=True, assign=True)`` (the loaded tensors become the parameters, in
    fp32) with one clear error naming the file: the missing and the unexpected keys, or the tensors whose shapes
    differ."""
    own = module.state_dict()
    missing, unexpected = set(own) - set(sd), set(sd) - set(own)
    if missing or unexpected:
        raise _key_error(path, what, missing, unexpected)
    bad = [f"{k} {tuple(sd[k].shape)} (model {tuple(v.shape)})" for k, v in own.items() if sd[k].shape != v.shape]
    if bad:
        raise ValueError(f"{path}: tensor shapes differ from {what} (wrong config?): " + ", ".join(bad[:10])
                         + (f", ... ({len(bad)} in all)" if len(bad) > 10 else ""))
    module.load_state_dict(sd, strict=True, assign=True)
    module.float()


def _empty(cls, cfg: Optional[SynchformerConfig]):
    """The module built on the meta device: no memory and no random initialisation, since every tensor is then
    assigned from the loaded state dict."""
    with torch.device("meta"):
        return cls(cfg)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


class SyncFeatureExtractor(nn.Module):
    """MotionFormer as the sync conditioning of MMAudio / Omni2Sound: ``features(frames, fps)`` -> [S * 8, 768]
    (24 per second of 25 fps video).

    Holds the network as ``vfeat_extractor`` so its state dict is exactly the ``vfeat_extractor.*`` part of the
    released audio-visual state dict."""

    def __init__(self, cfg: Optional[SynchformerConfig] = None):
        super().__init__()
        self.cfg = cfg or SynchformerConfig()
        self.vfeat_extractor = MotionFormer(self.cfg)
        self.eval()

    @property
    def dim(self) -> int:
        return self.cfg.vis_dim

    @property
    def device(self) -> torch.device:
        return self.vfeat_extractor.cls_token.device

    @classmethod
    def from_state_dict(cls, path: PathLike, cfg: Optional[SynchformerConfig] = None,
                        device=None) -> "SyncFeatureExtractor":
        """Load MMAudio's ``synchformer_state_dict.pth`` (or any state dict in its layout) strictly.

        The file is the whole audio-visual Synchformer's state dict (av-benchmark loads the same file into the
        full model); the visual extractor keeps the ``vfeat_extractor.*`` keys and drops exactly the other
        branches' prefixes ``afeat_extractor.``, ``vproj.``, ``aproj.``, ``transformer.``. A file with only the
        ``vfeat_extractor.*`` keys loads too. Any other key, or a missing ``vfeat_extractor.*`` key, is an error
        that lists them. Key mapping: ``vfeat_extractor.<k>`` -> ``MotionFormer.<k>`` unchanged (``patch_embed``,
        ``patch_embed_3d``, ``cls_token``, ``pos_embed``, ``temp_embed``, ``blocks.<i>.{norm1,norm2,norm3,
        attn.qkv,attn.proj,timeattn.qkv,timeattn.proj,mlp.fc1,mlp.fc2}``, ``norm``, ``spatial_attn_agg.{cls_token,
        self_attn.in_proj_weight,self_attn.in_proj_bias,self_attn.out_proj,linear1,linear2,norm1,norm2}``)."""
        sd = load_state_dict_file(path)
        visual = {k: v for k, v in sd.items() if not k.startswith(NON_VISUAL_PREFIXES)}
        model = _empty(cls, cfg)
        load_strict(model, visual, os.fspath(path), "Synchformer's visual extractor (vfeat_extractor.*)")
        if device is not None:
            model.to(device)
        return model.eval()

    def forward(self, segments: Tensor) -> Tensor:
        """segments [B, S, 3, 16, 224, 224] -> [B, S, 8, 768]."""
        return self.vfeat_extractor(segments)

    def features(self, frames: ArrayLike, fps: float, batch_segments: int = 32) -> Tensor:
        """A clip (uint8 [T, H, W, 3] or float [T, 3, H, W] in [0, 1], any fps) -> float32 [S * 8, 768] on the
        model's device, S = (T25 - 16) // 8 + 1 (``segment_video``). Runs under ``torch.inference_mode()``,
        ``batch_segments`` segments per forward, in bf16 autocast on CUDA (fp32 elsewhere)."""
        if batch_segments < 1:
            raise ValueError(f"SyncFeatureExtractor.features: batch_segments must be >= 1, got {batch_segments}")
        dev = self.device
        with torch.inference_mode():
            segs = segment_video(frames, fps, self.cfg, device=dev)                   # [S, 3, 16, H, W]
            out = []
            with _autocast(dev):
                for i in range(0, segs.shape[0], batch_segments):
                    out.append(self.vfeat_extractor(segs[i:i + batch_segments].unsqueeze(0))[0].float())
            return torch.cat(out).reshape(-1, self.cfg.vis_dim)


# ----------------------------------------------------------------------------------------------------------------
# Audio branch (AST)
# ----------------------------------------------------------------------------------------------------------------
class _Dense(nn.Module):
    """Holds one linear layer as ``dense`` (the AST key names)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class _ASTSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        H = self.heads
        o = attention(_split_heads(self.query(x), H), _split_heads(self.key(x), H), _split_heads(self.value(x), H))
        return o.reshape(x.shape)


class _ASTAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attention = _ASTSelfAttention(dim, heads)
        self.output = _Dense(dim, dim)


class _ASTLayer(nn.Module):
    """Pre-norm ViT block in the Hugging Face AST layout (LayerNorm eps 1e-12, GELU MLP)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.attention = _ASTAttention(dim, heads)
        self.intermediate = _Dense(dim, mlp_dim)
        self.output = _Dense(mlp_dim, dim)
        self.layernorm_before = nn.LayerNorm(dim, eps=1e-12)
        self.layernorm_after = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention.output.dense(self.attention.attention(self.layernorm_before(x)))
        return x + self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(x))))


class _ASTEncoder(nn.Module):
    def __init__(self, cfg: SynchformerConfig):
        super().__init__()
        self.layer = nn.ModuleList([_ASTLayer(cfg.aud_dim, cfg.aud_heads, cfg.aud_mlp_dim)
                                    for _ in range(cfg.aud_depth)])


class _ASTPatches(nn.Module):
    def __init__(self, cfg: SynchformerConfig):
        super().__init__()
        s = cfg.audio_patch_stride
        self.projection = nn.Conv2d(1, cfg.aud_dim, kernel_size=cfg.audio_patch, stride=(s, s))


class _ASTEmbeddings(nn.Module):
    def __init__(self, cfg: SynchformerConfig):
        super().__init__()
        D = cfg.aud_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.distillation_token = nn.Parameter(torch.zeros(1, 1, D))
        self.patch_embeddings = _ASTPatches(cfg)
        self.position_embeddings = nn.Parameter(torch.zeros(1, 2 + cfg.freq_patches * cfg.time_patches, D))


class _ASTModel(nn.Module):
    """The Audio Spectrogram Transformer (Gong et al., 2021) as Hugging Face's ``ASTModel`` lays out its weights,
    with the position embedding cut to one 66-frame segment (12 x 6 patches + CLS + distillation token).
    spec [B, n_mels, frames] -> last hidden state [B, 2 + f * t, D] (patches frequency-major)."""

    def __init__(self, cfg: SynchformerConfig):
        super().__init__()
        self.embeddings = _ASTEmbeddings(cfg)
        self.encoder = _ASTEncoder(cfg)
        self.layernorm = nn.LayerNorm(cfg.aud_dim, eps=1e-12)

    def forward(self, spec: Tensor) -> Tensor:
        e = self.embeddings
        dt = e.cls_token.dtype                                 # residual stream in fp32 under autocast
        x = e.patch_embeddings.projection(spec.unsqueeze(1).to(dt)).to(dt)           # [B, D, f, t]
        x = x.flatten(2).transpose(1, 2)                                              # [B, f*t, D]
        B, _, D = x.shape
        x = torch.cat((e.cls_token.expand(B, 1, D), e.distillation_token.expand(B, 1, D), x), dim=1)
        x = x + e.position_embeddings
        for layer in self.encoder.layer:
            x = layer(x)
        return self.layernorm(x)


class ASTSegmentEncoder(nn.Module):
    """The audio feature extractor: normalised log-mel segments [B, S, n_mels, 66] (``segment_audio``) ->
    [B, S, 6, 768]. Per segment: the AST's last hidden state without its CLS and distillation tokens, arranged
    as the 12 x 6 (frequency x time) patch grid, then per time step the 12 frequency patches pooled by
    ``freq_attn_agg`` (a transformer layer with a CLS query)."""

    def __init__(self, cfg: Optional[SynchformerConfig] = None):
        super().__init__()
        cfg = cfg or SynchformerConfig()
        self.cfg = cfg
        if cfg.aud_dim % cfg.aud_heads:
            raise ValueError(f"ASTSegmentEncoder: aud_dim {cfg.aud_dim} must divide by aud_heads {cfg.aud_heads}")
        self.ast = _ASTModel(cfg)
        self.freq_attn_agg = _ClsPooling(cfg.aud_dim, cfg.aud_heads, cfg.aud_mlp_dim)
        self.apply(_init_vit)
        for p in (self.ast.embeddings.cls_token, self.ast.embeddings.distillation_token,
                  self.ast.embeddings.position_embeddings):
            nn.init.trunc_normal_(p, std=0.02)

    def forward(self, spec: Tensor) -> Tensor:
        c = self.cfg
        if spec.dim() != 4 or tuple(spec.shape[2:]) != (c.n_mels, c.spec_frames):
            raise ValueError(f"ASTSegmentEncoder: spectrograms must be [B, S, {c.n_mels}, {c.spec_frames}], "
                             f"got {tuple(spec.shape)}")
        B, S = spec.shape[:2]
        f, t = c.freq_patches, c.time_patches
        x = self.ast(spec.reshape(B * S, c.n_mels, c.spec_frames))[:, 2:]           # [BS, f*t, D]
        D = x.shape[-1]
        x = x.reshape(B * S, f, t, D).transpose(1, 2).reshape(B * S * t, f, D)
        return self.freq_attn_agg(x).reshape(B, S, t, D)


# ----------------------------------------------------------------------------------------------------------------
# Synchronisation transformer and the full model
# ----------------------------------------------------------------------------------------------------------------
class _GPTAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.key = nn.Linear(dim, dim)
        self.query = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        H = self.heads
        o = attention(_split_heads(self.query(x), H), _split_heads(self.key(x), H), _split_heads(self.value(x), H))
        return self.proj(o.reshape(x.shape))


class _GPTBlock(nn.Module):
    """x + attn(ln1(x)), + mlp(ln2(x)); bidirectional attention, LayerNorm eps 1e-5, GELU MLP of 4x."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.ln2 = nn.LayerNorm(dim)
        self.attn = _GPTAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class _PosEmb(nn.Module):
    def __init__(self, length: int, dim: int):
        super().__init__()
        self.pos_emb = nn.Parameter(torch.randn(1, length, dim))


class SyncTransformer(nn.Module):
    """The synchronisation transformer with the offset head: video tokens [B, Tv, D] and audio tokens [B, Ta, D]
    (Tv + Ta + 2 = 198 for a 14-segment window) -> offset logits [B, 21].
    Sequence [OFF, LN(video), MOD, LN(audio)] + learned position embedding, 3 blocks, final LayerNorm, the linear
    head on the OFF token."""

    def __init__(self, cfg: Optional[SynchformerConfig] = None):
        super().__init__()
        cfg = cfg or SynchformerConfig()
        self.cfg = cfg
        D = cfg.sync_dim
        if D % cfg.sync_heads:
            raise ValueError(f"SyncTransformer: sync_dim {D} must divide by sync_heads {cfg.sync_heads}")
        self.vis_in_lnorm = nn.LayerNorm(D)
        self.aud_in_lnorm = nn.LayerNorm(D)
        self.OFF_tok = nn.Parameter(torch.randn(1, 1, D))
        self.MOD_tok = nn.Parameter(torch.randn(1, 1, D))
        self.pos_emb_cfg = _PosEmb(cfg.sync_tokens, D)
        self.blocks = nn.Sequential(*[_GPTBlock(D, cfg.sync_heads) for _ in range(cfg.sync_depth)])
        self.ln_f = nn.LayerNorm(D)
        self.off_head = nn.Linear(D, cfg.num_offsets)

    def forward(self, vis: Tensor, aud: Tensor) -> Tensor:
        B, D = vis.shape[0], vis.shape[-1]
        x = torch.cat((self.OFF_tok.expand(B, 1, D), self.vis_in_lnorm(vis), self.MOD_tok.expand(B, 1, D),
                       self.aud_in_lnorm(aud)), dim=1)
        if x.shape[1] != self.pos_emb_cfg.pos_emb.shape[1]:
            raise ValueError(f"SyncTransformer: {vis.shape[1]} video + {aud.shape[1]} audio tokens + 2 = {x.shape[1]}, "
                             f"the model takes {self.pos_emb_cfg.pos_emb.shape[1]} ({self.cfg.sync_segments} "
                             "segments)")
        x = self.ln_f(self.blocks(x + self.pos_emb_cfg.pos_emb))
        return self.off_head(x[:, 0])


class Synchformer(nn.Module):
    """The audio-visual Synchformer with its offset classifier: which of 21 offsets (-2.0 ... +2.0 s in 0.2 s
    steps) separates a 4.8 s window's audio from its video. The model av-benchmark's DeSync uses.

        extract_vfeats(segments [B, S, 3, 16, 224, 224]) -> [B, S, 8, 768]   (``MotionFormer``)
        extract_afeats(spec [B, S, 128, 66])              -> [B, S, 6, 768]   (``ASTSegmentEncoder``)
        compare_v_a(vfeats, afeats) (14 segments each)    -> logits [B, 21]   (projections + ``SyncTransformer``)
        video_features(frames, fps) -> [S, 8, 768]; audio_features(audio, sr) -> [S, 6, 768]   (one clip)
        desync_from_features(vfeats, afeats) -> seconds   (video features reusable across scored systems)
        predict_offset / offset_logits / desync           on raw frames and audio

    Attention everywhere through ``omni2sound.ops.attention``."""

    def __init__(self, cfg: Optional[SynchformerConfig] = None):
        super().__init__()
        self.cfg = cfg or SynchformerConfig()
        self.vfeat_extractor = MotionFormer(self.cfg)
        self.afeat_extractor = ASTSegmentEncoder(self.cfg)
        self.vproj = nn.Linear(self.cfg.vis_dim, self.cfg.sync_dim)
        self.aproj = nn.Linear(self.cfg.aud_dim, self.cfg.sync_dim)
        self.transformer = SyncTransformer(self.cfg)
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.vproj.weight.device

    @classmethod
    def from_checkpoint(cls, path: PathLike, cfg: Optional[SynchformerConfig] = None,
                        device=None) -> "Synchformer":
        """Load the released audio-visual state dict strictly: MMAudio's / av-benchmark's
        ``synchformer_state_dict.pth`` (a flat state dict), or Synchformer's own training checkpoint
        ``{"model": state_dict, ...}`` if it holds nothing but tensors (files with pickled configs are refused:
        re-save their ``["model"]`` entry with ``torch.save`` from a trusted environment).

        Key layout (module here <- released keys, unchanged names):
          vfeat_extractor  MotionFormer        ``vfeat_extractor.*`` (see ``SyncFeatureExtractor.from_state_dict``)
          afeat_extractor  ASTSegmentEncoder   ``afeat_extractor.ast.embeddings.{cls_token,distillation_token,
                           position_embeddings [1, 74, 768],patch_embeddings.projection}``,
                           ``afeat_extractor.ast.encoder.layer.<i>.{attention.attention.{query,key,value},
                           attention.output.dense,intermediate.dense,output.dense,layernorm_before,
                           layernorm_after}`` (Hugging Face AST names), ``afeat_extractor.ast.layernorm``,
                           ``afeat_extractor.freq_attn_agg.*`` (as ``spatial_attn_agg``)
          vproj, aproj     Linear 768 -> 768   ``vproj.*``, ``aproj.*``
          transformer      SyncTransformer     ``transformer.{vis_in_lnorm,aud_in_lnorm,OFF_tok,MOD_tok,
                           pos_emb_cfg.pos_emb [1, 198, 768],blocks.<i>.{ln1,ln2,attn.{key,query,value,proj},
                           mlp.0,mlp.2},ln_f,off_head [21, 768]}``
        A missing or an unexpected key is an error that lists them and names the file."""
        sd = load_state_dict_file(path)
        model = _empty(cls, cfg)
        load_strict(model, sd, os.fspath(path), "the audio-visual Synchformer")
        if device is not None:
            model.to(device)
        return model.eval()

    def extract_vfeats(self, segments: Tensor) -> Tensor:
        return self.vfeat_extractor(segments)

    def extract_afeats(self, spec: Tensor) -> Tensor:
        return self.afeat_extractor(spec)

    def compare_v_a(self, vfeats: Tensor, afeats: Tensor) -> Tensor:
        """vfeats [B, S, 8, Dv], afeats [B, S, 6, Da] -> offset logits [B, num_offsets]."""
        v = self.vproj(vfeats).flatten(1, 2)
        a = self.aproj(afeats).flatten(1, 2)
        return self.transformer(v, a)

    def forward(self, segments: Tensor, spec: Tensor) -> Tensor:
        """Video segments [B, S, 3, 16, 224, 224] and audio segments [B, S, 128, 66] (S = 14) -> logits [B, 21]."""
        return self.compare_v_a(self.extract_vfeats(segments), self.extract_afeats(spec))

    # raw media ---------------------------------------------------------------------------------------------------
    def _batched(self, net: nn.Module, x: Tensor, batch_segments: int) -> Tensor:
        if batch_segments < 1:
            raise ValueError(f"Synchformer: batch_segments must be >= 1, got {batch_segments}")
        with _autocast(self.device):
            return torch.cat([net(x[i:i + batch_segments].unsqueeze(0))[0].float()
                              for i in range(0, x.shape[0], batch_segments)])

    def video_features(self, frames: ArrayLike, fps: float, batch_segments: int = 32) -> Tensor:
        """A clip's frames (any fps, see ``segment_video``) -> float32 [S, 8, 768] on the model's device, batched
        over segments, under ``torch.inference_mode()``, bf16 autocast on CUDA. Reusable across systems scored
        against the same videos."""
        with torch.inference_mode():
            return self._batched(self.vfeat_extractor, segment_video(frames, fps, self.cfg, device=self.device),
                                 batch_segments)

    def audio_features(self, audio: ArrayLike, sample_rate: int, batch_segments: int = 64) -> Tensor:
        """Audio [N] or [channels, N] at any rate (see ``segment_audio``) -> float32 [S, 6, 768] on the model's
        device; the same segment grid as ``video_features``, so segment i of both covers the same 0.64 s."""
        with torch.inference_mode():
            a = resample_audio(_as_mono(audio, "Synchformer.audio_features"), sample_rate, self.cfg.sample_rate)
            spec = segment_audio(a.to(self.device), self.cfg.sample_rate, self.cfg)
            return self._batched(self.afeat_extractor, spec, batch_segments)

    def window_logits(self, vfeats: Tensor, afeats: Tensor, starts: List[int]) -> Tensor:
        """Offset logits [len(starts), num_offsets] of the 14-segment windows starting at the given segments of
        one clip's features (vfeats [S, 8, Dv], afeats [S, 6, Da]), as one batch."""
        n, s = self.cfg.sync_segments, min(vfeats.shape[0], afeats.shape[0])
        if s < n:
            raise ValueError(f"Synchformer: the clip has {s} segments of video and audio, the offset classifier needs "
                             f"{n} ({self.cfg.window_seconds:g} s)")
        bad = [i for i in starts if not 0 <= i <= s - n]
        if bad:
            raise ValueError(f"Synchformer: windows must start at segments 0..{s - n}, got {bad}")
        dev = self.device
        with torch.inference_mode(), _autocast(dev):
            v = torch.stack([vfeats[i:i + n] for i in starts]).to(dev)
            a = torch.stack([afeats[i:i + n] for i in starts]).to(dev)
            return self.compare_v_a(v, a).float()

    def desync_from_features(self, vfeats: Tensor, afeats: Tensor) -> float:
        """DeSync from one clip's features: both cut to their common length (the common duration: segment i of
        both streams covers the same time), then |offset| of the first and of the last 14 segments, averaged."""
        s = min(vfeats.shape[0], afeats.shape[0])
        logits = self.window_logits(vfeats[:s], afeats[:s], [0, max(s - self.cfg.sync_segments, 0)])
        return float(self.cfg.offset_grid()[logits.argmax(dim=-1).cpu()].abs().mean())

    def offset_logits(self, frames: ArrayLike, fps: float, audio: ArrayLike, sample_rate: int,
                      start_segment: int = 0) -> Tensor:
        """Logits [num_offsets] of the 4.8 s window starting at segment ``start_segment`` (0.32 s steps) of the
        clip's segment grid; only that window's 14 segments go through the networks."""
        n, dev = self.cfg.sync_segments, self.device
        with torch.inference_mode():
            segs = segment_video(frames, fps, self.cfg, device=dev)
            a = resample_audio(_as_mono(audio, "Synchformer.offset_logits"), sample_rate, self.cfg.sample_rate)
            spec = segment_audio(a.to(dev), self.cfg.sample_rate, self.cfg)
            s = min(segs.shape[0], spec.shape[0])
            if not 0 <= start_segment <= s - n:
                raise ValueError(f"Synchformer: a window of {n} segments ({self.cfg.window_seconds:g} s) starting at "
                                 f"segment {start_segment} does not fit the clip's {s} segments")
            v = self._batched(self.vfeat_extractor, segs[start_segment:start_segment + n], n)
            a = self._batched(self.afeat_extractor, spec[start_segment:start_segment + n], n)
            return self.window_logits(v, a, [0])[0]

    def predict_offset(self, frames: ArrayLike, fps: float, audio: ArrayLike, sample_rate: int,
                       start_segment: int = 0) -> float:
        """The predicted offset in seconds (the argmax class of ``offset_grid``) of the 4.8 s window starting at
        segment ``start_segment`` (the clip's first 4.8 s by default). Positive: the audio runs ahead."""
        logits = self.offset_logits(frames, fps, audio, sample_rate, start_segment)
        return float(self.cfg.offset_grid()[int(logits.argmax())])

    def desync(self, frames: ArrayLike, fps: float, audio: ArrayLike, sample_rate: int) -> float:
        """av-benchmark's DeSync of one clip: the predicted offset's absolute value in seconds on the first and on
        the last 4.8 s (14 segments) of the clip (both streams cut to their common duration), averaged; each
        segment is encoded once and the two windows are one batch. Lower is better; 0 means both windows were
        judged in sync. A clip under 4.8 s is an error."""
        return self.desync_from_features(self.video_features(frames, fps), self.audio_features(audio, sample_rate))

