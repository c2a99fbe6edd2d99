"""The channel-sparse convolution's per-shape choice between the sparse kernel and the dense
convolution (`_autotune`), and the dense-kernel ops behind the dense path."""

import numpy as np
import pytest
import tensorflow as tf

import tf_sparseconv as tsc
from tf_sparseconv.python.ops import _autotune, channel_sparse_ops

pytestmark = pytest.mark.skipif(not tsc.ops.is_library_loaded(), reason="op library not built")

DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch):
    monkeypatch.delenv(_autotune.ENV_VAR, raising=False)
    _autotune.clear_choices()
    yield
    _autotune.clear_choices()


def _np_dense(kernel, connections, cin):
    dense = np.zeros((*kernel.shape[:-2], cin, kernel.shape[-1]), kernel.dtype)
    for o, row in enumerate(connections):
        dense[..., row, o] = kernel[..., :, o]
    return dense


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("window", [(3, 3), (5,), ()])
def test_dense_kernel_and_gather_match_numpy(rng, dtype, window):
    cin, cout, m = 11, 7, 4
    kernel = rng.standard_normal((*window, m, cout)).astype(np.float32)
    connections = tsc.ops.random_connections(cin, cout, fan_in=m, seed=3)
    kt = tf.cast(kernel, dtype)
    dense = tsc.ops.dense_kernel(kt, connections, cin)
    assert dense.dtype == dtype and dense.shape == (*window, cin, cout)
    np.testing.assert_array_equal(dense.numpy(), _np_dense(kt.numpy(), connections, cin))
    with tsc.ops.references_only():
        np.testing.assert_array_equal(tsc.ops.dense_kernel(kt, connections, cin).numpy(), dense.numpy())
    library = tsc.ops.load_library()
    dense_values = tf.cast(rng.standard_normal((*window, cin, cout)), dtype)
    gathered = library.tf_sparse_conv_channel_sparse_gather_kernel(dense_values, connections)
    expected = np.take_along_axis(
        dense_values.numpy(), np.broadcast_to(connections.T, (*window, m, cout)), -2
    )
    np.testing.assert_array_equal(gathered.numpy(), expected)


def test_dense_kernel_gradients_float64(rng):
    connections = tsc.ops.random_connections(9, 6, fan_in=4, seed=1)
    library = tsc.ops.load_library()
    kernel = tf.constant(rng.standard_normal((3, 2, 4, 6)))
    theoretical, numerical = tf.test.compute_gradient(
        lambda k: tsc.ops.dense_kernel(k, connections, 9), [kernel]
    )
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=1e-9)
    dense = tf.constant(rng.standard_normal((3, 2, 9, 6)))
    theoretical, numerical = tf.test.compute_gradient(
        lambda d: library.tf_sparse_conv_channel_sparse_gather_kernel(d, connections), [dense]
    )
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=1e-9)


@pytest.mark.parametrize(
    "connections, message",
    [
        ([[0, 9]], r"connections\[0, 1\] = 9 is not in \[0, 9\)"),
        ([[2, 2]], "twice"),
        ([[-1, 1]], "is not in"),
    ],
)
def test_dense_kernel_rejects_bad_connections(connections, message):
    library = tsc.ops.load_library()
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        library.tf_sparse_conv_channel_sparse_dense_kernel(tf.ones((3, 2, 1)), connections, in_channels=9)
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        library.tf_sparse_conv_channel_sparse_gather_kernel(tf.ones((3, 9, 1)), connections)
    with pytest.raises(tf.errors.InvalidArgumentError, match="connections must be"):
        library.tf_sparse_conv_channel_sparse_dense_kernel(tf.ones((3, 2, 2)), [[0, 1]], in_channels=9)


def test_dense_kernel_empty():
    library = tsc.ops.load_library()
    assert tsc.ops.dense_kernel(tf.zeros((3, 3, 2, 0)), np.zeros((0, 2), np.int32), 5).shape == (3, 3, 5, 0)
    assert library.tf_sparse_conv_channel_sparse_gather_kernel(tf.zeros((0, 5, 2)), [[0], [4]]).shape == (
        0,
        1,
        2,
    )


