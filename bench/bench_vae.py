"""Benchmark of AudioVAE.decode: the fused path against the eager reference decoder and torch.compile, same run.

    python bench/bench_vae.py [--quick] [--preset paper] [--seconds 10] [--device cpu|cuda] [--dtype bfloat16]
                              [--no-compile] [--out f.json]

All three decode the same latents with the same weights, weight norm folded in all of them:
  eager     the decoder with every Snake op on the ``reference`` backend (plain PyTorch: Snake = 5 elementwise passes,
            the residual add one more)
  compile   torch.compile of the reference decoder (Inductor fuses the elementwise chains itself)
  fused     the decoder on the default backend (C++ on the CPU, CUDA on a GPU): snake_residual = 1 pass
Reports ms per decode and the real-time factor (seconds of audio per second of compute); checks the fused output
against eager. ``--baseline-dtype float32`` times the baselines in fp32 next to a bf16 fused path (the GPU bar:
bf16 decode >= 2x the eager fp32 reference). ``--quick`` decodes fewer seconds with fewer repeats and skips compile.
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from _timing import hardware, provenance, time_gpu  # bench/ is the script's folder, on sys.path

from omni2sound import ops
from omni2sound.vae import VAE_PRESETS, AudioVAE


def best_time(fn, repeats, device):
    """Best of ``repeats`` single calls, in seconds (robust to other load on a shared machine)."""
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def profile_decode(name: str, fn, calls: int = 3) -> None:
    """Print the top CUDA kernels of ``calls`` decodes (times per decode)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    dev_us = lambda e: getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)  # noqa: E731
    rows = sorted((e for e in prof.key_averages() if dev_us(e) > 0), key=lambda e: -dev_us(e))
    total = sum(dev_us(e) for e in rows) / calls
    print(f"\n### {name}: {total / 1e3:.2f} ms of kernels per decode\n")
    print("| kernel | us per decode | calls per decode |")
    print("|---|---|---|")
    for e in rows[:14]:
        print(f"| {e.key[:90]} | {dev_us(e) / calls:.0f} | {e.count / calls:g} |")


