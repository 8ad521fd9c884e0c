"""bias_gelu / linear_gelu: every backend on this machine against a float64 reference, forward and every grad; with
and without bias, odd shapes, empty, large magnitudes, NaN, in place, the 2x rule, determinism, opcheck, compile,
the model's MLP."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from lowp import half_ulp

from omni2sound import ops

CPU_BACKENDS = ops.available_backends("bias_gelu", torch.device("cpu"))
NATIVE = [b for b in CPU_BACKENDS if b != "reference"]


def test_cpu_backends_present():
    assert "cpu" in CPU_BACKENDS, "omni2sound._C was not built with the bias_gelu kernels: run tools/dev_build.sh"


def ref64(x, bias):
    z = x.double() + (0 if bias is None else bias.double())
    return 0.5 * z * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (z + 0.044715 * z ** 3)))


def op_with(backend):
    def fn(x, bias):
        with ops.use_backend(bias_gelu=backend):
            return ops.bias_gelu(x, bias)
    return fn


def run(fn, x, bias, dy_dtype=None):
    """Forward + backward with a fixed random upstream grad; returns (y, dx, dbias or None).

    dy is rounded to ``dy_dtype`` (default x's): a float64 reference of a low-precision run gets the same rounded dy
    the kernel got, so its error measures the kernel, not the rounding of dy both runs share."""
    xl = x.detach().clone().requires_grad_()
    bl = None if bias is None else bias.detach().clone().requires_grad_()
    y = fn(xl, bl)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(dy_dtype or x.dtype).to(x)
    (y.double() * dy.double()).sum().backward()
    return y, xl.grad, (None if bl is None else bl.grad)


def err(a, b):
    return (a.double() - b.double()).abs().max().item()



# --------------------------------------------------------------------------------------------------
# fp32: every backend, odd shapes, with and without bias
# --------------------------------------------------------------------------------------------------

SHAPES = [(1,), (7,), (3, 5), (2, 9, 33), (130, 67), (65, 3, 129)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_fp32_matches_float64(backend, shape, with_bias):
    x = 3 * torch.randn(shape)
    bias = torch.randn(shape[-1]) if with_bias else None
    y, dx, db = run(op_with(backend), x, bias)
    yr, dxr, dbr = run(ref64, x.double(), None if bias is None else bias.double())
    assert y.shape == x.shape and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), yr, rtol=2e-6, atol=1e-6)
    # aten's backward (the reference backend) computes 1 - s by cancellation: ~1e-6 absolute error near |z| ~ 4
    atol = 2e-6 if backend != "reference" else 2e-5
    torch.testing.assert_close(dx.double(), dxr, rtol=2e-6, atol=atol)
    if with_bias:
        rows = x.numel() // shape[-1]
        torch.testing.assert_close(db.double(), dbr, rtol=1e-5, atol=atol * rows ** 0.5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tails_and_large_magnitudes(backend):
    # far tails: gelu(z) -> z for large z, -> -0 for very negative z; the exp argument is clamped there, so this
    # checks the clamp gives the right limits (and no inf / NaN in the backward's e * s)
    x = torch.cat([torch.linspace(-60, 60, 1201), torch.tensor([-1e4, -100.0, 100.0, 1e4, 0.0, -0.0])])[None]
    y, dx, _ = run(op_with(backend), x, None)
    yr, dxr, _ = run(ref64, x.double(), None)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    torch.testing.assert_close(y.double(), yr, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(dx.double(), dxr, rtol=2e-6, atol=1e-6 if backend != "reference" else 2e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_propagates(backend):
    x = torch.randn(4, 16)
    x[1, 3] = float("nan")
    y = op_with(backend)(x, torch.randn(16))
    assert torch.isnan(y[1, 3]) and torch.isfinite(y[torch.arange(4) != 1]).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty(backend):
    x, bias = torch.randn(0, 5), torch.randn(5)
    y, dx, db = run(op_with(backend), x, bias)
    assert y.shape == (0, 5) and dx.shape == (0, 5) and (db == 0).all()


@pytest.mark.parametrize("backend", NATIVE)
def test_dbias_is_deterministic_across_thread_counts(backend):
    x, bias, dy = torch.randn(1000, 96), torch.randn(96), torch.randn(1000, 96)
    out = []
    for threads in (1, 2):
        n = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            b = bias.clone().requires_grad_()
            with ops.use_backend(bias_gelu=backend):
                ops.bias_gelu(x, b).backward(dy)
            out.append(b.grad)
        finally:
            torch.set_num_threads(n)
    assert torch.equal(out[0], out[1])


# --------------------------------------------------------------------------------------------------
# in place
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inplace_equals_out_of_place(backend):
    x, bias = torch.randn(37, 50), torch.randn(50)
    with ops.use_backend(bias_gelu=backend):
        want = ops.bias_gelu(x, bias)
        buf = x.clone()
        got = ops.bias_gelu(buf, bias, inplace=True)
    assert got.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_inplace_refuses_when_a_gradient_is_needed():
    x = torch.randn(3, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="cannot be used when a gradient is needed"):
        ops.bias_gelu(x * 1, torch.randn(8), inplace=True)
    with pytest.raises(ValueError, match="contiguous"):
        with torch.no_grad():
            ops.bias_gelu(torch.randn(8, 3).t(), None, inplace=True)


# --------------------------------------------------------------------------------------------------
# low precision: flash-attn's 2x rule against aten's GELU in the same precision
# --------------------------------------------------------------------------------------------------

LOWP = [(b, dt) for b in NATIVE for dt in (torch.float16, torch.bfloat16)
        if not (b == "triton" and dt == torch.bfloat16)]  # the interpreter has no bf16 arithmetic


@pytest.mark.parametrize("backend,dtype", LOWP)
def test_low_precision_2x_rule(backend, dtype):
    x, bias = (3 * torch.randn(67, 130)).to(dtype), torch.randn(130).to(dtype)
    y, dx, db = run(op_with(backend), x, bias)
    yp, dxp, dbp = run(lambda a, b: ops.bias_gelu_reference(a, b), x, bias)      # plain aten in `dtype`
    yr, dxr, dbr = run(ref64, x.double(), bias.double(), dy_dtype=dtype)
    assert y.dtype == dtype and dx.dtype == dtype and db.dtype == dtype
    for got, plain, ref in ((y, yp, yr), (dx, dxp, dxr), (db, dbp, dbr)):
        assert err(got, ref) <= 2 * err(plain, ref) + half_ulp(ref, dtype) + 1e-6 * (1 + ref.abs().max().item())


# --------------------------------------------------------------------------------------------------
# linear_gelu: the MLP's first layer
# --------------------------------------------------------------------------------------------------

def test_linear_gelu_reference_is_the_plain_module():
    lin = torch.nn.Linear(24, 40)
    mod = torch.nn.Sequential(lin, torch.nn.GELU(approximate="tanh"))
    y = torch.randn(2, 7, 24)
    with ops.use_backend(bias_gelu="reference"):
        torch.testing.assert_close(ops.linear_gelu(y, lin.weight, lin.bias), mod(y), rtol=0, atol=0)


@pytest.mark.parametrize("backend", NATIVE)
def test_linear_gelu_matches_reference_with_grads_and_buffer(backend):
    lin = torch.nn.Linear(24, 40)
    y = torch.randn(2, 7, 24, requires_grad=True)
    want = ops.linear_gelu_reference(y, lin.weight, lin.bias)
    gw = torch.autograd.grad(want.pow(2).sum(), (y, lin.weight, lin.bias))
    buf = torch.full((14, 40), float("nan"))
    # the buffer is written by aten's GEMM (ops.linear's reference backend); oneDNN's returns a new tensor
    with ops.use_backend(bias_gelu=backend, linear="reference"):
        got = ops.linear_gelu(y, lin.weight, lin.bias, out=buf)      # grad needed: the buffer is not used
        gg = torch.autograd.grad(got.pow(2).sum(), (y, lin.weight, lin.bias))
        assert torch.isnan(buf).all()
        with torch.no_grad():
            inf = ops.linear_gelu(y, lin.weight, lin.bias, out=buf)   # no grad: written into the buffer
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert inf.shape == (2, 7, 40) and inf.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(inf, want.detach(), rtol=1e-5, atol=1e-6)
    with torch.no_grad(), ops.use_backend(bias_gelu=backend):      # a buffer of the wrong shape is not used
        other = ops.linear_gelu(y, lin.weight, lin.bias, out=torch.empty(13, 40))
    torch.testing.assert_close(other, want.detach(), rtol=1e-5, atol=1e-6)
    for gemm in ops.available_backends("linear", y.device):              # every GEMM backend under the fused op
        with torch.no_grad(), ops.use_backend(bias_gelu=backend, linear=gemm):
            torch.testing.assert_close(ops.linear_gelu(y, lin.weight, lin.bias, out=torch.empty(14, 40)),
                                       want.detach(), rtol=1e-5, atol=1e-6)


def test_cublaslt_epilogue_is_cuda_only_and_its_call_is_addmm_activation():
    """The epilogue backend is not offered on the CPU, where aten's _addmm_activation applies the exact erf GELU (on
    CUDA tanh, as the model): its call (operands, transposed weight, bias cast, out buffer) is checked here against
    that CPU function, its values against the model's tanh GELU on the GPU (test_gpu_cublaslt_*)."""
    from omni2sound.ops.gelu import linear_gelu_epilogue

    assert "cublaslt" not in CPU_BACKENDS and "cublaslt" in ops.BACKENDS
    with pytest.raises(RuntimeError, match="cannot run on cpu"), ops.use_backend(bias_gelu="cublaslt"):
        ops.linear_gelu(torch.randn(3, 8), torch.randn(5, 8), torch.randn(5))
    lin = torch.nn.Linear(24, 40)
    y = torch.randn(2, 7, 24)
    with torch.no_grad():
        want = F.gelu(F.linear(y, lin.weight, lin.bias))                  # erf: aten's function on the CPU
        buf = torch.full((14, 40), float("nan"))
        got = linear_gelu_epilogue(y, lin.weight, lin.bias, out=buf)
        assert got.shape == (2, 7, 40) and got.data_ptr() == buf.data_ptr()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        other = linear_gelu_epilogue(y, lin.weight, lin.bias, out=torch.empty(13, 40))   # wrong shape: not used
        torch.testing.assert_close(other, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(linear_gelu_epilogue(y[:, :0], lin.weight, lin.bias), want[:, :0])


# --------------------------------------------------------------------------------------------------
# errors, dispatch, opcheck, compile
# --------------------------------------------------------------------------------------------------

def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match=r"bias must be \[N=8\]"):
        ops.bias_gelu(torch.randn(3, 8), torch.randn(7))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ops.bias_gelu(torch.randn(3, 8).double())
    with pytest.raises(ValueError, match="at least one dim"):
        ops.bias_gelu(torch.tensor(1.0))


