"""snake and snake_residual: every backend on this machine against a float64 reference, forward and every grad."""
import importlib

import pytest
import torch
from lowp import half_ulp

from omni2sound import ops

CPU_BACKENDS = ops.available_backends("snake_residual", torch.device("cpu"))
NATIVE = [b for b in CPU_BACKENDS if b != "reference"]


def test_cpu_backends_present():
    assert "cpu" in CPU_BACKENDS, "omni2sound._C was not built with the snake kernels: run tools/dev_build.sh"


# --------------------------------------------------------------------------------------------------
# float64 reference and helpers
# --------------------------------------------------------------------------------------------------

def make_inputs(B, C, T, dtype=torch.float32, magnitude=2.0, device="cpu"):
    x = (magnitude * torch.randn(B, C, T)).to(dtype)
    res = torch.randn(B, C, T).to(dtype)
    alpha = (0.3 + 2.0 * torch.rand(C)).to(dtype)      # positive, as exp(log_alpha) in the VAE
    beta = (0.2 + 2.0 * torch.rand(C)).to(dtype)
    return tuple(t.to(device) for t in (x, alpha, beta, res))


def formula(x, alpha, beta, res, eps):
    """The plain formula in the inputs' own precision (the baseline of the 2x rule when fed low precision)."""
    s = x if res is None else x + res
    a, b = alpha.view(1, -1, 1), beta.view(1, -1, 1)
    return s, s + 1.0 / (b + eps) * torch.sin(a * s) ** 2


