"""Malformed-argument cases for every public op of ``omni2sound.ops``, and the worker that runs them.

A case is (op, backend, mutations of a valid call), drawn deterministically from (seed, index): the same index
gives the same case in any process. The worker runs the cases named on its command line and prints, for each,
``S <i>`` before the call and ``R <i> <verdict> <detail>`` after it, flushing both, so that a parent reading its
output knows which case was running when a signal killed it (tests/test_op_fuzz.py).

Verdicts: ``error`` (a ValueError / TypeError with a message, or a forced backend refusing the call), ``equal`` (the
op returned what the reference backend returns for the same arguments), and the failures ``unclear`` (another
exception, or one without a message), ``differs`` (a result unlike the reference's) and ``reference-raised``.

    python tests/op_fuzz_cases.py --seed 0 --backend cpu 0 1 2 ...
"""
from __future__ import annotations

import random
import sys
import traceback
from typing import Callable, Dict, List, Tuple

import torch

import omni2sound.ops as O

MISSING = object()   # a mutation that drops the argument

# ----------------------------------------------------------------------------------------------------
# Valid calls: op name -> (builder of kwargs from a RNG and a torch generator, the call)
# ----------------------------------------------------------------------------------------------------


def _t(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


def _adaln(r, g, dt):
    B, L, D = r.randint(1, 3), r.randint(1, 5), r.choice([1, 3, 8, 16])
    return dict(x=_t(g, B, L, D, dtype=dt), shift=_t(g, B, r.choice([1, L]), D, dtype=dt),
                scale=_t(g, B, 1, D, dtype=dt), eps=1e-6)


def _gated(r, g, dt):
    kw = _adaln(r, g, dt)
    B, L, D = kw["x"].shape
    return dict(x=kw["x"], h=_t(g, B, L, D, dtype=dt), gate=_t(g, B, 1, D, dtype=dt), shift=kw["shift"],
                scale=kw["scale"], eps=1e-6)


def _attention(r, g, dt):
    B, Tq, Tk, H, Dh = r.randint(1, 2), r.randint(1, 5), r.randint(1, 6), r.randint(1, 2), r.choice([4, 8, 16])
    return dict(q=_t(g, B, Tq, H, Dh, dtype=dt), k=_t(g, B, Tk, H, Dh, dtype=dt), v=_t(g, B, Tk, H, Dh, dtype=dt),
                softmax_scale=None)


def _cross(r, g, dt):
    B, Lq, H, D = r.randint(1, 3), r.randint(1, 5), r.randint(1, 2), r.choice([4, 8, 16])
    lens = [r.randint(0, 4) for _ in range(B)]
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return dict(q=_t(g, B, Lq, H, D, dtype=dt), k=_t(g, cu[-1], H, D, dtype=dt), v=_t(g, cu[-1], H, D, dtype=dt),
                cu_seqlens_k=torch.tensor(cu, dtype=torch.int32), max_seqlen_k=max(lens), softmax_scale=None)


def _pack(r, g, dt):
    B, C = r.randint(1, 3), r.choice([4, 8])
    Lv, Lt = r.randint(0, 4), r.randint(1, 4)
    return dict(video=_t(g, B, Lv, C, dtype=dt), video_lens=torch.tensor([r.randint(0, Lv) for _ in range(B)]),
                text=_t(g, B, Lt, C, dtype=dt), text_lens=None)


def _bias_gelu(r, g, dt):
    N = r.choice([1, 5, 16])
    return dict(x=_t(g, r.randint(1, 4), N, dtype=dt), bias=_t(g, N), inplace=False)


def _linear(r, g, dt):
    K, N = r.choice([1, 4, 9]), r.choice([1, 3, 8])
    return dict(x=_t(g, r.randint(1, 3), r.randint(1, 4), K, dtype=dt), weight=_t(g, N, K, dtype=dt),
                bias=_t(g, N, dtype=dt))


def _linear_gelu(r, g, dt):
    kw = _linear(r, g, dt)
    return dict(y=kw["x"], weight=kw["weight"], bias=kw["bias"])


def _qk(r, g, dt):
    B, T, G, H, Dh = r.randint(1, 2), r.randint(1, 4), r.choice([1, 2]), r.randint(1, 2), r.choice([2, 8])
    ang = torch.rand(T, Dh // 2, generator=g) * 6.28
    return dict(qk=_t(g, B, T, G, H, Dh, dtype=dt), weight=_t(g, G, Dh),
                cs=torch.stack([ang.cos(), ang.sin()], -1), eps=1e-6)


def _head_rms(r, g, dt):
    return dict(x=_t(g, r.randint(1, 2), r.randint(1, 4), r.randint(1, 2), r.choice([2, 8]), dtype=dt),
                weight=None, eps=1e-6)


def _snake(r, g, dt):
    B, C, T = r.randint(1, 2), r.randint(1, 4), r.randint(1, 7)
    return dict(x=_t(g, B, C, T, dtype=dt), alpha=torch.rand(C, generator=g) + 0.5,
                beta=torch.rand(C, generator=g) + 0.5, eps=1e-9)


def _snake_res(r, g, dt):
    kw = _snake(r, g, dt)
    kw["residual"] = _t(g, *kw["x"].shape, dtype=dt)
    return kw


def _head_rms_call(x, weight, eps):
    if weight is None:   # the builder leaves the weight to match x's last dim
        weight = torch.ones(x.shape[-1]) if isinstance(x, torch.Tensor) and x.dim() > 0 else torch.ones(1)
    return O.head_rms_norm(x, weight, eps)


OPS: Dict[str, Tuple[Callable, Callable, str]] = {
    # name: (builder, call, dispatch name of the op for use_backend)
    "adaln_modulate": (_adaln, O.adaln_modulate, "adaln_modulate"),
    "gated_residual_adaln": (_gated, O.gated_residual_adaln, "gated_residual_adaln"),
    "attention": (_attention, O.attention, "attention"),
    "cross_attention": (_cross, O.cross_attention, "cross_attention"),
    "pack_condition_tokens": (_pack, O.pack_condition_tokens, "cross_attention"),
    "bias_gelu": (_bias_gelu, O.bias_gelu, "bias_gelu"),
    "linear": (_linear, O.linear, "linear"),
    "linear_gelu": (_linear_gelu, O.linear_gelu, "bias_gelu"),
    "qk_norm_rope": (_qk, O.qk_norm_rope, "qk_norm_rope"),
    "head_rms_norm": (_head_rms, _head_rms_call, "qk_norm_rope"),
    "snake": (_snake, O.snake, "snake"),
    "snake_residual": (_snake_res, O.snake_residual, "snake_residual"),
}

# ----------------------------------------------------------------------------------------------------
# Mutations
# ----------------------------------------------------------------------------------------------------


def _poke(t, r, value):
    t = t.clone()
    if t.numel():
        flat = t.view(-1)
        for _ in range(r.randint(1, 3)):
            flat[r.randrange(flat.numel())] = value
    return t


def _zero_dim(t, r):
    d = r.randrange(t.dim()) if t.dim() else 0
    return t.narrow(d, 0, 0) if t.dim() else t


def _grow(t, r):
    if t.dim() == 0:
        return t.reshape(1)
    d = r.randrange(t.dim())
    return torch.cat([t, t.narrow(d, 0, 1) if t.shape[d] else t.new_zeros(*t.shape[:d], 1, *t.shape[d + 1:])], d)


def _strided(t, r):
    """The same values in another layout: a transposed copy viewed back, or every other element of a larger one."""
    if t.dim() >= 2 and r.random() < 0.5:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype) if t.dim() else None
    if big is None:
        return t
    big[..., ::2] = t
    return big[..., ::2]


TENSOR_MUTATIONS: List[Tuple[str, Callable]] = [
    ("missing", lambda t, r: MISSING),
    ("none", lambda t, r: None),
    ("python int", lambda t, r: 3),
    ("python list", lambda t, r: [1.0, 2.0]),
    ("one more dim", lambda t, r: t.unsqueeze(r.randint(0, t.dim()))),
    ("one dim less", lambda t, r: t.flatten(0, 1) if t.dim() >= 2 else t.reshape(-1)[:1].reshape(())),
    ("0-dim", lambda t, r: t.reshape(-1)[:1].reshape(()) if t.numel() else torch.tensor(1.0)),
    ("a size grown", _grow),
    ("a zero size", _zero_dim),
    ("int32", lambda t, r: t.to(torch.int32)),
    ("int64", lambda t, r: t.to(torch.int64)),
    ("bool", lambda t, r: t > 0),
    ("float64", lambda t, r: t.double()),
    ("float16", lambda t, r: t.half()),
    ("bfloat16", lambda t, r: t.bfloat16()),
    ("complex", lambda t, r: t.to(torch.complex64) if t.is_floating_point() else t),
    ("meta device", lambda t, r: t.to("meta")),
    ("NaN", lambda t, r: _poke(t, r, float("nan")) if t.is_floating_point() else t),
    ("inf", lambda t, r: _poke(t, r, r.choice([float("inf"), float("-inf")])) if t.is_floating_point() else t),
    # large, short of overflowing a row's fp32 sum of squares (past that the AdaLN kernels give NaN, the reference NaN
    # or 0: tests/test_op_bad_inputs.py)
    ("huge", lambda t, r: t * 1e15 if t.is_floating_point() and t.dtype == torch.float32 else t),
    ("strided", _strided),
    ("expanded", lambda t, r: t.narrow(-1, 0, 1).expand(t.shape) if t.dim() and t.shape[-1] else t),
    ("requires grad", lambda t, r: t.clone().requires_grad_() if t.is_floating_point() else t),
]

NUMBER_MUTATIONS = [("negative", -1.0), ("nan", float("nan")), ("inf", float("inf")), ("string", "1e-6"),
                    ("bool", True), ("None", None), ("huge", 1e30), ("zero", 0.0), ("tensor", torch.tensor(1e-6))]
INT_MUTATIONS = [("negative", -1), ("zero", 0), ("huge", 2 ** 40), ("float", 2.5), ("bool", True), ("None", None),
                 ("too small", "minus1")]
OFFSET_MUTATIONS = [
    ("past the end (the reported crash)", lambda cu, r: _with_last(cu, 50_000_000)),
    ("negative entry", lambda cu, r: _set(cu, r.randrange(1, len(cu)) if len(cu) > 1 else 0, -5)),
    ("first entry not 0", lambda cu, r: _set(cu, 0, 1)),
    ("decreasing", lambda cu, r: torch.tensor(list(reversed(cu.tolist())), dtype=torch.int32) if cu[-1] else
     _set(cu, 0, 3)),
    ("last below the key rows", lambda cu, r: _with_last(cu, max(int(cu[-2]) if len(cu) > 1 else 0, int(cu[-1]) - 1))),
    ("last past the key rows", lambda cu, r: _with_last(cu, int(cu[-1]) + 1)),
    ("int64", lambda cu, r: cu.long()),
    ("float", lambda cu, r: cu.float()),
    ("2-D", lambda cu, r: cu[None]),
    ("one entry short", lambda cu, r: cu[:-1]),
    ("one entry more", lambda cu, r: torch.cat([cu, cu[-1:]])),
    ("python list", lambda cu, r: cu.tolist()),
    ("int32 min", lambda cu, r: _set(cu, len(cu) - 1, -2 ** 31)),
]


def _set(cu, i, v):
    cu = cu.clone()
    cu[i] = v
    return cu


def _with_last(cu, v):
    return _set(cu, len(cu) - 1, v)


def _mutate(name: str, kw: dict, r: random.Random) -> List[str]:
    """Apply one or two mutations to kw in place; returns their descriptions."""
    done = []
    for _ in range(1 if r.random() < 0.75 else 2):
        arg = r.choice(sorted(kw))
        val = kw[arg]
        if arg == "cu_seqlens_k":
            what, fn = r.choice(OFFSET_MUTATIONS)
            kw[arg] = fn(val, r)
        elif arg == "max_seqlen_k":
            what, v = r.choice(INT_MUTATIONS)
            kw[arg] = val - 1 if v == "minus1" else v
        elif arg in ("eps", "softmax_scale"):
            what, v = r.choice(NUMBER_MUTATIONS)
            kw[arg] = v
        elif arg == "inplace":
            what, v = r.choice([("string", "yes"), ("int", 1), ("True", True)])
            kw[arg] = v
        elif isinstance(val, torch.Tensor):
            what, fn = r.choice(TENSOR_MUTATIONS)
            kw[arg] = fn(val, r)
        else:                     # an optional tensor given as None: give it a tensor of a wrong shape
            what = "a [3] tensor"
            kw[arg] = torch.randn(3)
        if kw[arg] is MISSING:
            del kw[arg]
        done.append(f"{arg}: {what}")
    return done


# Documented differences from the reference on non-finite input (the ops' docstrings): the C++ attention propagates
# a NaN / inf query into its output rows, where aten's CPU SDPA (the reference) can return finite rows; bias_gelu's
# kernels give -inf for x = -inf, the reference NaN. There a result only has to match the reference where it is finite.
NON_FINITE = ("NaN", "inf")
LENIENT = {("attention", "q"), ("cross_attention", "q"), ("bias_gelu", "x"), ("bias_gelu", "bias"),
           ("linear_gelu", "y"), ("linear_gelu", "weight"), ("linear_gelu", "bias")}


def make_case(seed: int, i: int, backends: Dict[str, List[str]]):
    """(op, backend, description, kwargs) of case i; backends: op -> the backends to draw from."""
    r = random.Random(f"{seed}:{i}")
    ops = [op for op in OPS if backends.get(op)]
    op = ops[i % len(ops)]
    backend = r.choice(backends[op])
    g = torch.Generator().manual_seed(r.randrange(2 ** 31))
    dt = r.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16])
    kw = OPS[op][0](r, g, dt)
    what = _mutate(op, kw, r) if r.random() < 0.95 else ["valid call"]
    lenient = any((op, w.split(":")[0]) in LENIENT and w.split(": ")[1] in NON_FINITE for w in what)
    return op, backend, f"{op}[{backend}, {str(dt).replace('torch.', '')}] " + "; ".join(what), kw, lenient


