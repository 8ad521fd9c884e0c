"""The catalogue of bad inputs to the ops, one parametrised test per class: varlen offsets, head dims, dtypes /
devices / shapes, non-finite values and numbers, the native entry points called directly, forced backends that
cannot take a call. Each bad argument gives a one-line ValueError / TypeError naming the op before any kernel runs,
on every backend; non-finite tensors give what the reference gives. (tests/test_op_fuzz.py draws hundreds of
random malformed calls on top of these.)"""
from __future__ import annotations

import importlib
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import omni2sound.ops as O
from omni2sound import _native

attn_mod = importlib.import_module("omni2sound.ops.attention")    # (the package exports functions of these names)
lin_mod = importlib.import_module("omni2sound.ops.linear")

CPU_BACKENDS = [b for b in ("reference", "cpu") if b in O.available_backends("adaln_modulate", "cpu")]
HAS_NATIVE = _native.has_cpu()
needs_native = pytest.mark.skipif(not HAS_NATIVE, reason="omni2sound._C not built")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_the_reported_segfault_is_a_value_error():
    """Offsets past the keys once crashed the process (exit 139) in the C++ cross-attention."""
    p = run_python("""
        import torch, omni2sound.ops as O
        q, k, v = torch.randn(2, 6, 4, 32), torch.randn(7, 4, 32), torch.randn(7, 4, 32)
        try:
            with torch.no_grad():
                O.cross_attention(q, k, v, torch.tensor([0, 3, 50_000_000], dtype=torch.int32), 7)
        except ValueError as e:
            print("ValueError:", e)
    """)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "ValueError: omni2sound.ops.cross_attention: cu_seqlens_k[-1] = 50000000 is past the 7 rows" in p.stdout


# ----------------------------------------------------------------------------------------------------
# Varlen offsets (cu_seqlens_k, max_seqlen_k)
# ----------------------------------------------------------------------------------------------------
I32 = torch.int32
OFFSETS = {      # name: (cu_seqlens_k for B = 2 over 7 key rows, max_seqlen_k, the message)
    "past the end": (torch.tensor([0, 3, 50_000_000], dtype=I32), 7, "past the 7 rows"),
    "last one past": (torch.tensor([0, 3, 8], dtype=I32), 5, "past the 7 rows"),
    "negative": (torch.tensor([0, -3, 7], dtype=I32), 10, "non-decreasing"),
    "decreasing": (torch.tensor([0, 5, 4], dtype=I32), 7, "non-decreasing"),
    "first not 0": (torch.tensor([1, 3, 7], dtype=I32), 4, r"cu_seqlens_k\[0\] must be 0"),
    "int32 min": (torch.tensor([0, 3, -2 ** 31], dtype=I32), 7, "non-decreasing"),
    "int64": (torch.tensor([0, 3, 7]), 4, "int32"),
    "float": (torch.tensor([0.0, 3.0, 7.0]), 4, "int32"),
    "2-D": (torch.tensor([[0, 3, 7]], dtype=I32), 4, r"int32 \[B \+ 1 = 3\]"),
    "one short": (torch.tensor([0, 7], dtype=I32), 7, r"B \+ 1"),
    "one more": (torch.tensor([0, 3, 7, 7], dtype=I32), 4, r"B \+ 1"),
    "not a tensor": ([0, 3, 7], 4, "must be a torch.Tensor"),
    "max_seqlen_k below the longest": (torch.tensor([0, 3, 7], dtype=I32), 3, "below the longest sample's 4"),
    "max_seqlen_k negative": (torch.tensor([0, 3, 7], dtype=I32), -1, ">= 0"),
    "max_seqlen_k a float": (torch.tensor([0, 3, 7], dtype=I32), 4.0, "must be an int"),
    "max_seqlen_k a bool": (torch.tensor([0, 3, 7], dtype=I32), True, "must be an int"),
}
XATTN_BACKENDS = [b for b in ("reference", "cpu") if b in O.available_backends("cross_attention", "cpu")]


