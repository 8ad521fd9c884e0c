"""bench/device_check.sh, checked on the CPU before a GPU machine runs it: a device call is minutes of a short budget,
and a misspelt flag, preset, variant or backend override there costs a step, or the whole call. The script's dry run
(O2S_DRY_RUN=1) prints every step's command; each benchmark's command line is parsed by the benchmark's own parser
(and its check_args where it has one, the presets looked up, OMNI2SOUND_BACKEND parsed), and each pytest step
collects at least one test."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "device_check.sh"
MODES = ("tests tests-vae tests-train kernels vae vae-compile vae-convs generate generate-compile generate-backends "
         "generate-ablate profile train train-profile train-backends train-compile train-pad train-bf16w "
         "train-modgrad fp8 fp8-compile serve synchformer extract").split()


def _script(what: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), what, "600"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "O2S_DRY_RUN": "1", "OUT": str(tmp_path / "out")})


def dry_run(what: str, tmp_path) -> list:
    """The steps of ``bash bench/device_check.sh WHAT`` as (name, limit, argv)."""
    r = _script(what, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    steps = []
    for line in r.stdout.splitlines():
        assert line.startswith("STEP\t"), f"a dry run prints steps only, got {line!r}"
        _, name, limit, cmd = line.split("\t")
        steps.append((name, int(limit), shlex.split(cmd)))
    return steps


# In one process (torch and the benchmarks imported once): each argv is run up to its parser, whose parse_args
# raises with the namespace instead of returning it.
_PARSE_ONLY = r"""
import argparse, inspect, json, os, runpy, sys
sys.path.insert(0, "bench")

class Parsed(Exception):
    pass

_parse = argparse.ArgumentParser.parse_args
def parse_args(self, args=None, namespace=None):
    raise Parsed(_parse(self, args, namespace))
argparse.ArgumentParser.parse_args = parse_args

from omni2sound.ops import _dispatch
from omni2sound.model import dit_config

out = []
for env, argv in json.load(sys.stdin):
    os.environ.pop("OMNI2SOUND_BACKEND", None)
    os.environ.update(env)
    try:
        _dispatch.env_overrides()
        g = runpy.run_path(argv[0], run_name="device_check_parse")
        sys.argv = list(argv)
        try:
            main = g["main"]
            main(argv[1:]) if inspect.signature(main).parameters else main()   # the latter reads sys.argv
            out.append("main returned without parsing a command line")
            continue
        except Parsed as p:
            ns = p.args[0]
        presets = getattr(ns, "presets", None) or []
        presets = presets.split(",") if isinstance(presets, str) else presets
        if not argv[0].endswith("bench_vae.py") and getattr(ns, "preset", None):
            presets = [*presets, ns.preset]
        for name in presets:
            dit_config(name)
        if "check_args" in g:
            g["check_args"](ns)
        out.append("ok")
    except SystemExit as e:
        out.append(f"exit {e.code}")
    except BaseException as e:
        out.append(f"{type(e).__name__}: {e}")
print("RESULT " + json.dumps(out))
"""


def parse_only(jobs: list) -> list:
    """Each (env, argv) of ``jobs`` run up to its parser, in one process: "ok" or what went wrong, per job."""
    r = subprocess.run([sys.executable, "-c", _PARSE_ONLY], cwd=ROOT, input=json.dumps(jobs), capture_output=True,
                       text=True, timeout=600)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def _split_env(argv: list) -> tuple:
    env = {}
    if argv[0] == "env":
        argv = argv[1:]
        while "=" in argv[0]:
            k, _, v = argv[0].partition("=")
            env[k] = v
            argv = argv[1:]
    return env, argv


def test_every_mode_has_steps_and_an_unknown_mode_is_refused(tmp_path):
    for mode in MODES:
        assert dry_run(mode, tmp_path), f"mode {mode} runs no step"
    speed = [name for name, _, _ in dry_run("speed", tmp_path)]
    assert speed[0] == "tests" and "fp8_L" in speed and "train_L" in speed and "serve_L" in speed
    r = _script("speed,trian", tmp_path)
    assert r.returncode == 2 and "unknown mode: trian" in r.stdout


def test_every_benchmark_command_parses(tmp_path):
    steps = dry_run("everything", tmp_path) + dry_run("speed", tmp_path)
    jobs, names = [], []
    for name, limit, argv in steps:
        assert 0 < limit <= 600, (name, limit)
        env, argv = _split_env(argv)
        if argv[:3] == ["python3", "-m", "pytest"]:
            continue
        assert argv[0] == "python3" and argv[1].startswith("bench/"), (name, argv)
        assert (ROOT / argv[1]).is_file(), (name, argv[1])
        jobs.append((env, argv[1:]))
        names.append(name)
    assert len(jobs) > 30
    results = parse_only(jobs)
    bad = [(n, " ".join(j[1]), res) for n, j, res in zip(names, jobs, results) if res != "ok"]
    assert not bad, "\n".join(map(str, bad))


def test_the_parse_check_can_fail(tmp_path):
    """A misspelt flag, variant, preset and backend override each fail the check above."""
    jobs = [({}, ["bench/bench_train.py", "--presets", "L", "--graph", "--variants", "fused+graf"]),
            ({}, ["bench/bench_fp8.py", "--presets", "XL"]),
            ({}, ["bench/bench_serve.py", "--batchs", "1"]),
            ({"OMNI2SOUND_BACKEND": "qk_norm_rop=triton"}, ["bench/bench_gelu.py"]),
            ({}, ["bench/bench_gelu.py", "--quick"])]
    results = parse_only(jobs)
    assert "fused+graf" in results[0] and "not among" in results[0]
    assert "unknown DiT preset" in results[1]
    assert results[2] == "exit 2"
    assert "qk_norm_rop" in results[3]
    assert results[4] == "ok"


def test_every_pytest_step_collects_gpu_tests(tmp_path):
    selections = {}
    for name, _, argv in dry_run("everything", tmp_path) + dry_run("speed", tmp_path):
        if argv[:3] == ["python3", "-m", "pytest"]:
            selections.setdefault(tuple(argv[3:]), name)
    assert len(selections) >= 5
    for args, name in selections.items():
        # the run's own selection, collected only (the reporting and timeout options play no part in it)
        keep, skip = [], 0
        for a in args:
            if skip:
                skip -= 1
            elif a in ("--durations", "--timeout", "-n"):
                skip = 1
            elif a.startswith(("--durations=", "-r")) or a == "-q":
                continue
            else:
                keep.append(a)
        r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *keep], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (name, r.stdout[-2000:], r.stderr[-2000:])
        collected = [ln for ln in r.stdout.splitlines() if "::" in ln]
        assert collected, f"step {name} selects no test: pytest {' '.join(args)}"
        assert all(ln.startswith("tests/") for ln in collected)
