"""Quantisation-aware training (`tsc.quantization`): fake quantisers vs NumPy, STE, EMA ranges,
the stochastic/nearest rounding switch and `FinishWithNearestRounding`, quantize_model / convert on
Sequential and Functional models, packing, save/load and export."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from layer_checks import check_export_fresh_process, check_keras_round_trip

import tf_sparseconv as tsc
from tf_sparseconv.python import quantization as tq

BITS = [2, 3, 4, 5, 6, 7, 8]


# --- NumPy references ----------------------------------------------------------------------


def np_fake_quant_weights(w, bits, channel_axes):
    qmax = 2 ** (bits - 1) - 1
    if channel_axes is None:
        axes = tuple(range(w.ndim))
    else:
        keep = {a % w.ndim for a in channel_axes}
        axes = tuple(a for a in range(w.ndim) if a not in keep)
    amax = np.max(np.abs(w), axis=axes, keepdims=True)
    scale = np.where(amax > 0, amax / np.float32(qmax), np.float32(1)).astype(np.float32)
    return np.clip(np.round(w / scale), -qmax, qmax) * scale


def np_fake_quant_activations(x, lo, hi, bits):
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    levels = 2**bits - 1
    scale = np.float32((hi - lo) / levels) if hi > lo else np.float32(1)
    zero_point = np.clip(np.round(-lo / scale), 0, levels)
    q = np.clip(np.round(x / scale) + zero_point, 0, levels)
    return ((q - zero_point) * scale).astype(np.float32)


def assert_same_predictions(converted, qat, x):
    """The converted model predicts what the QAT model predicts. Both run the same float
    operations on the same dequantised weights, but TensorFlow may fuse the two graphs
    differently (rounding differences of ~1 ulp), which can move a value sitting on a rounding
    boundary of a low-bit activation grid by one step: allow that for a few elements."""
    got, want = converted.predict(x, verbose=0), qat.predict(x, verbose=0)
    close = np.isclose(got, want, rtol=1e-5, atol=1e-6)
    last = converted.layers[-1]
    step = float(tq.activation_qparams(last.activation_min, last.activation_max, last.activation_bits)[0])
    assert close.mean() >= 0.9, close.mean()
    np.testing.assert_allclose(got, want, rtol=0, atol=2 * step + 1e-6)


# --- fake quantisers -------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(
    "channel_axes", [(-1,), None, (-2, -1)], ids=["per_channel", "per_tensor", "depthwise"]
)
def test_fake_quant_weights_matches_numpy(rng, bits, channel_axes):
    w = rng.standard_normal((3, 3, 5, 7)).astype(np.float32)
    w[..., 2] = 0.0  # an all-zero output channel
    got = tq.fake_quant_weights(w, bits, channel_axes).numpy()
    want = np_fake_quant_weights(w, bits, channel_axes)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    values, scales = tq.quantize_weights_int(w, bits, channel_axes)
    qmax = 2 ** (bits - 1) - 1
    assert np.all(values.numpy() == np.round(values.numpy())) and np.abs(values.numpy()).max() <= qmax
    # Each channel (or the tensor) uses its full range: max |value| == qmax unless all zero.
    if channel_axes == (-1,):
        assert np.all(np.abs(values.numpy()).max(axis=(0, 1, 2))[[0, 1, 3, 4, 5, 6]] == qmax)
        assert scales.shape == (1, 1, 1, 7)
    np.testing.assert_allclose(values.numpy() * scales.numpy(), got, rtol=0, atol=0)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("lo_hi", [(-1.5, 2.0), (0.0, 3.0), (0.2, 1.0), (-2.0, -0.5), (0.0, 0.0)])
def test_fake_quant_activations_matches_numpy(rng, bits, lo_hi):
    x = (rng.standard_normal((64, 5)) * 2).astype(np.float32)
    got = tq.fake_quant_activations(x, *lo_hi, bits).numpy()
    np.testing.assert_allclose(got, np_fake_quant_activations(x, *lo_hi, bits), rtol=1e-6, atol=1e-6)
    # 0 is represented exactly; an all-non-negative range is unsigned ([0, hi], 2**bits levels).
    assert tq.fake_quant_activations(np.zeros(3, np.float32), *lo_hi, bits).numpy().tolist() == [0, 0, 0]
    if lo_hi == (0.0, 3.0):
        assert len(np.unique(tq.fake_quant_activations(np.linspace(-1, 4, 2000), 0.0, 3.0, bits))) == 2**bits


def test_straight_through_gradients(rng):
    w = tf.constant(rng.standard_normal((4, 6)).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(w)
        loss = tf.reduce_sum(tq.fake_quant_weights(w, 3))
    np.testing.assert_array_equal(tape.gradient(loss, w).numpy(), np.ones((4, 6), np.float32))
    with tf.GradientTape() as tape:
        tape.watch(w)
        loss = tf.reduce_sum(tq.fake_quant_weights(w, 4, rounding="stochastic", seed=1) * 3.0)
    np.testing.assert_array_equal(tape.gradient(loss, w).numpy(), np.full((4, 6), 3.0, np.float32))
    # Activations: clip-aware, 1 inside the (nudged) range [-1, 1] and 0 outside.
    x = tf.constant([-3.0, -0.5, 0.0, 0.7, 2.5])
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(tq.fake_quant_activations(x, -1.0, 1.0, 8))
    np.testing.assert_array_equal(tape.gradient(loss, x).numpy(), [0, 1, 1, 1, 0])


def test_stochastic_rounding_unbiased_and_reproducible(rng):
    # Values on a known grid: scale = 1 (max |w| = qmax = 7 for 4 bits).
    w = np.concatenate([[7.0, -7.0], np.full(20000, 2.3), np.full(20000, -0.6)]).astype(np.float32)
    q = tq.fake_quant_weights(w, 4, None, rounding="stochastic", seed=3).numpy()
    assert set(np.unique(q[2:20002])) == {2.0, 3.0} and set(np.unique(q[20002:])) == {-1.0, 0.0}
    assert abs(q[2:20002].mean() - 2.3) < 0.02 and abs(q[20002:].mean() + 0.6) < 0.02
    again = tq.fake_quant_weights(w, 4, None, rounding="stochastic", seed=3).numpy()
    np.testing.assert_array_equal(q, again)
    other = tq.fake_quant_weights(w, 4, None, rounding="stochastic", seed=4).numpy()
    assert not np.array_equal(q, other)

    # In a wrapper: stochastic while training (reproducible from the seed), nearest at inference.
    def make():
        layer = keras.layers.Dense(5, kernel_initializer=keras.initializers.RandomNormal(seed=1))
        wrapper = tq.QuantizeWrapper(
            layer, weight_bits=3, activation_bits=None, rounding="stochastic", seed=7
        )
        wrapper.build((None, 4))
        return wrapper

    x = rng.standard_normal((8, 4)).astype(np.float32)
    a, b = make(), make()
    train_a = [a(x, training=True).numpy() for _ in range(2)]
    train_b = [b(x, training=True).numpy() for _ in range(2)]
    np.testing.assert_array_equal(train_a[0], train_b[0])
    np.testing.assert_array_equal(train_a[1], train_b[1])
    assert not np.array_equal(train_a[0], train_a[1])
    nearest = x @ np_fake_quant_weights(a.layer.kernel.numpy(), 3, (-1,)) + a.layer.bias.numpy()
    np.testing.assert_allclose(a(x, training=False).numpy(), nearest, rtol=1e-5, atol=1e-5)


def test_stochastic_rounding_switch(rng):
    """`set_stochastic_rounding(False)` makes training calls round to nearest, also in a function
    traced before the switch (the switch is a variable, not a Python attribute)."""
    layer = keras.layers.Dense(6, kernel_initializer=keras.initializers.RandomNormal(seed=2))
    wrapper = tq.QuantizeWrapper(layer, weight_bits=2, activation_bits=None, rounding="stochastic", seed=5)
    wrapper.build((None, 4))
    assert float(wrapper.stochastic_rounding.numpy()) == 1.0 and not wrapper.stochastic_rounding.trainable
    x = rng.standard_normal((8, 4)).astype(np.float32)
    nearest = x @ np_fake_quant_weights(layer.kernel.numpy(), 2, (-1,)) + layer.bias.numpy()
    train_step = tf.function(lambda: wrapper(x, training=True))

    stochastic = [train_step().numpy() for _ in range(2)]
    assert not np.array_equal(stochastic[0], stochastic[1])
    assert not np.allclose(stochastic[0], nearest, atol=1e-4)
    wrapper.set_stochastic_rounding(False)
    for _ in range(2):
        np.testing.assert_allclose(train_step().numpy(), nearest, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(wrapper(x, training=True).numpy(), nearest, rtol=1e-5, atol=1e-5)
    wrapper.set_stochastic_rounding(True)
    assert not np.array_equal(train_step().numpy(), train_step().numpy())
    assert train_step.experimental_get_tracing_count() == 1
    np.testing.assert_allclose(wrapper(x, training=False).numpy(), nearest, rtol=1e-5, atol=1e-5)

    # Nearest-rounding wrappers have no switch.
    plain = tq.QuantizeWrapper(keras.layers.Dense(2), weight_bits=2)
    plain.build((None, 4))
    assert plain.stochastic_rounding is None
    assert not any("stochastic_rounding" in w.path for w in plain.weights)


def test_ema_range_tracking(rng):
    layer = keras.layers.Dense(3, activation="relu")
    wrapper = tq.QuantizeWrapper(layer, weight_bits=8, activation_bits=4, ema_decay=0.5)
    wrapper.build((None, 6))
    x1, x2 = (rng.standard_normal((16, 6)).astype(np.float32) for _ in range(2))
    # Before any training batch the outputs pass through unquantised.
    float_out = layer(x1).numpy()
    kernel_q = np_fake_quant_weights(layer.kernel.numpy(), 8, (-1,))
    want = np.maximum(x1 @ kernel_q, 0)
    np.testing.assert_allclose(wrapper(x1, training=False).numpy(), want, rtol=1e-5, atol=1e-5)
    assert float(wrapper.range_initialized.numpy()) == 0.0
    wrapper(x1, training=True)
    out1 = np.maximum(x1 @ kernel_q, 0)
    assert float(wrapper.activation_min.numpy()) == 0.0  # after ReLU: unsigned range
    np.testing.assert_allclose(wrapper.activation_max.numpy(), out1.max(), rtol=1e-5)
    wrapper(x2, training=True)
    out2 = np.maximum(x2 @ kernel_q, 0)
    np.testing.assert_allclose(wrapper.activation_max.numpy(), 0.5 * out1.max() + 0.5 * out2.max(), rtol=1e-5)
    # Inference uses the stored range and does not move it.
    hi = float(wrapper.activation_max.numpy())
    got = wrapper(x1, training=False).numpy()
    np.testing.assert_allclose(got, np_fake_quant_activations(out1, 0.0, hi, 4), rtol=1e-5, atol=1e-5)
    assert float(wrapper.activation_max.numpy()) == hi
    assert not np.allclose(got, float_out)


# --- packing --------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("size", [1, 2, 3, 7, 13, 64])
def test_pack_unpack_round_trip(rng, bits, size):
    qmax = 2 ** (bits - 1) - 1
    values = rng.integers(-qmax, qmax + 1, size=size)
    values[0] = -qmax
    packed = tq.pack_int(values, bits)
    per_byte = 4 if bits <= 2 else 2 if bits <= 4 else 1
    assert packed.dtype == np.int8 and packed.shape == (-(-size // per_byte),)
    np.testing.assert_array_equal(tq.unpack_int(packed, bits, size), values)
    got = tq.unpack_int_tf(tf.constant(packed), bits, (size,)).numpy()
    np.testing.assert_array_equal(got, values.astype(np.float32))


def test_pack_known_layout():
    # 4 bits: first value in the low nibble; 2 bits: four per byte, low bits first.
    assert tq.pack_int([1, -1], 4).view(np.uint8).tolist() == [0xF1]
    assert tq.pack_int([1, -1, 0, 1, -1], 2).view(np.uint8).tolist() == [0b01001101, 0b11]
    with pytest.raises(ValueError, match="values"):
        tq.pack_int([8], 4)


# --- models -----------------------------------------------------------------------------------


def _data(rng, shape=(8, 8, 3), n=32, classes=3):
    x = rng.standard_normal((n, *shape)).astype(np.float32)
    y = (x.reshape(n, -1)[:, :classes].argmax(1)).astype(np.int64)
    return x, y


def _sequential():
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            tsc.layers.ChannelSparseConv2D(8, 3, fan_in=4, activation="relu"),
            tsc.layers.KWinners(k=4),
            keras.layers.DepthwiseConv2D(3),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


def _functional():
    inputs = keras.Input((8, 8, 3), name="features")
    h = keras.layers.Conv2D(8, 3, padding="same")(inputs)
    h = tsc.layers.KWinners(sparsity=0.5)(h)
    h = tsc.layers.ChannelSparseConv2D(8, 3, density=0.5, activation="relu")(h)
    h = keras.layers.Concatenate()([keras.layers.GlobalAveragePooling2D()(h), keras.layers.Flatten()(inputs)])
    outputs = keras.layers.Dense(3, activation="softmax")(h)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("make_model", [_sequential, _functional], ids=["sequential", "functional"])
def test_quantize_model_fit_and_convert(rng, make_model, tmp_path):
    keras.utils.set_random_seed(0)
    x, y = _data(rng)
    model = make_model()
    before = [w.numpy().copy() for w in model.weights]
    float_pred = model.predict(x, verbose=0)

    qat = tq.quantize_model(model)
    wrapped = {type(layer.layer).__name__ for layer in qat.layers if isinstance(layer, tq.QuantizeWrapper)}
    assert {"Conv2D", "ChannelSparseConv2D", "Dense"} <= wrapped
    assert any(isinstance(layer, tsc.layers.KWinners) for layer in qat.layers)
    # 8-bit weights, activations not yet ranged: close to the float model.
    np.testing.assert_allclose(qat.predict(x, verbose=0), float_pred, atol=0.05)
    kernels = [w for w in qat.trainable_weights if w.path.endswith("kernel")]
    assert kernels and all(len(w.shape) >= 2 for w in kernels)

    qat.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    losses = qat.fit(x, y, batch_size=8, epochs=6, verbose=0).history["loss"]
    assert losses[-1] < losses[0]
    # The original model is untouched.
    for b, w in zip(before, model.weights):
        np.testing.assert_array_equal(b, w.numpy())
    assert not any(isinstance(layer, tq.QuantizeWrapper) for layer in model.layers)

    converted = tq.convert(qat)
    qat_pred = qat.predict(x, verbose=0)
    np.testing.assert_allclose(converted.predict(x, verbose=0), qat_pred, rtol=1e-6, atol=1e-6)
    assert not converted.trainable_weights
    int_vars = [w for w in converted.weights if w.dtype == "int8"]
    assert len(int_vars) == sum(isinstance(layer, tq.QuantizeWrapper) for layer in qat.layers)
    assert not any(w.path.endswith("/kernel") for w in converted.weights)

    check_keras_round_trip(qat, x, tmp_path)
    check_keras_round_trip(converted, x, tmp_path)


@pytest.mark.parametrize(
    "weight_bits, per_channel", [(2, True), (3, False), (4, True), (5, False), (8, False)]
)
def test_convert_bit_widths(rng, weight_bits, per_channel):
    keras.utils.set_random_seed(1)
    x, _ = _data(rng, n=16)
    qat = tq.quantize_model(
        _sequential(), weight_bits=weight_bits, activation_bits=4, per_channel=per_channel
    )
    qat(x, training=True)  # sets the activation ranges
    converted = tq.convert(qat)
    assert_same_predictions(converted, qat, x)
    dense = converted.layers[-1]
    per_byte = 4 if weight_bits <= 2 else 2 if weight_bits <= 4 else 1
    values = dense.values["kernel"]
    assert values.dtype == "int8" and values.shape == (-(-(8 * 3) // per_byte),)
    assert dense.scales["kernel"].shape == ((1, 3) if per_channel else (1, 1))
    unpacked = tq.unpack_int(values.numpy(), weight_bits, 24)
    assert np.abs(unpacked).max() == 2 ** (weight_bits - 1) - 1


@pytest.mark.parametrize("case", ["sparse_map", "block_sparse", "conv1d_3d"])
def test_layer_coverage(rng, case):
    """The sparse-map, block-sparse and other Keras convolutions are wrapped and convert exactly."""
    keras.utils.set_random_seed(2)
    if case == "sparse_map":
        inputs = keras.Input((6, 6, 2))
        h = tsc.layers.Sparsify()(inputs)
        h = tsc.layers.SparseConv2D(4, 3, activation="relu")(h)
        h = tsc.layers.SparseConv2D(4, 3)(h)
        outputs = keras.layers.Dense(2)(tsc.layers.SparseGlobalPooling()(h))
        x = rng.standard_normal((4, 6, 6, 2)).astype(np.float32) * (rng.random((4, 6, 6, 1)) < 0.3)
        wrapped = 3
    elif case == "block_sparse":
        features, mask = keras.Input((8, 8, 2)), keras.Input((8, 8, 1))
        inputs = [features, mask]
        h = tsc.layers.BlockSparseConv2D(4, 3, block_size=4)([features, mask])
        outputs = keras.layers.Dense(2)(keras.layers.Flatten()(h))
        x = [
            rng.standard_normal((4, 8, 8, 2)).astype(np.float32),
            (rng.random((4, 8, 8, 1)) < 0.1).astype(np.float32),
        ]
        wrapped = 2
    else:
        inputs = keras.Input((4, 4, 4, 2))
        h = keras.layers.Conv3D(3, 2)(inputs)
        h = keras.layers.Reshape((27, 3))(h)
        h = keras.layers.Conv1D(4, 3)(h)
        h = tsc.layers.ChannelSparseConv1D(4, 3, fan_in=2)(h)
        outputs = keras.layers.Dense(2)(keras.layers.Flatten()(h))
        x = rng.standard_normal((4, 4, 4, 4, 2)).astype(np.float32)
        wrapped = 4
    model = keras.Model(inputs, outputs)
    qat = tq.quantize_model(model, weight_bits=4, activation_bits=6)
    assert sum(isinstance(layer, tq.QuantizeWrapper) for layer in qat.layers) == wrapped
    qat.compile(optimizer="adam", loss="mse")
    qat.fit(x, np.zeros((4, 2), np.float32), epochs=1, batch_size=4, verbose=0)
    converted = tq.convert(qat)
    assert_same_predictions(converted, qat, x)


def test_preserve_sparsity(rng):
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8), keras.layers.Dense(2)])
    kernel = model.layers[0].kernel.numpy()
    kernel[:, ::2] = 0.0
    model.layers[0].kernel.assign(kernel)
    qat = tq.quantize_model(model, preserve_sparsity=True)
    qat.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    x = rng.standard_normal((16, 6)).astype(np.float32)
    qat.fit(x, rng.standard_normal((16, 2)).astype(np.float32), epochs=2, verbose=0)
    values, _ = qat.layers[0].integer_kernel(qat.layers[0].specs[0])
    assert np.all(values.numpy()[:, ::2] == 0)
    converted = tq.convert(qat)
    np.testing.assert_allclose(
        converted.predict(x, verbose=0), qat.predict(x, verbose=0), rtol=1e-6, atol=1e-6
    )


def _variables_bytes(export_dir):
    folder = os.path.join(export_dir, "variables")
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def test_export_fresh_process_and_size(rng, tmp_path):
    keras.utils.set_random_seed(4)
    inputs = keras.Input((8, 8, 16), name="features")
    h = tsc.layers.ChannelSparseConv2D(64, 3, fan_in=8, activation="relu")(inputs)
    h = keras.layers.Conv2D(64, 3, padding="same")(h)
    outputs = keras.layers.Dense(256)(keras.layers.GlobalAveragePooling2D()(h))
    outputs = keras.layers.Dense(3)(keras.layers.Dense(256)(outputs))
    model = keras.Model(inputs, outputs)
    x = rng.standard_normal((6, 8, 8, 16)).astype(np.float32)
    qat = tq.quantize_model(model, weight_bits=4)
    qat.compile(optimizer="adam", loss="mse")
    qat.fit(x, np.zeros((6, 3), np.float32), epochs=1, verbose=0)
    converted = tq.convert(qat)

    float_dir, int_dir = str(tmp_path / "float"), str(tmp_path / "int4")
    model.export(float_dir, verbose=False)
    converted.export(int_dir, verbose=False)
    float_bytes, int_bytes = _variables_bytes(float_dir), _variables_bytes(int_dir)
    assert int_bytes < 0.3 * float_bytes, (int_bytes, float_bytes)

    check_export_fresh_process(converted, x, str(tmp_path / "fresh"))


def test_qat_export_fresh_process(rng, tmp_path):
    keras.utils.set_random_seed(5)
    qat = tq.quantize_model(_functional(), weight_bits=2, rounding="stochastic", seed=0)
    x, y = _data(rng, n=8)
    qat.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    qat.fit(x, y, epochs=1, verbose=0)
    check_keras_round_trip(qat, x, tmp_path)
    check_export_fresh_process(qat, x, str(tmp_path))


def _stochastic_qat(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(3),
        ]
    )
    return tq.quantize_model(model, weight_bits=2, activation_bits=None, rounding="stochastic", seed=seed)


class _RecordRounding(keras.callbacks.Callback):
    """Records each wrapper's `stochastic_rounding` at the start of every epoch."""

    def __init__(self):
        super().__init__()
        self.epochs, self.values = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)
        self.values.append(
            [
                float(layer.stochastic_rounding.numpy())
                for layer in self.model.layers
                if isinstance(layer, tq.QuantizeWrapper)
            ]
        )


