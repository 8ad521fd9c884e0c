"""The card a benchmark or a training run used, read through NVML (``nvidia-ml-py``, imported as ``pynvml``).

``gpu_info()`` -> {"name", "driver", "memory_used_mib", "memory_total_mib", "sm_clock_mhz", "memory_clock_mhz",
"power_w", "power_limit_w", "temperature_c", "index"} for the GPU this process uses, or None without one (no
pynvml, no driver, no GPU: a quiet no-op). A field the card does not report is None. ``gpu_sample()`` is the
part that changes during a run (memory, clocks, power, temperature), flattened with a ``gpu_`` prefix for a log row.
"""
from __future__ import annotations

import os
from typing import Optional

STATIC = ("name", "driver", "memory_total_mib", "power_limit_w", "index")


def _nvml():
    try:
        import pynvml
        pynvml.nvmlInit()
        return pynvml
    except Exception:         # not installed, no driver, no GPU: nothing to record
        return None


def _nvml_index(device_index: int) -> int:
    """NVML counts every GPU of the machine; CUDA only the visible ones, in CUDA_VISIBLE_DEVICES order."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:
        ids = [v.strip() for v in visible.split(",")]
        if device_index < len(ids) and ids[device_index].isdigit():
            return int(ids[device_index])
    return device_index


def _call(fn, *args):
    try:
        return fn(*args)
    except Exception:         # NVMLError_NotSupported and friends: the card does not report this field
        return None


def _text(v):
    return v.decode() if isinstance(v, bytes) else v


def gpu_info(device_index: Optional[int] = None) -> Optional[dict]:
    """What NVML says about the GPU with CUDA index ``device_index`` (default: the current CUDA device, else 0)."""
    nv = _nvml()
    if nv is None:
        return None
    if device_index is None:
        device_index = 0
        try:
            import torch
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                device_index = torch.cuda.current_device()
        except Exception:
            pass
    index = _nvml_index(device_index)
    handle = _call(nv.nvmlDeviceGetHandleByIndex, index)
    if handle is None:
        return None
    mem = _call(nv.nvmlDeviceGetMemoryInfo, handle)
    power = _call(nv.nvmlDeviceGetPowerUsage, handle)                 # mW
    limit = _call(nv.nvmlDeviceGetEnforcedPowerLimit, handle)         # mW
    mib = lambda b: None if b is None else round(b / 2**20, 1)
    return {
        "index": index,
        "name": _text(_call(nv.nvmlDeviceGetName, handle)),
        "driver": _text(_call(nv.nvmlSystemGetDriverVersion)),
        "memory_used_mib": mib(getattr(mem, "used", None)),
        "memory_total_mib": mib(getattr(mem, "total", None)),
        "sm_clock_mhz": _call(nv.nvmlDeviceGetClockInfo, handle, nv.NVML_CLOCK_SM),
        "memory_clock_mhz": _call(nv.nvmlDeviceGetClockInfo, handle, nv.NVML_CLOCK_MEM),
        "power_w": None if power is None else round(power / 1000, 1),
        "power_limit_w": None if limit is None else round(limit / 1000, 1),
        "temperature_c": _call(nv.nvmlDeviceGetTemperature, handle, nv.NVML_TEMPERATURE_GPU),
    }


def gpu_sample(device_index: Optional[int] = None) -> dict:
    """The fields of ``gpu_info`` that change during a run, as {"gpu_memory_used_mib": ..., ...}; {} without a GPU."""
    info = gpu_info(device_index)
    if info is None:
        return {}
    return {f"gpu_{k}": v for k, v in info.items() if k not in STATIC and v is not None}


def describe(info: Optional[dict]) -> str:
    """One line for a benchmark's header: the card, driver, clocks, power and memory; "no GPU" without one."""
    if not info:
        return "no GPU (NVML unavailable)"
    i = info
    return (f"{i['name']} (driver {i['driver']}): SM {i['sm_clock_mhz']} MHz, memory {i['memory_clock_mhz']} MHz, "
            f"{i['power_w']} / {i['power_limit_w']} W, {i['temperature_c']} C, memory {i['memory_used_mib']} / "
            f"{i['memory_total_mib']} MiB")


def machine(device=None) -> str:
    """The machine a figure was measured on: the GPU's name for a CUDA device (default: CUDA when there is one), else
    the CPU and torch's intra-op threads."""
    import platform

    import torch
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def provenance(device=None) -> dict:
    """What a measurement needs beside its numbers: the UTC date and time, the command, the commit of the code (when
    run in a git checkout), Python / torch / triton / CUDA versions, the machine (the GPU's name, else the CPU and
    its intra-op threads) and, on a GPU, ``gpu_info()`` (card, driver, clocks, power, memory). Benchmarks write
    it at the top of their JSON."""
    import platform
    import subprocess
    import sys
    import time

    import torch
    try:
        import triton
        triton_version = triton.__version__
    except Exception:         # no triton in this environment
        triton_version = None
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, timeout=5, cwd=here).stdout.strip()
        commit = git("rev-parse", "--short", "HEAD") or None
        if commit and git("status", "--porcelain", "--untracked-files=no"):
            commit += "+changes"                    # the measured code is the commit plus uncommitted edits
    except Exception:         # no git, or not a checkout (an installed wheel)
        commit = None
    gpu = str(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
            "commit": commit, "python": platform.python_version(), "torch": torch.__version__,
            "triton": triton_version, "cuda": torch.version.cuda, "hardware": machine(device),
            "gpu": gpu_info() if gpu else None}
