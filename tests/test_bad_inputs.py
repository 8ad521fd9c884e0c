"""A catalogue of bad inputs, one parametrised test per class: a pickle payload in a resume checkpoint, an
extraction rerun that differs from the first run, a killed-and-resumed training log, broken files, stale
temporary files, and limits / permissions checked before work starts."""
import errno
import json
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import soundfile as sf
import torch

from omni2sound import files
from omni2sound.files import BadFileError, NoSpaceError
from omni2sound.trainer import LoopConfig, OptimConfig, Trainer, read_checkpoint

# ----------------------------------------------------------------------------------------------------
# A tiny trainer: one linear layer, a loss that is a function of (step, micro-batch) alone
# ----------------------------------------------------------------------------------------------------


def _loss(module, step, chunk):
    g = torch.Generator().manual_seed(1000 * step + chunk)
    x = torch.randn(4, 3, generator=g)
    loss = ((module(x) - x.sum(1, keepdim=True)) ** 2).mean()
    return loss, {"loss": loss.detach(), "task": "t", "samples": 4, "tokens": 4}


def _trainer(out_dir, steps=6, ckpt_every=2, seed=0):
    torch.manual_seed(seed)
    loop = LoopConfig(steps=steps, micro_batch=4, log_every=1, ckpt_every=ckpt_every, keep_last=3, progress=False)
    return Trainer(torch.nn.Linear(3, 1), _loss, loop, OptimConfig(lr=1e-2, warmup=1), str(out_dir),
                   meta={"stage": "test", "shape": (3, 1)})


def _log_steps(out_dir):
    return [json.loads(line)["step"] for line in open(os.path.join(out_dir, "log.jsonl"))]


# ----------------------------------------------------------------------------------------------------
# 1. A pickle payload in a resume checkpoint never runs
# ----------------------------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):           # what a crafted checkpoint does: unpickling calls open(marker, "w")
        return (open, (self.marker, "w"))


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    from omni2sound.trainer import rng_state, set_rng_state
    np.random.normal()                          # numpy's cached Gaussian and Python's gauss_next set
    random.gauss(0, 1)
    path = tmp_path / "rng.pt"
    torch.save({"rng": rng_state()}, str(path))
    draws = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random(), random.gauss(0, 1))
    set_rng_state(files.load_torch(path)["rng"])
    again = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random(), random.gauss(0, 1))
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1]) and draws[2:] == again[2:]


