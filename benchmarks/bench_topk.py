"""Top-k family: kwinners and topk_attention vs the best stock-TF equivalents."""

from __future__ import annotations

import tensorflow as tf

import tf_sparseconv as tsc
from benchmarks.common import Row, forward, forward_backward, time_pair

K = 16


def ours_kwinners(x):
    return tsc.ops.kwinners(x, K)


def stock_kwinners(x):
    # Threshold at the k-th largest value (ties may keep more than k: cheaper than exact).
    threshold = tf.reduce_min(tf.math.top_k(x, K, sorted=False).values, axis=-1, keepdims=True)
    return tf.where(x >= threshold, x, tf.zeros_like(x))


def ours_topk_attention(x):
    return tsc.ops.topk_attention(x, K)


def stock_topk_attention(x):
    # per="channel", mode="abs": top_k over the positions of each (sample, channel).
    b, c = tf.shape(x)[0], tf.shape(x)[-1]
    scores = tf.transpose(tf.reshape(tf.abs(x), [b, -1, c]), [0, 2, 1])
    threshold = tf.reduce_min(tf.math.top_k(scores, K, sorted=False).values, axis=-1)  # [B, C]
    return tf.where(tf.abs(x) >= threshold[:, None, None, :], x, tf.zeros_like(x))


CASES = [
    ("kwinners (axis=-1)", ours_kwinners, stock_kwinners, "top_k threshold + where"),
    (
        "topk_attention (per=channel, abs)",
        ours_topk_attention,
        stock_topk_attention,
        "transpose + top_k threshold + where",
    ),
]


def copy_floor(x, scale):
    # Reads x and writes a new tensor of its size: the memory traffic any
    # implementation of the forward pass must pay (`scale` is an input so that
    # grappler cannot fold the multiplication away).
    return x * scale


def copy_floor_backward(x, dy, scale):
    return x * scale, dy * scale


def in_network(fn):
    """forward+backward of `fn` applied to a tensor made inside the step (`x * scale`, as a
    previous layer's output): its buffer is free after the op, so TensorFlow may reuse it
    (forwarding) instead of keeping it alive, as in a network; the copy floor gets the same."""

    @tf.function(jit_compile=False)
    def run(x, dy, scale):
        with tf.GradientTape() as tape:
            tape.watch(x)
            h = x * scale
            y = fn(h)
        return tape.gradient(y, x, output_gradients=dy)

    return run


def run(quick: bool = False) -> list[Row]:
    shape = (16, 32, 32, 256) if quick else (64, 32, 32, 256)
    x = tf.random.stateless_normal(shape, seed=[1, 2])
    dy = tf.random.stateless_normal(shape, seed=[3, 4])
    case = f"{list(shape)}, k={K}, float32"
    one = tf.constant(1.0)
    floor_fwd = time_pair(forward(copy_floor), forward(copy_floor), x, one)[0]
    floor_both = time_pair(tf.function(copy_floor_backward), tf.function(copy_floor_backward), x, dy, one)[0]
    rows = []
    for family, ours, stock, stock_name in CASES:
        fwd = time_pair(forward(ours), forward(stock), x)
        rows.append(Row(family, case + ", forward", *fwd, stock_name, floor_ms=floor_fwd))
        both = time_pair(forward_backward(ours), forward_backward(stock), x, dy)
        rows.append(
            Row(family, case + ", forward+backward", *both, stock_name, target=5.0, floor_ms=floor_both)
        )
        net = time_pair(in_network(ours), in_network(stock), x, dy, one)
        floor_net = time_pair(in_network(lambda h: h * one), in_network(lambda h: h * one), x, dy, one)[0]
        rows.append(
            Row(
                family,
                case + ", forward+backward in a network (input made in the step)",
                *net,
                stock_name,
                floor_ms=floor_net,
                note="floor: the same step with a copy in place of the op",
            )
        )
    return rows
