"""Triton kernels of omni2sound, installed as ``omni2sound.kernels``.

On a GPU they run compiled; on the CPU only under ``TRITON_INTERPRET=1`` (set before importing), which
the tests use. ``available(device)`` tells the dispatcher whether this process can run them there.

Run from the repository root (``python -m pytest``, ``python -m omni2sound.train``), Python puts the root on sys.path
ahead of site-packages, so this folder is also importable as a top-level package named ``kernels``, which would
shadow PyPI's ``kernels``: transformers 5.x depends on it and imports it when loading a model (the MiniLM text
encoder failed with "cannot import name 'CUDAProperties' from 'kernels'"). Imported under that name, this file hands
the name over to the PyPI package (Python's import returns whatever sys.modules holds once the module has run).
"""
import functools
import os
import sys


def _hand_over_top_level_name() -> None:
    import importlib.machinery
    import importlib.util

    here = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    others = [p for p in sys.path if os.path.realpath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("kernels", others)
    if spec is None or spec.loader is None:
        raise ImportError("no module named 'kernels' (the repository's kernels/ folder is omni2sound.kernels)",
                          name="kernels")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    spec.loader.exec_module(module)


if __name__ == "kernels":
    _hand_over_top_level_name()


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(device) -> bool:
    """True when Triton kernels can run on tensors of ``device`` in this process."""
    if not _triton_importable():
        return False
    dev_type = getattr(device, "type", str(device))
    if dev_type == "cuda":
        return not interpreting()
    return dev_type == "cpu" and interpreting()
