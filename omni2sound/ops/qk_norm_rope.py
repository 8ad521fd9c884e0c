"""Fused q/k RMSNorm + rotary position embedding of the DiT's self-attention (QK-norm, as in SD3 / Flux /
MMAudio, then RoPE over latent frames), and the same RMSNorm alone for the cross-attention's q and k.

    qk [B, T, G, H, Dh]    G = 2: q heads (j = 0) and k heads (j = 1) of the fused qkv projection, frame t;
                           G = 1: one group of heads (the cross-attention's q, or its condition tokens' k)
    weight [G, Dh]         each group's norm weight
    cs [T, Dh / 2, 2]      fp32 (cos, sin) of each frame's angle per pair (``torch.view_as_real`` of RoPE's
                           complex table; a constant: it gets no gradient), or None: no rotation

    n = x * rstd * weight[j],  rstd = 1 / sqrt(mean_d(x^2) + eps)           (per head row, fp32)
    y[2i] = n[2i] cos - n[2i+1] sin,   y[2i+1] = n[2i] sin + n[2i+1] cos    (complex multiply by e^{i angle})

Why fused: unfused, a self-attention layer spends a norm kernel, two casts, a complex multiply and a cast-back on
q and k, each a full pass over [B, T, 2, H, Dh] (an H100 profile of L sampling: 13% of the step in the q/k norm
alone, more in RoPE's casts). Fused it is one read of q/k and one write, fp32 inside with one rounding at the end.
Input: any strides with a unit last stride (the q/k slice of the qkv projection goes in without a copy).
Output: contiguous [B, T, G, H, Dh] in qk's dtype (fp32, fp16, bf16).
The cross-attention's q norm runs on bf16 activations in training: unfused (torch's rms_norm on the CPU, or CUDA
autocast's fp32 rms_norm with its casts) it was the largest non-GEMM traffic of an L training step after the
casts (`python bench/bench_train.py --audit`).

Backward (R = the rotation, xhat = x * rstd):
    gn = R^T dy;   dweight[j] = sum over (b, t, h) of gn * xhat;   dx = rstd * (gn w - xhat * mean_d(gn w xhat))

File order (Liger's): reference, backend registration, custom ops (forward, backward, fake, autograd),
public function.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _native
from ._checks import OpInputError, real, tensor
from ._dispatch import autocast_inputs, direct_call, register_op, select_backend, triton_available

# ----------------------------------------------------------------------------------------------------
# Reference (plain PyTorch; fp32 math, output in the input dtype)
# ----------------------------------------------------------------------------------------------------


def qk_norm_rope_reference(qk: Tensor, weight: Tensor, cs: Optional[Tensor], eps: float = 1e-6) -> Tensor:
    """The math at the top in plain PyTorch, differentiable through autograd. It is the chain the model ran before
    the fused op (norm in the input dtype with fp32 statistics, the weight, RoPE as one complex multiply in fp32):
    the fewest passes plain PyTorch needs, so a GPU that keeps this default loses nothing to the fused op's arrival."""
    Dh = qk.shape[-1]
    n = F.rms_norm(qk, (Dh,), None, eps) * weight.to(qk.dtype)[:, None, :]                      # [B, T, G, H, Dh]
    if cs is None:
        return n.to(qk.dtype)
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
# GPU default: Triton, measured on an H200 (2026-12-04, bench/RESULTS.md): L sampling 99.5 -> 77.6 ms (25 steps),
# the graphed L training step 179.5 -> 152.6 ms; fwd+bwd 2.1-2.8x eager at the training shapes. The reference is
# the fallback where Triton is missing.
register_op("qk_norm_rope", _AVAILABLE, default_order={"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")})


def _params(qk: Tensor, w32: Tensor, cs: Optional[Tensor], out: Tensor, eps: float):
    """The C++ kernels' parameters (csrc/qk_norm_rope.h); out is y (forward) or dx (backward)."""
    P = _native.lib().QKParams()
    P.B, P.T, P.G, P.H, P.Dh = qk.shape
    P.sb, P.st, P.sj, P.sh = qk.stride(0), qk.stride(1), qk.stride(2), qk.stride(3)
    P.x, P.w, P.cs, P.y = qk.data_ptr(), w32.data_ptr(), _native.ptr(cs), out.data_ptr()
    P.eps, P.dtype = float(eps), _native.dtype_code(qk)
    return P


def _forward_native(qk: Tensor, w32: Tensor, cs: Optional[Tensor], eps: float, backend: str) -> Tensor:
    B, T, G, H, Dh = qk.shape
    y = torch.empty(B, T, G, H, Dh, device=qk.device, dtype=qk.dtype)
    if y.numel() == 0:
        return y
    if backend == "triton":
        from omni2sound.kernels import qk_norm_rope as tk

        tk.qk_norm_rope_forward(qk, w32, cs, y, eps)
        return y
    _native.lib().qk_norm_rope_forward_cpu(_params(qk, w32, cs, y, eps))
    return y


