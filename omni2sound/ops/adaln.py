"""The memory-bound chain of an AdaLN-DiT block, fused: gated residual -> LayerNorm -> modulate.

    adaln_modulate(x, shift, scale)              y  = LN(x) * (1 + scale) + shift
    gated_residual_adaln(x, h, gate, shift, scale)
                                                 x2 = x + gate * h
                                                 y  = LN(x2) * (1 + scale) + shift      -> (x2, y)

LN has no affine parameters (the modulation is the affine). Shapes: x, h ``[B, L, D]``; gate, shift, scale
per sample ``[B, 1, D]`` or per token ``[B, L, D]`` (Omni2Sound's temporal branch drives a per-token AdaLN
from 25 Hz sync features). Each modulation may also be a pair ``(a, b)`` of such tensors meaning ``a + b``: the
DiT's modulation is a per-token part (sync, once per request) plus a per-sample part (timestep, once per step),
and the kernels add the two as they load them instead of the model materialising the [B, L, D] sum per step.
Statistics are always fp32; inputs fp32/fp16/bf16; outputs in the input dtype.
Non-finite values: NaN / inf in any input propagate as in the reference. A row whose fp32 sum of squared deviations
overflows (|x - mean| from ~1e19 up, D-dependent) has no meaningful statistics: the fused kernels give NaN for it
(rstd = 0 would give finite nonsense); the reference gives NaN there once |x|^2 overflows and 0 just below.
The fused kernels compute LN from the fp32 value of x2 before it is rounded to the input dtype.

Backward (xhat = (x2 - mean) * rstd, g = dy * (1 + scale)):
    dshift = dy,  dscale = dy * xhat          (summed over L for per-sample modulation)
    dx2    = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dL/dx2(output)
    dx = dx2,  dh = gate * dx2,  dgate = h * dx2
The per-token dgate / dscale are written in the input dtype (the per-token modulations are in it: under autocast,
bf16 projections; fp32 here only bought a cast afterwards) and only when autograd needs them (the DiT passes
constant ones / zeros to two of its three calls per block); a per-sample modulation's gradient is their sum over L
with fp32 accumulation. `python bench/bench_train.py --audit` counts what this saves.

Modulation gradients without a stack: the DiT computes each block's per-token modulation as one [B, L, 6, D] tensor
and hands its six [B, L, D] slices to the three fused calls. Cut with ``unbind``, autograd would ``stack`` the six
gradients into a new [B, L, 6, D] tensor (a read and a write of all of it per block and step). ``split_modulation``
cuts it instead: the backward of these ops then writes each slice's per-token gradient (dgate, dscale, and dshift,
the copy of dy, inside the kernel) straight into its slot of one [B, L, 6, D] buffer (row stride 6 D), allocated at
the first backward that writes into it, and the split's backward returns that buffer as it is. Same values, bit for
bit; where the gradients did not come from the buffer (hooks, other consumers, torch.compile, the reference backend)
the split's backward stacks them as ``unbind`` would. On by default on the CPU, off on a GPU until its kernels'
strided outputs have run on a card (``BUFFER_BY_DEFAULT``); ``modulation_grad_buffer(True / False)`` overrides.

Fused fp8 copy of y (sampling with FP8 projections, per-token activation scales): inside
``ops.fp8_gemms(table, fuse_quant=True)`` both ops also quantise their output y for the next e4m3 GEMM, as
``quantize_rows`` would (of y rounded to its dtype), and hand q and its scales to that GEMM (``ops.fp8``, "Fused
activation quantisation"); ``adaln_modulate_fp8`` / ``gated_residual_adaln_fp8`` return them explicitly. On a GPU
the Triton forward writes them in the same pass (op ``adaln_fp8``, backend ``triton``; the CUDA forward has no fp8
output, so these calls run the Triton AdaLN even where the CUDA one is the default); otherwise (backend
``reference``, or another AdaLN backend forced) the AdaLN op's own backend runs and ``quantize_rows`` follows:
the same numbers, no launch saved. With both forced to ``reference``: the plain PyTorch definition.

File order (Liger's): reference, backend registration, custom ops (forward, backward, fake, autograd),
public functions.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _native
from ._checks import OpInputError, real, tensor
from ._dispatch import (
    autocast_inputs,
    direct_call,
    needs_grad,
    register_op,
    select_backend,
    triton_available,
)
from .fp8 import FP8, _quantize_with, fuse_quant_for, fused_plan, hand_over

# ----------------------------------------------------------------------------------------------------
# Reference (plain PyTorch; fp32 math, output in the input dtype)
# ----------------------------------------------------------------------------------------------------


def adaln_modulate_reference(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    xf = x.float()
    y = F.layer_norm(xf, (x.shape[-1],), eps=eps) * (1.0 + scale.float()) + shift.float()
    return y.to(x.dtype)


def gated_residual_adaln_reference(x: Tensor, h: Tensor, gate: Tensor, shift: Tensor, scale: Tensor,
                                   eps: float = 1e-6) -> Tuple[Tensor, Tensor]:
    x2f = x.float() + gate.float() * h.float()
    y = F.layer_norm(x2f, (x.shape[-1],), eps=eps) * (1.0 + scale.float()) + shift.float()
    return x2f.to(x.dtype), y.to(x.dtype)


def _stats_reference(xin: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    xf = xin.float()
    mean = xf.mean(-1)
    rstd = torch.rsqrt(xf.var(-1, unbiased=False) + eps)
    return mean.reshape(-1), rstd.reshape(-1)


def _backward_reference(dy, dx2_in, xin, h, gate, scale, mean, rstd, need_dgate=True, need_dscale=True):
    """Analytic backward in fp32 (the formulas at the top); per-token dgate/dscale in the input dtype, or None where
    not needed (as the kernels)."""
    B, L, D = xin.shape
    xhat = (xin.float() - mean.view(B, L, 1)) * rstd.view(B, L, 1)
    g = dy.float() * (1.0 + scale.float())
    dscale_tok = (dy.float() * xhat).to(xin.dtype) if need_dscale else None
    dxin = rstd.view(B, L, 1) * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    if dx2_in is not None:
        dxin = dxin + dx2_in.float()
    dh = dgate_tok = None
    if h is not None:
        dh = (gate.float() * dxin).to(xin.dtype)
        dgate_tok = (h.float() * dxin).to(xin.dtype) if need_dgate else None
    return dxin.to(xin.dtype), dh, dgate_tok, dscale_tok


# ----------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------


def _triton_ok(device: torch.device) -> bool:
    return triton_available(device.type)


_AVAILABLE = {
    "reference": lambda d: True,
    "cpu": lambda d: d.type == "cpu" and _native.has_cpu(),
    "cuda": lambda d: d.type == "cuda" and _native.has_cuda(),
    "triton": _triton_ok,
}
register_op("adaln_modulate", _AVAILABLE, family="adaln")
register_op("gated_residual_adaln", _AVAILABLE, family="adaln")
# the forward with y's per-token fp8 copy: triton = one kernel; reference = the AdaLN op, then quantize_rows
register_op("adaln_fp8", {"reference": lambda d: True, "triton": _triton_ok},
            default_order={"cuda": ("triton", "reference"), "cpu": ("reference",)}, family="adaln_fp8")


def _mod_strides(t: Optional[Tensor]) -> Tuple[int, int]:
    """(stride over B, stride over L) of a [B, 1|L, D] modulation tensor; 0 over L when per-sample."""
    if t is None:
        return 0, 0
    return t.stride(0), (0 if t.shape[1] == 1 else t.stride(1))


def _sum(a: Optional[Tensor], a2: Optional[Tensor]) -> Optional[Tensor]:
    return a if a is None or a2 is None else a + a2


def _forward_native(x, h, gate, shift, scale, eps, backend, gate2=None, shift2=None, scale2=None, yq=None, ys=None):
    """(x2, y, mean, rstd); yq / ys (Triton only): where the kernel also writes y's per-token fp8 copy and scales."""
    B, L, D = x.shape
    y = torch.empty_like(x)
    x2 = torch.empty_like(x) if h is not None else None
    mean = torch.empty(B * L, device=x.device, dtype=torch.float32)
    rstd = torch.empty(B * L, device=x.device, dtype=torch.float32)
    if B * L * D == 0:
        return x2, y, mean, rstd
    if backend == "reference":
        gate, shift, scale = _sum(gate, gate2), _sum(shift, shift2), _sum(scale, scale2)
        if h is None:
            y = adaln_modulate_reference(x, shift, scale, eps)
            xin = x
        else:
            x2, y = gated_residual_adaln_reference(x, h, gate, shift, scale, eps)
            xin = x.float() + gate.float() * h.float()
        mean, rstd = _stats_reference(xin, eps)
        return x2, y, mean, rstd
    if backend == "triton":
        from omni2sound.kernels import adaln as tk

        tk.adaln_forward(x, h, gate, shift, scale, x2, y, mean, rstd, eps, gate2, shift2, scale2, yq=yq, ys=ys)
        return x2, y, mean, rstd
    P = _native.lib().AdaLNParams()
    P.B, P.L, P.D, P.eps, P.dtype = B, L, D, float(eps), _native.dtype_code(x)
    P.x, P.h, P.x2, P.y, P.mean, P.rstd = x.data_ptr(), _native.ptr(h), _native.ptr(x2), y.data_ptr(), \
        mean.data_ptr(), rstd.data_ptr()
    P.gate, P.shift, P.scale = _native.ptr(gate), shift.data_ptr(), scale.data_ptr()
    P.gate2, P.shift2, P.scale2 = _native.ptr(gate2), _native.ptr(shift2), _native.ptr(scale2)
    P.gate_sb, P.gate_sl = _mod_strides(gate)
    P.shift_sb, P.shift_sl = _mod_strides(shift)
    P.scale_sb, P.scale_sl = _mod_strides(scale)
    P.gate2_sb, P.gate2_sl = _mod_strides(gate2)
    P.shift2_sb, P.shift2_sl = _mod_strides(shift2)
    P.scale2_sb, P.scale2_sl = _mod_strides(scale2)
    if backend == "cpu":
        _native.lib().adaln_forward_cpu(P)
    else:
        _native.lib().adaln_forward_cuda(P, _native.stream_of(x))
    return x2, y, mean, rstd


