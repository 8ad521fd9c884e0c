"""Audio I/O: every waveform enters and leaves omni2sound through this module.

``load_audio`` reads WAV/FLAC/OGG (anything libsndfile reads), mixes down to mono and resamples with soxr to
the model rate; ``save_audio`` writes WAV/FLAC atomically and never clips (it scales down and warns instead).
Waveforms are float32 in [-1, 1], shape [N] (mono) at ``sample_rate``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Union

import numpy as np
import soundfile as sf
import soxr
import torch

from .files import atomic_write

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# Peak below which a clip counts as silent: -80 dBFS, below the 16-bit noise floor (-96 dBFS) plus dither.
SILENCE_PEAK = 1e-4
_WRITE_FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16")}


class AudioError(ValueError):
    """An audio file that cannot be used: missing, empty, unreadable or not audio. The message names the path."""


def load_audio(path: PathLike, sample_rate: int = 16000) -> torch.Tensor:
    """Read an audio file as a mono float32 waveform [N] at ``sample_rate`` Hz.

    Channels are averaged (mix-down keeps the loudness of a centred source); resampling uses soxr's
    high-quality filter, which is what makes 44.1 kHz -> 16 kHz alias-free.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such audio file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: the file is empty (0 bytes)")
    if sample_rate <= 0:
        raise ValueError(f"load_audio: sample_rate must be positive, got {sample_rate}")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # [N, channels]
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(f"{path}: not a readable audio file (WAV/FLAC/OGG expected): {e}") from e
    if data.shape[0] == 0:
        raise AudioError(f"{path}: the audio stream holds no samples")
    if not np.all(np.isfinite(data)):
        raise AudioError(f"{path}: the audio holds NaN or infinite samples")
    mono = data.mean(axis=1)  # [N]
    if sr != sample_rate:
        mono = soxr.resample(mono, sr, sample_rate, quality="HQ").astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(mono))


def is_silent(wav: torch.Tensor, threshold: float = SILENCE_PEAK) -> bool:
    """True when the waveform's peak is below ``threshold`` (default -80 dBFS) or it is empty."""
    return wav.numel() == 0 or float(wav.detach().abs().max()) < threshold


def save_audio(path: PathLike, wav: torch.Tensor, sample_rate: int, float32: bool = False) -> Path:
    """Write a mono waveform ([N] or [1, N]) as 16-bit WAV or FLAC (by suffix), atomically.

    A waveform whose peak exceeds 1 is scaled down to peak 1 (with a warning) rather than clipped: clipping
    adds broadband distortion, a gain change does not. ``float32=True`` writes a 32-bit float WAV instead, with
    the samples exactly as given (no gain change, peaks above 1 kept): what scoring needs, since level-sensitive
    metrics must see the model's own output level.
    """
    path = Path(path)
    fmt = _WRITE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise AudioError(f"{path}: save_audio writes {sorted(_WRITE_FORMATS)} files, not {path.suffix!r}")
    if float32 and fmt[0] != "WAV":
        raise AudioError(f"{path}: float32 samples are written as .wav only (FLAC holds integer samples)")
    if sample_rate <= 0:
        raise ValueError(f"save_audio({path}): sample_rate must be positive, got {sample_rate}")
    wav = torch.as_tensor(wav).detach().float().cpu()
    if wav.dim() == 2 and wav.shape[0] == 1:
        wav = wav[0]
    if wav.dim() != 1:
        raise ValueError(f"save_audio({path}): expected a mono waveform [N] or [1, N], got shape {tuple(wav.shape)}")
    if wav.numel() == 0:
        raise AudioError(f"{path}: refusing to write an empty waveform")
    if not torch.isfinite(wav).all():
        raise ValueError(f"save_audio({path}): the waveform holds NaN or infinite samples")
    peak = float(wav.abs().max())
    if float32:
        fmt = ("WAV", "FLOAT")
    elif peak > 1.0:
        log.warning("save_audio(%s): peak %.3f > 1, scaling down by %.2f dB to avoid clipping",
                    path, peak, 20 * np.log10(peak))
        wav = wav / peak
    atomic_write(path, lambda tmp: sf.write(tmp, wav.numpy(), sample_rate, format=fmt[0], subtype=fmt[1]))
    return path
