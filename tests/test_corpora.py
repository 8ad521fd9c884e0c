"""Manifests from real corpora: the VGGSound CSV plus a folder of clips, SoundAtlas-style records with released
features; every bad row reported by file and line and counted; extraction from both (mp4 soundtracks decoded by
PyAV, released features passed through unchanged)."""
import json

import numpy as np
import pytest
import tiny_encoders as tiny
import torch

from omni2sound.data.corpora import main as corpora_main
from omni2sound.data.corpora import soundatlas_records, vggsound_records
from omni2sound.data.manifest import read_manifest

pytestmark = pytest.mark.usefixtures("one_thread")


def test_vggsound_csv_patterns_and_bad_rows(tmp_path, capsys):
    clips = tmp_path / "clips"
    clips.mkdir()
    for name in ("abc_000030.mp4", "x-y_z_12.mp4", "dup_000000.mp4", "tst_000005.mp4"):
        (clips / name).write_bytes(b"")
    (tmp_path / "vgg.csv").write_text(
        "# youtube_id,start_seconds,label,split\n"
        "abc,30,dog barking,train\n"                     # line 2: {id}_{start:06d}.mp4
        "x-y_z,12,\"engine, idling\",train\n"            # line 3: {id}_{start}.mp4, a label with a comma
        "gone,40,cat purring,train\n"                    # line 4: no clip
        "abc,thirty,dog barking,train\n"                 # line 5: bad start
        "abc,30,dog barking\n"                           # line 6: 3 fields
        "dup,0,rain,holdout\n"                           # line 7: bad split
        "abc,30.0,dog barking,train\n"                   # line 8: duplicate of line 2
        "\n"
        "tst,5,bird song,test\n")                        # line 10
    recs, rep = vggsound_records(str(tmp_path / "vgg.csv"), str(clips))
    assert [r.clip_id for r in recs] == ["abc_30", "x-y_z_12", "tst_5"]
    assert recs[1].caption == "engine, idling" and recs[2].split == "test" and recs[0].video == recs[0].audio
    assert recs[0].video.endswith("abc_000030.mp4") and recs[0].duration == 10.0
    assert rep.rows == 8 and rep.kept == 3 and rep.skipped == 5
    assert dict(rep.counts) == {"missing clip": 1, "bad start": 1, "bad row": 1, "bad split": 1, "duplicate": 1}
    lines = sorted(e.line for e in rep.errors)
    assert lines == [4, 5, 6, 7, 8]
    assert "vgg.csv:4: missing clip: gone_40" in rep.summary()
    only_test, _ = vggsound_records(str(tmp_path / "vgg.csv"), str(clips), splits=["test"], caption=False)
    assert [r.clip_id for r in only_test] == ["tst_5"] and only_test[0].caption is None
    with pytest.raises(ValueError, match="unknown placeholder"):
        vggsound_records(str(tmp_path / "vgg.csv"), str(clips), patterns=["{youtube}.mp4"])
    # separate audio files by pattern; the CLI writes a manifest the extractor reads back without complaint
    (tmp_path / "wav").mkdir()
    (tmp_path / "wav" / "abc_30.wav").write_bytes(b"")
    assert corpora_main(["vggsound", "--csv", str(tmp_path / "vgg.csv"), "--clips", str(clips), "--audio",
                         str(tmp_path / "wav"), "--audio-pattern", "{id}_{start}.wav",
                         "--out", str(tmp_path / "m.jsonl")]) == 0
    err = capsys.readouterr().err
    assert "1 of 8 rows kept, 7 left out" in err and "missing audio" in err
    back, mrep = read_manifest(str(tmp_path / "m.jsonl"))
    assert [r.clip_id for r in back] == ["abc_30"] and back[0].audio.endswith("abc_30.wav") and mrep.skipped == 0
    with pytest.raises(SystemExit):
        corpora_main(["vggsound", "--csv", str(tmp_path / "vgg.csv"), "--clips", str(clips), "--strict",
                      "--out", str(tmp_path / "strict.jsonl")])
    assert not (tmp_path / "strict.jsonl").exists()


def _features(tmp_path, stem, seconds):
    clip = np.random.randn(int(seconds * 8), 12).astype(np.float32)
    sync = np.random.randn(int(seconds * 24), 768).astype(np.float32)
    np.save(tmp_path / "feats" / f"{stem}_clip.npy", clip)
    np.save(tmp_path / "feats" / f"{stem}_sync.npy", sync)
    return clip, sync


