"""Bad inputs, per family: each gets a `ValueError` (found in Python) or an
`InvalidArgumentError` (found by a kernel or a graph assertion) whose message names the
argument, never a crash. `python tests/test_bad_inputs.py` prints the table that
benchmarks/RESULTS.md holds (input tried -> error)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import tf_sparseconv as tsc

F = np.float32
RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 8, 8, 8)).astype(F)
SEQ = RNG.standard_normal((2, 5, 4)).astype(F)
CONN = np.tile(np.arange(2, dtype=np.int32), (4, 1))  # [Cout 4, fan-in 2]
KERNEL = RNG.standard_normal((3, 3, 2, 4)).astype(F)
COORDS = np.array([[0, 1, 1], [0, 2, 3], [1, 0, 0]], np.int32)
FEATURES = RNG.standard_normal((3, 2)).astype(F)
K2D = RNG.standard_normal((3, 3, 2, 5)).astype(F)
MASK = (RNG.random((2, 8, 8)) > 0.5).astype(F)


def _variable(value):
    """A non-constant tensor: validation happens in the kernel, not in Python."""
    return tf.Variable(value)


# (family, what is wrong, call, the word the message must contain)
CASES = [
    ("top-k", "k = 0", lambda: tsc.ops.kwinners(X, 0), "k"),
    ("top-k", "k a float", lambda: tsc.ops.kwinners(X, 2.5), "k"),
    ("top-k", "integer x", lambda: tsc.ops.kwinners(X.astype(np.int32), 2), "x"),
    ("top-k", "axis out of range", lambda: tsc.ops.kwinners(X, 2, axis=7), "axis"),
    ("top-k", "mode unknown", lambda: tsc.ops.topk_attention(X, 3, mode="soft"), "mode"),
    ("top-k", "per unknown", lambda: tsc.ops.topk_attention(X, 3, per="pixel"), "per"),
    ("top-k", "x of rank 2", lambda: tsc.ops.topk_attention(X[:, 0, 0], 3), "x"),
    ("top-k", "k = 0 as a tensor", lambda: tsc.ops.kwinners(X, _variable(0)), "k"),
    (
        "channel-sparse",
        "connection index >= Cin (constant)",
        lambda: tsc.ops.channel_sparse_conv2d(X, KERNEL, CONN + 7),
        "connections",
    ),
    (
        "channel-sparse",
        "connection index >= Cin (variable)",
        lambda: tsc.ops.channel_sparse_conv2d(X, KERNEL, _variable(CONN + 7)),
        "connections",
    ),
    (
        "channel-sparse",
        "repeated input channel in a row",
        lambda: tsc.ops.channel_sparse_conv2d(X, KERNEL, np.zeros_like(CONN)),
        "connections",
    ),
    (
        "channel-sparse",
        "kernel fan-in != connections",
        lambda: tsc.ops.channel_sparse_conv2d(X, KERNEL[:, :, :1], CONN),
        "kernel",
    ),
    ("channel-sparse", "strides 0", lambda: tsc.ops.channel_sparse_conv2d(X, KERNEL, CONN, 0), "strides"),
    (
        "channel-sparse",
        "padding unknown",
        lambda: tsc.ops.channel_sparse_conv2d(X, KERNEL, CONN, padding="FULL"),
        "padding",
    ),
    (
        "channel-sparse",
        "x of rank 3 (2-D op)",
        lambda: tsc.ops.channel_sparse_conv2d(X[0], KERNEL, CONN),
        "x",
    ),
    ("block-sparse", "block_size 0", lambda: tsc.ops.reduce_mask(MASK, 0, 4), "block_size"),
    (
        "block-sparse",
        "mask of another height",
        lambda: tsc.ops.block_sparse_conv2d(X, KERNEL[:, :, :1].repeat(8, 2), MASK[:, :4], 4),
        "mask",
    ),
    (
        "block-sparse",
        "block_size not a multiple of strides",
        lambda: tsc.ops.block_sparse_conv2d(X, KERNEL[:, :, :1].repeat(8, 2), MASK, 3, strides=2),
        "block_size",
    ),
    (
        "block-sparse",
        "block index outside the image (variable)",
        lambda: tsc.ops.sparse_gather(X, _variable(np.array([[0, 9, 0]], np.int32)), 4, 4),
        "indices",
    ),
    (
        "block-sparse",
        "batch index outside the batch",
        lambda: tsc.ops.sparse_gather(X, np.array([[5, 0, 0]], np.int32), 4, 4),
        "indices",
    ),
    (
        "coordinate",
        "spatial_shape of the wrong length",
        lambda: tsc.ops.sparse_conv(FEATURES, COORDS, K2D, (8, 8, 8)),
        "spatial_shape",
    ),
    (
        "coordinate",
        "negative spatial index",
        lambda: tsc.ops.sparse_conv(FEATURES, COORDS - 1, K2D, (8, 8)),
        "coords",
    ),
    (
        "coordinate",
        "spatial index outside spatial_shape",
        lambda: tsc.ops.sparse_conv(FEATURES, COORDS + 10, K2D, (8, 8)),
        "coords",
    ),
    (
        "coordinate",
        "duplicate sites",
        lambda: tsc.ops.sparse_conv(FEATURES, COORDS[[0, 0, 1]], K2D, (8, 8)),
        "coords",
    ),
    (
        "coordinate",
        "features / coords row counts differ",
        lambda: tsc.ops.topk_sites(FEATURES[:2], COORDS, 1),
        "features",
    ),
    (
        "coordinate",
        "kernel Cin != features C",
        lambda: tsc.ops.sparse_conv(FEATURES, COORDS, K2D[:, :, :1], (8, 8)),
        "kernel",
    ),
    (
        "coordinate",
        "float coords",
        lambda: tsc.ops.sparse_conv(FEATURES, COORDS.astype(F), K2D, (8, 8)),
        "coords",
    ),
    (
        "coordinate",
        "strided submanifold convolution",
        lambda: tsc.ops.sparse_conv(FEATURES, COORDS, K2D, (8, 8), strides=2),
        "strides",
    ),
    (
        "streaming",
        "history of the wrong length",
        lambda: tsc.ops.streaming_conv_step(SEQ[:, :1], SEQ, RNG.standard_normal((3, 4, 2)).astype(F)),
        "history",
    ),
    (
        "streaming",
        "frames with other channels than the kernel",
        lambda: tsc.ops.streaming_conv_step(SEQ[:, :2], SEQ, RNG.standard_normal((3, 6, 2)).astype(F)),
        "frames",
    ),
    (
        "streaming",
        "activation not fusable",
        lambda: tsc.ops.streaming_conv_step(
            SEQ[:, :2], SEQ, RNG.standard_normal((3, 4, 2)).astype(F), activation="gelu"
        ),
        "activation",
    ),
    (
        "streaming",
        "Conv1D(padding='same') in to_streaming",
        lambda: tsc.streaming.to_streaming(_same_conv_model()),
        "padding",
    ),
]


def _same_conv_model():
    import keras

    inputs = keras.Input((None, 3))
    return keras.Model(inputs, keras.layers.Conv1D(2, 3, padding="same")(inputs))


def _outcome(call):
    try:
        call()
    except (ValueError, tf.errors.InvalidArgumentError) as exc:
        message = " ".join((getattr(exc, "message", None) or str(exc)).split())
        if message.startswith("{{function_node"):  # TensorFlow's prefix naming the op's node
            message = message.split("}} ", 1)[-1]
        return type(exc).__name__, message
    return None, ""


# Index values that only the CPU kernels check: on the GPU they stay in device memory and a bad
# one is skipped instead (README, "Validation on GPU"), so there these calls succeed:
# test_gpu_skips_bad_block_indices.
CPU_CHECKED = {"block index outside the image (variable)", "batch index outside the batch"}
GPU_VISIBLE = bool(tf.config.list_physical_devices("GPU"))


@pytest.mark.parametrize(("family", "wrong", "call", "word"), CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_bad_input_gets_a_clear_error(family, wrong, call, word):
    with tf.device("/CPU:0"):
        kind, message = _outcome(call)
    assert kind is not None, f"{family}: {wrong}: no error"
    assert word in message, f"{family}: {wrong}: {kind} without {word!r}: {message[:300]}"


GPU_CASES = [c for c in CASES if c[1] not in CPU_CHECKED]


@pytest.mark.skipif(not GPU_VISIBLE, reason="TensorFlow sees no GPU")
@pytest.mark.parametrize(
    ("family", "wrong", "call", "word"), GPU_CASES, ids=[f"{c[0]}: {c[1]}" for c in GPU_CASES]
)
def test_bad_input_gets_a_clear_error_on_gpu(family, wrong, call, word):
    with tf.device("/GPU:0"):
        kind, message = _outcome(call)
    assert kind is not None, f"{family}: {wrong}: no error on the GPU"
    assert word in message, f"{family}: {wrong}: {kind} without {word!r} on the GPU: {message[:300]}"


@pytest.mark.skipif(not GPU_VISIBLE, reason="TensorFlow sees no GPU")
@pytest.mark.parametrize("wrong", sorted(CPU_CHECKED))
def test_gpu_skips_bad_block_indices(wrong):
    """The CPU_CHECKED cases on the GPU: the out-of-range block reads as zeros."""
    call = next(c[2] for c in CASES if c[1] == wrong)
    with tf.device("/GPU:0"):
        blocks = call()
    assert blocks.device.endswith("GPU:0")
    np.testing.assert_array_equal(blocks, np.zeros((1, 4, 4, 8), F))


if __name__ == "__main__":
    print("| family | input tried | error | message (start) |\n|---|---|---|---|")
    for family, wrong, call, _ in CASES:
        with tf.device("/CPU:0"):
            kind, message = _outcome(call)
        print(f"| {family} | {wrong} | {kind or 'none!'} | {message[:110].replace('|', '/')} |")