def conv_table(vae, z) -> None:
    """GPU: every conv of one decode, timed alone in its own CUDA graph of 20 calls (us per call): cuDNN's form and
    the decoder's alternatives (dilated: space to batch; one output channel: GEMM + shifted adds)."""
    from omni2sound.vae_forms import conv1d_as_gemm, conv1d_dilated_as_batch
    dec, seen = vae.decoder, []
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.append((n, m, a[0].clone())))
             for n, m in dec.named_modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d))]
    flags = dec.dilated_as_batch, dec.out_conv_as_gemm
    dec.dilated_as_batch = dec.out_conv_as_gemm = False          # every conv through its module: the hooks see it
    try:
        dec.frames(z)
    finally:
        dec.dilated_as_batch, dec.out_conv_as_gemm = flags
        for h in hooks:
            h.remove()
    print("\n| conv | Cin -> Cout | k | dilation | T in | cuDNN us | space-to-batch us | GEMM us |")
    print("|---|---|---|---|---|---|---|---|")
    total = {"cudnn": 0.0, "best": 0.0}
    for name, m, x in seen:
        native = time_gpu(lambda: m(x), 10, 20)[0]
        alt = {}
        if isinstance(m, torch.nn.Conv1d) and m.dilation[0] > 1 and m.padding[0] % m.dilation[0] == 0:
            alt["batch"] = time_gpu(lambda: conv1d_dilated_as_batch(x, m.weight, m.bias, m.padding[0],
                                                                    m.dilation[0]), 10, 20)[0]
        if isinstance(m, torch.nn.Conv1d) and m.out_channels <= 4:
            alt["gemm"] = time_gpu(lambda: conv1d_as_gemm(x, m.weight, m.bias, m.padding[0], m.dilation[0]), 10, 20)[0]
        total["cudnn"] += native
        total["best"] += min([native, *alt.values()])
        fmt = lambda k: f"{alt[k]:.1f}" if k in alt else "-"      # noqa: E731
        print(f"| {name} | {m.in_channels} -> {m.out_channels} | {m.kernel_size[0]} | {m.dilation[0]} | "
              f"{x.shape[-1]} | {native:.1f} | {fmt('batch')} | {fmt('gemm')} |")
    print(f"\n(sum of the convs: cuDNN {total['cudnn']:.0f} us, the best form of each {total['best']:.0f} us)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="paper", choices=sorted(VAE_PRESETS))
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    p.add_argument("--baseline-dtype", default=None,
                   help="dtype of the eager and compile baselines (default: --dtype; the GPU bar uses float32)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="2 s of audio, 2 repeats, no torch.compile")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", default=None, help="write the results as JSON")
    p.add_argument("--profile", action="store_true",
                   help="GPU: print the top kernels of the eager fp32, graphed fused and channels-last decodes")
    p.add_argument("--conv-table", action="store_true",
                   help="GPU: time every conv of the decoder alone, cuDNN against the decoder's alternative forms")
    args = p.parse_args(argv)
    dev = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if dev == "cuda" else "float32"))
    base_dtype = getattr(torch, args.baseline_dtype) if args.baseline_dtype else dtype
    seconds = 2.0 if args.quick and args.seconds == 10.0 else args.seconds
    repeats = args.repeats or (2 if args.quick else (20 if dev == "cuda" else 3))
    use_compile = not (args.quick or args.no_compile)

    torch.manual_seed(0)
    base = AudioVAE(VAE_PRESETS[args.preset]).fold_weight_norm().eval().requires_grad_(False).to(dev, base_dtype)
    vae = base if base_dtype == dtype else copy.deepcopy(base).to(dtype)     # same weights
    frames = round(seconds * vae.latent_rate)
    z_base = torch.randn(args.batch, vae.config.latent_dim, frames, device=dev, dtype=base_dtype)
    z = z_base.to(dtype)
    audio_s = args.batch * frames * vae.hop_length / vae.sample_rate

    def decode_on(backend, model, latents):
        """A decode of ``latents`` by ``model`` with every Snake op on ``backend``; the reference backend is the plain
        decoder, whose convs are all nn.Conv1d's (not the GEMM and space-to-batch forms the fused path uses on a
        GPU)."""
        def run():
            dec = model.decoder
            flags = dec.out_conv_as_gemm, dec.dilated_as_batch
            if backend == "reference":
                dec.out_conv_as_gemm = dec.dilated_as_batch = False
            try:
                with ops.use_backend(snake=backend):
                    return model.decode(latents)
            finally:
                dec.out_conv_as_gemm, dec.dilated_as_batch = flags
        return run

    eager = decode_on("reference", base, z_base)
    eager_same_dtype = decode_on("reference", vae, z)              # the eager decoder in the fused path's dtype

    def fused():
        return vae.decode(z)

    results = {}
    with torch.inference_mode():
        ref = eager()                                            # warm-up of both paths
        out = fused()
        err = (out.float() - ref.float()).abs().max().item()
        results["eager"] = best_time(eager, repeats, dev)
        results["fused"] = best_time(fused, repeats, dev)
        if dev == "cuda":                                        # the pipeline's decode: one CUDA graph replay
            vae.decode_graphed(z)
            results["fused_graph"] = best_time(lambda: vae.decode_graphed(z), repeats, dev)
            # the default's conv forms against the others, each a copy with its own graph: the last conv (one output
            # channel) left to cuDNN instead of the GEMM form; the residual units' dilated convs, which the default
            # gives cuDNN or space to batch per shape by timing both, all to cuDNN, and all as space to batch
            from omni2sound.vae_forms import DILATED_PAYS
            print("(dilated convs, space to batch chosen: " + ", ".join(
                f"{k[2][1]}x{k[2][-1]} d{k[4]}: {v}" for k, v in DILATED_PAYS.items()) + ")")
            for name, attr, flag in (("fused_graph_cudnn_out_conv", "out_conv_as_gemm", False),
                                     ("fused_graph_cudnn_dilated", "dilated_as_batch", False),
                                     ("fused_graph_all_dilated_as_batch", "dilated_as_batch", True)):
                other = copy.deepcopy(vae)
                setattr(other.decoder, attr, flag)
                other.decode_graphed(z)
                results[name] = best_time(lambda: other.decode_graphed(z), repeats, dev)
                del other
            if args.conv_table:
                conv_table(vae, z)
        if dev == "cuda":
            # cuDNN picks conv algorithms by heuristics unless asked to time them; bf16 conv1d at batch 1 was slower
            # than fp32 (H100, 2026-11-27), so measure both the baseline and the graphed decode with autotuned
            # algorithms
            with torch.backends.cudnn.flags(enabled=True, benchmark=True, deterministic=False,
                                            allow_tf32=torch.backends.cudnn.allow_tf32):
                eager()
                results["eager_cudnn_benchmark"] = best_time(eager, repeats, dev)
                tuned = copy.deepcopy(vae)                          # its own graph cache, captured with tuned convs
                tuned.decode(z)
                tuned.decode_graphed(z)
                results["fused_graph_cudnn_benchmark"] = best_time(lambda: tuned.decode_graphed(z), repeats, dev)
            # Candidate: the decoder's channels-last form (1-D convs as NHWC 2-D convs, cuDNN's tensor-core layout)
            # with the Triton Snake kernels, which read and write that layout; one CUDA-graph replay per decode.
            # Only the conv stack (+ head): the paper preset has a waveform head, so this is the whole decode.
            if ops.available_backends("snake_residual", torch.device(dev)).count("triton"):
                dec = vae.decoder

                def channels_last():
                    with ops.use_backend(snake="triton"):
                        return dec._head(dec._forward_channels_last(z))
                err_cl = (channels_last().float() - ref.float()).abs().max().item()
                results["fused_channels_last_triton_graph"] = time_gpu(channels_last, repeats, 1)[0] * 1e-6
                print(f"(channels-last decode: max |out - eager| = {err_cl:.2e})")
            else:
                channels_last = None
            if args.profile:     # where a decode's time goes, per kernel (graph replays are traced kernel by kernel)
                paths = {"eager": eager, "fused_graph": lambda: vae.decode_graphed(z), "channels_last": channels_last}
                for name, fn in paths.items():
                    if fn is not None:
                        profile_decode(name, fn)
        default = ops.select_backend("snake_residual", torch.device(dev))
        for b in ops.available_backends("snake_residual", torch.device(dev)):
            if b not in ("reference", default):                 # the other fused backends (GPU: triton / cuda)
                other = decode_on(b, vae, z)
                other()
                results[f"fused_{b}"] = best_time(other, repeats, dev)
        if base_dtype != dtype:
            eager_same_dtype()
            results["eager_" + str(dtype).replace("torch.", "")] = best_time(eager_same_dtype, repeats, dev)
        compile_s = float("nan")
        if use_compile:
            compiled = torch.compile(base.decoder)
            t0 = time.perf_counter()
            with ops.use_backend(snake="reference"):
                compiled(z_base)
                compile_s = time.perf_counter() - t0

                def comp():
                    return compiled(z_base)

                results["compile"] = best_time(comp, repeats, dev)

    fused_backend = ops.select_backend("snake_residual", torch.device(dev))
    print(f"\nAudioVAE.decode, preset {args.preset}, {seconds:g} s x batch {args.batch} ({frames} latent frames), "
          f"fused {dtype}, baselines {base_dtype}, {hardware(dev)}, torch {torch.__version__}; "
          f"fused backend: {fused_backend}; "
          f"max |fused - eager| = {err:.2e}\n")
    print("| path | ms per decode | real-time factor | speed-up vs eager |")
    print("|---|---|---|---|")
    order = ["eager"] + [k for k in results if k.startswith("eager_")] + ["compile", "fused"]
    for name in order + [k for k in results if k.startswith("fused_")]:
        if name in results:
            t = results[name]
            print(f"| {name} | {t * 1e3:.1f} | {audio_s / t:.1f}x | {results['eager'] / t:.2f} |")
    if use_compile:
        print(f"\n(torch.compile first call incl. compilation: {compile_s:.1f} s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**provenance(dev), "preset": args.preset,
                       "seconds": seconds, "batch": args.batch, "dtype": str(dtype), "baseline_dtype": str(base_dtype),
                       "max_abs_err": err,
                       "ms": {k: v * 1e3 for k, v in results.items()},
                       "rtf": {k: audio_s / v for k, v in results.items()}}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
