"""`tsc.quantization` under Keras' mixed-precision policies (`mixed_float16`, `mixed_bfloat16`):
QAT `fit`, inference, `convert` (same predictions as the QAT model), `.keras` save/load and
SavedModel export (compiled ops and portable, the latter through TensorFlow's FakeQuant ops).

As in Keras, variables stay float32 and layers compute in their compute dtype; the quantisation
arithmetic (scales, ranges, the rounding grid) is float32, so a kernel's quantised values are
the float32 model's, cast to the compute dtype.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_sparseconv as tsc
from tf_sparseconv.python import quantization as tq

POLICIES = ["mixed_float16", "mixed_bfloat16"]
HALF = {"mixed_float16": np.float16, "mixed_bfloat16": tf.bfloat16.as_numpy_dtype}


@pytest.fixture(scope="module", params=POLICIES)
def policy(request):
    """Sets the global dtype policy for this policy's tests; always restores float32."""
    try:
        keras.mixed_precision.set_global_policy(request.param)
        yield request.param
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _model():
    """Conv2D, ChannelSparseConv2D, KWinners, DepthwiseConv2D and Dense in the global policy,
    the softmax Dense in float32 (Keras' advice for mixed-precision outputs)."""
    inputs = keras.Input((8, 8, 3), name="image")
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    h = tsc.layers.KWinners(k=4)(h)
    h = tsc.layers.ChannelSparseConv2D(8, 3, fan_in=4, activation="relu")(h)
    h = keras.layers.DepthwiseConv2D(3)(h)
    h = keras.layers.Dense(6, activation="relu")(keras.layers.GlobalAveragePooling2D()(h))
    outputs = keras.layers.Dense(3, activation="softmax", dtype="float32")(h)
    return keras.Model(inputs, outputs)


def _data(rng, n=16):
    x = rng.standard_normal((n, 8, 8, 3)).astype(np.float32)
    return x, rng.integers(0, 3, n)


def _assert_same(got, want, last):
    """Equal up to a few values moved by one step of the output layer's activation grid (the
    two models may be fused differently by TensorFlow; see tests/test_quantization.py)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    step = float(tq.activation_qparams(last.activation_min, last.activation_max, last.activation_bits)[0])
    assert np.isclose(got, want, rtol=1e-5, atol=1e-6).mean() >= 0.9
    np.testing.assert_allclose(got, want, rtol=0, atol=2 * step + 1e-6)


@pytest.fixture(scope="module")
def trained(policy):
    """(policy, x, QAT model after one epoch, its converted model): built once per policy."""
    keras.utils.set_random_seed(0)
    x, y = _data(np.random.default_rng(0))
    qat = tq.quantize_model(_model(), weight_bits=4, activation_bits=8, rounding="stochastic", seed=0)
    qat.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    before = [w.numpy().copy() for w in qat.trainable_weights]
    loss = qat.fit(x, y, batch_size=8, epochs=1, verbose=0).history["loss"][-1]
    assert np.isfinite(loss)
    assert all(not np.array_equal(b, w.numpy()) for b, w in zip(before, qat.trainable_weights))
    return policy, x, qat, tq.convert(qat)


def test_fit_predict_convert(trained):
    policy, x, qat, converted = trained
    wrappers = [layer for layer in qat.layers if isinstance(layer, tq.QuantizeWrapper)]
    assert {type(w.layer).__name__ for w in wrappers} == {
        "Conv2D",
        "ChannelSparseConv2D",
        "DepthwiseConv2D",
        "Dense",
    }
    for wrapper in wrappers:
        # A wrapper computes in its layer's dtype; its variables stay float32.
        assert wrapper.compute_dtype == wrapper.layer.compute_dtype
        assert all(v.dtype == "float32" for v in wrapper.weights)
        assert float(wrapper.range_initialized.numpy()) == 1.0
    assert wrappers[0].compute_dtype == policy.split("_")[1]
    assert wrappers[-1].compute_dtype == "float32"
    assert all(v.dtype in ("float32", "int8") for v in converted.weights)

    want = qat.predict(x, verbose=0)
    assert want.dtype == np.float32 and np.all(np.isfinite(want))
    _assert_same(converted.predict(x, verbose=0), want, converted.layers[-1])
    # The intermediate features too: the converted layers compute what the QAT layers compute.
    name = wrappers[1].name
    features = [keras.Model(m.input, m.get_layer(name).output)(x).numpy() for m in (qat, converted)]
    assert features[0].dtype == HALF[policy]
    np.testing.assert_array_equal(features[1], features[0])


def test_quantisation_grid_is_float32(trained):
    """The kernels are quantised from their float32 values with float32 scales, then cast; the
    activation grid's scale is the float32 one."""
    policy, x, qat, converted = trained
    half = HALF[policy]
    for wrapper in (layer for layer in qat.layers if isinstance(layer, tq.QuantizeWrapper)):
        for spec in wrapper.specs:
            kernel = np.asarray(tq.wrappers._read(wrapper.layer, spec).numpy(), np.float32)
            axes = wrapper.channel_axes(spec)
            want = tq.fake_quant_weights(kernel, wrapper.weight_bits, axes).numpy()
            values, scales = wrapper.integer_kernel(spec)
            assert values.dtype == tf.float32 and scales.dtype == tf.float32
            np.testing.assert_array_equal(values.numpy() * scales.numpy(), want)
            got = wrapper.quantized_kernel(spec, training=False)
            assert got.dtype == wrapper.layer.compute_dtype
            np.testing.assert_array_equal(got.numpy(), want.astype(got.dtype.as_numpy_dtype))
            target = converted.get_layer(wrapper.name)
            np.testing.assert_array_equal(target.dequantized_kernel(spec).numpy(), got.numpy())

    # The quantisers themselves: float32 arithmetic, the input's dtype out.
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 3, 4, 5)).astype(np.float32)
    w_half = tf.constant(w.astype(half))
    got = tq.fake_quant_weights(w_half, 3)
    assert got.dtype == w_half.dtype
    want = tq.fake_quant_weights(tf.cast(w_half, tf.float32), 3)
    np.testing.assert_array_equal(got.numpy(), tf.cast(want, w_half.dtype).numpy())
    values, scales = tq.quantize_weights_int(w_half, 3)
    assert values.dtype == tf.float32 and scales.dtype == tf.float32
    a = tf.constant((rng.standard_normal(200) * 3).astype(half))
    lo, hi = -1.2345678, 2.3456789  # not representable in half precision
    got = tq.fake_quant_activations(a, lo, hi, 8)
    assert got.dtype == a.dtype
    want = tq.fake_quant_activations(tf.cast(a, tf.float32), lo, hi, 8)
    np.testing.assert_array_equal(got.numpy(), tf.cast(want, a.dtype).numpy())
    scale, zero_point = tq.activation_qparams(tf.constant(lo, a.dtype), tf.constant(hi, a.dtype), 8)
    assert scale.dtype == tf.float32 and zero_point.dtype == tf.float32
    # Straight-through gradients reach half-precision inputs.
    with tf.GradientTape() as tape:
        tape.watch(w_half)
        loss = tf.reduce_sum(tf.cast(tq.fake_quant_weights(w_half, 3), tf.float32))
    np.testing.assert_array_equal(tape.gradient(loss, w_half).numpy(), np.ones_like(w))