def test_dispatch_defaults(monkeypatch):
    monkeypatch.delenv("OMNI2SOUND_BACKEND", raising=False)
    assert ops.select_backend("bias_gelu", torch.device("cpu")) == "cpu"
    monkeypatch.setenv("OMNI2SOUND_BACKEND", "bias_gelu=reference")
    assert ops.select_backend("bias_gelu", torch.device("cpu")) == "reference"


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck(backend, with_bias):
    mod = importlib.import_module("omni2sound.ops.gelu")
    x = torch.randn(5, 12)
    b = torch.randn(12) if with_bias else torch.empty(0)
    torch.library.opcheck(mod._bias_gelu_op, (x.clone().requires_grad_(), b.clone().requires_grad_(), backend))
    torch.library.opcheck(mod._bias_gelu_inplace_op, (x.clone(), b, backend))
    torch.library.opcheck(mod._bias_gelu_backward_op, (torch.randn(5, 12), x, b, backend))


def test_compiles_fullgraph_and_matches_reference():
    torch._dynamo.reset()
    lin1, lin2 = torch.nn.Linear(16, 48), torch.nn.Linear(48, 16)

    def mlp(x):
        return lin2(ops.linear_gelu(x, lin1.weight, lin1.bias))

    x = torch.randn(2, 9, 16)
    with ops.use_backend(bias_gelu="cpu"):
        out = torch.compile(mlp, fullgraph=True)(x)
        out.pow(2).sum().backward()
    grads = [p.grad.clone() for p in (lin1.weight, lin1.bias)]
    lin1.zero_grad()
    with ops.use_backend(bias_gelu="reference"):
        ref = mlp(x)
        ref.pow(2).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, p in zip(grads, (lin1.weight, lin1.bias)):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# GPU (the lead's run)
