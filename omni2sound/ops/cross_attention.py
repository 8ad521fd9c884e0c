"""Flash cross-attention from dense audio queries to ragged (varlen) video + text condition tokens.

Every audio token of a sample attends to that sample's real condition tokens only: the video tokens
then the text tokens, either modality possibly absent (Omni2Sound drops a modality by giving it zero
tokens, not a learned null token). The keys and values of the whole batch are packed without padding,
flash-attn varlen style, and the queries stay dense because Lq (audio tokens) has nothing to do with
the key count; unpadding the queries with the key mask is a known bug of this setting.

    q             [B, Lq, H, D]      audio queries, dense
    k, v          [total_k, H, D]    packed condition keys/values, sample b at rows cu[b]:cu[b+1]
    cu_seqlens_k  [B + 1] int32      cu[0] = 0, cu[b+1] - cu[b] = keys of sample b (may be 0)
    out           [B, Lq, H, D]      softmax(q k^T * scale) v per sample; rows of a sample with no key are 0

A sample with no key gives zeros and zero gradients (never NaN): there is nothing to attend to, and
the residual stream simply skips the cross-attention for that sample.

Backends: ``reference`` (SDPA in PyTorch), ``cpu`` (the C++ attention forward of ``csrc/attention.cpp`` in its
varlen form, shared with ``ops.attention``; no gradient: a call that needs one runs the reference; the CPU default),
``triton`` (flash-style online softmax, forward and backward; the GPU default), ``cuda`` (forward kernel in
``csrc/cross_attention.cu``; there is no CUDA backward: it uses the Triton backward when Triton can run, else the
padded PyTorch math below). Softmax statistics and all accumulation are fp32 for every input dtype.
Every argument is checked before a backend runs (offsets included: see ``cross_attention``); the kernels also clamp
each offset to the key rows. Non-finite input: as ``ops.attention`` (a NaN / inf query gives a NaN row on the C++
kernel).
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import _native
from ._checks import KERNEL_DTYPES, OpInputError, cu_seqlens, fail, flag, real, tensor
from ._dispatch import autocast_inputs, cannot_take, register_op, select_backend, triton_available
from .attention import attention_cpu, cpu_available, cpu_kernel_takes
from .flash import flash_available, flash_cross_attention, flash_takes

OP = "cross_attention"
MAX_HEAD_DIM = 128  # the Triton and CUDA kernels keep a whole head row in registers
CUDA_HEAD_DIMS = (32, 64, 128)  # the CUDA kernel is compiled for these


# ----------------------------------------------------------------------------------------------------
# Packing the condition tokens (once per request)
# ----------------------------------------------------------------------------------------------------
def _lens_or_full(x: torch.Tensor, lens: Optional[torch.Tensor], name: str, check: bool = True) -> torch.Tensor:
    B, L = x.shape[0], x.shape[1]
    if lens is None:
        return torch.full((B,), L, dtype=torch.int64, device=x.device)
    if lens.shape != (B,):
        raise OpInputError(f"pack_condition_tokens: {name}_lens must have shape [{B}], got {tuple(lens.shape)}")
    if lens.dtype.is_floating_point or lens.dtype == torch.bool:
        raise OpInputError(f"pack_condition_tokens: {name}_lens must be an integer tensor, got {lens.dtype}")
    if lens.device != x.device and lens.device.type != "cpu":
        raise OpInputError(f"pack_condition_tokens: {name}_lens is on {lens.device}, {name} on {x.device}")
    lens = lens.to(device=x.device, dtype=torch.int64)
    if check and bool(((lens < 0) | (lens > L)).any()):  # one host sync, once per request
        raise OpInputError(f"pack_condition_tokens: {name}_lens must be in [0, {L}] (at most the padded length "
                         f"of {name}), got {lens.tolist()}")
    return lens


def pack_condition_tokens(video: Optional[torch.Tensor], video_lens: Optional[torch.Tensor],
                          text: Optional[torch.Tensor], text_lens: Optional[torch.Tensor], static: bool = False
                          ) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Pack each sample's real ``[video tokens | text tokens]`` into the varlen key layout.

    video [B, Lv, C] or None, video_lens [B] or None (None: all Lv tokens are real);
    text  [B, Lt, C] or None, text_lens  [B] or None. A modality given as None is absent for every
    sample; a length of 0 drops it for one sample. At least one of video / text must be a tensor
    (give a [B, 0, C] tensor for a batch with no condition at all, so B and C stay known).

    Returns (packed [total, C], cu_seqlens_k int32 [B + 1], max_seqlen_k int). One vectorised
    gather, no loop over the batch; max_seqlen_k costs one host sync, which is why the model calls this
    once per request and not once per step.

    static: no host sync and shapes that do not depend on the lengths (what a CUDA-graph capture of a training
    step needs): packed has all B * (Lv + Lt) rows, the real tokens first in the same order as above and the
    padding tokens after row cu_seqlens_k[-1], where no kernel reads them (their gradient is zero);
    max_seqlen_k = Lv + Lt, an upper bound. The lengths are not range-checked (that check reads them on the host).
    """
    for name, t in (("video", video), ("video_lens", video_lens), ("text", text), ("text_lens", text_lens)):
        tensor("pack_condition_tokens", name, t, optional=True)
    flag("pack_condition_tokens", "static", static)
    ref = video if video is not None else text
    if ref is not None:                       # under autocast both modalities in the autocast dtype
        video, text = autocast_inputs(ref.device, video, text)
    parts, masks = [], []
    for x, lens, name in ((video, video_lens, "video"), (text, text_lens, "text")):
        if x is None:
            if lens is not None and not static and bool((lens != 0).any()):
                raise OpInputError(f"pack_condition_tokens: {name} is None but {name}_lens has nonzero entries")
            continue
        if x.dim() != 3:
            raise OpInputError(f"pack_condition_tokens: {name} must be [B, L, C], got shape {tuple(x.shape)}")
        lens = _lens_or_full(x, lens, name, check=not static)
        pos = torch.arange(x.shape[1], device=x.device)
        parts.append(x)
        masks.append(pos[None, :] < lens[:, None])  # [B, L] True on real tokens
    if not parts:
        raise OpInputError("pack_condition_tokens: video and text are both None; pass a [B, 0, C] tensor "
                         "for a batch without conditions so that B and C are known")
    if len(parts) == 2:
        v, t = parts
        if v.shape[0] != t.shape[0] or v.shape[2] != t.shape[2]:
            raise OpInputError(f"pack_condition_tokens: video {tuple(v.shape)} and text {tuple(t.shape)} must share "
                             "B and C (project both to the model width first)")
        if v.dtype != t.dtype or v.device != t.device:
            raise OpInputError(f"pack_condition_tokens: video ({v.dtype}, {v.device}) and text ({t.dtype}, "
                             f"{t.device}) must share dtype and device")
    tokens = torch.cat(parts, dim=1) if len(parts) == 2 else parts[0]     # [B, Lv + Lt, C]
    real = torch.cat(masks, dim=1) if len(masks) == 2 else masks[0]       # [B, Lv + Lt]
    seqlens = real.sum(dim=1)                                             # [B]
    cu_seqlens_k = F.pad(torch.cumsum(seqlens, 0), (1, 0)).to(torch.int32)
    if static:
        # One stable order of every token: the real ones in row-major order (as the boolean index below), then the
        # padding ones. The sort keys are unique, so the order is a permutation and the gather's backward exact.
        B, L = real.shape
        n = torch.arange(B * L, device=real.device)
        order = torch.argsort((~real).reshape(-1).to(torch.int64) * (B * L) + n)
        return tokens.reshape(B * L, -1).index_select(0, order), cu_seqlens_k, L    # [B * L, C]
    # Row-major boolean indexing keeps, per sample, its video tokens then its text tokens.
    packed = tokens[real]                                                 # [total, C]
    max_seqlen_k = int(seqlens.max()) if seqlens.numel() else 0
    return packed, cu_seqlens_k, max_seqlen_k


