"""Running SoundAtlas over a manifest without ever losing work.

Each clip's record is appended to `records.jsonl` (`records.K-of-N.jsonl` for shard K of N) and flushed
the moment it is finished (fsynced within half a second), keyed by a content hash of the clip (record
identity + the bytes of its audio and video) and the config. A rerun reads every records file in the
folder, skips the keys it finds, and drops a line a kill cut in half; so a killed run resumes with no
duplicated and no missing record. A clip whose calls keep failing is written with status "failed" and
the reason, and the run goes on (`--retry-failed` tries those again). At the end `manifest.jsonl` and
`soundatlas.jsonl` (the kept clips, as the package's manifest and as SoundAtlas records) and `summary.json`
are rewritten from all records in the folder.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import glob
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

from .backends import make_agents
from .config import AtlasConfig
from .media import content_hash, load_media
from .scorers import Batcher, load_scorer
from .stages import DISCARDED, ENHANCED, Trace, junior_senior_handoff, post_filter, route, vision_to_language
from .types import Clip

MANIFEST_FIELDS = ("clip_id", "audio", "video", "start", "duration", "caption", "offscreen", "av_score", "route",
                   "source", "split", "features")


class InputError(ValueError):
    pass


def read_input_manifest(path: str) -> tuple[list, list]:
    """(records, problems) of a JSON Lines manifest: every field is kept; audio/video/features paths are
    resolved against the manifest's folder; bad lines are listed as 'file:line: what' and skipped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"manifest not found: {path}")
    base = os.path.dirname(os.path.abspath(path))
    res = lambda p: p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))
    records, problems, seen = [], [], {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            try:
                obj = json.loads(s)
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{lineno}: invalid JSON: {e.msg} at column {e.colno}")
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("clip_id"), str) or \
                    not isinstance(obj.get("audio"), str):
                problems.append(f"{path}:{lineno}: a record needs string fields clip_id and audio")
                continue
            if obj["clip_id"] in seen:
                problems.append(f"{path}:{lineno}: duplicate clip_id {obj['clip_id']!r} (line {seen[obj['clip_id']]})")
                continue
            seen[obj["clip_id"]] = lineno
            obj["audio"] = res(obj["audio"])
            if isinstance(obj.get("video"), str):
                obj["video"] = res(obj["video"])
            if isinstance(obj.get("features"), dict):
                obj["features"] = {k: res(v) for k, v in obj["features"].items() if isinstance(v, str)}
            obj["_line"] = lineno
            records.append(obj)
    return records, problems


def parse_shard(s: Optional[str]) -> tuple[int, int]:
    if not s:
        return 0, 1
    try:
        k, n = (int(x) for x in s.split("/"))
    except ValueError:
        raise ValueError(f"--shard must be K/N with integers, got {s!r}") from None
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"--shard K/N needs 0 <= K < N, got {s!r}")
    return k, n


def records_path(out_dir: str, shard: tuple[int, int]) -> str:
    k, n = shard
    return os.path.join(out_dir, "records.jsonl" if n == 1 else f"records.{k}-of-{n}.jsonl")


