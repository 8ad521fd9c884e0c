"""Training the audio VAE outside the main job: synthetic tones for tests and smoke runs, and a compact standalone
loop over ``vae_loss`` (the trainer's ``vae`` stage runs the same loss in ``omni2sound.schedule``).
"""
from __future__ import annotations

import math
import time
from typing import Iterable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from .device import fused_adamw_ok
from .vae import AudioVAE
from .vae_gan import VAEGAN, save_discriminator
from .vae_loss import vae_loss


def synthetic_tones(batch: int, num_samples: int, sample_rate: int = 16000,
                    generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """Simple tonal sounds for tests and smoke runs: (wav [B, 1, N], f0 [B] in Hz).

    Half sustained harmonic tones (f0 in 150-1200 Hz, partials 1-3 at 1, 1/2, 1/4), half percussive ones (the same
    with an exponential decay of 40-300 ms from an onset in the first half); peak 0.2-0.8.
    """
    g = generator
    t = torch.arange(num_samples) / sample_rate                                      # [N]
    f0 = 150.0 * torch.exp(torch.rand(batch, generator=g) * math.log(1200 / 150))   # log-uniform [B]
    phase = torch.rand(batch, 3, generator=g) * 2 * math.pi
    wav = torch.zeros(batch, num_samples)
    for h, amp in enumerate((1.0, 0.5, 0.25)):
        wav += amp * torch.sin(2 * math.pi * (h + 1) * f0[:, None] * t + phase[:, h:h + 1])
    percussive = torch.rand(batch, generator=g) < 0.5
    onset = torch.rand(batch, generator=g) * 0.5 * t[-1]
    decay = 0.04 + 0.26 * torch.rand(batch, generator=g)
    dt = (t[None] - onset[:, None]).clamp_min(0)
    env = torch.where(t[None] >= onset[:, None], torch.exp(-dt / decay[:, None]), torch.zeros(()))
    wav = torch.where(percussive[:, None], wav * env, wav)
    peak = 0.2 + 0.6 * torch.rand(batch, generator=g)
    wav = wav / wav.abs().amax(-1, keepdim=True).clamp_min(1e-6) * peak[:, None]
    return wav[:, None], f0


def train_vae(vae: AudioVAE, batches: Iterable[Tensor], steps: int, lr: float = 1e-3, weight_decay: float = 1e-4,
              out_dir: Optional[str] = None, log_every: int = 50, device: Optional[torch.device] = None,
              seed: int = 0, grad_clip: float = 1.0, log=print) -> List[dict]:
    """AdamW on ``vae_loss`` for ``steps`` batches from ``batches`` (each [B, 1, N] or [B, N]).

    Saves ``out_dir`` with ``save_pretrained`` at the end (training form, weight norm kept; plus the
    discriminator when ``vae.config.adversarial``). Returns the per-step logs (each with ``step`` and
    ``samples_per_s``).
    """
    device = torch.device(device) if device is not None else next(vae.parameters()).device
    vae.to(device).train()
    # with adversarial weights, the VAE and its discriminator train together (one optimiser; see vae_gan)
    model = VAEGAN(vae).to(device).train() if vae.config.adversarial else vae
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.8, 0.99), weight_decay=weight_decay,
                            fused=fused_adamw_ok(next(model.parameters()).device))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))   # short warm-up
    gen = torch.Generator(device=device).manual_seed(seed)
    it: Iterator[Tensor] = iter(batches)
    history: List[dict] = []
    t0 = time.perf_counter()
    for step in range(steps):
        wav = next(it).to(device)
        loss, logs = model(wav, step, generator=gen) if model is not vae else vae_loss(vae, wav, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        elapsed = time.perf_counter() - t0
        logs.update(step=step, samples_per_s=(step + 1) * wav.shape[0] * wav.shape[-1] / max(elapsed, 1e-9))
        history.append(logs)
        if log is not None and log_every and (step % log_every == 0 or step == steps - 1):
            log(f"vae step {step:5d}  loss {logs['loss']:.4f}  l1 {logs['l1']:.4f}  stft {logs['stft']:.4f}  "
                f"kl {logs['kl']:.3f}  {logs['samples_per_s'] / vae.sample_rate:.1f} s audio/s")
    if out_dir is not None:
        vae.save_pretrained(out_dir)
        if model is not vae:
            save_discriminator(model.disc, out_dir)
    return history
