"""ImageBind towers: a tiny randomly initialised model with the release's parameter names, saved as a plain
state dict beside other modalities' tensors (as imagebind_huge.pth is), loaded back through the adapter and
checked against a functional forward written from the release's layer list; the Kaldi fbank and the clip
and crop sampling of ImageBind's data code."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from omni2sound.evaluation.embedders.imagebind import (
    AUDIO_MEAN,
    AUDIO_STD,
    ImageBind,
    ImageBindConfig,
    ImageBindTowers,
    audio_clips,
    audio_input,
    kaldi_fbank,
    video_input,
)

CFG = ImageBindConfig(vision_embed_dim=32, vision_num_blocks=2, vision_num_heads=2, audio_embed_dim=24,
                      audio_num_blocks=2, audio_num_heads=2, out_embed_dim=16)

RELEASE_NAMES = [   # names in imagebind_huge.pth for the audio and vision towers
    "modality_preprocessors.vision.cls_token", "modality_preprocessors.vision.rgbt_stem.proj.1.weight",
    "modality_preprocessors.vision.pos_embedding_helper.pos_embed",
    "modality_trunks.vision.pre_transformer_layer.0.weight",
    "modality_trunks.vision.blocks.1.attn.in_proj_weight", "modality_trunks.vision.blocks.1.attn.out_proj.bias",
    "modality_trunks.vision.blocks.0.norm_1.weight", "modality_trunks.vision.blocks.0.mlp.fc2.weight",
    "modality_heads.vision.0.bias", "modality_heads.vision.2.weight",
    "modality_preprocessors.audio.rgbt_stem.proj.0.weight", "modality_preprocessors.audio.rgbt_stem.norm_layer.weight",
    "modality_preprocessors.audio.pos_embedding_helper.pos_embed", "modality_trunks.audio.blocks.0.attn.bias_k",
    "modality_trunks.audio.blocks.0.attn.bias_v", "modality_heads.audio.2.weight",
    "modality_postprocessors.audio.1.log_logit_scale"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    towers = ImageBindTowers(CFG)
    sd = towers.state_dict()
    for k, v in sd.items():                         # the release's cls/pos/bias_kv are trained, not zero
        if k.endswith(("cls_token", "pos_embed", "bias_k", "bias_v")):
            sd[k] = torch.randn_like(v) * 0.5
    for name in RELEASE_NAMES:
        assert name in sd, name
    sd["modality_trunks.text.blocks.0.attn.in_proj_weight"] = torch.zeros(6, 2)     # other modalities: ignored
    sd["modality_preprocessors.depth.cls_token"] = torch.zeros(1, 1, 2)
    path = tmp_path_factory.mktemp("ib") / "imagebind_tiny.pth"
    torch.save(sd, path)
    return sd, path


def _reference(sd, modality, x, heads):
    """ImageBind's forward for one tower, written from its layer list with functional ops."""
    p = lambda k: sd[k]
    pre = f"modality_preprocessors.{modality}."
    if modality == "vision":
        t = F.conv3d(x, p(pre + "rgbt_stem.proj.1.weight"), stride=p(pre + "rgbt_stem.proj.1.weight").shape[2:])
        t = t.flatten(2).transpose(1, 2)
    else:
        w = p(pre + "rgbt_stem.proj.0.weight")
        t = F.conv2d(x, w, stride=10).flatten(2).transpose(1, 2)
        t = F.layer_norm(t, t.shape[-1:], p(pre + "rgbt_stem.norm_layer.weight"), p(pre + "rgbt_stem.norm_layer.bias"))
    t = torch.cat([p(pre + "cls_token").expand(len(t), -1, -1), t], 1) + p(pre + "pos_embedding_helper.pos_embed")
    tr = f"modality_trunks.{modality}."
    if modality == "vision":
        ln = tr + "pre_transformer_layer.0."
        t = F.layer_norm(t, t.shape[-1:], p(ln + "weight"), p(ln + "bias"), eps=1e-6)
    t = t.transpose(0, 1)                                               # [L, B, D], as the release runs it
    D = t.shape[-1]
    for i in range(sum(1 for k in sd if k.startswith(tr + "blocks.") and k.endswith("norm_1.weight"))):
        b = f"{tr}blocks.{i}."
        h = F.layer_norm(t, (D,), p(b + "norm_1.weight"), p(b + "norm_1.bias"), eps=1e-6)
        att = F.multi_head_attention_forward(h, h, h, D, heads, p(b + "attn.in_proj_weight"),
                                             p(b + "attn.in_proj_bias"), sd.get(b + "attn.bias_k"),
                                             sd.get(b + "attn.bias_v"), False, 0.0,
                                             p(b + "attn.out_proj.weight"), p(b + "attn.out_proj.bias"),
                                             training=False, need_weights=False)[0]
        t = t + att
        h = F.layer_norm(t, (D,), p(b + "norm_2.weight"), p(b + "norm_2.bias"), eps=1e-6)
        t = t + F.linear(F.gelu(F.linear(h, p(b + "mlp.fc1.weight"), p(b + "mlp.fc1.bias"))), p(b + "mlp.fc2.weight"),
                         p(b + "mlp.fc2.bias"))
    hd = f"modality_heads.{modality}."
    t = F.layer_norm(t.transpose(0, 1), (D,), p(hd + "0.weight"), p(hd + "0.bias"), eps=1e-6)[:, 0]
    return F.normalize(F.linear(t, p(hd + "2.weight")), dim=-1)


