"""Triton kernels for the fused q/k RMSNorm + RoPE (math and reference in omni2sound/ops/qk_norm_rope.py).

Grid: one program per token (b, t). It loads the token's G * H head rows of Dh (G = 2: q heads then k heads;
G = 1: the cross-attention's q or k alone) as one [G H, Dh] tile, normalises each row in fp32, scales by its
group's weight, rotates the (even, odd) pairs by the frame's angle (without a RoPE table: no rotation) and writes
the tile once. The rotation partner of column d is column d ^ 1, so the kernel loads the tile a second time with the
pair-swapped column index (a gather inside the same cache lines) instead of splitting even and odd halves, which
Triton cannot interleave back without a shuffle.

Backward, per token: recompute rstd, rotate the gradient back (transpose of the rotation), then the RMSNorm
backward; the weight gradient is written as one fp32 partial [G, Dh] per token (no atomics: deterministic),
which the launcher sums.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_pair(a, a_swap, c, s, is_even, inverse: tl.constexpr):
    # forward: y[2i] = a0 c - a1 s, y[2i+1] = a0 s + a1 c;  inverse (transpose): s -> -s
    if inverse:
        s = -s
    return tl.where(is_even, a * c - a_swap * s, a_swap * s + a * c)


@triton.jit
def _token_tile(X, T, H2, DH, sxb, sxt, sxj, sxh, H, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's token (b, t) and its [BLOCK_R, BLOCK_D] tile of head rows r = j * H + h: the row pointers
    into the strided input, the column index d and the masks."""
    tok = tl.program_id(0).to(tl.int64)
    b = tok // T
    t = tok % T
    r = tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    dm = d < DH
    m = (r < H2)[:, None] & dm[None, :]
    j = (r // H).to(tl.int64)
    h = (r % H).to(tl.int64)
    row = X + b * sxb + t * sxt + j * sxj + h * sxh                                   # [BLOCK_R] pointers
    return tok, t, r, d, dm, m, j, row


@triton.jit
def _qk_norm_rope_fwd_kernel(X, W, CS, Y, T, H2, DH, sxb, sxt, sxj, sxh, H, eps,
                             HAS_ROPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    tok, t, r, d, dm, m, j, row = _token_tile(X, T, H2, DH, sxb, sxt, sxj, sxh, H, BLOCK_R, BLOCK_D)
    x = tl.load(row[:, None] + d[None, :], mask=m, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / DH + eps)                           # [BLOCK_R]
    w = tl.load(W + j[:, None] * DH + d[None, :], mask=m, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w
    if HAS_ROPE:
        xs = tl.load(row[:, None] + (d ^ 1)[None, :], mask=m, other=0.0).to(tl.float32)  # pair partner
        ws = tl.load(W + j[:, None] * DH + (d ^ 1)[None, :], mask=m, other=0.0).to(tl.float32)
        ns = xs * rstd[:, None] * ws
        half = d // 2
        c = tl.load(CS + t * DH + 2 * half, mask=dm, other=1.0)                      # [BLOCK_D]
        s = tl.load(CS + t * DH + 2 * half + 1, mask=dm, other=0.0)
        even = (d % 2 == 0)[None, :]
        y = _rotate_pair(y, ns, c[None, :], s[None, :], even, inverse=False)
    tl.store(Y + tok * H2 * DH + r[:, None] * DH + d[None, :], y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _qk_norm_rope_bwd_kernel(DY, X, W, CS, DX, DW, T, H2, DH, sxb, sxt, sxj, sxh, H, eps,
                             G: tl.constexpr, HAS_ROPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    tok, t, r, d, dm, m, j, row = _token_tile(X, T, H2, DH, sxb, sxt, sxj, sxh, H, BLOCK_R, BLOCK_D)
    x = tl.load(row[:, None] + d[None, :], mask=m, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / DH + eps)
    xhat = x * rstd[:, None]
    dbase = DY + tok * H2 * DH + r[:, None] * DH
    gn = tl.load(dbase + d[None, :], mask=m, other=0.0).to(tl.float32)              # dL/dn without RoPE
    if HAS_ROPE:
        gs = tl.load(dbase + (d ^ 1)[None, :], mask=m, other=0.0).to(tl.float32)
        half = d // 2
        c = tl.load(CS + t * DH + 2 * half, mask=dm, other=1.0)
        s = tl.load(CS + t * DH + 2 * half + 1, mask=dm, other=0.0)
        even = (d % 2 == 0)[None, :]
        gn = _rotate_pair(gn, gs, c[None, :], s[None, :], even, inverse=True)
    w = tl.load(W + j[:, None] * DH + d[None, :], mask=m, other=0.0).to(tl.float32)
    gx_hat = gn * w
    proj = tl.sum(gx_hat * xhat, axis=1) / DH
    dx = rstd[:, None] * (gx_hat - xhat * proj[:, None])
    tl.store(DX + tok * H2 * DH + r[:, None] * DH + d[None, :], dx.to(DX.dtype.element_ty), mask=m)
    # weight partials of this token, one row per group: rows 0..H-1 are group 0 (q), H..2H-1 group 1 (k)
    prod = gn * xhat
    if G == 1:
        tl.store(DW + tok * DH + d, tl.sum(prod, axis=0), mask=dm)
    else:
        is_q = (j == 0)[:, None]
        tl.store(DW + tok * 2 * DH + d, tl.sum(tl.where(is_q, prod, 0.0), axis=0), mask=dm)
        tl.store(DW + tok * 2 * DH + DH + d, tl.sum(tl.where(is_q, 0.0, prod), axis=0), mask=dm)


def _meta(x):
    B, T, G, H, Dh = x.shape
    assert G in (1, 2) and x.stride(4) == 1
    block_r, block_d = triton.next_power_of_2(G * H), triton.next_power_of_2(Dh)
    # 8 elements of the tile per thread (the AdaLN kernels' ratio): with the default 4 warps the L preset's
    # [64, 64] tile took 254 registers a thread on sm_90a (a quarter of the occupancy), with 16 warps 62 (forward)
    # and 96 (backward); `python tools/triton_sm90.py --only qk`.
    warps = max(4, min(16, block_r * block_d // 256))
    return B, T, G, H, Dh, dict(BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)


def qk_norm_rope_forward(x, w, cs, y, eps):
    """x [B, T, G, H, Dh] (last dim unit stride), w fp32 [G, Dh], cs fp32 [T, Dh/2, 2] contiguous or None (no
    rotation), y contiguous [B, T, G, H, Dh]."""
    B, T, G, H, Dh, blocks = _meta(x)
    _qk_norm_rope_fwd_kernel[(B * T,)](x, w, cs if cs is not None else w, y, T, G * H, Dh, x.stride(0), x.stride(1),
                                       x.stride(2), x.stride(3), H, float(eps), HAS_ROPE=cs is not None, **blocks)


def qk_norm_rope_backward(dy, x, w, cs, dx, eps):
    """dy, dx contiguous [B, T, G, H, Dh]; returns dw fp32 [G, Dh]."""
    B, T, G, H, Dh, blocks = _meta(x)
    dw = torch.empty(B * T, G, Dh, device=x.device, dtype=torch.float32)
    _qk_norm_rope_bwd_kernel[(B * T,)](dy, x, w, cs if cs is not None else w, dx, dw, T, G * H, Dh, x.stride(0),
                                       x.stride(1), x.stride(2), x.stride(3), H, float(eps), G=G,
                                       HAS_ROPE=cs is not None, **blocks)
    return dw.sum(0)
