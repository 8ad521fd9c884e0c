"""The Omni2Sound training schedule as data: a run is a list of ``Stage``s, each trained by one loop.

Stages hand off through named folders under runs/<name>/ (``omni2sound.runs``), each with a meta.json:

    vae/       the audio VAE (stage `vae`: vae_loss on the training audio); save_pretrained + meta.json
    features/  latents (VAE posterior mean/std), text tokens, video tokens, sync features: computed ONCE
               per run as safetensors shards (train/, offscreen/, eval/) and reused by every DiT stage
    stage1/    T2A pre-training: every sample is text only
    stage2/    multi-task interleaved: each step draws ONE task from {v2a, t2a, vt2a} with probabilities pi
               (default 0.55 / 0.10 / 0.35) and trains a whole batch of it
    stage3/    robustness, from stage 2: on VT2A samples, text dropout (the sample becomes V2A, so video
               must carry the timing) and off-screen synthesis (another clip's sound mixed in and described
               as off-screen in the caption)

Null-condition dropout (all conditions of a sample dropped together, the joint CFG of the paper) runs in
every DiT stage. Each DiT stage folder holds dit/ (EMA weights, for sampling), dit_raw/ (the raw weights
the next stage starts from), latent_stats.json (the per-channel latent normalisation the DiT was trained
in: x_dit = (z - mean) / std), log.jsonl and checkpoints/.

Two schedules (``SCHEDULES``): the paper's ``1-2-3`` (vae, stage1, stage2, stage3) and ``stage2-only``, which gives
stage 2 all the DiT steps of stages 1 + 2 + 3 (same compute) for the paper's "stage 2 alone vs stages 1 -> 2 -> 3"
comparison; it shares the run's vae/ and features/ and writes stage2-only/.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .conditions import TASKS
from .data.shards import FeatureTable
from .runs import read_meta, run_dir, write_meta
from .trainer import DistInfo, LoopConfig, OptimConfig, Trainer, atomic_json, init_distributed, seeded

# The stages' names in the paper's schedule (``--stage`` picks among them)
STAGES = ("vae", "stage1", "stage2", "stage3")


# old TrainConfig field name -> its name now; from_dict (and so --config and every saved run config) reads both
RENAMED_FIELDS = {"cfg_scale": "guidance"}


@dataclass
class TrainConfig:
    name: str = "toy"
    runs_dir: str = "runs"
    data: str = "toy"                 # "toy" (the embedded world) or a features folder with train/ shards
    seed: int = 0
    device: Optional[str] = None
    dit_preset: str = "tiny"
    vae_preset: str = "toy"
    # the toy world
    toy_train_clips: int = 512
    toy_eval_clips: int = 48          # per evaluation track (v2a, t2a, vt2a, offscreen); 16 moved scores by 0.06 a clip
    toy_duration: float = 2.0
    # the schedule
    schedule: str = "1-2-3"           # "1-2-3" | "stage2-only"
    vae_steps: int = 1500              # 1000 left the VAE ceiling at 0.81-0.83 on some runs (see README)
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_min_lr_ratio: float = 1.0     # constant after warm-up (see train_vae_stage)
    # VAEConfig fields to override for stage vae, e.g. {"adv_weight": 0.1, "fm_weight": 0.2, "disc_start": 500}
    # (--set 'vae_config={"adv_weight": 0.1}'); with --init-from only the loss fields (weights, disc_start)
    vae_config: Dict[str, Any] = field(default_factory=dict)
    stage1_steps: int = 300
    stage2_steps: int = 1000
    stage3_steps: int = 500
    batch_size: int = 16              # global batch (ranks x accum x micro)
    accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 30
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.998
    task_probs: tuple = (0.55, 0.10, 0.35)   # v2a, t2a, vt2a (paper: pi_T2A = 0.1; 0.55 / 0.35 inferred)
    p_null: float = 0.10              # null-condition dropout for CFG, every DiT stage
    p_text_drop: float = 0.15         # stage 3: VT2A samples lose their text
    p_offscreen: float = 0.5          # stage 3: VT2A samples get an off-screen sound + description
    # machinery
    log_every: int = 10
    ckpt_every: int = 100
    keep_last: int = 2
    bf16: bool = True
    grad_checkpointing: bool = False
    compile: bool = False
    cuda_graph: bool = False          # DiT stages on one GPU: replay each step from a CUDA graph (graphed_step.py)
    parallel: str = "ddp"             # with torchrun: "ddp" or "fsdp" (FSDP2, DiT stages; the VAE stage runs DDP)
    fsdp_bf16_params: bool = True     # FSDP2 with bf16 on GPU: weights gathered in bf16, gradients reduced in fp32
    # the report
    sample_steps: int = 25
    guidance: Union[float, tuple] = (3.0, 6.0)    # (video, text) guidance scales, or one joint scale
    progress: bool = True
    tensorboard: bool = True          # TensorBoard event files beside each stage's log.jsonl (tblog.py)

    def validate(self) -> None:
        p = self.task_probs
        if len(p) != 3 or min(p) < 0 or abs(sum(p) - 1) > 1e-6:
            raise ValueError(f"task_probs must be 3 probabilities (v2a, t2a, vt2a) summing to 1, got {p}")
        for k in ("p_null", "p_text_drop", "p_offscreen"):
            if not 0 <= getattr(self, k) <= 1:
                raise ValueError(f"{k} must be in [0, 1], got {getattr(self, k)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {self.schedule!r}")

    @staticmethod
    def renamed(d: dict) -> dict:
        """A copy of the fields ``d`` with the old names of renamed fields (RENAMED_FIELDS) replaced by the new."""
        d = dict(d)
        for old, new in RENAMED_FIELDS.items():
            if old in d:
                if new in d and d[new] != d[old]:
                    raise ValueError(f"TrainConfig: both {old!r} and its new name {new!r} are set; keep {new!r}")
                d[new] = d.pop(old)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = cls.renamed(d)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}")
        for k in ("task_probs", "guidance"):
            if isinstance(d.get(k), list):
                d[k] = tuple(d[k])
        return cls(**d)


TRAIN_PRESETS = {
    # python -m omni2sound.train: the toy world through all stages on a CPU in ~15 minutes
    "toy": TrainConfig(),
    # the same compute, stage 2 alone
    "toy-stage2-only": TrainConfig(schedule="stage2-only"),
    # seconds, for tests
    "smoke": TrainConfig(name="smoke", toy_train_clips=16, toy_eval_clips=2, toy_duration=1.0, vae_steps=2,
                         vae_batch=2, stage1_steps=2, stage2_steps=2, stage3_steps=2, batch_size=4, warmup=1,
                         log_every=1, ckpt_every=2, sample_steps=2, progress=False),
    # the paper's scale, from extracted features (GPU, torchrun)
    "paper": TrainConfig(name="paper", data="features", dit_preset="L", vae_preset="paper", batch_size=256,
                         stage1_steps=200_000, stage2_steps=300_000, stage3_steps=50_000, lr=1e-4,
                         warmup=1000, ema_decay=0.9999, log_every=50, ckpt_every=2000, compile=True,
                         grad_checkpointing=True),
}


# ----------------------------------------------------------------------------------------------------
# The schedule
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """One stage of a schedule.

    kind: "vae" (the audio VAE on the training audio) or "dit" (the DiT on the extracted features).
    steps: optimiser steps. folder: its folder under the run (runs/<name>/<folder>).
    tasks: probabilities of (v2a, t2a, vt2a), one task drawn per step (DiT stages).
    augment: stage 3's robustness augmentations on VT2A batches (text dropout, off-screen synthesis).
    starts_from: the stage whose folder's weights it starts from (None: from scratch, or from --init-from).
    reuse_finished: a finished folder is reused even without --resume (a VAE shared with another schedule).
    seed_key: the stage's key in every seeded draw (data order, tasks, noise), fixed per stage so that a schedule
    reproduces its runs.
    """
    name: str
    kind: str
    steps: int
    folder: str
    seed_key: int
    tasks: Optional[Tuple[float, float, float]] = None
    augment: bool = False
    starts_from: Optional[str] = None
    reuse_finished: bool = False


def paper_schedule(cfg: TrainConfig) -> List[Stage]:
    """vae -> stage1 (T2A) -> stage2 (multi-task) -> stage3 (robustness), each DiT stage from the one before."""
    return [Stage("vae", "vae", cfg.vae_steps, "vae", seed_key=0),
            Stage("stage1", "dit", cfg.stage1_steps, "stage1", seed_key=1, tasks=(0.0, 1.0, 0.0)),
            Stage("stage2", "dit", cfg.stage2_steps, "stage2", seed_key=2, tasks=tuple(cfg.task_probs),
                  starts_from="stage1"),
            Stage("stage3", "dit", cfg.stage3_steps, "stage3", seed_key=3, tasks=tuple(cfg.task_probs),
                  augment=True, starts_from="stage2")]


def stage2_only_schedule(cfg: TrainConfig) -> List[Stage]:
    """The ablation: stage 2 alone with the DiT steps of stages 1 + 2 + 3, on the 1-2-3 run's VAE (shared, so
    both schedules compare on the same latents)."""
    return [Stage("vae", "vae", cfg.vae_steps, "vae", seed_key=0, reuse_finished=True),
            Stage("stage2", "dit", cfg.stage1_steps + cfg.stage2_steps + cfg.stage3_steps, "stage2-only", seed_key=2,
                  tasks=tuple(cfg.task_probs))]


SCHEDULES = {"1-2-3": paper_schedule, "stage2-only": stage2_only_schedule}


def schedule(cfg: TrainConfig, names: Optional[Sequence[str]] = None) -> List[Stage]:
    """cfg's schedule, or only its stages named in ``names`` (in the schedule's order)."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {cfg.schedule!r}")
    stages = SCHEDULES[cfg.schedule](cfg)
    if names:
        unknown = sorted(set(names) - {s.name for s in stages})
        if unknown:
            raise ValueError(f"stages {unknown} are not in the {cfg.schedule} schedule "
                             f"({', '.join(s.name for s in stages)})")
        stages = [s for s in stages if s.name in names]
    return stages


