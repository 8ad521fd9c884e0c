"""What the DiT's sampling reads once per request, and the CUDA-graph sampler that replays its steps.

``Omni2SoundDiT.prepare_conditions`` returns ``PreparedConditions``: every tensor of a request that does not depend on
the noisy latent (the cross-attention K/V of every layer, the per-token half of every AdaLN modulation, RoPE), plus,
for sampling, the per-device plan of the loop (which rows skip the cross-attention, a workspace of reusable GEMM
output buffers; ``ops`` decides both per device). The network's projections go through ``dense`` and
``linear_into`` here, which write into that workspace where there is one.

On a GPU, ``GraphSampler`` captures one guided denoising step (``flow.guided_velocity`` over the whole CFG batch)
into a CUDA graph over static buffers and replays it for every step; a later request with the same shapes copies its
PreparedConditions into the captured ones (``PreparedConditions.copy_``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from . import ops
from .cuda_graphs import warm_up_on_side_stream
from .flow import guided_velocity, time_grid


def leading_rows_with_tokens(cu_seqlens: Tensor) -> int:
    """The number of rows before the trailing run of rows with zero tokens (one host read)."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    n = len(lens)
    while n and lens[n - 1] == 0:
        n -= 1
    return n


@dataclass
class PreparedConditions:
    """Everything that does not depend on the noisy latent, computed once per request.

    kv            per layer (k, v), each [total_k, H, Dh]: the cross-attention keys/values
    cu_seqlens_k  int32 [B + 1];  max_seqlen_k  int
    sync_mod      depth x [B, T, 6, D]: the sync half of every block's per-token AdaLN (shift/scale/gate x 2),
                  views of the ada_sync outputs. A list, not one stacked tensor, and split once per block per step
                  (``ops.split_modulation``): in training, indexing ([k]) a shared tensor makes autograd build a
                  zero-filled full-size gradient per index and add them up (one [depth, ...] tensor indexed per
                  block: 36% of an L step at batch 32 in add_ and fill_ kernels on an H100); unbind's backward would
                  be one stack, and split_modulation's is none: the AdaLN backward writes the six gradients into
                  the one [B, T, 6, D] buffer that the Linear's backward reads
    final_sync_mod [B, T, 2, D]
    norm_w        per layer (q/k norm weights fp32 [2, Dh], cross-attention query norm weight fp32 [Dh]): what the
                  fused head norms read, stacked and cast once per request rather than in every step
    duration_emb  [B, D]
    rope          fp32 [T, Dh / 2, 2]: (cos, sin) of RoPE's angle per frame and pair
    ones, zeros   [B, 1, D]: the cross-attention's residual gate and its query norm's (shift, scale)
    cross_rows    the cross-attention runs on rows [0, cross_rows) only: the rows after have no condition tokens,
                  so their attention output is exactly 0 and the sublayer's output exactly proj.bias (the CFG
                  batch puts its unconditional rows last; skipping them saves their query and output GEMMs)
    workspace     None, or (sampling where ``ops.sampling_workspace`` gives one: the CPU) reusable scratch tensors by
                  name: when the GEMMs run on aten (``ops.linear``'s reference backend; oneDNN, the default, has no
                  out= form) the qkv projection [B T, 3D] and the MLP's hidden activation [B T, 4D] are written into
                  buffers that every block and step reuses (the CPU analogue of a CUDA graph's static memory: fresh
                  5-6 MB tensors are served by mmap and page-fault on first touch, 12k-38k faults per S step, and the
                  qkv GEMM's bias fill into a fresh tensor took 1.8 ms of its 18). oneDNN's GEMM is faster even with
                  those faults (bench/RESULTS.md)
    """
    kv: List[Tuple[Tensor, Tensor]]
    cu_seqlens_k: Tensor
    max_seqlen_k: int
    sync_mod: List[Tensor]
    final_sync_mod: Tensor
    norm_w: List[Tuple[Tensor, Tensor]]
    duration_emb: Tensor
    rope: Tensor
    ones: Tensor
    zeros: Tensor
    batch_size: int
    num_frames: int
    cross_rows: int = -1
    workspace: Optional[Dict[str, Tensor]] = None
    key_mask: Optional[Tensor] = None        # bool [B, T]: the frames each row's self-attention reads (frame_mask)

    def __post_init__(self):
        if self.cross_rows < 0:
            self.cross_rows = self.batch_size

    def for_sampling(self) -> "PreparedConditions":
        """These conditions set up for many denoising steps on their device (one host read): the trailing rows
        without condition tokens skip the cross-attention where ``ops.skips_rows_without_keys`` says it pays, and the
        projections get a workspace where ``ops.sampling_workspace`` gives one."""
        dev = self.cu_seqlens_k.device
        if ops.skips_rows_without_keys(dev):
            self.cross_rows = leading_rows_with_tokens(self.cu_seqlens_k)
        self.workspace = ops.sampling_workspace(dev)
        return self

    def buffer(self, name: str, shape: Tuple[int, ...], like: Tensor) -> Optional[Tensor]:
        """The workspace tensor ``name`` of ``shape`` (like's dtype and device), made on first use; None without a
        workspace. Its contents are garbage between uses."""
        if self.workspace is None or torch.compiler.is_compiling():      # a compiled step plans its own memory
            return None
        t = self.workspace.get(name)
        if t is None or tuple(t.shape) != tuple(shape) or t.dtype != like.dtype or t.device != like.device:
            t = self.workspace[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return t

    def tensors(self) -> List[Tensor]:
        """Every tensor, in a fixed order (static buffers for CUDA-graph replay copy into these)."""
        out = [t for kv in self.kv for t in kv] + [self.cu_seqlens_k, *self.sync_mod]
        out = out + [w for pair in self.norm_w for w in pair]
        out = out + [self.final_sync_mod, self.duration_emb, self.rope, self.ones, self.zeros]
        return out + ([] if self.key_mask is None else [self.key_mask])

    def signature(self) -> tuple:
        """Shapes and dtypes that a captured graph depends on."""
        return (self.batch_size, self.num_frames, self.max_seqlen_k, self.cross_rows,
                tuple((tuple(t.shape), t.dtype) for t in self.tensors()))

    def copy_(self, other: "PreparedConditions") -> "PreparedConditions":
        if self.signature() != other.signature():
            raise ValueError("PreparedConditions.copy_: shapes differ; capture a new graph for this request")
        for dst, src in zip(self.tensors(), other.tensors()):
            dst.copy_(src)
        return self


# ----------------------------------------------------------------------------------------------------
# The network's projections, into the request's workspace buffers where there are any
# ----------------------------------------------------------------------------------------------------
def gemm_buffer(prep: Optional[PreparedConditions], name: str, y: Tensor, lin: nn.Linear) -> Optional[Tensor]:
    """The request's workspace buffer [prod(y.shape[:-1]), N] for ``lin(y)``'s output, y [..., K], or None: no
    workspace, or the GEMM runs on oneDNN (``ops.linear``'s CPU default for large no-grad GEMMs), which always
    writes a new tensor."""
    if prep is None or prep.workspace is None or ops.runs_on_onednn(y, lin.weight, lin.bias):
        return None
    return prep.buffer(name, (y.numel() // y.shape[-1], lin.out_features), y)


def dense(lin: nn.Linear, x: Tensor) -> Tensor:
    """lin(x) through ``ops.linear``: the same as the module with gradients on (training); without, on the CPU,
    oneDNN's GEMM when it is large enough to win (L: 1.15-1.3x aten's on every projection; S: its qkv and MLP fc1)."""
    return ops.linear(x, lin.weight, lin.bias)


def linear_into(x: Tensor, lin: nn.Linear, prep: Optional[PreparedConditions], name: str) -> Tensor:
    """lin(x) for x [..., K] through ``ops.linear``, into the request's buffer ``name`` when there is one."""
    return ops.linear(x, lin.weight, lin.bias, out=gemm_buffer(prep, name, x, lin))


# ----------------------------------------------------------------------------------------------------
# The CUDA-graph sampler: static buffers, one captured guided step, replayed
# ----------------------------------------------------------------------------------------------------
class _GraphEntry:
    def __init__(self, predict, prep: PreparedConditions, k: int, scales, steps: int,
                 method: str, x0: Tensor):
        self.prep = prep                                  # the static condition buffers (refilled per request)
        self.x = x0.clone()                               # static latent [B, T, C]
        B = x0.shape[0]
        self.ts = time_grid(steps, x0.device).to(x0.dtype)
        self.t = self.ts[0].expand(B).clone()             # static time of the step [B]
        self.t_next = self.ts[1].expand(B).clone()
        dt = 1.0 / steps

        forwards = [(prep, k)]                            # one forward over the whole CFG batch

        def velocity(x, t):
            return guided_velocity(predict, x, t, forwards, scales)

        def step():
            v = velocity(self.x, self.t)
            if method == "euler":
                self.x.add_(v, alpha=dt)
            else:
                v2 = velocity(self.x + dt * v, self.t_next)
                self.x.add_(v + v2, alpha=0.5 * dt)

        warm_up_on_side_stream(step, 2)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            step()

    def run(self, x0: Tensor, steps: int) -> Tensor:
        self.x.copy_(x0)
        for i in range(steps):
            self.t.copy_(self.ts[i].expand_as(self.t))       # device-to-device, no host sync
            self.t_next.copy_(self.ts[i + 1].expand_as(self.t))
            self.graph.replay()
        return self.x.clone()


class GraphSampler:
    """Caches one captured step per (condition shapes, batch, frames, steps, sampler, CFG form, backend overrides)."""

    def __init__(self, max_entries: int = 4):
        self.entries: Dict[tuple, _GraphEntry] = {}
        self.max_entries = max_entries
        self.captures = 0

    @torch.no_grad()
    def sample(self, predict, prep: PreparedConditions, k: int, scales, x0: Tensor, steps: int, method: str
               ) -> Tensor:
        """predict: (x [kB, T, C], t [kB], prep) -> v, i.e. the DiT's predict_velocity (maybe compiled)."""
        key = (predict, prep.signature(), k, scales, steps, method, tuple(x0.shape), x0.dtype, ops.overrides_key())
        entry = self.entries.get(key)
        if entry is None:
            if len(self.entries) >= self.max_entries:
                self.entries.pop(next(iter(self.entries)))
            entry = self.entries[key] = _GraphEntry(predict, prep, k, scales, steps, method, x0)
            self.captures += 1
        elif entry.prep is not prep:
            entry.prep.copy_(prep)
        return entry.run(x0, steps)


__all__ = ["GraphSampler", "PreparedConditions", "dense", "gemm_buffer", "leading_rows_with_tokens", "linear_into"]
