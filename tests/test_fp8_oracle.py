"""The FP8 quality guard on the toy world, end to end: a smoke-scale toy run trained here, then
``bench/bench_fp8.py --toy RUN`` samples every track's held-out prompts in the DiT's precision and with the block
projections in fp8 (same conditions, seed and noise) and the oracle scores both. Checked: the fp8 GEMMs really ran
(every projection of every step, counted at the op; the fp8 latents differ from the default ones), the differences
are the scores' differences counted in prompts, and on every track the bar's scores agree within one prompt. On the
CPU build of torch the bf16 run's projections go through ``torch._scaled_mm`` (the GPU's call), counted too.

A smoke model has not learnt the world, so its scores are mostly 0: this checks the guard's plumbing and arithmetic;
the figures on a trained run are in bench/RESULTS.md (fp8 section)."""
import json
import os
import sys
from dataclasses import replace

import pytest
import torch
from recording import count_calls
from test_fp8 import NO_CPU_ROWWISE

from omni2sound import ops
from omni2sound.oracle import BAR, SCORES, score_difference

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

PROMPTS = 4
# one thread: these tiny GEMMs wait on OpenMP barriers with two threads on a busy 2-core box
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """A finished smoke-preset toy run (vae, stage1-3; ~2 s), trained on the tests' small encoders."""
    from test_data import SmallEncoders

    from omni2sound.schedule import TRAIN_PRESETS
    from omni2sound.train import run
    root = tmp_path_factory.mktemp("runs")
    cfg = replace(TRAIN_PRESETS["smoke"], runs_dir=str(root))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)        # the encoders' random weights: the same toy model whichever test ran before
    try:
        run(cfg, report=False, encoders=SmallEncoders())
    finally:
        torch.set_num_threads(threads)
    return cfg, root / "smoke"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_fp8_toy_scores_both_precisions_within_one_prompt_per_track(smoke_run, tmp_path, monkeypatch, dtype):
    import bench_fp8
    from test_data import SmallEncoders

    import omni2sound.extract
    import omni2sound.ops.fp8 as fp8_mod
    cfg, run = smoke_run
    if dtype == "bfloat16" and not fp8_mod.cpu_takes_rowwise_scales():
        pytest.skip(NO_CPU_ROWWISE)
    monkeypatch.setattr(omni2sound.extract, "Encoders", SmallEncoders)      # the encoders the run was trained on
    depth = json.load(open(run / "stage3" / "dit" / "config.json"))["depth"]
    ref_calls = count_calls(monkeypatch, fp8_mod, "_dequantized_gemm")            # the reference backend's GEMM
    mm_calls = count_calls(monkeypatch, torch, "_scaled_mm")
    seed = int(torch.randint(0, 10_000, ()))
    out_json = tmp_path / "fp8_toy.json"
    argv = ["--toy", str(run), "--dtypes", dtype, "--n", str(PROMPTS), "--seed", str(seed), "--out", str(out_json)]
    # fp32: the CPU default (the dequantising reference); bf16: torch._scaled_mm, as on a GPU
    backend = "reference" if dtype == "float32" else "scaled_mm"
    with ops.use_backend(fp8_linear=backend):
        out = bench_fp8.main(argv)
    assert json.load(open(out_json)) == json.loads(json.dumps(out))
    (r,) = out["runs"]
    assert r["dtype"] == dtype and r["split"] == "test" and r["seed"] == seed and set(r["tracks"]) == set(BAR)
    # the fp8 path ran: the six projections of every block, every sampling step (one batched CFG forward), every
    # track, on the backend the result names; and its arithmetic reached the latents
    gemms = len(BAR) * cfg.sample_steps * 6 * depth
    assert r["fp8"]["weights"] == 6 * depth and r["fp8"]["backends"] == {backend: 6 * depth}
    assert (len(ref_calls), len(mm_calls)) == ((gemms, 0) if backend == "reference" else (0, gemms))
    for track, t in r["tracks"].items():
        assert t["n_prompts"] == PROMPTS and t["default"]["n_clips"] == t["fp8"]["n_clips"] == PROMPTS
        assert 0 < t["latents_rel_err"] < 0.1 and t["latents_cos"] > 0.99, (track, t["latents_rel_err"])
        for k in SCORES:
            if t["default"][k] is None:
                assert t["difference_in_prompts"][k] is None
            else:
                # the report rounds a difference to 6 decimals: compared as rounded, exactly (an approx at 1e-6 of
                # a small difference failed on the rounding alone)
                assert t["difference_in_prompts"][k] == round((t["fp8"][k] - t["default"][k]) * PROMPTS, 6)
        assert t["judged_on"] == list(BAR[track])
        # the guard itself, on the oracle's scores
        assert t["within_one_prompt"], (track, t["difference_in_prompts"])
        assert all(abs(t["difference_in_prompts"][k]) <= 1 + 1e-6 for k in BAR[track])
    assert out["within_one_prompt"] and r["within_one_prompt"]


def test_score_difference_counts_prompts_and_fails_past_one():
    """The guard's arithmetic: a class-accuracy change of one prompt in 48 passes, of two fails; a score outside the
    track's bar does not decide it but is reported; undefined scores stay undefined."""
    n = 48
    base = {"n_clips": n, "onset_f1": 0.9, "class_acc": 40 / n, "class_f1": 0.95, "offscreen_recall": None}
    one = {**base, "class_acc": 41 / n, "onset_f1": 0.9 - 0.5 / n}
    diff, within, within_all = score_difference(base, one, "v2a")
    assert diff["class_acc"] == pytest.approx(1) and diff["onset_f1"] == pytest.approx(-0.5)
    assert diff["offscreen_recall"] is None and within and within_all
    two = {**base, "class_acc": 38 / n}
    assert score_difference(base, two, "v2a")[1:] == (False, False)
    off = {**base, "onset_f1": 0.9 + 3 / n}                  # T2A is judged on class accuracy alone
    assert score_difference(base, off, "t2a")[1:] == (True, False)
    assert score_difference(base, off, "vt2a")[1:] == (False, False)
    with pytest.raises(ValueError, match="48 prompts against 47"):
        score_difference(base, {**base, "n_clips": 47}, "v2a")
