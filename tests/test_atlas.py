"""SoundAtlas: stages at their thresholds, the chat backend against a real loopback HTTP server (frames and
audio in the request bodies, 429/500/timeouts/malformed/dropped answers), never losing work (kill -9 and
resume, failures recorded, shards), cost accounting, and the toy world's routing."""
import base64
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from omni2sound.atlas import AgentConfig, AtlasConfig, Runner, handoff_reason, load_done, read_input_manifest, route
from omni2sound.atlas.loopback import ChatServer, default_responder, default_usage
from omni2sound.atlas.toy import caption_correct, toy_truth, write_toy_manifest

ROLES = ("vision", "junior", "senior", "verifier")
PRICE = {"input": 1.0, "audio_input": 2.0, "output": 4.0}     # USD per 1M tokens


@pytest.fixture(scope="module")
def toy_manifest(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    return write_toy_manifest(str(d), 8, seed=3, p_mismatch=0.25, p_offscreen=0.3)


@pytest.fixture
def server():
    s = ChatServer().start()
    yield s
    s.stop()


def chat_config(url, **kw) -> AtlasConfig:
    agents = {r: AgentConfig(backend="openai", model=f"m-{r}", base_url=url, price=PRICE) for r in ROLES}
    kw = {"av_scorer": "const:0.5", "clap_scorer": "const:0.5", "request_timeout": 2.0, "max_attempts": 3,
          "backoff_base": 0.01, "fsync": False, **kw}
    return AtlasConfig(agents=agents, **kw)


def models(server) -> list:
    return [b["model"] for b in server.requests]


def run(cfg, manifest, out, n=None):
    records, problems = read_input_manifest(manifest)
    assert not problems
    return Runner(cfg, str(out), progress=False).run(records[:n] if n else records)


# ------------------------------------------------------------------------------------------------ thresholds
def test_route_and_handoff_thresholds_exact():
    cfg = AtlasConfig()
    assert route(0.30, cfg) == "audio-only" and route(np.nextafter(0.30, 1), cfg) == "audio-visual"
    assert route(0.20, cfg) == "audio-only" and route(np.nextafter(0.20, 0), cfg) == "discarded"
    assert handoff_reason("a bell rings", False, 0.35, False, cfg) is None
    assert handoff_reason("a bell rings", False, np.nextafter(0.35, 0), False, cfg).startswith("clap")
    assert handoff_reason("a guitar plays", False, 0.15, True, cfg) is None
    assert handoff_reason("a guitar plays", False, np.nextafter(0.15, 0), True, cfg).startswith("clap")
    assert handoff_reason("a bell rings", True, 0.9, False, cfg) == "complex"
    assert "hallucination" in handoff_reason("a bell rings while a Man Speaks", False, 0.9, False, cfg)


@pytest.mark.parametrize("av,expect", [(0.30, "audio-only"), (0.3000001, "audio-visual"), (0.20, "audio-only"),
                                       (0.1999999, "discarded")])
def test_routing_fires_at_threshold_in_pipeline(server, toy_manifest, tmp_path, av, expect):
    run(chat_config(server.base_url, av_scorer=f"const:{av}"), toy_manifest, tmp_path, n=1)
    rec = next(iter(load_done(str(tmp_path)).values()))
    assert rec["route"] == expect and rec["av_score"] == pytest.approx(av)
    called = models(server)
    assert ("m-vision" in called) == (expect == "audio-visual")
    assert ("m-verifier" in called) == (expect == "audio-visual")
    assert ("m-junior" in called) == (expect != "discarded")
    assert rec["atlas"]["status"] == ("discarded" if expect == "discarded" else "kept")


@pytest.mark.parametrize("clap,music,senior", [(0.35, False, False), (0.3499999, False, True),
                                               (0.15, True, False), (0.1499999, True, True)])
def test_handoff_fires_at_threshold_in_pipeline(toy_manifest, tmp_path, clap, music, senior):
    caption = "a guitar melody rises" if music else "a bell rings twice"

    def responder(body):
        if body["model"] in ("m-junior", "m-senior"):
            return {"text": json.dumps({"caption": caption + (" slowly" if body["model"] == "m-senior" else ""),
                                        "complex": False})}
        return default_responder(body)

    with ChatServer(responder) as s:
        run(chat_config(s.base_url, clap_scorer=f"const:{clap}", clap_filter=0.0, clap_filter_music=0.0),
            toy_manifest, tmp_path, n=1)
        called = models(s)
    rec = next(iter(load_done(str(tmp_path)).values()))
    a = rec["atlas"]
    assert ("m-senior" in called) == senior
    assert a["author"] == ("senior" if senior else "junior") and a["music"] == music
    assert rec["caption"] == caption + (" slowly" if senior else "")
    assert a["turns"] == 3 + senior and rec["text_prompt"] == rec["caption"]


# ------------------------------------------------------------------------------------------------ request bodies
def test_request_bodies_carry_frames_and_audio(server, toy_manifest, tmp_path):
    run(chat_config(server.base_url), toy_manifest, tmp_path, n=1)
    by_model = {b["model"]: b for b in server.requests}
    assert set(by_model) == {"m-vision", "m-junior", "m-verifier"}

    def parts(body, kind):
        return [p for m in body["messages"] if isinstance(m["content"], list) for p in m["content"]
                if p["type"] == kind]

    rec = read_input_manifest(toy_manifest)[0][0]
    truth, _ = sf.read(rec["audio"], dtype="float32")
    for model, n_img, n_aud in (("m-vision", 2, 0), ("m-junior", 0, 1), ("m-verifier", 2, 1)):
        imgs, auds = parts(by_model[model], "image_url"), parts(by_model[model], "input_audio")
        assert (len(imgs), len(auds)) == (n_img, n_aud), model
        for p in imgs:   # 2 s clip, 1 frame per second, JPEG data URLs of the 64x64 toy frames
            head, data = p["image_url"]["url"].split(",", 1)
            assert head == "data:image/jpeg;base64"
            assert np.asarray(Image.open(io.BytesIO(base64.b64decode(data)))).shape == (64, 64, 3)
        for p in auds:
            assert p["input_audio"]["format"] == "wav"
            audio, sr = sf.read(io.BytesIO(base64.b64decode(p["input_audio"]["data"])), dtype="float32")
            assert sr == 16000 and len(audio) == len(truth)
            np.testing.assert_allclose(audio, truth, atol=2 / 32768)
    assert "Video description" in parts(by_model["m-junior"], "text")[0]["text"]


# ------------------------------------------------------------------------------------------------ failures
@pytest.mark.parametrize("action", [{"status": 429, "headers": {"Retry-After": "0.4"}}, {"status": 500},
                                    {"status": 503}, {"malformed": True}, {"drop": True}, {"delay": 1.5}])
def test_transient_failures_are_retried(server, toy_manifest, tmp_path, action):
    server.push(action)          # the first request of the run (the vision agent's) fails once
    t0 = time.perf_counter()
    run(chat_config(server.base_url, request_timeout=0.6), toy_manifest, tmp_path, n=1)
    took = time.perf_counter() - t0
    rec = next(iter(load_done(str(tmp_path)).values()))
    assert rec["atlas"]["status"] == "kept", rec["atlas"].get("reason")
    vision = [c for c in rec["atlas"]["calls"] if c["role"] == "vision"][0]
    assert vision["attempts"] == 2
    assert models(server).count("m-vision") == 2
    if "headers" in action:
        assert took >= 0.4          # Retry-After honoured
    if "delay" in action:
        assert took >= 0.6          # the per-request timeout fired, then the retry answered


def test_persistent_failure_is_recorded_and_run_goes_on(toy_manifest, tmp_path):
    fail_clip = read_input_manifest(toy_manifest)[0][1]["clip_id"]
    truth = sf.read(read_input_manifest(toy_manifest)[0][1]["audio"], dtype="float32")[0]

    def by_audio(body):     # every junior request for the second clip fails with 500
        if body["model"] == "m-junior":
            data = body["messages"][1]["content"][0]["input_audio"]["data"]
            audio = sf.read(io.BytesIO(base64.b64decode(data)), dtype="float32")[0]
            if len(audio) == len(truth) and np.abs(audio - truth).max() < 1e-3:
                return {"status": 500}
        return default_responder(body)

    with ChatServer(by_audio) as s:
        summary = run(chat_config(s.base_url), toy_manifest, tmp_path, n=4)
    recs = {r["clip_id"]: r for r in load_done(str(tmp_path)).values()}
    assert len(recs) == 4 and summary["status"] == {"kept": 3, "failed": 1}
    a = recs[fail_clip]["atlas"]
    assert a["status"] == "failed" and "failed after 3 attempts" in a["reason"] and "HTTP 500" in a["reason"]
    # a rerun keeps the failure (no duplicate); --retry-failed tries it again and the last line wins
    with ChatServer() as s:
        run(chat_config(s.base_url), toy_manifest, tmp_path, n=4)
        assert s.requests == []
        records, _ = read_input_manifest(toy_manifest)
        Runner(chat_config(s.base_url), str(tmp_path), progress=False, retry_failed=True).run(records[:4])
        assert models(s).count("m-junior") == 1
    recs = {r["clip_id"]: r for r in load_done(str(tmp_path)).values()}
    assert recs[fail_clip]["atlas"]["status"] == "kept"


# ------------------------------------------------------------------------------------------------ never lose work
def test_kill9_mid_run_then_resume(toy_manifest, tmp_path):
    out = tmp_path / "out"
    with ChatServer(latency=0.15) as s:
        cfg = chat_config(s.base_url, max_clips_in_flight=2)
        cfg_path = tmp_path / "cfg.json"
        cfg.save(str(cfg_path))
        cmd = [sys.executable, "-m", "omni2sound.atlas", "--manifest", toy_manifest, "--out", str(out),
               "--config", str(cfg_path), "--no-progress"]
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        rec_file = out / "records.jsonl"
        deadline = time.time() + 60
        while time.time() < deadline:
            if rec_file.exists() and rec_file.read_text().count("\n") >= 2:
                break
            time.sleep(0.02)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        first = [json.loads(x) for x in rec_file.read_text().splitlines() if x.strip()]
        assert 2 <= len(first) < 8, "the kill should land mid-run"
        done_before = {r["atlas"]["key"] for r in first}
        junior_before = models(s).count("m-junior")
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        junior_after = models(s).count("m-junior") - junior_before
    lines = [json.loads(x) for x in rec_file.read_text().splitlines()]
    keys = [x["atlas"]["key"] for x in lines]
    assert len(keys) == len(set(keys)) == 8                       # none duplicated, none missing
    assert sorted(x["clip_id"] for x in lines) == sorted(x["clip_id"] for x in read_input_manifest(toy_manifest)[0])
    assert done_before <= set(keys)
    assert junior_after <= 8 - len(first)        # finished clips were not captioned again
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records"] == 8


def test_partial_last_line_is_dropped(server, toy_manifest, tmp_path):
    run(chat_config(server.base_url), toy_manifest, tmp_path, n=3)
    f = tmp_path / "records.jsonl"
    lines = f.read_text().splitlines(keepends=True)
    f.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])      # a kill in the middle of a write
    run(chat_config(server.base_url), toy_manifest, tmp_path, n=3)
    keys = [json.loads(x)["atlas"]["key"] for x in f.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 3


def test_shards_split_the_manifest(server, toy_manifest, tmp_path):
    records, _ = read_input_manifest(toy_manifest)
    cfg = chat_config(server.base_url)
    for k in range(3):
        Runner(cfg, str(tmp_path), shard=(k, 3), progress=False).run(records)
    files = sorted(p.name for p in tmp_path.glob("records*.jsonl"))
    assert files == ["records.0-of-3.jsonl", "records.1-of-3.jsonl", "records.2-of-3.jsonl"]
    ids = [json.loads(x)["clip_id"] for p in tmp_path.glob("records*.jsonl") for x in p.read_text().splitlines()]
    assert sorted(ids) == sorted(r["clip_id"] for r in records)


# ------------------------------------------------------------------------------------------------ cost
def test_cost_totals_add_up(server, toy_manifest, tmp_path):
    summary = run(chat_config(server.base_url), toy_manifest, tmp_path)
    expect = 0.0
    for body in server.requests:
        u = default_usage(body, default_responder(body)["text"])
        audio = u["prompt_tokens_details"]["audio_tokens"]
        expect += ((u["prompt_tokens"] - audio) * PRICE["input"] + audio * PRICE["audio_input"] +
                   u["completion_tokens"] * PRICE["output"]) / 1e6
    recs = list(load_done(str(tmp_path)).values())
    for r in recs:
        assert r["atlas"]["cost"] == pytest.approx(sum(c["cost"] for c in r["atlas"]["calls"]), rel=1e-12)
        assert r["atlas"]["turns"] == len(r["atlas"]["calls"])
    assert expect > 0
    assert summary["cost_usd"] == pytest.approx(expect, rel=1e-9)
    assert summary["cost_usd"] == pytest.approx(sum(r["atlas"]["cost"] for r in recs), rel=1e-12)
    assert summary["prompt_tokens"] == sum(default_usage(b, "")["prompt_tokens"] for b in server.requests)


# ------------------------------------------------------------------------------------------------ toy world
def test_toy_world_routes_by_content_and_writes_a_training_manifest(toy_manifest, tmp_path):
    from omni2sound.data import read_manifest
    cfg = AtlasConfig(fsync=False)
    summary = run(cfg, toy_manifest, tmp_path)
    assert summary["records"] == 8
    for rec in load_done(str(tmp_path)).values():
        audio, video = toy_truth(rec)
        mismatch = rec["toy"]["video_index"] != rec["toy"]["index"]
        offscreen = any(not e.onscreen for e in audio)
        if not mismatch:
            assert rec["route"] == ("audio-only" if offscreen else "audio-visual"), rec["av_score"]
        elif not ({e.cls for e in audio} & {e.cls for e in video if e.onscreen}):
            assert rec["route"] == "discarded"
        if rec["atlas"]["status"] == "kept":
            assert rec["text_prompt"] == rec["caption"] and rec["seconds_total"] == 2.0
            assert "task" not in rec              # no precomputed features: read as audio + caption
        else:
            assert "text_prompt" not in rec
            if rec["atlas"]["author"] == "senior":
                assert rec["atlas"]["handoff_reason"]
    kept = [r for r in load_done(str(tmp_path)).values() if r["atlas"]["status"] == "kept"]
    records, report = read_manifest(str(tmp_path / "manifest.jsonl"), strict=True)
    assert len(records) == len(kept) > 0
    from omni2sound.data.corpora import soundatlas_records
    atlas_recs, rep = soundatlas_records(str(tmp_path / "soundatlas.jsonl"))
    assert rep.kept == len(kept) and not rep.errors
    assert sorted(r.caption for r in atlas_recs) == sorted(r["caption"] for r in kept)
    assert all(caption_correct(r["caption"], toy_truth(r)[0]) or r["atlas"]["author"] for r in kept)


def test_cli_toy_default_and_bad_input(tmp_path):
    r = subprocess.run([sys.executable, "-m", "omni2sound.atlas", "--out", str(tmp_path / "o"), "--toy", "4",
                        "--no-progress", "--set", "fsync=false"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["records"] == 4
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"clip_id": "a"}\nnot json\n')
    r = subprocess.run([sys.executable, "-m", "omni2sound.atlas", "--manifest", str(bad), "--out",
                        str(tmp_path / "b"), "--no-progress"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    assert f"{bad}:1: a record needs" in r.stderr and f"{bad}:2: invalid JSON" in r.stderr


def test_records_with_precomputed_features_carry_the_released_task_fields(server, toy_manifest, tmp_path):
    from omni2sound.data.corpora import soundatlas_records
    rec = dict(read_input_manifest(toy_manifest)[0][0])
    rec.pop("_line")
    np.save(tmp_path / "clip.npy", np.zeros((16, 4), np.float32))
    np.save(tmp_path / "sync.npy", np.zeros((48, 4), np.float32))
    rec["features"] = {"video": str(tmp_path / "clip.npy"), "sync": str(tmp_path / "sync.npy")}
    (tmp_path / "m.jsonl").write_text(json.dumps(rec) + "\n")
    for av, task in ((0.5, "vt2a"), (0.25, "t2a")):
        out = tmp_path / f"out{av}"
        run(chat_config(server.base_url, av_scorer=f"const:{av}"), str(tmp_path / "m.jsonl"), out)
        got = next(iter(load_done(str(out)).values()))
        assert got["task"] == task and got["clip_feature"].endswith("clip.npy")
        recs, rep = soundatlas_records(str(out / "soundatlas.jsonl"))
        assert rep.kept == 1 and recs[0].features == {"video": str(tmp_path / "clip.npy"),
                                                      "sync": str(tmp_path / "sync.npy")}
        assert recs[0].caption == got["caption"] and recs[0].clip_id.endswith("/" + task)


def test_requests_in_flight_are_bounded(toy_manifest, tmp_path):
    with ChatServer(latency=0.1) as s:
        run(chat_config(s.base_url, max_requests_in_flight=3, max_clips_in_flight=8), toy_manifest, tmp_path)
        assert s.max_in_flight == 3 and len(s.requests) >= 8


def test_backoff_jitter_and_retry_after():
    import random
    import time as _time
    from email.utils import formatdate

    from omni2sound.atlas.backends import _retry_after, backoff_delay
    cfg = AtlasConfig(backoff_base=0.5, backoff_max=4.0)
    rng = random.Random()
    for attempt in range(6):
        d = [backoff_delay(attempt, cfg, None, rng) for _ in range(200)]
        base = min(4.0, 0.5 * 2 ** attempt)
        assert 0.5 * base <= min(d) and max(d) <= 1.5 * base and len(set(d)) > 100    # jittered
    assert min(backoff_delay(0, cfg, 3.0, rng) for _ in range(50)) >= 3.0            # never before Retry-After
    assert _retry_after({"retry-after": "2"}) == 2.0 and _retry_after({"retry-after-ms": "250"}) == 0.25
    assert 8 <= _retry_after({"retry-after": formatdate(_time.time() + 10, usegmt=True)}) <= 10
    assert _retry_after({"retry-after": "soon"}) is None and _retry_after({}) is None


class BatchAV:
    """A scorer plug-in with score_batch: records the batch sizes it was called with."""
    sizes: list = []

    def score_batch(self, clips, captions=None):
        BatchAV.sizes.append(len(clips))
        return [0.25 if c.record["clip_id"].endswith(("1", "3", "5", "7")) else 0.5 for c in clips]

    def score(self, clip):
        return self.score_batch([clip])[0]


def test_model_scorers_are_fed_in_batches(server, toy_manifest, tmp_path):
    BatchAV.sizes.clear()
    run(chat_config(server.base_url, av_scorer="test_atlas:BatchAV", max_clips_in_flight=8), toy_manifest, tmp_path)
    assert sum(BatchAV.sizes) == 8 and len(BatchAV.sizes) < 8 and max(BatchAV.sizes) > 1
    for rec in load_done(str(tmp_path)).values():
        odd = rec["clip_id"].endswith(("1", "3", "5", "7"))
        assert rec["av_score"] == (0.25 if odd else 0.5)
        assert rec["route"] == ("audio-only" if odd else "audio-visual")


def test_unreadable_media_is_recorded_as_failed(server, toy_manifest, tmp_path):
    good = dict(read_input_manifest(toy_manifest)[0][0])
    good.pop("_line")
    bad = dict(good, clip_id="broken", audio=str(tmp_path / "missing.wav"))
    (tmp_path / "m.jsonl").write_text(json.dumps(bad) + "\n" + json.dumps(good) + "\n")
    summary = run(chat_config(server.base_url), str(tmp_path / "m.jsonl"), tmp_path / "out")
    assert summary["status"] == {"failed": 1, "kept": 1}
    recs = {r["clip_id"]: r for r in load_done(str(tmp_path / "out")).values()}
    assert "missing.wav: no such audio file" in recs["broken"]["atlas"]["reason"]
