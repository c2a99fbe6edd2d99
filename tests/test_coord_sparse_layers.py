"""Keras layers on coordinate sparse maps: SparseConv1D/2D/3D, Sparsify, SparseMap, Densify,
pooling, batch norm; fit with a tf.data pipeline of varying site counts, .keras round trip,
fresh-process SavedModel."""

from __future__ import annotations

import itertools
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import run_python
from keras.src.trainers.trainer import model_supports_jit
from layer_checks import check_config_round_trip, check_export_fresh_process

import tf_sparseconv as tsc

CONV = {1: tsc.layers.SparseConv1D, 2: tsc.layers.SparseConv2D, 3: tsc.layers.SparseConv3D}
KERAS_CONV = {1: keras.layers.Conv1D, 2: keras.layers.Conv2D, 3: keras.layers.Conv3D}


def sparse_dense_input(rng, batch, shape, channels, density):
    x = rng.standard_normal((batch, *shape, channels)).astype(np.float32)
    return x * (rng.random((batch, *shape, 1)) < density)


def dense_reference(layer, x, dims):
    """The same convolution by Keras' dense ConvND (padding "same") with the layer's weights."""
    ref = KERAS_CONV[dims](
        layer.filters,
        layer.kernel_size,
        strides=layer.strides,
        padding="same",
        dilation_rate=layer.dilation_rate,
        activation=layer.activation,
        use_bias=layer.use_bias,
    )
    ref.build(x.shape)
    ref.set_weights(layer.get_weights())
    return ref(x).numpy()


@pytest.mark.parametrize(
    "dims,kwargs",
    [
        (1, {"kernel_size": 3}),
        (1, {"kernel_size": 4, "strides": 2, "submanifold": False}),
        (2, {"kernel_size": 3, "dilation_rate": 2}),
        (2, {"kernel_size": (2, 3), "strides": (2, 1), "submanifold": False}),
        (3, {"kernel_size": 3}),
        (3, {"kernel_size": 2, "strides": 2, "submanifold": False}),
    ],
)
def test_sparse_conv_equals_dense_conv_at_output_sites(rng, dims, kwargs):
    shape = (9, 8, 7)[:dims]
    x = sparse_dense_input(rng, 2, shape, 3, 0.3)
    layer = CONV[dims](5, activation="tanh", bias_initializer="random_normal", **kwargs)
    features, coords, out_shape = layer(tsc.layers.Sparsify()(x))
    dense = dense_reference(layer, x, dims)
    np.testing.assert_array_equal(out_shape, dense.shape[:-1])
    np.testing.assert_allclose(features, dense[tuple(np.asarray(coords).T)], rtol=1e-5, atol=1e-5)
    if kwargs.get("submanifold", True):
        np.testing.assert_array_equal(coords, np.argwhere(np.abs(x).max(-1) > 0))
    else:  # every position the receptive fields reach, sorted
        ones = tf.nn.convolution(
            (np.abs(x).max(-1, keepdims=True) > 0).astype(np.float32),
            np.ones((*layer.kernel_size, 1, 1), np.float32),
            strides=list(layer.strides),
            padding="SAME",
        )
        np.testing.assert_array_equal(coords, np.argwhere(ones.numpy()[..., 0] > 0))


def test_max_active_sites_bounds_sites_per_sample(rng):
    x = sparse_dense_input(rng, 3, (8, 8), 2, 0.4)
    base = tsc.layers.SparseConv2D(4, 3, strides=2, submanifold=False, kernel_initializer="ones")
    capped = tsc.layers.SparseConv2D(
        4, 3, strides=2, submanifold=False, kernel_initializer="ones", max_active_sites=5
    )
    sparse = tsc.layers.Sparsify()(x)
    f_all, c_all, _ = base(sparse)
    f, c, _ = capped(sparse)
    assert np.bincount(np.asarray(c)[:, 0]).max() <= 5
    expected_f, expected_c = tsc.ops.topk_sites(f_all, c_all, 5)
    np.testing.assert_array_equal(c, expected_c)
    np.testing.assert_allclose(f, expected_f, rtol=1e-6)


