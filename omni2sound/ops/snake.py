"""Snake activation of the audio VAE (Ziyin et al. 2020; SnakeBeta of BigVGAN / Oobleck), fused with the
residual add that precedes it in every decoder residual unit.

    snake(x, alpha, beta)                      y = x + 1 / (beta + eps) * sin^2(alpha * x)
    snake_residual(x, alpha, beta, residual)   s = x + residual
                                               y = snake(s, alpha, beta)               -> (s, y)

Fused boundary: in the Oobleck decoder every residual add ``x_{k+1} = x_k + conv1x1(...)`` is followed at once
by a Snake (the next residual unit's first Snake, the next upsampling block's Snake or the output Snake). So the
fused op takes the 1x1 conv's output ``x`` and the running residual, and returns both the new residual ``s``
(needed by the next unit's add) and ``snake(s)`` (the next conv's input): one read of two tensors, one write of
two, instead of six elementwise passes in eager PyTorch.

Shapes: x, residual ``[B, C, T]``; alpha, beta per channel ``[C]`` (``[1, C, 1]`` is accepted and viewed as
``[C]``). Layout: contiguous ``[B, C, T]``; the C++ backend also runs channels-last tensors (stored ``[B, T, C]``,
the VAE's fast CPU decode) in place and returns outputs in the same layout; other backends make x contiguous.
alpha and beta are the activation's values, not their logarithms (the VAE stores log-scale parameters
and exponentiates them; see ``omni2sound.vae.Snake``). Math is fp32; outputs in x's dtype (fp32/fp16/bf16).

Backward (q = 1 / (beta + eps)):
    dy/ds     = 1 + q * alpha * sin(2 alpha s)
    dalpha    = sum_{b,t} dy * q * s * sin(2 alpha s)
    dbeta     = -sum_{b,t} dy * q^2 * sin^2(alpha s)
    ds        = dy * dy/ds + ds_out (gradient reaching the s output);  dx = dresidual = ds

File order (Liger's): reference, backend registration, custom ops (forward, backward, fake, autograd),
public functions.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _native
from ._checks import OpInputError, real, tensor
from ._dispatch import register_op, select_backend, triton_available

# ----------------------------------------------------------------------------------------------------
# Reference (plain PyTorch; fp32 math, output in the input dtype)
# ----------------------------------------------------------------------------------------------------


def snake_reference(x: Tensor, alpha: Tensor, beta: Tensor, eps: float = 1e-9) -> Tensor:
    xf = x.float()
    a = alpha.float().reshape(1, -1, 1)
    b = beta.float().reshape(1, -1, 1)
    return (xf + (1.0 / (b + eps)) * torch.sin(a * xf).pow(2)).to(x.dtype)


def snake_residual_reference(x: Tensor, alpha: Tensor, beta: Tensor, residual: Tensor, eps: float = 1e-9
                             ) -> Tuple[Tensor, Tensor]:
    sf = x.float() + residual.float()
    a = alpha.float().reshape(1, -1, 1)
    b = beta.float().reshape(1, -1, 1)
    y = sf + (1.0 / (b + eps)) * torch.sin(a * sf).pow(2)
    return sf.to(x.dtype), y.to(x.dtype)


def _backward_reference(dy: Tensor, ds_out: Optional[Tensor], x: Tensor, residual: Optional[Tensor], alpha: Tensor,
                        beta: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Analytic backward (formulas at the top) at s = x (+ residual) in fp32; dalpha/dbeta in fp32 [C]."""
    sf, g = x.float(), dy.float()
    if residual is not None:
        sf = sf + residual.float()
    a = alpha.float().reshape(1, -1, 1)
    q = 1.0 / (beta.float().reshape(1, -1, 1) + eps)
    sin_, sin2 = torch.sin(a * sf), torch.sin(2 * a * sf)
    ds = g * (1.0 + q * a * sin2)
    if ds_out is not None:
        ds = ds + ds_out.float()
    dalpha = (g * q * sf * sin2).sum((0, 2))
    dbeta = -(g * q * q * sin_ * sin_).sum((0, 2))
    return ds.to(x.dtype), dalpha, dbeta


