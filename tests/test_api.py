"""The API and CLIs as a new user meets them: top-level names that import lazily, documented arguments, the
token limit and --truncate, extract's options and manifest format in --help, the console scripts."""
import subprocess
import sys

import pytest
from media import tiny_model

import omni2sound
from omni2sound.generate import main as generate_main


def test_top_level_names_are_lazy():
    code = ("import sys, omni2sound; print('torch' in sys.modules); "
            "from omni2sound import Omni2SoundPipeline, mux_audio, save_audio; print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.split() == ["False", "True"], r.stderr
    assert set(omni2sound.__all__) <= set(dir(omni2sound))
    with pytest.raises(AttributeError):
        omni2sound.NoSuchThing


def test_docstrings_document_every_argument():
    from omni2sound import Omni2SoundPipeline
    assert "from_pretrained" in Omni2SoundPipeline.__doc__ and "mux_audio" in Omni2SoundPipeline.__doc__
    doc = Omni2SoundPipeline.generate.__doc__
    import inspect
    for name in inspect.signature(Omni2SoundPipeline.generate).parameters:
        if name != "self":
            assert f"{name}:" in doc, name
    for phrase in ("(video, text)", "None", "Returns", "save_audio", "the video's duration", "heun"):
        assert phrase in doc, phrase


def test_help_texts(capsys):
    with pytest.raises(SystemExit):
        generate_main(["--help"])
    out = capsys.readouterr().out
    assert "--truncate" in out and "max_text_tokens" in out and "--manifest" in out and ".mp4" in out
    from omni2sound.extract import main as extract_main
    with pytest.raises(SystemExit):
        extract_main(["--help"])
    out = capsys.readouterr().out
    import re
    options = set(re.findall(r"--[a-z][a-z-]+", out))
    assert {"--manifest", "--vae", "--out", "--shard-size", "--split", "--text-encoder", "--frame-size",
            "--device"} <= options
    assert "clip_id" in out and "manifest format" in out
    tomllib = pytest.importorskip("tomllib")
    with open("pyproject.toml", "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts["omni2sound-extract"] == "omni2sound.extract:main" and scripts["omni2sound-demo"] == \
        "omni2sound.demo:main"


def test_truncate_long_prompts(tmp_path, capsys):
    model = tiny_model(tmp_path / "m")                 # the tiny preset takes 64 text tokens
    prompt = " ".join(["a dog barks and a door slams"] * 20)
    argv = ["--model", model, "--text", prompt, "--duration", "0.3", "--steps", "1", "--device", "cpu",
            "--out", str(tmp_path / "x.wav")]
    with pytest.raises(SystemExit) as e:
        generate_main(argv)
    assert e.value.code == 2 and "tokens" in capsys.readouterr().err
    assert generate_main(argv + ["--truncate"]) == 0 and (tmp_path / "x.wav").is_file()
    from omni2sound import Omni2SoundPipeline
    from omni2sound.device import default_device
    assert Omni2SoundPipeline.from_pretrained(model).device.type == default_device()    # the CLI's default too


def test_sampling_progress_bar_only_for_long_requests(capsys):
    import time

    import torch

    from omni2sound.flow import integrate
    from omni2sound.pipeline import SamplingOptions, step_progress
    x0 = torch.zeros(1, 4, 2)

    def slow(x, t):
        time.sleep(0.45)
        return torch.ones_like(x)
    opts = SamplingOptions(steps=4)
    with step_progress(slow, opts, True) as fn:                 # ~1.8 s: the bar appears after a second
        x = integrate(fn, x0, 4)
    assert torch.allclose(x, torch.ones_like(x)) and "sampling" in capsys.readouterr().err
    with step_progress(lambda x, t: torch.ones_like(x), opts, True) as fn:      # a short request: no bar
        integrate(fn, x0, 4)
    with step_progress(slow, SamplingOptions(steps=1), False) as fn:        # off (the API's default)
        integrate(fn, x0, 1)
    assert "sampling" not in capsys.readouterr().err


def test_training_names_its_stages_and_the_overall_eta(capsys):
    from omni2sound.schedule import TRAIN_PRESETS, _Overall, _stage_label, schedule, stage_named
    from omni2sound.trainer import DistInfo
    cfg = TRAIN_PRESETS["toy"]
    assert [_stage_label(cfg, s) for s in schedule(cfg)] == ["stage 1 of 4: vae", "stage 2 of 4: stage1",
                                                             "stage 3 of 4: stage2", "stage 4 of 4: stage3"]
    overall = _Overall(cfg, schedule(cfg))
    overall.start(stage_named(cfg, "vae"), DistInfo())
    overall.t0 -= 60                                  # the VAE stage took a minute
    overall.finish(stage_named(cfg, "vae"))
    overall.start(stage_named(cfg, "stage1"), DistInfo())
    out = capsys.readouterr().out
    assert "stage 1 of 4: vae (1500 steps)" in out and "stage 2 of 4: stage1 (300 steps)" in out
    assert "run 1500/3300 steps" in out and "overall ETA 1m12s" in out         # 60 s / 1500 steps x 1800 left
