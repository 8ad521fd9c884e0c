"""Video decoding with PyAV at the frame rate each condition encoder needs.

``read_video(path, fps, size)`` returns uint8 frames [T, H, W, 3] sampled on the grid k / fps
(k = 0, 1, ...) over the clip's duration: for each grid time, the last decoded frame shown at or before
it (sample-and-hold, so any source frame rate, variable rates and short clips work). The semantic
encoder reads 8 fps, the sync encoder 25 fps. ``write_video`` exists for tests and the toy world.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from .files import atomic_write

# file extension -> FFmpeg muxer (the temporary file written first has no meaningful extension)
_CONTAINER_FORMATS = {"mp4": "mp4", "m4v": "mp4", "mov": "mov", "mkv": "matroska", "webm": "webm", "avi": "avi"}

Size = Optional[Union[int, Tuple[int, int]]]   # None (keep), int (square side) or (height, width)


class VideoError(ValueError):
    """A video file that cannot be decoded (the message names the file and the reason)."""


def _size_hw(size: Size) -> Optional[Tuple[int, int]]:
    if size is None:
        return None
    if isinstance(size, int):
        return size, size
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"size must be an int or (height, width) of positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def _sampled(t0: float, t1: float, start: float, fps: float, tol: float = 1e-6) -> bool:
    """Whether a frame shown from t0 until t1 is the one some grid time start + k / fps (k >= 0) samples
    (sample-and-hold as in `read_video`, widened by tol so that rounding never leaves a sampled frame out)."""
    k = max(0, math.ceil((t0 - 1e-9 - tol - start) * fps))
    return start + k / fps + 1e-9 < t1 + tol


def read_video(path: str, fps: float, size: Size = None, max_seconds: Optional[float] = None,
               start: float = 0.0, threads: bool = True) -> np.ndarray:
    """Decode ``path`` and resample it to ``fps`` -> uint8 [T, H, W, 3], T = ceil(duration * fps) (>= 1).

    size: output (height, width) or a square side; None keeps the source size. ``start`` / ``max_seconds``
    select a window of the clip (seconds). threads: FFmpeg's frame/slice threads, which speed up one long
    video; many short clips decoded side by side are cheaper without them (each open starts its threads).
    Only the frames the grid samples are converted to RGB and kept. Missing file -> FileNotFoundError;
    anything PyAV cannot decode (corrupt, not a video, no video stream, no frames) -> VideoError naming the file.
    """
    import av

    if fps <= 0:
        raise ValueError(f"read_video: fps must be positive, got {fps}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"read_video: no such video file: {path}")
    hw = _size_hw(size)
    rgb = lambda fr: fr.to_ndarray(format="rgb24", width=hw[1] if hw else None, height=hw[0] if hw else None)
    times, kept, prev = [], {}, None        # kept: frame index -> RGB of the frames a grid time samples
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoError(f"read_video: {path} has no video stream")
            stream = container.streams.video[0]
            if threads:
                stream.thread_type = "AUTO"
            duration = None
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / 1e6
            end = None if max_seconds is None else start + max_seconds
            for frame in container.decode(stream):
                t = frame.time if frame.time is not None else len(times) / float(stream.average_rate or fps)
                if end is not None and t >= end:
                    break
                if prev is not None and (len(times) == 1 or _sampled(times[-1], t, start, fps)):
                    kept[len(times) - 1] = rgb(prev)      # the first frame also stands for grid times before it
                times.append(t)
                prev = frame
            if prev is not None:
                kept[len(times) - 1] = rgb(prev)
    except VideoError:
        raise
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError, IndexError) as e:
        raise VideoError(f"read_video: cannot decode {path}: {e}") from e
    if not times:
        raise VideoError(f"read_video: {path} contains no decodable video frame")
    # Clip duration: the container's if known, else last frame time + one source frame period.
    src_period = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 1.0 / fps
    last = times[-1] + src_period
    stop = last if duration is None or duration <= 0 else max(min(duration, last + 1e-6), times[-1])
    if max_seconds is not None:
        stop = min(stop, start + max_seconds)
    n = max(1, int(math.ceil((stop - start) * fps - 1e-6)))
    grid = start + np.arange(n) / fps
    # sample-and-hold: the last frame whose time is <= the grid time (the first one before it starts)
    idx = np.clip(np.searchsorted(np.asarray(times), grid + 1e-9, side="right") - 1, 0, len(times) - 1)
    return np.stack([kept[int(i)] for i in idx])


def write_video(path: str, frames: Union[np.ndarray, Sequence[np.ndarray]], fps: float,
                codec: str = "mpeg4") -> None:
    """Write uint8 frames [T, H, W, 3] (H, W even for most codecs) to ``path`` (atomically)."""
    from fractions import Fraction

    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"write_video: frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    container_format = _CONTAINER_FORMATS.get(ext, ext or None)

    def write(tmp: str) -> None:
        with av.open(tmp, mode="w", format=container_format) as container:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            if codec == "mpeg4":
                stream.options = {"qscale": "2"}
            for img in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)

    atomic_write(path, write)