@pytest.mark.parametrize("backend", XATTN_BACKENDS)
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("case", sorted(OFFSETS))
def test_varlen_offsets(case, grad, backend):
    cu, max_k, msg = OFFSETS[case]
    q, k, v = (torch.randn(*s, requires_grad=grad) for s in ((2, 6, 4, 32), (7, 4, 32), (7, 4, 32)))
    with O.use_backend(cross_attention=backend), pytest.raises(ValueError, match=msg):
        O.cross_attention(q, k, v, cu, max_k)


def test_varlen_offsets_that_stop_before_the_last_row_are_valid():
    """Rows past cu_seqlens_k[-1] belong to no sample (pack_condition_tokens(static=True)'s padding)."""
    q, k, v = torch.randn(2, 3, 1, 8), torch.randn(9, 1, 8), torch.randn(9, 1, 8)
    cu = torch.tensor([0, 2, 5], dtype=I32)
    want = O.cross_attention_reference(q, k[:5], v[:5], cu, 3)
    for b in XATTN_BACKENDS:
        with O.use_backend(cross_attention=b), torch.no_grad():
            torch.testing.assert_close(O.cross_attention(q, k, v, cu, 3), want, atol=2e-6, rtol=1e-5)


def test_a_batch_without_any_key_gives_zeros():
    q, k = torch.randn(2, 3, 1, 8), torch.randn(0, 1, 8)
    for b in XATTN_BACKENDS:
        with O.use_backend(cross_attention=b), torch.no_grad():
            assert torch.equal(O.cross_attention(q, k, k, torch.zeros(3, dtype=I32), 0), torch.zeros_like(q))


def test_offsets_are_read_once_per_tensor_and_again_after_a_change():
    q, k, v = torch.randn(2, 3, 1, 8), torch.randn(5, 1, 8), torch.randn(5, 1, 8)
    cu = torch.tensor([0, 2, 5], dtype=I32)
    O.cross_attention(q, k, v, cu, 3)
    cu[2] = 9                      # an in-place change bumps the version: checked again
    with pytest.raises(ValueError, match="past the 5 rows"):
        O.cross_attention(q, k, v, cu, 3)


# ----------------------------------------------------------------------------------------------------
# Head dims and other sizes
# ----------------------------------------------------------------------------------------------------
def _zero_head_dim_calls():
    z4 = torch.randn(1, 3, 2, 0)
    return {
        "attention": lambda: O.attention(z4, z4, z4),
        "cross_attention": lambda: O.cross_attention(z4, torch.randn(2, 2, 0), torch.randn(2, 2, 0),
                                                     torch.tensor([0, 2], dtype=I32), 2),
        "qk_norm_rope": lambda: O.qk_norm_rope(torch.randn(1, 2, 2, 1, 0), torch.ones(2, 0), None),
        "head_rms_norm": lambda: O.head_rms_norm(torch.randn(1, 2, 1, 0), torch.ones(0)),
        "qk_norm_rope no heads": lambda: O.qk_norm_rope(torch.randn(1, 2, 2, 0, 4), torch.ones(2, 4), None),
    }


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("case", sorted(_zero_head_dim_calls()))
def test_head_dims(case, backend):
    with O.use_backend(backend), pytest.raises(ValueError, match=r"head dim must be >= 1|H >= 1 heads of Dh >= 1"):
        _zero_head_dim_calls()[case]()


