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
