"""The AdaLN ops' fused fp8 copy of their output (sampling with FP8 projections, per-token activation scales).

Exactness is the contract: q and scale equal ``quantize_rows`` of the op's own output y, bit for bit, under the same
backends; y itself is the plain op's. Checked on the Triton kernel under the interpreter (an fp32 stand-in output,
the interpreter's fp8 cast being unfaithful, and the real e4m3 output against the standalone kernel's, which shares
that cast), on the public ops under every CPU backend, on the hand-off's pairing rules, and on a tiny DiT's FP8 step
(identical outputs, four standalone quantisations per block fewer, the GELU's included: its fused copy is tested
the same way). The GPU tests (cuda marker) check the same on
the card, in the CUDA graph included.
"""
import pytest
import torch
from recording import count_calls
from test_fp8 import needs_cpu_rowwise

import omni2sound.ops.fp8 as fp8_mod
from omni2sound import ops
from omni2sound.ops._checks import OpInputError
from omni2sound.ops.fp8 import AMAX_FLOOR, FP8_MAX, handed_rows, quantize_rows

pytestmark = pytest.mark.usefixtures("one_thread")

TRITON_FUSED = dict(adaln="triton", fp8_quantize="triton", adaln_fp8="triton", bias_gelu="triton",
                    gelu_fp8="triton")


def _interpreter():
    from omni2sound.ops._dispatch import triton_available
    if not triton_available("cpu"):
        pytest.skip("Triton interpreter not available")


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (bitwise comparison of fp8, and NaN-proof for the rest)."""
    return t.contiguous().view(torch.uint8)


def _inputs(B, L, D, dtype, per_token, pair, zero_row=True):
    """x, h [B, L, D] and gate / shift / scale, each per sample [B, 1, D] or per token, or a (per token, per sample)
    pair; with zero_row, row (0, 0) of x is constant and its shift and scale zero: LN gives 0, so y's row is zeros."""
    x = torch.randn(B, L, D) * 3
    h = torch.randn(B, L, D)

    def mod(s):
        a = torch.randn(B, L if per_token else 1, D) * s
        return (a, torch.randn(B, 1, D) * s) if pair else a
    gate, shift, scale = mod(0.5), mod(0.5), mod(0.3)
    if zero_row:
        x[0, 0] = 1.5
        h[0, 0] = 0.0
        for m in (shift, scale):
            for t in (m if isinstance(m, tuple) else (m,)):
                if t.shape[1] > 1:
                    t[0, 0] = 0.0
                else:
                    t[0] = 0.0
    cast = lambda m: tuple(t.to(dtype) for t in m) if isinstance(m, tuple) else m.to(dtype)  # noqa: E731
    return x.to(dtype), h.to(dtype), cast(gate), cast(shift), cast(scale)


