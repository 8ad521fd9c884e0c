"""Argument checks shared by the public ops: every op checks every argument here before any backend runs, so a bad
call fails the same way on every backend, with one line naming the op, the argument and what is wrong.

The error is ``OpInputError``, a ``ValueError`` that is also a ``TypeError`` (a wrong dtype or a non-tensor is both a
bad value and a bad type; callers may catch either).
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Optional

import torch
from torch import Tensor

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class OpInputError(ValueError, TypeError):
    """A bad argument to an ``omni2sound.ops`` op."""


def fail(op: str, msg: str) -> None:
    raise OpInputError(f"omni2sound.ops.{op}: {msg}")


def _names(dtypes: tuple) -> str:
    names = [str(d).replace("torch.", "") for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def tensor(op: str, name: str, t, *, dims: Optional[Iterable[int]] = None, shape: str = "",
           dtypes: Optional[tuple] = None, like: Optional[Tensor] = None, like_name: str = "x",
           same_dtype: bool = True, optional: bool = False) -> None:
    """t is a tensor with one of ``dims`` dimensions (``shape`` names them in the message) and one of ``dtypes``, on
    ``like``'s device (and of its dtype when ``same_dtype``); None passes when ``optional``."""
    if t is None and optional:
        return
    if not isinstance(t, Tensor):
        fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() not in tuple(dims):
        want = shape or " or ".join(map(str, dims)) + " dims"
        fail(op, f"{name} must be {want}, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        fail(op, f"{name} must be {_names(dtypes)}, got {t.dtype}")
    if like is not None and (t.device != like.device or (same_dtype and t.dtype != like.dtype)):
        got, want = (f"({t.dtype}, {t.device})", f"({like.dtype}, {like.device})") if same_dtype else \
            (f"on {t.device}", f"on {like.device}")
        fail(op, f"{name} {got} must match {like_name} {want}")


def real(op: str, name: str, v, *, minimum: Optional[float] = None, positive: bool = False,
         optional: bool = False) -> None:
    """v is a finite real number (not a bool, not a tensor), at least ``minimum`` / above 0 when asked."""
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        fail(op, f"{name} must be a real number, got {type(v).__name__}")
    if not math.isfinite(v):
        fail(op, f"{name} must be finite, got {v}")
    if minimum is not None and v < minimum:
        fail(op, f"{name} must be >= {minimum}, got {v}")
    if positive and v <= 0:
        fail(op, f"{name} must be > 0, got {v}")


def flag(op: str, name: str, v) -> None:
    if not isinstance(v, bool):
        fail(op, f"{name} must be a bool, got {type(v).__name__}")


def _offsets_on_host(cu: Tensor) -> Optional[list]:
    """cu's values, or None where reading them is impossible (a torch.compile trace) or would break a CUDA graph
    capture (a device sync)."""
    if cu.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    return cu.tolist()


def cu_seqlens(op: str, cu, B: int, total_k: int, max_seqlen_k, device: torch.device) -> None:
    """The varlen key offsets: int32, 1-D, B + 1 entries, cu[0] = 0, non-decreasing, cu[B] at most the key rows
    (rows past cu[B] belong to no sample: ``pack_condition_tokens(static=True)``'s padding), ``max_seqlen_k`` an int
    at least the largest per-sample count.

    The values are read once per offsets tensor (and again after an in-place change): a GPU tensor costs one device
    sync at its first use, not one per layer and step. Inside a CUDA-graph capture or a torch.compile trace an
    unseen tensor's values cannot be read; the kernels clamp every offset to the key rows there."""
    if not isinstance(cu, Tensor):
        fail(op, f"cu_seqlens_k must be a torch.Tensor, got {type(cu).__name__}")
    if isinstance(max_seqlen_k, bool) or not isinstance(max_seqlen_k, int):
        fail(op, f"max_seqlen_k must be an int, got {type(max_seqlen_k).__name__}")
    if max_seqlen_k < 0:
        fail(op, f"max_seqlen_k must be >= 0, got {max_seqlen_k}")
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.shape[0] != B + 1:
        fail(op, f"cu_seqlens_k must be int32 [B + 1 = {B + 1}], got {cu.dtype} {tuple(cu.shape)} "
                 "(pack_condition_tokens makes it)")
    if cu.device != device:
        fail(op, f"cu_seqlens_k is on {cu.device}, q on {device}")
    if torch.compiler.is_compiling():
        return
    key = (cu._version, cu.data_ptr(), total_k, max_seqlen_k)
    if getattr(cu, "_omni2sound_checked", None) == key:
        return
    vals = _offsets_on_host(cu)
    if vals is None:
        return
    if vals[0] != 0:
        fail(op, f"cu_seqlens_k[0] must be 0, got {vals[0]}")
    longest = 0
    for b in range(B):
        n = vals[b + 1] - vals[b]
        if n < 0:
            fail(op, f"cu_seqlens_k must be non-decreasing, got cu[{b}] = {vals[b]} > cu[{b + 1}] = {vals[b + 1]}")
        longest = max(longest, n)
    if vals[B] > total_k:
        fail(op, f"cu_seqlens_k[-1] = {vals[B]} is past the {total_k} rows of k and v")
    if max_seqlen_k < longest:
        fail(op, f"max_seqlen_k = {max_seqlen_k} is below the longest sample's {longest} keys")
    try:
        cu._omni2sound_checked = key
    except (AttributeError, RuntimeError):     # a tensor subclass without a __dict__: check again next time
        pass
