"""Triton kernels for the AdaLN family (see omni2sound/ops/adaln.py for the math and the reference).

One program per row r = b * L + l holds the whole row (BLOCK_D = next power of two >= D) in registers:
these ops are memory-bound, so the row is read once and written once. Modulation rows are addressed as
base + b * s_b + l * s_l with s_l = 0 for per-sample modulation. Statistics in fp32.
"""
import triton
import triton.language as tl


@triton.jit
def _adaln_fwd_kernel(X, H, GATE, SHIFT, SCALE, X2, Y, MEAN, RSTD,
                      L, D, gsb, gsl, ssb, ssl, csb, csl, eps,
                      HAS_H: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    b = r // L
    l = r % L
    cols = tl.arange(0, BLOCK_D)
    m = cols < D
    v = tl.load(X + r * D + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_H:
        hv = tl.load(H + r * D + cols, mask=m, other=0.0).to(tl.float32)
        gv = tl.load(GATE + b * gsb + l * gsl + cols, mask=m, other=0.0).to(tl.float32)
        v = v + gv * hv
        tl.store(X2 + r * D + cols, v.to(X2.dtype.element_ty), mask=m)
    mean = tl.sum(v, axis=0) / D
    c = tl.where(m, v - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(c * c, axis=0) / D + eps)
    tl.store(MEAN + r, mean)
    tl.store(RSTD + r, rstd)
    sh = tl.load(SHIFT + b * ssb + l * ssl + cols, mask=m, other=0.0).to(tl.float32)
    sc = tl.load(SCALE + b * csb + l * csl + cols, mask=m, other=0.0).to(tl.float32)
    y = c * rstd * (1.0 + sc) + sh
    tl.store(Y + r * D + cols, y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _adaln_bwd_kernel(DY, DX2, XIN, H, GATE, SCALE, MEAN, RSTD, DXIN, DH, DGATE, DSCALE,
                      L, D, gsb, gsl, csb, csl,
                      HAS_H: tl.constexpr, HAS_DX2: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    b = r // L
    l = r % L
    cols = tl.arange(0, BLOCK_D)
    m = cols < D
    mean = tl.load(MEAN + r)
    rstd = tl.load(RSTD + r)
    dy = tl.load(DY + r * D + cols, mask=m, other=0.0).to(tl.float32)
    xhat = (tl.load(XIN + r * D + cols, mask=m, other=0.0).to(tl.float32) - mean) * rstd
    xhat = tl.where(m, xhat, 0.0)
    sc = tl.load(SCALE + b * csb + l * csl + cols, mask=m, other=0.0).to(tl.float32)
    g = dy * (1.0 + sc)
    tl.store(DSCALE + r * D + cols, dy * xhat, mask=m)
    mg = tl.sum(g, axis=0) / D
    mgx = tl.sum(g * xhat, axis=0) / D
    dx = rstd * (g - mg - xhat * mgx)
    if HAS_DX2:
        dx += tl.load(DX2 + r * D + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(DXIN + r * D + cols, dx.to(DXIN.dtype.element_ty), mask=m)
    if HAS_H:
        hv = tl.load(H + r * D + cols, mask=m, other=0.0).to(tl.float32)
        gv = tl.load(GATE + b * gsb + l * gsl + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(DH + r * D + cols, (gv * dx).to(DH.dtype.element_ty), mask=m)
        tl.store(DGATE + r * D + cols, hv * dx, mask=m)


def _strides(t):
    if t is None:
        return 0, 0
    return t.stride(0), (0 if t.shape[1] == 1 else t.stride(1))


def _num_warps(block_d: int) -> int:
    return max(1, min(16, block_d // 256))


def adaln_forward(x, h, gate, shift, scale, x2, y, mean, rstd, eps):
    """Launch the forward on contiguous x/h [B, L, D]; outputs are preallocated by the caller."""
    B, L, D = x.shape
    block = triton.next_power_of_2(D)
    has_h = h is not None
    _adaln_fwd_kernel[(B * L,)](
        x, h if has_h else x, gate if has_h else x, shift, scale, x2 if has_h else y, y, mean, rstd,
        L, D, *_strides(gate), *_strides(shift), *_strides(scale), eps,
        HAS_H=has_h, BLOCK_D=block, num_warps=_num_warps(block))


def adaln_backward(dy, dx2, xin, h, gate, scale, mean, rstd, dxin, dh, dgate_tok, dscale_tok):
    B, L, D = xin.shape
    block = triton.next_power_of_2(D)
    has_h = h is not None
    _adaln_bwd_kernel[(B * L,)](
        dy, dx2 if dx2 is not None else dy, xin, h if has_h else xin, gate if has_h else xin, scale, mean, rstd,
        dxin, dh if has_h else dxin, dgate_tok if has_h else dscale_tok, dscale_tok,
        L, D, *_strides(gate), *_strides(scale),
        HAS_H=has_h, HAS_DX2=dx2 is not None, BLOCK_D=block, num_warps=_num_warps(block))
