"""Channel-sparse convolution over the shapes people prune: never slower than dense?

    .venv/bin/python -m benchmarks.bench_channel_grid [--quick] [--plot benchmarks/channel_grid.png]

For each cell (batch, H = W, Cin = Cout) x density of the grid, 3x3 SAME float32 forward:
`tsc.ops.channel_sparse_conv2d` as users call it (its per-shape choice between the sparse
kernel and the dense convolution, measured on the first call and cached) against
`tf.nn.conv2d` on the equivalent dense kernel, inside `tf.function`, timed alternately in this
process. The sparse kernel alone (forced) is shown too, against the ideal 1 / density. Then
the kernel-pruned 75 % CNN (Conv2D 64 -> 128 -> 128, input 16 x 32 x 32 x 64), stripped with
`strip_pruning(to_sparse_layers=True)`, against its dense model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import tensorflow as tf

import tf_sparseconv as tsc
from benchmarks.common import time_pair

GRID = ((1, 56, 64), (16, 32, 128), (8, 64, 128), (32, 16, 256), (4, 28, 512), (64, 8, 128))
DENSITIES = (0.125, 0.25, 0.5)
QUICK_GRID = ((1, 28, 64), (4, 16, 128))


def connection_lists(channels: int, m: int, grouped: bool) -> np.ndarray:
    """Random lists, or (`grouped`) lists shared by groups of `channels * m / channels`
    consecutive output channels, one group per 1 / density, as `channel_group` pruning makes."""
    if not grouped:
        return tsc.ops.random_connections(channels, channels, fan_in=m, seed=channels)
    groups = channels // m
    lists = tsc.ops.random_connections(channels, groups, fan_in=m, seed=channels)
    return np.repeat(lists, channels // groups, axis=0)


def _cell(batch: int, size: int, channels: int, density: float, repeat: int, grouped: bool = False) -> dict:
    m = max(1, round(density * channels))
    x = tf.random.stateless_normal((batch, size, size, channels), [1, size])
    kernel = tf.random.stateless_normal((3, 3, m, channels), [2, m])
    connections = connection_lists(channels, m, grouped)
    dense = tsc.ops.dense_kernel(kernel, connections, channels)

    ours = tf.function(lambda x, k: tsc.ops.channel_sparse_conv2d(x, k, connections))
    stock = tf.function(lambda x, k: tf.nn.conv2d(x, k, 1, "SAME"))

    def forced_sparse(x, k):
        with tsc.ops.channel_sparse_implementation("sparse"):
            return tsc.ops.channel_sparse_conv2d(x, k, connections)

    sparse_only = tf.function(forced_sparse)
    with tsc.ops.explain() as calls:
        np.testing.assert_allclose(ours(x, kernel), stock(x, dense), rtol=1e-3, atol=1e-3)
    chosen = calls[-1].implementation
    ours_ms, stock_ms = time_pair(lambda: ours(x, kernel), lambda: stock(x, dense), repeat=repeat)
    sparse_ms, stock2_ms = time_pair(lambda: sparse_only(x, kernel), lambda: stock(x, dense), repeat=repeat)
    return {
        "batch": batch,
        "size": size,
        "channels": channels,
        "density": density,
        "m": m,
        "grouped": grouped,
        "chosen": "sparse" if chosen == "compiled" else chosen,
        "ours_ms": ours_ms,
        "stock_ms": stock_ms,
        "speedup": stock_ms / ours_ms,
        "sparse_speedup": stock2_ms / sparse_ms,
    }


def pruned_cnn(repeat: int, quick: bool = False, channel_group: int = 1) -> dict:
    """The kernel-pruned 75 % CNN of issue 17, stripped to channel-sparse layers, vs dense
    (`channel_group`: output channels pruned as one group, sharing their inputs)."""
    batch, size = (4, 16) if quick else (16, 32)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((size, size, 64))
    h = keras.layers.Conv2D(128, 3, padding="same", activation="relu", name="conv1")(inputs)
    h = keras.layers.Conv2D(128, 3, padding="same", activation="relu", name="conv2")(h)
    dense_model = keras.Model(inputs, h)
    schedule = tsc.pruning.ConstantSparsity(0.75, begin_step=0, frequency=1)
    pruned = tsc.pruning.prune_low_magnitude(
        dense_model, pruning_schedule=schedule, granularity="kernel", channel_group=channel_group
    )
    pruned.compile(optimizer="sgd", loss="mse")
    x = np.random.default_rng(0).standard_normal((batch, size, size, 64)).astype(np.float32)
    pruned.fit(
        x,
        np.zeros((batch, size, size, 128), np.float32),
        epochs=1,
        verbose=0,
        callbacks=[tsc.pruning.UpdatePruningStep()],
    )
    sparse_model = tsc.pruning.strip_pruning(pruned, to_sparse_layers=True)
    stripped_dense = tsc.pruning.strip_pruning(pruned)
    xt = tf.constant(x)
    ours = tf.function(lambda x: sparse_model(x, training=False))
    stock = tf.function(lambda x: stripped_dense(x, training=False))
    with tsc.ops.explain() as calls:
        np.testing.assert_allclose(ours(xt), stock(xt), rtol=1e-3, atol=1e-3)
    ours_ms, stock_ms = time_pair(lambda: ours(xt), lambda: stock(xt), repeat=repeat)
    return {
        "case": f"Conv2D 64->128->128 3x3, input {batch}x{size}x{size}x64, kernel-pruned 75 %, "
        f"channel_group={channel_group}",
        "layers": ", ".join(
            c.implementation.replace("compiled", "sparse") for c in calls if c.op.startswith("channel")
        ),
        "ours_ms": ours_ms,
        "stock_ms": stock_ms,
        "speedup": stock_ms / ours_ms,
    }


def table(cells: list[dict]) -> str:
    lines = [
        "| batch | H=W | C | density (m) | runs | ours ms | tf.nn.conv2d ms | speed-up "
        "| sparse kernel alone | ideal |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        lines.append(
            f"| {c['batch']} | {c['size']} | {c['channels']} | {c['density']:g} ({c['m']}) | {c['chosen']} | "
            f"{c['ours_ms']:.2f} | {c['stock_ms']:.2f} | {c['speedup']:.2f}x | {c['sparse_speedup']:.2f}x | "
            f"{1 / c['density']:.0f}x |"
        )
    return "\n".join(lines)


def heat_map(results: dict[bool, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(results), figsize=(4.2 * len(results) + 2.5, 5.0), squeeze=False, layout="constrained"
    )
    for index, (ax, (grouped, cells)) in enumerate(zip(axes[0], results.items())):
        shapes = sorted({(c["batch"], c["size"], c["channels"]) for c in cells}, key=lambda s: (s[2], s[0]))
        densities = sorted({c["density"] for c in cells})
        values = np.full((len(shapes), len(densities)), np.nan)
        for c in cells:
            row, col = shapes.index((c["batch"], c["size"], c["channels"])), densities.index(c["density"])
            values[row, col] = c["speedup"]
        image = ax.imshow(np.log2(values), cmap="RdYlGn", vmin=-2, vmax=2, aspect="auto")
        for i in range(len(shapes)):
            for j in range(len(densities)):
                ax.text(j, i, f"{values[i, j]:.2f}×", ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(densities)), [f"{d:g}" for d in densities])
        labels = [f"B={b} {s}×{s} C={c}" for b, s, c in shapes] if index == 0 else []
        ax.set_yticks(range(len(shapes)), labels)
        ax.set_xlabel("density (fan-in / Cin)")
        ax.set_title(f"{'grouped' if grouped else 'random'} connection lists")
    fig.suptitle("channel_sparse_conv2d vs tf.nn.conv2d, 3x3 SAME forward (speed-up)")
    fig.colorbar(image, ax=axes[0].tolist(), label="log2 speed-up")
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small cells (a smoke test)")
    parser.add_argument("--plot", default=None, help="write the heat map PNG here")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    if not tsc.ops.is_library_loaded():
        sys.exit("the op library is not loaded: nothing to benchmark")
    results = {}
    for grouped in (False, True):
        cells = results[grouped] = []
        print(f"\n{'Grouped' if grouped else 'Random'} connection lists", flush=True)
        for batch, size, channels in QUICK_GRID if args.quick else GRID:
            for density in DENSITIES:
                cells.append(_cell(batch, size, channels, density, args.repeat, grouped))
                print(table(cells[-1:]).splitlines()[-1], flush=True)
        print()
        print(table(cells))
        worst = min(cells, key=lambda c: c["speedup"])
        at_quarter = [c["speedup"] for c in cells if c["density"] == 0.25]
        print(
            f"\nworst cell {worst['speedup']:.2f}x (B={worst['batch']} {worst['size']}^2 "
            f"C={worst['channels']} density {worst['density']:g}); median at density 0.25: "
            f"{statistics.median(at_quarter):.2f}x"
        )
    print()
    for group in (1, 32):
        cnn = pruned_cnn(args.repeat, quick=args.quick, channel_group=group)
        print(
            f"| {cnn['case']} | layers: {cnn['layers']} | ours {cnn['ours_ms']:.2f} ms | dense model "
            f"{cnn['stock_ms']:.2f} ms | {cnn['speedup']:.2f}x |",
            flush=True,
        )
    if args.plot:
        heat_map(results, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
