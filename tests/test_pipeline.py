"""The generation API and CLI on a tiny random pipeline: every task and a batch, optimised == plain,
seeds, windowed long generation, save/load layout, precomputed features and clear errors."""
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from omni2sound.conditions import Conditions
from omni2sound.generate import main as generate_main
from omni2sound.model import Omni2SoundDiT, dit_config
from omni2sound.pipeline import Omni2SoundPipeline, PipelineConfig
from omni2sound.video import VideoError, write_video

# Small models: one intra-op thread is faster and steadier on a shared 2-core box.
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_pipeline(seed=0, max_duration=2.0):
    from omni2sound.vae import VAE_PRESETS, AudioVAE
    torch.manual_seed(seed)
    dit = Omni2SoundDiT(dit_config("tiny", hidden_dim=64, depth=2, num_heads=2, max_duration=max_duration))
    with torch.no_grad():  # adaLN-Zero makes a fresh model output zeros; give it a real function
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return Omni2SoundPipeline(dit, AudioVAE(VAE_PRESETS["tiny"]), PipelineConfig(window_overlap=0.5))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("o2s")
    tiny_pipeline().save_pretrained(root / "model")
    frames = np.zeros((40, 32, 32, 3), np.uint8) + 30
    for i in range(40):
        frames[i, 4:10, min(i, 20):min(i, 20) + 6] = (230, 60, 40)
    write_video(root / "clip.mp4", frames, fps=25)
    return root


@pytest.fixture(scope="module")
def pipe(saved):
    return Omni2SoundPipeline.from_pretrained(saved / "model")


