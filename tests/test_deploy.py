"""Deployment: every family's export runs in LiteRT (TFLite) and onnxruntime with the Keras
model's outputs.

Each model goes through the user's path: `tsc.export.export_litert` / `export_onnx` (the
portable SavedModel -> `TFLiteConverter.from_saved_model` with TFLite builtin ops only, or
tf2onnx), then the `ai_edge_litert` interpreter or onnxruntime, compared with the Keras model
on random data: float within 1e-5 relative; int8 within the quantisation error. A SavedModel
from `export_saved_model` itself is also converted with the stock converter (the exports once
tracked Keras variable wrappers and every one converted to a NaN-producing model).
(Sparse-map models: tests/test_deploy_sparse_maps.py.)
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tf2onnx")
ort = pytest.importorskip("onnxruntime")
litert = pytest.importorskip("ai_edge_litert.interpreter")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_sparseconv as tsc  # noqa: E402

pytestmark = pytest.mark.slow

TARGETS = ("litert", "onnx")


def run_litert(path, feeds, signature=None):
    interpreter = litert.Interpreter(model_path=str(path))
    runner = interpreter.get_signature_runner(signature)
    return {k: np.asarray(v) for k, v in runner(**feeds).items()}


def run_onnx(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def deploy(model, target, tmp_path, feeds, **kwargs):
    """Exports `model` to `target`, runs it on `feeds` (dict by input name); the outputs."""
    if target == "litert":
        path = tsc.export.export_litert(model, str(tmp_path / "model.tflite"), **kwargs)
        return run_litert(path, feeds), path
    path = tsc.export.export_onnx(model, str(tmp_path / "model.onnx"))
    return run_onnx(path, feeds), path


def assert_close(got, want, rtol=1e-5):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.all(np.isfinite(got))
    scale = max(float(np.abs(want).max()), 1e-6)
    err = float(np.abs(got - want).max())
    assert err <= rtol * scale, f"max |diff| {err:.3g} > {rtol} x max |want| {scale:.3g}"


def check_float(model, target, tmp_path, feeds):
    inputs = list(feeds.values())
    want = model(inputs if len(inputs) > 1 else inputs[0], training=False)
    got, _ = deploy(model, target, tmp_path, feeds)
    for i, value in enumerate(keras.tree.flatten(want)):
        assert_close(got[f"output_{i}"], value.numpy())


def image_input(shape=(10, 10, 6), name="image"):
    return keras.Input(shape, name=name)


@pytest.fixture
def x(rng):
    return rng.standard_normal((3, 10, 10, 6)).astype(np.float32)


# --- the exports themselves, through the stock converter ------------------------------------


@pytest.mark.parametrize("portable", [False, True])
def test_saved_model_converts_with_stock_tflite_converter(rng, tmp_path, x, portable):
    """The regression: a stock Conv2D + Dense exported by us, converted by TF's own converter."""
    inputs = image_input()
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    outputs = keras.layers.Dense(3)(keras.layers.Flatten()(h))
    model = keras.Model(inputs, outputs)
    path = tsc.export.export_saved_model(model, str(tmp_path / "sm"), portable=portable)
    flatbuffer = tf.lite.TFLiteConverter.from_saved_model(path).convert()
    runner = litert.Interpreter(model_content=flatbuffer).get_signature_runner()
    assert_close(runner(image=x)["output_0"], model(x).numpy())


def test_exported_modules_track_tf_variables(tmp_path):
    inputs = image_input()
    model = keras.Model(inputs, tsc.layers.ChannelSparseConv2D(4, 3, density=0.5)(inputs))
    path = tsc.export.export_saved_model(model, str(tmp_path / "sm"), portable=True)
    loaded = tf.saved_model.load(path)
    assert loaded.model_variables and all(isinstance(v, tf.Variable) for v in loaded.model_variables)


# --- families -----------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_kwinners(target, tmp_path, x):
    inputs = image_input()
    h = keras.layers.Conv2D(8, 3, padding="same")(inputs)
    h = tsc.layers.KWinners(k=3)(h)
    h = tsc.layers.KWinners(sparsity=0.5, axis=1)(h)  # along the height too
    check_float(keras.Model(inputs, h), target, tmp_path, {"image": x})


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(("mode", "per"), [("abs", "channel"), ("relu", "sample")])
def test_topk_attention(target, tmp_path, x, mode, per):
    inputs = image_input()
    h = tsc.layers.TopKAttention(k=7, mode=mode, per=per)(inputs)
    check_float(keras.Model(inputs, h), target, tmp_path, {"image": x})


