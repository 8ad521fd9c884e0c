"""The Omni2Sound network: a plain DiT on audio VAE latents with decoupled dual-branch conditioning.

    audio latents x_t [B, T, C] (25 Hz) --Linear--> tokens [B, T, D]
    N x block:  self-attention (RoPE, QK-RMSNorm) -> cross-attention -> MLP, pre-norm
      - semantic branch ("what"): cross-attention from the audio tokens to the packed, per-sample
        concatenation [video tokens (8 / s, + learned time position) | text tokens]; an absent modality
        has zero tokens (varlen ``omni2sound.ops.cross_attention``), it is never padded;
      - temporal branch ("when"): per-token AdaLN (shift, scale, gate for attention and MLP) from the
        sync features (24 / s, resampled to the 25 Hz latent frames) plus the timestep and duration.
    final per-token AdaLN -> Linear -> velocity [B, T, C]

The per-token modulation is split into a per-step and a per-request part,
    mod_l = W_t SiLU(emb(t) + emb(duration)) [B, 1, 6D]  +  W_s,l SiLU(sync_emb) + b_l [B, T, 6D],
W_t shared by all blocks (PixArt-alpha's adaLN-single; the per-block bias b_l keeps the blocks apart),
so that the large per-token half (6 D^2 per token per block) is computed once per request in
``prepare_conditions`` together with every layer's cross-attention K/V, and a denoising step pays
only for the DiT itself (MMAudio's ``preprocess_conditions`` / ``predict_flow`` split).

The chain between the sublayers goes through the fused ops: ``gated_residual_adaln`` computes
``x + gate * h`` and the next LayerNorm + modulation in one pass, also across block boundaries.
The cross-attention's query norm is the same op with shift = scale = 0 and its residual gate is 1.
The per-head RMSNorms are fused too: ``ops.qk_norm_rope`` (self-attention q and k, then RoPE) and
``ops.head_rms_norm`` (the cross-attention's q, and its condition tokens' k). Both attentions go through ``ops``
(``ops.attention``, ``ops.cross_attention``). The MLP's first Linear + tanh-GELU is ``ops.linear_gelu`` (a GEMM
without bias, then the fused bias + GELU), and every projection's GEMM goes through ``ops.linear``. Which kernel runs
each op on which device is ``ops``' choice, never the network's; what a request prepares for sampling (and its
reusable buffers) is ``omni2sound.sampling``'s.

The network knows nothing of noise schedules: ``t`` in [0, 1] comes from ``omni2sound.flow``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .conditions import Conditions
from .files import atomic_write, load_safetensors, read_config
from .sampling import PreparedConditions, dense, gemm_buffer, linear_into

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------
@dataclass
class DiTConfig:
    latent_dim: int = 64          # audio VAE latent channels (the VAE's config.latent_dim)
    hidden_dim: int = 1536
    depth: int = 24
    num_heads: int = 24
    mlp_ratio: float = 4.0
    text_dim: int = 384           # MiniLM token embeddings (flan-t5-base: 768)
    video_dim: int = 1024         # CLIP image embeddings per frame (built-in frame encoder: 272)
    sync_dim: int = 768           # Synchformer features (built-in motion encoder: 64)
    max_text_tokens: int = 128
    max_duration: float = 10.0    # training clip length in seconds; longer audio is generated in windows
    latent_rate: float = 25.0     # audio latent frames per second (16 kHz / hop 640)
    video_rate: float = 8.0       # semantic video tokens per second
    sync_rate: float = 24.0       # sync features per second
    rope_base: float = 10000.0
    norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

    @property
    def max_video_tokens(self) -> int:
        return int(math.ceil(self.max_duration * self.video_rate))

    def num_frames(self, duration: float) -> int:
        """Latent frames for ``duration`` seconds (the VAE pads the waveform up to whole frames)."""
        return max(1, int(math.ceil(duration * self.latent_rate - 1e-6)))

    def validate(self) -> None:
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim {self.hidden_dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and v <= 0:
                raise ValueError(f"DiTConfig.{f.name} must be positive, got {v}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown DiTConfig fields {sorted(unknown)}")
        return cls(**d)


# One dict of size presets feeds the factory, the trainer and the CLI.
# tiny: tests and the CPU toy run (VAE "tiny" latents, built-in frame/motion encoders, MiniLM text).
# S: ~150M params, MMAudio-S scale. L: the paper's 24 x 1536, 24 heads (~1.2B with per-token AdaLN).
DIT_PRESETS = {
    "tiny": DiTConfig(latent_dim=16, hidden_dim=128, depth=4, num_heads=4, video_dim=272, sync_dim=64,
                      max_text_tokens=64),
    "S": DiTConfig(latent_dim=64, hidden_dim=768, depth=12, num_heads=12),
    "L": DiTConfig(latent_dim=64, hidden_dim=1536, depth=24, num_heads=24),
}


def dit_config(preset: str, **overrides) -> DiTConfig:
    if preset not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {preset!r}; choose from {sorted(DIT_PRESETS)}")
    cfg = replace(DIT_PRESETS[preset], **overrides)
    cfg.validate()
    return cfg


# ----------------------------------------------------------------------------------------------------
# Small pieces
# ----------------------------------------------------------------------------------------------------
def sinusoidal_embedding(x: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """[B] float -> [B, dim] (DiT's timestep embedding, used for t*1000 and for seconds)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    args = x.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ScalarEmbedder(nn.Module):
    """A scalar per sample (timestep, duration) -> [B, D] through sinusoids and an MLP."""

    def __init__(self, dim: int, scale: float, freq_dim: int = 256):
        super().__init__()
        self.scale, self.freq_dim = scale, freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        emb = sinusoidal_embedding(x * self.scale, self.freq_dim)      # [B, F]
        return self.mlp(emb.to(self.mlp[0].weight.dtype))              # [B, D]


class RMSNorm(nn.Module):
    """Per-head RMSNorm of attention q / k rows, [N, T, H, Dh] or [N, H, Dh], through the fused kernel
    (``ops.head_rms_norm``). The self-attention passes its q and k weights to ``ops.qk_norm_rope`` instead, which
    also applies RoPE."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return ops.head_rms_norm(x, self.weight, self.eps)


def rope_table(num_frames: int, head_dim: int, base: float, device) -> Tensor:
    """exp(i * angle) [T, head_dim / 2] (complex64) for rotary position embeddings over latent frames."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    ang = torch.arange(num_frames, device=device, dtype=torch.float32)[:, None] * inv[None]
    return torch.polar(torch.ones_like(ang), ang)


def resample_sync(sync: Tensor, num_frames: int, sync_rate: float, latent_rate: float) -> Tensor:
    """Linear interpolation of [B, Ts, Ds] features at ``sync_rate`` to the centres of ``num_frames``
    latent frames at ``latent_rate`` -> [B, T, Ds]. Frames past the last feature hold its value; no
    features at all (Ts = 0) give zeros."""
    B, Ts, Ds = sync.shape
    if Ts == 0:
        return sync.new_zeros(B, num_frames, Ds)
    centres = (torch.arange(num_frames, device=sync.device, dtype=torch.float32) + 0.5) / latent_rate
    pos = (centres * sync_rate - 0.5).clamp(0, Ts - 1)                  # fractional sync index [T]
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=Ts - 1)
    w = (pos - lo.float()).to(sync.dtype)[None, :, None]                 # [1, T, 1]
    return sync[:, lo] * (1 - w) + sync[:, hi] * w