def _pool_oracle(x, pool, mode):
    """Max/mean over the active sites of each non-overlapping window (NumPy)."""
    batch, *shape, _ = x.shape
    out_shape = [-(-n // p) for n, p in zip(shape, pool)]
    active = np.abs(x).max(-1) > 0
    sites, values = [], []
    for b in range(batch):
        for o in itertools.product(*[range(n) for n in out_shape]):
            window = tuple(slice(oi * p, (oi + 1) * p) for oi, p in zip(o, pool))
            here = active[(b, *window)]
            if here.any():
                v = x[(b, *window)][here]
                sites.append((b, *o))
                values.append(v.max(0) if mode == "max" else v.mean(0))
    return np.array(values), np.array(sites)


@pytest.mark.parametrize("dims,mode", [(1, "max"), (2, "avg"), (3, "max"), (3, "avg")])
def test_pooling_matches_oracle(rng, dims, mode):
    shape = (8, 7, 6)[:dims]
    x = sparse_dense_input(rng, 2, shape, 3, 0.2)
    cls = getattr(tsc.layers, f"Sparse{'Max' if mode == 'max' else 'Average'}Pooling{dims}D")
    f, c, s = cls(2)(tsc.layers.Sparsify()(x))
    values, sites = _pool_oracle(x, (2,) * dims, mode)
    np.testing.assert_array_equal(c, sites)
    np.testing.assert_allclose(f, values, rtol=1e-6)
    np.testing.assert_array_equal(s, [2, *[-(-n // 2) for n in shape]])


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_global_pooling_densify_and_sparse_map(rng, mode):
    x = sparse_dense_input(rng, 4, (5, 6), 3, 0.3)
    x[2] = 0  # a sample without sites
    sparse = tsc.layers.Sparsify()(x)
    pooled = tsc.layers.SparseGlobalPooling(mode)(sparse).numpy()
    for b in range(4):
        here = x[b][np.abs(x[b]).max(-1) > 0]
        expected = np.zeros(3) if len(here) == 0 else (here.max(0) if mode == "max" else here.mean(0))
        np.testing.assert_allclose(pooled[b], expected, rtol=1e-6)
    np.testing.assert_array_equal(tsc.layers.Densify((5, 6))(sparse), x)
    features, coords = tsc.ops.from_dense(x)
    f, c, s = tsc.layers.SparseMap((5, 6))([features, coords])
    np.testing.assert_array_equal(s, [4, 5, 6])
    _, _, s = tsc.layers.SparseMap((5, 6), batch_size=7)([features, coords])
    np.testing.assert_array_equal(s, [7, 5, 6])
    with pytest.raises(tf.errors.InvalidArgumentError, match="spatial_shape"):
        tsc.layers.Densify((5, 7))(sparse)


def test_layers_at_one_resolution_share_one_rulebook(rng):
    x = sparse_dense_input(rng, 2, (6, 6, 6), 2, 0.2)
    layers = [
        tsc.layers.SparseConv3D(4, 3),
        tsc.layers.SparseConv3D(4, 3),
        tsc.layers.SparseConv3D(4, 3, strides=2, submanifold=False),
    ]

    @tf.function
    def net(x):
        h = tsc.layers.Sparsify()(x)
        for layer in layers:
            h = layer(h)
        return h[0]

    graph = net.get_concrete_function(tf.TensorSpec(x.shape)).graph
    rulebooks = [op for op in graph.get_operations() if op.type == "TfSparseConv>SparseConvRulebook"]
    assert len(rulebooks) == 2  # one for the two submanifold layers, one for the strided layer
    np.testing.assert_allclose(net(x), net.python_function(x), rtol=1e-6)


def test_mixed_precision(rng):
    x = sparse_dense_input(rng, 2, (6, 6), 3, 0.3)
    layer = tsc.layers.SparseConv2D(4, 3, dtype="mixed_float16")
    f, _, _ = layer(tsc.layers.Sparsify()(x.astype(np.float16)))
    assert f.dtype == tf.float16 and layer.kernel.dtype == "float32"
    inputs = keras.Input((6, 6, 3))
    h = tsc.layers.Sparsify(dtype="mixed_float16")(inputs)
    h = tsc.layers.SparseConv2D(4, 3, activation="relu", dtype="mixed_float16")(h)
    h = tsc.layers.SparseBatchNormalization(dtype="mixed_float16")(h)
    out = keras.layers.Dense(2, activation="softmax", dtype="float32")(tsc.layers.SparseGlobalPooling()(h))
    model = keras.Model(inputs, out)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    history = model.fit(x, np.array([0, 1]), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])


def test_configs_round_trip():
    for layer in (
        tsc.layers.SparseConv3D(4, 3, max_active_sites=10, activation="relu", kernel_regularizer="l2"),
        tsc.layers.SparseConv2D(4, (2, 3), strides=(2, 1), submanifold=False, dilation_rate=1),
        tsc.layers.SparseConv1D(4, 5, dilation_rate=2, use_bias=False),
        tsc.layers.Sparsify(0.1),
        tsc.layers.SparseMap((4, 5), batch_size=3),
        tsc.layers.Densify((4, 5)),
        tsc.layers.SparseGlobalPooling("max"),
        tsc.layers.SparseMaxPooling3D(2, strides=1),
        tsc.layers.SparseAveragePooling2D((2, 3)),
        tsc.layers.SparseBatchNormalization(momentum=0.9),
    ):
        check_config_round_trip(layer)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: tsc.layers.SparseConv3D(0, 3), "filters"),
        (lambda: tsc.layers.SparseConv3D(4, (3, 3)), "kernel_size"),
        (lambda: tsc.layers.SparseConv2D(4, 3, strides=2), "strides"),
        (lambda: tsc.layers.SparseConv2D(4, 3, max_active_sites=0), "max_active_sites"),
        (lambda: tsc.layers.SparseMap((4, 4, 4, 4)), "spatial_shape"),
        (lambda: tsc.layers.SparseGlobalPooling("sum"), "mode"),
        (lambda: tsc.layers.Sparsify(-1.0), "threshold"),
        (lambda: tsc.layers.SparseBatchNormalization(axis=1), "axis"),
    ],
)
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_called_on_wrong_structure(rng):
    with pytest.raises(ValueError, match="sparse map"):
        tsc.layers.SparseConv2D(4, 3)(np.zeros([2, 5, 5, 3], np.float32))
    features, coords, shape = tsc.layers.Sparsify()(sparse_dense_input(rng, 1, (5, 5), 3, 0.5))
    with pytest.raises(ValueError, match="coords"):
        tsc.layers.SparseConv3D(4, 3)([features, coords, shape])


# --- models: fit with tf.data, .keras, SavedModel in a fresh process ---------------------


def voxel_batches(rng, num_batches, batch, grid, channels, num_classes=3):
    """A tf.data pipeline of sparse batches ({features, coords}, labels); the site count varies."""
    items = []
    for _ in range(num_batches):
        coords, features, labels = [], [], rng.integers(0, num_classes, batch)
        for b in range(batch):
            n = rng.integers(5, 30)
            flat = rng.choice(grid**3, n, replace=False)
            sites = np.stack(np.unravel_index(flat, (grid,) * 3), 1)
            coords.append(np.concatenate([np.full((n, 1), b), sites], 1))
            features.append(rng.standard_normal((n, channels)) + labels[b])
        items.append(
            (
                {
                    "features": np.concatenate(features).astype(np.float32),
                    "coords": np.concatenate(coords).astype(np.int32),
                },
                labels,
            )
        )

    def gen():
        yield from items

    spec = (
        {"features": tf.TensorSpec([None, channels]), "coords": tf.TensorSpec([None, 4], tf.int32)},
        tf.TensorSpec([None], tf.int64),
    )
    return tf.data.Dataset.from_generator(gen, output_signature=spec), items


def sparse_model(grid, channels, num_classes=3):
    features = keras.Input((channels,), name="features")
    coords = keras.Input((4,), dtype="int32", name="coords")
    h = tsc.layers.SparseMap((grid,) * 3)([features, coords])
    h = tsc.layers.SparseConv3D(8, 3, activation="relu")(h)
    h = tsc.layers.SparseBatchNormalization()(h)
    h = tsc.layers.SparseConv3D(8, 3, activation="relu")(h)
    h = tsc.layers.SparseConv3D(12, 2, strides=2, submanifold=False, activation="relu", max_active_sites=40)(
        h
    )
    h = tsc.layers.SparseMaxPooling3D(2)(h)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(tsc.layers.SparseGlobalPooling()(h))
    return keras.Model({"features": features, "coords": coords}, outputs)


def test_fit_tf_data_keras_round_trip_and_fresh_process_export(rng, tmp_path):
    keras.utils.set_random_seed(0)
    dataset, items = voxel_batches(rng, 6, 4, 8, 2)
    model = sparse_model(8, 2)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    history = model.fit(dataset, epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert model_supports_jit(model) is False

    inputs = items[0][0]
    expected = model.predict(dataset.take(1), verbose=0)
    np.testing.assert_allclose(model(inputs, training=False), expected, rtol=1e-5, atol=1e-6)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded(inputs, training=False), expected, rtol=1e-5, atol=1e-6)

    export_dir = os.path.join(tmp_path, "exported")
    model.export(export_dir, verbose=False)
    np.savez(os.path.join(tmp_path, "io.npz"), y=expected, **inputs)
    run_python(
        f"""
import numpy as np, tensorflow as tf
import tf_sparseconv  # registers the ops
m = tf.saved_model.load({export_dir!r})
io = np.load({os.path.join(tmp_path, "io.npz")!r})
y = m.serve({{"features": tf.constant(io["features"]), "coords": tf.constant(io["coords"])}})
np.testing.assert_allclose(y.numpy(), io["y"], rtol=1e-5, atol=1e-6)
print("fresh-process export ok")
"""
    )


def test_dense_input_model_fit_and_export(rng, tmp_path):
    keras.utils.set_random_seed(1)
    x = sparse_dense_input(rng, 24, (8, 8), 2, 0.2)
    y = rng.integers(0, 2, 24)
    inputs = keras.Input((8, 8, 2))
    h = tsc.layers.Sparsify()(inputs)
    h = tsc.layers.SparseConv2D(6, 3, activation="relu")(h)
    h = tsc.layers.SparseConv2D(6, 3, strides=2, submanifold=False, activation="relu")(h)
    h = tsc.layers.Densify((4, 4))(h)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(h)))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    assert np.isfinite(model.fit(x, y, batch_size=8, epochs=2, verbose=0).history["loss"][-1])
    check_export_fresh_process(model, x, tmp_path)