def load_done(out_dir: str) -> dict:
    """key -> record over every records file in out_dir (the last line of a key wins). A line a kill cut
    short (the file's last, without its newline) is ignored."""
    done = {}
    for p in sorted(glob.glob(os.path.join(out_dir, "records*.jsonl"))):
        with open(p, encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    break
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                key = rec.get("atlas", {}).get("key")
                if key:
                    done[key] = rec
    return done


class RecordStore:
    """Appends records to one JSON Lines file: each record is written and flushed the moment it is finished
    (a killed process loses nothing the OS has been handed), and fsynced by a background thread at most
    `fsync_every` seconds later (group commit: a power cut loses at most that much, and the event loop
    never waits on the disk)."""

    def __init__(self, path: str, fsync: bool = True, fsync_every: float = 0.5):
        self.path = path
        if os.path.exists(path):
            self._drop_partial_tail()
        self.f = open(path, "a", encoding="utf-8")
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._syncer = None
        if fsync:
            self._syncer = threading.Thread(target=self._sync_loop, args=(fsync_every,), daemon=True)
            self._syncer.start()

    def _drop_partial_tail(self) -> None:
        with open(self.path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)

    def _sync_loop(self, every: float) -> None:
        fd = self.f.fileno()
        while not self._stop.is_set():
            if self._dirty.wait(every):
                self._dirty.clear()
                os.fsync(fd)
                self._stop.wait(every)

    def append(self, rec: dict) -> None:
        self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.f.flush()
        self._dirty.set()

    def close(self) -> None:
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join()
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def clip_key(record: dict, config_hash: str) -> str:
    return hashlib.sha256(f"{config_hash}:{content_hash(record)}".encode()).hexdigest()[:24]


def training_fields(rec: dict, caption: Optional[str], route_: str) -> dict:
    """The released SoundAtlas fields (text_prompt, seconds_start, seconds_total, and with precomputed features
    task, clip_feature, sync_feature), as `omni2sound.data.corpora.soundatlas_records` reads them. A record
    without feature files has no task: its clip is read as audio + caption (the video path stays in
    manifest.jsonl, whose clips `omni2sound.extract` encodes from the video)."""
    feats = rec.get("features") or {}
    out = {"text_prompt": caption, "seconds_start": float(rec.get("start") or 0.0),
           "seconds_total": rec.get("duration")}
    clip_f = rec.get("clip_feature") or feats.get("video")
    sync_f = rec.get("sync_feature") or feats.get("sync")
    if clip_f and sync_f:
        out.update(task="vt2a" if route_ == ENHANCED else "t2a", clip_feature=clip_f, sync_feature=sync_f)
    return out


class Runner:
    def __init__(self, cfg: AtlasConfig, out_dir: str, shard: tuple[int, int] = (0, 1), progress: bool = True,
                 retry_failed: bool = False, on_record: Optional[Callable[[], None]] = None):
        self.cfg, self.out_dir, self.shard = cfg, out_dir, shard
        self.progress, self.retry_failed, self.on_record = progress, retry_failed, on_record
        self.config_hash = cfg.content_hash()
        os.makedirs(out_dir, exist_ok=True)
        self.agents = None
        self.av = self.clap = None

    def _setup(self):
        if self.agents is None:
            self.agents = make_agents(self.cfg)
            self.av = load_scorer(self.cfg.av_scorer, "av")
            self.clap = load_scorer(self.cfg.clap_scorer, "clap")

    async def _process(self, rec: dict, key: str, pool: ThreadPoolExecutor) -> dict:
        cfg, loop = self.cfg, asyncio.get_running_loop()
        t0 = time.perf_counter()
        trace = Trace()
        base = {k: v for k, v in rec.items() if not k.startswith("_")}
        atlas = {"key": key, "config": self.config_hash, "status": "failed"}
        try:
            clip = await loop.run_in_executor(pool, self._load_clip, rec, key)
            av = await self._av_batch(clip) if clip.frames is not None else None
            r = route(av, cfg) if av is not None else "audio-only"
            atlas["scores"] = {"av": av}
            base.update(av_score=av, route=r)
            if r == DISCARDED:
                atlas.update(status="discarded", reason=f"av {av:.3f} < {cfg.discard_below:g}")
                base.pop("caption", None)
                return self._finish(base, atlas, trace, t0)
            await loop.run_in_executor(pool, self._prepare, clip, r == ENHANCED)
            context = await vision_to_language(clip, self.agents["vision"], trace) if r == ENHANCED else None

            async def clap_score(caption: str) -> float:
                return await self._clap_batch(clip, caption)

            h = await junior_senior_handoff(clip, context, self.agents["junior"], self.agents["senior"], clap_score,
                                            trace, cfg)
            kept, why, verdict = await post_filter(clip, h["caption"], h["clap"], h["music"], r, context,
                                                   self.agents["verifier"], trace, cfg)
            atlas["scores"].update({k: h[k] for k in ("clap_junior", "clap_senior") if k in h})
            atlas["scores"]["clap"] = h["clap"]
            atlas["scores"]["verifier"] = verdict
            atlas.update(status="kept" if kept else "filtered", author=h["author"],
                         handoff_reason=h.get("handoff_reason"), music=h["music"], context=context,
                         junior_caption=h.get("junior_caption"), senior_caption=h.get("senior_caption"))
            if why:
                atlas["reason"] = why
            base["caption"] = h["caption"]
            if kept:
                base.update(training_fields(rec, h["caption"], r))
        except Exception as e:       # one clip's failure never stops the run: it is recorded with its reason
            atlas.update(status="failed", reason=f"{type(e).__name__}: {e}"[:500])
        return self._finish(base, atlas, trace, t0)

    def _load_clip(self, rec: dict, key: str) -> Clip:
        cfg = self.cfg
        audio, frames = load_media(rec, cfg.audio_sample_rate, cfg.frames_fps, cfg.max_frames, cfg.frame_size)
        return Clip(index=rec["_line"], record=rec, key=key, audio=audio, sample_rate=cfg.audio_sample_rate,
                    frames=frames, frames_fps=cfg.frames_fps)

    def _prepare(self, clip: Clip, frames: bool) -> None:
        """Encode the media the chat agents will send (a media thread's work): the audio, and the frames on
        the enhanced path only (the audio-only path never sends them)."""
        for agent in self.agents.values():
            prepare = getattr(agent, "prepare", None)
            if prepare is not None:
                prepare(clip, frames)

    def _finish(self, base: dict, atlas: dict, trace: Trace, t0: float) -> dict:
        atlas.update(turns=len(trace.calls), calls=trace.calls,
                     prompt_tokens=sum(c["prompt_tokens"] for c in trace.calls),
                     completion_tokens=sum(c["completion_tokens"] for c in trace.calls),
                     cost=trace.cost, seconds=round(time.perf_counter() - t0, 4))
        base["atlas"] = atlas
        return base

    async def run_async(self, records: list) -> dict:
        self._setup()
        k, n = self.shard
        mine = [r for i, r in enumerate(records) if i % n == k]
        done = load_done(self.out_dir)
        store = RecordStore(records_path(self.out_dir, self.shard), self.cfg.fsync)
        pool = ThreadPoolExecutor(self.cfg.media_threads)
        scoring = ThreadPoolExecutor(1)          # one model forward at a time: batches, not threads, give speed
        self._av_batch = Batcher(self.av, scoring if hasattr(self.av, "score_batch") else pool, self.cfg.score_batch)
        self._clap_batch = Batcher(self.clap, scoring if hasattr(self.clap, "score_batch") else pool,
                                   self.cfg.score_batch)
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(self.cfg.max_clips_in_flight)
        stats = {"skipped": 0, "written": 0}
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=len(mine), desc="soundatlas", unit="clip", file=sys.stderr)

        async def one(rec):
            try:
                key = await loop.run_in_executor(pool, clip_key, rec, self.config_hash)
            except OSError as e:        # an unreadable file: recorded as failed under a key of its id
                key = hashlib.sha256(f"{self.config_hash}:unreadable:{rec['clip_id']}".encode()).hexdigest()[:24]
                if key not in done:
                    store.append(self._finish({k: v for k, v in rec.items() if not k.startswith("_")},
                                              {"key": key, "config": self.config_hash, "status": "failed",
                                               "reason": f"{type(e).__name__}: {e}"}, Trace(), time.perf_counter()))
                    stats["written"] += 1
                return
            prev = done.get(key)
            if prev is not None and not (self.retry_failed and prev["atlas"].get("status") == "failed"):
                stats["skipped"] += 1
            else:
                store.append(await self._process(rec, key, pool))
                stats["written"] += 1

        async def guarded(rec):
            try:
                await one(rec)
            finally:
                sem.release()
                if bar is not None:
                    bar.update(1)
                if self.on_record is not None:
                    self.on_record()

        tasks = set()
        try:
            for rec in mine:
                await sem.acquire()
                t = asyncio.create_task(guarded(rec))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            store.close()
            pool.shutdown(wait=False)
            scoring.shutdown(wait=False)
            if bar is not None:
                bar.close()
            for a in self.agents.values():
                b = getattr(a, "backend", None)
                if b is not None:
                    await b.aclose()
        return stats

    def run(self, records: list, finalize_outputs: bool = True) -> dict:
        """Caption this runner's shard of `records`; then (finalize_outputs) rewrite the folder's
        manifest.jsonl, soundatlas.jsonl and summary.json from every records file in it."""
        self._setup()                   # the models and clients load before the collector freezes what is alive
        with quiet_gc():
            stats = asyncio.run(self.run_async(records))
        if not finalize_outputs:
            return stats
        summary = finalize(self.out_dir)
        summary.update(stats)
        return summary


