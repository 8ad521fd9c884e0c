"""Multi-head attention in the layout the DiT holds its heads: the self-attention of every block.

    q [B, Tq, H, Dh], k, v [B, Tk, H, Dh]  (any strides with a unit last one: the slices of the fused qkv
                                            projection, no copies)
    out [B, Tq, H, Dh]                       out[b, i, h] = softmax_j(scale q[b, i, h] . k[b, j, h]) v[b, j, h]
    scale = 1 / sqrt(Dh) unless given; statistics and accumulation fp32 for every input dtype.

Backends:
  reference - ``F.scaled_dot_product_attention`` on [B, H, T, Dh] transposed views (aten's flash attention on the
              CPU, FlashAttention / cuDNN on a GPU); its output is returned as the transposed view SDPA leaves.
              Everything that needs a gradient, torch.compile, float64, and every GPU call runs here.
  cpu       - the C++ kernel of ``csrc/attention.cpp``: forward only (no gradient), fp32 / fp16 / bf16, head dims up
              to 128 (256 on AVX-512 builds, 64 on baseline-SSE ones), a contiguous output (the layout the output
              projection reads: no copy after). The CPU default for calls that need no gradient (sampling); a call
              that does (training) runs the reference, as ``ops.linear``'s oneDNN GEMM does.
Why a kernel of ours on the CPU: at the sampling shapes (S: [2, 250, 12, 64]) aten's CPU SDPA ran at 70-120
GFLOP/s on this 2-core box, about half its GEMMs' rate, and attention was 13% of an S sampling step
(``python bench/bench_attention.py``; bench/RESULTS.md). ``ops.cross_attention`` runs its CPU forward on the same
kernel (its varlen form: packed keys, ``cu_seqlens_k``).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _native
from ._dispatch import autocast_inputs, needs_grad, register_op, select_backend

OP = "attention"


@torch.compiler.assume_constant_result
def cpu_max_head_dim() -> int:
    """The largest head dim the C++ forward takes in this build (its register tiles; 0 without the extension)."""
    return int(_native.lib().attention_cpu_max_head_dim()) if _native.has_symbol("attention_cpu_max_head_dim") else 0


def attention_reference(q: Tensor, k: Tensor, v: Tensor, softmax_scale: Optional[float] = None) -> Tensor:
    """SDPA on the head-major views; returns [B, Tq, H, Dh] (a transposed view of SDPA's output)."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=softmax_scale)
    return o.transpose(1, 2)


def cpu_available(device: torch.device) -> bool:
    return device.type == "cpu" and _native.has_cpu() and _native.has_symbol("attention_fwd_cpu")


register_op(OP, {"reference": lambda d: True, "cpu": cpu_available},
            default_order={"cpu": ("cpu", "reference"), "cuda": ("reference",)}, family="attention")


def cpu_kernel_takes(*tensors: Tensor) -> bool:
    """Whether the C++ forward can run these tensors: no gradient needed, not traced by torch.compile, a kernel
    dtype, unit last strides, a head dim the build's tiles take (``cpu_max_head_dim``)."""
    q = tensors[0]
    return (not needs_grad(*tensors) and not torch.compiler.is_compiling() and q.dtype in _native.DTYPE_CODES
            and 0 < q.shape[-1] <= cpu_max_head_dim() and all(t.stride(-1) == 1 for t in tensors))


def attention_cpu(q: Tensor, k: Tensor, v: Tensor, scale: float, cu_seqlens_k: Optional[Tensor] = None,
                  with_lse: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """The C++ forward. Dense keys: k, v [B, Tk, H, Dh]. Packed (varlen) keys: k, v [total_k, H, Dh] with
    ``cu_seqlens_k`` int32 [B + 1] (sample b's keys at rows cu[b]:cu[b+1]; none: output 0, lse 0).
    Returns (out [B, Tq, H, Dh] contiguous in q's dtype, lse fp32 [B, H, Tq] or None)."""
    B, Tq, H, Dh = q.shape
    out = torch.empty((B, Tq, H, Dh), dtype=q.dtype)
    lse = torch.empty((B, H, Tq), dtype=torch.float32) if with_lse else None
    if cu_seqlens_k is None:
        Tk, cu, ks, vs = k.shape[1], 0, k.stride()[:3], v.stride()[:3]
    else:
        cu_seqlens_k = cu_seqlens_k.contiguous()
        Tk, cu = 0, cu_seqlens_k.data_ptr()
        ks, vs = (0, k.stride(0), k.stride(1)), (0, v.stride(0), v.stride(1))
    _native.lib().attention_fwd_cpu(B, Tq, Tk, H, Dh, q.data_ptr(), *q.stride()[:3], k.data_ptr(), *ks,
                                    v.data_ptr(), *vs, cu, out.data_ptr(), _native.ptr(lse), float(scale),
                                    _native.dtype_code(q))
    return out, lse


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    where = "omni2sound.ops.attention"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{where}: q, k, v must be [B, T, H, Dh], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, _, H, Dh = q.shape
    if k.shape[0] != B or k.shape[2:] != (H, Dh) or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{where}: k {tuple(k.shape)} and v {tuple(v.shape)} must be [B={B}, Tk, H={H}, Dh] with "
                         f"k's Dh = {Dh}, v's Tk = k's")
    if v.shape[3] != Dh:
        raise ValueError(f"{where}: v's head dim {v.shape[3]} must equal q's {Dh} (this op keeps one head dim)")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{where}: {name} ({t.dtype}, {t.device}) must match q ({q.dtype}, {q.device})")


def attention(q: Tensor, k: Tensor, v: Tensor, softmax_scale: Optional[float] = None) -> Tensor:
    """softmax(q k^T scale) v per (sample, head) for q [B, Tq, H, Dh], k, v [B, Tk, H, Dh] -> [B, Tq, H, Dh]
    (see the module docstring). No keys at all (Tk = 0) is left to the reference."""
    q, k, v = autocast_inputs(q.device, q, k, v)
    _check(q, k, v)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if select_backend(OP, q.device) == "cpu" and cpu_kernel_takes(q, k, v) and k.shape[1] > 0:
        return attention_cpu(q, k, v, scale)[0]
    return attention_reference(q, k, v, scale)