def test_finish_with_nearest_rounding(rng):
    """The callback switches every wrapper at the start of the last `nearest_epochs` epochs, and
    `fit`'s compiled train function (traced in the first, stochastic epoch) follows the switch."""
    qat = _stochastic_qat()
    x = rng.standard_normal((32, 6)).astype(np.float32)
    y = rng.standard_normal((32, 3)).astype(np.float32)
    # Learning rate 0: the weights stay fixed, so a nearest-rounding training epoch computes exactly
    # the inference loss, and a stochastic one does not.
    qat.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    eval_loss = qat.evaluate(x, y, batch_size=8, verbose=0)
    record = _RecordRounding()
    history = qat.fit(
        x,
        y,
        batch_size=8,
        epochs=5,
        shuffle=False,
        verbose=0,
        callbacks=[tq.FinishWithNearestRounding(nearest_epochs=2), record],
    )
    assert record.epochs == [0, 1, 2, 3, 4]
    assert record.values == [[1.0] * 3] * 3 + [[0.0] * 3] * 2
    losses = history.history["loss"]
    for loss in losses[:3]:
        assert abs(loss - eval_loss) > 1e-4 * eval_loss, (losses, eval_loss)
    np.testing.assert_allclose(losses[3:], [eval_loss] * 2, rtol=1e-5)
    assert len({round(loss, 6) for loss in losses[:3]}) == 3  # fresh noise every epoch

    # A second fit starts stochastic again; with `initial_epoch` the last epochs are still the last.
    record = _RecordRounding()
    callback = tq.FinishWithNearestRounding()
    qat.fit(x, y, batch_size=8, epochs=5, initial_epoch=2, verbose=0, callbacks=[callback, record])
    assert record.epochs == [2, 3, 4]
    assert record.values == [[1.0] * 3] * 2 + [[0.0] * 3]
    assert len(callback.wrappers) == 3
    # More nearest epochs than epochs: all nearest.
    record = _RecordRounding()
    qat.fit(x, y, epochs=2, verbose=0, callbacks=[tq.FinishWithNearestRounding(3), record])
    assert record.values == [[0.0] * 3] * 2


