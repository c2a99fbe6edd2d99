"""tsc.streaming: StreamingConv1D, to_streaming (== the full-sequence model), export_streaming."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import run_python
from layer_checks import check_config_round_trip, check_keras_round_trip

import tf_sparseconv as tsc
from tf_sparseconv.python import streaming


def np_causal_conv1d(x, kernel, bias, stride, dilation):
    """Independent reference: y[b, j, o] = bias[o] + sum_i x[b, j*s - (k-1-i)*d, :] @ kernel[i]."""
    b, t, _ = x.shape
    k, _, filters = kernel.shape
    outputs = -(-t // stride)
    y = np.zeros((b, outputs, filters)) + bias
    for j in range(outputs):
        for i in range(k):
            frame = j * stride - (k - 1 - i) * dilation
            if frame >= 0:
                y[:, j] += x[:, frame].astype(np.float64) @ kernel[i]
    return y


def run_in_chunks(streaming_model, x, rng, max_chunk=7):
    """Feeds `x` [B, T, C] (or a list of such) in random chunks of 1..max_chunk frames."""
    xs = x if isinstance(x, list) else [x]
    total, t, outputs = xs[0].shape[1], 0, []
    while t < total:
        n = min(int(rng.integers(1, max_chunk + 1)), total - t)
        frames = [a[:, t : t + n] for a in xs]
        outputs.append(streaming_model.step(frames if isinstance(x, list) else frames[0]))
        t += n
    return outputs


def concat(outputs):
    if isinstance(outputs[0], (list, tuple)):
        return [np.concatenate([np.asarray(o[i]) for o in outputs], axis=1) for i in range(len(outputs[0]))]
    return np.concatenate([np.asarray(o) for o in outputs], axis=1)


@pytest.mark.parametrize(("stride", "dilation"), [(1, 1), (1, 3), (2, 1), (3, 2)])
def test_streaming_conv1d_is_a_causal_conv(rng, stride, dilation):
    layer = streaming.StreamingConv1D(
        4, 3, strides=stride, dilation_rate=dilation, bias_initializer="random_normal"
    )
    x = rng.standard_normal((2, 23, 5)).astype(np.float32)
    y = layer(x)
    expected = np_causal_conv1d(x, layer.kernel.numpy(), layer.bias.numpy(), stride, dilation)
    assert y.shape == expected.shape == layer.compute_output_shape(x.shape)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    if stride == 1 or dilation == 1:  # Keras/TF can run these combinations
        conv = keras.layers.Conv1D(4, 3, strides=stride, dilation_rate=dilation, padding="causal")
        conv.build(x.shape)
        conv.set_weights(layer.get_weights())
        np.testing.assert_allclose(conv(x), y, rtol=1e-5, atol=1e-5)


def test_streaming_conv1d_keras_conventions(rng, tmp_path):
    layer = streaming.StreamingConv1D(6, 3, strides=2, dilation_rate=2, activation="relu", name="sc")
    check_config_round_trip(layer)
    x = rng.standard_normal((16, 20, 3)).astype(np.float32)
    y = rng.integers(0, 2, 16)
    model = keras.Sequential(
        [keras.Input((20, 3)), layer, keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(2)]
    )
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = layer.kernel.numpy().copy()
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"][-1]) and not np.array_equal(before, layer.kernel.numpy())
    check_keras_round_trip(model, x, tmp_path)
    half = streaming.StreamingConv1D(4, 3, dtype="mixed_float16")
    assert half(x).dtype == tf.float16
    for bad, match in (
        (lambda: streaming.StreamingConv1D(0, 3), "filters"),
        (lambda: streaming.StreamingConv1D(2, 3, strides=0), "strides"),
        (lambda: streaming.StreamingConv1D(2, 3, dilation_rate=1.5), "dilation_rate"),
    ):
        with pytest.raises(ValueError, match=match):
            bad()


def _random_model(seed: int, channels: int = 5):
    """A Functional model mixing every streamable layer kind, strides and dilations drawn at random."""
    rng = np.random.default_rng(seed)
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((None, channels), name="frames")
    h = streaming.StreamingConv1D(
        8, int(rng.integers(2, 4)), dilation_rate=int(rng.integers(1, 4)), activation="relu"
    )(inputs)
    branch = keras.layers.Conv1D(8, int(rng.integers(1, 4)), padding="causal", dilation_rate=2)(h)
    h = keras.layers.Add()([h, branch])
    h = keras.layers.BatchNormalization()(h)
    h = streaming.StreamingConv1D(
        8, 3, strides=int(rng.integers(1, 3)), dilation_rate=int(rng.integers(1, 3))
    )(h)
    if rng.random() < 0.5:
        h = keras.layers.MaxPooling1D(int(rng.integers(2, 4)), strides=int(rng.integers(1, 3)))(h)
    else:
        h = keras.layers.AveragePooling1D(2)(h)
    h = tsc.layers.KWinners(k=3)(h)
    h = tsc.layers.ChannelSparseConv1D(
        6, 3, fan_in=4, padding="valid", strides=int(rng.integers(1, 3)), activation="relu"
    )(h)
    nested = keras.Sequential([keras.layers.Dense(6, activation="tanh"), keras.layers.LayerNormalization()])
    h = keras.layers.Concatenate()([nested(h), h])
    h = keras.layers.Conv1D(5, 2, padding="valid", strides=2)(h)
    outputs = keras.layers.Dense(3)(h)
    model = keras.Model(inputs, outputs)
    # Non-trivial normalisation statistics.
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.standard_normal(layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, layer.moving_variance.shape))
    return model


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("batch", [1, 3])
def test_streaming_equals_full_sequence_on_random_models(seed, batch):
    model = _random_model(seed)
    rng = np.random.default_rng(100 + seed)
    x = rng.standard_normal((batch, 90, 5)).astype(np.float32)
    full = model(x, training=False).numpy()
    assert full.shape[1] > 0
    sm = streaming.to_streaming(model)
    got = concat(run_in_chunks(sm, x, rng))
    assert got.shape == full.shape
    np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)
    # Frame by frame, after a reset: the same again.
    sm.reset_states()
    one = concat([sm.step(x[:, t : t + 1]) for t in range(x.shape[1])])
    np.testing.assert_allclose(one, full, rtol=1e-5, atol=1e-5)
    # The state never grows with the history: after 90 frames it has the initial shapes.
    initial = [tuple(s.shape) for s in sm.initial_state(batch)]
    assert [v.numpy().shape for v in sm._variables] == initial


def test_sequential_multi_input_and_multi_output(rng):
    seq = keras.Sequential(
        [
            keras.Input((None, 4)),
            streaming.StreamingConv1D(6, 4, dilation_rate=2, activation="relu"),
            keras.layers.Dropout(0.5),
            streaming.StreamingConv1D(3, 2, strides=2),
        ]
    )
    x = rng.standard_normal((2, 41, 4)).astype(np.float32)
    np.testing.assert_allclose(concat(run_in_chunks(streaming.to_streaming(seq), x, rng)), seq(x), atol=1e-5)
    a, b = keras.Input((None, 4)), keras.Input((None, 2))
    h = keras.layers.Concatenate()([streaming.StreamingConv1D(3, 3)(a), b])
    model = keras.Model([a, b], [keras.layers.Dense(2)(h), streaming.StreamingConv1D(2, 2, strides=3)(h)])
    xb = rng.standard_normal((2, 41, 2)).astype(np.float32)
    full = model([x, xb])
    got = concat(run_in_chunks(streaming.to_streaming(model), [x, xb], rng))
    for g, f in zip(got, full):
        np.testing.assert_allclose(g, f, atol=1e-5)


@pytest.mark.parametrize(
    ("layer", "match"),
    [
        (keras.layers.Softmax(axis=1), "softmax over the time axis"),
        (keras.layers.Conv1D(3, 3, padding="same"), "reads future frames"),
        (keras.layers.MaxPooling1D(2, padding="same"), "pools over future frames"),
        (keras.layers.GlobalAveragePooling1D(), "cannot stream"),
        (keras.layers.LSTM(3, return_sequences=True), "cannot stream"),
        (tsc.layers.ChannelSparseConv1D(3, 3, fan_in=2, padding="same"), "reads future frames"),
        (tsc.layers.KWinners(k=2, axis=1), "time axis"),
    ],
    ids=[
        "softmax-time",
        "conv-same",
        "pool-same",
        "global-pool",
        "lstm",
        "channel-sparse-same",
        "kwinners-time",
    ],
)
def test_layers_that_cannot_stream_are_named(layer, match):
    model = keras.Sequential([keras.Input((None, 4)), keras.layers.Dense(4), layer])
    with pytest.raises(streaming.StreamingError, match=match) as info:
        streaming.to_streaming(model)
    assert layer.name in str(info.value)


def test_step_arguments_and_batch_change(rng):
    model = keras.Sequential([keras.Input((None, 3)), streaming.StreamingConv1D(2, 3)])
    sm = streaming.to_streaming(model)
    sm.step(rng.standard_normal((2, 4, 3)))  # NumPy float64 frames are cast
    with pytest.raises(ValueError, match="batch size 3 .* reset_states"):
        sm.step(rng.standard_normal((3, 1, 3)))
    sm.reset_states()
    assert sm.step(rng.standard_normal((3, 1, 3))).shape == (3, 1, 2)
    with pytest.raises(ValueError, match=r"\[batch, time, 3\]"):
        sm.step(rng.standard_normal((3, 1, 4)))
    with pytest.raises(ValueError, match="`model`"):
        streaming.to_streaming(keras.layers.Dense(2))
    # The pure-function form agrees with the stateful one.
    x = rng.standard_normal((1, 9, 3)).astype(np.float32)
    state = sm.initial_state(1)
    first, state = sm.step_with_state(x[:, :4], state)
    second, _ = sm.step_with_state(x[:, 4:], state)
    np.testing.assert_allclose(np.concatenate([first, second], 1), model(x), atol=1e-6)


def _export_model(rng):
    inputs = keras.Input((None, 4))
    h = streaming.StreamingConv1D(8, 3, dilation_rate=2, activation="relu")(inputs)
    h = tsc.layers.KWinners(k=4)(h)
    h = streaming.StreamingConv1D(5, 2, strides=2)(h)
    return keras.Model(inputs, keras.layers.Dense(3)(h))


def test_export_streaming_external_state_fresh_process(rng, tmp_path):
    model = _export_model(rng)
    x = rng.standard_normal((2, 30, 4)).astype(np.float32)
    path = streaming.export_streaming(model, str(tmp_path / "stream"))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", model(x).numpy())
    out = run_python(
        f"""
