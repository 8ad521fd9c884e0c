"""FP8 (e4m3) projections: the quantisation, the op against an fp32 GEMM (and bf16's error), torch._scaled_mm's
call layout (it runs on torch's CPU build too) against the reference, the routing of ops.linear / linear_gelu inside
fp8_gemms, and the quality guard: sampled latents with fp8 projections against fp32 / bf16 ones on the same noise.
The GPU tests (cuda marker) run the scaled GEMM on the card, the Triton quantisation in fp8, and the CUDA-graphed
sampler with fp8."""
import pytest
import torch
import torch.nn.functional as F
from recording import count_calls

from omni2sound import ops
from omni2sound.ops.fp8 import FP8_MAX, cpu_takes_rowwise_scales, quantize_rows, scaled_mm_takes

pytestmark = pytest.mark.usefixtures("one_thread")

# e4m3: 3 mantissa bits, so round-to-nearest moves a normal value by at most 2^-4 of itself; below the smallest
# normal (2^-6) the step is 2^-9 (absolute, in the scaled units)
E4M3_REL, E4M3_SUB = 2.0 ** -4, 2.0 ** -10

# an older torch (2.11) whose CPU _scaled_mm takes per-tensor scales only: the CPU runs of the row-wise path skip
NO_CPU_ROWWISE = f"torch {torch.__version__}'s CPU _scaled_mm takes per-tensor scales only"
needs_cpu_rowwise = pytest.mark.skipif(not cpu_takes_rowwise_scales(), reason=NO_CPU_ROWWISE)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("scale", ["channel", "tensor"])
def test_quantize_weight_rounds_each_element_within_e4m3s_step(scale):
    w = torch.randn(37, 48) * torch.rand(37, 1) * 3        # channels of different magnitudes
    w[3] = 0.0                                              # an all-zero channel: finite scale, exact zeros
    q = ops.quantize_weight(w, weight_scale=scale)
    assert q.q.dtype == torch.float8_e4m3fn and q.q.shape == (37, 48) and q.q.is_contiguous()
    assert q.scale.shape == ((37,) if scale == "channel" else (1,)) and torch.isfinite(q.scale).all()
    s = q.scale.view(-1, 1)
    err = (q.dequantize() - w).abs()
    assert (err <= E4M3_REL * w.abs() + E4M3_SUB * s + 1e-12).all()
    assert torch.equal(q.dequantize()[3], torch.zeros(48))
    if scale == "channel":         # each channel's largest element lands on e4m3's largest value
        nz = torch.arange(37) != 3
        assert torch.equal(q.q.float().abs().amax(1)[nz], torch.full((36,), FP8_MAX))


