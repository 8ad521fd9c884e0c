"""The CUDA-graph training step (omni2sound/graphed_step.py): its static form of the step is the plain step, reads
no device value on the host (what a capture needs; checked on the CPU, op by op), and on a GPU a replay equals the
eager step, also when the lengths and the task dropout change between replays."""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from omni2sound.conditions import Conditions
from omni2sound.flow import FlowMatching
from omni2sound.graphed_step import GraphedTrainStep
from omni2sound.model import Omni2SoundDiT, dit_config

SMALL = dict(hidden_dim=64, depth=2, num_heads=2, latent_dim=4, video_dim=8, sync_dim=6, text_dim=12,
             max_text_tokens=16, max_duration=4.0)


def small_model(seed=0):
    torch.manual_seed(seed)
    model = Omni2SoundDiT(dit_config("tiny", **SMALL))
    with torch.no_grad():                     # adaLN-Zero makes a fresh model the identity; give every weight a value
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def batch(B=4, T=23, Lt=5, Lv=9, Ts=21, text_lens=(5, 0, 3, 2), video_lens=(9, 9, 0, 4), seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    cfg = dit_config("tiny", **SMALL)
    vl = torch.tensor(video_lens)
    cond = Conditions(text_tokens=torch.randn(B, Lt, cfg.text_dim, generator=g), text_lens=torch.tensor(text_lens),
                      video_tokens=torch.randn(B, Lv, cfg.video_dim, generator=g), video_lens=vl,
                      sync=torch.randn(B, Ts, cfg.sync_dim, generator=g) * (vl > 0).float()[:, None, None],
                      duration=torch.full((B,), 0.9))
    return torch.randn(B, T, cfg.latent_dim, generator=g).to(device), cond.to(device)


def plain_step(model, opt, flow, x1, cond, draws):
    opt.zero_grad(set_to_none=True)
    loss, _ = flow.loss(model, x1, cond, draws=draws)
    loss.backward()
    opt.step()
    return loss.detach()


def test_static_prepare_matches_the_plain_forward_and_grads():
    model, (x1, cond) = small_model(), batch()
    x, t = torch.randn_like(x1), torch.rand(x1.shape[0])
    outs = []
    for static in (False, True):
        model.zero_grad(set_to_none=True)
        v = model.predict_velocity(x, t, model.prepare_conditions(cond, x.shape[1], static=static))
        (v * torch.linspace(-1, 1, v.numel()).view_as(v)).sum().backward()
        outs.append((v.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (v0, g0), (v1, g1) = outs
    torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)


def test_static_prepare_still_checks_shapes_and_refuses_sampling():
    model, (_, cond) = small_model(), batch()
    bad = Conditions(**{**cond.__dict__, "text_tokens": cond.text_tokens[..., :-1]})
    with pytest.raises(ValueError, match="channels"):
        model.prepare_conditions(bad, 23, static=True)
    with pytest.raises(ValueError, match="static is for training"):
        model.prepare_conditions(cond, 23, sampling=True, static=True)


class NoHostReads(TorchDispatchMode):
    """Fails on any op that hands a device value to the host or has a value-dependent output shape."""
    BANNED = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "item", "equal", "is_nonzero")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        indices = args[1] if name == "index" and len(args) > 1 else []
        if name in self.BANNED or any(i is not None and i.dtype == torch.bool for i in indices):
            raise AssertionError(f"host read inside the static step: {func}")
        return func(*args, **(kwargs or {}))


def test_static_step_reads_no_device_value_on_the_host():
    # what a CUDA-graph capture refuses (a sync), found op by op on the CPU: the graphed step's body
    model, (x1, cond) = small_model(), batch()
    # SGD, not AdamW: a CPU AdamW reads its step count on the host (capturable=True is for GPUs only); on a GPU the
    # step takes AdamW(capturable=True), which torch keeps free of host reads
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    step = GraphedTrainStep(model, opt)
    draws = FlowMatching().draw(x1, torch.Generator().manual_seed(0))
    step._step(x1, cond, draws)                 # the momentum buffers are created on the first step
    with NoHostReads():
        step._step(x1, cond, draws)
    # and the mode does catch the plain step's syncs (the packing's max length, the conditions' checks)
    with pytest.raises(AssertionError, match="host read"):
        with NoHostReads():
            FlowMatching().loss(model, x1, cond, draws=draws)


def test_graphed_step_off_gpu_is_the_plain_step():
    flow = FlowMatching()
    model = small_model()
    twin = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt_twin = torch.optim.AdamW(twin.parameters(), lr=1e-3)
    step = GraphedTrainStep(model, opt, flow)
    for i, (tl, vl) in enumerate((((5, 0, 3, 2), (9, 9, 0, 4)), ((0, 0, 0, 0), (9, 1, 2, 0)))):
        x1, cond = batch(text_lens=tl, video_lens=vl, seed=i)
        draws = flow.draw(x1, torch.Generator().manual_seed(i))
        loss, logs = step(x1, cond, draws=draws)
        want = plain_step(twin, opt_twin, flow, x1, cond, draws)
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)
        assert set(logs) >= {"loss", "loss_bin0"}
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("fresh", [True, False])
def test_warm_up_leaves_weights_and_optimiser_as_it_found_them(fresh):
    from omni2sound.graphed_step import _optimizer_untouched
    flow, model, (x1, cond) = FlowMatching(), small_model(), batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    draws = flow.draw(x1, torch.Generator().manual_seed(0))
    if not fresh:                                   # a resumed optimiser: its state must come back unchanged
        plain_step(model, opt, flow, x1, cond, draws)
    weights = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    with _optimizer_untouched(opt):
        for _ in range(2):
            plain_step(model, opt, flow, x1, cond, draws)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    after = opt.state_dict()
    assert [g["lr"] for g in after["param_groups"]] == [1e-3]
    for i, st in after["state"].items():
        for k, v in st.items():
            want = state["state"][i][k] if not fresh else torch.zeros_like(v)
            assert torch.equal(v, want), (i, k)


