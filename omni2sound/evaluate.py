"""Score a checkpoint or another system's outputs on the VGGSound-Omni tracks: `python -m omni2sound.evaluate`.

    python -m omni2sound.evaluate --model runs/toy/stage3                    # generate every item, then score
    python -m omni2sound.evaluate --audio-dir outputs/ --tracks-dir omni/    # score a folder of another system
    python -m omni2sound.evaluate --compare a/metrics.json b/metrics.json    # two runs side by side

Without --tracks-dir the benchmark is the toy world's (`evaluation.tracks.ToyBenchmark`). The embedded metrics
need no weights: FD/KL/IS over a log-mel statistics embedding (`*_logmel`) and, on the toy world, the oracle's
onset / class / off-screen / sync-offset scores (`oracle_*`). The field's metrics run when their checkpoints
are given: --panns, --vggish, --passt, --laion-clap, --ms-clap, --imagebind, --synchformer (local files;
nothing is downloaded).

Outputs under --out: metrics.json (every metric per track, the command, versions, embedder checkpoints'
SHA-256), metrics.md (a table in the paper's layout), metrics.png (each metric per track) and
spectrograms.png (reference vs generated, one item per track). --model also writes the generated WAVs under
<out>/generated/<track>/ and generated.jsonl, the resumable record of finished items.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from typing import Dict, List, Optional

import numpy as np

from .evaluation.tracks import TRACKS, Benchmark, TrackItem

AUDIO_EXT = (".wav", ".flac", ".ogg")
LENGTH_POLICY = ("generated clips are cut to the reference's length or zero-padded to it (av-benchmark); stereo "
                 "is averaged to mono and other sample rates are resampled with soxr (HQ)")
# the paper's columns first, then the rest of the field's metrics, then the embedded ones
COLUMN_ORDER = ("FD_VGG", "FD_PANNs", "FD_PaSST", "KL_PANNs", "KL_PaSST", "IS_PANNs", "IS_PaSST", "IB", "DeSync",
                "CLAP_LAION", "CLAP_MS", "FD_logmel", "KL_logmel", "IS_logmel", "oracle_onset_f1",
                "oracle_class_acc", "oracle_class_f1", "oracle_offscreen_recall", "oracle_offset_s")


def safe_name(clip_id: str) -> str:
    return clip_id.replace("/", "__")


# ----------------------------------------------------------------------------------------------------
# benchmark and embedders
# ----------------------------------------------------------------------------------------------------
def load_benchmark(args, run_meta: Optional[dict]) -> Benchmark:
    from .evaluation.tracks import FileBenchmark, ToyBenchmark
    if args.tracks_dir:
        return FileBenchmark(args.tracks_dir, args.sample_rate)
    cfg = (run_meta or {}).get("config", {})
    seed = args.toy_seed if args.toy_seed is not None else int(cfg.get("seed", 0))
    duration = args.toy_duration or float(cfg.get("toy_duration", 2.0))
    return ToyBenchmark(n=args.toy_clips, seed=seed, duration=duration, level_db=args.offscreen_db)


def load_scorer(args):
    from .evaluation.embedders.logmel import LogMelStats
    from .evaluation.runner import Scorer
    dev = args.device or "cpu"
    import torch
    dtype = torch.bfloat16 if str(dev).startswith("cuda") and not args.fp32 else torch.float32
    audio = [] if args.no_logmel else [LogMelStats().to(dev)]
    if args.panns:
        from .evaluation.embedders.panns import PannsCnn14
        audio.append(PannsCnn14.from_checkpoint(args.panns).to(dev, dtype))
    if args.vggish:
        from .evaluation.embedders.vggish import VGGish
        audio.append(VGGish.from_checkpoint(args.vggish).to(dev, dtype))
    if args.passt:
        from .evaluation.embedders.passt import PaSST
        audio.append(PaSST.from_checkpoint(args.passt).to(dev, dtype))
    clap = []
    if args.laion_clap:
        from .evaluation.embedders.clap import LaionClap
        clap.append(LaionClap.from_checkpoint(args.laion_clap, device=dev))
    if args.ms_clap:
        from .evaluation.embedders.clap import MsClap
        clap.append(MsClap.from_checkpoint(args.ms_clap, device=dev))
    ib = sync = None
    if args.imagebind:
        from .evaluation.embedders.imagebind import ImageBind
        ib = ImageBind.from_checkpoint(args.imagebind, device=dev)
    if args.synchformer:
        from .synchformer import Synchformer
        sync = Synchformer.from_checkpoint(args.synchformer, device=dev)
    return Scorer(audio, clap, ib, sync, oracle=not args.no_oracle, batch_size=args.batch_size)


# ----------------------------------------------------------------------------------------------------
# generation (--model): resumable, each item exactly once
# ----------------------------------------------------------------------------------------------------
def read_done(path: str) -> Dict[str, str]:
    """item_id -> WAV path of the finished items (a torn last line from a kill is ignored)."""
    done: Dict[str, str] = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    d = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if os.path.isfile(d.get("path", "")):
                    done[d["item_id"]] = d["path"]
    return done


def chunks_of(items: List[TrackItem], batch_size: int) -> List[List[TrackItem]]:
    """Fixed batches over the fixed item order (one task and duration per batch): a resumed run regenerates a
    batch with the same noise seed, so an item's audio does not depend on where a kill happened."""
    out, cur = [], []
    for it in items:
        if cur and (len(cur) == batch_size or (it.track, it.duration) != (cur[0].track, cur[0].duration)):
            out.append(cur)
            cur = []
        cur.append(it)
    if cur:
        out.append(cur)
    return out