# ----------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------


def _triton_ok(device: torch.device) -> bool:
    return triton_available(device.type)


_AVAILABLE = {
    "reference": lambda d: True,
    "cpu": lambda d: d.type == "cpu" and _native.has_cpu() and _native.has_symbol("snake_forward_cpu"),
    "cuda": lambda d: d.type == "cuda" and _native.has_cuda() and _native.has_symbol("snake_forward_cuda"),
    "triton": _triton_ok,
}
register_op("snake", _AVAILABLE, family="snake")
register_op("snake_residual", _AVAILABLE, family="snake")


def _forward_native(x: Tensor, residual: Optional[Tensor], alpha: Tensor, beta: Tensor, eps: float, backend: str
                    ) -> Tuple[Optional[Tensor], Tensor]:
    """(s, y) with s = x + residual (None without a residual) and y = snake(s). x, residual contiguous."""
    if backend == "reference":
        if residual is None:
            return None, snake_reference(x, alpha, beta, eps)
        return snake_residual_reference(x, alpha, beta, residual, eps)
    B, C, T = x.shape
    y = torch.empty_like(x)
    s = torch.empty_like(x) if residual is not None else None
    if x.numel() == 0:
        return s, y
    a32, b32 = alpha.float().contiguous(), beta.float().contiguous()
    if backend == "triton":
        from omni2sound.kernels import snake as tk

        tk.snake_forward(x, residual, a32, b32, s, y, eps, channels_last=_is_channels_last(x))
        return s, y
    P = _native.lib().SnakeParams()
    P.B, P.C, P.T, P.eps, P.dtype = B, C, T, float(eps), _native.dtype_code(x)
    P.x, P.residual, P.alpha, P.beta, P.s, P.y = x.data_ptr(), _native.ptr(residual), a32.data_ptr(), b32.data_ptr(), \
        _native.ptr(s), y.data_ptr()
    if backend == "cpu":
        P.channels_last = int(_is_channels_last(x))
        _native.lib().snake_forward_cpu(P)
    else:
        _native.lib().snake_forward_cuda(P, _native.stream_of(x))
    return s, y