def test_rounding_switch_save_load_and_convert(rng, tmp_path):
    """The switch is saved with the model; `convert` still predicts what the QAT model predicts."""
    qat = _stochastic_qat(seed=1)
    x = rng.standard_normal((32, 6)).astype(np.float32)
    y = rng.standard_normal((32, 3)).astype(np.float32)
    qat.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    qat.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[tq.FinishWithNearestRounding()])
    wrappers = [layer for layer in qat.layers if isinstance(layer, tq.QuantizeWrapper)]
    assert [float(w.stochastic_rounding.numpy()) for w in wrappers] == [0.0, 0.0, 0.0]
    wrappers[1].set_stochastic_rounding(True)  # a mixed state, to see that each layer keeps its own

    path = str(tmp_path / "qat.keras")
    qat.save(path)
    loaded = keras.saving.load_model(path)
    loaded_wrappers = [layer for layer in loaded.layers if isinstance(layer, tq.QuantizeWrapper)]
    assert [float(w.stochastic_rounding.numpy()) for w in loaded_wrappers] == [0.0, 1.0, 0.0]
    np.testing.assert_allclose(loaded.predict(x, verbose=0), qat.predict(x, verbose=0), rtol=1e-6, atol=1e-6)
    # The loaded model's training calls follow the loaded state: nearest where it is 0.
    loaded_wrappers[1].set_stochastic_rounding(False)
    np.testing.assert_allclose(
        loaded(x, training=True).numpy(), loaded(x, training=False).numpy(), rtol=1e-6, atol=1e-6
    )

    converted = tq.convert(qat)
    assert not any("stochastic_rounding" in w.path for w in converted.weights)
    np.testing.assert_allclose(
        converted.predict(x, verbose=0), qat.predict(x, verbose=0), rtol=1e-6, atol=1e-6
    )
    check_keras_round_trip(converted, x, tmp_path)


