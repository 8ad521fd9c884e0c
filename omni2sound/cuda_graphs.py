"""CUDA-graph utilities shared by the sampling pipeline, the VAE's graphed decode, the training step and the
benchmarks: the warm-up a capture needs, and the GPU time of a graphed function."""
from __future__ import annotations

from typing import Callable

import torch


def warm_up_on_side_stream(fn: Callable[[], object], calls: int) -> None:
    """Run ``fn`` ``calls`` times on a side CUDA stream, ordered after and before the current one: the warm-up
    that CUDA-graph capture needs (lazy inits, Triton compiles, cuBLAS workspaces happen outside the capture)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(calls):
            fn()
    torch.cuda.current_stream().wait_stream(s)


def graphed_time_us(fn: Callable[[], object], calls: int = 4) -> float:
    """GPU time of ``calls`` calls of fn, replayed from one CUDA graph (launch gaps excluded, as in a graphed
    run), best of 3 replays, in microseconds."""
    fn()                                             # lazy init (cuDNN handles, plans) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    best = float("inf")
    for _ in range(3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) * 1e3 / calls)
    return best