@pytest.mark.parametrize("act_scale", ["token", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_rows(act_scale, dtype):
    x = (torch.randn(9, 40) * torch.rand(9, 1) * 5).to(dtype)
    x[2] = 0
    xq, s = ops.quantize_rows_reference(x, act_scale)
    assert xq.dtype == torch.float8_e4m3fn and s.shape == (9, 1) and s.dtype == torch.float32
    amax = x.float().abs().amax(1, keepdim=True)
    want = amax / FP8_MAX if act_scale == "token" else amax.max().expand(9, 1) / FP8_MAX
    torch.testing.assert_close(s, want.clamp(min=1e-12 / FP8_MAX), rtol=1e-6, atol=0)
    err = (xq.float() * s - x.float()).abs()
    assert (err <= E4M3_REL * x.float().abs() + E4M3_SUB * s).all()
    assert torch.equal(xq[2].float(), torch.zeros(40))
    empty_q, empty_s = ops.quantize_rows_reference(x[:0], act_scale)
    assert empty_q.shape == (0, 40) and empty_s.shape == (0, 1)


def test_triton_row_quantisation_matches_the_reference_interpreted():
    """The kernel's indexing and scale under the interpreter, with an fp32 output (the interpreter's fp8 cast is not
    faithful; the fp8 output is checked on a GPU below)."""
    from omni2sound.ops._dispatch import triton_available
    if not triton_available("cpu"):
        pytest.skip("Triton interpreter not available")
    from omni2sound.kernels import fp8 as tk
    for M, K in ((1, 16), (5, 40), (3, 130)):
        x = torch.randn(M, K) * torch.rand(M, 1) * 4
        q, s = tk.quantize_rows(x, out_dtype=torch.float32)
        _, s_ref = ops.quantize_rows_reference(x)
        torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
        torch.testing.assert_close(q, x / s_ref, rtol=1e-6, atol=1e-6)
        assert q.abs().max() <= FP8_MAX
    xs = torch.randn(4, 64)[:, :48]                              # a row stride past K
    q, s = tk.quantize_rows(xs, out_dtype=torch.float32)
    torch.testing.assert_close(q, xs / ops.quantize_rows_reference(xs)[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("act_scale", ["token", "tensor"])
def test_fp8_linear_error_against_fp32_and_bf16(act_scale):
    """Against an fp64 GEMM of the unquantised operands: the fp8 op's relative error is e4m3's rounding of two
    operands (measured 0.036-0.038 here), asserted under 0.05; bf16's is 0.0029, and fp8's must be over 3x that (it
    really quantises)."""
    M, K, N = 64, 256, 96
    x, w, b = torch.randn(M, K), torch.randn(N, K) / K ** 0.5, torch.randn(N) * 0.1
    ref = F.linear(x.double(), w.double(), b.double())
    y8 = ops.fp8_linear(x, ops.quantize_weight(w, b), act_scale)
    ybf = F.linear(x.bfloat16(), w.bfloat16(), b.bfloat16())
    e8, ebf = rel(y8, ref), rel(ybf, ref)
    assert y8.dtype == torch.float32 and y8.shape == (M, N)
    assert e8 < 0.05, e8
    assert 3 * ebf < e8, (e8, ebf)


@pytest.mark.parametrize("M", [0, 1, 7, 33])
@pytest.mark.parametrize("mode", [("token", "channel"), ("tensor", "channel"), ("tensor", "tensor")])
def test_scaled_mm_backend_matches_the_reference(M, mode):
    """torch._scaled_mm with the layout and scales the GPU takes (row-major xq, column-major Wq^T, [M, 1] x [1, N]
    row-wise or scalar tensor-wise scales, bf16 bias and output), on torch's CPU build: the same numbers as the
    dequantised fp32 reference up to the bf16 output's rounding."""
    act, wsc = mode
    K, N = 48, 80
    x = torch.randn(3, M, K).bfloat16() if M else torch.randn(0, K).bfloat16()
    w8 = ops.quantize_weight(torch.randn(N, K).bfloat16(), torch.randn(N).bfloat16(), weight_scale=wsc)
    if mode != ("tensor", "tensor") and not cpu_takes_rowwise_scales():
        assert not scaled_mm_takes(x, w8, act)                        # refused there, with a clear error
        if M:
            with ops.use_backend(fp8_linear="scaled_mm"), pytest.raises(RuntimeError, match="per-tensor scales only"):
                ops.fp8_linear(x, w8, act)
        pytest.skip(NO_CPU_ROWWISE)
    assert scaled_mm_takes(x, w8, act)
    ref = ops.fp8_linear_reference(x, w8, act)
    with ops.use_backend(fp8_linear="scaled_mm"):
        y = ops.fp8_linear(x, w8, act, fast_accum=False)
    assert y.shape == (*x.shape[:-1], N) and y.dtype == torch.bfloat16
    scale = ref.float().abs().amax(dim=None).item() if M else 0.0
    torch.testing.assert_close(y.float(), ref.float(), rtol=1e-2, atol=1e-2 * (scale + 1))


def test_scaled_mm_refuses_unaligned_shapes_and_the_default_falls_back():
    x = torch.randn(5, 40).bfloat16()                          # K = 40: not a multiple of 16
    w8 = ops.quantize_weight(torch.randn(32, 40).bfloat16())
    assert not scaled_mm_takes(x, w8)
    with ops.use_backend(fp8_linear="scaled_mm"), pytest.raises(RuntimeError, match="multiples of 16"):
        ops.fp8_linear(x, w8)
    torch.testing.assert_close(ops.fp8_linear(x, w8), ops.fp8_linear_reference(x, w8))
    with pytest.raises(ValueError, match="K=40"):
        ops.fp8_linear(torch.randn(5, 16), w8)
    with pytest.raises(RuntimeError, match="no_grad"):
        ops.fp8_linear(x.float().requires_grad_(), ops.quantize_weight(torch.randn(32, 40)))


def test_linear_and_linear_gelu_route_through_the_table_only_inside_fp8_gemms():
    lin, fc = torch.nn.Linear(64, 48), torch.nn.Linear(64, 128)
    other = torch.nn.Linear(64, 32)
    table = ops.quantize_linears([lin, fc])
    x = torch.randn(2, 11, 64)
    with torch.no_grad():
        plain = ops.linear(x, lin.weight, lin.bias)
        with ops.fp8_gemms(table):
            y = ops.linear(x, lin.weight, lin.bias)
            g = ops.linear_gelu(x, fc.weight, fc.bias)
            o = ops.linear(x, other.weight, other.bias)          # not in the table: unchanged
            with ops.fp8_gemms(None):
                off = ops.linear(x, lin.weight, lin.bias)
        torch.testing.assert_close(y, ops.fp8_linear_reference(x, table.get(lin.weight, lin.bias)))
        torch.testing.assert_close(g, F.gelu(ops.fp8_linear_reference(x, table.get(fc.weight, fc.bias)),
                                             approximate="tanh"), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o, F.linear(x, other.weight, other.bias))
        torch.testing.assert_close(off, plain)
        assert (y - plain).abs().max() > 1e-4                    # it did quantise
        lin.weight.mul_(2.0)                                       # changed in place: the stale copy is not used
        with ops.fp8_gemms(table):
            torch.testing.assert_close(ops.linear(x, lin.weight, lin.bias), F.linear(x, lin.weight, lin.bias))
    with ops.fp8_gemms(table):                                     # a gradient is needed: the normal GEMM
        yg = ops.linear(x, fc.weight, fc.bias)
        assert yg.requires_grad
        torch.testing.assert_close(yg, F.linear(x, fc.weight, fc.bias))


# ----------------------------------------------------------------------------------------------------
# The quality guard on sampled latents
# ----------------------------------------------------------------------------------------------------
def _tiny_pipe(dtype=torch.float32):
    from omni2sound.model import Omni2SoundDiT, dit_config
    from omni2sound.pipeline import Omni2SoundPipeline, PipelineConfig
    from omni2sound.vae import VAE_PRESETS, AudioVAE
    dit = Omni2SoundDiT(dit_config("tiny", max_duration=2.0))
    with torch.no_grad():               # adaLN-Zero makes a fresh model output zeros; give it a real function
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return Omni2SoundPipeline(dit.to(dtype), AudioVAE(VAE_PRESETS["tiny"]), PipelineConfig())


def _request(pipe, duration=1.2):
    cfg = pipe.dit.config
    cond = pipe.conditions_from_features(video_features=[torch.randn(10, cfg.video_dim), None],
                                         text_tokens=(torch.randn(2, 5, cfg.text_dim), torch.tensor([5, 3])),
                                         duration=duration)
    x0 = pipe.flow.noise(2, cfg.num_frames(duration), cfg.latent_dim, seed=int(torch.randint(0, 1000, ())))
    return cond, x0


@torch.no_grad()
def test_fp8_sampling_latents_against_fp32_and_bf16_on_the_same_noise():
    """The tiny DiT (4 blocks, width 128), 8 Euler steps with CFG 3, V2A and T2A rows, the same noise for all:
    relative error to the fp32 latents, measured over 3 seeds: fp8 0.029-0.030 (per-tensor activations the same), bf16
    0.011-0.015, cosine of fp8 0.9995; asserted: fp8 under 0.08 and under 5x bf16's, cosine over 0.998, and the
    quantisation made once."""
    from omni2sound.pipeline import SamplingOptions
    pipe = _tiny_pipe()
    cond, x0 = _request(pipe)
    opts = SamplingOptions(steps=8, guidance=3.0)
    ref = pipe._sample(cond, x0, opts, {})
    f8 = pipe._sample(cond, x0, SamplingOptions(steps=8, guidance=3.0, fp8=True), {})
    f8t = pipe._sample(cond, x0, SamplingOptions(steps=8, guidance=3.0, fp8=True, fp8_act_scale="tensor"), {})
    table = pipe.fp8_weights()
    assert len(table) == 6 * pipe.dit.config.depth
    f8_again = pipe._sample(cond, x0, SamplingOptions(steps=8, guidance=3.0, fp8=True), {})
    assert pipe.fp8_weights() is table and torch.equal(f8_again, f8)     # quantised once, deterministic
    assert pipe._fp8_sampling("token", fused_quant=True).weights is table      # the fused variant: the same table
    pipe.dit.to(torch.bfloat16)
    pipe._fp8.clear()                                                   # new weight tensors: a new table
    bf = pipe._sample(cond, x0.bfloat16(), opts, {}).float()
    e_bf = rel(bf, ref)
    for y in (f8, f8t):
        e = rel(y, ref)
        cos = F.cosine_similarity(y.flatten(), ref.flatten(), dim=0).item()
        assert e < 0.08 and e < 5 * e_bf and cos > 0.998, (e, e_bf, cos)
        assert e > 1e-4                                                 # the fp8 path ran
    bf8 = pipe._sample(cond, x0.bfloat16(), SamplingOptions(steps=8, guidance=3.0, fp8=True), {}).float()
    assert 1e-4 < rel(bf8, ref) < 0.1


@torch.no_grad()
def test_generate_from_conditions_takes_fp8():
    pipe = _tiny_pipe()
    cond, _ = _request(pipe, duration=0.6)
    a = pipe.generate_from_conditions(cond, steps=2, cfg=2.0, seed=3)
    b = pipe.generate_from_conditions(cond, steps=2, cfg=2.0, seed=3, fp8=True)
    assert torch.isfinite(b.audio).all() and b.audio.shape == a.audio.shape
    assert 0 < rel(b.latents, a.latents) < 0.1


# ----------------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------------
def _gpu_request():
    """The tiny pipeline in bf16 on the GPU and one request's conditions and noise there."""
    pipe = _tiny_pipe()
    pipe.dit.to("cuda", torch.bfloat16)
    pipe.vae.to("cuda")
    cond, x0 = _request(pipe)
    return pipe, cond, x0.to("cuda", torch.bfloat16)


def _fp8_gpu():
    return torch.cuda.is_available() and ops.fp8_supported("cuda")


@pytest.mark.cuda
def test_triton_fp8_quantisation_on_the_gpu_equals_the_reference():
    if not _fp8_gpu():
        pytest.skip("needs a GPU of compute capability >= 8.9")
    for M, K in ((1, 1536), (500, 1536), (37, 6144), (8000, 1536)):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16) * 3
        with ops.use_backend(fp8_quantize="triton"):
            q, s = quantize_rows(x)
        q_ref, s_ref = ops.quantize_rows_reference(x)
        torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
        # the same fp8 value, or (a divide rounded differently) one e4m3 step apart
        d = (q.float() - q_ref.float()).abs()
        assert (d <= E4M3_REL * 2 * q_ref.float().abs() + 2 ** -9).all()
        assert (d > 0).float().mean() < 1e-3


@pytest.mark.cuda
@pytest.mark.parametrize("act_scale", ["token", "tensor"])
def test_scaled_mm_on_the_gpu_matches_the_reference(act_scale):
    if not _fp8_gpu():
        pytest.skip("needs a GPU of compute capability >= 8.9")
    for M, K, N in ((1, 1536, 4608), (500, 1536, 1536), (500, 6144, 1536), (4000, 1536, 6144), (3, 64, 48)):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
        w8 = ops.quantize_weight(w, torch.randn(N, device="cuda", dtype=torch.bfloat16))
        ref = ops.fp8_linear_reference(x, w8, act_scale).float()
        for fast in (False, True):
            y = ops.fp8_linear(x, w8, act_scale, fast_accum=fast).float()
            assert rel(y, ref) < (2e-2 if fast else 1e-2), (M, K, N, fast, rel(y, ref))
        exact = F.linear(x.double(), w.double(), w8.bias.double())
        assert rel(ops.fp8_linear(x, w8, act_scale), exact) < 0.05


@pytest.mark.cuda
@torch.no_grad()
def test_fp8_sampling_in_the_cuda_graph_on_the_gpu():
    """The graphed sampler with fp8 projections: the same latents as the eager fp8 step, close to bf16's."""
    if not _fp8_gpu():
        pytest.skip("needs a GPU of compute capability >= 8.9")
    from omni2sound.pipeline import SamplingOptions
    pipe, cond, x0 = _gpu_request()
    graphed = pipe._sample(cond, x0, SamplingOptions(steps=8, guidance=3.0, fp8=True), {})
    eager = pipe._sample(cond, x0, SamplingOptions(steps=8, guidance=3.0, fp8=True, cuda_graphs=False), {})
    bf = pipe._sample(cond, x0, SamplingOptions(steps=8, guidance=3.0), {})
    assert pipe.graphs.captures == 2
    torch.testing.assert_close(graphed.float(), eager.float(), rtol=2e-2, atol=2e-2)
    e = rel(graphed, bf)
    assert 1e-4 < e < 0.1, e


@torch.no_grad()
@needs_cpu_rowwise
def test_the_gpu_path_through_the_model_runs_scaled_mm_on_the_cpu(monkeypatch):
    """The sampling step of a bf16 DiT with fp8_linear forced to torch._scaled_mm (the GPU's call: row-major xq,
    column-major Wq^T, row-wise scales, bf16 bias and output) on torch's CPU build: every projection's input layout
    is one _scaled_mm takes, and the latents agree with the reference backend's up to bf16 rounding."""
    from omni2sound.pipeline import SamplingOptions
    pipe = _tiny_pipe(torch.bfloat16)
    cond, x0 = _request(pipe)
    x0 = x0.bfloat16()
    opts = SamplingOptions(steps=3, guidance=3.0, fp8=True)
    ref = pipe._sample(cond, x0, opts, {}).float()
    calls = count_calls(monkeypatch, torch, "_scaled_mm")
    with ops.use_backend(fp8_linear="scaled_mm"):
        y = pipe._sample(cond, x0, opts, {}).float()
    assert len(calls) == 3 * 6 * pipe.dit.config.depth           # steps x the six projections x blocks
    assert rel(y, ref) < 2e-2, rel(y, ref)
