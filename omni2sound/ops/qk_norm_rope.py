"""Fused q/k RMSNorm + rotary position embedding of the DiT's self-attention (QK-norm, as in SD3 / Flux /
MMAudio, then RoPE over latent frames).

    qk [B, T, 2, H, Dh]    q heads (j = 0) and k heads (j = 1) of the fused qkv projection, frame t
    weight [2, Dh]         the q norm's and the k norm's weight
    cs [T, Dh / 2, 2]      fp32 (cos, sin) of each frame's angle per pair (``torch.view_as_real`` of RoPE's
                           complex table; a constant: it gets no gradient)

    n = x * rstd * weight[j],  rstd = 1 / sqrt(mean_d(x^2) + eps)           (per head row, fp32)
    y[2i] = n[2i] cos - n[2i+1] sin,   y[2i+1] = n[2i] sin + n[2i+1] cos    (complex multiply by e^{i angle})

Why fused: unfused, a self-attention layer spends a norm kernel, two casts, a complex multiply and a cast-back on
q and k, each a full pass over [B, T, 2, H, Dh] (an H100 profile of L sampling: 13% of the step in the q/k norm
alone, more in RoPE's casts). Fused it is one read of q/k and one write, fp32 inside with one rounding at the end.
Input: any strides with a unit last stride (the q/k slice of the qkv projection goes in without a copy).
Output: contiguous [B, T, 2, H, Dh] in qk's dtype (fp32, fp16, bf16).

Backward (R = the rotation, xhat = x * rstd):
    gn = R^T dy;   dweight[j] = sum over (b, t, h) of gn * xhat;   dx = rstd * (gn w - xhat * mean_d(gn w xhat))

File order (Liger's): reference, backend registration, custom ops (forward, backward, fake, autograd),
public function.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _native
from ._dispatch import autocast_inputs, register_op, select_backend, triton_available

# ----------------------------------------------------------------------------------------------------
# Reference (plain PyTorch; fp32 math, output in the input dtype)
# ----------------------------------------------------------------------------------------------------


def qk_norm_rope_reference(qk: Tensor, weight: Tensor, cs: Tensor, eps: float = 1e-6) -> Tensor:
    """The math at the top in plain PyTorch, differentiable through autograd. It is the chain the model ran before
    the fused op (norm in the input dtype with fp32 statistics, the weight, RoPE as one complex multiply in fp32):
    the fewest passes plain PyTorch needs, so a GPU that keeps this default loses nothing to the fused op's arrival."""
    Dh = qk.shape[-1]
    n = F.rms_norm(qk, (Dh,), None, eps) * weight.to(qk.dtype)[:, None, :]                      # [B, T, 2, H, Dh]
    xc = torch.view_as_complex(n.float().reshape(*n.shape[:-1], Dh // 2, 2))                    # [..., Dh/2]
    cis = torch.view_as_complex(cs.float().contiguous())[None, :, None, None, :]                # [1, T, 1, 1, Dh/2]
    return torch.view_as_real(xc * cis).flatten(-2).to(qk.dtype)


# ----------------------------------------------------------------------------------------------------
# Backends: C++ on the CPU, Triton on a GPU. No CUDA C++ kernel: Triton's per-token tile is the whole op.
# ----------------------------------------------------------------------------------------------------

_AVAILABLE = {
    "reference": lambda d: True,
    "cpu": lambda d: d.type == "cpu" and _native.has_cpu() and _native.has_symbol("qk_norm_rope_forward_cpu"),
    "triton": lambda d: triton_available(d.type),
}
# On a GPU the default stays the reference until the Triton kernel has been run and timed on one (it has been
# checked against the reference only under TRITON_INTERPRET=1 so far); use_backend(qk_norm_rope="triton") or
# OMNI2SOUND_BACKEND picks it explicitly.
register_op("qk_norm_rope", _AVAILABLE, default_order={"cuda": ("reference",), "cpu": ("cpu", "reference")})


def _strides(qk: Tensor) -> tuple:
    return qk.stride(0), qk.stride(1), qk.stride(2), qk.stride(3)


def _forward_native(qk: Tensor, w32: Tensor, cs: Tensor, eps: float, backend: str) -> Tensor:
    B, T, _, H, Dh = qk.shape
    y = torch.empty(B, T, 2, H, Dh, device=qk.device, dtype=qk.dtype)
    if y.numel() == 0:
        return y
    if backend == "triton":
        from omni2sound.kernels import qk_norm_rope as tk

        tk.qk_norm_rope_forward(qk, w32, cs, y, eps)
        return y
    _native.lib().qk_norm_rope_forward_cpu(B, T, H, Dh, *_strides(qk), qk.data_ptr(), w32.data_ptr(), cs.data_ptr(),
                                           y.data_ptr(), float(eps), _native.dtype_code(qk))
    return y


def _backward_native(dy: Tensor, qk: Tensor, w32: Tensor, cs: Tensor, eps: float, backend: str
                     ) -> Tuple[Tensor, Tensor]:
    B, T, _, H, Dh = qk.shape
    dx = torch.empty(B, T, 2, H, Dh, device=qk.device, dtype=qk.dtype)
    if dx.numel() == 0:
        return dx, torch.zeros(2, Dh, device=qk.device, dtype=torch.float32)
    if backend == "triton":
        from omni2sound.kernels import qk_norm_rope as tk

        return dx, tk.qk_norm_rope_backward(dy, qk, w32, cs, dx, eps)
    # per-token partials, summed here: a deterministic two-level reduction
    dw_tok = torch.empty(B * T, 2, Dh, device=qk.device, dtype=torch.float32)
    _native.lib().qk_norm_rope_backward_cpu(B, T, H, Dh, *_strides(qk), dy.data_ptr(), qk.data_ptr(), w32.data_ptr(),
                                            cs.data_ptr(), dx.data_ptr(), dw_tok.data_ptr(), float(eps),
                                            _native.dtype_code(qk))
    return dx, dw_tok.sum(0)


# ----------------------------------------------------------------------------------------------------
# Custom ops (opaque to autograd and torch.compile; the backend is an explicit argument)
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("omni2sound::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(qk: Tensor, weight: Tensor, cs: Tensor, eps: float, backend: str) -> Tensor:
    return _forward_native(qk, weight.float().contiguous(), cs, eps, backend)


@_qk_norm_rope_op.register_fake
def _(qk, weight, cs, eps, backend):
    return qk.new_empty(qk.shape)


@torch.library.custom_op("omni2sound::qk_norm_rope_backward", mutates_args=())
def _qk_norm_rope_backward_op(dy: Tensor, qk: Tensor, weight: Tensor, cs: Tensor, eps: float, backend: str
                              ) -> Tuple[Tensor, Tensor]:
    return _backward_native(dy, qk, weight.float().contiguous(), cs, eps, backend)


@_qk_norm_rope_backward_op.register_fake
def _(dy, qk, weight, cs, eps, backend):
    return qk.new_empty(qk.shape), weight.new_empty(weight.shape, dtype=torch.float32)


def _setup(ctx, inputs, output):
    qk, weight, cs, eps, backend = inputs
    ctx.save_for_backward(qk, weight, cs)
    ctx.eps, ctx.backend = eps, backend


def _bwd(ctx, dy):
    qk, weight, cs = ctx.saved_tensors
    dx, dw = _qk_norm_rope_backward_op(dy.contiguous(), qk, weight, cs, ctx.eps, ctx.backend)
    return dx, dw.to(weight.dtype), None, None, None


_qk_norm_rope_op.register_autograd(_bwd, setup_context=_setup)


# ----------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------


def qk_norm_rope(qk: Tensor, weight: Tensor, cs: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm each q/k head row with its weight, then rotate by RoPE; returns contiguous [B, T, 2, H, Dh].

    qk ``[B, T, 2, H, Dh]`` (unit last stride), weight ``[2, Dh]``, cs fp32 ``[T, Dh / 2, 2]`` (cos, sin).
    """
    if qk.dim() != 5 or qk.shape[2] != 2:
        raise ValueError(f"qk_norm_rope: qk must be [B, T, 2, H, Dh], got shape {tuple(qk.shape)}")
    B, T, _, H, Dh = qk.shape
    if Dh % 2:
        raise ValueError(f"qk_norm_rope: the head dim must be even for RoPE's pairs, got {Dh}")
    if qk.dtype not in _native.DTYPE_CODES:
        raise TypeError(f"qk_norm_rope: qk must be float32, float16 or bfloat16, got {qk.dtype}")
    if tuple(weight.shape) != (2, Dh):
        raise ValueError(f"qk_norm_rope: weight must be [2, Dh={Dh}], got shape {tuple(weight.shape)}")
    if tuple(cs.shape) != (T, Dh // 2, 2) or cs.dtype != torch.float32:
        raise ValueError(f"qk_norm_rope: cs must be float32 [T={T}, Dh/2={Dh // 2}, 2], got "
                         f"{cs.dtype} {tuple(cs.shape)}")
    if weight.device != qk.device or cs.device != qk.device:
        raise TypeError(f"qk_norm_rope: weight and cs must be on qk's device {qk.device}")
    if cs.requires_grad:
        raise ValueError("qk_norm_rope: cs (the RoPE table) is a constant and cannot require grad")
    (qk,) = autocast_inputs(qk.device, qk)
    backend = select_backend("qk_norm_rope", qk.device)
    if backend == "reference":
        return qk_norm_rope_reference(qk, weight, cs, eps)
    if qk.stride(4) != 1:
        qk = qk.contiguous()
    return _qk_norm_rope_op(qk, weight, cs.contiguous(), float(eps), backend)