def test_keras_save_load(trained, tmp_path):
    policy, x, qat, converted = trained
    for model in (qat, converted):
        path = os.path.join(tmp_path, f"{model.name}.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)
        wrapper_type = tq.QuantizeWrapper if model is qat else tq.IntegerWeightsWrapper
        first = next(layer for layer in loaded.layers if isinstance(layer, wrapper_type))
        assert first.compute_dtype == policy.split("_")[1]
        assert all(v.dtype in ("float32", "int8") for v in loaded.weights)
        np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())


@pytest.mark.parametrize("portable", [False, True], ids=["compiled_ops", "portable"])
def test_export_saved_model(trained, tmp_path, portable):
    """The SavedModel serves the Keras predictions; the portable one (traced under
    `for_converters()`) quantises through TensorFlow's float32 FakeQuant ops, cast around."""
    policy, x, qat, converted = trained
    # The converting() paths of both wrappers when portable; the compiled ops once.
    for model in (qat, converted) if portable else (converted,):
        path = tsc.export.export_saved_model(model, str(tmp_path / model.name), portable=portable)
        serve = tf.saved_model.load(path).signatures["serving_default"]
        got = serve(image=tf.constant(x))["output_0"].numpy()
        want = model(x).numpy()
        # Graph vs eager (fusions in half precision) and, portable, TensorFlow's fake-quant op
        # rounding halves away from zero (ours: to even) can move a value by one step.
        _assert_same(got, want, converted.layers[-1])
        if portable:
            ops = {node.op for f in serve.graph.as_graph_def().library.function for node in f.node_def}
            assert {"FakeQuantWithMinMaxVars", "FakeQuantWithMinMaxVarsPerChannel"} <= ops, ops


def test_export_litert_int8(trained, tmp_path):
    """The int8 LiteRT model: int8 kernels and activations in every convolution and matmul;
    its outputs within the int8 error of the Keras model's."""
    litert = pytest.importorskip("ai_edge_litert.interpreter")
    policy, x, qat, converted = trained
    path = tsc.export.export_litert(converted, str(tmp_path / "int8.tflite"), representative_data=x)
    interpreter = litert.Interpreter(model_path=path)
    tensors = interpreter.get_tensor_details()
    for op in interpreter._get_ops_details():
        if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            types = [np.dtype(tensors[i]["dtype"]).name for i in op["inputs"] if i >= 0]
            assert types == ["int8", "int8", "int32"], (op["op_name"], types)
    got = interpreter.get_signature_runner()(image=x)["output_0"]
    assert np.abs(got - converted(x).numpy()).max() < 0.1  # probabilities
