"""Adversarial VAE training (omni2sound.vae_gan): discriminator, losses, gradient routing, the vae stage with it."""
import json
from dataclasses import replace

import pytest
import torch

from omni2sound.vae import build_vae
from omni2sound.vae_gan import (
    VAEGAN,
    MultiResolutionSTFTDiscriminator,
    discriminator_hinge_loss,
    feature_matching_loss,
    generator_hinge_loss,
    load_discriminator,
    save_discriminator,
)
from omni2sound.vae_loss import vae_loss
from omni2sound.vae_train import synthetic_tones, train_vae

GAN = dict(adv_weight=0.1, fm_weight=0.2, disc_ffts=(256, 64), disc_channels=8)


def small_vae(**kw):
    torch.manual_seed(0)
    return build_vae("tiny", **{**GAN, **kw})


def test_discriminator_shapes_and_short_input():
    d = MultiResolutionSTFTDiscriminator((256, 64), channels=8)
    for n in (3200, 1001):                                   # odd lengths too
        out = d(torch.randn(2, 1, n))
        assert len(out) == 2
        for (logits, feats), n_fft in zip(out, (256, 64)):
            frames, bins = n // (n_fft // 4) + 1, n_fft // 2 + 1
            assert logits.shape[:3] == (2, 1, frames) and len(feats) == 5
            assert feats[0].shape[-1] == bins and logits.shape[-1] < bins          # frequency is downsampled
    assert d(torch.randn(2, 3200))[0][0].shape == out[0][0].shape[:2] + d(torch.randn(2, 1, 3200))[0][0].shape[2:]
    with pytest.raises(ValueError, match="more than 128 samples"):
        d(torch.randn(1, 1, 100))


def test_losses():
    hi, lo = [(torch.full((2, 1, 3, 4), 2.0), [])], [(torch.full((2, 1, 3, 4), -2.0), [])]
    assert discriminator_hinge_loss(hi, lo).item() == 0.0            # real confidently real, fake confidently fake
    assert discriminator_hinge_loss(lo, hi).item() == pytest.approx(6.0)
    assert generator_hinge_loss(hi).item() == 0.0 and generator_hinge_loss(lo).item() == pytest.approx(3.0)
    f = [torch.randn(2, 4, 5, 6), torch.randn(2, 4, 5, 3)]
    real = [(None, f)]
    assert feature_matching_loss(real, [(None, [t.clone() for t in f])]).item() == 0.0
    assert feature_matching_loss(real, [(None, [2 * t for t in f])]).item() == pytest.approx(1.0, rel=1e-5)


def _grads(module):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in module.named_parameters()}


def test_gradient_routing():
    """One backward gives each side exactly its own GAN gradient: the discriminator only its hinge loss's, the VAE
    its reconstruction loss's plus (from disc_start on) the adversarial and feature-matching terms'."""
    vae = small_vae(disc_start=1)
    model = VAEGAN(vae)
    wav, _ = synthetic_tones(2, 3200, generator=torch.Generator().manual_seed(0))

    def run(step, part):
        model.zero_grad(set_to_none=True)
        g = torch.Generator().manual_seed(5)
        if part == "total":
            loss, logs = model(wav, step, generator=g)
        else:                                            # the pieces by hand, from the same posterior sample
            from omni2sound.vae_loss import vae_loss_terms
            rl, _, recon = vae_loss_terms(vae, wav, None, g)
            if part == "recon":
                loss = rl
            elif part == "d":
                loss = discriminator_hinge_loss(model.disc(wav), model.disc(recon.detach()))
            else:                                        # the generator's adversarial terms, D frozen by hand
                real = model.disc(wav)
                for p in model.disc.parameters():
                    p.requires_grad_(False)
                fake = model.disc(recon)
                for p in model.disc.parameters():
                    p.requires_grad_(True)
                loss = rl + 0.1 * generator_hinge_loss(fake) + 0.2 * feature_matching_loss(real, fake)
            logs = None
        loss.backward()
        return _grads(model.vae), _grads(model.disc), logs

    vae_before, disc_before, logs0 = run(0, "total")           # step 0 < disc_start: no generator terms
    assert "adv" not in logs0 and logs0["d_loss"] > 0
    vae_r, _, _ = run(0, "recon")
    _, disc_d, _ = run(0, "d")
    for n in vae_r:
        torch.testing.assert_close(vae_before[n], vae_r[n], rtol=1e-5, atol=1e-7, msg=n)
    for n in disc_d:
        torch.testing.assert_close(disc_before[n], disc_d[n], rtol=1e-5, atol=1e-7, msg=n)
    vae_after, disc_after, logs1 = run(1, "total")             # from disc_start on
    assert logs1["adv"] > 0 and logs1["fm"] > 0
    vae_g, _, _ = run(1, "gen")
    for n in vae_g:
        torch.testing.assert_close(vae_after[n], vae_g[n], rtol=1e-4, atol=1e-7, msg=n)
    for n in disc_d:                                           # the generator's terms never reach D
        torch.testing.assert_close(disc_after[n], disc_d[n], rtol=1e-5, atol=1e-7, msg=n)
    assert any((vae_after[n] - vae_r[n]).abs().max() > 0 for n in vae_r)   # ... but do reach the VAE
    assert all(p.requires_grad for p in model.disc.parameters())


