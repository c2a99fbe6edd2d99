"""Magnitude pruning with `tsc.pruning`: accuracy per granularity and real channel-sparse speed.

Part 1 (accuracy vs sparsity). For each data set a small CNN is trained dense;
then, starting from those trained weights, every granularity ("weight",
"kernel", "block" 4x4, "m_by_n" 2:4) is pruned to each final sparsity (0.5,
0.75, 0.9; "m_by_n" only at its natural 2:4 = 0.5) with
`tsc.pruning.PolynomialDecay` (0 -> final sparsity over the first half of the
fine-tuning steps, mask updated every 10 steps, power 3) and fine-tuned with
`tsc.pruning.UpdatePruningStep`. Every conv layer with more than one input
channel is pruned; the first conv (1 input channel, where "kernel" pruning
would delete whole filters) and the Dense classifier stay dense. Reported: test
accuracy and the measured zero fraction of the pruned kernels (all pruned
layers pooled), with the dense baseline row.

Data (nothing is downloaded):
  * digits:   scikit-learn's 8x8 digits (1347 train / 450 test, stratified split,
              split seed 0); net Conv2D 32 -> Conv2D 64 -> Conv2D 64 (3x3, ReLU,
              SAME), max-pool 2 after the 2nd conv, global average pool, Dense 10.
  * MNIST-1D: the `mnist1d` package, generated locally (data seed 42, 4000 train /
              1000 test sequences of length 40); net Conv1D 64 x3 (kernel 5, ReLU),
              max-pool 2 after the 2nd conv, global average pool, Dense 10.

Part 2 (real speed). A conv net whose 3x3 convolutions dominate the inference
cost, on 32x32 images made from the digits (bilinear upsampling of the 8x8
images): Conv2D 64 at 32x32 -> max-pool -> Conv2D 128 -> Conv2D 128 ->
Conv2D 128 at 16x16 -> max-pool 4 -> Dense 10 (Adam 1e-3). It is trained dense
(4 epochs), then kernel-pruned to 75 % (convs 2-4) and fine-tuned (4 epochs) as
above, and
`tsc.pruning.strip_pruning(..., to_sparse_layers=True)` turns the pruned convs
into `tsc.layers.ChannelSparseConv2D` layers reading m input channels each (m =
the largest number of surviving inputs of any output channel). The script checks
that the stripped sparse model's outputs equal the pruned model's (allclose),
times inference (a `tf.function`-wrapped `model(x)` on one batch of test images,
dense and sparse alternately, median of several calls after warm-up) of the
stripped sparse model against the dense model, and reports the speed-up (issue
target >= 2x) and the test-accuracy change (target: at most 1 point lost). This
is done twice: with per-channel kernel masks (channel_group=1) and with groups of
--channel-group consecutive output channels that keep the same inputs (default
4), whose rows the CPU kernel computes together (one operand load serves the
whole group). The channel-sparse op runs as a dense convolution above fan-in
m/Cin = DENSE_DISPATCH_DENSITY (0.3 on AVX-512 CPUs, 0.5 on AVX2), so the sparse
kernel only runs below it; the per-layer m/Cin is printed ("kernel" masks are
balanced over the output channels, so m is about (1 - sparsity) * Cin).

Printed: Markdown tables (part 1: dataset, granularity, target sparsity, measured
sparsity, test accuracy, mean +- std over seeds when --seeds > 1; part 2: per-layer
fan-in and the timing/accuracy summary), the exact command and the wall time.

Run:  .venv/bin/python examples/pruning_experiment.py
      .venv/bin/python examples/pruning_experiment.py --quick   (smoke test)
Options: --seeds N (default 1), --epochs N (dense training epochs), --finetune N
(fine-tuning epochs), --speed-epochs N, --reps N, --channel-group N, --skip-speed,
--skip-accuracy.
Run time on 2 CPU cores: about 3 minutes (--quick: about 30 s).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import dataclass, field

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import tensorflow as tf

import tf_sparseconv as tsc
from tf_sparseconv.python.ops.channel_sparse_ops import DENSE_DISPATCH_DENSITY

GRANULARITIES = ("weight", "kernel", "block", "m_by_n")
SPARSITIES = (0.5, 0.75, 0.9)
M_BY_N = (2, 4)  # natural sparsity m / n = 0.5
BLOCK = (4, 4)
FREQUENCY = 10  # mask update every FREQUENCY steps
BATCH = 32
LR_DENSE = 3e-3
LR_FINETUNE = 1e-3
MNIST1D_SEED = 42
MNIST1D_SAMPLES = 5000  # 80 % train, 20 % test
SPEED_SPARSITY = 0.75
SPEED_BATCH = 128
# The channel-sparse op runs as a dense conv above this fan-in m/Cin (0.3 on AVX-512 CPUs, 0.5 on AVX2).
DISPATCH = DENSE_DISPATCH_DENSITY
LR_SPEED = 1e-3  # dense training of the speed net (3e-3 trains it slowly)


# ---------------------------------------------------------------------------------------------
# data


def load_digits_data(size: int = 8):
    """scikit-learn digits, [N, size, size, 1] float32 in [0, 1] (bilinear upsampling if size > 8)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    if size != 8:
        x = tf.image.resize(x, (size, size), method="bilinear").numpy().astype(np.float32)
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return x_train, y_train, x_test, y_test


