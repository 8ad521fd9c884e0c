"""ops.attention (the DiT's self-attention) and the C++ CPU attention forward it shares with ops.cross_attention.

The ground truth is a float64 softmax written out here (einsum, softmax, einsum), independent of SDPA. The C++
kernel is forward-only: its tests run without gradients; with gradients the op must run the reference (and the
cross-attention's custom op differentiates the kernel's forward with its padded math).
"""
import importlib
import math

import pytest
import torch

from omni2sound import _native, ops

attn_mod = importlib.import_module("omni2sound.ops.attention")
needs_kernel = pytest.mark.skipif(not _native.has_symbol("attention_fwd_cpu"),
                                  reason="the native extension (C++ attention) is not built")


def truth(q, k, v, scale=None):
    """float64 softmax(q k^T scale) v, q [B, Tq, H, D], k, v [B, Tk, H, D] -> [B, Tq, H, D]."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.double())


def kernel(q, k, v, scale=None):
    with torch.no_grad(), ops.use_backend(attention="cpu"):
        return ops.attention(q, k, v, scale)


def sdpa(q, k, v, scale=None):
    with torch.no_grad(), ops.use_backend(attention="reference"):
        return ops.attention(q, k, v, scale)


def err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# Odd lengths around the kernel's tiles (48 query rows a block, 64 / 24 keys a panel), head dims that are not a
# multiple of the vector width (20, 40, 72) and the presets' (32, 64) and the largest (128).
SHAPES = [  # B, Tq, Tk, H, D
    (1, 1, 1, 1, 8),
    (2, 7, 5, 3, 20),
    (1, 49, 97, 2, 32),
    (3, 250, 250, 2, 64),
    (1, 130, 65, 4, 40),
    (2, 5, 300, 1, 72),
    (1, 33, 19, 2, 128),
]


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_fp32_matches_float64_like_sdpa(shape):
    B, Tq, Tk, H, D = shape
    q, k, v = torch.randn(B, Tq, H, D), torch.randn(B, Tk, H, D), torch.randn(B, Tk, H, D)
    want = truth(q, k, v)
    got = kernel(q, k, v)
    assert got.shape == (B, Tq, H, D) and got.dtype == torch.float32 and got.is_contiguous()
    # fp32 SDPA's own error against float64, times 2, plus a few ulps of the output's scale
    bound = 2 * err(sdpa(q, k, v), want) + 4 * torch.finfo(torch.float32).eps * want.abs().max().item()
    assert err(got, want) <= bound, f"{shape}: error {err(got, want):.3g} > {bound:.3g}"


@needs_kernel
def test_kernel_takes_the_strided_slices_of_a_fused_projection():
    """q, k, v as views of one [B, T, 3, H, D] projection (the model's layout), and a custom scale."""
    qkv = torch.randn(2, 61, 3, 3, 32)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    torch.testing.assert_close(kernel(q, k, v, 0.37), truth(q, k, v, 0.37).float(), atol=2e-6, rtol=1e-5)


@needs_kernel
def test_kernel_large_scores_stay_finite_and_exact():
    """Scores in the hundreds: the row maximum must be taken out before the exp."""
    q, k, v = torch.randn(1, 40, 2, 32) * 8, torch.randn(1, 70, 2, 32) * 8, torch.randn(1, 70, 2, 32)
    got = kernel(q, k, v)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, truth(q, k, v).float(), atol=1e-4, rtol=1e-4)


@needs_kernel
def test_kernel_nan_input_gives_nan_not_a_crash():
    q, k, v = torch.randn(1, 9, 1, 16), torch.randn(1, 9, 1, 16), torch.randn(1, 9, 1, 16)
    q[0, 3, 0, 5] = float("nan")
    got = kernel(q, k, v)
    assert torch.isnan(got[0, 3]).all() and torch.isfinite(got[0, :3]).all()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_low_precision_2x_rule(dtype):
    """flash-attn's rule: error against float64 at most 2x that of SDPA in the same dtype (+ 1 ulp of slack)."""
    B, Tq, Tk, H, D = 2, 77, 130, 3, 64
    q, k, v = (torch.randn(B, T, H, D).to(dtype) for T in (Tq, Tk, Tk))
    want = truth(q, k, v)
    got = kernel(q, k, v)
    assert got.dtype == dtype
    slack = torch.finfo(dtype).eps * want.abs().max().item()
    assert err(got, want) <= 2 * err(sdpa(q, k, v), want) + slack