def test_imagebind_loads_the_release_layout_and_matches_its_forward(checkpoint):
    sd, path = checkpoint
    ib = ImageBind.from_checkpoint(str(path), device="cpu", config=CFG)
    assert ib.sha256 and ib.sample_rate == 16000
    audio = torch.randn(2, 16000 * 5) * 0.1
    emb = ib.embed_audio(audio)
    assert emb.shape == (2, 16)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    x = audio_input(audio[1].numpy(), CFG)                              # [3, 1, 128, 204]
    with torch.no_grad():
        ref = F.normalize(_reference(sd, "audio", x, 2).mean(0), dim=-1)
    torch.testing.assert_close(emb[1], ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ib.embed_audio(audio[1:]), emb[1:], atol=1e-5, rtol=1e-4)

    frames = torch.randint(0, 256, (2, 75, 48, 64, 3), dtype=torch.uint8)     # 3 s at 25 fps, 4:3
    vemb = ib.embed_video(frames, fps=25)
    assert vemb.shape == (2, 16)
    v = video_input(frames[0].numpy(), 25, CFG)
    with torch.no_grad():
        vref = F.normalize(_reference(sd, "vision", v, 2).mean(0), dim=-1)
    torch.testing.assert_close(vemb[0], vref, atol=1e-5, rtol=1e-4)


def test_config_is_read_from_the_tensors(checkpoint):
    sd, path = checkpoint
    ib = ImageBind.from_checkpoint(str(path), device="cpu")
    c = ib.config
    assert (c.vision_embed_dim, c.vision_num_blocks, c.audio_embed_dim, c.audio_num_blocks, c.out_embed_dim,
            c.image_size, c.patch_size) == (32, 2, 24, 2, 16, 224, 14)
    assert c.vision_num_heads == 1 and c.audio_num_heads == 1       # D // 80 and D // 64: 16 and 12 at huge's sizes


