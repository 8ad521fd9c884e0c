"""Adversarial training of the audio VAE: a multi-resolution complex-STFT discriminator, hinge losses and feature
matching (after EnCodec's MS-STFT discriminator, Defossez et al. 2022, with DAC's loss ratios, Kumar et al. 2023).

    D_k(x)   conv2d stack over the complex STFT of x at FFT size n_k (real and imaginary parts as 2 channels,
             [B, 2, frames, bins]), k over ``VAEConfig.disc_ffts``; hop n_k / 4, Hann window
    L_D      = mean_k [ mean relu(1 - D_k(x)) + mean relu(1 + D_k(x_hat)) ]        hinge, x_hat detached
    L_adv    = mean_k mean relu(1 - D_k(x_hat))                                    generator hinge
    L_fm     = mean_{k, l} mean |f_kl(x) - f_kl(x_hat)| / mean |f_kl(x)|          feature matching, layer by layer
    loss     = recon (vae_loss) + L_D + [step >= disc_start] (adv_weight L_adv + fm_weight L_fm)

One backward, one optimiser. The generator's terms go through the discriminator with its parameters frozen
(``requires_grad`` off for that forward), so they move only the VAE; ``L_D`` sees detached reconstructions, so it
moves only the discriminator. The sum therefore hands each set of parameters exactly its own GAN gradient, and the
generic ``Trainer`` (one optimiser, DDP, EMA, atomic checkpoints, exact resume) runs it unchanged. Two things differ
from codec recipes with two optimisers: both share AdamW's settings, and gradient clipping is over the joint norm.
The discriminator trains from step 0, so it is not random when the generator's terms switch on at ``disc_start``.
"""
from __future__ import annotations

import contextlib
import os
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.parametrizations import weight_norm

from .vae import AudioVAE
from .vae_loss import _weight, vae_loss_terms

DISC_WEIGHTS_NAME = "discriminator.safetensors"
Scores = List[Tuple[Tensor, List[Tensor]]]          # per resolution: (logits [B, 1, frames, bins'], features)


class STFTDiscriminator(nn.Module):
    """One resolution: [B, 1, N] waveform -> (logits, per-layer features) over its complex STFT."""

    def __init__(self, n_fft: int, channels: int = 32, depth: int = 3):
        super().__init__()
        self.n_fft, self.hop = n_fft, n_fft // 4
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        C = channels
        # time (frames) x frequency (bins) kernels: 9 bins wide, frequency halved per layer, time dilated 1, 2, 4
        layers = [nn.Conv2d(2, C, (3, 9), padding=(1, 4))]
        layers += [nn.Conv2d(C, C, (3, 9), stride=(1, 2), dilation=(2 ** i, 1), padding=(2 ** i, 4))
                   for i in range(depth)]
        layers.append(nn.Conv2d(C, C, (3, 3), padding=(1, 1)))
        self.convs = nn.ModuleList(weight_norm(m) for m in layers)
        self.post = weight_norm(nn.Conv2d(C, 1, (3, 3), padding=(1, 1)))

    def forward(self, wav: Tensor) -> Tuple[Tensor, List[Tensor]]:
        if wav.shape[-1] <= self.n_fft // 2:
            raise ValueError(f"STFTDiscriminator(n_fft={self.n_fft}): needs more than {self.n_fft // 2} samples "
                             f"(reflect padding), got {wav.shape[-1]}; use smaller VAEConfig.disc_ffts or longer crops")
        # the STFT in fp32 (no half-precision FFT on every backend); the convs follow autocast
        with torch.autocast(wav.device.type, enabled=False):
            spec = torch.stft(wav[:, 0].float(), self.n_fft, self.hop, window=self.window.float(), center=True,
                              normalized=True, return_complex=True)                       # [B, bins, frames]
        h = torch.view_as_real(spec).permute(0, 3, 2, 1)                                  # [B, 2, frames, bins]
        feats = []
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.2)
            feats.append(h)
        return self.post(h), feats


class MultiResolutionSTFTDiscriminator(nn.Module):
    def __init__(self, ffts: Sequence[int] = (2048, 1024, 512), channels: int = 32):
        super().__init__()
        self.discs = nn.ModuleList(STFTDiscriminator(n, channels) for n in ffts)

    @classmethod
    def for_vae(cls, vae: AudioVAE) -> "MultiResolutionSTFTDiscriminator":
        return cls(vae.config.disc_ffts, vae.config.disc_channels)

    def forward(self, wav: Tensor) -> Scores:
        if wav.dim() == 2:
            wav = wav[:, None]
        return [d(wav) for d in self.discs]