@pytest.mark.parametrize("target", TARGETS)
def test_channel_sparse(target, tmp_path, x):
    """Both forms of the portable graph: the dense-kernel reference (fan-in 1/6, with stride
    and VALID padding) and the dense dispatch (fan-in 1/2)."""
    inputs = image_input()
    a = tsc.layers.ChannelSparseConv2D(8, 3, density=1 / 6, strides=2, padding="valid")(inputs)
    b = tsc.layers.ChannelSparseConv2D(8, 3, density=0.5, activation="relu")(inputs)
    b = keras.layers.MaxPooling2D(2)(b)
    outputs = keras.layers.Concatenate()([a, keras.layers.Cropping2D(((0, 1), (0, 1)))(b)])
    check_float(keras.Model(inputs, outputs), target, tmp_path, {"image": x})


@pytest.mark.parametrize("target", TARGETS)
def test_channel_sparse_1d(target, tmp_path, rng):
    inputs = keras.Input((20, 8), name="sequence")
    h = tsc.layers.ChannelSparseConv1D(6, 3, density=0.25, activation="relu")(inputs)
    h = tsc.layers.ChannelSparseConv1D(4, 5, density=0.5, dilation_rate=2, padding="valid")(h)
    seq = rng.standard_normal((2, 20, 8)).astype(np.float32)
    check_float(keras.Model(inputs, h), target, tmp_path, {"sequence": seq})


@pytest.mark.parametrize("target", TARGETS)
def test_block_sparse(target, tmp_path, rng):
    """`[x, mask]` models: a block-sparse conv (strided) and a residual block, with a mask that
    activates some blocks, none of one image and all of another."""
    x = rng.standard_normal((3, 16, 16, 4)).astype(np.float32)
    mask = (rng.random((3, 16, 16)) > 0.93).astype(np.float32)
    mask[1] = 0.0
    mask[2] = 1.0
    image, m = keras.Input((16, 16, 4), name="image"), keras.Input((16, 16), name="mask")
    h = tsc.layers.BlockSparseConv2D(4, 3, block_size=4, activation="relu")([image, m])
    h = tsc.layers.BlockSparseResidualBlock(4, block_size=8)([h, m])
    d = tsc.layers.BlockSparseConv2D(6, 3, block_size=4, strides=2)([h, m])
    model = keras.Model([image, m], d)
    check_float(model, target, tmp_path, {"image": x, "mask": mask})


def _digits_cnn(sparse_conv2: bool = False):
    inputs = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(inputs)
    if sparse_conv2:
        h = tsc.layers.ChannelSparseConv2D(24, 3, density=0.25, activation="relu", name="conv2")(h)
    else:
        h = keras.layers.Conv2D(24, 3, padding="same", activation="relu", name="conv2")(h)
    h = keras.layers.MaxPooling2D(2)(h)
    outputs = keras.layers.Dense(10, activation="softmax", name="classes")(keras.layers.Flatten()(h))
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    return x[:1400], data.target[:1400], x[1400:], data.target[1400:]


@pytest.fixture(scope="module")
def pruned(digits):
    x_train, y_train, _, _ = digits
    keras.utils.set_random_seed(0)
    model = _digits_cnn()
    schedule = tsc.pruning.ConstantSparsity(0.75, begin_step=0, frequency=5)
    pruned = tsc.pruning.prune_low_magnitude(model, schedule, granularity="kernel")
    pruned.compile("adam", "sparse_categorical_crossentropy")
    pruned.fit(
        x_train, y_train, epochs=1, batch_size=64, verbose=0, callbacks=[tsc.pruning.UpdatePruningStep()]
    )
    return pruned


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("stripped", [False, True])
def test_pruned_and_stripped(target, tmp_path, digits, pruned, stripped):
    model = tsc.pruning.strip_pruning(pruned, to_sparse_layers=True) if stripped else pruned
    if stripped:
        assert type(model.get_layer("conv2")).__name__ == "ChannelSparseConv2D"
    check_float(model, target, tmp_path, {"image": digits[2][:16]})


@pytest.fixture(scope="module")
def qat(digits):
    x_train, y_train, _, _ = digits
    keras.utils.set_random_seed(1)
    model = _digits_cnn(sparse_conv2=True)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x_train, y_train, epochs=3, batch_size=64, verbose=0)
    qat = tsc.quantization.quantize_model(model, weight_bits=8, activation_bits=8)
    qat.compile("adam", "sparse_categorical_crossentropy")
    qat.fit(x_train, y_train, epochs=1, batch_size=64, verbose=0)
    return qat


def _litert_op_input_types(path):
    interpreter = litert.Interpreter(model_path=str(path))
    tensors = interpreter.get_tensor_details()
    types = {}
    for op in interpreter._get_ops_details():
        dtypes = [np.dtype(tensors[i]["dtype"]).name for i in op["inputs"] if i >= 0]
        types.setdefault(op["op_name"], []).append(dtypes)
    return types