@needs_kernel
def test_empty_batch_and_no_queries():
    for B, Tq in ((0, 5), (2, 0)):
        q, k, v = torch.randn(B, Tq, 2, 16), torch.randn(B, 4, 2, 16), torch.randn(B, 4, 2, 16)
        assert kernel(q, k, v).shape == (B, Tq, 2, 16)


@needs_kernel
def test_kernel_lse_and_varlen_keys():
    """The varlen form (packed keys, cu_seqlens_k, samples with no key) and the optional log-sum-exp."""
    lens = [5, 0, 49, 1]
    cu = torch.nn.functional.pad(torch.tensor(lens).cumsum(0), (1, 0)).to(torch.int32)
    q = torch.randn(len(lens), 23, 2, 32)
    k, v = torch.randn(int(cu[-1]), 2, 32), torch.randn(int(cu[-1]), 2, 32)
    out, lse = attn_mod.attention_cpu(q, k, v, 0.2, cu_seqlens_k=cu, with_lse=True)
    for b, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if s == e:
            assert out[b].abs().sum() == 0 and lse[b].abs().sum() == 0
            continue
        kb, vb = k[None, s:e], v[None, s:e]
        torch.testing.assert_close(out[b], truth(q[b:b + 1], kb, vb, 0.2)[0].float(), atol=2e-6, rtol=1e-5)
        scores = torch.einsum("qhd,khd->hqk", q[b].double(), k[s:e].double()) * 0.2
        torch.testing.assert_close(lse[b], torch.logsumexp(scores, -1).float(), atol=2e-6, rtol=1e-6)


def test_gradients_run_the_reference_and_match_float64():
    """With gradients the op is SDPA (the kernel has no backward): output and every gradient against float64."""
    q, k, v = (torch.randn(2, T, 2, 24, requires_grad=True) for T in (11, 17, 17))
    out = ops.attention(q, k, v)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = truth(*leaves)
    want_grads = torch.autograd.grad(want, leaves, dout.double())
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5)


def test_dispatch_and_bad_inputs(monkeypatch):
    monkeypatch.delenv("OMNI2SOUND_BACKEND", raising=False)
    cpu = torch.device("cpu")
    assert ops.select_backend("attention", cpu) == ("cpu" if _native.has_symbol("attention_fwd_cpu") else "reference")
    with ops.use_backend(attention="reference"):
        assert ops.select_backend("attention", cpu) == "reference"
        assert ops.select_backend("cross_attention", cpu) == "reference"     # one family
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match=r"\[B, T, H, Dh\]"):
        ops.attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="must be"):
        ops.attention(q, torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8))
    with pytest.raises(ValueError, match="must match q"):
        ops.attention(q, q.double(), q.double())
    with pytest.raises(ValueError, match="head dim"):
        ops.attention(q, q, torch.randn(1, 4, 2, 9))


@needs_kernel
def test_model_self_attention_runs_the_kernel_when_sampling():
    """The DiT's sampling forward equals its forward on the reference attention (the SDPA it replaced)."""
    from test_model import make_cond, small_model

    model = small_model()
    cond = make_cond()
    x, t = torch.randn(4, 23, model.config.latent_dim), torch.rand(4)
    with torch.no_grad():
        got = model(x, t, cond)
        with ops.use_backend(attention="reference"):
            want = model(x, t, cond)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_head_dims_past_the_kernels_tiles_run_the_reference():
    """By default; with the cpu backend forced, such a call is an error (never a silent fallback)."""
    D = attn_mod.cpu_max_head_dim() + 8
    q, k, v = torch.randn(1, 5, 1, D), torch.randn(1, 6, 1, D), torch.randn(1, 6, 1, D)
    assert not attn_mod.cpu_kernel_takes(q, k, v)
    with torch.no_grad():
        torch.testing.assert_close(ops.attention(q, k, v), truth(q, k, v).float(), atol=2e-6, rtol=1e-5)
    with pytest.raises(RuntimeError, match="cannot take this call"):
        kernel(q, k, v)
