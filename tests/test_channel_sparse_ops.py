"""channel_sparse_conv2d/1d: compiled ops vs the pure-TF reference and a NumPy oracle."""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tf_sparseconv as tsc
from tf_sparseconv.python.ops._loader import load_library

pytestmark = pytest.mark.skipif(not tsc.ops.is_library_loaded(), reason="op library not built")


@pytest.fixture(autouse=True)
def _no_dense_dispatch(monkeypatch):
    """The compiled kernels under test, whatever the fan-in (the per-shape choice would
    otherwise route some of these cases to tf.nn.conv2d); the dispatch tests force their own
    paths."""
    monkeypatch.setenv("TF_SPARSECONV_CHANNEL_SPARSE", "sparse")


def np_conv2d(x, kernel, connections, strides, padding, dilations):
    """Direct NumPy convolution with the dense kernel (independent of TF)."""
    b, h, w, cin = x.shape
    kh, kw, _, cout = kernel.shape
    (sh, sw), (dh, dw) = strides, dilations
    dense = np.zeros((kh, kw, cin, cout), np.float64)
    for o in range(cout):
        dense[:, :, connections[o], o] = kernel[:, :, :, o]
    spans = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
    if padding == "SAME":
        out_h, out_w = -(-h // sh), -(-w // sw)
        pt = max((out_h - 1) * sh + spans[0] - h, 0) // 2
        pl = max((out_w - 1) * sw + spans[1] - w, 0) // 2
    else:
        out_h, out_w = (h - spans[0]) // sh + 1, (w - spans[1]) // sw + 1
        pt = pl = 0
    y = np.zeros((b, max(out_h, 0), max(out_w, 0), cout))
    for i in range(kh):
        for j in range(kw):
            for oh in range(out_h):
                ih = oh * sh - pt + i * dh
                if not 0 <= ih < h:
                    continue
                for ow in range(out_w):
                    iw = ow * sw - pl + j * dw
                    if 0 <= iw < w:
                        y[:, oh, ow] += x[:, ih, iw].astype(np.float64) @ dense[i, j]
    return y


CASES = [
    # (B, H, W, Cin, Cout, m, kh, kw, strides, dilations, padding)
    (2, 9, 7, 6, 5, 3, 3, 3, (1, 1), (1, 1), "SAME"),
    (1, 11, 10, 8, 4, 8, 3, 2, (2, 2), (2, 2), "VALID"),
    (3, 1, 13, 5, 7, 2, 1, 5, (1, 1), (1, 3), "SAME"),
    (2, 5, 70, 13, 9, 4, 3, 3, (1, 1), (1, 1), "SAME"),  # row mode
    (2, 6, 90, 13, 9, 4, 3, 5, (2, 1), (1, 2), "SAME"),  # row mode, stride along height
    (1, 4, 100, 7, 3, 7, 2, 4, (1, 1), (1, 3), "VALID"),  # even kernel, m = Cin
    (2, 7, 65, 9, 10, 3, 1, 1, (1, 1), (1, 1), "SAME"),  # 1x1
    (1, 3, 200, 16, 8, 5, 3, 3, (1, 2), (1, 1), "SAME"),  # stride along width: gather mode
    (2, 8, 8, 4, 6, 1, 3, 3, (3, 3), (1, 1), "SAME"),  # m = 1
    (1, 5, 5, 3, 2, 2, 5, 5, (1, 1), (1, 1), "VALID"),  # kernel = image
    (1, 3, 3, 3, 2, 2, 3, 3, (1, 1), (2, 2), "VALID"),  # empty output
    (1, 6, 28, 256, 8, 4, 1, 7, (1, 1), (1, 1), "SAME"),  # plane mode (7 shifted planes exceed L2)
    (2, 5, 12, 7, 6, 3, 3, 3, (1, 1), (2, 1), "SAME"),  # shifted planes, dilated rows
]


def make_case(rng, case, dtype=np.float32):
    b, h, w, cin, cout, m, kh, kw, strides, dilations, padding = case
    x = rng.standard_normal((b, h, w, cin)).astype(dtype)
    kernel = rng.standard_normal((kh, kw, m, cout)).astype(dtype)
    connections = tsc.ops.random_connections(cin, cout, fan_in=m, seed=int(rng.integers(1000)))
    return x, kernel, connections, strides, padding, dilations


def check_against_oracle(rng, x, kernel, connections, strides, padding, dilations, grad_atol=1e-4):
    """The op and its reference against the NumPy oracle, their gradients against each other."""
    xt, kt = tf.constant(x), tf.constant(kernel)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([xt, kt])
        ours = tsc.ops.channel_sparse_conv2d(xt, kt, connections, strides, padding, dilations)
        ref = tsc.ops.channel_sparse_conv2d_reference(xt, kt, connections, strides, padding, dilations)
    expected = np_conv2d(x, kernel, connections, strides, padding, dilations)
    assert ours.shape == expected.shape == ref.shape
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ref, expected, rtol=1e-4, atol=1e-4)
    dy = rng.standard_normal(ours.shape).astype(np.float32)
    g_ours = tape.gradient(ours, [xt, kt], output_gradients=dy)
    g_ref = tape.gradient(ref, [xt, kt], output_gradients=dy)
    for a, b in zip(g_ours, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=grad_atol)


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_forward_and_gradients_match_reference(rng, case):
    check_against_oracle(rng, *make_case(rng, case))


