"""Compile every Triton kernel of omni2sound for an NVIDIA H100 (sm_90a) on a machine without a GPU.

    python tools/triton_sm90.py                  # a table: kernel, case, warps, registers, spills, shared memory
    python tools/triton_sm90.py --json out.json  # the same records as JSON (tests/test_triton_sm90.py reads them)

Why: the CPU CI runs the Triton kernels only through Triton's interpreter, which checks their arithmetic but not
whether they compile for a GPU (types, layouts, the backend's lowering) nor how many registers they need. Here the
wrappers in ``kernels/`` are called with CPU tensors of the model's shapes (the L preset at sampling and training
sizes, the paper VAE's channel counts) in bf16 and fp32; each launch is recorded instead of run, and compiled ahead
of time for sm_90a by Triton's own compiler, then its PTX is assembled by the ptxas that ships with Triton (``-v``
reports registers, spills and shared memory). No CUDA driver is needed.

Limits: the argument types are Triton's plain ones (pointer / i32 / i64 / fp32) without the runtime's
specialisations (divisibility-by-16 hints, ints equal to 1), so the code differs in detail from what a launch on a
GPU would build; and the Triton here (CPU machines: 3.9) is newer than the GPU image's (3.6). A kernel that passes
here can still fail there; one that fails here needs fixing before any GPU time is spent on it. To compile with the
GPU image's Triton, put it first on the path (no GPU needed either):

    pip install --no-deps --target /tmp/triton36 triton==3.6.0
    PYTHONPATH=/tmp/triton36 python tools/triton_sm90.py

Must run WITHOUT ``TRITON_INTERPRET`` (the interpreter replaces the JIT functions this compiles).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Callable, Dict, List

import torch

ARCH = 90                       # H100 / H200
_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int16: "i16", torch.int32: "i32",
           torch.int64: "i64", torch.uint8: "u8", torch.bool: "i1", torch.float8_e4m3fn: "fp8e4nv"}


def _arg_type(v) -> str:
    if isinstance(v, torch.Tensor):
        return "*" + _DTYPES[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2**31 <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {type(v).__name__}")


def record_launches(call: Callable[[], None]) -> List[dict]:
    """Run ``call`` with every Triton launch recorded instead of executed: [{fn, args, kwargs}]."""
    from triton.runtime.jit import JITFunction

    launches: List[dict] = []
    original = JITFunction.run

    def fake_run(self, *args, grid=None, warmup=False, **kwargs):
        launches.append({"fn": self, "args": args, "kwargs": kwargs})

    JITFunction.run = fake_run
    try:
        call()
    finally:
        JITFunction.run = original
    return launches


def compile_launch(launch: dict):
    """Ahead-of-time compile one recorded launch for sm_90a; returns (compiled kernel, options)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, args, kwargs = launch["fn"], launch["args"], dict(launch["kwargs"])
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    names = fn.arg_names
    values = dict(zip(names, args))
    values.update(kwargs)
    constexpr_names = {names[i] for i in fn.constexprs}
    signature, constexprs = {}, {}
    for name in names:
        if name not in values:
            raise ValueError(f"{fn.__name__}: argument {name} was not passed")
        v = values[name]
        if name in constexpr_names:
            signature[name], constexprs[name] = "constexpr", v
        else:
            signature[name] = _arg_type(v)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", ARCH, 32), options=options), options


def _ptxas() -> str:
    # the ptxas Triton itself picks for this architecture (it ships more than one; the PTX version must match)
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(ARCH).path


