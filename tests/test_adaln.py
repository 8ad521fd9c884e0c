"""adaln_modulate and gated_residual_adaln: every backend on this machine against a float64 reference."""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lowp import half_ulp
from recording import OpLog

from omni2sound import _native, ops
from omni2sound.ops import _dispatch

ROOT = Path(__file__).resolve().parents[1]


def backends_here(device="cpu"):
    return [b for b in ops.available_backends("gated_residual_adaln", torch.device(device))]


CPU_BACKENDS = backends_here("cpu")


def test_cpu_backends_present():
    # The C++ extension is part of the install; a build that lost it must fail loudly, not skip.
    assert "cpu" in CPU_BACKENDS, "omni2sound._C was not built: run the README's set-up"
    assert "reference" in CPU_BACKENDS


# --------------------------------------------------------------------------------------------------
# float64 reference and inputs
# --------------------------------------------------------------------------------------------------

def ref64(x, h, gate, shift, scale, eps):
    x, shift, scale = x.double(), shift.double(), scale.double()
    x2 = x if h is None else x + gate.double() * h.double()
    y = F.layer_norm(x2, (x.shape[-1],), eps=eps) * (1 + scale) + shift
    return x2, y


def plain_lowp(x, h, gate, shift, scale, eps):
    """The plain PyTorch ops run in the input precision: the baseline of flash-attn's 2x rule."""
    x2 = x if h is None else x + gate * h
    return x2, F.layer_norm(x2, (x.shape[-1],), eps=eps) * (1 + scale) + shift


def make_inputs(B, L, D, per_token, dtype=torch.float32, magnitude=1.0, device="cpu", gated=True):
    Lm = L if per_token else 1
    x = (torch.randn(B, L, D) * magnitude + magnitude * torch.rand(B, L, 1)).to(dtype)
    h = torch.randn(B, L, D).to(dtype) if gated else None
    gate = torch.randn(B, Lm, D).to(dtype) if gated else None
    shift = torch.randn(B, Lm, D).to(dtype)
    scale = (0.5 * torch.randn(B, Lm, D)).to(dtype)
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return tuple(move(t) for t in (x, h, gate, shift, scale))


