"""The audio VAE: 16 kHz mono waveform <-> latent_dim channels at 25 Hz (Stable Audio "Oobleck" style).

    encoder: conv7 -> [3 residual units (dilation 1, 3, 9) -> Snake -> strided conv (k = 2s)] per stride
             -> Snake -> conv3 -> (mean, logvar)                                  wav [B, 1, N] -> [B, 2C, T]
    decoder: conv7 -> [Snake -> transposed conv (k = 2s) -> 3 residual units] per stride (reversed)
             -> Snake -> conv7                                                    z [B, C, T] -> wav [B, 1, T*hop]
    residual unit: x + conv1(Snake(conv7_dilated(Snake(x))))

Snake is ``x + 1/(beta + eps) * sin^2(alpha * x)`` with per-channel alpha, beta stored as logarithms (they stay
positive while training). Convolutions carry weight norm while training; ``fold_weight_norm()`` folds it into
plain weights for inference (``from_pretrained`` does so by default).

Length rule: ``encode`` right-pads the waveform with zeros to a multiple of ``hop_length`` (640), so
T = ceil(N / hop); ``decode`` returns exactly T * hop samples and the caller trims to N (``reconstruct`` does).

The decoder runs its memory-bound chain through ``omni2sound.ops``: every residual add is fused with the Snake
that follows it (``snake_residual``), see ``Decoder.frames``.

Two heads (``VAEConfig.head``):
  - ``"waveform"`` (the paper's / Oobleck's): the conv stack runs down from the waveform itself.
  - ``"stft"`` (after Vocos / iSTFTNet): the same Snake conv stack runs at the STFT frame rate (``stft_hop``
    samples per frame). The encoder reads normalised log-magnitudes; the decoder writes a log-magnitude and a
    phase per bin and an inverse STFT (overlap-add, Hann) makes the waveform, so hop = stft_hop * prod(strides).
    Why: a waveform decoder must learn to synthesise every partial's oscillation sample by sample, and a small
    one trained for minutes on a CPU only learns the loudest low band (measured on the toy world: 4 of 5 classes
    at -40 to -70 dB after 1500 steps); with one output channel per frequency bin every band is one linear map
    away, and the toy preset, trained with ``vae_loss.frame_loss``, reconstructs every class (the toy oracle
    hears all events in its reconstructions after 1000-1500 steps x 16 crops; see bench/RESULTS.md).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from . import ops
from .cuda_graphs import warm_up_on_side_stream
from .files import atomic_write, load_safetensors, read_config, safetensors_metadata
from .vae_forms import (
    conv_channels_last,
    conv_transpose_channels_last,
    decodes_channels_last,
    dilated_conv_form,
    out_conv,
)

CONFIG_NAME = "config.json"
RESIDUAL_GAIN = 0.1   # init scale of each residual branch's output conv (see _wn)
LOGVAR_INIT = -8.0    # init of the posterior's log-variance (see Encoder)
WEIGHTS_NAME = "model.safetensors"


@dataclass
class VAEConfig:
    sample_rate: int = 16000
    channels: int = 64                                   # width at the waveform rate
    channel_mults: Tuple[int, ...] = (1, 2, 4, 8, 16)    # width multiplier per stage, len(strides) + 1
    strides: Tuple[int, ...] = (2, 4, 8, 10)             # encoder order (waveform -> latent); product = hop
    latent_dim: int = 64
    dilations: Tuple[int, ...] = (1, 3, 9)
    kernel_size: int = 7
    snake_eps: float = 1e-9
    kl_weight: float = 1e-4                              # read by vae_loss.vae_loss
    stft_weight: float = 1.0
    l1_weight: float = 1.0
    stft_sizes: Tuple[int, ...] = (2048, 1024, 512, 256, 128)
    log_stft_weight: float = 0.0                         # L1 of log magnitudes (vae_loss.log_stft_loss)
    frame_weight: float = 0.0                            # stft head: MSE of its log magnitudes (vae_loss.frame_loss)
    head: str = "waveform"                               # "waveform" | "stft" (see the module docstring)
    n_fft: int = 320                                     # stft head only: window = FFT size (20 ms)
    stft_hop: int = 80                                   # stft head only: samples per frame (5 ms)
    # Adversarial training (omni2sound.vae_gan; off when adv_weight is 0): a multi-resolution complex-STFT
    # discriminator, hinge losses, feature matching. The discriminator trains from step 0; the generator's
    # adversarial and feature-matching terms start at disc_start (the autoencoder first learns the coarse signal).
    adv_weight: float = 0.0
    fm_weight: float = 0.0
    disc_start: int = 0
    disc_channels: int = 32
    disc_ffts: Tuple[int, ...] = (2048, 1024, 512)

    def __post_init__(self):
        self.channel_mults = tuple(self.channel_mults)
        self.strides = tuple(self.strides)
        self.dilations = tuple(self.dilations)
        self.stft_sizes = tuple(self.stft_sizes)
        self.disc_ffts = tuple(self.disc_ffts)
        if self.adv_weight < 0 or self.fm_weight < 0 or self.disc_start < 0:
            raise ValueError(f"VAEConfig: adv_weight, fm_weight and disc_start must be >= 0, got {self.adv_weight}, "
                             f"{self.fm_weight}, {self.disc_start}")
        if self.adversarial and (not self.disc_ffts or any(n < 16 or n % 2 for n in self.disc_ffts)
                                 or self.disc_channels < 1):
            raise ValueError(f"VAEConfig: the discriminator needs even disc_ffts >= 16 and disc_channels >= 1, got "
                             f"{self.disc_ffts}, {self.disc_channels}")
        if len(self.channel_mults) != len(self.strides) + 1:
            raise ValueError(f"VAEConfig: channel_mults needs len(strides) + 1 = {len(self.strides) + 1} entries, "
                             f"got {self.channel_mults}")
        if any(s < 2 or s % 2 for s in self.strides):
            # k = 2s, padding s/2 makes every stage scale the length by exactly s only for even strides.
            raise ValueError(f"VAEConfig: strides must be even and >= 2, got {self.strides}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"VAEConfig: kernel_size must be odd (same-length convs), got {self.kernel_size}")
        if self.head not in ("waveform", "stft"):
            raise ValueError(f"VAEConfig: head must be 'waveform' or 'stft', got {self.head!r}")
        if self.head == "stft" and not (self.stft_hop >= 1 and self.n_fft % 2 == 0 and self.n_fft >= 2 * self.stft_hop):
            # Hann overlap-add covers every sample (istft's window-envelope check) only with >= 50% overlap.
            raise ValueError(f"VAEConfig: the stft head needs an even n_fft >= 2 * stft_hop, got n_fft "
                             f"{self.n_fft}, stft_hop {self.stft_hop}")
        if self.head == "stft" and self.hop_length % self.n_fft:
            # The synthesis phase reference advances by 2 pi k hop_length / n_fft per latent frame: a whole number
            # of turns, so a chunk that starts on any latent frame has the whole decode's phases.
            raise ValueError(f"VAEConfig: the stft head needs n_fft to divide the hop ({self.hop_length}), got "
                             f"n_fft {self.n_fft}")

    @property
    def adversarial(self) -> bool:
        """Whether training uses the discriminator (omni2sound.vae_gan)."""
        return self.adv_weight > 0 or self.fm_weight > 0

    @property
    def frame_hop(self) -> int:
        """Samples per step of the conv stack's finest rate: 1 (waveform head) or stft_hop."""
        return self.stft_hop if self.head == "stft" else 1

    @property
    def n_bins(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def hop_length(self) -> int:
        return math.prod(self.strides) * self.frame_hop

    @property
    def latent_rate(self) -> float:
        return self.sample_rate / self.hop_length

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"VAEConfig: unknown fields {sorted(unknown)} (known: {sorted(known)})")
        return cls(**d)


