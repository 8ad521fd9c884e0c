"""Per-device choices of a sampling loop that follow from how the ops run on that device.

The network never asks which device or backend runs it; the module that prepares its conditions for sampling
(``omni2sound.sampling``) asks these.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor


def sampling_workspace(device) -> Optional[Dict[str, Tensor]]:
    """An empty workspace (reusable output buffers by name) for a sampling loop on ``device``, or None for none.

    The CPU gets one: a fresh 5-6 MB tensor is served by mmap and page-faults on first touch (12k-38k faults per
    S step), so the GEMMs that can write into a buffer (``linear``'s and ``linear_gelu``'s aten form) reuse one per
    request. A GPU's caching allocator already reuses memory, and a captured CUDA graph holds static buffers."""
    return {} if torch.device(device).type == "cpu" else None


def skips_rows_without_keys(device) -> bool:
    """Whether a sampling loop on ``device`` should leave out of the cross-attention the trailing rows that have no
    condition tokens (their output is exactly the projection's bias): on the CPU, where it saves 7% of an S step's
    GEMM FLOPs; not on a GPU, where at batch 1 both row counts fit in one wave of GEMM tiles and the concatenation
    would add a kernel per layer."""
    return torch.device(device).type == "cpu"
