"""Condition encoders and video decoding: MiniLM text tokens, built-in frame and motion features, a tiny
random CLIP vision tower loaded from a local directory, precomputed feature files, PyAV decoding."""
import numpy as np
import pytest
import torch

from omni2sound.encoders import (
    FrameSemanticEncoder,
    MotionSyncEncoder,
    TextEncoder,
    VisionTowerEncoder,
    load_features,
    pad_stack,
    resample_time,
)
from omni2sound.video import VideoError, read_video, write_video

# Small models: one intra-op thread is faster and steadier on a shared 2-core box.
pytestmark = pytest.mark.usefixtures("one_thread")


def scene(shape: str, colour, pos, size=32, side=10, bg=(40, 40, 40)):
    img = np.zeros((size, size, 3), np.uint8) + np.array(bg, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    y, x = pos
    if shape == "square":
        m = (yy >= y) & (yy < y + side) & (xx >= x) & (xx < x + side)
    elif shape == "circle":
        m = (yy - y - side / 2 + 0.5) ** 2 + (xx - x - side / 2 + 0.5) ** 2 <= (side / 2) ** 2
    else:  # triangle: the lower-left half of the box
        m = (yy >= y) & (yy < y + side) & (xx >= x) & (xx - x <= yy - y)
    img[m] = colour
    return img


@pytest.fixture(scope="module")
def text_encoder():
    return TextEncoder.from_pretrained(None, max_tokens=24)


def test_minilm_text_tokens(text_encoder):
    tokens, lens = text_encoder.encode(["a bell rings twice", "", "an engine hums while a dog barks"])
    assert text_encoder.dim == 384 and tokens.shape[0] == 3 and tokens.shape[2] == 384
    assert lens[1] == 0 and lens[0] > 2 and lens[2] > lens[0] and tokens.shape[1] == int(lens.max())
    assert (tokens[0, lens[0]:] == 0).all() and tokens[0, :lens[0]].abs().sum() > 0
    # batching does not change a prompt's tokens (padding is masked in the text model)
    alone, n = text_encoder.encode(["a bell rings twice"])
    torch.testing.assert_close(alone[0, :n[0]], tokens[0, :lens[0]], atol=1e-4, rtol=1e-4)
    # different captions, different tokens
    other, _ = text_encoder.encode(["a bell rings once"])
    assert (other[0, :n[0]] - alone[0]).abs().max() > 1e-2


def test_text_too_long_is_a_clear_error(text_encoder):
    with pytest.raises(ValueError, match="prompt 1 is .* tokens long, more than max_tokens=24"):
        text_encoder.encode(["short", "word " * 40])
    tok = TextEncoder(text_encoder.model, text_encoder.tokenizer, max_tokens=24, truncate=True)
    _, lens = tok.encode(["word " * 40])
    assert lens.tolist() == [24]
    with pytest.raises(FileNotFoundError, match="no model directory"):
        TextEncoder.from_pretrained("/nonexistent/text-model")


def test_frame_encoder_carries_colour_and_shape_identity():
    enc = FrameSemanticEncoder()
    shapes, colours = ("circle", "square", "triangle"), ((220, 40, 40), (40, 80, 230), (50, 200, 60))
    rng = np.random.default_rng(0)
    protos = {(s, c): enc.encode(np.stack([scene(s, c, (11, 11))]))[0][-16:]
              for s in shapes for c in colours}
    # position-invariant part: the nearest prototype of a moved object is its own shape and colour
    for s in shapes:
        for c in colours:
            pos = tuple(rng.integers(0, 20, 2))
            f = enc.encode(np.stack([scene(s, c, pos)]))[0]
            assert f.shape == (272,)
            best = min(protos, key=lambda k: float((protos[k] - f[-16:]).norm()))
            assert best == (s, c), (s, c, best)
    # deterministic, and the layout part tells where the object is
    a = enc.encode(np.stack([scene("square", colours[0], (2, 2)), scene("square", colours[0], (20, 20))]))
    assert (a[0, :192] - a[1, :192]).abs().max() > 0.1
    torch.testing.assert_close(enc.encode(np.stack([scene("square", colours[0], (2, 2))]))[0], a[0])
    with pytest.raises(ValueError, match="uint8"):
        enc.encode(np.zeros((2, 8, 8, 3), np.float32))


def test_motion_encoder_shows_when_an_object_moves_and_strikes():
    # 2 s at 25 fps: a block falls for 0.8 s and stops (strikes) at frame 20, then rests
    frames = np.stack([scene("square", (250, 250, 250), (min(i, 20), 10), side=6) for i in range(50)])
    feats = MotionSyncEncoder().encode(frames)
    assert feats.shape == (48, 64)                                  # 24 per second
    energy = feats[:, :48].sum(1)
    t24 = (torch.arange(48) + 0.5) / 24
    moving, resting = energy[(t24 > 0.1) & (t24 < 0.7)], energy[t24 > 0.9]
    assert moving.min() > 10 * resting.max() + 1e-6
    strike = t24[int(feats[:, 48:].sum(1).argmin())]               # motion energy falls most sharply
    assert abs(strike.item() - 0.8) <= 1.5 / 24, strike
    with pytest.raises(ValueError, match="zero frames"):
        MotionSyncEncoder().encode(np.zeros((0, 8, 8, 3), np.uint8))


def test_resample_time_and_pad_stack():
    x = torch.arange(25, dtype=torch.float32)[:, None] / 25 + 0.5 / 25            # centres at 25 Hz
    y = resample_time(x, 25.0, 24.0)
    assert y.shape == (24, 1)
    torch.testing.assert_close(y[1:-1, 0], ((torch.arange(24) + 0.5) / 24)[1:-1], atol=1e-5, rtol=0)
    stacked, lens = pad_stack([torch.ones(3, 2), None, torch.ones(1, 2)], 2)
    assert stacked.shape == (3, 3, 2) and lens.tolist() == [3, 0, 1] and stacked[0].sum() == 6


def test_vision_tower_from_local_dir(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=16)
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(cfg).save_pretrained(tmp_path / "clip")
    enc = VisionTowerEncoder.from_pretrained(tmp_path / "clip")
    frames = np.stack([scene("circle", (220, 40, 40), (5, 5)), scene("square", (40, 80, 230), (15, 15))] * 3)
    emb = enc.encode(frames)
    assert enc.dim == 16 and emb.shape == (6, 16)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(6))
    torch.testing.assert_close(emb[0], emb[2])
    assert (emb[0] - emb[1]).abs().max() > 1e-3
    with pytest.raises(FileNotFoundError):
        VisionTowerEncoder.from_pretrained(tmp_path / "missing")


