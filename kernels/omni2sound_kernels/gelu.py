"""Triton kernels for the fused bias + tanh-GELU (math and reference in omni2sound/ops/gelu.py).

    z = x + b[n];  y = z * sigmoid(2u),  u = sqrt(2/pi) (z + 0.044715 z^3);  e = exp(-2u), sigmoid(2u) = 1 / (1 + e)
    dz = dy * s * (1 + z * (e s) * d(2u)/dz)      (1 - s = e s: no cancellation of 1 - s near s = 1)

Forward: one program per [BLOCK_M, BLOCK_N] tile of the contiguous [M, N] input, fp32 inside, one rounding at the
end; y may be x itself (in place). Backward: the same tiles; each program also writes its tile's column sums of dz
as one fp32 row of a [cdiv(M, BLOCK_M), N] partial (no atomics: deterministic), which the launcher sums into dbias.
Tiles are 2-D (not a flat 1-D index) so that the bias row is loaded once per tile and the column sums need no
scatter.

With the per-token fp8 copy (FP8 sampling, the MLP's second GEMM reads it): one program per row, the forward's
expression on the whole row, the row rounded to the output dtype and stored, then ``quantize_row`` of the rounded row
(the standalone quantisation kernel's code): q and its scale are bit for bit ``quantize_rows`` of the stored output.
"""
import torch
import triton
import triton.language as tl

from .fp8 import MAX_K, quantize_row


@triton.jit
def _gelu_exp(z):
    """exp(-2u) of z, the argument clamped to [-87, 88] (a finite normal float for every z)."""
    a = -1.5957691216057308 * (z + 0.044715 * z * z * z)
    a = tl.minimum(tl.maximum(a, -87.0), 88.0)
    return tl.exp2(a * 1.4426950408889634)


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = cols < N
    m = (rows < M)[:, None] & cm[None, :]
    offs = rows[:, None] * N + cols[None, :]
    return cols, cm, m, offs


@triton.jit
def _bias_gelu_fwd_kernel(X, B, Y, M, N, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    cols, cm, m, offs = _tile(M, N, BLOCK_M, BLOCK_N)
    z = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(B + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
    y = z / (1.0 + _gelu_exp(z))
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _gelu_fp8_rows_kernel(X, Y, Q, S, N, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    m = cols < N
    z = tl.load(X + row * N + cols, mask=m, other=0.0).to(tl.float32)
    y = (z / (1.0 + _gelu_exp(z))).to(Y.dtype.element_ty)                # the forward's expression, one rounding
    tl.store(Y + row * N + cols, y, mask=m)
    q, s = quantize_row(tl.where(m, y.to(tl.float32), 0.0))
    tl.store(Q + row * N + cols, q.to(Q.dtype.element_ty), mask=m)
    tl.store(S + row, s)


@triton.jit
def _bias_gelu_bwd_kernel(DY, X, B, DX, DB, M, N, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    cols, cm, m, offs = _tile(M, N, BLOCK_M, BLOCK_N)
    z = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(B + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
    e = _gelu_exp(z)
    s = 1.0 / (1.0 + e)
    d2u = 1.5957691216057308 * (1.0 + 3.0 * 0.044715 * z * z)
    dy = tl.load(DY + offs, mask=m, other=0.0).to(tl.float32)
    dz = dy * s * (1.0 + z * (e * s) * d2u)
    tl.store(DX + offs, dz.to(DX.dtype.element_ty), mask=m)
    if HAS_BIAS:
        tl.store(DB + tl.program_id(0).to(tl.int64) * N + cols, tl.sum(tl.where(m, dz, 0.0), axis=0), mask=cm)


def _blocks(N: int):
    # 16 x 256 elements a program (16 per thread at 8 warps): memory-bound, enough bytes in flight per SM
    return 16, min(256, triton.next_power_of_2(N))


def bias_gelu_forward(x: torch.Tensor, bias, y: torch.Tensor) -> None:
    """y = gelu_tanh(x + bias) for contiguous [M, N] x and y (y may be x); bias fp32 [N] or None."""
    M, N = x.shape
    BM, BN = _blocks(N)
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _bias_gelu_fwd_kernel[grid](x, bias if bias is not None else x, y, M, N, HAS_BIAS=bias is not None,
                                BLOCK_M=BM, BLOCK_N=BN, num_warps=8)


def bias_gelu_backward(dy: torch.Tensor, x: torch.Tensor, bias, dx: torch.Tensor):
    """dx = dy * gelu_tanh'(x + bias); returns dbias (fp32 [N]) when bias is given, else None."""
    M, N = x.shape
    BM, BN = _blocks(N)
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    partial = torch.empty(grid[0], N, device=x.device, dtype=torch.float32) if bias is not None else None
    _bias_gelu_bwd_kernel[grid](dy, x, bias if bias is not None else x, dx, partial if partial is not None else dx,
                                M, N, HAS_BIAS=bias is not None, BLOCK_M=BM, BLOCK_N=BN, num_warps=8)
    return None if partial is None else partial.sum(0)


def gelu_fp8_rows(x: torch.Tensor, y: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> None:
    """y = gelu_tanh(x) for contiguous x, y [M, N] (no bias), and y's per-token quantisation: q [M, N] (float8_e4m3fn,
    or fp32 in the interpreter's tests), s fp32 [M, 1]."""
    M, N = x.shape
    if N > MAX_K:
        raise ValueError(f"gelu_fp8_rows: N={N} is past the one-block row limit {MAX_K}")
    BN = triton.next_power_of_2(N)
    _gelu_fp8_rows_kernel[(M,)](x, y, q, s, N, BLOCK_N=BN, num_warps=4 if BN <= 2048 else (8 if BN <= 8192
                                                                                             else 16))
