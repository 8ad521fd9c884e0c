"""omni2sound: unified video-and-text-to-audio generation (Omni2Sound) on fused kernels.

    from omni2sound import Omni2SoundPipeline, save_audio, mux_audio
    pipe = Omni2SoundPipeline.from_pretrained("runs/toy/stage3")
    out = pipe.generate(video="clip.mp4", text="a dog barks")
    mux_audio("clip.mp4", out.audio[0], out.sample_rate, "clip_with_sound.mp4")

The names below load on first use, so ``import omni2sound`` stays cheap (no torch import until one is used).
"""
from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Omni2SoundPipeline": "pipeline",
    "PipelineConfig": "pipeline",
    "SamplingOptions": "pipeline",
    "GenerationResult": "pipeline",
    "Omni2SoundDiT": "model",
    "DiTConfig": "model",
    "AudioVAE": "vae",
    "VAEConfig": "vae",
    "load_audio": "audio",
    "save_audio": "audio",
    "read_video": "video",
    "mux_audio": "mux",
    "video_duration": "mux",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'omni2sound' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value                   # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:      # static analysers and IDEs see the real names
    from .audio import load_audio, save_audio  # noqa: F401
    from .model import DiTConfig, Omni2SoundDiT  # noqa: F401
    from .mux import mux_audio, video_duration  # noqa: F401
    from .pipeline import GenerationResult, Omni2SoundPipeline, PipelineConfig, SamplingOptions  # noqa: F401
    from .vae import AudioVAE, VAEConfig  # noqa: F401
    from .video import read_video  # noqa: F401
