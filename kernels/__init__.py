"""Triton kernels of omni2sound, installed as ``omni2sound.kernels``.

On a GPU they run compiled; on the CPU only under ``TRITON_INTERPRET=1`` (set before importing), which
the tests use. ``available(device)`` tells the dispatcher whether this process can run them there.
"""
import functools
import os


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
