"""EncoderSpec: parsing, recording, and loading every real encoder kind from tiny random checkpoints saved in
the released formats (transformers folders, open_clip state dicts when open_clip is installed)."""
import json

import numpy as np
import pytest
import tiny_encoders as tiny
import torch
import torch.nn.functional as F

from omni2sound.encoder_spec import (
    CLIP_MEAN,
    EncoderSpec,
    EncoderSpecError,
    FrameRequest,
    check_widths,
    read_frames,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_parse_record_and_errors(tmp_path):
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    (tmp_path / "clip.bin").write_bytes(b"")
    (tmp_path / "sf.pth").write_bytes(b"")
    spec = EncoderSpec.parse(str(tmp_path / "t5"), f"open_clip:ViT-H-14-378-quickgelu:{tmp_path / 'clip.bin'}",
                             f"synchformer:{tmp_path / 'sf.pth'}", text_max_tokens=128, video_size=384)
    assert spec.text.kind == "t5" and spec.video.kind == "open_clip" and spec.video.arch == "ViT-H-14-378-quickgelu"
    assert spec.video.image_size == 384 and spec.sync.kind == "synchformer" and spec.text.max_tokens == 128
    again = EncoderSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.identity() == spec.identity()
    assert EncoderSpec.parse() == EncoderSpec() and EncoderSpec().text.kind == "minilm"
    for bad, match in [(dict(text=str(tmp_path / "nope")), "no model folder at .*nope"),
                       (dict(video="open_clip:/x.bin"), "open_clip:ARCH:FILE"),
                       (dict(video=f"open_clip:ViT-H-14:{tmp_path / 'none.bin'}"), "no such file: .*none.bin"),
                       (dict(sync="motionformer:/x"), "builtin or synchformer:FILE"),
                       (dict(sync=f"synchformer:{tmp_path / 'gone.pth'}"), "gone.pth")]:
        with pytest.raises(EncoderSpecError, match=match):
            EncoderSpec.parse(**bad)
    with pytest.raises(EncoderSpecError, match="unknown video encoder kind 'dino'"):
        EncoderSpec.from_dict({"video": {"kind": "dino", "path": "/x"}}, where="index.json")
    with pytest.raises(EncoderSpecError, match="index.json: unknown text field"):
        EncoderSpec.from_dict({"text": {"kind": "minilm", "size": 3}}, where="index.json")


def test_width_check_names_features_and_dit():
    from omni2sound.model import dit_config
    cfg = dit_config("tiny", text_dim=768, video_dim=1024, sync_dim=768)
    check_widths(cfg, {"text": 768, "video": 1024, "sync": 768}, "feats/train", "runs/x/stage2")
    with pytest.raises(EncoderSpecError, match=r"feats/train .* runs/x/stage2 .*video 272 vs 1024, sync 64 vs 768"):
        check_widths(cfg, {"text": 768, "video": 272, "sync": 64}, "feats/train", "runs/x/stage2")


def test_flan_t5_and_clap_text_from_whole_checkpoints(tmp_path):
    """The released layouts: flan-t5 is a whole encoder-decoder checkpoint, CLAP a whole two-tower model; the
    loaded towers carry exactly the saved weights (not a silently re-initialised tower)."""
    t5 = tiny.flan_t5(tmp_path / "flan", d_model=24).eval()
    cl = tiny.clap(tmp_path / "clap", hidden=16)
    enc = EncoderSpec.parse(str(tmp_path / "flan"), text_max_tokens=32).load()
    assert enc.spec.text.kind == "t5" and enc.text.dim == 24
    assert tiny.same_weights(enc.text.model.encoder, t5.encoder)
    tokens, lens = enc.text.encode(["a dog barks twice", ""])
    ids = enc.text.tokenizer(["a dog barks twice"], return_tensors="pt")
    ref = t5.encoder(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state
    torch.testing.assert_close(tokens[0, :lens[0]], ref[0], atol=1e-5, rtol=1e-5)
    assert lens[1] == 0
    c = EncoderSpec.parse(f"clap:{tmp_path / 'clap'}").load()
    assert c.text.dim == 16 and tiny.same_weights(c.text.model, cl.text_model)
    # transformers reads a whole CLAP checkpoint as a bare ClapTextModel with every weight missing (initialised at
    # random, with a warning): the loader refuses that
    from transformers import ClapTextModel

    from omni2sound.encoders import _load_strict
    with pytest.raises(ValueError, match="clap: the checkpoint lacks .* weights of ClapTextModel"):
        _load_strict(ClapTextModel, str(tmp_path / "clap"))


def test_clip_and_siglip_towers_model_normalisation_and_input_size(tmp_path):
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    clip = tiny.clip_vision(tmp_path / "clip", projection_dim=20, image_size=32, mean=mean, std=std).eval()
    sig = tiny.siglip_vision(tmp_path / "siglip", hidden=24).eval()
    frames = torch.randint(0, 256, (5, 40, 56, 3), dtype=torch.uint8).numpy()
    enc = EncoderSpec.parse(video=f"hf:{tmp_path / 'clip'}").load()
    assert enc.video.mean == mean and enc.video.std == std and enc.video_request == FrameRequest(8.0, 32, False)
    emb = enc.video.encode(frames)
    x = F.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255, size=(32, 32), mode="bicubic",
                      align_corners=False, antialias=True).clamp(0, 1)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = F.normalize(clip(pixel_values=x).image_embeds, dim=-1)
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-5)
    # the paper's larger input than the tower's native size: position embeddings interpolated
    big = EncoderSpec.parse(video=str(tmp_path / "clip"), video_size=48).load()
    assert big.video_request.size == 48 and big.video.encode(frames).shape == (5, 20)
    assert big.dims() == {"text": 384, "video": 20, "sync": 64}
    s = EncoderSpec.parse(video=str(tmp_path / "siglip")).load()
    assert tiny.same_weights(s.video.model, sig) and s.video.mean == (0.5, 0.5, 0.5)
    assert s.video.encode(frames).shape == (5, 24) and s.dims()["video"] == 24


