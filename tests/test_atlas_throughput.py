"""SoundAtlas's throughput machinery: media decoded and encoded once per clip (frames only where they are
sent), request bodies spliced from pre-encoded parts, the frames read_video keeps, multi-process runs
(shards written without a duplicated or missing record, the in-flight bound shared), and the collector
settings a run restores."""
import base64
import gc
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from omni2sound.atlas import AgentConfig, AtlasConfig, Runner, read_input_manifest
from omni2sound.atlas import backends as atlas_backends
from omni2sound.atlas.backends import EncodedPart, chat_body_bytes
from omni2sound.atlas.loopback import ChatServer
from omni2sound.atlas.media import wav_base64
from omni2sound.atlas.runner import quiet_gc, run_workers
from omni2sound.atlas.toy import write_toy_manifest

ROLES = ("vision", "junior", "senior", "verifier")


@pytest.fixture(scope="module")
def toy_manifest(tmp_path_factory):
    return write_toy_manifest(str(tmp_path_factory.mktemp("toy")), 8, seed=5, p_mismatch=0.0, p_offscreen=0.0)


def chat_config(url, **kw) -> AtlasConfig:
    agents = {r: AgentConfig(backend="openai", model=f"m-{r}", base_url=url, price={"input": 1.0, "output": 2.0})
              for r in ROLES}
    kw = {"av_scorer": "const:0.5", "clap_scorer": "const:0.5", "request_timeout": 5.0, "max_attempts": 3,
          "backoff_base": 0.01, "fsync": False, **kw}
    return AtlasConfig(agents=agents, **kw)


def parts(body, kind):
    return [p for m in body["messages"] if isinstance(m["content"], list) for p in m["content"] if p["type"] == kind]


# ------------------------------------------------------------------------------------------------ encoding
def test_body_bytes_are_the_json_of_the_body():
    rng = np.random.default_rng()
    audio = EncodedPart({"type": "input_audio", "input_audio": {"data": base64.b64encode(rng.bytes(999)).decode(),
                                                                "format": "wav"}})
    frame = EncodedPart({"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,QUJD"}})
    body = {"model": "m", "messages": [
        {"role": "system", "content": 'say "yes" — or \\ no\n'},
        {"role": "user", "content": [audio, frame, {"type": "text", "text": "Caption: a bell rings ♪"}]},
        {"role": "assistant", "content": [], "name": "x"}],
        "max_tokens": 7, "temperature": 0.0, "extra": {"a": [1, None, True]}}
    raw = chat_body_bytes(body)
    assert json.loads(raw) == json.loads(json.dumps(body))
    assert raw == json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    assert isinstance(body["messages"][1]["content"][0], dict)       # still a plain part to other backends


def test_wav_is_bit_exact_for_16_bit_sources_and_clipped():
    pcm = np.random.default_rng().integers(-32768, 32768, 4001).astype(np.int16)
    x = pcm.astype(np.float32) / 32768
    y, sr = sf.read(io.BytesIO(base64.b64decode(wav_base64(x, 22050))), dtype="int16")
    assert sr == 22050 and np.array_equal(y, pcm)
    y, _ = sf.read(io.BytesIO(base64.b64decode(wav_base64(np.array([2.0, -3.0, 0.5], np.float32), 16000))),
                   dtype="int16")
    assert y.tolist() == [32767, -32768, 16384]


def test_read_video_keeps_only_sampled_frames_and_matches_a_full_decode(tmp_path):
    import av

    from omni2sound.video import read_video, write_video
    rng = np.random.default_rng()
    src = rng.integers(0, 256, (23, 16, 24, 3)).astype(np.uint8)
    path = tmp_path / "v.mp4"
    write_video(path, src, 12.5)

    def reference(fps, start=0.0, max_seconds=None):     # every frame converted, the documented grid
        times, frames = [], []
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            dur = float(s.duration * s.time_base)
            for f in c.decode(s):
                if max_seconds is not None and f.time >= start + max_seconds:
                    break
                times.append(f.time)
                frames.append(f.to_ndarray(format="rgb24"))
        last = times[-1] + (times[-1] - times[0]) / (len(times) - 1)
        stop = max(min(dur, last + 1e-6), times[-1])
        if max_seconds is not None:
            stop = min(stop, start + max_seconds)
        grid = start + np.arange(max(1, int(np.ceil((stop - start) * fps - 1e-6)))) / fps
        idx = np.clip(np.searchsorted(times, grid + 1e-9, side="right") - 1, 0, len(frames) - 1)
        return np.stack([frames[i] for i in idx])

    for fps, start, dur in ((1.0, 0.0, None), (3.0, 0.0, None), (12.5, 0.0, None), (30.0, 0.0, None),
                            (7.0, 0.37, 0.9), (2.0, float(rng.uniform(0, 1)), None)):
        for threads in (True, False):
            got = read_video(path, fps, None, max_seconds=dur, start=start, threads=threads)
            np.testing.assert_array_equal(got, reference(fps, start, dur), err_msg=f"fps {fps} start {start}")


