"""Rectified flow (flow matching with straight paths) for the Omni2Sound DiT.

TIME CONVENTION (the only one in this package):
    t in [0, 1];  t = 0 is pure noise x0 ~ N(0, I),  t = 1 is data x1 (audio latents [B, T, C]).
    x_t = (1 - t) * x0 + t * x1,        target velocity  v = dx_t/dt = x1 - x0.
    Training samples t logit-normally: t = sigmoid(m + s * n), n ~ N(0, 1) (SD3 / MMAudio).
    Sampling integrates dx/dt = v(x, t) from t = 0 to t = 1 on a uniform grid (Euler or Heun).

Classifier-free guidance is ONE batched forward per step. Joint (the paper): batch [cond, uncond],
    v = v_u + s * (v_c - v_u).
Separate video and text scales (beyond the paper): batch [cond, video-only (text dropped), uncond],
    v = v_u + s_v * (v_v - v_u) + s_t * (v_c - v_v),
i.e. s_v scales what the video adds to nothing and s_t what the text adds on top of the video
(InstructPix2Pix's two-scale form). With s_v = s_t = s it is the joint formula exactly. For a request
without video, v_v = v_u and only s_t acts; without text, v_c = v_v and only s_v acts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .conditions import Conditions

Guidance = Union[float, Tuple[float, float]]   # joint scale, or (video scale, text scale)
VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (x [B, T, C], t [B]) -> v [B, T, C]


@dataclass
class FlowConfig:
    logit_mean: float = 0.0
    logit_std: float = 1.0
    steps: int = 25
    method: str = "euler"            # "euler" | "heun"
    time_bins: int = 4               # per-time-bin loss logging (minRF)


def guidance_scales(guidance: Optional[Guidance]) -> Optional[Tuple[float, float]]:
    """None / <= 0 ... 1 handled by the caller; returns (s_v, s_t) or None for no guidance."""
    if guidance is None:
        return None
    if isinstance(guidance, (tuple, list)):
        if len(guidance) != 2:
            raise ValueError(f"guidance must be a float or (video_scale, text_scale), got {guidance!r}")
        return float(guidance[0]), float(guidance[1])
    return float(guidance), float(guidance)


def cfg_branches(cond: Conditions, scales: Optional[Tuple[float, float]]) -> List[Conditions]:
    """The CFG branches in combine_guidance's order: [cond], [cond, uncond] or [cond, video-only, uncond]."""
    if scales is None or scales == (1.0, 1.0):
        return [cond]
    no = torch.zeros(cond.batch_size, dtype=torch.bool)
    uncond = cond.drop(keep_text=no, keep_video=no)
    if scales[0] == scales[1]:
        return [cond, uncond]
    return [cond, cond.drop(keep_text=no), uncond]


def cfg_forwards(cond: Conditions, scales: Optional[Tuple[float, float]], batched: bool = True
                 ) -> List[Tuple[Conditions, int]]:
    """The forward passes of one guided step, as (conditions, n): n CFG branches of ``cfg_branches`` stacked in one
    batch (batched: one forward over all of them) or one forward per branch (n = 1 each)."""
    branches = cfg_branches(cond, scales)
    if not batched:
        return [(c, 1) for c in branches]
    return [(cond if len(branches) == 1 else Conditions.cat(branches), len(branches))]


def cfg_conditions(cond: Conditions, scales: Optional[Tuple[float, float]]) -> Tuple[Conditions, int]:
    """The conditions of the CFG batch and how many copies of the latent it needs (1, 2 or 3)."""
    return cfg_forwards(cond, scales)[0]


def combine_guidance(v: Tensor, k: int, scales: Optional[Tuple[float, float]]) -> Tensor:
    """v [k * B, T, C] from the CFG batch -> guided velocity [B, T, C] (formulas at the top)."""
    if k == 1:
        return v
    if k == 2:
        v_c, v_u = v.chunk(2)
        return v_u + scales[0] * (v_c - v_u)
    v_c, v_v, v_u = v.chunk(3)
    return v_u + scales[0] * (v_v - v_u) + scales[1] * (v_c - v_v)


