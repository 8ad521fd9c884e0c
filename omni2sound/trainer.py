"""Training machinery shared by every stage: one loop, whatever the loss.

    for step in range(start, total):
        for each micro-batch c of this rank:       # global batch = world * accum * micro
            loss, logs = loss_fn(module, step, c)  # every random draw of (step, c) comes from its own seed
            (loss / accum).backward()              # DDP averages over ranks on the last micro-batch
        clip grads -> AdamW step -> warm-up + cosine LR -> EMA update -> log -> checkpoint

Because a step's data, task and noise are functions of (seed, step, micro-batch index) alone, a run
resumed from a checkpoint (model, EMA, optimiser, scheduler, RNG states, data position) repeats the
losses of an uninterrupted run exactly, and 2 ranks x 1 micro-batch make the same update as 1 rank x 2.

Distributed: launched by torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the environment);
NCCL on GPUs, gloo on the CPU; DDP, or FSDP2 (``fully_shard``: each DiT block its own unit, then the root; parameters,
gradients, optimiser and EMA state sharded across ranks), on GPUs and on the CPU. bf16 autocast on GPU.
Checkpoints have one format whatever the mode: full (unsharded) model, EMA and optimiser state, the optimiser's
keyed by parameter index as torch's own state_dict; a run may resume under another world size or mode. They hold
tensors and plain containers only (RNG states included) and load with ``weights_only=True``, so a crafted file cannot
run code; resume takes the newest one that loads (naming each it skipped) and cuts log.jsonl back to its step.
The cost at scale: under FSDP2 rank 0 gathers the full state into its host memory to write it, and reads it back
alone on resume, broadcasting it (L with AdamW and EMA: ~21 GB of host memory on rank 0). Sharded
(torch.distributed.checkpoint) files would avoid the gather; not done.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .device import fused_adamw_ok, resolve_device
from .files import BadFileError, atomic_write, load_torch, remove_stale_temps, write_json
from .gpu_info import gpu_info, gpu_sample
from .optim import MasterWeightAdamW, training_autocast
from .tblog import TensorBoardLog

# ----------------------------------------------------------------------------------------------------
# Distributed setup
# ----------------------------------------------------------------------------------------------------


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: Optional[str] = None, timeout_s: Optional[float] = None) -> DistInfo:
    """From torchrun's environment; single process when WORLD_SIZE is unset or 1.

    timeout_s bounds the rendezvous and every collective (torch's default is 10-30 minutes, which turns a peer that
    never arrives into a silent half-hour hang); OMNI2SOUND_DIST_TIMEOUT sets it from the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda":          # `--device cuda`: each rank its own GPU (set_device needs an index)
        device = f"cuda:{local}"
    resolve_device(device)          # a clear error for a GPU that is not there
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if world > 1 and not dist.is_initialized():
        if timeout_s is None and os.environ.get("OMNI2SOUND_DIST_TIMEOUT"):
            timeout_s = float(os.environ["OMNI2SOUND_DIST_TIMEOUT"])
        kw = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=rank, world_size=world, **kw)
    return DistInfo(rank, world, local, device)


def seeded(*keys: int) -> torch.Generator:
    """A CPU generator whose stream depends only on the keys (seed, stage, step, micro-batch, ...)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0]))


# ----------------------------------------------------------------------------------------------------
# Optimisation pieces
# ----------------------------------------------------------------------------------------------------


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.95)
    warmup: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True          # decay min(ema_decay, (1 + n) / (10 + n)): early EMA follows the model


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up over `warmup` steps, then cosine decay to min_ratio at `total`."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    return f


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:             # a torch without DTensor: nothing is sharded
        return False
    return isinstance(t, DTensor)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded parameter / state (a collective: every rank must call it), else t."""
    return t.full_tensor() if _is_dtensor(t) else t


