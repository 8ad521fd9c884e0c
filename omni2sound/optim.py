"""AdamW that trains the matrix weights as bf16 copies of fp32 master weights (mixed-precision "master weights").

    forward / backward:  the module's weight *is* the bf16 copy (its ``.data``); autocast finds it already in bf16
                         and casts nothing; its gradient accumulates in bf16 in ``.grad``
    optimiser step:      fp32 master (held here) <- AdamW(master, bf16 grad), and the bf16 copy <- bf16(master) in
                         the same pass (``ops.adamw_step_``: one kernel per weight)

Why: the alternative, fp32 weights under autocast, casts each weight to bf16 in every forward and each bf16 weight
gradient back to fp32 in every backward (12 bytes a parameter a step, 15.5 GB for the L DiT; see ops/adamw.py).

What stays as it was: the parameters are the same ``nn.Parameter`` objects (only their ``.data`` is swapped), so
parameter groups, ``named_parameters`` and a CUDA graph's addresses hold; the optimiser's ``state_dict`` is
torch.optim.AdamW's (``exp_avg``, ``exp_avg_sq``, ``step`` per parameter index, in fp32), so a checkpoint of either
optimiser loads into the other; ``master_state_dict`` gives the module's state dict with the fp32 masters in place of
the copies (what checkpoints save). ``swap_out`` gives the module its fp32 masters back (a plain fp32 model) and
``swap_in`` the copies again. The vectors (norm weights, biases) train in fp32 as before, through the same kernel
without a copy.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from . import ops


def _wants_copy(p: Tensor) -> bool:
    """The weights that get a bf16 copy: fp32 matrices (the GEMM weights, nearly all the bytes)."""
    return p.dim() >= 2 and p.dtype == torch.float32 and p.is_floating_point()


class MasterWeightAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update (decoupled weight decay, no amsgrad) with bf16 copies of the matrix weights.

    bf16_weights=False: every weight trains in fp32 through the same kernel (a plain fused AdamW). lr may be a tensor
    (on the GPU for a CUDA-graph replay, as ``capturable=True`` AdamW takes it); the step counts live on each weight's
    device, so a replayed step reads them there."""

    def __init__(self, params: Iterable, lr=1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 bf16_weights: bool = True):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=False, maximize=False,
                        capturable=True, differentiable=False, fused=None, foreach=None)
        super().__init__(params, defaults)
        self.masters: Dict[Tensor, Tensor] = {}     # parameter -> its fp32 master (the parameter's former .data)
        self.copies: Dict[Tensor, Tensor] = {}      # parameter -> its bf16 copy (its .data while swapped in)
        self.swapped_in = False
        self._lr_bufs: Dict[int, Tensor] = {}
        if bf16_weights:
            for group in self.param_groups:
                for p in group["params"]:
                    if _wants_copy(p):
                        self.masters[p] = p.data
                        self.copies[p] = torch.empty_like(p.data, dtype=torch.bfloat16)
            self.swap_in()

    # -- the module's view of the weights ----------------------------------------------------------------
    @torch.no_grad()
    def swap_in(self) -> None:
        """The module's matrix weights become the bf16 copies (rounded from the masters now)."""
        for p, w in self.copies.items():
            w.copy_(self.masters[p])
            p.grad = None
            p.data = w
        self.swapped_in = bool(self.copies)

    @torch.no_grad()
    def swap_out(self) -> None:
        """The module's weights become the fp32 masters again (a plain fp32 model; the copies are kept)."""
        for p, m in self.masters.items():
            p.grad = None
            p.data = m
        self.swapped_in = False

    @contextlib.contextmanager
    def masters_in_place(self):
        """The masters as the parameters' data inside (e.g. to load or save fp32 state by parameter)."""
        was_in = self.swapped_in
        self.swap_out()
        try:
            yield
        finally:
            if was_in:
                self.swap_in()

    def master(self, p: Tensor) -> Tensor:
        """The fp32 weight the optimiser updates for parameter p (p itself when it has no bf16 copy)."""
        return self.masters.get(p, p)

    def master_state_dict(self, module: nn.Module) -> dict:
        """module.state_dict() with each bf16 copy replaced by its fp32 master (tensors shared, not copied)."""
        sd = module.state_dict()
        for name, p in module.named_parameters():
            if p in self.masters and name in sd:
                sd[name] = self.masters[p]
        return sd

    def named_masters(self, module: nn.Module):
        """(name, fp32 weight) for each of the module's parameters: the master where there is a copy."""
        for name, p in module.named_parameters():
            yield name, self.master(p)

    # -- state ---------------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts each loaded moment to its parameter's dtype: with the masters in place they stay fp32
        with self.masters_in_place():
            super().load_state_dict(state_dict)

    # -- the step ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            live = [p for p in group["params"] if p.grad is not None]
            if not live:
                continue
            steps = []
            for p in live:
                st = self.state[p]
                if not st:
                    master = self.master(p)
                    st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    st["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
                steps.append(st["step"])
            torch._foreach_add_(steps, 1.0)
            lr = group["lr"]
            if not torch.is_tensor(lr) and live[0].device.type == "cuda":
                # the Triton kernel reads lr from the device: a float goes into a buffer (a captured graph replays
                # the value it had at the capture, as torch's capturable AdamW does with a float lr)
                buf = self._lr_bufs.get(id(group))
                if buf is None or buf.device != live[0].device:
                    buf = self._lr_bufs[id(group)] = torch.zeros((), device=live[0].device)
                lr = buf.fill_(lr)
            for p in live:
                if p.grad.is_sparse:
                    raise RuntimeError("MasterWeightAdamW does not take sparse gradients")
                st = self.state[p]
                copy = self.copies.get(p) if self.swapped_in else None
                ops.adamw_step_(self.master(p), p.grad.contiguous(), st["exp_avg"], st["exp_avg_sq"], copy,
                                st["step"], lr, beta1, beta2, group["eps"], group["weight_decay"])
        return loss


def holds_bf16_weights(module: nn.Module) -> bool:
    """Whether any trainable weight of module is held in bf16 (the forward then needs bf16 autocast on its device)."""
    return any(p.requires_grad and p.dtype == torch.bfloat16 for p in module.parameters())


def training_autocast(device: Union[str, torch.device], dtype: Optional[torch.dtype], bf16_weights: bool,
                      cache_enabled: Optional[bool] = None):
    """The autocast a training forward runs under: ``dtype`` on a GPU; on any other device only when the model holds
    bf16 weight copies (``bf16_weights``, e.g. ``holds_bf16_weights(model)``: a bf16 weight meets fp32 activations,
    which only autocast casts), as fp32 weights train there in fp32. None when dtype is None. cache_enabled: autocast's
    weight-cast cache (None: torch's global setting; off inside a CUDA-graph capture)."""
    kind = torch.device(device).type
    if dtype is None or (kind != "cuda" and not bf16_weights):
        return contextlib.nullcontext()
    return torch.autocast(kind, dtype=dtype, cache_enabled=cache_enabled)


__all__ = ["MasterWeightAdamW", "holds_bf16_weights", "training_autocast"]