def _row_stride(t: Optional[Tensor]) -> int:
    """Row stride of a per-token output [B, L, D] (rows r = b * L + l at r * stride; unit stride over D), 0 for None."""
    if t is None:
        return 0
    B, L, _ = t.shape
    rs = t.stride(0) if L == 1 else t.stride(1)
    if t.stride(2) != 1 or (B > 1 and L > 1 and t.stride(0) != L * rs):
        raise OpInputError(f"omni2sound.ops.adaln: a per-token gradient output must have rows at a fixed stride, "
                           f"got strides {tuple(t.stride())} for shape {tuple(t.shape)}")
    return rs


def _into(out: Optional[Tensor], value: Optional[Tensor]) -> Optional[Tensor]:
    return value if out is None or value is None else out.copy_(value)


def _backward_native(dy, dx2_in, xin, h, gate, scale, mean, rstd, backend, gate2=None, scale2=None,
                     need_dgate=True, need_dscale=True, dgate_out=None, dscale_out=None, dshift_out=None):
    """(dxin, dh, dgate_tok, dscale_tok); the per-token modulation gradients in xin's dtype, None where not needed.
    dgate_out / dscale_out: where to write them instead of new tensors (then returned as dgate_tok / dscale_tok);
    dshift_out: where to copy dy. These outputs may be row-strided [B, L, D] (slots of a [B, L, n, D] buffer)."""
    B, L, D = xin.shape
    need_dgate = need_dgate and h is not None
    if backend == "reference":
        dxin, dh, dgate_tok, dscale_tok = _backward_reference(dy, dx2_in, xin, h, _sum(gate, gate2),
                                                              _sum(scale, scale2), mean, rstd, need_dgate, need_dscale)
        _into(dshift_out, dy)
        return dxin, dh, _into(dgate_out, dgate_tok), _into(dscale_out, dscale_tok)
    dxin = torch.empty_like(xin)
    dh = torch.empty_like(xin) if h is not None else None
    dgate_tok = (torch.empty_like(xin) if dgate_out is None else dgate_out) if need_dgate else None
    dscale_tok = (torch.empty_like(xin) if dscale_out is None else dscale_out) if need_dscale else None
    if B * L * D == 0:
        return dxin, dh, dgate_tok, dscale_tok
    # the per-token outputs' row pitch, checked here for every kernel backend (the Triton launcher reads it too)
    row_strides = tuple(_row_stride(t) for t in (dgate_tok, dscale_tok, dshift_out))
    if backend == "triton":
        from omni2sound.kernels import adaln as tk

        tk.adaln_backward(dy, dx2_in, xin, h, gate, scale, mean, rstd, dxin, dh, dgate_tok, dscale_tok, gate2,
                          scale2, dshift_out)
        return dxin, dh, dgate_tok, dscale_tok
    P = _native.lib().AdaLNBwdParams()
    P.B, P.L, P.D, P.dtype = B, L, D, _native.dtype_code(xin)
    P.dy, P.dx2_in, P.xin, P.h = dy.data_ptr(), _native.ptr(dx2_in), xin.data_ptr(), _native.ptr(h)
    P.gate, P.scale, P.gate2, P.scale2 = _native.ptr(gate), scale.data_ptr(), _native.ptr(gate2), _native.ptr(scale2)
    P.gate_sb, P.gate_sl = _mod_strides(gate)
    P.scale_sb, P.scale_sl = _mod_strides(scale)
    P.gate2_sb, P.gate2_sl = _mod_strides(gate2)
    P.scale2_sb, P.scale2_sl = _mod_strides(scale2)
    P.mean, P.rstd = mean.data_ptr(), rstd.data_ptr()
    P.dxin, P.dh, P.dgate_tok, P.dscale_tok = dxin.data_ptr(), _native.ptr(dh), _native.ptr(dgate_tok), \
        _native.ptr(dscale_tok)
    P.dshift_tok = _native.ptr(dshift_out)
    P.dgate_rs, P.dscale_rs, P.dshift_rs = row_strides
    if backend == "cpu":
        _native.lib().adaln_backward_cpu(P)
    else:
        _native.lib().adaln_backward_cuda(P, _native.stream_of(xin))
    return dxin, dh, dgate_tok, dscale_tok


