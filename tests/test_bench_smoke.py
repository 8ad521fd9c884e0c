"""Every benchmark that bench/device_check.sh runs on a GPU runs end to end in its quick CPU form and writes its
JSON: the benchmarks produce the GPU figures, and a device call is too short to find out there that one of them no
longer runs. Timings are not checked (a test is not a benchmark); the records' provenance and results are."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# name -> command line after `python bench/<script>.py` (the JSON path is appended)
CASES = {
    "fp8": ["bench_fp8.py", "--quick", "--device", "cpu", "--out"],
    "fp8_ops": ["bench_fp8.py", "--ops", "--quick", "--device", "cpu", "--out"],
    "serve": ["bench_serve.py", "--quick", "--device", "cpu", "--out"],
    "generate": ["bench_generate.py", "--quick", "--presets", "tiny", "--device", "cpu", "--out"],
    "generate_ablate": ["bench_generate.py", "--ablate", "--presets", "tiny", "--device", "cpu", "--ablate-rounds", "1",
                        "--ablate-steps", "2", "--out"],
    "train": ["bench_train.py", "--quick", "--presets", "tiny", "--device", "cpu", "--graph", "--bf16-weights",
              "--modulation-grads", "both", "--out"],
    "vae": ["bench_vae.py", "--quick", "--preset", "tiny", "--device", "cpu", "--out"],
    "synchformer": ["bench_synchformer.py", "--config", "tiny", "--seconds", "2", "--device", "cpu", "--out"],
    "extract": ["bench_extract.py", "--clips", "2", "--seconds", "2", "--device", "cpu", "--json"],
    "adaln": ["bench_adaln.py", "--quick", "--device", "cpu", "--out"],
    "adaln_modgrad": ["bench_adaln.py", "--modulation-grads", "--quick", "--device", "cpu", "--out"],
    "snake": ["bench_snake.py", "--quick", "--device", "cpu", "--out"],
    "qk_norm_rope": ["bench_qk_norm_rope.py", "--quick", "--device", "cpu", "--out"],
    "gelu": ["bench_gelu.py", "--quick", "--device", "cpu", "--out"],
    "adamw": ["bench_adamw.py", "--quick", "--device", "cpu", "--out"],
    "attention": ["bench_attention.py", "--quick", "--device", "cpu", "--out"],
    "cross_attention": ["bench_cross_attention.py", "--quick", "--device", "cpu", "--out"],
}

PROVENANCE = {"date", "command", "commit", "python", "torch", "triton", "cuda", "hardware", "gpu"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_benchmark_runs_and_writes_its_record(name, tmp_path):
    script, *args = CASES[name]
    out = tmp_path / f"{name}.json"
    # as a user runs them: without the Triton interpreter the tests switch on (it would time Triton rows at the
    # benchmarks' shapes for minutes)
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "OMP_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args, str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{script} {' '.join(args)}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert out.is_file(), f"{script} wrote no {out.name}"
    record = json.loads(out.read_text())
    # the provenance every benchmark writes at the top (omni2sound.gpu_info.provenance), then its results
    assert record["torch"] == torch.__version__ and record["hardware"] and record["date"], record
    assert f"bench/{script}" in record["command"]
    results = {k: v for k, v in record.items() if k not in PROVENANCE}
    assert results and any(v not in (None, [], {}) for v in results.values()), f"{script}: no results in {record}"
