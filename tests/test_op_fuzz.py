"""Fuzz of every public op with malformed arguments (tests/op_fuzz_cases.py draws and runs the cases).

The cases run in worker subprocesses, many per process; when a worker dies of a signal, the case it was running is
a failure and the rest go on in a fresh worker. The test fails on any signal death and on any case whose result is
neither a clear error (ValueError / TypeError with a one-line message, or a forced backend refusing the call) nor
equal to the reference backend's result for the same arguments. Cases are drawn from a fixed seed (the same cases
every run; set OMNI2SOUND_FUZZ_SEED to draw others) and sized for ~1 minute on a 2-core box: the reference and
C++ backends on tiny shapes, and a smaller set on the Triton kernels under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SEED = int(os.environ.get("OMNI2SOUND_FUZZ_SEED", "0"))
N_CPU_CASES = 480
N_TRITON_CASES = 40


def run_cases(ids, backend: str, env_extra=None, timeout: float = 240.0):
    """{case: (verdict, detail)}, crashes included (verdict 'signal N'), restarting the worker after each death."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    results, todo = {}, list(ids)
    while todo:
        cmd = [sys.executable, str(HERE / "op_fuzz_cases.py"), "--seed", str(SEED), "--backend", backend,
               *map(str, todo)]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=HERE.parent)
        running = None
        for line in p.stdout.splitlines():
            tag, _, rest = line.partition(" ")
            if tag == "S":
                running = int(rest)
            elif tag == "R":
                i, verdict, detail = rest.split(" ", 2)
                results[int(i)] = (verdict, detail)
                running = None
        if p.returncode == 0:
            break
        if running is None:        # died outside a case (import, start-up): nothing to go on with
            pytest.fail(f"fuzz worker exited {p.returncode} outside a case:\n{p.stderr[-3000:]}")
        results[running] = (f"signal {-p.returncode}" if p.returncode < 0 else f"exit {p.returncode}",
                            p.stderr[-1500:])
        todo = todo[todo.index(running) + 1:]
    return results


def _report(results) -> str:
    bad = {i: r for i, r in results.items() if r[0] not in ("error", "equal")}
    return "\n".join(f"case {i}: {v}: {d}" for i, (v, d) in sorted(bad.items())[:25]) + \
        f"\n({len(bad)} of {len(results)} cases failed; rerun one with: python tests/op_fuzz_cases.py --seed {SEED} " \
        f"--backend cpu <case>)"


def _check(results, n):
    assert len(results) == n, f"{n - len(results)} cases gave no verdict"
    kinds = {}
    for verdict, _ in results.values():
        kinds[verdict] = kinds.get(verdict, 0) + 1
    assert set(kinds) <= {"error", "equal"}, _report(results)
    # the fuzz is only worth something if it exercises both outcomes
    assert kinds.get("error", 0) > n // 4 and kinds.get("equal", 0) > n // 10, kinds


def test_fuzz_reference_and_cpu_backends():
    _check(run_cases(range(N_CPU_CASES), "cpu"), N_CPU_CASES)


def test_fuzz_triton_kernels_interpreted():
    pytest.importorskip("triton")
    _check(run_cases(range(N_TRITON_CASES), "triton", {"TRITON_INTERPRET": "1"}), N_TRITON_CASES)
