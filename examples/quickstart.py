"""tf_sparseconv quickstart: train, sparsify, prune, quantise, export and reload on digits.

1. Trains a small CNN on scikit-learn's digits twice: with dense layers, and
   with k-winners-take-all activations (`tsc.layers.KWinners`) and a
   channel-sparse second convolution (each output channel reads a quarter of
   the input channels: `tsc.layers.ChannelSparseConv2D`); reports test
   accuracy, parameter counts and the activation sparsity k-WTA produces.
2. Prunes the dense network with `tsc.pruning` (whole 3x3 kernels of input ->
   output channel pairs, polynomial schedule to 75 %), fine-tunes it with the
   `UpdatePruningStep` callback, and strips the wrappers with
   `to_sparse_layers=True`: the pruned convolution becomes a channel-sparse
   layer with identical outputs (real speed, not just zeros).
3. Quantises the pruned network with `tsc.quantization` (8-bit weights and
   activations, quantisation-aware fine-tuning) and converts it to integer
   weights (int8 + scales).
4. Exports the integer model with `tsc.export.export_saved_model` twice: with
   the compiled ops (reloaded in a fresh Python process that only imports
   tf_sparseconv to register them) and `portable=True` (stock TensorFlow ops
   only, reloaded in a process where tf_sparseconv cannot be imported), and
   predicts the test set again from each.
5. Exports it for devices: `tsc.export.export_litert` (a full-integer int8
   `.tflite`: int8 convolutions and fully-connected layer, run in LiteRT's
   interpreter) and `tsc.export.export_onnx` (run in onnxruntime), and prints
   their test accuracy beside the Keras model's.

Run: bash tools/quickstart.sh   (or: .venv/bin/python examples/quickstart.py [--quick])
The data ship with scikit-learn: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import tf_sparseconv as tsc

try:  # LiteRT's interpreter (TensorFlow's tf.lite.Interpreter is deprecated)
    from ai_edge_litert.interpreter import Interpreter
except ImportError:  # pragma: no cover
    from tensorflow.lite import Interpreter


def load_data(seed: int):
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]  # [N, 8, 8, 1] in [0, 1]
    return train_test_split(x, digits.target, test_size=0.25, random_state=seed, stratify=digits.target)


def build_model(sparse: bool) -> keras.Model:
    """Conv(32) -> [k-WTA 8/32] -> [channel-sparse] Conv(64) -> [k-WTA 12/64] -> pool -> Dense(10)."""

    def kwta(name: str, k: int):
        return tsc.layers.KWinners(k=k, name=name) if sparse else keras.layers.Identity(name=name)

    inputs = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv1")(inputs)
    h = kwta("kwta1", 8)(h)
    if sparse:  # each output channel reads 8 of the 32 input channels
        conv2 = tsc.layers.ChannelSparseConv2D(64, 3, density=0.25, activation="relu", name="conv2")
    else:
        conv2 = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv2")
    h = conv2(h)
    h = kwta("kwta2", 12)(h)
    h = keras.layers.MaxPooling2D(2, name="pool")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    outputs = keras.layers.Dense(10, activation="softmax", name="classes")(h)
    return keras.Model(inputs, outputs, name="sparse_cnn" if sparse else "dense_cnn")


def train(model: keras.Model, data, epochs: int, seed: int, callbacks=None) -> tuple[float, float]:
    x_train, x_test, y_train, y_test = data
    keras.utils.set_random_seed(seed)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    start = time.perf_counter()
    model.fit(
        x_train, y_train, batch_size=64, epochs=epochs, verbose=0, validation_split=0.1, callbacks=callbacks
    )
    seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    return accuracy, seconds


def activation_sparsity(model: keras.Model, x: np.ndarray) -> dict[str, float]:
    names = ["conv1", "kwta1", "conv2", "kwta2"]
    probe = keras.Model(model.input, [model.get_layer(n).output for n in names])
    return {n: float(np.mean(a == 0)) for n, a in zip(names, probe.predict(x, verbose=0))}


RELOAD = """
import sys, numpy as np, tensorflow as tf
if sys.argv[4] == "native":
    import tf_sparseconv  # registers the custom ops used by the SavedModel
