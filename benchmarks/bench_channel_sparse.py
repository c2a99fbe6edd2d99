"""Channel-sparse convolution vs tf.nn.conv2d with the full dense kernel, and vs
Keras Conv2D(groups=g) at equal FLOPs."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

import tf_sparseconv as tsc
from benchmarks.common import Row, forward, time_pair

CIN = COUT = 128


def _sparse_fn(m: int, seed: int = 0):
    connections = tf.constant(tsc.ops.random_connections(CIN, COUT, fan_in=m, seed=seed))

    def conv(x, kernel):
        return tsc.ops.channel_sparse_conv2d(x, kernel, connections, 1, "SAME")

    return conv


def _shared_rows_fn(m: int, group: int, seed: int = 0):
    """Connection lists shared by groups of `group` consecutive output channels, as
    `prune_low_magnitude(..., granularity="kernel", channel_group=group)` makes them."""
    lists = tsc.ops.random_connections(CIN, -(-COUT // group), fan_in=m, seed=seed)
    connections = tf.constant(np.repeat(lists, group, axis=0)[:COUT])

    def conv(x, kernel):
        return tsc.ops.channel_sparse_conv2d(x, kernel, connections, 1, "SAME")

    return conv


def dense_conv(x, kernel):
    return tf.nn.conv2d(x, kernel, 1, "SAME")


def _forward_backward(conv):
    @tf.function(jit_compile=False)
    def run(x, kernel, dy):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            y = conv(x, kernel)
        return y, tape.gradient(y, [x, kernel], output_gradients=dy)

    return run


def _grouped(groups: int, x):
    layer = keras.layers.Conv2D(COUT, 3, padding="same", groups=groups, use_bias=False)
    layer.build(x.shape)

    @tf.function(jit_compile=False)
    def run(x, _kernel):
        return layer(x)

    return run


def run(quick: bool = False) -> list[Row]:
    batch = 2 if quick else 8
    x = tf.random.stateless_normal((batch, 64, 64, CIN), seed=[1, 2])
    dense_kernel = tf.random.stateless_normal((3, 3, CIN, COUT), seed=[3, 4])
    case = f"[{batch}, 64, 64, {CIN}] -> {COUT}, 3x3, SAME, float32"
    rows = []
    targets = {1.0: 1 / 1.5, 0.25: 2.5, 0.125: 4.0}
    for density in (1.0, 0.5, 0.25, 0.125):
        m = max(1, round(density * CIN))
        kernel = tf.random.stateless_normal((3, 3, m, COUT), seed=[5, m])
        ours, stock = forward(_sparse_fn(m)), forward(dense_conv)
        times = time_pair(lambda: ours(x, kernel), lambda: stock(x, dense_kernel))  # noqa: B023
        flops = 2 * batch * 64 * 64 * 9 * m * COUT
        rows.append(
            Row(
                "channel_sparse_conv2d",
                f"{case}, density {density:g} (m={m}), forward",
                *times,
                "tf.nn.conv2d, dense kernel",
                target=targets.get(density),
                note=f"{flops / times[0] / 1e6:.1f} useful GFLOP/s",
            ),
        )
    m = CIN // 4
    kernel = tf.random.stateless_normal((3, 3, m, COUT), seed=[6, 7])
    # Rows sharing their lists (channel_group pruning): computed together by the CPU kernel; also
    # at the shape of the pruning experiment's layers (many small images).
    small = tf.random.stateless_normal((16 if quick else 128, 16, 16, CIN), seed=[1, 3])
    for images, label in (
        (x, case),
        (small, f"[{small.shape[0]}, 16, 16, {CIN}] -> {COUT}, 3x3, SAME, float32"),
    ):
        for group in (1, 4):
            fn = _sparse_fn(m) if group == 1 else _shared_rows_fn(m, group)
            ours, stock = forward(fn), forward(dense_conv)
            times = time_pair(lambda: ours(images, kernel), lambda: stock(images, dense_kernel))  # noqa: B023
            flops = 2 * int(np.prod(images.shape[:3])) * 9 * m * COUT
            rows.append(
                Row(
                    "channel_sparse_conv2d",
                    f"{label}, density 0.25, "
                    + ("rows with own lists" if group == 1 else f"groups of {group} rows share a list")
                    + ", forward",
                    *times,
                    "tf.nn.conv2d, dense kernel",
                    note=f"{flops / times[0] / 1e6:.1f} useful GFLOP/s",
                )
            )
    dy = tf.random.stateless_normal((batch, 64, 64, COUT), seed=[8, 9])
    ours, stock = _forward_backward(_sparse_fn(m)), _forward_backward(dense_conv)
    rows.append(
        Row(
            "channel_sparse_conv2d",
            f"{case}, density 0.25, forward+backward (dx, dkernel)",
            *time_pair(lambda: ours(x, kernel, dy), lambda: stock(x, dense_kernel, dy)),
            "tf.nn.conv2d + its gradients, dense kernel",
            target=2.0,
        )
    )
    for groups in (4, 8):
        m = CIN // groups
        kernel = tf.random.stateless_normal((3, 3, m, COUT), seed=[10, m])
        ours, grouped = forward(_sparse_fn(m)), _grouped(groups, x)
        try:
            times = time_pair(lambda: ours(x, kernel), lambda: grouped(x, kernel))  # noqa: B023
        except Exception as exc:  # noqa: BLE001 - report what stock Keras does
            print(f"Keras Conv2D(groups={groups}) failed on this machine: {type(exc).__name__}: {exc}")
            continue
        rows.append(
            Row(
                "channel_sparse_conv2d",
                f"{case}, density {1 / groups:g}, forward (equal FLOPs)",
                *times,
                f"keras Conv2D(groups={groups})",
            )
        )
    return rows
