"""Keras layers BlockSparseConv2D and BlockSparseResidualBlock (called on [x, mask])."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import run_python
from keras.src.trainers.trainer import model_supports_jit
from layer_checks import check_config_round_trip

import tf_sparseconv as tsc


def _active_output(mask, block, stride, out_shape):
    """NumPy: which output positions lie in an active output block (any mask value > 0)."""
    b, h, w = mask.shape
    gh, gw = -(-h // block), -(-w // block)
    active = np.zeros((b, gh, gw), bool)
    for i in range(gh):
        for j in range(gw):
            active[:, i, j] = (mask[:, i * block : (i + 1) * block, j * block : (j + 1) * block] > 0).any(
                axis=(1, 2)
            )
    ob = block // stride
    up = active.repeat(ob, 1).repeat(ob, 2)
    full = np.zeros((b, *out_shape), bool)
    hh, ww = min(out_shape[0], up.shape[1]), min(out_shape[1], up.shape[2])
    full[:, :hh, :ww] = up[:, :hh, :ww]
    return full


@pytest.mark.parametrize("strides,padding", [(1, "same"), (2, "same"), (1, "valid"), (2, "valid")])
def test_conv_layer_equals_dense_conv_inside_active_blocks(rng, strides, padding):
    x = rng.standard_normal((2, 21, 19, 6)).astype(np.float32)
    mask = (rng.random((2, 21, 19)) > 0.93).astype(np.float32)
    layer = tsc.layers.BlockSparseConv2D(
        5,
        3,
        block_size=4,
        strides=strides,
        padding=padding,
        activation="tanh",
        bias_initializer="random_normal",
    )
    y = layer([x, mask]).numpy()
    dense = np.tanh(tf.nn.conv2d(x, layer.kernel, strides, padding.upper()).numpy() + layer.bias.numpy())
    assert y.shape == dense.shape == layer.compute_output_shape([x.shape, mask.shape])
    active = _active_output(mask, 4, strides, y.shape[1:3])
    assert 0 < active.mean() < 1
    np.testing.assert_allclose(y[active], dense[active], rtol=1e-5, atol=1e-5)
    assert not y[~active].any()


def test_residual_block_equals_dense_block_inside_active_blocks(rng):
    x = rng.standard_normal((2, 22, 17, 6)).astype(np.float32)
    mask = (rng.random((2, 22, 17)) > 0.95).astype(np.float32)
    layer = tsc.layers.BlockSparseResidualBlock(
        3, kernel_size=3, block_size=4, bias_initializer="random_normal"
    )
    z = layer([x, mask]).numpy()
    (k1, k2, k3), (b1, b2, b3) = layer.kernels, layer.biases
    h = tf.nn.relu(tf.nn.conv2d(x, k1, 1, "SAME") + b1)
    h = tf.nn.relu(tf.nn.conv2d(h, k2, 1, "SAME") + b2)
    full = x + (tf.nn.conv2d(h, k3, 1, "SAME") + b3).numpy()
    active = _active_output(mask, 4, 1, x.shape[1:3])
    assert 0 < active.mean() < 1
    np.testing.assert_allclose(z[active], full[active], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(z[~active], x[~active])


def test_empty_mask_gives_zeros_and_identity(rng):
    x = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
    mask = np.zeros((2, 8, 8, 1), np.float32)
    assert not tsc.layers.BlockSparseConv2D(4, 3, block_size=4)([x, mask]).numpy().any()
    np.testing.assert_array_equal(tsc.layers.BlockSparseResidualBlock(2, block_size=4)([x, mask]).numpy(), x)


def test_bad_arguments():
    with pytest.raises(ValueError, match="block_size"):
        tsc.layers.BlockSparseConv2D(4, 3, block_size=5, strides=2)
    with pytest.raises(ValueError, match="filters"):
        tsc.layers.BlockSparseConv2D(0, 3)
    with pytest.raises(ValueError, match="padding"):
        tsc.layers.BlockSparseConv2D(4, 3, padding="full")
    with pytest.raises(ValueError, match=r"\[x, mask\]"):
        tsc.layers.BlockSparseConv2D(4, 3)(np.zeros((1, 8, 8, 2), np.float32))
    with pytest.raises(ValueError, match="mask"):
        tsc.layers.BlockSparseConv2D(4, 3)(
            [np.zeros((1, 8, 8, 2), np.float32), np.zeros((1, 9, 8), np.float32)]
        )
    with pytest.raises(ValueError, match="bottleneck_filters"):
        tsc.layers.BlockSparseResidualBlock(0)


@pytest.mark.parametrize("strides", [1, 2])
def test_layers_in_functional_model_fit_save_export(rng, tmp_path, strides):
    def make():
        return tsc.layers.BlockSparseConv2D(
            8, 3, block_size=8, strides=strides, padding="same", activation="relu"
        )

    check_config_round_trip(make())
    check_config_round_trip(tsc.layers.BlockSparseResidualBlock(4, block_size=8, threshold=0.1, avgpool=True))
    keras.utils.set_random_seed(0)
    image = keras.Input((16, 16, 3), name="image")
    mask = keras.Input((16, 16, 1), name="mask")
    h = keras.layers.Conv2D(8, 1)(image)
    h = tsc.layers.BlockSparseResidualBlock(4, block_size=8)([h, mask])
    h = make()([h, mask])
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model([image, mask], keras.layers.Dense(3, activation="softmax")(h))
    x = rng.standard_normal((24, 16, 16, 3)).astype(np.float32)
    m = (rng.random((24, 16, 16, 1)) > 0.9).astype(np.float32)
    y = rng.integers(0, 3, 24)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = model.fit([x, m], y, batch_size=8, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    assert all(not np.array_equal(b, w.numpy()) for b, w in zip(before, model.trainable_weights))
    assert model_supports_jit(model) is False

    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        loaded.predict([x, m], verbose=0), model.predict([x, m], verbose=0), rtol=1e-6, atol=1e-6
    )

    export_dir = os.path.join(tmp_path, "exported")
    model.export(export_dir, verbose=False)
    np.savez(os.path.join(tmp_path, "data.npz"), x=x, m=m, y=model.predict([x, m], verbose=0))
    run_python(
        f"""
import numpy as np, tensorflow as tf
import tf_sparseconv
assert tf_sparseconv.ops.is_library_loaded()
d = np.load({os.path.join(tmp_path, "data.npz")!r})
model = tf.saved_model.load({export_dir!r})
y = model.serve([tf.constant(d["x"]), tf.constant(d["m"])]).numpy()
np.testing.assert_allclose(y, d["y"], rtol=1e-5, atol=1e-6)
model.serve([tf.constant(d["x"][:5]), tf.constant(d["m"][:5])])
print("fresh-process export ok")
"""
    )


def test_mixed_precision(rng):
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    m = (rng.random((2, 16, 16)) > 0.9).astype(np.float32)
    conv = tsc.layers.BlockSparseConv2D(4, 3, block_size=8, dtype="mixed_float16")
    res = tsc.layers.BlockSparseResidualBlock(2, block_size=8, dtype="mixed_float16")
    y = conv([x, m])
    z = res([y, m])
    assert y.dtype == tf.float16 and z.dtype == tf.float16
    assert conv.kernel.dtype == "float32"
    ref = tsc.layers.BlockSparseConv2D(4, 3, block_size=8)
    ref.build([x.shape, m.shape])
    ref.set_weights(conv.get_weights())
    np.testing.assert_allclose(y.numpy().astype(np.float32), ref([x, m]).numpy(), rtol=2e-2, atol=2e-2)
