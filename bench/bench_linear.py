"""The DiT's projection GEMMs on the CPU: aten (MKL sgemm) against oneDNN (``ops.linear``'s two backends), fp32, no
grad, as the sampling loop runs them, at 1 thread and at the machine's thread count, in the same run.

    python bench/bench_linear.py [--quick] [--threads-list 1,2] [--out f.json]
    python bench/bench_linear.py --sweep          # where oneDNN starts to win: ops.linear.ONEDNN_MIN_MACS

Shapes, 10 s of audio (250 latent frames) at the CFG sampling batch (2 x 250 rows; ``--batch 8``: 16 x 250):
per preset (S: D = 768, L: D = 1536) the four projections of a block, qkv D -> 3D, attention out D -> D,
MLP fc1 D -> 4D, MLP fc2 4D -> D, and the cross-attention's q (its output projection has the same shape), which runs
on the conditioned rows only (batch x 250).

Each row: median us per call of each backend, timed interleaved (round r runs aten, onednn, onednn with the weight
pre-packed for this M, one call each, so a shared box's drift hits all alike), GFLOP/s, aten / onednn, and each
backend's largest error against an fp64 GEMM relative to the output's largest magnitude. The model sends every
projection through ``ops.linear``, which picks oneDNN for GEMMs of at least 2^27 multiply-adds (``--sweep``): this
table and the sweep are why. The sampling loop runs oneDNN on pre-packed weights (``ops.packed_weights``).
"""
from __future__ import annotations

import argparse
import importlib

import torch
import torch.nn.functional as F
from _timing import hardware, interleaved_medians, print_table, write_rows  # bench/ is the script's folder, on sys.path

from omni2sound import ops

ONEDNN_MIN_MACS = importlib.import_module("omni2sound.ops.linear").ONEDNN_MIN_MACS

PRESET_DIMS = {"S": 768, "L": 1536}


def sweep(args):
    """aten / oneDNN over a grid of small-to-large GEMMs: the size below which oneDNN loses."""
    onednn = torch.ops.mkldnn._linear_pointwise
    rows = []
    torch.manual_seed(0)
    with torch.no_grad():
        for M in (26, 250, 500):
            for D in (64, 128, 256, 384, 512, 768, 1024):
                for mult in (1, 3, 4):
                    K, N = D, mult * D
                    x, w, b = torch.randn(M, K), torch.randn(N, K) / K ** 0.5, torch.randn(N)
                    inner = max(1, int(3e8 / (2 * M * K * N)))
                    t = interleaved_medians({"aten": lambda: F.linear(x, w, b),
                                     "onednn": lambda: onednn(x, w, b, "none", [], "")}, args.rounds, inner)
                    rows.append({"M,K,N": f"{M},{K},{N}", "MACs": f"{M * K * N:.2e}",
                                 "aten us": round(t["aten"] * 1e6, 1), "onednn us": round(t["onednn"] * 1e6, 1),
                                 "aten / onednn": round(t["aten"] / t["onednn"], 3),
                                 "ops.linear picks": "onednn" if M * K * N >= ONEDNN_MIN_MACS
                                 else "aten"})
                    print(rows[-1], flush=True)
    print(f"\nlinear sweep, fp32, no grad, on {hardware('cpu')}, torch {torch.__version__}\n")
    print_table(rows, list(rows[0]))
    write_rows(args.out, "cpu", rows)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="S only, 3 rounds")
    ap.add_argument("--presets", default="S,L")
    ap.add_argument("--batch", type=int, default=1, help="requests per call (rows = batch x 2 CFG branches x 250)")
    ap.add_argument("--threads-list", default=None, help="comma-separated thread counts (default: 1 and the current)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--sweep", action="store_true",
                    help="M in (26, 250, 500) x D in (64 .. 1024) x N in (D, 3D, 4D), current threads, with bias")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.sweep:
        return sweep(args)
    if "onednn" not in ops.available_backends("linear", torch.device("cpu")):
        raise SystemExit("oneDNN's linear is not available in this torch build")
    presets = ["S"] if args.quick else args.presets.split(",")
    rounds = 3 if args.quick else args.rounds
    full = torch.get_num_threads()
    threads = [int(t) for t in args.threads_list.split(",")] if args.threads_list else sorted({1, full})
    M = args.batch * 2 * 250
    pack = torch.ops.mkldnn._reorder_linear_weight
    onednn = torch.ops.mkldnn._linear_pointwise
    rows = []
    torch.manual_seed(0)
    with torch.no_grad():
        for preset in presets:
            D = PRESET_DIMS[preset]
            for name, K, N, m in (("qkv", D, 3 * D, M), ("attn out", D, D, M), ("mlp fc1", D, 4 * D, M),
                                  ("mlp fc2", 4 * D, D, M), ("cross q", D, D, M // 2)):
                x = torch.randn(m, K)
                w = torch.randn(N, K) / K ** 0.5
                b = torch.randn(N) * 0.1
                packed = pack(w, m)
                ref = F.linear(x.double(), w.double(), b.double())
                scale = ref.abs().max().item()
                fns = {"aten": lambda: F.linear(x, w, b),
                       "onednn": lambda: onednn(x, w, b, "none", [], ""),
                       "onednn packed": lambda: onednn(x, packed, b, "none", [], "")}
                err = {k: (fn().double() - ref).abs().max().item() / scale for k, fn in fns.items()}
                flop = 2 * m * K * N
                for n_threads in threads:
                    torch.set_num_threads(n_threads)
                    inner = max(1, int(2e9 / flop))
                    t = interleaved_medians(fns, rounds, inner)
                    row = {"preset": preset, "gemm": name, "M,K,N": f"{m},{K},{N}", "threads": n_threads}
                    for k in fns:
                        row[f"{k} us"] = round(t[k] * 1e6, 1)
                        row[f"{k} GFLOP/s"] = round(flop / t[k] / 1e9, 1)
                    row["aten / onednn"] = round(t["aten"] / t["onednn"], 3)
                    row["aten / onednn packed"] = round(t["aten"] / t["onednn packed"], 3)
                    row["aten rel err"] = f"{err['aten']:.1e}"
                    row["onednn rel err"] = f"{err['onednn']:.1e}"
                    rows.append(row)
                    print(row, flush=True)
                torch.set_num_threads(full)
    print(f"\nlinear, fp32, no grad, on {hardware('cpu')}, torch {torch.__version__}\n")
    print_table(rows, ["preset", "gemm", "M,K,N", "threads", "aten us", "onednn us", "onednn packed us",
                       "onednn GFLOP/s", "aten / onednn", "aten / onednn packed", "aten rel err", "onednn rel err"])
    write_rows(args.out, "cpu", rows)
    return rows


if __name__ == "__main__":
    main()