@pytest.mark.parametrize(
    "case",
    [
        # (B, H, W, Cin, Cout, strides, dilations, padding)
        (2, 9, 11, 160, 27, (1, 1), (1, 1), "SAME"),  # plane mode, several channel blocks
        (1, 12, 40, 96, 20, (1, 1), (2, 1), "VALID"),  # row mode
        (2, 9, 9, 64, 14, (2, 2), (1, 1), "SAME"),  # gather mode
    ],
    ids=["plane", "row", "gather"],
)
def test_rows_sharing_connection_lists(rng, case):
    """Output channels with identical connection lists (as `channel_group` pruning makes) are
    computed together by the CPU kernel: groups of every size up to past the register limit, and
    ungrouped rows in between, against the NumPy oracle, with gradients against the reference."""
    b, h, w, cin, cout, strides, dilations, padding = case
    m = 11
    rows, o = [], 0
    for size in [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 9]:
        row = np.sort(rng.choice(cin, m, replace=False))
        rows += [row] * min(size, cout - o)
        o += size
        if o >= cout:
            break
    assert len(rows) == cout
    connections = np.asarray(rows, dtype=np.int32)
    x = rng.standard_normal((b, h, w, cin)).astype(np.float32)
    kernel = rng.standard_normal((3, 3, m, cout)).astype(np.float32)
    check_against_oracle(rng, x, kernel, connections, strides, padding, dilations, grad_atol=1e-3)


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize(
    "case", [CASES[0], CASES[1], CASES[3], CASES[8]], ids=["plane", "strided", "row", "m1"]
)
def test_fused_bias_activation(rng, case, activation):
    """ChannelSparseConv2DBiasActivation = activation(conv + bias), forward and gradients (bias
    included) against the NumPy oracle and the unfused reference."""
    x, kernel, connections, strides, padding, dilations = make_case(rng, case)
    cout = kernel.shape[-1]
    bias = rng.standard_normal(cout).astype(np.float32)
    xt, kt, bt = tf.constant(x), tf.constant(kernel), tf.constant(bias)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([xt, kt, bt])
        ours = tsc.ops.channel_sparse_conv2d(xt, kt, connections, strides, padding, dilations, bt, activation)
        ref = tf.nn.bias_add(
            tsc.ops.channel_sparse_conv2d_reference(xt, kt, connections, strides, padding, dilations), bt
        )
        ref = tf.nn.relu(ref) if activation else ref
    expected = np_conv2d(x, kernel, connections, strides, padding, dilations) + bias
    expected = np.maximum(expected, 0) if activation else expected
    if activation:
        assert 0.2 < np.mean(expected > 0) < 0.8  # the relu really cuts
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)
    dy = rng.standard_normal(ours.shape).astype(np.float32)
    g_ours = tape.gradient(ours, [xt, kt, bt], output_gradients=dy)
    g_ref = tape.gradient(ref, [xt, kt, bt], output_gradients=dy)
    for a, c in zip(g_ours, g_ref):
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-3)