# ----------------------------------------------------------------------------------------------------
# dtypes, devices, shapes, types
# ----------------------------------------------------------------------------------------------------
def _bad_calls():
    x, m = torch.randn(2, 3, 8), torch.randn(2, 1, 8)
    q = torch.randn(1, 4, 2, 8)
    cu = torch.tensor([0, 3], dtype=I32)
    k = torch.randn(3, 2, 8)
    meta = torch.device("meta")
    return {
        "adaln x not a tensor": (lambda: O.adaln_modulate(x.tolist(), m, m), "x must be a torch.Tensor"),
        "adaln x int": (lambda: O.adaln_modulate(x.int(), m.int(), m.int()), "float32, float16 or bfloat16"),
        "adaln shift on meta": (lambda: O.adaln_modulate(x, m.to(meta), m), "must match x"),
        "adaln shift of another D": (lambda: O.adaln_modulate(x, torch.randn(2, 1, 7), m), "per-sample"),
        "gated h of another dtype": (lambda: O.gated_residual_adaln(x, x.half(), m, m, m), "h must match"),
        "gated h missing": (lambda: O.gated_residual_adaln(x, None, m, m, m), "h must be a torch.Tensor"),
        "attention k on meta": (lambda: O.attention(q, q.to(meta), q), "must match q"),
        "attention q int": (lambda: O.attention(q.int(), q.int(), q.int()), "float32"),
        "attention q 3-D": (lambda: O.attention(q[0], q, q), r"\[B, T, H, Dh\]"),
        "cross_attention v rows": (lambda: O.cross_attention(q, k, k[:2], cu, 3), "same number of rows"),
        "cross_attention offsets on meta": (lambda: O.cross_attention(q, k, k, cu.to(meta), 3), "cu_seqlens_k"),
        "bias_gelu bias int": (lambda: O.bias_gelu(torch.randn(3, 4), torch.ones(4, dtype=torch.int32)),
                               "floating"),
        "bias_gelu inplace not a bool": (lambda: O.bias_gelu(torch.randn(3, 4), None, inplace="yes"), "bool"),
        "linear weight 1-D": (lambda: O.linear(torch.randn(3, 4), torch.randn(4)), r"\[N, K\]"),
        "linear bias of another N": (lambda: O.linear(torch.randn(3, 4), torch.randn(5, 4), torch.randn(4)),
                                     r"bias must be \[N=5\]"),
        "linear dtypes differ": (lambda: O.linear(torch.randn(3, 4), torch.randn(5, 4).double()), "must match"),
        "linear x int": (lambda: O.linear(torch.ones(3, 4, dtype=torch.int64), torch.ones(5, 4, dtype=torch.int64)),
                         "floating"),
        "linear_gelu weight on meta": (lambda: O.linear_gelu(torch.randn(3, 4), torch.randn(5, 4, device=meta),
                                                             None), "meta"),
        "qk_norm_rope weight int": (lambda: O.qk_norm_rope(torch.randn(1, 2, 2, 1, 4), torch.ones(2, 4).int(),
                                                           None), "floating"),
        "snake alpha not a tensor": (lambda: O.snake(torch.randn(1, 2, 5), 1.0, torch.ones(2)), "alpha must be"),
        "snake residual missing": (lambda: O.snake_residual(torch.randn(1, 2, 5), torch.ones(2), torch.ones(2),
                                                            None), "residual must be a torch.Tensor"),
        "pack lens on meta": (lambda: O.pack_condition_tokens(torch.randn(2, 3, 4), torch.tensor([1, 2], device=meta),
                                                              None, None), "video_lens is on meta"),
        "pack text not a tensor": (lambda: O.pack_condition_tokens(None, None, [[1.0]], None),
                                   "text must be a torch.Tensor"),
    }


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("case", sorted(_bad_calls()))
def test_dtypes_devices_shapes(case, backend):
    call, msg = _bad_calls()[case]
    with O.use_backend(backend), pytest.raises((ValueError, TypeError), match=msg) as info:
        call()
    assert "\n" not in str(info.value) and "omni2sound" in str(info.value) or case.startswith(("bias_gelu", "snake",
                                                                                               "pack", "qk_"))
    # one error type for all of them: a ValueError that is also a TypeError
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)


# ----------------------------------------------------------------------------------------------------
# Non-finite values: NaN / inf tensors give what the reference gives; NaN / inf / negative numbers are errors
# ----------------------------------------------------------------------------------------------------
def _poked(shape, value, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g)
    idx = torch.randint(0, t.numel(), (n,), generator=g)
    t.view(-1)[idx] = value
    return t


