"""Manifests (validation with file and line), feature shards (atomic, memory-mapped), resumable extraction."""
import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from omni2sound.data import (
    FeatureTable,
    ManifestValidationError,
    ShardDataset,
    done_shards,
    read_manifest,
    shard_name,
    write_index,
    write_manifest,
    write_shard,
)
from omni2sound.data.manifest import ClipRecord
from omni2sound.extract import extract_manifest, extract_shards
from omni2sound.toy import ToyConfig, ToyWorld


class SmallEncoders:
    """Deterministic cheap features with the extractor's encoder interface (the extractor's bookkeeping is
    under test here, not the encoders): hashed word vectors, mean colour per frame, mean frame change."""

    def text(self, captions):
        out = []
        for c in captions:
            words = (c or "").split()
            out.append(torch.stack([torch.tensor([(hash(w) >> k) % 7 / 7.0 for k in range(8)]) for w in words])
                       if words else torch.zeros(0, 8))
        return out

    def dims(self):
        return 3, 1

    def semantic(self, frames):
        return torch.from_numpy(frames).float().mean((1, 2)) / 255

    def sync(self, frames):
        f = torch.from_numpy(frames).float()
        d = torch.cat([torch.zeros(1), (f[1:] - f[:-1]).abs().mean((1, 2, 3))])
        return d[torch.linspace(0, len(d) - 1, int(len(d) * 24 / 25)).round().long()][:, None]


# ----------------------------------------------------------------------------------------------------
# Manifests
# ----------------------------------------------------------------------------------------------------
def _manifest(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"")
    (tmp_path / "b.wav").write_bytes(b"")
    good = {"clip_id": "a", "audio": "a.wav", "duration": 2.0, "caption": "a bell rings", "split": "train",
            "av_score": 0.31, "route": "audio-visual", "source": "toy"}
    lines = [
        json.dumps(good),                                                     # 1 ok
        "",                                                                   # blank: not a record
        "{not json",                                                          # 3 bad JSON
        json.dumps({"clip_id": "b", "audio": "b.wav"}),                       # 4 no duration
        json.dumps({**good, "clip_id": "c", "duration": -1}),                 # 5 negative duration
        json.dumps({**good, "clip_id": "d", "split": "dev"}),                 # 6 unknown split
        json.dumps({**good, "clip_id": "e", "audio": "missing.wav"}),         # 7 file missing
        json.dumps({**good}),                                                 # 8 duplicate id
        json.dumps({**good, "clip_id": "f", "colour": "red"}),                # 9 unknown field
        json.dumps({**good, "clip_id": "g", "av_score": 0.1}),                # 10 under the discard threshold
        json.dumps({**good, "clip_id": "h", "duration": "2"}),                # 11 wrong type
        json.dumps({"clip_id": "i", "audio": "b.wav", "duration": 1.5, "split": "val", "start": 0.5}),   # 12 ok
    ]
    p = tmp_path / "m.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def test_manifest_reports_every_bad_line_and_keeps_the_rest(tmp_path):
    path = _manifest(tmp_path)
    records, report = read_manifest(path)
    assert [r.clip_id for r in records] == ["a", "i"]
    assert report.total == 11 and report.kept == 2 and report.skipped == 9
    assert [e.line for e in report.errors] == [3, 4, 5, 6, 7, 8, 9, 10, 11]
    msgs = {e.line: e.message for e in report.errors}
    assert "invalid JSON" in msgs[3] and "duration" in msgs[4] and "positive" in msgs[5]
    assert "split" in msgs[6] and "missing.wav" in msgs[7] and "duplicate" in msgs[8] and "line 1" in msgs[8]
    assert "colour" in msgs[9] and "discard" in msgs[10] and "duration" in msgs[11]
    assert all(str(e).startswith(f"{path}:{e.line}:") for e in report.errors)
    assert records[0].audio == os.path.join(str(tmp_path), "a.wav")       # relative to the manifest
    assert records[1].start == 0.5 and records[1].split == "val"
    with pytest.raises(ManifestValidationError, match=r"m.jsonl:3: invalid JSON"):
        read_manifest(path, strict=True)
    assert [r.clip_id for r in read_manifest(path, split="val")[0]] == ["i"]
    with pytest.raises(FileNotFoundError):
        read_manifest(str(tmp_path / "nope.jsonl"))


