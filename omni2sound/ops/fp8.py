"""FP8 (e4m3) projections for the sampling step: weights quantised once, activations per call, scaled GEMMs.

    weight  W [N, K]  ->  Wq = W / s_w  in float8_e4m3fn,  s_w [N] fp32 = max(amax_k |W[n, k]|, tiny) / 448
                          (per output channel; ``weight_scale="tensor"``: one s_w for the whole matrix)
    input   x [..., K] -> xq = x / s_x  in float8_e4m3fn,  s_x [M, 1] fp32 = max(amax_k |x[m, k]|, tiny) / 448
                          (per token, computed on the device every call: no host sync, graph-capturable;
                          ``act_scale="tensor"``: one s_x for the whole input)
    y [..., N] = (xq s_x) (Wq s_w)^T + b,   accumulated in fp32, written in x's dtype

448 is e4m3's largest finite value: every |x / s_x| <= 448 (up to one rounding of the scale), so the cast never
overflows (e4m3fn has no infinity; torch's cast saturates at 448 below 464 and gives NaN past it).

Backends (op ``fp8_linear``):
  reference - plain PyTorch: the same quantisation, then both operands dequantised to fp32 and multiplied in fp32.
              The numerical definition of the op, on any device.
  scaled_mm - ``torch._scaled_mm`` (cuBLASLt / CUTLASS fp8 GEMM with per-row / per-column scales on the GPU; a
              reference loop in torch's CPU build): the GPU default on compute capability >= 8.9 (Ada, Hopper).
              It needs K and N multiples of 16 (cuBLASLt's fp8 alignment) and a bf16 output for row-wise scales;
              a call it cannot take runs the reference when nothing was forced (``fp8_takes``).
The activation quantisation (op ``fp8_quantize``) has its own backends: ``reference`` (four torch kernels: a row
max, the scale, one divide-and-cast) and ``triton`` (one pass per row, ``omni2sound.kernels.fp8``; the GPU default).

Fused activation quantisation (``fp8_gemms(table, fuse_quant=True)``, per-token scales only): three of a DiT block's
six projections (self-attention qkv, cross-attention q, MLP fc1) take the output y of a fused AdaLN op, which holds
every row of y for its LayerNorm anyway, and a fourth (MLP fc2) the MLP's GELU. Inside such a context the AdaLN op
and ``linear_gelu`` also write y's e4m3 copy and per-token scales (``ops.adaln``, ``ops.gelu_fp8``: one Triton kernel
each on a GPU) and hand them over explicitly: ``hand_over(y, q, scale)`` puts
them in this thread's one hand-off slot, and ``fp8_linear(x)`` takes them instead of quantising x itself only when x
is y or a contiguous block of y's whole rows (the cross-attention's leading rows ``y[:n]``: the matching rows of q and
scale), unchanged since (same storage, dtype and version counter) and quantised by the backend the GEMM would have
used itself; any other input is quantised as before, so a pairing is right or not made. The slot keeps y alive
until the next hand-off or the context's end, and the pairing is decided while the step runs eagerly or is captured:
a CUDA graph replays the same kernels on the same buffers. The result is bit for bit the unfused one: the same
quantisation of the same y.

Accuracy: e4m3 keeps 3 mantissa bits, a relative rounding error of at most 2^-4 per element (bf16: 2^-8). On
Gaussian operands the op's relative (Frobenius) error against an fp64 GEMM is 0.037, per-token or per-tensor alike,
against bf16's 0.0029 (M K N = 64 256 96 to 500 1536 1536, three draws each). tests/test_fp8.py bounds the op against
an fp64 GEMM and the sampled latents against fp32 / bf16 ones.

How the sampling step uses it: ``quantize_linears(modules)`` makes an ``Fp8Weights`` table once per pipeline (the
weights of the DiT blocks' projections); inside ``fp8_gemms(table)`` every ``ops.linear`` / ``ops.linear_gelu`` whose
weight is in the table and needs no gradient runs ``fp8_linear`` instead of its bf16 / fp32 GEMM. The table holds the
quantised copies (N K bytes + 4 N each) beside the original weights; a weight changed in place (an optimiser step,
``load_state_dict``) is noticed by its version counter and skipped (bf16) until the table is rebuilt.
"""
from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, Optional, Tuple, Union

import torch
from torch import Tensor

