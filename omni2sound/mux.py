"""Video out: the input video with generated audio as its sound track.

``mux_audio(video, audio, sample_rate, out)`` copies the video stream's packets unchanged (a remux: no
decode, no re-encode, so no quality loss and any frame rate the demuxer takes, constant or variable) into a
new container and adds one AAC audio stream made from ``audio``. The input's own audio, subtitle and data
streams are dropped. The audio is cut or zero-padded to the video stream's length, so the sound track ends
with the picture (AAC codes whole frames of 1024 samples: the track's stored duration can exceed the video's
by at most one frame, which the container's edit list hides from players).

``video_duration(path)`` is the video stream's length in seconds from its packets' timestamps (the same
number the muxed audio is fitted to); the CLI and the pipeline make audio of this length by default.
"""
from __future__ import annotations

import os
from fractions import Fraction
from typing import Tuple

import numpy as np

from .files import atomic_write
from .video import VideoError

_FORMATS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska", ".m4v": "mp4", ".webm": "webm"}   # suffix: muxer
VIDEO_SUFFIXES = tuple(_FORMATS)
AAC_RATE = 48000          # the rate players expect of AAC; the model's 16 kHz audio is resampled (soxr) to it
AAC_FRAME = 1024          # samples per AAC frame
AAC_BIT_RATE = 128_000


def is_video_path(path: str) -> bool:
    """True when ``path``'s suffix names a video container that ``mux_audio`` writes."""
    return os.fspath(path).lower().endswith(VIDEO_SUFFIXES)


def _stream_span(container, stream) -> Tuple[float, float]:
    """(start, end) seconds of ``stream`` from its packets: the first presentation time and the latest
    presentation time + duration. Reads packets only (no decoding)."""
    tb = stream.time_base
    start, end, last_dur = None, None, 0
    for packet in container.demux(stream):
        if packet.pts is None:
            continue
        start = packet.pts if start is None else min(start, packet.pts)
        stop = packet.pts + (packet.duration or 0)
        if end is None or stop > end:
            end, last_dur = stop, packet.duration or 0
    if start is None:
        raise VideoError(f"{container.name}: the video stream holds no timed packet")
    t0, t1 = float(start * tb), float(end * tb)
    if last_dur == 0:                   # no packet durations: one frame at the average rate
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        t1 += 1.0 / rate
    return t0, t1


def video_span(path: str) -> Tuple[float, float]:
    """(start, end) seconds of the first video stream of ``path``; VideoError naming the file if unreadable."""
    import av

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such video file")
    try:
        with av.open(path) as c:
            if not c.streams.video:
                raise VideoError(f"{path}: no video stream")
            return _stream_span(c, c.streams.video[0])
    except VideoError:
        raise
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError, IndexError) as e:
        raise VideoError(f"cannot decode {path}: {e}") from e


def video_duration(path: str) -> float:
    """Seconds of the first video stream of ``path`` (from its packets' timestamps)."""
    t0, t1 = video_span(path)
    return t1 - t0


def _fit(audio: np.ndarray, sample_rate: int, seconds: float) -> np.ndarray:
    """Mono float32 [N] at AAC_RATE, exactly round(seconds * AAC_RATE) samples (resampled, cut or zero-padded)."""
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if sample_rate != AAC_RATE:
        import soxr
        audio = soxr.resample(audio, sample_rate, AAC_RATE, quality="HQ").astype(np.float32)
    n = int(round(seconds * AAC_RATE))
    if audio.shape[0] >= n:
        return np.ascontiguousarray(audio[:n])
    return np.concatenate([audio, np.zeros(n - audio.shape[0], np.float32)])


