"""Triton kernels for the AdaLN family (see omni2sound/ops/adaln.py for the math and the reference).

One program per row r = b * L + l holds the whole row (BLOCK_D = next power of two >= D) in registers:
these ops are memory-bound, so the row is read once and written once. Modulation rows are addressed as
base + b * s_b + l * s_l with s_l = 0 for per-sample modulation. Statistics in fp32.

The forward optionally writes an fp8 copy of y for the next GEMM (HAS_Q): the row of y as stored (rounded to y's
dtype) quantised per token by ``fp8.quantize_row``, the same code as the standalone quantisation kernel, so q and
its scale are bit for bit what that kernel makes from y, without its launch and its re-read of y.
"""
import triton
import triton.language as tl

from .fp8 import quantize_row


@triton.jit
def _mod(A, asb, asl, A2, a2sb, a2sl, b, l, cols, m, HAS_A2: tl.constexpr):
    """A modulation row in fp32: A [+ A2] (the optional second addend, e.g. the per-step timestep part)."""
    v = tl.load(A + b * asb + l * asl + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_A2:
        v += tl.load(A2 + b * a2sb + l * a2sl + cols, mask=m, other=0.0).to(tl.float32)
    return v


@triton.jit
def _adaln_fwd_kernel(X, H, GATE, SHIFT, SCALE, GATE2, SHIFT2, SCALE2, X2, Y, MEAN, RSTD, YQ, YS,
                      L, D, gsb, gsl, ssb, ssl, csb, csl, g2sb, g2sl, s2sb, s2sl, c2sb, c2sl, eps,
                      HAS_H: tl.constexpr, HAS_G2: tl.constexpr, HAS_S2: tl.constexpr, HAS_C2: tl.constexpr,
                      HAS_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    b = r // L
    l = r % L
    cols = tl.arange(0, BLOCK_D)
    m = cols < D
    v = tl.load(X + r * D + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_H:
        hv = tl.load(H + r * D + cols, mask=m, other=0.0).to(tl.float32)
        gv = _mod(GATE, gsb, gsl, GATE2, g2sb, g2sl, b, l, cols, m, HAS_G2)
        v = v + gv * hv
        tl.store(X2 + r * D + cols, v.to(X2.dtype.element_ty), mask=m)
    mean = tl.sum(v, axis=0) / D
    c = tl.where(m, v - mean, 0.0)
    ss = tl.sum(c * c, axis=0)
    # ss - ss: 0 for a finite sum, NaN when it overflowed (|x - mean| ~ 1e19 and up: no meaningful statistics)
    rstd = 1.0 / tl.sqrt(ss / D + eps) + (ss - ss)
    tl.store(MEAN + r, mean)
    tl.store(RSTD + r, rstd)
    sh = _mod(SHIFT, ssb, ssl, SHIFT2, s2sb, s2sl, b, l, cols, m, HAS_S2)
    sc = _mod(SCALE, csb, csl, SCALE2, c2sb, c2sl, b, l, cols, m, HAS_C2)
    y = (c * rstd * (1.0 + sc) + sh).to(Y.dtype.element_ty)
    tl.store(Y + r * D + cols, y, mask=m)
    if HAS_Q:                               # per-token fp8 copy of the stored y: YQ [B L, D], YS fp32 [B L]
        q, s = quantize_row(tl.where(m, y.to(tl.float32), 0.0))
        tl.store(YQ + r * D + cols, q.to(YQ.dtype.element_ty), mask=m)
        tl.store(YS + r, s)


@triton.jit
def _adaln_bwd_kernel(DY, DX2, XIN, H, GATE, SCALE, GATE2, SCALE2, MEAN, RSTD, DXIN, DH, DGATE, DSCALE,
                      L, D, gsb, gsl, csb, csl, g2sb, g2sl, c2sb, c2sl,
                      HAS_H: tl.constexpr, HAS_DX2: tl.constexpr, HAS_G2: tl.constexpr, HAS_C2: tl.constexpr,
                      HAS_DGATE: tl.constexpr, HAS_DSCALE: tl.constexpr, BLOCK_D: tl.constexpr):
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
    sc = _mod(SCALE, csb, csl, SCALE2, c2sb, c2sl, b, l, cols, m, HAS_C2)
    g = dy * (1.0 + sc)
    if HAS_DSCALE:
        tl.store(DSCALE + r * D + cols, (dy * xhat).to(DSCALE.dtype.element_ty), mask=m)
    mg = tl.sum(g, axis=0) / D
    mgx = tl.sum(g * xhat, axis=0) / D
    dx = rstd * (g - mg - xhat * mgx)
    if HAS_DX2:
        dx += tl.load(DX2 + r * D + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(DXIN + r * D + cols, dx.to(DXIN.dtype.element_ty), mask=m)
    if HAS_H:
        gv = _mod(GATE, gsb, gsl, GATE2, g2sb, g2sl, b, l, cols, m, HAS_G2)
        tl.store(DH + r * D + cols, (gv * dx).to(DH.dtype.element_ty), mask=m)
        if HAS_DGATE:
            hv = tl.load(H + r * D + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(DGATE + r * D + cols, (hv * dx).to(DGATE.dtype.element_ty), mask=m)


def _strides(t):
    if t is None:
        return 0, 0
    return t.stride(0), (0 if t.shape[1] == 1 else t.stride(1))


def _num_warps(block_d: int) -> int:
    return max(1, min(16, block_d // 256))


def adaln_forward(x, h, gate, shift, scale, x2, y, mean, rstd, eps, gate2=None, shift2=None, scale2=None,
                  yq=None, ys=None):
    """Launch the forward on contiguous x/h [B, L, D]; outputs are preallocated by the caller. gate2 / shift2 /
    scale2: optional second addends of the modulations. yq [B L, D] (e4m3, or fp32 under the interpreter) and ys
    fp32 [B L, 1]: where to write y's per-token fp8 copy and scales (both or neither)."""
    B, L, D = x.shape
    block = triton.next_power_of_2(D)
    has_h = h is not None
    _adaln_fwd_kernel[(B * L,)](
        x, h if has_h else x, gate if has_h else x, shift, scale,
        gate2 if gate2 is not None else x, shift2 if shift2 is not None else x, scale2 if scale2 is not None else x,
        x2 if has_h else y, y, mean, rstd, yq if yq is not None else y, ys if ys is not None else mean,
        L, D, *_strides(gate), *_strides(shift), *_strides(scale), *_strides(gate2), *_strides(shift2),
        *_strides(scale2), eps,
        HAS_H=has_h, HAS_G2=gate2 is not None, HAS_S2=shift2 is not None, HAS_C2=scale2 is not None,
        HAS_Q=yq is not None, BLOCK_D=block, num_warps=_num_warps(block))


def adaln_backward(dy, dx2, xin, h, gate, scale, mean, rstd, dxin, dh, dgate_tok, dscale_tok, gate2=None,
                   scale2=None):
    """dgate_tok / dscale_tok: per-token outputs in the input dtype, or None where autograd does not need them."""
    B, L, D = xin.shape
    block = triton.next_power_of_2(D)
    has_h = h is not None
    _adaln_bwd_kernel[(B * L,)](
        dy, dx2 if dx2 is not None else dy, xin, h if has_h else xin, gate if has_h else xin, scale,
        gate2 if gate2 is not None else xin, scale2 if scale2 is not None else xin, mean, rstd,
        dxin, dh if has_h else dxin, dgate_tok if dgate_tok is not None else dxin,
        dscale_tok if dscale_tok is not None else dxin,
        L, D, *_strides(gate), *_strides(scale), *_strides(gate2), *_strides(scale2),
        HAS_H=has_h, HAS_DX2=dx2 is not None, HAS_G2=gate2 is not None, HAS_C2=scale2 is not None,
        HAS_DGATE=has_h and dgate_tok is not None, HAS_DSCALE=dscale_tok is not None,
        BLOCK_D=block, num_warps=_num_warps(block))