def test_graphed_step_rejects_bad_conditions_before_the_step():
    model, (x1, cond) = small_model(), batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    cond.text_tokens[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        GraphedTrainStep(model, opt)(x1, cond, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# --------------------------------------------------------------------------------------------------
# GPU (the lead's run)
# --------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_gpu_replays_equal_the_eager_step(autocast):
    # the same draws into a replayed graph and into the eager static step on a twin model: the same losses and
    # weights after steps with new lengths, a dropped modality and new values each time
    flow = FlowMatching()
    model = small_model().cuda()
    twin = copy.deepcopy(model)
    mk = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True, capturable=True)  # noqa: E731
    graphed = GraphedTrainStep(model, mk(model), flow, autocast_dtype=autocast)       # warm-up changes nothing
    eager = GraphedTrainStep(twin, mk(twin), flow, autocast_dtype=autocast, graphs=False)
    lens = [((5, 0, 3, 2), (9, 9, 0, 4)), ((0, 0, 0, 0), (9, 1, 2, 0)), ((5, 5, 5, 5), (0, 0, 0, 0))]
    for i, (tl, vl) in enumerate(lens):
        x1, cond = batch(text_lens=tl, video_lens=vl, seed=i, device="cuda")
        draws = flow.draw(x1, torch.Generator(device="cuda").manual_seed(i))
        loss, _ = graphed(x1, cond, draws=draws)
        want, _ = eager(x1, cond, draws=draws)
        tol = dict(rtol=1e-4, atol=1e-5) if autocast is None else dict(rtol=2e-2, atol=2e-3)
        torch.testing.assert_close(loss, want, **tol)
    assert len(graphed.graphs) == 1
    tol = dict(rtol=1e-4, atol=1e-5) if autocast is None else dict(rtol=2e-2, atol=2e-3)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, **tol, msg=name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_needs_a_capturable_optimiser():
    model = small_model().cuda()
    with pytest.raises(ValueError, match="capturable"):
        GraphedTrainStep(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
