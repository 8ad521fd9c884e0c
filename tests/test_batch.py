"""Batch generation (generate --manifest): a run killed with SIGKILL halfway and run again ends with every output
exactly once and one results row per manifest row; bad rows and unreadable videos are reported with their line
while the run goes on; torchrun ranks share the work."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from media import make_video, tiny_model

from omni2sound.batch import plan, read_manifest
from omni2sound.generate import main as generate_main
from omni2sound.mux import probe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    make_video(root / "a.mp4", 25, 0.8)
    make_video(root / "b.mp4", 30000 / 1001, 0.5)
    (root / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    return root, tiny_model(root / "model")


def _cmd(model, manifest, out_dir, *extra):
    return [sys.executable, "-m", "omni2sound.generate", "--model", model, "--manifest", str(manifest),
            "--out-dir", str(out_dir), "--steps", "1", "--device", "cpu", "--batch-size", "2", *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}


def test_killed_and_resumed_gives_every_output_once(media):
    root, model = media
    rows = ["id,video,text,duration,seed"]
    for i in range(20):      # two videos, two durations (two buckets), seeds given or not
        rows.append(f"clip{i:02d},{'a' if i % 2 else 'b'}.mp4,,{'' if i % 3 else 0.3},{i if i % 4 else ''}")
    manifest = root / "items.csv"
    manifest.write_text("\n".join(rows) + "\n")
    out = root / "out"
    part = out / ".results" / "rank0.jsonl"
    proc = subprocess.Popen(_cmd(model, manifest, out, "--no-progress"), env=_env(), stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if part.exists() and len(part.read_text().splitlines()) >= 6:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    made_first = {p.name for p in out.glob("clip*.mp4")}
    assert 6 <= len(made_first) < 20 and not (out / "results.jsonl").exists()
    r = subprocess.run(_cmd(model, manifest, out), env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stderr.strip().splitlines()[-1])
    assert summary["made_now"] == 20 - len(made_first)               # the finished ones were skipped
    assert "item/s" in r.stderr                                      # the progress bar: rate and ETA
    outputs = sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith("."))
    assert outputs == sorted([f"clip{i:02d}.mp4" for i in range(20)] + ["results.jsonl"])
    assert not [p for p in out.iterdir() if p.is_file() and p.name.startswith(".")]    # no partial file left
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [x["id"] for x in results] == [f"clip{i:02d}" for i in range(20)]
    assert all(x["status"] == "ok" for x in results) and [x["line"] for x in results] == list(range(2, 22))
    for x in results[:4]:      # a sound track as long as its video (silence past a shorter requested duration)
        info = probe(x["output"])
        assert abs(info["audio_seconds"] - info["video_seconds"]) <= 1024 / 48000, (x, info)
    assert results[4]["seed"] == 0 and results[5]["seed"] == 5                        # --seed's default, the row's


def test_bad_rows_are_reported_with_their_line_and_the_run_goes_on(media, tmp_path, capsys):
    root, model = media
    manifest = tmp_path / "items.jsonl"
    lines = [{"id": "ok1", "video": str(root / "a.mp4")},
             {"id": "ok2", "text": "", "video": str(root / "b.mp4"), "duration": 0.4, "seed": 3},
             "{not json",
             {"id": "nothing"},
             {"id": "gone", "video": "missing.mp4"},
             {"id": "corrupt_probe", "video": str(root / "corrupt.mp4")},
             {"id": "corrupt_decode", "video": str(root / "corrupt.mp4"), "duration": 0.5},
             {"id": "ok1", "video": str(root / "a.mp4")},
             {"id": "x", "video": str(root / "a.mp4"), "colour": "red"},
             {"id": "../escape", "video": str(root / "a.mp4")},
             {"id": "bad_seed", "video": str(root / "a.mp4"), "seed": "one"}]
    manifest.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    assert generate_main(["--model", model, "--manifest", str(manifest), "--out-dir", str(tmp_path / "o"),
                          "--steps", "1", "--device", "cpu", "--format", "wav", "--no-progress"]) == 0
    results = [json.loads(line) for line in (tmp_path / "o" / "results.jsonl").read_text().splitlines()]
    assert [x["line"] for x in results] == list(range(1, 12))
    status = {x["line"]: x["status"] for x in results}
    assert status[1] == status[2] == "ok" and sum(s == "ok" for s in status.values()) == 2
    errors = {x["line"]: x["error"] for x in results if x["status"] == "failed"}
    for line, why in ((3, "not a JSON object"), (4, "neither video nor text"), (5, "no such video"),
                      (6, "cannot decode"), (7, "cannot decode"), (8, "repeats line 1"), (9, "unknown field"),
                      (10, "not a file name"), (11, "not an integer")):
        assert errors[line].startswith(f"{manifest}:{line}: ") and why in errors[line], (line, errors[line])
    assert "Traceback" not in capsys.readouterr().err


def test_plan_buckets_and_shards(tmp_path):
    (tmp_path / "m.csv").write_text("text,duration\n" + "".join(f"t{i},{d}\n" for i, d in
                                                               enumerate([0.5, 2.5, 0.9, 2.1, 1.0, 3.0, 0.2])))
    items, bad = read_manifest(tmp_path / "m.csv")
    assert not bad and len(items) == 7
    batches = plan(items, batch_size=2, bucket_seconds=1.0)
    assert [[it.duration for it in b] for b in batches] == [[0.5, 0.9], [1.0, 0.2], [2.5, 2.1], [3.0]]
    shards = [plan(items, 2, 1.0, rank=r, world=3) for r in range(3)]
    lines = sorted(it.line for s in shards for b in s for it in b)
    assert lines == sorted(it.line for it in items)                     # every request on exactly one rank


def test_torchrun_two_ranks(media, tmp_path):
    root, model = media
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,video,duration\n" + "".join(f"v{i},{root / 'a.mp4'},{0.3 + 0.1 * i}\n" for i in range(4)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "omni2sound.generate", *_cmd(model, manifest, tmp_path / "o", "--no-progress")[3:]]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = [json.loads(line) for line in (tmp_path / "o" / "results.jsonl").read_text().splitlines()]
    assert [x["id"] for x in results] == ["v0", "v1", "v2", "v3"] and all(x["status"] == "ok" for x in results)
    parts = sorted(p.name for p in (tmp_path / "o" / ".results").iterdir())
    assert parts == ["rank0.jsonl", "rank1.jsonl"]                      # both ranks made some
