"""The AdamW step on fp32 master weights that writes the bf16 copy of each weight in the same pass.

    per element, in fp32 (torch.optim.AdamW's decoupled weight decay; t = the step count after this step):
    p <- p (1 - lr wd)
    m <- b1 m + (1 - b1) g
    v <- b2 v + (1 - b2) g^2
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    w <- bf16(p)                     (round to nearest even: exactly ``p.to(torch.bfloat16)``)

    p, m, v fp32 [n] (the master weight and AdamW's moments, updated in place); g the gradient (fp32, or bf16: the
    gradient of the bf16 copy, read as it is); w the bf16 copy [n] (written; absent for a weight that trains in fp32).

Why: under autocast the forward casts every fp32 weight to bf16 (read 4 + write 2 bytes a parameter) and the
backward casts each bf16 weight gradient back to fp32 to accumulate it (read 2 + write 4): 12 bytes a parameter a
step, 15.5 GB for the L DiT. With the bf16 copy written here (2 bytes) and the bf16 gradient read as it is (2 bytes
instead of 4), a step moves 28 bytes a parameter in the optimiser against 40 (28 in AdamW plus the 12 of casts).

Backends: C++ on the CPU, Triton on a GPU, the reference (plain PyTorch, several passes) everywhere. ``step`` is a
tensor, ``lr`` a tensor or a float (on the GPU the kernel reads both from the device: a CUDA graph replays the step
with the values they hold then; the C++ kernel takes them by value).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from .. import _native
from ._checks import OpInputError
from ._dispatch import register_op, select_backend, triton_available

# ----------------------------------------------------------------------------------------------------
# Reference (plain PyTorch)
# ----------------------------------------------------------------------------------------------------


def adamw_step_reference(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, copy: Optional[Tensor],
                         step: Tensor, lr: Union[float, Tensor], beta1: float, beta2: float, eps: float,
                         weight_decay: float) -> None:
    """The step in plain PyTorch, fp32, in place (torch.optim.AdamW's for-loop formula, then the copy)."""
    g = grad.float()
    step = step.to(param.device, torch.float64)
    bc1 = 1 - beta1 ** step
    bc2_sqrt = (1 - beta2 ** step).sqrt()
    lr = lr.to(param.device, torch.float64) if torch.is_tensor(lr) else torch.tensor(lr, dtype=torch.float64)
    param.mul_((1 - lr * weight_decay).float())
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / bc2_sqrt.float()).add_(eps)
    param.sub_(exp_avg / denom * (lr / bc1).float())
    if copy is not None:
        copy.copy_(param)


# ----------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------

_AVAILABLE = {
    "reference": lambda d: True,
    "cpu": lambda d: d.type == "cpu" and _native.has_cpu() and _native.has_symbol("adamw_step_cpu"),
    "triton": lambda d: triton_available(d.type),
}
register_op("adamw", _AVAILABLE, default_order={"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")})


def _step_native(param, grad, exp_avg, exp_avg_sq, copy, step, lr, lr_value, beta1, beta2, eps, weight_decay,
                 backend):
    if param.numel() == 0:
        return
    if backend == "triton":
        from omni2sound.kernels import adamw as tk

        # the kernel reads lr from the weight's device
        lr = lr if lr is not None else torch.tensor(lr_value, device=param.device)
        tk.adamw_step(param, grad, exp_avg, exp_avg_sq, copy, step, lr, beta1, beta2, eps, weight_decay)
        return
    P = _native.lib().AdamWParams()
    P.n, P.grad_dtype = param.numel(), _native.dtype_code(grad)
    P.param, P.grad, P.exp_avg, P.exp_avg_sq = param.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), \
        exp_avg_sq.data_ptr()
    P.copy = 0 if copy is None else copy.data_ptr()
    P.lr, P.step = float(lr) if lr is not None else lr_value, float(step)     # fp32 fields: lr rounds as a tensor's
    P.beta1, P.beta2, P.eps, P.weight_decay = beta1, beta2, eps, weight_decay
    _native.lib().adamw_step_cpu(P)


# One custom op per parameter tensor: opaque to torch.compile and to a TorchDispatchMode (bench/_traffic.py counts it
# as the one pass it is). The learning rate is ``lr`` when a tensor holds it, else ``lr_value`` (lr None): a float lr
# costs the C++ kernel no tensor per weight.
@torch.library.custom_op("omni2sound::adamw_step_", mutates_args=("param", "exp_avg", "exp_avg_sq", "copy"))
def _adamw_op(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, copy: Optional[Tensor], step: Tensor,
              lr: Optional[Tensor], lr_value: float, beta1: float, beta2: float, eps: float, weight_decay: float,
              backend: str) -> None:
    _step_native(param, grad, exp_avg, exp_avg_sq, copy, step, lr, lr_value, beta1, beta2, eps, weight_decay,
                 backend)


@_adamw_op.register_fake
def _(param, grad, exp_avg, exp_avg_sq, copy, step, lr, lr_value, beta1, beta2, eps, weight_decay, backend):
    return None


# ----------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------


def _check(param, grad, exp_avg, exp_avg_sq, copy, step) -> None:
    def bad(msg):
        raise OpInputError(f"omni2sound.ops.adamw_step_: {msg}")
    for name, t in (("param", param), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq),
                    ("step", step)):
        if not isinstance(t, Tensor):
            bad(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("param", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.dtype != torch.float32 or not t.is_contiguous():
            bad(f"{name} must be a contiguous float32 tensor, got {t.dtype}"
                + ("" if t.is_contiguous() else " (not contiguous)"))
    if grad.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not grad.is_contiguous():
        bad(f"grad must be a contiguous float32, float16 or bfloat16 tensor, got {grad.dtype}")
    others = [("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)]
    if copy is not None:
        if not isinstance(copy, Tensor) or copy.dtype != torch.bfloat16 or not copy.is_contiguous():
            bad("copy must be a contiguous bfloat16 tensor")
        others.append(("copy", copy))
    for name, t in others:
        if t.shape != param.shape or t.device != param.device:
            bad(f"{name} is {tuple(t.shape)} on {t.device}, param {tuple(param.shape)} on {param.device}")
    if step.numel() != 1:
        bad(f"step must hold one number, got shape {tuple(step.shape)}")


def adamw_step_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, copy: Optional[Tensor],
                step: Tensor, lr: Union[float, Tensor], beta1: float, beta2: float, eps: float,
                weight_decay: float) -> None:
    """One AdamW step of one weight, in place: param (fp32 master), exp_avg, exp_avg_sq and, when given, the bf16
    ``copy`` (= the new param rounded to bf16, bit for bit). step: the step count including this step (a one-element
    tensor; on the weight's device for the Triton kernel, which reads it there, as it reads a tensor lr)."""
    _check(param, grad, exp_avg, exp_avg_sq, copy, step)
    for name, x in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= x < 1.0:
            raise OpInputError(f"omni2sound.ops.adamw_step_: {name} must be in [0, 1), got {x}")
    if not (eps > 0 and math.isfinite(eps)):
        raise OpInputError(f"omni2sound.ops.adamw_step_: eps must be positive, got {eps}")
    backend = select_backend("adamw", param.device)
    if backend == "reference":
        adamw_step_reference(param, grad, exp_avg, exp_avg_sq, copy, step, lr, beta1, beta2, eps, weight_decay)
        return
    lr_t, lr_value = (lr, 0.0) if torch.is_tensor(lr) else (None, float(lr))
    _adamw_op(param, grad, exp_avg, exp_avg_sq, copy, step, lr_t, lr_value, float(beta1), float(beta2), float(eps),
              float(weight_decay), backend)