def load_mnist1d_data():
    """MNIST-1D generated locally (no download): x [N, 40, 1] float32, y int32."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = MNIST1D_SAMPLES
    args.seed = MNIST1D_SEED
    data = make_dataset(args)
    x_train = data["x"].astype(np.float32)[..., None]
    x_test = data["x_test"].astype(np.float32)[..., None]
    return x_train, data["y"].astype(np.int32), x_test, np.asarray(data["y_test"]).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# networks


def digits_net() -> keras.Model:
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv1")(inputs)
    h = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv2")(h)
    h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv3")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(10, name="classes")(h), name="digits_cnn")


def mnist1d_net() -> keras.Model:
    inputs = keras.Input((40, 1))
    h = keras.layers.Conv1D(64, 5, padding="same", activation="relu", name="conv1")(inputs)
    h = keras.layers.Conv1D(64, 5, padding="same", activation="relu", name="conv2")(h)
    h = keras.layers.MaxPooling1D(2)(h)
    h = keras.layers.Conv1D(64, 5, padding="same", activation="relu", name="conv3")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(inputs, keras.layers.Dense(10, name="classes")(h), name="mnist1d_cnn")


def speed_net(width: int = 128) -> keras.Model:
    inputs = keras.Input((32, 32, 1))
    h = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv1")(inputs)
    h = keras.layers.MaxPooling2D(2)(h)
    for i in (2, 3, 4):
        h = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name=f"conv{i}")(h)
    h = keras.layers.MaxPooling2D(4)(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(inputs, keras.layers.Dense(10, name="classes")(h), name="speed_cnn")


def compile_model(model: keras.Model, lr: float) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=False,  # same execution path for the custom op and the stock convs
    )


def logits_of(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """Eager forward pass in batches of 256 (no per-model `predict` function to trace)."""
    return np.concatenate([np.asarray(model(x[i : i + 256], training=False)) for i in range(0, len(x), 256)])


def accuracy_of(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits_of(model, x), -1) == y))


def train_dense(build, data, epochs: int, seed: int, lr: float = LR_DENSE) -> keras.Model:
    x_train, y_train = data[0], data[1]
    keras.utils.set_random_seed(seed)
    model = build()
    compile_model(model, lr)
    model.fit(x_train, y_train, batch_size=BATCH, epochs=epochs, shuffle=True, verbose=0)
    return model


# ---------------------------------------------------------------------------------------------
# pruning


def is_pruned_conv(layer) -> bool:
    """Convs with more than one input channel are pruned (not the first conv, not the classifier)."""
    return isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D)) and layer.kernel.shape[-2] > 1


def prune_convs(model: keras.Model, schedule, granularity: str, channel_group: int = 1) -> keras.Model:
    """A copy of the trained `model`, its convs with Cin > 1 wrapped by `tsc.pruning.prune_low_magnitude`."""
    pairs = []

    def clone(layer):
        new = layer.__class__.from_config(layer.get_config())
        if is_pruned_conv(layer):
            new = tsc.pruning.prune_low_magnitude(
                new,
                schedule,
                granularity=granularity,
                block_shape=BLOCK,
                m_by_n=M_BY_N,
                channel_group=channel_group,
            )
        pairs.append((layer, new))
        return new

    pruned = keras.models.clone_model(model, clone_function=clone)
    for old, new in pairs:
        target = new.layer if isinstance(new, tsc.pruning.PruneLowMagnitude) else new
        for source, dest in zip(old.weights, target.weights, strict=True):
            dest.assign(source.value)
    return pruned


def fine_tune_pruned(
    dense: keras.Model,
    data,
    granularity: str,
    sparsity: float,
    epochs: int,
    seed: int,
    channel_group: int = 1,
):
    """Prune `dense` to `sparsity` during `epochs` of fine-tuning; returns the pruned (wrapped) model."""
    x_train, y_train = data[0], data[1]
    steps = epochs * -(-len(x_train) // BATCH)
    # Sparsity ramps over the first half of the steps; end_step is on a mask-update beat.
    end_step = max(FREQUENCY, (steps // 2) // FREQUENCY * FREQUENCY)
    schedule = tsc.pruning.PolynomialDecay(
        0.0, sparsity, begin_step=0, end_step=end_step, frequency=FREQUENCY
    )
    keras.utils.set_random_seed(seed)
    pruned = prune_convs(dense, schedule, granularity, channel_group)
    compile_model(pruned, LR_FINETUNE)
    pruned.fit(
        x_train,
        y_train,
        batch_size=BATCH,
        epochs=epochs,
        shuffle=True,
        verbose=0,
        callbacks=[tsc.pruning.UpdatePruningStep()],
    )
    return pruned


def kernel_zero_fraction(kernels: list[np.ndarray]) -> float:
    zeros = sum(int(np.sum(k == 0)) for k in kernels)
    return zeros / max(1, sum(k.size for k in kernels))


def pruned_kernels(pruned: keras.Model) -> list[np.ndarray]:
    return [
        np.asarray(w.pruned_weight.numpy()) * np.asarray(w.mask.numpy())
        for w in tsc.pruning.collect_pruned_layers(pruned)
    ]


# ---------------------------------------------------------------------------------------------
# part 1


@dataclass
class Row:
    dataset: str
    granularity: str
    target: float
    measured: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)


def configurations(quick: bool) -> list[tuple[str, float]]:
    sparsities = (0.75,) if quick else SPARSITIES
    configs = [(g, s) for g in GRANULARITIES if g != "m_by_n" for s in sparsities]
    return configs + [("m_by_n", M_BY_N[0] / M_BY_N[1])]


def run_dataset(name: str, build, data, epochs: int, finetune: int, args) -> list[Row]:
    x_test, y_test = data[2], data[3]
    rows = {("dense", 0.0): Row(name, "dense", 0.0)}
    for granularity, sparsity in configurations(args.quick):
        rows[(granularity, sparsity)] = Row(name, granularity, sparsity)
    for seed in range(args.seeds):
        start = time.perf_counter()
        dense = train_dense(build, data, epochs, seed)
        convs = [layer.kernel.numpy() for layer in dense.layers if is_pruned_conv(layer)]
        row = rows[("dense", 0.0)]
        row.measured.append(kernel_zero_fraction(convs))
        row.accuracy.append(accuracy_of(dense, x_test, y_test))
        print(
            f"  {name} seed {seed}: dense {row.accuracy[-1]:.4f} ({time.perf_counter() - start:.1f} s)",
            flush=True,
        )
        for granularity, sparsity in configurations(args.quick):
            start = time.perf_counter()
            pruned = fine_tune_pruned(dense, data, granularity, sparsity, finetune, seed)
            stripped = tsc.pruning.strip_pruning(pruned)
            row = rows[(granularity, sparsity)]
            row.measured.append(kernel_zero_fraction(pruned_kernels(pruned)))
            row.accuracy.append(accuracy_of(stripped, x_test, y_test))
            print(
                f"  {name} seed {seed}: {granularity:<7} {sparsity:.2f} -> zeros {row.measured[-1]:.3f}, "
                f"accuracy {row.accuracy[-1]:.4f} ({time.perf_counter() - start:.1f} s)",
                flush=True,
            )
    return list(rows.values())


def fmt(values: list[float]) -> str:
    values = np.asarray(values)
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{values.mean():.4f} ± {values.std():.4f} (n={len(values)})"


def accuracy_table(rows: list[Row]) -> str:
    lines = [
        "| dataset | granularity | target sparsity | measured sparsity | test accuracy |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        granularity = "dense (baseline)" if r.granularity == "dense" else r.granularity
        if r.granularity == "m_by_n":
            granularity = f"m_by_n {M_BY_N[0]}:{M_BY_N[1]}"
        lines.append(
            f"| {r.dataset} | {granularity} | {r.target:.2f} | {fmt(r.measured)} | {fmt(r.accuracy)} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# part 2


def median_times(functions: dict, x, reps: int) -> dict[str, float]:
    """Median seconds per call of each function on `x`, called alternately after two warm-ups."""
    for fn in functions.values():
        for _ in range(2):
            fn(x).numpy()
    times = {name: [] for name in functions}
    for _ in range(reps):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn(x).numpy()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def speed_experiment(args) -> str:
    data = load_digits_data(32)
    x_train, y_train, x_test, y_test = data
    width = 64 if args.quick else 128
    epochs = 1 if args.quick else args.speed_epochs
    start = time.perf_counter()
    dense = train_dense(lambda: speed_net(width), data, epochs, seed=0, lr=LR_SPEED)
    dense_accuracy = accuracy_of(dense, x_test, y_test)
    print(f"  speed net: dense {dense_accuracy:.4f} ({time.perf_counter() - start:.1f} s)", flush=True)
    x = tf.constant(x_test[:SPEED_BATCH])
    functions = {"dense": tf.function(lambda v: dense(v, training=False), autograph=False)}
    layer_lines = [
        "| channel_group | layer | Cin | Cout | zeros in pruned kernel | mean fan-in / Cin | m (max fan-in) "
        "| m / Cin | runs as |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    results = {}
    for group in sorted({1, args.channel_group}):
        start = time.perf_counter()
        pruned = fine_tune_pruned(dense, data, "kernel", SPEED_SPARSITY, epochs, seed=0, channel_group=group)
        sparse = tsc.pruning.strip_pruning(pruned, to_sparse_layers=True)
        print(
            f"  speed net: kernel-pruned (channel_group={group}) + stripped "
            f"({time.perf_counter() - start:.1f} s)",
            flush=True,
        )
        expected = logits_of(pruned, x_test)
        got = logits_of(sparse, x_test)
        results[group] = {
            "max_diff": float(np.abs(got - expected).max()),
            "equal": bool(np.allclose(got, expected, rtol=1e-4, atol=1e-4)),
            "accuracy": float(np.mean(np.argmax(got, -1) == y_test)),
        }
        for wrapper, kernel in zip(tsc.pruning.collect_pruned_layers(pruned), pruned_kernels(pruned)):
            name = wrapper.layer.name
            layer = sparse.get_layer(name)
            cin, cout = kernel.shape[-2], kernel.shape[-1]
            alive = np.any(kernel != 0, axis=tuple(range(kernel.ndim - 2)))  # [Cin, Cout]
            mean_fan_in = float(alive.sum(axis=0).mean()) / cin
            if isinstance(layer, tsc.layers.ChannelSparseConv2D):
                m = layer.fan_in_channels
                runs = (
                    "channel-sparse kernel"
                    if m <= DISPATCH * cin
                    else f"dense conv (dispatch, m/Cin > {DISPATCH})"
                )
            else:
                m, runs = cin, f"{type(layer).__name__} (not converted)"
            layer_lines.append(
                f"| {group} | {name} | {cin} | {cout} | {kernel_zero_fraction([kernel]):.3f} "
                f"| {mean_fan_in:.3f} | {m} | {m / cin:.3f} | {runs} |"
            )
        functions[f"group {group}"] = tf.function(
            lambda v, model=sparse: model(v, training=False), autograph=False
        )
    times = median_times(functions, x, args.reps)
    summary = [
        f"| model | inference (ms, batch {SPEED_BATCH}, median of {args.reps}) | speed-up | test accuracy |",
        "| --- | ---: | ---: | ---: |",
        f"| dense Conv2D | {1000 * times['dense']:.2f} | 1.00 | {dense_accuracy:.4f} |",
    ]
    verdicts = []
    for group, result in results.items():
        speedup = times["dense"] / times[f"group {group}"]
        points = 100 * (result["accuracy"] - dense_accuracy)
        summary.append(
            f"| kernel-pruned {SPEED_SPARSITY:.0%} (channel_group={group}), stripped to ChannelSparseConv2D "
            f"| {1000 * times[f'group {group}']:.2f} | {speedup:.2f} | {result['accuracy']:.4f} |"
        )
        met_speed = "met" if speedup >= 2 else "**not met**"
        met_acc = "met" if points >= -1 else "**not met**"
        verdicts.append(
            f"channel_group={group}: stripped sparse vs pruned outputs: allclose {result['equal']} "
            f"(max |diff| {result['max_diff']:.2e})\n"
            f"channel_group={group}: sparse vs dense: inference speed-up {speedup:.2f}x (target >= 2x: "
            f"{met_speed}); accuracy change {points:+.2f} points (target: at most 1 point lost: {met_acc})"
        )
    text = "\n".join(layer_lines) + "\n\n" + "\n".join(summary) + "\n\n"
    text += (
        "m = the largest number of input channels any output channel keeps (the ChannelSparseConv2D "
        "fan-in; shorter rows are padded with zero weights). 'kernel' pruning balances the pruned "
        "kernels over the output channels, so m is about (1 - sparsity) * Cin. With channel_group=g, "
        "groups of g consecutive output channels keep the same inputs, and the CPU kernel computes "
        "each group's rows together.\n"
        f"The dense model is the one pruning started from; the pruned models had {epochs} more "
        "(fine-tuning) epochs.\n" + "\n".join(verdicts)
    )
    return text


# ---------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=1, help="seeds per configuration (default 1)")
    parser.add_argument(
        "--epochs", type=int, default=None, help="dense training epochs (default 20; 3 --quick)"
    )
    parser.add_argument(
        "--finetune", type=int, default=None, help="fine-tuning epochs (default 4; 1 --quick)"
    )
    parser.add_argument("--speed-epochs", type=int, default=4, help="speed net: dense and fine-tune epochs")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per model (default 9; 3 --quick)")
    parser.add_argument(
        "--channel-group",
        type=int,
        default=4,
        help="speed net: also prune with this channel_group (default 4; 1 is always run)",
    )
    parser.add_argument("--skip-speed", action="store_true", help="skip part 2 (speed)")
    parser.add_argument("--skip-accuracy", action="store_true", help="skip part 1 (accuracy per granularity)")
    parser.add_argument("--quick", action="store_true", help="smoke test: few epochs, sparsity 0.75 only")
    args = parser.parse_args()
    if args.epochs is None:
        args.epochs = 3 if args.quick else 20
    if args.finetune is None:
        args.finetune = 1 if args.quick else 4
    if args.reps is None:
        args.reps = 3 if args.quick else 9
    if min(args.seeds, args.epochs, args.finetune, args.reps, args.speed_epochs, args.channel_group) < 1:
        parser.error(
            "--seeds, --epochs, --finetune, --reps, --speed-epochs and --channel-group must be positive"
        )
    return args


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    command = " ".join(
        shlex.quote(a) for a in [".venv/bin/python", "examples/pruning_experiment.py", *sys.argv[1:]]
    )
    print(f"command: {command}")
    print(
        f"tf_sparseconv {tsc.__version__}; compiled kernels: {tsc.ops.is_library_loaded()}; "
        f"{args.seeds} seed(s), dense {args.epochs} epochs, "
        f"fine-tune {args.finetune} epochs, batch {BATCH}, Adam {LR_DENSE:g} / {LR_FINETUNE:g}",
        flush=True,
    )
    if not args.skip_accuracy:
        rows = run_dataset("digits", digits_net, load_digits_data(), args.epochs, args.finetune, args)
        rows += run_dataset("MNIST-1D", mnist1d_net, load_mnist1d_data(), args.epochs, args.finetune, args)
        print("\n## Accuracy after magnitude pruning (PolynomialDecay, fine-tuned from the dense weights)\n")
        print(accuracy_table(rows))
        print(
            f"\nm_by_n is evaluated at its natural sparsity only ({M_BY_N[0]}:{M_BY_N[1]} = "
            f"{M_BY_N[0] / M_BY_N[1]:.2f}); block = {BLOCK[0]}x{BLOCK[1]} blocks over (Cin, Cout). "
            "Measured sparsity: zero fraction of the pruned kernels (convs with Cin > 1, pooled); "
            "dense row: zero fraction of the same kernels unpruned."
        )
    if not args.skip_speed:
        print("", flush=True)
        text = speed_experiment(args)
        print(
            f"\n## Inference speed: kernel pruning at {SPEED_SPARSITY:.0%} -> ChannelSparseConv2D "
            "(digits upsampled to 32x32)\n"
        )
        print(text)
    print(f"\ncommand: {command}\ntotal wall time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
