"""Serving: bucket and batch-size choice, and a request padded into a bucket and a larger batch samples and sounds as
it would alone, unpadded (the key mask of the padded frames, its own noise, duration and decode)."""
import pytest
import torch

from omni2sound.serving import Request, ServeConfig, Server, batch_split, choose_batch_size, choose_bucket, plan

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bucket_and_batch_size_choice():
    assert choose_bucket(0.3, (1.0, 2.5)) == 1.0 and choose_bucket(1.0, (1.0, 2.5)) == 1.0
    assert choose_bucket(1.01, (1.0, 2.5)) == 2.5
    with pytest.raises(ValueError, match="past the largest bucket"):
        choose_bucket(2.6, (1.0, 2.5))
    with pytest.raises(ValueError, match="positive"):
        choose_bucket(0.0, (1.0,))
    assert [choose_batch_size(n, (1, 8, 32)) for n in (1, 2, 8, 9, 32)] == [1, 8, 8, 32, 32]
    cfg = ServeConfig(buckets=(1.0, 2.0), batch_sizes=(1, 4))
    # 6 requests of the 2 s bucket: one batch of 4 and one of 2 (run at size 4); the 1 s ones: one batch at size 1
    batches = plan([1.5, 0.5, 2.0, 1.2, 1.9, 1.1, 1.3], cfg)
    assert batches == [(1.0, 1, [1]), (2.0, 4, [0, 2, 3, 4]), (2.0, 4, [5, 6])]
    # a bucket's requests cut at the least rows + 8 rows a batch: 12 -> two batches of 8, 40 -> 32 + 8, 2 -> 8
    assert [batch_split(n, (1, 8, 32)) for n in (1, 2, 9, 12, 20, 40, 70)] == [
        [1], [8], [8, 1], [8, 8], [32], [32, 8], [32, 32, 8]]
    assert batch_split(3, (1, 8, 32), overhead_rows=0) == [1, 1, 1]
    assert plan([1.0] * 12, ServeConfig(buckets=(1.0,), batch_sizes=(1, 8, 32))) == [
        (1.0, 8, list(range(8))), (1.0, 8, list(range(8, 12)))]
    for bad, match in (({"buckets": (2.0, 1.0)}, "increasing"), ({"buckets": (20.0,)}, "max_duration"),
                       ({"batch_sizes": (8, 1)}, "increasing"), ({"batch_sizes": (0,)}, "positive"),
                       ({"batch_overhead_rows": -1}, "batch_overhead_rows")):
        with pytest.raises(ValueError, match=match):
            ServeConfig(**bad).validate(10.0)


def _pipe():
    from omni2sound.model import Omni2SoundDiT, dit_config
    from omni2sound.pipeline import Omni2SoundPipeline, PipelineConfig
    from omni2sound.vae import VAE_PRESETS, AudioVAE
    dit = Omni2SoundDiT(dit_config("tiny", hidden_dim=64, depth=2, num_heads=2, max_duration=2.0))
    with torch.no_grad():               # adaLN-Zero makes a fresh model output zeros; give it a real function
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return Omni2SoundPipeline(dit, AudioVAE(VAE_PRESETS["tiny"]), PipelineConfig())


def _mixed_requests(cfg) -> list:
    """Three requests of different durations and modalities: VT2A 0.6 s, T2A 0.92 s, V2A 1.2 s."""
    return [Request(duration=0.6, seed=3, text_tokens=torch.randn(4, cfg.text_dim),
                    video_features=torch.randn(5, cfg.video_dim), sync_features=torch.randn(15, cfg.sync_dim)),
            Request(duration=0.92, seed=4, text_tokens=torch.randn(7, cfg.text_dim)),
            Request(duration=1.2, seed=5, video_features=torch.randn(10, cfg.video_dim),
                    sync_features=torch.randn(29, cfg.sync_dim))]


