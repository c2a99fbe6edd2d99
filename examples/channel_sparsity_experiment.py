"""Channel sparsity vs. channel reduction at equal parameter count (Changpinyo et al. 2017).

Reproduces, on a small offline data set, the claim of "The Power of Sparsity in
Convolutional Neural Networks" (Changpinyo, Sandler & Zhmoginov, 2017): a CNN whose
convolutions keep the full channel widths but connect each output channel to a
fixed random subset of the input channels (`tsc.layers.ChannelSparseConv1D`) beats
a CNN with the same number of parameters obtained by simply reducing the channel
widths.

Data: MNIST-1D (PyPI package `mnist1d`), generated locally with
`mnist1d.data.make_dataset` (fixed data seed 42, 4000 train / 1000 test sequences of
length 40); nothing is downloaded.

Networks, all Conv1D(kernel 5, ReLU) x3 with a max-pool after the 2nd conv, global
average pooling and Dense(10):
  * dense:        widths 64-64-64;
  * sparse d:     widths 64-64-64, conv 2 and 3 channel-sparse with density d
                  (each output channel reads round(d * 64) input channels), conv 1
                  dense (it reads the single input channel);
  * reduced ~d:   widths w-w-w with w chosen so that the conv parameter count is
                  the closest to that of `sparse d`.
Each variant is trained with Adam (learning rate 3e-3, batch 64; He-uniform conv
initialisation for all) for a fixed number of epochs (15) from
several seeds (the seed fixes the initialisation, the shuffling and the random
connection lists; the data are the same for all runs). The script prints a
Markdown table (conv/total parameters, test accuracy mean +- std, seconds per run)
and writes a plot of test accuracy against conv parameter count.

Run:  .venv/bin/python examples/channel_sparsity_experiment.py
      .venv/bin/python examples/channel_sparsity_experiment.py --quick   (smoke test)
Options: --epochs N, --seeds N, --lr LR, --init NAME,
         --out PATH (default examples/out/channel_sparsity.png).
Run time on 2 CPU cores: about 10 minutes (--quick: about 1 minute).
"""

from __future__ import annotations

import argparse
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np

import tf_sparseconv as tsc

WIDTH = 64
KERNEL = 5
NUM_CLASSES = 10
DENSITIES = (0.5, 0.25, 0.125)
DATA_SEED = 42
NUM_SAMPLES = 5000  # 80 % train, 20 % test
BATCH = 64
LEARNING_RATE = 3e-3
# He initialisation (ReLU nets) depends on the fan-in only, which ChannelSparseConv1D sees
# correctly (kernel [k, m, filters]); Glorot also uses the fan-out, k * filters for that
# kernel, which overstates a sparse layer's real fan-out k * m and shrinks its initial weights.
CONV_INIT = "he_uniform"


@dataclass(frozen=True)
class Variant:
    """One network: conv widths and the density of convs 2 and 3 (1.0: dense)."""

    name: str
    kind: str  # "dense", "reduced" or "sparse"
    width: int
    density: float = 1.0


@dataclass
class Result:
    variant: Variant
    conv_params: int
    total_params: int
    accuracies: list[float]
    seconds: list[float]


def load_mnist1d() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNIST-1D generated locally (no download): x [N, 40, 1] float32, y int."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = NUM_SAMPLES
    args.seed = DATA_SEED
    data = make_dataset(args)

    def prepare(x: np.ndarray) -> np.ndarray:
        return x.astype(np.float32)[..., None]

    return prepare(data["x"]), data["y"].astype(np.int32), prepare(data["x_test"]), data["y_test"]


def conv(variant: Variant, index: int, seed: int, init: str) -> keras.layers.Layer:
    """Conv layer `index` (0-based) of `variant`; the 2nd and 3rd are channel-sparse in sparse variants."""
    if variant.kind == "sparse" and index > 0:
        return tsc.layers.ChannelSparseConv1D(
            variant.width,
            KERNEL,
            density=variant.density,
            connection_seed=1000 * seed + index,
            padding="same",
            activation="relu",
            kernel_initializer=init,
            name=f"conv{index + 1}",
        )
    return keras.layers.Conv1D(
        variant.width,
        KERNEL,
        padding="same",
        activation="relu",
        kernel_initializer=init,
        name=f"conv{index + 1}",
    )


