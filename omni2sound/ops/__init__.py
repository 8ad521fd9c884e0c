"""omni2sound.ops: the single dispatch point for every fused op.

Each op has backends ``reference`` (plain PyTorch), ``cpu`` (C++), ``cuda`` (CUDA), ``triton`` (``linear``: oneDNN's
GEMM, ``onednn``; ``fp8_linear``: torch's fp8 GEMM, ``scaled_mm``); the
default is picked by device and availability, ``OMNI2SOUND_BACKEND`` or ``use_backend(...)`` override
it (see ``_dispatch``).
"""
from ._dispatch import BACKENDS, available_backends, overrides_key, select_backend, use_backend
from .adaln import (
    Mod,
    adaln_modulate,
    adaln_modulate_fp8,
    adaln_modulate_reference,
    gated_residual_adaln,
    gated_residual_adaln_fp8,
    gated_residual_adaln_reference,
    modulation_grad_buffer,
    split_modulation,
)
from .adamw import adamw_step_, adamw_step_reference
from .attention import attention, attention_reference
from .cross_attention import cross_attention, cross_attention_reference, pack_condition_tokens
from .fp8 import (
    Fp8Weight,
    Fp8Weights,
    fp8_gemms,
    fp8_linear,
    fp8_linear_reference,
    fp8_supported,
    quantize_linears,
    quantize_rows,
    quantize_rows_reference,
    quantize_weight,
)
from .gelu import bias_gelu, bias_gelu_reference, gelu_fp8, linear_gelu, linear_gelu_reference
from .linear import clear_packed_weights, linear, linear_reference, onednn_takes, packed_weights, runs_on_onednn
from .qk_norm_rope import head_rms_norm, qk_norm_rope, qk_norm_rope_reference
from .sampling_plan import sampling_workspace, skips_rows_without_keys
from .snake import snake, snake_reference, snake_residual, snake_residual_reference

__all__ = [
    "BACKENDS", "available_backends", "overrides_key", "select_backend", "use_backend", "adamw_step_",
    "adamw_step_reference",
    "attention", "attention_reference", "cross_attention", "cross_attention_reference", "pack_condition_tokens",
    "bias_gelu", "bias_gelu_reference", "gelu_fp8", "linear_gelu", "linear_gelu_reference", "linear",
    "linear_reference", "onednn_takes", "runs_on_onednn", "packed_weights", "clear_packed_weights",
    "Fp8Weight", "Fp8Weights", "fp8_gemms", "fp8_linear", "fp8_linear_reference", "fp8_supported", "quantize_linears",
    "quantize_rows", "quantize_rows_reference", "quantize_weight",
    "Mod", "adaln_modulate", "adaln_modulate_fp8", "adaln_modulate_reference", "gated_residual_adaln",
    "gated_residual_adaln_fp8", "gated_residual_adaln_reference", "modulation_grad_buffer", "split_modulation",
    "head_rms_norm", "qk_norm_rope", "qk_norm_rope_reference", "sampling_workspace", "skips_rows_without_keys",
    "snake", "snake_reference", "snake_residual", "snake_residual_reference",
]