def test_not_an_imagebind_checkpoint(tmp_path):
    bad = tmp_path / "x.pth"
    torch.save({"something.else": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match=str(bad)):
        ImageBind.from_checkpoint(str(bad), device="cpu")


def test_kaldi_fbank_frames_and_mel_placement():
    sr = 16000
    t = torch.arange(sr * 2) / sr
    fb = kaldi_fbank(0.5 * torch.sin(2 * math.pi * 1000 * t), sr, 128)
    assert fb.shape == (1 + (32000 - 400) // 160, 128)
    # the band whose centre is nearest 1 kHz on Kaldi's mel scale is the loudest
    mel = lambda f: 1127 * np.log(1 + f / 700)
    centres = mel(20) + (mel(8000) - mel(20)) / 129 * np.arange(1, 129)
    assert abs(int(fb.mean(0).argmax()) - int(np.abs(centres - mel(1000)).argmin())) <= 1
    assert torch.isfinite(kaldi_fbank(torch.zeros(800))).all()          # silence: floored at float32 eps
    try:
        import torchaudio
    except ImportError:
        return
    wave = torch.randn(sr * 2) * 0.1
    ta = torchaudio.compliance.kaldi.fbank(wave[None], htk_compat=True, sample_frequency=sr, use_energy=False,
                                           window_type="hanning", num_mel_bins=128, dither=0.0, frame_length=25,
                                           frame_shift=10)
    torch.testing.assert_close(kaldi_fbank(wave, sr, 128), ta, atol=1e-3, rtol=1e-4)


def test_clip_and_crop_sampling():
    wave = np.arange(16000 * 10, dtype=np.float32)
    starts = [c[0] / 16000 for c in audio_clips(wave)]
    assert starts == [0.0, 4.0, 8.0] and all(len(c) == 32000 for c in audio_clips(wave))
    x = audio_input(np.zeros(8000, np.float32), CFG)                    # 0.5 s: every window padded to 204
    assert x.shape == (3, 1, 128, 204)
    assert torch.allclose(x[0, 0, :, -1], torch.full((128,), -AUDIO_MEAN / AUDIO_STD))
    frames = np.zeros((80, 60, 80, 3), np.uint8)                        # 10 s at 8 fps, frame i holds value i
    frames += np.arange(80, dtype=np.uint8)[:, None, None, None]
    frames[:, :, :10] = 255                                             # a bright left edge: only the left crop
    v = video_input(frames, 8, CFG)
    assert v.shape == (15, 3, 2, 224, 224)
    mean, std = 0.48145466, 0.26862954
    first = [round(float(v[3 * k, 0, 0, 112, 112]) * std * 255 + mean * 255) for k in range(5)]
    assert first == [0, 16, 32, 48, 64]                                 # windows start at 0, 2, 4, 6, 8 s
    assert round(float(v[12, 0, 1, 112, 112]) * std * 255 + mean * 255) == 79     # last frame of the last window
    assert v[0, 0, 0, :, :5].mean() > v[1, 0, 0, :, :5].mean()          # left crop sees the edge, centre does not


@pytest.mark.cuda
def test_imagebind_bf16_on_cuda_matches_fp32(checkpoint):
    _, path = checkpoint
    cpu = ImageBind.from_checkpoint(str(path), device="cpu", config=CFG)
    gpu = ImageBind.from_checkpoint(str(path), device="cuda", config=CFG)
    assert gpu.dtype == torch.bfloat16
    audio = torch.randn(3, 16000 * 4) * 0.1
    assert (cpu.embed_audio(audio) * gpu.embed_audio(audio)).sum(-1).min() > 0.98
    frames = torch.randint(0, 256, (2, 50, 64, 64, 3), dtype=torch.uint8)
    assert (cpu.embed_video(frames, 25) * gpu.embed_video(frames, 25)).sum(-1).min() > 0.98


def test_atlas_av_scorer_batches_match_single_clips(checkpoint):
    import threading

    from omni2sound.atlas.scorers import ImageBindAVScorer
    from omni2sound.atlas.types import Clip
    _, path = checkpoint
    sc = ImageBindAVScorer.__new__(ImageBindAVScorer)
    sc.model, sc._lock = ImageBind.from_checkpoint(str(path), device="cpu", config=CFG), threading.Lock()
    rng = np.random.default_rng()
    clips = [Clip(i, {"clip_id": str(i)}, "k", (rng.standard_normal(32000) * 0.1).astype(np.float32), 16000,
                  rng.integers(0, 256, (2, 40, 40, 3), dtype=np.uint8) if i != 1 else None, 1.0) for i in range(3)]
    batch = sc.score_batch(clips)
    assert batch[1] == 0.0                       # no video: no audio-video agreement to score
    np.testing.assert_allclose(batch, [sc.score(c) for c in clips], atol=1e-5)