# --------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(1, 1), (500, 6144), (37, 1001)])
def test_gpu_triton_fp32(shape):
    x, bias = 3 * torch.randn(shape), torch.randn(shape[-1])
    y, dx, db = run(op_with("triton"), x.cuda(), bias.cuda())
    yr, dxr, dbr = run(ref64, x.double(), bias.double())
    torch.testing.assert_close(y.double().cpu(), yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.double().cpu(), dxr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db.double().cpu(), dbr, rtol=1e-5, atol=1e-5 * shape[0] ** 0.5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_triton_low_precision_2x_rule(dtype):
    x, bias = (3 * torch.randn(500, 6144)).to(dtype).cuda(), torch.randn(6144).to(dtype).cuda()
    y, dx, db = run(op_with("triton"), x, bias)
    yp, dxp, dbp = run(lambda a, b: ops.bias_gelu_reference(a, b), x, bias)
    yr, dxr, dbr = run(ref64, x.double(), bias.double(), dy_dtype=dtype)
    for got, plain, ref in ((y, yp, yr), (dx, dxp, dxr), (db, dbp, dbr)):
        assert err(got, ref) <= 2 * err(plain, ref) + half_ulp(ref, dtype) + 1e-6 * (1 + ref.abs().max().item())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_cuda_graph_capture():
    x, bias = torch.randn(500, 6144, device="cuda", dtype=torch.bfloat16), torch.randn(6144, device="cuda")
    with ops.use_backend(bias_gelu="triton"):
        ops.bias_gelu(x, bias)                           # warm up (compile) outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = ops.bias_gelu(x, bias)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y.float(), F.gelu(x.float() + bias, approximate="tanh"), rtol=2e-2, atol=2e-2)


def _linear_gelu_cublaslt(y, lin, out=None):
    with ops.use_backend(bias_gelu="cublaslt"):
        return ops.linear_gelu(y, lin.weight, lin.bias, out=out)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("M,K,N", [(1, 16, 16), (500, 1536, 6144), (37, 40, 1001), (0, 64, 128)])
def test_gpu_cublaslt_epilogue_fp32_is_the_tanh_gelu_layer(M, K, N):
    lin = torch.nn.Linear(K, N).cuda()
    y = torch.randn(M, K, device="cuda")
    with torch.no_grad():
        got = _linear_gelu_cublaslt(y, lin)
        want = ops.linear_gelu_reference(y.double(), lin.weight.double(), lin.bias.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * (1 + K ** 0.5 / 8))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_cublaslt_epilogue_low_precision_2x_rule_and_buffer(dtype):
    lin = torch.nn.Linear(1536, 6144).cuda().to(dtype)
    y = torch.randn(500, 1536, device="cuda", dtype=dtype)
    buf = torch.full((500, 6144), float("nan"), device="cuda", dtype=dtype)
    with torch.no_grad():
        got = _linear_gelu_cublaslt(y, lin, out=buf)
        plain = ops.linear_gelu_reference(y, lin.weight, lin.bias)
        ref = ops.linear_gelu_reference(y.double(), lin.weight.double(), lin.bias.double())
    assert got.data_ptr() == buf.data_ptr()
    assert err(got, ref) <= 2 * err(plain, ref) + half_ulp(ref, dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_cublaslt_refuses_a_gradient_and_captures_in_a_graph():
    lin = torch.nn.Linear(64, 256).cuda().to(torch.bfloat16)
    y = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="cannot take this call"):
        _linear_gelu_cublaslt(y.requires_grad_(), lin)
    y = y.detach()
    with torch.no_grad():
        _linear_gelu_cublaslt(y, lin)                            # warm-up (cuBLASLt's heuristics) outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _linear_gelu_cublaslt(y, lin)
        y.copy_(torch.randn_like(y))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, ops.linear_gelu_reference(y, lin.weight, lin.bias), rtol=2e-2, atol=2e-2)
