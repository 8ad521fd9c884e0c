"""Shared by the video-out, batch and demo tests: videos made with PyAV and a tiny random model folder (importable
because pytest puts tests/ on sys.path)."""
from fractions import Fraction

import av
import numpy as np
import torch


def make_video(path, fps: float, seconds: float, vfr: bool = False, size: int = 32, codec: str = "mpeg4",
               with_audio: bool = False) -> str:
    """A moving-block clip of ``seconds`` at ``fps`` (vfr: frame gaps alternating 0.5x and 1.25x the period, on a
    1 ms clock); ``with_audio`` adds a sine AAC track the output must replace."""
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        if vfr:
            s.codec_context.time_base = Fraction(1, 1000)
        a = c.add_stream("aac", rate=44100) if with_audio else None
        n, t = int(round(seconds * fps)), 0.0
        for i in range(n):
            img = np.full((size, size, 3), 40, np.uint8)
            b = max(8, size // 4)
            x = (2 * i) % (size - b)
            img[size // 3:size // 3 + b, x:x + b] = (230, 60, 40)
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            if vfr:
                f.pts, f.time_base = int(round(t * 1000)), Fraction(1, 1000)
                t += (1 / fps) * (0.5 if i % 3 == 0 else 1.25)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
        if a is not None:
            k = int(seconds * 44100)
            pcm = (0.3 * np.sin(2 * np.pi * 440 * np.arange(k) / 44100)).astype(np.float32)
            for j in range(0, k, 1024):
                fr = av.AudioFrame.from_ndarray(pcm[None, j:j + 1024], format="fltp", layout="mono")
                fr.sample_rate, fr.pts = 44100, j
                for p in a.encode(fr):
                    c.mux(p)
            for p in a.encode(None):
                c.mux(p)
    return str(path)


def tiny_model(folder, seed: int = 0, max_duration: float = 2.0) -> str:
    """A random tiny pipeline saved in the released layout (DIR/dit, DIR/vae, DIR/pipeline.json)."""
    from omni2sound.model import Omni2SoundDiT, dit_config
    from omni2sound.pipeline import Omni2SoundPipeline, PipelineConfig
    from omni2sound.vae import VAE_PRESETS, AudioVAE
    torch.manual_seed(seed)
    dit = Omni2SoundDiT(dit_config("tiny", hidden_dim=64, depth=2, num_heads=2, max_duration=max_duration))
    with torch.no_grad():      # adaLN-Zero makes a fresh model output zeros; give it a real function
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    Omni2SoundPipeline(dit, AudioVAE(VAE_PRESETS["tiny"]), PipelineConfig(window_overlap=0.5)).save_pretrained(
        str(folder))
    return str(folder)