from ._checks import fail, tensor
from ._dispatch import forced_backend, needs_grad, register_op, select_backend, triton_available

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
# the smallest amax a scale is made from: an all-zero row gets a finite scale (its output is exact 0)
AMAX_FLOOR = 1e-12
SCALES = ("token", "tensor")
WEIGHT_SCALES = ("channel", "tensor")


# ----------------------------------------------------------------------------------------------------
# Quantisation
# ----------------------------------------------------------------------------------------------------
@dataclass
class Fp8Weight:
    """A weight quantised once: q [N, K] float8_e4m3fn (row-major; ``q.t()`` is the column-major [K, N] operand
    ``_scaled_mm`` takes), scale fp32 [N] (per channel) or [1] (per tensor), and the bias [N] or None in the
    layer's dtype."""
    q: Tensor
    scale: Tensor
    bias: Optional[Tensor] = None

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    @property
    def in_features(self) -> int:
        return self.q.shape[1]

    def dequantize(self) -> Tensor:
        """fp32 [N, K]: what the quantised weight stands for."""
        return self.q.float() * self.scale.view(-1, 1)


def quantize_weight(weight: Tensor, bias: Optional[Tensor] = None, weight_scale: str = "channel") -> Fp8Weight:
    """weight [N, K] (any float dtype) -> Fp8Weight with per-output-channel (or one per-tensor) scale."""
    tensor("quantize_weight", "weight", weight, dims=(2,), shape="[N, K]")
    if weight_scale not in WEIGHT_SCALES:
        fail("quantize_weight", f"weight_scale must be one of {WEIGHT_SCALES}, got {weight_scale!r}")
    w = weight.detach().float()
    if weight_scale == "channel":
        amax = w.abs().amax(dim=1) if w.shape[1] else w.new_zeros(w.shape[0])
    else:
        amax = w.abs().amax().reshape(1) if w.numel() else w.new_zeros(1)
    scale = amax.clamp(min=AMAX_FLOOR) / FP8_MAX                                   # [N] or [1]
    q = (w / scale.view(-1, 1)).clamp(-FP8_MAX, FP8_MAX).to(FP8).contiguous()
    return Fp8Weight(q=q, scale=scale.contiguous(), bias=bias)       # the layer's own bias tensor (looked up by it)


def quantize_rows_reference(x2: Tensor, act_scale: str = "token") -> Tuple[Tensor, Tensor]:
    """x2 [M, K] -> (xq [M, K] float8_e4m3fn, scale fp32 [M, 1]); ``act_scale="tensor"``: one scale for all rows,
    returned expanded to [M, 1] (what a row-wise scaled GEMM takes). No host synchronisation."""
    M, K = x2.shape
    if M == 0 or K == 0:                                                           # nothing to take a max of
        return (torch.zeros((M, K), dtype=FP8, device=x2.device),
                torch.full((M, 1), AMAX_FLOOR / FP8_MAX, dtype=torch.float32, device=x2.device))
    if act_scale == "token":
        amax = torch.linalg.vector_norm(x2, float("inf"), dim=1, keepdim=True, dtype=torch.float32)  # [M, 1]
    else:
        amax = torch.linalg.vector_norm(x2, float("inf"), dtype=torch.float32).reshape(1, 1).expand(M, 1)
    scale = (amax.clamp(min=AMAX_FLOOR) / FP8_MAX).contiguous()                    # [M, 1]
    xq = torch.empty((M, K), dtype=FP8, device=x2.device)
    torch.div(x2, scale, out=xq)                                                   # one kernel: divide and cast
    return xq, scale


register_op("fp8_quantize", {"reference": lambda d: True, "triton": lambda d: triton_available(d.type)},
            default_order={"cuda": ("triton", "reference"), "cpu": ("reference",)}, family="fp8")


def quantizer_for(device: torch.device, M: int, K: int, act_scale: str = "token") -> str:
    """Which quantisation ``quantize_rows`` runs for an [M, K] input on ``device`` now: "triton" (the kernel) or
    "reference"."""
    if (select_backend("fp8_quantize", device) == "triton" and act_scale == "token" and M > 0 and 0 < K <= 16384
            and not torch.compiler.is_compiling()):
        return "triton"
    return "reference"


