"""The AdamW step on fp32 master weights with bf16 copies: the kernels against the reference and torch's AdamW, the bf16
copy bit for bit, the optimiser against torch.optim.AdamW, and a bf16-copy training run against autocast's."""
import pytest
import torch
from recording import OpLog

from omni2sound import ops
from omni2sound.ops._checks import OpInputError
from omni2sound.optim import MasterWeightAdamW, holds_bf16_weights, training_autocast

HYPER = dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def _state(n, gdtype):
    p = torch.randn(n)
    g = torch.randn(n).to(gdtype)
    m = 0.1 * torch.randn(n)
    v = 0.01 * torch.rand(n)
    return p, g, m, v


def _backends():
    from omni2sound.ops._dispatch import triton_available
    return ["cpu", "reference"] + (["triton"] if triton_available("cpu") else [])   # triton: its interpreter


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [0, 1, 37, 4099])
def test_step_matches_torch_adamw_and_copy_is_bit_exact(backend, gdtype, n):
    p, g, m, v = _state(n, gdtype)
    step = torch.tensor(3.0)
    # torch's AdamW on the same state, at the same step count (its step is counted before the update)
    ref = torch.nn.Parameter(p.clone())
    ref.grad = g.float()
    opt = torch.optim.AdamW([ref], lr=1e-2, betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                            weight_decay=HYPER["weight_decay"], foreach=False)
    opt.state[ref] = {"step": torch.tensor(2.0), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    opt.step()
    copy = torch.full((n,), float("nan"), dtype=torch.bfloat16)
    with ops.use_backend(adamw=backend):
        ops.adamw_step_(p, g, m, v, copy, step, 1e-2, **HYPER)
    torch.testing.assert_close(m, opt.state[ref]["exp_avg"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(v, opt.state[ref]["exp_avg_sq"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(p, ref.detach(), rtol=2e-6, atol=2e-6)
    assert torch.equal(copy.view(torch.int16), p.to(torch.bfloat16).view(torch.int16))     # the copy, bit for bit


def test_cpu_kernel_equals_reference_with_a_tensor_lr_and_no_copy():
    p, g, m, v = _state(1000, torch.bfloat16)
    q, mm, vv = p.clone(), m.clone(), v.clone()
    lr = torch.tensor(3e-3)
    with ops.use_backend(adamw="cpu"):
        ops.adamw_step_(p, g, m, v, None, torch.tensor(1.0), lr, **HYPER)
    with ops.use_backend(adamw="reference"):
        ops.adamw_step_(q, g, mm, vv, None, torch.tensor(1.0), lr, **HYPER)
    torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m, mm, rtol=1e-6, atol=1e-7)


def test_cpu_kernel_takes_a_float_lr_as_the_fp32_tensor_holding_it():
    """A float lr reaches the C++ kernel by value, rounded to fp32 as a tensor holding it would be: bit for bit."""
    p, g, m, v = _state(513, torch.bfloat16)
    q, mm, vv = p.clone(), m.clone(), v.clone()
    w, ww = (torch.empty(513, dtype=torch.bfloat16) for _ in range(2))
    lr = 3e-3 * (1 + float(torch.rand(())))         # not an fp32 number
    with ops.use_backend(adamw="cpu"):
        ops.adamw_step_(p, g, m, v, w, torch.tensor(2.0), lr, **HYPER)
        ops.adamw_step_(q, g, mm, vv, ww, torch.tensor(2.0), torch.tensor(lr), **HYPER)
    for a, b in ((p, q), (m, mm), (v, vv), (w.view(torch.int16), ww.view(torch.int16))):
        assert torch.equal(a, b)


def test_bad_arguments_fail_clearly():
    p, g, m, v = _state(8, torch.float32)
    with pytest.raises(OpInputError, match="param must be a contiguous float32"):
        ops.adamw_step_(p.bfloat16(), g, m, v, None, torch.tensor(1.0), 1e-3, **HYPER)
    with pytest.raises(OpInputError, match="copy must be a contiguous bfloat16"):
        ops.adamw_step_(p, g, m, v, torch.empty(8), torch.tensor(1.0), 1e-3, **HYPER)
    with pytest.raises(OpInputError, match="exp_avg is"):
        ops.adamw_step_(p, g, m[:4], v, None, torch.tensor(1.0), 1e-3, **HYPER)
    with pytest.raises(OpInputError, match="beta2"):
        ops.adamw_step_(p, g, m, v, None, torch.tensor(1.0), 1e-3, **{**HYPER, "beta2": 1.0})


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.GELU(), torch.nn.LayerNorm(32),
                               torch.nn.Linear(32, 5))


def test_optimizer_holds_copies_and_its_state_dict_is_torch_adamws(tmp_path):
    model = _mlp()
    fp32 = {k: v.clone() for k, v in model.state_dict().items()}
    opt = MasterWeightAdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    assert model[0].weight.dtype == torch.bfloat16 and model[0].bias.dtype == torch.float32
    assert holds_bf16_weights(model)
    sd = opt.master_state_dict(model)
    assert all(torch.equal(sd[k], fp32[k]) for k in fp32)                 # the masters are the fp32 weights
    x = torch.randn(7, 12)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        loss.backward()
        assert model[0].weight.grad.dtype == torch.bfloat16
        opt.step()
        opt.zero_grad(set_to_none=True)
        for p, w in opt.copies.items():
            assert w.data_ptr() == p.data_ptr()
            assert torch.equal(w, opt.masters[p].to(torch.bfloat16))
    # torch's AdamW takes this state dict (same keys and index layout) and its moments stay fp32 on the way back
    state = opt.state_dict()
    torch_opt = torch.optim.AdamW(_mlp().parameters(), lr=1e-2)
    torch_opt.load_state_dict(state)
    model2 = _mlp(1)
    opt2 = MasterWeightAdamW(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(torch_opt.state_dict())
    for p, p_ref in zip(model2.parameters(), model.parameters()):
        for k in ("exp_avg", "exp_avg_sq"):
            assert opt2.state[p][k].dtype == torch.float32
            assert torch.equal(opt2.state[p][k], opt.state[p_ref][k])
    opt.swap_out()
    assert all(p.dtype == torch.float32 for p in model.parameters()) and not holds_bf16_weights(model)


def test_a_step_makes_no_tensor_per_weight():
    """After the first step (which creates the state) a step is the step counts' increment and one fused op per
    weight: no learning-rate tensor nor a stand-in for a missing bf16 copy per weight."""
    model = _mlp()
    opt = MasterWeightAdamW(model.parameters(), lr=1e-2)
    for s in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.randn(3, 12)).float().square().mean().backward()
        with OpLog() as rec:
            opt.step()
        opt.zero_grad(set_to_none=True)
    assert rec.ops == {"aten._foreach_add_.Scalar": 1, "omni2sound.adamw_step_.default": len(list(model.parameters()))}


def test_bf16_copies_train_like_autocast_on_fp32_weights():
    """The DiT, 4 steps: bf16 copies + MasterWeightAdamW against fp32 weights under autocast + torch's AdamW."""
    from omni2sound.flow import FlowMatching
    from tests.test_graphed_step import batch, small_model

    x1, cond = batch()
    w0 = {k: v.clone() for k, v in small_model().state_dict().items()}
    losses, weights = [], []
    for mode in ("autocast", "copies"):
        model = small_model()
        if mode == "autocast":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        else:
            opt = MasterWeightAdamW(model.parameters(), lr=1e-3)
        run = []
        for s in range(4):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, _ = FlowMatching().loss(model, x1, cond, generator=torch.Generator().manual_seed(s))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            run.append(float(loss.detach()))
        losses.append(run)
        weights.append(opt.master_state_dict(model) if mode == "copies" else model.state_dict())
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
    for k, a in weights[0].items():
        assert weights[1][k].dtype == a.dtype
        # AdamW's normalised steps move a weight of tiny, noisy gradient by up to lr a step either way, so the test
        # is on the direction of each weight's total update (cosine; 0.997+ seen) and on the 4-step bound
        da, db = (a - w0[k]).flatten().double(), (weights[1][k] - w0[k]).flatten().double()
        assert float(da @ db) >= 0.99 * float(da.norm() * db.norm()), k
        assert float((weights[1][k] - a).abs().max()) <= 2 * 4 * 1e-3, k


def test_training_autocast_rule():
    """bf16 autocast on a GPU; on the CPU only with bf16 weight copies; none without a dtype; the cache flag kept."""
    import contextlib
    import warnings

    for dev in ("cpu", torch.device("cpu"), "cuda", "cuda:0", torch.device("cuda", 0)):
        for bf16_weights in (False, True):
            for cache in (None, False):
                assert isinstance(training_autocast(dev, None, bf16_weights, cache), contextlib.nullcontext)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")     # "cuda" without CUDA: torch disables it, with a warning
                    ctx = training_autocast(dev, torch.bfloat16, bf16_weights, cache)
                kind = torch.device(dev).type
                if kind == "cpu" and not bf16_weights:
                    assert isinstance(ctx, contextlib.nullcontext)
                    continue
                assert isinstance(ctx, torch.autocast), (dev, bf16_weights)
                assert (ctx.device, ctx.fast_dtype) == (kind, torch.bfloat16)
                assert ctx._cache_enabled == (torch.is_autocast_cache_enabled() if cache is None else cache)
    with training_autocast("cpu", torch.bfloat16, True, cache_enabled=False):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert not torch.is_autocast_cache_enabled()
    assert not torch.is_autocast_enabled("cpu") and torch.is_autocast_cache_enabled()


@pytest.mark.cuda
def test_gpu_kernel_and_a_graphed_step_with_bf16_copies():
    """On a GPU: the Triton step against the reference (the copy bit for bit), and the CUDA-graph step of a DiT with
    bf16 copies against the same step run eagerly."""
    from omni2sound.flow import FlowMatching
    from omni2sound.graphed_step import GraphedTrainStep
    from tests.test_graphed_step import batch, small_model

    dev = "cuda"
    p, g, m, v = (t.to(dev) for t in _state(100_003, torch.bfloat16))
    q, mm, vv = p.clone(), m.clone(), v.clone()
    copy = torch.empty(p.shape, dtype=torch.bfloat16, device=dev)
    step, lr = torch.tensor(5.0, device=dev), torch.tensor(1e-3, device=dev)
    with ops.use_backend(adamw="triton"):
        ops.adamw_step_(p, g, m, v, copy, step, lr, **HYPER)
    with ops.use_backend(adamw="reference"):
        ops.adamw_step_(q, g, mm, vv, None, step, lr, **HYPER)
    torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(m, mm, rtol=1e-6, atol=1e-7)
    assert torch.equal(copy.view(torch.int16), p.to(torch.bfloat16).view(torch.int16))

    x1, cond = batch(device=dev)
    losses = []
    for graphs in (False, True):
        model = small_model().to(dev)
        opt = MasterWeightAdamW(model.parameters(), lr=1e-3)
        step_fn = GraphedTrainStep(model, opt, FlowMatching(), graphs=graphs)
        run = []
        for s in range(4):
            loss, _ = step_fn(x1, cond, generator=torch.Generator(device=dev).manual_seed(s))
            run.append(float(loss))
        losses.append(run)
        for p_, w in opt.copies.items():
            assert torch.equal(w, opt.masters[p_].to(torch.bfloat16))
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