def run(backend, x, h, gate, shift, scale, eps, grads=True):
    """Forward (and backward with fixed random upstream grads); returns outputs and input grads."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(grads) for t in (x, h, gate, shift, scale)]
    with ops.use_backend(backend):
        if h is None:
            y = ops.adaln_modulate(leaves[0], leaves[3], leaves[4], eps)
            x2 = None
        else:
            x2, y = ops.gated_residual_adaln(*leaves, eps=eps)
        if not grads:
            return (x2, y), None
        g = torch.Generator().manual_seed(7)
        dy = torch.randn(y.shape, generator=g).to(y)
        loss = (y.float() * dy.float()).sum()
        if x2 is not None:
            dx2 = torch.randn(x2.shape, generator=g).to(x2)
            loss = loss + (x2.float() * dx2.float()).sum()
        loss.backward()
    return (x2, y), [None if t is None else t.grad for t in leaves]


def run_ref64(x, h, gate, shift, scale, eps, plain=False):
    leaves = [None if t is None else (t.detach().clone() if plain else t.detach().double()).requires_grad_()
              for t in (x, h, gate, shift, scale)]
    x2, y = (plain_lowp if plain else ref64)(*leaves, eps)
    g = torch.Generator().manual_seed(7)
    # the upstream grads rounded to the inputs' precision, as run() hands them to a kernel: the float64 reference
    # then differentiates exactly what the kernel did, and the plain ops see the same grads
    dy = torch.randn(y.shape, generator=g).to(x.dtype).to(y)
    loss = (y.double() * dy.double()).sum()
    if h is not None:
        dx2 = torch.randn(x2.shape, generator=g).to(x.dtype).to(x2)
        loss = loss + (x2.double() * dx2.double()).sum()
    loss.backward()
    return (x2 if h is not None else None, y), [None if t is None else t.grad for t in leaves]



def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------------------------------
# fp32 against float64, every backend
# --------------------------------------------------------------------------------------------------

SHAPES = [(2, 1, 1), (2, 5, 7), (3, 1, 64), (2, 3, 1000), (2, 5, 1536)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("B,L,D", SHAPES)
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("gated", [True, False])
def test_fp32_matches_float64(backend, B, L, D, per_token, gated):
    eps = 1e-6
    inputs = make_inputs(B, L, D, per_token, gated=gated)
    (x2, y), grads = run(backend, *inputs, eps)
    (x2r, yr), gref = run_ref64(*inputs, eps)
    # D = 1: LayerNorm output is exactly 0, so y == shift; relative error still applies.
    assert rel_err(y, yr) < 2e-5, backend
    if gated:
        assert rel_err(x2, x2r) < 1e-6
    for name, g, gr in zip(("x", "h", "gate", "shift", "scale"), grads, gref):
        if gr is None:
            assert g is None
            continue
        assert g.shape == gr.shape, name
        if gr.abs().max() == 0:
            assert g.abs().max() == 0, name
        else:
            assert rel_err(g, gr) < 5e-5, f"{backend} d{name}"


# --------------------------------------------------------------------------------------------------
# Modulations given as pairs (a, b) meaning a + b: the DiT's per-token sync part + per-sample timestep part
# --------------------------------------------------------------------------------------------------

def make_pairs(B, L, D, gated, dtype=torch.float32, device="cpu", seed=0):
    """x, h and every modulation as a pair with a random mix of per-token / per-sample parts."""
    g = torch.Generator().manual_seed(seed)
    rows = lambda: L if torch.rand((), generator=g) < 0.5 else 1  # noqa: E731

    def mod(s=1.0):
        return tuple((s * torch.randn(B, rows(), D, generator=g)).to(dtype).to(device) for _ in range(2))
    x = torch.randn(B, L, D, generator=g).to(dtype).to(device)
    h = torch.randn(B, L, D, generator=g).to(dtype).to(device) if gated else None
    return x, h, (mod() if gated else None), mod(), mod(0.5)


def run_pairs(backend, x, h, gate, shift, scale, eps, double=False):
    """Forward + backward with the pairs' parts as leaves; backend None: float64 reference of the summed form."""
    conv = (lambda t: t.detach().double()) if double else (lambda t: t.detach().clone())  # noqa: E731
    leaf = lambda t: None if t is None else conv(t).requires_grad_()  # noqa: E731
    X, Hh = leaf(x), leaf(h)
    G, S, C = [None if m is None else (leaf(m[0]), leaf(m[1])) for m in (gate, shift, scale)]
    tot = lambda m: None if m is None else m[0] + m[1]  # noqa: E731
    if backend in (None, "plain"):            # float64 reference / the plain ops in the input precision
        x2, y = (ref64 if backend is None else plain_lowp)(X, Hh, tot(G), tot(S), tot(C), eps)
        x2 = x2 if h is not None else None
    else:
        with ops.use_backend(backend):
            if h is None:
                x2, y = None, ops.adaln_modulate(X, S, C, eps)
            else:
                x2, y = ops.gated_residual_adaln(X, Hh, G, S, C, eps)
    gen = torch.Generator().manual_seed(7)
    # upstream grads rounded to the inputs' precision, which is what autograd hands a kernel (see run_ref64)
    updy = lambda shape: torch.randn(shape, generator=gen).to(x.dtype).to(y.device).double()  # noqa: E731
    loss = (y.double() * updy(y.shape)).sum()
    if x2 is not None:
        loss = loss + (x2.double() * updy(x2.shape)).sum()
    loss.backward()
    leaves = [X, Hh] + [t for m in (G, S, C) if m is not None for t in m]
    return (x2, y), [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("B,L,D", [(2, 1, 1), (2, 5, 7), (3, 4, 64), (2, 5, 1536)])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pair_modulation_fp32_matches_float64(backend, B, L, D, gated, seed):
    inputs = make_pairs(B, L, D, gated, seed=seed)
    (x2, y), grads = run_pairs(backend, *inputs, 1e-6)
    (x2r, yr), gref = run_pairs(None, *inputs, 1e-6, double=True)
    assert rel_err(y, yr) < 2e-5, backend
    if gated:
        assert rel_err(x2, x2r) < 1e-6
    assert len(grads) == len(gref)
    for i, (g, gr) in enumerate(zip(grads, gref)):
        assert g.shape == gr.shape, i
        assert (g.abs().max() == 0) if gr.abs().max() == 0 else rel_err(g, gr) < 5e-5, f"{backend} grad {i}"


@pytest.mark.parametrize("device,backend", [("cpu", b) for b in CPU_BACKENDS]
                         + [pytest.param("cuda", b, marks=pytest.mark.cuda) for b in ("cuda", "triton")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_constant_modulations_get_no_gradient_and_change_nothing(device, backend, dtype, monkeypatch):
    # The DiT passes constant ones (gate) and zeros (shift, scale) to two of its three calls per block: the backward
    # must not compute their per-token gradients (a full [B, L, D] write each) and must give every other input the
    # gradient it gets when all of them require grad, bit for bit. Per-token gradients come in the input dtype.
    if device == "cpu" and backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16 arithmetic")
    B, L, D = 2, 5, 24
    g = torch.Generator().manual_seed(3)
    x, h, gate, shift, scale = (torch.randn(B, L, D, generator=g).to(device, dtype) for _ in range(5))
    gate2 = torch.randn(B, 1, D, generator=g).to(device, dtype)
    dy, dx2 = (torch.randn(B, L, D, generator=g).to(device, dtype) for _ in range(2))
    seen = []
    real = ops.adaln._backward_native

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(tuple(t is not None for t in out[2:]))
        return out
    monkeypatch.setattr(ops.adaln, "_backward_native", spy)

    def grads(const):                       # const: names of the modulations passed as constants
        leaves = {k: v.clone().requires_grad_(k not in const)
                  for k, v in dict(x=x, h=h, gate=gate, gate2=gate2, shift=shift, scale=scale).items()}
        with ops.use_backend(backend):
            x2, y = ops.gated_residual_adaln(leaves["x"], leaves["h"], (leaves["gate"], leaves["gate2"]),
                                             leaves["shift"], leaves["scale"])
        torch.autograd.backward([x2, y], [dx2, dy])
        return {k: v.grad for k, v in leaves.items()}

    full = grads(())
    assert full["gate"].dtype == full["scale"].dtype == dtype and full["gate2"].dtype == dtype
    for const, flags in ((("gate", "gate2"), (False, True)), (("shift", "scale"), (True, False))):
        seen.clear()
        part = grads(const)
        if backend != "reference":               # the reference is autograd itself: no backward op runs
            assert seen == [flags], (const, seen)
        for k, v in part.items():
            if k in const:
                assert v is None, k
            else:
                torch.testing.assert_close(v, full[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pair_equals_presummed_and_strided_parts(backend):
    # The model passes strided views (t_mod[k] of a [6, B, 1, D] permute, sync_mod[i][k]): same result as the
    # materialised sum.
    B, L, D = 2, 5, 48
    tok = torch.randn(6, B, L, D)
    per = torch.randn(B, 6, D).permute(1, 0, 2)[:, :, None]                # [6, B, 1, D], strided
    x, h = torch.randn(B, L, D), torch.randn(B, L, D)
    with ops.use_backend(backend):
        x2, y = ops.gated_residual_adaln(x, h, (tok[2], per[2]), (tok[3], per[3]), (tok[4], per[4]))
        x2r, yr = ops.gated_residual_adaln(x, h, tok[2] + per[2], tok[3] + per[3], tok[4] + per[4])
        y1 = ops.adaln_modulate(x, (tok[0], per[0]), (tok[1], per[1]))
        y1r = ops.adaln_modulate(x, tok[0] + per[0], tok[1] + per[1])
    torch.testing.assert_close(x2, x2r, rtol=0, atol=0)
    torch.testing.assert_close(y, yr, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y1, y1r, rtol=1e-6, atol=1e-6)


def test_pair_bad_inputs():
    x = torch.randn(2, 3, 8)
    with pytest.raises(TypeError, match="pair"):
        ops.adaln_modulate(x, (x, x, x), x)
    with pytest.raises(ValueError, match=r"shift\[1\]"):
        ops.adaln_modulate(x, (x, torch.randn(2, 2, 8)), x)
    with pytest.raises(TypeError, match=r"scale\[1\]"):
        ops.adaln_modulate(x, x, (x, x.double()))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_magnitude(backend):
    # |x| ~ 1e4 with a large common offset: a one-pass E[x^2]-E[x]^2 variance would lose everything here.
    eps = 1e-6
    inputs = make_inputs(2, 3, 1536, per_token=True, magnitude=1e4)
    (x2, y), grads = run(backend, *inputs, eps)
    (x2r, yr), gref = run_ref64(*inputs, eps)
    assert rel_err(y, yr) < 1e-4
    for g, gr in zip(grads, gref):
        assert rel_err(g, gr) < 1e-3


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty(backend):
    for B, L in ((0, 5), (2, 0)):
        inputs = make_inputs(B, L, 16, per_token=False)
        (x2, y), grads = run(backend, *inputs, 1e-6)
        assert y.shape == (B, L, 16) and x2.shape == (B, L, 16)
        assert all(g is not None and g.numel() == t.numel() for g, t in zip(grads, inputs))
        assert all((g == 0).all() for g in grads if g.numel())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous(backend):
    B, L, D = 2, 5, 24
    base = torch.randn(B, D, L)
    x = base.transpose(1, 2)                        # [B, L, D], stride over D != 1
    h = torch.randn(B, L, 2 * D)[..., ::2]          # strided over D
    gate = torch.randn(B, 3, D)[:, 1:2]             # per-sample slice with a batch stride of 3*D
    shift = torch.randn(L, B, D).transpose(0, 1)    # per-token, batch-major view
    scale = torch.randn(B, 1, D).expand(B, L, D)    # an expanded view: per-token with stride 0
    (x2, y), grads = run(backend, x, h, gate, shift, scale, 1e-6)
    (x2r, yr), gref = run_ref64(x, h, gate, shift, scale, 1e-6)
    assert rel_err(y, yr) < 2e-5 and rel_err(x2, x2r) < 1e-6
    for g, gr in zip(grads, gref):
        assert g.shape == gr.shape and rel_err(g, gr) < 5e-5


# --------------------------------------------------------------------------------------------------
# Low precision: flash-attn's rule
# --------------------------------------------------------------------------------------------------

LOWP = [(b, dt) for b in CPU_BACKENDS if b != "reference" for dt in (torch.float16, torch.bfloat16)
        if not (b == "triton" and dt == torch.bfloat16)]  # the interpreter has no bf16 arithmetic


@pytest.mark.parametrize("backend,dtype", LOWP)
@pytest.mark.parametrize("per_token", [False, True])
def test_low_precision_2x_rule(backend, dtype, per_token):
    eps = 1e-6
    inputs = make_inputs(2, 7, 1000, per_token, dtype=dtype)
    (x2, y), grads = run(backend, *inputs, eps)
    (x2p, yp), gplain = run_ref64(*inputs, eps, plain=True)
    (x2r, yr), gref = run_ref64(*inputs, eps)
    err = lambda a, b: (a.double() - b.double()).abs().max().item()  # noqa: E731
    slack = 1e-6
    assert err(y, yr) <= 2 * err(yp, yr) + half_ulp(yr, dtype) + slack
    assert err(x2, x2r) <= 2 * err(x2p, x2r) + half_ulp(x2r, dtype) + slack
    for name, g, gp, gr in zip(("x", "h", "gate", "shift", "scale"), grads, gplain, gref):
        assert g.dtype == dtype
        assert err(g, gr) <= 2 * err(gp, gr) + half_ulp(gr, dtype) + slack * gr.abs().max().item(), name


# --------------------------------------------------------------------------------------------------
# Errors, dispatch, opcheck, torch.compile
# --------------------------------------------------------------------------------------------------

def test_bad_inputs_give_clear_errors():
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"shift must be per-sample"):
        ops.adaln_modulate(x, torch.randn(2, 3, 8), torch.randn(2, 1, 8))
    with pytest.raises(ValueError, match=r"x must be \[B, L, D\]"):
        ops.adaln_modulate(torch.randn(5, 8), torch.randn(1, 1, 8), torch.randn(1, 1, 8))
    with pytest.raises(TypeError, match="dtype"):
        ops.adaln_modulate(x, torch.randn(2, 1, 8).double(), torch.randn(2, 1, 8))
    with pytest.raises(ValueError, match="h must have"):
        ops.gated_residual_adaln(x, torch.randn(2, 5, 7), torch.randn(2, 1, 8), torch.randn(2, 1, 8),
                                 torch.randn(2, 1, 8))
    with pytest.raises(RuntimeError, match="cannot run on cpu"):
        with ops.use_backend("cuda"):
            ops.adaln_modulate(x, torch.randn(2, 1, 8), torch.randn(2, 1, 8))
    with pytest.raises(ValueError, match="unknown backend"):
        with ops.use_backend("fast"):
            pass


def test_dispatch_defaults_and_overrides(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("OMNI2SOUND_BACKEND", raising=False)
    assert ops.select_backend("gated_residual_adaln", cpu) == "cpu"
    monkeypatch.setenv("OMNI2SOUND_BACKEND", "reference")
    assert ops.select_backend("adaln_modulate", cpu) == "reference"
    with ops.use_backend("cpu"):
        assert ops.select_backend("adaln_modulate", cpu) == "cpu"        # context beats the environment
        with ops.use_backend(adaln="reference"):                         # a family override, innermost wins
            assert ops.select_backend("gated_residual_adaln", cpu) == "reference"
        assert ops.select_backend("adaln_modulate", cpu) == "cpu"
    monkeypatch.setenv("OMNI2SOUND_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="OMNI2SOUND_BACKEND"):
        ops.select_backend("adaln_modulate", cpu)
    assert "adaln_modulate" in _dispatch.registered_ops()


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
@torch.no_grad()
def test_a_dispatch_mode_sees_the_custom_ops_where_direct_calls_skip_them(backend):
    # sampling (no autograd) calls the backend directly, past the custom op's dispatch; under a TorchDispatchMode
    # (a user's op log, FakeTensorMode, functionalisation) the op itself runs, so the mode sees it, with the same result
    from torch._subclasses.fake_tensor import FakeTensorMode

    B, L, D, H, Dh = 2, 5, 16, 2, 8
    x, h, mods = torch.randn(B, L, D), torch.randn(B, L, D), [torch.randn(B, 1, D) for _ in range(3)]
    qk, w = torch.randn(B, L, 2, H, Dh), torch.randn(2, Dh)
    calls = {"omni2sound.adaln_modulate.default": lambda: ops.adaln_modulate(x, mods[0], mods[1]),
             "omni2sound.gated_residual_adaln.default": lambda: ops.gated_residual_adaln(x, h, *mods),
             "omni2sound.qk_norm_rope.default": lambda: ops.qk_norm_rope(qk, w, None)}
    assert _dispatch.direct_call(x, h)
    with ops.use_backend(adaln=backend, qk_norm_rope=backend):
        for name, call in calls.items():
            direct = call()
            with OpLog() as log:
                assert not _dispatch.direct_call(x, h)
                seen = call()
            assert log.ops[name] == 1, (name, log.ops)
            for a, b in zip(*(t if isinstance(t, tuple) else (t,) for t in (direct, seen))):
                assert torch.equal(a, b), name
    with FakeTensorMode():
        assert not _dispatch.direct_call(x, h)
    assert _dispatch.direct_call(x, h)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"] + ["reference"])
def test_opcheck(backend):
    from omni2sound.ops import adaln as mod

    x, h, gate, shift, scale = make_inputs(2, 3, 12, per_token=True)
    gate1 = gate[:, :1].contiguous()  # per-sample gate next to per-token shift/scale
    leaf = lambda *ts: [None if t is None else t.detach().clone().requires_grad_() for t in ts]  # noqa: E731
    # without and with the second addends (per-sample parts next to per-token ones)
    for g2, s2, c2 in ((None, None, None), (torch.randn(2, 3, 12), torch.randn(2, 1, 12), torch.randn(2, 1, 12))):
        torch.library.opcheck(mod._adaln_modulate_op, (*leaf(x, shift, scale, s2, c2), 1e-6, backend))
        torch.library.opcheck(mod._gated_residual_adaln_op, (*leaf(x, h, gate1, shift, scale, g2, s2, c2), 1e-6,
                                                             backend))
        _, _, mean, rstd = mod._gated_residual_adaln_op(x.detach(), h, gate1, shift, scale, g2, s2, c2, 1e-6, backend)
        for need_dgate, need_dscale in ((True, True), (False, True), (True, False)):
            torch.library.opcheck(mod._gated_residual_adaln_backward_op,
                                  (torch.randn_like(x), torch.randn_like(x), x.detach(), h, gate1, scale, g2, c2,
                                   mean, rstd, need_dgate, need_dscale, backend, None, None, None))
            # the per-token gradients written into slots of a [B, L, 6, D] buffer (row stride 6 D)
            slots = torch.empty(2, 3, 6, 12).unbind(2)
            torch.library.opcheck(mod._gated_residual_adaln_backward_op,
                                  (torch.randn_like(x), torch.randn_like(x), x.detach(), h, gate1, scale, g2, c2,
                                   mean, rstd, need_dgate, need_dscale, backend, slots[2] if need_dgate else None,
                                   slots[1] if need_dscale else None, slots[0]))
        for need_dscale in (True, False):
            torch.library.opcheck(mod._adaln_modulate_backward_op, (torch.randn_like(x), x.detach(), scale, c2, mean,
                                                                    rstd, need_dscale, backend, None, None))
            slots = torch.empty(2, 3, 2, 12).unbind(2)
            torch.library.opcheck(mod._adaln_modulate_backward_op, (torch.randn_like(x), x.detach(), scale, c2, mean,
                                                                    rstd, need_dscale, backend,
                                                                    slots[1] if need_dscale else None, slots[0]))


# --------------------------------------------------------------------------------------------------
# Modulation gradients in one buffer: strided outputs of the backward, split_modulation
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,L,D", [(2, 5, 7), (1, 3, 24), (3, 1, 16), (2, 0, 8), (2, 4, 1)])
@pytest.mark.parametrize("gated", [True, False])
def test_backward_into_buffer_slots_equals_fresh_outputs(backend, dtype, B, L, D, gated):
    # dgate / dscale written into slots of a [B, L, 6, D] buffer (row stride 6 D) and dy copied into a third: the same
    # bits as the backward's own new tensors, the other slots untouched
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16 arithmetic")
    from omni2sound.ops import adaln as mod
    x, h, gate, _, scale = make_inputs(B, L, D, per_token=True, dtype=dtype, gated=gated)
    gate2 = torch.randn(B, 1, D).to(dtype) if gated else None
    scale2 = torch.randn(B, 1, D).to(dtype)
    dy, dx2 = torch.randn(B, L, D).to(dtype), (torch.randn(B, L, D).to(dtype) if gated else None)
    mean, rstd = mod._stats_reference(x, 1e-6)
    args = (dy, dx2, x, h, gate, scale, mean, rstd)
    fresh = mod._backward_native(*args, backend, gate2, scale2, gated, True)
    buf = torch.full((B, L, 6, D), float("nan"), dtype=dtype)
    slots = buf.unbind(2)
    got = mod._backward_native(*args, backend, gate2, scale2, gated, True, slots[5] if gated else None, slots[4],
                               slots[3])
    assert got[3] is slots[4] and (got[2] is slots[5] if gated else got[2] is None)
    for a, b in zip(got[:2], fresh[:2]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(slots[4], fresh[3]) and torch.equal(slots[3], dy)
    if gated:
        assert torch.equal(slots[5], fresh[2])
    assert buf[:, :, :3].isnan().all()
    if backend != "reference" and dtype == torch.float32:              # and the reference's values
        ref = mod._backward_native(*args, "reference", gate2, scale2, gated, True)
        for a, b in zip((slots[5] if gated else None, slots[4]), ref[2:]):
            if b is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_backward_rejects_bad_gradient_row_strides():
    from omni2sound.ops import adaln as mod
    P = _native.lib().AdaLNBwdParams()
    x = torch.randn(2, 3, 8)
    mean, rstd = mod._stats_reference(x, 1e-6)
    P.B, P.L, P.D, P.dtype = 2, 3, 8, 0
    P.dy = P.xin = P.scale = x.data_ptr()
    P.mean, P.rstd, P.dxin = mean.data_ptr(), rstd.data_ptr(), torch.empty_like(x).data_ptr()
    P.dscale_tok, P.dscale_rs = torch.empty(2, 3, 8).data_ptr(), 4
    with pytest.raises(ValueError, match="row stride"):
        _native.lib().adaln_backward_cpu(P)
    with pytest.raises(ValueError, match="fixed stride"):                    # rows not at one stride
        mod._row_stride(torch.empty(3, 2, 8).transpose(0, 1))


class StackShapes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the output shape of every aten::stack (the backward of unbind is one)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._schema.name == "aten::stack":
            self.shapes.append(tuple(out.shape))
        return out


def modulated_chain(tok, per, x, hs, eps=1e-6):
    """The DiT's use of its split modulations: adaln_modulate with slots 0, 1 of tok[0]; per block i three gated
    calls with slot 2 | 3, 4 | 5 and the next split's 0, 1 (tok[-1]: the final layer's 2-slot split); each slot paired
    with its per-sample part per[k] [B, 1, D]. hs: the sublayers' outputs, functions of y."""
    ones, zeros = torch.ones_like(per[0]), torch.zeros_like(per[0])
    y = ops.adaln_modulate(x, (tok[0][0], per[0]), (tok[0][1], per[1]), eps)
    for i in range(len(tok) - 1):
        x, y = ops.gated_residual_adaln(x, hs[0](y), (tok[i][2], per[2]), zeros, zeros, eps)
        x, y = ops.gated_residual_adaln(x, hs[1](y), ones, (tok[i][3], per[3]), (tok[i][4], per[4]), eps)
        x, y = ops.gated_residual_adaln(x, hs[2](y), (tok[i][5], per[5]), (tok[i + 1][0], per[0]),
                                        (tok[i + 1][1], per[1]), eps)
    return x, y


def chain_grads(backend, B, L, D, dtype=torch.float32, buffer=True, depth=2, seed=0, edit=None, twice=False,
                device="cpu"):
    """Gradients of every leaf of modulated_chain (the per-token modulations from Linear layers, as in the DiT) with
    the buffer layout on or off, and the shapes of the stacks its backward ran. edit(tok) may change the slices
    (hooks, reuse) before the chain uses them."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device, dtype)           # noqa: E731
    s = r(B, L, D)
    lins = [torch.nn.Linear(D, 6 * D).to(device, dtype) for _ in range(depth)] + \
        [torch.nn.Linear(D, 2 * D).to(device, dtype)]
    with torch.no_grad():
        for lin in lins:
            lin.weight.copy_(r(*lin.weight.shape) * 0.3)
            lin.bias.copy_(r(*lin.bias.shape) * 0.3)
    x, per = r(B, L, D).requires_grad_(), [r(B, 1, D).requires_grad_() for _ in range(6)]   # per-sample parts
    mix = [r(D, D) * 0.2 for _ in range(3)]
    hs = [lambda y, m=m: y @ m for m in mix]
    leaves = [x, *per] + [p for lin in lins for p in lin.parameters()]
    stacks = StackShapes()
    with ops.use_backend(adaln=backend), ops.modulation_grad_buffer(buffer):
        mods = [lin(s).view(B, L, lin.out_features // D, D) for lin in lins]
        tok = [ops.split_modulation(m) for m in mods]
        if edit is not None:
            tok = edit(tok)
        x2, y = modulated_chain(tok, per, x, hs)
        loss = (y.float() * r(B, L, D).float()).sum() + (x2.float() * r(B, L, D).float()).sum()
        with stacks:
            loss.backward(retain_graph=twice)
            if twice:
                loss.backward()
    return [p.grad for p in leaves], stacks.shapes


def big_stacks(shapes, B, L, D):
    return [s for s in shapes if s in ((B, L, 6, D), (B, L, 2, D))]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,L,D", [(2, 5, 24), (1, 7, 12), (3, 1, 16), (2, 3, 1)])
def test_split_modulation_gradients_equal_unbind_bit_for_bit(backend, dtype, B, L, D):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16 arithmetic")
    on, on_stacks = chain_grads(backend, B, L, D, dtype, buffer=True)
    off, off_stacks = chain_grads(backend, B, L, D, dtype, buffer=False)
    for i, (a, b) in enumerate(zip(on, off)):
        assert a.dtype == b.dtype and torch.equal(a, b), i
    assert len(big_stacks(off_stacks, B, L, D)) == 3                 # unbind's backward: one stack per split
    if backend != "reference":                                        # the reference ops are autograd's: no buffer
        assert big_stacks(on_stacks, B, L, D) == []


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,L,D", [(2, 250, 1536), (3, 7, 20), (1, 5, 64)])
def test_gpu_split_modulation_gradients_equal_unbind_bit_for_bit(backend, dtype, B, L, D):
    # on the GPU too: the vectorised and the scalar kernel paths, and the per-sample parts' sums over L read from the
    # buffer's strided slots
    if backend not in ops.available_backends("gated_residual_adaln", torch.device("cuda")):
        pytest.skip(f"{backend} backend not available")
    on, on_stacks = chain_grads(backend, B, L, D, dtype, buffer=True, device="cuda")
    off, off_stacks = chain_grads(backend, B, L, D, dtype, buffer=False, device="cuda")
    for i, (a, b) in enumerate(zip(on, off)):
        assert torch.equal(a, b), i
    assert big_stacks(on_stacks, B, L, D) == [] and len(big_stacks(off_stacks, B, L, D)) == 3


def test_split_modulation_empty_and_without_gradient():
    for B, L in ((0, 4), (2, 0)):
        on, _ = chain_grads("cpu", B, L, 8, buffer=True)
        off, _ = chain_grads("cpu", B, L, 8, buffer=False)
        assert all(torch.equal(a, b) for a, b in zip(on, off))
    mod = torch.randn(2, 3, 6, 4)
    parts = ops.split_modulation(mod)                       # no gradient (sampling): unbind's views
    assert len(parts) == 6 and all(p.grad_fn is None and p.data_ptr() == mod[:, :, k].data_ptr()
                                   for k, p in enumerate(parts))
    with pytest.raises(ValueError, match=r"\[B, L, n, D\]"):
        ops.split_modulation(torch.randn(2, 3, 4))


def test_split_modulation_default_is_per_device(monkeypatch):
    """On by default where the strided gradient outputs have run (the CPU), off elsewhere until measured; the switch
    overrides either way, and None restores the device's default."""
    from omni2sound.ops import adaln as mod_adaln

    def uses_buffer():
        return type(ops.split_modulation(torch.randn(1, 2, 6, 4, requires_grad=True))[0].grad_fn) is \
            mod_adaln._SplitModulation._backward_cls

    assert mod_adaln.BUFFER_BY_DEFAULT == ("cpu",) and uses_buffer()
    monkeypatch.setattr(mod_adaln, "BUFFER_BY_DEFAULT", ())              # as on a GPU today
    assert not uses_buffer()
    with ops.modulation_grad_buffer(True):
        assert uses_buffer()
        with ops.modulation_grad_buffer(None):
            assert not uses_buffer()
    with ops.modulation_grad_buffer(False):
        monkeypatch.setattr(mod_adaln, "BUFFER_BY_DEFAULT", ("cpu",))
        assert not uses_buffer()


def _hook_slot(tok):
    tok[0][3].register_hook(lambda g: g * 1.0)              # a new tensor: not the buffer's slot
    return tok


def _reuse_slot(tok):
    tok[1] = list(tok[1])
    tok[1][5] = tok[1][2]                                   # one slice, two consumers (their sum: a new tensor)
    return tok


def _per_sample_split(tok):
    return [tok[0], tuple(t[:, :1] for t in tok[1]), tok[2]]   # views of the split slices: not its outputs


@pytest.mark.parametrize("edit,twice,stacked", [
    (_hook_slot, False, 1), (_reuse_slot, False, 1), (_per_sample_split, False, 1), (None, True, 0)])
def test_split_modulation_stacks_gradients_that_are_not_in_the_buffer(edit, twice, stacked):
    # hooks, a slice with two consumers, views of the slices, a second backward through the retained graph: the
    # gradients are right (as unbind's, bit for bit) and stacked where they did not come from the buffer
    B, L, D = 2, 5, 16
    on, on_stacks = chain_grads("cpu", B, L, D, buffer=True, edit=edit, twice=twice)
    off, off_stacks = chain_grads("cpu", B, L, D, buffer=False, edit=edit, twice=twice)
    for i, (a, b) in enumerate(zip(on, off)):
        assert torch.equal(a, b), i
    assert len(big_stacks(on_stacks, B, L, D)) == stacked
    assert len(big_stacks(off_stacks, B, L, D)) == 3 * (2 if twice else 1)


@pytest.mark.parametrize("gated", [False, True])
def test_split_modulation_of_a_per_sample_modulation_reduces_into_no_slot(gated):
    # slices [B, 1, D] of a split [B, 1, n, D] beside x [B, L, D]: the backward's per-token gradients do not fit a
    # slot; each slice's gradient is their sum over L, as unbind's (bit for bit)
    B, L, D = 2, 5, 8
    mod0, x0, h, dy = torch.randn(B, 1, 6, D), torch.randn(B, L, D), torch.randn(B, L, D), torch.randn(B, L, D)
    grads = []
    for buffer in (True, False):
        mod, x = mod0.clone().requires_grad_(), x0.clone().requires_grad_()
        with ops.use_backend(adaln="cpu"), ops.modulation_grad_buffer(buffer):
            tok = ops.split_modulation(mod)
            if gated:
                x2, y = ops.gated_residual_adaln(x, h, tok[0], tok[1], tok[2])
                y = y + x2
            else:
                y = ops.adaln_modulate(x, tok[1], tok[2])
            (y * dy).sum().backward()
        grads.append((mod.grad, x.grad))
    for a, b in zip(*grads):
        assert a.shape == b.shape and torch.equal(a, b)


def test_split_modulation_zero_fills_unused_slices_in_the_buffer():
    B, L, D = 2, 4, 8
    mod = torch.randn(B, L, 6, D, requires_grad=True)
    tok = ops.split_modulation(mod)
    x, h = torch.randn(B, L, D), torch.randn(B, L, D)
    with ops.use_backend(adaln="cpu"), StackShapes() as stacks:
        x2, y = ops.gated_residual_adaln(x, h, tok[2], tok[3], tok[4])          # slices 0, 1 and 5: no gradient
        (x2.sum() + (y * y).sum()).backward()
    assert stacks.shapes == []
    assert (mod.grad[:, :, [0, 1, 5]] == 0).all() and (mod.grad[:, :, 2:5] != 0).any()


def test_split_modulation_compiles_fullgraph_as_unbind():
    # torch.compile sees a plain unbind (its backward: a stack inside the compiled graph); same values as eager
    torch._dynamo.reset()
    B, L, D = 2, 5, 16
    lin = torch.nn.Linear(D, 6 * D)
    s, x, h = torch.randn(B, L, D), torch.randn(B, L, D), torch.randn(B, L, D)

    def fn(s):
        tok = ops.split_modulation(lin(s).view(B, L, 6, D))
        x2, y = ops.gated_residual_adaln(x, h, tok[2], tok[3], tok[4])
        return (x2 * y).sum() + ops.adaln_modulate(y, tok[0], tok[1]).sum() + tok[5].sum()

    with ops.use_backend(adaln="cpu"):
        fn(s).backward()
        want = [p.grad.clone() for p in lin.parameters()]
        lin.zero_grad()
        torch.compile(fn, fullgraph=True)(s).backward()
    for p, w in zip(lin.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-5)


class TinyDiTBlock(torch.nn.Module):
    """The AdaLN chain of one DiT block (attention replaced by a linear map to keep compile quick)."""

    def __init__(self, D):
        super().__init__()
        self.mix = torch.nn.Linear(D, D)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(D, 2 * D), torch.nn.GELU(), torch.nn.Linear(2 * D, D))
        self.mod = torch.nn.Linear(D, 6 * D)

    def forward(self, x, c):  # x [B, L, D], c [B, L, D] per-token condition
        sh1, sc1, g1, sh2, sc2, g2 = self.mod(c).chunk(6, dim=-1)
        y = ops.adaln_modulate(x, sh1, sc1)
        x, y = ops.gated_residual_adaln(x, self.mix(y), g1, sh2, sc2)
        return x + g2 * self.mlp(y)


def test_block_compiles_fullgraph_and_matches_eager():
    torch._dynamo.reset()
    block = TinyDiTBlock(32)
    x, c = torch.randn(2, 9, 32), torch.randn(2, 9, 32)
    with ops.use_backend("cpu"):
        eager = block(x, c)
        compiled = torch.compile(block, fullgraph=True)(x, c)
        xg = x.clone().requires_grad_()
        torch.compile(block, fullgraph=True)(xg, c).sum().backward()
    xe = x.clone().requires_grad_()
    with ops.use_backend("reference"):
        ref = block(xe, c)
    ref.sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eager, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xg.grad, xe.grad, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# CUDA: compiled here, run on a GPU
# --------------------------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_sources_compile(tmp_path):
    if _native.lib() is not None and _native.lib().built_with_cuda():
        pytest.skip("the installed extension was built with these CUDA sources already")
    import pybind11

    for src in sorted((ROOT / "csrc").glob("*.cu")):
        cmd = ["nvcc", "-std=c++17", "-O1", "-gencode=arch=compute_90a,code=sm_90a", f"-I{ROOT / 'csrc'}",
               f"-I{pybind11.get_include()}", "-c", str(src), "-o", str(tmp_path / (src.stem + ".o"))]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{src.name} failed to compile:\n{res.stderr[-3000:]}"


GPU_BACKENDS = ["cuda", "triton"]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("B,L,D", SHAPES + [(2, 250, 1536), (1, 3, 4096)])
@pytest.mark.parametrize("per_token", [False, True])
def test_gpu_fp32(backend, B, L, D, per_token):
    if backend not in ops.available_backends("gated_residual_adaln", torch.device("cuda")):
        pytest.fail(f"{backend} backend not available on this GPU machine")
    inputs = make_inputs(B, L, D, per_token, device="cuda")
    (x2, y), grads = run(backend, *inputs, 1e-6)
    (x2r, yr), gref = run_ref64(*[None if t is None else t.cpu() for t in inputs], 1e-6)
    assert rel_err(y.cpu(), yr) < 2e-5 and rel_err(x2.cpu(), x2r) < 1e-6
    for g, gr in zip(grads, gref):
        assert rel_err(g.cpu(), gr) < 1e-4


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_token", [False, True])
def test_gpu_low_precision_2x_rule(backend, dtype, per_token):
    inputs = make_inputs(2, 250, 1536, per_token, dtype=dtype, device="cuda")
    (x2, y), grads = run(backend, *inputs, 1e-6)
    cpu = [None if t is None else t.cpu() for t in inputs]
    (x2p, yp), gplain = run_ref64(*cpu, 1e-6, plain=True)
    (x2r, yr), gref = run_ref64(*cpu, 1e-6)
    err = lambda a, b: (a.cpu().double() - b.double()).abs().max().item()  # noqa: E731
    assert err(y, yr) <= 2 * err(yp, yr) + half_ulp(yr, dtype) + 1e-6
    assert err(x2, x2r) <= 2 * err(x2p, x2r) + half_ulp(x2r, dtype) + 1e-6
    for g, gp, gr in zip(grads, gplain, gref):
        assert err(g, gr) <= 2 * err(gp, gr) + half_ulp(gr, dtype) + 1e-6 * gr.abs().max().item()


@pytest.mark.cuda
def test_gpu_unaligned_falls_back_to_scalar_path():
    # An odd offset breaks 16-byte alignment: the scalar kernel must take over and stay right.
    buf = torch.randn(2 * 5 * 64 + 1, device="cuda", dtype=torch.bfloat16)
    x = buf[1:].view(2, 5, 64)
    _, h, gate, shift, scale = make_inputs(2, 5, 64, True, dtype=torch.bfloat16, device="cuda")
    with ops.use_backend("cuda"):
        x2, y = ops.gated_residual_adaln(x, h, gate, shift, scale)
    x2r, yr = ops.gated_residual_adaln_reference(x, h, gate, shift, scale)
    torch.testing.assert_close(y, yr, rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
def test_gpu_cuda_graph_capture():
    x, h, gate, shift, scale = make_inputs(2, 250, 1536, True, dtype=torch.bfloat16, device="cuda")
    with ops.use_backend("cuda"):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            ops.gated_residual_adaln(x, h, gate, shift, scale)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            x2, y = ops.gated_residual_adaln(x, h, gate, shift, scale)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
    x2r, yr = ops.gated_residual_adaln_reference(x, h, gate, shift, scale)
    torch.testing.assert_close(y, yr, rtol=2e-2, atol=2e-2)


LOWP_PAIRS = [(b, dt) for b in CPU_BACKENDS if b != "reference" for dt in (torch.float16, torch.bfloat16)
              if not (b == "triton" and dt == torch.bfloat16)]


@pytest.mark.parametrize("backend,dtype", LOWP_PAIRS)
def test_pair_low_precision_2x_rule(backend, dtype):
    # the plain PyTorch baseline in the same precision adds the parts in that precision, as the model did
    inputs = make_pairs(2, 7, 256, True, dtype=dtype, seed=3)
    (x2, y), grads = run_pairs(backend, *inputs, 1e-6)
    (x2p, yp), gplain = run_pairs("plain", *inputs, 1e-6)
    (x2r, yr), gref = run_pairs(None, *inputs, 1e-6, double=True)
    err = lambda a, b: (a.double() - b.double()).abs().max().item()  # noqa: E731
    assert err(y, yr) <= 2 * err(yp, yr) + half_ulp(yr, dtype) + 1e-6
    assert err(x2, x2r) <= 2 * err(x2p, x2r) + half_ulp(x2r, dtype) + 1e-6
    for gg, gp, gr in zip(grads, gplain, gref):
        assert err(gg, gr) <= 2 * err(gp, gr) + half_ulp(gr, dtype) + 1e-6 * gr.abs().max().item()


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_gpu_pair_modulation(backend, dtype, gated, seed):
    inputs = make_pairs(2, 250, 1536, gated, dtype=dtype, device="cuda", seed=seed)
    (x2, y), grads = run_pairs(backend, *inputs, 1e-6)
    cpu = [None if t is None else (tuple(p.cpu() for p in t) if isinstance(t, tuple) else t.cpu()) for t in inputs]
    (x2r, yr), gref = run_pairs(None, *cpu, 1e-6, double=True)
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    assert rel_err(y.cpu(), yr) < tol
    if gated:
        assert rel_err(x2.cpu(), x2r) < max(tol, 1e-6)
    for g, gr in zip(grads, gref):
        assert rel_err(g.cpu(), gr) < (1e-4 if dtype == torch.float32 else 3e-2)