def conditions_for(pipe, bench: Benchmark, batch: List[TrackItem]):
    task = batch[0].task
    text = [it.text if task != "v2a" else None for it in batch]
    dur = batch[0].duration
    if task == "t2a":
        return pipe.conditions_from_features(text=text, duration=dur, batch=len(batch))
    if hasattr(bench, "frames_semantic"):           # frames in memory (the toy world)
        sem = [pipe.video_encoder.encode(bench.frames_semantic(it)).float() for it in batch]
        syn = [pipe.sync_encoder.encode(bench.frames(it, 25.0)).float() for it in batch]
        return pipe.conditions_from_features(video_features=sem, sync_features=syn, text=text, duration=dur,
                                             batch=len(batch))
    return pipe.encode([it.video for it in batch], text, dur)


def generate(args, bench: Benchmark, tracks: List[str], out: str, run_meta: Optional[dict]) -> Dict[str, str]:
    from tqdm import tqdm

    from .audio import save_audio
    from .pipeline import Omni2SoundPipeline
    cfg = (run_meta or {}).get("config", {})
    steps = args.steps or int(cfg.get("sample_steps", 25))
    # the run's report guidance (older runs' configs name it cfg_scale)
    guidance = args.guidance if args.guidance is not None else cfg.get("guidance", cfg.get("cfg_scale", 4.5))
    if isinstance(guidance, list):
        guidance = tuple(guidance)
    args.generation = {"model": os.path.abspath(args.model), "steps": steps, "guidance": guidance, "seed": args.seed,
                       "batch_size": args.batch_size}
    pipe = Omni2SoundPipeline.from_pretrained(args.model, device=args.device or "cpu")
    record = os.path.join(out, "generated.jsonl")
    done = read_done(record)
    items = [it for t in tracks for it in bench.tracks[t]]
    batches = chunks_of(items, args.batch_size)
    todo = [(k, b) for k, b in enumerate(batches) if any(it.item_id not in done for it in b)]
    n_todo = sum(sum(it.item_id not in done for it in b) for _, b in todo)
    print(f"[evaluate] {len(items)} items, {len(items) - n_todo} already generated, {n_todo} to go "
          f"({steps} steps, guidance {guidance}, device {pipe.device})", file=sys.stderr)
    with open(record, "a", encoding="utf-8") as rec, tqdm(total=n_todo, unit="item", desc="generate",
                                                           disable=args.quiet) as bar:
        for k, batch in todo:
            cond = conditions_for(pipe, bench, batch)
            res = pipe.generate_from_conditions(cond, steps=steps, guidance=guidance, seed=args.seed + k)
            for it, wav in zip(batch, res.audio):
                if it.item_id in done:
                    continue
                path = os.path.join(out, "generated", it.track, safe_name(it.clip_id) + ".wav")
                save_audio(path, wav, res.sample_rate, float32=True)   # scored at the model's own level
                rec.write(json.dumps({"item_id": it.item_id, "path": path}) + "\n")
                rec.flush()
                os.fsync(rec.fileno())
                done[it.item_id] = path
                bar.update(1)
    return done


