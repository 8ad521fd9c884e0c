"""Triton flash cross-attention: dense queries over packed (varlen) keys, forward and backward.

Shapes (see omni2sound/ops/cross_attention.py): q [B, Lq, H, D]; k, v [total_k, H, D] with sample b at
rows cu[b]:cu[b+1]; out [B, Lq, H, D]; lse [B, H, Lq] fp32 natural-log log-sum-exp of the scaled scores
(0 for a sample with no key, whose output and gradients are 0).

FlashAttention-2 scheme: the forward keeps a running max and sum per query row (online softmax, base 2,
fp32) while streaming the sample's key tiles; the backward recomputes P = exp(S - lse) tile by tile,
one kernel for dK/dV (a program per key tile, looping over the queries, so no atomics) and one for dQ
(a program per query tile, looping over the keys). delta = rowsum(dO * O) is computed beforehand.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to tf32 (PyTorch's fp32 matmul does not); 16-bit ignores it.
    return "ieee" if dtype == torch.float32 else "tf32"


def _blocks(D: int, block_m, block_n, dtype: torch.dtype):
    # Tiny problems (Lq ~ 250, <= ~208 keys): 64 x 64 tiles keep every head row in registers up to D = 128 in
    # 16-bit. fp32 tiles are twice the registers: at 64 x 64 the sm_90a build spills (32 KB a thread in the dK/dV
    # kernel, `python tools/triton_sm90.py --only cross`), at 32 x 32 the forward and dQ kernels do not.
    if dtype == torch.float32:
        return block_m or 32, block_n or 32, max(16, triton.next_power_of_2(D))
    return block_m or 64, block_n or (64 if D <= 64 else 32), max(16, triton.next_power_of_2(D))


@triton.jit
def _sample_keys(pid_bh, CU, NK, H):
    """(sample b, head h, its first key row, its key count) of program column pid_bh = b H + h. The offsets are
    clamped to the NK key rows: a bad one gives wrong numbers, never a read outside k and v."""
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    lo = tl.minimum(tl.maximum(tl.load(CU + b), 0), NK)
    n_k = tl.minimum(tl.maximum(tl.load(CU + b + 1), lo), NK) - lo
    return b, h, lo.to(tl.int64), n_k


@triton.jit
def _fwd_kernel(Q, K, V, CU, NK, O, LSE,
                sq_b, sq_l, sq_h, sk_n, sk_h, sv_n, sv_h, so_b, so_l, so_h,
                H, Lq, D, qk_scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, k_start, n_k = _sample_keys(pid_bh, CU, NK, H)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    d_ok = offs_d < D
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_l + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)                       # [M, D]
    k_base = K + k_start * sk_n + h * sk_h
    v_base = V + k_start * sv_n + h * sv_h

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)   # running max of s (base-2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)                  # running sum of 2^(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, n_k, BLOCK_N):
        n_ok = (start_n + offs_n) < n_k
        kt = tl.load(k_base + (start_n + offs_n)[None, :] * sk_n + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)                   # [D, N]
        s = tl.dot(q, kt, input_precision=PREC) * qk_scale                            # [M, N]
        s = tl.where(n_ok[None, :], s, float("-inf"))
        # Every tile has at least one real key, so m_new is finite and alpha = 2^-inf = 0 on the first.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(v_base + (start_n + offs_n)[:, None] * sv_n + offs_d[None, :],
                     mask=n_ok[:, None] & d_ok[None, :], other=0.0)                   # [N, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        m_i = m_new

    has = l_i > 0.0                                     # False only for a sample with no key
    l_safe = tl.where(has, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has, (m_i + tl.log2(l_safe)) * 0.6931471805599453, 0.0)
    tl.store(O + b * so_b + h * so_h + offs_m[:, None] * so_l + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * Lq + offs_m, lse, mask=m_ok)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, CU, NK, DO, LSE, DELTA, DK, DV,
                     sq_b, sq_l, sq_h, sk_n, sk_h, sv_n, sv_h, sdo_b, sdo_l, sdo_h, sdk_n, sdk_h, sdv_n, sdv_h,
                     H, Lq, D, scale, qk_scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, k_start, n_k = _sample_keys(pid_bh, CU, NK, H)
    start_n = pid_n * BLOCK_N
    if start_n < n_k:  # the grid covers max_seqlen_k; shorter samples have idle programs
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        n_ok = offs_n < n_k
        d_ok = offs_d < D
        nd_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + k_start * sk_n + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :], mask=nd_ok, other=0.0)
        v = tl.load(V + k_start * sv_n + h * sv_h + offs_n[:, None] * sv_n + offs_d[None, :], mask=nd_ok, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        q_base = Q + b * sq_b + h * sq_h
        do_base = DO + b * sdo_b + h * sdo_h
        row_base = pid_bh.to(tl.int64) * Lq
        for start_m in range(0, Lq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < Lq
            md_ok = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + offs_m[:, None] * sq_l + offs_d[None, :], mask=md_ok, other=0.0)       # [M, D]
            do = tl.load(do_base + offs_m[:, None] * sdo_l + offs_d[None, :], mask=md_ok, other=0.0)   # [M, D]
            lse2 = tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
            st = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale                             # [N, M]
            pt = tl.exp2(st - lse2[None, :])
            pt = tl.where(n_ok[:, None] & m_ok[None, :], pt, 0.0)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
            dpt = tl.dot(v, tl.trans(do), input_precision=PREC)                                      # [N, M]
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
        dk = dk * scale
        tl.store(DK + k_start * sdk_n + h * sdk_h + offs_n[:, None] * sdk_n + offs_d[None, :],
                 dk.to(DK.dtype.element_ty), mask=nd_ok)
        tl.store(DV + k_start * sdv_n + h * sdv_h + offs_n[:, None] * sdv_n + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=nd_ok)


@triton.jit
def _bwd_dq_kernel(Q, K, V, CU, NK, DO, LSE, DELTA, DQ,
                   sq_b, sq_l, sq_h, sk_n, sk_h, sv_n, sv_h, sdo_b, sdo_l, sdo_h, sdq_b, sdq_l, sdq_h,
                   H, Lq, D, scale, qk_scale,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, k_start, n_k = _sample_keys(pid_bh, CU, NK, H)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    d_ok = offs_d < D
    md_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_l + offs_d[None, :], mask=md_ok, other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_l + offs_d[None, :], mask=md_ok, other=0.0)
    row_base = pid_bh.to(tl.int64) * Lq
    lse2 = tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
    k_base = K + k_start * sk_n + h * sk_h
    v_base = V + k_start * sv_n + h * sv_h
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, n_k, BLOCK_N):
        n_ok = (start_n + offs_n) < n_k
        dn_ok = d_ok[:, None] & n_ok[None, :]
        kt = tl.load(k_base + (start_n + offs_n)[None, :] * sk_n + offs_d[:, None], mask=dn_ok, other=0.0)  # [D, N]
        vt = tl.load(v_base + (start_n + offs_n)[None, :] * sv_n + offs_d[:, None], mask=dn_ok, other=0.0)  # [D, N]
        s = tl.dot(q, kt, input_precision=PREC) * qk_scale                                               # [M, N]
        p = tl.where(n_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, vt, input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PREC)
    dq = dq * scale
    tl.store(DQ + b * sdq_b + h * sdq_h + offs_m[:, None] * sdq_l + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=md_ok)


def _check_last_dim(*ts):
    for t in ts:
        if t.stride(-1) != 1:
            raise ValueError("omni2sound.kernels.cross_attention: the head dim of every tensor must be contiguous")


def cross_attention_fwd(q, k, v, cu_seqlens_k, max_seqlen_k: int, softmax_scale: float,
                        block_m=None, block_n=None):
    """Returns (out [B, Lq, H, D] in q's dtype, lse [B, H, Lq] fp32)."""
    B, Lq, H, D = q.shape
    _check_last_dim(q, k, v)
    out = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    BM, BN, BD = _blocks(D, block_m, block_n, q.dtype)
    grid = (triton.cdiv(Lq, BM), B * H)
    _fwd_kernel[grid](q, k, v, cu_seqlens_k, k.shape[0], out, lse,
                      q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                      out.stride(0), out.stride(1), out.stride(2),
                      H, Lq, D, softmax_scale * LOG2E,
                      BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, PREC=_precision(q.dtype), num_warps=4)
    return out, lse


def cross_attention_bwd(dout, q, k, v, out, lse, cu_seqlens_k, max_seqlen_k: int, softmax_scale: float,
                        block_m=None, block_n=None):
    """Returns (dq, dk, dv) shaped and typed like q, k, v (contiguous)."""
    B, Lq, H, D = q.shape
    _check_last_dim(dout, q, k, v)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # zeros, not empty: key rows past cu_seqlens_k[-1] (a static packing's padding) belong to no program
    dk = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    if dq.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    # delta[b, h, m] = sum_d dO * O (fp32): the softmax-Jacobian term of dS.
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()   # [B, H, Lq]
    lse = lse.contiguous()
    BM, BN, BD = _blocks(D, block_m, block_n, q.dtype)
    prec = _precision(q.dtype)
    common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
              dout.stride(0), dout.stride(1), dout.stride(2))
    if k.shape[0] > 0 and max_seqlen_k > 0:
        _bwd_dkdv_kernel[(triton.cdiv(max_seqlen_k, BN), B * H)](
            q, k, v, cu_seqlens_k, k.shape[0], dout, lse, delta, dk, dv, *common,
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            H, Lq, D, softmax_scale, softmax_scale * LOG2E,
            BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, PREC=prec, num_warps=4)
    _bwd_dq_kernel[(triton.cdiv(Lq, BM), B * H)](
        q, k, v, cu_seqlens_k, k.shape[0], dout, lse, delta, dq, *common,
        dq.stride(0), dq.stride(1), dq.stride(2),
        H, Lq, D, softmax_scale, softmax_scale * LOG2E,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, PREC=prec, num_warps=4)
    return dq, dk, dv


__all__ = ["cross_attention_fwd", "cross_attention_bwd"]
