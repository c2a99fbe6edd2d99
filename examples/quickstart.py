"""tf_sparseconv quickstart: a small sparse CNN on scikit-learn's digits.

Trains a CNN whose hidden activations are sparsified with k-winners-take-all
(`tsc.layers.KWinners`) and whose second convolution is channel-sparse (each
output channel reads a quarter of the input channels:
`tsc.layers.ChannelSparseConv2D`), reports its test accuracy and parameter
count next to the same network with dense layers, measures the activation
sparsity the k-WTA layers produce, exports a SavedModel and reloads it in a
fresh Python process (which only imports tf_sparseconv to register the ops) to
predict the test set again.

Run: bash tools/quickstart.sh   (or: .venv/bin/python examples/quickstart.py)
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


def train(model: keras.Model, data, epochs: int, seed: int) -> tuple[float, float]:
    x_train, x_test, y_train, y_test = data
    keras.utils.set_random_seed(seed)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    start = time.perf_counter()
    model.fit(x_train, y_train, batch_size=64, epochs=epochs, verbose=0, validation_split=0.1)
    seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    return accuracy, seconds


def activation_sparsity(model: keras.Model, x: np.ndarray) -> dict[str, float]:
    names = ["conv1", "kwta1", "conv2", "kwta2"]
    probe = keras.Model(model.input, [model.get_layer(n).output for n in names])
    return {n: float(np.mean(a == 0)) for n, a in zip(names, probe.predict(x, verbose=0))}


RELOAD = """
import sys, numpy as np, tensorflow as tf
import tf_sparseconv  # registers the custom ops used by the SavedModel
served = tf.saved_model.load(sys.argv[1])
x = np.load(sys.argv[2])
probabilities = served.serve(tf.constant(x)).numpy()
np.save(sys.argv[3], probabilities)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="where to write the SavedModel (default: a temp dir)")
    args = parser.parse_args()

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

    out = args.out or tempfile.mkdtemp(prefix="tsc_quickstart_")
    export_dir = os.path.join(out, "sparse_cnn_savedmodel")
    model.export(export_dir, verbose=False)
    expected = model.predict(x_test, verbose=0)
    x_path, y_path = os.path.join(out, "x_test.npy"), os.path.join(out, "served.npy")
    np.save(x_path, x_test)
    subprocess.run([sys.executable, "-c", RELOAD, export_dir, x_path, y_path], check=True)
    served = np.load(y_path)
    served_accuracy = float(np.mean(served.argmax(-1) == y_test))
    print(f"\nexported SavedModel: {export_dir}")
    print(
        f"reloaded in a fresh process: test accuracy {served_accuracy:.4f}, "
        f"max |served - in-process| = {np.abs(served - expected).max():.2e}"
    )


if __name__ == "__main__":
    main()
