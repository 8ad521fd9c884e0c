"""A dense layer's GEMM for the sampling loop on the CPU: aten (MKL) or oneDNN, picked by the dispatcher.

    x [..., K], weight [N, K], bias [N] or None  ->  y [..., N] = x W^T + b

Why: at the DiT's wide projections (the qkv projection, K = D -> N = 3D, and the MLP's first layer, D -> 4D) on this
2-core AVX2 box (AMD EPYC, Zen 3), aten's fp32 GEMM (MKL sgemm) scales badly from one thread to two: 1.6x, against
oneDNN's 2.0x. Both
run at the same rate on one thread (`python bench/bench_linear.py`, bench/RESULTS.md). oneDNN is the library that
torch's Inductor (CPU freezing) and Intel's extension use for inference GEMMs; here it is reached through torch's own
``mkldnn::_linear_pointwise`` op, no library of ours.

Backends:
  onednn    - torch's oneDNN linear (CPU, float32, no gradient needed, not under autocast or torch.compile); the
              CPU default. Its output is always a fresh tensor (the op has no ``out=`` form).
  reference - ``F.linear``, or ``addmm`` into a caller's ``out`` buffer when no gradient is needed (aten / MKL).
Anything the oneDNN backend does not take (gradients, other dtypes, autocast, a compiled graph, a GEMM of fewer
than ``ONEDNN_MIN_MACS`` multiply-adds) runs on the reference: the training step's calls, which autograd and
Inductor own, and small GEMMs.

Accuracy: both are fp32 GEMMs with fp32 accumulation, inside the fp32 forward-error bound K eps |x| |W| and under
0.3 of the statistical scale sqrt(K) eps |x| |W|. oneDNN's error against an fp64 GEMM is larger than MKL's: 1.8-2.1x
on average and up to 4x at the maximum (K = 768 to 3072; it accumulates in another order): at most ~1.5e-6 of the
output's largest magnitude. tests/test_linear.py holds it to the bound, to half the statistical scale, and to
2.5x / 6x MKL's mean / max error.

Pre-packed weights (``packed_weights()``, on in the CPU sampling loop): oneDNN reorders a plain [N, K] weight into its
blocked layout on every call (a read and a write of the weight: 7-9 MB for S's qkv and MLP weights). Inside
``packed_weights()`` each weight is reordered once (``mkldnn::_reorder_linear_weight``, what Inductor's CPU freezing
does) and the packed copy is reused while the weight is unchanged (same storage, same version counter: an in-place
update such as ``load_state_dict`` or an optimiser step repacks). The results are the same bits
(tests/test_linear.py); S's step GEMMs ran 3-6% faster a call at 500 rows and 4-18% at the cross-attention's 250
(`python bench/bench_linear.py`, column "onednn packed", two runs, 2026-12-04). The cost is memory: a second copy of
every weight the step multiplies on oneDNN (from the weights' sizes: S 0.40 GB, L 3.2 GB; the S bar's peak RSS rose
by 0.43-0.47 GB), held while the weight lives (``clear_packed_weights()`` frees them).

Where it is used: every projection of ``Omni2SoundDiT``'s sampling step (``model.dense``, the qkv projection, the
MLP's first layer through ``ops.linear_gelu``) and the per-request per-token AdaLN projections. For S, oneDNN wins
at qkv and fc1 (1.37x, 1.43x) and ties at the D -> D and 4D -> D ones; for L it wins at all four (1.17-1.28x).
"""
from __future__ import annotations

import contextlib
import math
import threading
import weakref
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import fail, tensor
from ._dispatch import autocast_dtype, cannot_take, forced_backend, needs_grad, register_op, select_backend
from .fp8 import active_table, fp8_linear, fp8_weight_for


def linear_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """x W^T + b: aten's ``F.linear``."""
    return F.linear(x, weight, bias)


def _onednn_op():
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


def _onednn_available(device: torch.device) -> bool:
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and _onednn_op() is not None


register_op("linear", {"reference": lambda d: True, "onednn": _onednn_available},
            default_order={"cpu": ("onednn", "reference"), "cuda": ("reference",)})


