"""Triton kernels for the Snake ops (see omni2sound/ops/snake.py for the math and the reference).

Grid (row, block of T): row r = b * C + c of a contiguous [B, C, T] tensor shares alpha[c], beta[c]. The ops are
memory-bound elementwise passes; fp32 math, storage in the input dtype. The backward writes one partial sum of
dalpha / dbeta per program (deterministic: no atomics), which the launcher reduces over rows' blocks and B.

Channels-last forward ([B, C, T] stored as [B, T, C], the layout of a decoder whose convs run as channels-last 2-D
convs, cuDNN's NHWC tensor-core path): grid (block of the B * T positions, block of C), tiles [BLOCK_N, BLOCK_C]
with C contiguous, alpha / beta loaded once per tile column. The backward takes contiguous tensors only (the
wrapper converts: decode is inference, training runs the contiguous layout).
"""
import torch
import triton
import triton.language as tl

# A fixed block (no autotuning): the interpreter runs it on the CPU and CUDA graphs see one specialisation.
BLOCK_T = 1024


@triton.jit
def _snake_fwd_kernel(X, RES, ALPHA, BETA, S, Y, C, T, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = cols < T
    c = r % C
    a = tl.load(ALPHA + c)
    q = 1.0 / (tl.load(BETA + c) + eps)
    v = tl.load(X + r * T + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        v += tl.load(RES + r * T + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(S + r * T + cols, v.to(S.dtype.element_ty), mask=m)
    sn = tl.sin(a * v)
    tl.store(Y + r * T + cols, (v + q * sn * sn).to(Y.dtype.element_ty), mask=m)


@triton.jit
def _snake_fwd_cl_kernel(X, RES, ALPHA, BETA, S, Y, C, N, eps, HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)       # positions b * T + t
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)                    # channels
    cm = cols < C
    m = (rows < N)[:, None] & cm[None, :]
    a = tl.load(ALPHA + cols, mask=cm, other=0.0)[None, :]
    q = (1.0 / (tl.load(BETA + cols, mask=cm, other=1.0) + eps))[None, :]
    off = rows[:, None] * C + cols[None, :]
    v = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        v += tl.load(RES + off, mask=m, other=0.0).to(tl.float32)
        tl.store(S + off, v.to(S.dtype.element_ty), mask=m)
    sn = tl.sin(a * v)
    tl.store(Y + off, (v + q * sn * sn).to(Y.dtype.element_ty), mask=m)


@triton.jit
def _snake_bwd_kernel(DY, DSO, S, RES, ALPHA, BETA, DS, DA, DB, C, T, NBLK, eps,
                      HAS_DSO: tl.constexpr, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    cols = j.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = cols < T
    c = r % C
    a = tl.load(ALPHA + c)
    q = 1.0 / (tl.load(BETA + c) + eps)
    v = tl.load(S + r * T + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:   # the Snake input again in fp32, not the rounded s output
        v += tl.load(RES + r * T + cols, mask=m, other=0.0).to(tl.float32)
    g = tl.load(DY + r * T + cols, mask=m, other=0.0).to(tl.float32)
    sn = tl.sin(a * v)
    sin2 = 2.0 * sn * tl.cos(a * v)
    d = g * (1.0 + q * a * sin2)
    if HAS_DSO:
        d += tl.load(DSO + r * T + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(DS + r * T + cols, d.to(DS.dtype.element_ty), mask=m)
    tl.store(DA + r * NBLK + j, q * tl.sum(g * v * sin2, axis=0))
    tl.store(DB + r * NBLK + j, -q * q * tl.sum(g * sn * sn, axis=0))


def snake_forward(x, residual, alpha, beta, s, y, eps, channels_last=False):
    """x, residual, s, y [B, C, T], all contiguous or all channels-last (stored [B, T, C]); residual, s may be None;
    alpha, beta fp32 [C]."""
    B, C, T = x.shape
    has_res = residual is not None
    if channels_last:
        block_c = min(triton.next_power_of_2(C), 128)
        block_n = max(1, 4096 // block_c)
        grid = (triton.cdiv(B * T, block_n), triton.cdiv(C, block_c))
        # 8 elements of the [BLOCK_N, BLOCK_C] tile per thread, as in the contiguous kernel (1024 / 4 warps):
        # with 4 warps the 4096-element tile took 206 registers a thread on sm_90a, with 16 warps 63
        # (`python tools/triton_sm90.py --only snake`).
        _snake_fwd_cl_kernel[grid](x, residual if has_res else x, alpha, beta, s if has_res else y, y, C, B * T,
                                   float(eps), HAS_RES=has_res, BLOCK_N=block_n, BLOCK_C=block_c,
                                   num_warps=max(4, min(16, block_n * block_c // 256)))
        return
    grid = (B * C, triton.cdiv(T, BLOCK_T))
    _snake_fwd_kernel[grid](x, residual if has_res else x, alpha, beta, s if has_res else y, y, C, T, float(eps),
                            HAS_RES=has_res, BLOCK=BLOCK_T)


def snake_backward(dy, ds_out, s, residual, alpha, beta, ds, eps):
    """Gradients at the Snake input s (+ residual). Writes ds; returns (dalpha, dbeta) fp32 [C]."""
    B, C, T = s.shape
    nblk = triton.cdiv(T, BLOCK_T)
    da = torch.empty(B * C, nblk, device=s.device, dtype=torch.float32)
    db = torch.empty_like(da)
    has, has_res = ds_out is not None, residual is not None
    _snake_bwd_kernel[(B * C, nblk)](dy, ds_out if has else dy, s, residual if has_res else s, alpha, beta, ds, da,
                                     db, C, T, nblk, float(eps), HAS_DSO=has, HAS_RES=has_res, BLOCK=BLOCK_T)
    return da.view(B, C, nblk).sum((0, 2)), db.view(B, C, nblk).sum((0, 2))