@pytest.mark.parametrize("converted", [False, True])
def test_qat_model_to_integer_litert(tmp_path, digits, qat, converted):
    """An 8-bit QAT model (and its `convert`ed form) becomes a full-integer LiteRT model: int8
    activations and weights, int32 biases, in every CONV_2D and FULLY_CONNECTED; its
    predictions agree with the Keras model's up to the int8 error."""
    x_train, _, x_test, y_test = digits
    model = tsc.quantization.convert(qat) if converted else qat
    path = tsc.export.export_litert(model, str(tmp_path / "int8.tflite"), representative_data=x_train[:200])
    types = _litert_op_input_types(path)
    for op in ("CONV_2D", "FULLY_CONNECTED"):
        assert types[op] and all(t == ["int8", "int8", "int32"] for t in types[op]), types
    got = run_litert(path, {"image": x_test})["output_0"]
    want = model.predict(x_test, verbose=0)
    assert np.abs(got - want).max() < 0.1  # probabilities; a few int8 steps of the logits
    keras_accuracy = np.mean(want.argmax(-1) == y_test)
    litert_accuracy = np.mean(got.argmax(-1) == y_test)
    assert abs(litert_accuracy - keras_accuracy) <= 0.01, (litert_accuracy, keras_accuracy)


def test_qat_model_to_onnx(tmp_path, digits, qat):
    """ONNX keeps the fake quantisation (QuantizeLinear/DequantizeLinear pairs): the QAT
    model's predictions within a quantisation step."""
    x_test = digits[2]
    got = run_onnx(tsc.export.export_onnx(qat, str(tmp_path / "qat.onnx")), {"image": x_test})
    want = qat.predict(x_test, verbose=0)
    assert np.abs(got["output_0"] - want).max() < 0.02
    assert np.mean(got["output_0"].argmax(-1) == want.argmax(-1)) >= 0.99


def test_export_litert_arguments(tmp_path, qat):
    with pytest.raises(ValueError, match="representative_data"):
        tsc.export.export_litert(qat, str(tmp_path / "a.tflite"))
    with pytest.raises(ValueError, match="quantize"):
        tsc.export.export_litert(qat, str(tmp_path / "a.tflite"), quantize="int4")
    with pytest.raises(ValueError, match="integer_io"):
        tsc.export.export_litert(_digits_cnn(), str(tmp_path / "a.tflite"), integer_io=True)
    with pytest.raises(ValueError, match="opset"):
        tsc.export.export_onnx(_digits_cnn(), str(tmp_path / "a.onnx"), opset=7)


# --- streaming ----------------------------------------------------------------------------


def _streaming_model():
    """Every streamable layer kind: causal StreamingConv1D (stride 1 and strided + dilated),
    k-WTA over channels, valid max pooling, ChannelSparseConv1D, valid Conv1D, causal dilated
    Conv1D, average pooling, Dense."""
    S = tsc.streaming
    inputs = keras.Input((None, 6))
    h = S.StreamingConv1D(8, 3, activation="relu")(inputs)
    h = S.StreamingConv1D(8, 3, strides=2, dilation_rate=2)(h)
    h = tsc.layers.KWinners(k=3)(h)
    h = keras.layers.MaxPooling1D(2)(h)
    h = tsc.layers.ChannelSparseConv1D(8, 1, density=0.25, activation="relu")(h)  # after a stride
    h = keras.layers.Conv1D(8, 2, padding="valid", activation="relu")(h)
    h = keras.layers.Conv1D(8, 3, padding="causal", dilation_rate=2)(h)
    h = keras.layers.AveragePooling1D(1)(h)
    return keras.Model(inputs, keras.layers.Dense(4)(h))


def _stream(run, frames, state, steps):
    outputs = []
    for t0, t1 in steps:
        result = run({"frames": frames[:, t0:t1], **state})
        outputs.append(result.pop("outputs"))
        assert set(result) == {f"next_{k}" for k in state}
        state = {k.replace("next_", ""): v for k, v in result.items()}
    return np.concatenate(outputs, axis=1)


@pytest.mark.parametrize("target", TARGETS)
def test_streaming_step_with_state_fed_back(target, tmp_path, rng):
    model = _streaming_model()
    stream = tsc.streaming.to_streaming(model)
    frames = rng.standard_normal((1, 96, 6)).astype(np.float32)
    full = model(frames).numpy()
    state = {f"state_{i}": np.asarray(s) for i, s in enumerate(stream.initial_state(1))}
    if target == "litert":
        path = tsc.export.export_litert(stream, str(tmp_path / "step.tflite"))
        runner = litert.Interpreter(model_path=path).get_signature_runner("step")
        run = lambda feeds: {k: np.asarray(v) for k, v in runner(**feeds).items()}  # noqa: E731
        steps = [(t, t + 1) for t in range(96)]  # one frame at a time
    else:
        path = tsc.export.export_onnx(stream, str(tmp_path / "step.onnx"))
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        run = lambda feeds: dict(zip(names, session.run(None, feeds)))  # noqa: E731
        steps = [(0, 1), (1, 5), (5, 6), (6, 17), *[(t, t + 1) for t in range(17, 40)], (40, 96)]
    assert_close(_stream(run, frames, state, steps), full)


