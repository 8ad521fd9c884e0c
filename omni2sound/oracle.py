"""The oracle: reads the toy world's events (class, onset) back from audio, and scores them.

Each toy class sounds in its own frequency band (`toy.SOUNDS`), so the analysis is a band-energy one:
a short-time Fourier transform (16 ms Hann window, 5 ms hop), the energy of each class band per frame
in dB, then
  - impulsive classes: an onset where the band energy rises by more than `rise_db` within 30 ms and the
    peak that follows is louder than `floor_db` (absolute, re full scale); rises closer than 120 ms are
    one onset;
  - continuous classes: present when the band's median energy over the clip is above `floor_db`.
The thresholds are physical (dB re full scale) and fixed once for real toy clips; they are not fitted
to generated audio. `score(...)` matches events to the truth: same class, onset within 40 ms.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

from .toy import CLASSES, CONTINUOUS, IMPULSIVE, SOUNDS


@dataclass
class OracleConfig:
    sample_rate: int = 16000
    n_fft: int = 256           # 16 ms
    hop: int = 80              # 5 ms
    rise_db: float = 9.0       # an onset: the band gets this much louder ...
    rise_frames: int = 6       # ... within 30 ms
    floor_db: float = -30.0    # band energy (per frame, dB re a full-scale sine in the band) that counts as sound
    merge_s: float = 0.12      # rises closer than this are one onset
    tolerance_s: float = 0.040


class Oracle:
    def __init__(self, cfg: OracleConfig | None = None):
        self.cfg = cfg or OracleConfig()
        c = self.cfg
        freqs = np.fft.rfftfreq(c.n_fft, 1.0 / c.sample_rate)
        self.bands = {k: (freqs >= SOUNDS[k][2][0]) & (freqs <= SOUNDS[k][2][1]) for k in CLASSES}
        self.window = np.hanning(c.n_fft + 1)[:-1]
        # energy of a full-scale sine in one frame: the dB reference
        self.ref = (self.window.sum() / 2) ** 2

    def band_db(self, audio: np.ndarray) -> tuple[np.ndarray, dict]:
        """Frame times [F] (s) and per-class band energies {cls: [F] dB re full scale}."""
        c = self.cfg
        x = np.asarray(audio, np.float64).reshape(-1)
        pad = c.n_fft // 2
        x = np.pad(x, (pad, pad))
        n_frames = 1 + (len(x) - c.n_fft) // c.hop
        idx = np.arange(c.n_fft)[None, :] + c.hop * np.arange(n_frames)[:, None]
        spec = np.abs(np.fft.rfft(x[idx] * self.window, axis=1)) ** 2          # [F, bins]
        times = np.arange(n_frames) * c.hop / c.sample_rate                    # window centres
        return times, {k: 10 * np.log10(spec[:, m].sum(1) / self.ref + 1e-12) for k, m in self.bands.items()}

    def analyse(self, audio: np.ndarray) -> list[dict]:
        """Events heard in `audio` [N]: [{"cls", "onset"}] (continuous sources with onset 0)."""
        c = self.cfg
        times, db = self.band_db(audio)
        events = []
        for k in IMPULSIVE:
            e = np.maximum(db[k], c.floor_db - 20)   # below the floor is silence: no rises out of noise
            # rise over the previous 30 ms, and the loudest level over the next 30 ms
            padded = np.concatenate([np.full(c.rise_frames, e[0]), e, np.full(c.rise_frames, e[-1])])
            win = np.lib.stride_tricks.sliding_window_view(padded, c.rise_frames)     # [F + R + 1, R]
            prev_min = win[: len(e)].min(1)
            nxt_max = win[c.rise_frames:c.rise_frames + len(e)].max(1)
            nxt_max = np.maximum(nxt_max, e)
            rise = e - prev_min
            cand = np.where((rise > c.rise_db) & (nxt_max > c.floor_db))[0]
            # one onset per run of candidates (rises closer than merge_s): its first frame
            last = -1e9
            for j in cand:
                t = times[j]
                if t - last > c.merge_s:
                    events.append({"cls": k, "onset": float(t)})
                last = t
        for k in CONTINUOUS:
            if np.median(db[k]) > c.floor_db:
                events.append({"cls": k, "onset": 0.0})
        return events


def match_events(pred: list, truth: list, tolerance: float = 0.040) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) of impulsive events: same class, |dt| <= tolerance,
    each truth event matched once (greedy by distance)."""
    pred = [p for p in pred if p["cls"] in IMPULSIVE]
    truth = [t for t in truth if t["cls"] in IMPULSIVE]
    pairs = sorted((abs(p["onset"] - t["onset"]), i, j) for i, p in enumerate(pred) for j, t in enumerate(truth)
                   if p["cls"] == t["cls"] and abs(p["onset"] - t["onset"]) <= tolerance)
    used_p, used_t = set(), set()
    for _, i, j in pairs:
        if i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
    tp = len(used_p)
    return tp, len(pred) - tp, len(truth) - tp