def stage_named(cfg: TrainConfig, name: str) -> Stage:
    """The stage called ``name`` in cfg's schedule."""
    return schedule(cfg, [name])[0]


def stage_dir(cfg: TrainConfig, stage: Union[Stage, str]) -> str:
    """A stage's folder (a Stage, or the name of one in cfg's schedule)."""
    return run_dir(cfg, (stage if isinstance(stage, Stage) else stage_named(cfg, stage)).folder)


# ----------------------------------------------------------------------------------------------------
# Stage vae
# ----------------------------------------------------------------------------------------------------
# VAEConfig fields that only change the loss (may be overridden when a stage starts from a trained VAE)
# (and the discriminator's shape: it is not part of the VAE; a saved discriminator must match it)
_VAE_LOSS_FIELDS = {"kl_weight", "stft_weight", "l1_weight", "stft_sizes", "log_stft_weight", "frame_weight",
                    "adv_weight", "fm_weight", "disc_start", "disc_channels", "disc_ffts"}


def train_vae_stage(cfg: TrainConfig, info: DistInfo, audio: torch.Tensor, resume: bool,
                    init_from: Optional[str] = None, stage: Optional[Stage] = None) -> str:
    """Train the audio VAE on `audio` [N, samples] (random crops) and save it in the stage's folder (default: the
    schedule's vae stage, runs/<name>/vae)."""
    from .vae import AudioVAE, build_vae
    from .vae_gan import DISC_WEIGHTS_NAME, VAEGAN, load_discriminator, save_discriminator
    from .vae_loss import vae_loss
    stage = stage or stage_named(cfg, "vae")
    out = stage_dir(cfg, stage)
    if init_from:
        vae = AudioVAE.from_pretrained(init_from, inference=False)
        arch = sorted(set(cfg.vae_config) - _VAE_LOSS_FIELDS)
        if arch:
            raise ValueError(f"vae_config {arch}: architecture fields cannot change with --init-from {init_from}")
        vae.config = replace(vae.config, **cfg.vae_config)
    else:
        vae = build_vae(cfg.vae_preset, **cfg.vae_config)
    hop = vae.hop_length
    crop = min(audio.shape[1] // hop, 8) * hop             # 0.32 s crops: a whole strike and its decay
    micro = max(1, cfg.vae_batch // (info.world * cfg.accum))
    # Adversarial: the VAE and its discriminator are one module for the Trainer (one optimiser: see vae_gan).
    model = vae
    if vae.config.adversarial:
        resume_disc = init_from and os.path.isfile(os.path.join(init_from, DISC_WEIGHTS_NAME))
        model = VAEGAN(vae, load_discriminator(init_from, vae) if resume_disc else None)

    def loss_fn(module, step, chunk):
        g = seeded(cfg.seed, stage.seed_key, step, chunk)
        idx = torch.randint(0, audio.shape[0], (micro,), generator=g)
        start = torch.randint(0, audio.shape[1] - crop + 1, (micro,), generator=g)
        wav = torch.stack([audio[i, s:s + crop] for i, s in zip(idx.tolist(), start.tolist())])[:, None]
        if model is vae:
            loss, logs = vae_loss(module, wav.to(info.device), None, generator=g)
        else:
            loss, logs = module(wav.to(info.device), step, generator=g)
        return loss, {**logs, "samples": micro, "tokens": micro * crop // hop}

    # Audio-codec optimiser settings (HiFi-GAN / DAC): beta2 0.99 and almost no weight decay; EMA over ~100 steps.
    # No decay by default: the toy VAE picks up its short, sparse sounds (a 30 ms knock) in a late jump, and a
    # cosine decay to 0.1 slowed that jump past the step budget (measured, 800 steps: oracle ceiling onset F1 0.70
    # with the decay, 0.93 without; 1000 steps without: 1.00).
    optim = replace(_optim(cfg), lr=cfg.vae_lr, ema_decay=0.99, betas=(0.8, 0.99), weight_decay=1e-4,
                    min_lr_ratio=cfg.vae_min_lr_ratio)
    trainer = Trainer(model, loss_fn, _loop(cfg, stage, micro), optim,
                      out, info, meta={"stage": stage.name, "config": asdict(cfg)})
    t0 = time.time()
    trainer.fit(resume=resume)
    if info.main:
        if model is not vae:        # the raw (not EMA) discriminator, to continue adversarial training (--init-from)
            save_discriminator(model.disc, out)
        trainer.ema.copy_to(model)
        vae.save_pretrained(out)
        write_meta(out, {"stage": stage.name, "complete": True, "steps": trainer.step, "seconds": time.time() - t0,
                         "final_loss": trainer.history[-1]["loss"] if trainer.history else None,
                         "init_from": init_from, "config": asdict(cfg)})
    _barrier(info)
    return out


# ----------------------------------------------------------------------------------------------------
# DiT stages
# ----------------------------------------------------------------------------------------------------
def draw_task(stage: Stage, g: torch.Generator) -> str:
    """The task of a whole step, drawn from the stage's mixture (a stage of one task draws nothing)."""
    live = [t for t, p in zip(TASKS, stage.tasks) if p > 0]
    if len(live) == 1:
        return live[0]
    return TASKS[int(torch.multinomial(torch.tensor(stage.tasks, dtype=torch.float64), 1, generator=g))]


def step_indices(n: int, step: int, global_batch: int, seed: int, stage_id: int) -> torch.Tensor:
    """The clips of one step's global batch: epochs of seeded permutations, consumed in order
    (the data position is step * global_batch)."""
    start = step * global_batch
    out = []
    for pos in range(start, start + global_batch):
        epoch, k = divmod(pos, n)
        if not out or epoch != out[-1][0]:
            out.append((epoch, torch.randperm(n, generator=seeded(seed, stage_id, 10**6 + epoch)), []))
        out[-1][2].append(int(out[-1][1][k]))
    return torch.tensor([i for _, _, ids in out for i in ids], dtype=torch.int64)


def stage3_augment(cfg: TrainConfig, x1, cond, idx, offscreen: Optional[FeatureTable], g: torch.Generator,
                   generator_latent: Optional[torch.Generator] = None):
    """Stage 3 on a VT2A batch: per sample, with p_offscreen replace it by its off-screen version (the
    clip's video, its sound + another clip's sound, caption + "off-screen ..." description), else with
    p_text_drop drop its text. Returns (x1, cond, n_offscreen, n_text_dropped)."""
    from .conditions import Conditions
    B = x1.shape[0]
    u = torch.rand(B, generator=g)
    use_off = u < cfg.p_offscreen if offscreen is not None else torch.zeros(B, dtype=torch.bool)
    drop_text = (u >= cfg.p_offscreen) & (u < cfg.p_offscreen + cfg.p_text_drop)
    if use_off.any():
        ox1, ocond = offscreen.batch(idx[use_off], generator_latent)
        x1 = x1.clone()
        x1[use_off] = ox1[:, : x1.shape[1]]
        L = max(cond.text_tokens.shape[1], ocond.text_tokens.shape[1])
        text = torch.nn.functional.pad(cond.text_tokens, (0, 0, 0, L - cond.text_tokens.shape[1]))
        text[use_off] = torch.nn.functional.pad(ocond.text_tokens, (0, 0, 0, L - ocond.text_tokens.shape[1]))
        lens = cond.text_lens.clone()
        lens[use_off] = ocond.text_lens
        cond = Conditions(text, lens, cond.video_tokens, cond.video_lens, cond.sync, cond.duration)
    cond = cond.drop(keep_text=~drop_text)
    return x1, cond, int(use_off.sum()), int(drop_text.sum())


class DiTLoss:
    """The loss of one micro-batch ``chunk`` of a DiT step (chunk = rank * accum + micro-batch index):
    ``loss(module, step, chunk) -> (loss, logs)``. ``batch(step, chunk)`` draws the micro-batch alone (x1, cond,
    generator, logs: the generator then draws the flow's noise and t), for ``graph_step``, the Trainer's
    CUDA-graph step (``LoopConfig.cuda_graph``)."""

    def __init__(self, batch, flow, device):
        self.batch, self.flow, self.device = batch, flow, device

    def __call__(self, module, step: int, chunk: int):
        x1, cond, g, logs = self.batch(step, chunk)
        loss, flow_logs = self.flow.loss(module, x1.to(self.device), cond.to(self.device), generator=g)
        return loss, {**flow_logs, **logs}          # the loss and its per-time-bin parts (loss_bin<i>)

    def graph_step(self, model, opt, autocast_dtype, before_step):
        """The Trainer's step function for LoopConfig.cuda_graph: (step, chunk) -> (loss, logs), the flow loss,
        backward and optimiser step replayed from a CUDA graph (omni2sound.graphed_step)."""
        from .graphed_step import GraphedTrainStep
        graphed = GraphedTrainStep(model, opt, self.flow, autocast_dtype=autocast_dtype, before_step=before_step,
                                   pad_text_to=getattr(getattr(model, "config", None), "max_text_tokens", None))

        def run(step: int, chunk: int):
            x1, cond, g, logs = self.batch(step, chunk)
            loss, _ = graphed(x1, cond, generator=g)
            return loss, logs
        return run


def make_dit_loss(cfg: TrainConfig, stage: Stage, table: FeatureTable, offscreen: Optional[FeatureTable],
                  micro: int, info: DistInfo, accum: Optional[int] = None) -> DiTLoss:
    """The stage's DiT loss over ``table`` (micro-batches of ``micro``; see DiTLoss)."""
    from .flow import FlowMatching
    flow = FlowMatching()
    stage_id = stage.seed_key
    gb = micro * (accum or cfg.accum) * info.world

    def batch_fn(step, chunk):
        """(x1, cond, generator, logs) of micro-batch ``chunk``: the generator then draws the flow's noise and t."""
        task = draw_task(stage, seeded(cfg.seed, stage_id, step, 7))       # the same on every rank
        idx = step_indices(len(table), step, gb, cfg.seed, stage_id)[chunk * micro:(chunk + 1) * micro]
        g = seeded(cfg.seed, stage_id, step, 1000 + chunk)                      # this micro-batch's draws
        x1, cond = table.batch(idx, g)
        n_off = n_drop = 0
        if stage.augment and task == "vt2a":
            x1, cond, n_off, n_drop = stage3_augment(cfg, x1, cond, idx, offscreen, g, g)
        cond = cond.for_task(task)
        keep = torch.rand(x1.shape[0], generator=g) >= cfg.p_null                # CFG null condition
        cond = cond.drop(keep_text=keep, keep_video=keep)
        return x1, cond, g, {"task": task, "samples": x1.shape[0], "tokens": x1.shape[0] * x1.shape[1],
                             "offscreen_mixed": n_off, "text_dropped": n_drop}

    return DiTLoss(batch_fn, flow, info.device)


def table_widths(table: FeatureTable) -> dict:
    return {"text": table.text.shape[-1], "video": table.video.shape[-1], "sync": table.sync.shape[-1]}


def build_dit(cfg: TrainConfig, table: FeatureTable, encoders: Optional[dict] = None, features: str = "features"):
    """A new DiT whose input widths are the encoder spec's (recorded by extraction in the features' index.json;
    e.g. the paper's Flan-T5-base 768, CLIP-H 1024, Synchformer 768), checked against the features themselves."""
    from .model import Omni2SoundDiT, dit_config
    widths = table_widths(table)
    dims = (encoders or {}).get("dims")
    if dims:
        bad = [f"{k} {widths[k]} vs {dims[k]}" for k in widths if k in dims and dims[k] != widths[k]]
        if bad:
            from .encoder_spec import EncoderSpecError
            raise EncoderSpecError(f"the features in {features} do not have the widths their index.json's encoder "
                                   f"spec records (feature width vs spec width: {', '.join(bad)}); re-extract them")
    extra = {}
    max_tokens = ((encoders or {}).get("text") or {}).get("max_tokens")
    if max_tokens:                      # the longest caption extraction let through
        extra["max_text_tokens"] = int(max_tokens)
    dcfg = dit_config(cfg.dit_preset, latent_dim=table.latent_mean.shape[-1], text_dim=widths["text"],
                      video_dim=widths["video"], sync_dim=widths["sync"],
                      max_duration=max(10.0, float(table.duration.max())), **extra)
    return Omni2SoundDiT(dcfg)


def write_pipeline_config(stage_out: str, vae_dir: str, latent_stats: dict, encoders: Optional[dict] = None) -> None:
    """Make a finished DiT stage folder loadable by ``Omni2SoundPipeline.from_pretrained(stage_out)`` and the
    generate CLI (``--model stage_out``): pipeline.json points at the run's VAE (no copy), carries the latent
    normalisation the DiT was trained in and the encoder spec of its features (``encoders``: EncoderSpec.to_dict();
    None: the package's defaults, MiniLM and the built-in video / sync encoders)."""
    from .pipeline import PIPELINE_CONFIG, PipelineConfig
    pc = PipelineConfig(vae_dir=os.path.relpath(vae_dir, stage_out),
                        latent_mean=[float(v) for v in latent_stats["mean"]],
                        latent_std=[float(v) for v in latent_stats["std"]], encoders=encoders)
    atomic_json(asdict(pc), os.path.join(stage_out, PIPELINE_CONFIG))


def train_dit_stage(cfg: TrainConfig, stage: Stage, info: DistInfo, table: FeatureTable,
                    offscreen: Optional[FeatureTable], latent_stats: dict, resume: bool,
                    init_from: Optional[str], vae_dir: Optional[str] = None, encoders: Optional[dict] = None,
                    features: str = "features") -> str:
    """One DiT stage: init from `init_from` (a stage folder: dit_raw/ or dit/) or from scratch. vae_dir: the VAE
    whose latents the features hold, named in the stage's pipeline.json (default: the run's vae/). encoders: the
    features' encoder spec (index.json), recorded in pipeline.json; features: their folder, for error messages."""
    from .model import Omni2SoundDiT
    out = stage_dir(cfg, stage)
    if init_from:
        src = os.path.join(init_from, "dit_raw") if os.path.isdir(os.path.join(init_from, "dit_raw")) else \
            os.path.join(init_from, "dit") if os.path.isdir(os.path.join(init_from, "dit")) else init_from
        model = Omni2SoundDiT.from_pretrained(src)
        from .encoder_spec import check_widths
        check_widths(model.config, table_widths(table), features, src)
    else:
        model = build_dit(cfg, table, encoders, features)
    micro = cfg.batch_size // (info.world * cfg.accum)
    if micro * info.world * cfg.accum != cfg.batch_size:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by world {info.world} x accum {cfg.accum}")
    flops_per_token = 6.0 * sum(p.numel() for p in model.parameters())     # nanoGPT's estimate (no attention)
    loss = make_dit_loss(cfg, stage, table, offscreen, micro, info)
    trainer = Trainer(model, loss, _loop(cfg, stage, micro),
                      _optim(cfg), out, info, flops_per_token=flops_per_token,
                      meta={"stage": stage.name, "config": asdict(cfg)}, graph_step=loss.graph_step)
    if init_from and not (resume and trainer.checkpoints()):
        ema_src = os.path.join(init_from, "dit")
        if os.path.isdir(ema_src) and src != ema_src:   # continue the previous stage's EMA too (no warm-up)
            prev = Omni2SoundDiT.from_pretrained(ema_src).state_dict()
            trainer.ema.load_state_dict({"decay": cfg.ema_decay, "updates": 0, "warmup": False,
                                         "shadow": {k: prev[k] for k in trainer.ema.shadow}})
    t0 = time.time()
    history = trainer.fit(resume=resume)
    raw, ema = trainer.export_weights()                 # under FSDP every rank gathers
    if info.main:
        if trainer.sharded:                             # the model holds shards: save from an unsharded copy
            model = type(model)(model.config)
            model.load_state_dict(raw)
        model.save_pretrained(os.path.join(out, "dit_raw"))
        trainer.ema.copy_to(model, ema)
        model.save_pretrained(os.path.join(out, "dit"))
        atomic_json(latent_stats, os.path.join(out, "latent_stats.json"))
        write_pipeline_config(out, vae_dir or run_dir(cfg, "vae"), latent_stats, encoders)
        per_task = {t: [h["loss"] for h in history if h.get("task") == t] for t in TASKS}
        write_meta(out, {"stage": stage.name, "complete": True, "steps": trainer.step, "seconds": time.time() - t0,
                         "init_from": init_from, "params": model.num_params(),
                         "task_counts": {t: len(v) for t, v in per_task.items()},
                         "final_loss_by_task": {t: sum(v[-20:]) / len(v[-20:]) for t, v in per_task.items() if v},
                         "config": asdict(cfg)})
    _barrier(info)
    return out


def _loop(cfg: TrainConfig, stage: Stage, micro: int) -> LoopConfig:
    dit = stage.kind == "dit"
    return LoopConfig(steps=stage.steps, micro_batch=micro, accum=cfg.accum, log_every=cfg.log_every,
                      ckpt_every=cfg.ckpt_every, keep_last=cfg.keep_last, bf16=cfg.bf16,
                      grad_checkpointing=cfg.grad_checkpointing and dit,
                      compile=cfg.compile, cuda_graph=cfg.cuda_graph and dit,
                      # the VAE (tens of M parameters) fits every GPU; its loss calls encode / decode, not forward,
                      # which FSDP2's hooks would not see
                      parallel=cfg.parallel if dit else "ddp", fsdp_bf16_params=cfg.fsdp_bf16_params,
                      progress=cfg.progress, tensorboard=cfg.tensorboard, desc=_stage_label(cfg, stage))


def _stage_label(cfg: TrainConfig, stage: Stage) -> str:
    """'stage k of n: NAME', k counting the schedule's stages (the VAE is stage 1)."""
    order = [s.name for s in schedule(cfg)]
    return f"stage {order.index(stage.name) + 1} of {len(order)}: {stage.name}" if stage.name in order else stage.name


class _Overall:
    """The whole run's progress: steps done over all stages' steps, and an ETA from the pace so far (a VAE step
    and a DiT step cost different time, so the estimate settles after the first DiT stage)."""

    def __init__(self, cfg: TrainConfig, todo: List[Stage]):
        self.cfg, self.todo, self.t0, self.done = cfg, todo, time.time(), 0
        self.total = sum(s.steps for s in todo)

    def start(self, stage: Stage, info: DistInfo) -> None:
        if not info.main:
            return
        elapsed = time.time() - self.t0
        eta = "" if not self.done else f", overall ETA {hms(elapsed / self.done * (self.total - self.done))}"
        print(f"[train] {_stage_label(self.cfg, stage)} ({stage.steps} steps); run "
              f"{self.done}/{self.total} steps, {hms(elapsed)} elapsed{eta}", flush=True)

    def finish(self, stage: Stage) -> None:
        self.done += stage.steps


def hms(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def _optim(cfg: TrainConfig) -> OptimConfig:
    return OptimConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, warmup=cfg.warmup, min_lr_ratio=cfg.min_lr_ratio,
                       grad_clip=cfg.grad_clip, ema_decay=cfg.ema_decay)


def _barrier(info: DistInfo) -> None:
    if info.world > 1:
        torch.distributed.barrier()


# ----------------------------------------------------------------------------------------------------
# Features: once per run
# ----------------------------------------------------------------------------------------------------
def normalise(table: FeatureTable, stats: dict) -> FeatureTable:
    """Latents in the DiT's units: (z - mean) / std per channel (stats from the training latents)."""
    mean, std = torch.tensor(stats["mean"]), torch.tensor(stats["std"])
    return replace(table, latent_mean=(table.latent_mean - mean) / std, latent_std=table.latent_std / std)


def latent_stats(table: FeatureTable) -> dict:
    mask = torch.arange(table.latent_mean.shape[1])[None] < table.latent_lens[:, None]     # [N, T]
    z = table.latent_mean[mask]                                                            # [frames, C]
    return {"mean": z.mean(0).tolist(), "std": z.std(0).clamp_min(1e-3).tolist()}


def load_features(cfg: TrainConfig, vae_dir: str, info: DistInfo, encoders=None) -> tuple:
    """(train table, off-screen table or None, latent stats). data = "toy": the toy features, extracted once
    per run; a manifest (.jsonl): its train split extracted once with the run's VAE (small data from raw
    files); otherwise a folder of extracted features (train/ and optionally offscreen/ shards)."""
    if cfg.data == "toy" or cfg.data.endswith(".jsonl"):
        from .extract import extract_manifest, extract_toy_features
        feat_dir = run_dir(cfg, "features")
        if cfg.data == "toy":
            if info.main:
                extract_toy_features(cfg, vae_dir, feat_dir, enc=encoders)
        else:    # every rank extracts its share r::world of the missing shards (of this VAE: stale ones go)
            from .data.shards import done_shards, shard_name, write_index
            from .extract import _file_digest
            train_dir = os.path.join(feat_dir, "train")
            key = {"vae": _file_digest(os.path.join(vae_dir, "model.safetensors"))
                   if os.path.isfile(os.path.join(vae_dir, "model.safetensors")) else None,
                   "manifest": os.path.abspath(cfg.data)}
            old = read_meta(feat_dir)
            if info.main and old is not None and old.get("key") != key:
                for k in done_shards(train_dir):
                    os.remove(os.path.join(train_dir, shard_name(k)))
            _barrier(info)
            from .extract import ExtractionMismatch
            try:
                res = extract_manifest(cfg.data, vae_dir, train_dir, rank=info.rank, world=info.world,
                                       split="train", enc=encoders, progress=cfg.progress)
            except ExtractionMismatch as e:      # the run's own cache of features: out of date, so made again
                if info.main:
                    print(f"[train] features out of date, extracting again: {e}", file=sys.stderr)
                res = extract_manifest(cfg.data, vae_dir, train_dir, rank=info.rank, world=info.world,
                                       split="train", enc=encoders, progress=cfg.progress, rebuild=True)
            _barrier(info)
            if info.main:
                write_index(train_dir, {"manifest": os.path.abspath(cfg.data), "vae": os.path.abspath(vae_dir),
                                        **({"encoders": res["encoders"]} if "encoders" in res else {})})
                write_meta(feat_dir, {"key": key, "complete": True})
        _barrier(info)
    else:
        feat_dir = cfg.data
    table = FeatureTable.from_shards(os.path.join(feat_dir, "train"))
    off_dir = os.path.join(feat_dir, "offscreen")
    offscreen = FeatureTable.from_shards(off_dir) if os.path.isdir(off_dir) else None
    stats = latent_stats(table)
    table = normalise(table, stats)
    if offscreen is not None:
        offscreen = normalise(offscreen, stats)
    return table, offscreen, stats


# ----------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------
def run_stages(cfg: TrainConfig, stages: Optional[Sequence[str]] = None, resume: bool = False,
               init_from: Optional[str] = None, encoders=None) -> dict:
    """Run the schedule's stages (or those named in ``stages``) in order, each starting from the previous one's
    folder; a stage whose meta.json says complete is skipped when resuming (and, with ``reuse_finished``, always).
    ``init_from``: the folder the first stage run starts from. ``encoders``: the condition encoders for the toy
    features (default: the package's built-in ones, see extract.Encoders). Returns {stage name: its folder}."""
    cfg.validate()
    torch.manual_seed(cfg.seed)
    info = init_distributed(cfg.device)
    plan = schedule(cfg, stages)
    outs = {}
    prev = init_from
    vae_dir = stage_dir(cfg, "vae")
    table = offscreen = stats = spec = None
    feats = "features"
    overall = _Overall(cfg, plan)
    for stage in plan:
        out = stage_dir(cfg, stage)
        meta = read_meta(out)
        if (resume or stage.reuse_finished) and meta and meta.get("complete"):
            if info.main:
                print(f"[train] {stage.name}: complete in {out}, skipped" + (" (shared with another schedule)"
                                                                             if stage.reuse_finished and not resume
                                                                             else ""))
            outs[stage.name], prev = out, (out if stage.kind == "dit" else None)
            overall.total -= stage.steps
            continue
        overall.start(stage, info)
        if stage.kind == "vae":
            audio = _train_audio(cfg)
            outs[stage.name] = train_vae_stage(cfg, info, audio, resume, init_from if stage is plan[0] else None,
                                               stage)
            prev = None
            overall.finish(stage)
            continue
        if table is None:
            if not os.path.isfile(os.path.join(vae_dir, "meta.json")) and (cfg.data == "toy"
                                                                           or cfg.data.endswith(".jsonl")):
                raise FileNotFoundError(f"{vae_dir}/meta.json: run stage vae first (the toy features need it)")
            table, offscreen, stats = load_features(cfg, vae_dir, info, encoders)
            vae_dir = features_vae(cfg, vae_dir, info)
            feats = os.path.join(features_dir(cfg), "train")
            spec = features_encoders(feats)
        src = prev
        if src is None and stage.starts_from:
            src = stage_dir(cfg, stage.starts_from)
            if not os.path.isfile(os.path.join(src, "meta.json")):
                raise FileNotFoundError(f"{stage.name} starts from {src}, which is not a finished stage: run "
                                        f"{stage.starts_from} first or pass --init-from")
        outs[stage.name] = train_dit_stage(cfg, stage, info, table, offscreen, stats, resume, src, vae_dir, spec,
                                           feats)
        prev = outs[stage.name]
        overall.finish(stage)
    return outs


def features_dir(cfg: TrainConfig) -> str:
    """The run's features folder: its own (toy world, manifest) or the extracted folder cfg.data."""
    return run_dir(cfg, "features") if cfg.data == "toy" or cfg.data.endswith(".jsonl") else cfg.data


def features_encoders(train_dir: str) -> Optional[dict]:
    """The encoder spec (EncoderSpec.to_dict()) the features' index.json records, checked; None when none."""
    from .encoder_spec import read_index_spec
    spec = read_index_spec(train_dir)
    return spec.to_dict() if spec is not None else None


def features_vae(cfg: TrainConfig, run_vae: str, info: DistInfo) -> str:
    """The VAE whose latents the training features hold, for the stages' pipeline.json: the run's own for the toy
    world and manifests (extracted here with it); for a folder of extracted features, the VAE that
    ``python -m omni2sound.extract`` recorded in its train/index.json (a run on such a folder trains no VAE)."""
    if cfg.data == "toy" or cfg.data.endswith(".jsonl") or os.path.isfile(os.path.join(run_vae, "meta.json")):
        return run_vae
    try:
        with open(os.path.join(cfg.data, "train", "index.json")) as f:
            made_by = json.load(f).get("vae")
    except (OSError, ValueError):
        made_by = None
    if made_by and os.path.isdir(made_by):
        return made_by
    if info.main:
        print(f"[train] warning: {cfg.data}/train/index.json names no VAE folder that exists here "
              f"({made_by!r}); the stages' pipeline.json point at {run_vae}: put the VAE that extracted these "
              "features there, or edit vae_dir in pipeline.json", file=sys.stderr)
    return run_vae


def _train_audio(cfg: TrainConfig) -> torch.Tensor:
    """The VAE's training audio [N, samples]: the toy clips, or a manifest's train clips (small data: all
    in memory, cut to the shortest clip)."""
    import numpy as np
    if cfg.data == "toy":
        from .toy import ToyConfig, ToyWorld
        world = ToyWorld(ToyConfig(seed=cfg.seed, duration=cfg.toy_duration))
        return torch.from_numpy(np.stack([c.audio for c in world.clips(cfg.toy_train_clips)]))
    if not cfg.data.endswith(".jsonl"):
        raise ValueError(f"stage vae needs audio: data must be 'toy' or a manifest (.jsonl), got {cfg.data!r}")
    from .data.decode import read_audio
    from .data.manifest import read_manifest
    from .vae import VAE_PRESETS
    sr = VAE_PRESETS[cfg.vae_preset].sample_rate
    records, report = read_manifest(cfg.data, split="train")
    if report.skipped:
        print(report.summary())
    clips = []
    for r in records:
        try:
            w = torch.from_numpy(read_audio(r.audio, sr))[int(r.start * sr): int((r.start + r.duration) * sr)]
        except Exception as e:             # one bad clip never stops the run
            print(f"[train] skipped {r.clip_id}: {e}")
            continue
        clips.append(w)
    if not clips:
        raise ValueError(f"{cfg.data}: no readable training audio")
    n = min(len(w) for w in clips)
    return torch.stack([w[:n] for w in clips])