def ptxas_report(ptx: str) -> Dict[str, int]:
    """Registers, spill stores/loads and static shared memory of the one kernel in ``ptx`` (ptxas -v)."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([_ptxas(), f"-arch=sm_{ARCH}a", "-v", "-o", os.path.join(d, "k.cubin"), src],
                             capture_output=True, text=True, timeout=300)
    if out.returncode:
        raise RuntimeError(f"ptxas failed: {out.stderr[-2000:]}")
    text = out.stdout + out.stderr

    def num(pattern: str) -> int:
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0
    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "stack": num(r"(\d+) bytes stack frame")}


# ----------------------------------------------------------------------------------------------------
# The cases: the wrappers of kernels/ at the shapes the model runs
# ----------------------------------------------------------------------------------------------------
def cases(dtype: torch.dtype) -> Dict[str, Callable[[], None]]:
    from omni2sound.kernels import adaln as ka
    from omni2sound.kernels import adamw as kw
    from omni2sound.kernels import cross_attention as kc
    from omni2sound.kernels import fp8 as kf
    from omni2sound.kernels import gelu as kg
    from omni2sound.kernels import qk_norm_rope as kq
    from omni2sound.kernels import snake as ks

    B, T, D, H, Dh = 2, 250, 1536, 24, 64            # L preset, CFG batch at sampling
    f32 = torch.float32

    def t(*shape, dt=dtype):
        return torch.zeros(*shape, dtype=dt)

    def adaln_fwd_gated():                           # per-token gate, per-sample shift / scale
        x, h = t(B, T, D), t(B, T, D)
        ka.adaln_forward(x, h, t(B, T, D), t(B, 1, D), t(B, 1, D), t(B, T, D), t(B, T, D), t(B * T, dt=f32),
                         t(B * T, dt=f32), 1e-6)

    def adaln_fwd_plain():
        ka.adaln_forward(t(B, T, D), None, None, t(B, T, D), t(B, T, D), None, t(B, T, D), t(B * T, dt=f32),
                         t(B * T, dt=f32), 1e-6)

    def adaln_bwd_gated():
        ka.adaln_backward(t(B, T, D), t(B, T, D), t(B, T, D), t(B, T, D), t(B, T, D), t(B, T, D),
                          t(B * T, dt=f32), t(B * T, dt=f32), t(B, T, D), t(B, T, D), t(B, T, D), t(B, T, D))

    def adaln_bwd_plain():
        ka.adaln_backward(t(B, T, D), None, t(B, T, D), None, None, t(B, T, D), t(B * T, dt=f32),
                          t(B * T, dt=f32), t(B, T, D), None, None, t(B, T, D))

    def adaln_fwd_pairs():                           # the DiT's form: per-token sync part + per-step timestep part
        x, h = t(B, T, D), t(B, T, D)
        tok, per = t(6, B, T, D), t(B, 6, D).permute(1, 0, 2)[:, :, None]
        ka.adaln_forward(x, h, tok[2], tok[0], tok[1], t(B, T, D), t(B, T, D), t(B * T, dt=f32), t(B * T, dt=f32),
                         1e-6, per[2], per[0], per[1])

    def adaln_fwd_pairs_fp8():                       # FP8 sampling: y's per-token e4m3 copy written in the pass
        x, h = t(B, T, D), t(B, T, D)
        tok, per = t(6, B, T, D), t(B, 6, D).permute(1, 0, 2)[:, :, None]
        ka.adaln_forward(x, h, tok[2], tok[0], tok[1], t(B, T, D), t(B, T, D), t(B * T, dt=f32), t(B * T, dt=f32),
                         1e-6, per[2], per[0], per[1], yq=t(B * T, D, dt=torch.float8_e4m3fn),
                         ys=t(B * T, 1, dt=f32))

    def fp8_quantize():                              # a projection's input, quantised on its own (unfused)
        kf.quantize_rows(t(B * T, D))

    def adaln_bwd_pairs():
        tok, per = t(6, B, T, D), t(B, 6, D).permute(1, 0, 2)[:, :, None]
        ka.adaln_backward(t(B, T, D), t(B, T, D), t(B, T, D), t(B, T, D), tok[2], tok[1], t(B * T, dt=f32),
                          t(B * T, dt=f32), t(B, T, D), t(B, T, D), t(B, T, D), t(B, T, D), per[2], per[1])

    def adaln_bwd_into_buffer():                     # training: dgate, dscale, dshift into slots of [B, T, 6, D]
        tok, per, grad = t(6, B, T, D), t(B, 6, D).permute(1, 0, 2)[:, :, None], t(B, T, 6, D)
        ka.adaln_backward(t(B, T, D), t(B, T, D), t(B, T, D), t(B, T, D), tok[5], tok[1], t(B * T, dt=f32),
                          t(B * T, dt=f32), t(B, T, D), t(B, T, D), grad[:, :, 5], grad[:, :, 1], per[5], per[1],
                          grad[:, :, 0])

    def adaln_bwd_constant_gate():                   # the cross-attention sublayer's call: gate = ones, no dgate
        ka.adaln_backward(t(B, T, D), t(B, T, D), t(B, T, D), t(B, T, D), t(B, 1, D), t(B, T, D), t(B * T, dt=f32),
                          t(B * T, dt=f32), t(B, T, D), t(B, T, D), None, t(B, T, D))

    def cross_fwd():                                  # 80 video + 16 text tokens in row 0, none in row 1
        q, kv = t(B, T, H, Dh), t(96, 2, H, Dh)
        cu = torch.tensor([0, 96, 96], dtype=torch.int32)
        kc.cross_attention_fwd(q, kv[:, 0], kv[:, 1], cu, 96, Dh ** -0.5)

    def cross_bwd():
        q, kv = t(B, T, H, Dh), t(96, 2, H, Dh)
        cu = torch.tensor([0, 96, 96], dtype=torch.int32)
        kc.cross_attention_bwd(t(B, T, H, Dh), q, kv[:, 0], kv[:, 1], t(B, T, H, Dh), t(B, H, T, dt=f32), cu, 96,
                               Dh ** -0.5)

    def qk_fwd():                                     # q/k slices of the fused qkv projection (strided)
        qkv = t(B, T, 3, H, Dh)
        kq.qk_norm_rope_forward(qkv[:, :, :2], t(2, Dh, dt=f32), t(T, Dh // 2, 2, dt=f32), t(B, T, 2, H, Dh), 1e-6)

    def qk_bwd():
        qkv = t(B, T, 3, H, Dh)
        kq.qk_norm_rope_backward(t(B, T, 2, H, Dh), qkv[:, :, :2], t(2, Dh, dt=f32), t(T, Dh // 2, 2, dt=f32),
                                 t(B, T, 2, H, Dh), 1e-6)

    def qk_head_norm_fwd():                           # the cross-attention's q: one group, no rotation
        kq.qk_norm_rope_forward(t(B, T, 1, H, Dh), t(1, Dh, dt=f32), None, t(B, T, 1, H, Dh), 1e-6)

    def qk_head_norm_bwd():
        kq.qk_norm_rope_backward(t(B, T, 1, H, Dh), t(B, T, 1, H, Dh), t(1, Dh, dt=f32), None, t(B, T, 1, H, Dh),
                                 1e-6)

    C, N = 128, 4000                                  # a paper-VAE decoder stage
    alpha, beta = t(C, dt=f32), t(C, dt=f32)

    def snake_fwd():
        ks.snake_forward(t(1, C, N), None, alpha, beta, None, t(1, C, N), 1e-9)

    def snake_fwd_residual():
        ks.snake_forward(t(1, C, N), t(1, C, N), alpha, beta, t(1, C, N), t(1, C, N), 1e-9)

    def snake_fwd_channels_last():
        x = t(1, N, C).transpose(1, 2)
        ks.snake_forward(x, x, alpha, beta, x, x, 1e-9, channels_last=True)

    def snake_bwd():
        ks.snake_backward(t(1, C, N), t(1, C, N), t(1, C, N), t(1, C, N), alpha, beta, t(1, C, N), 1e-9)

    F = 4 * D                                         # the MLP's hidden width

    def gelu_fwd():                                   # in place on the first layer's output, as sampling runs it
        h = t(B * T, F)
        kg.bias_gelu_forward(h, t(F, dt=f32), h)

    def gelu_bwd():
        kg.bias_gelu_backward(t(B * T, F), t(B * T, F), t(F, dt=f32), t(B * T, F))

    def gelu_fp8():                                   # FP8 sampling: GELU writing fc2's per-token e4m3 input too
        kg.gelu_fp8_rows(t(B * T, F), t(B * T, F), t(B * T, F, dt=torch.float8_e4m3fn), t(B * T, 1, dt=f32))

    def adamw():                                      # the optimiser step on one fp32 master (the L fc1 weight)
        w = t(F, D, dt=f32)                           # with its bf16 copy; the gradient in the copy's dtype
        kw.adamw_step(w, t(F, D, dt=torch.bfloat16), t(F, D, dt=f32), t(F, D, dt=f32), t(F, D, dt=torch.bfloat16),
                      t(1, dt=f32), t(1, dt=f32), 0.9, 0.999, 1e-8, 0.01)

    def adamw_no_copy():                              # a weight kept in fp32 only (norms, biases)
        w = t(D, dt=f32)
        kw.adamw_step(w, t(D, dt=f32), t(D, dt=f32), t(D, dt=f32), None, t(1, dt=f32), t(1, dt=f32), 0.9, 0.999,
                      1e-8, 0.01)

    return {name: fn for name, fn in locals().items()
            if callable(fn) and name not in ("t",) and not name.startswith("_")}


def run(dtypes=(torch.bfloat16, torch.float32), verbose: bool = True, only: str = "") -> List[dict]:
    records = []
    for dtype in dtypes:
        for case, call in cases(dtype).items():
            if only and only not in case:
                continue
            for launch in record_launches(call):
                rec = {"kernel": launch["fn"].__name__, "case": case, "dtype": _DTYPES[dtype]}
                try:
                    k, options = compile_launch(launch)
                    rec.update(num_warps=options.get("num_warps", 4), shared_bytes=int(k.metadata.shared),
                               **ptxas_report(k.asm["ptx"]), ok=True)
                except Exception as e:                       # noqa: BLE001 - reported per kernel
                    rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[-1500:]}")
                records.append(rec)
                if verbose:
                    print(_row(rec), flush=True)
    return records


def _row(r: dict) -> str:
    if not r["ok"]:
        return f"| {r['kernel']} | {r['case']} | {r['dtype']} | FAILED: {r['error'][:200]} |"
    return (f"| {r['kernel']} | {r['case']} | {r['dtype']} | {r['num_warps']} | {r['registers']} | "
            f"{r['spill_stores']} / {r['spill_loads']} | {r['shared_bytes']} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="write the records here")
    p.add_argument("--only", default="", help="only the cases whose name contains this (e.g. qk, snake, cross)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter replaces the kernels this compiles", file=sys.stderr)
        return 2
    import triton
    print(f"# Triton {triton.__version__} kernels compiled for sm_{ARCH}a (no GPU needed)\n")
    print("| kernel | case | dtype | warps | registers | spill stores / loads (bytes) | shared memory (bytes) |")
    print("|---|---|---|---|---|---|---|")
    records = run(only=args.only)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    failed = [r for r in records if not r["ok"]]
    print(f"\n{len(records) - len(failed)} of {len(records)} launches compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
