"""Access to the native extension ``omni2sound._C`` (C++ always, CUDA when built with nvcc).

The extension does not link libtorch, so one build works with any torch version. Every entry point
takes one parameter struct per op (``_C.AdaLNParams``, ``_C.AttnParams``, ...; their layout is in the op's header
under ``csrc/``): data pointers as integers, sizes, strides (in elements) and a dtype code, filled by name; the CUDA
entry points also take the handle of the current torch stream (never the legacy default stream, which would break
CUDA graph capture). Each entry point checks its struct before a kernel runs (sizes, null pointers, the varlen offsets
it reads) and raises ValueError.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

# Must match csrc/common.h.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@functools.lru_cache(maxsize=None)
def lib():
    """The extension module, or None when it was not built (a source checkout without install)."""
    try:
        from omni2sound import _C
    except ImportError:
        return None
    return _C


# The backend checks below run inside ``omni2sound.ops`` dispatch, which torch.compile traces: Dynamo cannot trace
# a pybind11 function (``built_with_cuda``), so each check is marked as a constant that Dynamo evaluates once at
# trace time instead of tracing into it. Their answers cannot change within a process.
@torch.compiler.assume_constant_result
def has_cpu() -> bool:
    return lib() is not None


@torch.compiler.assume_constant_result
def has_cuda() -> bool:
    return lib() is not None and bool(lib().built_with_cuda()) and torch.cuda.is_available()


@torch.compiler.assume_constant_result
def has_symbol(name: str) -> bool:
    """Whether the extension was built with the entry point ``name`` (e.g. ``snake_forward_cuda``)."""
    return lib() is not None and hasattr(lib(), name)


def dtype_code(t: torch.Tensor) -> int:
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"omni2sound kernels take float32, float16 or bfloat16 tensors, got {t.dtype}") from None


def stream_of(t: torch.Tensor) -> int:
    """The handle of the current torch stream on t's device (0 for CPU tensors)."""
    if t.is_cuda:
        return torch.cuda.current_stream(t.device).cuda_stream
    return 0


def ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()
