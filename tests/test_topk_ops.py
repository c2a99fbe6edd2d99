"""kwinners / topk_attention: compiled ops and pure-TF references vs NumPy."""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tf_sparseconv as tsc
from tf_sparseconv.python.ops._loader import load_library

pytestmark = pytest.mark.skipif(not tsc.ops.is_library_loaded(), reason="op library not built")

DTYPES = [tf.float16, tf.bfloat16, tf.float32, tf.float64]


# --- an independent NumPy reference ------------------------------------------------


def np_select(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the k largest scores of each row (last axis), ties to the lower index."""
    order = np.argsort(-scores, axis=-1, kind="stable")
    keep = np.zeros(scores.shape, bool)
    np.put_along_axis(keep, order[..., :k], True, axis=-1)
    return keep


def np_kwinners(x: np.ndarray, k: int, axis: int) -> np.ndarray:
    xm = np.moveaxis(x, axis, -1)
    keep = np_select(xm.astype(np.float64), k)
    return np.moveaxis(np.where(keep, xm, 0), -1, axis)


def np_topk_attention(x: np.ndarray, k: int, mode: str, per: str) -> np.ndarray:
    b, c, s = x.shape[0], x.shape[-1], int(np.prod(x.shape[1:-1]))
    rows = x.reshape(b, s * c) if per == "sample" else x.reshape(b, s, c).transpose(0, 2, 1)
    rows64 = rows.astype(np.float64)
    keep = np_select(np.abs(rows64) if mode == "abs" else rows64, k)
    if mode == "relu":
        keep &= rows64 > 0
    kept = np.where(keep, rows, 0)
    if per == "channel":
        kept = kept.transpose(0, 2, 1)
    return kept.reshape(x.shape)


def as_np(t) -> np.ndarray:
    return np.asarray(tf.cast(t, tf.float64) if t.dtype == tf.bfloat16 else t)


def random_input(rng, shape, dtype, ties=False):
    if ties:  # a handful of distinct values: many ties
        values = rng.integers(-3, 4, size=shape).astype(np.float64)
    else:
        values = rng.standard_normal(shape)
    return tf.cast(tf.constant(values), dtype)


def assert_bitwise_equal(a, b):
    a, b = as_np(a), as_np(b)
    assert a.shape == b.shape
    np.testing.assert_array_equal(a, b)


# --- forward vs references -----------------------------------------------------------

SHAPES_AXES = [
    ((17,), 0),
    ((5, 9), -1),
    ((5, 9), 0),
    ((3, 4, 33), 1),
    ((2, 3, 4, 40), -1),
    ((2, 3, 4, 40), 2),
    ((2, 70, 3), 1),  # strided axis, inner > 1
    ((1, 300, 19), 1),  # inner > the 16-column chunk
    ((4, 1000), -1),  # k > the small-k buffer
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize(("shape", "axis"), SHAPES_AXES)
@pytest.mark.parametrize("ties", [False, True])
def test_kwinners_matches_references(rng, shape, axis, dtype, ties):
    x = random_input(rng, shape, dtype, ties)
    size = shape[axis]
    for k in sorted({1, 2, max(1, size // 3), 40, size, size + 5}):
        expected = np_kwinners(as_np(x), k, axis)
        got = tsc.ops.kwinners(x, k, axis=axis)
        assert got.dtype == dtype
        assert_bitwise_equal(got, tf.cast(expected, dtype))
        assert_bitwise_equal(tsc.ops.kwinners_reference(x, k, axis=axis), got)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape", [(2, 11, 5), (3, 4, 6, 7), (1, 3, 4, 5, 18), (2, 64, 33)])
@pytest.mark.parametrize("mode", ["abs", "relu"])
@pytest.mark.parametrize("per", ["channel", "sample"])
@pytest.mark.parametrize("ties", [False, True])
def test_topk_attention_matches_references(rng, shape, dtype, mode, per, ties):
    x = random_input(rng, shape, dtype, ties)
    n = int(np.prod(shape[1:] if per == "sample" else shape[1:-1]))
    for k in sorted({1, 3, max(1, n // 4), 40, n, n + 1}):
        expected = np_topk_attention(as_np(x), k, mode, per)
        got = tsc.ops.topk_attention(x, k, mode=mode, per=per)
        assert_bitwise_equal(got, tf.cast(expected, dtype))
        assert_bitwise_equal(tsc.ops.topk_attention_reference(x, k, mode=mode, per=per), got)
        sets = as_np(got).reshape(shape[0], n, 1 if per == "sample" else shape[-1])
        assert (np.count_nonzero(sets, axis=1) <= k).all()


def test_kwinners_tie_goes_to_lower_index():
    x = tf.constant([[1.0, 3.0, 2.0, 3.0, 3.0, -0.0, 0.0]])
    np.testing.assert_array_equal(tsc.ops.kwinners(x, 2), [[0, 3, 0, 3, 0, 0, 0]])
    # -0 and +0 rank equal: the lower index wins.
    z = tf.constant([[-5.0, 0.0, -0.0, -1.0, 0.0]])
    np.testing.assert_array_equal(tsc.ops.kwinners(z, 4), [[0, 0, 0, -1, 0]])
    np.testing.assert_array_equal(tsc.ops.kwinners(z, 2), [[0, 0, 0, 0, 0]])
    assert np.signbit(tsc.ops.kwinners(z, 2).numpy()[0, 2])
    got = tsc.ops.kwinners(tf.constant([[-0.0, 0.0, -1.0]]), 1)
    assert np.signbit(got.numpy()[0, 0])  # the kept -0 is copied as it is


def test_kwinners_nan_ranks_highest():
    x = tf.constant([[1.0, np.nan, 5.0, -np.nan, 2.0]])
    got = tsc.ops.kwinners(x, 3).numpy()
    assert np.isnan(got[0, 1]) and np.isnan(got[0, 3]) and got[0, 2] == 5.0
    assert got[0, 0] == 0 and got[0, 4] == 0


def test_relu_mode_keeps_only_positive_winners():
    x = tf.constant([[[-5.0], [-1.0], [2.0], [-3.0]]])  # [1, 4, 1]
    np.testing.assert_array_equal(tsc.ops.topk_attention(x, 2, mode="relu")[0, :, 0], [0, 0, 2, 0])
    np.testing.assert_array_equal(tsc.ops.topk_attention(x, 2, mode="abs")[0, :, 0], [-5, 0, 0, -3])


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 4, 2), (2, 0, 3)])
def test_kwinners_empty(shape):
    x = tf.zeros(shape)
    for axis in range(len(shape)):
        got = tsc.ops.kwinners(x, 2, axis=axis)
        assert got.shape == shape
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tsc.ops.kwinners(x, 2, axis=axis)
        assert tape.gradient(y, x).shape == shape


@pytest.mark.parametrize("shape", [(0, 4, 3), (2, 0, 3), (2, 3, 0), (0, 2, 2, 2, 1)])
def test_topk_attention_empty(shape):
    x = tf.zeros(shape)
    for per in ("channel", "sample"):
        assert tsc.ops.topk_attention(x, 3, per=per).shape == shape


def test_large_slices_and_many_slices(rng):
    x = tf.constant(rng.standard_normal((3, 100_000)).astype(np.float32))
    for k in (7, 5000):
        assert_bitwise_equal(tsc.ops.kwinners(x, k), np_kwinners(x.numpy(), k, -1))
    y = tf.constant(rng.standard_normal((2, 16, 16, 64)).astype(np.float32))
    assert_bitwise_equal(tsc.ops.kwinners(y, 16), np_kwinners(y.numpy(), 16, -1))


def test_deterministic(rng):
    x = random_input(rng, (8, 33, 65), tf.float32, ties=True)
    first = [tsc.ops.kwinners(x, 9, axis=1).numpy(), tsc.ops.topk_attention(x[..., None], 5).numpy()]
    for _ in range(3):
        again = [tsc.ops.kwinners(x, 9, axis=1).numpy(), tsc.ops.topk_attention(x[..., None], 5).numpy()]
        for a, b in zip(first, again):
            assert a.tobytes() == b.tobytes()


def test_inside_tf_function_and_dynamic_k(rng):
    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([], tf.int32)])
    def f(x, k):
        return tsc.ops.kwinners(x, k), tsc.ops.topk_attention(x[:, :, None], k, per="sample")

    x = rng.standard_normal((4, 30)).astype(np.float32)
    a, b = f(x, tf.constant(4))
    assert_bitwise_equal(a, np_kwinners(x, 4, -1))
    assert_bitwise_equal(b, np_topk_attention(x[:, :, None], 4, "abs", "sample"))

    @tf.function
    def g(x):
        return tsc.ops.kwinners(x, 3, axis=0)

    y = g(tf.constant(x))
    assert y.shape == (4, 30)
    # Static shape inference of the op's outputs.
    concrete = tf.function(
        lambda t: load_library().tf_sparse_conv_k_winners(t, 3, axis=1)
    ).get_concrete_function(tf.TensorSpec([None, 10], tf.float32))
    assert concrete.structured_outputs[1].shape.as_list() == [None, 3]


# --- gradients ---------------------------------------------------------------------------


def separated(rng, shape):
    """Values whose magnitudes are distinct and >= 0.05 apart (random signs), so that
    finite differences can flip neither a winner by value nor by |value|."""
    n = int(np.prod(shape))
    magnitudes = (rng.permutation(n) + 1) * 0.05
    return (magnitudes * rng.choice([-1.0, 1.0], n)).reshape(shape)


@pytest.mark.parametrize(("shape", "axis", "k"), [((3, 7), -1, 3), ((4, 5, 6), 1, 2), ((2, 3, 4, 5), 0, 1)])
def test_kwinners_gradient_numeric(rng, shape, axis, k):
    x = tf.constant(separated(rng, shape))
    theoretical, numerical = tf.test.compute_gradient(
        lambda t: tsc.ops.kwinners(t, k, axis=axis), [x], delta=1e-3
    )
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=1e-6)
    assert np.count_nonzero(theoretical[0]) == np.prod(shape) // shape[axis] * k


@pytest.mark.parametrize("mode", ["abs", "relu"])
@pytest.mark.parametrize("per", ["channel", "sample"])
def test_topk_attention_gradient_numeric(rng, mode, per):
    x = tf.constant(separated(rng, (2, 3, 4, 3)))
    f = lambda t: tsc.ops.topk_attention(t, 4, mode=mode, per=per)  # noqa: E731
    theoretical, numerical = tf.test.compute_gradient(f, [x], delta=1e-3)
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=1e-6)
    assert np.count_nonzero(theoretical[0]) > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_gradient_is_upstream_at_winners(rng, dtype):
    x = random_input(rng, (3, 6, 20), dtype)
    dy = random_input(rng, (3, 6, 20), dtype)
    for fn, ref in [
        (lambda t: tsc.ops.kwinners(t, 5, axis=1), lambda t: tsc.ops.kwinners_reference(t, 5, axis=1)),
        (
            lambda t: tsc.ops.topk_attention(t, 4, mode="relu"),
            lambda t: tsc.ops.topk_attention_reference(t, 4, mode="relu"),
        ),
        (
            lambda t: tsc.ops.topk_attention(t, 9, per="sample"),
            lambda t: tsc.ops.topk_attention_reference(t, 9, per="sample"),
        ),
    ]:
        grads = []
        for f in (fn, ref):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = f(x)
            grads.append(tape.gradient(y, x, output_gradients=dy))
        assert_bitwise_equal(grads[0], grads[1])


def test_second_order_gradient(rng):
    x = tf.constant(separated(rng, (4, 9)))
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            y = tf.reduce_sum(tsc.ops.kwinners(x, 3) ** 2)
        g = inner.gradient(y, x)  # 2 x at winners
        z = tf.reduce_sum(g * g)
    gg = outer.gradient(z, x)  # 8 x at winners
    expected = np.where(np_select(x.numpy(), 3), 8 * x.numpy(), 0)
    np.testing.assert_allclose(gg, expected)


# --- bad input -----------------------------------------------------------------------------


def test_bad_arguments_raise_value_error():
    x = tf.ones((2, 3))
    with pytest.raises(ValueError, match="`k` must be an integer >= 1"):
        tsc.ops.kwinners(x, 0)
    with pytest.raises(ValueError, match="`k`"):
        tsc.ops.kwinners(x, 1.5)
    with pytest.raises(ValueError, match="`axis` must be in"):
        tsc.ops.kwinners(x, 1, axis=2)
    with pytest.raises(ValueError, match="`x` must have rank >= 1"):
        tsc.ops.kwinners(tf.constant(1.0), 1)
    with pytest.raises(ValueError, match="`x` must be float16"):
        tsc.ops.kwinners(tf.ones((2, 3), tf.int32), 1)
    with pytest.raises(ValueError, match="`x` must be \\[B, \\*spatial, C\\]"):
        tsc.ops.topk_attention(x, 1)
    with pytest.raises(ValueError, match="`mode` must be one of"):
        tsc.ops.topk_attention(tf.ones((1, 2, 3)), 1, mode="max")
    with pytest.raises(ValueError, match="`per` must be one of"):
        tsc.ops.topk_attention(tf.ones((1, 2, 3)), 1, per="row")


def test_bad_runtime_k_raises_invalid_argument():
    lib = load_library()
    with pytest.raises(tf.errors.InvalidArgumentError, match="k must be >= 1"):
        tsc.ops.kwinners(tf.ones((2, 3)), tf.constant(0))
    with pytest.raises(tf.errors.InvalidArgumentError, match="k must be >= 1"):
        tsc.ops.topk_attention(tf.ones((1, 2, 3)), tf.constant(-4))
    with pytest.raises(tf.errors.InvalidArgumentError, match="axis must be in"):
        lib.tf_sparse_conv_k_winners(tf.ones((2, 3)), 1, axis=5)
    with pytest.raises(tf.errors.InvalidArgumentError, match="1 to 3 spatial dims"):
        lib.tf_sparse_conv_top_k_attention(tf.ones((2, 3)), 1)


def test_grad_ops_reject_bad_indices():
    lib = load_library()
    dy = tf.ones((2, 5))
    # Index values: checked by the CPU kernel; the GPU one skips them
    # (test_gpu_grad_ops_skip_bad_indices).
    with tf.device("/CPU:0"):
        with pytest.raises(tf.errors.InvalidArgumentError, match="indices must be in"):
            lib.tf_sparse_conv_k_winners_grad(dy, tf.constant([[0, 9], [1, 2]]), axis=-1)
        with pytest.raises(tf.errors.InvalidArgumentError, match="indices must be in"):
            lib.tf_sparse_conv_k_winners_grad(dy, tf.constant([[0, -2], [1, 2]]), axis=-1)
    with pytest.raises(tf.errors.InvalidArgumentError, match="indices must have the shape"):
        lib.tf_sparse_conv_k_winners_grad(dy, tf.constant([[0, 1, 2]]), axis=-1)
    with pytest.raises(tf.errors.InvalidArgumentError, match="do not match grad"):
        lib.tf_sparse_conv_top_k_attention_grad(tf.ones((1, 4, 2)), tf.constant([[0, 1]]), per="channel")


@pytest.mark.skipif(not tf.config.list_physical_devices("GPU"), reason="TensorFlow sees no GPU")
def test_gpu_grad_ops_skip_bad_indices(rng):
    """On the GPU (README, "Validation on GPU") the winners' indices are not checked: an entry
    outside [0, size) contributes nothing (as -1, a dropped winner, does; never an out-of-bounds
    access)."""
    lib = load_library()
    dy = rng.standard_normal((2, 5)).astype(np.float32)
    indices = np.array([[0, 9, -2], [1, 2**31 - 1, -(2**31)]], np.int32)
    with tf.device("/GPU:0"):
        dx = lib.tf_sparse_conv_k_winners_grad(dy, indices, axis=-1)
        dx_attention = lib.tf_sparse_conv_top_k_attention_grad(
            dy[:, :, None], indices[:, :, None], per="channel"
        )
    assert dx.device.endswith("GPU:0")
    expected = np.zeros_like(dy)
    expected[0, 0], expected[1, 1] = dy[0, 0], dy[1, 1]
    np.testing.assert_array_equal(dx, expected)
    np.testing.assert_array_equal(dx_attention, expected[:, :, None])


# --- fuzzing -----------------------------------------------------------------------------------


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(0, 7), min_size=1, max_size=4),
    data=st.data(),
)
def test_fuzz_kwinners(shape, data):
    rank = len(shape)
    axis = data.draw(st.integers(-rank, rank - 1))
    k = data.draw(st.integers(1, 10))
    dtype = data.draw(st.sampled_from(DTYPES))
    values = data.draw(
        st.lists(
            st.sampled_from([-2.0, -1.0, -0.0, 0.0, 0.5, 1.0, 3.0, 1e30, -np.inf, np.inf]),
            min_size=int(np.prod(shape)),
            max_size=int(np.prod(shape)),
        )
    )
    x = tf.cast(tf.reshape(tf.constant(values, tf.float64), shape), dtype)
    got = tsc.ops.kwinners(x, k, axis=axis)
    assert_bitwise_equal(got, tf.cast(np_kwinners(as_np(x), k, axis), dtype))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(0, 6), min_size=3, max_size=5),
    k=st.integers(1, 40),
    mode=st.sampled_from(["abs", "relu"]),
    per=st.sampled_from(["channel", "sample"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_topk_attention(shape, k, mode, per, seed):
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.integers(-3, 4, size=shape).astype(np.float32))
    got = tsc.ops.topk_attention(x, k, mode=mode, per=per)
    assert_bitwise_equal(got, np_topk_attention(x.numpy(), k, mode, per))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tsc.ops.topk_attention(x, k, mode=mode, per=per)
    g = tape.gradient(y, x, output_gradients=tf.ones_like(x))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tsc.ops.topk_attention_reference(x, k, mode=mode, per=per)
    assert_bitwise_equal(g, tape.gradient(y, x, output_gradients=tf.ones_like(x)))
