"""pytest-benchmark: the card (through NVML) in the JSON of every run, when there is one."""
try:
    import pytest_benchmark  # noqa: F401
except ImportError:          # without the plugin its hook would be unknown to pytest
    pass
else:
    def pytest_benchmark_update_json(config, benchmarks, output_json):
        from omni2sound.gpu_info import gpu_info
        output_json["gpu"] = gpu_info()