# --- bad arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weight_bits": 1}, "weight_bits"),
        ({"weight_bits": 9}, "weight_bits"),
        ({"weight_bits": 4.0}, "weight_bits"),
        ({"weight_bits": True}, "weight_bits"),
        ({"activation_bits": 0}, "activation_bits"),
        ({"activation_bits": 16}, "activation_bits"),
        ({"rounding": "floor"}, "rounding"),
        ({"per_channel": "yes"}, "per_channel"),
        ({"ema_decay": 1.0}, "ema_decay"),
    ],
)
def test_bad_arguments(kwargs, match):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match=match):
        tq.quantize_model(model, **kwargs)


def test_bad_rounding_switch_arguments(rng):
    for bad in (0, -1, 1.5, True, "1", None):
        with pytest.raises(ValueError, match="nearest_epochs"):
            tq.FinishWithNearestRounding(nearest_epochs=bad)
    wrapper = tq.QuantizeWrapper(keras.layers.Dense(2), weight_bits=2, rounding="stochastic")
    with pytest.raises(ValueError, match="not built"):
        wrapper.set_stochastic_rounding(False)
    wrapper.build((None, 3))
    with pytest.raises(ValueError, match="enabled"):
        wrapper.set_stochastic_rounding(0)
    nearest = tq.QuantizeWrapper(keras.layers.Dense(2), weight_bits=2)
    nearest.build((None, 3))
    with pytest.raises(ValueError, match="rounding"):
        nearest.set_stochastic_rounding(False)
    # A model without stochastic wrappers: an error at the start of fit, before any training.
    model = tq.quantize_model(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]), weight_bits=2)
    model.compile(optimizer="adam", loss="mse")
    x = rng.standard_normal((4, 3)).astype(np.float32)
    before = [w.numpy().copy() for w in model.weights]
    with pytest.raises(ValueError, match="rounding='stochastic'"):
        model.fit(x, x[:, :2], epochs=1, verbose=0, callbacks=[tq.FinishWithNearestRounding()])
    for b, w in zip(before, model.weights):
        np.testing.assert_array_equal(b, w.numpy())