# ----------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------
def discriminator_hinge_loss(real: Scores, fake: Scores) -> Tensor:
    return sum(F.relu(1 - r).mean() + F.relu(1 + f).mean() for (r, _), (f, _) in zip(real, fake)) / len(real)


def generator_hinge_loss(fake: Scores) -> Tensor:
    return sum(F.relu(1 - f).mean() for f, _ in fake) / len(fake)


def feature_matching_loss(real: Scores, fake: Scores) -> Tensor:
    """Relative L1 between the discriminator's features of real and reconstructed audio (real side detached)."""
    terms = [(fr.detach() - ff).abs().mean() / fr.detach().abs().mean().clamp_min(1e-8)
             for (_, real_feats), (_, fake_feats) in zip(real, fake) for fr, ff in zip(real_feats, fake_feats)]
    return sum(terms) / len(terms)


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Parameters without gradients inside the block (inputs still get theirs), restored after."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


# ----------------------------------------------------------------------------------------------------
# The training module: VAE + discriminator, one forward = the whole loss
# ----------------------------------------------------------------------------------------------------
class VAEGAN(nn.Module):
    """The VAE and its discriminator as one module for the trainer: ``forward(wav, step)`` -> (loss, logs).

    logs: loss (what is optimised), recon (the VAE's own loss, comparable with non-adversarial runs), the VAE
    loss's terms, d_loss, and adv / fm from ``disc_start`` on. Saving: ``vae.save_pretrained(dir)`` for the
    VAE, ``save_discriminator(disc, dir)`` to continue adversarial training later.
    """

    def __init__(self, vae: AudioVAE, disc: Optional[MultiResolutionSTFTDiscriminator] = None):
        super().__init__()
        self.vae = vae
        self.disc = disc if disc is not None else MultiResolutionSTFTDiscriminator.for_vae(vae)

    def forward(self, wav: Tensor, step: int = 0, cfg=None, generator: Optional[torch.Generator] = None
                ) -> Tuple[Tensor, dict]:
        recon_loss, logs, recon = vae_loss_terms(self.vae, wav, cfg, generator)
        wav = wav if wav.dim() == 3 else wav[:, None]
        real = self.disc(wav)
        d_loss = discriminator_hinge_loss(real, self.disc(recon.detach()))
        loss = recon_loss + d_loss
        logs.update(recon=logs["loss"], d_loss=float(d_loss.detach()))
        w_adv, w_fm = _weight(cfg, self.vae, "adv_weight"), _weight(cfg, self.vae, "fm_weight")
        if step >= _weight(cfg, self.vae, "disc_start") and (w_adv or w_fm):
            with frozen(self.disc):
                fake = self.disc(recon)
            adv, fm = generator_hinge_loss(fake), feature_matching_loss(real, fake)
            loss = loss + w_adv * adv + w_fm * fm
            logs.update(adv=float(adv.detach()), fm=float(fm.detach()))
        logs["loss"] = float(loss.detach())
        return loss, logs


def save_discriminator(disc: nn.Module, directory: str) -> str:
    from safetensors.torch import save_file

    from .files import atomic_write
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, DISC_WEIGHTS_NAME)
    state = {k: v.detach().contiguous().cpu() for k, v in disc.state_dict().items()}
    atomic_write(path, lambda p: save_file(state, p))
    return path


def load_discriminator(directory: str, vae: AudioVAE) -> MultiResolutionSTFTDiscriminator:
    """The discriminator saved beside a VAE (its shape from the VAE's config); every tensor's name and shape checked."""
    from .files import load_safetensors
    path = os.path.join(directory, DISC_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_discriminator: missing {path}")
    disc = MultiResolutionSTFTDiscriminator.for_vae(vae)
    state, expected = load_safetensors(path), disc.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    bad = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or bad:
        raise ValueError(f"{path}: does not match the VAE config's discriminator (disc_ffts "
                         f"{vae.config.disc_ffts}, disc_channels {vae.config.disc_channels}): missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}, wrong shape {bad[:4]}")
    disc.load_state_dict(state)
    return disc


__all__ = ["STFTDiscriminator", "MultiResolutionSTFTDiscriminator", "VAEGAN", "discriminator_hinge_loss",
           "generator_hinge_loss", "feature_matching_loss", "save_discriminator", "load_discriminator",
           "DISC_WEIGHTS_NAME"]