def _nonfinite_calls(v):
    cs = torch.stack([torch.ones(3, 2), torch.zeros(3, 2)], -1)
    return {
        "adaln_modulate": ("adaln_modulate", lambda: O.adaln_modulate(_poked((2, 3, 8), v), torch.randn(2, 1, 8),
                                                                      _poked((2, 1, 8), v, 1, 1))),
        "gated_residual_adaln": ("gated_residual_adaln",
                                 lambda: O.gated_residual_adaln(_poked((2, 3, 8), v), _poked((2, 3, 8), v, 1, 2),
                                                                torch.randn(2, 1, 8), torch.randn(2, 1, 8),
                                                                torch.randn(2, 3, 8))),
        # (a non-finite query: see test_documented_non_finite_differences)
        "attention": ("attention", lambda: O.attention(torch.randn(1, 4, 2, 8), _poked((1, 5, 2, 8), v),
                                                       _poked((1, 5, 2, 8), v, 1, 3))),
        "cross_attention": ("cross_attention", lambda: O.cross_attention(
            torch.randn(2, 3, 1, 8), _poked((5, 1, 8), v, 1, 4), _poked((5, 1, 8), v, 1, 5),
            torch.tensor([0, 2, 5], dtype=I32), 3)),
        "bias_gelu": ("bias_gelu", lambda: O.bias_gelu(_poked((3, 6), abs(v)), _poked((6,), abs(v), 1, 5))),
        "qk_norm_rope": ("qk_norm_rope", lambda: O.qk_norm_rope(_poked((1, 3, 2, 1, 4), v), torch.ones(2, 4), cs)),
        "snake": ("snake", lambda: O.snake(_poked((1, 2, 9), v), torch.ones(2), torch.ones(2))),
        "snake_residual": ("snake_residual", lambda: O.snake_residual(_poked((1, 2, 9), v), torch.ones(2),
                                                                      torch.ones(2), _poked((1, 2, 9), v, 1, 6))),
        "linear": ("linear", lambda: O.linear(_poked((3, 4), v), _poked((5, 4), v, 1, 7), torch.randn(5))),
    }


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 1e15])
@pytest.mark.parametrize("case", sorted(_nonfinite_calls(0.0)))
def test_non_finite_tensors_give_the_references_result(case, value):
    op, call = _nonfinite_calls(value)[case]
    torch.manual_seed(0)              # the same inputs for every backend
    with torch.no_grad(), O.use_backend(**{op: "reference"}):
        want = call()
    for backend in O.available_backends(op, "cpu"):
        if backend == "triton":
            continue
        torch.manual_seed(0)
        with torch.no_grad(), O.use_backend(**{op: backend}):
            got = call()
        for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            torch.testing.assert_close(g, w, equal_nan=True, atol=1e-4, rtol=1e-4,
                                       msg=lambda m: f"{case} with {value} on {backend}: {m}")


@pytest.mark.skipif(not HAS_NATIVE, reason="omni2sound._C not built")
def test_documented_non_finite_differences():
    """The kernels' documented departures from the reference on non-finite input: a NaN query gives NaN rows in the
    C++ attention (aten's CPU SDPA can return finite ones), and bias_gelu gives -inf at x = -inf (the reference NaN);
    elsewhere the results agree."""
    q, k, v = torch.randn(1, 3, 1, 8), torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8)
    q[0, 1, 0, 2] = float("nan")
    with torch.no_grad(), O.use_backend(attention="cpu"):
        out = O.attention(q, k, v)
    assert out[0, 1].isnan().all()
    torch.testing.assert_close(out[0, [0, 2]], O.attention_reference(q, k, v)[0, [0, 2]], atol=1e-5, rtol=1e-5)
    x = torch.tensor([[float("-inf"), -3.0, 0.5, float("inf")]])
    with O.use_backend(bias_gelu="cpu"):
        y = O.bias_gelu(x)
    ref = O.bias_gelu_reference(x)
    assert y[0, 0] == float("-inf") and ref[0, 0].isnan()
    torch.testing.assert_close(y[0, 1:], ref[0, 1:], atol=1e-5, rtol=1e-5)