def _case(rng, batch=2, size=10, cin=12, cout=8, m=6):
    x = tf.constant(rng.standard_normal((batch, size, size, cin)).astype(np.float32))
    kernel = tf.constant(rng.standard_normal((3, 3, m, cout)).astype(np.float32))
    return x, kernel, tsc.ops.random_connections(cin, cout, fan_in=m, seed=m)


@pytest.mark.parametrize("faster", ["dense", "sparse"])
def test_auto_takes_the_measured_faster_path_and_caches_it(rng, monkeypatch, faster):
    calls_to_time = []

    def fake_time(candidates, rounds, budget_s):
        calls_to_time.append(sorted(candidates))
        for fn in candidates.values():  # both candidates really run on the call's shape
            assert fn().shape == (2, 10, 10, 8)
        return {"dense": 1.0, "sparse": 2.0} if faster == "dense" else {"dense": 2.0, "sparse": 1.0}

    monkeypatch.setattr(_autotune, "_time", fake_time)
    x, kernel, connections = _case(rng)
    with tsc.ops.explain() as calls:
        first = tsc.ops.channel_sparse_conv2d(x, kernel, connections)
        second = tf.function(lambda x, k: tsc.ops.channel_sparse_conv2d(x, k, tf.constant(connections)))(
            x, kernel
        )
    assert calls_to_time == [["dense", "sparse"]]  # measured once, then cached (also when traced)
    expected = "dense" if faster == "dense" else "compiled"
    assert [c.implementation for c in calls] == [expected, expected], calls
    assert "measured now" in calls[0].reason and "cached" in calls[1].reason
    with tsc.ops.references_only():
        reference = tsc.ops.channel_sparse_conv2d(x, kernel, connections)
    np.testing.assert_allclose(first, reference, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(second, reference, rtol=1e-4, atol=1e-4)


def test_auto_measures_for_real_and_outputs_agree(rng):
    x, kernel, connections = _case(rng, batch=1, size=12, cin=16, cout=16, m=8)
    with tsc.ops.explain() as calls:
        y = tsc.ops.channel_sparse_conv2d(x, kernel, connections)
    (key, (best, times)) = next(iter(_autotune.choices().items()))
    assert best in ("dense", "sparse") and set(times) == {"dense", "sparse"}
    assert all(0 < t < 1e4 for t in times.values()) and best == min(times, key=times.get)
    assert calls[0].implementation == ("dense" if best == "dense" else "compiled")
    assert key[3] == (1, 12, 12, 16) and key[4] == (3, 3, 8, 16)
    for mode in ("dense", "sparse"):
        with tsc.ops.channel_sparse_implementation(mode):
            np.testing.assert_allclose(
                tsc.ops.channel_sparse_conv2d(x, kernel, connections), y, rtol=1e-4, atol=1e-4
            )


def test_unknown_batch_is_measured_at_the_autotune_batch(rng, monkeypatch):
    monkeypatch.setattr(_autotune, "_time", lambda c, r, b: {"dense": 1.0, "sparse": 2.0})
    _, kernel, connections = _case(rng)
    f = tf.function(lambda x: tsc.ops.channel_sparse_conv2d(x, kernel, connections))
    f.get_concrete_function(tf.TensorSpec([None, 10, 10, 12]))
    (key,) = _autotune.choices()
    assert key[3] == (channel_sparse_ops.AUTOTUNE_BATCH, 10, 10, 12)


def test_no_dense_form_where_it_does_not_apply(rng):
    x, kernel, connections = _case(rng)
    with tsc.ops.channel_sparse_implementation("dense"), tsc.ops.explain() as calls:
        y = tsc.ops.channel_sparse_conv2d(x, kernel, connections, dilations=2)
        tf.function(lambda c: tsc.ops.channel_sparse_conv2d(x, kernel, c))(tf.constant(connections))
    assert [c.implementation for c in calls] == ["compiled", "compiled"]
    assert "dilations (2, 2)" in calls[0].reason and "not constant" in calls[1].reason
    expected = tsc.ops.channel_sparse_conv2d_reference(x, kernel, connections, dilations=2)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_conv1d_and_layer_follow_the_choice(rng):
    x = rng.standard_normal((2, 20, 12)).astype(np.float32)
    layer = tsc.layers.ChannelSparseConv1D(8, 3, fan_in=6, padding="same")
    outputs = {}
    for mode in ("sparse", "dense"):
        with tsc.ops.channel_sparse_implementation(mode), tsc.ops.explain() as calls:
            outputs[mode] = layer(x)
        assert calls[-1].implementation == {"sparse": "compiled", "dense": "dense"}[mode]
    np.testing.assert_allclose(outputs["sparse"], outputs["dense"], rtol=1e-4, atol=1e-4)


def test_mode_validation(monkeypatch):
    with pytest.raises(ValueError, match="`mode` must be one of"):
        with tsc.ops.channel_sparse_implementation("fast"):
            pass
    monkeypatch.setenv(_autotune.ENV_VAR, "cudnn")
    with pytest.raises(ValueError, match=_autotune.ENV_VAR):
        _autotune.current_mode()
    monkeypatch.setenv(_autotune.ENV_VAR, "Dense")
    assert _autotune.current_mode() == "dense"
    with tsc.ops.channel_sparse_implementation("sparse"):
        assert _autotune.current_mode() == "sparse"
    assert _autotune.current_mode() == "dense"


def test_dense_kernel_op_reuses_its_last_result_only_for_the_same_inputs(rng):
    """The CPU op keeps its last result for a repeated kernel (inference); any change rebuilds."""
    library = tsc.ops.load_library()
    connections = tsc.ops.random_connections(10, 6, fan_in=3, seed=4)
    other = tsc.ops.random_connections(10, 6, fan_in=3, seed=5)
    a = rng.standard_normal((3, 3, 3, 6)).astype(np.float32)
    b = a.copy()
    b[1, 2, 0, 5] += 1.0  # one element differs
    build = tf.function(lambda k, c: library.tf_sparse_conv_channel_sparse_dense_kernel(k, c, in_channels=10))
    for kernel, conn in [(a, connections), (a, connections), (b, connections), (a, connections), (a, other)]:
        np.testing.assert_array_equal(
            build(tf.constant(kernel), tf.constant(conn)), _np_dense(kernel, conn, 10)
        )


def test_group_structure():
    lists = tsc.ops.random_connections(16, 3, fan_in=4, seed=0)
    groups, order = channel_sparse_ops._groups(np.repeat(lists, 4, axis=0))
    assert groups == 3 and order.tolist() == lists.reshape(-1).tolist()
    assert channel_sparse_ops._groups(np.repeat(lists, 2, axis=0)) is None  # groups smaller than 4
    uneven = np.concatenate([np.repeat(lists[:1], 4, 0), np.repeat(lists[1:2], 8, 0)])
    assert channel_sparse_ops._groups(uneven) is None
    interleaved = np.tile(lists, (4, 1))  # equal rows, not consecutive
    assert channel_sparse_ops._groups(interleaved) is None
    groups, order = channel_sparse_ops._groups(np.repeat(lists[:1], 8, 0))  # one group: all rows equal
    assert groups == 1 and order.tolist() == lists[0].tolist()


@pytest.mark.parametrize(
    "cin, strides, padding",
    [(16, 1, "SAME"), (12, 2, "VALID"), (264, (2, 1), "SAME")],
    ids=["same", "valid-s2", "gather"],
)
def test_grouped_path_matches_the_sparse_kernel(rng, cin, strides, padding):
    m, groups, group_size = 4, 3, 4
    lists = tsc.ops.random_connections(cin, groups, fan_in=m, seed=cin)
    connections = np.repeat(lists, group_size, axis=0)
    x = tf.constant(rng.standard_normal((2, 7, 9, cin)).astype(np.float32))
    kernel = tf.constant(rng.standard_normal((3, 3, m, groups * group_size)).astype(np.float32))
    bias = tf.constant(rng.standard_normal(groups * group_size).astype(np.float32))
    results = {}
    for mode in ("sparse", "grouped"):
        with tsc.ops.channel_sparse_implementation(mode), tsc.ops.explain() as calls:
            with tf.GradientTape() as tape:
                tape.watch([x, kernel])
                y = tsc.ops.channel_sparse_conv2d(
                    x, kernel, connections, strides, padding, bias=bias, activation="relu"
                )
        assert calls[-1].implementation == {"sparse": "compiled", "grouped": "grouped"}[mode]
        results[mode] = (y, *tape.gradient(y, [x, kernel]))
    for a, b in zip(results["sparse"], results["grouped"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_grouped_path_only_where_it_applies(rng):
    x, kernel, connections = _case(rng)  # random lists: no groups
    with tsc.ops.channel_sparse_implementation("grouped"), tsc.ops.explain() as calls:
        tsc.ops.channel_sparse_conv2d(x, kernel, connections)
    assert calls[-1].implementation == "compiled" and "grouped form does not apply" in calls[-1].reason


@pytest.mark.parametrize("mode", ["auto", "dense", "grouped", "sparse"])
def test_empty_inputs_keep_their_shape_on_every_path(mode):
    lists = tsc.ops.random_connections(16, 2, fan_in=4, seed=0)
    connections, kernel = np.repeat(lists, 4, axis=0), tf.zeros([3, 3, 4, 8])
    traced = tf.function(lambda x: tsc.ops.channel_sparse_conv2d(x, kernel, connections))
    with tsc.ops.channel_sparse_implementation(mode):
        for shape, expected in [((2, 0, 6, 16), (2, 0, 6, 8)), ((0, 6, 6, 16), (0, 6, 6, 8))]:
            assert tsc.ops.channel_sparse_conv2d(tf.zeros(shape), kernel, connections).shape == expected
            assert traced(tf.zeros(shape)).shape == expected


def test_no_grouped_float64_on_the_cpu(rng):
    """TensorFlow has no CPU gradient for grouped float64 convolutions: that call stays sparse."""
    lists = tsc.ops.random_connections(16, 2, fan_in=4, seed=0)
    x = tf.constant(rng.standard_normal((2, 6, 6, 16)))
    kernel = tf.constant(rng.standard_normal((3, 3, 4, 8)))
    with (
        tsc.ops.channel_sparse_implementation("grouped"),
        tsc.ops.explain() as calls,
        tf.GradientTape() as tape,
    ):
        tape.watch(x)
        y = tsc.ops.channel_sparse_conv2d(x, kernel, np.repeat(lists, 4, axis=0))
    assert tape.gradient(y, x).shape == x.shape
    assert calls[-1].implementation == "compiled" and "float64" in calls[-1].reason


def test_op_determinism_uses_the_fixed_rule(rng, monkeypatch):
    monkeypatch.setattr(channel_sparse_ops, "_op_determinism_enabled", lambda: True)
    monkeypatch.setattr(_autotune, "_time", lambda *a: pytest.fail("timed under op determinism"))
    x, kernel, connections = _case(rng, cin=12, m=6)  # fan-in 1/2: above the rule's threshold
    with tsc.ops.explain() as calls:
        tsc.ops.channel_sparse_conv2d(x, kernel, connections)
    assert calls[-1].implementation == "dense" and "op determinism" in calls[-1].reason
    assert not _autotune.choices()


def test_a_failing_candidate_is_left_out(rng, monkeypatch):
    x, kernel, connections = _case(rng)

    def broken(*args, **kwargs):
        raise tf.errors.ResourceExhaustedError(None, None, "out of memory while timing")

    monkeypatch.setattr(channel_sparse_ops, "_dense_conv2d", broken)
    with tsc.ops.explain() as calls:
        y = tsc.ops.channel_sparse_conv2d(x, kernel, connections)
    assert calls[-1].implementation == "compiled" and "dense" not in calls[-1].reason.split("(")[-1]
    np.testing.assert_allclose(y, tsc.ops.channel_sparse_conv2d_reference(x, kernel, connections), atol=1e-4)


def test_choices_are_keyed_by_the_device_the_call_runs_on(rng, monkeypatch):
    monkeypatch.setattr(_autotune, "_time", lambda c, r, b: {"dense": 1.0, "sparse": 2.0})
    x, kernel, connections = _case(rng)
    with tf.device("/CPU:0"):
        xc = tf.identity(x)
    tsc.ops.channel_sparse_conv2d(xc, kernel, connections)
    (key,) = _autotune.choices()
    assert "CPU:0" in key[1]