def test_checkpoint_with_the_earlier_rng_layout_resumes_exactly(tmp_path):
    """Earlier resume checkpoints stored numpy's and Python's RNG state as their own tuples (a numpy array inside):
    they still resume, to the same losses; an object array smuggling a payload is still refused."""
    full = _trainer(tmp_path / "full", steps=4).fit()
    tr = _trainer(tmp_path / "run", steps=4)
    tr.fit(stop_after=2)
    path = os.path.join(tr.ckpt_dir, "step-0000002.pt")
    ck = read_checkpoint(path)
    n, p = ck["rng"]["numpy"], ck["rng"]["python"]
    ck["rng"]["numpy"] = (n["bit_generator"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                          n["cached_gaussian"])
    ck["rng"]["python"] = (p["version"], tuple(p["state"].tolist()), p["gauss_next"])
    from omni2sound.trainer import set_rng_state
    np.random.seed(123)                                   # both generators elsewhere first
    random.seed(5)
    new = {**ck["rng"], "numpy": n, "python": p}
    set_rng_state(new)
    draws = (np.random.rand(3), random.random())
    set_rng_state(ck["rng"])
    assert np.array_equal(np.random.rand(3), draws[0]) and random.random() == draws[1]
    torch.save(ck, path)
    with pytest.raises(BadFileError):
        files.load_torch(path)                   # plain weights_only load: numpy arrays need the opt-in
    resumed = _trainer(tmp_path / "run", steps=4, seed=1)
    assert [h["loss"] for h in resumed.fit(resume=True)] == [h["loss"] for h in full]
    marker = tmp_path / "PAYLOAD_RAN"
    ck["rng"]["numpy"] = np.array([_Payload(str(marker))], dtype=object)
    torch.save(ck, path)
    with pytest.raises(BadFileError, match="refused"):
        read_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("where", ["top", "optimizer", "rng", "whole"])
def test_pickle_payload_in_a_resume_checkpoint_does_not_run(tmp_path, where, capsys):
    marker = tmp_path / "PAYLOAD_RAN"
    tr = _trainer(tmp_path / "run", steps=4)
    tr.fit(stop_after=2)                                   # step-0000002.pt, a good checkpoint
    good = os.path.join(tr.ckpt_dir, "step-0000002.pt")
    ck = read_checkpoint(good)                             # what the trainer writes loads with weights_only=True
    evil = _Payload(str(marker))
    if where == "top":
        ck["extra"] = evil
    elif where == "optimizer":
        ck["optimizer"]["state"][0]["exp_avg"] = evil
    elif where == "rng":
        ck["rng"]["numpy"] = evil
    else:
        ck = evil
    bad = os.path.join(tr.ckpt_dir, "step-0000004.pt")     # planted as the newest checkpoint
    torch.save(ck, bad)
    with pytest.raises(BadFileError, match="refused"):
        read_checkpoint(bad)
    resumed = _trainer(tmp_path / "run", steps=4, seed=1)
    resumed.fit(resume=True, stop_after=0)
    assert not marker.exists()
    assert resumed.step == 2                               # fell back to the good checkpoint
    err = capsys.readouterr().err
    assert "skipped" in err and "step-0000004.pt" in err and "refused" in err
    os.remove(good)                                        # no checkpoint left that loads: refuse, not start over
    with pytest.raises(BadFileError, match="none of its 1 checkpoints loads"):
        _trainer(tmp_path / "run", steps=4, seed=1).fit(resume=True, stop_after=0)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------
# 2. Extraction reruns that differ from the first run refuse (or, with rebuild, start over)
# ----------------------------------------------------------------------------------------------------
class _Enc:
    """Cheap deterministic encoders with the extractor's interface."""

    def text(self, captions):
        return [torch.full((2, 4), float(len(c or ""))) if c else torch.zeros(0, 4) for c in captions]

    def dims(self):
        return 3, 1

    def semantic(self, frames):
        return torch.zeros(len(frames), 3)

    def sync(self, frames):
        return torch.zeros(len(frames), 1)

    def spec_dict(self):
        return {"class": "test encoders", "version": 1}


def _clips(folder, n, start=0):
    recs = []
    for i in range(start, start + n):
        sf.write(folder / f"c{i}.wav", np.sin(np.arange(6400) * (0.01 + 0.001 * i)).astype(np.float32) * 0.3, 16000)
        recs.append({"clip_id": f"c{i}", "audio": f"c{i}.wav", "duration": 0.4, "caption": f"clip {i}"})
    return recs


def _clip_ids(out):
    from omni2sound.data.shards import ShardDataset
    return ShardDataset(str(out)).clip_ids


@pytest.mark.parametrize("change, rebuild", [("none", False)] + [
    (c, r) for c in ("shard_size", "added_record", "vae") for r in (False, True)])
def test_extraction_rerun_refuses_or_ends_with_every_clip_once(tmp_path, vae_dir, change, rebuild):
    from omni2sound.data.manifest import write_manifest
    from omni2sound.extract import EXTRACTION_RECORD, ExtractionMismatch, extract_manifest
    recs = _clips(tmp_path, 7)
    manifest, out = tmp_path / "m.jsonl", tmp_path / "out"
    write_manifest(str(manifest), recs)
    kw = dict(enc=_Enc(), progress=False, workers=0)
    extract_manifest(str(manifest), vae_dir, str(out), shard_size=2, stop_after=2, **kw)      # killed after 2 shards
    assert _clip_ids(out) == ["c0", "c1", "c2", "c3"]
    assert json.load(open(out / EXTRACTION_RECORD))["shard_size"] == 2
    size, vae = 2, vae_dir
    if change == "shard_size":
        size = 3
    elif change == "added_record":
        recs = recs[:3] + _clips(tmp_path, 1, start=7) + recs[3:]          # a record inserted mid-manifest
        write_manifest(str(manifest), recs)
    elif change == "vae":
        from omni2sound.vae import VAE_PRESETS, AudioVAE
        torch.manual_seed(1)
        vae = str(tmp_path / "vae2")
        AudioVAE(VAE_PRESETS["tiny"]).save_pretrained(vae)
    want = [r["clip_id"] for r in recs]
    if change != "none" and not rebuild:
        with pytest.raises(ExtractionMismatch) as e:
            extract_manifest(str(manifest), vae, str(out), shard_size=size, **kw)
        msg = str(e.value)
        assert "--rebuild" in msg and "\n" not in msg and str(out) in msg
        assert {"shard_size": "shard size 2 -> 3", "added_record": "manifest's records changed",
                "vae": "VAE's weights"}[change] in msg
        assert _clip_ids(out) == ["c0", "c1", "c2", "c3"]                  # nothing was touched
        return
    extract_manifest(str(manifest), vae, str(out), shard_size=size, rebuild=rebuild, **kw)
    ids = _clip_ids(out)
    assert sorted(ids) == sorted(want) and len(ids) == len(set(ids))       # every clip exactly once
    assert ids == want


def test_extract_cli_refuses_a_changed_rerun_with_exit_status_2(tmp_path, vae_dir, monkeypatch, capsys):
    from omni2sound import extract
    from omni2sound.data.manifest import write_manifest
    monkeypatch.setattr(extract, "Encoders", lambda *a, **k: _Enc())
    write_manifest(str(tmp_path / "m.jsonl"), _clips(tmp_path, 3))
    args = ["--manifest", str(tmp_path / "m.jsonl"), "--vae", vae_dir, "--out", str(tmp_path / "out"),
            "--workers", "0"]
    extract.main(args + ["--shard-size", "2"])
    with pytest.raises(SystemExit) as e:
        extract.main(args + ["--shard-size", "1"])
    assert e.value.code == 2 and "shard size 2 -> 1" in capsys.readouterr().err
    extract.main(args + ["--shard-size", "1", "--rebuild"])
    assert _clip_ids(tmp_path / "out") == ["c0", "c1", "c2"]


# ----------------------------------------------------------------------------------------------------
# 3. A killed-and-resumed run's log lists every step once
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kill_after, torn", [(3, False), (5, True), (1, False)])
def test_resumed_log_has_every_step_once(tmp_path, kill_after, torn):
    full = _trainer(tmp_path / "full", steps=6)
    full.fit()
    part = _trainer(tmp_path / "part", steps=6)
    part.fit(stop_after=kill_after)            # checkpoints every 2 steps: steps after the last one are logged twice
    if torn:                                   # a kill in the middle of a log write
        with open(tmp_path / "part" / "log.jsonl", "a") as f:
            f.write('{"step": 6, "lo')
    resumed = _trainer(tmp_path / "part", steps=6, seed=5)
    resumed.fit(resume=True)
    assert _log_steps(tmp_path / "part") == [1, 2, 3, 4, 5, 6]
    if kill_after >= 2:                         # resumed from a checkpoint (else started over, from its own init)
        assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]


