"""Fused bias + tanh-GELU, and the DiT MLP's first layer built on it (Megatron's bias-GELU fusion).

    x [M, N] (any leading dims)   the first Linear's output WITHOUT its bias
    bias [N] or None
    z = x + bias;   y = gelu_tanh(z) = 0.5 z (1 + tanh u) = z * sigmoid(2u),   u = sqrt(2/pi) (z + 0.044715 z^3)
    backward: dz = dy * (s + z s (1 - s) d(2u)/dz),  s = sigmoid(2u);  dx = dz,  dbias = sum over rows of dz

Why: on the CPU, aten's tanh-GELU is slow (~3 ns an element on this AVX2 box: 4-5% of an S sampling step), and an
unfused first layer writes its [M, 4D] output twice (the GEMM's bias fill, then GELU into a new tensor). The fused
kernels evaluate the sigmoid form with one exp (1 - s as e * s, e = exp(-2u), so the backward has no cancellation
near s = 1), add the bias as they load, and may write in place. ``linear_gelu`` runs the first layer as a GEMM
without bias (into a caller's reusable buffer when no gradient is needed) and this op in place on its output.

Accuracy: fp32 inside, one rounding at the end; fp32 within ~1 ulp of an fp64 reference (aten's tanh form: about
the same forward, 4x worse backward at large z), and in bf16 / fp16 at least as close as aten's GELU in that dtype.

Backends: C++ on the CPU (the default there), Triton on a GPU (selectable, not the GPU default: see below), and
``cublaslt`` on a GPU, which exists for ``linear_gelu`` only: the first layer as one cuBLASLt GEMM whose epilogue adds
the bias and applies tanh-GELU (``aten._addmm_activation``, CUBLASLT_EPILOGUE_GELU_BIAS), so the [M, 4D] output is
written once and never read back; sampling only (the epilogue keeps no pre-activation for a backward: a call that
needs a gradient under it is refused). Standalone ``bias_gelu`` has no GEMM to fuse into and runs the reference
under it.

Non-finite input: NaN and +inf as the reference; at x + b = -inf the C++ kernel gives -inf where the reference gives
NaN (its exp saturates instead of overflowing).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _native
from ._checks import OpInputError, flag, tensor
from ._dispatch import (
    autocast_dtype,
    autocast_inputs,
    cannot_take,
    needs_grad,
    register_op,
    select_backend,
    triton_available,
)
from .fp8 import FP8, _quantize_with, active_table, fp8_linear, fp8_weight_for, fuse_quant_for, fused_plan, hand_over
from .linear import check_linear_args, linear

# ----------------------------------------------------------------------------------------------------
# Reference (plain PyTorch)
# ----------------------------------------------------------------------------------------------------


def bias_gelu_reference(x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """gelu_tanh(x + bias) in plain PyTorch (aten's GELU, the add in x's dtype)."""
    return F.gelu(x if bias is None else x + bias.to(x.dtype), approximate="tanh")


def linear_gelu_reference(y: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """gelu_tanh(y W^T + b): what ``nn.Sequential(nn.Linear, nn.GELU("tanh"))`` computes."""
    return F.gelu(F.linear(y, weight, bias), approximate="tanh")


# ----------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------

_AVAILABLE = {
    "reference": lambda d: True,
    "cpu": lambda d: d.type == "cpu" and _native.has_cpu() and _native.has_symbol("bias_gelu_forward_cpu"),
    "triton": lambda d: triton_available(d.type),
    # aten._addmm_activation applies tanh-GELU on CUDA but the exact erf GELU on the CPU: a different function there
    "cublaslt": lambda d: d.type == "cuda",
}
# GPU default: aten's GELU. Timed on an H200 (2026-12-04, bench/RESULTS.md): the Triton kernel gave L sampling nothing
# (99.5 -> 101.1 ms) and made the graphed L training step slower (152.6 -> 157.9 ms; its fwd+bwd 0.88x eager at
# [8000, 6144]); it stays selectable with use_backend(bias_gelu="triton").
register_op("bias_gelu", _AVAILABLE, default_order={"cuda": ("reference",), "cpu": ("cpu", "reference")})
# GELU with its output's per-token fp8 copy (FP8 sampling, the input of the MLP's second GEMM): triton = one kernel;
# reference = bias_gelu on its own backend, then quantize_rows
register_op("gelu_fp8", {"reference": lambda d: True, "triton": lambda d: triton_available(d.type)},
            default_order={"cuda": ("triton", "reference"), "cpu": ("reference",)}, family="gelu_fp8")


def _forward_native(x: Tensor, b32: Optional[Tensor], out: Tensor, backend: str) -> None:
    N = x.shape[-1]
    M = x.numel() // N if N else 0
    if M == 0:
        return
    if backend == "triton":
        from omni2sound.kernels import gelu as tk

        tk.bias_gelu_forward(x.view(M, N), b32, out.view(M, N))
        return
    P = _native.lib().GeluParams()
    P.rows, P.N, P.dtype = M, N, _native.dtype_code(x)
    P.x, P.bias, P.y = x.data_ptr(), _native.ptr(b32), out.data_ptr()
    _native.lib().bias_gelu_forward_cpu(P)


def _backward_native(dy: Tensor, x: Tensor, b32: Optional[Tensor], backend: str) -> Tuple[Tensor, Optional[Tensor]]:
    N = x.shape[-1]
    M = x.numel() // N if N else 0
    dx = torch.empty_like(x)
    if M == 0:
        return dx, (None if b32 is None else torch.zeros(N, device=x.device, dtype=torch.float32))
    if backend == "triton":
        from omni2sound.kernels import gelu as tk

        return dx, tk.bias_gelu_backward(dy.view(M, N), x.view(M, N), b32, dx.view(M, N))
    partial = None
    if b32 is not None:     # one fp32 row per 64-row chunk, summed here in a fixed order: deterministic
        chunk = int(_native.lib().bias_gelu_bias_chunk)
        partial = torch.empty((M + chunk - 1) // chunk, N, device=x.device, dtype=torch.float32)
    P = _native.lib().GeluParams()
    P.rows, P.N, P.dtype = M, N, _native.dtype_code(x)
    P.x, P.bias, P.y, P.dy, P.dbias = x.data_ptr(), _native.ptr(b32), dx.data_ptr(), dy.data_ptr(), _native.ptr(partial)
    _native.lib().bias_gelu_backward_cpu(P)
    return dx, (None if partial is None else partial.sum(0))


# ----------------------------------------------------------------------------------------------------
# Custom ops (opaque to autograd and torch.compile; the backend is an explicit argument)
# ----------------------------------------------------------------------------------------------------


# bias goes in as a tensor always (an empty [0] tensor for none): custom-op schemas take Optional[Tensor], but this
# torch warns on every such registration.


def _b32(bias: Tensor) -> Optional[Tensor]:
    return None if bias.numel() == 0 else bias.float().contiguous()


@torch.library.custom_op("omni2sound::bias_gelu", mutates_args=())
def _bias_gelu_op(x: Tensor, bias: Tensor, backend: str) -> Tensor:
    out = torch.empty_like(x)
    _forward_native(x, _b32(bias), out, backend)
    return out


@_bias_gelu_op.register_fake
def _(x, bias, backend):
    return torch.empty_like(x)


@torch.library.custom_op("omni2sound::bias_gelu_", mutates_args=("x",))
def _bias_gelu_inplace_op(x: Tensor, bias: Tensor, backend: str) -> None:
    _forward_native(x, _b32(bias), x, backend)


@_bias_gelu_inplace_op.register_fake
def _(x, bias, backend):
    return None


@torch.library.custom_op("omni2sound::bias_gelu_backward", mutates_args=())
def _bias_gelu_backward_op(dy: Tensor, x: Tensor, bias: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    """dx, and dbias in fp32 ([0] when there is no bias)."""
    dx, db = _backward_native(dy, x, _b32(bias), backend)
    return dx, (x.new_empty(0, dtype=torch.float32) if db is None else db)


@_bias_gelu_backward_op.register_fake
def _(dy, x, bias, backend):
    return torch.empty_like(x), x.new_empty(bias.shape[0], dtype=torch.float32)


def _setup(ctx, inputs, output):
    x, bias, backend = inputs
    ctx.save_for_backward(x, bias)
    ctx.backend = backend


def _bwd(ctx, dy):
    x, bias = ctx.saved_tensors
    dx, db = _bias_gelu_backward_op(dy.contiguous(), x, bias, ctx.backend)
    return dx, (db.to(bias.dtype) if bias.numel() else None), None


_bias_gelu_op.register_autograd(_bwd, setup_context=_setup)


# ----------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------


def _check(x: Tensor, bias: Optional[Tensor]) -> None:
    tensor("bias_gelu", "x", x)
    tensor("bias_gelu", "bias", bias, optional=True)
    if x.dim() < 1:
        raise OpInputError("bias_gelu: x must have at least one dim (the channels, last)")
    if x.dtype not in _native.DTYPE_CODES:
        raise OpInputError(f"bias_gelu: x must be float32, float16 or bfloat16, got {x.dtype}")
    if bias is not None:
        if tuple(bias.shape) != (x.shape[-1],):
            raise OpInputError(f"bias_gelu: bias must be [N={x.shape[-1]}] (x's last dim), got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise OpInputError(f"bias_gelu: bias is on {bias.device}, x on {x.device}")
        if not bias.is_floating_point():
            raise OpInputError(f"bias_gelu: bias must be a floating tensor, got {bias.dtype}")


def _or_empty(bias: Optional[Tensor], x: Tensor) -> Tensor:
    return x.new_empty(0) if bias is None else bias


# backends under which a standalone bias_gelu runs the plain PyTorch reference
_UNFUSED = ("reference", "cublaslt")


def bias_gelu(x: Tensor, bias: Optional[Tensor] = None, inplace: bool = False) -> Tensor:
    """gelu_tanh(x + bias) over the last dim; ``inplace=True`` writes into x and returns it (only when no gradient
    is needed: the backward needs x)."""
    _check(x, bias)
    flag("bias_gelu", "inplace", inplace)
    (x,) = autocast_inputs(x.device, x)      # bias stays as given: the kernels read it in fp32
    backend = select_backend("bias_gelu", x.device)
    if inplace:
        if needs_grad(x, bias):
            raise RuntimeError("bias_gelu(inplace=True) cannot be used when a gradient is needed (the backward "
                               "reads x); call it under torch.no_grad() or with inplace=False")
        if not x.is_contiguous():
            raise OpInputError("bias_gelu(inplace=True) needs a contiguous x")
        if backend in _UNFUSED:
            return x.copy_(bias_gelu_reference(x, bias))
        _bias_gelu_inplace_op(x, _or_empty(bias, x), backend)
        return x
    if backend in _UNFUSED:
        return bias_gelu_reference(x, bias)
    return _bias_gelu_op(x.contiguous(), _or_empty(bias, x), backend)


def linear_gelu(y: Tensor, weight: Tensor, bias: Optional[Tensor], out: Optional[Tensor] = None) -> Tensor:
    """gelu_tanh(y W^T + b) for y [..., K], weight [N, K], bias [N]: an MLP's first layer and activation.

    Reference backend: exactly ``F.gelu(F.linear(y, W, b))``. ``cublaslt`` (CUDA, no gradient, a bias; refuses
    otherwise): one GEMM with the bias and GELU in its epilogue (``linear_gelu_epilogue``). The other fused
    backends: the GEMM without its bias, then ``bias_gelu`` (in place when no gradient is needed); the GEMM is
    ``ops.linear`` (its own backend: oneDNN on the CPU by default). ``out``: a contiguous [prod(y.shape[:-1]), N]
    buffer in y's dtype that the result is written into when no gradient is needed and the GEMM runs on aten (a
    serving loop reuses one such buffer per shape: no fresh [M, N] allocation, whose page faults cost the CPU ~0.5 ms
    per 6 MB); ignored otherwise."""
    check_linear_args("linear_gelu", y, weight, bias, out)
    backend = select_backend("bias_gelu", y.device)
    w8 = fp8_weight_for(y, weight, bias)                # inside ops.fp8_gemms(table): the GEMM (and bias) in fp8
    if w8 is not None:
        table = active_table()
        h = fp8_linear(y, w8, table.act_scale, table.fast_accum)
        if fuse_quant_for(h):              # FP8 sampling, fused: the GELU also writes the next GEMM's e4m3 input
            g, q, s, quantizer = _gelu_fp8(h, inplace=True)     # in place, as the unfused path below
            hand_over(g, q, s, quantizer)
            return g
        return F.gelu(h, approximate="tanh") if backend in _UNFUSED else bias_gelu(h, None, inplace=True)
    if backend == "reference":
        return linear_gelu_reference(y, weight, bias)
    if backend == "cublaslt":                          # only ever forced: not in any default order
        if needs_grad(y, weight, bias):
            raise cannot_take("bias_gelu", backend, "the GEMM epilogue keeps no pre-activation for a backward")
        if bias is None:
            raise cannot_take("bias_gelu", backend, "the GELU_BIAS epilogue needs a bias")
        return linear_gelu_epilogue(y, weight, bias, out)
    if needs_grad(y, weight, bias):
        return bias_gelu(F.linear(y, weight), bias)
    lead, K, N = y.shape[:-1], y.shape[-1], weight.shape[0]
    h = linear(y.reshape(-1, K), weight, None, out=out)                               # [M, N], no bias
    return bias_gelu(h, bias, inplace=True).view(*lead, N)


def linear_gelu_epilogue(y: Tensor, weight: Tensor, bias: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """y [..., K], weight [N, K], bias [N] -> [..., N] through ``aten._addmm_activation(use_gelu=True)``: on CUDA,
    cuBLASLt's GEMM with the bias-and-GELU epilogue where cuBLASLt takes the operands (2-D, bias of the output's
    dtype, beta 1), else aten's addmm followed by an in-place tanh GELU; either way tanh-GELU. On the CPU aten
    applies the exact erf GELU here, which is why the ``cublaslt`` backend is CUDA-only. ``out``: as in
    ``linear_gelu`` (a contiguous [prod(lead), N] buffer of y's dtype, used outside autocast only: out= variants
    are not autocast's; another shape or dtype is not used)."""
    lead, K, N = y.shape[:-1], y.shape[-1], weight.shape[0]
    y2 = y.reshape(-1, K)                                                            # [M, K]
    b = bias.to(y2.dtype)
    w_t = weight.to(y2.dtype).t()                                                    # [K, N], a view
    if (out is not None and autocast_dtype(y.device) is None and out.is_contiguous() and out.dtype == y2.dtype
            and tuple(out.shape) == (y2.shape[0], N)):
        torch.ops.aten._addmm_activation.out(b, y2, w_t, use_gelu=True, out=out)
        return out.view(*lead, N)
    return torch._addmm_activation(b, y2, w_t, use_gelu=True).view(*lead, N)


# ----------------------------------------------------------------------------------------------------
# With the output's per-token fp8 copy (inference only; ops.fp8 "Fused activation quantisation")
# ----------------------------------------------------------------------------------------------------
def _gelu_fp8(h: Tensor, inplace: bool = False) -> Tuple[Tensor, Tensor, Tensor, str]:
    """(gelu_tanh(h) [..., N], q [M, N] e4m3, scale fp32 [M, 1], quantizer) for a contiguous h [..., N]; inplace: the
    GELU written into h (the row kernel loads each row before it stores it)."""
    N = h.shape[-1]
    M = h.numel() // N if N else 0
    backend, quantizer = fused_plan("gelu_fp8", "bias_gelu", h.device, M, N)
    if backend == "triton" and quantizer == "triton":
        from omni2sound.kernels import gelu as tk

        g = h if inplace else torch.empty_like(h)
        q = torch.empty((M, N), device=h.device, dtype=FP8)
        s = torch.empty((M, 1), device=h.device, dtype=torch.float32)
        tk.gelu_fp8_rows(h.view(M, N), g.view(M, N), q, s)
        return g, q, s, quantizer
    g = bias_gelu(h, None, inplace=inplace)                 # its own backend (the reference under cublaslt)
    q, s = _quantize_with(g.reshape(M, N), "token", quantizer)
    return g, q, s, quantizer


def gelu_fp8(h: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """gelu_tanh(h) for h [..., N] (no bias: the fp8 GEMM before it added it) plus its per-token fp8 copy for the next
    GEMM: (g [..., N] in h's dtype, q [M, N] float8_e4m3fn, scale fp32 [M, 1]), q and scale bit for bit
    ``quantize_rows`` of g under the same backends. Inference only."""
    _check(h, None)
    if needs_grad(h):
        raise RuntimeError("omni2sound.ops.gelu_fp8 is an inference op: call it under torch.no_grad() (the fp8 copy "
                           "has no gradient)")
    g, q, s, _ = _gelu_fp8(h.contiguous())
    return g, q, s
