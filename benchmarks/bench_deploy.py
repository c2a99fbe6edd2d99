"""Deployment table: every family x {LiteRT, ONNX}: converts?, max difference, file size; and the
latency of one streaming step in LiteRT vs the SavedModel step in TensorFlow.

    .venv/bin/python -m benchmarks.bench_deploy

Each model is small and random (fixed seed), exported with `tsc.export.export_litert` (TFLite
builtin ops only) and `tsc.export.export_onnx`, run in LiteRT's interpreter and onnxruntime on
random inputs, and compared with the Keras model. Sparse-map models are included when their
module (tests/test_deploy_sparse_maps.py's builders are not imported: the models are built here)
converts. Paste the printed tables into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import onnxruntime as ort
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

import tf_sparseconv as tsc

RNG = np.random.default_rng(0)


def _image(shape=(16, 16, 8), name="image"):
    return keras.Input(shape, name=name)


def models():
    """(family, model, feeds) for every dense-input family."""
    keras.utils.set_random_seed(0)
    x = RNG.standard_normal((4, 16, 16, 8)).astype(np.float32)
    out = []

    i = _image()
    h = tsc.layers.KWinners(k=4)(keras.layers.Conv2D(16, 3, padding="same")(i))
    out.append(("k-WTA (Conv2D + KWinners)", keras.Model(i, h), {"image": x}))

    i = _image()
    out.append(("top-k attention", keras.Model(i, tsc.layers.TopKAttention(k=20)(i)), {"image": x}))

    i = _image()
    h = tsc.layers.ChannelSparseConv2D(16, 3, density=0.25, activation="relu")(i)
    h = tsc.layers.ChannelSparseConv2D(16, 3, density=0.5, strides=2)(h)
    out.append(("channel-sparse 2D (fan-in 1/4, 1/2)", keras.Model(i, h), {"image": x}))

    i = keras.Input((64, 8), name="sequence")
    h = tsc.layers.ChannelSparseConv1D(16, 3, density=0.25, activation="relu")(i)
    seq = RNG.standard_normal((4, 64, 8)).astype(np.float32)
    out.append(("channel-sparse 1D", keras.Model(i, h), {"sequence": seq}))

    i, m = _image(), keras.Input((16, 16), name="mask")
    h = tsc.layers.BlockSparseConv2D(8, 3, block_size=4, activation="relu")([i, m])
    h = tsc.layers.BlockSparseResidualBlock(8, block_size=8)([h, m])
    mask = (RNG.random((4, 16, 16)) > 0.9).astype(np.float32)
    out.append(
        ("block-sparse [x, mask] (conv + residual block)", keras.Model([i, m], h), {"image": x, "mask": mask})
    )

    i = _image()
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="c1")(i)
    h = keras.layers.Conv2D(16, 3, padding="same", name="c2")(h)
    model = keras.Model(i, h)
    pruned = tsc.pruning.prune_low_magnitude(
        model, tsc.pruning.ConstantSparsity(0.75, 0, frequency=1), granularity="kernel"
    )
    pruned.compile("sgd", "mse")
    pruned.fit(
        x, np.zeros((4, 16, 16, 16), np.float32), verbose=0, callbacks=[tsc.pruning.UpdatePruningStep()]
    )
    out.append(("pruned (PruneLowMagnitude wrappers)", pruned, {"image": x}))
    stripped = tsc.pruning.strip_pruning(pruned, to_sparse_layers=True)
    out.append(("pruned, stripped to ChannelSparseConv2D", stripped, {"image": x}))
    return out


def _streaming_model():
    S = tsc.streaming
    i = keras.Input((None, 40))
    h = S.StreamingConv1D(64, 3, activation="relu")(i)
    h = S.StreamingConv1D(64, 3, dilation_rate=2, activation="relu")(h)
    h = S.StreamingConv1D(64, 3, strides=2, dilation_rate=4, activation="relu")(h)
    h = tsc.layers.KWinners(k=16)(h)
    h = keras.layers.MaxPooling1D(2)(h)
    h = tsc.layers.ChannelSparseConv1D(64, 1, density=0.25, activation="relu")(h)
    return keras.Model(i, keras.layers.Dense(12)(h))


def run_litert(path, feeds, signature=None):
    runner = Interpreter(model_path=path).get_signature_runner(signature)
    return {k: np.asarray(v) for k, v in runner(**feeds).items()}


def run_onnx(path, feeds):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def _diff(got, want):
    err = float(np.abs(got - want).max())
    return err, err / max(float(np.abs(want).max()), 1e-30)


def _stream(run, frames, state, count):
    outs = []
    for t in range(count):
        result = run({"frames": frames[:, t : t + 1], **state})
        outs.append(result.pop("outputs"))
        state = {k.replace("next_", ""): v for k, v in result.items()}
    return np.concatenate(outs, axis=1)


def conversion_table(tmp: str) -> list[str]:
    lines = [
        "| family | LiteRT (builtins) | max abs / rel diff | .tflite KiB "
        "| ONNX | max abs / rel diff | .onnx KiB |",
        "|---|---|---|---|---|---|---|",
    ]
    cases = list(models())
    stream_model = _streaming_model()
    cases.append(("streaming step (6 layers, strides, pooling, k-WTA, channel-sparse)", stream_model, None))
    for n, (family, model, feeds) in enumerate(cases):
        cells = []
        for target in ("litert", "onnx"):
            path = os.path.join(tmp, f"{n}.{'tflite' if target == 'litert' else 'onnx'}")
            try:
                if feeds is None:  # streaming: 64 frames one at a time, the state fed back
                    stream = tsc.streaming.to_streaming(model)
                    frames = RNG.standard_normal((1, 64, 40)).astype(np.float32)
                    want = model(frames).numpy()
                    state = {f"state_{i}": np.asarray(s) for i, s in enumerate(stream.initial_state(1))}
                    if target == "litert":
                        tsc.export.export_litert(stream, path)
                        runner = Interpreter(model_path=path).get_signature_runner("step")
                        got = _stream(
                            lambda f, r=runner: {k: np.asarray(v) for k, v in r(**f).items()},
                            frames,
                            state,
                            64,
                        )
                    else:
                        tsc.export.export_onnx(stream, path)
                        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
                        names = [o.name for o in session.get_outputs()]
                        got = _stream(
                            lambda f, s=session, n=names: dict(zip(n, s.run(None, f))), frames, state, 64
                        )
                else:
                    inputs = list(feeds.values())
                    want = model(inputs if len(inputs) > 1 else inputs[0], training=False).numpy()
                    if target == "litert":
                        got = run_litert(tsc.export.export_litert(model, path), feeds)["output_0"]
                    else:
                        got = run_onnx(tsc.export.export_onnx(model, path), feeds)["output_0"]
                err, rel = _diff(got, want)
                cells += ["yes", f"{err:.1e} / {rel:.1e}", f"{os.path.getsize(path) / 1024:.1f}"]
            except Exception as exc:  # noqa: BLE001 - a table row, not a test
                cells += [f"no ({type(exc).__name__}: {str(exc)[:60]})", "", ""]
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return lines


def streaming_latency(tmp: str, frames_count: int = 400) -> list[str]:
    """One frame per call: LiteRT step vs the SavedModel step (TensorFlow, external state) vs
    `StreamingModel.step` (TensorFlow, internal state, compiled ops)."""
    model = _streaming_model()
    stream = tsc.streaming.to_streaming(model)
    frames = RNG.standard_normal((1, frames_count, 40)).astype(np.float32)
    state0 = {f"state_{i}": np.asarray(s) for i, s in enumerate(stream.initial_state(1))}
    path = tsc.export.export_litert(stream, os.path.join(tmp, "step.tflite"))
    runner = Interpreter(model_path=path).get_signature_runner("step")
    saved = tsc.streaming.export_streaming(model, os.path.join(tmp, "step_sm"))
    step_sm = tf.saved_model.load(saved).signatures["step"]
    portable = tsc.streaming.export_streaming(model, os.path.join(tmp, "step_portable"), portable=True)
    step_portable = tf.saved_model.load(portable).signatures["step"]

    def time_loop(call, to_state):
        state, times = dict(state0), []
        for t in range(frames_count):
            begin = time.perf_counter()
            result = call(frames[:, t : t + 1], state)
            times.append(time.perf_counter() - begin)
            state = to_state(result)
        return statistics.median(times[50:]) * 1e3

    def strip(result):
        return {k.replace("next_", ""): v for k, v in result.items() if k != "outputs"}

    litert_ms = time_loop(lambda f, s: {k: np.asarray(v) for k, v in runner(frames=f, **s).items()}, strip)
    sm_ms = time_loop(lambda f, s: step_sm(frames=tf.constant(f), **s), strip)
    portable_ms = time_loop(lambda f, s: step_portable(frames=tf.constant(f), **s), strip)
    times = []
    stream.reset_states()
    for t in range(frames_count):
        frame = tf.constant(frames[:, t : t + 1])
        begin = time.perf_counter()
        stream.step(frame).numpy()
        times.append(time.perf_counter() - begin)
    internal_ms = statistics.median(times[50:]) * 1e3
    return [
        "| one streaming step (1 frame, the model above), median | ms |",
        "|---|---|",
        f"| LiteRT interpreter, `.tflite` from `export_litert(to_streaming(model))` | {litert_ms:.3f} |",
        f"| SavedModel `step` signature (compiled ops), state in and out | {sm_ms:.3f} |",
        f"| SavedModel `step` signature, `portable=True` (stock TF ops) | {portable_ms:.3f} |",
        f"| `StreamingModel.step` in process (state in variables) | {internal_ms:.3f} |",
    ]


def qat_table(tmp: str) -> list[str]:
    """Digits: a CNN with a channel-sparse conv, QAT at several bit widths, `convert`, then
    `export_litert` (int8): test accuracy of the Keras model and of LiteRT's int8 model."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    x_train, y_train, x_test, y_test = x[:1400], data.target[:1400], x[1400:], data.target[1400:]
    keras.utils.set_random_seed(0)
    i = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(i)
    h = tsc.layers.ChannelSparseConv2D(32, 3, density=0.25, activation="relu")(h)
    h = keras.layers.Flatten()(keras.layers.MaxPooling2D(2)(h))
    model = keras.Model(i, keras.layers.Dense(10, activation="softmax")(h))
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x_train, y_train, epochs=10, verbose=0)
    lines = [
        "| weights / activations | Keras QAT (`convert`ed) accuracy | LiteRT int8 accuracy | .tflite KiB |",
        "|---|---|---|---|",
    ]
    for weight_bits, activation_bits in ((8, 8), (4, 8), (4, 4), (2, 8)):
        qat = tsc.quantization.quantize_model(model, weight_bits, activation_bits)
        qat.compile("adam", "sparse_categorical_crossentropy")
        qat.fit(x_train, y_train, epochs=3, verbose=0)
        final = tsc.quantization.convert(qat)
        keras_accuracy = np.mean(final.predict(x_test, verbose=0).argmax(-1) == y_test)
        path = os.path.join(tmp, f"w{weight_bits}a{activation_bits}.tflite")
        tsc.export.export_litert(final, path, representative_data=x_train[:300])
        out = run_litert(path, {"image": x_test})["output_0"]
        lines.append(
            f"| {weight_bits} / {activation_bits} bits | {keras_accuracy:.4f} | "
            f"{np.mean(out.argmax(-1) == y_test):.4f} | {os.path.getsize(path) / 1024:.1f} |"
        )
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        table = conversion_table(tmp)
        latency = streaming_latency(tmp)
        qat = qat_table(tmp)
    print("\n" + "\n\n".join("\n".join(t) for t in (table, latency, qat)))


if __name__ == "__main__":
    main()