# Below this many multiply-adds per call oneDNN's fixed cost loses to MKL (`python bench/bench_linear.py --sweep`,
# 2-core AMD EPYC AVX2, 2026-11-28: 0.3-0.9x at M K N <= 1e8, e.g. the tiny preset's projections; >= 1.0x from
# ~2.5e8 on, 1.15-1.3x at S's qkv and fc1; 2-core AMD EPYC AVX-512, 2026-12-04: 1.17x at S's cross-attention
# q / output projections, 250 x 768 x 768 = 1.5e8).
# Smaller GEMMs stay on aten.
ONEDNN_MIN_MACS = 1 << 27

_packing = threading.local()
# id(weight) -> (weakref to the weight, its version counter, its data pointer, the packed weight)
_PACKED: Dict[int, Tuple[weakref.ref, int, int, Tensor]] = {}


@contextlib.contextmanager
def packed_weights(enabled: bool = True) -> Iterator[None]:
    """Within this context (this thread), oneDNN GEMMs use weights reordered once and cached (module docstring).
    ``packed_weights(False)`` turns it off inside an enclosing context (e.g. once-per-request work)."""
    prev = getattr(_packing, "on", False)
    _packing.on = bool(enabled)
    try:
        yield
    finally:
        _packing.on = prev


def clear_packed_weights() -> None:
    """Free every cached packed weight."""
    _PACKED.clear()


def _forget(key: int, ref: weakref.ref) -> None:
    entry = _PACKED.get(key)
    if entry is not None and entry[0] is ref:
        del _PACKED[key]


def _reorder(weight: Tensor, rows: int) -> Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def _packed(weight: Tensor, rows: int) -> Tensor:
    """weight in oneDNN's blocked layout for ``rows``-row GEMMs, reordered on first use and after any change."""
    key = id(weight)
    entry = _PACKED.get(key)
    if (entry is not None and entry[0]() is weight and entry[1] == weight._version
            and entry[2] == weight.data_ptr()):
        return entry[3]
    packed = _reorder(weight.detach(), rows)
    ref = weakref.ref(weight, lambda r, k=key: _forget(k, r))
    _PACKED[key] = (ref, weight._version, weight.data_ptr(), packed)
    return packed


def onednn_takes(rows: int, weight: Tensor, bias: Optional[Tensor] = None,
                 dtype: Optional[torch.dtype] = None) -> bool:
    """Whether a no-grad GEMM of ``rows`` rows in ``dtype`` (default: weight's) by ``weight`` [N, K] would run on
    oneDNN here: the backend selected for weight's device, fp32, no autocast, at least ``ONEDNN_MIN_MACS``."""
    dtype = weight.dtype if dtype is None else dtype
    fp32 = dtype == weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)
    return (fp32 and rows * weight.numel() >= ONEDNN_MIN_MACS and weight.numel() > 0 and weight.is_contiguous()
            and autocast_dtype(weight.device) is None and not torch.compiler.is_compiling()
            and select_backend("linear", weight.device) == "onednn")


def runs_on_onednn(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> bool:
    """Whether ``linear(x, weight, bias)`` would run oneDNN's GEMM here (then ``out`` goes unused)."""
    if needs_grad(x, weight, bias) or x.device != weight.device or x.shape[-1] == 0:
        return False
    return onednn_takes(x.numel() // x.shape[-1], weight, bias, x.dtype)


# ----------------------------------------------------------------------------------------------------
# Custom op (opaque to autograd and torch.compile; the backend is an explicit argument). The default dispatch calls
# oneDNN directly where it runs (no gradient, eager: the sampling loop, where the op's own dispatch would cost ~1% of
# a GEMM); a forced ``onednn`` backend runs every call it can take through this op, gradients included.
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("omni2sound::linear", mutates_args=())
def _linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], backend: str) -> Tensor:
    lead, K, N = x.shape[:-1], x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    if backend == "onednn" and x2.shape[0] > 0 and K > 0 and N > 0:
        y = _onednn_op()(x2, weight.contiguous(), None if bias is None else bias.contiguous(), "none", [], "")
    else:
        y = F.linear(x2, weight, bias)
    return y.reshape(*lead, N)


