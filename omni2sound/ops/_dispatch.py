"""The one place that decides which backend runs an op.

Backends, in the order the default picks them:
  cuda      - the CUDA kernels of the native extension (tensor on a GPU, extension built with CUDA)
  triton    - the Triton kernels in ``omni2sound.kernels`` (tensor on a GPU; on the CPU only when
              ``TRITON_INTERPRET=1`` and asked for explicitly)
  cpu       - the C++ kernels of the native extension (tensor on the CPU)
  reference - plain PyTorch, shipped in the package, always available
  onednn    - a library's kernel reached through torch (only ``linear``: oneDNN's GEMM on the CPU)
  scaled_mm - ``torch._scaled_mm``, torch's fp8 GEMM (only ``fp8_linear``: cuBLASLt / CUTLASS on a GPU)
  flash     - the flash-attn package where installed (``attention``, ``cross_attention``; a GPU; not a default)
  cublaslt  - a cuBLASLt GEMM epilogue reached through torch (only ``bias_gelu``, for ``linear_gelu``: bias + GELU in
              the first MLP layer's GEMM; a GPU, no gradient; not a default)

Override order: ``use_backend(...)`` context (innermost wins) > ``OMNI2SOUND_BACKEND`` environment
variable (one backend for every op, or per op: ``OMNI2SOUND_BACKEND=qk_norm_rope=triton,snake=cuda``) >
the per-device default. An override may name one backend for every op
(``use_backend("triton")``) or per op (``use_backend(cross_attention="reference")``). A backend named for every
op applies to the ops that have such a backend (``onednn`` exists only for ``linear``, ``cpu`` not for ``linear``);
the others keep their default. Asking per op for a
backend that cannot run the tensor at hand is an error, never a silent fallback: a test that asks for
``cpu`` must run the C++ kernel or fail.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Callable, Dict, Iterator, Optional

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton", "onednn", "scaled_mm", "flash", "cublaslt")

_local = threading.local()
# op name -> backend name -> availability check(device) -> bool
_REGISTRY: Dict[str, Dict[str, Callable[[torch.device], bool]]] = {}
# op name -> the backend order the default tries on a given device type
_DEFAULT_ORDER: Dict[str, Dict[str, tuple]] = {}

_STANDARD_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


_FAMILY: Dict[str, str] = {}


def register_op(name: str, available: Dict[str, Callable[[torch.device], bool]],
                default_order: Optional[Dict[str, tuple]] = None, family: Optional[str] = None) -> None:
    """Declare an op and, per backend, a check of whether that backend can run on a device.

    ``family`` groups ops that an override may name together (``adaln`` for both AdaLN ops).
    """
    unknown = set(available) - set(BACKENDS)
    if unknown:
        raise ValueError(f"unknown backends {sorted(unknown)} for op {name!r}")
    _REGISTRY[name] = dict(available)
    _DEFAULT_ORDER[name] = dict(default_order or _STANDARD_ORDER)
    _FAMILY[name] = family or name


def registered_ops() -> tuple:
    return tuple(_REGISTRY)


def _stack() -> list:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def overrides_key() -> tuple:
    """The backend overrides in force right now (this thread's ``use_backend`` stack and ``OMNI2SOUND_BACKEND``), as a
    hashable key: what a cache of captured work (a CUDA graph of a sampling step) must be keyed by besides its
    shapes, since the kernels it replays were chosen under them."""
    return (tuple((b, tuple(sorted(per_op.items()))) for b, per_op in _stack()),
            os.environ.get("OMNI2SOUND_BACKEND", "").strip())


@contextlib.contextmanager
def use_backend(backend: Optional[str] = None, **per_op: str) -> Iterator[None]:
    """Force a backend, for every op (``use_backend("cpu")``) or per op (``use_backend(adaln="triton")``).

    Per-op keys are op names (``adaln_modulate``) or op families (``adaln`` matches both AdaLN ops).
    """
    for b in [backend, *per_op.values()]:
        if b is not None and b not in BACKENDS:
            raise ValueError(f"unknown backend {b!r}; choose from {BACKENDS}")
    for key in per_op:
        _check_op_key(key, "use_backend")
    _stack().append((backend, per_op))
    try:
        yield
    finally:
        _stack().pop()


def _forced(op: str) -> Optional[str]:
    for backend, per_op in reversed(_stack()):
        for key, b in per_op.items():
            if key in (op, _FAMILY.get(op)):
                return b
        if backend is not None and backend in _REGISTRY[op]:
            return backend
    everything, per_op = env_overrides()
    if everything is not None:
        return everything if everything in _REGISTRY[op] else None
    for key, b in per_op:
        if key in (op, _FAMILY.get(op)):
            return b
    return None


def _check_op_key(key: str, where: str) -> None:
    # a misspelt op name would otherwise force nothing and leave the default in place without a word
    if key not in _REGISTRY and key not in _FAMILY.values():
        known = sorted(set(_REGISTRY) | set(_FAMILY.values()))
        raise ValueError(f"{where}: {key!r} names no op or op family; known: {known}")


def env_overrides() -> tuple:
    """``OMNI2SOUND_BACKEND`` parsed: (the backend forced for every op or None, ((op or family, backend), ...) in
    the order written, the first that names an op winning). A value naming an unknown backend, op or family raises
    ValueError."""
    return _parse_env(os.environ.get("OMNI2SOUND_BACKEND", "").strip(), len(_REGISTRY))


@functools.lru_cache(maxsize=16)
def _parse_env(env: str, n_ops: int) -> tuple:   # n_ops: an op registered later invalidates the parse
    if not env:
        return None, ()
    if "=" not in env:
        if env not in BACKENDS:
            raise ValueError(f"OMNI2SOUND_BACKEND={env!r} is not one of {BACKENDS}")
        return env, ()
    # per op: "qk_norm_rope=triton,adaln=cuda" (op names or families; ops not named keep their default)
    per_op = []
    for item in env.split(","):
        key, _, b = (part.strip() for part in item.partition("="))
        if b not in BACKENDS:
            raise ValueError(f"OMNI2SOUND_BACKEND: {item.strip()!r} names no backend of {BACKENDS}")
        _check_op_key(key, "OMNI2SOUND_BACKEND")
        per_op.append((key, b))
    return None, tuple(per_op)


def forced_backend(op: str) -> Optional[str]:
    """The backend an override names for ``op`` right now (None: the default picks). An op whose backend cannot take
    a particular call (a gradient, a dtype, a head dim) runs another one only when nothing was forced; a forced one
    raises instead."""
    return _forced(op)


def cannot_take(op: str, backend: str, why: str) -> RuntimeError:
    """The error for a forced backend that cannot take this call."""
    return RuntimeError(f"backend {backend!r} was requested for op {op!r} but cannot take this call: {why}; "
                        f"request another backend (use_backend({op}=...)) or none")


def available_backends(op: str, device: torch.device) -> list:
    checks = _REGISTRY[op]
    return [b for b in BACKENDS if b in checks and checks[b](torch.device(device))]


def select_backend(op: str, device: torch.device) -> str:
    """The backend that will run ``op`` on ``device`` right now."""
    if op not in _REGISTRY:
        raise KeyError(f"op {op!r} is not registered; known: {sorted(_REGISTRY)}")
    device = torch.device(device)
    checks = _REGISTRY[op]
    forced = _forced(op)
    if forced is not None:
        if forced not in checks or not checks[forced](device):
            raise RuntimeError(
                f"backend {forced!r} was requested for op {op!r} but cannot run on {device.type} here "
                f"(available: {available_backends(op, device)})")
        return forced
    for b in _DEFAULT_ORDER[op].get(device.type, ("reference",)):
        if b in checks and checks[b](device):
            return b
    return "reference"


def needs_grad(*tensors) -> bool:
    """Whether autograd will record an op on these tensors (None entries allowed)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def direct_call(*tensors) -> bool:
    """Whether an op may call its backend directly instead of through its custom op (None entries allowed): no
    autograd graph to record and nothing tracing (torch.compile, export, fake or functional tensors see the custom
    op). The custom op's dispatch costs tens of microseconds a call on the CPU, a few percent of a sampling-shape
    AdaLN or q/k norm. Under torch.profiler the custom op runs, so that the op has its row in the profile; under an
    active TorchDispatchMode (a user's, or torch's FakeTensorMode, FunctionalTensorMode, proxy tracing: the length
    of the dispatch mode stack counts them all) too, so that the mode sees the op and not the backend's insides."""
    if torch.compiler.is_compiling() or torch.autograd._profiler_enabled() or torch._C._len_torch_dispatch_stack():
        return False
    grad = torch.is_grad_enabled()
    return all(t is None or (type(t) is torch.Tensor and not (grad and t.requires_grad)) for t in tensors)


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype while an autocast region is active for ``device``'s type, else None."""
    dev = torch.device(device).type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def autocast_inputs(device: torch.device, *tensors):
    """Under autocast, the floating inputs of an omni2sound op cast to the autocast dtype (as torch's own
    lower-precision ops, linear and SDPA, do: a model under autocast hands these ops bf16 activations next to
    fp32 parameters and buffers); outside autocast, the inputs unchanged. Casts are autograd-tracked, so gradients
    reach fp32 parameters in fp32."""
    dt = autocast_dtype(device)
    if dt is None:
        return tensors
    return tuple(t.to(dt) if t is not None and t.is_floating_point() else t for t in tensors)


@functools.lru_cache(maxsize=None)
def _triton_kernels_importable() -> bool:
    """Whether triton and the installed Triton kernels (``omni2sound.kernels``) import in this process."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401

        import omni2sound.kernels  # noqa: F401
    except Exception:
        return False
    return True


def triton_interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``, set before importing
    triton)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@torch.compiler.assume_constant_result          # checked inside compiled steps: a constant to Dynamo, never traced
def triton_available(device_type: str) -> bool:
    """Whether the Triton kernels (``omni2sound.kernels``) can run on ``device_type`` tensors in this process: on a
    GPU compiled, on the CPU only under the interpreter (False when triton or the kernels are missing)."""
    if not _triton_kernels_importable():
        return False
    dev_type = getattr(device_type, "type", str(device_type))
    if dev_type == "cuda":
        return not triton_interpreting()
    return dev_type == "cpu" and triton_interpreting()
