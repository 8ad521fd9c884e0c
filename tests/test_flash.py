"""flash-attn as a backend of attention and cross_attention. Without the package (this CPU box, the GPU image) the
adapter is checked against a stand-in module that implements flash-attn's documented call signatures with plain
per-sequence softmax attention: the layouts, the dense-query packing, cu_seqlens and the zero rows of samples without
keys are ours to get right. With the package on a GPU, the real kernels against the reference (cuda marker)."""
import os
import sys
import types

import pytest
import torch

from omni2sound import ops
from omni2sound.ops import flash

pytestmark = pytest.mark.usefixtures("one_thread")


def _softmax_attn(q, k, v, scale):          # q [Tq, H, D], k, v [Tk, H, D] -> [Tq, H, D], fp32 math
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v.float()).to(q.dtype)


def _stand_in():
    m = types.ModuleType("flash_attn")

    def flash_attn_func(q, k, v, softmax_scale=None):
        assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
        return torch.stack([_softmax_attn(q[b], k[b], v[b], softmax_scale) for b in range(q.shape[0])])

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None):
        assert q.dim() == 3 and cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
        out = torch.full_like(q, float("nan"))              # what a library might leave in rows without keys
        for b in range(len(cu_seqlens_q) - 1):
            q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
            k0, k1 = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
            assert q1 - q0 <= max_seqlen_q and k1 - k0 <= max_seqlen_k
            if k1 > k0:
                out[q0:q1] = _softmax_attn(q[q0:q1], k[k0:k1], v[k0:k1], softmax_scale)
        return out
    m.flash_attn_func, m.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    return m


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", _stand_in())
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)      # import fails: FA2's module is used
    flash.flash_module.cache_clear()
    yield
    flash.flash_module.cache_clear()


def test_adapter_layouts_against_the_reference(stand_in):
    assert flash.flash_module()[0] == "flash_attn"
    B, T, H, D = 3, 11, 2, 16
    qkv = torch.randn(B, T, 3, H, D)
    q, k, v = qkv.unbind(2)                                             # strided views, as the DiT passes them
    torch.testing.assert_close(flash.flash_attention(q, k, v, 0.3), ops.attention_reference(q, k, v, 0.3),
                               rtol=1e-5, atol=1e-5)
    lens = torch.tensor([4, 0, 7])                                       # a sample without keys gives zeros
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    kp, vp = torch.randn(int(lens.sum()) + 5, H, D), torch.randn(int(lens.sum()) + 5, H, D)  # padding after cu[-1]
    got = flash.flash_cross_attention(q, kp, vp, cu, 7, 0.25)
    want = ops.cross_attention_reference(q, kp, vp, cu, 7, 0.25)
    assert torch.isfinite(got).all() and torch.equal(got[1], torch.zeros(T, H, D))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(flash.flash_cross_attention(q, kp[:0], vp[:0], torch.zeros(B + 1, dtype=torch.int32), 0, 0.25),
                       torch.zeros(B, T, H, D))


def test_flash_is_never_a_default_and_refuses_what_it_cannot_take(stand_in):
    cpu = torch.device("cpu")
    assert "flash" not in ops.available_backends("attention", cpu)       # a GPU backend
    for op in ("attention", "cross_attention"):
        assert ops.select_backend(op, cpu) != "flash"
    assert flash.flash_takes(torch.empty(1, 1, 1, 64, dtype=torch.bfloat16))
    assert not flash.flash_takes(torch.empty(1, 1, 1, 64))                # fp32
    assert not flash.flash_takes(torch.empty(1, 1, 1, 12, dtype=torch.float16))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_attn_on_the_gpu_against_the_reference(dtype):
    flash.flash_module.cache_clear()
    if flash.flash_module() is None:
        pytest.skip("flash-attn is not installed")
    dev = torch.device("cuda")
    B, T, H, D = 2, 250, 24, 64
    q, k, v = (torch.randn(B, T, H, D, device=dev, dtype=dtype) for _ in range(3))
    ref = ops.attention_reference(q.float(), k.float(), v.float())
    with ops.use_backend(attention="flash"):
        got = ops.attention(q, k, v)
    low = ops.attention_reference(q, k, v)
    assert (got.float() - ref).abs().max() <= 2 * (low.float() - ref).abs().max() + 1e-3
    lens = torch.tensor([80, 0], device=dev)
    cu = torch.zeros(B + 1, dtype=torch.int32, device=dev)
    cu[1:] = lens.cumsum(0)
    kp, vp = (torch.randn(80, H, D, device=dev, dtype=dtype) for _ in range(2))
    ref = ops.cross_attention_reference(q.float(), kp.float(), vp.float(), cu, 80)
    with ops.use_backend(cross_attention="flash"):
        got = ops.cross_attention(q, kp, vp, cu, 80)
    assert torch.equal(got[1].float(), torch.zeros_like(got[1].float()))
    low = ops.cross_attention_reference(q, kp, vp, cu, 80)
    assert (got.float() - ref).abs().max() <= 2 * (low.float() - ref).abs().max() + 1e-3


def test_bench_attention_backend_table_has_every_variant(stand_in):
    """bench_attention's backend table (flash-attn against SDPA's kernels on a GPU) on small CPU shapes: each variant
    this machine can run has its rows, forward ones with their error against float64; flash_attn_func is the
    stand-in here, SDPA's efficient / cuDNN kernels cannot run on a CPU and are left out, not fatal."""
    bench_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    sys.path.insert(0, bench_dir)
    try:
        import bench_attention
    finally:
        sys.path.remove(bench_dir)
    rows = bench_attention.backend_table(torch.device("cpu"), torch.float32, tiny=True)
    have = {(r["case"], r["mode"], r["variant"]) for r in rows}
    for case, mode in (("sampling", "fwd"), ("training", "fwd"), ("training", "fwd+bwd")):
        for variant in ("omni2sound[reference]", "sdpa[flash]", "flash_attn_func"):
            assert (case, mode, variant) in have
    assert not any(v.startswith("sdpa[efficient]") for _, _, v in have)
    for r in rows:
        assert r["us"] > 0
        assert (r["err"] != "") == (r["mode"] == "fwd")
        if r["err"]:
            assert float(r["err"]) < 1e-5, r