def test_fused_bias_activation_numeric_gradient_and_errors(rng):
    x, kernel, connections, strides, padding, dilations = make_case(rng, CASES[0], np.float64)
    bias = rng.standard_normal(kernel.shape[-1])

    def f(x, kernel, bias):
        return tsc.ops.channel_sparse_conv2d(
            x, kernel, connections, strides, padding, dilations, bias, "relu"
        )

    theoretical, numerical = tf.test.compute_gradient(f, [x, kernel, bias], delta=1e-6)
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=1e-5, atol=1e-5)
    lib = load_library()
    graph_ops = tf.function(f).get_concrete_function(x, kernel, bias).graph.get_operations()
    assert any(op.type == "TfSparseConv>ChannelSparseConv2DBiasActivation" for op in graph_ops)
    with pytest.raises(ValueError, match="`activation`"):
        tsc.ops.channel_sparse_conv2d(x, kernel, connections, bias=bias, activation="gelu")
    with pytest.raises(ValueError, match="`bias` must be \\[Cout\\]"):
        tsc.ops.channel_sparse_conv2d(x, kernel, connections, bias=bias[:-1])
    with pytest.raises(ValueError, match="`bias` dtype"):
        tsc.ops.channel_sparse_conv2d(x, kernel, connections, bias=bias.astype(np.float32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="bias must be \\[Cout\\]"):
        lib.tf_sparse_conv_channel_sparse_conv2d_bias_activation(x, kernel, connections, bias[:-1])
    # m = 0 (no connections): the output is activation(bias) everywhere.
    empty = lib.tf_sparse_conv_channel_sparse_conv2d_bias_activation(
        x, np.zeros((3, 3, 0, 2)), np.zeros((2, 0), np.int32), np.array([-1.0, 2.0]), activation="relu"
    )
    np.testing.assert_array_equal(empty, np.broadcast_to([0.0, 2.0], (*x.shape[:3], 2)))


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float64], ids=lambda d: d.name)
def test_dtypes(rng, dtype):
    x, kernel, connections, strides, padding, dilations = make_case(rng, CASES[3], np.float64)
    expected = np_conv2d(x, kernel, connections, strides, padding, dilations)
    got = tsc.ops.channel_sparse_conv2d(
        tf.cast(x, dtype), tf.cast(kernel, dtype), connections, strides, padding
    )
    assert got.dtype == dtype
    tol = {tf.float16: 3e-2, tf.bfloat16: 2e-1, tf.float64: 1e-10}[dtype]
    np.testing.assert_allclose(tf.cast(got, tf.float64), expected, rtol=tol, atol=tol * 4)


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[4]], ids=["same", "strided-dilated", "row-mode"])
def test_gradient_numeric_float64(rng, case):
    b, h, w, cin, cout, m, kh, kw, strides, dilations, padding = case
    case = (1, min(h, 6), min(w, 40), cin, cout, m, kh, kw, strides, dilations, padding)
    x, kernel, connections, strides, padding, dilations = make_case(rng, case, np.float64)
    theoretical, numerical = tf.test.compute_gradient(
        lambda a, k: tsc.ops.channel_sparse_conv2d(a, k, connections, strides, padding, dilations),
        [tf.constant(x), tf.constant(kernel)],
    )
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=1e-6, atol=1e-6)


def test_second_order_gradient_matches_reference(rng):
    x, kernel, connections, *_ = make_case(rng, CASES[0], np.float64)
    xt, kt = tf.constant(x), tf.constant(kernel)
    results = []
    for conv in (tsc.ops.channel_sparse_conv2d, tsc.ops.channel_sparse_conv2d_reference):

        @tf.function  # TF's eager second-order conv2d gradient is broken; graph mode works
        def second_order(xt, kt, conv=conv):
            with tf.GradientTape() as outer:
                outer.watch([xt, kt])
                with tf.GradientTape() as inner:
                    inner.watch([xt, kt])
                    loss = tf.reduce_sum(conv(xt, kt, connections) ** 2)
                gx, gk = inner.gradient(loss, [xt, kt])
                z = tf.reduce_sum(gx**2) + tf.reduce_sum(gk * gk)
            return outer.gradient(z, [xt, kt])

        results.append(second_order(xt, kt))
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-8)