def guided_velocity(predict: Callable[[Tensor, Tensor, Any], Tensor], x: Tensor, t: Tensor,
                    forwards: Sequence[Tuple[Any, int]], scales: Optional[Tuple[float, float]]) -> Tensor:
    """The classifier-free-guided velocity [B, T, C] of the latent x [B, T, C] at times t [B].

    The one implementation of guidance: ``FlowMatching.sample``, the pipeline's eager step and its CUDA-graph step
    all call it. forwards: the step's forward passes as (conditions, n), in ``cfg_forwards``' order, each over n CFG
    branches stacked in its batch (n copies of x); the conditions are whatever ``predict`` reads (a DiT's
    PreparedConditions, or Conditions for a model's plain forward). predict(x [n B, T, C], t [n B], conditions)
    -> v [n B, T, C].
    """
    vs = [predict(x.repeat(n, 1, 1) if n > 1 else x, t.repeat(n) if n > 1 else t, c) for c, n in forwards]
    v = vs[0] if len(vs) == 1 else torch.cat(vs)                                       # [k B, T, C]
    return combine_guidance(v, sum(n for _, n in forwards), scales)


def time_grid(steps: int, device=None) -> Tensor:
    """[steps + 1] uniform times from 0 (noise) to 1 (data)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(0.0, 1.0, steps + 1, device=device)


def integrate(velocity: VelocityFn, x0: Tensor, steps: int, method: str = "euler") -> Tensor:
    """Solve dx/dt = velocity(x, t) from t = 0 to 1. The loop never reads a device value on the host:
    times are device tensors indexed by Python ints and step sizes are Python floats."""
    if method not in ("euler", "heun"):
        raise ValueError(f"unknown sampler {method!r}; choose 'euler' or 'heun'")
    ts = time_grid(steps, x0.device).to(x0.dtype)
    dt = 1.0 / steps
    B = x0.shape[0]
    x = x0
    for i in range(steps):
        t = ts[i].expand(B)
        v = velocity(x, t)
        if method == "euler":
            x = x + dt * v
        else:  # Heun: trapezoid of the slopes at both ends of the step
            x_pred = x + dt * v
            v2 = velocity(x_pred, ts[i + 1].expand(B))
            x = x + (0.5 * dt) * (v + v2)
    return x


class FlowMatching:
    """Rectified-flow training loss and samplers (convention at the top of this file)."""

    def __init__(self, config: Optional[FlowConfig] = None):
        self.config = config or FlowConfig()

    # -- training ----------------------------------------------------------------------------------
    def sample_t(self, batch: int, device=None, generator: Optional[torch.Generator] = None) -> Tensor:
        """Logit-normal t [B] in (0, 1) (drawn on the generator's device, then moved)."""
        gdev = generator.device if generator is not None else device
        n = torch.randn(batch, generator=generator, device=gdev)
        return torch.sigmoid(self.config.logit_mean + self.config.logit_std * n).to(device)

    def draw(self, x1: Tensor, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        """The step's random draws: noise x0 [B, T, C] like x1 and times t [B] (logit-normal), on x1's device."""
        gdev = generator.device if generator is not None else x1.device
        x0 = torch.randn(x1.shape, generator=generator, device=gdev, dtype=x1.dtype).to(x1.device)
        return x0, self.sample_t(x1.shape[0], x1.device, generator).to(x1.dtype)

    def loss(self, model, x1: Tensor, cond: Conditions, generator: Optional[torch.Generator] = None,
             frame_mask: Optional[Tensor] = None, draws: Optional[Tuple[Tensor, Tensor]] = None
             ) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Mean squared velocity error; x1 [B, T, C] clean latents, frame_mask [B, T] (True = real frame).
        draws: (x0, t) from draw(), made by the caller (a CUDA-graph replay draws outside the graph); None: drawn
        here from ``generator``.

        Returns (loss, logs): logs hold detached 0-d tensors (no host sync here): ``loss`` and
        ``loss_bin{i}`` per time bin i of [i/n, (i+1)/n) (NaN for an empty bin).
        """
        B = x1.shape[0]
        x0, t = draws if draws is not None else self.draw(x1, generator)              # [B, T, C], [B]
        tb = t.view(B, 1, 1)
        x_t = (1 - tb) * x0 + tb * x1
        v = model(x_t, t, cond)                                                          # [B, T, C]
        err = (v.float() - (x1 - x0).float()).pow(2).mean(-1)                            # [B, T]
        if frame_mask is not None:
            m = frame_mask.to(err.dtype)
            per_sample = (err * m).sum(1) / m.sum(1).clamp(min=1)
        else:
            per_sample = err.mean(1)                                                     # [B]
        loss = per_sample.mean()
        logs = {"loss": loss.detach()}
        n = self.config.time_bins
        bins = (t.detach().float() * n).long().clamp(max=n - 1)
        for i in range(n):
            sel = (bins == i).float()
            logs[f"loss_bin{i}"] = (per_sample.detach() * sel).sum() / sel.sum()
        return loss, logs

    # -- sampling ----------------------------------------------------------------------------------
    def noise(self, batch: int, num_frames: int, channels: int, seed: Optional[int] = None,
              generator: Optional[torch.Generator] = None, device=None, dtype=torch.float32) -> Tensor:
        """x0 [B, T, C]; drawn on the CPU so a seed gives the same noise on every device."""
        if generator is None:
            generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
        x0 = torch.randn(batch, num_frames, channels, generator=generator, device=generator.device)
        return x0.to(device=device, dtype=dtype)

    def velocity_fn(self, model, cond: Conditions, num_frames: int, guidance: Optional[Guidance],
                    plain: bool = False) -> VelocityFn:
        """The per-step function (x, t) -> guided velocity of ``model`` under ``cond`` (``guided_velocity``).

        Optimised (default): the conditions of the whole CFG batch are prepared ONCE and every step is one
        batched forward. Plain (for benchmarks and equality tests): every step recomputes the conditions
        and runs one forward per CFG branch in sequence.
        """
        scales = guidance_scales(guidance)
        if plain:
            forwards = cfg_forwards(cond, scales, batched=False)
            return lambda x, t: guided_velocity(model, x, t, forwards, scales)
        forwards = [(model.prepare_conditions(c, num_frames, sampling=True), n)
                    for c, n in cfg_forwards(cond, scales)]
        return lambda x, t: guided_velocity(model.predict_velocity, x, t, forwards, scales)

    @torch.no_grad()
    def sample(self, model, cond: Conditions, num_frames: int, steps: Optional[int] = None,
               method: Optional[str] = None, guidance: Optional[Guidance] = 4.5, x0: Optional[Tensor] = None,
               seed: Optional[int] = None, plain: bool = False) -> Tensor:
        """Generate latents [B, T, C] from noise (x0 or a seeded draw) under ``cond``."""
        if x0 is None:
            x0 = self.noise(cond.batch_size, num_frames, model.config.latent_dim, seed=seed,
                            device=model.device, dtype=model.dtype)
        if x0.shape[:2] != (cond.batch_size, num_frames):
            raise ValueError(f"x0 must be [B={cond.batch_size}, T={num_frames}, C], got {tuple(x0.shape)}")
        fn = self.velocity_fn(model, cond, num_frames, guidance, plain=plain)
        return integrate(fn, x0, steps or self.config.steps, method or self.config.method)


def per_bin_means(logs: Sequence[Dict[str, Tensor]], bins: int) -> Dict[str, float]:
    """Average per-time-bin losses over many logged steps, ignoring empty bins (for reports)."""
    out = {}
    for i in range(bins):
        vals = [float(d[f"loss_bin{i}"]) for d in logs if torch.isfinite(d[f"loss_bin{i}"])]
        out[f"loss_bin{i}"] = sum(vals) / len(vals) if vals else float("nan")
    return out
