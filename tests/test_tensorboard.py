"""Training logs people use: TensorBoard event files beside log.jsonl (losses per task and per time bin, lr, grad
norm, speed, MFU, GPU fields, the report's audio and spectrograms), off with tensorboard=False, a warning without
the package; the card through NVML (a fake pynvml here: the same calls the real one answers on a GPU)."""
import json
import sys
import types
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_train import _trainer, synthetic_table

from omni2sound import gpu_info as gi
from omni2sound.tblog import TensorBoardLog, report_to_tensorboard

pytest.importorskip("tensorboard")


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "audio": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_training_writes_event_files_beside_the_jsonl(tmp_path):
    t = _trainer(str(tmp_path / "s"), synthetic_table(8), 4)
    t.fit()
    tags = set(_events(tmp_path / "s" / "tb").Tags()["scalars"])
    rows = [json.loads(line) for line in open(tmp_path / "s" / "log.jsonl")]
    tasks = {r["task"] for r in rows}
    assert {"loss/all", "optim/lr", "optim/grad_norm", "speed/tokens_per_s", "speed/samples_per_s"} <= tags
    assert {f"loss/{k}" for k in tasks} <= tags
    assert any(tag.startswith("loss_by_time/bin") for tag in tags)
    assert any(k.startswith("loss_bin") for k in rows[0])            # the time bins reach the JSON lines too
    acc = _events(tmp_path / "s" / "tb")
    assert [e.value for e in acc.Scalars("loss/all")] == pytest.approx([r["loss"] for r in rows], rel=1e-6)


def test_resumed_run_shows_each_step_once(tmp_path):
    """Killed after step 3 with the last checkpoint at step 2: step 3 is logged again after the resume, and the
    event files must show it once, with the resumed run's value, as log.jsonl does."""
    out = str(tmp_path / "r")
    part = _trainer(out, synthetic_table(8), 5)
    part.loop = replace(part.loop, ckpt_every=2)
    part.fit(stop_after=3)
    assert len(_events(tmp_path / "r" / "tb").Scalars("loss/all")) == 3
    again = _trainer(out, synthetic_table(8), 5)
    again.loop = replace(again.loop, ckpt_every=2)
    again.fit(resume=True)
    rows = [json.loads(line) for line in open(tmp_path / "r" / "log.jsonl")]
    events = _events(tmp_path / "r" / "tb").Scalars("loss/all")
    assert [e.step for e in events] == [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [e.value for e in events] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    fresh = _trainer(out, synthetic_table(8), 2)             # a fresh run in the same folder starts new curves
    fresh.fit()
    assert [e.step for e in _events(tmp_path / "r" / "tb").Scalars("loss/all")] == [1, 2]


def test_off_switch_and_missing_package(tmp_path, monkeypatch):
    t = _trainer(str(tmp_path / "off"), synthetic_table(8), 2)
    t.loop = replace(t.loop, tensorboard=False)
    t.fit()
    assert not (tmp_path / "off" / "tb").exists() and (tmp_path / "off" / "log.jsonl").is_file()
    import omni2sound.tblog as tblog
    monkeypatch.setattr(tblog, "_warned", False)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)       # as if tensorboard were not installed
    with pytest.warns(RuntimeWarning, match="TensorBoard logging is off"):
        t2 = _trainer(str(tmp_path / "none"), synthetic_table(8), 2)
        t2.fit()
    assert not (tmp_path / "none" / "tb").exists() and len(open(tmp_path / "none" / "log.jsonl").readlines()) == 2


def test_scalar_groups_and_report_media(tmp_path):
    tb = TensorBoardLog(str(tmp_path))
    tb.scalars({"step": 3, "loss": 0.5, "task": "vt2a", "loss_bin2": 0.7, "loss_bin3": float("nan"), "mfu": 0.4,
                "gpu_power_w": 300.0, "gpu": {"name": "x"}, "lr": 1e-3}, 3)
    tb.close()
    tags = set(_events(tmp_path / "tb").Tags()["scalars"])
    assert tags == {"loss/all", "loss/vt2a", "loss_by_time/bin2", "speed/mfu", "gpu/power_w", "optim/lr"}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    png = str(tmp_path / "s.png")
    plt.imsave(png, np.random.rand(20, 30, 3))
    report_to_tensorboard(str(tmp_path / "rep"), [("v2a_0", torch.rand(1600) - 0.5, png, "a dog barks")], 16000)
    got = _events(tmp_path / "rep" / "tb").Tags()
    assert "report/v2a_0" in got["audio"] and "report/v2a_0_spectrogram" in got["images"]


class FakeNVML(types.SimpleNamespace):
    """The pynvml calls gpu_info makes, answering like an H100 (one field unsupported, as on some cards)."""
    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 2, 0

    def __init__(self):
        super().__init__(handles=[])

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, i):
        self.handles.append(i)
        return ("h", i)

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlSystemGetDriverVersion(self):
        return "570.86.15"

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(used=3 * 2**30, total=80 * 2**30)

    def nvmlDeviceGetClockInfo(self, h, kind):
        return {1: 1980, 2: 2619}[kind]

    def nvmlDeviceGetPowerUsage(self, h):
        return 312_500

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return 700_000

    def nvmlDeviceGetTemperature(self, h, kind):
        raise RuntimeError("NVMLError_NotSupported")


def test_gpu_info_through_nvml(monkeypatch):
    fake = FakeNVML()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    info = gi.gpu_info(1)
    assert fake.handles == [5]                                # CUDA device 1 is the machine's GPU 5
    assert info == {"index": 5, "name": "NVIDIA H100 80GB HBM3", "driver": "570.86.15", "memory_used_mib": 3072.0,
                    "memory_total_mib": 81920.0, "sm_clock_mhz": 1980, "memory_clock_mhz": 2619, "power_w": 312.5,
                    "power_limit_w": 700.0, "temperature_c": None}
    assert gi.gpu_sample(0) == {"gpu_memory_used_mib": 3072.0, "gpu_sm_clock_mhz": 1980, "gpu_memory_clock_mhz": 2619,
                                "gpu_power_w": 312.5}
    assert "H100" in gi.describe(info) and "1980 MHz" in gi.describe(info)


def test_gpu_info_without_a_gpu_is_a_quiet_no_op(monkeypatch):
    def no_library():
        raise RuntimeError("NVML Shared Library Not Found")
    broken = types.SimpleNamespace(nvmlInit=no_library)
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    assert gi.gpu_info() is None and gi.gpu_sample() == {} and gi.describe(None).startswith("no GPU")
    monkeypatch.setitem(sys.modules, "pynvml", None)                        # not installed
    assert gi.gpu_info() is None


def test_provenance_names_what_a_figure_needs(monkeypatch):
    monkeypatch.setattr(gi, "_nvml", lambda: FakeNVML())
    rec = gi.provenance("cpu")
    assert {"date", "command", "commit", "python", "torch", "triton", "cuda", "hardware", "gpu"} <= set(rec)
    assert rec["torch"] == torch.__version__ and rec["gpu"] is None          # no card named for a CPU figure
    assert rec["date"].endswith("UTC") and rec["hardware"]
    json.dumps(rec)                                                          # goes into the benches' JSON as is