else:
    sys.modules["tf_sparseconv"] = None  # a portable SavedModel must load without the package
serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
(name,) = serve.structured_input_signature[1]  # the Keras input name
x = np.load(sys.argv[2])
probabilities = serve(**{name: tf.constant(x)})["output_0"].numpy()
np.save(sys.argv[3], probabilities)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="a few epochs only (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="where to write the SavedModel (default: a temp dir)")
    args = parser.parse_args()
    if args.quick:
        args.epochs = 4

    data = load_data(args.seed)
    x_test, y_test = data[1], data[3]
    print(f"tf_sparseconv {tsc.__version__}; compiled kernels: {tsc.ops.is_library_loaded()}")
    print(f"digits: {len(data[0])} train / {len(x_test)} test images, 8x8, 10 classes\n")

    results = {}
    for sparse in (False, True):
        model = build_model(sparse)
        accuracy, seconds = train(model, data, args.epochs, args.seed)
        results[model.name] = (model, accuracy, seconds)
        conv2_params = model.get_layer("conv2").count_params()
        print(
            f"{model.name:>10}: test accuracy {accuracy:.4f}  ({args.epochs} epochs, {seconds:.1f} s; "
            f"{model.count_params()} parameters, conv2 {conv2_params})"
        )

    model = results["sparse_cnn"][0]
    print("\nactivation sparsity (fraction of zeros) on the test set:")
    for name, fraction in activation_sparsity(model, x_test).items():
        print(f"  {name:>6}: {fraction:.3f}")

    # 2. Prune the dense network: whole 3x3 kernels, 75 % of them, then strip to sparse layers.
    dense_model, dense_accuracy, _ = results["dense_cnn"]
    x_train = data[0]
    steps_per_epoch = -(-len(x_train) * 9 // 10 // 64)
    finetune = max(2, args.epochs // 3)
    schedule = tsc.pruning.PolynomialDecay(
        0.0, 0.75, begin_step=0, end_step=steps_per_epoch * (finetune - 1), frequency=steps_per_epoch // 2
    )
    pruned = tsc.pruning.prune_low_magnitude(dense_model, schedule, granularity="kernel")
    pruned_accuracy, seconds = train(
        pruned, data, finetune, args.seed, callbacks=[tsc.pruning.UpdatePruningStep()]
    )
    stripped = tsc.pruning.strip_pruning(pruned, to_sparse_layers=True)
    stripped.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    _, stripped_accuracy = stripped.evaluate(x_test, y_test, verbose=0)
    same = np.abs(stripped.predict(x_test, verbose=0) - pruned.predict(x_test, verbose=0)).max()
    conv2 = stripped.get_layer("conv2")
    print(
        f"\npruned (kernel granularity, 75 %, {finetune} fine-tuning epochs, {seconds:.1f} s): "
        f"test accuracy {pruned_accuracy:.4f} (dense {dense_accuracy:.4f})"
    )
    print(
        f"stripped to sparse layers: conv2 is {type(conv2).__name__}"
        + (f" with fan-in {conv2.kernel.shape[-2]} of 32" if hasattr(conv2, "connections") else "")
        + f"; test accuracy {stripped_accuracy:.4f}; max |stripped - pruned| = {same:.1e}"
    )

    # 3. Quantisation-aware fine-tuning at 8 bits, then integer weights.
    qat = tsc.quantization.quantize_model(stripped, weight_bits=8, activation_bits=8)
    qat_accuracy, seconds = train(qat, data, max(1, finetune // 2), args.seed)
    final = tsc.quantization.convert(qat)
    final.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    _, final_accuracy = final.evaluate(x_test, y_test, verbose=0)
    print(
        f"8-bit QAT ({seconds:.1f} s): test accuracy {qat_accuracy:.4f}; "
        f"converted to int8 weights + scales: {final_accuracy:.4f}"
    )

    # 4. Export the integer model (with the compiled ops, and portable: stock TF ops only);
    #    reload each in a fresh process (the portable one where tf_sparseconv cannot be imported).
    out = args.out or tempfile.mkdtemp(prefix="tsc_quickstart_")
    export_dir = tsc.export.export_saved_model(final, os.path.join(out, "pruned_int8_savedmodel"))
    portable_dir = tsc.export.export_saved_model(
        final, os.path.join(out, "pruned_int8_portable_savedmodel"), portable=True
    )
    float_dir = tsc.export.export_saved_model(dense_model, os.path.join(out, "dense_float_savedmodel"))
    expected = final.predict(x_test, verbose=0)
    x_path, y_path = os.path.join(out, "x_test.npy"), os.path.join(out, "served.npy")
    np.save(x_path, x_test)
    _reload(portable_dir, x_path, y_path, "portable")
    portable = np.load(y_path)
    _reload(export_dir, x_path, y_path, "native")
    served = np.load(y_path)
    served_accuracy = float(np.mean(served.argmax(-1) == y_test))
    print(f"\nexported SavedModel: {export_dir}")
    print(
        f"variables: {_variables_kib(export_dir):.1f} KiB (the dense float model's: "
        f"{_variables_kib(float_dir):.1f} KiB)"
    )
    print(
        f"reloaded in a fresh process: test accuracy {served_accuracy:.4f}, "
        f"max |served - in-process| = {np.abs(served - expected).max():.2e}"
    )
    print(
        "portable SavedModel (stock TF ops) reloaded without tf_sparseconv: test accuracy "
        f"{float(np.mean(portable.argmax(-1) == y_test)):.4f}, "
        f"max |served - in-process| = {np.abs(portable - expected).max():.2e}"
    )

    # 5. On device: the int8 LiteRT model (full-integer convolutions) and ONNX.
    litert_path = tsc.export.export_litert(
        final, os.path.join(out, "pruned_int8.tflite"), representative_data=x_train[:300]
    )
    interpreter = Interpreter(model_path=litert_path)
    int8_ops = sorted(
        {
            op["op_name"]
            for op in interpreter._get_ops_details()
            if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED")
            and interpreter.get_tensor_details()[op["inputs"][0]]["dtype"] == np.int8
        }
    )
    on_device = interpreter.get_signature_runner()(image=x_test)["output_0"]
    on_device_accuracy = float(np.mean(on_device.argmax(-1) == y_test))
    print(
        f"\nLiteRT int8 model: {litert_path} ({os.path.getsize(litert_path) / 1024:.1f} KiB; int8 "
        f"{', '.join(int8_ops)}): test accuracy {on_device_accuracy:.4f} (Keras QAT model "
        f"{final_accuracy:.4f})"
    )
    try:
        import onnxruntime
    except ImportError:
        return
    onnx_path = tsc.export.export_onnx(final, os.path.join(out, "pruned_int8.onnx"))
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"image": x_test})[0]
    print(
        f"ONNX model: {onnx_path} ({os.path.getsize(onnx_path) / 1024:.1f} KiB): test accuracy "
        f"{float(np.mean(onnx_out.argmax(-1) == y_test)):.4f}, "
        f"max |onnxruntime - Keras| = {np.abs(onnx_out - expected).max():.2e}"
    )


def _reload(export_dir: str, x_path: str, y_path: str, kind: str) -> None:
    """Runs RELOAD in a fresh process; its TensorFlow start-up log lines (printed before
    TF_CPP_MIN_LOG_LEVEL is read) are shown only if it fails."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD, export_dir, x_path, y_path, kind],
        check=False,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise RuntimeError(f"reloading the {kind} SavedModel in a fresh process failed")


def _variables_kib(export_dir: str) -> float:
    folder = os.path.join(export_dir, "variables")
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 1024


if __name__ == "__main__":
    main()