SHAPES = [(2, 3, 40), (1, 5, 130), (3, 1, 96), (2, 2, 24)]          # D not a power of two, L = 1, odd rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_forward_writes_quantize_rows_of_its_own_output_interpreted(dtype):
    """The kernel with its fp8 output (fp32 stand-in: q before the cast): y, x2, mean, rstd as without it, and q, scale
    equal to the standalone Triton quantisation of the stored y and to the reference's scale."""
    _interpreter()
    from omni2sound.kernels import adaln as tk
    from omni2sound.kernels import fp8 as tq
    for (B, L, D), per_token, pair, gated in zip(SHAPES, (True, False, True, False), (False, True, True, False),
                                                 (True, True, False, False)):
        x, h, gate, shift, scale = _inputs(B, L, D, dtype, per_token, pair)
        parts = lambda m: m if isinstance(m, tuple) else (m, None)  # noqa: E731
        (g, g2), (sh, sh2), (sc, sc2) = parts(gate), parts(shift), parts(scale)
        if not gated:
            h = g = g2 = None

        def run(fp8_out):
            y, x2 = torch.empty_like(x), (torch.empty_like(x) if gated else None)
            mean, rstd = torch.empty(B * L), torch.empty(B * L)
            q = torch.full((B * L, D), float("nan")) if fp8_out else None
            s = torch.full((B * L, 1), float("nan")) if fp8_out else None
            tk.adaln_forward(x, h, g, sh, sc, x2, y, mean, rstd, 1e-6, g2, sh2, sc2, yq=q, ys=s)
            return x2, y, mean, rstd, q, s
        x2, y, mean, rstd, q, s = run(True)
        plain = run(False)
        for a, b in zip((x2, y, mean, rstd), plain[:4]):
            assert a is None or torch.equal(bits(a), bits(b))
        q_ref, s_ref = tq.quantize_rows(y.view(B * L, D), out_dtype=torch.float32)
        assert torch.equal(bits(q), bits(q_ref)) and torch.equal(bits(s), bits(s_ref)), (B, L, D)
        _, s_torch = ops.quantize_rows_reference(y.view(B * L, D))
        torch.testing.assert_close(s, s_torch, rtol=1e-6, atol=0)
        assert q.abs().max() <= FP8_MAX
        assert s[0, 0] == AMAX_FLOOR / FP8_MAX and torch.equal(q[0], torch.zeros(D))   # the all-zero row
        # the real e4m3 output: the same bytes as the standalone kernel's (which shares the interpreter's cast)
        q8 = torch.empty((B * L, D), dtype=torch.float8_e4m3fn)
        s8 = torch.empty((B * L, 1))
        y8 = torch.empty_like(x)
        tk.adaln_forward(x, h, g, sh, sc, torch.empty_like(x) if gated else None, y8, torch.empty(B * L),
                         torch.empty(B * L), 1e-6, g2, sh2, sc2, yq=q8, ys=s8)
        q8_ref, s8_ref = tq.quantize_rows(y8.view(B * L, D))
        assert torch.equal(bits(y8), bits(y)) and torch.equal(bits(q8), bits(q8_ref)) and torch.equal(s8, s8_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@torch.no_grad()
def test_fp8_ops_return_the_plain_output_and_its_quantisation(dtype, backend):
    """adaln_modulate_fp8 / gated_residual_adaln_fp8 under each CPU backend: y (and x2) bit for bit the plain op's,
    q / scale bit for bit ``quantize_rows`` of that y under the same selection; per-sample and per-token modulation,
    pairs, an all-zero row."""
    force = TRITON_FUSED if backend == "triton" else dict(adaln=backend)
    if backend == "triton":
        _interpreter()
    for (B, L, D), per_token, pair in zip(SHAPES[:3], (True, False, True), (False, True, True)):
        x, h, gate, shift, scale = _inputs(B, L, D, dtype, per_token, pair)
        with ops.use_backend(**force):
            y, q, s = ops.adaln_modulate_fp8(x, shift, scale)
            x2g, yg, qg, sg = ops.gated_residual_adaln_fp8(x, h, gate, shift, scale)
            y_plain = ops.adaln_modulate(x, shift, scale)
            x2_plain, yg_plain = ops.gated_residual_adaln(x, h, gate, shift, scale)
            for out, plain, qq, ss in ((y, y_plain, q, s), (yg, yg_plain, qg, sg)):
                assert torch.equal(bits(out), bits(plain))
                q_ref, s_ref = quantize_rows(out.view(B * L, D))
                assert qq.dtype == torch.float8_e4m3fn and qq.shape == (B * L, D) and ss.shape == (B * L, 1)
                assert torch.equal(bits(qq), bits(q_ref)) and torch.equal(bits(ss), bits(s_ref)), (B, L, D)
                assert torch.equal(qq[0].float(), torch.zeros(D))                  # the all-zero row
            assert torch.equal(bits(x2g), bits(x2_plain))
        if backend != "triton":                      # the reference quantisation: the op's definition
            q_ref, s_ref = ops.quantize_rows_reference(yg.view(B * L, D))
            assert torch.equal(bits(qg), bits(q_ref)) and torch.equal(s_ref, sg)


@torch.no_grad()
def test_fp8_ops_edge_cases():
    x = torch.randn(2, 0, 24)
    y, q, s = ops.adaln_modulate_fp8(x, torch.zeros(2, 1, 24), torch.zeros(2, 1, 24))
    assert y.shape == (2, 0, 24) and q.shape == (0, 24) and s.shape == (0, 1)
    with pytest.raises(RuntimeError, match="inference op"):
        with torch.enable_grad():
            ops.adaln_modulate_fp8(x.requires_grad_(), torch.zeros(2, 1, 24), torch.zeros(2, 1, 24))
    with pytest.raises(OpInputError, match="per-sample"):
        ops.gated_residual_adaln_fp8(torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 2, 8),
                                     torch.randn(2, 1, 8), torch.randn(2, 1, 8))


