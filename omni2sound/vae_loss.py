"""The audio VAE's training loss (the trainer's ``vae`` stage and ``vae_train.train_vae`` call it).

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

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .vae import AudioVAE


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