def f1(tp: int, fp: int, fn: int) -> float:
    return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def classes_of(events: list) -> set:
    return {e["cls"] for e in events}


def score(preds: list, truths: list, tolerance: float = 0.040) -> dict:
    """Scores of a set of clips. preds/truths: lists (one per clip) of event lists [{"cls", "onset", ...}].
    onset_f1: impulsive events, class right and onset within tolerance; class_acc: fraction of clips whose
    set of heard classes equals the truth; class_f1: per (clip, class) presence F1;
    offscreen_recall: fraction of off-screen classes (truth events with onscreen False) that are heard."""
    tp = fp = fn = 0
    exact = 0
    ctp = cfp = cfn = 0
    off_hit = off_n = 0
    for p, t in zip(preds, truths):
        a, b, c = match_events(p, t, tolerance)
        tp, fp, fn = tp + a, fp + b, fn + c
        pc, tc = classes_of(p), classes_of(t)
        exact += pc == tc
        ctp, cfp, cfn = ctp + len(pc & tc), cfp + len(pc - tc), cfn + len(tc - pc)
        for k in {e["cls"] for e in t if not e.get("onscreen", True)}:
            off_n += 1
            off_hit += k in pc
    n = max(1, len(truths))
    return {"n_clips": len(truths), "onset_f1": f1(tp, fp, fn), "onset_tp": tp, "onset_fp": fp, "onset_fn": fn,
            "class_acc": exact / n, "class_f1": f1(ctp, cfp, cfn),
            "offscreen_recall": (off_hit / off_n) if off_n else None, "offscreen_n": off_n}


# ----------------------------------------------------------------------------------------------------
# The toy report: sample held-out prompts from a trained run and let the oracle judge them
# ----------------------------------------------------------------------------------------------------
TRACKS = {   # track: (task the model is asked, first test-split index, off-screen source in the prompt)
    "v2a": ("v2a", 0, False),
    "t2a": ("t2a", 1000, False),
    "vt2a": ("vt2a", 2000, False),
    "offscreen": ("vt2a", 3000, True),
}
# the learning bar, per track: metric >= value
BAR = {"v2a": {"onset_f1": 0.8, "class_acc": 0.8}, "t2a": {"class_acc": 0.8},
       "vt2a": {"onset_f1": 0.8, "class_acc": 0.8}, "offscreen": {"offscreen_recall": 0.7}}


def _truth(clip) -> list:
    return [{"cls": e.cls, "onset": e.onset, "onscreen": e.onscreen} for e in clip.events]


def _track_prompts(cfg, vae, enc, n: int, split: str, progress: bool):
    """Per track: (track, task, clips, z_true [n, T, C] the true audio's latents, Conditions of the prompts)."""
    import torch
    from tqdm import tqdm

    from .data.shards import FeatureTable
    from .extract import encode_items
    from .toy import ToyConfig, ToyWorld

    world = ToyWorld(ToyConfig(seed=cfg.seed, duration=cfg.toy_duration))
    tracks = tqdm(TRACKS.items(), desc=f"report ({split} prompts)", unit="track", disable=not progress,
                  dynamic_ncols=True)
    for track, (task, start, off) in tracks:
        tracks.set_postfix_str(track)
        clips = world.clips(n, split, start=start, offscreen=off)
        table = FeatureTable.from_items(encode_items([{"clip_id": c.clip_id, "audio": c.audio,
                                                        "frames_semantic": c.frames_semantic,
                                                        "frames_sync": c.frames_sync, "caption": c.caption,
                                                        "duration": c.duration} for c in clips], vae, enc))
        z_true, cond = table.batch(torch.arange(n), sample_latent=False)
        yield track, task, clips, z_true, cond.for_task(task)