def test_load_features(tmp_path):
    from safetensors.torch import save_file
    x = torch.randn(48, 8)
    np.save(tmp_path / "sync.npy", x.numpy())
    torch.testing.assert_close(load_features(tmp_path / "sync.npy", dim=8), x)
    save_file({"sync_feature": x, "clip_feature": torch.randn(16, 4)}, str(tmp_path / "f.safetensors"))
    torch.testing.assert_close(load_features(tmp_path / "f.safetensors", key="sync_feature"), x)
    with pytest.raises(ValueError, match="pass key="):
        load_features(tmp_path / "f.safetensors")
    with pytest.raises(ValueError, match="expected 9"):
        load_features(tmp_path / "sync.npy", dim=9)
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="bad.npy"):
        load_features(tmp_path / "bad.npy")
    with pytest.raises(FileNotFoundError, match="nope.npy"):
        load_features(tmp_path / "nope.npy")


def test_read_video_rates_sizes_and_errors(tmp_path):
    frames = np.stack([scene("square", (250, 250, 250), (4, i % 24), side=8) for i in range(30)])  # 1.2 s
    write_video(tmp_path / "a.mp4", frames, fps=25)
    v25 = read_video(tmp_path / "a.mp4", fps=25)
    assert v25.dtype == np.uint8 and v25.shape == (30, 32, 32, 3)
    # the object's column follows the source frames (lossy codec: compare positions, not pixels)
    cols = [int(np.argmax(f.astype(float).mean((0, 2)))) for f in v25[:20]]
    assert all(abs(c - (i + 3)) <= 4 for i, c in enumerate(cols)), cols
    assert read_video(tmp_path / "a.mp4", fps=8, size=16).shape == (10, 16, 16, 3)     # ceil(1.2 * 8)
    assert read_video(tmp_path / "a.mp4", fps=8, size=(12, 20)).shape == (10, 12, 20, 3)
    assert read_video(tmp_path / "a.mp4", fps=25, start=0.4, max_seconds=0.4).shape[0] == 10
    # odd source rate and a one-frame clip
    write_video(tmp_path / "odd.mp4", frames[:7], fps=12.5)
    assert read_video(tmp_path / "odd.mp4", fps=25).shape[0] == 14
    write_video(tmp_path / "one.mp4", frames[:1], fps=10)
    assert read_video(tmp_path / "one.mp4", fps=25).shape[0] >= 1
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_video(tmp_path / "missing.mp4", fps=8)
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 200)
    with pytest.raises(VideoError, match="corrupt.mp4"):
        read_video(tmp_path / "corrupt.mp4", fps=8)
    with pytest.raises(ValueError, match="fps"):
        read_video(tmp_path / "a.mp4", fps=0)


@pytest.mark.parametrize("kind", ["t5", "clap"])
def test_t5_and_clap_text_towers_from_local_dir(tmp_path, kind):
    """Tiny random T5 encoder / CLAP text tower saved to a directory (with the MiniLM tokenizer files,
    which AutoTokenizer reads by their tokenizer_class) load through the same TextEncoder interface."""
    import shutil

    from omni2sound.encoders import default_text_encoder_path
    torch.manual_seed(0)
    if kind == "t5":
        from transformers import T5Config, T5EncoderModel
        model = T5EncoderModel(T5Config(vocab_size=30522, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    else:
        from transformers import ClapTextConfig, ClapTextModel
        model = ClapTextModel(ClapTextConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32,
                                             max_position_embeddings=64))
    model.save_pretrained(tmp_path / kind)
    src = default_text_encoder_path()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(f"{src}/{name}", tmp_path / kind / name)
    enc = TextEncoder.from_pretrained(tmp_path / kind, max_tokens=16)
    assert enc.dim == 16 and type(enc.model).__name__ == ("T5EncoderModel" if kind == "t5" else "ClapTextModel")
    tokens, lens = enc.encode(["a dog barks", ""])
    assert tokens.shape[2] == 16 and lens[0] > 0 and lens[1] == 0 and torch.isfinite(tokens).all()
