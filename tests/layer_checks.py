"""One helper for the Keras layer contract, used by every layer test module.

``check_layer_in_models`` builds Sequential and Functional models around a
layer, fits them a few steps, and checks get_config/from_config, `.keras`
round trip, ``model.export`` reloaded in a fresh process after
``import tf_sparseconv``, and ``supports_jit``.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf
from helpers import run_python
from keras.src.trainers.trainer import model_supports_jit


def check_config_round_trip(layer: keras.layers.Layer) -> None:
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["module"].startswith("tf_sparseconv") or "registered_name" in serialized
    assert keras.saving.deserialize_keras_object(serialized).get_config() == config


def fit_few_steps(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    loss = history.history["loss"][-1]
    assert np.isfinite(loss)
    assert any(not np.array_equal(b, w.numpy()) for b, w in zip(before, model.trainable_weights))
    assert model_supports_jit(model) is False
    return loss


def check_keras_round_trip(model: keras.Model, x: np.ndarray, tmp_path) -> None:
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6, atol=1e-6
    )


def check_export_fresh_process(model: keras.Model, x: np.ndarray, tmp_path) -> None:
    export_dir = os.path.join(tmp_path, "exported")
    model.export(export_dir, verbose=False)
    np.save(os.path.join(tmp_path, "x.npy"), x)
    np.save(os.path.join(tmp_path, "y.npy"), model.predict(x, verbose=0))
    run_python(
        f"""
import numpy as np, tensorflow as tf
import tf_sparseconv  # registers the ops
assert tf_sparseconv.ops.is_library_loaded()
m = tf.saved_model.load({export_dir!r})
x = np.load({os.path.join(tmp_path, "x.npy")!r})
y = m.serve(tf.constant(x)).numpy()
np.testing.assert_allclose(y, np.load({os.path.join(tmp_path, "y.npy")!r}), rtol=1e-5, atol=1e-6)
# a different batch size: the signature's batch dimension is dynamic
m.serve(tf.constant(x[:3]))
print("fresh-process export ok")
"""
    )


def check_layer_in_models(make_layer, input_shape, tmp_path, num_classes: int = 3, seed: int = 0) -> None:
    """Sequential + Functional fit, .keras round trip and fresh-process export."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((24, *input_shape)).astype(np.float32)
    y = rng.integers(0, num_classes, size=24)
    check_config_round_trip(make_layer())

    keras.utils.set_random_seed(seed)
    sequential = keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Dense(8),
            make_layer(),
            keras.layers.Flatten(),
            keras.layers.Dense(num_classes, activation="softmax"),
        ]
    )
    fit_few_steps(sequential, x, y)
    check_keras_round_trip(sequential, x, tmp_path)

    inputs = keras.Input(input_shape, name="features")
    h = keras.layers.Dense(8)(inputs)
    h = make_layer()(h)
    h = keras.layers.Concatenate()([keras.layers.Flatten()(h), keras.layers.Flatten()(inputs)])
    outputs = keras.layers.Dense(num_classes, activation="softmax")(h)
    functional = keras.Model(inputs, outputs)
    fit_few_steps(functional, x, y)
    check_keras_round_trip(functional, x, tmp_path)
    check_export_fresh_process(functional, x, tmp_path)


def check_mixed_precision(make_layer, input_shape) -> None:
    layer = make_layer(dtype="mixed_float16")
    x = tf.random.normal((4, *input_shape))
    out = layer(x)
    assert out.dtype == tf.float16
    model = keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Dense(8, dtype="mixed_float16"),
            make_layer(dtype="mixed_float16"),
            keras.layers.Flatten(),
            keras.layers.Dense(2, activation="softmax", dtype="float32"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    history = model.fit(np.asarray(x), np.zeros(4, int), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
