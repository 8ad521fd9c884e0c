"""FP8 sampling against bf16, same run, same weights, same noise: the sampling step's GEMM time and total, and the
quality guard (the fp8 latents against the bf16 ones).

    python bench/bench_fp8.py --presets L --batches 1,8 --device cuda       # the GPU figures (Hopper / Ada)
    python bench/bench_fp8.py --quick                                        # CPU: tiny, 2 steps: proves it runs
    python bench/bench_fp8.py --toy runs/toy --splits test,val              # the toy world's oracle, both precisions
    python bench/bench_fp8.py --ops                                         # the fused quantisations, op by op

``--ops``: each op that writes the next GEMM's e4m3 input in its own pass (``gated_residual_adaln_fp8``,
``gelu_fp8``) against the same op followed by the standalone ``quantize_rows``, same backends, same run, at the L
model's sampling shapes (CFG batch, 10 s: [2, 250, 1536] and the MLP's [500, 6144]); us per call and the ratio. On a
GPU the fused ops' Triton kernels against the Triton op + the Triton quantisation (CUDA-graph replays); on the CPU
both sides run the reference quantisation (no fused kernel there: the row only shows it runs).

Variants (``SamplingOptions``): ``bf16`` (the default path; fp32 on the CPU), ``fp8`` (the DiT blocks' six projections
as e4m3 GEMMs, per-token activation scales), ``fp8_tensor`` (per-tensor activation scales), ``fp8_fused`` (per token,
the AdaLN ops writing the fp8 copy of their output for the qkv, cross-attention q and MLP fc1 GEMMs, the MLP's GELU
for fc2: 4 of the 6 quantisation launches per block gone; on a GPU these AdaLN and GELU calls run on Triton, not the
CUDA AdaLN and aten's GELU of the defaults) and ``fp8_triton_ops`` (``fp8`` with the AdaLN and the GELU forced to
Triton: the baseline that separates the fusion's gain from the backend change; its latents equal ``fp8_fused``'s),
each the optimised path (batched CFG, conditions once, CUDA-graph replay of the step on a GPU, one graph cache per
variant); ``--compile`` compiles the step of every variant (the fp8 variants' activation quantisation then fused by
Inductor instead of the Triton kernel; ``fp8_fused`` is then ``fp8``). Every row generates ``--duration`` s (10 s =
250 latent frames) with ``--steps`` Euler steps and joint CFG from random conditions and random N(0, 0.02) weights.

Columns:
  step_ms      median wall time of one sampling step (the whole sampling over ``--steps``, graphed on a GPU), over
               ``--repeats`` samplings run interleaved across the variants
  x bf16       bf16 step / this step
  gemm_ms      per step, the device time of the GEMM kernels (a profile of eager steps, no graph: cuBLAS / cuBLASLt /
               CUTLASS kernels on a GPU; aten's mm / addmm / _scaled_mm and oneDNN's linear on the CPU)
  quant_ms     per step, the standalone activation quantisation (the Triton row kernel, or the reference's kernels)
  quant_n      per step, the number of those quantisations (GPU: kernel launches; CPU: the reference's row maxima)
  adaln_ms     per step, the AdaLN kernels (GPU; with ``fp8_fused`` they also write the fp8 copies)
  kernels_ms   per step, every kernel's device time (GPU) / every top-level op's time (CPU)
  rel_err, cos the final latents against the bf16 variant's: ||a - b|| / ||b|| and the cosine
The GPU and its clocks, driver, memory and power come from ``nvidia-ml-py`` (``omni2sound.gpu_info``) and are
written with the rows.

``--toy RUN``: the quality guard on a finished toy run (``python -m omni2sound.train``'s RUN folder: its ``--stage``
folder and vae/). Every track's held-out prompts (the report's: ``toy_eval_clips`` per track, the run's sampling
steps and guidance, seed 1234) are sampled twice on the same conditions and noise, in the DiT's precision (the
pipeline's on ``--device``: fp32 on the CPU, bf16 on a GPU; or ``--dtypes``) and with the block projections in fp8,
and scored by the oracle (``omni2sound.oracle.compare_fp8``). Printed per track: each score in both precisions, the
difference counted in prompts ((fp8 - default) x prompts), and whether the scores of the track's learning bar differ
by at most one prompt. The fp8_linear backend that ran (``scaled_mm`` or ``reference``) is printed and written; on
the CPU choose ``_scaled_mm`` with ``OMNI2SOUND_BACKEND=fp8_linear=scaled_mm`` (torch's CPU build runs it for bf16
inputs: ``--dtypes bfloat16``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import hardware, print_table, time_cpu, time_gpu  # noqa: E402  (bench/ on sys.path)
from bench_generate import random_conditions, random_dit  # noqa: E402

from omni2sound.gpu_info import provenance  # noqa: E402
from omni2sound.pipeline import Omni2SoundPipeline, PipelineConfig, SamplingOptions  # noqa: E402

VARIANTS = {"bf16": {}, "fp8": {"fp8": True}, "fp8_tensor": {"fp8": True, "fp8_act_scale": "tensor"},
            "fp8_fused": {"fp8": True, "fp8_fused_quant": True}, "fp8_triton_ops": {"fp8": True}}
# backends a variant runs under (ops.use_backend), beside its SamplingOptions
VARIANT_BACKENDS = {"fp8_triton_ops": {"adaln": "triton", "bias_gelu": "triton"}}
GEMM_NAMES = ("gemm", "cutlass", "xmma", "nvjet", "cublas", "scaled_mm", "sm90_", "sm89_", "addmm", "aten::mm",
              "linear_pointwise", "_linear")


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(pipe, v: str, graphs: dict, cond, x0, opts: SamplingOptions, timings: dict):
    """pipe._sample for variant v under its backends and with its own CUDA-graph cache (the pipeline's one cache holds
    fewer graphs than there are variants: interleaved repeats would evict and recapture them)."""
    from omni2sound import ops
    from omni2sound.sampling import GraphSampler
    pipe.graphs = graphs.setdefault(v, GraphSampler())
    with ops.use_backend(**VARIANT_BACKENDS.get(v, {})):
        return pipe._sample(cond, x0, opts, timings)


def kernel_times(pipe, cond, x0, opts: SamplingOptions, steps: int, device, backends=None) -> dict:
    """Per step: GEMM, quantisation and all-kernel time (ms) from a profile of ``steps`` eager steps."""
    from omni2sound import ops
    with ops.use_backend(**(backends or {})):
        return _kernel_times(pipe, cond, x0, opts, steps, device)


def _kernel_times(pipe, cond, x0, opts: SamplingOptions, steps: int, device) -> dict:
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    eager = SamplingOptions(**{**opts.__dict__, "steps": steps, "cuda_graphs": False})
    pipe._sample(cond, x0, eager, {})                                     # warm-up (compiles, quantises)
    _sync(device)
    with profile(activities=acts) as prof:
        pipe._sample(cond, x0, eager, {})
        _sync(device)
    gemm = quant = adaln = total = 0.0
    n_quant = 0
    if device.type == "cuda":
        for e in prof.events():
            if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue
            us = e.time_range.elapsed_us()                               # the kernel's own duration
            name = e.name.lower()
            total += us
            if "quantize_rows" in name:
                quant += us
                n_quant += 1
            elif "adaln" in name:
                adaln += us
            elif any(k in name for k in GEMM_NAMES):
                gemm += us
    else:
        for e in prof.key_averages():
            name = e.key.lower()
            if name in ("aten::mm", "aten::addmm", "aten::_scaled_mm", "mkldnn::_linear_pointwise"):
                gemm += e.self_cpu_time_total
            if name in ("aten::linalg_vector_norm", "aten::div"):
                quant += e.self_cpu_time_total
            if name == "aten::linalg_vector_norm":
                n_quant += e.count
            if "adaln" in name:
                adaln += e.self_cpu_time_total
        total = sum(e.self_cpu_time_total for e in prof.key_averages())
    return {"gemm_ms": round(gemm / 1e3 / steps, 3), "quant_ms": round(quant / 1e3 / steps, 3),
            "quant_n": round(n_quant / steps, 1), "adaln_ms": round(adaln / 1e3 / steps, 3),
            "kernels_ms": round(total / 1e3 / steps, 3)}


@torch.no_grad()
def bench(preset: str, batch: int, args, device, dtype) -> list:
    from omni2sound.vae import VAE_PRESETS, AudioVAE
    vae = AudioVAE(VAE_PRESETS["tiny"]).to(device)               # not timed: only its latent size matters
    dit = random_dit(preset, device, dtype, vae.config.latent_dim)
    pipe = Omni2SoundPipeline(dit, vae, PipelineConfig(), compile_step=args.compile)
    cond = random_conditions(dit.config, batch, args.duration, args.text_tokens)
    T = dit.config.num_frames(args.duration)
    x0 = pipe.flow.noise(batch, T, dit.config.latent_dim, seed=0, device=device, dtype=dtype)
    variants = [v for v in args.variants.split(",") if v]
    from omni2sound import ops
    for v in list(variants):
        missing = {op: b for op, b in VARIANT_BACKENDS.get(v, {}).items()
                   if b not in ops.available_backends(op if op != "adaln" else "adaln_modulate", device)}
        if missing:
            print(f"({v} left out: backend {missing} cannot run on {device.type} here)", flush=True)
            variants.remove(v)
    opts = {v: SamplingOptions(steps=args.steps, guidance=args.guidance, **VARIANTS[v]) for v in variants}
    graphs = {}                                                    # one CUDA-graph cache per variant
    t0 = time.perf_counter()
    for v in variants:                                             # warm-up: quantisation, graph capture
        run_variant(pipe, v, graphs, cond, x0, opts[v], {})
    _sync(device)
    warm = time.perf_counter() - t0
    times = {v: [] for v in variants}
    latents = {}
    for _ in range(args.repeats):                                  # interleaved: drift hits every variant alike
        for v in variants:
            tm = {}
            latents[v] = run_variant(pipe, v, graphs, cond, x0, opts[v], tm)
            times[v].append(tm["sample"])
    rows = []
    base = statistics.median(times[variants[0]]) / args.steps
    ref = latents[variants[0]].float()
    for v in variants:
        step = statistics.median(times[v]) / args.steps
        lat = latents[v].float()
        row = {"preset": preset, "batch": batch, "variant": v, "dtype": str(dtype).replace("torch.", ""),
               "step_ms": round(step * 1e3, 3), "sample_ms": round(step * args.steps * 1e3, 1),
               f"x {variants[0]}": round(base / step, 3),
               "rel_err": round(((lat - ref).norm() / ref.norm()).item(), 5),
               "cos": round(F.cosine_similarity(lat.flatten(), ref.flatten(), dim=0).item(), 6)}
        if not args.no_profile:
            row.update(kernel_times(pipe, cond, x0, opts[v], args.profile_steps, device, VARIANT_BACKENDS.get(v)))
        rows.append(row)
        print(json.dumps(row), flush=True)
    rows[0]["warmup_s"] = round(warm, 1)
    if any(VARIANTS[v].get("fp8") for v in variants):
        rows[0]["fp8_weights_MB"] = round(pipe.fp8_weights().nbytes() / 2**20, 1)
    del pipe, dit
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def toy(args) -> dict:
    """The oracle's scores of fp8 samples against the default precision's on a finished toy run (``--toy``)."""
    from omni2sound.files import BadFileError, read_json, write_json
    from omni2sound.oracle import SCORES, compare_fp8
    from omni2sound.schedule import TrainConfig

    stage = os.path.join(args.toy, args.stage)
    try:
        meta = read_json(os.path.join(stage, "meta.json"), dict, "a run folder's meta.json")
    except BadFileError as e:
        raise SystemExit(f"bench_fp8 --toy: {e} (RUN: a finished toy run, e.g. runs/toy)") from None
    if not meta.get("complete") or "config" not in meta:
        raise SystemExit(f"bench_fp8 --toy: {stage}/meta.json: not a finished DiT stage (complete, with its config)")
    cfg = TrainConfig.from_dict(meta["config"])
    if cfg.data != "toy":
        raise SystemExit(f"bench_fp8 --toy: {stage} was trained on {cfg.data!r}, not the toy world")
    runs = []
    for dtype in (args.dtypes or "default").split(","):
        for split in args.splits.split(","):
            t0 = time.perf_counter()
            r = compare_fp8(cfg, stage, os.path.join(args.toy, "vae"), n=args.n, seed=args.seed, split=split,
                            dtype=None if dtype == "default" else getattr(torch, dtype), device=args.device,
                            progress=False)
            r["wall_s"] = round(time.perf_counter() - t0, 1)
            runs.append(r)
            print(f"\n{split} split, {r['tracks']['v2a']['n_prompts']} prompts per track, DiT {r['dtype']} on "
                  f"{r['device']}, "
                  f"{r['steps']} steps, guidance {r['guidance']}; fp8 projections: {r['fp8']['weights']} weights, "
                  f"backends {r['fp8']['backends']}; generation {r['generate_seconds']} s, all {r['wall_s']} s")
            rows = []
            for track, t in r["tracks"].items():
                row = {"track": track}
                for k in SCORES:
                    if t["default"][k] is not None:
                        row[k] = f"{t['default'][k]:.3f} / {t['fp8'][k]:.3f} ({t['difference_in_prompts'][k]:+g})"
                row.update({"judged on": ",".join(t["judged_on"]), "within 1 prompt": t["within_one_prompt"],
                            "rel_err": round(t["latents_rel_err"], 4), "cos": round(t["latents_cos"], 5)})
                rows.append(row)
            print_table(rows, [c for c in ("track", *SCORES, "judged on", "within 1 prompt", "rel_err", "cos")])
            print(f"scores default / fp8 (difference in prompts); within one prompt on every track: "
                  f"{r['within_one_prompt']} (all four scores: {r['all_scores_within_one_prompt']})")
    device = torch.device(args.device)
    out = {**provenance(device),
           "OMNI2SOUND_BACKEND": os.environ.get("OMNI2SOUND_BACKEND"), "run": args.toy,
           "within_one_prompt": all(r["within_one_prompt"] for r in runs), "runs": runs}
    if args.out:
        write_json(args.out, out)
    return out


def fused_ops(device: torch.device, quick: bool) -> list:
    """The ``--ops`` rows (module docstring)."""
    from omni2sound import ops
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    gpu = device.type == "cuda"
    force = dict(adaln="triton", adaln_fp8="triton", bias_gelu="triton", gelu_fp8="triton",
                 fp8_quantize="triton") if gpu else {}
    timer = (lambda fn: time_gpu(fn, repeats=7, inner=20)[0]) if gpu else \
        (lambda fn: time_cpu(fn, 3 if quick else 7, 3))
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g).to(device, dt)            # noqa: E731
    B, T, D = 2, 250, 1536
    x, h, tok, per = r(B, T, D), r(B, T, D), r(B, T, D), r(B, 1, D)
    hidden = r(B * T, 4 * D)
    cases = {
        "gated_residual_adaln_fp8": (lambda: ops.gated_residual_adaln_fp8(x, h, (tok, per), per, per),
                                     lambda: ops.quantize_rows(ops.gated_residual_adaln(x, h, (tok, per), per,
                                                                                        per)[1].view(B * T, D))),
        "gelu_fp8": (lambda: ops.gelu_fp8(hidden), lambda: ops.quantize_rows(ops.bias_gelu(hidden))),
    }
    rows = []
    with torch.no_grad(), ops.use_backend(**force):
        for name, (fused, unfused) in cases.items():
            t_unf, t_f = timer(unfused), timer(fused)
            rows.append({"op": name, "dtype": str(dt).replace("torch.", ""), "backends": force or "default",
                         "unfused_us": round(t_unf, 1), "fused_us": round(t_f, 1), "x unfused": round(t_unf / t_f, 2)})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nfused fp8 copies against op + quantize_rows on {hardware(device.type)}, torch {torch.__version__}\n")
    print_table(rows, ["op", "dtype", "unfused_us", "fused_us", "x unfused"])
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny at batch 1, 2 steps, 1 s (CPU: proves it runs)")
    ap.add_argument("--presets", default="L")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}; first = base")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", "--cfg", dest="guidance", type=float, default=4.5,
                    help="joint classifier-free guidance scale (--cfg is the same flag)")
    ap.add_argument("--text-tokens", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile-steps", type=int, default=2)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the step (every variant; Inductor fuses the activation quantisation)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="write the rows (+ the card) as JSON here")
    ap.add_argument("--toy", metavar="RUN", help="score fp8 against the default precision on this finished toy run")
    ap.add_argument("--stage", default="stage3", help="--toy: the DiT stage folder in RUN")
    ap.add_argument("--splits", default="test", help="--toy: comma list of held-out splits (test, val)")
    ap.add_argument("--dtypes", default="", help="--toy: comma list of DiT dtypes (float32, bfloat16; default: the "
                    "pipeline's on --device, fp32 on the CPU, bf16 on a GPU)")
    ap.add_argument("--n", type=int, help="--toy: prompts per track (default: the run's toy_eval_clips)")
    ap.add_argument("--seed", type=int, default=1234, help="--toy: the sampling seed (the report's: 1234)")
    ap.add_argument("--ops", action="store_true", help="only the fused-quantisation ops against op + quantize_rows")
    args = ap.parse_args(argv)
    if args.toy:
        return toy(args)
    if args.ops:
        device = torch.device(args.device)
        rows = fused_ops(device, args.quick)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({**provenance(device), "rows": rows}, f, indent=2)
        return rows
    if args.quick:
        args.presets, args.batches, args.steps, args.duration, args.repeats = "tiny", "1", 2, 1.0, 1
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for preset in args.presets.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            rows += bench(preset, batch, args, device, dtype)
    rec = provenance(device)
    hw, card = rec["hardware"], rec["gpu"]
    print(f"\nfp8 vs bf16 sampling{' (compiled step)' if args.compile else ''}, {args.steps} steps, guidance "
          f"{args.guidance}, {args.duration:g} s, on {hw}, torch {torch.__version__}\n")
    cols = [c for c in rows[0] if c not in ("warmup_s", "fp8_weights_MB", "sample_ms")]
    print_table(rows, cols)
    if card:
        print(f"\ncard: {card}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**rec, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
