"""The flow-matching training step captured once in a CUDA graph and replayed.

Why: an L training step (batch 32 x 10 s) launches some 3000 kernels. On an H200 (profile of 2026-12-04) the GPU ran a
step's kernels in 149 ms while the host took 225 ms to launch them: the step was bound by Python and the launch
path, not by the GPU. A replay launches the whole step (forward, backward, AdamW) with one call.

What a capture needs, and how this module meets it:
- fixed shapes: the batch, the latent frames and the *padded* condition token counts are fixed per graph; the
  lengths, the task dropout (lengths set to 0) and the values vary freely. The condition tokens are packed with
  their padding (``prepare_conditions(static=True)``), so nothing depends on the lengths' values.
- no host synchronisation inside: the conditions are validated outside the graph, before they are copied in.
- the random draws (noise x0 and the time t of ``FlowMatching.draw``) are made outside and copied in, so a replay
  draws what the eager step would from the same generator.
- a capturable optimiser (``AdamW(..., capturable=True)``: its step count lives on the GPU) and gradients that live
  in the graph's memory: they are set to None before the capture, and the captured backward writes them.
- the autocast weight-cast cache is off inside (a cached cast would outlive the capture's memory); with bf16 weight
  copies (``LoopConfig.bf16_weights``) there is nothing to cast: the optimiser step writes them.

- warm-up before the capture (cuBLAS / cuDNN workspaces, Triton compiles, the optimiser's state), on a side stream
  as the capture documentation asks, with the learning rate at 0 and the optimiser's state put back afterwards:
  the warm-up leaves the weights and the optimiser exactly as it found them.

One graph per shape signature (at most ``max_graphs``; one is enough for fixed-length clips). With ``graphs=False``
or off a GPU the same step runs eagerly (the CPU tests check it against the plain step, op by op for host reads).
Single process only: DDP's gradient all-reduce hooks are not captured here.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .conditions import Conditions
from .flow import FlowMatching
from .optim import holds_bf16_weights, training_autocast

_COND_FIELDS = ("text_tokens", "text_lens", "video_tokens", "video_lens", "sync", "duration")


class GraphedTrainStep:
    """``step(x1, cond, generator)`` = loss + backward + optimiser step, replayed from a CUDA graph.

    model: the DiT (not DDP-wrapped); opt: its optimiser (on a GPU: capturable); flow: the loss.
    Returns (loss, logs) as detached tensors that the next call overwrites (clone them to keep them).
    """

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, flow: Optional[FlowMatching] = None,
                 autocast_dtype: Optional[torch.dtype] = torch.bfloat16, warmup: int = 2, max_graphs: int = 2,
                 before_step: Optional[Callable[[], None]] = None, graphs: bool = True,
                 pad_text_to: Optional[int] = None):
        self.model, self.opt, self.flow = model, opt, flow or FlowMatching()
        self.autocast_dtype, self.warmup, self.max_graphs = autocast_dtype, warmup, max_graphs
        self.before_step = before_step              # e.g. gradient clipping: runs (and is captured) before opt.step
        self.device = next(model.parameters()).device
        self.use_graphs = graphs and self.device.type == "cuda"
        # Text padded to a fixed count keeps one graph for batches whose longest caption differs (the lengths stay
        # exact: padding tokens are never attended); the cost is the K/V projections of the padding rows.
        self.pad_text_to = pad_text_to
        self.graphs: Dict[tuple, tuple] = {}
        if self.use_graphs:
            for group in opt.param_groups:
                if not group.get("capturable", False):
                    raise ValueError("GraphedTrainStep: the optimiser must be capturable on a GPU "
                                     "(e.g. torch.optim.AdamW(..., fused=True, capturable=True))")

    # -- the step, as captured ------------------------------------------------------------------------
    def _velocity(self, x_t: Tensor, t: Tensor, cond: Conditions) -> Tensor:
        prep = self.model.prepare_conditions(cond, x_t.shape[1], static=True)
        return self.model.predict_velocity(x_t, t, prep)

    def _step(self, x1: Tensor, cond: Conditions, draws: Tuple[Tensor, Tensor]) -> Tuple[Tensor, dict]:
        # no weight-cast cache: a cached cast would outlive the capture's memory
        with training_autocast(self.device, self.autocast_dtype, holds_bf16_weights(self.model), cache_enabled=False):
            loss, logs = self.flow.loss(self._velocity, x1, cond, draws=draws)
        loss.backward()
        if self.before_step is not None:
            self.before_step()
        self.opt.step()
        return loss.detach(), logs

    # -- calls ----------------------------------------------------------------------------------------
    def __call__(self, x1: Tensor, cond: Conditions, generator: Optional[torch.Generator] = None,
                 draws: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, dict]:
        """One training step on (x1 [B, T, C], cond); draws (x0, t) as FlowMatching.draw makes them, else drawn
        here from ``generator``."""
        self.model.train()
        x1 = x1.to(self.device)
        cond = cond.to(self.device)
        cond.validate()                                             # the checks the capture leaves out, once here
        Lt = cond.text_tokens.shape[1]
        if self.pad_text_to is not None and Lt < self.pad_text_to:
            cond = replace(cond, text_tokens=F.pad(cond.text_tokens, (0, 0, 0, self.pad_text_to - Lt)))
        if draws is None:
            draws = self.flow.draw(x1, generator)
        if not self.use_graphs:                                     # the same step, eagerly
            self.opt.zero_grad(set_to_none=True)
            return self._step(x1, cond, draws)
        inputs = _graph_inputs(x1, draws, cond)
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(key, inputs)
        graph, static_in, out = entry
        for dst, src in zip(static_in, inputs):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        return out

    def _capture(self, key, inputs: list) -> tuple:
        if len(self.graphs) >= self.max_graphs:
            self.graphs.pop(next(iter(self.graphs)))
        static_in = [t.detach().clone() for t in inputs]
        sx1, sx0, st = static_in[:3]
        scond = Conditions(**dict(zip(_COND_FIELDS, static_in[3:])))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), _optimizer_untouched(self.opt):
            for _ in range(self.warmup):
                self.opt.zero_grad(set_to_none=True)
                self._step(sx1, scond, (sx0, st))
        torch.cuda.current_stream().wait_stream(side)
        self.opt.zero_grad(set_to_none=True)                        # the captured backward allocates the grads
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._step(sx1, scond, (sx0, st))
        self.graphs[key] = (graph, static_in, out)
        return self.graphs[key]


def _graph_inputs(x1: Tensor, draws: Tuple[Tensor, Tensor], cond: Conditions) -> list:
    """Every tensor the captured step reads, in the order _capture rebuilds them: x1, x0, t, then the conditions."""
    return [x1, *draws, *(getattr(cond, f) for f in _COND_FIELDS)]


@contextlib.contextmanager
def _optimizer_untouched(opt: torch.optim.Optimizer):
    """Steps inside change neither the weights nor the optimiser: the learning rate is 0 (an AdamW step with lr 0
    leaves every weight bit-identical: p * (1 - 0 * wd) and p - 0 * update), and the state is put back afterwards
    (copied back where it existed, zeroed where the steps created it: a fresh AdamW state is all zeros)."""
    saved = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()} for p, st in opt.state.items()}
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = g["lr"].clone().zero_() if torch.is_tensor(g["lr"]) else 0.0
    try:
        yield
    finally:
        for g, lr in zip(opt.param_groups, lrs):
            g["lr"] = lr
        for p, st in opt.state.items():
            for k, v in st.items():
                if not torch.is_tensor(v):
                    continue
                if p in saved and k in saved[p]:
                    v.copy_(saved[p][k])
                else:
                    v.zero_()