@torch.no_grad()
def test_a_padded_request_samples_and_sounds_as_it_would_alone():
    from omni2sound.pipeline import SamplingOptions
    pipe = _pipe()
    cfg = pipe.dit.config
    reqs = _mixed_requests(cfg)
    server = Server(pipe, ServeConfig(buckets=(1.2, 2.0), batch_sizes=(1, 4), steps=4, guidance=3.0))
    lat = server.sample(reqs)                              # one batch of 3 requests padded to 4 rows and 1.2 s
    audio = server.decode(lat, [r.duration for r in reqs])
    for r, z, wav in zip(reqs, lat, audio):
        T = cfg.num_frames(r.duration)
        cond = pipe.conditions_from_features(
            video_features=[r.video_features], sync_features=[r.sync_features], duration=r.duration,
            text_tokens=(torch.zeros(1, 0, cfg.text_dim), torch.zeros(1, dtype=torch.long)) if r.text_tokens is None
            else (r.text_tokens[None], torch.tensor([len(r.text_tokens)])))
        alone = pipe._sample(cond, pipe.flow.noise(1, T, cfg.latent_dim, seed=r.seed),
                             SamplingOptions(steps=4, guidance=3.0), {})[0]
        assert z.shape == (T, cfg.latent_dim)
        torch.testing.assert_close(z, alone, rtol=1e-4, atol=1e-4)
        ref = pipe.vae.decode(alone.float().T[None])[0, 0, :int(round(r.duration * pipe.sample_rate))]
        assert wav.shape == ref.shape
        torch.testing.assert_close(wav, ref, rtol=1e-4, atol=1e-4)
    # without the key mask the padding would leak into the shorter requests: the check above can fail
    no_mask = pipe._sample(server.conditions(reqs, 1.2, 4), server.noise(reqs, cfg.num_frames(1.2), 4),
                           SamplingOptions(steps=4, guidance=3.0), {})
    assert (no_mask[0, :cfg.num_frames(0.6)] - lat[0]).abs().max() > 1e-3


@torch.no_grad()
def test_warm_up_runs_every_bucket_and_size_and_generate_keeps_request_order():
    pipe = _pipe()
    cfg = pipe.dit.config
    server = Server(pipe, ServeConfig(buckets=(0.4, 0.8), batch_sizes=(1, 2), steps=1, guidance=2.0))
    assert server.warm_up() > 0
    reqs = [Request(duration=d, seed=i, text_tokens=torch.randn(3, cfg.text_dim)) for i, d in enumerate((0.7, 0.3))]
    out = server.generate(reqs)
    assert [len(w) for w in out] == [int(round(0.7 * pipe.sample_rate)), int(round(0.3 * pipe.sample_rate))]
    assert all(torch.isfinite(w).all() for w in out) and server.generate([]) == []
    with pytest.raises(ValueError, match="largest bucket"):
        server.generate([Request(duration=1.0)])


@pytest.mark.cuda
@torch.no_grad()
def test_serving_on_the_gpu_captures_at_start_up_only_and_matches_the_unpadded_request():
    from omni2sound.pipeline import SamplingOptions
    pipe = _pipe()
    pipe.dit.to("cuda", torch.bfloat16)
    pipe.vae.to("cuda")
    cfg = pipe.dit.config
    server = Server(pipe, ServeConfig(buckets=(0.8, 1.2), batch_sizes=(1, 4), steps=4, guidance=3.0))
    server.warm_up()
    assert pipe.graphs.captures == 4
    reqs = [Request(duration=d, seed=i, text_tokens=torch.randn(3 + i, cfg.text_dim),
                    video_features=torch.randn(10, cfg.video_dim), sync_features=torch.randn(29, cfg.sync_dim))
            for i, d in enumerate((0.5, 1.1, 0.9))]
    lat = server.sample(reqs)
    assert pipe.graphs.captures == 4                        # every batch replayed a start-up graph
    r = reqs[0]
    cond = pipe.conditions_from_features(video_features=[r.video_features], sync_features=[r.sync_features],
                                         duration=r.duration, text_tokens=(r.text_tokens[None], torch.tensor([3])))
    x0 = pipe.flow.noise(1, cfg.num_frames(r.duration), cfg.latent_dim, seed=r.seed, device="cuda",
                         dtype=torch.bfloat16)
    alone = pipe._sample(cond, x0, SamplingOptions(steps=4, guidance=3.0, cuda_graphs=False), {})[0]
    err = ((lat[0].float() - alone.float()).norm() / alone.float().norm()).item()
    assert err < 2e-2, err                                  # bf16: the padded batch's GEMMs round differently