def run(fn, x, alpha, beta, res, eps=1e-9, residual=True):
    """Forward + backward with fixed random upstream grads on both outputs; returns (outputs, input grads)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, alpha, beta, res)]
    s, y = fn(*leaves[:3], leaves[3] if residual else None, eps)
    # Upstream grads are rounded to the inputs' dtype first, so the float64 reference sees the same values.
    g, dt = torch.Generator().manual_seed(11), x.dtype
    dy = torch.randn(y.shape, generator=g).to(dt).to(y)
    loss = (y.double() * dy.double()).sum()
    if residual:
        ds = torch.randn(s.shape, generator=g).to(dt).to(s)
        loss = loss + (s.double() * ds.double()).sum()
    loss.backward()
    grads = [t.grad for t in leaves] if residual else [t.grad for t in leaves[:3]]
    return (s if residual else None, y), grads


def op_with(backend):
    def fn(x, alpha, beta, res, eps):
        with ops.use_backend(backend):
            if res is None:
                return None, ops.snake(x, alpha, beta, eps)
            return ops.snake_residual(x, alpha, beta, res, eps)
    return fn


def ref64(x, alpha, beta, res, eps):
    return formula(x.double(), alpha.double(), beta.double(), None if res is None else res.double(), eps)


def err(a, b):
    return (a.double() - b.double()).abs().max().item()



# --------------------------------------------------------------------------------------------------
# fp32: every backend, odd shapes, both ops
# --------------------------------------------------------------------------------------------------

SHAPES = [(1, 1, 1), (2, 3, 37), (3, 5, 1025), (1, 7, 4099)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("residual", [False, True])
def test_fp32_matches_float64(backend, shape, residual):
    inputs = make_inputs(*shape)
    (s, y), grads = run(op_with(backend), *inputs, residual=residual)
    (sr, yr), gref = run(ref64, *inputs, residual=residual)
    assert y.dtype == torch.float32 and y.shape == inputs[0].shape
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)
    if residual:
        torch.testing.assert_close(s.double(), sr, rtol=1e-6, atol=1e-6)
    names = ("x", "alpha", "beta", "residual")
    for name, g, gr in zip(names, grads, gref):
        assert g is not None and g.shape == gr.shape, name
        # alpha/beta grads sum B*T terms: scale the tolerance by the size of the sum
        tol = 1e-5 * (1 + gr.abs().max().item()) * (1 if name in ("x", "residual") else shape[0] * shape[2] ** 0.5)
        assert err(g, gr) <= tol, (name, err(g, gr), tol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_arguments(backend):
    # |alpha * x| up to ~200: the C++ range reduction must stay accurate well beyond [-pi, pi]
    x, alpha, beta, res = make_inputs(2, 4, 300, magnitude=50.0)
    (s, y), grads = run(op_with(backend), x, alpha, beta, res)
    (sr, yr), gref = run(ref64, x, alpha, beta, res)
    assert err(y, yr) <= 1e-4 * (1 + yr.abs().max().item())
    assert err(grads[0], gref[0]) <= 1e-3 * (1 + gref[0].abs().max().item())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty(backend):
    for shape in [(0, 3, 5), (2, 3, 0), (2, 0, 5)]:
        x, alpha, beta, res = make_inputs(*shape)
        (s, y), grads = run(op_with(backend), x, alpha, beta, res)
        assert y.shape == shape and s.shape == shape
        assert grads[1].shape == alpha.shape and float(grads[1].abs().sum()) == 0.0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_and_param_shapes(backend):
    x = torch.randn(2, 12, 9).transpose(1, 2)               # [2, 9, 12], strided
    alpha = (torch.rand(1, 9, 1) + 0.5)
    beta = (torch.rand(9) + 0.5)
    res = torch.randn(2, 9, 12)
    with ops.use_backend(backend):
        s, y = ops.snake_residual(x, alpha, beta, res)
    sr, yr = ref64(x, alpha.reshape(-1), beta, res, 1e-9)
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)


CL = [(b, dt) for b in NATIVE for dt in (torch.float32, torch.bfloat16 if b == "cpu" else torch.float16)]


@pytest.mark.parametrize("backend,dtype", CL)
@pytest.mark.parametrize("C", [24, 300])
def test_channels_last_layout(backend, dtype, C):
    """The C++ and Triton forward kernels read and write [B, C, T] stored as [B, T, C] (the layout of a decoder whose
    convs run channels-last: the VAE's CPU decode, a GPU NHWC decode) in place; C = 300 spans several channel
    tiles of the Triton kernel."""
    x4 = torch.randn(2, C, 1, 37).to(dtype).contiguous(memory_format=torch.channels_last)
    x = x4.squeeze(2)                                          # [2, C, 37], strides (37 C, 1, C)
    res = torch.randn(2, C, 37).to(dtype)                      # contiguous: converted to x's layout
    alpha, beta = torch.rand(C) + 0.5, torch.rand(C) + 0.5
    with ops.use_backend(backend):
        s, y = ops.snake_residual(x, alpha, beta, res)
        y1 = ops.snake(x, alpha, beta)
    assert y.stride() == x.stride() and s.stride() == x.stride() and y1.stride() == x.stride()
    sr, yr = ref64(x, alpha, beta, res, 1e-9)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), yr, rtol=tol, atol=tol)
    torch.testing.assert_close(y1.double(), ref64(x, alpha, beta, None, 1e-9)[1], rtol=tol, atol=tol)
    # gradients through the channels-last input match the contiguous run
    xg = x.float().detach().requires_grad_()
    assert xg.stride() == x.stride()           # the backward sees the channels-last input
    with ops.use_backend(backend):
        ops.snake(xg, alpha, beta).sum().backward()
    xc = x.float().contiguous().requires_grad_()
    with ops.use_backend("reference"):
        ops.snake(xc, alpha, beta).sum().backward()
    torch.testing.assert_close(xg.grad, xc.grad, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# low precision: flash-attn's 2x rule against the plain formula run in the same precision
# --------------------------------------------------------------------------------------------------

LOWP = [(b, dt) for b in NATIVE for dt in (torch.float16, torch.bfloat16)
        if not (b == "triton" and dt == torch.bfloat16)]  # the interpreter has no bf16 arithmetic


@pytest.mark.parametrize("backend,dtype", LOWP)
@pytest.mark.parametrize("residual", [False, True])
def test_low_precision_2x_rule(backend, dtype, residual):
    inputs = make_inputs(2, 6, 777, dtype=dtype)
    (s, y), grads = run(op_with(backend), *inputs, residual=residual)
    (sp, yp), gplain = run(formula, *inputs, residual=residual)
    (sr, yr), gref = run(ref64, *inputs, residual=residual)
    slack = 1e-6
    assert y.dtype == dtype
    assert err(y, yr) <= 2 * err(yp, yr) + half_ulp(yr, dtype) + slack
    if residual:
        assert err(s, sr) <= 2 * err(sp, sr) + half_ulp(sr, dtype) + slack
    for name, g, gp, gr in zip(("x", "alpha", "beta", "residual"), grads, gplain, gref):
        assert g.dtype == dtype, name
        assert err(g, gr) <= 2 * err(gp, gr) + half_ulp(gr, dtype) + slack * (1 + gr.abs().max().item()), name


# --------------------------------------------------------------------------------------------------
# errors, dispatch, opcheck, compile
# --------------------------------------------------------------------------------------------------

def test_bad_inputs_give_clear_errors():
    x = torch.randn(2, 4, 8)
    a = torch.ones(4)
    with pytest.raises(ValueError, match=r"x must be \[B, C, T\]"):
        ops.snake(torch.randn(4, 8), a, a)
    with pytest.raises(ValueError, match=r"alpha must be per channel \[C=4\]"):
        ops.snake(x, torch.ones(3), a)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        ops.snake_residual(x, a, a, torch.randn(2, 4, 7))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ops.snake(x.double(), a, a)
    with pytest.raises(TypeError, match="residual must match"):
        ops.snake_residual(x, a, a, x.half())
    with pytest.raises(RuntimeError, match="cannot run on cpu"):
        with ops.use_backend("cuda"):
            ops.snake(x, a, a)


def test_dispatch_default_and_family_override(monkeypatch):
    monkeypatch.delenv("OMNI2SOUND_BACKEND", raising=False)
    cpu = torch.device("cpu")
    assert ops.select_backend("snake", cpu) == "cpu"
    with ops.use_backend(snake="reference"):
        assert ops.select_backend("snake_residual", cpu) == "reference"
        assert ops.select_backend("snake", cpu) == "reference"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    mod = importlib.import_module("omni2sound.ops.snake")   # the package re-exports the function `snake`
    x, alpha, beta, res = make_inputs(2, 3, 17)
    leaf = lambda *ts: [t.detach().clone().requires_grad_() for t in ts]  # noqa: E731
    torch.library.opcheck(mod._snake_op, (*leaf(x, alpha, beta), 1e-9, backend))
    torch.library.opcheck(mod._snake_residual_op, (*leaf(x, alpha, beta, res), 1e-9, backend))
    torch.library.opcheck(mod._snake_backward_op, (torch.randn_like(x), x, alpha, beta, 1e-9, backend))
    torch.library.opcheck(mod._snake_residual_backward_op,
                          (torch.randn_like(x), torch.randn_like(x), x, res, alpha, beta, 1e-9, backend))


def test_compiles_fullgraph_and_matches_reference():
    torch._dynamo.reset()
    conv = torch.nn.Conv1d(4, 4, 3, padding=1)
    alpha, beta = torch.rand(4) + 0.5, torch.rand(4) + 0.5

    def unit(x):
        s, y = ops.snake_residual(conv(ops.snake(x, alpha, beta)), alpha, beta, x)
        return s + y

    x = torch.randn(2, 4, 33)
    with ops.use_backend("cpu"):
        xg = x.clone().requires_grad_()
        out = torch.compile(unit, fullgraph=True)(xg)
        out.sum().backward()
    with ops.use_backend("reference"):
        xr = x.clone().requires_grad_()
        ref = unit(xr)
        ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# GPU (the lead's run)
# --------------------------------------------------------------------------------------------------

GPU_BACKENDS = ["cuda", "triton"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 1029), (2, 64, 16001)])
def test_gpu_fp32(backend, shape):
    inputs = make_inputs(*shape, device="cuda")
    (s, y), grads = run(op_with(backend), *inputs)
    (sr, yr), gref = run(ref64, *inputs)
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)
    for name, g, gr in zip(("x", "alpha", "beta", "residual"), grads, gref):
        tol = 1e-5 * (1 + gr.abs().max().item()) * (1 if name in ("x", "residual") else shape[0] * shape[2] ** 0.5)
        assert err(g, gr) <= tol, (name, err(g, gr), tol)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_low_precision_2x_rule(backend, dtype):
    inputs = make_inputs(2, 32, 4001, dtype=dtype, device="cuda")
    (s, y), grads = run(op_with(backend), *inputs)
    (sp, yp), gplain = run(formula, *inputs)
    (sr, yr), gref = run(ref64, *inputs)
    assert err(y, yr) <= 2 * err(yp, yr) + half_ulp(yr, dtype) + 1e-6
    for name, g, gp, gr in zip(("x", "alpha", "beta", "residual"), grads, gplain, gref):
        assert err(g, gr) <= 2 * err(gp, gr) + half_ulp(gr, dtype) + 1e-6 * (1 + gr.abs().max().item()), name


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_cuda_graph_capture():
    x, alpha, beta, res = make_inputs(1, 64, 16000, dtype=torch.bfloat16, device="cuda")
    with ops.use_backend("cuda"):
        ops.snake_residual(x, alpha, beta, res)                  # warm up outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            s, y = ops.snake_residual(x, alpha, beta, res)
    graph.replay()
    torch.cuda.synchronize()
    sr, yr = ref64(x, alpha, beta, res, 1e-9)
    torch.testing.assert_close(y.double(), yr, rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_triton_channels_last(dtype):
    """The Triton forward in the layout of a channels-last (NHWC) GPU decode: written in place, equal to the fp64
    reference; C = 300 spans several channel tiles."""
    x = torch.randn(2, 300, 1, 1001, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last).squeeze(2)
    res = torch.randn_like(x)
    alpha, beta = torch.rand(300, device="cuda") + 0.5, torch.rand(300, device="cuda") + 0.5
    with ops.use_backend(snake="triton"):
        s, y = ops.snake_residual(x, alpha, beta, res)
    assert y.stride() == x.stride() and s.stride() == x.stride()
    sr, yr = ref64(x, alpha, beta, res, 1e-9)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), yr, rtol=tol, atol=tol)
    torch.testing.assert_close(s.double(), sr, rtol=tol, atol=tol)