@_linear_op.register_fake
def _(x, weight, bias, backend):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_setup(ctx, inputs, output):
    x, weight, bias, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _linear_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    dy2 = dy.reshape(-1, dy.shape[-1])
    dx = (dy2 @ weight).reshape(x.shape) if need[0] else None
    dw = dy2.t() @ x.reshape(-1, x.shape[-1]) if need[1] else None
    db = dy2.sum(0) if ctx.has_bias and need[2] else None
    return dx, dw, db, None


_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


def _forced_onednn(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """A call the default would leave on aten (a gradient, a small GEMM, a compiled graph) with ``onednn`` forced:
    oneDNN's GEMM through the custom op, or an error where oneDNN cannot take it."""
    dt = autocast_dtype(x.device)
    if dt is not None or not (x.dtype == weight.dtype == torch.float32 and (bias is None or bias.dtype == x.dtype)):
        raise cannot_take("linear", "onednn", f"oneDNN's GEMM here takes float32 x, weight and bias outside autocast; "
                                              f"got {x.dtype} / {weight.dtype}"
                                              + (f" / {bias.dtype}" if bias is not None else "")
                                              + (f" under {dt} autocast" if dt is not None else ""))
    return _linear_op(x, weight, bias, "onednn")


def check_linear_args(op: str, x, weight, bias, out) -> None:
    """x [..., K] floating, weight [N, K], bias [N] or None, out a tensor or None; one device; one dtype outside
    autocast (under it, torch casts)."""
    tensor(op, "x", x)
    tensor(op, "weight", weight, dims=(2,), shape="[N, K]", like=x, same_dtype=False)
    tensor(op, "bias", bias, optional=True, like=x, same_dtype=False)
    tensor(op, "out", out, optional=True, like=x, same_dtype=False)
    if x.dim() < 1:
        fail(op, "x must be [..., K], got a 0-dim tensor")
    if not x.is_floating_point():
        fail(op, f"x must be a floating tensor, got {x.dtype}")
    if x.shape[-1] != weight.shape[-1]:
        fail(op, f"x has {x.shape[-1]} features but weight is {tuple(weight.shape)} [N, K]")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        fail(op, f"bias must be [N={weight.shape[0]}], got {tuple(bias.shape)}")
    if autocast_dtype(x.device) is None:
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.dtype != x.dtype:
                fail(op, f"{name} is {t.dtype} but x is {x.dtype} (outside autocast they must match)")


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, out: Optional[Tensor] = None) -> Tensor:
    """x [..., K] @ weight[N, K]^T + bias [N] -> [..., N].

    out: a contiguous [prod(x.shape[:-1]), N] buffer of x's dtype that the reference backend writes into when no
    gradient is needed and no autocast is active (a serving loop's reusable buffer: no fresh allocation and its page
    faults); the oneDNN backend returns a new tensor. Either way the result is what is returned; do not rely on
    ``out`` holding it."""
    check_linear_args("linear", x, weight, bias, out)
    w8 = fp8_weight_for(x, weight, bias)                # inside ops.fp8_gemms(table), for the table's weights
    if w8 is not None:
        table = active_table()
        return fp8_linear(x, w8, table.act_scale, table.fast_accum)
    if forced_backend("linear") == "onednn" and not runs_on_onednn(x, weight, bias):
        return _forced_onednn(x, weight, bias)
    if torch.compiler.is_compiling():      # Inductor owns the GEMMs of a compiled graph
        return F.linear(x, weight, bias)
    lead, K, N = x.shape[:-1], x.shape[-1], weight.shape[0]
    if runs_on_onednn(x, weight, bias):
        rows = math.prod(lead)
        w = _packed(weight, rows) if getattr(_packing, "on", False) and rows > 0 else weight
        y = _onednn_op()(x.reshape(-1, K), w, None if bias is None else bias.contiguous(), "none", [], "")
        return y.view(*lead, N)
    if (out is None or needs_grad(x, weight, bias) or autocast_dtype(x.device) is not None
            or not (x.dtype == weight.dtype == out.dtype) or tuple(out.shape) != (math.prod(lead), N)
            or not out.is_contiguous()
            or (bias is not None and bias.dtype != x.dtype)):
        return F.linear(x, weight, bias)
    x2 = x.reshape(-1, K)
    y = torch.mm(x2, weight.t(), out=out) if bias is None else torch.addmm(bias, x2, weight.t(), out=out)
    return y.view(*lead, N)
