"""qk_norm_rope: every backend on this machine against a float64 reference, forward and every grad; strided
input (the q/k slice of a qkv projection), empty, odd shapes, large magnitudes, the 2x rule, opcheck, compile."""
import importlib

import pytest
import torch
from lowp import half_ulp

from omni2sound import ops
from omni2sound.model import rope_table

CPU_BACKENDS = ops.available_backends("qk_norm_rope", torch.device("cpu"))
NATIVE = [b for b in CPU_BACKENDS if b != "reference"]


def test_cpu_backends_present():
    assert "cpu" in CPU_BACKENDS, "omni2sound._C was not built with the qk_norm_rope kernels: run tools/dev_build.sh"


# --------------------------------------------------------------------------------------------------
# float64 reference and helpers
# --------------------------------------------------------------------------------------------------

def make_inputs(B, T, H, Dh, dtype=torch.float32, magnitude=1.0, device="cpu", strided=True):
    """qk as the model makes it: the [:, :, :2] slice of a [B, T, 3, H, Dh] projection (strided), unless not."""
    qkv = (magnitude * torch.randn(B, T, 3, H, Dh)).to(dtype)
    qk = qkv[:, :, :2] if strided else qkv[:, :, :2].contiguous()
    w = (1.0 + 0.3 * torch.randn(2, Dh)).to(dtype)
    cs = torch.view_as_real(rope_table(T, Dh, 10000.0, "cpu")).contiguous()
    return qk.to(device), w.to(device), cs.to(device)


def formula(qk, w, cs, eps):
    """The unfused chain in the inputs' own precision (the baseline of the 2x rule when fed low precision):
    RMSNorm in the input dtype, weight, then the rotation in the input dtype."""
    n = qk * torch.rsqrt(qk.pow(2).mean(-1, keepdim=True) + eps) * w[:, None, :]
    n = n.unflatten(-1, (-1, 2))
    c = cs[..., 0].to(qk.dtype)[None, :, None, None, :]
    s = cs[..., 1].to(qk.dtype)[None, :, None, None, :]
    return torch.stack([n[..., 0] * c - n[..., 1] * s, n[..., 0] * s + n[..., 1] * c], -1).flatten(-2)


def ref64(qk, w, cs, eps):
    return formula(qk.double(), w.double(), cs.double(), eps)


def op_with(backend):
    def fn(qk, w, cs, eps):
        with ops.use_backend(qk_norm_rope=backend):
            return ops.qk_norm_rope(qk, w, cs, eps)
    return fn


def run(fn, qk, w, cs, eps=1e-6, dy_dtype=None):
    """Forward + backward with a fixed random upstream grad; returns (output, [dqk, dw]).

    dy is rounded to ``dy_dtype`` (default qk's): a float64 reference of a low-precision run gets the same rounded dy
    the kernel got, so its error measures the kernel, not the rounding of dy both runs share."""
    qkv_leaf = qk.detach().clone().requires_grad_()
    w_leaf = w.detach().clone().requires_grad_()
    y = fn(qkv_leaf, w_leaf, cs, eps)
    g = torch.Generator().manual_seed(7)
    dy = torch.randn(y.shape, generator=g).to(dy_dtype or qk.dtype).to(y)
    (y.double() * dy.double()).sum().backward()
    return y, [qkv_leaf.grad, w_leaf.grad]


def run_strided(fn, qk, w, cs, eps=1e-6):
    """As run, but through the strided slice of a qkv leaf, as the model calls it (the grad lands in qkv)."""
    B, T, _, H, Dh = qk.shape
    qkv = torch.cat([qk, torch.zeros(B, T, 1, H, Dh, dtype=qk.dtype)], 2).detach().requires_grad_()
    w_leaf = w.detach().clone().requires_grad_()
    y = fn(qkv[:, :, :2], w_leaf, cs, eps)
    g = torch.Generator().manual_seed(7)
    dy = torch.randn(y.shape, generator=g).to(qk.dtype).to(y)
    (y.double() * dy.double()).sum().backward()
    return y, [qkv.grad[:, :, :2], w_leaf.grad], qkv.grad[:, :, 2]


def err(a, b):
    return (a.double() - b.double()).abs().max().item()



