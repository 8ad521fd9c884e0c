"""The Omni2Sound DiT: shapes for every task in one batch, branch masking, adaLN-Zero, fused == reference
ops, save/load, presets and clear errors. Small configs only (CPU)."""
import importlib
import json
import math

import pytest
import torch
from test_adaln import StackShapes

from omni2sound import ops
from omni2sound.conditions import Conditions
from omni2sound.model import DIT_PRESETS, Omni2SoundDiT, dit_config, resample_sync
from omni2sound.ops import use_backend
from omni2sound.sampling import PreparedConditions


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: on a shared 2-core box a second intra-op thread only adds contention
    (measured 10-30x slower under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SMALL = dict(hidden_dim=64, depth=2, num_heads=2, latent_dim=4, video_dim=8, sync_dim=6, text_dim=12,
             max_text_tokens=16, max_duration=4.0)


def small_model(seed=0, perturb=True, **kw):
    torch.manual_seed(seed)
    model = Omni2SoundDiT(dit_config("tiny", **{**SMALL, **kw})).eval()
    if perturb:  # adaLN-Zero makes a fresh model the identity; give every weight a value
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model


def make_cond(B=4, Lt=5, Lv=9, Ts=21, text_lens=None, video_lens=None, duration=0.9, seed=1, cfg=None):
    g = torch.Generator().manual_seed(seed)
    cfg = cfg or dit_config("tiny", **SMALL)
    text_lens = torch.tensor(text_lens if text_lens is not None else [Lt, 0, 3, 0][:B])
    video_lens = torch.tensor(video_lens if video_lens is not None else [Lv, Lv, 0, 0][:B])
    sync = torch.randn(B, Ts, cfg.sync_dim, generator=g) * (video_lens > 0).float()[:, None, None]
    return Conditions(text_tokens=torch.randn(B, Lt, cfg.text_dim, generator=g), text_lens=text_lens,
                      video_tokens=torch.randn(B, Lv, cfg.video_dim, generator=g), video_lens=video_lens,
                      sync=sync, duration=torch.full((B,), duration))


def pick(cond: Conditions, i: int) -> Conditions:
    return Conditions(**{k: getattr(cond, k)[i:i + 1] for k in
                         ("text_tokens", "text_lens", "video_tokens", "video_lens", "sync", "duration")})


def test_all_tasks_in_one_batch_shapes_and_independence():
    # rows: VT2A, V2A, T2A, unconditional (the CFG null pass)
    model, cond = small_model(), make_cond()
    x, t = torch.randn(4, 23, 4), torch.rand(4)
    with torch.no_grad():
        v = model(x, t, cond)
        assert v.shape == (4, 23, 4) and torch.isfinite(v).all()
        for i in range(4):  # a sample's output depends only on its own conditions (packing is right)
            torch.testing.assert_close(model(x[i:i + 1], t[i:i + 1], pick(cond, i)), v[i:i + 1],
                                       atol=1e-5, rtol=1e-5)


def test_absent_modality_is_ignored_and_sync_zeroed_without_video():
    model, cond = small_model(), make_cond()
    x, t = torch.randn(4, 11, 4), torch.rand(4)
    with torch.no_grad():
        v = model(x, t, cond)
        other = make_cond(seed=7)  # new token values everywhere, same lengths
        mixed = Conditions(text_tokens=torch.where(cond.text_lens.view(-1, 1, 1) > 0, cond.text_tokens,
                                                   other.text_tokens),
                           text_lens=cond.text_lens,
                           video_tokens=torch.where(cond.video_lens.view(-1, 1, 1) > 0, cond.video_tokens,
                                                    other.video_tokens),
                           video_lens=cond.video_lens,
                           sync=torch.where(cond.video_lens.view(-1, 1, 1) > 0, cond.sync, 5 + other.sync),
                           duration=cond.duration)
        torch.testing.assert_close(model(x, t, mixed), v, atol=1e-6, rtol=1e-6)
        # ...and the present ones do matter
        assert (model(x, t, make_cond(seed=8))[:3] - v[:3]).abs().max() > 1e-4
        # padding beyond a sample's length is never read
        padded = Conditions.cat([cond, make_cond(Lt=9, Lv=12, seed=3)])
        torch.testing.assert_close(model(torch.cat([x, x]), torch.cat([t, t]), padded)[:4], v,
                                   atol=1e-5, rtol=1e-5)


def test_adaln_zero_init_is_identity_and_all_params_learn():
    model = small_model(perturb=False).train()
    cond = make_cond()
    x, t = torch.randn(4, 7, 4), torch.rand(4)
    v = model(x, t, cond)
    assert torch.count_nonzero(v) == 0  # the final projection and every gate start at zero
    # after a perturbation every parameter receives a gradient (nothing is dead or disconnected)
    model = small_model().train()
    model(x, t, cond).pow(2).mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
            or (p.grad == 0).all()]
    assert not dead, dead


