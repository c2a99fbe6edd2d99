"""streaming_conv_step (op StreamingConvStep): compiled kernel vs a NumPy oracle and the pure-TF
reference, gradients (float64 numeric), validation."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tf_sparseconv as tsc
from tf_sparseconv.python.ops._loader import load_library

pytestmark = pytest.mark.skipif(not tsc.ops.is_library_loaded(), reason="op library not built")


def np_step(history, frames, kernel, bias, dilation, relu):
    z = np.concatenate([history, frames], axis=1).astype(np.float64)
    taps = kernel.shape[0]
    t = frames.shape[1]
    y = np.zeros((frames.shape[0], t, kernel.shape[2])) + (0 if bias is None else bias)
    for j in range(t):
        for i in range(taps):
            y[:, j] += z[:, j + i * dilation] @ kernel[i]
    if relu:
        y = np.maximum(y, 0)
    return y, z[:, t:]


CASES = [
    # (batch, steps, channels, filters, taps, dilation)
    (1, 1, 40, 128, 5, 32),
    (2, 7, 5, 3, 3, 2),
    (3, 4, 8, 70, 2, 5),  # filters not a multiple of the register block
    (2, 3, 6, 4, 1, 1),  # one tap: no history
    (2, 0, 6, 4, 3, 1),  # no new frame
    (1, 33, 9, 130, 4, 1),
]


@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_matches_numpy_and_reference(rng, case, relu):
    b, t, c, f, k, d = case
    history = rng.standard_normal((b, (k - 1) * d, c)).astype(np.float32)
    frames = rng.standard_normal((b, t, c)).astype(np.float32)
    kernel = rng.standard_normal((k, c, f)).astype(np.float32)
    bias = rng.standard_normal(f).astype(np.float32)
    activation = "relu" if relu else None
    y, new_history = tsc.ops.streaming_conv_step(history, frames, kernel, bias, d, activation)
    want_y, want_history = np_step(history, frames, kernel, bias, d, relu)
    np.testing.assert_allclose(y, want_y, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(new_history, want_history.astype(np.float32))
    ref_y, ref_history = tsc.ops.streaming_conv_step_reference(history, frames, kernel, bias, d, activation)
    np.testing.assert_allclose(ref_y, want_y, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(ref_history, new_history)
    # Without a bias.
    y0, _ = tsc.ops.streaming_conv_step(history, frames, kernel, None, d, activation)
    np.testing.assert_allclose(y0, np_step(history, frames, kernel, None, d, relu)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float64], ids=lambda d: d.name)
def test_dtypes(rng, dtype):
    history = rng.standard_normal((2, 4, 6))
    frames = rng.standard_normal((2, 3, 6))
    kernel = rng.standard_normal((3, 6, 5)) * 0.3
    bias = rng.standard_normal(5)
    cast = [tf.cast(v, dtype) for v in (history, frames, kernel, bias)]
    y, nh = tsc.ops.streaming_conv_step(*cast, dilation=2, activation="relu")
    assert y.dtype == dtype and nh.dtype == dtype
    exact = [tf.cast(v, tf.float64).numpy() for v in cast]
    want, _ = np_step(*exact, 2, True)
    tol = {tf.float16: 2e-2, tf.bfloat16: 1e-1, tf.float64: 1e-12}[dtype]
    np.testing.assert_allclose(tf.cast(y, tf.float64), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("activation", [None, "relu"])
def test_gradients_numeric_float64_and_against_reference(rng, activation):
    history = rng.standard_normal((2, 4, 3))
    frames = rng.standard_normal((2, 3, 3))
    kernel = rng.standard_normal((3, 3, 4))
    bias = rng.standard_normal(4)
    weights_y = rng.standard_normal((2, 3, 4))
    weights_h = rng.standard_normal((2, 4, 3))

    def loss(step):
        def f(history, frames, kernel, bias):
            y, new_history = step(history, frames, kernel, bias, 2, activation)
            return tf.reduce_sum(y * weights_y) + tf.reduce_sum(new_history * weights_h)

        return f

    theoretical, numerical = tf.test.compute_gradient(
        loss(tsc.ops.streaming_conv_step), [history, frames, kernel, bias], delta=1e-6
    )
    for a, n in zip(theoretical, numerical):
        np.testing.assert_allclose(a, n, rtol=1e-6, atol=1e-6)
    ref, _ = tf.test.compute_gradient(
        loss(tsc.ops.streaming_conv_step_reference), [history, frames, kernel, bias], delta=1e-6
    )
    for a, r in zip(theoretical, ref):
        np.testing.assert_allclose(a, r, rtol=1e-8, atol=1e-8)


def test_bad_input(rng):
    h, x, k = np.zeros((1, 4, 3), np.float32), np.ones((1, 2, 3), np.float32), np.ones((3, 3, 2), np.float32)
    for call, match in (
        (lambda: tsc.ops.streaming_conv_step(h, x, k, dilation=0), "`dilation`"),
        (lambda: tsc.ops.streaming_conv_step(h, x, k, dilation=2, activation="gelu"), "`activation`"),
        (lambda: tsc.ops.streaming_conv_step(h, x, k, dilation=1), "`history` must hold"),
        (lambda: tsc.ops.streaming_conv_step(h, x[..., :2], k, dilation=2), "channels"),
        (lambda: tsc.ops.streaming_conv_step(h, x, k, bias=np.ones(3, np.float32), dilation=2), "`bias`"),
        (lambda: tsc.ops.streaming_conv_step(h, x, k.astype(np.float64), dilation=2), "`kernel` dtype"),
        (lambda: tsc.ops.streaming_conv_step(h[0], x, k, dilation=2), "`history` must be"),
    ):
        with pytest.raises(ValueError, match=match):
            call()
    lib = load_library()
    with pytest.raises(tf.errors.InvalidArgumentError, match="history must be"):
        lib.tf_sparse_conv_streaming_conv_step(h, x, k, np.zeros(0, np.float32), dilation=1)
    with pytest.raises(tf.errors.InvalidArgumentError, match="bias must be"):
        lib.tf_sparse_conv_streaming_conv_step(h, x, k, np.zeros(5, np.float32), dilation=2)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="input channels|must be equal"):
        lib.tf_sparse_conv_streaming_conv_step(
            h, x, np.ones((3, 4, 2), np.float32), np.zeros(0, np.float32), dilation=2
        )
    # Inside a tf.function with unknown shapes the kernel itself checks.
    f = tf.function(
        lambda h, x: lib.tf_sparse_conv_streaming_conv_step(h, x, k, np.zeros(0, np.float32), dilation=1),
        input_signature=[tf.TensorSpec([None, None, 3]), tf.TensorSpec([None, None, 3])],
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="history must be"):
        f(h, x)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(0, 3),
    steps=st.integers(0, 9),
    channels=st.integers(1, 9),
    filters=st.integers(1, 70),
    taps=st.integers(1, 4),
    dilation=st.integers(1, 4),
    relu=st.booleans(),
    use_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fuzz_against_numpy(batch, steps, channels, filters, taps, dilation, relu, use_bias, seed):
    rng = np.random.default_rng(seed)
    history = rng.standard_normal((batch, (taps - 1) * dilation, channels)).astype(np.float32)
    frames = rng.standard_normal((batch, steps, channels)).astype(np.float32)
    kernel = rng.standard_normal((taps, channels, filters)).astype(np.float32)
    bias = rng.standard_normal(filters).astype(np.float32) if use_bias else None
    activation = "relu" if relu else None
    y, new_history = tsc.ops.streaming_conv_step(history, frames, kernel, bias, dilation, activation)
    want_y, want_history = np_step(history, frames, kernel, bias, dilation, relu)
    assert y.shape == want_y.shape and new_history.shape == want_history.shape
    np.testing.assert_allclose(y, want_y, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(new_history, want_history.astype(np.float32))
