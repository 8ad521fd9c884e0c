"""The real-data path end to end, with the paper's preset and the paper's encoder kinds at tiny sizes: a VGGSound
CSV and mp4 clips (made here with PyAV) -> manifest -> VAE stage -> extraction (Flan-T5 text, a CLIP vision tower,
Synchformer) -> DiT stages 1-3 -> generation from a raw video with no encoder flags (pipeline.json's spec)."""
import json

import numpy as np
import pytest
import soundfile as sf
import tiny_encoders as tiny
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


def _clip(path, seed, seconds=1.6, sr=16000):
    """A bouncing square whose impacts click: real picture motion and sound for the encoders to read."""
    rng = np.random.default_rng(seed)
    n = int(seconds * 25)
    frames = np.zeros((n, 48, 64, 3), np.uint8) + rng.integers(0, 80, 3).astype(np.uint8)
    colour = rng.integers(100, 255, 3).astype(np.uint8)
    wav = 0.01 * rng.standard_normal(int(seconds * sr)).astype(np.float32)
    for i in range(n):
        y = int(30 * abs(np.sin(np.pi * i / 12)))
        frames[i, y:y + 12, 20 + seed * 5:32 + seed * 5] = colour
        if i % 12 == 0:
            a = int(i / 25 * sr)
            wav[a:a + 400] += 0.5 * np.sin(2 * np.pi * (300 + 100 * seed) * np.arange(400) / sr) * np.hanning(400)
    tiny.write_av_clip(path, frames, 25, wav, sr)


def test_paper_preset_from_vggsound_csv_to_generation(tmp_path, capsys):
    from omni2sound.data.corpora import main as corpora
    from omni2sound.extract import main as extract
    from omni2sound.generate import main as generate
    from omni2sound.pipeline import Omni2SoundPipeline
    from omni2sound.train import main as train

    clips = tmp_path / "clips"
    clips.mkdir()
    ids = ["aaa", "bbb", "ccc", "ddd"]
    for k, yid in enumerate(ids):
        _clip(clips / f"{yid}_{10 * k:06d}.mp4", k)
    (tmp_path / "vggsound.csv").write_text("".join(f"{yid},{10 * k},{label},train\n" for k, (yid, label) in enumerate(
        zip(ids, ["dog barking", "drum", "bell ringing", "hammering"]))) + "eee,0,missing clip,train\n")
    assert corpora(["vggsound", "--csv", str(tmp_path / "vggsound.csv"), "--clips", str(clips), "--duration", "1.6",
                    "--out", str(tmp_path / "train.jsonl")]) == 0
    assert "vggsound.csv:5: missing clip" in capsys.readouterr().err

    # the paper's encoder kinds, tiny: Flan-T5 (whole seq2seq checkpoint), a CLIP vision tower, Synchformer
    tiny.flan_t5(tmp_path / "flan-t5", d_model=24)
    tiny.clip_vision(tmp_path / "clip", projection_dim=20, image_size=32,
                     mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
    _, sync_cfg = tiny.synchformer(tmp_path / "synchformer_state_dict.pth")
    (tmp_path / "sync.json").write_text(json.dumps(sync_cfg))

    runs = str(tmp_path / "runs")
    short = ["--preset", "paper", "--runs-dir", runs, "--name", "vgg", "--no-report", "--device", "cpu", "--set",
             "dit_preset=tiny", "vae_preset=tiny", "vae_steps=2", "vae_batch=2", "stage1_steps=2", "stage2_steps=2",
             "stage3_steps=2", "batch_size=2", "warmup=1", "compile=false", "grad_checkpointing=false",
             "log_every=1", "ckpt_every=2", "progress=false", "bf16=false"]
    train(short + [f"data={tmp_path / 'train.jsonl'}", "--stage", "vae"])
    feats = tmp_path / "features"
    extract(["--manifest", str(tmp_path / "train.jsonl"), "--vae", f"{runs}/vgg/vae", "--out", str(feats / "train"),
             "--shard-size", "3", "--workers", "1", "--device", "cpu",
             "--text-encoder", f"t5:{tmp_path / 'flan-t5'}", "--text-max-tokens", "64",
             "--video-encoder", f"hf:{tmp_path / 'clip'}", "--video-size", "48",
             "--sync-encoder", f"synchformer:{tmp_path / 'synchformer_state_dict.pth'}",
             "--sync-config", str(tmp_path / "sync.json")])
    index = json.loads((feats / "train" / "index.json").read_text())
    assert index["num_clips"] == 4 and len(index["shards"]) == 2
    assert index["encoders"]["dims"] == {"text": 24, "video": 20, "sync": 32}
    assert index["encoders"]["sync"]["kind"] == "synchformer" and index["encoders"]["video"]["image_size"] == 48
    from omni2sound.data.shards import ShardDataset
    clip = ShardDataset(str(feats / "train"))[0]
    assert clip["video"].shape == (13, 20) and clip["sync"].shape == (32, 32)      # 8 / s; (40 - 16) // 8 + 1 = 4 x 8
    assert clip["latent_mean"].shape[0] == 40 and clip["text"].shape[1] == 24

    train(short + [f"data={feats}", "--stage", "stage1", "--stage", "stage2", "--stage", "stage3"])
    stage3 = tmp_path / "runs" / "vgg" / "stage3"
    dit_cfg = json.loads((stage3 / "dit" / "config.json").read_text())
    assert (dit_cfg["text_dim"], dit_cfg["video_dim"], dit_cfg["sync_dim"]) == (24, 20, 32)
    assert dit_cfg["max_text_tokens"] == 64                                       # the spec's caption limit
    pj = json.loads((stage3 / "pipeline.json").read_text())
    assert pj["encoders"] == index["encoders"]

    # generation from raw video: the encoders come from pipeline.json alone
    out = tmp_path / "out.wav"
    assert generate(["--model", str(stage3), "--video", str(clips / "aaa_000000.mp4"), "--text", "a dog barks",
                     "--duration", "1.6", "--steps", "2", "--device", "cpu", "--out", str(out)]) == 0
    wav, sr = sf.read(out)
    assert sr == 16000 and len(wav) == int(1.6 * 16000) and np.isfinite(wav).all()
    pipe = Omni2SoundPipeline.from_pretrained(stage3)
    assert type(pipe.sync_encoder).__name__ == "SynchformerSyncEncoder"
    assert type(pipe.video_encoder).__name__ == "VisionTowerEncoder" and pipe.text_encoder.dim == 24

    # features of other encoders cannot continue this DiT: the error names both
    from omni2sound.encoder_spec import EncoderSpecError
    from omni2sound.train import TRAIN_PRESETS, parse_args, run
    other = tmp_path / "other"
    extract(["--manifest", str(tmp_path / "train.jsonl"), "--vae", f"{runs}/vgg/vae", "--out", str(other / "train"),
             "--shard-size", "4", "--workers", "0", "--device", "cpu", "--text-encoder", f"t5:{tmp_path / 'flan-t5'}"])
    cfg, _ = parse_args(short + [f"data={other}", "--name", "vgg2"])
    assert cfg.dit_preset == "tiny" and TRAIN_PRESETS["paper"].dit_preset == "L"
    with pytest.raises(EncoderSpecError, match=r"features in .*other/train do not fit the DiT of .*stage3/dit_raw "
                                               r"\(feature width vs DiT input width: video 272 vs 20, sync 64 vs 32\)"):
        run(cfg, stages=["stage1"], init_from=str(stage3), report=False)
    assert torch.isfinite(torch.from_numpy(wav)).all()
