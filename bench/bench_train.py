"""Training-step throughput of the Omni2Sound DiT on random data: fused ops vs reference ops, same run.

One step = flow-matching loss (forward) + backward + AdamW step on a batch of random latents and random
conditions (text 32 tokens, video 8 / s, sync 24 / s), as the trainer runs it (bf16 autocast on GPU).
Reports us per step, samples/s, latent tokens/s, and on GPU the model FLOP utilisation
(MFU = 6 * params * tokens/s / peak; attention FLOPs not counted, nanoGPT's convention).

    python bench/bench_train.py --quick                 # CPU: tiny and S at small batch
    python bench/bench_train.py --presets tiny S L --batch 32 --seconds 10 --out train.json   # GPU
    python bench/bench_train.py --audit --presets L --batch 32     # bytes per op category of one L step (any CPU)
    python bench/bench_train.py --audit --bf16-weights --presets L --batch 32   # also with bf16 weight copies
    python bench/bench_train.py --audit --modulation-grads both --presets L     # modulation gradients stacked vs not
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
from typing import Optional

import torch

from omni2sound import ops
from omni2sound.conditions import Conditions
from omni2sound.device import fused_adamw_ok
from omni2sound.flow import FlowMatching
from omni2sound.gpu_info import provenance
from omni2sound.graphed_step import GraphedTrainStep
from omni2sound.model import Omni2SoundDiT, dit_config
from omni2sound.optim import MasterWeightAdamW, holds_bf16_weights, training_autocast
from omni2sound.trainer import peak_flops


def random_batch(cfg, batch: int, seconds: float, device, generator) -> tuple:
    T = cfg.num_frames(seconds)
    L, V, S = 32, int(seconds * cfg.video_rate), int(seconds * cfg.sync_rate)
    r = lambda *s: torch.randn(*s, generator=generator).to(device)
    cond = Conditions(text_tokens=r(batch, L, cfg.text_dim), text_lens=torch.full((batch,), L, device=device),
                      video_tokens=r(batch, V, cfg.video_dim), video_lens=torch.full((batch,), V, device=device),
                      sync=r(batch, S, cfg.sync_dim), duration=torch.full((batch,), seconds, device=device))
    return r(batch, T, cfg.latent_dim), cond


def time_steps(model, opt, x1, cond, steps: int, warmup: int, device: str, bf16: bool, profile: bool = False,
               graph: bool = False, pad_text_to=None) -> float:
    """Seconds per training step. graph: the step replayed from a CUDA graph (GraphedTrainStep: its draws and
    input copies, made outside the graph, are timed with it); the first call captures it."""
    flow = FlowMatching()
    autocast = training_autocast(device, torch.bfloat16 if bf16 else None, holds_bf16_weights(model))
    g = torch.Generator(device=device).manual_seed(0) if device.startswith("cuda") else torch.Generator()

    if graph:
        graphed = GraphedTrainStep(model, opt, flow, autocast_dtype=torch.bfloat16 if bf16 else None,
                                   pad_text_to=pad_text_to)

        def step():
            graphed(x1, cond, generator=g)
    else:
        def step():
            with autocast:
                loss, _ = flow.loss(model, x1, cond, generator=g)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    if profile:                     # where a step's device time goes: the top kernels of 2 steps, printed
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        with torch_profile(activities=acts) as prof:
            for _ in range(2):
                step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60), flush=True)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def gpu_default_backends() -> dict:
    """Per op, the CPU backend that moves the same bytes as the op's default on a GPU: the fused C++ kernel where the
    GPU default is a fused kernel (CUDA or Triton), the reference where the GPU default is the reference."""
    from omni2sound.ops import _dispatch
    out = {}
    for op in _dispatch.registered_ops():
        first = _dispatch._DEFAULT_ORDER[op].get("cuda", ("reference",))[0]
        out[op] = "cpu" if first != "reference" and "cpu" in _dispatch._REGISTRY[op] else "reference"
    return out


def audit_step(cfg, batch: int, seconds: float, backends: dict, bf16_weights: bool = False,
               modulation_grad_buffer: Optional[bool] = True) -> dict:
    """Traffic of one training step (bf16 autocast loss + backward + fused AdamW step) on the CPU, per category.
    bf16_weights: the matrix weights as bf16 copies that the optimiser step writes (MasterWeightAdamW).
    modulation_grad_buffer: False cuts the per-token modulations with unbind (their gradients stacked), as
    ``ops.modulation_grad_buffer(False)``."""
    from _traffic import TrafficCounter
    torch.manual_seed(0)
    model = Omni2SoundDiT(cfg)
    opt = MasterWeightAdamW(model.parameters(), lr=1e-4) if bf16_weights else \
        torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x1, cond = random_batch(cfg, batch, seconds, "cpu", torch.Generator().manual_seed(1))
    counter = TrafficCounter()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = FlowMatching().loss(model, x1, cond, generator=torch.Generator().manual_seed(0))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with ops.use_backend(**backends), ops.modulation_grad_buffer(modulation_grad_buffer):
        step()                      # the first step also creates AdamW's state (zeros_like of every parameter)
        with counter:
            step()
    return dict(counter.rows)


# None: the library's default for the device (ops.adaln.BUFFER_BY_DEFAULT: on on the CPU, off on a GPU until measured)
LAYOUTS = {"default": (None,), "buffer": (True,), "stack": (False,), "both": (False, True)}


def audit(presets, batch: int, seconds: float, backends_name: str, bandwidth: float, flops_peak: float,
          bf16_weights: bool = False, modulation_grads: str = "buffer") -> list:
    """Bytes moved per op category by one training step of each preset at (its depth, ``batch``), extrapolated from a
    2 x 2 grid of CPU runs at depth 1-2 and batch 2-3 (exact: see _traffic.extrapolate; not batch 1, where a
    strided [1, ...] view counts as contiguous and skips copies that every larger batch makes).
    modulation_grads: the modulations' gradients in one buffer (``buffer``), stacked (``stack``), or both and the
    difference (``both``)."""
    from _traffic import extrapolate, summarize
    backends = gpu_default_backends() if backends_name == "gpu" else {}
    results = []
    for name, copies, buffer in [(n, c, b) for n in presets for c in ((False, True) if bf16_weights else (False,))
                                 for b in LAYOUTS[modulation_grads]]:
        cfg = dit_config(name)
        grid = {(d, b): audit_step(dit_config(name, depth=d), b, seconds, backends, copies, buffer)
                for d in (1, 2) for b in (2, 3)}
        rows = summarize(extrapolate(grid, cfg.depth, batch), bandwidth, flops_peak)
        non_gemm = sum(r["floor_ms"] for r in rows if r["category"] != "gemm")
        gemm = sum(r["floor_ms"] for r in rows if r["category"] == "gemm")
        weights = "bf16 weight copies written by the optimiser" if copies else "fp32 weights cast by autocast"
        layout = "in one buffer" if buffer else "stacked"
        print(f"\nTraffic of one training step, {name} (depth {cfg.depth}), batch {batch} x {seconds} s, "
              f"bf16 autocast, {weights}, modulation gradients {layout}, backends as on a "
              f"{'GPU' if backends_name == 'gpu' else 'CPU'}: {backends or 'defaults'}\n"
              f"floors at {bandwidth / 1e12:.2f} TB/s and {flops_peak / 1e12:.0f} TFLOP/s: non-GEMM {non_gemm:.1f} ms, "
              f"GEMM {gemm:.1f} ms\n")
        print("| category | calls | read GB | written GB | GEMM TFLOP | floor ms |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            if r["read_GB"] + r["written_GB"] >= 0.05 or r["gemm_TFLOP"]:
                print(f"| {r['category']} | {r['calls']:.0f} | {r['read_GB']:.2f} | {r['written_GB']:.2f} | "
                      f"{r['gemm_TFLOP']:.1f} | {r['floor_ms']:.2f} |")
        results.append({"preset": name, "batch": batch, "seconds": seconds, "backends": backends,
                        "bf16_weights": copies, "modulation_grad_buffer": buffer, "bandwidth": bandwidth,
                        "flops_peak": flops_peak, "non_gemm_floor_ms": non_gemm, "gemm_floor_ms": gemm, "rows": rows})
    last = LAYOUTS[modulation_grads][-1]
    for before in results:                          # each pair that differs in one setting
        for after in results:
            same = before["preset"] == after["preset"]
            if same and not before["bf16_weights"] and after["bf16_weights"] and \
                    before["modulation_grad_buffer"] == after["modulation_grad_buffer"] == last:
                _print_comparison(before, after, "fp32 weights + autocast", "bf16 weight copies")
            if same and before["bf16_weights"] == after["bf16_weights"] and \
                    not before["modulation_grad_buffer"] and after["modulation_grad_buffer"]:
                _print_comparison(before, after, "modulation gradients stacked", "in one buffer")
    return results


def _print_comparison(before: dict, after: dict, label_before: str, label_after: str) -> None:
    """GB per category (read + written), two audits of the same preset."""
    gb = [{r["category"]: r["read_GB"] + r["written_GB"] for r in res["rows"] if r["category"] != "gemm"}
          for res in (before, after)]
    weights = "bf16 weight copies" if after["bf16_weights"] else "fp32 weights + autocast"
    print(f"\n{before['preset']}: GB per step, {label_before} -> {label_after} ({weights})\n")
    print(f"| category | {label_before} | {label_after} | change |")
    print("|---|---|---|---|")
    for k in sorted(set(gb[0]) | set(gb[1]), key=lambda k: -max(gb[0].get(k, 0), gb[1].get(k, 0))):
        a, b = gb[0].get(k, 0.0), gb[1].get(k, 0.0)
        if max(a, b) >= 0.05:
            print(f"| {k} | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
    a, b = sum(gb[0].values()), sum(gb[1].values())
    print(f"| **all non-GEMM ops** | **{a:.2f}** | **{b:.2f}** | **{b - a:+.2f} ({100 * (b - a) / a:+.1f}%)** |")
    print(f"| non-GEMM floor at {before['bandwidth'] / 1e12:.2f} TB/s | {before['non_gemm_floor_ms']:.1f} ms | "
          f"{after['non_gemm_floor_ms']:.1f} ms | {after['non_gemm_floor_ms'] - before['non_gemm_floor_ms']:+.1f} ms |")


def variant_table(a) -> list:
    """The timed variants (label, backend, mode) the flags ask for; --variants picks some, in its order (repeats
    interleave: fused,fused+stack,fused+stack,fused). A name the flags do not provide is an error, not a row fewer."""
    variants = [("reference", "reference", None), ("fused", None, None)]
    if a.compile:
        variants.append(("fused+compile", None, "compile"))
    if a.graph:
        variants.append(("fused+graph", None, "graph"))
    if a.bf16_weights:
        variants += [(label + "+bf16w", backend, mode) for label, backend, mode in variants if label != "reference"]
    if a.modulation_grads == "both":
        variants += [(label + "+stack", backend, mode) for label, backend, mode in variants if label != "reference"]
    if not a.variants:
        return variants
    labels = [v[0] for v in variants]
    unknown = [w for w in a.variants.split(",") if w not in labels]
    if unknown:
        raise SystemExit(f"bench_train: --variants {','.join(unknown)} not among {labels} "
                         "(+compile needs --compile, +graph --graph, +bf16w --bf16-weights, "
                         "+stack --modulation-grads both)")
    return [variants[labels.index(w)] for w in a.variants.split(",")]


def check_args(a) -> None:
    """What the command line asks for exists (presets, variants), before any model is built."""
    for name in a.presets or ():
        dit_config(name)
    if not a.audit:
        variant_table(a)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="*", default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seconds", type=float, default=None, help="clip length (latent frames = 25 / s)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the fused model")
    p.add_argument("--graph", action="store_true",
                   help="also time the fused step replayed from a CUDA graph (omni2sound.graphed_step; GPU)")
    p.add_argument("--pad-text", type=int, default=None,
                   help="graph variant: pad the captions to this many tokens (the trainer pads to max_text_tokens)")
    p.add_argument("--variants",
                   help="comma list of reference,fused,fused+compile,fused+graph to run (default: all asked for)")
    p.add_argument("--profile", action="store_true", help="print the top kernels of 2 steps (not the reference)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out")
    p.add_argument("--audit", action="store_true",
                   help="count the bytes each op category moves in one bf16 step (CPU; no timing; bench/_traffic.py)")
    p.add_argument("--audit-backends", choices=("gpu", "cpu"), default="gpu",
                   help="gpu: each op on the CPU backend that moves the bytes its GPU default moves")
    p.add_argument("--audit-bandwidth", type=float, default=3.35e12, help="bytes/s for the floor (H100 SXM HBM3)")
    p.add_argument("--audit-flops", type=float, default=989e12, help="GEMM FLOP/s for the floor (H100 SXM bf16)")
    p.add_argument("--bf16-weights", action="store_true",
                   help="also train with bf16 weight copies written by the optimiser step (omni2sound/optim.py): "
                        "timed as the variants <v>+bf16w; --audit: both ways and the difference")
    p.add_argument("--modulation-grads", choices=tuple(LAYOUTS), default="default",
                   help="the AdaLN modulations' gradients in one buffer or stacked by unbind's backward (default: the "
                        "library's choice for the device); --audit with both: each and the difference; timing with "
                        "both: the variants <v> (buffer) and <v>+stack")
    a = p.parse_args(argv)
    check_args(a)
    if a.audit:
        res = audit(a.presets or ["L"], a.batch or 32, a.seconds or 10.0, a.audit_backends, a.audit_bandwidth,
                    a.audit_flops, a.bf16_weights, a.modulation_grads)
        if a.out:
            with open(a.out, "w") as f:
                json.dump({**provenance("cpu"), "audit": res}, f, indent=2)
        return
    cuda = a.device.startswith("cuda")
    presets = a.presets or (["tiny", "S"] if a.quick or not cuda else ["tiny", "S", "L"])
    batch = a.batch or (4 if a.quick else (32 if cuda else 8))
    seconds = a.seconds or (2.0 if a.quick else 10.0)
    steps = a.steps or (3 if a.quick else 10)
    hw = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()} CPU, " \
                                                     f"{torch.get_num_threads()} threads"
    peak = peak_flops(a.device)
    rows = []
    for name in presets:
        cfg = dit_config(name)
        variants = variant_table(a)
        for label, backend, mode in variants:
            torch.manual_seed(0)
            with torch.device(a.device):                 # init on the device: seconds, not a minute, for L
                model = Omni2SoundDiT(cfg)
            # as the trainer; a graph replays the optimiser's step too, so its state (the step count) lives on the GPU
            if "+bf16w" in label:               # capturable as it is: lr and the step counts on the device
                opt = MasterWeightAdamW(model.parameters(), lr=1e-4)
            else:
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused_adamw_ok(a.device),
                                        **({"capturable": True} if mode == "graph" and cuda else {}))
            x1, cond = random_batch(cfg, batch, seconds, a.device, torch.Generator().manual_seed(1))
            run_model = torch.compile(model) if mode == "compile" else model
            ctx = ops.use_backend(backend) if backend else contextlib.nullcontext()
            if a.modulation_grads == "stack" or label.endswith("+stack"):
                buffer = False
            else:
                buffer = None if a.modulation_grads == "default" else True
            with ctx, ops.modulation_grad_buffer(buffer):
                dt = time_steps(run_model, opt, x1, cond, steps, 3 if mode == "compile" else 1, a.device, True,
                                profile=a.profile and label != "reference", graph=mode == "graph",
                                pad_text_to=a.pad_text)
            tokens = batch * x1.shape[1]
            params = model.num_params()
            row = {"preset": name, "params_M": params / 1e6, "variant": label, "batch": batch, "seconds": seconds,
                   "modulation_grads": {None: "default", True: "buffer", False: "stack"}[buffer],
                   "us_per_step": dt * 1e6, "samples_per_s": batch / dt, "tokens_per_s": tokens / dt,
                   "mfu": (6 * params * tokens / dt / peak) if peak else None}
            if cuda:
                row["peak_mem_GB"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model, opt, run_model
            if cuda:
                torch.cuda.empty_cache()
    for r in rows:
        ref = next((x for x in rows if x["preset"] == r["preset"] and x["variant"] == "reference"), None)
        r["speedup_vs_reference"] = ref["us_per_step"] / r["us_per_step"] if ref else float("nan")
    print(f"\nTraining step (loss + backward + AdamW), {hw}, torch {torch.__version__}, batch {batch}, "
          f"{seconds} s clips\n")
    print("| preset | params (M) | ops | us / step | samples/s | tokens/s | MFU | vs reference |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        sp = r["speedup_vs_reference"]
        vs = "-" if sp != sp else f"{sp:.2f}x"          # nan: no reference row
        print(f"| {r['preset']} | {r['params_M']:.1f} | {r['variant']} | {r['us_per_step']:.0f} | "
              f"{r['samples_per_s']:.2f} | {r['tokens_per_s']:.0f} | {mfu} | {vs} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({**provenance(a.device), "hardware": hw, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
