"""Training the audio VAE: the loss the trainer's ``vae`` stage calls, and a compact standalone loop.

    loss = l1_weight * |x - x_hat|_1 + stft_weight * MRSTFT(x, x_hat) + log_stft_weight * LogSTFT(x, x_hat)
           + frame_weight * FrameMSE(head log-magnitudes, log |STFT(x)|) + kl_weight * KL(q(z|x) || N(0, I)) / (C T)

MRSTFT (after Yamamoto et al., Parallel WaveGAN) sums, over FFT sizes n (hop n/4, Hann window), spectral
convergence || |X| - |X_hat| ||_F / || |X| ||_F and an L1 of magnitudes relative to the mean target magnitude
(linear, not log: see ``multi_resolution_stft_loss``). The waveform L1 pins the phase, the STFT term the spectrum;
the KL keeps the latent near N(0, I) so the DiT sees a well-scaled space. The adversarial terms (a multi-resolution
STFT discriminator, hinge + feature matching) are ``omni2sound.vae_gan``'s, on when ``VAEConfig.adv_weight`` or
``fm_weight`` is > 0 (the paper preset; the toy and tiny presets train without them).
"""
from __future__ import annotations

import math
import time
from typing import Iterable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from omni2sound.trainer import fused_adamw_ok
from omni2sound.vae import AudioVAE