def fused_plan(fused_op: str, op: str, device: torch.device, M: int, K: int) -> Tuple[str, str]:
    """(backend of ``op``, quantizer) for an op that also writes its [M, K] output's per-token fp8 copy (the AdaLN
    ops, the MLP's GELU): ("triton", "triton") is the one fused Triton kernel, chosen when the fused op
    (``fused_op``: ``adaln_fp8`` / ``gelu_fp8``) selects triton, ``quantize_rows`` would run the Triton kernel itself
    (which also bounds M and K) and no other backend is forced for ``op``; otherwise ``op``'s own backend, then
    ``quantize_rows``' quantizer on its output."""
    quantizer = quantizer_for(device, M, K)
    if (select_backend(fused_op, device) == "triton" and quantizer == "triton"
            and forced_backend(op) in (None, "triton")):
        return "triton", quantizer
    return select_backend(op, device), quantizer


def _quantize_with(x2: Tensor, act_scale: str, quantizer: str) -> Tuple[Tensor, Tensor]:
    if quantizer == "triton":
        from omni2sound.kernels import fp8 as tk

        return tk.quantize_rows(x2 if x2.stride(-1) == 1 else x2.contiguous())
    return quantize_rows_reference(x2, act_scale)


def quantize_rows(x2: Tensor, act_scale: str = "token") -> Tuple[Tensor, Tensor]:
    """x2 [M, K] -> (xq float8_e4m3fn [M, K], scale fp32 [M, 1]) through the selected backend (module docstring).
    Inside torch.compile the reference's torch ops are traced (Inductor fuses them into one kernel)."""
    if act_scale not in SCALES:
        fail("fp8_quantize", f"act_scale must be one of {SCALES}, got {act_scale!r}")
    return _quantize_with(x2, act_scale, quantizer_for(x2.device, *x2.shape, act_scale))


# ----------------------------------------------------------------------------------------------------
# The GEMM
# ----------------------------------------------------------------------------------------------------
def fp8_linear_reference(x: Tensor, w: Fp8Weight, act_scale: str = "token") -> Tensor:
    """x [..., K] -> [..., N] in x's dtype: x quantised as ``quantize_rows_reference``, both operands dequantised to
    fp32 and multiplied in fp32, plus the bias."""
    lead, K = x.shape[:-1], x.shape[-1]
    xq, sx = quantize_rows_reference(x.reshape(-1, K), act_scale)
    return _dequantized_gemm(xq, sx, w, x.dtype).reshape(*lead, w.out_features)


def _dequantized_gemm(xq: Tensor, sx: Tensor, w: Fp8Weight, out_dtype: torch.dtype) -> Tensor:
    """The reference's GEMM: xq [M, K] fp8 with sx [M, 1] -> [M, N] in out_dtype, fp32 math."""
    y = (xq.float() * sx) @ w.dequantize().t()
    if w.bias is not None:
        y = y + w.bias.float()
    return y.to(out_dtype)


@torch.compiler.assume_constant_result          # checked inside compiled steps: a constant to Dynamo, never traced
def _scaled_mm_device(device: torch.device) -> bool:
    if not hasattr(torch, "_scaled_mm"):
        return False
    if device.type == "cuda":
        try:
            return torch.cuda.get_device_capability(device) >= (8, 9)
        except Exception:
            return False
    return device.type == "cpu"


register_op("fp8_linear", {"reference": lambda d: True, "scaled_mm": _scaled_mm_device},
            default_order={"cuda": ("scaled_mm", "reference"), "cpu": ("reference",)}, family="fp8")


@functools.lru_cache(maxsize=None)
def cpu_takes_rowwise_scales() -> bool:
    """Whether this torch's CPU ``_scaled_mm`` takes row-wise scales ([M, 1] x [1, N]); older builds (torch 2.11)
    take per-tensor scales only. Tried once on a 16 x 16 product."""
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
        return True
    except RuntimeError:
        return False


def _tensorwise(act_scale: str, w: Fp8Weight) -> bool:
    """Whether the GEMM takes one scale each side (else row-wise: per-token x, per-channel or broadcast w)."""
    return act_scale == "tensor" and w.scale.numel() == 1


