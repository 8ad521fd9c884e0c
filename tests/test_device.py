"""--device / from_pretrained(device=...): a GPU that is not there, or a malformed name, is a clear error up front."""
import pytest
import torch

from omni2sound.device import resolve_device

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without a CUDA GPU")


def test_resolve_device_accepts_the_cpu_and_refuses_a_malformed_name():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="not a device name"):
        resolve_device("gpu")


@no_gpu
@pytest.mark.parametrize("name", ["cuda", "cuda:1"], ids=["no-index", "index"])   # an id "cuda" reads as the mark
def test_resolve_device_says_why_a_cuda_device_cannot_be_used(name):
    with pytest.raises(ValueError, match=r"built without CUDA|no CUDA GPU is visible") as e:
        resolve_device(name)
    assert name in str(e.value) and "use cpu" in str(e.value)


@no_gpu
@pytest.mark.parametrize("cli,argv", [
    ("omni2sound.generate", ["--model", "m", "--text", "a bell", "--out", "o.wav", "--device", "cuda"]),
    ("omni2sound.train", ["--preset", "smoke", "--device", "cuda"]),
    ("omni2sound.train", ["--preset", "smoke", "--set", "device=cuda:0"]),
    ("omni2sound.extract", ["--manifest", "m", "--vae", "v", "--out", "o", "--device", "cuda"]),
])
def test_clis_refuse_a_missing_gpu_as_an_argument_error(cli, argv, capsys):
    import importlib
    main = importlib.import_module(cli).main
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "device" in err and ("built without CUDA" in err or "no CUDA GPU is visible" in err), err


@no_gpu
def test_pipeline_from_pretrained_refuses_a_missing_gpu(tmp_path):
    from omni2sound.pipeline import Omni2SoundPipeline
    (tmp_path / "dit").mkdir()
    (tmp_path / "vae").mkdir()
    with pytest.raises(ValueError, match="use cpu"):
        Omni2SoundPipeline.from_pretrained(str(tmp_path), device="cuda")
