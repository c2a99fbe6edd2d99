"""ChannelSparseConv1D/2D layers and channel_sparse_from_conv."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from layer_checks import check_layer_in_models, check_mixed_precision

import tf_sparseconv as tsc

pytestmark = pytest.mark.skipif(not tsc.ops.is_library_loaded(), reason="op library not built")


@pytest.fixture(autouse=True)
def _no_dense_dispatch(monkeypatch):
    """The compiled kernels, whatever the fan-in (see test_channel_sparse_ops.py)."""
    monkeypatch.setenv("TF_SPARSECONV_CHANNEL_SPARSE", "sparse")


def test_layer_matches_op_and_connections_round_trip(tmp_path):
    x = np.random.default_rng(0).standard_normal((2, 9, 11, 12)).astype(np.float32)
    layer = tsc.layers.ChannelSparseConv2D(10, 3, density=0.25, connection_seed=7, activation="relu")
    y = layer(x)
    assert layer.connections.shape == (10, 3) and layer.kernel.shape == (3, 3, 3, 10)
    expected = tsc.ops.channel_sparse_conv2d(x, layer.kernel, layer.connections) + layer.bias
    np.testing.assert_allclose(y, tf.nn.relu(expected), atol=1e-5)
    np.testing.assert_array_equal(layer.connections, tsc.ops.random_connections(12, 10, density=0.25, seed=7))
    model = keras.Sequential([keras.Input((9, 11, 12)), layer])
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.layers[0].connections, layer.connections)
    np.testing.assert_allclose(loaded(x), y, atol=1e-6)
    config = layer.get_config()
    assert config["connections"] == layer.connections.tolist() and config["density"] is None


@pytest.mark.parametrize("activation", ["relu", None, "tanh"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_bias_and_activation_fused_into_the_op_when_possible(activation, use_bias):
    """With a bias and relu/linear, the layer calls ChannelSparseConv2DBiasActivation; other
    activations (or no bias) run the plain op and Keras' bias_add/activation. Same outputs."""
    x = np.random.default_rng(1).standard_normal((2, 7, 9, 12)).astype(np.float32)
    layer = tsc.layers.ChannelSparseConv2D(
        6, 3, fan_in=3, activation=activation, use_bias=use_bias, bias_initializer="random_normal"
    )
    y = layer(x)
    expected = tsc.ops.channel_sparse_conv2d(x, layer.kernel, layer.connections)
    if use_bias:
        expected = expected + layer.bias
    expected = keras.activations.get(activation)(expected)
    np.testing.assert_allclose(y, expected, atol=1e-5)
    graph = tf.function(layer).get_concrete_function(tf.TensorSpec(x.shape)).graph
    types = {op.type for op in graph.get_operations()}
    fused = use_bias and activation != "tanh"
    assert ("TfSparseConv>ChannelSparseConv2DBiasActivation" in types) == fused, types
    assert ("TfSparseConv>ChannelSparseConv2D" in types) == (not fused), types


@pytest.mark.parametrize(
    ("initializer", "expected_std"),
    [
        # he_normal: sqrt(2 / fan_in) with the real fan-in 3*3*8 (not 3*3*256).
        ("he_normal", np.sqrt(2 / 72)),
        # glorot: sqrt(2 / (fan_in + fan_out)) with the real fan-out 3*3*8*256/256 = 72,
        # not the kernel shape's 3*3*256.
        ("glorot_uniform", np.sqrt(2 / (72 + 72))),
    ],
)
def test_fan_aware_initialisation(initializer, expected_std):
    layer = tsc.layers.ChannelSparseConv2D(256, 3, fan_in=8, kernel_initializer=initializer)
    layer.build((None, 16, 16, 256))
    std = float(np.std(layer.kernel.numpy()))
    assert abs(std - expected_std) / expected_std < 0.1
    assert layer.get_config()["kernel_initializer"]["class_name"] == initializer.title().replace("_", "")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("make_layer", "shape"),
    [
        (lambda **kw: tsc.layers.ChannelSparseConv2D(6, 3, density=0.5, **kw), (6, 5, 3)),
        (
            lambda **kw: tsc.layers.ChannelSparseConv2D(
                4, (2, 3), fan_in=3, strides=2, padding="valid", **kw
            ),
            (7, 6, 3),
        ),
        (lambda **kw: tsc.layers.ChannelSparseConv1D(5, 3, fan_in=2, dilation_rate=2, **kw), (9, 4)),
    ],
    ids=["conv2d-density", "conv2d-strided-valid", "conv1d-dilated"],
)
def test_layer_in_models(make_layer, shape, tmp_path):
    check_layer_in_models(make_layer, shape, tmp_path)


def test_mixed_precision():
    check_mixed_precision(lambda **kw: tsc.layers.ChannelSparseConv2D(4, 3, fan_in=2, **kw), (5, 6, 4))


@pytest.mark.parametrize("rank", [1, 2])
def test_channel_sparse_from_conv(rank):
    rng = np.random.default_rng(rank)
    conv_cls = keras.layers.Conv2D if rank == 2 else keras.layers.Conv1D
    shape = (2, 10, 12, 8) if rank == 2 else (2, 30, 8)
    conv = conv_cls(6, 3, padding="same", strides=1, dilation_rate=2, activation="relu")
    x = rng.standard_normal(shape).astype(np.float32)
    conv(x)
    connections = tsc.ops.random_connections(8, 6, fan_in=3, seed=1)
    # Zero every kernel slice the connections drop: the conversion is then exact.
    kernel = conv.kernel.numpy()
    mask = np.zeros(kernel.shape[-2:], bool)
    for o, row in enumerate(connections):
        mask[row, o] = True
    conv.kernel.assign(kernel * mask)
    sparse = tsc.layers.channel_sparse_from_conv(conv, connections)
    assert type(sparse).__name__ == ("ChannelSparseConv2D" if rank == 2 else "ChannelSparseConv1D")
    np.testing.assert_allclose(sparse(x), conv(x), atol=1e-5)
    assert sparse.kernel.shape[-2:] == (3, 6)
    with pytest.raises(ValueError, match="Conv2D or Conv1D"):
        tsc.layers.channel_sparse_from_conv(keras.layers.Dense(3), connections)


def test_bad_arguments():
    with pytest.raises(ValueError, match="exactly one of"):
        tsc.layers.ChannelSparseConv2D(4, 3)
    with pytest.raises(ValueError, match="exactly one of"):
        tsc.layers.ChannelSparseConv2D(4, 3, density=0.5, fan_in=2)
    with pytest.raises(ValueError, match="`filters`"):
        tsc.layers.ChannelSparseConv2D(0, 3, density=0.5)
    with pytest.raises(ValueError, match="`kernel_size`"):
        tsc.layers.ChannelSparseConv2D(4, (3, 3, 3), density=0.5)
    with pytest.raises(ValueError, match="`padding`"):
        tsc.layers.ChannelSparseConv1D(4, 3, density=0.5, padding="causal")
    with pytest.raises(ValueError, match="lists an input channel twice"):
        tsc.layers.ChannelSparseConv2D(2, 3, connections=[[0, 0], [1, 2]])
    with pytest.raises(ValueError, match=r"`connections` must be an int array of shape \[filters=3"):
        tsc.layers.ChannelSparseConv2D(3, 3, connections=[[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="refer to input channel 5"):
        tsc.layers.ChannelSparseConv2D(2, 3, connections=[[0, 5], [1, 2]])(tf.ones((1, 4, 4, 3)))