VAE_PRESETS: Dict[str, VAEConfig] = {
    # 16 kHz, 64 x 25 Hz (hop 640 = 2*4*8*10), widths 64..1024: the paper's latent space. Adversarial weights
    # follow DAC's ratios to its spectral term (mel 15 : adv 1 : feature matching 2) against our MRSTFT weight 1;
    # not tuned here (no GPU run of the paper VAE's training yet).
    "paper": VAEConfig(adv_weight=0.1, fm_weight=0.2, disc_start=2000),
    # Same 25 Hz latent rate, ~70k parameters: trains on a CPU in minutes to reconstruct simple tones.
    "tiny": VAEConfig(channels=8, channel_mults=(1, 2, 4, 8), strides=(8, 8, 10), latent_dim=16,
                      kl_weight=1e-5, stft_sizes=(1024, 512, 256, 128, 64)),
    # The embedded default's VAE (python -m omni2sound.train): 16 x 25 Hz latents, the STFT head (5 ms frames,
    # 20 ms windows) under a 32-wide Snake stack at 200 -> 100 -> 25 Hz; ~210k parameters.
    "toy": VAEConfig(channels=32, channel_mults=(1, 1, 1), strides=(2, 4), latent_dim=16, dilations=(1, 3),
                     kl_weight=1e-5, stft_sizes=(1024, 512, 256, 128, 64), log_stft_weight=1.0, frame_weight=4.0,
                     head="stft", n_fft=320, stft_hop=80),
}