def _reduce_mod(grad_tok: Optional[Tensor], like: Optional[Tensor], needed: bool = True) -> Optional[Tensor]:
    """Per-token gradient [B, L, D] (in the op's dtype) -> the modulation's own shape and dtype (None: no such input,
    or autograd does not need it, e.g. the constant ones / zeros the DiT passes). Per-sample: summed over L with fp32
    accumulation. Per-token: returned as is, no copy."""
    if like is None or not needed:
        return None
    if like.shape[1] == 1 and grad_tok.shape[1] != 1:
        return grad_tok.sum(1, keepdim=True, dtype=torch.float32).to(like.dtype)
    return grad_tok.to(like.dtype)


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    # custom ops return tensors, never None: a gradient that was not computed travels as an empty tensor
    return like.new_empty(0) if t is None else t


def _none_if_empty(t: Tensor) -> Optional[Tensor]:
    return None if t.numel() == 0 and t.dim() == 1 else t


# ----------------------------------------------------------------------------------------------------
# Custom ops (opaque to autograd and torch.compile; the backend is an explicit argument)
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("omni2sound::adaln_modulate", mutates_args=())
def _adaln_modulate_op(x: Tensor, shift: Tensor, scale: Tensor, shift2: Optional[Tensor], scale2: Optional[Tensor],
                       eps: float, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    _, y, mean, rstd = _forward_native(x, None, None, shift, scale, eps, backend, None, shift2, scale2)
    return y, mean, rstd


@_adaln_modulate_op.register_fake
def _(x, shift, scale, shift2, scale2, eps, backend):
    n = x.shape[0] * x.shape[1]
    return torch.empty_like(x), x.new_empty(n, dtype=torch.float32), x.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("omni2sound::gated_residual_adaln", mutates_args=())
def _gated_residual_adaln_op(x: Tensor, h: Tensor, gate: Tensor, shift: Tensor, scale: Tensor,
                             gate2: Optional[Tensor], shift2: Optional[Tensor], scale2: Optional[Tensor], eps: float,
                             backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _forward_native(x, h, gate, shift, scale, eps, backend, gate2, shift2, scale2)


@_gated_residual_adaln_op.register_fake
def _(x, h, gate, shift, scale, gate2, shift2, scale2, eps, backend):
    n = x.shape[0] * x.shape[1]
    return (torch.empty_like(x), torch.empty_like(x), x.new_empty(n, dtype=torch.float32),
            x.new_empty(n, dtype=torch.float32))


# The *_out arguments: None, or where the backward writes a per-token gradient instead of a new tensor (a slot of a
# split modulation's gradient buffer); the op then returns an empty tensor in that place. They have no defaults: a
# boxed call drops trailing arguments equal to their defaults, and torch 2.11's version bump of mutated arguments
# indexes them by position (an IndexError in every backward that passed None there).
@torch.library.custom_op("omni2sound::adaln_modulate_backward", mutates_args=("dscale_out", "dshift_out"))
def _adaln_modulate_backward_op(dy: Tensor, x: Tensor, scale: Tensor, scale2: Optional[Tensor], mean: Tensor,
                                rstd: Tensor, need_dscale: bool, backend: str, dscale_out: Optional[Tensor],
                                dshift_out: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    dx, _, _, dscale_tok = _backward_native(dy, None, x, None, None, scale, mean, rstd, backend, None, scale2,
                                            need_dgate=False, need_dscale=need_dscale, dscale_out=dscale_out,
                                            dshift_out=dshift_out)
    return dx, _or_empty(None if dscale_out is not None else dscale_tok, x)


@_adaln_modulate_backward_op.register_fake
def _(dy, x, scale, scale2, mean, rstd, need_dscale, backend, dscale_out, dshift_out):
    return torch.empty_like(x), torch.empty_like(x) if need_dscale and dscale_out is None else x.new_empty(0)


@torch.library.custom_op("omni2sound::gated_residual_adaln_backward",
                         mutates_args=("dgate_out", "dscale_out", "dshift_out"))
def _gated_residual_adaln_backward_op(dy: Tensor, dx2: Tensor, x2: Tensor, h: Tensor, gate: Tensor, scale: Tensor,
                                      gate2: Optional[Tensor], scale2: Optional[Tensor], mean: Tensor, rstd: Tensor,
                                      need_dgate: bool, need_dscale: bool, backend: str,
                                      dgate_out: Optional[Tensor], dscale_out: Optional[Tensor],
                                      dshift_out: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    dxin, dh, dgate_tok, dscale_tok = _backward_native(dy, dx2, x2, h, gate, scale, mean, rstd, backend, gate2,
                                                       scale2, need_dgate, need_dscale, dgate_out, dscale_out,
                                                       dshift_out)
    return (dxin, dh, _or_empty(None if dgate_out is not None else dgate_tok, x2),
            _or_empty(None if dscale_out is not None else dscale_tok, x2))


@_gated_residual_adaln_backward_op.register_fake
def _(dy, dx2, x2, h, gate, scale, gate2, scale2, mean, rstd, need_dgate, need_dscale, backend, dgate_out,
      dscale_out, dshift_out):
    tok = lambda need, out: torch.empty_like(x2) if need and out is None else x2.new_empty(0)   # noqa: E731
    return torch.empty_like(x2), torch.empty_like(x2), tok(need_dgate, dgate_out), tok(need_dscale, dscale_out)


# ----------------------------------------------------------------------------------------------------
# The split modulation and its gradient buffer
# ----------------------------------------------------------------------------------------------------

_switch = threading.local()
# Where the buffer is on by default: the devices whose AdaLN backward kernels have run their strided gradient outputs
# against the stack bit for bit (the CPU: C++ and reference, every test run). On a GPU the CUDA and Triton kernels'
# strided outputs are tested (tests/test_adaln.py, cuda marker) but have not run on a card yet: off there by default
# until `bash bench/device_check.sh train-modgrad` has passed and timed both ways; modulation_grad_buffer(True) turns
# it on.
BUFFER_BY_DEFAULT = ("cpu",)


@contextlib.contextmanager
def modulation_grad_buffer(enabled: Optional[bool] = True) -> Iterator[None]:
    """Whether ``split_modulation`` (called inside) lets the AdaLN backward write the slices' gradients into one
    buffer or cuts the modulation with a plain ``unbind`` (whose backward stacks them); None: the device's default
    (``BUFFER_BY_DEFAULT``). Same values either way; the switch exists to compare the two."""
    prev = getattr(_switch, "enabled", None)
    _switch.enabled = None if enabled is None else bool(enabled)
    try:
        yield
    finally:
        _switch.enabled = prev


class _ModulationGrad:
    """The gradient of a [B, L, n, D] modulation that ``split_modulation`` cut into n slices: one buffer, allocated by
    the first backward that writes into it (never held through the forward), whose slot k = buf[:, :, k] is slice
    k's gradient. A slot asked for twice (a slice with two consumers, a second backward through a retained graph)
    starts a new buffer: the split's backward then finds gradients outside the current one and stacks them."""

    def __init__(self, shape: torch.Size, dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = shape, dtype, device
        self.buf: Optional[Tensor] = None
        self.written: set = set()

    @property
    def slot_shape(self) -> torch.Size:
        """The shape of a slot, and so of each slice: [B, L, D]."""
        return self.shape[:2] + self.shape[3:]

    def slot(self, k: int) -> Tensor:
        if self.buf is None or k in self.written:
            self.buf, self.written = torch.empty(self.shape, dtype=self.dtype, device=self.device), set()
        self.written.add(k)
        return self.buf[:, :, k]

    def take(self) -> Optional[Tensor]:
        buf, self.buf, self.written = self.buf, None, set()
        return buf


def _is_slot(g: Tensor, buf: Tensor, k: int) -> bool:
    s = buf[:, :, k]
    return g.data_ptr() == s.data_ptr() and g.dtype == s.dtype and g.shape == s.shape and g.stride() == s.stride()


class _SplitModulation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mod: Tensor):
        ctx.set_materialize_grads(False)
        ctx.modulation_grad = _ModulationGrad(mod.shape, mod.dtype, mod.device)
        return mod.unbind(2)

    @staticmethod
    def backward(ctx, *grads: Optional[Tensor]) -> Optional[Tensor]:
        buf = ctx.modulation_grad.take()
        if all(g is None for g in grads):
            return None
        if buf is not None and not torch.compiler.is_compiling() and \
                all(g is None or _is_slot(g, buf, k) for k, g in enumerate(grads)):
            for k, g in enumerate(grads):
                if g is None:                                  # a slice nothing differentiated: zero, as unbind's
                    buf[:, :, k].zero_()
            return buf
        like = next(g for g in grads if g is not None)
        return torch.stack([torch.zeros_like(like) if g is None else g for g in grads], 2)


def split_modulation(mod: Tensor) -> Tuple[Tensor, ...]:
    """``mod.unbind(2)`` for a modulation ``[B, L, n, D]`` -> n x [B, L, D] views (gate, shift, scale, ... of the
    AdaLN ops). When autograd records it, the AdaLN ops' backward writes the slices' per-token gradients into one
    [B, L, n, D] buffer that becomes mod's gradient without a stack (module docstring). Without a gradient (sampling),
    under torch.compile, inside ``modulation_grad_buffer(False)`` or on a device outside ``BUFFER_BY_DEFAULT`` (unless
    ``modulation_grad_buffer(True)``): a plain ``unbind``."""
    if mod.dim() != 4:
        raise OpInputError(f"omni2sound.ops.split_modulation: mod must be [B, L, n, D], got shape {tuple(mod.shape)}")
    enabled = getattr(_switch, "enabled", None)
    if enabled is None:
        enabled = mod.device.type in BUFFER_BY_DEFAULT
    if not (torch.is_grad_enabled() and mod.requires_grad) or torch.compiler.is_compiling() or not enabled:
        return mod.unbind(2)
    return _SplitModulation.apply(mod)


def _grad_slots(inputs: tuple, indices: tuple) -> Dict[int, Tuple[_ModulationGrad, int]]:
    """{input index: (its split's gradient buffer, slot)} for the inputs that are slices of split_modulation."""
    out = {}
    for i in indices:
        fn = getattr(inputs[i], "grad_fn", None)
        if type(fn) is _SplitModulation._backward_cls:
            out[i] = (fn.modulation_grad, inputs[i].output_nr)
    return out


def _slot_out(ctx, like: Tensor, *indices: int) -> Tuple[Optional[int], Optional[Tensor]]:
    """(input index, its gradient slot) for the first of these modulation inputs that is a per-token split slice whose
    gradient autograd needs; (None, None) when there is none. A slice of a per-sample modulation ([B, 1, D] beside
    ``like`` [B, L, D]) has no per-token gradient to hold."""
    for i in indices:
        if i in ctx.grad_slots and ctx.needs_input_grad[i]:
            sink, k = ctx.grad_slots[i]
            if sink.slot_shape == like.shape:
                return i, sink.slot(k)
    return None, None


def _mod_grads(grad_tok: Optional[Tensor], slot_of: Optional[int], pairs: List[Tuple[int, Optional[Tensor]]],
               need, source: Optional[Tensor] = None) -> List[Optional[Tensor]]:
    """The gradients of a modulation's addends (input index, tensor): the slot's owner gets the slot as it is, the
    others ``_reduce_mod`` of ``source`` (the unstrided per-token gradient where there is one, dy for the shift;
    default grad_tok)."""
    src = grad_tok if source is None else source
    return [grad_tok if i == slot_of else _reduce_mod(src, like, need[i]) for i, like in pairs]


# The second addends are saved whole although backward needs only their shapes (to reduce the per-token
# gradient): they are the [B, 1, D] per-sample parts, a few KB.
def _modulate_setup(ctx, inputs, output):
    x, shift, scale, shift2, scale2, eps, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, shift, scale, shift2, scale2, mean, rstd)
    ctx.backend = backend
    ctx.grad_slots = _grad_slots(inputs, (1, 2, 3, 4))


def _modulate_backward(ctx, dy, _dmean, _drstd):
    x, shift, scale, shift2, scale2, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dscale = bool(need[2] or need[4])
    shift_slot, dshift_out = _slot_out(ctx, x, 1, 3)
    scale_slot, dscale_out = _slot_out(ctx, x, 2, 4) if need_dscale else (None, None)
    dxin, dscale_tok = _adaln_modulate_backward_op(dy.contiguous(), x, scale, scale2, mean, rstd, need_dscale,
                                                   ctx.backend, dscale_out, dshift_out)
    dscale_tok = dscale_out if dscale_out is not None else _none_if_empty(dscale_tok)
    dshift_tok = dy if dshift_out is None else dshift_out
    g_shift, g_shift2 = _mod_grads(dshift_tok, shift_slot, [(1, shift), (3, shift2)], need, source=dy)
    g_scale, g_scale2 = _mod_grads(dscale_tok, scale_slot, [(2, scale), (4, scale2)], need)
    return dxin, g_shift, g_scale, g_shift2, g_scale2, None, None


_adaln_modulate_op.register_autograd(_modulate_backward, setup_context=_modulate_setup)


def _gated_setup(ctx, inputs, output):
    x, h, gate, shift, scale, gate2, shift2, scale2, eps, backend = inputs
    x2, _, mean, rstd = output
    ctx.save_for_backward(x2, h, gate, shift, scale, gate2, shift2, scale2, mean, rstd)
    ctx.backend = backend
    ctx.grad_slots = _grad_slots(inputs, (2, 3, 4, 5, 6, 7))


def _gated_backward(ctx, dx2, dy, _dmean, _drstd):
    x2, h, gate, shift, scale, gate2, shift2, scale2, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    # the gate's and the scale's per-token gradients only where autograd asks (the DiT's cross-attention sublayer
    # passes a constant gate of ones, its attention sublayer constant zeros as shift and scale)
    need_dgate, need_dscale = bool(need[2] or need[5]), bool(need[4] or need[7])
    gate_slot, dgate_out = _slot_out(ctx, x2, 2, 5) if need_dgate else (None, None)
    scale_slot, dscale_out = _slot_out(ctx, x2, 4, 7) if need_dscale else (None, None)
    shift_slot, dshift_out = _slot_out(ctx, x2, 3, 6)
    dxin, dh, dgate_tok, dscale_tok = _gated_residual_adaln_backward_op(
        dy.contiguous(), dx2.contiguous(), x2, h, gate, scale, gate2, scale2, mean, rstd, need_dgate, need_dscale,
        ctx.backend, dgate_out, dscale_out, dshift_out)
    dgate_tok = dgate_out if dgate_out is not None else _none_if_empty(dgate_tok)
    dscale_tok = dscale_out if dscale_out is not None else _none_if_empty(dscale_tok)
    dshift_tok = dy if dshift_out is None else dshift_out
    g_gate, g_gate2 = _mod_grads(dgate_tok, gate_slot, [(2, gate), (5, gate2)], need)
    g_shift, g_shift2 = _mod_grads(dshift_tok, shift_slot, [(3, shift), (6, shift2)], need, source=dy)
    g_scale, g_scale2 = _mod_grads(dscale_tok, scale_slot, [(4, scale), (7, scale2)], need)
    return dxin, dh, g_gate, g_shift, g_scale, g_gate2, g_shift2, g_scale2, None, None


_gated_residual_adaln_op.register_autograd(_gated_backward, setup_context=_gated_setup)


# ----------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------


Mod = Union[Tensor, Tuple[Tensor, Tensor]]


def _parts(name: str, m: Mod) -> Tuple[Tensor, Optional[Tensor]]:
    """A modulation or a pair (a, b) meaning a + b -> (a, b or None)."""
    if isinstance(m, (tuple, list)):
        if len(m) != 2 or not all(isinstance(t, Tensor) for t in m):
            raise OpInputError(f"{name} must be a tensor or a pair of tensors (summed), got {len(m)} items")
        return m[0], m[1]
    if not isinstance(m, Tensor):
        raise OpInputError(f"{name} must be a tensor or a pair of tensors, got {type(m).__name__}")
    return m, None


def _check(x: Tensor, mods: dict, eps, h: Optional[Tensor] = None, op: str = "adaln_modulate") -> None:
    for name, t in {"h": h, **mods}.items():
        tensor(op, name, t, optional=True)
    real(op, "eps", eps, minimum=0.0)
    if x.dim() != 3:
        raise OpInputError(f"omni2sound.ops.{op}: x must be [B, L, D], got shape {tuple(x.shape)}")
    if x.dtype not in _native.DTYPE_CODES:
        raise OpInputError(f"omni2sound.ops.{op}: x must be float32, float16 or bfloat16, got {x.dtype}")
    B, L, D = x.shape
    if h is not None and h.shape != x.shape:
        raise OpInputError(f"omni2sound.ops.{op}: h must have x's shape {tuple(x.shape)}, got {tuple(h.shape)}")
    for name, t in mods.items():
        if t is None:
            continue
        if t.dim() != 3 or t.shape[0] != B or t.shape[2] != D or t.shape[1] not in (1, L):
            raise OpInputError(f"omni2sound.ops.{op}: {name} must be per-sample [B={B}, 1, D={D}] or per-token "
                               f"[B, L={L}, D], "
                              f"got {tuple(t.shape)}")
    for name, t in {"h": h, **mods}.items():
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise OpInputError(f"omni2sound.ops.{op}: {name} must match x's dtype and device ({x.dtype}, {x.device}), "
                              f"got ({t.dtype}, {t.device})")


def _last_dim_contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    # Kernels address modulation rows by (stride over B, stride over L) and need unit stride over D.
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def adaln_modulate(x: Tensor, shift: Mod, scale: Mod, eps: float = 1e-6) -> Tensor:
    """``LayerNorm(x) * (1 + scale) + shift``; x ``[B, L, D]``, shift/scale ``[B, 1, D]`` or ``[B, L, D]``, or a
    pair of such tensors (their sum). Under autocast every input is cast to the autocast dtype first."""
    tensor("adaln_modulate", "x", x)
    (shift, shift2), (scale, scale2) = _parts("shift", shift), _parts("scale", scale)
    x, shift, scale, shift2, scale2 = autocast_inputs(x.device, x, shift, scale, shift2, scale2)
    _check(x, {"shift": shift, "scale": scale, "shift[1]": shift2, "scale[1]": scale2}, eps)
    if fuse_quant_for(x) and not needs_grad(x, shift, scale, shift2, scale2):        # FP8 sampling, fused
        y, q, s, quantizer = _forward_fp8("adaln_modulate", x, None, None, shift, scale, eps, None, shift2, scale2)
        hand_over(y, q, s, quantizer)
        return y
    backend = select_backend("adaln_modulate", x.device)
    if backend == "reference":
        return adaln_modulate_reference(x, _sum(shift, shift2), _sum(scale, scale2), eps)
    x, shift, scale, shift2, scale2 = x.contiguous(), *map(_last_dim_contiguous, (shift, scale, shift2, scale2))
    if direct_call(x, shift, scale, shift2, scale2):
        return _forward_native(x, None, None, shift, scale, float(eps), backend, None, shift2, scale2)[1]
    y, _, _ = _adaln_modulate_op(x, shift, scale, shift2, scale2, float(eps), backend)
    return y


def gated_residual_adaln(x: Tensor, h: Tensor, gate: Mod, shift: Mod, scale: Mod, eps: float = 1e-6
                         ) -> Tuple[Tensor, Tensor]:
    """``x2 = x + gate * h``; ``y = LayerNorm(x2) * (1 + scale) + shift``; returns ``(x2, y)``.

    x, h ``[B, L, D]``; gate, shift, scale ``[B, 1, D]`` (per sample) or ``[B, L, D]`` (per token), or a pair of
    such tensors (their sum, added inside the kernel). Under autocast every input is cast to the autocast dtype first.
    """
    tensor("gated_residual_adaln", "x", x)
    tensor("gated_residual_adaln", "h", h)
    (gate, gate2), (shift, shift2), (scale, scale2) = _parts("gate", gate), _parts("shift", shift), \
        _parts("scale", scale)
    x, h, gate, shift, scale, gate2, shift2, scale2 = autocast_inputs(x.device, x, h, gate, shift, scale, gate2,
                                                                      shift2, scale2)
    _check(x, {"gate": gate, "shift": shift, "scale": scale, "gate[1]": gate2, "shift[1]": shift2,
               "scale[1]": scale2}, eps, h=h, op="gated_residual_adaln")
    if fuse_quant_for(x) and not needs_grad(x, h, gate, shift, scale, gate2, shift2, scale2):  # FP8 sampling, fused
        x2, y, q, s, quantizer = _forward_fp8("gated_residual_adaln", x, h, gate, shift, scale, eps, gate2, shift2,
                                              scale2)
        hand_over(y, q, s, quantizer)
        return x2, y
    backend = select_backend("gated_residual_adaln", x.device)
    if backend == "reference":
        return gated_residual_adaln_reference(x, h, _sum(gate, gate2), _sum(shift, shift2), _sum(scale, scale2), eps)
    x, h = x.contiguous(), h.contiguous()
    gate, shift, scale, gate2, shift2, scale2 = map(_last_dim_contiguous, (gate, shift, scale, gate2, shift2, scale2))
    if direct_call(x, h, gate, shift, scale, gate2, shift2, scale2):
        return _forward_native(x, h, gate, shift, scale, float(eps), backend, gate2, shift2, scale2)[:2]
    x2, y, _, _ = _gated_residual_adaln_op(x, h, gate, shift, scale, gate2, shift2, scale2, float(eps), backend)
    return x2, y


# ----------------------------------------------------------------------------------------------------
# With y's per-token fp8 copy (inference only; see "Fused fp8 copy of y" at the top)
# ----------------------------------------------------------------------------------------------------
def _forward_fp8(op, x, h, gate, shift, scale, eps, gate2, shift2, scale2):
    """The forward of ``op`` (``adaln_modulate`` / ``gated_residual_adaln``) plus y's per-token fp8 copy: ([x2,] y,
    q [B L, D] e4m3, scale fp32 [B L, 1], quantizer). One Triton kernel where ``fp8.fused_plan`` picks it, else the
    op's own backend, then ``quantize_rows`` of y."""
    x = x.contiguous()
    h = None if h is None else h.contiguous()
    gate, shift, scale, gate2, shift2, scale2 = map(_last_dim_contiguous, (gate, shift, scale, gate2, shift2, scale2))
    B, L, D = x.shape
    backend, quantizer = fused_plan("adaln_fp8", op, x.device, B * L, D)
    if backend == "triton" and quantizer == "triton":
        q = torch.empty((B * L, D), device=x.device, dtype=FP8)
        s = torch.empty((B * L, 1), device=x.device, dtype=torch.float32)
        x2, y = _forward_native(x, h, gate, shift, scale, float(eps), backend, gate2, shift2, scale2, q, s)[:2]
    else:
        x2, y = _forward_native(x, h, gate, shift, scale, float(eps), backend, gate2, shift2, scale2)[:2]
        q, s = _quantize_with(y.view(B * L, D), "token", quantizer)
    return (y, q, s, quantizer) if h is None else (x2, y, q, s, quantizer)


def _no_grad_check(op: str, *tensors) -> None:
    if needs_grad(*tensors):
        raise RuntimeError(f"omni2sound.ops.{op} is an inference op: call it under torch.no_grad() (the fp8 copy "
                           f"has no gradient)")


def adaln_modulate_fp8(x: Tensor, shift: Mod, scale: Mod, eps: float = 1e-6) -> Tuple[Tensor, Tensor, Tensor]:
    """``adaln_modulate`` plus y's per-token fp8 copy: (y [B, L, D], q [B L, D] float8_e4m3fn, scale fp32 [B L, 1]),
    q and scale bit for bit ``quantize_rows(y.view(B L, D))`` under the backends selected now. No gradient."""
    tensor("adaln_modulate_fp8", "x", x)
    (shift, shift2), (scale, scale2) = _parts("shift", shift), _parts("scale", scale)
    _check(x, {"shift": shift, "scale": scale, "shift[1]": shift2, "scale[1]": scale2}, eps, op="adaln_modulate_fp8")
    _no_grad_check("adaln_modulate_fp8", x, shift, scale, shift2, scale2)
    return _forward_fp8("adaln_modulate", x, None, None, shift, scale, eps, None, shift2, scale2)[:3]


def gated_residual_adaln_fp8(x: Tensor, h: Tensor, gate: Mod, shift: Mod, scale: Mod, eps: float = 1e-6
                             ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``gated_residual_adaln`` plus y's per-token fp8 copy: (x2, y [B, L, D], q [B L, D] float8_e4m3fn, scale fp32
    [B L, 1]), q and scale bit for bit ``quantize_rows(y.view(B L, D))`` under the backends selected now. No
    gradient."""
    tensor("gated_residual_adaln_fp8", "x", x)
    tensor("gated_residual_adaln_fp8", "h", h)
    (gate, gate2), (shift, shift2), (scale, scale2) = _parts("gate", gate), _parts("shift", shift), \
        _parts("scale", scale)
    _check(x, {"gate": gate, "shift": shift, "scale": scale, "gate[1]": gate2, "shift[1]": shift2,
               "scale[1]": scale2}, eps, h=h, op="gated_residual_adaln_fp8")
    _no_grad_check("gated_residual_adaln_fp8", x, h, gate, shift, scale, gate2, shift2, scale2)
    return _forward_fp8("gated_residual_adaln", x, h, gate, shift, scale, eps, gate2, shift2, scale2)[:4]