@pytest.mark.parametrize(
    "dims,shape,kernel,strides,cap",
    [
        (1, (10,), 2, 2, None),
        (2, (9, 8), 3, 2, None),
        (3, (6, 7, 6), 2, 2, None),
        (3, (8, 8, 8), 3, (2, 1, 2), 6),  # coarse sites a subset (after max_active_sites)
    ],
)
def test_sparse_conv_transpose_equals_dense_conv_transpose(rng, dims, shape, kernel, strides, cap):
    x = sparse_dense_input(rng, 2, shape, 3, 0.3)
    fine = tsc.layers.Sparsify()(x)
    down = CONV[dims](4, kernel, strides=strides, submanifold=False, max_active_sites=cap)
    coarse = down(fine)
    up = getattr(tsc.layers, f"SparseConvTranspose{dims}D")(
        5, kernel, strides=strides, activation="tanh", bias_initializer="random_normal"
    )
    features, coords, out_shape = up([coarse, fine])
    np.testing.assert_array_equal(coords, fine[1])
    np.testing.assert_array_equal(out_shape, fine[2])
    if cap is not None:
        assert np.bincount(np.asarray(coarse[1])[:, 0]).max() <= cap
    # Dense oracle: tf.nn.conv_transpose (the adjoint of the "SAME" strided convolution).
    dense_coarse = tsc.ops.to_dense(coarse[0], coarse[1], coarse[2][1:], 2)
    dense = tf.nn.conv_transpose(
        dense_coarse,
        up.kernel,
        output_shape=[2, *shape, 5],
        strides=list(up.strides),
        padding="SAME",
    )
    dense = np.tanh(dense.numpy() + up.bias.numpy())
    np.testing.assert_allclose(features, dense[tuple(np.asarray(coords).T)], rtol=1e-5, atol=1e-5)


