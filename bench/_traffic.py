"""Memory traffic of a step, counted per op below autograd: a hardware-independent measure of the non-GEMM work.

Every aten op and omni2sound custom op that runs (forward, backward and optimizer alike) passes through
``TrafficCounter`` (a TorchDispatchMode, which sits under autocast and autograd, so it sees the casts autocast
inserts and every backward kernel). Per op it adds the bytes of its tensor inputs (read) and of the tensors it
creates or writes in place (written); views and allocations (``empty``) cost nothing. Expanded inputs count their
real extent (a stride-0 dim reads one element), so a per-sample [B, 1, D] modulation broadcast over L counts as B x D.

Why count instead of time: the L training step's non-GEMM kernels are memory-bound on a GPU, so their bytes bound
their time from below (bytes / HBM bandwidth), and bytes can be counted on any machine, exactly, without noise.
The counts come from a CPU run of the same graph (CPU autocast in bf16; the fused ops on their C++ backends, which
move the same bytes as their CUDA/Triton versions). A depth x batch grid of small runs extrapolates exactly to the
L preset at batch 32: every count is bilinear in (depth, batch) (``extrapolate``). What this does not see: kernel
efficiency below bandwidth, launch and host overhead, and the ops CUDA autocast treats differently from CPU
autocast (it runs layer_norm / rms_norm in fp32, CPU autocast in bf16).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GEMM_OPS = {"mm", "addmm", "bmm", "baddbmm", "_addmm_activation"}
LAYOUT_OPS = {"cat", "stack", "clone", "copy", "index", "index_put", "slice_backward", "select_backward",
              "new_zeros", "zeros", "zeros_like", "fill", "constant_pad_nd", "_unsafe_view", "index_select"}
REDUCTION_OPS = {"sum", "mean", "amax", "max", "min", "norm", "var", "std", "var_mean", "_foreach_norm"}
# views whose schema does not say so (they return a fresh TensorImpl over the same storage)
ALIASING_OPS = {"aten::_unsafe_view", "aten::alias", "aten::lift_fresh"}
# allocations: memory, no traffic (the op that later fills the tensor counts the write)
ALLOCATION_OPS = {"aten::empty", "aten::empty_like", "aten::new_empty", "aten::empty_strided",
                  "aten::new_empty_strided"}
# arguments an op writes without reading them (its schema marks them written, which the counter would count as read too)
WRITE_ONLY_ARGS = {"omni2sound::adamw_step_": ("copy",),
                   "omni2sound::gated_residual_adaln_backward": ("dgate_out", "dscale_out", "dshift_out"),
                   "omni2sound::adaln_modulate_backward": ("dscale_out", "dshift_out")}
Row = List[float]                # [calls, bytes read, bytes written, GEMM FLOPs]


def extent_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel must touch to read ``t``: its elements, with stride-0 (broadcast) dims counted once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size() if t.numel() else 0


def _gemm_flops(ins: List[torch.Tensor]) -> float:
    a, b = ins[-2], ins[-1]                      # mm(a, b), addmm(bias, a, b), bmm(a, b), baddbmm(c, a, b)
    return 2.0 * a.numel() * b.shape[-1]


def category(name: str, ins: List[torch.Tensor], outs: List[torch.Tensor]) -> str:
    """The bucket an op's bytes go to: gemm, attention, cast, layout, reduction, omni2sound::<op>, or the aten name."""
    base = name.split("::")[-1].split(".")[0].rstrip("_")
    if name.startswith("omni2sound::"):
        return name
    if base in GEMM_OPS:
        return "gemm"
    if "attention" in base:
        return "attention"
    if base in ("_to_copy", "copy", "to") and len({t.dtype for t in ins + outs}) > 1:
        return "cast"
    if base in LAYOUT_OPS or base == "_to_copy":
        return "layout"
    if base in REDUCTION_OPS:
        return "reduction"
    if base.startswith("_fused_adam") or base.startswith("_foreach"):
        return "optimizer"
    return "elementwise:" + base