# ----------------------------------------------------------------------------------------------------
# Reference (plain PyTorch)
# ----------------------------------------------------------------------------------------------------
def _pad_keys(k: torch.Tensor, v: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_k: int):
    """Gather packed keys into [B, Lk, H, D] (Lk = max(max_seqlen_k, 1)) plus a [B, Lk] key mask.

    Padding slots point at an appended zero row, so a sample with no key sees only zero keys and zero
    values: its softmax is uniform over zeros and its output and every gradient are exactly 0, with
    no fully masked row (which is NaN in some SDPA versions).
    """
    B = cu_seqlens_k.shape[0] - 1
    Lk = max(int(max_seqlen_k), 1)
    cu = cu_seqlens_k.to(torch.int64)
    start, lens = cu[:-1], cu[1:] - cu[:-1]                               # [B]
    pos = torch.arange(Lk, device=k.device)
    real = pos[None, :] < lens[:, None]                                   # [B, Lk]
    zero_row = k.shape[0]
    idx = torch.where(real, start[:, None] + pos[None, :], zero_row)     # [B, Lk]
    # index_select, not advanced indexing: its backward is a plain index_add (no sort of the indices).
    flat = idx.reshape(-1)
    kp = torch.cat([k, k.new_zeros((1,) + tuple(k.shape[1:]))]).index_select(0, flat).view(B, Lk, *k.shape[1:])
    vp = torch.cat([v, v.new_zeros((1,) + tuple(v.shape[1:]))]).index_select(0, flat).view(B, Lk, *v.shape[1:])
    mask = real | (lens == 0)[:, None]                                    # empty samples: attend to zeros
    return kp, vp, mask, B