def scaled_mm_takes(x: Tensor, w: Fp8Weight, act_scale: str = "token") -> bool:
    """Whether ``torch._scaled_mm`` takes this call: K and N multiples of 16, the output bf16 (its row-wise scaled
    kernel writes only bf16) or, with per-tensor scales on both sides, bf16 / fp16 / fp32; on the CPU, row-wise
    scales only where this torch build takes them."""
    K, N = w.in_features, w.out_features
    if K % 16 or N % 16:
        return False
    if _tensorwise(act_scale, w):
        return x.dtype in (torch.bfloat16, torch.float16, torch.float32)
    if x.device.type == "cpu" and not cpu_takes_rowwise_scales():
        return False
    return x.dtype == torch.bfloat16


def _scaled_mm(xq: Tensor, sx: Tensor, w: Fp8Weight, out_dtype: torch.dtype, fast_accum: bool,
               tensorwise: bool) -> Tensor:
    """[M, N] = (xq sx) (w.q w.scale)^T + bias through ``torch._scaled_mm`` (mat2 the column-major ``w.q.t()``).
    tensorwise: one scale each side (sx [1, 1]); else row-wise, sx [M, 1] and the weight's scale as [1, N]."""
    N = w.out_features
    if tensorwise:
        sa, sb = sx.reshape(()), w.scale.reshape(())
    else:
        sb = w.scale.view(1, N) if w.scale.numel() == N else w.scale.reshape(1, 1).expand(1, N).contiguous()
        sa = sx
    bias = None if w.bias is None else w.bias.to(out_dtype)
    if bias is not None and out_dtype == torch.float32:                           # cuBLASLt: no bias with fp32 out
        return torch._scaled_mm(xq, w.q.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype,
                                use_fast_accum=fast_accum) + bias
    return torch._scaled_mm(xq, w.q.t(), scale_a=sa, scale_b=sb, bias=bias, out_dtype=out_dtype,
                            use_fast_accum=fast_accum)


def fp8_linear_backend(x: Tensor, w: Fp8Weight, act_scale: str = "token") -> str:
    """The backend ``fp8_linear(x, w, act_scale)`` runs: the selected one, or the reference for a call ``scaled_mm``
    cannot take (an error when ``scaled_mm`` was forced). x: the input, or any tensor of its dtype, device and size."""
    backend = select_backend("fp8_linear", x.device)
    if x.numel() == 0:                                                             # no rows, or K = 0: no GEMM
        return "reference"
    if backend == "scaled_mm" and not scaled_mm_takes(x, w, act_scale):
        if forced_backend("fp8_linear") == "scaled_mm":
            from ._dispatch import cannot_take
            cpu = "" if x.device.type != "cpu" or cpu_takes_rowwise_scales() else \
                f"; torch {torch.__version__}'s CPU _scaled_mm takes per-tensor scales only"
            raise cannot_take("fp8_linear", "scaled_mm", f"K={w.in_features} and N={w.out_features} must be "
                              f"multiples of 16 and x bf16 (got {x.dtype}) for row-wise scales{cpu}")
        return "reference"
    return backend


def fp8_linear(x: Tensor, w: Fp8Weight, act_scale: str = "token", fast_accum: bool = True) -> Tensor:
    """x [..., K] @ dequant(w)^T + w.bias -> [..., N] in x's dtype, x quantised per token (or per tensor) on the fly.

    fast_accum: ``_scaled_mm``'s fast accumulation (Hopper's fp8 MMA accumulates in reduced precision without the
    periodic fp32 promotion; faster, slightly less accurate); the reference always accumulates in fp32.
    No gradient: an inference op."""
    tensor("fp8_linear", "x", x)
    if x.dim() < 1 or x.shape[-1] != w.in_features:
        fail("fp8_linear", f"x must be [..., K={w.in_features}], got {tuple(x.shape)}")
    if act_scale not in SCALES:
        fail("fp8_linear", f"act_scale must be one of {SCALES}, got {act_scale!r}")
    if needs_grad(x):
        raise RuntimeError("fp8_linear is an inference op: call it under torch.no_grad() (it has no gradient)")
    backend = fp8_linear_backend(x, w, act_scale)
    lead, K = x.shape[:-1], x.shape[-1]
    M = x.numel() // K if K else 0
    # the input's own quantisation: the reference's, or the one quantize_rows would run; a hand-over made by the
    # same quantiser (an AdaLN op's fused copy of x) stands in for it, anything else is quantised here
    quantizer = "reference" if backend == "reference" else quantizer_for(x.device, M, K, act_scale)
    handed = handed_rows(x, quantizer) if act_scale == "token" else None
    xq, sx = handed if handed is not None else _standalone_quantize(x.reshape(-1, K), act_scale, quantizer)
    if backend == "reference":
        return _dequantized_gemm(xq, sx, w, x.dtype).reshape(*lead, w.out_features)
    tensorwise = _tensorwise(act_scale, w)
    if tensorwise:
        sx = sx[:1]                                                                # one scale each side
    return _scaled_mm(xq, sx, w, x.dtype, fast_accum, tensorwise).reshape(*lead, w.out_features)