def _number_calls(v):
    x3 = torch.randn(2, 3, 8)
    q = torch.randn(1, 4, 2, 8)
    return {
        "adaln_modulate eps": lambda: O.adaln_modulate(x3, x3, x3, eps=v),
        "gated_residual_adaln eps": lambda: O.gated_residual_adaln(x3, x3, x3, x3, x3, eps=v),
        "qk_norm_rope eps": lambda: O.qk_norm_rope(torch.randn(1, 2, 2, 1, 4), torch.ones(2, 4), None, eps=v),
        "head_rms_norm eps": lambda: O.head_rms_norm(torch.randn(1, 2, 1, 4), torch.ones(4), eps=v),
        "snake eps": lambda: O.snake(torch.randn(1, 2, 5), torch.ones(2), torch.ones(2), eps=v),
        "snake_residual eps": lambda: O.snake_residual(torch.randn(1, 2, 5), torch.ones(2), torch.ones(2),
                                                       torch.randn(1, 2, 5), eps=v),
        "attention softmax_scale": lambda: O.attention(q, q, q, softmax_scale=v),
        "cross_attention softmax_scale": lambda: O.cross_attention(q, torch.randn(3, 2, 8), torch.randn(3, 2, 8),
                                                                   torch.tensor([0, 3], dtype=I32), 3,
                                                                   softmax_scale=v),
    }


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, "1e-6", True])
@pytest.mark.parametrize("case", sorted(_number_calls(0.0)))
def test_non_finite_and_non_numbers(case, value, backend):
    if value == -1.0 and "softmax_scale" in case:
        pytest.skip("a negative softmax scale is valid")
    with O.use_backend(backend), pytest.raises(ValueError, match="eps|softmax_scale"):
        _number_calls(value)[case]()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("gated", [False, True])