def test_open_clip_tower_from_state_dict(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    sd = model.state_dict()
    torch.save(sd, tmp_path / "open_clip_pytorch_model.bin")
    enc = EncoderSpec.parse(video=f"open_clip:ViT-B-32:{tmp_path / 'open_clip_pytorch_model.bin'}",
                            video_size=224).load()
    assert enc.video.mean == CLIP_MEAN and enc.video.encode(np.zeros((2, 64, 64, 3), np.uint8)).shape == (2, 512)
    del sd["visual.proj"]
    torch.save(sd, tmp_path / "broken.bin")
    with pytest.raises(EncoderSpecError, match="broken.bin"):
        EncoderSpec.parse(video=f"open_clip:ViT-B-32:{tmp_path / 'broken.bin'}").load()


def test_read_frames_centre_crop_keeps_aspect(tmp_path):
    from omni2sound.video import write_video
    frames = np.zeros((10, 48, 96, 3), np.uint8)
    frames[:, :, 40:56] = 255                                       # a white bar in the middle of a wide frame
    write_video(tmp_path / "wide.mp4", frames, fps=25)
    out = read_frames(tmp_path / "wide.mp4", FrameRequest(25.0, 32, crop=True))
    assert out.shape == (10, 32, 32, 3)
    col = out[0].astype(float).mean((0, 2))
    assert col[12:20].mean() > 200 and col[:4].mean() < 40 and col[-4:].mean() < 40   # bar centred, not squashed
    sq = read_frames(tmp_path / "wide.mp4", FrameRequest(8.0, 16))
    assert sq.shape == (4, 16, 16, 3)


def test_pipeline_loads_the_recorded_encoders_and_generates_from_raw_video(tmp_path):
    """pipeline.json's encoder spec alone decides the encoders: a CLIP tower and a Flan-T5 encoder here."""
    from omni2sound.model import Omni2SoundDiT, dit_config
    from omni2sound.pipeline import Omni2SoundPipeline, PipelineConfig
    from omni2sound.vae import VAE_PRESETS, AudioVAE
    from omni2sound.video import write_video
    tiny.flan_t5(tmp_path / "flan", d_model=24)
    tiny.clip_vision(tmp_path / "clip", projection_dim=20)
    spec = EncoderSpec.parse(str(tmp_path / "flan"), f"hf:{tmp_path / 'clip'}", text_max_tokens=32)
    spec.dims = {"text": 24, "video": 20, "sync": 64}
    dit = Omni2SoundDiT(dit_config("tiny", hidden_dim=32, depth=1, num_heads=2, text_dim=24, video_dim=20, sync_dim=64,
                                   max_text_tokens=32, max_duration=2.0))
    Omni2SoundPipeline(dit, AudioVAE(VAE_PRESETS["tiny"]), PipelineConfig(encoders=spec.to_dict())
                       ).save_pretrained(tmp_path / "model")
    write_video(tmp_path / "v.mp4", np.random.randint(0, 255, (20, 32, 48, 3), dtype=np.uint8), fps=25)
    pipe = Omni2SoundPipeline.from_pretrained(tmp_path / "model")
    assert pipe.encoder_spec == spec
    cond = pipe.encode(video=[str(tmp_path / "v.mp4")], text=["a dog barks"], duration=0.8)
    assert type(pipe.video_encoder).__name__ == "VisionTowerEncoder" and pipe.text_encoder.dim == 24
    assert cond.video_tokens.shape[1:] == (7, 20) and int(cond.video_lens[0]) == 7
    assert cond.text_tokens.shape[-1] == 24 and int(cond.text_lens[0]) > 0
    out = pipe.generate(video=str(tmp_path / "v.mp4"), text="a dog barks", duration=0.8, steps=1, guidance=2.0)
    assert out.audio.shape == (1, int(0.8 * pipe.sample_rate)) and torch.isfinite(out.audio).all()


def test_synchformer_sync_encoder_from_released_state_dict(tmp_path):
    ex, cfg = tiny.synchformer(tmp_path / "synchformer_state_dict.pth")
    spec = EncoderSpec.parse(sync=f"synchformer:{tmp_path / 'synchformer_state_dict.pth'}")
    spec.sync.config = cfg
    from omni2sound.encoder_spec import FrameSemanticEncoder, LoadedEncoders, load_sync
    enc = LoadedEncoders(spec, None, FrameSemanticEncoder(), load_sync(spec.sync, "cpu", torch.float32))
    assert enc.sync_request == FrameRequest(25.0, 32, crop=True) and enc.sync.dim == 32
    assert tiny.same_weights(enc.sync.extractor, ex)
    clips = [torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8).numpy() for n in (25, 120, 10, 40)]
    feats = enc.sync.encode_many(clips)
    assert [tuple(f.shape) for f in feats] == [(16, 32), (112, 32), (0, 32), (32, 32)]    # 24 / s after 0.64 s
    torch.testing.assert_close(feats[1], ex.features(clips[1], 25.0).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats[3], enc.sync.encode(clips[3]), atol=1e-5, rtol=1e-5)
    # the released full-size layout refuses a state dict of another size, naming the file
    spec.sync.config = None
    with pytest.raises(ValueError, match="synchformer_state_dict.pth.*missing keys"):
        load_sync(spec.sync, "cpu", torch.float32)
