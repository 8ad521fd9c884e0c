"""A training run's folders and the ``meta.json`` that marks a finished step of it.

    <runs_dir>/<name>/vae/            the audio VAE
    <runs_dir>/<name>/features/       extracted latents and condition features (+ meta.json: the inputs' key)
    <runs_dir>/<name>/<stage folder>/ one DiT stage (the stage's ``folder``: stage1, stage2, stage2-only, ...)
    <runs_dir>/<name>/report*/        the toy oracle's report

A folder whose ``meta.json`` says ``"complete": true`` is done: a resumed run skips it.
"""
from __future__ import annotations

import os
from typing import Optional

from .files import read_json, write_json

META_NAME = "meta.json"


def run_dir(cfg, *parts: str) -> str:
    """``<cfg.runs_dir>/<cfg.name>/<parts...>`` (cfg: a TrainConfig, or anything with ``runs_dir`` and ``name``)."""
    return os.path.join(cfg.runs_dir, cfg.name, *parts)


def read_meta(directory: str) -> Optional[dict]:
    """The folder's meta.json, or None when it has none yet."""
    p = os.path.join(directory, META_NAME)
    if not os.path.isfile(p):
        return None
    return read_json(p, dict, "a run folder's meta.json")      # broken: one line naming the file


def write_meta(directory: str, meta: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    write_json(os.path.join(directory, META_NAME), meta)