def test_discriminator_learns_to_tell_reconstructions_apart(tmp_path):
    # generator terms off (disc_start beyond the run): the hinge loss must fall from its chance value 2
    vae = small_vae(disc_start=10**6)
    g = torch.Generator().manual_seed(0)
    batches = (synthetic_tones(4, 3200, generator=g)[0] for _ in range(40))
    hist = train_vae(vae, batches, steps=40, lr=2e-3, log=None, out_dir=str(tmp_path / "v"))
    first = sum(h["d_loss"] for h in hist[:5]) / 5
    last = sum(h["d_loss"] for h in hist[-5:]) / 5
    assert first > 1.5 and last < first - 0.3, (first, last)
    assert all("adv" not in h for h in hist)
    disc = load_discriminator(str(tmp_path / "v"), vae)          # written beside the VAE, loads back
    assert isinstance(disc, MultiResolutionSTFTDiscriminator)
    with pytest.raises(ValueError, match="does not match"):
        load_discriminator(str(tmp_path / "v"), small_vae(disc_channels=4))
    with pytest.raises(FileNotFoundError):
        load_discriminator(str(tmp_path), vae)


def test_non_adversarial_training_unchanged():
    vae = build_vae("tiny")
    assert not vae.config.adversarial
    wav, _ = synthetic_tones(2, 3200, generator=torch.Generator().manual_seed(0))
    loss, logs = vae_loss(vae, wav, generator=torch.Generator().manual_seed(1))
    assert "d_loss" not in logs and torch.isfinite(loss)
    with pytest.raises(ValueError, match=">= 0"):
        build_vae("tiny", adv_weight=-1.0)
    with pytest.raises(ValueError, match="disc_ffts"):
        build_vae("tiny", adv_weight=0.1, disc_ffts=(255,))


def test_vae_stage_adversarial_resumes_exactly(tmp_path):
    """Stage vae with the discriminator: checkpoints hold both networks, a resumed run repeats the same losses
    and ends with the same VAE and discriminator as an uninterrupted one."""
    from omni2sound.schedule import TRAIN_PRESETS, train_vae_stage
    from omni2sound.trainer import DistInfo

    audio = synthetic_tones(6, 6400, generator=torch.Generator().manual_seed(3))[0][:, 0]        # [6, 6400]
    base = replace(TRAIN_PRESETS["smoke"], vae_preset="tiny", vae_batch=2, warmup=1, log_every=1, ckpt_every=1,
                   vae_config={**GAN, "disc_start": 2}, progress=False)

    def stage(name, steps, resume):
        torch.manual_seed(7 if resume else 0)            # the same init for fresh runs; a resumed one loads its own
        cfg = replace(base, runs_dir=str(tmp_path), name=name, vae_steps=steps)
        return train_vae_stage(cfg, DistInfo(), audio, resume=resume)

    full = stage("full", 4, False)
    stage("part", 2, False)                               # "killed" after step 2 (its checkpoint on disk)
    part = stage("part", 4, True)
    logs = {k: [json.loads(line) for line in open(f"{d}/log.jsonl")] for k, d in (("full", full), ("part", part))}
    assert [r["step"] for r in logs["part"]] == [1, 2, 3, 4]
    assert [r["loss"] for r in logs["part"]] == [r["loss"] for r in logs["full"]]
    assert "adv" in logs["full"][-1] and "adv" not in logs["full"][0]            # generator terms from step 2
    from safetensors.torch import load_file
    for f in ("model.safetensors", "discriminator.safetensors"):      # (bytes differ: the header's key order)
        a, b = load_file(f"{full}/{f}"), load_file(f"{part}/{f}")
        assert a.keys() == b.keys(), f
        for k in a:
            assert torch.equal(a[k], b[k]), (f, k)
    ck = torch.load(f"{part}/checkpoints/" + sorted(__import__("os").listdir(f"{part}/checkpoints"))[-1],
                    weights_only=True)
    assert any(k.startswith("disc.") for k in ck["model"]) and any(k.startswith("vae.") for k in ck["model"])
    # a later stage vae can continue from this folder, discriminator included
    cont = train_vae_stage(replace(base, runs_dir=str(tmp_path), name="cont", vae_steps=1), DistInfo(), audio,
                           resume=False, init_from=part)
    disc_keys = load_file(f"{part}/discriminator.safetensors").keys()
    assert load_file(f"{cont}/discriminator.safetensors").keys() == disc_keys
    with pytest.raises(ValueError, match="architecture"):
        train_vae_stage(replace(base, runs_dir=str(tmp_path), name="bad", vae_steps=1,
                                vae_config={"channels": 4}), DistInfo(), audio, resume=False, init_from=part)


def test_save_discriminator_round_trip(tmp_path):
    vae = small_vae()
    d = MultiResolutionSTFTDiscriminator.for_vae(vae)
    save_discriminator(d, str(tmp_path))
    d2 = load_discriminator(str(tmp_path), vae)
    for (k, a), b in zip(d.state_dict().items(), d2.state_dict().values()):
        assert torch.equal(a, b), k