def test_manifest_round_trip(tmp_path):
    (tmp_path / "x.flac").write_bytes(b"")
    recs = [ClipRecord(clip_id=f"c{i}", audio="x.flac", duration=1.0 + i, caption=f"cap {i}",
                       offscreen="a whistle blows" if i else None, features={"latent": "x.flac"}) for i in range(3)]
    write_manifest(str(tmp_path / "out.jsonl"), recs)
    back, report = read_manifest(str(tmp_path / "out.jsonl"))
    assert report.skipped == 0 and [r.duration for r in back] == [1.0, 2.0, 3.0]
    assert back[1].offscreen == "a whistle blows" and back[0].offscreen is None
    assert back[2].features["latent"] == os.path.join(str(tmp_path), "x.flac")
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


# ----------------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------------
def _items(n, T=(5,), seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        t = T[i % len(T)]
        out.append({"clip_id": f"clip{i}", "caption": None if i == 1 else f"caption {i}", "duration": t / 25,
                    "latent_mean": torch.randn(t, 4, generator=g), "latent_std": torch.rand(t, 4, generator=g),
                    "text": torch.randn(0 if i == 1 else 3 + i, 6, generator=g),
                    "video": torch.randn(0 if i == 2 else t // 3 + 1, 5, generator=g),
                    "sync": torch.randn(0 if i == 2 else t, 2, generator=g)})
    return out


def test_shard_round_trip_memory_mapped(tmp_path):
    items = _items(5, T=(5, 9, 7))
    write_shard(str(tmp_path / shard_name(0)), items[:3])
    write_shard(str(tmp_path / shard_name(1)), items[3:])
    (tmp_path / "shard-00002.safetensors.tmp").write_bytes(b"half a shard")    # a killed writer's leftover
    assert done_shards(str(tmp_path)) == [0, 1]
    ds = ShardDataset(str(tmp_path))
    assert len(ds) == 5 and ds.clip_ids == [f"clip{i}" for i in range(5)]
    for i, it in enumerate(items):
        got = ds[i]
        assert got["caption"] == it["caption"] and got["duration"] == pytest.approx(it["duration"])
        for k in ("latent_mean", "latent_std", "text", "video", "sync"):
            torch.testing.assert_close(got[k], it[k], rtol=0, atol=0)
    index = write_index(str(tmp_path))
    assert index["num_clips"] == 5 and [s["n"] for s in index["shards"]] == [3, 2]
    with pytest.raises(ValueError, match="sync"):
        write_shard(str(tmp_path / shard_name(3)), [{**items[0], "sync": torch.randn(4)}])
    with pytest.raises(FileNotFoundError):
        ShardDataset(str(tmp_path / "empty"))


def test_feature_table_batches(tmp_path):
    items = _items(4, T=(8, 6))
    table = FeatureTable.from_items(items)
    x1, cond = table.batch(torch.tensor([0, 1, 2]), sample_latent=False)
    assert x1.shape == (3, 6, 4)                     # cut to the shortest clip of the batch
    torch.testing.assert_close(x1[0], items[0]["latent_mean"][:6])
    assert cond.text_lens.tolist() == [3, 0, 5] and cond.video_lens[2] == 0
    cond.validate()
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a, _ = table.batch(torch.tensor([3]), g1)
    b, _ = table.batch(torch.tensor([3]), g2)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a[0], items[3]["latent_mean"])         # a posterior draw, not the mean


# ----------------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------------
def _toy_loader(world, shard_size, n):
    def load(k):
        clips = [world.clip(i) for i in range(k * shard_size, min(n, (k + 1) * shard_size))]
        return [{"clip_id": c.clip_id, "audio": c.audio, "frames_semantic": c.frames_semantic,
                 "frames_sync": c.frames_sync, "caption": c.caption, "duration": c.duration} for c in clips]
    return load


def test_killed_extraction_resumes_without_duplicates_or_gaps(tmp_path, vae_dir):
    from omni2sound.vae import AudioVAE
    vae = AudioVAE.from_pretrained(vae_dir).eval()
    world = ToyWorld(ToyConfig(duration=0.4))
    n, size = 10, 2
    load = _toy_loader(world, size, n)
    out = str(tmp_path / "feats")
    # "kill" rank 1 of 2 after one shard and rank 0 after two; leave a half-written temp file behind
    assert extract_shards(load, 5, out, vae, SmallEncoders(), rank=0, world=2, stop_after=2, progress=False) == [0, 2]
    assert extract_shards(load, 5, out, vae, SmallEncoders(), rank=1, world=2, stop_after=1, progress=False) == [1]
    open(os.path.join(out, "shard-00003.safetensors.tmp"), "wb").write(b"partial")
    assert done_shards(out) == [0, 1, 2]
    # the rerun (one process) does exactly the missing shards, a second rerun nothing
    assert extract_shards(load, 5, out, vae, SmallEncoders(), progress=False) == [3, 4]
    assert extract_shards(load, 5, out, vae, SmallEncoders(), progress=False) == []
    ds = ShardDataset(out)
    assert ds.clip_ids == [f"toy-train-{i:06d}" for i in range(n)]
    clip = world.clip(7)
    item = ds[7]
    assert item["caption"] == clip.caption
    assert item["latent_mean"].shape == (10, 16) and item["video"].shape == (len(clip.frames_semantic), 3)
    with torch.no_grad():
        ref = vae.encode(torch.from_numpy(clip.audio)[None, None]).mean[0].T
    torch.testing.assert_close(item["latent_mean"], ref, rtol=1e-4, atol=1e-5)
    assert write_index(out)["num_clips"] == n


def test_extract_manifest_skips_bad_clips(tmp_path, vae_dir, capsys):
    world = ToyWorld(ToyConfig(duration=0.5))
    recs = []
    for i in range(3):
        sf.write(tmp_path / f"c{i}.wav", world.clip(i).audio, 16000)
        recs.append({"clip_id": f"c{i}", "audio": f"c{i}.wav", "duration": 0.4, "start": 0.05,
                     "caption": world.clip(i).caption})
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really a wav")
    recs.append({"clip_id": "broken", "audio": "broken.wav", "duration": 0.4})
    recs.append({"clip_id": "nofile", "audio": "gone.wav", "duration": 0.4})
    write_manifest(str(tmp_path / "m.jsonl"), recs)
    res = extract_manifest(str(tmp_path / "m.jsonl"), vae_dir, str(tmp_path / "out"), shard_size=2,
                           enc=SmallEncoders(), progress=False)
    assert res["records"] == 4 and res["manifest_skipped"] == 1
    assert len(res["clips_failed"]) == 1 and res["clips_failed"][0].startswith("broken")
    ds = ShardDataset(str(tmp_path / "out"))
    assert ds.clip_ids == ["c0", "c1", "c2"]
    assert ds[0]["video"].shape == (0, 3) and ds[0]["sync"].shape == (0, 1)     # no video: zero-length
    assert ds[1]["duration"] == pytest.approx(0.4)
    err = capsys.readouterr().err
    assert "gone.wav" in err and "broken" in err
    assert np.isfinite(ds[2]["latent_mean"].numpy()).all()


def test_extract_cli_refuses_a_manifest_with_no_usable_record(tmp_path, vae_dir, capsys):
    # every line bad: exit status 2 with each line's reason, and no empty feature folder left behind
    from omni2sound.extract import main as extract_main
    (tmp_path / "m.jsonl").write_text('{"clip_id": "a", "audio_path": "a.wav"}\nnot json\n')
    with pytest.raises(SystemExit) as e:
        extract_main(["--manifest", str(tmp_path / "m.jsonl"), "--vae", vae_dir, "--out", str(tmp_path / "feat")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "no usable records" in err and "m.jsonl:1: unknown field" in err and "m.jsonl:2: invalid JSON" in err
    assert not (tmp_path / "feat").exists()


def test_extracted_folder_trains_and_its_stage_loads_with_the_extraction_vae(tmp_path, vae_dir):
    # python -m omni2sound.extract records its VAE in index.json; a run on that folder trains no VAE of its own,
    # so its stages' pipeline.json must name the extraction's (it named the run's vae/, which does not exist)
    from dataclasses import replace

    from omni2sound.extract import main as extract_main
    from omni2sound.pipeline import Omni2SoundPipeline
    from omni2sound.train import TRAIN_PRESETS, run
    world = ToyWorld(ToyConfig(duration=0.5))
    with open(tmp_path / "m.jsonl", "w") as f:
        for i in range(4):
            sf.write(tmp_path / f"c{i}.wav", world.clip(i).audio, 16000)
            f.write(json.dumps({"clip_id": f"c{i}", "audio": f"c{i}.wav", "duration": 0.5,
                                "caption": world.clip(i).caption}) + "\n")
    feat = tmp_path / "feat"
    extract_main(["--manifest", str(tmp_path / "m.jsonl"), "--vae", vae_dir, "--out", str(feat / "train"),
                  "--shard-size", "2"])
    assert json.load(open(feat / "train" / "index.json"))["vae"] == os.path.abspath(vae_dir)
    cfg = replace(TRAIN_PRESETS["smoke"], runs_dir=str(tmp_path / "runs"), data=str(feat), stage1_steps=1,
                  batch_size=2)
    out = run(cfg, stages=["stage1"], report=False)["stage1"]
    pc = json.load(open(os.path.join(out, "pipeline.json")))
    assert os.path.samefile(os.path.join(out, pc["vae_dir"]), vae_dir)
    pipe = Omni2SoundPipeline.from_pretrained(out)
    assert pipe.generate(text="a bell", duration=0.4, steps=1).audio.shape == (1, 6400)