# ----------------------------------------------------------------------------------------------------
# another system's outputs (--audio-dir)
# ----------------------------------------------------------------------------------------------------
def match_audio_dir(directory: str, bench: Benchmark, tracks: List[str]) -> tuple:
    """(item_id -> file, missing item ids per track, files that match no item). A track reads
    DIR/<track>/<clip id>.<ext> when DIR/<track>/ exists, else DIR/<clip id>.<ext>; '/' in a clip id is '__'
    in its file name, and the id's last path component is accepted too."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--audio-dir {directory}: not a folder")
    found: Dict[str, str] = {}
    missing: Dict[str, List[str]] = {}
    used = set()
    listing: Dict[str, Dict[str, str]] = {}

    def files_in(d):
        if d not in listing:
            listing[d] = {}
            if os.path.isdir(d):
                for f in sorted(os.listdir(d)):
                    stem, ext = os.path.splitext(f)
                    if ext.lower() in AUDIO_EXT:
                        listing[d].setdefault(stem, os.path.join(d, f))
        return listing[d]

    for t in tracks:
        d = os.path.join(directory, t) if os.path.isdir(os.path.join(directory, t)) else directory
        files = files_in(d)
        for it in bench.tracks[t]:
            p = files.get(safe_name(it.clip_id)) or files.get(it.clip_id.rsplit("/", 1)[-1])
            if p is None:
                missing.setdefault(t, []).append(it.item_id)
            else:
                found[it.item_id] = p
                used.add(p)
    extra = sorted(p for d in listing.values() for p in d.values() if p not in used)
    return found, missing, extra


def load_generated(paths: Dict[str, str], sample_rate: int) -> Dict[str, np.ndarray]:
    from .audio import load_audio
    return {k: load_audio(p, sample_rate).numpy() for k, p in paths.items()}


def baseline_audio(kind: str, bench: Benchmark, tracks: List[str], seed: int) -> Dict[str, np.ndarray]:
    """Reference-derived systems for sanity checks: the references themselves, white noise at the reference's
    RMS, silence, or the references shuffled within each track (right set, wrong pairing)."""
    out = {}
    rng = np.random.default_rng(seed)
    for t in tracks:
        items = bench.tracks[t]
        refs = [np.asarray(bench.reference(it), np.float32) for it in items]
        perm = np.roll(np.arange(len(items)), 1) if len(items) > 1 else np.arange(len(items))
        for i, (it, r) in enumerate(zip(items, refs)):
            if kind == "reference":
                y = r
            elif kind == "noise":
                rms = float(np.sqrt(np.mean(r.astype(np.float64) ** 2))) or 0.1
                y = (rng.standard_normal(len(r)) * rms).astype(np.float32)
            elif kind == "silence":
                y = np.zeros_like(r)
            elif kind == "shuffled":
                y = refs[perm[i]]
            else:
                raise ValueError(f"unknown baseline {kind!r}")
            out[it.item_id] = y
    return out


# ----------------------------------------------------------------------------------------------------
# reports
# ----------------------------------------------------------------------------------------------------
def versions() -> dict:
    import importlib
    v = {"python": platform.python_version(), "platform": platform.platform()}
    for m in ("omni2sound", "torch", "numpy", "scipy", "soxr", "soundfile"):
        try:
            v[m] = getattr(importlib.import_module(m), "__version__", "?")
        except ImportError:
            v[m] = None
    return v


def ordered_metrics(results: dict) -> List[str]:
    seen = {k for r in results.values() for k in r if k != "n" and not k.endswith("_std")}
    return [c for c in COLUMN_ORDER if c in seen] + sorted(seen - set(COLUMN_ORDER))


def fmt(v) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return f"{v:.3f}" if abs(v) < 1000 else f"{v:.1f}"


def markdown_table(results: dict, system: str) -> str:
    from .evaluation.runner import higher_is_better
    cols = ordered_metrics(results)
    arrow = {True: " ↑", False: " ↓", None: ""}
    lines = ["| task | system | n | " + " | ".join(c + arrow[higher_is_better(c)] for c in cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for t, r in results.items():
        cells = []
        for c in cols:
            v = r.get(c)
            s = fmt(v)
            if c + "_std" in r and v is not None:
                s += f" ± {r[c + '_std']:.2f}"
            cells.append(s)
        lines.append(f"| {t.upper() if t != 'offscreen' else 'off-screen'} | {system} | {r.get('n', '-')} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_metrics(path: str, results: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = ordered_metrics(results)
    if not cols:
        return
    n = len(cols)
    w = min(4, n)
    h = (n + w - 1) // w
    fig, axes = plt.subplots(h, w, figsize=(3.2 * w, 2.6 * h), squeeze=False)
    tracks = list(results)
    for ax, c in zip(axes.flat, cols):
        vals = [results[t].get(c) for t in tracks]
        xs = [i for i, v in enumerate(vals) if v is not None and np.isfinite(v)]
        ax.bar([tracks[i] for i in xs], [vals[i] for i in xs], color="#4a7ab5")
        ax.set_title(c, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_spectrograms(path: str, examples: List[tuple], sr: int) -> None:
    """examples: [(title, reference [N], generated [N])], one row per item."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not examples:
        return
    fig, axes = plt.subplots(len(examples), 2, figsize=(10, 2.3 * len(examples)), squeeze=False)
    for row, (title, ref, gen) in zip(axes, examples):
        for ax, wav, name in zip(row, (ref, gen), ("reference", "generated")):
            if np.abs(wav).max() > 0:
                with np.errstate(divide="ignore"):
                    ax.specgram(wav, NFFT=512, Fs=sr, noverlap=384, cmap="magma", vmin=-120)
            ax.set_title(f"{name}: {title}"[:110], fontsize=7)
            ax.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    os.replace(tmp, path)