# ----------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------
def per_token_linear(lin: nn.Linear, s: Tensor, rows: Optional[Tuple[Tensor, Tensor]]) -> Tensor:
    """lin(s) for s [B, T, D] -> [B, T, N]. rows: None, or (full, const) row indices, where the ``const`` rows of s
    are known to be the same at every frame: those are computed on frame 0 and broadcast. These are the largest
    GEMMs of a request (T x D x 6D per block)."""
    if rows is None or rows[1].numel() == 0:
        return ops.linear(s, lin.weight, lin.bias)
    full, const = rows
    out = s.new_empty(*s.shape[:2], lin.out_features)
    if full.numel():
        out[full] = ops.linear(s[full], lin.weight, lin.bias)
    out[const] = ops.linear(s[const, :1], lin.weight, lin.bias)                     # [n, 1, N] -> [n, T, N]
    return out


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = RMSNorm(dim // heads, eps), RMSNorm(dim // heads, eps)
        self.proj = nn.Linear(dim, dim)

    def norm_weight(self) -> Tensor:
        """q's and k's RMSNorm weights as the fused op reads them: fp32 [2, Dh]."""
        return torch.stack([self.q_norm.weight, self.k_norm.weight]).float()

    def forward(self, y: Tensor, rope: Tensor, prep: Optional[PreparedConditions] = None,
                norm_weight: Optional[Tensor] = None) -> Tensor:
        """y [B, T, D], rope fp32 [T, Dh / 2, 2] (cos, sin) -> [B, T, D]. prep: the request's conditions, whose
        workspace (when sampling) may hold a buffer for the qkv projection (``sampling.linear_into``).
        norm_weight: ``self.norm_weight()``, made once per request by ``prepare_conditions`` (else here)."""
        B, T, D = y.shape
        qkv = linear_into(y, self.qkv, prep, "qkv").view(B, T, 3, self.heads, D // self.heads)  # [B, T, 3, H, Dh]
        # q and k together, straight from the projection's output (a strided view, no copy): one fused
        # RMSNorm (q's and k's weights) + RoPE rotation. split / unbind / squeeze, not indexing: in training each
        # index of a shared tensor makes autograd build a zero-filled gradient of the whole tensor and add them
        # up; split's backward is one cat, unbind's one stack, squeeze's a view.
        w = self.norm_weight() if norm_weight is None else norm_weight                   # fp32 [2, Dh]
        qk_in, v = qkv.split([2, 1], dim=2)                                               # strided views
        q, k = ops.qk_norm_rope(qk_in, w, rope, self.q_norm.eps).unbind(2)              # [B, T, H, Dh] each
        v = v.squeeze(2)
        o = ops.attention(q, k, v, key_mask=None if prep is None else prep.key_mask)   # [B, T, H, Dh]
        return dense(self.proj, o.reshape(B, T, D))                                      # [B, T, D]


class CrossAttention(nn.Module):
    """Audio queries over the packed condition tokens; K/V come precomputed from ``kv()``."""

    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv_proj = nn.Linear(dim, 2 * dim)
        self.q_norm, self.k_norm = RMSNorm(dim // heads, eps), RMSNorm(dim // heads, eps)
        self.proj = nn.Linear(dim, dim)

    def kv(self, tokens: Tensor) -> Tuple[Tensor, Tensor]:
        """tokens [total_k, D] -> k, v [total_k, H, Dh] (once per request)."""
        n, D = tokens.shape
        k, v = self.kv_proj(tokens).view(n, 2, self.heads, D // self.heads).unbind(1)
        return self.k_norm(k), v.contiguous()

    def forward(self, y: Tensor, k: Tensor, v: Tensor, cu_seqlens_k: Tensor, max_seqlen_k: int,
                rows: Optional[int] = None, q_norm_weight: Optional[Tensor] = None) -> Tensor:
        """y [B, T, D] -> [B, T, D]. Rows >= ``rows`` have no keys: their output is proj.bias, not computed.
        q_norm_weight: the query norm's weight in fp32 [Dh], made once per request (else here)."""
        B, T, D = y.shape
        n = B if rows is None else rows
        if n == 0:                                                                       # nothing to attend to
            return self.proj.bias.to(y.dtype).expand(B, T, D).contiguous()
        yc = y[:n]                                                                       # a view: rows lead
        # the q norm is fused (one read of the projection, one contiguous write: what cross_attention takes)
        qw = self.q_norm.weight if q_norm_weight is None else q_norm_weight
        q = ops.head_rms_norm(dense(self.q, yc).view(n, T, self.heads, D // self.heads), qw,
                              self.q_norm.eps)                                            # [n, T, H, Dh]
        o = ops.cross_attention(q, k, v, cu_seqlens_k[:n + 1], max_seqlen_k)            # [n, T, H, Dh]
        h = dense(self.proj, o.reshape(n, T, D))                                         # [n, T, D]
        if n == B:
            return h
        return torch.cat([h, self.proj.bias.to(h.dtype).expand(B - n, T, D)])             # [B, T, D]


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.hidden_dim
        self.eps = cfg.norm_eps
        self.attn = SelfAttention(D, cfg.num_heads, cfg.norm_eps)
        self.cross = CrossAttention(D, cfg.num_heads, cfg.norm_eps)
        hidden = int(D * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(D, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, D))
        # AdaLN modulation, per-request half (sync); the per-step half is the model's shared t_mod.
        self.ada_sync = nn.Linear(D, 6 * D)

    def forward(self, x: Tensor, y: Tensor, mod: Sequence[Tensor], mod_t: Sequence[Tensor], next_shift: ops.Mod,
                next_scale: ops.Mod, kv: Tuple[Tensor, Tensor], prep: PreparedConditions,
                norm_w: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        """x [B, T, D] residual stream, y = LN(x) * (1 + scale_msa) + shift_msa; this block's modulation is
        mod 6 x [B, T, D] (per token, per request) + mod_t 6 x [B, 1, D] (per step), passed to the fused ops as
        pairs (summed inside the kernels); norm_w: ``self.norm_weights()`` of this request. Returns the new residual
        and its modulated norm for the NEXT sublayer (next block or final)."""
        gate_msa, shift_mlp, scale_mlp, gate_mlp = ((mod[k], mod_t[k]) for k in (2, 3, 4, 5))
        qk_w, cross_q_w = norm_w if norm_w is not None else (None, None)
        h = self.attn(y, prep.rope, prep, qk_w)                                         # [B, T, D]
        x, y = ops.gated_residual_adaln(x, h, gate_msa, prep.zeros, prep.zeros, self.eps)  # y = LN(x)
        h = self.cross(y, kv[0], kv[1], prep.cu_seqlens_k, prep.max_seqlen_k, prep.cross_rows,
                       cross_q_w)                                                       # [B, T, D]
        x, y = ops.gated_residual_adaln(x, h, prep.ones, shift_mlp, scale_mlp, self.eps)
        h = self.mlp_forward(y, prep)                                                    # [B, T, D]
        return ops.gated_residual_adaln(x, h, gate_mlp, next_shift, next_scale, self.eps)

    def condition(self, packed: Tensor, s: Tensor, rows: Optional[Tuple[Tensor, Tensor]] = None
                  ) -> Tuple[Tuple[Tensor, Tensor], Tensor, Tuple[Tensor, Tensor]]:
        """This block's once-per-request work: the cross-attention K/V of the packed condition tokens [total_k, D]
        -> 2 x [total_k, H, Dh], the per-token half of its AdaLN modulation, ada_sync(s) for s [B, T, D] ->
        [B, T, 6D] (rows: see per_token_linear), and its head norms' weights in fp32 (``norm_weights``). One method,
        so that a sharded block (FSDP2, trainer.shard_model) gathers its weights for it as it does for forward."""
        return self.cross.kv(packed), per_token_linear(self.ada_sync, s, rows), self.norm_weights()

    def norm_weights(self) -> Tuple[Tensor, Tensor]:
        """The self-attention's q/k norm weights fp32 [2, Dh] and the cross-attention's query norm weight fp32 [Dh]:
        what the fused norms read, made once per request instead of once per step (in bf16 sampling, three small
        kernels per block and step: 72 launches of an L step)."""
        return self.attn.norm_weight(), self.cross.q_norm.weight.float()

    def mlp_forward(self, y: Tensor, prep: Optional[PreparedConditions] = None) -> Tensor:
        """self.mlp(y) for y [B, T, D] -> [B, T, D]; the first Linear + GELU through ``ops.linear_gelu`` (fused bias +
        GELU, its [B T, 4D] output in the request's workspace buffer when it has one)."""
        fc1, fc2 = self.mlp[0], self.mlp[2]
        buf = gemm_buffer(prep, "mlp_hidden", y, fc1)
        return dense(fc2, ops.linear_gelu(y, fc1.weight, fc1.bias, out=buf))            # [B, T, 4D] -> [B, T, D]


# ----------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------
class Omni2SoundDiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        D = cfg.hidden_dim
        self.x_embed = nn.Linear(cfg.latent_dim, D)
        self.t_embed = ScalarEmbedder(D, scale=1000.0)         # t in [0, 1]
        self.duration_embed = ScalarEmbedder(D, scale=10.0)    # seconds; 0.1 s resolution in the sinusoids
        # Semantic branch: project both modalities to the model width; video gets a learned time position.
        self.video_proj = nn.Sequential(nn.Linear(cfg.video_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.video_pos = nn.Parameter(torch.zeros(cfg.max_video_tokens, D))
        self.text_proj = nn.Sequential(nn.Linear(cfg.text_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.cond_norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        # Temporal branch: sync features -> per-token embedding (-> per-block ada_sync).
        self.sync_proj = nn.Sequential(nn.Linear(cfg.sync_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.t_mod = nn.Linear(D, 6 * D)          # adaLN-single: one timestep modulation for every block
        self.final_ada_t = nn.Linear(D, 2 * D)
        self.final_ada_sync = nn.Linear(D, 2 * D)
        self.final = nn.Linear(D, cfg.latent_dim)
        self.initialize_weights()

    # -- init policy, in one place (DiT's adaLN-Zero) -------------------------------------------------
    def initialize_weights(self) -> None:
        def basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.apply(basic)
        nn.init.normal_(self.video_pos, std=0.02)
        for emb in (self.t_embed, self.duration_embed):
            for m in emb.mlp:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        # adaLN-Zero: every gate, shift and scale starts at 0, so each block starts as the identity;
        # the cross-attention (residual gate 1) starts silent through its zeroed output projection.
        for block in self.blocks:
            for m in (block.ada_sync, block.cross.proj):
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
        for m in (self.t_mod, self.final_ada_t, self.final_ada_sync, self.final):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.x_embed.weight.device

    # -- once per request ----------------------------------------------------------------------------
    def prepare_conditions(self, cond: Conditions, num_frames: int, sampling: bool = False,
                           static: bool = False, bucketed: bool = False) -> PreparedConditions:
        """Projections, packing, every layer's cross-attention K/V, sync resampling and the duration
        embedding for a batch of conditions and ``num_frames`` latent frames (host syncs allowed here).

        sampling: prepared for many denoising steps (``PreparedConditions.for_sampling``: where it pays on the
        device, trailing rows with no condition tokens skip the cross-attention, exact, and the projections get a
        workspace), and the rows without video compute their sync modulation on one frame. Off for training, where
        it costs more than it saves: the dropped rows are scattered, and a data-dependent row count would recompile
        a compiled step.

        static: no host synchronisation and shapes fixed by the padded token counts, not the lengths (a CUDA-graph
        capture of a training step, see graphed_step.py): the condition tokens are packed with their padding (see
        ops.pack_condition_tokens(static=True)) and only the shapes are checked here; the values (NaN, lengths
        in range) are the caller's to check, once, outside the capture (Conditions.validate).

        bucketed: a serving batch padded to a bucket (omni2sound.serving): the condition tokens packed with their
        padding (shapes fixed by the padded sizes, so one captured sampling graph serves every batch of the bucket),
        and each row's frames past its own duration (Conditions.duration) left out as self-attention keys
        (PreparedConditions.key_mask), so a request samples as it would unpadded: every other op is per frame."""
        cfg, D = self.config, self.config.hidden_dim
        dt, dev = self.dtype, self.device
        if static and sampling:
            raise ValueError("prepare_conditions: static is for training steps; sampling prepares once per request")
        cond = cond.to(dev, dt)
        self._check_conditions(cond, num_frames, values=not static)
        B = cond.batch_size
        Lv = cond.video_tokens.shape[1]
        video = self.video_proj(cond.video_tokens) + self.video_pos[:Lv]                # [B, Lv, D]
        text = self.text_proj(cond.text_tokens)                                         # [B, Lt, D]
        packed, cu, max_k = ops.pack_condition_tokens(video, cond.video_lens, text, cond.text_lens,
                                                      static=static or bucketed)        # [total, D]
        packed = self.cond_norm(packed)

        has_video = cond.has_video.to(dt)[:, None, None]                                # [B, 1, 1]
        sync = resample_sync(cond.sync, num_frames, cfg.sync_rate, cfg.latent_rate) * has_video  # [B, T, Ds]
        s = F.silu(self.sync_proj(sync))                                                # [B, T, D]
        # Sampling: a row without video has zero sync input, so the same s at every frame (the CFG batch's
        # unconditional rows, every row of a T2A request): its modulations are computed on one frame and broadcast
        # (exact; halves these GEMMs for V2A with CFG, and T2A needs 1 / T of them). Not in training, where the
        # rows without video are scattered by dropout and a data-dependent split would recompile a compiled step.
        rows = None
        if sampling:                                                                    # host sync: prepare only
            video = cond.has_video.bool()
            rows = (video.nonzero().flatten(), (~video).nonzero().flatten())           # (per-token, one-frame)
        per_block = [blk.condition(packed, s, rows) for blk in self.blocks]
        kv = [k_v for k_v, _, _ in per_block]                                           # depth x [total, H, Dh] x 2
        sync_mod = [m.view(B, num_frames, 6, D) for _, m, _ in per_block]               # depth x [B, T, 6, D]
        norm_w = [w for _, _, w in per_block]                                           # depth x ([2, Dh], [Dh])
        final_sync_mod = per_token_linear(self.final_ada_sync, s, rows).view(B, num_frames, 2, D)  # [B, T, 2, D]
        prep = PreparedConditions(
            kv=kv, cu_seqlens_k=cu, max_seqlen_k=max_k, sync_mod=sync_mod, final_sync_mod=final_sync_mod,
            norm_w=norm_w,
            duration_emb=self.duration_embed(cond.duration.to(dev)),
            rope=torch.view_as_real(rope_table(num_frames, cfg.head_dim, cfg.rope_base, dev)).contiguous(),
            ones=torch.ones(B, 1, D, device=dev, dtype=dt), zeros=torch.zeros(B, 1, D, device=dev, dtype=dt),
            batch_size=B, num_frames=num_frames,
            key_mask=self.frame_mask(cond.duration, num_frames) if bucketed else None)
        return prep.for_sampling() if sampling else prep

    def frame_mask(self, duration: Tensor, num_frames: int) -> Tensor:
        """bool [B, num_frames]: True on the frames of each row's own duration (seconds [B])."""
        # durations arrive as fp32 (Conditions.duration): a tolerance past its rounding, well under a frame
        frames = torch.ceil(duration.to(self.device, torch.float64) * self.config.latent_rate - 1e-4).clamp(min=1)
        return torch.arange(num_frames, device=self.device)[None, :] < frames[:, None]

    def _check_conditions(self, cond: Conditions, num_frames: int, values: bool = True) -> None:
        """Shapes always; values (NaN, lengths; host syncs) unless ``values`` is False."""
        cfg = self.config
        if values:
            cond.validate()
        else:
            cond.validate_shapes()
        for name, t, want in (("text_tokens", cond.text_tokens, cfg.text_dim),
                              ("video_tokens", cond.video_tokens, cfg.video_dim),
                              ("sync", cond.sync, cfg.sync_dim)):
            if t.shape[2] != want:
                raise ValueError(f"Conditions.{name} has {t.shape[2]} channels but the model expects {want} "
                                 f"(DiTConfig.{name.split('_')[0]}_dim)")
        if not values:
            if cond.text_tokens.shape[1] > cfg.max_text_tokens:
                raise ValueError(f"text is padded to {cond.text_tokens.shape[1]} tokens; the model takes at most "
                                 f"{cfg.max_text_tokens} (DiTConfig.max_text_tokens)")
        elif cond.batch_size and int(cond.text_lens.max()) > cfg.max_text_tokens:
            raise ValueError(f"text has {int(cond.text_lens.max())} tokens; the model takes at most "
                             f"{cfg.max_text_tokens} (DiTConfig.max_text_tokens)")
        if cond.video_tokens.shape[1] > cfg.max_video_tokens:
            raise ValueError(f"video has {cond.video_tokens.shape[1]} semantic tokens; the model takes at most "
                             f"{cfg.max_video_tokens} ({cfg.max_duration} s at {cfg.video_rate}/s): generate "
                             "longer audio in windows (Omni2SoundPipeline.generate does)")
        if num_frames <= 0:
            raise ValueError(f"num_frames must be positive, got {num_frames}")

    # -- once per denoising step ---------------------------------------------------------------------
    def predict_velocity(self, x_t: Tensor, t: Tensor, prep: PreparedConditions) -> Tensor:
        """x_t [B, T, C], t [B] in [0, 1] -> velocity [B, T, C]. No host synchronisation."""
        B, T, _ = x_t.shape
        if B != prep.batch_size or T != prep.num_frames:
            raise ValueError(f"x_t is [B={B}, T={T}] but the conditions were prepared for "
                             f"[B={prep.batch_size}, T={prep.num_frames}]")
        D = self.config.hidden_dim
        c = F.silu(self.t_embed(t) + prep.duration_emb)                                  # [B, D]
        # Every block's modulation is sync_mod[i] (per token, per request) + t_mod (per sample, per step); the
        # fused ops take the two as a pair and add them as they load them (summing first would write and read a
        # [6, B, T, D] tensor per block and step). Each is split once (see PreparedConditions.sync_mod).
        t_mod = [m[:, None] for m in self.t_mod(c).view(B, 6, D).unbind(1)]               # 6 x [B, 1, D]
        final_t = [m[:, None] for m in self.final_ada_t(c).view(B, 2, D).unbind(1)]       # 2 x [B, 1, D]
        tok = [m.unbind(2) for m in prep.sync_mod] + [prep.final_sync_mod.unbind(2)]      # 6 (2) x [B, T, D]
        per = [t_mod] * len(prep.sync_mod) + [final_t]

        x = self.x_embed(x_t.to(self.dtype))                                              # [B, T, D]
        y = ops.adaln_modulate(x, (tok[0][0], t_mod[0]), (tok[0][1], t_mod[1]),
                               self.config.norm_eps)                                      # LN(x)(1+scale)+shift
        for i, blk in enumerate(self.blocks):
            nxt_shift, nxt_scale = (tok[i + 1][0], per[i + 1][0]), (tok[i + 1][1], per[i + 1][1])
            x, y = blk(x, y, tok[i], t_mod, nxt_shift, nxt_scale, prep.kv[i], prep, prep.norm_w[i])
        return dense(self.final, y)                                                       # [B, T, C]

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditions) -> Tensor:
        """Both phases: x_t [B, T, C], t [B], conditions -> velocity [B, T, C]."""
        return self.predict_velocity(x_t, t, self.prepare_conditions(cond, x_t.shape[1]))

    # -- checkpoints: config.json + model.safetensors -------------------------------------------------
    def save_pretrained(self, directory: str) -> None:
        from safetensors.torch import save_file
        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda p: save_file(state, p))
        atomic_write(os.path.join(directory, CONFIG_NAME), self.config.to_json())

    @classmethod
    def from_pretrained(cls, directory: str, device=None, dtype: Optional[torch.dtype] = None) -> "Omni2SoundDiT":
        """Load from ``directory``/config.json + model.safetensors, checking every tensor's name and shape."""
        cfg_path, w_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
        for p in (cfg_path, w_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"Omni2SoundDiT.from_pretrained: missing {p}")
        cfg = read_config(cfg_path, DiTConfig)
        with torch.device("meta"):
            model = cls(cfg)
        state = load_safetensors(w_path)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{w_path}: missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                             f"unexpected tensors {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        for k, v in expected.items():
            if tuple(state[k].shape) != tuple(v.shape):
                raise ValueError(f"{w_path}: tensor {k!r} has shape {tuple(state[k].shape)}, "
                                 f"the config expects {tuple(v.shape)}")
        model.load_state_dict(state, assign=True)
        return model.to(device=device, dtype=dtype)