def evaluate_toy(cfg, stage_dir: str, vae_dir: str, n: Optional[int] = None, enc=None, seed: int = 1234,
                 split: str = "test", progress: Optional[bool] = None, fp8: bool = False, dtype=None) -> dict:
    """Generate every track's held-out prompts with the stage's EMA DiT and score them with the oracle.

    The audio comes from the sampler users run: the stage folder loaded as an ``Omni2SoundPipeline`` (as
    ``python -m omni2sound.generate --model STAGE`` loads it, on the CPU) and ``generate_from_conditions`` on the
    prompts' features, with ``cfg.sample_steps`` Euler steps, ``cfg.guidance`` and one seed for each track's batch.
    vae_dir: the VAE that encodes the true audio (the features) and decodes the VAE ceiling, the oracle on VAE
    reconstructions of the true audio (the best any DiT can reach here); the pipeline decodes with the VAE its
    pipeline.json names (the run's, the same one).
    split: "test" for the report; "val" to choose sampling settings (steps, guidance) without touching the test
    prompts. fp8: the DiT blocks' projections as e4m3 GEMMs (``SamplingOptions.fp8``). dtype: the DiT's (default
    the pipeline's on the CPU, fp32)."""
    ev = _sample_and_score(cfg, stage_dir, vae_dir, n, enc, seed, split, progress, {"default": fp8}, dtype)
    return {"results": {t: {**r, "vae_ceiling": ev["ceiling"][t]} for t, r in ev["results"]["default"].items()},
            "audio": ev["audio"]["default"]}


def _sample_and_score(cfg, stage_dir: str, vae_dir: str, n: Optional[int], enc, seed: int, split: str,
                      progress: Optional[bool], variants: Dict[str, bool], dtype=None, device="cpu") -> dict:
    """Every track's prompts sampled once per variant (name -> fp8) on the same conditions and noise, and scored.
    {"results": {variant: {track: scores}}, "audio": {variant: {track: (clips, wav [n, N])}},
    "latents": {variant: {track: [n, T, C]}}, "ceiling": {track: scores}, "seconds": {variant: generation wall
    time}, "pipe": the pipeline}."""
    import torch

    from .extract import Encoders
    from .pipeline import Omni2SoundPipeline
    from .toy import ToyConfig
    from .vae import AudioVAE

    n = n or cfg.toy_eval_clips
    progress = getattr(cfg, "progress", True) if progress is None else progress
    vae = AudioVAE.from_pretrained(vae_dir).eval()
    pipe = Omni2SoundPipeline.from_pretrained(stage_dir, device=device, dtype=dtype)
    enc = enc or Encoders()
    oracle = Oracle()
    N = int(round(cfg.toy_duration * ToyConfig().sample_rate))
    out = {"results": {v: {} for v in variants}, "audio": {v: {} for v in variants},
           "latents": {v: {} for v in variants}, "ceiling": {}, "seconds": {v: 0.0 for v in variants}, "pipe": pipe}
    for track, task, clips, z_true, cond in _track_prompts(cfg, vae, enc, n, split, progress):
        truths = [_truth(c) for c in clips]
        for v, fp8 in variants.items():
            t0 = time.perf_counter()
            gen = pipe.generate_from_conditions(cond, steps=cfg.sample_steps, guidance=cfg.guidance, seed=seed,
                                                fp8=fp8)
            out["seconds"][v] += time.perf_counter() - t0
            wav = gen.audio[:, :N].numpy()                                                  # [n, N]
            out["results"][v][track] = {"task": task, **score([oracle.analyse(w) for w in wav], truths)}
            out["audio"][v][track] = (clips, wav)
            out["latents"][v][track] = gen.latents
        with torch.no_grad():
            recon = vae.decode(z_true.transpose(1, 2))[:, 0, :N].numpy()
        out["ceiling"][track] = score([oracle.analyse(w) for w in recon], truths)
    return out


# the scores compared between precisions; each track is judged on the ones of its learning bar
SCORES = ("onset_f1", "class_acc", "class_f1", "offscreen_recall")