GELU_SHAPES = [(3, 40), (5, 130), (1, 96), (7, 1000)]                  # N not a power of two, one row


def _gelu_input(M, N, dtype):
    h = torch.randn(M, N) * 3
    h[0] = 0.0                                                         # GELU(0) = 0: the all-zero row
    if M > 2:
        h[1, :3] = torch.tensor([40.0, -40.0, 1e-3])                   # saturated tails and the linear part
    return h.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_gelu_writes_quantize_rows_of_its_own_output_interpreted(dtype):
    """The row kernel (fp32 stand-in for q, then real e4m3): g bit for bit the bias_gelu Triton forward's (no bias),
    q and scale bit for bit the standalone Triton quantisation of the stored g."""
    _interpreter()
    from omni2sound.kernels import fp8 as tq
    from omni2sound.kernels import gelu as tk
    for M, N in GELU_SHAPES:
        h = _gelu_input(M, N, dtype)
        plain = torch.empty_like(h)
        tk.bias_gelu_forward(h, None, plain)
        for qdtype in (torch.float32, torch.float8_e4m3fn):
            g = torch.full_like(h, float("nan"))
            q = torch.empty((M, N), dtype=qdtype)
            s = torch.full((M, 1), float("nan"))
            tk.gelu_fp8_rows(h, g, q, s)
            q_ref, s_ref = tq.quantize_rows(g, out_dtype=qdtype)
            assert torch.equal(bits(g), bits(plain)), (M, N)
            assert torch.equal(bits(q), bits(q_ref)) and torch.equal(bits(s), bits(s_ref)), (M, N, qdtype)
            assert s[0, 0] == AMAX_FLOOR / FP8_MAX and torch.equal(q[0].float(), torch.zeros(N))
    with pytest.raises(ValueError, match="row limit"):
        tk.gelu_fp8_rows(torch.empty(1, 20000), torch.empty(1, 20000), torch.empty(1, 20000), torch.empty(1, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@torch.no_grad()
def test_gelu_fp8_returns_the_plain_gelu_and_its_quantisation(dtype, backend):
    """ops.gelu_fp8 under each CPU backend: g bit for bit bias_gelu's (no bias) under the same selection, q / scale
    bit for bit quantize_rows of that g; leading dims kept; an empty input; no gradient."""
    force = TRITON_FUSED if backend == "triton" else dict(bias_gelu=backend)
    if backend == "triton":
        _interpreter()
    for M, N in GELU_SHAPES[:3]:
        h = _gelu_input(M, N, dtype).view(1, M, N)
        with ops.use_backend(**force):
            g, q, s = ops.gelu_fp8(h)
            plain = ops.bias_gelu(h)
            q_ref, s_ref = quantize_rows(plain.view(M, N))
        assert g.shape == h.shape and torch.equal(bits(g), bits(plain))
        assert q.dtype == torch.float8_e4m3fn and q.shape == (M, N) and s.shape == (M, 1)
        assert torch.equal(bits(q), bits(q_ref)) and torch.equal(bits(s), bits(s_ref)), (M, N)
    g, q, s = ops.gelu_fp8(torch.empty(2, 0, 16, dtype=dtype))
    assert g.shape == (2, 0, 16) and q.shape == (0, 16) and s.shape == (0, 1)
    with pytest.raises(RuntimeError, match="inference op"), torch.enable_grad():
        ops.gelu_fp8(torch.randn(3, 8, requires_grad=True))


def _table(D, act_scale="token"):
    fc = torch.nn.Linear(D, 32)
    return fc, ops.quantize_linears([fc], act_scale=act_scale)


@torch.no_grad()
def test_the_hand_off_pairs_only_y_and_blocks_of_its_rows():
    """Inside fp8_gemms(table, fuse_quant=True) an AdaLN output is handed over: y and its leading (or any whole-row)
    slices get the matching rows of q / scale; a copy, a column slice, a changed y, another quantiser, per-tensor
    scales or no fuse_quant get nothing; and the GEMM's result is the unfused one."""
    B, L, D = 3, 4, 40
    x, h, gate, shift, scale = _inputs(B, L, D, torch.float32, True, True, zero_row=False)
    fc, table = _table(D)
    with ops.fp8_gemms(table, fuse_quant=True):
        x2, y = ops.gated_residual_adaln(x, h, gate, shift, scale)
        q, s = handed_rows(y, "reference")
        q_ref, s_ref = ops.quantize_rows_reference(y.view(-1, D))
        assert torch.equal(bits(q), bits(q_ref)) and torch.equal(s, s_ref)
        q1, s1 = handed_rows(y[:2], "reference")                                  # the cross-attention's rows
        assert torch.equal(bits(q1), bits(q_ref[:2 * L])) and torch.equal(s1, s_ref[:2 * L])
        q2, _ = handed_rows(y[1:].reshape(-1, D), "reference")
        assert torch.equal(bits(q2), bits(q_ref[L:]))
        for other in (y.clone(), y[:, :, :20], y.transpose(0, 1), y.view(B, L * D // 8, 8), x2):
            assert handed_rows(other, "reference") is None
        assert handed_rows(y, "triton") is None                                   # made by another quantiser
        fused = [ops.linear(t, fc.weight, fc.bias) for t in (y, y[:2])]
        y.mul_(1.0)                                       # written in place (the same values): its copy is void
        assert handed_rows(y, "reference") is None and handed_rows(y[:1], "reference") is None
    assert handed_rows(y, "reference") is None                                    # gone with the context
    with ops.fp8_gemms(table):
        unfused = [ops.linear(t, fc.weight, fc.bias) for t in (y, y[:2])]
        _, y_off = ops.gated_residual_adaln(x, h, gate, shift, scale)
        assert handed_rows(y_off, "reference") is None                            # fuse_quant off: no hand-off
    for a, b in zip(fused, unfused):
        assert torch.equal(a, b)
    _, table_t = _table(D, act_scale="tensor")
    with ops.fp8_gemms(table_t, fuse_quant=True):                                 # per-tensor scales stay unfused
        _, y_t = ops.gated_residual_adaln(x, h, gate, shift, scale)
        assert handed_rows(y_t, "reference") is None
    with ops.fp8_gemms(table, fuse_quant=True), torch.enable_grad():              # a gradient: no fp8 copy
        _, y_g = ops.gated_residual_adaln(x.requires_grad_(), h, gate, shift, scale)
        assert handed_rows(y_g.detach(), "reference") is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_fused_fp8_sampling_gives_the_same_latents_with_four_quantisations_fewer_per_block(dtype, monkeypatch):
    """The tiny DiT's FP8 sampling (2 Euler steps, CFG, a V2A and a T2A row: the cross-attention takes leading rows)
    with and without the fused quantisation: identical latents; the standalone quantisations drop from 6 to 2 per
    block and step (qkv, cross-attention q and MLP fc1 take the AdaLN's copy, MLP fc2 the GELU's). Per-tensor scales:
    unchanged."""
    from test_fp8 import _request, _tiny_pipe

    from omni2sound.pipeline import SamplingOptions
    pipe = _tiny_pipe(dtype)
    cond, x0 = _request(pipe, duration=0.6)
    x0 = x0.to(dtype)
    calls = count_calls(monkeypatch, fp8_mod, "_standalone_quantize")
    taken = []                                              # (rows of x, rows of the handed-over y) per hand-off
    real_handed = fp8_mod.handed_rows

    def handed(x, quantizer):
        got = real_handed(x, quantizer)
        if got is not None:
            taken.append((x.shape[0], fp8_mod._active.handoff.y.shape[0]))
        return got
    monkeypatch.setattr(fp8_mod, "handed_rows", handed)
    steps, depth = 2, pipe.dit.config.depth
    unfused = pipe._sample(cond, x0, SamplingOptions(steps=steps, guidance=3.0, fp8=True), {})
    n_unfused = len(calls)
    calls.clear()
    fused = pipe._sample(cond, x0, SamplingOptions(steps=steps, guidance=3.0, fp8=True, fp8_fused_quant=True), {})
    assert torch.equal(fused, unfused)
    assert n_unfused == 6 * depth * steps and len(calls) == 2 * depth * steps, (n_unfused, len(calls))
    assert len(taken) == 4 * depth * steps and any(n < B for n, B in taken)      # the cross-attention's y[:n]
    assert pipe.fp8_weights() is pipe._fp8[("token", True)].weights              # one table for both
    calls.clear()
    opts_t = dict(steps=1, guidance=3.0, fp8=True, fp8_act_scale="tensor")
    a = pipe._sample(cond, x0, SamplingOptions(**opts_t), {})
    b = pipe._sample(cond, x0, SamplingOptions(**opts_t, fp8_fused_quant=True), {})
    assert torch.equal(a, b) and len(calls) == 2 * 6 * depth


@torch.no_grad()
def test_serving_takes_the_fused_quantisation():
    """ServeConfig(fp8=True, fp8_fused_quant=True): a padded, bucketed batch samples the latents of the unfused one."""
    from test_serving import _mixed_requests, _pipe

    from omni2sound.serving import ServeConfig, Server
    pipe = _pipe()
    reqs = _mixed_requests(pipe.dit.config)[:2]                 # the VT2A and T2A ones, one 1.2 s bucket
    lat = {}
    for fused in (False, True):
        server = Server(pipe, ServeConfig(buckets=(1.2,), batch_sizes=(4,), steps=2, guidance=3.0, fp8=True,
                                          fp8_fused_quant=fused))
        assert server.options.fp8 and server.options.fp8_fused_quant == fused
        lat[fused] = server.sample(reqs)
    assert all(torch.equal(a, b) for a, b in zip(lat[False], lat[True]))


@torch.no_grad()
@needs_cpu_rowwise
def test_the_gpu_path_of_the_fused_step_on_the_cpu(monkeypatch):
    """The GPU's selection on the CPU: the fused Triton AdaLN and GELU (interpreted, real e4m3 output) feeding
    torch._scaled_mm (row-wise scales, bf16) in one DiT forward without CFG: the same velocity as the unfused step
    with the Triton AdaLN, GELU and quantisation, four standalone quantisations per block fewer."""
    _interpreter()
    from test_fp8 import _request, _tiny_pipe
    pipe = _tiny_pipe(torch.bfloat16)
    cond, x0 = _request(pipe, duration=0.3)
    dit = pipe.dit
    prep = dit.prepare_conditions(cond.to("cpu", torch.bfloat16), x0.shape[1], sampling=True)
    t = torch.full((2,), 0.4)
    table = pipe.fp8_weights()
    calls = count_calls(monkeypatch, fp8_mod, "_standalone_quantize")
    outs = []
    with ops.use_backend(fp8_linear="scaled_mm", **TRITON_FUSED):
        for fuse in (False, True):
            with ops.fp8_gemms(table, fuse_quant=fuse):
                outs.append((dit.predict_velocity(x0.bfloat16(), t, prep), len(calls)))
    (v0, n0), (v1, n1) = outs
    assert torch.equal(v0, v1)
    depth = dit.config.depth
    assert n0 == 6 * depth and n1 - n0 == 2 * depth, (n0, n1)


# ----------------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------------
def _fp8_gpu():
    return torch.cuda.is_available() and ops.fp8_supported("cuda")


@pytest.mark.cuda
@torch.no_grad()
def test_fused_quantisation_on_the_gpu_equals_the_standalone_kernel():
    """On the card: the fused Triton forward's e4m3 q and scales equal the standalone Triton quantisation of its y
    (the GPU default of quantize_rows), bit for bit, and y is the plain Triton forward's; L-model widths."""
    if not _fp8_gpu():
        pytest.skip("needs a GPU of compute capability >= 8.9")
    for B, L, D in ((2, 250, 1536), (16, 250, 1536), (1, 7, 1000), (3, 5, 96)):
        for per_token, pair in ((True, True), (False, False)):
            x, h, gate, shift, scale = (tuple(u.cuda() for u in t) if isinstance(t, tuple) else t.cuda()
                                        for t in _inputs(B, L, D, torch.bfloat16, per_token, pair))
            with ops.use_backend(adaln_fp8="triton"):
                x2, y, q, s = ops.gated_residual_adaln_fp8(x, h, gate, shift, scale)
            with ops.use_backend(adaln="triton", fp8_quantize="triton"):
                x2_p, y_p = ops.gated_residual_adaln(x, h, gate, shift, scale)
                q_p, s_p = quantize_rows(y.view(-1, D))
            assert torch.equal(bits(y), bits(y_p)) and torch.equal(bits(x2), bits(x2_p))
            assert torch.equal(bits(q), bits(q_p)) and torch.equal(bits(s), bits(s_p)), (B, L, D)


@pytest.mark.cuda
@torch.no_grad()
def test_fused_fp8_sampling_on_the_gpu_gives_the_same_latents():
    """The graphed and the eager FP8 sampler on the card, fused against unfused with the Triton AdaLN and GELU in
    both: identical latents; the eager default (CUDA AdaLN, aten's GELU, unfused) within their bf16 rounding."""
    if not _fp8_gpu():
        pytest.skip("needs a GPU of compute capability >= 8.9")
    from test_fp8 import _gpu_request

    from omni2sound.pipeline import SamplingOptions
    pipe, cond, x0 = _gpu_request()
    for graphs in (True, False):
        opts = dict(steps=6, guidance=3.0, fp8=True, cuda_graphs=graphs)
        with ops.use_backend(adaln="triton", bias_gelu="triton"):
            unfused = pipe._sample(cond, x0, SamplingOptions(**opts), {})
        fused = pipe._sample(cond, x0, SamplingOptions(**opts, fp8_fused_quant=True), {})
        assert torch.equal(fused, unfused), graphs
    default = pipe._sample(cond, x0, SamplingOptions(**opts), {})            # eager: no graph captured before
    err = ((default.float() - fused.float()).norm() / default.float().norm()).item()
    assert err < 5e-2, err


@pytest.mark.cuda
@torch.no_grad()
def test_fused_gelu_on_the_gpu_equals_the_standalone_kernels():
    """On the card: the GELU row kernel's g equals the bias_gelu Triton forward's, its e4m3 q and scales the
    standalone Triton quantisation of g, bit for bit; the L MLP's width and a ragged one."""
    if not _fp8_gpu():
        pytest.skip("needs a GPU of compute capability >= 8.9")
    for M, N in ((500, 6144), (37, 1000), (8000, 6144)):
        h = _gelu_input(M, N, torch.bfloat16).cuda()
        with ops.use_backend(gelu_fp8="triton", bias_gelu="triton", fp8_quantize="triton"):
            g, q, s = ops.gelu_fp8(h)
            plain = ops.bias_gelu(h)
            q_p, s_p = quantize_rows(plain)
        assert torch.equal(bits(g), bits(plain)) and torch.equal(bits(q), bits(q_p)) and torch.equal(s, s_p), (M, N)