def cross_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_k: torch.Tensor,
                              max_seqlen_k: int, softmax_scale: Optional[float] = None) -> torch.Tensor:
    """Plain-PyTorch varlen cross-attention (SDPA). Shapes as in the module docstring.

    Two formulations of the same math: on the CPU (outside torch.compile) one unmasked SDPA per sample
    over exactly its keys, which skips empty samples and padding work (a CFG batch [208, 0] costs half
    of the padded call); elsewhere K/V padded to max_seqlen_k with a key-padding mask, one batched call
    with no host sync (CUDA-graph safe). SDPA keeps the softmax in fp32 for fp16/bf16 inputs; float64
    inputs run its exact math path (the tests' reference).
    """
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if q.device.type == "cpu" and not torch.compiler.is_compiling():
        return _reference_per_sample(q, k, v, cu_seqlens_k, scale)
    return _reference_padded(q, k, v, cu_seqlens_k, max_seqlen_k, scale)


def _reference_padded(q, k, v, cu_seqlens_k, max_seqlen_k, scale):
    kp, vp, mask, B = _pad_keys(k, v, cu_seqlens_k, max_seqlen_k)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2),   # [B, H, L, D]
        attn_mask=mask[:, None, None, :], scale=scale)               # mask [B, 1, 1, Lk]
    return out.transpose(1, 2)                                      # [B, Lq, H, D]


def _reference_per_sample(q, k, v, cu_seqlens_k, scale):
    bounds = cu_seqlens_k.tolist()  # CPU tensor: no device sync
    lens = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    # split, not slicing: the backward of split is one cat, where B slices would each scatter into a
    # full-size zero gradient (O(B^2) memory traffic).
    # rows past cu_seqlens_k[-1] (pack_condition_tokens(static=True)'s padding) belong to no sample
    qs, ks, vs = q.split(1), k[:bounds[-1]].split(lens), v[:bounds[-1]].split(lens)
    outs = []
    for qb, kb, vb in zip(qs, ks, vs):
        if kb.shape[0] == 0:
            outs.append(qb * 0)  # zeros that keep dq (= 0) in the graph
            continue
        o = F.scaled_dot_product_attention(qb.transpose(1, 2), kb[None].transpose(1, 2), vb[None].transpose(1, 2),
                                           scale=scale)            # [1, H, Lq, D]
        outs.append(o.transpose(1, 2))
    return torch.cat(outs) if outs else q * 0                      # [B, Lq, H, D]


