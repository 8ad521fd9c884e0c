"""Rectified flow: the time convention, the loss, the samplers, CFG formulas, optimised == plain sampling,
and a tiny DiT overfit on a handful of latents that the sampler reproduces from their conditions."""
import math

import pytest
import torch
from test_model import make_cond, one_thread, small_model  # noqa: F401  (autouse fixture)

from omni2sound.conditions import Conditions
from omni2sound.flow import FlowConfig, FlowMatching, cfg_conditions, combine_guidance, integrate, time_grid


class PointModel(torch.nn.Module):
    """The exact velocity field when the data is one point x1*: v(x, t) = (x1* - x) / (1 - t)."""

    def __init__(self, target):
        super().__init__()
        self.target = target

    def forward(self, x_t, t, cond):
        return (self.target - x_t) / (1 - t).view(-1, 1, 1)


def test_time_convention_noise_at_0_data_at_1():
    target = torch.randn(2, 5, 3)
    x0 = torch.randn(2, 5, 3)
    model = PointModel(target)
    # Euler's last step from t = 1 - dt lands exactly on x1* (Heun would evaluate this field at t = 1,
    # where it is singular; a learned field is not)
    out = integrate(lambda x, t: model(x, t, None), x0, steps=4, method="euler")
    torch.testing.assert_close(out, target)
    ts = time_grid(5)
    assert ts[0] == 0 and ts[-1] == 1
    # the loss of the exact field is zero: the target velocity is x1 - x0 with x_t = (1 - t) x0 + t x1
    cond = make_cond(B=2)
    loss, logs = FlowMatching().loss(model, target, cond, generator=torch.Generator().manual_seed(0))
    assert loss.item() < 1e-8 and set(logs) == {"loss", "loss_bin0", "loss_bin1", "loss_bin2", "loss_bin3"}


def test_heun_is_second_order_and_euler_first():
    # dx/dt = -x from x0 = 1: x(1) = e^-1
    f = lambda x, t: -x  # noqa: E731
    x0 = torch.ones(1, 1, 1, dtype=torch.float64)
    err = {m: [abs(integrate(f, x0, n, m).item() - math.exp(-1)) for n in (8, 16)] for m in ("euler", "heun")}
    assert 1.8 < err["euler"][0] / err["euler"][1] < 2.2
    assert 3.6 < err["heun"][0] / err["heun"][1] < 4.4
    with pytest.raises(ValueError, match="sampler"):
        integrate(f, x0, 2, "rk4")
    with pytest.raises(ValueError, match="steps"):
        integrate(f, x0, 0)


def test_logit_normal_time_sampling():
    fm = FlowMatching(FlowConfig(logit_mean=0.3, logit_std=0.7))
    t = fm.sample_t(20000, generator=torch.Generator().manual_seed(0))
    assert ((t > 0) & (t < 1)).all()
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() - 0.3) < 0.03 and abs(logit.std().item() - 0.7) < 0.03
    # same generator seed, same draw
    t2 = fm.sample_t(20000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, t2)


def test_cfg_batch_and_formulas():
    cond = make_cond()
    batch, k = cfg_conditions(cond, (4.0, 4.0))
    assert k == 2 and batch.batch_size == 8 and (batch.text_lens[4:] == 0).all() and (batch.video_lens[4:] == 0).all()
    assert (batch.sync[4:] == 0).all()
    batch, k = cfg_conditions(cond, (2.0, 5.0))
    assert k == 3 and (batch.text_lens[4:8] == 0).all() and torch.equal(batch.video_lens[4:8], cond.video_lens)
    assert cfg_conditions(cond, None)[1] == 1
    v_c, v_v, v_u = torch.randn(3, 2, 4, 3).unbind(0)
    torch.testing.assert_close(combine_guidance(torch.cat([v_c, v_u]), 2, (3.0, 3.0)), v_u + 3 * (v_c - v_u))
    got = combine_guidance(torch.cat([v_c, v_v, v_u]), 3, (2.0, 5.0))
    torch.testing.assert_close(got, v_u + 2 * (v_v - v_u) + 5 * (v_c - v_v))
    # equal scales reduce the three-way form to the joint one
    torch.testing.assert_close(combine_guidance(torch.cat([v_c, v_v, v_u]), 3, (3.0, 3.0)),
                               combine_guidance(torch.cat([v_c, v_u]), 2, (3.0, 3.0)))


@pytest.mark.parametrize("guidance,method", [(None, "euler"), (3.0, "euler"), ((2.0, 4.0), "heun")])
def test_optimised_sampling_equals_plain(guidance, method):
    model, cond = small_model(), make_cond()
    fm = FlowMatching()
    a = fm.sample(model, cond, 8, steps=3, method=method, guidance=guidance, seed=3)
    b = fm.sample(model, cond, 8, steps=3, method=method, guidance=guidance, seed=3, plain=True)
    assert a.shape == (4, 8, 4) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # seeds make results reproducible, different seeds differ
    torch.testing.assert_close(fm.sample(model, cond, 8, steps=3, method=method, guidance=guidance, seed=3), a)
    assert (fm.sample(model, cond, 8, steps=3, method=method, guidance=guidance, seed=4) - a).abs().max() > 1e-3


def test_sample_without_video_and_text():
    model = small_model()
    cond = make_cond(B=2, text_lens=[0, 0], video_lens=[0, 0])
    out = FlowMatching().sample(model, cond, 6, steps=2, guidance=2.0, seed=0)
    assert out.shape == (2, 6, 4) and torch.isfinite(out).all()
    # with no condition at all, CFG changes nothing (cond == uncond)
    torch.testing.assert_close(out, FlowMatching().sample(model, cond, 6, steps=2, guidance=None, seed=0),
                               atol=1e-5, rtol=1e-5)


def test_overfit_handful_of_latents_reproduced_from_conditions():
    """Three latents, each tied to one condition (text, video, both); after training the sampler must
    return each latent from its own condition and fresh noise (the flow, loss and sampler agree)."""
    torch.manual_seed(0)
    model = small_model(perturb=False, hidden_dim=64, depth=2).train()
    T, C = 6, 4
    targets = torch.randn(3, T, C)
    cond = make_cond(B=3, Lt=3, Lv=4, Ts=8, text_lens=[3, 0, 3], video_lens=[0, 4, 4], seed=11)
    fm = FlowMatching()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    steps = 800
    # The learning rate decays to 0 (cosine): at a constant 3e-3 Adam kept bouncing and the end point was chaotic, the
    # text-only latent (cross-attention alone, zero-initialised) landing anywhere from 0.012 to 0.23 against the bar
    # 0.079 with the same math on different backends (rounding only). With the decay every backend mix tried lands at
    # <= 0.002 (reference and fused q/k norms, 2026-12-04).
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(0)
    reps = 8  # several noise draws per latent per step: a lower-variance loss, fewer steps
    big = Conditions.cat([cond] * reps)
    for _ in range(steps):
        loss, _ = fm.loss(model, targets.repeat(reps, 1, 1), big, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    out = fm.sample(model, cond, T, steps=20, guidance=None, seed=123)
    err = (out - targets).pow(2).mean((1, 2))
    gap = torch.cdist(targets.flatten(1), targets.flatten(1)).pow(2).div(T * C)
    assert loss.item() < 0.5, loss.item()  # from ~2 at the start (|x1 - x0|^2 per channel)
    assert (err < 0.05 * gap[gap > 0].min()).all(), (err, gap)  # each lands on its own latent