def test_adaln_rows_whose_statistics_overflow_are_nan(gated, backend):
    """|x| ~ 1e19 and up: a row's fp32 sum of squares overflows. Such rows come out NaN on every backend, never the
    finite values rstd = 0 gave; the reference gives NaN there too once |x|^2 overflows (and 0 just below)."""
    D = 16
    x = torch.randn(4, 3, D)
    sign = torch.tensor([1.0, -1.0]).repeat(D // 2)
    for i, m in enumerate((1e19, 1e20, 1e30)):         # rows of sample 3: ordinary
        x[i] = sign * m * (1 + torch.rand(3, D))
    s, c = torch.randn(4, 1, D), torch.randn(4, 1, D)
    with O.use_backend(adaln=backend):
        y = O.gated_residual_adaln(x, torch.zeros_like(x), s, s, c)[1] if gated else O.adaln_modulate(x, s, c)
    ref = O.adaln_modulate_reference(x, s, c)
    if backend != "reference":
        assert y[:3].isnan().all(), "rows whose statistics overflow must be NaN"
    assert not y[3].isnan().any()
    torch.testing.assert_close(y[3], ref[3], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# The native entry points called directly: each checks what it indexes (no crash, a ValueError)
# ----------------------------------------------------------------------------------------------------
NATIVE_CASES = {
    "attention: offsets past the key rows": """
        P = attn(); cu = torch.tensor([0, 3, 50_000_000], dtype=torch.int32); P.cu, P.Nk = cu.data_ptr(), 7
        C.attention_fwd_cpu(P)""",
    "attention: decreasing offsets": """
        P = attn(); cu = torch.tensor([0, 5, 2], dtype=torch.int32); P.cu, P.Nk = cu.data_ptr(), 7
        C.attention_fwd_cpu(P)""",
    "attention: first offset not 0": """
        P = attn(); cu = torch.tensor([2, 5, 7], dtype=torch.int32); P.cu, P.Nk = cu.data_ptr(), 7
        C.attention_fwd_cpu(P)""",
    "attention: head dim 0": "P = attn(); P.Dh = 0; C.attention_fwd_cpu(P)",
    "attention: head dim past the tiles": "P = attn(); P.Dh = 100000; C.attention_fwd_cpu(P)",
    "attention: null q": "P = attn(); P.q = 0; C.attention_fwd_cpu(P)",
    "attention: negative stride": "P = attn(); P.k_st = -4; C.attention_fwd_cpu(P)",
    "attention: dtype code 7": "P = attn(); P.dtype = 7; C.attention_fwd_cpu(P)",
    "adaln: D = 0": "P = C.AdaLNParams(); P.B, P.L, P.D = 1, 1, 0; C.adaln_forward_cpu(P)",
    "adaln: null pointers": "P = C.AdaLNParams(); P.B, P.L, P.D = 2, 3, 8; C.adaln_forward_cpu(P)",
    "adaln backward: null pointers": "P = C.AdaLNBwdParams(); P.B, P.L, P.D = 2, 3, 8; C.adaln_backward_cpu(P)",
    "bias_gelu: N = 0": "P = C.GeluParams(); P.rows, P.N = 3, 0; C.bias_gelu_forward_cpu(P)",
    "bias_gelu: null x": "P = C.GeluParams(); P.rows, P.N = 3, 4; C.bias_gelu_forward_cpu(P)",
    "bias_gelu backward: dbias without bias": """
        x = torch.randn(3, 4); P = C.GeluParams(); P.rows, P.N = 3, 4
        P.x = P.y = P.dy = x.data_ptr(); P.dbias = x.data_ptr(); C.bias_gelu_backward_cpu(P)""",
    "qk_norm_rope: G = 3": "P = C.QKParams(); P.B, P.T, P.G, P.H, P.Dh = 1, 1, 3, 1, 4; C.qk_norm_rope_forward_cpu(P)",
    "qk_norm_rope: null pointers": "P = C.QKParams(); P.B, P.T, P.H, P.Dh = 1, 1, 1, 4; C.qk_norm_rope_forward_cpu(P)",
    "snake: nan eps": """
        P = C.SnakeParams(); a = torch.ones(2); P.alpha = P.beta = a.data_ptr(); P.eps = float("nan")
        C.snake_forward_cpu(P)""",
    "snake: negative T": "P = C.SnakeParams(); P.B, P.C, P.T = 1, 1, -1; C.snake_forward_cpu(P)",
    "snake backward: null pointers": "P = C.SnakeBwdParams(); P.B, P.C, P.T = 1, 1, 4; C.snake_backward_cpu(P)",
    "cross_attention (CUDA entry): head dim 0": "P = C.CrossAttnParams(); P.D = 0; C.cross_attention_fwd_cuda(P, 0)",
    "a negative pointer": "P = C.AttnParams(); P.q = -1",
}


@needs_native
def test_native_entry_points_check_what_they_index():
    """Every case in one subprocess (a crash would fail the test, not the run); each must raise ValueError (bad
    values) or TypeError (a negative integer for a pointer)."""
    body = "\n".join(
        f"try:\n{textwrap.indent(textwrap.dedent(code).strip(), '    ')}\n    print('RETURNED', {name!r})\n"
        f"except (ValueError, TypeError) as e:\n    print('RAISED', {name!r}, type(e).__name__, str(e)[:80])\n"
        for name, code in NATIVE_CASES.items())
    p = run_python(f"""
import torch
from omni2sound import _C as C
q = torch.randn(2, 3, 1, 8); k = torch.randn(7, 1, 8); out = torch.empty(2, 3, 1, 8)
def attn():
    P = C.AttnParams(); P.B, P.Tq, P.H, P.Dh, P.Tk = 2, 3, 1, 8, 3
    P.q, P.k, P.v, P.out = q.data_ptr(), k.data_ptr(), k.data_ptr(), out.data_ptr()
    P.q_sb, P.q_st, P.q_sh, P.k_sb, P.k_st, P.k_sh, P.v_sb, P.v_st, P.v_sh = 24, 8, 8, 0, 8, 8, 0, 8, 8
    return P
{body}
""")
    assert p.returncode == 0, f"the process died ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    raised = [line for line in p.stdout.splitlines() if line.startswith("RAISED")]
    assert len(raised) == len(NATIVE_CASES), p.stdout
    assert all("omni2sound._C" in line or "TypeError" in line for line in raised), p.stdout


# ----------------------------------------------------------------------------------------------------
# Forced backends that cannot take a call raise; the ones that can run it (custom ops with fakes)
# ----------------------------------------------------------------------------------------------------
needs_attn_kernel = pytest.mark.skipif(not attn_mod.cpu_available(torch.device("cpu")), reason="no C++ attention")
ONEDNN = "onednn" in O.available_backends("linear", "cpu")


@needs_attn_kernel
@pytest.mark.parametrize("case", ["float64", "head dim past the tiles", "no keys"])
def test_forced_cpu_attention_refuses_what_it_cannot_take(case):
    D = attn_mod.cpu_max_head_dim() + 8 if case == "head dim past the tiles" else 8
    q = torch.randn(1, 3, 1, D, dtype=torch.float64 if case == "float64" else torch.float32)
    k = q[:, :0] if case == "no keys" else q
    with O.use_backend(attention="cpu"), pytest.raises(RuntimeError, match="'cpu' was requested.*cannot take"):
        O.attention(q, k, k)


@needs_attn_kernel
def test_forced_cpu_attention_trains_through_its_custom_op():
    q, k, v = (torch.randn(2, T, 2, 8, requires_grad=True) for T in (5, 6, 6))
    with O.use_backend(attention="cpu"):
        out = O.attention(q, k, v)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    want = O.attention_reference(q, k, v)
    torch.testing.assert_close(out, want, atol=2e-6, rtol=1e-5)
    for g, w in zip(grads, torch.autograd.grad(want, (q, k, v), dout)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    torch.library.opcheck(attn_mod._attention_op, (q.detach(), k.detach(), v.detach(), 0.3, "cpu"))
    torch.library.opcheck(attn_mod._attention_op, (q, k, v, 0.3, "cpu"))


@pytest.mark.skipif(not ONEDNN, reason="no oneDNN")
@pytest.mark.parametrize("case", ["float64", "bfloat16 autocast"])
def test_forced_onednn_linear_refuses_what_it_cannot_take(case):
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    with O.use_backend(linear="onednn"), pytest.raises(RuntimeError, match="'onednn' was requested.*cannot take"):
        if case == "float64":
            O.linear(x.double(), w.double())
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                O.linear(x, w)


@pytest.mark.skipif(not ONEDNN, reason="no oneDNN")
def test_forced_onednn_linear_trains_through_its_custom_op():
    x, w, b = torch.randn(2, 3, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True), \
        torch.randn(5, requires_grad=True)
    with O.use_backend(linear="onednn"):
        y = O.linear(x, w, b)
    dy = torch.randn_like(y)
    want = F.linear(x, w, b)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    for g, r in zip(torch.autograd.grad(y, (x, w, b), dy), torch.autograd.grad(want, (x, w, b), dy)):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    torch.library.opcheck(lin_mod._linear_op, (x, w, b, "onednn"))
    torch.library.opcheck(lin_mod._linear_op, (x.detach(), w.detach(), None, "onednn"))


def test_compiled_forced_backends_trace_through_the_fakes():
    """torch.compile traces the custom ops through their fakes (no graph break needed for the forced path)."""
    if not (ONEDNN and attn_mod.cpu_available(torch.device("cpu"))):
        pytest.skip("needs oneDNN and the C++ attention")
    x, w = torch.randn(3, 8), torch.randn(8, 8)
    q = torch.randn(1, 3, 1, 8)

    def f(x, w, q):
        return O.linear(x, w).sum() + O.attention(q, q, q).sum()
    with O.use_backend(linear="onednn", attention="cpu"):
        got = torch.compile(f, backend="eager", fullgraph=True)(x, w, q)
    assert math.isclose(float(got), float(F.linear(x, w).sum() + O.attention_reference(q, q, q).sum()),
                        rel_tol=1e-4, abs_tol=1e-4)
