"""SoundAtlas throughput against a loopback chat-completions server with simulated model latency.

    python bench/bench_atlas.py [--clips 2000] [--latency 0.2] [--in-flight 64]

The server (`omni2sound.atlas.loopback`, its own process) answers every request after `latency` seconds.
Every clip takes the enhanced path without handoff (constant scorers), so it needs 3 calls (vision,
junior, verifier); with `in_flight` requests open at once the ideal is in_flight / latency / 3 clips/s.
Reported: clips/s and its share of that ideal, the most requests the client had in flight, and the
pipeline's own CPU time per clip (this process only: media decoding, JPEG/WAV encoding, the openai
client, record writing; the server's CPU is in the other process).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=2000)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--in-flight", type=int, default=64)
    ap.add_argument("--work", default="/tmp/bench_atlas")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)

    import openai

    from omni2sound.atlas import AgentConfig, AtlasConfig, Runner, read_input_manifest
    from omni2sound.atlas.toy import write_toy_manifest

    mdir = os.path.join(args.work, f"toy{args.clips}")
    manifest = os.path.join(mdir, "manifest.jsonl")
    if not os.path.exists(manifest):
        t = time.perf_counter()
        write_toy_manifest(mdir, args.clips, seed=0, p_mismatch=0.0, size=32)
        print(f"toy manifest of {args.clips} clips written in {time.perf_counter() - t:.1f} s", flush=True)
    records, _ = read_input_manifest(manifest)

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
        out = os.path.join(args.work, f"out-{int(time.time())}")
        runner = Runner(cfg, out, progress=False)
        c0, t0 = time.process_time(), time.perf_counter()
        summary = runner.run(records)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        server.kill()
        server.wait()
    calls = 3
    ideal = args.in_flight / args.latency / calls
    backend = next(a.backend for a in runner.agents.values() if hasattr(a, "backend"))
    res = {"clips": len(records), "kept": summary["status"].get("kept", 0), "wall_s": wall,
           "clips_per_s": len(records) / wall, "ideal_clips_per_s": ideal,
           "share_of_ideal": len(records) / wall / ideal,
           "max_requests_in_flight_seen": backend.max_seen_in_flight, "cpu_ms_per_clip": 1000 * cpu / len(records),
           "latency_s": args.latency, "in_flight": args.in_flight, "calls_per_clip": calls,
           "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
           "python": platform.python_version(), "openai": openai.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