# ----------------------------------------------------------------------------------------------------
# The table of quantised weights, and the switch that routes ops.linear through it
# ----------------------------------------------------------------------------------------------------
class Fp8Weights:
    """Quantised copies of a set of ``nn.Linear`` weights, made once; looked up by the weight tensor.

    act_scale / fast_accum: how ``fp8_linear`` runs the GEMMs of these weights."""

    def __init__(self, act_scale: str = "token", weight_scale: str = "channel", fast_accum: bool = True):
        if act_scale not in SCALES or weight_scale not in WEIGHT_SCALES:
            raise ValueError(f"act_scale must be one of {SCALES} and weight_scale one of {WEIGHT_SCALES}, got "
                             f"{act_scale!r}, {weight_scale!r}")
        self.act_scale, self.weight_scale, self.fast_accum = act_scale, weight_scale, fast_accum
        # id(weight) -> (weakref to the weight, its version when quantised, Fp8Weight)
        self._table: Dict[int, Tuple[weakref.ref, int, Fp8Weight]] = {}

    def add(self, weight: Tensor, bias: Optional[Tensor] = None) -> None:
        self._table[id(weight)] = (weakref.ref(weight), weight._version,
                                   quantize_weight(weight, bias, self.weight_scale))

    def get(self, weight: Tensor, bias: Optional[Tensor] = None) -> Optional[Fp8Weight]:
        """The quantised weight (with ``bias``), or None: not in the table, or changed since it was quantised."""
        entry = self._table.get(id(weight))
        if entry is None or entry[0]() is not weight:
            return None
        # a compiled step is traced once, after the table was made (its version counter is no constant to Dynamo)
        if not torch.compiler.is_compiling() and entry[1] != weight._version:
            return None
        w = entry[2]
        if bias is not w.bias:
            w = Fp8Weight(w.q, w.scale, bias)
        return w

    def __len__(self) -> int:
        return len(self._table)

    def backends(self, dtype: torch.dtype, device: Union[str, torch.device]) -> Dict[str, int]:
        """{backend: number of the table's weights whose GEMMs ``fp8_linear`` runs on it} for inputs of ``dtype`` on
        ``device`` under the backends selected now (``ops.use_backend`` / ``OMNI2SOUND_BACKEND``)."""
        out: Dict[str, int] = {}
        for _, _, w in self._table.values():
            x = torch.empty((1, w.in_features), dtype=dtype, device=device)
            b = fp8_linear_backend(x, w, self.act_scale)
            out[b] = out.get(b, 0) + 1
        return out

    def nbytes(self) -> int:
        return sum(e[2].q.numel() + 4 * e[2].scale.numel() for e in self._table.values())


def quantize_linears(modules: Iterable[torch.nn.Linear], act_scale: str = "token", weight_scale: str = "channel",
                     fast_accum: bool = True) -> Fp8Weights:
    """An Fp8Weights table of these layers' weights (quantised now, once)."""
    table = Fp8Weights(act_scale, weight_scale, fast_accum)
    with torch.no_grad():
        for m in modules:
            table.add(m.weight, m.bias)
    return table


_active = threading.local()


@contextlib.contextmanager
def fp8_gemms(table: Optional[Fp8Weights], fuse_quant: bool = False) -> Iterator[None]:
    """Within this context (this thread), ``ops.linear`` / ``ops.linear_gelu`` calls whose weight is in ``table``
    and that need no gradient run ``fp8_linear``. ``fp8_gemms(None)`` turns it off inside an enclosing context.

    fuse_quant: the AdaLN ops quantise their output y for the next GEMM as they write it (per-token activation
    scales only; a table with ``act_scale="tensor"`` ignores it): see "Fused activation quantisation" above."""
    prev = (getattr(_active, "table", None), getattr(_active, "fuse", False), getattr(_active, "handoff", None))
    _active.table, _active.fuse, _active.handoff = table, bool(fuse_quant), None
    try:
        yield
    finally:
        _active.table, _active.fuse, _active.handoff = prev