def _lse_reference(q, k, cu_seqlens_k, max_seqlen_k, scale) -> torch.Tensor:
    """fp32 log-sum-exp of the scaled scores per (b, h, query) [B, H, Lq]; 0 for samples with no key."""
    kp, _, mask, B = _pad_keys(k, k, cu_seqlens_k, max_seqlen_k)
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), kp.float()) * scale          # [B, H, Lq, Lk]
    s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    has_keys = (cu_seqlens_k[1:] > cu_seqlens_k[:-1]).to(q.device)
    return torch.where(has_keys[:, None, None], lse, torch.zeros_like(lse))


def _backward_math(dout, q, k, v, out, lse, cu_seqlens_k, max_seqlen_k, scale):
    """Flash-attention backward written in padded PyTorch, fp32: the fallback for backends without one.

    P = exp(S - lse), dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO * O)), dQ = dS K s, dK = dS^T Q s.
    """
    kp, vp, mask, B = _pad_keys(k, v, cu_seqlens_k, max_seqlen_k)
    has_keys = (cu_seqlens_k[1:] > cu_seqlens_k[:-1]).to(q.device)
    real = mask & has_keys[:, None]                                               # [B, Lk]
    qf, kf, vf, df = q.float(), kp.float(), vp.float(), dout.float()
    s = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale                          # [B, H, Lq, Lk]
    p = torch.exp(s - lse[..., None]) * real[:, None, None, :]
    delta = (df * out.float()).sum(-1).transpose(1, 2)                            # [B, H, Lq]
    dp = torch.einsum("bqhd,bkhd->bhqk", df, vf)
    ds = p * (dp - delta[..., None])
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, kf) * scale
    dkp = torch.einsum("bhqk,bqhd->bkhd", ds, qf) * scale                         # [B, Lk, H, D]
    dvp = torch.einsum("bhqk,bqhd->bkhd", p, df)
    idx = _packed_rows(cu_seqlens_k, kp.shape[1], k.shape[0])                      # past the end: the zero row
    dk = F.pad(dkp.reshape(-1, *dkp.shape[2:]), (0, 0, 0, 0, 0, 1))[idx]
    dv = F.pad(dvp.reshape(-1, *dvp.shape[2:]), (0, 0, 0, 0, 0, 1))[idx]
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


def _packed_rows(cu_seqlens_k: torch.Tensor, Lk: int, total_k: int) -> torch.Tensor:
    """For each packed key row, its row in the flattened padded [B * Lk] layout; B * Lk (one past the end) for a
    row past cu_seqlens_k[-1], which belongs to no sample (pack_condition_tokens(static=True)'s padding)."""
    cu = cu_seqlens_k.to(torch.int64)
    B = cu.shape[0] - 1
    r = torch.arange(total_k, device=cu.device)
    b = torch.searchsorted(cu[1:], r, right=True).clamp(max=max(B - 1, 0))       # sample of row r
    return torch.where(r < cu[-1], b * Lk + (r - cu[b]), B * Lk)


# ----------------------------------------------------------------------------------------------------
# Dispatch and torch.library registration
# ----------------------------------------------------------------------------------------------------
def _triton_available(device: torch.device) -> bool:
    return triton_available(device.type) and (device.type != "cpu" or _interpreter_takes_data_dependent_loops())


@functools.lru_cache(maxsize=None)
def _interpreter_takes_data_dependent_loops() -> bool:
    # The kernels loop over a sample's keys up to a bound loaded from cu_seqlens. Triton's CPU interpreter before 3.9
    # (3.6 seen) turns that bound into a Python int with int() on a one-element array, which NumPy 2.4 refuses; the
    # compiled kernel is unaffected, so only the interpreter is ruled out there.
    import numpy
    import triton

    version = lambda v: tuple(int(p) for p in v.split(".")[:2])     # noqa: E731
    return version(triton.__version__) >= (3, 9) or version(numpy.__version__) < (2, 4)


