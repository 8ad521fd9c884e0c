"""bench/_traffic.py: the byte counter behind `bench_train.py --audit` counts what ops move, and its extrapolation
from a small depth x batch grid to a large model is exact (it is how the L preset's step is counted on a CPU)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import bench_train  # noqa: E402
from _traffic import TrafficCounter, extent_bytes, extrapolate  # noqa: E402

from omni2sound.model import dit_config  # noqa: E402


def test_counter_counts_reads_writes_views_and_broadcasts():
    a, b = torch.randn(64, 32), torch.randn(32, 16)
    with TrafficCounter() as c:
        a.t()                                      # a view: nothing
        a.to(torch.bfloat16)                       # a cast: read 4 B, write 2 B per element
        a.mul_(2.0)                                # in place: read and write the tensor
        a @ b                                      # a GEMM: 2 M N K FLOPs
        a + torch.randn(1, 32).expand(64, 32)      # a broadcast input reads its real extent
    rows = c.rows
    assert rows["cast"][:3] == [1, 64 * 32 * 4, 64 * 32 * 2]
    assert rows["elementwise:mul"][1:3] == [64 * 32 * 4, 64 * 32 * 4]
    assert rows["gemm"][3] == 2 * 64 * 32 * 16
    assert rows["elementwise:add"][1] == 64 * 32 * 4 + 32 * 4
    assert "elementwise:t" not in rows and "layout" not in rows
    assert extent_bytes(torch.randn(3, 1).expand(3, 5)) == 3 * 4


def test_grid_extrapolation_is_exact():
    # every count of a training step is bilinear in (depth, batch): a 2 x 2 grid predicts a third point exactly
    grid = {(d, b): bench_train.audit_step(dit_config("tiny", depth=d), b, 1.0, {}) for d in (1, 2) for b in (2, 3)}
    want = bench_train.audit_step(dit_config("tiny", depth=4), 5, 1.0, {})
    got = extrapolate(grid, 4, 5)
    assert set(want) <= set(got)
    for k, row in want.items():
        assert got[k] == pytest.approx(row, rel=1e-9, abs=1e-6), k
    assert sum(v for k, v in got.items() if k not in want for v in v) == pytest.approx(0, abs=1e-6)


def test_the_master_weight_step_moves_28_bytes_a_parameter():
    # AdamW on fp32 masters with bf16 gradients, writing the bf16 copy: read p, g, m, v (4 + 2 + 4 + 4 B), write p, m,
    # v and the copy (4 + 4 + 4 + 2 B); the copy is written, never read
    from omni2sound.optim import MasterWeightAdamW
    w = torch.nn.Parameter(torch.randn(64, 48))
    opt = MasterWeightAdamW([w], lr=1e-3)
    w.grad = torch.randn(64, 48).to(torch.bfloat16)
    opt.step()                                      # the first step creates the state
    w.grad = torch.randn(64, 48).to(torch.bfloat16)
    with TrafficCounter() as c:
        opt.step()
    n, scalars = w.numel(), 4                       # the step count (fp32); a float lr goes to the kernel by value
    row = c.rows["omni2sound::adamw_step_"]
    assert row[:3] == [1, 14 * n + scalars, 14 * n]


def test_modulation_gradients_in_one_buffer_remove_exactly_the_stack():
    # unbind's backward stacks each block's six [B, T, D] modulation gradients (the final layer's two) into a new
    # [B, T, 6, D]: a read and a write of every one of them. In one buffer, the AdaLN backward writes them there
    # itself; what is left is the copy of dy the kernels write into each shift slot (two [B, T, D] per block, shift_msa
    # and shift_mlp, and the final layer's), and no allocation is counted as traffic
    cfg, B = dit_config("tiny", depth=2), 2
    stack = bench_train.audit_step(cfg, B, 1.0, {}, modulation_grad_buffer=False)
    buf = bench_train.audit_step(cfg, B, 1.0, {}, modulation_grad_buffer=True)
    unit = B * cfg.num_frames(1.0) * cfg.hidden_dim * 2                      # one bf16 [B, T, D]
    n = 6 * cfg.depth + 2                                                     # modulation slices
    assert stack["layout"][1] - buf["layout"][1] == n * unit                  # read
    assert stack["layout"][2] - buf["layout"][2] == n * unit                  # written
    gated, modulate = "omni2sound::gated_residual_adaln_backward", "omni2sound::adaln_modulate_backward"
    assert buf[gated][1:3] == [stack[gated][1], stack[gated][2] + 2 * cfg.depth * unit]
    assert buf[modulate][1:3] == [stack[modulate][1], stack[modulate][2] + unit]
    for k in set(stack) | set(buf):
        if k not in ("layout", gated, modulate):
            assert buf.get(k) == stack.get(k), k