def build_model(variant: Variant, seed: int, length: int, init: str = CONV_INIT) -> keras.Model:
    inputs = keras.Input((length, 1))
    x = conv(variant, 0, seed, init)(inputs)
    x = conv(variant, 1, seed, init)(x)
    x = keras.layers.MaxPooling1D(2)(x)
    x = conv(variant, 2, seed, init)(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(NUM_CLASSES)(x)
    return keras.Model(inputs, outputs, name=re.sub(r"[^A-Za-z0-9_.]+", "_", variant.name))


def conv_param_count(model: keras.Model) -> int:
    return sum(layer.count_params() for layer in model.layers if layer.name.startswith("conv"))


def analytic_conv_params(width: int, fan_in: int) -> int:
    """Conv params (weights + biases) of widths w-w-w where convs 2 and 3 read `fan_in` channels."""
    first = KERNEL * 1 * width + width
    return first + 2 * (KERNEL * fan_in * width + width)


def matching_width(target: int) -> int:
    """The width w of a dense w-w-w network whose conv parameter count is closest to `target`."""
    return min(range(1, WIDTH + 1), key=lambda w: abs(analytic_conv_params(w, w) - target))


def make_variants() -> list[Variant]:
    variants = [Variant("dense 64", "dense", WIDTH)]
    for density in DENSITIES:
        fan_in = max(1, round(density * WIDTH))
        width = matching_width(analytic_conv_params(WIDTH, fan_in))
        variants.append(Variant(f"sparse d={density:g}", "sparse", WIDTH, density))
        variants.append(Variant(f"reduced w={width} (~d={density:g})", "reduced", width))
    return variants


def train_once(
    variant: Variant, seed: int, data: tuple, args: argparse.Namespace
) -> tuple[float, float, keras.Model]:
    """Train from `seed`; return (test accuracy, seconds, model)."""
    x_train, y_train, x_test, y_test = data
    keras.utils.set_random_seed(seed)
    model = build_model(variant, seed, x_train.shape[1], args.init)
    model.compile(
        optimizer=keras.optimizers.Adam(args.lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=False,  # same execution path for the custom op and keras.layers.Conv1D
    )
    start = time.perf_counter()
    model.fit(x_train, y_train, batch_size=BATCH, epochs=args.epochs, shuffle=True, verbose=0)
    _, accuracy = model.evaluate(x_test, y_test, batch_size=256, verbose=0)
    return float(accuracy), time.perf_counter() - start, model


def run_variant(variant: Variant, data: tuple, args: argparse.Namespace) -> Result:
    accuracies, seconds = [], []
    conv_params = total_params = 0
    for seed in range(args.seeds):
        accuracy, elapsed, model = train_once(variant, seed, data, args)
        accuracies.append(accuracy)
        seconds.append(elapsed)
        conv_params, total_params = conv_param_count(model), model.count_params()
        print(f"  {variant.name:<26} seed {seed}: test accuracy {accuracy:.4f} ({elapsed:.1f} s)", flush=True)
    return Result(variant, conv_params, total_params, accuracies, seconds)


def markdown_table(results: list[Result]) -> str:
    lines = [
        "| variant | conv params | total params | test accuracy (mean ± std) | s / run |",
        "| --- | ---: | ---: | --- | ---: |",
    ]
    for r in results:
        acc = np.asarray(r.accuracies)
        lines.append(
            f"| {r.variant.name} | {r.conv_params:,} | {r.total_params:,} | "
            f"{acc.mean():.4f} ± {acc.std():.4f} (n={len(acc)}) | {np.mean(r.seconds):.1f} |"
        )
    return "\n".join(lines)


def plot(results: list[Result], out: Path, epochs: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    styles = {
        "sparse": ("o-", "tab:blue", "channel-sparse (widths 64)"),
        "reduced": ("s--", "tab:orange", "channel-reduced"),
    }
    for kind, (fmt, color, label) in styles.items():
        rows = sorted((r for r in results if r.variant.kind == kind), key=lambda r: r.conv_params)
        ax.errorbar(
            [r.conv_params for r in rows],
            [np.mean(r.accuracies) for r in rows],
            yerr=[np.std(r.accuracies) for r in rows],
            fmt=fmt,
            color=color,
            capsize=4,
            label=label,
        )
    for r in (r for r in results if r.variant.kind == "dense"):
        ax.errorbar(
            [r.conv_params],
            [np.mean(r.accuracies)],
            yerr=[np.std(r.accuracies)],
            fmt="k*",
            markersize=12,
            capsize=4,
            label="dense 64-64-64",
        )
    seeds = len(results[0].accuracies)
    ax.set_xscale("log")
    ax.set_xlabel("conv parameters (weights + biases)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"MNIST-1D, 3-layer CNN, {epochs} epochs, mean ± std over {seeds} seed(s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--epochs", type=int, default=None, help="training epochs (default 15; 2 with --quick)"
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help="seeds per variant (default 3; 1 with --quick)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("examples/out/channel_sparsity.png"), help="plot path"
    )
    parser.add_argument("--lr", type=float, default=LEARNING_RATE, help="Adam learning rate (default 3e-3)")
    parser.add_argument("--init", default=CONV_INIT, help="conv kernel initializer (default he_uniform)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 2 epochs")
    args = parser.parse_args()
    if args.epochs is None:
        args.epochs = 2 if args.quick else 15
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    if args.epochs < 1 or args.seeds < 1:
        parser.error("--epochs and --seeds must be positive")
    return args


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    data = load_mnist1d()
    print(
        f"MNIST-1D: {len(data[0])} train / {len(data[2])} test, length {data[0].shape[1]}; "
        f"{args.epochs} epochs, {args.seeds} seed(s), batch {BATCH}, Adam lr {args.lr:g}, "
        f"conv init {args.init}",
        flush=True,
    )
    results = [run_variant(v, data, args) for v in make_variants()]
    print()
    print(markdown_table(results))
    plot(results, args.out, args.epochs)
    print(f"\nplot: {args.out}\ntotal wall time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