def test_conv1d(rng):
    x = rng.standard_normal((3, 50, 6)).astype(np.float32)
    kernel = rng.standard_normal((5, 2, 7)).astype(np.float32)
    connections = tsc.ops.random_connections(6, 7, fan_in=2)
    for strides, dilations, padding in [(1, 1, "SAME"), (2, 1, "VALID"), (1, 3, "same")]:
        got = tsc.ops.channel_sparse_conv1d(x, kernel, connections, strides, padding, dilations)
        expected = np_conv2d(
            x[:, None], kernel[None], connections, (1, strides), padding.upper(), (1, dilations)
        )
        np.testing.assert_allclose(got, expected[:, 0], rtol=1e-4, atol=1e-4)
        ref = tsc.ops.channel_sparse_conv1d_reference(x, kernel, connections, strides, padding, dilations)
        np.testing.assert_allclose(ref, got, rtol=1e-4, atol=1e-4)


def test_equals_dense_conv2d_and_deterministic(rng):
    x, kernel, connections, *_ = make_case(rng, (2, 16, 40, 12, 10, 5, 3, 3, (1, 1), (1, 1), "SAME"))
    dense = tsc.ops.dense_kernel(tf.constant(kernel), connections, 12)
    expected = tf.nn.conv2d(x, dense, 1, "SAME")
    got = tsc.ops.channel_sparse_conv2d(x, kernel, connections)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    for _ in range(2):
        assert (
            tsc.ops.channel_sparse_conv2d(x, kernel, connections).numpy().tobytes() == got.numpy().tobytes()
        )
    with tf.GradientTape() as tape:
        kt = tf.constant(kernel)
        tape.watch(kt)
        y = tsc.ops.channel_sparse_conv2d(x, kt, connections)
    g1 = tape.gradient(y, kt).numpy()
    with tf.GradientTape() as tape:
        tape.watch(kt)
        y = tsc.ops.channel_sparse_conv2d(x, kt, connections)
    assert tape.gradient(y, kt).numpy().tobytes() == g1.tobytes()


def test_inside_tf_function_with_unknown_shapes(rng):
    x, kernel, connections, *_ = make_case(rng, CASES[3])

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 13], tf.float32)])
    def f(t):
        return tsc.ops.channel_sparse_conv2d(t, kernel, connections)

    assert f.get_concrete_function().structured_outputs.shape.as_list() == [None, None, None, 9]
    np.testing.assert_allclose(
        f(x), tsc.ops.channel_sparse_conv2d_reference(x, kernel, connections), atol=1e-4
    )


def test_dense_and_sparse_paths_agree(rng):
    x, kernel, connections, strides, padding, dilations = make_case(
        rng, (2, 9, 12, 6, 5, 5, 3, 3, (2, 1), (1, 1), "SAME")
    )
    expected = np_conv2d(x, kernel, connections, strides, padding, dilations)
    results = []
    for mode in ("dense", "sparse", "auto"):
        xt, kt = tf.constant(x), tf.constant(kernel)
        with tsc.ops.channel_sparse_implementation(mode), tsc.ops.explain() as calls:
            with tf.GradientTape() as tape:
                tape.watch([xt, kt])
                y = tsc.ops.channel_sparse_conv2d(xt, kt, connections, strides, padding)
        if mode != "auto":  # a forced path is respected
            assert calls[-1].implementation == {"dense": "dense", "sparse": "compiled"}[mode], calls
            assert f"channel_sparse_implementation('{mode}')" in calls[-1].reason
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
        results.append(tape.gradient(y, [xt, kt]))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    with tsc.ops.channel_sparse_implementation("dense"):
        assert tsc.ops.channel_sparse_conv2d(tf.zeros((0, 4, 4, 6)), kernel, connections).shape == (
            0,
            4,
            4,
            5,
        )