def test_prepared_path_equals_forward_and_fused_equals_reference_ops():
    model, cond = small_model(), make_cond()
    x, t = torch.randn(4, 13, 4), torch.rand(4)
    with torch.no_grad():
        prep = model.prepare_conditions(cond, 13)
        assert isinstance(prep, PreparedConditions) and len(prep.sync_mod) == 2
        assert all(m.shape == (4, 13, 6, 64) for m in prep.sync_mod)
        v = model.predict_velocity(x, t, prep)
        torch.testing.assert_close(v, model(x, t, cond))
        with use_backend("reference"):
            torch.testing.assert_close(model(x, t, cond), v, atol=1e-5, rtol=1e-5)
        # prepared conditions can be refilled in place (static buffers for CUDA graphs)
        prep2 = model.prepare_conditions(make_cond(seed=5), 13)
        prep.copy_(prep2)
        torch.testing.assert_close(model.predict_velocity(x, t, prep), model.predict_velocity(x, t, prep2))
        with pytest.raises(ValueError, match="prepared for"):
            model.predict_velocity(x[:, :12], t, prep)


@pytest.mark.parametrize("text_lens,video_lens,rows", [
    ([5, 0, 3, 0], [9, 9, 0, 0], 3),      # VT2A, V2A, T2A, unconditional: the last row skips
    ([5, 0, 0, 0], [0, 0, 0, 0], 1),      # a T2A CFG batch padded with empty rows
    ([0, 0, 0, 0], [0, 0, 0, 0], 0),      # nothing to attend to at all
    ([0, 0, 3, 2], [0, 0, 0, 9], 4),      # empty rows that do not trail: nothing skipped
])
def test_skipping_empty_cross_attention_rows_is_exact(text_lens, video_lens, rows):
    model = small_model()
    cond = make_cond(text_lens=text_lens, video_lens=video_lens)
    x, t = torch.randn(4, 11, 4), torch.rand(4)
    with torch.no_grad():
        full = model.prepare_conditions(cond, 11)
        skip = model.prepare_conditions(cond, 11, sampling=True)
        assert full.cross_rows == 4 and skip.cross_rows == rows
        for backend in ops.available_backends("cross_attention", torch.device("cpu")):
            with use_backend(backend):
                torch.testing.assert_close(model.predict_velocity(x, t, skip), model.predict_velocity(x, t, full),
                                           atol=1e-6, rtol=1e-6)
    assert skip.signature() != full.signature() or rows == 4     # a captured graph is never reused across them