def _backward_native(dy: Tensor, ds_out: Optional[Tensor], s: Tensor, residual: Optional[Tensor], alpha: Tensor,
                     beta: Tensor, eps: float, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients at the Snake input s (+ residual): the kernels add x and residual again in fp32 rather than reading
    the rounded s output, so a low-precision backward sees the same value the forward's Snake saw."""
    if backend == "reference":
        return _backward_reference(dy, ds_out, s, residual, alpha, beta, eps)
    dy, s = dy.contiguous(), s.contiguous()      # the backward kernels take [B, C, T] rows
    ds_out = None if ds_out is None else ds_out.contiguous()
    residual = None if residual is None else residual.contiguous()
    B, C, T = s.shape
    ds = torch.empty_like(s)
    if s.numel() == 0:
        z = torch.zeros(C, device=s.device, dtype=torch.float32)
        return ds, z, z.clone()
    a32, b32 = alpha.float().contiguous(), beta.float().contiguous()
    if backend == "triton":
        from omni2sound.kernels import snake as tk

        dalpha, dbeta = tk.snake_backward(dy, ds_out, s, residual, a32, b32, ds, eps)
        return ds, dalpha, dbeta
    # Per-row (b, c) partial sums in fp32, reduced over B here: a deterministic two-level reduction.
    dalpha_rows = torch.empty(B, C, device=s.device, dtype=torch.float32)
    dbeta_rows = torch.empty(B, C, device=s.device, dtype=torch.float32)
    P = _native.lib().SnakeBwdParams()
    P.B, P.C, P.T, P.eps, P.dtype = B, C, T, float(eps), _native.dtype_code(s)
    P.dy, P.ds_out, P.s, P.residual = dy.data_ptr(), _native.ptr(ds_out), s.data_ptr(), _native.ptr(residual)
    P.alpha, P.beta, P.ds = a32.data_ptr(), b32.data_ptr(), ds.data_ptr()
    P.dalpha_rows, P.dbeta_rows = dalpha_rows.data_ptr(), dbeta_rows.data_ptr()
    if backend == "cpu":
        _native.lib().snake_backward_cpu(P)
    else:
        _native.lib().snake_backward_cuda(P, _native.stream_of(s))
    return ds, dalpha_rows.sum(0), dbeta_rows.sum(0)


def _is_channels_last(x: Tensor) -> bool:
    """x [B, C, T] stored as [B, T, C] (a squeezed channels-last [B, C, 1, T]): the VAE's fast CPU decode layout."""
    return x.dim() == 3 and x.shape[1] > 1 and x.shape[2] > 1 and x.stride(1) == 1 and x.transpose(1, 2).is_contiguous()


def _kernel_layout(t: Tensor, backend: str, like: Optional[Tensor] = None) -> Tensor:
    """Contiguous [B, C, T], except that the C++ and the Triton forward kernels also take channels-last as is (then
    ``like``'s layout; the Triton backward converts to contiguous)."""
    if backend in ("cpu", "triton") and _is_channels_last(t if like is None else like):
        return t if _is_channels_last(t) else t.transpose(1, 2).contiguous().transpose(1, 2)
    return t.contiguous()


# ----------------------------------------------------------------------------------------------------
# Custom ops (opaque to autograd and torch.compile; the backend is an explicit argument)
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("omni2sound::snake", mutates_args=())
def _snake_op(x: Tensor, alpha: Tensor, beta: Tensor, eps: float, backend: str) -> Tensor:
    return _forward_native(x, None, alpha, beta, eps, backend)[1]


@_snake_op.register_fake
def _(x, alpha, beta, eps, backend):
    return torch.empty_like(x)


@torch.library.custom_op("omni2sound::snake_residual", mutates_args=())
def _snake_residual_op(x: Tensor, alpha: Tensor, beta: Tensor, residual: Tensor, eps: float, backend: str
                       ) -> Tuple[Tensor, Tensor]:
    return _forward_native(x, residual, alpha, beta, eps, backend)


@_snake_residual_op.register_fake
def _(x, alpha, beta, residual, eps, backend):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("omni2sound::snake_backward", mutates_args=())
def _snake_backward_op(dy: Tensor, x: Tensor, alpha: Tensor, beta: Tensor, eps: float, backend: str
                       ) -> Tuple[Tensor, Tensor, Tensor]:
    return _backward_native(dy, None, x, None, alpha, beta, eps, backend)


@_snake_backward_op.register_fake
def _(dy, x, alpha, beta, eps, backend):
    C = x.shape[1]
    return torch.empty_like(x), x.new_empty(C, dtype=torch.float32), x.new_empty(C, dtype=torch.float32)


@torch.library.custom_op("omni2sound::snake_residual_backward", mutates_args=())
def _snake_residual_backward_op(dy: Tensor, ds_out: Tensor, x: Tensor, residual: Tensor, alpha: Tensor, beta: Tensor,
                                eps: float, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    return _backward_native(dy, ds_out, x, residual, alpha, beta, eps, backend)


@_snake_residual_backward_op.register_fake
def _(dy, ds_out, x, residual, alpha, beta, eps, backend):
    C = x.shape[1]
    return torch.empty_like(x), x.new_empty(C, dtype=torch.float32), x.new_empty(C, dtype=torch.float32)


def _snake_setup(ctx, inputs, output):
    x, alpha, beta, eps, backend = inputs
    ctx.save_for_backward(x, alpha, beta)
    ctx.eps, ctx.backend = eps, backend


def _snake_bwd(ctx, dy):
    x, alpha, beta = ctx.saved_tensors
    dx, dalpha, dbeta = _snake_backward_op(dy.contiguous(), x, alpha, beta, ctx.eps, ctx.backend)
    return dx, dalpha.to(alpha.dtype), dbeta.to(beta.dtype), None, None


_snake_op.register_autograd(_snake_bwd, setup_context=_snake_setup)


def _snake_residual_setup(ctx, inputs, output):
    x, alpha, beta, residual, eps, backend = inputs
    ctx.save_for_backward(x, residual, alpha, beta)
    ctx.eps, ctx.backend = eps, backend


def _snake_residual_bwd(ctx, ds_out, dy):
    x, residual, alpha, beta = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    if ds_out is None:
        ds_out = torch.zeros_like(x)
    ds, dalpha, dbeta = _snake_residual_backward_op(dy.contiguous(), ds_out.contiguous(), x, residual, alpha, beta,
                                                    ctx.eps, ctx.backend)
    return ds, dalpha.to(alpha.dtype), dbeta.to(beta.dtype), ds, None, None


_snake_residual_op.register_autograd(_snake_residual_bwd, setup_context=_snake_residual_setup)


# ----------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------


def _per_channel(name: str, t: Tensor, x: Tensor) -> Tensor:
    tensor("snake", name, t)
    C = x.shape[1]
    if t.dim() == 3 and t.shape[0] == 1 and t.shape[2] == 1:
        t = t.reshape(-1)
    if t.dim() != 1 or t.shape[0] != C:
        raise OpInputError(f"snake: {name} must be per channel [C={C}] or [1, C, 1], got shape {tuple(t.shape)}")
    if t.device != x.device:
        raise OpInputError(f"snake: {name} must be on x's device {x.device}, got {t.device}")
    if not t.is_floating_point():
        raise OpInputError(f"snake: {name} must be a floating tensor, got {t.dtype}")
    return t


def _check_x(x: Tensor, eps) -> None:
    tensor("snake", "x", x)
    real("snake", "eps", eps, minimum=0.0)
    if x.dim() != 3:
        raise OpInputError(f"snake: x must be [B, C, T], got shape {tuple(x.shape)}")
    if x.dtype not in _native.DTYPE_CODES:
        raise OpInputError(f"snake: x must be float32, float16 or bfloat16, got {x.dtype}")


def snake(x: Tensor, alpha: Tensor, beta: Tensor, eps: float = 1e-9) -> Tensor:
    """``x + 1 / (beta + eps) * sin^2(alpha * x)``; x ``[B, C, T]``, alpha/beta ``[C]`` or ``[1, C, 1]``."""
    _check_x(x, eps)
    alpha, beta = _per_channel("alpha", alpha, x), _per_channel("beta", beta, x)
    backend = select_backend("snake", x.device)
    if backend == "reference":
        return snake_reference(x, alpha, beta, eps)
    return _snake_op(_kernel_layout(x, backend), alpha, beta, float(eps), backend)


def snake_residual(x: Tensor, alpha: Tensor, beta: Tensor, residual: Tensor, eps: float = 1e-9
                   ) -> Tuple[Tensor, Tensor]:
    """``s = x + residual``; ``y = snake(s, alpha, beta)``; returns ``(s, y)``.

    x, residual ``[B, C, T]`` (same dtype and device); alpha/beta ``[C]`` or ``[1, C, 1]``.
    """
    _check_x(x, eps)
    tensor("snake_residual", "residual", residual)
    if residual.shape != x.shape:
        raise OpInputError(f"snake_residual: residual must have x's shape {tuple(x.shape)}, "
                           f"got {tuple(residual.shape)}")
    if residual.dtype != x.dtype or residual.device != x.device:
        raise OpInputError(f"snake_residual: residual must match x's dtype and device ({x.dtype}, {x.device}), "
                        f"got ({residual.dtype}, {residual.device})")
    alpha, beta = _per_channel("alpha", alpha, x), _per_channel("beta", beta, x)
    backend = select_backend("snake_residual", x.device)
    if backend == "reference":
        return snake_residual_reference(x, alpha, beta, residual, eps)
    x = _kernel_layout(x, backend)
    return _snake_residual_op(x, alpha, beta, _kernel_layout(residual, backend, like=x), float(eps), backend)