def compare(a_path: str, b_path: str) -> str:
    from .evaluation.runner import higher_is_better
    a, b = (json.load(open(p)) for p in (a_path, b_path))
    lines = [f"A: {a_path} ({a.get('system', '?')})", f"B: {b_path} ({b.get('system', '?')})", "",
             f"{'track':<10} {'metric':<24} {'A':>10} {'B':>10} {'B - A':>10}  better"]
    for t in [t for t in TRACKS if t in a.get("tracks", {}) or t in b.get("tracks", {})]:
        ra, rb = a.get("tracks", {}).get(t, {}), b.get("tracks", {}).get(t, {})
        for m in ordered_metrics({"a": ra, "b": rb}):
            va, vb = ra.get(m), rb.get(m)
            d = (vb - va) if isinstance(va, (int, float)) and isinstance(vb, (int, float)) else None
            hib = higher_is_better(m)
            better = "" if d is None or hib is None or d == 0 else ("B" if (d > 0) == hib else "A")
            lines.append(f"{t:<10} {m:<24} {fmt(va):>10} {fmt(vb):>10} {fmt(d):>10}  {better}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m omni2sound.evaluate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a pipeline folder (e.g. runs/toy/stage3): generate every item, then score")
    src.add_argument("--audio-dir", help="score another system's outputs: DIR[/<track>]/<clip id>.wav|flac|ogg")
    src.add_argument("--baseline", choices=("reference", "noise", "silence", "shuffled"),
                     help="score a reference-derived system (sanity checks: reference = a perfect system)")
    src.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="print two runs side by side")
    src.add_argument("--export-references", metavar="DIR",
                     help="write every item's reference audio as DIR/<track>/<clip id>.wav and items.jsonl")
    ap.add_argument("--tracks-dir", help="track files from `python -m omni2sound.evaluation.tracks` "
                                         "(default: the toy world's benchmark)")
    ap.add_argument("--tracks", nargs="+", choices=TRACKS, default=list(TRACKS))
    ap.add_argument("--out", help="output folder (default: <model>/eval, <audio-dir>/eval, or eval-<baseline>)")
    ap.add_argument("--system", help="system name in the table (default: from the source)")
    ap.add_argument("--sample-rate", type=int, default=16000, help="rate the references are read at")
    ap.add_argument("--toy-clips", type=int, default=48, help="toy test clips per track")
    ap.add_argument("--toy-seed", type=int, default=None, help="toy world seed (default: the run's)")
    ap.add_argument("--toy-duration", type=float, default=None, help="toy clip seconds (default: the run's)")
    ap.add_argument("--offscreen-db", type=float, default=0.0, help="toy off-screen source level re the target")
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's)")
    ap.add_argument("--guidance", "--cfg", dest="guidance", type=float, nargs="+", default=None,
                    help="classifier-free guidance: one joint scale or two (video text); default: the run's (--cfg is "
                         "the same flag)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fp32", action="store_true", help="embedders in fp32 on a GPU (default bf16)")
    for name, what in (("panns", "Cnn14_16k_mAP=0.438.pth"), ("vggish", "vggish-10086976.pth"),
                       ("passt", "passt-s-f128-p16-s10-ap.476-swa.pt"),
                       ("laion-clap", "music_speech_audioset_epoch_15_esc_89.98.pt"), ("ms-clap", "CLAP 2023 .pth"),
                       ("imagebind", "imagebind_huge.pth"), ("synchformer", "Synchformer checkpoint")):
        ap.add_argument(f"--{name}", metavar="CKPT", help=f"local {what}")
    ap.add_argument("--no-logmel", action="store_true")
    ap.add_argument("--no-oracle", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.guidance is not None:
        if len(args.guidance) not in (1, 2):
            ap.error("--guidance takes one joint scale or two (video text)")
        args.guidance = args.guidance[0] if len(args.guidance) == 1 else tuple(args.guidance)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compare:
        print(compare(*args.compare))
        return 0
    run_meta = None
    if args.model:
        p = os.path.join(args.model, "meta.json")
        if os.path.isfile(p):
            with open(p) as f:
                run_meta = json.load(f)
    bench = load_benchmark(args, run_meta)
    tracks = [t for t in args.tracks if t in bench.tracks]
    if args.export_references:
        import torch

        from .audio import save_audio
        lines = []
        for t in tracks:
            for it in bench.tracks[t]:
                p = os.path.join(args.export_references, t, safe_name(it.clip_id) + ".wav")
                save_audio(p, torch.from_numpy(np.asarray(bench.reference(it), np.float32)), bench.sample_rate,
                           float32=True)
                lines.append(it.to_json())
        with open(os.path.join(args.export_references, "items.jsonl"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        print(f"[evaluate] wrote {len(lines)} reference clips under {args.export_references}")
        return 0
    out = args.out or (os.path.join(args.model, "eval") if args.model else
                       os.path.join(args.audio_dir, "eval") if args.audio_dir else f"eval-{args.baseline}")
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    missing, extra = {}, []
    if args.model:
        paths = generate(args, bench, tracks, out, run_meta)
        gen = load_generated({k: v for k, v in paths.items()}, bench.sample_rate)
        system = args.system or os.path.basename(os.path.normpath(args.model))
    elif args.audio_dir:
        paths, missing, extra = match_audio_dir(args.audio_dir, bench, tracks)
        for t, ids in missing.items():
            print(f"[evaluate] {t}: {len(ids)} of {len(bench.tracks[t])} items have no file, e.g. "
                  f"{', '.join(ids[:3])}", file=sys.stderr)
        if extra:
            print(f"[evaluate] {len(extra)} files match no item, e.g. {', '.join(extra[:3])}", file=sys.stderr)
        gen = load_generated(paths, bench.sample_rate)
        system = args.system or os.path.basename(os.path.normpath(args.audio_dir))
    else:
        gen = baseline_audio(args.baseline, bench, tracks, args.seed)
        system = args.system or args.baseline
    t_gen = time.time() - t0
    scorer = load_scorer(args)
    results, examples = {}, []
    t1 = time.time()
    for t in tracks:
        items = [it for it in bench.tracks[t] if it.item_id in gen]
        if len(items) < 2:
            print(f"[evaluate] {t}: {len(items)} scored items, skipped (a set metric needs 2)", file=sys.stderr)
            continue
        results[t] = scorer.score_track(bench, items, [gen[it.item_id] for it in items])
        ref = np.asarray(bench.reference(items[0]), np.float32)
        from .evaluation.runner import fit_length
        examples.append((f"{t} {items[0].clip_id}: {items[0].text or '(video only)'}", ref,
                         fit_length(gen[items[0].item_id], len(ref))))
        if not args.quiet:
            print(f"[evaluate] {t}: " + ", ".join(f"{k} {fmt(v)}" for k, v in results[t].items()), file=sys.stderr)
    report = {"system": system, "tracks": results, "command": " ".join(shlex.quote(a) for a in
                                                                       ["python", "-m", "omni2sound.evaluate"]
                                                                       + (sys.argv[1:] if argv is None else argv)),
              "benchmark": {"name": bench.name, **bench.meta, "counts": {t: len(bench.tracks[t]) for t in tracks}},
              "embedders": scorer.describe(), "length_policy": LENGTH_POLICY, "versions": versions(),
              "warnings": scorer.warnings, "missing": missing, "extra_files": extra,
              "seconds": {"generate_or_load": t_gen, "score": time.time() - t1},
              "generation": getattr(args, "generation", None),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json(os.path.join(out, "metrics.json"), report)
    md = markdown_table(results, system)
    with open(os.path.join(out, "metrics.md"), "w", encoding="utf-8") as f:
        f.write(f"# {system} on {bench.name}\n\n{md}\n{LENGTH_POLICY}.\n")
    plot_metrics(os.path.join(out, "metrics.png"), results)
    plot_spectrograms(os.path.join(out, "spectrograms.png"), examples, bench.sample_rate)
    print(md)
    for w in scorer.warnings:
        print(f"[evaluate] warning: {w}", file=sys.stderr)
    print(f"[evaluate] wrote {out}/metrics.json, metrics.md, metrics.png, spectrograms.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