def test_sampling_workspace_is_reused_and_exact(monkeypatch):
    """CPU sampling with aten's GEMMs writes the qkv projection and the MLP hidden activation into per-request
    buffers that every block and step reuses; the velocity is the same as without them, and a gradient pass never
    uses them. With oneDNN's GEMMs (the default where available) no buffer is made."""
    model, cond = small_model(), make_cond()
    x, t = torch.randn(4, 13, 4), torch.rand(4)
    if ops.select_backend("linear", torch.device("cpu")) == "onednn":
        monkeypatch.setattr(importlib.import_module("omni2sound.ops.linear"), "ONEDNN_MIN_MACS", 0)
        with torch.no_grad():
            prep = model.prepare_conditions(cond, 13, sampling=True)
            got = model.predict_velocity(x, t, prep)
            got2 = model.predict_velocity(x, 1 - t, prep)
            plain = model.prepare_conditions(cond, 13)
            want, want2 = model.predict_velocity(x, t, plain), model.predict_velocity(x, 1 - t, plain)
        assert prep.workspace == {}                                      # oneDNN writes new tensors: no buffers
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got2, want2, atol=1e-6, rtol=1e-6)
        monkeypatch.undo()
    with torch.no_grad(), ops.use_backend(linear="reference"):
        plain = model.prepare_conditions(cond, 13)
        prep = model.prepare_conditions(cond, 13, sampling=True)
        assert plain.workspace is None and prep.workspace == {}
        want = model.predict_velocity(x, t, plain)
        got = model.predict_velocity(x, t, prep)
        bufs = {k: (v.data_ptr(), tuple(v.shape)) for k, v in prep.workspace.items()}
        assert bufs == {"qkv": (bufs["qkv"][0], (4 * 13, 3 * 64)), "mlp_hidden": (bufs["mlp_hidden"][0], (4 * 13, 256))}
        again = model.predict_velocity(x, 1 - t, prep)                   # a second step: the same buffers
        assert {k: (v.data_ptr(), tuple(v.shape)) for k, v in prep.workspace.items()} == bufs
        again_plain = model.predict_velocity(x, 1 - t, plain)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(again, again_plain, atol=1e-6, rtol=1e-6)
    # with gradients on, the buffers are bypassed (autograd needs every block's activations)
    v = model.predict_velocity(x, t, prep)
    v.pow(2).sum().backward()
    torch.testing.assert_close(v.detach(), want, atol=1e-6, rtol=1e-6)
    assert model.blocks[0].mlp[0].weight.grad is not None


def test_low_precision_forward_close_to_fp32():
    model, cond = small_model(), make_cond()
    x, t = torch.randn(4, 9, 4), torch.rand(4)
    with torch.no_grad():
        v32 = model(x, t, cond)
        v16 = model.to(torch.bfloat16)(x, t, cond)
    assert v16.dtype == torch.bfloat16
    assert (v16.float() - v32).abs().max() <= 0.05 * v32.abs().max() + 1e-3


@pytest.mark.parametrize("backend", [None, "reference"])       # None: the default (C++ AdaLN on the CPU)
def test_bf16_autocast_training_step(backend):
    # The trainer runs the model under bf16 autocast on a GPU: fp32 parameters next to bf16 activations reach the
    # fused ops and the condition packing (this failed on an H100 with "video (float32) and text (bfloat16) must
    # share dtype"). CPU autocast follows the same rules for linear layers.
    from omni2sound.flow import FlowMatching
    model, cond = small_model(), make_cond()
    x1 = torch.randn(4, 11, 4)
    with use_backend(backend):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = FlowMatching().loss(model, x1, cond, generator=torch.Generator().manual_seed(0))
        loss.backward()
        ref, _ = FlowMatching().loss(model, x1, cond, generator=torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(loss.detach().item() - ref.detach().item()) <= 0.05 * abs(ref.detach().item()) + 1e-3   # bf16 ~ fp32
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("backend", [None, "reference", "triton"])   # None: the default (C++ AdaLN on the CPU)
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("B,T", [(4, 11), (1, 6), (3, 1)])
def test_modulation_gradients_without_the_stack_are_bit_identical(backend, autocast, B, T):
    # Every block's [B, T, 6, D] modulation (and the final layer's [B, T, 2, D]) gets its gradient from one buffer the
    # AdaLN backward writes into, not from unbind's stack: every parameter's gradient the same bits as with the stack
    if backend == "triton" and autocast:
        pytest.skip("the Triton interpreter has no bf16 arithmetic")
    from omni2sound.flow import FlowMatching
    cond = make_cond(B=B, text_lens=[5, 0, 3, 0][:B], video_lens=[9, 9, 0, 0][:B])
    x1 = torch.randn(B, T, 4)

    def grads(buffer):
        model = small_model()
        stacks = StackShapes()
        with use_backend(adaln=backend), ops.modulation_grad_buffer(buffer):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss, _ = FlowMatching().loss(model, x1, cond, generator=torch.Generator().manual_seed(0))
            with stacks:
                loss.backward()
        D = model.config.hidden_dim
        big = [s for s in stacks.shapes if s in ((B, T, 6, D), (B, T, 2, D))]
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, big

    loss_on, on, stacks_on = grads(True)
    loss_off, off, stacks_off = grads(False)
    assert torch.equal(loss_on, loss_off)
    for name in off:
        assert on[name] is not None and torch.equal(on[name], off[name]), name
    depth = len(small_model().blocks)
    assert len(stacks_off) == depth + 1
    assert stacks_on == ([] if backend != "reference" else stacks_off)   # the reference ops are autograd's own


def test_dispatch_checks_trace_under_fullgraph_compile():
    # Dynamo cannot trace the extension's pybind11 functions; the backend checks that ops dispatch runs inside a
    # compiled step (on a GPU: has_cuda for the CUDA backend) must be constants to it (this failed on an H100).
    from omni2sound import _native, ops

    def fn(x):
        flags = [_native.has_cpu(), _native.has_cuda(), _native.has_symbol("snake_forward_cuda")]
        n = sum(len(ops.available_backends(op, torch.device(d)))
                for op in ("gated_residual_adaln", "adaln_modulate", "cross_attention", "snake", "snake_residual",
                           "attention", "fp8_linear", "fp8_quantize")
                for d in ("cuda", "cpu"))
        return x * (1 + sum(int(f) for f in flags)) + n

    x = torch.randn(3)
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x), fn(x))


