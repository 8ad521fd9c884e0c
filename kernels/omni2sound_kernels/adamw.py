"""Triton kernel of the AdamW step on fp32 master weights that writes their bf16 copy (math and reference in
omni2sound/ops/adamw.py).

One program per BLOCK elements of one weight: it loads p, g, m, v once, updates them in fp32 and stores p, m, v and
bf16(p) (rounded to nearest even on the bits, as torch rounds). lr and the step count are read from
device memory, so a CUDA graph that replays the step uses the values they hold at the replay; the bias corrections
1 - b^t are computed per program as exp2(t log2 b) (log2 b on the host, once).
"""
import math

import torch
import triton
import triton.language as tl


@triton.jit
def _adamw_kernel(P, G, M, V, W, STEP, LR, n, beta1, beta2, log2_beta1, log2_beta2, eps, weight_decay,
                  HAS_COPY: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    t = tl.load(STEP).to(tl.float32)
    lr = tl.load(LR).to(tl.float32)
    bc1 = 1.0 - tl.exp2(t * log2_beta1)
    bc2_sqrt = tl.sqrt(1.0 - tl.exp2(t * log2_beta2))
    p = tl.load(P + offs, mask=mask, other=0.0)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(M + offs, mask=mask, other=0.0)
    v = tl.load(V + offs, mask=mask, other=0.0)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    p = p * (1.0 - lr * weight_decay) - (lr / bc1) * m / (tl.sqrt(v) / bc2_sqrt + eps)
    tl.store(P + offs, p, mask=mask)
    tl.store(M + offs, m, mask=mask)
    tl.store(V + offs, v, mask=mask)
    if HAS_COPY:
        # round to nearest even by hand, on the bits: the copy must equal torch's p.to(bfloat16) on every backend, and
        # Triton's CPU interpreter truncates in .to(tl.bfloat16) (NaN stays a quiet NaN)
        u = p.to(tl.uint32, bitcast=True)
        hi = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        hi = tl.where(p != p, (u >> 16) | 0x40, hi)
        tl.store(W + offs, hi.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)


def adamw_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, copy,
               step: torch.Tensor, lr: torch.Tensor, beta1: float, beta2: float, eps: float, weight_decay: float,
               block: int = 2048) -> None:
    """In place on contiguous tensors of one weight; copy: its bf16 copy or None; step, lr: one-element tensors on
    the weight's device."""
    n = param.numel()
    log2_b1 = math.log2(beta1) if beta1 > 0 else -1e30        # 0^t = 0 for t >= 1
    log2_b2 = math.log2(beta2) if beta2 > 0 else -1e30
    w = param if copy is None else copy.view(torch.int16)      # the kernel writes the copy's bits
    _adamw_kernel[(triton.cdiv(n, block),)](
        param, grad, exp_avg, exp_avg_sq, w, step, lr, n, beta1, beta2, log2_b1, log2_b2, eps, weight_decay,
        HAS_COPY=copy is not None, BLOCK=block, num_warps=8)