def test_media_is_encoded_once_per_clip_and_frames_only_where_sent(toy_manifest, tmp_path, monkeypatch):
    calls = {"wav": 0, "jpeg": 0}
    real_wav, real_jpeg = atlas_backends.wav_base64, atlas_backends.jpeg_data_url

    def wav(*a, **k):
        calls["wav"] += 1
        return real_wav(*a, **k)

    def jpeg(*a, **k):
        calls["jpeg"] += 1
        return real_jpeg(*a, **k)

    monkeypatch.setattr(atlas_backends, "wav_base64", wav)
    monkeypatch.setattr(atlas_backends, "jpeg_data_url", jpeg)
    records, _ = read_input_manifest(toy_manifest)
    for av, frames_per_clip in ((0.5, 2), (0.25, 0)):          # enhanced path: 2 frames of 2 s at 1 fps
        calls.update(wav=0, jpeg=0)
        with ChatServer() as s:
            Runner(chat_config(s.base_url, av_scorer=f"const:{av}"), str(tmp_path / str(av)),
                   progress=False).run(records[:3])
            bodies = s.requests
        assert calls == {"wav": 3, "jpeg": 3 * frames_per_clip}
        by_clip: dict = {}
        for b in bodies:                                          # every request of a clip carries the same media
            for p in parts(b, "input_audio"):
                by_clip.setdefault(p["input_audio"]["data"], []).append(b["model"])
        assert len(by_clip) == 3
        assert all(sorted(m) == (["m-junior", "m-verifier"] if av == 0.5 else ["m-junior"]) for m in by_clip.values())
        assert sum(len(parts(b, "image_url")) for b in bodies) == 3 * frames_per_clip * (2 if av == 0.5 else 0)