def stft_magnitude(wav: Tensor, n_fft: int) -> Tensor:
    """wav [B, N] -> |STFT| [B, n_fft/2 + 1, frames] with hop n_fft/4 and a Hann window."""
    wav = wav.float()               # losses in fp32 (cuFFT has no bf16 transform; autocast leaves stft alone)
    window = torch.hann_window(n_fft, device=wav.device, dtype=wav.dtype)
    spec = torch.stft(wav, n_fft, hop_length=n_fft // 4, window=window, center=True, return_complex=True)
    return torch.view_as_real(spec).pow(2).sum(-1).clamp_min(1e-14).sqrt()   # |.| with a finite gradient at 0


def _magnitude_pairs(x: Tensor, x_hat: Tensor, sizes):
    """Per FFT size (never longer than the clip): (n, |STFT(x)|, |STFT(x_hat)|). x, x_hat [B, N] or [B, 1, N]."""
    x, x_hat = x.reshape(x.shape[0], -1).float(), x_hat.reshape(x_hat.shape[0], -1).float()
    for n in sizes:
        n = min(n, 1 << (x.shape[-1].bit_length() - 1))
        yield n, stft_magnitude(x, n), stft_magnitude(x_hat, n)


def stft_losses(x: Tensor, x_hat: Tensor, sizes=(2048, 1024, 512, 256, 128), floor_db: float = -80.0,
                log: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    """(linear MRSTFT, log-STFT L1 or None) from one STFT per size and signal; see the two functions below."""
    lin_total, log_total = x.new_zeros((), dtype=torch.float32), x.new_zeros((), dtype=torch.float32)
    for n, mag, mag_hat in _magnitude_pairs(x, x_hat, sizes):
        sc = torch.linalg.vector_norm(mag - mag_hat) / torch.linalg.vector_norm(mag).clamp_min(1e-7)
        lin_total = lin_total + sc + (mag - mag_hat).abs().mean() / mag.mean().clamp_min(1e-7)
        if log:
            eps = (n / 4) * 10 ** (floor_db / 20)                 # n / 4: a full-scale sine's peak bin (Hann)
            log_total = log_total + (torch.log(mag + eps) - torch.log(mag_hat + eps)).abs().mean()
    return lin_total / len(sizes), (log_total / len(sizes) if log else None)


def multi_resolution_stft_loss(x: Tensor, x_hat: Tensor, sizes=(2048, 1024, 512, 256, 128)) -> Tensor:
    """Mean over FFT sizes of spectral convergence + relative linear-magnitude L1. x, x_hat [B, N] (or [B, 1, N]).

    Linear, not log, magnitudes: tonal targets are sparse (a few partials over a floor), and an L1 of log
    magnitudes is then lowest for a near-silent output until every partial is placed, which stalled training in a
    silent, input-independent output (measured: the tiny preset never left it in 150 steps; with this loss it
    recovers the pitch of all 8 clips of a fixed batch within 50 steps).
    """
    return stft_losses(x, x_hat, sizes, log=False)[0]


def log_stft_loss(x: Tensor, x_hat: Tensor, sizes=(2048, 1024, 512, 256, 128), floor_db: float = -80.0) -> Tensor:
    """Mean over FFT sizes of the L1 distance of log magnitudes, each floored at ``floor_db`` re full scale.

    The linear terms of ``multi_resolution_stft_loss`` weigh bins by energy, so quiet or short sounds (a 30 ms knock
    next to a continuous hum) get almost no gradient; the log term weighs every audible bin alike. The floor keeps
    the inaudible noise floor from dominating it. Used with the STFT head (``VAEConfig.log_stft_weight``), whose
    log-magnitude output never stalls at silence the way a waveform decoder does.
    """
    return stft_losses(x, x_hat, sizes, floor_db)[1]


def frame_loss(vae: AudioVAE, wav: Tensor, frames: Tensor, floor_db: float = -80.0) -> Tensor:
    """STFT head only: mean squared error between the head's log magnitudes and the input's, at the head's own
    resolution (n_fft, stft_hop), the target floored at ``floor_db`` re full scale.

    Squared, not absolute: for a bin that sounds in few frames (a 30 ms knock in a 0.3 s crop) the L1-optimal
    output is its median, silence, and an L1-trained toy VAE stayed there (measured: the woodblock class at
    -56 dB after 600 steps); the mean-seeking MSE reproduces it within ~50 steps. A direct, per-bin target also
    keeps every bin's gradient alive where the waveform losses see a silent output and pass none back.
    wav [B, 1, N] (N a multiple of the hop), frames [B, 2 n_bins, N / stft_hop] from ``Decoder.frames``.
    """
    head, front = vae.decoder.synth, vae.encoder.stft
    pad = frames.shape[-1] * head.hop - wav.shape[-1]
    target = front.magnitude(F.pad(wav, (0, pad)) if pad > 0 else wav)                   # [B, n_bins, F]
    target = torch.log(target.clamp_min(10 ** (floor_db / 20)))
    return (head.log_magnitude(frames) - target).pow(2).mean()


def _weight(cfg, vae: AudioVAE, name: str):
    if cfg is None:
        return getattr(vae.config, name)
    if isinstance(cfg, dict):
        return cfg.get(name, getattr(vae.config, name))
    return getattr(cfg, name, getattr(vae.config, name))


def vae_loss(vae: AudioVAE, wav: Tensor, cfg=None, generator: Optional[torch.Generator] = None
             ) -> Tuple[Tensor, dict]:
    """The VAE training loss for a waveform batch (reconstruction + KL; the adversarial terms are
    ``omni2sound.vae_gan.VAEGAN``'s).

    wav: [B, 1, N] or [B, N] at ``vae.sample_rate``. cfg: None (use ``vae.config``), or any object or dict with
    some of ``l1_weight``, ``stft_weight``, ``log_stft_weight``, ``kl_weight``, ``stft_sizes`` (missing ones come
    from vae.config). Returns (loss, logs) with logs of python floats: loss, l1, stft, kl (per latent element) and
    log_stft / frame when their weights are not 0 (frame: the stft head only).
    """
    loss, logs, _ = vae_loss_terms(vae, wav, cfg, generator)
    return loss, logs


def vae_loss_terms(vae: AudioVAE, wav: Tensor, cfg=None, generator: Optional[torch.Generator] = None
                   ) -> Tuple[Tensor, dict, Tensor]:
    """``vae_loss`` and the reconstruction it was computed from ([B, 1, N], cut to the input's length)."""
    if wav.dim() == 2:
        wav = wav[:, None]
    if wav.dim() != 3 or wav.shape[1] != 1:
        raise ValueError(f"vae_loss: wav must be [B, 1, N] or [B, N], got shape {tuple(wav.shape)}")
    inner = getattr(vae, "module", vae)                         # DDP-wrapped: call the wrapper, read the model
    w_frame = _weight(cfg, inner, "frame_weight") if inner.config.head == "stft" else 0.0
    recon, post, frames = vae(wav, generator=generator, return_frames=True)   # recon [B, 1, ceil(N/hop)*hop]
    recon = recon[..., :wav.shape[-1]]
    l1 = (recon - wav).abs().mean()
    w_log = _weight(cfg, inner, "log_stft_weight")
    stft, log_stft = stft_losses(wav, recon, _weight(cfg, inner, "stft_sizes"), log=bool(w_log))
    kl = post.kl().mean() / (post.mean.shape[1] * post.mean.shape[2])
    loss = _weight(cfg, inner, "l1_weight") * l1 + _weight(cfg, inner, "stft_weight") * stft \
        + _weight(cfg, inner, "kl_weight") * kl
    logs = {"loss": 0.0, "l1": float(l1.detach()), "stft": float(stft.detach()), "kl": float(kl.detach())}
    if w_log:
        loss = loss + w_log * log_stft
        logs["log_stft"] = float(log_stft.detach())
    if w_frame:
        frame = frame_loss(inner, wav, frames)
        loss = loss + w_frame * frame
        logs["frame"] = float(frame.detach())
    logs["loss"] = float(loss.detach())
    return loss, logs, recon


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
    from omni2sound.vae_gan import VAEGAN, save_discriminator

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
