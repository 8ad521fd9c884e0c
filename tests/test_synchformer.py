"""Synchformer: segmentation counts and rates, the released key layout, strict loading, the offset classifier.

No weights can be downloaded here: the models are random-initialised, saved in the released layout and loaded
back through the package's loaders. With random weights the offset predictions check the plumbing (windows,
grid, batching), not synchronisation quality.
"""
import math
import pathlib

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from omni2sound import synchformer as sf
from omni2sound.synchformer import (
    MotionFormer,
    SyncFeatureExtractor,
    Synchformer,
    SynchformerConfig,
    segment_audio,
    segment_video,
)

TINY = SynchformerConfig.tiny()
FULL = SynchformerConfig()


def released_layout(cfg: SynchformerConfig, audio_visual: bool = True) -> dict:
    """Key -> shape of the released audio-visual state dict (``synchformer_state_dict.pth``, MMAudio's and
    av-benchmark's layout), written out from the published model definition."""
    D, P, g, t = cfg.vis_dim, cfg.patch_size, cfg.image_size // cfg.patch_size, cfg.segment_frames // cfg.tubelet
    m = cfg.vis_mlp_ratio * D
    out = {}

    def lin(name, i, o):
        out[name + ".weight"], out[name + ".bias"] = (o, i), (o,)

    def ln(name, d):
        out[name + ".weight"], out[name + ".bias"] = (d,), (d,)

    def pooling(name, d, ff):
        out[name + ".cls_token"] = (1, 1, d)
        out[name + ".self_attn.in_proj_weight"], out[name + ".self_attn.in_proj_bias"] = (3 * d, d), (3 * d,)
        lin(name + ".self_attn.out_proj", d, d)
        lin(name + ".linear1", d, ff)
        lin(name + ".linear2", ff, d)
        ln(name + ".norm1", d)
        ln(name + ".norm2", d)

    v = "vfeat_extractor."
    out[v + "patch_embed.proj.weight"], out[v + "patch_embed.proj.bias"] = (D, 3, P, P), (D,)
    out[v + "patch_embed_3d.proj.weight"], out[v + "patch_embed_3d.proj.bias"] = (D, 3, cfg.tubelet, P, P), (D,)
    out[v + "cls_token"], out[v + "pos_embed"], out[v + "temp_embed"] = (1, 1, D), (1, g * g + 1, D), (1, t, D)
    for i in range(cfg.vis_depth):
        b = f"{v}blocks.{i}."
        for n in ("norm1", "norm2", "norm3"):
            ln(b + n, D)
        for a in ("attn", "timeattn"):
            lin(b + a + ".qkv", D, 3 * D)
            lin(b + a + ".proj", D, D)
        lin(b + "mlp.fc1", D, m)
        lin(b + "mlp.fc2", m, D)
    ln(v + "norm", D)
    pooling(v + "spatial_attn_agg", D, m)
    if not audio_visual:
        return out
    A, a = cfg.aud_dim, "afeat_extractor."
    f = (cfg.n_mels - 16) // 10 + 1
    tt = (cfg.spec_frames - 16) // 10 + 1
    e = a + "ast.embeddings."
    out[e + "cls_token"], out[e + "distillation_token"] = (1, 1, A), (1, 1, A)
    out[e + "position_embeddings"] = (1, f * tt + 2, A)
    out[e + "patch_embeddings.projection.weight"], out[e + "patch_embeddings.projection.bias"] = (A, 1, 16, 16), (A,)
    for i in range(cfg.aud_depth):
        b = f"{a}ast.encoder.layer.{i}."
        for n in ("query", "key", "value"):
            lin(b + "attention.attention." + n, A, A)
        lin(b + "attention.output.dense", A, A)
        lin(b + "intermediate.dense", A, cfg.aud_mlp_dim)
        lin(b + "output.dense", cfg.aud_mlp_dim, A)
        ln(b + "layernorm_before", A)
        ln(b + "layernorm_after", A)
    ln(a + "ast.layernorm", A)
    pooling(a + "freq_attn_agg", A, cfg.aud_mlp_dim)
    S = cfg.sync_dim
    lin("vproj", D, S)
    lin("aproj", A, S)
    tr = "transformer."
    ln(tr + "vis_in_lnorm", S)
    ln(tr + "aud_in_lnorm", S)
    out[tr + "OFF_tok"], out[tr + "MOD_tok"] = (1, 1, S), (1, 1, S)
    out[tr + "pos_emb_cfg.pos_emb"] = (1, 2 + cfg.sync_segments * (t + tt), S)
    for i in range(cfg.sync_depth):
        b = f"{tr}blocks.{i}."
        ln(b + "ln1", S)
        ln(b + "ln2", S)
        for n in ("key", "query", "value", "proj"):
            lin(b + "attn." + n, S, S)
        lin(b + "mlp.0", S, 4 * S)
        lin(b + "mlp.2", 4 * S, S)
    ln(tr + "ln_f", S)
    lin(tr + "off_head", S, cfg.num_offsets)
    return out