def test_bad_models():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="model"):
        tq.quantize_model(keras.layers.Dense(2))
    with pytest.raises(ValueError, match="already quantised"):
        tq.quantize_model(tq.quantize_model(model))
    with pytest.raises(ValueError, match="QuantizeWrapper"):
        tq.convert(model)
    wrapped = keras.Sequential([keras.Input((4, 3)), keras.layers.TimeDistributed(keras.layers.Dense(2))])
    with pytest.raises(ValueError, match="strip_pruning"):
        tq.quantize_model(wrapped)
    with pytest.raises(ValueError, match="no kernel"):
        tq.QuantizeWrapper(tsc.layers.KWinners(k=1)).build((None, 4))
    with pytest.raises(ValueError, match="bits"):
        tq.fake_quant_weights(np.ones(3, np.float32), 10)


def test_wrapper_config_round_trip():
    wrapper = tq.QuantizeWrapper(
        tsc.layers.ChannelSparseConv2D(4, 3, fan_in=2),
        weight_bits=3,
        activation_bits=None,
        rounding="stochastic",
    )
    config = wrapper.get_config()
    clone = tq.QuantizeWrapper.from_config(config)
    assert clone.get_config() == config
    serialized = keras.saving.serialize_keras_object(wrapper)
    assert keras.saving.deserialize_keras_object(serialized).get_config() == config


