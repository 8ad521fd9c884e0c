"""The main job and the training command line: ``python -m omni2sound.train``.

Trains the schedule's stages (``omni2sound.schedule``: vae, stage1, stage2, stage3, or the stage2-only ablation)
into runs/<name>/ and, on the toy world, writes the oracle's report (report/: samples, spectrograms, loss curves,
scores) from the last DiT stage:

    python -m omni2sound.train                                          # vae, stage1, stage2, stage3, report
    python -m omni2sound.train --schedule stage2-only --stage stage2    # the same compute in stage 2 alone
    python -m omni2sound.train --preset paper --set data=features/      # from extracted features (torchrun)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, fields, replace
from typing import Optional, Sequence

import torch

from .device import device_arg, resolve_device
from .files import BadFileError, read_json
from .runs import run_dir
from .schedule import (
    RENAMED_FIELDS,
    SCHEDULES,
    STAGES,
    TRAIN_PRESETS,
    TrainConfig,
    hms,
    run_stages,
    schedule,
    stage_dir,
)

__all__ = ["TRAIN_PRESETS", "TrainConfig", "main", "parse_args", "run"]


def run(cfg: TrainConfig, stages: Optional[Sequence[str]] = None, resume: bool = False,
        init_from: Optional[str] = None, report: bool = True, encoders=None) -> dict:
    """The main job: the schedule's stages (``schedule.run_stages``), then, on the toy world, the oracle's report
    of the last DiT stage (key "report" of the returned {stage name: folder})."""
    t0 = time.time()
    outs = run_stages(cfg, stages, resume=resume, init_from=init_from, encoders=encoders)
    main_rank = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    dit = [s.name for s in schedule(cfg, stages) if s.kind == "dit"]
    if report and main_rank and cfg.data == "toy" and dit:
        from .oracle import write_report
        print(f"[train] the report: sampling and scoring every track ({hms(time.time() - t0)} elapsed)", flush=True)
        outs["report"] = write_report(cfg, outs.get(dit[-1], stage_dir(cfg, dit[-1])), enc=encoders)
    return outs


def parse_args(argv=None) -> tuple:
    p = argparse.ArgumentParser(prog="python -m omni2sound.train", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="toy", choices=sorted(TRAIN_PRESETS))
    p.add_argument("--config", help="JSON file of TrainConfig fields (over the preset)")
    p.add_argument("--stage", choices=STAGES, action="append", help="run only these stages (repeatable)")
    p.add_argument("--schedule", choices=sorted(SCHEDULES))
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoints; stops with exit status 2 if the run has nothing to "
                        "resume (no stage folder with a checkpoint or meta.json)")
    p.add_argument("--resume-or-start", action="store_true",
                   help="continue from the latest checkpoints, or start the run fresh if it has none")
    p.add_argument("--init-from", help="folder to start the first stage run from (a stage or vae folder)")
    p.add_argument("--name", help="run name (runs/<name>)")
    p.add_argument("--runs-dir")
    p.add_argument("--device", type=device_arg)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override TrainConfig fields")
    p.add_argument("--no-report", action="store_true")
    a = p.parse_args(argv)
    cfg = TRAIN_PRESETS[a.preset]
    if a.init_from and not os.path.isdir(a.init_from):
        p.error(f"--init-from {a.init_from}: no such folder (a stage or vae folder of an earlier run)")
    if a.config:
        try:
            fields_ = TrainConfig.renamed(read_json(a.config, dict, "TrainConfig fields"))
            cfg = TrainConfig.from_dict({**asdict(cfg), **fields_})
        except (OSError, ValueError) as e:          # missing, not JSON, unknown fields
            p.error(f"--config: {e}" if isinstance(e, BadFileError) else f"--config {a.config}: {e}")
    over = {}
    types = {f.name: f.type for f in fields(TrainConfig)}
    for kv in a.set:
        k, _, v = kv.partition("=")
        k = RENAMED_FIELDS.get(k, k)
        if k not in types:
            raise SystemExit(f"--set {kv}: unknown TrainConfig field {k!r}")
        if types[k] in ("str", "Optional[str]"):        # taken as written: parallel=fsdp, data=features, name=123
            over[k] = v
            continue
        try:                                            # numbers, true / false, lists, {"json": objects}
            over[k] = json.loads(v)
        except json.JSONDecodeError:
            raise SystemExit(f"--set {kv}: TrainConfig.{k} ({types[k]}) takes a JSON value, e.g. 3, 0.5, true, "
                             f"[0.5, 0.2, 0.3] or '{{\"key\": 1}}'") from None
        if isinstance(over[k], list):
            over[k] = tuple(over[k])
    for k, v in (("schedule", a.schedule), ("name", a.name), ("runs_dir", a.runs_dir), ("device", a.device)):
        if v is not None:
            over[k] = v
    cfg = replace(cfg, **over)
    if cfg.device is not None:                          # from --config or --set too: the reason, not a traceback
        try:
            resolve_device(cfg.device)
        except ValueError as e:
            p.error(f"TrainConfig.device: {e}")
    return cfg, a


def resumable(cfg: TrainConfig, stages: Optional[Sequence[str]] = None) -> list:
    """The folders of ``stages`` (default: the schedule's) that hold something to resume: a checkpoint or a
    meta.json."""
    found = []
    for stage in schedule(cfg, stages):
        out = stage_dir(cfg, stage)
        ckpts = os.path.join(out, "checkpoints")
        if os.path.isfile(os.path.join(out, "meta.json")) or (
                os.path.isdir(ckpts) and any(f.startswith("step-") and f.endswith(".pt") for f in os.listdir(ckpts))):
            found.append(out)
    return found


def main(argv=None) -> None:
    cfg, a = parse_args(argv)
    if a.resume and not a.resume_or_start and not resumable(cfg, a.stage):
        print(f"python -m omni2sound.train: error: --resume: nothing to resume in {run_dir(cfg)} (no stage folder "
              "with a checkpoint or meta.json); pass --resume-or-start to start it fresh", file=sys.stderr)
        raise SystemExit(2)
    t0 = time.time()
    outs = run(cfg, stages=a.stage, resume=a.resume or a.resume_or_start, init_from=a.init_from,
               report=not a.no_report)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[train] done in {time.time() - t0:.0f} s: " + ", ".join(f"{k}: {v}" for k, v in outs.items()))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
