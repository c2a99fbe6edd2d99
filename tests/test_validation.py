"""One validation rule in every family (issue 16): integer arguments accept Python and NumPy
integers, and reject bools, floats (`2.5` and `2.0`) and strings with a ValueError naming
the argument; padding and connection lists are checked the same way in ops and layers."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import tf_sparseconv as tsc
from tf_sparseconv.python import _validation

X = np.ones((1, 6, 6, 4), np.float32)
K = np.ones((3, 3, 2, 3), np.float32)
CONN = np.array([[0, 1], [1, 2], [2, 3]], np.int32)


def test_int_tuple_rule():
    assert _validation.int_tuple(np.int64(2), 2, "strides") == (2, 2)
    assert _validation.int_tuple((np.int32(2), 3), 2, "strides") == (2, 3)
    assert all(type(v) is int for v in _validation.int_tuple((np.int64(2), 3), 2, "strides"))
    for bad in ((2.5, 3), (2.0, 3), True, (True, 1), "2", (2,), (2, 3, 4), None, 0, (1, -1), 2**31):
        with pytest.raises(ValueError, match="`strides`"):
            _validation.int_tuple(bad, 2, "strides")
    assert _validation.int_tuple((-1, 0), 2, "offset", minimum=None) == (-1, 0)


def test_integer_rule():
    assert _validation.positive_int(np.int64(3), "filters") == 3
    assert type(_validation.positive_int(np.int64(3), "filters")) is int
    assert _validation.positive_int(None, "k", allow_none=True) is None
    for bad in (2.5, 2.0, True, 0, "3", None, np.float32(1.5)):
        with pytest.raises(ValueError, match="`filters` must be an integer >= 1"):
            _validation.positive_int(bad, "filters")
    assert _validation.integer(np.int8(4), "bits", minimum=2, maximum=8) == 4
    with pytest.raises(ValueError, match=r"`bits` must be an integer in \[2, 8\]"):
        _validation.integer(9, "bits", minimum=2, maximum=8)


def test_padding_and_connections_rule():
    assert _validation.padding("SAME") == "same"
    assert _validation.padding("valid", upper=True) == "VALID"
    for bad in ("full", None, 1):
        with pytest.raises(ValueError, match="`padding`"):
            _validation.padding(bad)
    assert _validation.connection_lists(CONN.astype(np.int64), rows=3, in_channels=4).dtype == np.int32
    with pytest.raises(ValueError, match="row 1 lists an input channel twice"):
        _validation.connection_lists([[0, 1], [2, 2]])
    with pytest.raises(ValueError, match=r"values must be in \[0, 4\), got 4"):
        _validation.connection_lists([[0, 4]], in_channels=4)
    with pytest.raises(ValueError, match=r"shape \[filters=2, m\]"):
        _validation.connection_lists([[0, 1]], rows=2)
    with pytest.raises(ValueError, match="int array"):
        _validation.connection_lists([[0.0, 1.0]])


def test_ops_accept_numpy_integers_and_reject_fractions():
    y = tsc.ops.channel_sparse_conv2d(X, K, CONN, strides=np.int64(2))
    np.testing.assert_array_equal(y, tsc.ops.channel_sparse_conv2d(X, K, CONN, strides=2))
    with pytest.raises(ValueError, match="`strides`"):
        tsc.ops.channel_sparse_conv2d(X, K, CONN, strides=(2.5, 2))
    with pytest.raises(ValueError, match="`padding`"):
        tsc.ops.block_sparse_conv2d(X, np.ones((3, 3, 4, 2), np.float32), X[..., 0], 2, padding="full")
    np.testing.assert_array_equal(tsc.ops.kwinners(X, np.int64(2)), tsc.ops.kwinners(X, 2))
    with pytest.raises(ValueError, match="`k`"):
        tsc.ops.kwinners(X, 2.5)
    c = tsc.ops.random_connections(np.int64(6), np.int32(4), fan_in=np.int64(2))
    assert c.shape == (4, 2)
    with pytest.raises(ValueError, match="`fan_in`"):
        tsc.ops.random_connections(6, 4, fan_in=2.5)


@pytest.mark.parametrize(
    "make",
    [
        lambda v: tsc.layers.ChannelSparseConv2D(4, kernel_size=v, fan_in=1),
        lambda v: tsc.layers.BlockSparseConv2D(4, kernel_size=v, block_size=4),
        lambda v: tsc.layers.SparseConv2D(4, kernel_size=v),
        lambda v: tsc.layers.SparseConvTranspose2D(4, kernel_size=v),
    ],
)
def test_layers_kernel_size(make):
    assert make((np.int64(3), 3)).kernel_size == (3, 3)
    assert make(np.int32(3)).kernel_size == (3, 3)
    with pytest.raises(ValueError, match="`kernel_size`"):
        make((2.5, 3))
    with pytest.raises(ValueError, match="`kernel_size`"):
        make(True)


def test_layers_counts():
    assert tsc.layers.ChannelSparseConv2D(np.int64(4), 3, fan_in=np.int64(2)).fan_in == 2
    assert tsc.layers.KWinners(k=np.int64(2)).k == 2
    assert tsc.layers.TopKAttention(k=np.int32(2)).k == 2
    for make in (
        lambda: tsc.layers.ChannelSparseConv2D(2.5, 3, fan_in=1),
        lambda: tsc.layers.ChannelSparseConv2D(4, 3, fan_in=1.5),
        lambda: tsc.layers.KWinners(k=2.5),
        lambda: tsc.layers.SparseConv2D(True, 3),
    ):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            make()
    with pytest.raises(ValueError, match="`padding`"):
        tsc.layers.ChannelSparseConv2D(4, 3, fan_in=1, padding="causal")


def test_streaming_pruning_quantization():
    layer = tsc.streaming.StreamingConv1D(np.int64(4), np.int64(3), dilation_rate=np.int32(2))
    assert (layer.filters, layer.kernel_size, layer.dilation_rate) == (4, 3, 2)
    with pytest.raises(ValueError, match="`strides`"):
        tsc.streaming.StreamingConv1D(4, 3, strides=1.5)

    schedule = tsc.pruning.ConstantSparsity(0.5, begin_step=np.int64(2), frequency=np.int32(10))
    assert (schedule.begin_step, schedule.frequency) == (2, 10)
    with pytest.raises(ValueError, match="`begin_step`"):
        tsc.pruning.ConstantSparsity(0.5, begin_step=2.5, end_step=10)
    wrapped = tsc.pruning.prune_low_magnitude(
        keras.layers.Dense(4), granularity="block", block_shape=(np.int64(2), 2)
    )
    assert wrapped.block_shape == (2, 2)
    with pytest.raises(ValueError, match="`block_shape`"):
        tsc.pruning.prune_low_magnitude(keras.layers.Dense(4), granularity="block", block_shape=(2.5, 2))
    with pytest.raises(ValueError, match="`update_freq`"):
        tsc.pruning.PruningSummaries("/tmp", update_freq=2.5)

    q = tsc.quantization.QuantizeWrapper(keras.layers.Dense(4), weight_bits=np.int64(4), seed=np.int64(1))
    assert (q.weight_bits, q.seed) == (4, 1)
    with pytest.raises(ValueError, match="`weight_bits`"):
        tsc.quantization.QuantizeWrapper(keras.layers.Dense(4), weight_bits=4.5)
    assert tsc.quantization.FinishWithNearestRounding(np.int64(2)).nearest_epochs == 2
    with pytest.raises(ValueError, match="`nearest_epochs`"):
        tsc.quantization.FinishWithNearestRounding(1.5)
