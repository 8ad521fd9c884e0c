"""Test helpers that watch what the code under test calls: one function's calls (``count_calls``) and every op a
region dispatches (``OpLog``)."""
from collections import Counter
from typing import Any, Callable, List

from torch.utils._python_dispatch import TorchDispatchMode


def count_calls(monkeypatch, owner: Any, name: str, record: Callable[..., Any] = lambda *a, **k: None) -> List[Any]:
    """Replace ``owner.name`` (a module's or a class's attribute) for the test with a wrapper that appends
    ``record(*args, **kwargs)`` to the returned list and then calls the original: ``len(calls)`` counts the calls,
    the entries say what each was called with."""
    calls: List[Any] = []
    real = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(record(*args, **kwargs))
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, counted)
    return calls


class OpLog(TorchDispatchMode):
    """``with OpLog() as log:`` -> ``log.ops``: how often each op was dispatched inside, by name as torch prints it
    (``"aten.mm.default"``, ``"omni2sound.adamw_step_.default"``), the profiler's record-function ops left out."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if not name.startswith("profiler."):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))
