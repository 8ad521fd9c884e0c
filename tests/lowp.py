"""Shared by the low-precision tests (flash-attn's 2x rule): importable because pytest puts tests/ on sys.path."""
import math

import torch


def half_ulp(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Half a unit in the last place of ``dtype`` at ref's largest magnitude: the error of merely storing the exact
    answer in that dtype, the final rounding no kernel can avoid. The 2x rule gets it as slack: where the plain op's
    error is at that floor by chance (its largest element happened to round well), twice its error is below what any
    kernel can promise."""
    m = ref.abs().max().item() if ref.numel() else 0.0
    return 0.0 if m == 0 else 0.5 * torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(m))