class TrafficCounter(TorchDispatchMode):
    """rows: category -> [calls, bytes read, bytes written, GEMM FLOPs]; ops: aten/custom op name -> the same."""

    def __init__(self):
        super().__init__()
        self.rows: Dict[str, Row] = defaultdict(lambda: [0, 0, 0, 0.0])
        self.ops: Dict[str, Row] = defaultdict(lambda: [0, 0, 0, 0.0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema = func._schema
        written_args = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        new_returns = [r.alias_info is None for r in schema.returns]
        if (not written_args and not any(new_returns)) or schema.name in ALIASING_OPS | ALLOCATION_OPS:
            return out                                                        # a view or an allocation: no traffic
        skip = WRITE_ONLY_ARGS.get(schema.name, ())
        read_args = [kwargs.get(a.name, args[i] if i < len(args) else None) for i, a in enumerate(schema.arguments)
                     if a.name not in skip]
        flat_in = [t for t in tree_flatten(read_args)[0] if isinstance(t, torch.Tensor)]
        outs = out if isinstance(out, (tuple, list)) else (out,)
        created = [t for is_new, o in zip(new_returns, outs) if is_new
                   for t in tree_flatten(o)[0] if isinstance(t, torch.Tensor)]
        mutated = []
        for i, a in enumerate(schema.arguments):
            if a.name in written_args:
                v = kwargs.get(a.name, args[i] if i < len(args) else None)
                mutated += [t for t in tree_flatten(v)[0] if isinstance(t, torch.Tensor)]
        name = schema.name + (f".{schema.overload_name}" if schema.overload_name else "")
        read = sum(extent_bytes(t) for t in flat_in)
        written = sum(extent_bytes(t) for t in created + mutated)
        cat = category(schema.name, flat_in, created + mutated)
        flops = _gemm_flops(flat_in) if cat == "gemm" else 0.0
        for row in (self.rows[cat], self.ops[name]):
            row[0] += 1
            row[1] += read
            row[2] += written
            row[3] += flops
        return out


def extrapolate(grid: Dict[Tuple[int, int], Dict[str, Row]], depth: int, batch: int) -> Dict[str, Row]:
    """Counts at (depth, batch) from counts at a 2 x 2 grid {(d0, b0), (d0, b1), (d1, b0), (d1, b1)}, each a bilinear
    function c0 + c1 d + c2 b + c3 d b of (depth, batch): blocks repeat, and every per-block tensor is per sample."""
    (d0, d1), (b0, b1) = sorted({d for d, _ in grid}), sorted({b for _, b in grid})
    keys = set().union(*(set(r) for r in grid.values()))
    wd, wb = (depth - d0) / (d1 - d0), (batch - b0) / (b1 - b0)
    out: Dict[str, Row] = {}
    for k in keys:
        def f(d, b, i):
            return grid[(d, b)].get(k, [0, 0, 0, 0.0])[i]
        out[k] = [(1 - wd) * (1 - wb) * f(d0, b0, i) + (1 - wd) * wb * f(d0, b1, i) + wd * (1 - wb) * f(d1, b0, i)
                  + wd * wb * f(d1, b1, i) for i in range(4)]
    return out


def summarize(rows: Dict[str, Row], bandwidth: float, flops_peak: float) -> List[dict]:
    """One dict per category, largest traffic first, with its floor time: bytes / bandwidth (GEMMs: FLOPs / peak)."""
    res = []
    for k, (n, rd, wr, fl) in rows.items():
        ms = (fl / flops_peak if k == "gemm" else (rd + wr) / bandwidth) * 1e3
        res.append({"category": k, "calls": n, "read_GB": rd / 1e9, "written_GB": wr / 1e9, "gemm_TFLOP": fl / 1e12,
                    "floor_ms": ms})
    return sorted(res, key=lambda r: -(r["read_GB"] + r["written_GB"]))