def test_kill_9_mid_run_then_resume_has_every_step_once(tmp_path):
    # a real SIGKILL of a training process (whatever it was doing), then a resume in a fresh process
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import test_bad_inputs as t
        tr = t._trainer(sys.argv[1], steps=24, ckpt_every=3)
        slow = tr.train_step
        def step():
            time.sleep(0.01)
            return slow()
        tr.train_step = step
        tr.fit(resume=len(sys.argv) > 2)
    """))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(script), str(out)])
    deadline = time.time() + 120
    while time.time() < deadline:
        log = out / "log.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= 8:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _log_steps(out)
    assert 8 <= len(before) < 24
    subprocess.run([sys.executable, str(script), str(out), "resume"], check=True, timeout=300)
    assert _log_steps(out) == list(range(1, 25))


# ----------------------------------------------------------------------------------------------------
# 4. Broken files: one line naming the file and what is wrong
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    from omni2sound.model import Omni2SoundDiT, dit_config
    from omni2sound.pipeline import Omni2SoundPipeline
    from omni2sound.vae import VAE_PRESETS, AudioVAE
    torch.manual_seed(0)
    dit = Omni2SoundDiT(dit_config("tiny", hidden_dim=32, depth=1, num_heads=2, text_dim=8, video_dim=3, sync_dim=1))
    d = tmp_path_factory.mktemp("pipe")
    Omni2SoundPipeline(dit, AudioVAE(VAE_PRESETS["tiny"])).save_pretrained(str(d))
    return d


def _corrupt(path, how):
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(b"\x00garbage{{{")
    elif how == "list":
        path.write_text("[1, 2, 3]")
    elif how == "wrong_type":
        obj = json.loads(data)
        key = next(k for k, v in obj.items() if isinstance(v, int) and not isinstance(v, bool))
        obj[key] = "twelve"
        path.write_text(json.dumps(obj))


@pytest.mark.parametrize("rel, how, problem", [
    ("dit/model.safetensors", "empty", "empty file"),
    ("dit/model.safetensors", "truncated", "truncated"),
    ("vae/model.safetensors", "empty", "empty file"),
    ("vae/model.safetensors", "truncated", "truncated"),
    ("vae/model.safetensors", "garbage", "not"),
    ("pipeline.json", "garbage", "JSON"),
    ("pipeline.json", "list", "holds a JSON array, expected a JSON object"),
    ("pipeline.json", "truncated", "truncated or not valid JSON"),
    ("dit/config.json", "wrong_type", "is not an integer"),
    ("dit/config.json", "list", "holds a JSON array"),
    ("vae/config.json", "garbage", "JSON"),
    ("vae/config.json", "wrong_type", "is not an integer"),
])
def test_broken_model_files_name_the_file(tmp_path, pipeline_dir, rel, how, problem):
    import shutil

    from omni2sound.pipeline import Omni2SoundPipeline
    d = tmp_path / "p"
    shutil.copytree(pipeline_dir, d)
    _corrupt(d / rel, how)
    with pytest.raises(BadFileError) as e:
        Omni2SoundPipeline.from_pretrained(str(d))
    msg = str(e.value)
    assert msg.startswith(str(d / rel) + ": ") and problem in msg and "\n" not in msg


@pytest.mark.parametrize("how", ["garbage", "list", "empty"])
def test_broken_meta_json_names_the_file(tmp_path, how):
    from omni2sound.runs import read_meta
    (tmp_path / "meta.json").write_text('{"stage": "vae", "complete": true}')
    assert read_meta(str(tmp_path))["complete"] is True
    _corrupt(tmp_path / "meta.json", how)
    with pytest.raises(BadFileError, match=f"^{tmp_path / 'meta.json'}: "):
        read_meta(str(tmp_path))


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage", "not_a_checkpoint"])
def test_broken_newest_checkpoint_falls_back_and_says_which(tmp_path, how, capsys):
    tr = _trainer(tmp_path, steps=6)
    tr.fit(stop_after=4)                                        # step-2 and step-4
    newest = tmp_path / "checkpoints" / "step-0000004.pt"
    if how == "not_a_checkpoint":
        torch.save({"weights": torch.zeros(2)}, str(newest))
    else:
        _corrupt(newest, how)
    resumed = _trainer(tmp_path, steps=6, seed=3)
    resumed.fit(resume=True, stop_after=0)
    assert resumed.step == 2
    err = capsys.readouterr().err
    assert f"skipped {newest}: " in err
    assert {"truncated": "truncated", "empty": "empty", "garbage": "truncated or not a torch checkpoint",
            "not_a_checkpoint": "not a resume checkpoint"}[how] in err


@pytest.mark.parametrize("failure", ["oserror", "torch_enforce"])
def test_full_disk_during_a_checkpoint_save(tmp_path, monkeypatch, failure):
    import omni2sound.files as F
    tr = _trainer(tmp_path, steps=6)
    tr.fit(stop_after=2)
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:
            fh.truncate(100)                                    # what was written before the disk filled
        if failure == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device")
        # what torch.save says on a full disk: no word of space
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    if failure == "torch_enforce":
        monkeypatch.setattr(F.shutil, "disk_usage", lambda p: type("U", (), {"free": 4096})())
    with pytest.raises(NoSpaceError, match="no space left on device while writing .*step-0000004.pt"):
        tr.fit(stop_after=2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before      # the previous checkpoints are intact
    monkeypatch.undo()
    assert read_checkpoint(str(tmp_path / "checkpoints" / before[-1]))["step"] == 2


# ----------------------------------------------------------------------------------------------------
# 5. Stale temporary files of our naming are removed at start-up (train, extract, generate)
# ----------------------------------------------------------------------------------------------------
def _dead_temp(target):
    """A temporary file of a writer that was killed (its process has exited)."""
    code = (f"from omni2sound.files import temp_path_for; p = temp_path_for({str(target)!r}); "
            "open(p, 'w').write('partial'); print(p)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.parametrize("who", ["train", "extract", "generate"])
def test_stale_temporary_files_are_removed_at_start_up(tmp_path, who, vae_dir, monkeypatch):
    if who == "train":
        folder = tmp_path / "run" / "checkpoints"
        folder.mkdir(parents=True)
        stale = _dead_temp(folder / "step-0000002.pt")
        _trainer(tmp_path / "run", steps=1).fit()
    elif who == "extract":
        from omni2sound.data.manifest import write_manifest
        from omni2sound.extract import extract_manifest
        folder = tmp_path / "out"
        folder.mkdir()
        stale = _dead_temp(folder / "shard-00000.safetensors")
        write_manifest(str(tmp_path / "m.jsonl"), _clips(tmp_path, 1))
        extract_manifest(str(tmp_path / "m.jsonl"), vae_dir, str(folder), enc=_Enc(), progress=False, workers=0)
    else:
        from omni2sound import generate
        folder = tmp_path / "gen"
        folder.mkdir()
        stale = _dead_temp(folder / "out.wav")
        monkeypatch.setattr(generate, "_run", lambda args: 0)      # the start-up checks only
        assert generate.main(["--model", "m", "--text", "x", "--out", str(folder / "out.wav")]) == 0
    assert files.is_temp_name(os.path.basename(stale))
    assert not os.path.exists(stale)


# ----------------------------------------------------------------------------------------------------
# 6. Limits and permissions, checked before any work
# ----------------------------------------------------------------------------------------------------
def _generate_cli(args, tmp_path, monkeypatch, capsys):
    from omni2sound import generate
    ran = []
    monkeypatch.setattr(generate, "_run", lambda a: ran.append(a) or 0)
    try:
        code = generate.main(args)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err, ran


@pytest.mark.parametrize("case", ["duration_max", "duration_memory", "out_under_a_file", "out_is_a_folder"])
def test_generate_refuses_before_work(tmp_path, pipeline_dir, monkeypatch, capsys, case):
    import omni2sound.pipeline as P
    (tmp_path / "afile").write_text("x")
    out = {"out_under_a_file": tmp_path / "afile" / "a.wav", "out_is_a_folder": tmp_path / "d.wav"}.get(
        case, tmp_path / "a.wav")
    if case == "out_is_a_folder":
        out.mkdir()
    duration = {"duration_max": "1e9", "duration_memory": "600"}.get(case, "1")
    if case == "duration_memory":
        monkeypatch.setattr(P, "available_memory_bytes", lambda device: 1 << 30)
        from omni2sound import generate
        t0 = time.perf_counter()
        with pytest.raises(SystemExit) as e:
            generate.main(["--model", str(pipeline_dir), "--text", "rain", "--duration", duration, "--steps", "1",
                           "--out", str(out)])
        assert e.value.code == 2 and time.perf_counter() - t0 < 60
        err = capsys.readouterr().err
        assert "duration 600 s" in err and "GiB" in err and "1.0 GiB free" in err and not out.exists()
        return
    code, err, ran = _generate_cli(["--model", str(pipeline_dir), "--text", "rain", "--duration", duration,
                                    "--out", str(out)], tmp_path, monkeypatch, capsys)
    assert code == 2 and not ran
    if case == "duration_max":
        assert "--duration must be in (0, 3600] seconds" in err
    else:
        assert str(out) in err and "cannot write" in err


def test_check_generation_limits_numbers():
    from omni2sound.model import DIT_PRESETS
    from omni2sound.pipeline import check_generation_limits, generation_memory_bytes
    from omni2sound.vae import VAE_PRESETS
    d, v = DIT_PRESETS["tiny"], VAE_PRESETS["paper"]
    a, b = generation_memory_bytes(d, v, 10.0), generation_memory_bytes(d, v, 20.0)
    assert b["total"] == pytest.approx(2 * a["total"], rel=0.01)          # grows with the duration
    assert generation_memory_bytes(d, v, 10.0, batch=3)["total"] == 3 * a["total"]
    with pytest.raises(ValueError, match="past the maximum"):
        check_generation_limits(d, v, 3601.0)
    with pytest.raises(ValueError, match="positive"):
        check_generation_limits(d, v, float("nan"))


@pytest.mark.parametrize("flag", ["--resume", "--resume-or-start"])
def test_train_resume_with_nothing_to_resume(tmp_path, monkeypatch, capsys, flag):
    from omni2sound import train
    calls = []
    monkeypatch.setattr(train, "run", lambda cfg, **kw: calls.append(kw) or {})
    args = ["--preset", "smoke", "--runs-dir", str(tmp_path), "--name", "r", flag]
    if flag == "--resume":
        with pytest.raises(SystemExit) as e:
            train.main(args)
        assert e.value.code == 2 and not calls
        assert f"nothing to resume in {tmp_path / 'r'}" in capsys.readouterr().err
        # with something to resume (a checkpoint of one of its stages) it goes on
        ck = tmp_path / "r" / "stage1" / "checkpoints"
        ck.mkdir(parents=True)
        (ck / "step-0000010.pt").write_bytes(b"x")
        train.main(args)
    else:
        train.main(args)
    assert calls and calls[-1]["resume"] is True
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    assert "--resume-or-start" in capsys.readouterr().out


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_written_files_get_the_umask_mode(tmp_path, mask):
    from omni2sound.audio import save_audio
    old = os.umask(mask)
    try:
        wav = save_audio(tmp_path / "a.wav", torch.zeros(1600).uniform_(-0.5, 0.5), 16000)
        tr = _trainer(tmp_path / "run", steps=1, ckpt_every=1)
        tr.fit()
        ck = os.path.join(tr.ckpt_dir, tr.checkpoints()[-1])
    finally:
        os.umask(old)
    for p in (wav, ck, tmp_path / "run" / "log.jsonl"):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o666 & ~mask, p
