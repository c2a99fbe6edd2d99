"""Benchmark entry point: ratio tables vs stock TensorFlow, plus a PNG plot.

    .venv/bin/python -m benchmarks.run [--only topk] [--quick] [--out benchmarks/out]

Every row times one of our ops and the best stock-TF implementation of the same
computation in this process, on the same inputs (median wall time), and
reports the ratio. Paste the printed table into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf

import tf_sparseconv as tsc
from benchmarks import (
    bench_block_sparse,
    bench_channel_sparse,
    bench_coord_sparse,
    bench_streaming,
    bench_topk,
)
from benchmarks.common import markdown_table

FAMILIES = {
    "block_sparse": bench_block_sparse.run,
    "channel_sparse": bench_channel_sparse.run,
    "coord_sparse": bench_coord_sparse.run,
    "streaming": bench_streaming.run,
    "topk": bench_topk.run,
}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpus = tf.config.list_physical_devices("GPU")
    return f"{cpu}, {os.cpu_count()} cores, {'GPU: ' + str(len(gpus)) if gpus else 'no GPU'}"


def plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.family}\n{r.case.split(', ')[-1]}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4))
    bars = ax.bar(range(len(rows)), [r.speedup for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        if r.target:
            ax.hlines(r.target, i - 0.4, i + 0.4, colors="tab:red", linestyles="--")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.bar_label(bars, fmt="%.1f×")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("speed-up vs stock TF (×)")
    ax.set_title("tf_sparseconv vs stock TensorFlow (red: target)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(FAMILIES), action="append")
    parser.add_argument("--quick", action="store_true", help="smaller shapes (a smoke test)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    args = parser.parse_args()
    if not tsc.ops.is_library_loaded():
        sys.exit("the op library is not loaded: build it first (bash tools/bootstrap.sh)")
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for name in args.only or sorted(FAMILIES):
        rows += FAMILIES[name](quick=args.quick)
    header = (
        f"Command: `python -m benchmarks.run {' '.join(sys.argv[1:])}`".rstrip()
        + f"  \nMachine: {machine()}; TensorFlow {tf.__version__}; "
        + f"date {datetime.date.today().isoformat()}\n"
    )
    table = markdown_table(rows)
    print(header + "\n" + table)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(header + "\n" + table + "\n")
    plot(rows, os.path.join(args.out, "speedups.png"))
    print(f"\nwrote {args.out}/results.md and {args.out}/speedups.png")


if __name__ == "__main__":
    main()