def test_random_connections():
    c = tsc.ops.random_connections(10, 7, density=0.3, seed=3)
    assert c.shape == (7, 3) and c.dtype == np.int32
    assert all(len(set(row)) == 3 for row in c)
    assert set(c.ravel()) == set(range(10))  # 21 >= 10: every input channel is used
    np.testing.assert_array_equal(c, tsc.ops.random_connections(10, 7, density=0.3, seed=3))
    assert not np.array_equal(c, tsc.ops.random_connections(10, 7, density=0.3, seed=4))
    assert tsc.ops.random_connections(5, 4, fan_in=5).tolist() == [list(range(5))] * 4
    for cin, cout, m in [(64, 64, 16), (7, 3, 2), (3, 50, 2), (128, 128, 1)]:
        c = tsc.ops.random_connections(cin, cout, fan_in=m, seed=m)
        assert all(len(set(row)) == m for row in c)
        if m * cout >= cin:
            assert set(c.ravel()) == set(range(cin))
    with pytest.raises(ValueError, match="`fan_in` must be"):
        tsc.ops.random_connections(4, 4, fan_in=5)
    with pytest.raises(ValueError, match="`density` must be in"):
        tsc.ops.random_connections(4, 4, density=0)
    with pytest.raises(ValueError, match="exactly one"):
        tsc.ops.random_connections(4, 4)


