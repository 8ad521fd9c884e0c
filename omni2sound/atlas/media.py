"""Decoding a clip's media for the agents, and encoding it for a chat request.

Audio: soundfile (+ soxr to the agents' rate), mono float32 [N]. Frames: PyAV at `frames_fps`, at most
`max_frames` spread evenly over the clip. In a request, frames travel as JPEG data URLs (image parts) and
audio as base64 16-bit WAV (input_audio parts).
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
from typing import Optional

import numpy as np

from ..files import hash_file_into


def load_media(record: dict, sample_rate: int, frames_fps: float, max_frames: int,
               frame_size: Optional[int] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(audio [N] float32, frames [T, H, W, 3] uint8 or None) of a manifest record."""
    audio = read_audio(record["audio"], sample_rate)
    start = float(record.get("start") or 0.0)
    dur = record.get("duration")
    i0 = int(round(start * sample_rate))
    audio = audio[i0: i0 + int(round(dur * sample_rate))] if dur else audio[i0:]
    frames = None
    if record.get("video"):
        from ..video import read_video
        frames = read_video(record["video"], frames_fps, None, max_seconds=dur, start=start, threads=False)
        if len(frames) > max_frames:
            frames = frames[np.linspace(0, len(frames) - 1, max_frames).round().astype(int)]
        if frame_size and min(frames.shape[1:3]) > frame_size:
            frames = _resize(frames, frame_size)
    return audio, frames


def read_audio(path: str, sample_rate: int) -> np.ndarray:
    """Mono float32 [N] at sample_rate: channels averaged, soxr's HQ resampler (as `omni2sound.audio`, without
    importing torch, which a captioning worker does not otherwise need)."""
    import soundfile as sf
    import soxr
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such audio file")
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise ValueError(f"{path}: not a readable audio file: {e}") from None
    if data.shape[0] == 0:
        raise ValueError(f"{path}: the audio stream holds no samples")
    mono = data.mean(axis=1)
    if sr != sample_rate:
        mono = soxr.resample(mono, sr, sample_rate, quality="HQ").astype(np.float32)
    return np.ascontiguousarray(mono, dtype=np.float32)


def _resize(frames: np.ndarray, short: int) -> np.ndarray:
    from PIL import Image
    h, w = frames.shape[1:3]
    s = short / min(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BICUBIC)) for f in frames])


def content_hash(record: dict, chunk: int = 1 << 20) -> str:
    """sha256 of the record's identity (clip id, window) and the bytes of its audio and video files."""
    h = hashlib.sha256(json.dumps({k: record.get(k) for k in ("clip_id", "start", "duration")},
                                  sort_keys=True).encode())
    for name in ("audio", "video"):
        p = record.get(name)
        if p and os.path.isfile(p):
            hash_file_into(h, p, chunk)
    return h.hexdigest()


def jpeg_data_url(frame: np.ndarray, quality: int = 85) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame)).save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def wav_base64(audio: np.ndarray, sample_rate: int) -> str:
    """Base64 of a 16-bit mono WAV of float audio [N] (scaled by 32768 and clipped, so 16-bit sources come
    back bit-exact through soundfile's float reading), written with the standard library's `wave`."""
    import wave
    pcm = np.clip(np.rint(np.asarray(audio, np.float32) * 32768.0), -32768, 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())
    return base64.b64encode(buf.getvalue()).decode()


def decode_wav_base64(data: str) -> tuple[np.ndarray, int]:
    import soundfile as sf
    audio, sr = sf.read(io.BytesIO(base64.b64decode(data)), dtype="float32")
    return audio, sr


def decode_image_data_url(url: str) -> np.ndarray:
    from PIL import Image
    if not url.startswith("data:"):
        raise ValueError("only data: URLs are decoded locally")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
