"""Triton kernel for the per-token fp8 quantisation of a GEMM's input (math and reference in omni2sound/ops/fp8.py).

    s[m] = max(max_k |x[m, k]|, 1e-12) / 448;   q[m, k] = x[m, k] / s[m]  (cast to the output's dtype, e4m3)

One program per row: the row is loaded once (K <= 8192 elements fit one block), its max taken in fp32, the scaled
row cast and stored, and the scale written: one launch instead of the reference's four (a row max, a clamp, a
divide, the cast), which matters inside a CUDA-graphed sampling step that quantises 6 inputs per block.
The output dtype is the caller's (float8_e4m3fn in use; the tests also run it with an fp32 output under the
interpreter, whose fp8 cast is not faithful).

``quantize_row`` is the per-row math on a row already in registers, shared with the AdaLN forward's fused
quantisation (kernels/omni2sound_kernels/adaln.py): one expression for both, so a row quantised there is bit for
bit the row this kernel makes from the AdaLN's stored output (Triton's fp32 divide is not torch's: the two
kernels must agree with each other, not only with the reference).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def quantize_row(x):
    """x: one row in fp32, 0 in masked lanes -> (q = x / s clamped to +-448, in fp32; s = max(amax, 1e-12) / 448)."""
    s = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / 448.0
    q = tl.minimum(tl.maximum(x / s, -448.0), 448.0)
    return q, s


@triton.jit
def _quantize_rows_kernel(X, Q, S, K, stride_x, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    m = cols < K
    x = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    q, s = quantize_row(x)
    tl.store(Q + row * K + cols, q.to(Q.dtype.element_ty), mask=m)
    tl.store(S + row, s)


MAX_K = 16384


def quantize_rows(x: torch.Tensor, out_dtype: torch.dtype = torch.float8_e4m3fn):
    """x [M, K] (unit last stride) -> (q [M, K] in out_dtype, scale fp32 [M, 1])."""
    M, K = x.shape
    if K > MAX_K:
        raise ValueError(f"quantize_rows: K={K} is past the one-block row limit {MAX_K}")
    q = torch.empty((M, K), dtype=out_dtype, device=x.device)
    s = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    BK = triton.next_power_of_2(K)
    _quantize_rows_kernel[(M,)](x, q, s, K, x.stride(0), BLOCK_K=BK, num_warps=4 if BK <= 2048 else 8)
    return q, s