# ----------------------------------------------------------------------------------------------------
# Verdicts
# ----------------------------------------------------------------------------------------------------


def _clear(e: BaseException) -> bool:
    msg = str(e).strip()
    if isinstance(e, (ValueError, TypeError)):
        return bool(msg) and "\n" not in msg.strip()
    return isinstance(e, RuntimeError) and "was requested for op" in msg


def _call(op: str, backend: str, kw: dict):
    _, fn, dispatch = OPS[op]
    with O.use_backend(**{dispatch: backend}):
        return fn(**kw)


def _tensors(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return [out]


def _same(got, want, lenient: bool = False) -> str:
    """'' when got matches want (NaN where it has NaN, inf where it has inf, close elsewhere), else why not;
    ``lenient``: only where both are finite."""
    got, want = _tensors(got), _tensors(want)
    if len(got) != len(want):
        return f"{len(got)} outputs, the reference {len(want)}"
    for a, b in zip(got, want):
        if not isinstance(a, torch.Tensor):
            if a != b:
                return f"{a!r} != {b!r}"
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{a.dtype} {tuple(a.shape)} vs the reference's {b.dtype} {tuple(b.shape)}"
        a, b = a.detach().double(), b.detach().double()
        if lenient:
            keep = a.isfinite() & b.isfinite()
            a, b = a[keep], b[keep]
        if not torch.equal(a.isnan(), b.isnan()):
            return f"NaN at {int((a.isnan() != b.isnan()).sum())} places where the reference differs"
        fin = b.isfinite() & a.isfinite()
        if not torch.equal(a[~fin & ~a.isnan()], b[~fin & ~b.isnan()]):
            return "infinities differ from the reference"
        if fin.any():
            scale = max(1.0, float(b[fin].abs().max()))
            tol = 1e-4 if got[0].dtype in (torch.float32, torch.float64) else 4e-2
            err = float(((a[fin] - b[fin]).abs() - tol * b[fin].abs()).max())
            if err > tol * scale:
                return f"max error {err:.3g} past {tol * scale:.3g}"
    return ""


def run_case(seed: int, i: int, backends: Dict[str, List[str]]) -> Tuple[str, str]:
    try:
        op, backend, what, kw, lenient = make_case(seed, i, backends)
    except Exception:               # noqa: BLE001 - a bug of the fuzz itself
        return "bad-case", traceback.format_exc(limit=-3)
    try:
        got = _call(op, backend, kw)
    except Exception as e:          # noqa: BLE001 - the verdict is the point
        if _clear(e):
            return "error", f"{what} -> {type(e).__name__}: {str(e)[:160]}"
        return "unclear", f"{what} -> {type(e).__name__}: {e!r:.300}\n{traceback.format_exc(limit=-3)}"
    if backend == "reference":
        return "equal", what
    try:
        want = _call(op, "reference", kw)
    except Exception as e:          # noqa: BLE001
        return "reference-raised", f"{what} -> returned, but the reference raised {type(e).__name__}: {e}"
    why = _same(got, want, lenient)
    return ("differs", f"{what} -> {why}") if why else ("equal", what)


def backends_here(triton: bool) -> Dict[str, List[str]]:
    """op -> the backends the fuzz draws from in this process: the reference and the native one on the CPU, or
    Triton alone (under TRITON_INTERPRET=1) where the op has it."""
    cpu = torch.device("cpu")
    out = {}
    for op, (_, _, dispatch) in OPS.items():
        have = O.available_backends(dispatch, cpu)
        out[op] = (["triton"] if "triton" in have else []) if triton else [b for b in have if b != "triton"]
    return out


def main(argv: List[str]) -> None:
    seed = int(argv[argv.index("--seed") + 1])
    triton = argv[argv.index("--backend") + 1] == "triton"
    ids = [int(a) for a in argv[argv.index("--backend") + 2:]]
    torch.set_num_threads(1)
    backends = backends_here(triton)
    for i in ids:
        print(f"S {i}", flush=True)
        verdict, detail = run_case(seed, i, backends)
        print(f"R {i} {verdict} {detail!r}", flush=True)


if __name__ == "__main__":
    main(sys.argv)
