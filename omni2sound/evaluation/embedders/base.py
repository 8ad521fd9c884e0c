"""The audio-embedder interface the metrics run on, and the batching that every embedder shares."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ...files import content_hash


@dataclass
class AudioFeatures:
    """What one embedder makes of a batch of clips.
    embedding: [B, D] one vector per clip, or, for a frame-level embedder, a list of B arrays [F_i, D]
    (av-benchmark pools the frames of all clips: VGGish); logits: [B, C] class logits before any sigmoid,
    or None for an embedder without a classifier head."""
    embedding: object
    logits: Optional[Tensor] = None


class AudioEmbedder:
    """name: the metric suffix (FD_<name>, KL_<name>, IS_<name>); sample_rate: the input rate;
    frame_level: the FD pools frames of all clips; checkpoint: the weights file (hashed into metrics.json)."""
    name: str = "audio"
    sample_rate: int = 16000
    frame_level: bool = False
    has_logits: bool = False
    checkpoint: Optional[str] = None

    def embed(self, audio: Tensor) -> AudioFeatures:        # audio [B, N] mono at self.sample_rate
        raise NotImplementedError

    def to(self, device, dtype: Optional[torch.dtype] = None) -> "AudioEmbedder":
        return self


def sha256_file(path: str) -> str:
    """The checkpoint's sha256 (recorded in metrics.json beside the scores it produced)."""
    return content_hash(path, chunk=1 << 22)


def load_strict(model: torch.nn.Module, sd: dict, path: str, what: str) -> None:
    """Load a released state dict with strict=True; a mismatch is a ValueError naming the file and the model."""
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: not a {what} checkpoint: {str(e).splitlines()[0]}") from e


def load_torch_checkpoint(path: str, what: str) -> dict:
    """A released `.pth`/`.pt` checkpoint's state dict, loaded on the CPU without unpickling code objects;
    unwraps the {"model": ...} / {"state_dict": ...} containers the releases use."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: checkpoint not found: {path} (weights are never downloaded; pass a local "
                                "file)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                                          # noqa: BLE001 - named in the message
        raise ValueError(f"{path}: not a readable {what} checkpoint: {e}") from e
    for key in ("model", "state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict in the {what} checkpoint, got {type(sd).__name__}")
    return sd