# ----------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------


class Snake(nn.Module):
    """Per-channel Snake; alpha = exp(log_alpha), beta = exp(log_beta), both 1 at init."""

    def __init__(self, channels: int, eps: float = 1e-9):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.zeros(channels))
        self.log_beta = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def alpha_beta(self) -> Tuple[Tensor, Tensor]:
        return self.log_alpha.exp(), self.log_beta.exp()

    def forward(self, x: Tensor) -> Tensor:
        return ops.snake(x, *self.alpha_beta(), self.eps)


def _wn(conv: nn.Module, gain: float = 1.0) -> nn.Module:
    """Variance-preserving init (std 1/sqrt(fan_in), zero bias), then weight norm (g starts at |v|).

    PyTorch's default conv init shrinks the signal ~1.7x per layer; through ~30 layers the latent's contribution
    vanishes under the input-independent offsets that Snake's sin^2 adds, and training starts from a decoder that
    ignores z. Fan-in of a transposed conv is in_channels * kernel / stride (the taps that reach one output).
    ``gain`` < 1 on a residual branch's last conv keeps the residual stream's variance from compounding.
    """
    w = conv.weight
    if isinstance(conv, nn.ConvTranspose1d):
        fan_in = w.shape[0] * w.shape[2] // conv.stride[0]
    else:
        fan_in = w.shape[1] * w.shape[2]
    nn.init.normal_(w, std=gain * fan_in ** -0.5)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return weight_norm(conv)


def _conv(cin: int, cout: int, k: int, stride: int = 1, dilation: int = 1, bias: bool = True,
          gain: float = 1.0) -> nn.Module:
    pad = (dilation * (k - 1)) // 2 if stride == 1 else math.ceil(stride / 2)
    return _wn(nn.Conv1d(cin, cout, k, stride=stride, dilation=dilation, padding=pad, bias=bias), gain)


class ResidualUnit(nn.Module):
    """x + conv1(Snake(conv_k_dilated(Snake(x)))): the receptive field grows by dilation * (k - 1)."""

    def __init__(self, dim: int, dilation: int, k: int, eps: float):
        super().__init__()
        self.snake1 = Snake(dim, eps)
        self.conv1 = _conv(dim, dim, k, dilation=dilation)
        self.snake2 = Snake(dim, eps)
        self.conv2 = _conv(dim, dim, 1, gain=RESIDUAL_GAIN)

    def branch(self, y: Tensor, conv1: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
        """The residual branch after its first Snake (the decoder fuses that Snake with the previous add). conv1:
        another form of the dilated conv to run instead of the module's own (the decoder's conv1d_dilated_as_batch)."""
        return self.conv2(self.snake2((conv1 or self.conv1)(y)))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.branch(self.snake1(x))


class EncoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, cfg: VAEConfig):
        super().__init__()
        self.res = nn.ModuleList([ResidualUnit(cin, d, cfg.kernel_size, cfg.snake_eps) for d in cfg.dilations])
        self.snake = Snake(cin, cfg.snake_eps)
        self.down = _conv(cin, cout, 2 * stride, stride=stride)   # [B, cin, n] -> [B, cout, n / stride]

    def forward(self, x: Tensor) -> Tensor:
        for unit in self.res:
            x = unit(x)
        return self.down(self.snake(x))


class DecoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, cfg: VAEConfig):
        super().__init__()
        self.snake = Snake(cin, cfg.snake_eps)
        # k = 2s, padding s/2: [B, cin, n] -> [B, cout, n * s] exactly (even s).
        self.up = _wn(nn.ConvTranspose1d(cin, cout, 2 * stride, stride=stride, padding=stride // 2))
        self.res = nn.ModuleList([ResidualUnit(cout, d, cfg.kernel_size, cfg.snake_eps) for d in cfg.dilations])


class STFTFrontEnd(nn.Module):
    """wav [B, 1, N] (N a multiple of stft_hop) -> normalised log-magnitudes [B, n_bins, N / stft_hop].

    Frame f is centred on sample f * stft_hop (reflect-free zero padding at the edges). Magnitudes are divided by
    n_fft / 4 (a full-scale sine's peak bin under a Hann window), so 0 dB re full scale is log 0; the log is
    floored at 1e-5 (-100 dB) and mapped by (log + 6) / 4 to about [-1.4, 1.5] for the first conv.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.n_fft, self.hop = cfg.n_fft, cfg.stft_hop
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)

    def magnitude(self, wav: Tensor) -> Tensor:
        """wav [B, 1, N] -> |STFT| re full scale [B, n_bins, N // stft_hop] (fp32)."""
        frames = wav.shape[-1] // self.hop
        spec = torch.stft(wav[:, 0].float(), self.n_fft, self.hop, window=self.window.float(), center=True,
                          pad_mode="constant", return_complex=True)[..., :frames]           # [B, n_bins, frames]
        return spec.abs() / (self.n_fft / 4)

    def forward(self, wav: Tensor) -> Tensor:
        return ((torch.log(self.magnitude(wav) + 1e-5) + 6.0) / 4.0).to(wav.dtype)


class ISTFTHead(nn.Module):
    """[B, 2 * n_bins, F] (log-magnitude, phase) -> wav [B, 1, F * stft_hop] by inverse STFT (Hann, overlap-add).

    log-magnitude (natural log, re full scale) = 3 o - 8, so the untrained decoder starts near silence (-70 dB);
    capped at 2 for synthesis. Phase = pi * o + the phase a sinusoid at the bin's centre frequency has in frame f,
    2 pi k (f * hop - n_fft / 2) / n_fft: with o = 0 every bin already continues its partial coherently from frame
    to frame, so the decoder only learns magnitudes and small phase corrections (without this prior, overlapping
    frames of freely predicted phases cancel and the magnitude losses stall). Frame f is centred on sample f * hop,
    as in ``STFTFrontEnd``; frames are counted from the start of the decoded latents, and n_fft divides the VAE
    hop, so a chunked decode keeps the whole decode's phase reference.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.n_fft, self.hop, self.n_bins = cfg.n_fft, cfg.stft_hop, cfg.n_bins
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)

    def log_magnitude(self, out: Tensor) -> Tensor:
        """[B, 2 * n_bins, F] -> natural-log magnitudes re full scale [B, n_bins, F] (before the synthesis cap)."""
        return 3.0 * out[:, :self.n_bins].float() - 8.0

    def forward(self, out: Tensor) -> Tensor:
        dtype, F_ = out.dtype, out.shape[-1]
        # One more frame, a copy of the last, centred on the end sample: without it the last n_fft / 2 samples
        # are covered by ever fewer windows and istft's envelope normalisation amplifies whatever the edge frame
        # holds by up to ~6x (measured: bursts at the clip's end that the oracle heard as knocks at 1.99 s).
        out = torch.cat([out, out[..., -1:]], dim=-1)                                    # [B, 2 n_bins, F + 1]
        mag = torch.exp(self.log_magnitude(out).clamp(max=2.0)) * (self.n_fft / 4)
        k = torch.arange(self.n_bins, device=out.device, dtype=torch.float32)[:, None]
        f = torch.arange(F_ + 1, device=out.device, dtype=torch.float32)[None]
        # k * hop and n_fft / 2 are integers: reduce mod n_fft before scaling so the angle stays small (fp32).
        ref = torch.remainder(k * (f * self.hop - self.n_fft // 2), self.n_fft) * (2 * math.pi / self.n_fft)
        spec = torch.polar(mag, math.pi * out[:, self.n_bins:].float() + ref)           # [B, n_bins, F]
        wav = torch.istft(spec, self.n_fft, self.hop, window=self.window.float(), center=True,
                          length=F_ * self.hop)
        return wav[:, None].to(dtype)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mults]
        self.stft = STFTFrontEnd(cfg) if cfg.head == "stft" else None
        self.conv_in = _conv(cfg.n_bins if self.stft is not None else 1, widths[0], cfg.kernel_size)
        self.blocks = nn.ModuleList([EncoderBlock(widths[i], widths[i + 1], s, cfg)
                                     for i, s in enumerate(cfg.strides)])
        self.snake_out = Snake(widths[-1], cfg.snake_eps)
        self.conv_out = _conv(widths[-1], 2 * cfg.latent_dim, 3)
        # Posterior std starts at exp(-4) ~ 0.02: with logvar ~ 0 the samples would be mostly noise (std 1 against a
        # mean of std ~0.5), and the decoder would first learn to ignore z and emit one input-independent sound.
        with torch.no_grad():
            self.conv_out.bias[cfg.latent_dim:].fill_(LOGVAR_INIT)

    def forward(self, wav: Tensor) -> Tensor:
        x = self.stft(wav) if self.stft is not None else wav   # [B, 1, N] or [B, n_bins, N / stft_hop]
        h = self.conv_in(x)                        # [B, W0, N / frame_hop]
        for block in self.blocks:
            h = block(h)                           # [B, W_{i+1}, N / prod(strides[:i+1])]
        return self.conv_out(self.snake_out(h))   # [B, 2C, T]


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mults][::-1]
        strides = cfg.strides[::-1]
        self.conv_in = _conv(cfg.latent_dim, widths[0], cfg.kernel_size)
        self.blocks = nn.ModuleList([DecoderBlock(widths[i], widths[i + 1], s, cfg) for i, s in enumerate(strides)])
        self.snake_out = Snake(widths[-1], cfg.snake_eps)
        if cfg.head == "stft":
            self.conv_out = _conv(widths[-1], 2 * cfg.n_bins, cfg.kernel_size, gain=0.2)
            self.synth = ISTFTHead(cfg)
        else:
            self.conv_out = _conv(widths[-1], 1, cfg.kernel_size, bias=False, gain=0.2)   # start near audio level
            self.synth = None
        # The conv forms (omni2sound.vae_forms; exact): the waveform head's last conv (64 -> 1 channel, k 7, at the
        # sample rate) as one GEMM and K shifted adds, and the residual units' dilated convs as undilated convs over
        # interleaved sub-sequences. True / False forces a form; None leaves the choice to vae_forms (by device, and
        # for the dilated convs by timing both forms once per shape on a GPU).
        self.out_conv_as_gemm: Optional[bool] = None
        self.dilated_as_batch: Optional[bool] = None

    def _snakes_after_adds(self):
        """For each residual unit in order, the Snake that directly follows its residual add."""
        flat = [(b, u) for b in self.blocks for u in b.res]
        after = []
        for i, (b, _) in enumerate(flat):
            if i + 1 < len(flat) and flat[i + 1][0] is b:
                after.append(flat[i + 1][1].snake1)          # next unit of the same block
            else:
                bi = list(self.blocks).index(b)
                after.append(self.blocks[bi + 1].snake if bi + 1 < len(self.blocks) else self.snake_out)
        return after

    def forward(self, z: Tensor) -> Tensor:
        return self._head(self.frames(z))

    def frames(self, z: Tensor) -> Tensor:
        """z [B, C, T] -> the last conv's output: the waveform [B, 1, T * hop] (waveform head) or the STFT frames
        [B, 2 * n_bins, T * hop / stft_hop] (stft head) that ``_head`` synthesises."""
        if decodes_channels_last(z):
            return self._forward_channels_last(z)
        # Every residual add is followed by a Snake, so both run as one fused op: (h, y) = (x + r, snake(x + r)),
        # h the running residual stream, y the next conv's input.
        after = iter(self._snakes_after_adds())
        h = self.conv_in(z)                                  # [B, W0, T]
        y = self.blocks[0].snake(h)
        for block in self.blocks:
            h = block.up(y)                                  # [B, W_{i+1}, n * s]
            y = block.res[0].snake1(h)
            for unit in block.res:
                nxt = next(after)
                h, y = ops.snake_residual(self._branch(unit, y), *nxt.alpha_beta(), h, nxt.eps)
        return self._conv_out(y)                             # [B, 1, T * hop] or [B, 2 n_bins, frames]

    def _branch(self, unit: "ResidualUnit", y: Tensor) -> Tensor:
        """``unit.branch(y)``, its dilated conv in the form ``vae_forms.dilated_conv_form`` picks."""
        return unit.branch(y, dilated_conv_form(unit.conv1, y, self.dilated_as_batch))

    def _conv_out(self, y: Tensor) -> Tensor:
        return out_conv(self.conv_out, y, self.out_conv_as_gemm)

    def _head(self, out: Tensor) -> Tensor:
        """The last conv's output -> waveform: itself (waveform head) or its inverse STFT (stft head)."""
        return self.synth(out) if self.synth is not None else out

    def _forward_channels_last(self, z: Tensor) -> Tensor:
        """The same decoder with activations stored channels-last ([B, C, 1, T] as [B, T, C]), for CPU inference
        (``vae_forms.decodes_channels_last``). Same weights and math as ``frames``: only the memory layout differs.
        """
        conv, up = conv_channels_last, conv_transpose_channels_last
        after = iter(self._snakes_after_adds())
        z4 = z.unsqueeze(2).contiguous(memory_format=torch.channels_last)
        h = conv(self.conv_in, z4.squeeze(2))                  # [B, W0, T]
        y = self.blocks[0].snake(h)
        for block in self.blocks:
            h = up(block.up, y)                                 # [B, W_{i+1}, n * s]
            y = block.res[0].snake1(h)
            for unit in block.res:
                nxt = next(after)
                branch = conv(unit.conv2, unit.snake2(conv(unit.conv1, y)))
                h, y = ops.snake_residual(branch, *nxt.alpha_beta(), h, nxt.eps)
        return self._conv_out(y)                                # [B, 1, T * hop] or [B, 2 n_bins, frames]

    def receptive_radius_frames(self, cfg: VAEConfig) -> float:
        """How many latent frames on each side one output sample depends on.

        Walk the decoder: a layer at a stage whose rate is u samples per latent frame, reaching r input samples on
        each side, adds r / u frames. A k-tap conv with dilation d reaches d * (k - 1) / 2; a transposed conv with
        k = 2s, padding s/2 reaches one input sample on each side.
        """
        k = cfg.kernel_size
        radius, u = (k - 1) / 2, 1                            # conv_in at the latent rate
        for s in cfg.strides[::-1]:
            radius += 1 / u                                   # transposed conv, input side
            u *= s
            radius += sum(d * (k - 1) / 2 for d in cfg.dilations) / u
        radius += (k - 1) / 2 / u                             # conv_out
        if cfg.head == "stft":
            radius += (cfg.n_fft // 2) / cfg.hop_length      # overlap-add: a frame reaches n_fft / 2 samples
        return radius


# ----------------------------------------------------------------------------------------------------
# The VAE
# ----------------------------------------------------------------------------------------------------


class DiagonalGaussian:
    """q(z | x) = N(mean, exp(logvar)); mean, logvar [B, C, T]."""

    def __init__(self, moments: Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)   # keeps exp() finite early in training
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, summed over C and T: [B]."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum((1, 2))


class AudioVAE(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.weight_norm_folded = False

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    @property
    def latent_rate(self) -> float:
        return self.config.latent_rate

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    def num_frames(self, num_samples: int) -> int:
        return -(-num_samples // self.hop_length)

    def encode(self, wav: Tensor) -> DiagonalGaussian:
        """wav [B, 1, N] -> q(z | wav) with mean/logvar [B, latent_dim, ceil(N / hop)] (zero right-padding)."""
        if wav.dim() != 3 or wav.shape[1] != 1:
            raise ValueError(f"AudioVAE.encode: wav must be [B, 1, N], got shape {tuple(wav.shape)}")
        if wav.shape[-1] == 0:
            raise ValueError("AudioVAE.encode: wav has no samples")
        pad = self.num_frames(wav.shape[-1]) * self.hop_length - wav.shape[-1]
        if pad:
            wav = F.pad(wav, (0, pad))
        return DiagonalGaussian(self.encoder(wav))

    @property
    def context_frames(self) -> int:
        """Latent frames of context that make a chunk's decode equal the whole decode (the receptive radius)."""
        return math.ceil(self.decoder.receptive_radius_frames(self.config))

    def decode(self, z: Tensor, chunk_frames: Optional[int] = None, overlap_frames: Optional[int] = None) -> Tensor:
        """z [B, latent_dim, T] -> wav [B, 1, T * hop].

        With ``chunk_frames``, decodes chunks of that many frames, each with ``overlap_frames`` (default: the
        decoder's receptive radius, ``context_frames``) of extra latent context on each side that is decoded and
        dropped. With that much context every kept sample sees exactly the latents it sees in a whole decode, so
        the result equals the whole decode (up to float rounding): no seam, no cross-fade needed.
        """
        if z.dim() != 3 or z.shape[1] != self.config.latent_dim:
            raise ValueError(f"AudioVAE.decode: z must be [B, {self.config.latent_dim}, T], got {tuple(z.shape)}")
        T = z.shape[-1]
        if chunk_frames is None or chunk_frames >= T:
            return self.decoder(z)
        if chunk_frames <= 0:
            raise ValueError(f"AudioVAE.decode: chunk_frames must be positive, got {chunk_frames}")
        ov = self.context_frames if overlap_frames is None else int(overlap_frames)
        if ov < 0:
            raise ValueError(f"AudioVAE.decode: overlap_frames must be >= 0, got {overlap_frames}")
        hop, out = self.hop_length, []
        for start in range(0, T, chunk_frames):
            stop = min(T, start + chunk_frames)
            lo, hi = max(0, start - ov), min(T, stop + ov)
            wav = self.decoder(z[:, :, lo:hi])                               # [B, 1, (hi - lo) * hop]
            out.append(wav[:, :, (start - lo) * hop:(stop - lo) * hop])
        return torch.cat(out, dim=-1)

    def decode_graphed(self, z: Tensor, max_graphs: int = 4) -> Tensor:
        """``decode(z)`` replayed from a CUDA graph captured once per (shape, dtype): a batch-1 decode is a chain of
        ~60 small convs and Snake kernels whose launches, not their work, bound it on a GPU. Elsewhere (CPU, or
        with gradients on) it is ``decode(z)``. The graph reads the weights in place, so later weight updates are
        seen; it holds its own input and output buffers. Only the conv stack (``Decoder.frames``) is captured: the
        stft head's inverse STFT synchronises with the host (torch.istft checks its window envelope), which a
        capture does not allow (seen on an H100), so it runs eagerly after the replay."""
        if z.device.type != "cuda" or torch.is_grad_enabled():      # graphs are for inference only
            return self.decode(z)
        graphs = self.__dict__.setdefault("_decode_graphs", {})          # not a module attribute: no state_dict
        dec = self.decoder          # the conv forms are part of what a graph captured: a changed flag captures anew
        key = (tuple(z.shape), z.dtype, z.device, ops.select_backend("snake_residual", z.device),
               dec.out_conv_as_gemm, dec.dilated_as_batch)
        entry = graphs.get(key)
        if entry is None:
            if len(graphs) >= max_graphs:
                graphs.pop(next(iter(graphs)))
            z_static = z.clone()
            warm_up_on_side_stream(lambda: self.decoder.frames(z_static), 2)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.decoder.frames(z_static)
            entry = graphs[key] = (graph, z_static, out)
        graph, z_static, out = entry
        z_static.copy_(z)
        graph.replay()
        return self.decoder._head(out.clone())

    def __getstate__(self):
        """deepcopy leaves the decode graphs behind (a CUDAGraph cannot be copied; a copy captures its own)."""
        state = dict(super().__getstate__())
        state.pop("_decode_graphs", None)
        return state

    def forward(self, wav: Tensor, generator: Optional[torch.Generator] = None, return_frames: bool = False):
        """Training pass: wav [B, 1, N] -> (reconstruction [B, 1, ceil(N/hop)*hop], posterior), plus the decoder's
        pre-synthesis output (``Decoder.frames``) when ``return_frames`` (the stft head's frame loss reads it)."""
        post = self.encode(wav)
        frames = self.decoder.frames(post.sample(generator))
        recon = self.decoder._head(frames)
        return (recon, post, frames) if return_frames else (recon, post)

    @torch.no_grad()
    def reconstruct(self, wav: Tensor) -> Tensor:
        """wav [B, 1, N] -> the decoded posterior mode, trimmed to N samples."""
        return self.decode(self.encode(wav).mode())[..., :wav.shape[-1]]

    # ------------------------------------------------------------------------------------------------
    # Weight norm and checkpoints
    # ------------------------------------------------------------------------------------------------

    def fold_weight_norm(self) -> "AudioVAE":
        """Replace every weight-norm parametrisation by its plain weight g * v / |v| (inference; idempotent)."""
        for m in self.modules():
            if parametrize.is_parametrized(m, "weight"):
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
        self.weight_norm_folded = True
        return self

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> Path:
        """Write model.safetensors + config.json into ``directory``, each atomically (tmp file, then replace)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {"format": "pt", "weight_norm_folded": str(self.weight_norm_folded)}
        atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, p, metadata=meta))
        atomic_write(directory / CONFIG_NAME, self.config.to_json())
        return directory

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], device: Optional[Union[str, torch.device]] = None,
                        inference: bool = True) -> "AudioVAE":
        """Load a checkpoint written by ``save_pretrained``; checks every tensor's name and shape.

        ``inference=True`` folds weight norm and returns the model in eval mode; ``False`` keeps the training form
        (only possible when the checkpoint was saved before folding).
        """
        directory = Path(directory)
        cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise FileNotFoundError(f"AudioVAE.from_pretrained: missing {p}")
        config = read_config(cfg_path, VAEConfig)
        folded = safetensors_metadata(w_path).get("weight_norm_folded") == "True"
        if folded and not inference:
            raise ValueError(f"AudioVAE.from_pretrained({directory}): the checkpoint has folded weight norm; "
                             "it can only be loaded for inference")
        model = cls(config)
        if folded:
            model.fold_weight_norm()
        state = load_safetensors(w_path)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise KeyError(f"AudioVAE.from_pretrained({w_path}): missing keys {missing[:8]}"
                           f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                           f"{' ...' if len(unexpected) > 8 else ''}")
        for k, v in expected.items():
            if state[k].shape != v.shape:
                raise ValueError(f"AudioVAE.from_pretrained({w_path}): tensor {k!r} has shape "
                                 f"{tuple(state[k].shape)}, the config {cfg_path.name} expects {tuple(v.shape)}")
        model.load_state_dict(state)
        if inference:
            model.fold_weight_norm().eval().requires_grad_(False)
        return model.to(device) if device is not None else model


def build_vae(preset: str = "tiny", **overrides) -> AudioVAE:
    """An untrained AudioVAE from a named preset, with optional field overrides."""
    if preset not in VAE_PRESETS:
        raise KeyError(f"unknown VAE preset {preset!r}; choose from {sorted(VAE_PRESETS)}")
    base = asdict(VAE_PRESETS[preset])
    base.update(overrides)
    return AudioVAE(VAEConfig.from_dict(base))


__all__ = ["AudioVAE", "DiagonalGaussian", "VAEConfig", "VAE_PRESETS", "build_vae"]