def test_unet_reuses_the_downsampling_rulebook_and_trains(rng, tmp_path):
    inputs = keras.Input((8, 8, 8, 2))
    fine = tsc.layers.Sparsify()(inputs)
    h = tsc.layers.SparseConv3D(6, 3, activation="relu")(fine)
    down = tsc.layers.SparseConv3D(8, 2, strides=2, submanifold=False, activation="relu")(h)
    down = tsc.layers.SparseConv3D(8, 3, activation="relu")(down)
    up = tsc.layers.SparseConvTranspose3D(6, 2, strides=2, activation="relu")([down, h])
    out = tsc.layers.SparseConv3D(1, 1)(up)
    model = keras.Model(inputs, tsc.layers.Densify((8, 8, 8))(out))
    x = sparse_dense_input(rng, 8, (8, 8, 8), 2, 0.1)
    target = (x[..., :1] > 0).astype(np.float32)
    model.compile(optimizer="adam", loss="mse")
    history = model.fit(x, target, batch_size=4, epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]

    @tf.function
    def forward(x):
        return model(x)

    graph = forward.get_concrete_function(tf.TensorSpec([None, 8, 8, 8, 2])).graph
    rulebooks = [op for op in graph.get_operations() if op.type == "TfSparseConv>SparseConvRulebook"]
    # 3x3x3 fine, 2x2x2 stride 2 (reused by the transpose, else 5), 3x3x3 coarse, 1x1x1 fine
    assert len(rulebooks) == 4
    path = os.path.join(tmp_path, "unet.keras")
    model.save(path)
    np.testing.assert_allclose(keras.saving.load_model(path)(x), model(x), rtol=1e-5, atol=1e-6)
    check_config_round_trip(tsc.layers.SparseConvTranspose3D(4, 3, strides=(2, 1, 2), activation="relu"))
