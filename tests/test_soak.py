"""Under load: concurrent serving of loaded SavedModels, and memory over repeated op calls.

* 8 threads call one loaded (native: compiled ops) SavedModel of each family — dense image
  families (k-WTA, top-k attention, channel-sparse, block-sparse), a sparse-map model, a streaming
  step — concurrently for `TSC_SOAK_SECONDS` (default 30) seconds in all; every output must equal
  the single-threaded one.
* Every op is called 2,000 times (after a warm-up) with its gradient where it has one; the
  process's resident memory may not grow by more than 5 %.
"""

from __future__ import annotations

import os
import threading
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_export import dense_families_model, dense_inputs, sparse_inputs, sparse_map_model

import tf_sparseconv as tsc

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not tsc.ops.is_library_loaded(), reason="op library not built"),
]

THREADS = 8


def _streaming_model():
    inputs = keras.Input((None, 6))
    h = tsc.streaming.StreamingConv1D(8, 3, activation="relu")(inputs)
    h = tsc.streaming.StreamingConv1D(8, 3, strides=2, dilation_rate=2)(h)
    h = tsc.layers.KWinners(k=3)(h)
    return keras.Model(inputs, keras.layers.Dense(4)(h))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(name, signature, list of (inputs, expected outputs)) per family, loaded from disk."""
    root = tmp_path_factory.mktemp("soak")
    rng = np.random.default_rng(0)
    cases = []
    for name, model, make in (
        ("dense_families", dense_families_model(), lambda: dense_inputs(rng, batch=2)),
        ("sparse_map", sparse_map_model(), lambda: sparse_inputs(rng)),
    ):
        path = tsc.export.export_saved_model(model, str(root / name))
        signature = tf.saved_model.load(path).signatures["serving_default"]
        feeds = [{k: tf.constant(v) for k, v in make().items()} for _ in range(4)]
        cases.append((name, signature, [(f, signature(**f)) for f in feeds]))
    stream = tsc.streaming.to_streaming(_streaming_model())
    path = tsc.streaming.export_streaming(stream, str(root / "streaming"))
    step = tf.saved_model.load(path).signatures["step"]
    feeds = []
    for _ in range(4):
        state = {f"state_{i}": s for i, s in enumerate(stream.initial_state(2))}
        frames = tf.constant(rng.standard_normal((2, 5, 6)).astype(np.float32))
        feeds.append({"frames": frames, **state})
    cases.append(("streaming_step", step, [(f, step(**f)) for f in feeds]))
    return cases


def test_concurrent_calls_of_loaded_savedmodels(served):
    seconds = float(os.environ.get("TSC_SOAK_SECONDS", "30"))
    stop = time.monotonic() + seconds
    errors, calls = [], [0] * THREADS

    def worker(index: int):
        rng = np.random.default_rng(index)
        try:
            while time.monotonic() < stop and not errors:
                name, signature, pairs = served[rng.integers(len(served))]
                feeds, expected = pairs[rng.integers(len(pairs))]
                got = signature(**feeds)
                for key, value in expected.items():
                    np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-5, err_msg=name)
                calls[index] += 1
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    assert min(calls) > 0, calls
    print(f"soak: {sum(calls)} calls in {seconds:.0f} s from {THREADS} threads, per thread {calls}")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _op_calls(rng):
    """name -> a function calling one op (and its gradient where it has one) on fixed inputs."""
    f32 = lambda *shape: tf.constant(rng.standard_normal(shape).astype(np.float32))  # noqa: E731
    x, kernel = f32(2, 12, 12, 16), f32(3, 3, 4, 8)
    connections = tsc.ops.random_connections(16, 8, fan_in=4, seed=0)
    mask = tf.constant((rng.random((2, 12, 12)) < 0.3).astype(np.float32))
    coords = tf.constant(
        np.unique(
            np.concatenate([rng.integers(0, 2, (60, 1)), rng.integers(0, 10, (60, 3))], 1), axis=0
        ).astype(np.int32)
    )
    features = f32(int(coords.shape[0]), 4)
    k3 = f32(3, 3, 3, 4, 5)
    seq, history, skernel = f32(2, 3, 6), f32(2, 2, 6), f32(3, 6, 5)

    def with_grad(fn, *args):
        def call():
            with tf.GradientTape() as tape:
                tape.watch(args)
                y = fn(*args)
                y = y[0] if isinstance(y, (tuple, list)) else y
            tape.gradient(tf.reduce_sum(y * y), args)

        return call

    rulebook = tsc.ops.Rulebook(*tsc.ops.sparse_conv_rulebook(coords, (10, 10, 10), 3, 2, 1, False))
    return {
        "kwinners": with_grad(lambda v: tsc.ops.kwinners(v, 5), x),
        "topk_attention": with_grad(lambda v: tsc.ops.topk_attention(v, 20), x),
        "channel_sparse_conv2d": with_grad(
            lambda v, w: tsc.ops.channel_sparse_conv2d(v, w, connections), x, kernel
        ),
        "channel_sparse_conv1d": with_grad(
            lambda v, w: tsc.ops.channel_sparse_conv1d(v, w[0], connections), x[:, 0], kernel
        ),
        "reduce_mask": lambda: tsc.ops.reduce_mask(mask, 4, 4),
        "block_sparse_conv2d": with_grad(
            lambda v: tsc.ops.block_sparse_conv2d(v, f32(3, 3, 16, 8), mask, 4), x
        ),
        "sparse_gather_scatter": with_grad(
            lambda v: tsc.ops.sparse_scatter(
                tsc.ops.sparse_gather(v, tsc.ops.reduce_mask(mask, 4, 4), 4, 4),
                tsc.ops.reduce_mask(mask, 4, 4),
                tf.zeros_like(v),
                4,
            ),
            x,
        ),
        "sparse_conv": with_grad(lambda v: tsc.ops.sparse_conv(v, coords, k3, (10, 10, 10)), features),
        "sparse_conv_strided_transpose": with_grad(
            lambda v: tsc.ops.sparse_conv_transpose(
                tsc.ops.sparse_conv(v, coords, k3, (10, 10, 10), 2, 1, False, rulebook)[0],
                f32(3, 3, 3, 5, 4),
                rulebook,
                coords,
            ),
            features,
        ),
        "topk_sites": with_grad(lambda v: tsc.ops.topk_sites(v, coords, 10), features),
        "streaming_conv_step": with_grad(
            lambda h, s: tsc.ops.streaming_conv_step(h, s, skernel, activation="relu"), history, seq
        ),
    }


def test_memory_stays_flat_over_repeated_op_calls(rng):
    calls = 2000
    growth = {}
    for name, call in _op_calls(rng).items():
        for _ in range(200):  # warm-up: caches, thread pools, allocator pools
            call()
        before = _rss_bytes()
        for _ in range(calls):
            call()
        after = _rss_bytes()
        growth[name] = (after - before) / before, (after - before) / calls
    print("RSS growth over 2000 calls:", {k: f"{g:+.2%} ({b:.0f} B/call)" for k, (g, b) in growth.items()})
    # The bound (5 % of the process), and one a leak of a small buffer per call would
    # break (the process is ~1.5 GB with TensorFlow: 5 % alone would hide 35 kB per call).
    assert all(g <= 0.05 and b < 1024 for g, b in growth.values()), growth