def test_soundatlas_records_and_extraction_passes_released_features_through(tmp_path, capsys):
    import soundfile as sf

    from omni2sound.extract import extract_manifest
    from omni2sound.vae import VAE_PRESETS, AudioVAE
    (tmp_path / "feats").mkdir()
    (tmp_path / "audio").mkdir()
    sr = 16000
    for stem in ("a", "b", "c"):
        sf.write(tmp_path / "audio" / f"{stem}_clip.wav", 0.1 * np.random.randn(sr * 2).astype(np.float32), sr)
    fa = _features(tmp_path, "a", 2.0)
    _features(tmp_path, "b", 2.0)
    rows = [
        {"task": "vt2a", "clip_feature": "feats/a_clip.npy", "sync_feature": "feats/a_sync.npy",
         "text_prompt": "a dog barks", "seconds_start": 0, "seconds_total": 2.0},          # line 1
        {"task": "t2a", "text_prompt": "rain", "seconds_start": 0, "seconds_total": 2.0,
         "audio": "audio/c_clip.wav"},                                                       # line 2: text only
        {"task": "v2a", "clip_feature": "feats/b_clip.npy", "sync_feature": "feats/missing.npy",
         "text_prompt": "", "seconds_start": 0, "seconds_total": 2.0},                      # line 3: missing sync
        {"task": "v2a", "clip_feature": "feats/b_clip.npy", "sync_feature": "feats/b_sync.npy",
         "text_prompt": "x", "seconds_start": 0, "seconds_total": -1},                      # line 4: bad seconds
    ]
    text = "\n".join(json.dumps(r) for r in rows) + "\n{not json\n"                         # line 5
    (tmp_path / "sa.jsonl").write_text(text)
    recs, rep = soundatlas_records(str(tmp_path / "sa.jsonl"), str(tmp_path / "audio"),
                                   audio_patterns=("{stem}.wav",))
    assert [r.clip_id for r in recs] == ["a_clip/vt2a", "c_clip/t2a"]
    assert recs[0].features == {"video": str(tmp_path / "feats/a_clip.npy"), "sync": str(tmp_path / "feats/a_sync.npy")}
    assert recs[1].features is None and recs[1].caption == "rain"
    assert sorted(e.line for e in rep.errors) == [3, 4, 5] and rep.skipped == 3
    assert "missing feature" in rep.summary() and "missing.npy" in rep.summary()
    assert corpora_main(["soundatlas", "--records", str(tmp_path / "sa.jsonl"), "--audio", str(tmp_path / "audio"),
                         "--audio-pattern", "{stem}.wav", "--out", str(tmp_path / "m.jsonl")]) == 0
    torch.manual_seed(0)
    AudioVAE(VAE_PRESETS["tiny"]).save_pretrained(tmp_path / "vae")
    # the paper's encoders declared, their weights absent: released features never load them
    from omni2sound.encoder_spec import EncoderSpec
    from omni2sound.extract import Encoders
    spec = EncoderSpec.parse(video="open_clip:ViT-H-14-378-quickgelu:/absent/open_clip_pytorch_model.bin",
                             sync="synchformer:/absent/synchformer_state_dict.pth", check=False)
    res = extract_manifest(str(tmp_path / "m.jsonl"), str(tmp_path / "vae"), str(tmp_path / "out"), shard_size=4,
                           enc=Encoders(spec=spec), workers=0, progress=False)
    assert res["clips_failed"] == [] and res["written"] == [0]
    assert res["encoders"]["dims"] == {"text": 384, "video": 12, "sync": 768}
    assert res["encoders"]["video"]["kind"] == "open_clip"
    from omni2sound.data.shards import ShardDataset
    ds = ShardDataset(str(tmp_path / "out"))
    item = ds[0]
    torch.testing.assert_close(item["video"], torch.from_numpy(fa[0]))
    torch.testing.assert_close(item["sync"], torch.from_numpy(fa[1]))
    assert ds[1]["video"].shape == (0, 12) and ds[1]["text"].shape == (3, 384)          # [CLS] rain [SEP]
    # released sync features of another width than Synchformer's are refused, naming the clip
    np.save(tmp_path / "feats" / "a_sync.npy", np.zeros((48, 10), np.float32))
    spec.dims = None
    with pytest.raises(ValueError, match="clip a_clip/vt2a: precomputed sync features are 10-d, .*synchformer.* 768"):
        extract_manifest(str(tmp_path / "m.jsonl"), str(tmp_path / "vae"), str(tmp_path / "out2"), shard_size=4,
                         enc=Encoders(spec=spec), workers=0, progress=False)