def mux_audio(video: str, audio, sample_rate: int, out: str, bit_rate: int = AAC_BIT_RATE) -> str:
    """Write ``out``: ``video``'s video stream copied packet for packet plus ``audio`` (mono [N] float in [-1, 1]
    at ``sample_rate``, a numpy array or tensor) as an AAC track fitted to the video's length. Written to a
    temporary file beside ``out`` and renamed, so ``out`` is either complete or absent. Returns ``out``."""
    import av

    video, out = os.fspath(video), os.fspath(out)
    if not is_video_path(out):
        raise ValueError(f"{out}: a video output must end in one of {', '.join(VIDEO_SUFFIXES)}")
    if hasattr(audio, "detach"):
        audio = audio.detach().float().cpu().numpy()
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2 and audio.shape[0] == 1:
        audio = audio[0]
    if audio.ndim != 1 or audio.size == 0:
        raise ValueError(f"mux_audio({out}): expected a non-empty mono waveform [N], got shape {audio.shape}")
    if not np.all(np.isfinite(audio)):
        raise ValueError(f"mux_audio({out}): the waveform holds NaN or infinite samples")
    peak = float(np.abs(audio).max())
    if peak > 1.0:                              # a gain change, never clipping (as audio.save_audio)
        audio = audio / peak
    start, end = video_span(video)
    pcm = _fit(audio, sample_rate, end - start)
    suffix = os.path.splitext(out)[1].lower()

    def write(tmp: str) -> None:
        with av.open(video) as src, av.open(tmp, mode="w", format=_FORMATS[suffix]) as dst:
            vin = src.streams.video[0]
            add_template = getattr(dst, "add_stream_from_template", None)
            try:
                vout = add_template(vin) if add_template else dst.add_stream(template=vin)
            except (av.error.FFmpegError, ValueError) as e:
                raise VideoError(f"{out}: cannot put {video}'s {vin.codec_context.name} video in a "
                                 f"{suffix} file ({e}); try .mkv") from e
            aout = dst.add_stream("aac", rate=AAC_RATE)
            _set_mono(aout)
            aout.bit_rate = bit_rate
            aout.time_base = Fraction(1, AAC_RATE)
            for packet in src.demux(vin):
                if packet.dts is None:          # the demuxer's end-of-stream marker
                    continue
                packet.stream = vout
                dst.mux(packet)
            pts0 = int(round(start * AAC_RATE))
            for i in range(0, pcm.shape[0], AAC_FRAME):
                frame = av.AudioFrame.from_ndarray(pcm[None, i:i + AAC_FRAME], format="fltp", layout="mono")
                frame.sample_rate = AAC_RATE
                frame.pts = pts0 + i
                frame.time_base = Fraction(1, AAC_RATE)
                for packet in aout.encode(frame):
                    dst.mux(packet)
            for packet in aout.encode(None):
                dst.mux(packet)

    try:
        atomic_write(out, write)                # a temporary file renamed into place: out is whole or absent
    except av.error.FFmpegError as e:
        raise VideoError(f"{out}: writing the video with its new sound track failed: {e}") from e
    return out


def _set_mono(stream) -> None:
    try:
        stream.layout = "mono"
    except (AttributeError, ValueError):        # older PyAV: the layout lives on the codec context
        stream.codec_context.layout = "mono"


def probe(path: str) -> dict:
    """What a muxed file holds, by decoding it (the tests' and the demo's check that a file plays):
    {"video_frames", "video_seconds", "audio_seconds", "audio_rate", "audio_codec", "video_codec"}."""
    import av

    with av.open(os.fspath(path)) as c:
        info = {"video_frames": 0, "video_seconds": None, "audio_seconds": None, "audio_rate": None,
                "audio_codec": None, "video_codec": None}
        if c.streams.video:
            info["video_codec"] = c.streams.video[0].codec_context.name
        if c.streams.audio:
            a = c.streams.audio[0]
            info["audio_codec"], info["audio_rate"] = a.codec_context.name, a.rate
    if info["video_codec"]:
        t0, t1 = video_span(path)
        info["video_seconds"] = t1 - t0
        with av.open(os.fspath(path)) as c:
            info["video_frames"] = sum(1 for _ in c.decode(c.streams.video[0]))
    if info["audio_codec"]:
        with av.open(os.fspath(path)) as c:
            n = sum(f.samples for f in c.decode(c.streams.audio[0]))
        info["audio_samples"] = n
        info["audio_seconds"] = n / info["audio_rate"]
    return info



DEFAULT_SECONDS = 10.0      # the generation length without a video


def default_duration(video) -> float:
    """The one rule for a request's length when none is given (the API, the CLI, batch generation and the
    demo): the video's duration (the longest of a batch's videos), or DEFAULT_SECONDS without video."""
    videos = [video] if video is None or isinstance(video, (str, os.PathLike)) else list(video)
    lengths = [video_duration(v) for v in videos if v is not None]
    return max(lengths) if lengths else DEFAULT_SECONDS


def warn_unconditional(videos, texts) -> None:
    """Warn when a request has neither video nor text: its audio is unconditional (the model's prior)."""
    import warnings

    empty = [i for i, (v, t) in enumerate(zip(videos, texts)) if v is None and not (t and t.strip())]
    if empty:
        which = "the request" if len(videos) == 1 else f"request(s) {empty}"
        warnings.warn(f"{which}: neither video nor text given; the audio is unconditional (the model's prior "
                      "sound, not guided by anything)", UserWarning, stacklevel=3)
