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
Non-finite input: NaN / inf keys and values propagate as in SDPA; a NaN or inf query makes its output row NaN in
the C++ kernel, where aten's CPU SDPA (the reference) can return a finite row.
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
from ._checks import KERNEL_DTYPES, fail, real, tensor
from ._dispatch import autocast_inputs, cannot_take, forced_backend, needs_grad, register_op, select_backend
from .flash import flash_attention, flash_available, flash_takes

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


register_op(OP, {"reference": lambda d: True, "cpu": cpu_available, "flash": flash_available},
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
    P = _native.lib().AttnParams()
    P.B, P.Tq, P.H, P.Dh, P.scale, P.dtype = B, Tq, H, Dh, float(scale), _native.dtype_code(q)
    P.q, P.k, P.v, P.out, P.lse = q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), _native.ptr(lse)
    P.q_sb, P.q_st, P.q_sh = q.stride()[:3]
    if cu_seqlens_k is None:
        P.Tk = k.shape[1]
        P.k_sb, P.k_st, P.k_sh = k.stride()[:3]
        P.v_sb, P.v_st, P.v_sh = v.stride()[:3]
    else:
        cu_seqlens_k = cu_seqlens_k.contiguous()
        P.cu, P.Nk = cu_seqlens_k.data_ptr(), k.shape[0]
        P.k_st, P.k_sh, P.v_st, P.v_sh = k.stride(0), k.stride(1), v.stride(0), v.stride(1)
    _native.lib().attention_fwd_cpu(P)
    return out, lse


# ----------------------------------------------------------------------------------------------------
# Custom op (opaque to autograd and torch.compile; the backend is an explicit argument). The default dispatch runs
# the C++ forward directly only where no gradient is needed and nothing traces the call; a forced ``cpu`` backend
# runs it through this op in every case, its backward recomputing the reference's (SDPA's) gradients.
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("omni2sound::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, backend: str) -> Tensor:
    if backend == "cpu":
        return attention_cpu(q, k, v, softmax_scale)[0]
    return attention_reference(q, k, v, softmax_scale).contiguous()


@_attention_op.register_fake
def _(q, k, v, softmax_scale, backend):
    return q.new_empty(q.shape)


@torch.library.custom_op("omni2sound::attention_backward", mutates_args=())
def _attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, softmax_scale: float
                           ) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) at (q, k, v) in fp32 math (the scores again, then P = softmax(S)):
    dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dP P)), dQ = dS K s, dK = dS^T Q s."""
    qf, kf, vf, df = q.float(), k.float(), v.float(), dout.float()
    p = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", qf, kf) * softmax_scale, dim=-1)      # [B, H, Tq, Tk]
    dv = torch.einsum("bhqk,bqhd->bkhd", p, df)
    dp = torch.einsum("bqhd,bkhd->bhqk", df, vf)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, kf) * softmax_scale
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, qf) * softmax_scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@_attention_backward_op.register_fake
def _(dout, q, k, v, softmax_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v, softmax_scale, backend = inputs
    ctx.save_for_backward(q, k, v)
    ctx.softmax_scale = softmax_scale


def _backward(ctx, dout):
    q, k, v = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(dout.contiguous(), q, k, v, ctx.softmax_scale)
    return dq, dk, dv, None, None


_attention_op.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------


def _check(q: Tensor, k: Tensor, v: Tensor, softmax_scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        tensor(OP, name, t, dims=(4,), shape="[B, T, H, Dh]")
    tensor(OP, "q", q, dtypes=KERNEL_DTYPES + (torch.float64,))
    tensor(OP, "k", k, like=q, like_name="q")
    tensor(OP, "v", v, like=q, like_name="q")
    B, _, H, Dh = q.shape
    if Dh < 1:
        fail(OP, f"the head dim must be >= 1, got q of shape {tuple(q.shape)}")
    if k.shape[0] != B or k.shape[2:] != (H, Dh) or v.shape[:3] != k.shape[:3]:
        fail(OP, f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [B={B}, Tk, H={H}, Dh] with k's Dh = {Dh}, "
                 "v's Tk = k's")
    if v.shape[3] != Dh:
        fail(OP, f"v's head dim {v.shape[3]} must equal q's {Dh} (this op keeps one head dim)")
    real(OP, "softmax_scale", softmax_scale, optional=True)


def attention(q: Tensor, k: Tensor, v: Tensor, softmax_scale: Optional[float] = None,
              key_mask: Optional[Tensor] = None) -> Tensor:
    """softmax(q k^T scale) v per (sample, head) for q [B, Tq, H, Dh], k, v [B, Tk, H, Dh] -> [B, Tq, H, Dh]
    (see the module docstring). No keys at all (Tk = 0) is left to the reference.

    key_mask: None, or bool [B, Tk], True on the keys each sample attends to (a batch of sequences padded to one
    length: the padding's keys are left out, so each real row is what it would be unpadded). Masked calls run the
    reference (SDPA with a boolean mask); every sample needs at least one True key."""
    tensor(OP, "q", q)
    q, k, v = autocast_inputs(q.device, q, k, v)
    _check(q, k, v, softmax_scale)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if key_mask is not None:
        tensor(OP, "key_mask", key_mask, dims=(2,), shape="[B, Tk]", dtypes=(torch.bool,), like=q, like_name="q",
               same_dtype=False)
        if tuple(key_mask.shape) != (q.shape[0], k.shape[1]):
            fail(OP, f"key_mask must be [B={q.shape[0]}, Tk={k.shape[1]}], got {tuple(key_mask.shape)}")
        if forced_backend(OP) == "cpu":
            raise cannot_take(OP, "cpu", "the C++ kernel has no key mask")
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=key_mask[:, None, None, :], scale=scale)
        return o.transpose(1, 2)
    backend = select_backend(OP, q.device)
    if backend == "flash":
        if flash_takes(q) and k.shape[1] > 0:
            return flash_attention(q, k, v, scale)
        raise cannot_take(OP, "flash", f"flash-attn takes float16 / bfloat16, head dims multiples of 8 up to 256 "
                                       f"and at least one key; got {q.dtype}, q {tuple(q.shape)}, k {tuple(k.shape)}")
    if backend == "cpu":
        if cpu_kernel_takes(q, k, v) and k.shape[1] > 0:
            return attention_cpu(q, k, v, scale)[0]
        if forced_backend(OP) == "cpu":
            if q.dtype not in _native.DTYPE_CODES or q.shape[-1] > cpu_max_head_dim() or k.shape[1] == 0:
                raise cannot_take(OP, "cpu", f"the C++ kernel takes float32 / float16 / bfloat16, head dims up to "
                                             f"{cpu_max_head_dim()} and at least one key; got {q.dtype}, q "
                                             f"{tuple(q.shape)}, k {tuple(k.shape)}")
            q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
            return _attention_op(q, k, v, scale, "cpu")
    return attention_reference(q, k, v, scale)
