"""Shared by the benchmarks: timing (median microseconds per call, warm-up kept out of the numbers) and
the markdown table they print.

Timing. CPU: host clock around `inner` calls. GPU: CUDA events around `inner` calls captured in one CUDA graph
(launch gaps removed, as a served model would run them), or eagerly when a variant cannot be captured.
"""
import statistics
import time

import torch

from omni2sound.cuda_graphs import warm_up_on_side_stream
from omni2sound.gpu_info import machine as hardware  # noqa: F401  (the machine a figure was measured on)
from omni2sound.gpu_info import provenance  # noqa: F401  (the benches import it from here)


def time_cpu(fn, repeats, inner, stat=statistics.median):
    """Microseconds per call: ``stat`` (median; ``min`` for best-of on a shared box) over ``repeats`` timings of
    ``inner`` calls each, after two warm-up calls."""
    for _ in range(2):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    return stat(samples) * 1e6


def copy_gbs_cpu(nbytes: int, threads: int, repeats: int = 10) -> float:
    """GB/s of ``dst.copy_(src)`` on ``threads`` intra-op threads, best of ``repeats``, where ``nbytes`` is what the
    copy moves in all (half read, half written): the ceiling of a memory-bound op that moves ``nbytes``, measured in
    the same run. The previous thread count is restored."""
    prev = torch.get_num_threads()
    src = torch.empty(max(1, nbytes // 8), dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    try:
        torch.set_num_threads(threads)
        us = time_cpu(lambda: dst.copy_(src), repeats, max(1, int(2e6 // src.numel())), stat=min)
    finally:
        torch.set_num_threads(prev)
    return 2 * src.numel() * 4 / (us * 1e-6) / 1e9


def time_gpu(fn, repeats, inner, graphs=True):
    """Median us per call; with graphs, `inner` calls are captured in one CUDA graph and replayed."""
    warm_up_on_side_stream(fn, 3)
    torch.cuda.synchronize()
    step = None
    if graphs:
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(inner):
                    fn()
            step = g.replay
        except Exception:  # e.g. an op that syncs with the host: time it eagerly instead
            torch.cuda.synchronize()
            step = None
    graphed = step is not None
    if step is None:
        def step():
            for _ in range(inner):
                fn()
    step()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        b.synchronize()
        samples.append(a.elapsed_time(b) * 1e3 / inner)
    return statistics.median(samples), graphed


def fwd_or_fwd_bwd(fn, make_args, wrt, dy, backward: bool):
    """A zero-argument call for the timers: ``fn(*make_args())``, then, when ``backward``, the gradients of its output
    with respect to ``wrt`` for the upstream gradient ``dy`` (the op benches' "fwd" and "fwd+bwd" modes)."""
    def go():
        y = fn(*make_args())
        if backward:
            torch.autograd.grad(y, wrt, dy)
    return go


_COPY_GBS = {}


def add_copy_pct(row: dict, nbytes: int, device, repeats: int = 10) -> dict:
    """On the CPU, the row's ``fused_gbps`` as a percentage of a one- and a two-thread ``copy_`` moving the same
    ``nbytes`` (``copy_gbs_cpu``, measured once per size in this run): keys ``copy_{1,2}t_gbps``,
    ``pct_copy_{1,2}t``. Rows of other devices are returned unchanged."""
    if str(device) != "cpu":
        return row
    for k in (1, 2):
        if (nbytes, k) not in _COPY_GBS:
            _COPY_GBS[(nbytes, k)] = copy_gbs_cpu(nbytes, k, repeats)
        row[f"copy_{k}t_gbps"] = _COPY_GBS[(nbytes, k)]
        row[f"pct_copy_{k}t"] = 100 * row["fused_gbps"] / _COPY_GBS[(nbytes, k)]
    return row


def interleaved_rounds(measure: dict, rounds: int, warmup: int = 1, alternate: bool = True) -> dict:
    """Call every ``measure[name]()`` (a variant's own measurement, e.g. seconds per step) ``warmup`` times, then
    ``rounds`` rounds that run every variant once each, in reverse order every other round when ``alternate`` (a
    shared box's drift hits every variant alike). Returns {name: [one result per round]}."""
    names = list(measure)
    for name in names:
        for _ in range(warmup):
            measure[name]()
    results = {n: [] for n in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 or not alternate else names[::-1]):
            results[name].append(measure[name]())
    return results


def interleaved_medians(fns: dict, rounds: int, inner: int) -> dict:
    """Median seconds per call of each zero-argument fn: two warm-up calls each, then ``rounds`` rounds that time
    ``inner`` calls of every fn in turn (``interleaved_rounds``, same order every round)."""
    for fn in fns.values():
        fn()
        fn()

    def timed(fn):
        def measure():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            return (time.perf_counter() - t0) / inner
        return measure

    times = interleaved_rounds({k: timed(fn) for k, fn in fns.items()}, rounds, warmup=0, alternate=False)
    return {k: statistics.median(v) for k, v in times.items()}


def op_bench_args(doc: str, quick_help: str, argv=None):
    """The command line every op benchmark shares (--device, --dtype, --quick, --no-compile, --threads, --out),
    parsed: dtype defaults to float32 on the CPU and bfloat16 on a GPU, and --threads is applied."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on the CPU, bfloat16 on a GPU")
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="write the rows as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return args


def write_rows(path, device, rows, **extra) -> None:
    """The rows of a benchmark as JSON at ``path`` (nothing when path is None), with the hardware and torch version."""
    if path:
        import json

        with open(path, "w") as f:
            json.dump({**provenance(device), **extra, "rows": rows}, f, indent=2)


# One line per measurement of a fused op against eager and torch.compile (the qk_norm_rope and bias_gelu benches),
# printed as it is measured: a run cut short by a time limit keeps what it measured.
# On the CPU the last two columns are the fused GB/s as % of a 1- and a 2-thread copy_ of the same bytes (add_copy_pct).
OP_ROW_HEADER = ("| shape | mode | backend | eager us | compile us | fused us | fused GB/s | x eager | x compile "
                 "| % copy_ 1t | % copy_ 2t |\n|---|---|---|---|---|---|---|---|---|---|---|")


def _pct(r, k) -> str:
    return f"{r[k]:.0f}" if k in r else "-"


def print_op_row(r) -> None:
    print(f"| {r['shape']} | {r['mode']} | {r['backend']} | {r['eager_us']:.1f} | {r['compile_us']:.1f} | "
          f"{r['fused_us']:.1f} | {r['fused_gbps']:.1f} | {r['speedup_vs_eager']:.2f} | "
          f"{r['speedup_vs_compile']:.2f} | {_pct(r, 'pct_copy_1t')} | {_pct(r, 'pct_copy_2t')} |", flush=True)


def print_table(rows, cols):
    """Rows (dicts) as a markdown table of the given columns."""
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c)) for c in cols) + " |")