class EMA:
    """Exponential moving average of the trainable parameters (fp32 shadow copies). Under FSDP2 each shadow is
    sharded as its parameter (a DTensor): the update is local; state_dict gathers (every rank must call it)."""

    def __init__(self, module: nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.shadow = {k: p.detach().float().clone() for k, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module, named=None) -> None:
        """named: (name, weight) pairs to average instead of module.named_parameters() (e.g. fp32 master weights
        of a module that holds bf16 copies)."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        named = module.named_parameters() if named is None else named
        pairs = [(self.shadow[k], p.detach()) for k, p in named if k in self.shadow]
        same = [(s, p) for s, p in pairs if p.dtype == s.dtype and p.device == s.device]
        if same:        # one multi-tensor kernel instead of one launch per parameter (hundreds per step)
            torch._foreach_lerp_([s for s, _ in same], [p for _, p in same], 1 - d)
        for s, p in pairs:
            if p.dtype != s.dtype or p.device != s.device:
                s.lerp_(p.float().to(s.device), 1 - d)

    @torch.no_grad()
    def copy_to(self, module: nn.Module, shadow: Optional[dict] = None) -> None:
        """Write the averages into module's parameters; shadow: full shadows to use instead of this EMA's own (e.g.
        ``state_dict()["shadow"]`` gathered under FSDP2, for an unsharded copy of the model)."""
        shadow = self.shadow if shadow is None else shadow
        for k, p in module.named_parameters():
            if k in shadow:
                p.copy_(shadow[k].to(p.dtype))

    def state_dict(self) -> dict:
        """Full (unsharded) shadows; a collective under FSDP2, whose gathered tensors go to host memory one by one
        (a device would otherwise hold the whole EMA on every rank)."""
        return {"decay": self.decay, "updates": self.updates, "warmup": self.warmup,
                "shadow": {k: v.full_tensor().cpu() if _is_dtensor(v) else v for k, v in self.shadow.items()}}

    def load_state_dict(self, s: dict) -> None:
        """From full shadows (any world size); each is sharded as the current shadow of that name is."""
        self.decay, self.updates = s["decay"], s["updates"]
        self.warmup = s.get("warmup", self.warmup)       # absent in checkpoints written before it was saved
        missing = set(self.shadow) - set(s["shadow"])
        if missing:
            raise ValueError(f"EMA state is missing {sorted(missing)[:5]}")
        self.shadow = {k: _like(self.shadow.get(k), v) for k, v in s["shadow"].items()}


def _like(ref: Optional[torch.Tensor], full: torch.Tensor) -> torch.Tensor:
    """An fp32 copy of the full tensor, sharded (and placed) as ref when ref is a DTensor."""
    if _is_dtensor(ref):
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(full.detach().float().to(ref.device), ref.device_mesh, ref.placements)
    return full.detach().float().clone().to(ref.device if ref is not None else full.device)


def rng_state() -> dict:
    """Every RNG's state as tensors and plain containers (what a ``weights_only`` load accepts): numpy's MT19937
    keys and Python's Mersenne Twister words as int64 tensors beside their scalars."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, words, py_gauss = random.getstate()
    s = {"torch": torch.get_rng_state(),
         "numpy": {"bit_generator": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                   "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
         "python": {"version": int(version), "state": torch.tensor(words, dtype=torch.int64),
                    "gauss_next": None if py_gauss is None else float(py_gauss)}}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    """Restore what ``rng_state`` saved; also takes the earlier layout (numpy's and Python's own state tuples)."""
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    if isinstance(n, (tuple, list)):
        np.random.set_state(tuple(n))
    else:
        np.random.set_state((n["bit_generator"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    p = s["python"]
    if isinstance(p, (tuple, list)):
        random.setstate((p[0], tuple(p[1]), p[2]))
    else:
        random.setstate((p["version"], tuple(int(w) for w in p["state"].tolist()), p["gauss_next"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# what a resume checkpoint holds; a file missing any of them was not written by Trainer.save_checkpoint
CHECKPOINT_KEYS = ("model", "ema", "optimizer", "scheduler", "step", "rng")


def read_checkpoint(path: str) -> dict:
    """A resume checkpoint, loaded with ``weights_only=True`` (tensors and plain containers only: a crafted file
    cannot run code; plain numpy arrays are accepted for the RNG state of earlier checkpoints). BadFileError, one
    line naming the file, when it is truncated, refused or incomplete."""
    ck = load_torch(path, numpy_arrays=True)
    if not isinstance(ck, dict):
        raise BadFileError(path, f"holds a {type(ck).__name__}, expected a resume checkpoint (a dict)")
    missing = [k for k in CHECKPOINT_KEYS if k not in ck]
    if missing:
        raise BadFileError(path, f"not a resume checkpoint: no {', '.join(missing)}")
    return ck


def cut_log(path: str, step: int) -> int:
    """Rewrite the JSON-lines training log at ``path`` (atomically) keeping the rows of steps <= step, so a resumed
    run that logs the later steps again lists every step once; a torn last line (a kill mid-write) goes too.
    Returns the number of rows kept (0 when there is no log)."""
    if not os.path.exists(path):
        return 0
    kept = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    atomic_write(path, "".join(kept))
    return len(kept)


def atomic_torch_save(obj, path: str) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_json(obj, path: str) -> None:
    write_json(path, obj)


# GPU peak dense bf16 TFLOP/s for MFU (H100/H200 SXM: 989 TFLOP/s spec; the measured GEMM ceiling is ~800)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def peak_flops(device: str) -> Optional[float]:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    for k, v in PEAK_TFLOPS.items():
        if k in name:
            return v * 1e12
    return None


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------


@dataclass
class LoopConfig:
    steps: int = 100
    micro_batch: int = 16
    accum: int = 1
    log_every: int = 10
    ckpt_every: int = 100
    keep_last: int = 2
    bf16: bool = True                 # autocast on GPU only
    grad_checkpointing: bool = False
    compile: bool = False
    # Replay each step from a CUDA graph (the Trainer's graph_step, e.g. omni2sound/graphed_step.py for the DiT; an L
    # step on an H200: 245 -> 180 ms, the host's launches were the bound). One process, accum 1; off a GPU the same
    # static step runs eagerly.
    cuda_graph: bool = False
    parallel: str = "ddp"             # "ddp" | "fsdp" (FSDP2, when WORLD_SIZE > 1)
    # FSDP2 on GPU with bf16: gather the weights in bf16 (half the all-gather bytes and the unsharded copies) and
    # reduce the gradients in fp32; the sharded master weights, AdamW and the EMA stay fp32. Inputs are not cast
    # (the timestep must keep its fp32 resolution); autocast runs as without it.
    fsdp_bf16_params: bool = True
    # Train the matrix weights as bf16 copies of fp32 master weights (omni2sound/optim.py): the optimiser step writes
    # the copies, the forward reads them as they are (no per-forward cast) and their gradients stay bf16 (no cast
    # back): 15.5 GB less traffic per L step. Needs bf16 (it turns autocast on for the run's device, the CPU
    # included); one process, no FSDP. Checkpoints hold the fp32 masters, as without it.
    bf16_weights: bool = False
    progress: bool = True
    tensorboard: bool = True          # event files in out_dir/tb (tblog.py); needs the tensorboard package
    desc: Optional[str] = None        # the progress bar's label (default: the stage folder's name)


LossFn = Callable[[nn.Module, int, int], tuple]   # (module, step, chunk) -> (loss, logs)
# LoopConfig.cuda_graph: (model, optimizer, autocast dtype or None, before_step or None) -> a function (step, chunk)
# -> (loss, logs) that runs a whole optimiser step (forward, backward, before_step, optimizer.step) from a CUDA graph
GraphStepFactory = Callable[[nn.Module, torch.optim.Optimizer, Optional[torch.dtype], Optional[Callable[[], None]]],
                            Callable[[int, int], tuple]]


class Trainer:
    """Runs one stage: `Trainer(model, loss_fn, loop, optim, out_dir, dist).fit(resume=...)`.

    loss_fn(module, step, chunk) returns (loss, logs); logs may hold "task" (str), "samples" and
    "tokens" (ints, per micro-batch) and scalar tensors/floats. `flops_per_token` (optional) gives MFU."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, loop: LoopConfig, optim: OptimConfig, out_dir: str,
                 info: Optional[DistInfo] = None, flops_per_token: Optional[float] = None, meta: Optional[dict] = None,
                 graph_step: Optional[GraphStepFactory] = None):
        self.info = info or DistInfo()
        self.model, self.loss_fn, self.loop, self.optim_cfg = model, loss_fn, loop, optim
        self.out_dir, self.flops_per_token, self.meta = out_dir, flops_per_token, meta or {}
        self.ckpt_dir = os.path.join(out_dir, "checkpoints")
        os.makedirs(self.ckpt_dir, exist_ok=True)
        if loop.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"LoopConfig.parallel must be 'ddp' or 'fsdp', got {loop.parallel!r}")
        model.to(self.info.device)
        if loop.grad_checkpointing:
            enable_grad_checkpointing(model)
        self.module = model
        # FSDP2 over every rank; also over a 1-rank group that the caller initialised (a one-GPU check of the
        # sharded path: NCCL refuses two ranks on one device)
        group = dist.is_available() and dist.is_initialized()
        self.sharded = loop.parallel == "fsdp" and (self.info.world > 1 or group)
        if self.sharded:
            mp = loop.bf16 and loop.fsdp_bf16_params and self.info.device.startswith("cuda")
            shard_model(model, self.info, bf16_params=mp)   # in place: parameters become DTensors
        elif self.info.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.module = DDP(model, device_ids=[self.info.local_rank] if self.info.device != "cpu" else None)
        self.ema = EMA(model, optim.ema_decay, optim.ema_warmup)       # after sharding: sharded as the parameters
        self.step_module = torch.compile(self.module) if loop.compile else self.module
        # AdamW's two groups (weight decay on matrices only), built once with their names: checkpoints key the
        # optimiser state by index (torch's own format) in every mode, FSDP2's state-dict API keys it by name
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [[(n, p) for n, p in trained if p.dim() >= 2], [(n, p) for n, p in trained if p.dim() < 2]]
        self._opt_names = [[n for n, _ in g] for g in groups]
        decay, no_decay = ([p for _, p in g] for g in groups)
        graph_gpu = loop.cuda_graph and self.info.device.startswith("cuda")
        if loop.cuda_graph:
            self._check_graph_setup(graph_step)
        if loop.bf16_weights:
            why = [w for bad, w in ((not loop.bf16, "bf16"), (self.info.world > 1 or self.sharded, "one process, no "
                                    "FSDP")) if bad]
            if why:
                raise ValueError("LoopConfig.bf16_weights needs " + ", ".join(why))
        # A replayed optimiser step reads its learning rate and step count from the GPU: a tensor lr (the
        # scheduler fills it in place) and capturable state.
        lr = torch.tensor(optim.lr, device=self.info.device) if graph_gpu else optim.lr
        param_groups = [{"params": decay, "weight_decay": optim.weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}]
        if loop.bf16_weights:       # the module's matrix weights become bf16 copies here
            self.opt = MasterWeightAdamW(param_groups, lr=lr, betas=tuple(optim.betas))
        else:
            self.opt = torch.optim.AdamW(param_groups, lr=lr, betas=tuple(optim.betas),
                                         fused=fused_adamw_ok(self.info.device),
                                         **({"capturable": True} if graph_gpu else {}))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(optim.warmup, loop.steps, optim.min_lr_ratio))
        self.graphed = None
        if loop.cuda_graph:
            self._gnorm = torch.zeros((), device=self.info.device)
            self.graphed = graph_step(model, self.opt, torch.bfloat16 if loop.bf16 else None,
                                      self._clip if optim.grad_clip > 0 else None)
        self.step = 0
        self.history: list = []

    # -- checkpoints ----------------------------------------------------------------------------------
    def checkpoints(self) -> list:
        return sorted(f for f in os.listdir(self.ckpt_dir) if f.startswith("step-") and f.endswith(".pt"))

    def _full_state(self, optimizer: bool = True) -> tuple:
        """(model, optimiser, EMA) state, full and in the one checkpoint format; under FSDP2 a collective whose
        result only the main rank holds. optimizer=False: None in its place (nothing gathered for it)."""
        ema = self.ema.state_dict()
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model = get_model_state_dict(self.model, options=opts)
            if not optimizer:
                return model, None, ema
            opt = get_optimizer_state_dict(self.model, self.opt, options=opts)
            return model, (self._opt_by_index(opt) if self.info.main else None), ema
        model = self.opt.master_state_dict(self.model) if self.loop.bf16_weights else self.model.state_dict()
        return model, self.opt.state_dict() if optimizer else None, ema

    def _opt_by_index(self, named: dict) -> dict:
        """FSDP2's optimiser state (keyed by parameter name) -> torch's format (keyed by index in group order)."""
        index = {n: i for i, n in enumerate(n for group in self._opt_names for n in group)}
        return {"state": {index[n]: v for n, v in named["state"].items()},
                "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]]}

    def _opt_by_name(self, indexed: dict) -> dict:
        names = [n for group in self._opt_names for n in group]
        if len(indexed["param_groups"]) != len(self._opt_names) or any(
                len(g["params"]) != len(mine) for g, mine in zip(indexed["param_groups"], self._opt_names)):
            raise ValueError("checkpoint optimiser state does not match this model's parameter groups")
        return {"state": {names[i]: v for i, v in indexed["state"].items()},
                "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in indexed["param_groups"]]}

    def export_weights(self) -> tuple:
        """(trained weights, EMA shadows) as full state dicts: what a stage saves at its end. A collective under
        FSDP2 (every rank must call it; only the main rank's result holds the weights)."""
        model, _, ema = self._full_state(optimizer=False)     # AdamW's state (2x the model) is not gathered
        return model, ema["shadow"]

    def save_checkpoint(self) -> Optional[str]:
        model_state, opt_state, ema_state = self._full_state()
        if not self.info.main:
            return None
        path = os.path.join(self.ckpt_dir, f"step-{self.step:07d}.pt")
        # meta through JSON: plain containers only, so the file loads with weights_only=True
        meta = json.loads(json.dumps(self.meta, default=str))
        atomic_torch_save({"model": model_state, "ema": ema_state, "optimizer": opt_state,
                           "scheduler": self.sched.state_dict(), "step": self.step,
                           "data_position": self.step * self.global_batch, "rng": rng_state(),
                           "meta": meta, "history": self.history}, path)
        for old in self.checkpoints()[:-self.loop.keep_last]:
            os.remove(os.path.join(self.ckpt_dir, old))
        return path

    def latest_checkpoint(self) -> tuple:
        """(path, loaded checkpoint) of the newest checkpoint that loads, or (None, None) when there is none; each
        newer one that does not (truncated by a kill, refused, incomplete) is reported on stderr with the reason and
        skipped. Checkpoints of which none loads raise BadFileError (starting over would bury them)."""
        skipped = []
        for name in reversed(self.checkpoints()):
            path = os.path.join(self.ckpt_dir, name)
            try:
                return path, read_checkpoint(path)
            except BadFileError as e:
                skipped.append(e)
                print(f"[train] resume: skipped {e}", file=sys.stderr)
        if skipped:
            raise BadFileError(self.ckpt_dir, f"none of its {len(skipped)} checkpoints loads (newest: "
                                              f"{skipped[0].problem}); move them away to start this stage over")
        return None, None

    def load_checkpoint(self, path: Optional[str], ck: Optional[dict] = None) -> None:
        """Restore everything from a resume checkpoint: the file at ``path`` or the already loaded ``ck``. Under
        FSDP2 only the main rank reads (the others pass None for both)."""
        if ck is None and path is not None and (self.info.main or not self.sharded):
            ck = read_checkpoint(path)
        if self.sharded:
            ck = self._load_sharded(ck)
        else:
            # bf16 weight copies: the exact fp32 weights into the masters, the copies rounded from them on the way out
            with self.opt.masters_in_place() if self.loop.bf16_weights else contextlib.nullcontext():
                self.model.load_state_dict(ck["model"])
            self.opt.load_state_dict(ck["optimizer"])
        if self.graphed is not None and self.info.device.startswith("cuda"):
            # the replayed optimiser step reads lr from a GPU tensor; a loaded state may hold a float or a CPU tensor
            for g in self.opt.param_groups:
                g["lr"] = torch.tensor(float(g["lr"]), device=self.info.device)
        self.ema.load_state_dict(ck["ema"])
        self.sched.load_state_dict(ck["scheduler"])
        self.step = ck["step"]
        self.history = ck.get("history", [])
        set_rng_state(ck["rng"])

    def _load_sharded(self, ck: Optional[dict]) -> dict:
        """FSDP2 resume: only the main rank reads the file (host memory for one copy, not one per rank); the model
        and optimiser state are broadcast from it tensor by tensor and each rank keeps its shards
        (``broadcast_from_rank0``), the EMA shadows are scattered the same way, the small rest is broadcast as an
        object. Returns the checkpoint dict with the EMA state each rank should load."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )
        rest = [None]
        if ck is not None:
            rest[0] = {**{k: v for k, v in ck.items() if k not in ("model", "optimizer", "ema")},
                       "ema_meta": {k: v for k, v in ck["ema"].items() if k != "shadow"},
                       "ema_shapes": {k: tuple(v.shape) for k, v in ck["ema"]["shadow"].items()}}
        dist.broadcast_object_list(rest, src=0)
        rest = rest[0]
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(self.model, ck["model"] if ck is not None else {}, options=opts)
        set_optimizer_state_dict(self.model, self.opt, self._opt_by_name(ck["optimizer"]) if ck is not None else {},
                                 options=opts)
        # the other ranks pass placeholders of the main rank's shapes: distribute_tensor sends the main rank's data
        shadow = ck["ema"]["shadow"] if ck is not None else {k: torch.empty(v) for k, v in rest["ema_shapes"].items()}
        rest["ema"] = {**rest.pop("ema_meta"), "shadow": shadow}
        del rest["ema_shapes"]
        return rest

    def _resume(self) -> None:
        """Load the newest checkpoint that loads (the main rank chooses under FSDP2, where only it reads)."""
        if self.sharded:
            chosen, ck = [None, None, None], None
            if self.info.main:
                try:
                    path, ck = self.latest_checkpoint()
                    chosen = [path, ck is not None, None]
                except BadFileError as e:       # every rank stops with the main rank's reason
                    chosen = [None, False, (e.path, e.problem)]
            dist.broadcast_object_list(chosen, src=0)
            if chosen[2] is not None:
                raise BadFileError(*chosen[2])
            if chosen[1]:
                self.load_checkpoint(None, ck)
            return
        path, ck = self.latest_checkpoint()
        if ck is not None:
            self.load_checkpoint(path, ck)

    @property
    def global_batch(self) -> int:
        return self.info.world * self.loop.accum * self.loop.micro_batch

    def _check_graph_setup(self, graph_step) -> None:
        why = [w for bad, w in ((self.info.world > 1 or self.sharded, "one process, no FSDP (DDP / FSDP hooks are "
                                 "not captured)"),
                                (self.loop.accum != 1, "accum 1"), (self.loop.compile, "compile off"),
                                (self.loop.grad_checkpointing, "grad_checkpointing off"),
                                (graph_step is None, "a graph_step (e.g. schedule.DiTLoss.graph_step)")) if bad]
        if why:
            raise ValueError("LoopConfig.cuda_graph needs " + ", ".join(why))

    def _clip(self) -> None:
        """Gradient clipping inside the captured step: the norm stays a device tensor (no host read)."""
        self._gnorm.copy_(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim_cfg.grad_clip))

    def _graphed_micro_step(self) -> tuple:
        """The one micro-batch of a graphed step (accum 1): (logs_all, samples, tokens, grad norm), as the loop."""
        loss, logs = self.graphed(self.step, self.info.rank)
        gnorm = self._gnorm if self.optim_cfg.grad_clip > 0 else torch.zeros(())
        return [{"loss": loss, **logs}], int(logs.get("samples", 0)), int(logs.get("tokens", 0)), gnorm

    # -- one optimiser step ---------------------------------------------------------------------------
    def train_step(self) -> dict:
        if self.graphed is not None:
            logs_all, samples, tokens, gnorm = self._graphed_micro_step()
        else:
            logs_all, samples, tokens, gnorm = self._eager_micro_steps()
        lr = self.sched.get_last_lr()[0]
        self.sched.step()
        self.ema.update(self.model, self.opt.named_masters(self.model) if self.loop.bf16_weights else None)
        self.step += 1
        return self._step_logs(logs_all, samples, tokens, float(gnorm), float(lr))

    def _eager_micro_steps(self) -> tuple:
        """loop.accum micro-batches (loss, backward), clipping and the optimiser step: (logs_all, samples, tokens,
        grad norm)."""
        self.module.train()
        accum, step = self.loop.accum, self.step
        autocast = training_autocast(self.info.device, torch.bfloat16 if self.loop.bf16 else None,
                                     self.loop.bf16_weights)
        logs_all, samples, tokens = [], 0, 0
        for m in range(accum):
            chunk = self.info.rank * accum + m
            sync = contextlib.nullcontext()
            if self.info.world > 1 and m < accum - 1:       # reduce the gradients once, on the last micro-batch
                sync = self.module.no_sync() if hasattr(self.module, "no_sync") else _no_grad_sync(self.module)
            with sync:
                with autocast:
                    loss, logs = self.loss_fn(self.step_module, step, chunk)
                (loss / accum).backward()
            logs_all.append(logs)
            samples += int(logs.get("samples", 0))
            tokens += int(logs.get("tokens", 0))
        if self.optim_cfg.grad_clip > 0:          # FSDP2: sharded grads, the norm of the whole gradient (a DTensor)
            gnorm = _full(torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.optim_cfg.grad_clip))
        else:
            gnorm = torch.zeros(())
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return logs_all, samples, tokens, gnorm

    def _step_logs(self, logs_all: list, samples: int, tokens: int, gnorm: float, lr: float) -> dict:
        """The step's log line: losses averaged over the micro-batches (and ranks), the task, samples and tokens."""
        accum = len(logs_all)
        out = {"step": self.step, "lr": lr, "grad_norm": gnorm}
        loss = sum(float(d["loss"]) for d in logs_all) / accum
        if self.info.world > 1:
            t = torch.tensor([loss, samples, tokens], dtype=torch.float64, device=self.info.device)
            dist.all_reduce(t)
            loss, samples, tokens = float(t[0]) / self.info.world, int(t[1]), int(t[2])
        out["loss"] = loss
        if "task" in logs_all[0]:
            out["task"] = logs_all[0]["task"]
            out[f"loss_{out['task']}"] = loss
        for k, v in logs_all[0].items():
            if k not in ("loss", "task", "samples", "tokens") and not isinstance(v, str):
                vals = [float(d[k]) for d in logs_all if math.isfinite(float(d[k]))]   # an empty time bin is NaN
                if vals:
                    out[k] = sum(vals) / len(vals)
        out["samples"], out["tokens"] = samples, tokens
        return out

    # -- the stage ------------------------------------------------------------------------------------
    def fit(self, resume: bool = False, stop_after: Optional[int] = None) -> list:
        """Train to loop.steps (or stop after `stop_after` steps of this call, to simulate a kill)."""
        log_path = os.path.join(self.out_dir, "log.jsonl")
        if self.info.main:
            remove_stale_temps(self.out_dir, recursive=True)      # checkpoints/, the saved models' folders
        if resume:
            self._resume()
            if self.info.main:
                cut_log(log_path, self.step)     # rows logged after the checkpoint are logged again below
        if self.info.main and not resume:
            if os.path.exists(log_path):
                os.remove(log_path)
            shutil.rmtree(os.path.join(self.out_dir, "tb"), ignore_errors=True)    # a fresh run's curves only
        tb = (TensorBoardLog(self.out_dir, self.loop.tensorboard, purge_step=self.step + 1 if resume else None)
              if self.info.main else None)
        card = gpu_info() if self.info.device.startswith("cuda") else None     # once per run, in its first row
        bar = None
        if self.loop.progress and self.info.main:
            from tqdm import tqdm
            bar = tqdm(total=self.loop.steps, initial=self.step, desc=self.loop.desc or os.path.basename(self.out_dir),
                       dynamic_ncols=True, mininterval=2.0)
        peak = peak_flops(self.info.device)
        try:
            self._train_until(stop_after, log_path, tb, card, bar, peak)
        finally:
            if self.loop.bf16_weights:      # the module leaves fit() a plain fp32 model (its master weights)
                self.opt.swap_out()
        if bar is not None:
            bar.close()
        if tb is not None:
            tb.close()
        return self.history

    def _train_until(self, stop_after, log_path, tb, card, bar, peak) -> None:
        if self.loop.bf16_weights and not self.opt.swapped_in:
            self.opt.swap_in()
        t_last, samples_acc, tokens_acc, done = time.perf_counter(), 0, 0, 0
        while self.step < self.loop.steps and (stop_after is None or done < stop_after):
            out = self.train_step()
            done += 1
            samples_acc += out.pop("samples")
            tokens_acc += out.pop("tokens")
            self.history.append({k: out[k] for k in ("step", "loss", "task") if k in out})
            if self.step % self.loop.log_every == 0 or self.step == self.loop.steps:
                if self.info.device.startswith("cuda"):
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t_last
                out["samples_per_s"] = samples_acc / dt
                out["tokens_per_s"] = tokens_acc / dt
                if peak and self.flops_per_token:
                    out["mfu"] = tokens_acc * self.flops_per_token / dt / (peak * self.info.world)
                if self.info.device.startswith("cuda"):
                    out["gpu_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    out.update(gpu_sample())                  # NVML: memory used, clocks, power, temperature
                    if card is not None:
                        out["gpu"], card = card, None
                t_last, samples_acc, tokens_acc = time.perf_counter(), 0, 0
                if self.info.main:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(out) + "\n")
                    if tb is not None:
                        tb.scalars(out, self.step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{out['loss']:.4f}", refresh=False)
            if self.step % self.loop.ckpt_every == 0 or self.step == self.loop.steps:
                self.save_checkpoint()


@contextlib.contextmanager
def _no_grad_sync(module: nn.Module):
    """FSDP2's no_sync: keep this micro-batch's gradients unreduced (they accumulate unsharded)."""
    if not hasattr(module, "set_requires_gradient_sync"):
        yield
        return
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def shard_model(model: nn.Module, info: DistInfo, bf16_params: bool = False) -> None:
    """FSDP2 in place over all ranks: each of ``model.blocks`` its own unit (its weights are gathered for its
    forward and freed after, so peak memory holds a block or two of full weights, not the model), then the root (the
    rest). A block's other entry points that use its weights outside forward (``DiTBlock.condition``, called by the
    DiT's prepare_conditions) are registered as forward methods, so that they gather too. ``bf16_params``: the
    gathered weights in bf16, gradients reduced in fp32 (``LoopConfig.fsdp_bf16_params``)."""
    from torch.distributed.device_mesh import init_device_mesh
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    except ImportError:                                            # torch < 2.6
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    mesh = init_device_mesh(torch.device(info.device).type, (info.world,))
    kw = {"mesh": mesh}
    if bf16_params:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                               cast_forward_inputs=False)
    # FSDP2 warns when a sharded module returns a view (an in-place op on it would skip its backward hook); the
    # DiT's velocity is one, and the losses here use it out of place (flow.loss)
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for blk in getattr(model, "blocks", []):
        fully_shard(blk, **kw)
        if hasattr(blk, "condition"):
            register_fsdp_forward_method(blk, "condition")
    fully_shard(model, **kw)


def enable_grad_checkpointing(model: nn.Module) -> None:
    """Recompute each DiT block's activations in the backward pass (memory for compute)."""
    from torch.utils.checkpoint import checkpoint
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no .blocks to checkpoint")
    for blk in blocks:
        fwd = blk.forward
        blk.forward = lambda *a, _f=fwd, **k: checkpoint(_f, *a, use_reentrant=False, **k)

