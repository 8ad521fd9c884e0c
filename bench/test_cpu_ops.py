"""The per-op CPU micro-benchmarks as a pytest-benchmark suite (not part of the test run: testpaths is tests/):

    pytest bench/ --benchmark-only [--benchmark-json out.json] [--benchmark-compare]

One group per op; in each, the plain-PyTorch reference (the baseline) and the op's default CPU backend, timed in
the same run on the same inputs, at the DiT's / VAE's sampling shapes (S preset, batch 1-2).
``pytest-benchmark`` reports min / median / IQR per call and the machine (``machine_info`` in the JSON; with
``--benchmark-json`` the card too, through NVML, when there is one).
"""
import pytest
import torch

from omni2sound import ops
from omni2sound.model import rope_table

pytest.importorskip("pytest_benchmark")
torch.manual_seed(0)


def _adaln():
    x, s1, s2 = torch.randn(2, 250, 768), torch.randn(2, 1, 768), torch.randn(2, 1, 768)
    return lambda: ops.adaln_modulate(x, s1, s2)


def _gated():
    x, h = torch.randn(2, 250, 768), torch.randn(2, 250, 768)
    g, s1, s2 = (torch.randn(2, 1, 768) for _ in range(3))
    return lambda: ops.gated_residual_adaln(x, h, g, s1, s2)


def _snake():
    x, a, b = torch.randn(1, 128, 8000), torch.rand(128) + 0.5, torch.rand(128) + 0.5
    return lambda: ops.snake(x, a, b)


def _snake_residual():
    x, r, a, b = torch.randn(1, 128, 8000), torch.randn(1, 128, 8000), torch.rand(128) + 0.5, torch.rand(128) + 0.5
    return lambda: ops.snake_residual(x, a, b, r)


def _qk_norm_rope():
    qkv = torch.randn(2, 250, 3, 12, 64)
    w, cs = 1 + 0.3 * torch.randn(2, 64), torch.view_as_real(rope_table(250, 64, 10000.0, "cpu")).contiguous()
    return lambda: ops.qk_norm_rope(qkv[:, :, :2], w, cs)


def _bias_gelu():
    x, b = torch.randn(500, 3072), torch.randn(3072)
    return lambda: ops.bias_gelu(x, b)


def _attention():
    q, k, v = (torch.randn(2, 250, 12, 64) for _ in range(3))
    return lambda: ops.attention(q, k, v)


def _linear():
    x, w, b = torch.randn(500, 768), torch.randn(3072, 768), torch.randn(3072)
    return lambda: ops.linear(x, w, b)


OPS = {"adaln_modulate": _adaln, "gated_residual_adaln": _gated, "snake": _snake, "snake_residual": _snake_residual,
       "qk_norm_rope": _qk_norm_rope, "bias_gelu": _bias_gelu, "attention": _attention, "linear": _linear}


@pytest.mark.parametrize("backend", ["reference", "default"])
@pytest.mark.parametrize("op", list(OPS))
def test_op(benchmark, op, backend):
    benchmark.group = op
    benchmark.extra_info["backend"] = backend
    fn = OPS[op]()
    with torch.no_grad():
        if backend == "reference":              # the baseline: the op's plain-PyTorch reference
            with ops.use_backend("reference"):
                out = benchmark(fn)
        else:                                   # the op's default CPU backend (C++, oneDNN for linear)
            benchmark.extra_info["selected"] = ops.select_backend(op, torch.device("cpu"))
            out = benchmark(fn)
    assert torch.isfinite(out[0] if isinstance(out, tuple) else out).all()
