"""flash-attn as a backend (``flash``) of ``attention`` and ``cross_attention``, where the package is installed.

    attention        q [B, T, H, D], k, v [B, Tk, H, D]      -> flash_attn_func (the DiT's layout, no transposes)
    cross_attention  q [B, Lq, H, D], packed k, v [total_k, H, D], cu_seqlens_k [B + 1]
                     -> flash_attn_varlen_func with the queries packed dense ([B Lq, H, D], cu_seqlens_q = b Lq);
                     only K/V are ragged, and samples without keys are set to 0 (this op's contract) whatever the
                     library writes for them.

The module is FlashAttention-3's ``flash_attn_interface`` (Hopper) where importable, else FlashAttention-2's
``flash_attn``. fp16 / bf16 only, head dims multiples of 8 up to 256; gradients through the library's own backward.
Not a default: ``use_backend(attention="flash")`` / ``use_backend(cross_attention="flash")`` select it (and
``OMNI2SOUND_BACKEND=attention=flash``); it becomes a default only by measurement against our Triton kernel and SDPA
(``bench/bench_attention.py``, ``bench/bench_cross_attention.py`` time every available backend).
"""
from __future__ import annotations

import functools
import importlib
from typing import Optional, Tuple

import torch
from torch import Tensor

# the first module that imports wins
MODULES = ("flash_attn_interface", "flash_attn")


@functools.lru_cache(maxsize=None)
def flash_module() -> Optional[Tuple[str, object]]:
    """(name, module) of the flash-attn package in this process, or None (looked up once)."""
    for name in MODULES:
        try:
            return name, importlib.import_module(name)
        except Exception:         # not installed, or built for another torch / CUDA: not available
            continue
    return None


@torch.compiler.assume_constant_result          # checked inside compiled steps: a constant to Dynamo, never traced
def flash_available(device: torch.device) -> bool:
    return device.type == "cuda" and flash_module() is not None


def flash_takes(q: Tensor) -> bool:
    """Whether flash-attn's kernels take q's dtype and head dim."""
    D = q.shape[-1]
    return q.dtype in (torch.float16, torch.bfloat16) and 0 < D <= 256 and D % 8 == 0


def _first(out):
    return out[0] if isinstance(out, tuple) else out           # FA3 returns (out, lse)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """[B, T, H, D] softmax(q k^T scale) v through ``flash_attn_func``."""
    _, mod = flash_module()
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _first(mod.flash_attn_func(q, k, v, softmax_scale=scale))


def flash_cross_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_k: Tensor, max_seqlen_k: int,
                          scale: float) -> Tensor:
    """[B, Lq, H, D] varlen cross-attention through ``flash_attn_varlen_func`` (module docstring)."""
    _, mod = flash_module()
    B, Lq, H, D = q.shape
    if q.numel() == 0 or k.shape[0] == 0 or max_seqlen_k == 0:
        return q.new_zeros(B, Lq, H, D)
    cu_k = cu_seqlens_k.to(torch.int32)
    cu_q = torch.arange(0, (B + 1) * Lq, Lq, dtype=torch.int32, device=q.device)            # dense queries
    out = _first(mod.flash_attn_varlen_func(q.reshape(B * Lq, H, D).contiguous(), k.contiguous(), v.contiguous(),
                                            cu_q, cu_k, Lq, max_seqlen_k, softmax_scale=scale))
    has_keys = (cu_k[1:] > cu_k[:-1])[:, None, None, None]                                 # [B, 1, 1, 1]
    return torch.where(has_keys, out.view(B, Lq, H, D), out.new_zeros(()))