def score_difference(base: dict, other: dict, track: str) -> tuple:
    """Two ``score`` results of the same prompts -> ({score: (other - base) x prompts, None where undefined},
    whether every score of the track's bar differs by at most one prompt, whether all defined scores do)."""
    m = base["n_clips"]
    if other["n_clips"] != m:
        raise ValueError(f"score_difference: {m} prompts against {other['n_clips']}")
    diff = {k: None if base[k] is None or other[k] is None else round((other[k] - base[k]) * m, 6) for k in SCORES}
    within = all(diff[k] is not None and abs(diff[k]) <= 1 + 1e-6 for k in BAR[track])
    within_all = all(d is None or abs(d) <= 1 + 1e-6 for d in diff.values())
    return diff, within, within_all


def compare_fp8(cfg, stage_dir: str, vae_dir: str, n: Optional[int] = None, enc=None, seed: int = 1234,
                split: str = "test", progress: Optional[bool] = None, dtype=None, device="cpu") -> dict:
    """The oracle's scores of the toy world's held-out prompts sampled with the DiT's precision (``dtype``; default
    the pipeline's on ``device``: fp32 on the CPU, bf16 on a GPU) and with its block projections in fp8
    (``SamplingOptions.fp8``), on the same conditions, seed and noise, per track.

    A score difference is counted in prompts: (fp8 - default) x the track's number of prompts (a class accuracy
    difference of 1/n is one prompt heard differently). The guard: on every track, each score of the track's learning
    bar (``BAR``) differs by at most one prompt ("within_one_prompt"); "all_scores_within_one_prompt" asks it of all
    four scores. Also per track: the fp8 latents against the default ones (relative error, cosine), and which
    ``fp8_linear`` backend ran the projections (``Fp8Weights.backends``: "scaled_mm" or "reference")."""
    import torch
    import torch.nn.functional as F

    from .pipeline import SamplingOptions

    t0 = time.time()
    ev = _sample_and_score(cfg, stage_dir, vae_dir, n, enc, seed, split, progress, {"default": False, "fp8": True},
                           dtype, device)
    pipe = ev["pipe"]
    act_scale = SamplingOptions().fp8_act_scale                     # generate_from_conditions' fp8: per token
    table = pipe.fp8_weights(act_scale)
    tracks, ok, ok_all = {}, True, True
    for track, base in ev["results"]["default"].items():
        f8 = ev["results"]["fp8"][track]
        m = base["n_clips"]
        diff, within, within_all = score_difference(base, f8, track)
        a, b = ev["latents"]["fp8"][track].float(), ev["latents"]["default"][track].float()
        tracks[track] = {"task": base["task"], "n_prompts": m, "default": base, "fp8": f8,
                         "difference_in_prompts": diff, "judged_on": list(BAR[track]), "within_one_prompt": within,
                         "all_scores_within_one_prompt": within_all, "vae_ceiling": ev["ceiling"][track],
                         "latents_rel_err": ((a - b).norm() / b.norm()).item(),
                         "latents_cos": F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()}
        ok &= within
        ok_all &= within_all
    dt = pipe.dit.dtype
    return {"stage_dir": stage_dir, "split": split, "seed": seed, "device": str(pipe.device),
            "dtype": str(dt).replace("torch.", ""),
            "steps": cfg.sample_steps, "guidance": cfg.guidance,
            "fp8": {"act_scale": act_scale, "weights": len(table), "weights_MB": round(table.nbytes() / 2**20, 3),
                    "backends": table.backends(dt, pipe.device)},
            "tracks": tracks, "within_one_prompt": ok, "all_scores_within_one_prompt": ok_all,
            "generate_seconds": {v: round(t, 1) for v, t in ev["seconds"].items()},
            "seconds": round(time.time() - t0, 1), "torch": torch.__version__}


def _spectrogram_png(path: str, wav, sr: int, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 2.6))
    ax.specgram(wav, NFFT=256, Fs=sr, noverlap=192, cmap="magma", vmin=-120)
    ax.set_title(title, fontsize=7)
    ax.set_xlabel("s")
    ax.set_ylabel("Hz")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _loss_png(path: str, run_root: str, stages: list) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        p = os.path.join(run_root, stage, "log.jsonl")
        rows = [json.loads(line) for line in open(p)] if os.path.isfile(p) else []
        if stage == "vae":
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="vae loss")
        else:
            for task in ("v2a", "t2a", "vt2a"):
                rs = [r for r in rows if r.get("task") == task]
                if rs:
                    ax.plot([r["step"] for r in rs], [r["loss"] for r in rs], ".", ms=3, label=task)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _guidance_text(g) -> str:
    return f"video {g[0]:g} / text {g[1]:g} (separate scales)" if isinstance(g, (tuple, list)) else f"{g:g} (joint)"