def test_composes_with_pruning(rng):
    pruning = pytest.importorskip("tf_sparseconv.python.pruning")
    keras.utils.set_random_seed(6)
    model = keras.Sequential(
        [keras.Input((8, 8, 3)), tsc.layers.ChannelSparseConv2D(8, 3, fan_in=2), keras.layers.Flatten()]
        + [keras.layers.Dense(3)]
    )
    pruned = pruning.prune_low_magnitude(model, pruning.ConstantSparsity(0.5, 0, frequency=1))
    x = rng.standard_normal((8, 8, 8, 3)).astype(np.float32)
    pruned.compile(optimizer="adam", loss="mse")
    pruned.fit(x, np.zeros((8, 3), np.float32), epochs=1, verbose=0, callbacks=[pruning.UpdatePruningStep()])
    qat = tq.quantize_model(pruned, weight_bits=4)
    assert sum(isinstance(layer, tq.QuantizeWrapper) for layer in qat.layers) == 2
    qat.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    qat.fit(x, rng.standard_normal((8, 3)).astype(np.float32), epochs=2, verbose=0)
    for wrapper in (qat.layers[0], qat.layers[-1]):
        values, _ = wrapper.integer_kernel(wrapper.specs[0])
        assert np.mean(values.numpy() == 0) >= 0.5
    converted = tq.convert(qat)
    np.testing.assert_allclose(
        converted.predict(x, verbose=0), qat.predict(x, verbose=0), rtol=1e-6, atol=1e-6
    )


