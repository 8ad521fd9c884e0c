"""What flows between the stages: a clip with its decoded media, and an agent's reply with its usage."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class Clip:
    index: int                          # position in the manifest
    record: dict                        # the manifest record, as read (paths resolved)
    key: str                            # content hash of the clip and the config
    audio: np.ndarray                   # [N] float32 mono at sample_rate
    sample_rate: int
    frames: Optional[np.ndarray]        # [T, H, W, 3] uint8 at frames_fps, None without video
    frames_fps: float = 1.0
    encoded: dict = field(default_factory=dict)     # the media as sent in requests (base64), made once per clip

    @property
    def duration(self) -> float:
        return len(self.audio) / self.sample_rate


@dataclass
class Reply:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0          # reasoning tokens included (they are billed as output)
    reasoning_tokens: int = 0
    cost: float = 0.0                   # USD, from the agent's price table
    agent: str = ""
    attempts: int = 1
    complex: bool = False               # the captioner judged the clip complex
    injected: Optional[str] = None      # toy agents only: the hallucination they injected
    extra: dict = field(default_factory=dict)


class AgentCallError(RuntimeError):
    """An agent's request failed after every retry (the message says why)."""