# --------------------------------------------------------------------------------------------------
# fp32: every backend, odd shapes
# --------------------------------------------------------------------------------------------------

SHAPES = [(1, 1, 1, 2), (2, 7, 3, 6), (3, 13, 2, 64), (1, 5, 5, 126)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_matches_float64(backend, shape):
    inputs = make_inputs(*shape)
    y, grads, dv = run_strided(op_with(backend), *inputs)
    yr, gref = run(ref64, *(t.double() for t in inputs))
    assert y.shape == inputs[0].shape and y.is_contiguous() and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)
    B, T = shape[:2]
    for name, g, gr in zip(("qk", "weight"), grads, gref):
        tol = 1e-5 * (1 + gr.abs().max().item()) * (1 if name == "qk" else (B * T * shape[2]) ** 0.5)
        assert err(g, gr) <= tol, (name, err(g, gr), tol)
    assert (dv == 0).all()                 # v's third of the projection gets no gradient from this op


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_contiguous_input_and_large_magnitude(backend):
    # the norm makes the output scale-free: 1e4-sized inputs give the same result as unit ones, no overflow
    qk, w, cs = make_inputs(2, 9, 2, 16, magnitude=1e4, strided=False)
    y, grads = run(op_with(backend), qk, w, cs)
    yr, gref = run(ref64, qk.double(), w.double(), cs.double())
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0].double(), gref[0], rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(grads[1].double(), gref[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rotation_is_relative_position(backend):
    """RoPE's point: q_t . k_s depends on t - s only. Same head vector at every frame -> constant diagonals."""
    B, T, H, Dh = 1, 11, 1, 8
    vec = torch.randn(Dh)
    qk = vec.expand(B, T, 2, H, Dh).contiguous()
    _, w, cs = make_inputs(B, T, H, Dh)
    with ops.use_backend(qk_norm_rope=backend):
        y = ops.qk_norm_rope(qk, w, cs)
    q, k = y[0, :, 0, 0], y[0, :, 1, 0]                       # [T, Dh]
    scores = q @ k.T
    for off in (-3, 0, 4):
        d = torch.diagonal(scores, off)
        torch.testing.assert_close(d, d[:1].expand_as(d), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty(backend):
    for shape in [(0, 5, 2, 8), (2, 0, 2, 8)]:
        qk, w, cs = make_inputs(*shape)
        y, grads = run(op_with(backend), qk, w, cs)
        assert y.shape == qk.shape
        assert grads[0].shape == qk.shape and (grads[1] == 0).all()


# --------------------------------------------------------------------------------------------------
# one group, no rotation: the cross-attention's q / k norm (head_rms_norm)
# --------------------------------------------------------------------------------------------------

def norm_formula(x, w, eps):
    """RMSNorm per head row in x's own precision (float64: the reference; low precision: the 2x rule's baseline)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def run_norm(fn, x, w, eps=1e-6, dy_dtype=None):
    """As run, for the head norm (no rotation); dy rounded to ``dy_dtype`` (default x's), on x's device."""
    x_leaf, w_leaf = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = fn(x_leaf, w_leaf, eps)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(dy_dtype or x.dtype).to(x)
    (y.double() * dy.double()).sum().backward()
    return y, [x_leaf.grad, w_leaf.grad]


def head_norm_with(backend):
    def fn(x, w, eps):
        with ops.use_backend(qk_norm_rope=backend):
            return ops.head_rms_norm(x, w, eps)
    return fn


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 7, 3, 5), (3, 13, 2, 64), (1, 250, 12, 64)])
def test_head_rms_norm_fp32_matches_float64(backend, shape):
    # odd head dims are fine without RoPE; the input is a strided head view as the model's k (one of [k | v])
    N, T, H, Dh = shape
    x = torch.randn(N, T, 2, H, Dh)[:, :, 0]
    w = 1.0 + 0.3 * torch.randn(Dh)
    y, grads = run_norm(head_norm_with(backend), x, w)
    yr, gref = run_norm(norm_formula, x.double(), w.double())
    assert y.shape == x.shape and y.is_contiguous() and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0].double(), gref[0], rtol=1e-4, atol=1e-5)
    assert err(grads[1], gref[1]) <= 1e-5 * (1 + gref[1].abs().max().item()) * (N * T * H) ** 0.5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_head_rms_norm_three_dims_and_empty(backend):
    x, w = torch.randn(9, 4, 6), 1.0 + 0.3 * torch.randn(6)
    y, grads = run_norm(head_norm_with(backend), x, w)          # [N, H, Dh]: the condition tokens' k
    yr, gref = run_norm(norm_formula, x.double(), w.double())
    assert y.shape == x.shape
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0].double(), gref[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1].double(), gref[1], rtol=1e-4, atol=1e-4)
    e, ge = run_norm(head_norm_with(backend), torch.randn(0, 4, 6), w)   # no condition tokens at all
    assert e.shape == (0, 4, 6) and ge[0].shape == (0, 4, 6) and (ge[1] == 0).all()


@pytest.mark.parametrize("backend,dtype", [(b, dt) for b in NATIVE for dt in (torch.float16, torch.bfloat16)
                                           if not (b == "triton" and dt == torch.bfloat16)])
def test_head_rms_norm_low_precision_2x_rule(backend, dtype):
    x = (3.0 * torch.randn(2, 17, 3, 64)).to(dtype)
    w = (1.0 + 0.3 * torch.randn(64)).to(dtype)
    y, grads = run_norm(head_norm_with(backend), x, w)
    yp, gplain = run_norm(norm_formula, x, w)
    yr, gref = run_norm(norm_formula, x.double(), w.double(), dy_dtype=dtype)
    assert y.dtype == dtype and grads[0].dtype == dtype and grads[1].dtype == dtype
    assert err(y, yr) <= 2 * err(yp, yr) + half_ulp(yr, dtype) + 1e-6
    for name, g, gp, gr in zip(("x", "weight"), grads, gplain, gref):
        assert err(g, gr) <= 2 * err(gp, gr) + half_ulp(gr, dtype) + 1e-6 * (1 + gr.abs().max().item()), name


# --------------------------------------------------------------------------------------------------
# low precision: flash-attn's 2x rule against the unfused chain in the same precision
# --------------------------------------------------------------------------------------------------

LOWP = [(b, dt) for b in NATIVE for dt in (torch.float16, torch.bfloat16)
        if not (b == "triton" and dt == torch.bfloat16)]  # the interpreter has no bf16 arithmetic


@pytest.mark.parametrize("backend,dtype", LOWP)
def test_low_precision_2x_rule(backend, dtype):
    qk, w, cs = make_inputs(2, 17, 3, 64, dtype=dtype, magnitude=3.0)
    y, grads, _ = run_strided(op_with(backend), qk, w, cs)
    yp, gplain = run(formula, qk, w, cs)
    yr, gref = run(ref64, qk.double(), w.double(), cs.double(), dy_dtype=dtype)
    assert y.dtype == dtype and grads[0].dtype == dtype and grads[1].dtype == dtype
    slack = 1e-6
    assert err(y, yr) <= 2 * err(yp, yr) + half_ulp(yr, dtype) + slack
    for name, g, gp, gr in zip(("qk", "weight"), grads, gplain, gref):
        assert err(g, gr) <= 2 * err(gp, gr) + half_ulp(gr, dtype) + slack * (1 + gr.abs().max().item()), name


# --------------------------------------------------------------------------------------------------
# errors, dispatch, opcheck, compile, the model
# --------------------------------------------------------------------------------------------------

def test_bad_inputs_give_clear_errors():
    qk, w, cs = make_inputs(2, 5, 2, 8)
    with pytest.raises(ValueError, match=r"qk must be \[B, T, G, H, Dh\] with G = 1 or 2"):
        ops.qk_norm_rope(torch.randn(2, 5, 3, 2, 8), torch.ones(3, 8), cs)
    with pytest.raises(ValueError, match="head dim must be even"):
        ops.qk_norm_rope(torch.randn(2, 5, 2, 2, 7), torch.ones(2, 7), torch.zeros(5, 3, 2))
    with pytest.raises(ValueError, match=r"weight must be \[G=2, Dh=8\]"):
        ops.qk_norm_rope(qk, w[:1], cs)
    with pytest.raises(ValueError, match=r"weight must be \[G=1, Dh=8\]"):
        ops.qk_norm_rope(qk[:, :, :1], w, None)
    with pytest.raises(ValueError, match=r"head_rms_norm: x must be"):
        ops.head_rms_norm(torch.randn(8), torch.ones(8))
    with pytest.raises(ValueError, match=r"cs must be float32 \[T=5"):
        ops.qk_norm_rope(qk, w, cs[:4])
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ops.qk_norm_rope(qk.double(), w, cs)
    with pytest.raises(ValueError, match="cannot require grad"):
        ops.qk_norm_rope(qk, w, cs.clone().requires_grad_())


def test_dispatch_defaults(monkeypatch):
    monkeypatch.delenv("OMNI2SOUND_BACKEND", raising=False)
    assert ops.select_backend("qk_norm_rope", torch.device("cpu")) == "cpu"
    with ops.use_backend(qk_norm_rope="reference"):
        assert ops.select_backend("qk_norm_rope", torch.device("cpu")) == "reference"
    # per-op environment override: only the named op moves
    monkeypatch.setenv("OMNI2SOUND_BACKEND", "qk_norm_rope=reference, snake=reference")
    assert ops.select_backend("qk_norm_rope", torch.device("cpu")) == "reference"
    assert ops.select_backend("adaln_modulate", torch.device("cpu")) == "cpu"
    # on a GPU, Triton first (timed on an H200, 2026-12-04), the reference where Triton is missing
    from omni2sound.ops import _dispatch
    assert _dispatch._DEFAULT_ORDER["qk_norm_rope"]["cuda"] == ("triton", "reference")
    monkeypatch.setenv("OMNI2SOUND_BACKEND", "qk_norm_rope=fast")
    with pytest.raises(ValueError, match="names no backend"):
        ops.select_backend("qk_norm_rope", torch.device("cpu"))
    # a misspelt op forces nothing silently neither in the environment nor in use_backend: it is refused
    monkeypatch.setenv("OMNI2SOUND_BACKEND", "qk_norm_rop=reference")
    with pytest.raises(ValueError, match="'qk_norm_rop' names no op"):
        ops.select_backend("qk_norm_rope", torch.device("cpu"))
    monkeypatch.delenv("OMNI2SOUND_BACKEND")
    with pytest.raises(ValueError, match="'qk_norm_rop' names no op"):
        with ops.use_backend(qk_norm_rop="reference"):
            pass
    # the first item naming an op (or its family) wins, as written
    monkeypatch.setenv("OMNI2SOUND_BACKEND", "adaln=reference,adaln_modulate=cpu")
    assert ops.select_backend("adaln_modulate", torch.device("cpu")) == "reference"
    monkeypatch.setenv("OMNI2SOUND_BACKEND", "adaln_modulate=reference,adaln=cpu")
    assert ops.select_backend("adaln_modulate", torch.device("cpu")) == "reference"
    assert ops.select_backend("gated_residual_adaln", torch.device("cpu")) == "cpu"


@pytest.mark.parametrize("backend", NATIVE)
def test_opcheck(backend):
    mod = importlib.import_module("omni2sound.ops.qk_norm_rope")
    qk, w, cs = make_inputs(2, 5, 3, 8, strided=False)
    torch.library.opcheck(mod._qk_norm_rope_op, (qk.requires_grad_(), w.requires_grad_(), cs, 1e-6, backend))
    torch.library.opcheck(mod._qk_norm_rope_backward_op, (torch.randn_like(qk), qk.detach(), w.detach(), cs, 1e-6,
                                                          backend))
    q1, w1 = qk[:, :, :1].detach().contiguous(), w[:1].detach()                # one group, no rotation
    torch.library.opcheck(mod._qk_norm_rope_op, (q1.requires_grad_(), w1.requires_grad_(), None, 1e-6, backend))
    torch.library.opcheck(mod._qk_norm_rope_backward_op, (torch.randn_like(q1), q1.detach(), w1.detach(), None, 1e-6,
                                                          backend))


def test_compiles_fullgraph_and_matches_reference():
    torch._dynamo.reset()
    proj = torch.nn.Linear(16, 3 * 16)
    w = torch.nn.Parameter(1 + 0.1 * torch.randn(2, 8))
    cs = torch.view_as_real(rope_table(9, 8, 10000.0, "cpu")).contiguous()

    def attn_in(x):
        qkv = proj(x).view(2, 9, 3, 2, 8)
        return ops.qk_norm_rope(qkv[:, :, :2], w, cs).sum(2)

    x = torch.randn(2, 9, 16)
    with ops.use_backend(qk_norm_rope="cpu"):
        out = torch.compile(attn_in, fullgraph=True)(x)
        out.pow(2).sum().backward()
    gw, gp = w.grad.clone(), proj.weight.grad.clone()
    w.grad = proj.weight.grad = None
    with ops.use_backend(qk_norm_rope="reference"):
        ref = attn_in(x)
        ref.pow(2).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, w.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gp, proj.weight.grad, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# GPU (the lead's run)
# --------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(1, 1, 1, 2), (2, 250, 24, 64), (3, 37, 5, 126)])
def test_gpu_triton_fp32(shape):
    inputs = make_inputs(*shape)
    cuda = [t.cuda() for t in inputs]
    qkv = torch.cat([cuda[0], torch.zeros_like(cuda[0][:, :, :1])], 2).requires_grad_()
    w = cuda[1].clone().requires_grad_()
    with ops.use_backend(qk_norm_rope="triton"):
        y = ops.qk_norm_rope(qkv[:, :, :2], w, cuda[2])
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    yr, gref = run(ref64, *(t.double() for t in inputs))
    torch.testing.assert_close(y.double().cpu(), yr, rtol=1e-5, atol=1e-5)
    dq = qkv.grad[:, :, :2].cpu()
    # the float64 reference's grads for the same dy
    qk64 = inputs[0].double().requires_grad_()
    w64 = inputs[1].double().requires_grad_()
    (ref64(qk64, w64, inputs[2].double(), 1e-6) * dy.double().cpu()).sum().backward()
    torch.testing.assert_close(dq.double(), qk64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double().cpu(), w64.grad, rtol=1e-4, atol=1e-4 * (shape[0] * shape[1]) ** 0.5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_triton_low_precision_2x_rule(dtype):
    qk, w, cs = make_inputs(2, 250, 24, 64, dtype=dtype, magnitude=3.0, device="cuda")
    y, grads = run(op_with("triton"), qk, w, cs)
    yp, gplain = run(formula, qk, w, cs)
    yr, gref = run(ref64, qk.double(), w.double(), cs.double(), dy_dtype=dtype)
    assert err(y, yr) <= 2 * err(yp, yr) + half_ulp(yr, dtype) + 1e-6
    for name, g, gp, gr in zip(("qk", "weight"), grads, gplain, gref):
        assert err(g, gr) <= 2 * err(gp, gr) + half_ulp(gr, dtype) + 1e-6 * (1 + gr.abs().max().item()), name


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_cuda_graph_capture():
    qk, w, cs = make_inputs(2, 250, 24, 64, dtype=torch.bfloat16, device="cuda")
    with ops.use_backend(qk_norm_rope="triton"):
        ops.qk_norm_rope(qk, w, cs)                        # warm up (compile) outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = ops.qk_norm_rope(qk, w, cs)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y.double(), ref64(qk, w, cs, 1e-6), rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_triton_head_rms_norm(dtype):
    # the cross-attention's q at L's training shape: one group, no rotation
    x = (3.0 * torch.randn(4, 250, 24, 64)).to(dtype)
    w = (1.0 + 0.3 * torch.randn(64)).to(dtype)
    y, grads = run_norm(head_norm_with("triton"), x.cuda(), w.cuda())
    yr, gref = run_norm(norm_formula, x.double(), w.double(), dy_dtype=dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(y.double().cpu(), yr, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grads[0].double().cpu(), gref[0], rtol=1e-4, atol=1e-5)
        assert err(grads[1].cpu(), gref[1]) <= 1e-5 * (1 + gref[1].abs().max().item()) * (4 * 250 * 24) ** 0.5
        return
    yp, gplain = run_norm(norm_formula, x, w)
    assert err(y.cpu(), yr) <= 2 * err(yp, yr) + half_ulp(yr, dtype) + 1e-6
    for name, g, gp, gr in zip(("x", "weight"), grads, gplain, gref):
        assert err(g.cpu(), gr) <= 2 * err(gp, gr) + half_ulp(gr, dtype) + 1e-6 * (1 + gr.abs().max().item()), name
