"""TensorBoard event files beside a training stage's log.jsonl (``tensorboard --logdir runs/NAME``).

Scalars are grouped as TensorBoard shows them: ``loss/all`` and ``loss/<task>`` (v2a, t2a, vt2a), ``loss_by_time/
bin<i>`` (the flow-matching loss per band of t), ``optim/lr``, ``optim/grad_norm``, ``speed/tokens_per_s``,
``speed/samples_per_s``, ``speed/mfu``, ``gpu/<field>`` (memory, clocks, power, temperature); the report adds its
sample audio and spectrograms. Without the ``tensorboard`` package it warns once and writes nothing (the JSON
lines stay the log); ``TrainConfig.tensorboard = False`` (``--set tensorboard=false``) turns it off.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Optional

_warned = False
_GROUPS = {"lr": "optim/lr", "grad_norm": "optim/grad_norm", "tokens_per_s": "speed/tokens_per_s",
           "samples_per_s": "speed/samples_per_s", "mfu": "speed/mfu", "loss": "loss/all"}


def _writer(folder: str, purge_step: Optional[int] = None):
    global _warned
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as e:      # noqa: BLE001 - tensorboard missing or broken: the JSON lines are the log
        if not _warned:
            warnings.warn(f"TensorBoard logging is off: {e} (pip install tensorboard, or --set tensorboard=false "
                          "to silence this)", RuntimeWarning, stacklevel=3)
            _warned = True
        return None
    return SummaryWriter(folder, purge_step=purge_step)


class TensorBoardLog:
    """Writes to ``out_dir/tb``; every method is a no-op when disabled or when tensorboard is missing.

    ``purge_step`` (a resumed run: the checkpoint's step + 1) makes TensorBoard drop the events that earlier files
    hold at that step or later, the rows a killed run logged after its last checkpoint and that the resumed run logs
    again, so every step shows once, as in log.jsonl.
    """

    def __init__(self, out_dir: str, enabled: bool = True, purge_step: Optional[int] = None):
        self.writer = _writer(os.path.join(out_dir, "tb"), purge_step) if enabled else None

    @property
    def active(self) -> bool:
        return self.writer is not None

    def scalars(self, row: dict, step: int) -> None:
        """One training log row: {"loss", "task", "loss_bin0", ..., "lr", "grad_norm", "tokens_per_s", "mfu",
        "gpu_*", ...}; non-numeric and non-finite values are skipped."""
        if self.writer is None:
            return
        for k, v in row.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or k == "step" or not math.isfinite(v):
                continue
            if k.startswith("loss_bin"):
                tag = f"loss_by_time/bin{k[len('loss_bin'):]}"
            elif k.startswith("gpu_"):
                tag = f"gpu/{k[4:]}"
            else:
                tag = _GROUPS.get(k, f"train/{k}")
            self.writer.add_scalar(tag, v, step)
        if isinstance(row.get("task"), str) and isinstance(row.get("loss"), (int, float)):
            self.writer.add_scalar(f"loss/{row['task']}", row["loss"], step)

    def audio(self, tag: str, wav, sample_rate: int, step: int = 0) -> None:
        if self.writer is None:
            return
        import torch
        wav = torch.as_tensor(wav).detach().float().cpu().reshape(1, -1)
        self.writer.add_audio(tag, wav.clamp(-1, 1), step, sample_rate=sample_rate)

    def image_file(self, tag: str, png: str, step: int = 0) -> None:
        """A PNG (a spectrogram, the loss curves) as an image."""
        if self.writer is None:
            return
        import matplotlib.image as mpimg
        img = mpimg.imread(png)                       # [H, W, 3 or 4] float in [0, 1]
        self.writer.add_image(tag, img[..., :3], step, dataformats="HWC")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def report_to_tensorboard(out_dir: str, samples: list, sample_rate: int, enabled: bool = True,
                          step: Optional[int] = 0) -> None:
    """The report's samples: [(name, wav [N], spectrogram png path, prompt)] -> audio, images and prompts."""
    tb = TensorBoardLog(out_dir, enabled)
    for name, wav, png, prompt in samples:
        tb.audio(f"report/{name}", wav, sample_rate, step)
        tb.image_file(f"report/{name}_spectrogram", png, step)
        tb.text(f"report/{name}_prompt", prompt, step)
    tb.close()
