"""The forms the audio VAE's decoder can run its convolutions in, and how it picks one per device and shape.

Every form computes the same convolution (exact up to float rounding); they differ in which kernel runs it:
  - ``conv1d_as_gemm``: a conv with few output channels (the waveform head's last conv) as one GEMM and K shifted
    adds; the default on a GPU.
  - ``conv1d_dilated_as_batch``: a dilated conv as an undilated one over interleaved sub-sequences (space to
    batch); on a GPU, per conv and input shape, whichever of it and cuDNN's own form a timing of both found faster
    (``dilated_as_batch_pays``, timed once per shape and process, before any CUDA-graph capture).
  - ``conv_channels_last`` / ``conv_transpose_channels_last``: 1-D convs on activations stored channels-last, as the
    2-D convs of that layout; the CPU inference decoder runs every conv so (``decodes_channels_last``).
The decoder's flags (``Decoder.out_conv_as_gemm``, ``Decoder.dilated_as_batch``) force a form; None leaves the choice
to the functions here.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .cuda_graphs import graphed_time_us


def conv1d_as_gemm(x: Tensor, weight: Tensor, bias: Optional[Tensor], padding: int, dilation: int = 1) -> Tensor:
    """A stride-1 conv1d with few output channels as one GEMM and K shifted adds (any memory layout of x).

    x [B, Cin, T], weight [Cout, Cin, K] -> [B, Cout, T + 2 padding - dilation (K - 1)]:
    P[b, o, k, t] = sum_c weight[o, c, k] x[b, c, t] (the GEMM reads x once), then
    out[b, o, t] = sum_k P[b, o, k, t + k dilation - padding] (zero outside [0, T)).
    """
    Cout, _, K = weight.shape
    B, _, T = x.shape
    p = torch.matmul(weight.permute(0, 2, 1).reshape(Cout * K, -1).to(x.dtype), x)      # [B, Cout * K, T]
    p = F.pad(p, (padding, padding)).view(B, Cout, K, T + 2 * padding)
    T_out = T + 2 * padding - dilation * (K - 1)
    out = p[:, :, 0, :T_out].clone()
    for k in range(1, K):
        out += p[:, :, k, k * dilation:k * dilation + T_out]
    return out if bias is None else out + bias.to(out.dtype)[None, :, None]


def conv1d_dilated_as_batch(x: Tensor, weight: Tensor, bias: Optional[Tensor], padding: int,
                            dilation: int) -> Tensor:
    """A stride-1 dilated conv1d as an undilated one over ``dilation`` interleaved sub-sequences (space to batch).

    x [B, Cin, T], weight [Cout, Cin, K], padding a multiple of the dilation d -> [B, Cout, T + 2 padding - d (K - 1)].
    With x zero-padded to T' = d J and s_r[j] = x[j d + r] (r < d): out[j d + r] = conv(s_r, weight, padding / d)[j],
    since the taps of a dilated conv at t are t + (k - K // 2) d, all in t's residue class. The zeros appended past T
    are the conv's own zero padding, so the result is exact. Why: cuDNN (9.x, H200, bf16, 2026-12-04) runs dilation 9
    at 512 x 2 500 and 256 x 20 000 with a legacy kernel (605 and 800 us) where this form takes 65 and 121 us; for
    dilation 3, and 9 at longer rates, its own kernels win (~2x). The decoder picks per shape by timing both
    (``dilated_as_batch_pays``).
    """
    d = dilation
    if padding % d:
        raise ValueError(f"conv1d_dilated_as_batch: padding {padding} must be a multiple of the dilation {d}")
    B, C, T = x.shape
    K = weight.shape[-1]
    J = -(-T // d)
    if J * d != T:
        x = F.pad(x, (0, J * d - T))
    s = x.reshape(B, C, J, d).permute(0, 3, 1, 2).reshape(B * d, C, J)        # [B d, Cin, J]: s_r for each r
    o = F.conv1d(s, weight, bias, padding=padding // d)                      # [B d, Cout, J_out]
    J_out = o.shape[-1]
    T_out = T + 2 * padding - d * (K - 1)
    out = o.reshape(B, d, -1, J_out).permute(0, 2, 3, 1).reshape(B, -1, J_out * d)     # [B, Cout, d J_out]
    return out[:, :, :T_out].contiguous()                  # a copy only where the reshape gave a view


# (device, dtype, input shape, conv shape) -> whether conv1d_dilated_as_batch beat cuDNN's form (timed once)
DILATED_PAYS: Dict[tuple, bool] = {}


def dilated_as_batch_pays(m: nn.Conv1d, y: Tensor) -> bool:
    """Whether ``conv1d_dilated_as_batch`` runs conv m on y faster than cuDNN's own form: timed once per device,
    dtype and shape (a few ms; ``AudioVAE.decode_graphed`` warms up, and so times, before it captures). Inside a
    capture that nobody warmed up, cuDNN's form (nothing can be timed there)."""
    key = (y.device, y.dtype, tuple(y.shape), tuple(m.weight.shape), m.dilation[0], m.padding[0])
    got = DILATED_PAYS.get(key)
    if got is None:
        if torch.cuda.is_current_stream_capturing():
            return False
        x = y.detach().clone()
        w, b = m.weight.detach(), None if m.bias is None else m.bias.detach()
        batch_us = graphed_time_us(lambda: conv1d_dilated_as_batch(x, w, b, m.padding[0], m.dilation[0]))
        cudnn_us = graphed_time_us(lambda: F.conv1d(x, w, b, padding=m.padding[0], dilation=m.dilation[0]))
        got = DILATED_PAYS[key] = batch_us < cudnn_us
    return got


def conv_channels_last(m: nn.Module, x: Tensor) -> Tensor:
    """Conv1d module m on x [B, Cin, T] stored channels-last, as the 2-D conv of that layout -> [B, Cout, T']."""
    return F.conv2d(x.unsqueeze(2), m.weight.unsqueeze(2), m.bias, stride=(1, m.stride[0]),
                    padding=(0, m.padding[0]), dilation=(1, m.dilation[0])).squeeze(2)


def conv_transpose_channels_last(m: nn.Module, x: Tensor) -> Tensor:
    """ConvTranspose1d module m on x [B, Cin, T] stored channels-last, as the 2-D transposed conv of that layout."""
    return F.conv_transpose2d(x.unsqueeze(2), m.weight.unsqueeze(2), m.bias, stride=(1, m.stride[0]),
                              padding=(0, m.padding[0])).squeeze(2)


def decodes_channels_last(z: Tensor) -> bool:
    """Whether the decoder runs z channels-last: inference where the Snake ops run the C++ kernels (the CPU), which
    read and write that layout, and oneDNN runs the 2-D convs of that layout 1.7-2.3x faster than PyTorch's conv1d
    (measured on a 2-core CPU box: no layout reorder around every call)."""
    return not torch.is_grad_enabled() and ops.select_backend("snake_residual", z.device) == "cpu"


def dilated_conv_form(m: nn.Conv1d, y: Tensor, setting: Optional[bool]) -> Optional[Callable[[Tensor], Tensor]]:
    """The form to run the dilated conv m on y in: ``conv1d_dilated_as_batch`` (as a function of the input), or None
    for the module's own. setting: True / False forces it for every conv it applies to; None = GPU inference picks by
    timing (``dilated_as_batch_pays``), elsewhere the module's own."""
    if not (m.dilation[0] > 1 and m.padding[0] % m.dilation[0] == 0 and m.padding_mode == "zeros"):
        return None
    on = setting
    if on is None:
        on = y.is_cuda and not torch.is_grad_enabled() and dilated_as_batch_pays(m, y)
    if not on:
        return None
    return lambda t: conv1d_dilated_as_batch(t, m.weight, m.bias, m.padding[0], m.dilation[0])


def out_conv(m: nn.Conv1d, y: Tensor, as_gemm: Optional[bool]) -> Tensor:
    """The decoder's last conv m on y, in its form: ``conv1d_as_gemm`` for few output channels where ``as_gemm``
    (None: on a GPU; timed alone on an H200, bf16, 160 000 samples, 2026-12-04: 39.7 us against cuDNN's 70.9), the
    channels-last 2-D conv for channels-last input, else the module."""
    gemm = as_gemm if as_gemm is not None else y.is_cuda
    if gemm and m.out_channels <= 4 and m.stride[0] == 1 and m.groups == 1 and m.padding_mode == "zeros":
        return conv1d_as_gemm(y, m.weight, m.bias, m.padding[0], m.dilation[0])
    if y.stride(1) == 1 and y.shape[1] > 1:              # channels-last storage: the 2-D conv of that layout
        return conv_channels_last(m, y).contiguous()
    return m(y)


__all__ = ["DILATED_PAYS", "conv1d_as_gemm", "conv1d_dilated_as_batch", "conv_channels_last",
           "conv_transpose_channels_last", "decodes_channels_last", "dilated_as_batch_pays", "dilated_conv_form",
           "out_conv"]
