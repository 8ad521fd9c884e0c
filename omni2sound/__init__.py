"""omni2sound: unified video-and-text-to-audio generation (Omni2Sound) on fused kernels."""

__version__ = "0.1.0"