def test_layout_and_roundtrip(saved, pipe):
    assert sorted(p.name for p in (saved / "model").iterdir()) == ["dit", "pipeline.json", "vae"]
    assert json.loads((saved / "model" / "pipeline.json").read_text())["window_overlap"] == 0.5
    ref = tiny_pipeline()
    for (k, a), (_, b) in zip(ref.dit.state_dict().items(), pipe.dit.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(FileNotFoundError, match="no dit/ folder"):
        Omni2SoundPipeline.from_pretrained(saved)


def test_generate_all_tasks_in_one_batch_optimised_equals_plain(saved, pipe):
    video = [str(saved / "clip.mp4"), str(saved / "clip.mp4"), None, None]
    text = ["a red block slides and stops", None, "a bell rings", None]   # VT2A, V2A, T2A, unconditional
    a = pipe.generate(video=video, text=text, duration=1.2, steps=3, guidance=3.0, seed=5)
    assert a.audio.shape == (4, 19200) and a.sample_rate == 16000 and torch.isfinite(a.audio).all()
    assert {"encode", "prepare", "sample", "decode", "total"} <= set(a.timings)
    b = pipe.generate(video=video, text=text, duration=1.2, steps=3, guidance=3.0, seed=5, plain=True)
    torch.testing.assert_close(a.latents, b.latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.audio, b.audio, atol=1e-5, rtol=1e-4)
    # seeds: same seed same audio, new seed new audio; separate scales run too
    c = pipe.generate(video=video[:1], text=text[:1], duration=1.2, steps=3, guidance=3.0, seed=5)
    torch.testing.assert_close(c.latents, a.latents[:1], atol=1e-5, rtol=1e-5)
    d = pipe.generate(video=video[:1], text=text[:1], duration=1.2, steps=3, guidance=(2.0, 4.0), seed=6)
    assert (d.latents - c.latents).abs().max() > 1e-3


@pytest.mark.parametrize("item", ["fused_ops", "cpu_workspace", "skip_empty_cross_rows", "conditions_once",
                                  "batched_cfg"])
@pytest.mark.parametrize("guidance", [3.0, (2.0, 4.0)])      # 2 and 3 CFG branches
def test_each_low_latency_item_off_gives_the_same_latents(pipe, item, guidance):
    """The benchmark's ablation turns one item off at a time; each is an exact rewrite, so the latents agree."""
    from omni2sound.pipeline import SamplingOptions

    feats = [torch.randn(10, pipe.dit.config.video_dim), None]
    cond = pipe.conditions_from_features(video_features=feats, text=["rain", None], duration=1.2)
    x0 = pipe.flow.noise(2, pipe.dit.config.num_frames(1.2), 16, seed=3)
    with torch.no_grad():                            # as generate runs it (the workspace is for no-grad sampling)
        full = pipe._sample(cond, x0, SamplingOptions(steps=3, guidance=guidance), {})
        off = pipe._sample(cond, x0, SamplingOptions(steps=3, guidance=guidance, **{item: False}), {})
    torch.testing.assert_close(off, full, atol=1e-5, rtol=1e-5)


def test_latent_normalisation_is_undone_before_decoding(saved, tmp_path):
    """A DiT trained on normalised latents (PipelineConfig.latent_mean / latent_std) generates z; the pipeline decodes
    z * std + mean and returns those latents. Also: a folder whose pipeline.json points at the VAE elsewhere."""
    from omni2sound.pipeline import Omni2SoundPipeline, PipelineConfig

    base = Omni2SoundPipeline.from_pretrained(saved / "model")
    C = base.dit.config.latent_dim
    mean, std = torch.linspace(-1, 1, C).tolist(), torch.linspace(0.5, 2, C).tolist()
    normed = Omni2SoundPipeline(base.dit, base.vae, PipelineConfig(latent_mean=mean, latent_std=std))
    a = base.generate(text=["rain"], duration=0.8, steps=2, guidance=2.0, seed=4)
    b = normed.generate(text=["rain"], duration=0.8, steps=2, guidance=2.0, seed=4)
    torch.testing.assert_close(b.latents, a.latents * torch.tensor(std) + torch.tensor(mean), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        want = base.vae.decode(b.latents.transpose(1, 2))[:, 0, :b.audio.shape[1]]
    torch.testing.assert_close(b.audio, want, atol=1e-5, rtol=1e-4)
    # a stage-style folder: dit/ here, the VAE one level up, named in pipeline.json
    normed.dit.save_pretrained(str(tmp_path / "stage" / "dit"))
    base.vae.save_pretrained(str(tmp_path / "vae"))
    cfg = {"vae_dir": "../vae", "latent_mean": mean, "latent_std": std}
    (tmp_path / "stage" / "pipeline.json").write_text(json.dumps(cfg))
    c = Omni2SoundPipeline.from_pretrained(tmp_path / "stage").generate(text=["rain"], duration=0.8, steps=2,
                                                                         guidance=2.0, seed=4)
    torch.testing.assert_close(c.latents, b.latents, atol=1e-5, rtol=1e-5)
    (tmp_path / "stage" / "pipeline.json").write_text(json.dumps({**cfg, "vae_dir": "../nowhere"}))
    with pytest.raises(FileNotFoundError, match="no vae/ folder"):
        Omni2SoundPipeline.from_pretrained(tmp_path / "stage")
    with pytest.raises(ValueError, match="latent_mean has 3 channels"):
        Omni2SoundPipeline(base.dit, base.vae, PipelineConfig(latent_mean=[0.0] * 3))


def test_no_video_no_text_and_shared_prompt(pipe):
    out = pipe.generate(duration=0.5, steps=2, guidance=2.0, seed=0)
    assert out.audio.shape == (1, 8000) and torch.isfinite(out.audio).all()
    out = pipe.generate(text=["a bell", "a drum", "wind"], duration=0.4, steps=1, guidance=None, seed=0)
    assert out.audio.shape == (3, 6400)


def test_windowed_generation_longer_than_training_length(pipe):
    T = pipe.dit.config.num_frames(5.0)                       # 125 frames, windows of 50 (2 s)
    starts = pipe.window_starts(T)
    assert starts[0] == 0 and starts[-1] + 50 >= T and all(s % 25 == 0 for s in starts)
    assert all(b - a <= 50 - 12 for a, b in zip(starts, starts[1:]))         # >= 0.5 s overlap
    feats = [torch.randn(40, pipe.dit.config.video_dim)]
    sync = [torch.randn(120, pipe.dit.config.sync_dim)]
    cond = pipe.conditions_from_features(video_features=feats, sync_features=sync, text=["rain"], duration=5.0)
    a = pipe.generate_from_conditions(cond, steps=2, guidance=2.0, seed=1)
    b = pipe.generate_from_conditions(cond, steps=2, guidance=2.0, seed=1, plain=True)
    assert a.audio.shape == (1, 80000) and a.latents.shape == (1, T, 16)
    torch.testing.assert_close(a.latents, b.latents, atol=1e-5, rtol=1e-5)
    # the crossfade is continuous: no jump at window edges larger than the typical frame-to-frame step
    steps = (a.latents[0, 1:] - a.latents[0, :-1]).norm(dim=-1)
    assert steps.max() < 6 * steps.median()
    # the first window alone equals a 2 s generation with the same noise and the first 2 s of features
    short = pipe.conditions_from_features(video_features=[feats[0][:16]], sync_features=[sync[0][:48]],
                                          text=["rain"], duration=2.0)
    first = pipe.generate_from_conditions(short, steps=2, guidance=2.0, seed=1)
    x0 = pipe.flow.noise(1, starts[-1] + 50, 16, seed=1)
    torch.testing.assert_close(first.latents[0, :5], pipe.flow.sample(
        pipe.dit, short, 50, steps=2, guidance=2.0, x0=x0[:, :50])[0, :5], atol=1e-5, rtol=1e-5)
    assert (first.latents[0, :25] - a.latents[0, :25]).abs().max() < 1e-4    # frames only window 0 covers


def test_guidance_keyword_and_its_cfg_alias(pipe):
    cond = pipe.conditions_from_features(video_features=[torch.randn(8, pipe.dit.config.video_dim)], text=["rain"],
                                         duration=0.8)
    a = pipe.generate_from_conditions(cond, steps=2, guidance=(2.0, 3.0), seed=1)
    b = pipe.generate_from_conditions(cond, steps=2, cfg=(2.0, 3.0), seed=1)
    torch.testing.assert_close(a.latents, b.latents, atol=0, rtol=0)
    assert (pipe.generate_from_conditions(cond, steps=2, seed=1).latents - a.latents).abs().max() > 1e-4
    with pytest.raises(TypeError, match="guidance once"):
        pipe.generate_from_conditions(cond, steps=2, guidance=2.0, cfg=3.0)
    with pytest.raises(TypeError, match="guidance once"):
        pipe.generate(text="rain", duration=0.8, steps=1, guidance=2.0, cfg=3.0)


def test_conditions_from_features_and_errors(saved, pipe):
    cfg = pipe.dit.config
    cond = pipe.conditions_from_features(video_features=[torch.randn(20, cfg.video_dim), None],
                                         sync_features=[torch.randn(60, cfg.sync_dim), torch.randn(60, cfg.sync_dim)],
                                         text=[None, "wind"], duration=1.0)
    assert cond.video_lens.tolist() == [8, 0] and cond.sync.shape == (2, 24, cfg.sync_dim)
    assert (cond.sync[1] == 0).all()                          # no video, no sync
    assert isinstance(cond, Conditions) and cond.text_lens[0] == 0 and cond.text_lens[1] > 0
    with pytest.raises(ValueError, match=r"must be \[T, 272\]"):
        pipe.conditions_from_features(video_features=[torch.randn(5, 7)], duration=1.0)
    with pytest.raises(ValueError, match="duration must be positive"):
        pipe.generate(text="x", duration=0.0)
    with pytest.raises(ValueError, match="duration must be positive"):
        pipe.generate(text="x", duration=-1.0)
    with pytest.raises(ValueError, match="max_tokens"):
        pipe.generate(text="word " * 200, duration=0.4, steps=1)
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        pipe.generate(video=str(saved / "missing.mp4"), duration=0.4, steps=1)
    (saved / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x13" * 500)
    with pytest.raises(VideoError, match="corrupt.mp4"):
        pipe.generate(video=str(saved / "corrupt.mp4"), duration=0.4, steps=1)
    with pytest.raises(ValueError, match="2 videos and 3 prompts"):
        pipe.generate(video=["a.mp4", "b.mp4"], text=["x", "y", "z"], duration=0.4)
    with pytest.raises(ValueError, match="empty batch: text is an empty list"):
        pipe.generate(text=[], duration=0.4)


def test_cli(saved, tmp_path, capsys):
    out = tmp_path / "out.wav"
    rc = generate_main(["--model", str(saved / "model"), "--video", str(saved / "clip.mp4"), "--text", "a slide",
                        "--steps", "2", "--out", str(out)])
    assert rc == 0
    wav, sr = sf.read(out)
    assert sr == 16000 and wav.shape == (25600,)               # the video's 1.6 s
    log = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert log["outputs"] == [str(out)] and "sample" in log["timings_s"]
    np.save(tmp_path / "clip.npy", np.random.randn(8, 272).astype(np.float32))
    rc = generate_main(["--model", str(saved / "model"), "--clip-features", str(tmp_path / "clip.npy"),
                        "--text", "a", "--text", "b", "--duration", "1", "--steps", "1", "--cfg", "2,3",
                        "--out", str(tmp_path / "f.flac")])
    assert rc == 0 and (tmp_path / "f.flac").exists() and (tmp_path / "f_1.flac").exists()
    with pytest.raises(SystemExit):
        generate_main(["--model", str(saved / "model"), "--text", "a", "--duration", "0", "--out", str(out)])
    with pytest.raises(SystemExit):
        generate_main(["--model", str(saved / "model"), "--video", str(tmp_path / "nope.mp4"), "--out", str(out)])
    # a corrupt video or a folder that is not a model: exit status 2 and the reason, no traceback
    capsys.readouterr()
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    for argv, why in ((["--video", str(tmp_path / "bad.mp4")], "cannot decode"),
                      (["--text", "a"], "no dit/ folder")):
        model = str(saved / "model") if why == "cannot decode" else str(tmp_path)
        with pytest.raises(SystemExit) as e:
            generate_main(["--model", model, *argv, "--steps", "1", "--out", str(out)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert why in err and "Traceback" not in err, err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_path_equals_eager_and_plain():
    """On a GPU the step is a captured CUDA graph: it must equal the eager optimised path and the plain
    path (fp32), reuse the graph for a new request of the same shapes, and run in bf16."""
    pipe = tiny_pipeline()
    pipe.dit.cuda()
    pipe.vae.cuda()
    cfg = pipe.dit.config

    def cond(seed, text_len=5):
        g = torch.Generator().manual_seed(seed)
        return pipe.conditions_from_features(
            video_features=[torch.randn(16, cfg.video_dim, generator=g), None],
            sync_features=[torch.randn(48, cfg.sync_dim, generator=g), None],
            text_tokens=(torch.randn(2, text_len, cfg.text_dim, generator=g), torch.tensor([text_len, 3])),
            duration=2.0)

    for guidance in (3.0, (2.0, 4.0)):
        c = cond(0)
        a = pipe.generate_from_conditions(c, steps=4, guidance=guidance, seed=1)
        b = pipe.generate_from_conditions(c, steps=4, guidance=guidance, seed=1, cuda_graphs=False)
        p = pipe.generate_from_conditions(c, steps=4, guidance=guidance, seed=1, plain=True)
        torch.testing.assert_close(a.latents, b.latents, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a.latents, p.latents, atol=2e-4, rtol=2e-4)
        captures = pipe.graphs.captures
        c2 = cond(1)  # same shapes, new values: the captured graph is refilled, not recaptured
        a2 = pipe.generate_from_conditions(c2, steps=4, guidance=guidance, seed=2)
        b2 = pipe.generate_from_conditions(c2, steps=4, guidance=guidance, seed=2, cuda_graphs=False)
        assert pipe.graphs.captures == captures
        torch.testing.assert_close(a2.latents, b2.latents, atol=1e-4, rtol=1e-4)
        assert (a2.latents - a.latents).abs().max() > 1e-3
    # bf16 DiT: close to fp32 relative to the latents' scale
    ref = pipe.generate_from_conditions(cond(0), steps=4, guidance=3.0, seed=1).latents.float()
    pipe.dit.to(torch.bfloat16)
    low = pipe.generate_from_conditions(cond(0), steps=4, guidance=3.0, seed=1).latents.float()
    assert (low - ref).abs().max() < 0.1 * ref.abs().max()


def test_graph_cache_is_keyed_by_the_backend_overrides(monkeypatch):
    """A captured sampling step replays the kernels chosen when it was captured: a call under other backend overrides
    (use_backend, OMNI2SOUND_BACKEND) captures its own graph instead of replaying another's. The capture itself is
    replaced here (no GPU): what is checked is the cache's key."""
    from omni2sound import ops, sampling

    monkeypatch.delenv("OMNI2SOUND_BACKEND", raising=False)

    class Entry:                                      # stands in for the captured step
        def __init__(self, predict, prep, *args):
            self.prep = prep

        def run(self, x0, steps):
            return x0

    class Prep:
        def signature(self):
            return ()

    monkeypatch.setattr(sampling, "_GraphEntry", Entry)
    graphs, prep, x0 = sampling.GraphSampler(max_entries=8), Prep(), torch.zeros(1, 2, 3)
    run = lambda: graphs.sample(len, prep, 1, (1.0,), x0, 2, "euler")           # noqa: E731
    run()
    run()
    assert graphs.captures == 1                                                # same overrides: replayed
    with ops.use_backend(adaln="triton"):
        run()
        with ops.use_backend("reference"):
            run()
    monkeypatch.setenv("OMNI2SOUND_BACKEND", "bias_gelu=reference")
    run()
    assert graphs.captures == 4
    monkeypatch.delenv("OMNI2SOUND_BACKEND")
    run()
    assert graphs.captures == 4                                                # back to the first key