def write_report(cfg, stage_dir: str, out_dir: Optional[str] = None, enc=None) -> str:
    """runs/<name>/report/: report.md, losses.png, scores.json, and per track two samples (WAV + PNG)."""
    from .audio import save_audio
    run_root = os.path.join(cfg.runs_dir, cfg.name)
    out_dir = out_dir or os.path.join(run_root, "report" if cfg.schedule == "1-2-3" else f"report-{cfg.schedule}")
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    ev = evaluate_toy(cfg, stage_dir, os.path.join(run_root, "vae"), enc=enc)
    sr = 16000
    lines = [f"# Toy report: {cfg.name} (schedule {cfg.schedule}, sampled from {stage_dir})", "",
             f"{cfg.toy_eval_clips} held-out prompts per track (test split), {cfg.sample_steps} Euler steps, "
             f"guidance {_guidance_text(cfg.guidance)}. Oracle: onset within 40 ms and class right; class_acc = the "
             "set of heard classes equals the truth; the VAE ceiling is the oracle on VAE reconstructions of the true "
             "audio.", "",
             "| track | task | onset F1 | class acc | class F1 | off-screen recall | bar | VAE ceiling F1 / acc |",
             "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    tb_samples = []
    passed_all, failing, samples = True, [], ["", "Samples (two per track):", ""]
    for track, r in ev["results"].items():
        ok = all((r[k] or 0) >= v for k, v in BAR[track].items())
        passed_all &= ok
        if not ok:
            failing.append(track)
        c = r["vae_ceiling"]
        lines.append(f"| {track} | {r['task']} | {fmt(r['onset_f1'])} | {fmt(r['class_acc'])} | {fmt(r['class_f1'])} "
                     f"| {fmt(r['offscreen_recall'])} | {'pass' if ok else 'FAIL'} "
                     f"({', '.join(f'{k} >= {v}' for k, v in BAR[track].items())}) "
                     f"| {fmt(c['onset_f1'])} / {fmt(c['class_acc'])} |")
        clips, wav = ev["audio"][track]
        for i in range(min(2, len(clips))):
            base = os.path.join(out_dir, f"{track}_{i}")
            save_audio(base + ".wav", __import__("torch").from_numpy(wav[i]), sr)
            prompt = clips[i].caption if r["task"] != "v2a" else "(video only) " + clips[i].caption
            _spectrogram_png(base + ".png", wav[i], sr, f"{track}: {prompt}")
            tb_samples.append((f"{track}_{i}", wav[i], base + ".png", prompt))
            samples.append(f"- `{track}_{i}.wav`  / `.png`: prompt \"{clips[i].caption}\" (task {r['task']}), "
                         f"truth {[(e['cls'], e['onset']) for e in _truth(clips[i])]}, "
                         f"heard {[(e['cls'], round(e['onset'], 3)) for e in Oracle().analyse(wav[i])]}")
    from .schedule import schedule
    folders = [s.folder for s in schedule(cfg)]     # e.g. stage2-only/
    _loss_png(os.path.join(out_dir, "losses.png"), run_root, folders)
    from .tblog import report_to_tensorboard
    report_to_tensorboard(out_dir, tb_samples, sr, enabled=getattr(cfg, "tensorboard", True))
    verdict = "all tracks pass" if passed_all else "NOT met; failing: " + ", ".join(failing)
    lines += samples + ["", f"Learning bar: {verdict}.", "",
              "![losses](losses.png)", ""]
    stage_meta = {}
    for s in folders:
        p = os.path.join(run_root, s, "meta.json")
        if os.path.isfile(p):
            from .files import read_json
            m = read_json(p)
            stage_meta[s] = {k: m.get(k) for k in ("steps", "seconds", "final_loss", "final_loss_by_task",
                                                   "task_counts")}
            lines.append(f"- {s}: {m.get('steps')} steps in {m.get('seconds', 0):.0f} s; "
                         f"{json.dumps({k: v for k, v in stage_meta[s].items() if k not in ('steps', 'seconds')})}")
    scores = {"stage_dir": stage_dir, "results": ev["results"], "bar": BAR, "passed": passed_all,
              "stages": stage_meta, "eval_seconds": time.time() - t0}
    with open(os.path.join(out_dir, "scores.json"), "w") as f:
        json.dump(scores, f, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return out_dir