def test_extraction_decodes_the_soundtrack_of_mp4_clips(tmp_path):
    from omni2sound.data.decode import load_clip
    from omni2sound.data.manifest import ClipRecord
    from omni2sound.encoder_spec import FrameRequest
    sr = 16000
    t = np.arange(int(1.2 * sr)) / sr
    wav = (0.5 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
    tiny.write_av_clip(tmp_path / "v.mp4", np.random.randint(0, 255, (30, 32, 48, 3), dtype=np.uint8), 25, wav, sr)
    rec = ClipRecord(clip_id="v", audio=str(tmp_path / "v.mp4"), video=str(tmp_path / "v.mp4"), duration=1.0)
    raw = load_clip(rec, sr, FrameRequest(8.0, 16), FrameRequest(25.0, 24, crop=True))
    assert raw["audio"].shape == (sr,) and raw["duration"] == 1.0
    assert np.corrcoef(raw["audio"][1000:15000], wav[1000:15000])[0, 1] > 0.99
    assert raw["frames_semantic"].shape == (8, 16, 16, 3) and raw["frames_sync"].shape == (25, 24, 24, 3)


def test_a_caption_over_the_token_limit_is_cut_not_fatal(capsys):
    from omni2sound.encoder_spec import EncoderSpec
    from omni2sound.extract import Encoders
    enc = Encoders(spec=EncoderSpec.parse(text_max_tokens=8))
    out = enc.text(["a dog barks", "word " * 40, None])
    assert 2 < out[0].shape[0] < 8 and out[1].shape == (8, 384) and out[2].shape == (0, 384)
    assert "more than max_tokens=8" in capsys.readouterr().err and enc.text_encoder.truncate is False


def test_worker_decoding_resumes_after_a_kill_with_every_clip_once(tmp_path):
    """Shards written from clips decoded in DataLoader workers: a run stopped after one shard, then two ranks
    finishing the rest, leave every clip in exactly one shard, in manifest order within each."""
    import soundfile as sf
    from test_data import SmallEncoders

    from omni2sound.data.manifest import ClipRecord, write_manifest
    from omni2sound.data.shards import ShardDataset
    from omni2sound.extract import extract_manifest
    from omni2sound.vae import VAE_PRESETS, AudioVAE
    from omni2sound.video import write_video
    AudioVAE(VAE_PRESETS["tiny"]).save_pretrained(tmp_path / "vae")
    recs = []
    for i in range(7):
        sf.write(tmp_path / f"a{i}.wav", 0.1 * np.random.randn(8000).astype(np.float32), 16000)
        write_video(tmp_path / f"v{i}.mp4", np.full((13, 16, 16, 3), 20 * i, np.uint8), fps=25)
        recs.append(ClipRecord(clip_id=f"c{i}", audio=str(tmp_path / f"a{i}.wav"), video=str(tmp_path / f"v{i}.mp4"),
                               duration=0.5, caption=f"clip {i}"))
    recs.append(ClipRecord(clip_id="bad", audio=str(tmp_path / "a0.wav"), video=str(tmp_path / "nothing.txt"),
                           duration=0.5))
    (tmp_path / "nothing.txt").write_text("not a video")
    write_manifest(str(tmp_path / "m.jsonl"), recs)
    args = (str(tmp_path / "m.jsonl"), str(tmp_path / "vae"), str(tmp_path / "out"))
    first = extract_manifest(*args, shard_size=2, enc=SmallEncoders(), workers=1, stop_after=1, progress=False)
    assert first["written"] == [0]
    r1 = extract_manifest(*args, shard_size=2, rank=1, world=2, enc=SmallEncoders(), workers=1, progress=False)
    r0 = extract_manifest(*args, shard_size=2, rank=0, world=2, enc=SmallEncoders(), workers=2, progress=False)
    assert r1["written"] == [1, 3] and r0["written"] == [2] and r1["clips_failed"][0].startswith("bad: ")
    ids = ShardDataset(str(tmp_path / "out")).clip_ids
    assert ids == [f"c{i}" for i in range(7)]
    v = ShardDataset(str(tmp_path / "out"))[5]["video"]
    assert v.shape == (4, 3) and abs(float(v.mean()) - 100 / 255) < 0.05         # clip 5's own frames


def test_spec_record_of_released_features_needs_no_model_files():
    from omni2sound.encoder_spec import EncoderSpec
    from omni2sound.extract import Encoders
    spec = EncoderSpec.parse(video="open_clip:ViT-H-14-378-quickgelu:/absent/clip.bin",
                             sync="synchformer:/absent/sync.pth", check=False)
    enc = Encoders(spec=spec)
    d = enc.spec_dict()
    assert d["dims"] is None and d["video"]["path"] == "/absent/clip.bin" and enc.spec_identity() == spec.identity()
    enc.note_features(1024, 768, "clip x")
    assert enc.spec_dict()["dims"] == {"text": 384, "video": 1024, "sync": 768}
