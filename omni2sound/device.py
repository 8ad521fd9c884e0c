"""Devices: one check of a device the user names (``--device``, ``from_pretrained(device=...)``) before anything is
loaded, and what a device supports (fused AdamW)."""
from __future__ import annotations

import argparse
from typing import Union

import torch


def resolve_device(device: Union[str, torch.device]) -> torch.device:
    """torch.device(device), or a ValueError that says why it cannot be used here: a malformed name, a CUDA device
    with a torch built without CUDA or no GPU visible, an index past the visible GPUs. (torch itself fails later and
    less clearly: an AssertionError or an AttributeError from deep inside the first CUDA call.)"""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a device name ({e})") from None
    if d.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise ValueError(f"device {str(device)!r}: this torch ({torch.__version__}) was built without CUDA; "
                             "use cpu")
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: no CUDA GPU is visible (CUDA_VISIBLE_DEVICES / driver); use cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return d


def device_arg(text: str) -> str:
    """argparse ``type=`` for --device: the name as given, or an argument error (exit 2) with the reason."""
    try:
        resolve_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def fused_adamw_ok(device) -> bool:
    """AdamW's fused implementation (one vectorised pass per parameter group instead of ~8 elementwise passes per
    parameter) runs on CUDA and, since torch 2.4, on the CPU: on this project's 2-core box it steps 80 M parameters in
    82 ms against 299 ms for the default for-loop implementation (268 ms foreach). Other devices keep the default."""
    return torch.device(device).type in ("cuda", "cpu")


def default_device() -> str:
    """The device generation uses when none is named (the CLI's ``--device`` and ``from_pretrained``): the first
    CUDA GPU when one is visible, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"