# ------------------------------------------------------------------------------------------------ workers
def test_workers_write_every_record_once_and_share_the_bound(toy_manifest, tmp_path):
    """`--workers 2` (run_workers: two spawned processes) against one server: each shard in its own file, every
    clip once, the in-flight bound held over both processes, one finalize; a one-process rerun finds all done."""
    records, _ = read_input_manifest(toy_manifest)
    out = tmp_path / "out"
    with ChatServer(latency=0.05) as s:
        cfg = tmp_path / "cfg.json"
        chat_config(s.base_url, max_requests_in_flight=3, max_clips_in_flight=4).save(str(cfg))
        r = subprocess.run([sys.executable, "-m", "omni2sound.atlas", "--manifest", toy_manifest, "--out", str(out),
                            "--config", str(cfg), "--workers", "2", "--no-progress"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        assert s.max_in_flight <= 3 and len(s.requests) == 3 * 8
    summary = json.loads(r.stdout)
    assert summary["start_method"] == ("fork" if sys.platform.startswith("linux") else "spawn")
    assert sorted(p.name for p in out.glob("records*.jsonl")) == ["records.0-of-2.jsonl", "records.1-of-2.jsonl"]
    lines = [json.loads(x) for p in out.glob("records*.jsonl") for x in p.read_text().splitlines()]
    keys = [x["atlas"]["key"] for x in lines]
    assert len(keys) == len(set(keys)) == 8
    assert sorted(x["clip_id"] for x in lines) == sorted(x["clip_id"] for x in records)
    shard_of = {x["clip_id"]: i % 2 for i, x in enumerate(records)}
    for k in range(2):
        ids = [json.loads(x)["clip_id"] for x in (out / f"records.{k}-of-2.jsonl").read_text().splitlines()]
        assert ids and all(shard_of[i] == k for i in ids)
    assert summary["records"] == 8 and summary["written"] == 8 and [w["written"] for w in summary["workers"]] == [4, 4]
    assert json.loads((out / "summary.json").read_text())["records"] == 8
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 8
    with ChatServer() as s:          # keys do not depend on the split: one process finds every clip done
        again = Runner(chat_config(s.base_url), str(out), progress=False).run(records)
        assert s.requests == []
    assert again["skipped"] == 8 and again["written"] == 0 and again["records"] == 8


def test_spawned_workers(toy_manifest, tmp_path):
    """The start method used where fork is not safe (here: the test's server thread runs in this process)."""
    records, _ = read_input_manifest(toy_manifest)
    with ChatServer() as s:
        summary = run_workers(chat_config(s.base_url), str(tmp_path), records[:4], 2, progress=False)
        assert len(s.requests) == 3 * 4
    assert summary["start_method"] == "spawn" and summary["records"] == 4 and summary["written"] == 4
    keys = [json.loads(x)["atlas"]["key"] for p in tmp_path.glob("records*.jsonl") for x in p.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 4


def test_workers_argument_errors(toy_manifest, tmp_path):
    r = subprocess.run([sys.executable, "-m", "omni2sound.atlas", "--manifest", toy_manifest, "--out",
                        str(tmp_path / "p"), "--workers", "2", "--shard", "0/2"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "--workers" in r.stderr
    with pytest.raises(ValueError, match="max_requests_in_flight"):
        run_workers(chat_config("http://127.0.0.1:9/v1", max_requests_in_flight=2), str(tmp_path / "q"),
                    read_input_manifest(toy_manifest)[0], 3, progress=False)


def test_quiet_gc_restores_the_collector():
    before = gc.get_threshold()
    with quiet_gc(young=12345):
        assert gc.get_threshold()[0] == 12345 and gc.get_freeze_count() > 0
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_transport_is_aiohttp_with_the_extra_and_httpx_without(toy_manifest, tmp_path, monkeypatch):
    import openai
    records, _ = read_input_manifest(toy_manifest)
    expect = ["aiohttp" if getattr(openai, "DefaultAioHttpClient", None) is not None else "httpx", "httpx"]
    for i, want in enumerate(expect):
        if i == 1 and hasattr(openai, "DefaultAioHttpClient"):    # as the client is without the aiohttp extra
            class Missing(openai.DefaultAioHttpClient):
                def __init__(self, **kw):
                    raise RuntimeError("To use the aiohttp client you must have installed the package with the "
                                       "`aiohttp` extra")
            monkeypatch.setattr(openai, "DefaultAioHttpClient", Missing)
        with ChatServer() as s:
            runner = Runner(chat_config(s.base_url), str(tmp_path / want / str(i)), progress=False)
            summary = runner.run(records[:2])
            assert summary["status"] == {"kept": 2} and len(s.requests) == 6
        assert runner.agents["junior"].backend.transport == want


# ------------------------------------------------------------------------------------------------ cost
def test_openai_preset_sets_the_thinking_budgets_the_bill_assumes(toy_manifest, tmp_path):
    """The toy world bills the junior no thinking tokens and the senior the paper's 128: the preset for real
    Gemini models asks for exactly that (Flash thinks by default, billed as output)."""
    from omni2sound.atlas import preset
    records, _ = read_input_manifest(toy_manifest)
    cfg = preset("openai")
    with ChatServer() as s:
        for a in cfg.agents.values():
            a.base_url = s.base_url
        cfg.av_scorer, cfg.clap_scorer, cfg.fsync = "const:0.5", "const:0.32", False    # handed off, then verified
        Runner(cfg, str(tmp_path), progress=False).run(records[:1])
        role = lambda b: next(r for p, r in (("You describe", "vision"), ("You write one", "caption"),
                                             ("You check an", "verifier")) if b["messages"][0]["content"].startswith(p))
        budget = {(role(b), b["model"]):
                  (b.get("extra_body") or {}).get("google", {}).get("thinking_config", {}).get("thinking_budget")
                  for b in s.requests}
    assert budget == {("vision", "qwen2.5-vl-7b"): None, ("caption", "gemini-2.5-flash"): 0,
                      ("caption", "gemini-2.5-pro"): 128, ("verifier", "gemini-2.5-flash"): None}