# ----------------------------------------------------------------------------------------------------
# Fused activation quantisation: an op's fp8 copy of its output, handed to the GEMM that reads it
# ----------------------------------------------------------------------------------------------------
@dataclass
class _HandOff:
    y: Tensor                   # the producer's output [..., K], contiguous
    version: int                # y's version counter when quantised (an in-place change since voids the hand-off)
    q: Tensor                   # [M, K] float8_e4m3fn, M = y.numel() // K
    scale: Tensor               # fp32 [M, 1]
    quantizer: str              # "triton" / "reference": whose quantisation q and scale are


def fuse_quant_for(y: Tensor) -> bool:
    """Whether an op producing y [..., K] now should also quantise it per token and ``hand_over`` the result: inside
    ``fp8_gemms(table, fuse_quant=True)`` with per-token scales, eager, no gradient, a plain (not inference-mode)
    non-empty contiguous tensor."""
    table = getattr(_active, "table", None)
    return (table is not None and getattr(_active, "fuse", False) and table.act_scale == "token"
            and not torch.compiler.is_compiling() and not needs_grad(y) and not y.is_inference()
            and y.numel() > 0 and y.is_contiguous())


def hand_over(y: Tensor, q: Tensor, scale: Tensor, quantizer: str) -> None:
    """Offer y's per-token quantisation (q [M, K] e4m3, scale fp32 [M, 1], made by ``quantizer``) to the
    ``fp8_linear`` calls that read y or a block of its rows; replaces the previous offer. Only where
    ``fuse_quant_for(y)``."""
    K = y.shape[-1]
    if q.shape != (y.numel() // K, K) or scale.shape != (q.shape[0], 1):
        raise ValueError(f"hand_over: q {tuple(q.shape)} / scale {tuple(scale.shape)} do not match y {tuple(y.shape)}")
    _active.handoff = _HandOff(y, y._version, q, scale, quantizer)


def handed_rows(x: Tensor, quantizer: str) -> Optional[Tuple[Tensor, Tensor]]:
    """(q, scale) of x [..., K] from the current hand-off when x is its y or a block of y's rows [r0, r0 + M) (same
    storage, dtype, unchanged) and the hand-off was made by ``quantizer``; else None (quantise x itself)."""
    h = getattr(_active, "handoff", None)
    if h is None or h.quantizer != quantizer or torch.compiler.is_compiling():
        return None
    y, K = h.y, h.y.shape[-1]
    if (x.dtype != y.dtype or x.device != y.device or x.dim() == 0 or x.shape[-1] != K or x.numel() == 0
            or not x.is_contiguous() or x.is_inference()
            or x.untyped_storage().data_ptr() != y.untyped_storage().data_ptr() or x._version != h.version):
        return None
    offset, M = x.storage_offset() - y.storage_offset(), x.numel() // K
    if offset < 0 or offset % K or offset // K + M > h.q.shape[0]:
        return None
    r0 = offset // K
    return h.q[r0:r0 + M], h.scale[r0:r0 + M]


def _standalone_quantize(x2: Tensor, act_scale: str, quantizer: str) -> Tuple[Tensor, Tensor]:
    """fp8_linear's own quantisation of its input x2 [M, K] (no hand-off took its place)."""
    return _quantize_with(x2, act_scale, quantizer)


def fp8_weight_for(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Optional[Fp8Weight]:
    """The quantised weight to run ``linear(x, weight, bias)`` in fp8 with, or None (no active table, the weight is
    not in it, or a gradient is needed)."""
    table = getattr(_active, "table", None)
    if table is None or needs_grad(x, weight, bias):
        return None
    return table.get(weight, bias)


def active_table() -> Optional[Fp8Weights]:
    return getattr(_active, "table", None)


@functools.lru_cache(maxsize=None)
def fp8_supported(device_type: str = "cuda", index: int = 0) -> bool:
    """Whether this machine's ``device_type`` device runs fp8 GEMMs natively (a GPU of compute capability >= 8.9)."""
    if device_type != "cuda" or not torch.cuda.is_available():
        return False
    return _scaled_mm_device(torch.device("cuda", index))