def test_resample_sync_linear_in_time():
    # a feature that is linear in time is reproduced exactly at the 25 Hz frame centres (24 / s in)
    Ts = 48
    times = (torch.arange(Ts) + 0.5) / 24.0
    sync = torch.stack([times, 2 * times + 1], -1)[None]              # [1, Ts, 2]
    out = resample_sync(sync, 40, 24.0, 25.0)                          # 1.6 s of frames, inside the range
    centres = (torch.arange(40) + 0.5) / 25.0
    # frame 0's centre (20 ms) lies before the first feature's (20.8 ms): held, not extrapolated
    want = torch.stack([centres, 2 * centres + 1], -1)
    torch.testing.assert_close(out[0, 1:], want[1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0, 0], sync[0, 0])
    assert resample_sync(sync[:, :0], 5, 24.0, 25.0).shape == (1, 5, 2)


def test_save_load_roundtrip_and_named_errors(tmp_path):
    model, cond = small_model(), make_cond()
    model.save_pretrained(tmp_path / "dit")
    cfg = json.loads((tmp_path / "dit" / "config.json").read_text())
    assert cfg["hidden_dim"] == 64 and cfg["text_dim"] == 12
    loaded = Omni2SoundDiT.from_pretrained(tmp_path / "dit")
    x, t = torch.randn(4, 6, 4), torch.rand(4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, cond), model(x, t, cond), atol=0, rtol=0)
    # a config that disagrees with the weights names the tensor
    cfg["latent_dim"] = 5
    (tmp_path / "dit" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="x_embed.weight"):
        Omni2SoundDiT.from_pretrained(tmp_path / "dit")
    cfg["latent_dim"], cfg["depth"] = 4, 3
    (tmp_path / "dit" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing tensors.*blocks.2"):
        Omni2SoundDiT.from_pretrained(tmp_path / "dit")
    with pytest.raises(FileNotFoundError, match="config.json"):
        Omni2SoundDiT.from_pretrained(tmp_path / "nowhere")


def test_bad_inputs_give_clear_errors():
    model = small_model()
    x, t = torch.randn(4, 6, 4), torch.rand(4)
    with pytest.raises(ValueError, match="max_text_tokens"):
        model(x, t, make_cond(Lt=20, text_lens=[20, 0, 0, 0]))
    with pytest.raises(ValueError, match="video_dim"):
        bad = make_cond()
        model(x, t, Conditions(**{**bad.__dict__, "video_tokens": torch.randn(4, 9, 3)}))
    with pytest.raises(ValueError, match="at most"):
        model(x, t, make_cond(Lv=40, video_lens=[40, 0, 0, 0]))
    with pytest.raises(ValueError, match="duration"):
        model(x, t, make_cond(duration=0.0))
    with pytest.raises(ValueError, match="unknown DiT preset"):
        dit_config("XL")
    with pytest.raises(ValueError, match="divisible"):
        dit_config("tiny", num_heads=3)


def test_presets_sizes():
    assert set(DIT_PRESETS) == {"tiny", "S", "L"}
    counts = {}
    for name in ("S", "L"):
        with torch.device("meta"):
            counts[name] = Omni2SoundDiT(DIT_PRESETS[name]).num_params()
    assert 1.2e8 < counts["S"] < 2.0e8, counts
    assert 1.0e9 < counts["L"] < 1.4e9, counts
    L = DIT_PRESETS["L"]
    assert (L.depth, L.hidden_dim, L.num_heads, L.head_dim) == (24, 1536, 24, 64)
    assert DIT_PRESETS["tiny"].num_frames(10.0) == 250 and math.isclose(DIT_PRESETS["tiny"].latent_rate, 25.0)


@pytest.mark.parametrize("video_lens", [[9, 0, 9, 0], [0, 9, 0, 0], [0, 0, 0, 0], [9, 9, 9, 9]])
def test_sampling_prepares_rows_without_video_on_one_frame(video_lens):
    """Sampling computes the per-token AdaLN modulations of rows without video (zero sync input: the same at every
    frame) on one frame and broadcasts them; they equal the full per-token computation, wherever those rows sit
    in the batch and even when their sync tensor holds garbage (it is masked by has_video)."""
    model = small_model()
    cond = make_cond(video_lens=video_lens, text_lens=[5, 3, 0, 2])
    cond.sync = torch.randn_like(cond.sync)                       # rows without video: ignored, not zero
    x, t = torch.randn(4, 17, 4), torch.rand(4)
    with torch.no_grad():
        full = model.prepare_conditions(cond, 17)
        fast = model.prepare_conditions(cond, 17, sampling=True)
        for a, b in zip(full.sync_mod + [full.final_sync_mod], fast.sync_mod + [fast.final_sync_mod]):
            assert a.shape == b.shape
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
        for i, n in enumerate(video_lens):
            if n == 0:                                            # broadcast rows: every frame the same
                assert torch.equal(fast.sync_mod[0][i], fast.sync_mod[0][i, :1].expand_as(fast.sync_mod[0][i]))
        torch.testing.assert_close(model.predict_velocity(x, t, fast), model.predict_velocity(x, t, full),
                                   atol=1e-5, rtol=1e-5)


def test_the_network_asks_no_device_or_backend():
    # which kernel runs each op is ops' choice, and what a sampling loop keeps per device (workspace, rows that skip
    # the cross-attention) is ops.sampling_plan's through omni2sound.sampling: the network's source names neither
    import inspect

    import omni2sound.model as network
    src = inspect.getsource(network)
    for asks in ("select_backend", "available_backends", "runs_on_onednn", "onednn_takes", "is_cuda", "device.type",
                 "dev.type", '"cuda"', '"cpu"', "torch.cuda"):
        assert asks not in src, asks


def test_a_bf16_step_reads_head_norm_weights_prepared_once_per_request():
    """The fused head norms read fp32 weights ([2, Dh] for the self-attention's q/k, [Dh] for the cross-attention's
    query): a bf16 model makes them in prepare_conditions, so a denoising step runs no stack and no cast of a
    weight (three small kernels per block and step otherwise), and its output is bitwise the unprepared one's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            first = args[0] if args else None
            first = first[0] if isinstance(first, (list, tuple)) and first else first      # stack / cat: a list
            self.calls.append((str(func), tuple(first.shape) if torch.is_tensor(first) else None))
            return func(*args, **(kwargs or {}))

    model, cond = small_model().to(torch.bfloat16), make_cond()
    Dh = model.config.head_dim
    x, t = torch.randn(4, 9, 4), torch.rand(4)
    with torch.no_grad():
        prep = model.prepare_conditions(cond, 9, sampling=True)
        assert [(a.dtype, tuple(a.shape), b.dtype, tuple(b.shape)) for a, b in prep.norm_w] == \
            [(torch.float32, (2, Dh), torch.float32, (Dh,))] * model.config.depth
        with Record() as rec:
            v = model.predict_velocity(x, t, prep)
        prep.norm_w = [(None, None)] * model.config.depth               # the blocks make their own
        want = model.predict_velocity(x, t, prep)
    weight_shapes = {(2, Dh), (Dh,), (1, Dh)}
    assert not [c for c in rec.calls if c[0].startswith(("aten.stack", "aten.cat")) and c[1] in weight_shapes]
    assert not [c for c in rec.calls if c[0].startswith("aten._to_copy") and c[1] in weight_shapes]
    assert torch.equal(v, want)
