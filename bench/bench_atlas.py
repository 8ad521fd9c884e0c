"""SoundAtlas throughput against a loopback chat-completions server with simulated model latency.

    python bench/bench_atlas.py [--clips 2000] [--latency 0.2] [--in-flight 64] [--workers 1,2]

The server (`omni2sound.atlas.loopback`, its own process, real HTTP/1.1 on 127.0.0.1) answers every request
after `latency` seconds. Every clip takes the enhanced path without handoff (constant scorers), so it
needs 3 calls (vision, junior, verifier); with `in_flight` requests open at once the ideal is
in_flight / latency / 3 clips/s. Each entry of --workers is one run (a fresh server, a fresh output folder):
1 is one process (`Runner.run`), N > 1 is `run_workers` (N processes, shard k of N each, the in-flight
bound split between them so the server still sees at most `in_flight`; forked where that is safe, else spawned).

Reported per run: clips/s and its share of the ideal, the most requests the server had open at once,
and CPU time per clip: the pipeline's (media decoding, JPEG/WAV encoding, the openai client, record
writing; for one process also its event-loop thread alone, which the GIL bounds to one core; for N
processes also with their start-up), and the server's. The machine, its load average before and after,
and the date are written beside them: on a shared machine, CPU per clip is the figure that carries over.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def one_run(records: list, workers: int, args) -> dict:
    from omni2sound.atlas import AgentConfig, AtlasConfig, Runner
    from omni2sound.atlas.runner import run_workers

    server = subprocess.Popen([sys.executable, "-m", "omni2sound.atlas.loopback", "--latency", str(args.latency)],
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline().split()[1])
        url = f"http://127.0.0.1:{port}/v1"
        agents = {r: AgentConfig(backend="openai", model=f"bench-{r}", base_url=url,
                                 price={"input": 0.3, "output": 2.5})
                  for r in ("vision", "junior", "senior", "verifier")}
        cfg = AtlasConfig(agents=agents, av_scorer="const:0.5", clap_scorer="const:0.5",
                          max_requests_in_flight=args.in_flight, max_clips_in_flight=4 * args.in_flight,
                          request_timeout=30.0)
        out = os.path.join(args.work, f"out-{os.getpid()}-{time.time_ns()}")
        load0 = os.getloadavg()
        if workers == 1:
            runner = Runner(cfg, out, progress=False)
            runner._setup()
            c0, m0, t0 = time.process_time(), time.thread_time(), time.perf_counter()
            summary = runner.run(records)
            wall = time.perf_counter() - t0
            cpu, main = time.process_time() - c0, time.thread_time() - m0
            cpu_startup = cpu
            transport = next(a.backend for a in runner.agents.values() if hasattr(a, "backend")).transport
        else:
            ch0, t0 = children_cpu(), time.perf_counter()
            summary = run_workers(cfg, out, records, workers, progress=False)
            wall = time.perf_counter() - t0
            cpu = sum(w["cpu_s"] for w in summary["workers"])
            cpu_startup = children_cpu() - ch0
            main, transport = None, None
        load1 = os.getloadavg()
    finally:
        server.terminate()
        tail = server.stdout.read()
        _, _, ru = os.wait4(server.pid, 0)
    stats = json.loads(tail.strip().splitlines()[-1]) if tail.strip() else {}
    n = len(records)
    ideal = args.in_flight / args.latency / 3
    return {"workers": workers, "start_method": summary.get("start_method"), "transport": transport, "clips": n,
            "kept": summary["status"].get("kept", 0),
            "wall_s": round(wall, 2),
            "clips_per_s": round(n / wall, 1), "share_of_ideal": round(n / wall / ideal, 3),
            # N processes: from the moment the slowest had started (each imports the client first)
            "clips_per_s_after_startup": None if workers == 1 else
            round(n / max(w["wall_s"] for w in summary["workers"]), 1),
            "server_max_in_flight": stats.get("max_in_flight"), "requests": stats.get("served"),
            "pipeline_cpu_ms_per_clip": round(1000 * cpu / n, 2),
            "pipeline_cpu_ms_per_clip_with_startup": round(1000 * cpu_startup / n, 2),
            "event_loop_thread_cpu_ms_per_clip": None if main is None else round(1000 * main / n, 2),
            "server_cpu_ms_per_clip": round(1000 * (ru.ru_utime + ru.ru_stime) / n, 2),
            "loadavg_1min_before_after": [round(load0[0], 2), round(load1[0], 2)]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=2000)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--in-flight", type=int, default=64)
    ap.add_argument("--workers", default="1,2", help="comma-separated process counts, one run each")
    ap.add_argument("--work", default="/tmp/bench_atlas")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)

    import openai

    from omni2sound.atlas import read_input_manifest
    from omni2sound.atlas.toy import write_toy_manifest

    mdir = os.path.join(args.work, f"toy{args.clips}")
    manifest = os.path.join(mdir, "manifest.jsonl")
    if not os.path.exists(manifest):
        t = time.perf_counter()
        write_toy_manifest(mdir, args.clips, seed=0, p_mismatch=0.0, size=32)
        print(f"toy manifest of {args.clips} clips written in {time.perf_counter() - t:.1f} s", flush=True)
    records, _ = read_input_manifest(manifest)
    ideal = args.in_flight / args.latency / 3
    runs = []
    for w in (int(x) for x in args.workers.split(",")):
        r = one_run(records, w, args)
        runs.append(r)
        print(f"workers={w}: {r['clips_per_s']} clips/s = {100 * r['share_of_ideal']:.1f}% of {ideal:.1f}; "
              f"pipeline {r['pipeline_cpu_ms_per_clip']} ms CPU/clip, server {r['server_cpu_ms_per_clip']} ms; "
              f"load {r['loadavg_1min_before_after']}", flush=True)
    res = {"runs": runs, "ideal_clips_per_s": ideal, "latency_s": args.latency, "in_flight": args.in_flight,
           "calls_per_clip": 3, "machine": f"{platform.node()}: {cpu_model()}, {os.cpu_count()} CPUs",
           "python": platform.python_version(), "openai": openai.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