def test_bad_input():
    x = tf.ones((1, 5, 5, 4))
    k = tf.ones((3, 3, 2, 3))
    good = np.array([[0, 1], [1, 2], [2, 3]], np.int32)
    with pytest.raises(ValueError, match="`connections` shape"):
        tsc.ops.channel_sparse_conv2d(x, k, good[:2])
    with pytest.raises(ValueError, match="`x` must be \\[B, H, W, Cin\\]"):
        tsc.ops.channel_sparse_conv2d(tf.ones((5, 5, 4)), k, good)
    with pytest.raises(ValueError, match="`kernel` dtype"):
        tsc.ops.channel_sparse_conv2d(x, tf.ones((3, 3, 2, 3), tf.float64), good)
    with pytest.raises(ValueError, match="`strides`"):
        tsc.ops.channel_sparse_conv2d(x, k, good, strides=0)
    with pytest.raises(ValueError, match="`padding`"):
        tsc.ops.channel_sparse_conv2d(x, k, good, padding="FULL")
    with pytest.raises(ValueError, match="fan-in m = 2 is larger"):
        tsc.ops.channel_sparse_conv2d(tf.ones((1, 5, 5, 1)), k, good)
    # Constant connection lists are checked in Python, before graph building ...
    with pytest.raises(ValueError, match=r"`connections` values must be in \[0, 4\), got 4"):
        tsc.ops.channel_sparse_conv2d(x, k, np.array([[0, 1], [1, 4], [2, 3]], np.int32))
    with pytest.raises(ValueError, match="got -1"):
        tsc.ops.channel_sparse_conv2d(x, k, np.array([[0, 1], [-1, 2], [2, 3]], np.int32))
    with pytest.raises(ValueError, match="row 1 lists an input channel twice"):
        tsc.ops.channel_sparse_conv2d(x, k, np.array([[0, 1], [2, 2], [2, 3]], np.int32))
    lib = load_library()
    # ... and any connection tensor by the CPU kernel at run time. On the GPU the connections
    # stay in device memory, unchecked (README, "Validation on GPU"):
    # test_gpu_connection_values_are_not_checked.
    with tf.device("/CPU:0"):
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"connections\[1, 1\] = 4 is out of range"):
            lib.tf_sparse_conv_channel_sparse_conv2d(x, k, np.array([[0, 1], [1, 4], [2, 3]], np.int32))
        with pytest.raises(tf.errors.InvalidArgumentError, match="out of range"):
            lib.tf_sparse_conv_channel_sparse_conv2d(x, k, np.array([[0, 1], [-1, 2], [2, 3]], np.int32))
        with pytest.raises(tf.errors.InvalidArgumentError, match="lists input channel 2 twice"):
            lib.tf_sparse_conv_channel_sparse_conv2d(x, k, np.array([[0, 1], [2, 2], [2, 3]], np.int32))

        @tf.function(input_signature=[tf.TensorSpec([3, 2], tf.int32)])
        def dynamic(connections):
            return tsc.ops.channel_sparse_conv2d(x, k, connections)

        with pytest.raises(tf.errors.InvalidArgumentError, match="lists input channel 2 twice"):
            dynamic(tf.constant([[0, 1], [2, 2], [2, 3]]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="grad must have the output shape"):
        lib.tf_sparse_conv_channel_sparse_conv2d_backprop_input([1, 5, 5, 4], k, good, tf.ones((1, 4, 4, 3)))
    with pytest.raises(tf.errors.InvalidArgumentError, match="input_sizes must be"):
        lib.tf_sparse_conv_channel_sparse_conv2d_backprop_input([1, 5, 5], k, good, tf.ones((1, 5, 5, 3)))
    with pytest.raises(tf.errors.InvalidArgumentError, match="strides must be 2 positive"):
        lib.tf_sparse_conv_channel_sparse_conv2d(x, k, good, strides=[1, 0])


GPU_VISIBLE = bool(tf.config.list_physical_devices("GPU"))


@pytest.mark.skipif(not GPU_VISIBLE, reason="TensorFlow sees no GPU")
def test_gpu_connection_values_are_not_checked(rng):
    """On the GPU (README, "Validation on GPU") connection values are not checked: an entry
    outside [0, Cin) contributes nothing (never an out-of-bounds access), and each entry of a
    repeated channel contributes, in the forward op and both gradient ops."""
    lib = load_library()
    x = rng.standard_normal((2, 9, 8, 4)).astype(np.float32)
    kernel = rng.standard_normal((3, 3, 2, 4)).astype(np.float32)
    bad = np.array([[0, 1], [1, 4], [-1, 2], [2, 2]], np.int32)  # too large, negative, repeated
    valid = (bad >= 0) & (bad < 4)
    dense = np.zeros((3, 3, 4, 4), np.float32)
    for o, e in zip(*np.nonzero(valid)):
        dense[:, :, bad[o, e], o] += kernel[:, :, e, o]
    with tf.device("/GPU:0"):
        xt, kt, ct = tf.constant(x), tf.constant(kernel), tf.constant(bad)
        with tf.GradientTape() as tape:
            tape.watch([xt, kt])
            y = lib.tf_sparse_conv_channel_sparse_conv2d(xt, kt, ct)
        dy = tf.constant(rng.standard_normal(y.shape).astype(np.float32))
        dx, dk = tape.gradient(y, [xt, kt], output_gradients=dy)
    assert y.device.endswith("GPU:0")
    with tf.device("/CPU:0"):
        xt, dt = tf.constant(x), tf.constant(dense)
        with tf.GradientTape() as tape:
            tape.watch([xt, dt])
            expected = tf.nn.conv2d(xt, dt, 1, "SAME")
        dx_expected, ddense = tape.gradient(expected, [xt, dt], output_gradients=dy)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dx_expected, rtol=1e-5, atol=1e-5)
    dk_expected = np.zeros_like(kernel)
    for o, e in zip(*np.nonzero(valid)):
        dk_expected[:, :, e, o] = ddense.numpy()[:, :, bad[o, e], o]
    np.testing.assert_allclose(dk, dk_expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(0, 2),
    h=st.integers(1, 9),
    w=st.integers(1, 40),
    cin=st.integers(1, 9),
    cout=st.integers(1, 6),
    kh=st.integers(1, 4),
    kw=st.integers(1, 4),
    sh=st.integers(1, 3),
    sw=st.integers(1, 3),
    dh=st.integers(1, 2),
    dw=st.integers(1, 2),
    padding=st.sampled_from(["SAME", "VALID"]),
    data=st.data(),
)
def test_fuzz_against_numpy(b, h, w, cin, cout, kh, kw, sh, sw, dh, dw, padding, data):
    m = data.draw(st.integers(1, cin))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    case = (b, h, w, cin, cout, m, kh, kw, (sh, sw), (dh, dw), padding)
    x, kernel, connections, strides, padding, dilations = make_case(rng, case)
    got = tsc.ops.channel_sparse_conv2d(x, kernel, connections, strides, padding, dilations)
    expected = np_conv2d(x, kernel, connections, strides, padding, dilations)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    if got.shape.num_elements():
        with tf.GradientTape(persistent=True) as tape:
            xt, kt = tf.constant(x), tf.constant(kernel)
            tape.watch([xt, kt])
            ours = tsc.ops.channel_sparse_conv2d(xt, kt, connections, strides, padding, dilations)
            ref = tsc.ops.channel_sparse_conv2d_reference(xt, kt, connections, strides, padding, dilations)
        for a, r in zip(tape.gradient(ours, [xt, kt]), tape.gradient(ref, [xt, kt])):
            np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4)