def test_export_streaming_portable_names(tmp_path):
    model = _streaming_model()
    path = tsc.streaming.export_streaming(model, str(tmp_path / "s"), portable=True)
    step = tf.saved_model.load(path).signatures["step"]
    inputs = set(step.structured_input_signature[1])
    outputs = set(step.structured_outputs)
    n = len(tsc.streaming.to_streaming(model).state_specs)
    assert inputs == {"frames", *(f"state_{i}" for i in range(n))}
    assert outputs == {"outputs", *(f"next_state_{i}" for i in range(n))}
    assert not tsc.export.custom_ops_in(step)
    with pytest.raises(ValueError, match="portable"):
        tsc.streaming.export_streaming(model, str(tmp_path / "t"), portable="yes")


def test_qat_depthwise_and_per_tensor_to_integer_litert(tmp_path, rng):
    """Depthwise convolutions (their kernels are quantised per channel by the converter, on
    the QAT grid) and per-tensor weight scales also give int8 kernels."""
    x = rng.random((64, 12, 12, 3)).astype(np.float32)
    y = rng.integers(0, 4, 64)
    inputs = keras.Input((12, 12, 3), name="image")
    h = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
    h = keras.layers.DepthwiseConv2D(3, activation="relu")(h)
    outputs = keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(h))
    for per_channel in (True, False):
        qat = tsc.quantization.quantize_model(keras.Model(inputs, outputs), per_channel=per_channel)
        qat.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        qat.fit(x, y, epochs=1, batch_size=16, verbose=0)
        path = tsc.export.export_litert(qat, str(tmp_path / f"dw{per_channel}.tflite"), representative_data=x)
        types = _litert_op_input_types(path)
        for op in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            assert types[op] and all(t == ["int8", "int8", "int32"] for t in types[op]), (op, types)
        got = run_litert(path, {"image": x})["output_0"]
        want = qat.predict(x, verbose=0)
        assert np.abs(got - want).max() <= 0.05 * np.abs(want).max() + 1e-3


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_model_exports_in_float32(target, tmp_path, x, policy):
    """A mixed-precision model converts (its layers computing in float32 for the export: the
    converters reject half-precision convolutions and top-k): its outputs are the model's
    computed in float32 (from the same float32 variables)."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        inputs = image_input()
        h = tsc.layers.ChannelSparseConv2D(8, 3, density=0.25, activation="relu")(inputs)
        h = tsc.layers.KWinners(k=3)(keras.layers.Conv2D(8, 3, padding="same")(h))
        model = keras.Model(inputs, keras.layers.Dense(4, dtype="float32")(h))
        with tsc.export.float32_compute(model):
            want = model(x).numpy()
        assert model(x).dtype == "float32" and model.layers[1].compute_dtype == policy.split("_")[1]
        got, _ = deploy(model, target, tmp_path, {"image": x})
        assert model.layers[1].compute_dtype == policy.split("_")[1]  # restored after export
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert_close(got["output_0"], want)


def test_int8_representative_data_follows_the_model_input_order(tmp_path, rng):
    """Two inputs whose names sort the other way round: `representative_data` is read in the
    model's input order (a list), or by name (a dict), or from a dataset of (inputs, labels)."""
    b_in, a_in = keras.Input((8,), name="b_in"), keras.Input((3,), name="a_in")
    h = keras.layers.Concatenate()([keras.layers.Dense(4)(b_in), keras.layers.Dense(4)(a_in)])
    model = keras.Model([b_in, a_in], keras.layers.Dense(2)(h))
    xb, xa = rng.random((32, 8)).astype(np.float32), rng.random((32, 3)).astype(np.float32)
    qat = tsc.quantization.quantize_model(model)
    qat.compile("sgd", "mse")
    qat.fit([xb, xa], rng.random((32, 2)).astype(np.float32), epochs=1, verbose=0)
    want = qat.predict([xb, xa], verbose=0)
    dataset = tf.data.Dataset.from_tensor_slices(((xb, xa), np.zeros((32, 2), np.float32))).batch(8)
    for n, data in enumerate([[xb, xa], {"a_in": xa, "b_in": xb}, dataset]):
        path = tsc.export.export_litert(qat, str(tmp_path / f"two{n}.tflite"), representative_data=data)
        got = run_litert(path, {"b_in": xb, "a_in": xa})["output_0"]
        assert np.abs(got - want).max() <= 0.05 * np.abs(want).max() + 1e-3
