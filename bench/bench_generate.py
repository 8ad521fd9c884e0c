"""End-to-end generation latency: the optimised path against the plain path, same run, same inputs.

    python bench/bench_generate.py --quick                 # CPU: tiny and S, batch 1 (tiny VAE)
    python bench/bench_generate.py                         # tiny, S, L at batch 1 and 8
    python bench/bench_generate.py --presets L --batches 1 --device cuda    # the GPU bar (bf16)
    python bench/bench_generate.py --ablate --presets S                     # each low-latency item on its own

Every row generates ``--duration`` s of audio (default 10 s = 250 latent frames) with ``--steps`` Euler steps
(default 25) and joint CFG (default 4.5) from precomputed features with random weights: 80 video tokens
(8 / s), ``--text-tokens`` text tokens, 240 sync features (24 / s). Encoders are not timed (the GPU bar is
"from precomputed features"); the VAE decode is timed as its own phase.

    optimised  conditions prepared once per request, batched CFG (one forward per step), fused ops (on the CPU
               with oneDNN's GEMMs for the wide projections),
               CUDA-graph replay of the step on a GPU, bf16 DiT on a GPU
    plain      conditions recomputed every step, sequential CFG, reference ops (aten's GEMMs), no graphs (same
               dtype)

Columns: ms per phase (prepare, sample = all steps, decode), ms per step, total, real-time factor
(seconds of audio per second of compute, > 1 is faster than real time), speedups plain / optimised of the
sampling and of the total, the largest latent difference between the two paths, and peak memory (GPU:
max allocated; CPU: the process's peak RSS so far, cumulative). Warm-up (incl. graph capture) is timed apart.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time

import torch
from _timing import interleaved_rounds  # bench/ is the script's folder, on sys.path

from omni2sound import ops
from omni2sound.conditions import Conditions
from omni2sound.gpu_info import provenance
from omni2sound.model import DIT_PRESETS, Omni2SoundDiT
from omni2sound.pipeline import Omni2SoundPipeline, PipelineConfig


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU, {torch.get_num_threads()} threads (torch {torch.__version__})"


def random_dit(preset: str, device, dtype, latent_dim: int) -> Omni2SoundDiT:
    """Random weights without the cost of the init policy: build on meta, allocate, fill N(0, 0.02)."""
    from dataclasses import replace
    cfg = replace(DIT_PRESETS[preset], latent_dim=latent_dim)
    with torch.device("meta"):
        model = Omni2SoundDiT(cfg)
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model.to(dtype).eval()


def random_conditions(cfg, batch: int, duration: float, text_tokens: int) -> Conditions:
    g = torch.Generator().manual_seed(1)
    Lv, Ls = int(duration * cfg.video_rate), int(duration * cfg.sync_rate)
    return Conditions(text_tokens=torch.randn(batch, text_tokens, cfg.text_dim, generator=g),
                      text_lens=torch.full((batch,), text_tokens, dtype=torch.long),
                      video_tokens=torch.randn(batch, Lv, cfg.video_dim, generator=g),
                      video_lens=torch.full((batch,), Lv, dtype=torch.long),
                      sync=torch.randn(batch, Ls, cfg.sync_dim, generator=g),
                      duration=torch.full((batch,), duration))


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_once(pipe, cond, args, plain: bool):
    t0 = time.perf_counter()
    out = pipe.generate_from_conditions(cond, steps=args.steps, guidance=args.guidance, seed=0, plain=plain)
    out.timings["total"] = time.perf_counter() - t0
    return out


def bench_row(preset: str, batch: int, vae, args, device, dtype) -> dict:
    dit = random_dit(preset, device, dtype, vae.config.latent_dim)
    pipes = {"opt": Omni2SoundPipeline(dit, vae, PipelineConfig())}
    if args.compile:                       # the same model, its step compiled (captured in the graph on a GPU)
        pipes["optc"] = Omni2SoundPipeline(dit, vae, PipelineConfig(), compile_step=True)
    cond = random_conditions(dit.config, batch, args.duration, args.text_tokens)
    row = {"preset": preset, "params_M": round(dit.num_params() / 1e6, 1), "batch": batch,
           "dtype": str(dtype).replace("torch.", ""), "steps": args.steps, "duration_s": args.duration}
    # warm-up: the optimised path at full steps on a GPU (graph capture for this shape), else 1 step
    warm_steps = args.steps if device.type == "cuda" else 1
    for name, pipe in pipes.items():
        t0 = time.perf_counter()
        pipe.generate_from_conditions(cond, steps=warm_steps, guidance=args.guidance, seed=0)
        _sync(device)
        row[f"{name}_warmup_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if not args.no_plain:
        pipes["plain"] = pipes["opt"]
        pipes["opt"].generate_from_conditions(cond, steps=1, guidance=args.guidance, seed=0, plain=True)
    runs = {name: [] for name in pipes}
    for _ in range(args.repeats):          # interleaved, so a noisy neighbour hits every path alike
        for name, pipe in pipes.items():
            runs[name].append(run_once(pipe, cond, args, plain=name == "plain"))
    row["peak_mem_MB"] = round(peak_memory_mb(device), 0)

    def med(name, key):
        return statistics.median(r.timings.get(key, 0.0) for r in runs[name]) * 1e3

    for name in runs:
        for key in ("setup", "prepare", "sample", "decode", "to_host", "total"):
            row[f"{name}_{key}_ms"] = round(med(name, key), 1)
        # the part of a request's wall time that no phase accounts for (median over repeats)
        row[f"{name}_unaccounted_ms"] = round(statistics.median(
            r.timings["total"] - sum(v for k, v in r.timings.items() if k != "total") for r in runs[name]) * 1e3, 1)
        row[f"{name}_step_ms"] = round(med(name, "sample") / args.steps, 2)
        row[f"{name}_rtf"] = round(args.duration * batch / (med(name, "total") / 1e3), 2)
    if "plain" in runs:
        row["speedup_sample"] = round(row["plain_sample_ms"] / row["opt_sample_ms"], 2)
        row["speedup_total"] = round(row["plain_total_ms"] / row["opt_total_ms"], 2)
        row["max_latent_diff"] = float((runs["opt"][0].latents.float() - runs["plain"][0].latents.float())
                                       .abs().max())
    if "optc" in runs:
        row["speedup_sample_compiled"] = round(row["opt_sample_ms"] / row["optc_sample_ms"], 2)
        row["max_latent_diff_compiled"] = float((runs["opt"][0].latents.float() - runs["optc"][0].latents.float())
                                                .abs().max())
    if device.type == "cuda":
        row["graph_captures"] = sum(p.graphs.captures for p in set(pipes.values()))
    del pipes, dit
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


ABLATIONS = {                                # name -> SamplingOptions changes (one item off at a time)
    "full": {},
    "no_fused_ops": {"fused_ops": False},
    # the CPU's GEMM library for the large projections (qkv, MLP fc1, per-request AdaLN): aten (MKL) instead of
    # oneDNN (ops.linear); the workspace's output buffers serve only aten's GEMMs (oneDNN's have no out=), so it is
    # measured on that path too
    "aten_gemm": {"backends": {"linear": "reference"}},
    "aten_gemm_no_workspace": {"backends": {"linear": "reference"}, "cpu_workspace": False},
    "no_cross_skip": {"skip_empty_cross_rows": False},
    "no_packed_weights": {"cpu_packed_weights": False},
    "sdpa_attention": {"backends": {"attention": "reference"}},
    "no_cuda_graphs": {"cuda_graphs": False},
    "conditions_per_step": {"conditions_once": False},
    "sequential_cfg": {"batched_cfg": False},
    "plain": {"plain": True},
}


def ablate(preset: str, vae, args, device, dtype) -> dict:
    """Each low-latency item of the optimised path measured on its own: the per-step time with that one item off,
    against the full path, interleaved in one process (R rounds, each runs every variant once), reported as the
    median over rounds of the paired ratio variant / full (a shared box's drift hits both sides of a pair alike).
    Items that do nothing on this device are left out (oneDNN's GEMMs, the workspace and the cross-attention skip
    are CPU-only, CUDA graphs GPU-only). ``plain`` turns everything off at once (conditions per step, sequential
    CFG, reference ops)."""
    from omni2sound.pipeline import SamplingOptions

    dit = random_dit(preset, device, dtype, vae.config.latent_dim)
    pipe = Omni2SoundPipeline(dit, vae, PipelineConfig())
    cond = random_conditions(dit.config, 1, args.duration, args.text_tokens).to(device)
    T = int(round(args.duration * dit.config.latent_rate))
    x0 = torch.randn(1, T, dit.config.latent_dim, device=device, dtype=dit.dtype)
    cpu_only = {"aten_gemm", "aten_gemm_no_workspace", "no_cross_skip", "no_packed_weights", "sdpa_attention"}
    gpu_only = {"no_cuda_graphs"}
    wanted = ["full", *args.ablate_items.split(",")] if args.ablate_items else list(ABLATIONS)
    names = [n for n in wanted if not (device.type == "cuda" and n in cpu_only)
             and not (device.type != "cuda" and n in gpu_only)]
    steps = args.ablate_steps

    def per_step(name: str) -> float:
        changes = dict(ABLATIONS[name])
        backends = changes.pop("backends", {})
        opts = SamplingOptions(steps=steps, guidance=args.guidance, **changes)
        timings = {}
        with torch.no_grad(), ops.use_backend(**backends):
            pipe._sample(cond, x0, opts, timings)
        return timings["sample"] / steps

    # one warm-up each (graph capture, first-touch of every buffer), then the interleaved rounds
    times = interleaved_rounds({n: (lambda n=n: per_step(n)) for n in names}, args.ablate_rounds)
    row = {"preset": preset, "batch": 1, "steps_per_round": steps, "rounds": args.ablate_rounds}
    for name in names:
        row[f"{name}_step_ms"] = round(statistics.median(times[name]) * 1e3, 2)
        if name != "full":
            row[f"{name}_x"] = round(statistics.median(a / b for a, b in zip(times[name], times["full"])), 3)
    return row


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
            "aten::mkldnn_linear", "mkldnn::_linear_pointwise")


def profile_steps(preset: str, vae, args, device, dtype) -> dict:
    """Where a sampling step's time goes, optimised vs plain: torch.profiler over 1 and over 3 Euler steps of each
    path; the difference / 2 is one step without the once-per-request work. Self time is split into GEMMs,
    attention and the rest, and the GEMM FLOPs are counted.

    The plain path's extra work is mostly GEMMs too (every step re-runs the per-request projections), so the
    ratio of GEMM FLOPs per step (``flop_ratio``), times nothing else, is what the optimised path would gain if
    both ran their GEMMs at the same rate and did nothing else.
    """
    from contextlib import nullcontext

    from torch.profiler import ProfilerActivity, profile

    from omni2sound.pipeline import SamplingOptions

    dit = random_dit(preset, device, dtype, vae.config.latent_dim)
    pipe = Omni2SoundPipeline(dit, vae, PipelineConfig())
    cond = random_conditions(dit.config, 1, args.duration, args.text_tokens).to(device)
    T = int(round(args.duration * dit.config.latent_rate))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])

    def measure(plain: bool, steps: int) -> dict:
        opts = SamplingOptions(steps=steps, guidance=args.guidance, plain=plain, cuda_graphs=False)
        x0 = torch.randn(1, T, dit.config.latent_dim, device=device, dtype=dit.dtype)
        with (ops.use_backend("reference") if plain else nullcontext()), torch.no_grad():
            pipe._sample(cond, x0, opts, {})                                  # warm-up
            with profile(activities=acts, with_flops=True) as prof:
                t0 = time.perf_counter()
                pipe._sample(cond, x0, opts, {})
                wall = time.perf_counter() - t0
        if steps == 3:                       # the top kernels (device) / ops (CPU) of this path, for the notes
            key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(f"# {preset} {'plain' if plain else 'optimised'}, 3 steps", flush=True)
            print(prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=60), flush=True)
        out = {"wall_s": wall, "gemm": 0.0, "attention": 0.0, "other": 0.0, "flops": 0.0}
        for e in prof.key_averages():
            t = (e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total) * 1e-6
            out["gemm" if e.key in GEMM_OPS else ("attention" if "attention" in e.key else "other")] += t
            out["flops"] += e.flops or 0
        return out

    row = {"preset": preset}
    for name, plain in (("opt", False), ("plain", True)):
        one, three = measure(plain, 1), measure(plain, 3)
        step = {k: (three[k] - one[k]) / 2 for k in one}
        busy = step["gemm"] + step["attention"] + step["other"]
        row[f"{name}_step_ms"] = round(step["wall_s"] * 1e3, 1)
        for k in ("gemm", "attention", "other"):
            row[f"{name}_{k}_share"] = round(step[k] / max(busy, 1e-9), 3)
        row[f"{name}_gemm_gflop_per_step"] = round(step["flops"] / 1e9, 1)
        row[f"{name}_gemm_gflops"] = round(step["flops"] / max(step["gemm"], 1e-9) / 1e9, 1)
    row["step_ratio"] = round(row["plain_step_ms"] / row["opt_step_ms"], 2)
    row["flop_ratio"] = round(row["plain_gemm_gflop_per_step"] / max(row["opt_gemm_gflop_per_step"], 1e-9), 2)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny and S at batch 1, one repeat, tiny VAE")
    ap.add_argument("--presets", default=None, help="comma list of tiny,S,L (default: all; --quick: tiny,S)")
    ap.add_argument("--batches", default=None, help="comma list (default 1,8; --quick: 1)")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", "--cfg", dest="guidance", type=float, default=4.5,
                    help="joint classifier-free guidance scale (--cfg is the same flag)")
    ap.add_argument("--text-tokens", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--vae", choices=("auto", "tiny", "paper"), default="auto",
                    help="auto: the paper VAE for S/L on a GPU, the tiny one otherwise")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain path")
    ap.add_argument("--compile", action="store_true",
                    help="also time the optimised path with its step torch.compiled (column prefix optc_)")
    ap.add_argument("--out", help="write the rows (+ hardware) as JSON here")
    ap.add_argument("--ablate", action="store_true",
                    help="instead of whole requests, time the optimised path's per-step cost with each low-latency "
                         "item turned off on its own (batch 1), interleaved; reports paired ratios item-off / full")
    ap.add_argument("--ablate-rounds", type=int, default=5)
    ap.add_argument("--ablate-items", default=None, help=f"comma-separated subset of {list(ABLATIONS)[1:]}")
    ap.add_argument("--ablate-steps", type=int, default=None, help="steps per timed sampling (default 3 CPU, 25 GPU)")
    ap.add_argument("--profile", action="store_true",
                    help="instead of timing whole requests, profile one step of each path per preset (batch 1): "
                         "GEMM / attention / other shares, GEMM GFLOP per step and the plain/opt FLOP ratio")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if args.dtype == "auto" \
        else getattr(torch, args.dtype)
    presets = (args.presets or ("tiny,S" if args.quick else "tiny,S,L")).split(",")
    batches = [int(b) for b in (args.batches or ("1" if args.quick else "1,8")).split(",")]
    args.repeats = args.repeats or (1 if args.quick or device.type == "cpu" else 5)

    from omni2sound.vae import VAE_PRESETS, AudioVAE
    rows = []

    def write_out() -> None:
        if args.out:
            with open(args.out, "w") as f:
                json.dump({**provenance(device), "hardware": hardware(device), "args": vars(args), "rows": rows},
                          f, indent=2)

    def each_preset(fn) -> None:
        """fn(preset, tiny VAE, args, device, dtype) -> row, for every preset (the per-step modes: the VAE's latent
        size is all they need of it)."""
        for preset in presets:
            torch.manual_seed(0)
            vae = AudioVAE(VAE_PRESETS["tiny"]).to(device).eval()
            rows.append(fn(preset, vae, args, device, dtype))
            print(json.dumps(rows[-1]), flush=True)

    if args.ablate:
        args.ablate_steps = args.ablate_steps or (args.steps if device.type == "cuda" else 3)
        each_preset(ablate)
        print(f"\n## bench_generate --ablate: ms per step (batch 1, guidance {args.guidance}, {args.duration:g} s) and "
              f"the median paired ratio item-off / full, on {hardware(device)}\n")
        for r in rows:
            items = [k[:-8] for k in r if k.endswith("_step_ms")]
            print("| preset | " + " | ".join(items) + " |")
            print("|---|" + "---|" * len(items))
            print(f"| {r['preset']} | " + " | ".join(
                f"{r[i + '_step_ms']}" + (f" ({r[i + '_x']}x)" if i != "full" else "") for i in items) + " |")
        write_out()
        return
    if args.profile:
        each_preset(profile_steps)
        write_out()
        return
    for preset in presets:
        vname = args.vae if args.vae != "auto" else ("paper" if preset != "tiny" and device.type == "cuda"
                                                     else "tiny")
        if preset == "tiny" and DIT_PRESETS["tiny"].latent_dim != VAE_PRESETS[vname].latent_dim:
            vname = "tiny"
        torch.manual_seed(0)
        vae = AudioVAE(VAE_PRESETS[vname]).to(device).eval()
        for batch in batches:
            row = bench_row(preset, batch, vae, args, device, dtype)
            row["vae"] = vname
            rows.append(row)
            print(json.dumps(row), flush=True)

    hw = hardware(device)
    cols = ["preset", "params_M", "batch", "dtype", "vae", "opt_setup_ms", "opt_prepare_ms", "opt_sample_ms",
            "opt_step_ms", "opt_decode_ms", "opt_to_host_ms", "opt_unaccounted_ms", "opt_total_ms", "opt_rtf",
            "optc_sample_ms", "optc_total_ms", "speedup_sample_compiled", "plain_sample_ms", "plain_total_ms",
            "speedup_sample", "speedup_total", "max_latent_diff", "opt_warmup_ms", "optc_warmup_ms", "peak_mem_MB"]
    cols = [c for c in cols if any(c in r for r in rows)]
    print(f"\n## bench_generate: {args.duration:g} s audio, {args.steps} steps, guidance {args.guidance}, on {hw}\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    write_out()


if __name__ == "__main__":
    main()