def _cuda_available(device: torch.device) -> bool:
    return device.type == "cuda" and _native.has_cuda() and _native.has_symbol("cross_attention_fwd_cuda")


# CPU: the C++ forward when no gradient is needed (sampling), else SDPA. GPU: Triton first,
# measured (H200, bf16, CUDA graphs): inference q [2, 250, 24, 64] 5.4 us Triton vs 17.5 us for the
# WMMA CUDA kernel and 14.5 us for padded SDPA; the CUDA kernel stays selectable (use_backend) and is
# the fallback where Triton is missing.
register_op(OP, {"reference": lambda d: True, "cpu": cpu_available, "triton": _triton_available,
                 "cuda": _cuda_available, "flash": flash_available},
            default_order={"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}, family="attention")


def _run_forward(q, k, v, cu, max_seqlen_k, scale, backend):
    if backend == "triton":
        from omni2sound.kernels.cross_attention import cross_attention_fwd
        return cross_attention_fwd(q, k, v, cu, max_seqlen_k, scale)
    if backend == "cuda":
        return _cuda_forward(q, k, v, cu, max_seqlen_k, scale)
    if backend == "cpu" and q.dtype in _native.DTYPE_CODES:
        # the C++ forward (out, lse); training through the custom op differentiates with the padded math below
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        return attention_cpu(q, k, v, scale, cu_seqlens_k=cu, with_lse=True)
    if backend in ("reference", "cpu"):
        out = _reference_padded(q, k, v, cu, max_seqlen_k, scale)
        return out.contiguous(), _lse_reference(q, k, cu, max_seqlen_k, scale)
    raise OpInputError(f"cross_attention: unknown backend {backend!r}")


def _cuda_forward(q, k, v, cu, max_seqlen_k, scale):
    B, Lq, H, D = q.shape
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    P = _native.lib().CrossAttnParams()
    P.B, P.Lq, P.H, P.D, P.Nk, P.scale, P.dtype = B, Lq, H, D, k.shape[0], float(scale), _native.dtype_code(q)
    P.q, P.k, P.v, P.cu, P.out, P.lse = q.data_ptr(), k.data_ptr(), v.data_ptr(), cu.data_ptr(), out.data_ptr(), \
        lse.data_ptr()
    P.sq_b, P.sq_l, P.sq_h = q.stride(0), q.stride(1), q.stride(2)
    P.sk_n, P.sk_h, P.sv_n, P.sv_h = k.stride(0), k.stride(1), v.stride(0), v.stride(1)
    _native.lib().cross_attention_fwd_cuda(P, _native.stream_of(q))
    return out, lse


@torch.library.custom_op("omni2sound::cross_attention", mutates_args=())
def _cross_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_k: torch.Tensor,
                        max_seqlen_k: int, softmax_scale: float, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (out [B, Lq, H, D] in q's dtype, lse [B, H, Lq] fp32, kept for backward)."""
    return _run_forward(q, k, v, cu_seqlens_k, max_seqlen_k, softmax_scale, backend)


@_cross_attention_op.register_fake
def _(q, k, v, cu_seqlens_k, max_seqlen_k, softmax_scale, backend):
    B, Lq, H, D = q.shape
    return q.new_empty((B, Lq, H, D)), q.new_empty((B, H, Lq), dtype=torch.float32)


@torch.library.custom_op("omni2sound::cross_attention_backward", mutates_args=())
def _cross_attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 out: torch.Tensor, lse: torch.Tensor, cu_seqlens_k: torch.Tensor,
                                 max_seqlen_k: int, softmax_scale: float, backend: str
                                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv) in the dtypes of q, k, v."""
    dout = dout.contiguous()
    if backend == "triton" or (backend == "cuda" and _triton_available(q.device)):
        # No CUDA backward kernel: the cuda backend trains through the Triton backward when it can.
        from omni2sound.kernels.cross_attention import cross_attention_bwd
        return cross_attention_bwd(dout, q, k, v, out, lse, cu_seqlens_k, max_seqlen_k, softmax_scale)
    return _backward_math(dout, q, k, v, out, lse, cu_seqlens_k, max_seqlen_k, softmax_scale)


@_cross_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_k, max_seqlen_k, softmax_scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, like the kernels


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_k, max_seqlen_k, softmax_scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_k)
    ctx.max_seqlen_k, ctx.softmax_scale, ctx.backend = max_seqlen_k, softmax_scale, backend


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens_k = ctx.saved_tensors
    # lse is an internal output: nothing upstream differentiates it (dlse is None or zeros).
    dq, dk, dv = _cross_attention_backward_op(dout, q, k, v, out, lse, cu_seqlens_k, ctx.max_seqlen_k,
                                              ctx.softmax_scale, ctx.backend)
    return dq, dk, dv, None, None, None, None


_cross_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------
def _check_inputs(q, k, v, cu_seqlens_k, max_seqlen_k, softmax_scale):
    tensor(OP, "q", q, dims=(4,), shape="[B, Lq, H, D]", dtypes=KERNEL_DTYPES + (torch.float64,))
    B, Lq, H, D = q.shape
    if D < 1:
        fail(OP, f"the head dim must be >= 1, got q of shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        tensor(OP, name, t, dims=(3,), shape="packed [total_k, H, D]", like=q, like_name="q")
        if t.shape[1:] != (H, D):
            fail(OP, f"{name} must be packed [total_k, H={H}, D={D}], got {tuple(t.shape)}")
    if k.shape[0] != v.shape[0]:
        fail(OP, f"k and v must have the same number of rows, got {k.shape[0]} and {v.shape[0]}")
    real(OP, "softmax_scale", softmax_scale, optional=True)
    cu_seqlens(OP, cu_seqlens_k, B, k.shape[0], max_seqlen_k, q.device)


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_k: torch.Tensor,
                    max_seqlen_k: int, softmax_scale: Optional[float] = None) -> torch.Tensor:
    """Varlen cross-attention of dense queries over packed keys/values; see the module docstring.

    q [B, Lq, H, D]; k, v [total_k, H, D]; cu_seqlens_k int32 [B + 1]; max_seqlen_k = the largest
    per-sample key count (from ``pack_condition_tokens``); the offsets are checked (``_checks.cu_seqlens``: read
    once per offsets tensor, one device sync for a GPU tensor's first use); softmax_scale defaults to 1/sqrt(D).
    D up to 128 (CUDA backend: 32, 64, 128).
    Returns [B, Lq, H, D] in q's dtype; samples without keys give zeros. Under autocast q, k and v are cast to
    the autocast dtype first.
    """
    tensor(OP, "q", q)
    q, k, v = autocast_inputs(q.device, q, k, v)
    _check_inputs(q, k, v, cu_seqlens_k, max_seqlen_k, softmax_scale)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    backend = select_backend(OP, q.device)
    if backend == "flash":
        if flash_takes(q):
            return flash_cross_attention(q, k, v, cu_seqlens_k, max_seqlen_k, scale)
        raise cannot_take(OP, "flash", f"flash-attn takes float16 / bfloat16 and head dims multiples of 8 up to 256; "
                                       f"got {q.dtype}, q {tuple(q.shape)}")
    if backend == "cpu" and cpu_kernel_takes(q, k, v):
        return attention_cpu(q, k, v, scale, cu_seqlens_k=cu_seqlens_k)[0]
    if backend in ("reference", "cpu") or q.dtype == torch.float64:
        return cross_attention_reference(q, k, v, cu_seqlens_k, max_seqlen_k, scale)
    if q.shape[-1] > MAX_HEAD_DIM or (backend == "cuda" and q.shape[-1] not in CUDA_HEAD_DIMS):
        allowed = CUDA_HEAD_DIMS if backend == "cuda" else f"up to {MAX_HEAD_DIM}"
        raise OpInputError(f"omni2sound.ops.cross_attention: the {backend} backend takes head dims {allowed}, "
                         f"got {q.shape[-1]}; use another backend (use_backend(cross_attention=...))")
    return _cross_attention_op(q, k, v, cu_seqlens_k, max_seqlen_k, scale, backend)[0]