def random_state_dict(layout: dict, std: float = 0.02) -> dict:
    return {k: torch.randn(s) * std for k, s in layout.items()}


def clip(seconds: float, fps: float, hw=(20, 28), seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    return g.integers(0, 256, size=(int(round(seconds * fps)), *hw, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# segmentation: counts and rates
# ----------------------------------------------------------------------------------------------------------------
EXPECTED_SEGMENTS = {1.0: 2, 4.8: 14, 8.0: 24, 10.0: 30}


@pytest.mark.parametrize("fps", [25.0, 30000 / 1001, 60.0])
def test_feature_counts_and_rate(fps):
    model = SyncFeatureExtractor(TINY)
    for seconds, segs in EXPECTED_SEGMENTS.items():
        frames = clip(seconds, fps)
        s = segment_video(frames, fps, TINY)
        assert tuple(s.shape) == (segs, 3, 16, TINY.image_size, TINY.image_size)
        assert sf.num_segments(int(round(seconds * 25)), TINY) == segs == (int(round(seconds * 25)) - 16) // 8 + 1
        if seconds == (10.0 if fps == 25.0 else 1.0):          # the network once per rate: S * 8 tokens
            feats = model.features(frames, fps, batch_segments=7)
            assert tuple(feats.shape) == (segs * 8, TINY.vis_dim)
            assert feats.dtype == torch.float32 and torch.isfinite(feats).all()
    # 24 features per second at 8 s and 10 s; the segment grid itself steps 8 tokens per 0.32 s
    assert 8 * EXPECTED_SEGMENTS[10.0] / 10.0 == 8 * EXPECTED_SEGMENTS[8.0] / 8.0 == 24.0
    assert TINY.token_rate == FULL.token_rate == 25.0


def test_resample_indices_nearest_in_time():
    assert torch.equal(sf.resample_indices(250, 25.0), torch.arange(250))
    for fps, n in ((60.0, 600), (30000 / 1001, 300), (12.0, 120), (50.0, 500)):
        idx = sf.resample_indices(n, fps)
        assert len(idx) == int(math.floor(n * 25 / fps + 1e-6))
        t_out = torch.arange(len(idx), dtype=torch.float64) / 25
        err = (idx.double() / fps - t_out).abs()
        inner = idx < n - 1                       # the clip's last frame also serves the times after its centre
        assert err[inner].max() <= 0.5 / fps + 1e-9 and (t_out[~inner] >= (n - 1) / fps - 0.5 / fps).all()
        assert (idx[1:] >= idx[:-1]).all() and int(idx.max()) < n


def test_segments_are_the_stride_8_windows_of_the_25fps_pictures():
    frames = clip(2.0, 25.0, hw=(TINY.image_size, TINY.image_size))
    pics = sf.preprocess_frames(frames, TINY)                             # no resize: already 32 x 32
    ref = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    torch.testing.assert_close(pics, ref, rtol=0, atol=1e-6)
    segs = segment_video(frames, 25.0, TINY)
    assert segs.shape[0] == 5
    for i in range(5):
        torch.testing.assert_close(segs[i], ref[8 * i:8 * i + 16].permute(1, 0, 2, 3))


def test_preprocess_resizes_short_side_and_centre_crops():
    cfg = TINY
    x = torch.rand(3, 3, 32, 48)                                          # float input, short side already 32
    torch.testing.assert_close(sf.preprocess_frames(x, cfg), x[..., 8:40] * 2 - 1)
    tall = torch.rand(2, 3, 96, 64)                                       # portrait: width to 32, height 48
    out = sf.preprocess_frames(tall, cfg)
    ref = F.interpolate(tall, size=(48, 32), mode="bicubic", antialias=True)[:, :, 8:40] * 2 - 1
    torch.testing.assert_close(out, ref)
    white = np.full((1, 50, 70, 3), 255, np.uint8)
    torch.testing.assert_close(sf.preprocess_frames(white, cfg), torch.ones(1, 3, 32, 32))


def test_bad_video_inputs_are_clear():
    with pytest.raises(ValueError, match="fewer than one segment"):
        segment_video(clip(0.5, 25.0), 25.0, TINY)
    with pytest.raises(ValueError, match=r"uint8 \[T, H, W, 3\]"):
        segment_video(np.zeros((20, 3, 8, 8), np.uint8), 25.0, TINY)
    with pytest.raises(ValueError, match="fps"):
        segment_video(clip(1.0, 25.0), 0.0, TINY)
    with pytest.raises(ValueError, match="segments must be"):
        MotionFormer(TINY)(torch.zeros(1, 2, 3, 8, 32, 32))


# ----------------------------------------------------------------------------------------------------------------
# the architecture against independent formulations
# ----------------------------------------------------------------------------------------------------------------
def _dense_divided_reference(mf: MotionFormer, segs: torch.Tensor) -> torch.Tensor:
    """MotionFormer written as full attention with masks over the whole [CLS, frame-major patches] sequence."""
    cfg = mf.cfg
    B, S = segs.shape[:2]
    t, g = cfg.tokens_per_segment, cfg.grid
    N, L, D, H = g * g, 1 + t * g * g, cfg.vis_dim, cfg.vis_heads
    x = F.conv3d(segs.flatten(0, 1), mf.patch_embed_3d.proj.weight, mf.patch_embed_3d.proj.bias,
                 stride=(cfg.tubelet, cfg.patch_size, cfg.patch_size)).flatten(2).transpose(1, 2)
    pos = torch.cat([mf.pos_embed[:, :1]] + [mf.pos_embed[:, 1:] + mf.temp_embed[:, f:f + 1] for f in range(t)], 1)
    x = torch.cat([mf.cls_token.expand(x.shape[0], 1, D), x], 1) + pos
    frame = torch.tensor([-1] + [i // N for i in range(t * N)])
    patch = torch.tensor([-1] + [i % N for i in range(t * N)])
    cls_row = torch.zeros(L, dtype=torch.bool)
    cls_row[0] = True
    time_mask = (patch[:, None] == patch[None, :]) | cls_row[None, :] | cls_row[:, None]
    space_mask = (frame[:, None] == frame[None, :]) | cls_row[None, :] | cls_row[:, None]

    def attn(mod, h, mask):
        q, k, v = mod.qkv(h).reshape(h.shape[0], L, 3, H, D // H).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(D // H)
        o = s.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        return mod.proj(o.transpose(1, 2).reshape(h.shape[0], L, D))

    for blk in mf.blocks:
        x = x + attn(blk.timeattn, blk.norm3(x), time_mask)
        x = x + attn(blk.attn, blk.norm1(x), space_mask)
        x = x + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(x))))
    x = mf.norm(x[:, 1:]).reshape(-1, N, D)
    agg = mf.spatial_attn_agg
    layer = nn.TransformerEncoderLayer(D, H, cfg.vis_mlp_ratio * D, dropout=0.0, activation=nn.GELU(),
                                       layer_norm_eps=1e-6, batch_first=True, norm_first=True)
    layer.load_state_dict({k: v for k, v in agg.state_dict().items() if k != "cls_token"})
    y = layer.eval()(torch.cat([agg.cls_token.expand(x.shape[0], 1, D), x], 1))[:, 0]
    return y.reshape(B, S, t, D)


def test_motionformer_matches_dense_masked_reference():
    mf = MotionFormer(TINY).eval()
    with torch.no_grad():
        for p in mf.parameters():                       # larger weights than the init: every path matters
            p.add_(torch.randn_like(p) * 0.2)
        segs = torch.randn(2, 2, 3, 16, 32, 32)
        ref = _dense_divided_reference(mf, segs)
        out = mf(segs)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    with torch.inference_mode():                        # the no-grad path (the package's CPU attention kernel)
        torch.testing.assert_close(mf(segs), ref, rtol=1e-4, atol=1e-4)


def _hf5_name(key: str) -> str:
    import re
    m = re.match(r"encoder\.layer\.(\d+)\.(.*)", key)
    if not m:
        return key
    rest = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
            "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj",
            "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
    name, leaf = m.group(2).rsplit(".", 1)
    return f"layers.{m.group(1)}.{rest.get(name, name)}.{leaf}"


def test_audio_branch_matches_transformers_ast():
    from transformers import ASTConfig, ASTModel
    enc = sf.ASTSegmentEncoder(TINY).eval()
    hf = ASTModel(ASTConfig(hidden_size=TINY.aud_dim, num_hidden_layers=TINY.aud_depth,
                            num_attention_heads=TINY.aud_heads, intermediate_size=TINY.aud_mlp_dim,
                            num_mel_bins=TINY.n_mels, max_length=TINY.spec_frames, patch_size=16,
                            frequency_stride=10, time_stride=10, hidden_act="gelu", layer_norm_eps=1e-12)).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    sd = enc.ast.state_dict()                                      # the Hugging Face AST names (transformers 4)
    if set(sd) != set(hf.state_dict()):                            # transformers 5 renames the layers' weights
        sd = {_hf5_name(k): v for k, v in sd.items()}
    hf.load_state_dict(sd, strict=True)
    spec = torch.randn(3, TINY.n_mels, TINY.spec_frames)
    with torch.inference_mode():
        ref = hf(input_values=spec.transpose(1, 2)).last_hidden_state
        torch.testing.assert_close(enc.ast(spec), ref, rtol=1e-4, atol=1e-4)
        # frequency pooling per time step of the 2 x 6 patch grid
        f, t, D = TINY.freq_patches, TINY.time_patches, TINY.aud_dim
        grid = ref[:, 2:].reshape(3, f, t, D).transpose(1, 2).reshape(3 * t, f, D)
        layer = nn.TransformerEncoderLayer(D, TINY.aud_heads, TINY.aud_mlp_dim, dropout=0.0, activation=nn.GELU(),
                                           layer_norm_eps=1e-6, batch_first=True, norm_first=True).eval()
        layer.load_state_dict({k: v for k, v in enc.freq_attn_agg.state_dict().items() if k != "cls_token"})
        pooled = layer(torch.cat([enc.freq_attn_agg.cls_token.expand(3 * t, 1, D), grid], 1))[:, 0]
        torch.testing.assert_close(enc(spec[None]), pooled.reshape(1, 3, t, D), rtol=1e-4, atol=1e-4)


def test_log_mel_front_end():
    cfg = FULL
    sr = cfg.sample_rate
    n = np.arange(cfg.audio_segment_samples)
    tone = torch.from_numpy(np.sin(2 * np.pi * 1000.0 * n / sr).astype(np.float32))
    lm = sf.log_mel(tone, cfg)
    assert tuple(lm.shape) == (128, 65)
    # the power spectrum of frame 20 against a direct DFT of the centred 400-sample Hann-windowed frame
    c = 20 * cfg.hop_length
    w = np.hanning(cfg.win_length + 1)[:-1]                          # periodic Hann
    seg = tone.numpy().astype(np.float64)[c - cfg.win_length // 2:c + cfg.win_length // 2] * w
    power = np.abs(np.fft.rfft(seg, n=cfg.n_fft)) ** 2                # window centred in n_fft: same magnitude
    fb = sf.mel_filterbank(cfg.n_fft // 2 + 1, cfg.n_mels, sr).double().numpy()
    np.testing.assert_allclose(lm[:, 20].double().numpy(), np.log(power @ fb + 1e-6), rtol=1e-4, atol=1e-3)
    # the 1 kHz tone peaks in the band whose centre is nearest 1 kHz on the HTK scale
    mel = lambda f: 2595 * np.log10(1 + f / 700)
    centres = 700 * (10 ** (np.linspace(0, mel(sr / 2), 130)[1:-1] / 2595) - 1)
    assert int(lm[:, 20].argmax()) == int(np.abs(centres - 1000).argmin())
    # filterbank: triangles of peak 1 summing to a partition of unity between the first and last centre
    assert fb.max() <= 1 + 1e-9 and fb.min() >= 0


@pytest.mark.parametrize("sr,channels", [(16000, 0), (44100, 2), (48000, 1)])
def test_audio_segment_counts(sr, channels):
    for seconds, segs in EXPECTED_SEGMENTS.items():
        n = int(round(seconds * sr))
        a = torch.randn(n) * 0.1 if channels == 0 else torch.randn(channels, n) * 0.1
        spec = segment_audio(a, sr, FULL)
        assert tuple(spec.shape) == (segs, 128, 66)
    # the 66th frame is the zero padding of the log domain, normalised
    torch.testing.assert_close(spec[:, :, 65], torch.full_like(spec[:, :, 65], 4.2677393 / (2 * 4.5689974)))
    with pytest.raises(ValueError, match="channels, N"):
        segment_audio(torch.zeros(16000, 2), 16000, FULL)
    with pytest.raises(ValueError, match="fewer than one segment"):
        segment_audio(torch.zeros(5000), 16000, FULL)


# ----------------------------------------------------------------------------------------------------------------
# the released layout and strict loading
# ----------------------------------------------------------------------------------------------------------------
def test_full_size_model_has_the_released_keys():
    with torch.device("meta"):
        model = Synchformer(FULL)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = released_layout(FULL)
    assert got == want
    # keys per branch: visual 7 + 12 x 18 + 2 + 13, audio 5 + 12 x 16 + 2 + 13, projections 4,
    # transformer 4 + 2 + 1 + 3 x 16 + 2 + 2
    assert len(want) == 238 + 212 + 4 + 59
    assert want["vfeat_extractor.pos_embed"] == (1, 197, 768) and want["vfeat_extractor.temp_embed"] == (1, 8, 768)
    assert want["afeat_extractor.ast.embeddings.position_embeddings"] == (1, 74, 768)
    assert want["transformer.pos_emb_cfg.pos_emb"] == (1, 198, 768)
    assert want["transformer.off_head.weight"] == (21, 768)


def test_full_size_random_model_loads_strictly_and_gives_768_d_features(tmp_path):
    """Full-size MotionFormer, random weights, saved as ``vfeat_extractor.*`` with torch.save, loaded strictly.
    A full-size forward costs ~0.35 TFLOP per segment, so on the CPU it runs on one segment (0.64 s) and the 10 s
    clip's count (30 segments -> 240 x 768) is checked on the segmentation; the device check runs all 30."""
    sd = random_state_dict(released_layout(FULL, audio_visual=False))
    path = tmp_path / "synchformer_visual.pth"
    torch.save(sd, path)
    model = SyncFeatureExtractor.from_state_dict(path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert sf.num_segments(250) * 8 == 240
    segs = segment_video(clip(10.0, 25.0, hw=(36, 64)), 25.0, FULL)
    assert tuple(segs.shape) == (30, 3, 16, 224, 224)
    feats = model.features(clip(0.64, 25.0, hw=(36, 64)), 25.0)
    assert tuple(feats.shape) == (8, 768) and torch.isfinite(feats).all()


def test_whole_av_state_dict_loads_into_both(tmp_path):
    sd = random_state_dict(released_layout(TINY))
    path = tmp_path / "synchformer_state_dict.pth"
    torch.save(sd, path)
    vis = SyncFeatureExtractor.from_state_dict(path, TINY)            # strips exactly the non-visual branches
    assert set(vis.state_dict()) == {k for k in sd if k.startswith("vfeat_extractor.")}
    av = Synchformer.from_checkpoint(path, TINY)
    for k, v in av.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # Synchformer's own training checkpoint layout: {"model": state_dict, ...} of plain values
    torch.save({"model": sd, "epoch": 3}, tmp_path / "train.pt")
    av2 = Synchformer.from_checkpoint(tmp_path / "train.pt", TINY)
    assert torch.equal(av2.transformer.off_head.weight, sd["transformer.off_head.weight"])


def test_missing_extra_and_misshaped_keys_are_clear_errors(tmp_path):
    sd = random_state_dict(released_layout(TINY))
    missing = dict(sd)
    del missing["vfeat_extractor.blocks.0.timeattn.qkv.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing\.pth.*missing keys: vfeat_extractor\.blocks\.0\.timeattn\.qkv"):
        SyncFeatureExtractor.from_state_dict(tmp_path / "missing.pth", TINY)
    extra = dict(sd, **{"vfeat_extractor.head.weight": torch.zeros(3, 3), "ema.decay": torch.zeros(())})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"extra\.pth.*unexpected keys: ema\.decay, vfeat_extractor\.head\.weight"):
        SyncFeatureExtractor.from_state_dict(tmp_path / "extra.pth", TINY)
    with pytest.raises(ValueError, match=r"unexpected keys: ema\.decay"):
        Synchformer.from_checkpoint(tmp_path / "extra.pth", TINY)
    av_missing = dict(sd)
    del av_missing["transformer.off_head.bias"]
    torch.save(av_missing, tmp_path / "nohead.pth")
    with pytest.raises(ValueError, match=r"nohead\.pth.*missing keys: transformer\.off_head\.bias"):
        Synchformer.from_checkpoint(tmp_path / "nohead.pth", TINY)
    SyncFeatureExtractor.from_state_dict(tmp_path / "nohead.pth", TINY)   # the visual part does not need it
    torch.save(sd, tmp_path / "whole.pth")
    wider = SynchformerConfig.from_dict({**TINY.to_dict(), "vis_dim": 64})
    with pytest.raises(ValueError, match=r"whole\.pth.*shapes differ.*wrong config.*cls_token \(1, 1, 32\)"):
        SyncFeatureExtractor.from_state_dict(tmp_path / "whole.pth", wider)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        SyncFeatureExtractor.from_state_dict(tmp_path / "nowhere.pth", TINY)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickled_code_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    sd = random_state_dict(released_layout(TINY))
    sd["vfeat_extractor.payload"] = _Payload(str(marker))
    path = tmp_path / "evil.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"evil\.pth.*weights_only=True"):
        SyncFeatureExtractor.from_state_dict(path, TINY)
    with pytest.raises(ValueError, match=r"evil\.pth.*weights_only=True"):
        Synchformer.from_checkpoint(path, TINY)
    assert not marker.exists()


def test_safetensors_file_loads(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    sd = random_state_dict(released_layout(TINY))
    st.save_file(sd, str(tmp_path / "sync.safetensors"))
    av = Synchformer.from_checkpoint(tmp_path / "sync.safetensors", TINY)
    assert torch.equal(av.vproj.weight, sd["vproj.weight"])


# ----------------------------------------------------------------------------------------------------------------
# the offset classifier and DeSync (random weights: plumbing only)
# ----------------------------------------------------------------------------------------------------------------
def test_offset_head_shape_and_grid():
    model = Synchformer(TINY)
    with torch.inference_mode():
        logits = model(torch.randn(2, 14, 3, 16, 32, 32), torch.randn(2, 14, TINY.n_mels, 66))
    assert tuple(logits.shape) == (2, 21)
    grid = FULL.offset_grid()
    assert len(grid) == 21 and float(grid[0]) == -2.0 and float(grid[-1]) == 2.0
    torch.testing.assert_close(grid[1:] - grid[:-1], torch.full((20,), 0.2))
    assert FULL.window_seconds == pytest.approx(4.8) and FULL.sync_tokens == 198
    with pytest.raises(ValueError, match="198|tokens"):
        model(torch.randn(1, 10, 3, 16, 32, 32), torch.randn(1, 10, TINY.n_mels, 66))


def _av_clip(seconds, fps, sr, shift_s=0.0, seed=0):
    """A moving bright square and clicks at its appearances; ``shift_s`` > 0 moves the audio earlier."""
    n = int(round(seconds * fps))
    frames = np.zeros((n, 32, 32, 3), np.uint8)
    audio = np.zeros(int(round(seconds * sr)), np.float32)
    rng = np.random.default_rng(seed)
    for k, t0 in enumerate(np.sort(rng.uniform(0, seconds - 0.3, size=12))):
        i = int(t0 * fps)
        frames[i:i + 3, 8:24, 8:24] = 255
        j = int((t0 - shift_s) * sr)
        if 0 <= j < len(audio) - 400:
            audio[j:j + 400] += np.hanning(400).astype(np.float32)
    return frames, audio


def test_desync_follows_av_benchmark_windows():
    model = Synchformer(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)         # spread the random logits so the argmax varies
    frames, audio = _av_clip(8.0, 30000 / 1001, 44100)
    d = model.desync(frames, 30000 / 1001, audio, 44100)
    # by hand: both streams segmented, the first and the last 14 segments, |grid[argmax]| averaged
    with torch.inference_mode():
        v = segment_video(frames, 30000 / 1001, TINY)
        a = segment_audio(audio, 44100, TINY)
        assert v.shape[0] == a.shape[0] == 24
        vf, af = model.extract_vfeats(v[None]), model.extract_afeats(a[None])
        first = model.compare_v_a(vf[:, :14], af[:, :14])[0]
        last = model.compare_v_a(vf[:, -14:], af[:, -14:])[0]
    grid = TINY.offset_grid()
    want = (abs(float(grid[first.argmax()])) + abs(float(grid[last.argmax()]))) / 2
    assert d == pytest.approx(want, abs=1e-6)
    assert model.predict_offset(frames, 30000 / 1001, audio, 44100) == pytest.approx(float(grid[first.argmax()]))
    assert model.predict_offset(frames, 30000 / 1001, audio, 44100, start_segment=10) == pytest.approx(
        float(grid[last.argmax()]))
    # a shifted soundtrack goes through the same path (a trained model would score it worse; random weights
    # only show that the result stays on the grid)
    shifted = model.desync(*_av_clip(8.0, 25.0, 16000, shift_s=1.0)[:1], 25.0, _av_clip(8.0, 25.0, 16000, 1.0)[1],
                           16000)
    assert 0.0 <= shifted <= 2.0 and round(shifted / 0.1) == pytest.approx(shifted / 0.1, abs=1e-4)
    with pytest.raises(ValueError, match="needs 14"):
        model.desync(frames[:100], 30000 / 1001, audio, 44100)
    with pytest.raises(ValueError, match="does not fit"):
        model.predict_offset(frames, 30000 / 1001, audio, 44100, start_segment=11)


def test_desync_uses_the_common_duration():
    model = Synchformer(TINY)
    frames, audio = _av_clip(10.0, 25.0, 16000)
    v, a = model.video_features(frames, 25.0), model.audio_features(audio[:16000 * 6], 16000)  # 10 s, 6 s
    assert tuple(v.shape) == (30, 8, TINY.vis_dim) and tuple(a.shape) == ((96000 - 10240) // 5120 + 1, 6, TINY.aud_dim)
    s = a.shape[0]
    grid = TINY.offset_grid()
    with torch.inference_mode():
        want = [abs(float(grid[model.compare_v_a(v[None, i:i + 14], a[None, i:i + 14]).argmax()]))
                for i in (0, s - 14)]
    assert model.desync_from_features(v, a) == pytest.approx(sum(want) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="fewer than one segment"):
        model.audio_features(audio[:5000], 16000)
    with pytest.raises(ValueError, match="needs 14"):
        model.desync_from_features(v[:13], a)


def test_features_batching_does_not_change_results():
    model = SyncFeatureExtractor(TINY)
    frames = clip(2.0, 25.0)
    a = model.features(frames, 25.0, batch_segments=1)
    b = model.features(frames, 25.0, batch_segments=64)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="batch_segments"):
        model.features(frames, 25.0, batch_segments=0)


def test_bf16_autocast_stays_close_to_fp32():
    """The dtype plumbing of the GPU path (bf16 autocast, fp32 residual streams), run under CPU autocast."""
    model = Synchformer(TINY)
    segs, spec = torch.randn(1, 14, 3, 16, 32, 32), torch.randn(1, 14, TINY.n_mels, 66)
    with torch.inference_mode():
        v32, a32 = model.extract_vfeats(segs), model.extract_afeats(spec)
        l32 = model.compare_v_a(v32, a32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v16, a16 = model.extract_vfeats(segs), model.extract_afeats(spec)
            l16 = model.compare_v_a(v16, a16)
    assert v16.dtype == a16.dtype == torch.float32     # the pooled features come off fp32 residuals
    for lo, hi in ((v16, v32), (a16, a32), (l16.float(), l32)):
        assert float((lo - hi).abs().max() / hi.abs().max()) < 0.05


@pytest.mark.cuda
def test_full_size_ten_seconds_on_gpu(tmp_path):
    sd = random_state_dict(released_layout(FULL, audio_visual=False))
    torch.save(sd, tmp_path / "v.pth")
    model = SyncFeatureExtractor.from_state_dict(tmp_path / "v.pth", device="cuda")
    feats = model.features(clip(10.0, 30000 / 1001, hw=(360, 640)), 30000 / 1001)
    assert tuple(feats.shape) == (240, 768) and torch.isfinite(feats).all()