def _share(total: int, k: int, n: int) -> int:
    """Worker k's share of a bound of `total` split over n workers (the shares add up to total)."""
    return total // n + (k < total % n)


def _shard_worker(cfg_dict: dict, out_dir: str, records: list, shard: tuple, retry_failed: bool, counter,
                  results) -> None:
    """One worker process of `run_workers`: its shard, its own event loop and clients; sends back its
    counts and the CPU seconds its run took (start-up excluded)."""
    import traceback
    k = shard[0]
    try:
        def tick():
            with counter.get_lock():
                counter.value += 1
        runner = Runner(AtlasConfig.from_dict(cfg_dict), out_dir, shard, progress=False, retry_failed=retry_failed,
                        on_record=tick)
        runner._setup()
        c0, t0 = time.process_time(), time.perf_counter()
        stats = runner.run(records, finalize_outputs=False)
        stats.update(cpu_s=time.process_time() - c0, wall_s=time.perf_counter() - t0)
        results.put((k, stats))
    except BaseException as e:
        results.put((k, {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"}))
        raise SystemExit(1)


def _start_method() -> str:
    """fork where it is safe (Linux, this process runs no other thread and has not loaded torch, whose thread
    pools do not survive a fork): the workers start at once with the client already imported; else spawn
    (each worker imports the client again, ~1.5 s of CPU)."""
    import threading
    if sys.platform.startswith("linux") and threading.active_count() == 1 and "torch" not in sys.modules:
        return "fork"
    return "spawn"


def run_workers(cfg: AtlasConfig, out_dir: str, records: list, workers: int, retry_failed: bool = False,
                progress: bool = True, start_method: Optional[str] = None) -> dict:
    """Caption `records` with `workers` processes on this machine: worker k takes shard k of N (manifest
    lines k, k+N, ...; its records go to records.k-of-N.jsonl) and a 1/N share of max_clips_in_flight and
    max_requests_in_flight, so the server sees the configured bound in total. One Python process is bound
    by one core (the GIL); N of them use N. The folder's outputs are finalized once, after every worker;
    a worker that dies loses nothing written, its shard resumes on the next run, and the run reports it.

    start_method: "fork" or "spawn" (None: fork where `_start_method` finds it safe).
    Returns the summary (as `Runner.run`) plus "workers": each worker's counts, CPU and wall seconds."""
    if workers <= 1:
        return Runner(cfg, out_dir, progress=progress, retry_failed=retry_failed).run(records)
    if workers > cfg.max_requests_in_flight:
        raise ValueError(f"{workers} workers need max_requests_in_flight >= {workers} "
                         f"(got {cfg.max_requests_in_flight}): each worker needs one request in flight")
    import multiprocessing as mp
    import queue
    os.makedirs(out_dir, exist_ok=True)
    ctx = mp.get_context(start_method or _start_method())
    counter, results = ctx.Value("q", 0), ctx.Queue()
    procs = []
    for k in range(workers):
        d = cfg.to_dict()
        d["max_requests_in_flight"] = _share(cfg.max_requests_in_flight, k, workers)
        d["max_clips_in_flight"] = max(1, _share(cfg.max_clips_in_flight, k, workers))
        p = ctx.Process(target=_shard_worker, name=f"soundatlas-{k}-of-{workers}",
                        args=(d, out_dir, records, (k, workers), retry_failed, counter, results))
        p.start()
        procs.append(p)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(records), desc=f"soundatlas x{workers}", unit="clip", file=sys.stderr)
    got: dict = {}
    try:
        while len(got) < workers:
            try:
                k, res = results.get(timeout=0.25)
                got[k] = res
            except queue.Empty:
                for k, p in enumerate(procs):
                    if k not in got and not p.is_alive() and p.exitcode not in (None, 0):
                        got[k] = {"error": f"worker {k} of {workers} died with exit code {p.exitcode}"}
            if bar is not None:
                bar.n = counter.value
                bar.refresh()
    finally:
        for p in procs:
            p.join()
        if bar is not None:
            bar.n = counter.value
            bar.close()
    summary = finalize(out_dir)
    per = [got[k] for k in range(workers)]
    summary.update(start_method=ctx.get_start_method(), skipped=sum(w.get("skipped", 0) for w in per),
                   written=sum(w.get("written", 0) for w in per),
                   workers=per)
    failed = [f"shard {k}/{workers}: {w['error'].splitlines()[0]}" for k, w in enumerate(per) if "error" in w]
    if failed:
        raise RuntimeError("worker(s) failed (their finished records are kept; rerun to resume): " + "; ".join(failed))
    return summary


@contextlib.contextmanager
def quiet_gc(young: int = 10000):
    """Cyclic garbage collection kept off the hot path while a run lasts: what is alive at the start (the
    imported clients, the manifest) is frozen out of collections, and the young generation is collected
    every `young` allocations instead of 700. Every request allocates hundreds of short-lived objects,
    and at the default thresholds the collector took a fifth of the event loop's CPU; nothing the run
    makes lives in reference cycles for long."""
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(young, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def _atomic_write(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def finalize(out_dir: str) -> dict:
    """Rewrite, from every records file: manifest.jsonl (the kept clips as the package's ClipRecord manifest),
    soundatlas.jsonl (the kept records whole, readable by `omni2sound.data.corpora.soundatlas_records`) and
    summary.json."""
    done = load_done(out_dir)
    lines, kept, counts, routes, authors = [], [], {}, {}, {}
    cost = prompt = completion = 0.0
    for rec in done.values():
        a = rec["atlas"]
        counts[a["status"]] = counts.get(a["status"], 0) + 1
        if rec.get("route"):
            routes[rec["route"]] = routes.get(rec["route"], 0) + 1
        if a.get("author"):
            authors[a["author"]] = authors.get(a["author"], 0) + 1
        cost += a.get("cost", 0.0)
        prompt += a.get("prompt_tokens", 0)
        completion += a.get("completion_tokens", 0)
        if a["status"] == "kept":
            kept.append(json.dumps(rec, ensure_ascii=False))
            lines.append(json.dumps({k: rec[k] for k in MANIFEST_FIELDS if rec.get(k) is not None},
                                    ensure_ascii=False))
    summary = {"records": len(done), "status": counts, "routes": routes, "authors": authors, "cost_usd": cost,
               "prompt_tokens": int(prompt), "completion_tokens": int(completion)}
    _atomic_write(os.path.join(out_dir, "manifest.jsonl"), "".join(x + "\n" for x in lines))
    _atomic_write(os.path.join(out_dir, "soundatlas.jsonl"), "".join(x + "\n" for x in kept))
    _atomic_write(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=1) + "\n")
    return summary