import numpy as np, tensorflow as tf
import tf_sparseconv  # registers the ops
loaded = tf.saved_model.load({path!r})
init, step = loaded.signatures["initial_state"], loaded.signatures["step"]
x = np.load({str(tmp_path / "x.npy")!r})
state = init(batch_size=tf.constant(2))
outputs = []
for t0, t1 in [(0, 1), (1, 5), (5, 6), (6, 17), (17, 30)]:
    result = step(frames=tf.constant(x[:, t0:t1]), **state)
    outputs.append(result.pop("outputs").numpy())
    state = {{k.replace("next_", ""): v for k, v in result.items()}}
got = np.concatenate(outputs, axis=1)
np.testing.assert_allclose(got, np.load({str(tmp_path / "y.npy")!r}), atol=1e-5)
print("streamed", got.shape)
"""
    ).stdout
    assert "streamed (2, 15, 3)" in out, out


def test_export_streaming_internal_state(rng, tmp_path):
    model = _export_model(rng)
    x = rng.standard_normal((1, 21, 4)).astype(np.float32)
    path = streaming.export_streaming(model, str(tmp_path / "internal"), state="internal", batch_size=1)
    loaded = tf.saved_model.load(path)
    step = loaded.signatures["step"]
    got = np.concatenate([step(frames=tf.constant(x[:, t : t + 1]))["outputs"] for t in range(21)], axis=1)
    np.testing.assert_allclose(got, model(x), atol=1e-5)
    loaded.signatures["reset_states"]()
    again = np.concatenate(
        [step(frames=tf.constant(x[:, t : t + 3]))["outputs"] for t in range(0, 21, 3)], axis=1
    )
    np.testing.assert_allclose(again, model(x), atol=1e-5)
    with pytest.raises(ValueError, match="`state`"):
        streaming.export_streaming(model, str(tmp_path / "bad"), state="both")
    assert os.path.isdir(path)


def test_streaming_benchmark_smoke():
    """benchmarks/bench_streaming.py runs (quick) and checks streaming == full sequence."""
    out = run_python(
        "from benchmarks.bench_streaming import run\n"
        "row = run(quick=True)[0]\n"
        "print(row.case, row.ours_ms > 0, row.stock_ms > 0, row.note)\n"
    ).stdout
    assert "True True max |stream - full|" in out, out
    assert float(out.split("max |stream - full| ")[1].split(";")[0]) <= 1e-5, out


def test_streaming_conv1d_stack_is_bitwise_exact(rng):
    """StreamingConv1D runs the same op in both modes: streamed outputs equal the full sequence's
    bit for bit, so a k-WTA selection downstream (which a 1e-7 difference can flip) agrees too."""
    keras.utils.set_random_seed(11)
    inputs = keras.Input((None, 6))
    h = streaming.StreamingConv1D(16, 3, dilation_rate=2, activation="relu")(inputs)
    h = tsc.layers.KWinners(k=3)(h)
    h = streaming.StreamingConv1D(16, 4, strides=2, dilation_rate=3, activation="relu")(h)
    h = tsc.layers.KWinners(k=5)(h)
    h = streaming.StreamingConv1D(130, 3, dilation_rate=2, activation="relu")(h)  # full 64-filter blocks too
    h = tsc.layers.KWinners(k=20)(h)
    model = keras.Model(inputs, streaming.StreamingConv1D(4, 2, activation="tanh")(h))
    x = rng.standard_normal((2, 301, 6)).astype(np.float32)
    got = concat(run_in_chunks(streaming.to_streaming(model), x, rng, max_chunk=13))
    np.testing.assert_array_equal(got, model(x).numpy())


def test_nested_functional_models_training_kwarg_and_mixed_precision(rng):
    """A nested Functional sub-model (single and multiple outputs), a per-call training=True error,
    and a mixed_float16 model streaming its full-sequence values."""
    i = keras.Input((None, 4))
    inner = keras.Model(i, keras.layers.Conv1D(5, 2, padding="causal")(i))
    j = keras.Input((None, 5))
    pair = keras.Model(j, [keras.layers.Dense(3)(j), streaming.StreamingConv1D(2, 3)(j)])
    x_in = keras.Input((None, 4))
    a, b = pair(inner(x_in))
    model = keras.Model(x_in, keras.layers.Concatenate()([a, keras.layers.Dense(3)(b)]))
    x = rng.standard_normal((2, 37, 4)).astype(np.float32)
    np.testing.assert_allclose(
        concat(run_in_chunks(streaming.to_streaming(model), x, rng)), model(x), atol=1e-5
    )
    seq = keras.Sequential([keras.Input((None, 4)), inner, keras.layers.ReLU()])
    np.testing.assert_allclose(concat(run_in_chunks(streaming.to_streaming(seq), x, rng)), seq(x), atol=1e-5)

    y_in = keras.Input((None, 4))
    bn = keras.layers.BatchNormalization()(keras.layers.Dense(4)(y_in), training=True)
    with pytest.raises(streaming.StreamingError, match="training=True"):
        streaming.to_streaming(keras.Model(y_in, bn))

    half = keras.Sequential(
        [
            keras.Input((None, 4)),
            streaming.StreamingConv1D(8, 3, dilation_rate=2, activation="relu", dtype="mixed_float16"),
            keras.layers.Dense(3, dtype="mixed_float16"),
            streaming.StreamingConv1D(2, 2, strides=2, dtype="mixed_float16"),
        ]
    )
    got = concat(run_in_chunks(streaming.to_streaming(half), x, rng))
    full = half(x).numpy()
    assert got.dtype == np.float16 and full.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), full.astype(np.float32), atol=2e-2)


def test_export_streaming_multi_input_output_and_stateless_cells(rng, tmp_path):
    a, b = keras.Input((None, 3)), keras.Input((None, 2))
    h = keras.layers.Concatenate()([streaming.StreamingConv1D(4, 3)(a), keras.layers.Dense(2)(b)])
    model = keras.Model([a, b], [keras.layers.Dense(2)(h), streaming.StreamingConv1D(1, 2, strides=2)(h)])
    sm = streaming.to_streaming(model)
    # Dense layers (one-frame windows) keep no state: only the two convolutions do.
    assert len(sm.state_specs) == 3  # (history), (history, frame count)
    path = streaming.export_streaming(model, str(tmp_path / "mimo"))
    step = tf.saved_model.load(path).signatures["step"]
    assert set(step.structured_input_signature[1]) == {"frames", "frames_1", "state_0", "state_1", "state_2"}
    state = {f"state_{i}": s for i, s in enumerate(sm.initial_state(2))}
    xa, xb = (
        rng.standard_normal((2, 9, 3)).astype(np.float32),
        rng.standard_normal((2, 9, 2)).astype(np.float32),
    )
    out = step(frames=tf.constant(xa), frames_1=tf.constant(xb), **state)
    full = model([xa, xb])
    np.testing.assert_allclose(out["outputs_0"], full[0], atol=1e-5)
    np.testing.assert_allclose(out["outputs_1"], full[1], atol=1e-5)
    with pytest.raises(ValueError, match="`batch_size`"):
        streaming.export_streaming(model, str(tmp_path / "bad"), batch_size=2)
