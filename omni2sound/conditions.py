"""The conditions of one batch, as the network reads them, and the task masks that drop them.

A sample may have video, text, both or neither (the CFG null pass). A missing modality is left out:
its length is 0 and the network never attends to padding (the varlen cross-attention packs only the
real tokens). Sync features of a sample without video are zeros.

Shapes (B = batch):
    text_tokens   [B, Lt, Dt]  float, padded on the right; text_lens [B] int64, 0 = no text
    video_tokens  [B, Lv, Dv]  float, 8 per second, padded; video_lens [B] int64, 0 = no video
    sync          [B, Ts, Ds]  float, 24 per second (Synchformer rate); zeros where there is no video
    duration      [B]          float seconds of audio to make
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch

TASKS = ("v2a", "t2a", "vt2a")


@dataclass
class Conditions:
    text_tokens: torch.Tensor
    text_lens: torch.Tensor
    video_tokens: torch.Tensor
    video_lens: torch.Tensor
    sync: torch.Tensor
    duration: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.duration.shape[0]

    @property
    def has_text(self) -> torch.Tensor:
        return self.text_lens > 0

    @property
    def has_video(self) -> torch.Tensor:
        return self.video_lens > 0

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "Conditions":
        """Move to a device; float tensors (not lengths) also to dtype when given."""
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            if t.is_floating_point() and f.name != "duration":
                out[f.name] = t.to(device=device, dtype=dtype or t.dtype)
            else:
                out[f.name] = t.to(device=device)
        return Conditions(**out)

    def drop(self, keep_text: Optional[torch.Tensor] = None, keep_video: Optional[torch.Tensor] = None
             ) -> "Conditions":
        """Drop text and/or video per sample (bool [B] masks, True = keep). Used by task sampling,
        null-condition dropout and classifier-free guidance."""
        c = self
        if keep_text is not None:
            keep_text = keep_text.to(self.text_lens.device)
            c = replace(c, text_lens=torch.where(keep_text, c.text_lens, torch.zeros_like(c.text_lens)))
        if keep_video is not None:
            keep_video = keep_video.to(self.video_lens.device)
            c = replace(c, video_lens=torch.where(keep_video, c.video_lens, torch.zeros_like(c.video_lens)),
                        sync=c.sync * keep_video.to(c.sync.dtype).view(-1, 1, 1).to(c.sync.device))
        return c

    def for_task(self, task: str) -> "Conditions":
        """The whole batch as one task of the multi-task schedule: v2a (no text), t2a (no video), vt2a."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
        ones = torch.ones(self.batch_size, dtype=torch.bool)
        zeros = torch.zeros(self.batch_size, dtype=torch.bool)
        return self.drop(keep_text=zeros if task == "v2a" else ones, keep_video=zeros if task == "t2a" else ones)

    @staticmethod
    def cat(items: "list[Conditions]") -> "Conditions":
        """Concatenate along the batch (padding token axes to the longest)."""
        def pad_cat(ts):
            n = max(t.shape[1] for t in ts)
            return torch.cat([torch.nn.functional.pad(t, (0, 0, 0, n - t.shape[1])) for t in ts], 0)

        return Conditions(
            text_tokens=pad_cat([c.text_tokens for c in items]),
            text_lens=torch.cat([c.text_lens for c in items]),
            video_tokens=pad_cat([c.video_tokens for c in items]),
            video_lens=torch.cat([c.video_lens for c in items]),
            sync=pad_cat([c.sync for c in items]),
            duration=torch.cat([c.duration for c in items]),
        )

    def validate_shapes(self) -> None:
        """The shape checks of validate(), which read no device value (no host sync)."""
        B = self.batch_size
        for name in ("text_tokens", "video_tokens", "sync"):
            t = getattr(self, name)
            if t.dim() != 3 or t.shape[0] != B:
                raise ValueError(f"Conditions.{name} must be [B={B}, L, D], got {tuple(t.shape)}")
        for name in ("text_lens", "video_lens", "duration"):
            if getattr(self, name).shape != (B,):
                raise ValueError(f"Conditions.{name} must be [B={B}], got {tuple(getattr(self, name).shape)}")

    def validate(self) -> None:
        """Clear errors for malformed conditions (shape mismatch, NaN, lengths out of range)."""
        self.validate_shapes()
        for name in ("text_tokens", "video_tokens", "sync"):
            if not torch.isfinite(getattr(self, name)).all():
                raise ValueError(f"Conditions.{name} holds NaN or inf")
        for name, tokens in (("text_lens", self.text_tokens), ("video_lens", self.video_tokens)):
            lens = getattr(self, name)
            if (lens < 0).any() or (lens > tokens.shape[1]).any():
                raise ValueError(f"Conditions.{name} out of range [0, {tokens.shape[1]}]: {lens.tolist()}")
        if (self.duration <= 0).any() or not torch.isfinite(self.duration).all():
            raise ValueError(f"duration must be positive seconds, got {self.duration.tolist()}")