def test_annotate_then_apply_quantises_exactly_the_marked_layers(rng, tmp_path):
    pruning = pytest.importorskip("tf_sparseconv.python.pruning")
    keras.utils.set_random_seed(7)
    x = rng.standard_normal((16, 12)).astype(np.float32)
    model = keras.Sequential(
        [keras.Input((12,)), keras.layers.Dense(16, name="a"), keras.layers.Dense(8, name="b")]
        + [keras.layers.Flatten(name="f"), keras.layers.Dense(3, name="c")]
    )
    marked = keras.models.clone_model(
        model, clone_function=lambda layer: tq.quantize_annotate_layer(layer) if layer.name != "c" else layer
    )
    path = str(tmp_path / "annotated.keras")
    marked.save(path)
    with tq.quantize_scope():
        marked = keras.models.load_model(path)
    qat = tq.quantize_apply(marked, weight_bits=4, quantized_layer_name_prefix="q_")
    assert [(type(layer).__name__, layer.name) for layer in qat.layers] == [
        ("QuantizeWrapper", "q_a"),
        ("QuantizeWrapper", "q_b"),
        ("Flatten", "f"),  # marked, but no kernel: copied as it is
        ("Dense", "c"),  # not marked
    ]
    assert qat.layers[0].weight_bits == 4
    np.testing.assert_array_equal(qat.layers[3].kernel.numpy(), model.layers[-1].kernel.numpy())
    # A marked pruning wrapper becomes a QuantizeWrapper keeping its mask frozen.
    pruned = pruning.prune_low_magnitude(model, pruning.ConstantSparsity(0.5, 0, frequency=1))
    pruned.compile(optimizer="sgd", loss="mse")
    pruned.fit(x, x[:, :3], epochs=1, verbose=0, callbacks=[pruning.UpdatePruningStep()])
    qat = tq.quantize_apply(tq.quantize_annotate_model(pruned))
    assert [type(layer).__name__ for layer in qat.layers] == ["QuantizeWrapper"] * 2 + [
        "Flatten",
        "QuantizeWrapper",
    ]
    for wrapper in (qat.layers[0], qat.layers[-1]):
        assert np.mean(wrapper.masks["kernel"].numpy() == 0) == 0.5
    np.testing.assert_allclose(qat(x), pruned(x), atol=0.05)  # only 8-bit weight rounding apart
    with pytest.raises(ValueError, match="quantize_config"):
        tq.quantize_annotate_layer(keras.layers.Dense(2), quantize_config={})