def _backward_native(dy: Tensor, qk: Tensor, w32: Tensor, cs: Optional[Tensor], eps: float, backend: str
                     ) -> Tuple[Tensor, Tensor]:
    B, T, G, H, Dh = qk.shape
    dx = torch.empty(B, T, G, H, Dh, device=qk.device, dtype=qk.dtype)
    if dx.numel() == 0:
        return dx, torch.zeros(G, Dh, device=qk.device, dtype=torch.float32)
    if backend == "triton":
        from omni2sound.kernels import qk_norm_rope as tk

        return dx, tk.qk_norm_rope_backward(dy, qk, w32, cs, dx, eps)
    # per-token partials, summed here: a deterministic two-level reduction
    dw_tok = torch.empty(B * T, G, Dh, device=qk.device, dtype=torch.float32)
    P = _params(qk, w32, cs, dx, eps)
    P.dy, P.dw_tok = dy.data_ptr(), dw_tok.data_ptr()
    _native.lib().qk_norm_rope_backward_cpu(P)
    return dx, dw_tok.sum(0)


# ----------------------------------------------------------------------------------------------------
# Custom ops (opaque to autograd and torch.compile; the backend is an explicit argument)
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("omni2sound::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(qk: Tensor, weight: Tensor, cs: Optional[Tensor], eps: float, backend: str) -> Tensor:
    return _forward_native(qk, weight.float().contiguous(), cs, eps, backend)


@_qk_norm_rope_op.register_fake
def _(qk, weight, cs, eps, backend):
    return qk.new_empty(qk.shape)


@torch.library.custom_op("omni2sound::qk_norm_rope_backward", mutates_args=())
def _qk_norm_rope_backward_op(dy: Tensor, qk: Tensor, weight: Tensor, cs: Optional[Tensor], eps: float,
                              backend: str) -> Tuple[Tensor, Tensor]:
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


def qk_norm_rope(qk: Tensor, weight: Tensor, cs: Optional[Tensor], eps: float = 1e-6) -> Tensor:
    """RMSNorm each head row of each group with its group's weight, then rotate by RoPE (cs None: no rotation);
    returns contiguous [B, T, G, H, Dh].

    qk ``[B, T, G, H, Dh]`` (G = 1 or 2, unit last stride), weight ``[G, Dh]``, cs fp32 ``[T, Dh / 2, 2]`` (cos, sin)
    or None.
    """
    tensor("qk_norm_rope", "qk", qk)
    tensor("qk_norm_rope", "weight", weight)
    tensor("qk_norm_rope", "cs", cs, optional=True)
    real("qk_norm_rope", "eps", eps, minimum=0.0)
    if qk.dim() != 5 or qk.shape[2] not in (1, 2):
        raise OpInputError(f"qk_norm_rope: qk must be [B, T, G, H, Dh] with G = 1 or 2, got shape {tuple(qk.shape)}")
    B, T, G, H, Dh = qk.shape
    if H < 1 or Dh < 1:
        raise OpInputError(f"qk_norm_rope: need H >= 1 heads of Dh >= 1, got qk of shape {tuple(qk.shape)}")
    if not weight.is_floating_point():
        raise OpInputError(f"qk_norm_rope: weight must be a floating tensor, got {weight.dtype}")
    if cs is not None and Dh % 2:
        raise OpInputError(f"qk_norm_rope: the head dim must be even for RoPE's pairs, got {Dh}")
    if qk.dtype not in _native.DTYPE_CODES:
        raise OpInputError(f"qk_norm_rope: qk must be float32, float16 or bfloat16, got {qk.dtype}")
    if tuple(weight.shape) != (G, Dh):
        raise OpInputError(f"qk_norm_rope: weight must be [G={G}, Dh={Dh}], got shape {tuple(weight.shape)}")
    if cs is not None and (tuple(cs.shape) != (T, Dh // 2, 2) or cs.dtype != torch.float32):
        raise OpInputError(f"qk_norm_rope: cs must be float32 [T={T}, Dh/2={Dh // 2}, 2], got "
                         f"{cs.dtype} {tuple(cs.shape)}")
    if weight.device != qk.device or (cs is not None and cs.device != qk.device):
        raise OpInputError(f"qk_norm_rope: weight and cs must be on qk's device {qk.device}")
    if cs is not None and cs.requires_grad:
        raise OpInputError("qk_norm_rope: cs (the RoPE table) is a constant and cannot require grad")
    (qk,) = autocast_inputs(qk.device, qk)
    backend = select_backend("qk_norm_rope", qk.device)
    if backend == "reference":
        return qk_norm_rope_reference(qk, weight, cs, eps)
    if qk.stride(4) != 1:
        qk = qk.contiguous()
    cs = None if cs is None else cs.contiguous()
    if direct_call(qk, weight, cs):
        return _forward_native(qk, weight.float().contiguous(), cs, float(eps), backend)
    return _qk_norm_rope_op(qk, weight, cs, float(eps), backend)


def head_rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm of each head row: x ``[N, T, H, Dh]`` (or ``[N, H, Dh]``; unit last stride, other strides free),
    weight ``[Dh]`` -> contiguous, x's shape. The cross-attention's q (and its condition tokens' k) norm, through the
    fused op with one group and no rotation."""
    tensor("head_rms_norm", "x", x)
    tensor("head_rms_norm", "weight", weight, dims=(1,), shape="[Dh]")
    if x.dim() == 3:
        return head_rms_norm(x[None], weight, eps)[0]
    if x.dim() != 4:
        raise OpInputError(f"head_rms_norm: x must be [N, T, H, Dh] or [N, H, Dh], got shape {tuple(x.shape)}")
    return qk_norm_rope(x.unsqueeze(2), weight[None], None, eps).squeeze(2).contiguous()   # (reference: a no-op)
