"""Sparse 3-D CNN on voxelised shapes (a generated, ModelNet-like task), against the same dense CNN.

Data (fixed seeds, generated here, nothing is downloaded): six classes of closed surfaces —
sphere, box, cylinder, torus, cone, square pyramid — each with random proportions (box sides,
radius / height, torus tube), a uniformly random 3-D rotation, a random size (50-85 % of the
grid) and position jitter, Gaussian noise on the surface points, voxelised onto a G^3 grid
(G = 32 by default, `--grid 48` / `--grid 64`) as the occupied surface voxels: about 1-5 % of
the grid. The feature of a site is its occupancy (one channel, 1.0).

A `tf.data` pipeline (ragged per-sample site lists, shuffled and `ragged_batch`ed) yields the
sparse batches `({"features": [N, 1], "coords": [N, 4] int32 (b, x, y, z)}, labels)`, N
varying from batch to batch; the dense network gets the same batches scattered into
`[B, G, G, G, 1]` grids (`tf.scatter_nd` in a `map`).

Both networks have the same layers and parameter counts:
    conv3 (16) -> BN -> conv3 (16) -> conv2 /2 (32) -> conv3 (32) -> BN -> conv2 /2 (64) -> conv3 (64)
    -> global max pooling -> Dense(6, softmax)
The sparse one uses `SparseConv3D` (submanifold 3x3x3, regular 2x2x2 stride-2 downsampling),
`SparseBatchNormalization` and `SparseGlobalPooling("max")` on the active sites only; the
dense one `keras.layers.Conv3D(padding="same")`, `BatchNormalization` and
`GlobalMaxPooling3D` on the full grid. The sparse network is also trained with the attention
bound `max_active_sites=k` on its two strided convolutions (k1 / k2 = 1/2, 1/4 and 1/8 of the
median site count per sample at those resolutions; the strongest sites by L2 norm are kept).

Printed: data statistics, then per network the test accuracy, the wall time per training
epoch (the epochs after the first, which also traces), the median wall time of one inference
batch, and the activation memory per batch. That memory is a proxy computed from the tensor
sizes, not a process measurement: the bytes of the input and of every layer's output
features (sparse: N x C x 4 B, plus the coords N x 4 x 4 B at each resolution; dense:
B x G^3 x C x 4 B), summed over the layers and maxed over the test batches — what training
keeps alive for the backward pass. Rulebooks, gradients and allocator overhead are not counted,
nor the full output of a capped convolution before its top-k selection (it exists too, but the
layers after it see only the k kept sites).

    .venv/bin/python examples/voxel_shape_classification.py [--quick] [--grid 32]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

import tf_sparseconv as tsc

CLASSES = ("sphere", "box", "cylinder", "torus", "cone", "pyramid")
BATCH = 32


# --- data --------------------------------------------------------------------------------


def _pick(rng, areas, n):
    """Which surface part each of n points lies on, proportionally to the parts' areas."""
    areas = np.asarray(areas, np.float64)
    return rng.choice(len(areas), n, p=areas / areas.sum())


def _triangles(rng, tris, n):
    """n points uniformly on the triangles `tris` [T, 3, 3]."""
    a, b, c = tris[:, 0], tris[:, 1], tris[:, 2]
    which = _pick(rng, np.linalg.norm(np.cross(b - a, c - a), axis=1), n)
    u, v = rng.random((2, n, 1))
    flip = (u + v) > 1
    u, v = np.where(flip, 1 - u, u), np.where(flip, 1 - v, v)
    return a[which] + u * (b - a)[which] + v * (c - a)[which]


def _disc(rng, radius, z, n):
    r, t = radius * np.sqrt(rng.random(n)), rng.uniform(0, 2 * np.pi, n)
    return np.stack([r * np.cos(t), r * np.sin(t), np.full(n, z)], 1)


def surface_points(rng, label: int, n: int) -> np.ndarray:
    """n points on the surface of a shape of class `label`, in its own frame (about [-1, 1]^3)."""
    if label == 0:  # sphere
        p = rng.standard_normal((n, 3))
        return p / np.linalg.norm(p, axis=1, keepdims=True)
    if label == 1:  # box with random sides: its 12 face triangles
        half = rng.uniform(0.45, 1.0, 3)
        corners = np.array([[i, j, k] for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)]) * half
        faces = [(0, 1, 3, 2), (4, 5, 7, 6), (0, 1, 5, 4), (2, 3, 7, 6), (0, 2, 6, 4), (1, 3, 7, 5)]
        tris = np.array(
            [corners[[f[0], f[1], f[2]]] for f in faces] + [corners[[f[0], f[2], f[3]]] for f in faces]
        )
        return _triangles(rng, tris, n)
    if label == 2:  # closed cylinder
        r, h = rng.uniform(0.35, 0.8), rng.uniform(0.5, 1.0)
        part = _pick(rng, [2 * np.pi * r * 2 * h, np.pi * r * r, np.pi * r * r], n)
        t, z = rng.uniform(0, 2 * np.pi, n), rng.uniform(-h, h, n)
        side = np.stack([r * np.cos(t), r * np.sin(t), z], 1)
        return np.where(
            (part == 0)[:, None],
            side,
            np.where((part == 1)[:, None], _disc(rng, r, h, n), _disc(rng, r, -h, n)),
        )
    if label == 3:  # torus: uniform on the surface by rejection of the inner side
        big, small = 1.0, rng.uniform(0.2, 0.4)
        u, v = rng.uniform(0, 2 * np.pi, (2, 3 * n))
        keep = rng.random(3 * n) < (big + small * np.cos(v)) / (big + small)
        u, v = u[keep][:n], v[keep][:n]
        ring = big + small * np.cos(v)
        return np.stack([ring * np.cos(u), ring * np.sin(u), small * np.sin(v)], 1)
    if label == 4:  # closed cone, apex up
        r, h = rng.uniform(0.5, 1.0), rng.uniform(0.8, 1.6)
        part = _pick(rng, [np.pi * r * np.hypot(r, h), np.pi * r * r], n)
        s, t = np.sqrt(rng.random(n)), rng.uniform(0, 2 * np.pi, n)  # density ~ distance from the apex
        side = np.stack([s * r * np.cos(t), s * r * np.sin(t), h / 2 - s * h], 1)
        return np.where((part == 0)[:, None], side, _disc(rng, r, -h / 2, n))
    # square pyramid, apex up
    half, h = rng.uniform(0.5, 1.0), rng.uniform(0.8, 1.6)
    base = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half
    base = np.concatenate([base, np.full((4, 1), -h / 2)], 1)
    apex = np.array([0.0, 0.0, h / 2])
    tris = [np.stack([base[i], base[(i + 1) % 4], apex]) for i in range(4)]
    tris += [base[[0, 1, 2]], base[[0, 2, 3]]]
    return _triangles(rng, np.array(tris), n)


def random_rotation(rng) -> np.ndarray:
    """A uniformly random 3-D rotation (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def make_shapes(n: int, grid: int, seed: int):
    """Per-sample occupied voxels (a list of int32 [n_i, 3], sorted) and labels [n]."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(CLASSES)).astype(np.int32)
    num_points = 8 * grid * grid  # several points per surface voxel: no holes
    sites = []
    for label in labels:
        p = surface_points(rng, int(label), num_points)
        p = p - (p.max(0) + p.min(0)) / 2
        p = p / np.linalg.norm(p, axis=1).max()  # inside the unit ball: fits the grid in any pose
        p = p @ random_rotation(rng).T
        p = p + rng.normal(0, 0.015, p.shape)  # surface noise
        radius = rng.uniform(0.5, 0.85) * (grid / 2 - 1)
        shift = rng.uniform(-1, 1, 3) * (grid / 2 - 1 - radius)
        voxels = np.clip(np.floor(p * radius + shift + grid / 2), 0, grid - 1).astype(np.int32)
        flat = np.unique((voxels[:, 0] * grid + voxels[:, 1]) * grid + voxels[:, 2])
        sites.append(np.stack(np.unravel_index(flat, (grid,) * 3), 1).astype(np.int32))
    return sites, labels


def sparse_dataset(sites, labels, shuffle_seed: int | None = None) -> tf.data.Dataset:
    """Batches ({"features": [N, 1], "coords": [N, 4] (b, x, y, z)}, labels), N varying."""
    ragged = tf.RaggedTensor.from_row_lengths(np.concatenate(sites), [len(s) for s in sites])
    ds = tf.data.Dataset.from_tensor_slices((ragged, labels))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(labels), seed=shuffle_seed, reshuffle_each_iteration=True)

    def to_sparse(batch_sites, batch_labels):
        xyz = batch_sites.flat_values
        b = tf.cast(batch_sites.value_rowids(), tf.int32)
        coords = tf.concat([b[:, None], xyz], 1)
        return {"features": tf.ones([tf.shape(xyz)[0], 1]), "coords": coords}, batch_labels

    return ds.ragged_batch(BATCH).map(to_sparse, num_parallel_calls=2).prefetch(2)


def dense_dataset(sparse_ds: tf.data.Dataset, grid: int) -> tf.data.Dataset:
    """The same batches as dense grids [B, G, G, G, 1]."""

    def to_dense(inputs, batch_labels):
        shape = tf.stack([tf.shape(batch_labels)[0], grid, grid, grid, 1])
        return tf.scatter_nd(inputs["coords"], inputs["features"], shape), batch_labels

    return sparse_ds.map(to_dense, num_parallel_calls=2)


def downsampled_counts(sites, factor: int) -> np.ndarray:
    """Sites per sample after the 2x2x2 stride-2 convolutions (each output site is a coarse cell)."""
    return np.array([len(np.unique((s // factor) @ [1 << 20, 1 << 10, 1])) for s in sites])


# --- networks ----------------------------------------------------------------------------


def build_sparse(grid: int, caps=(None, None), name: str = "sparse") -> keras.Model:
    features = keras.Input((1,), name="features")
    coords = keras.Input((4,), dtype="int32", name="coords")
    conv = tsc.layers.SparseConv3D
    h = tsc.layers.SparseMap((grid,) * 3, batch_size=None, name="map")([features, coords])
    h = conv(16, 3, activation="relu", name="conv1")(h)
    h = tsc.layers.SparseBatchNormalization(momentum=0.9, name="bn1")(h)
    h = conv(16, 3, activation="relu", name="conv2")(h)
    h = conv(32, 2, strides=2, submanifold=False, activation="relu", max_active_sites=caps[0], name="down1")(
        h
    )
    h = conv(32, 3, activation="relu", name="conv3")(h)
    h = tsc.layers.SparseBatchNormalization(momentum=0.9, name="bn2")(h)
    h = conv(64, 2, strides=2, submanifold=False, activation="relu", max_active_sites=caps[1], name="down2")(
        h
    )
    h = conv(64, 3, activation="relu", name="conv4")(h)
    pooled = tsc.layers.SparseGlobalPooling("max", name="pool")(h)
    outputs = keras.layers.Dense(len(CLASSES), activation="softmax", name="head")(pooled)
    return keras.Model({"features": features, "coords": coords}, outputs, name=name)


def build_dense(grid: int) -> keras.Model:
    inputs = keras.Input((grid, grid, grid, 1), name="grid")
    conv = keras.layers.Conv3D
    h = conv(16, 3, padding="same", activation="relu", name="conv1")(inputs)
    h = keras.layers.BatchNormalization(momentum=0.9, name="bn1")(h)
    h = conv(16, 3, padding="same", activation="relu", name="conv2")(h)
    h = conv(32, 2, strides=2, padding="same", activation="relu", name="down1")(h)
    h = conv(32, 3, padding="same", activation="relu", name="conv3")(h)
    h = keras.layers.BatchNormalization(momentum=0.9, name="bn2")(h)
    h = conv(64, 2, strides=2, padding="same", activation="relu", name="down2")(h)
    h = conv(64, 3, padding="same", activation="relu", name="conv4")(h)
    pooled = keras.layers.GlobalMaxPooling3D(name="pool")(h)
    outputs = keras.layers.Dense(len(CLASSES), activation="softmax", name="head")(pooled)
    return keras.Model(inputs, outputs, name="dense")


LAYERS = ("conv1", "bn1", "conv2", "down1", "conv3", "bn2", "down2", "conv4")


def activation_bytes(model: keras.Model, dataset: tf.data.Dataset, sparse: bool) -> int:
    """Input + per-layer output feature bytes of one batch (sparse: plus the coords [N, 4] int32
    of each resolution), maxed over the batches of `dataset`."""
    outputs = [model.get_layer(n).output for n in LAYERS]
    if sparse:  # features of every layer; coords where they change (the submanifold ones pass them on)
        outputs = [o[0] for o in outputs] + [model.get_layer(n).output[1] for n in ("down1", "down2")]
    probe = keras.Model(model.inputs, outputs)
    fn = tf.function(lambda x: probe(x, training=False), input_signature=[dataset.element_spec[0]])
    peak = 0
    for x, _ in dataset:
        inputs = [x["features"], x["coords"]] if sparse else [x]
        total = sum(t.shape.num_elements() * 4 for t in [*inputs, *fn(x)])
        peak = max(peak, total)
    return peak


def timed_predict(model: keras.Model, inputs, repeat: int = 5) -> float:
    fn = tf.function(lambda x: model(x, training=False))
    fn(inputs).numpy()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(inputs).numpy()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def train_and_measure(model, train_ds, test_ds, epochs: int, sparse: bool) -> dict:
    steps = epochs * int(train_ds.cardinality())
    model.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(3e-3, steps)),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(train_ds, epochs=1, shuffle=False, verbose=0)  # includes tracing
    start = time.perf_counter()
    model.fit(train_ds, epochs=epochs - 1, shuffle=False, verbose=0)
    epoch_s = (time.perf_counter() - start) / (epochs - 1)
    _, accuracy = model.evaluate(test_ds, verbose=0)
    first = next(iter(test_ds))[0]
    return {
        "accuracy": float(accuracy),
        "epoch_s": epoch_s,
        "infer_ms": timed_predict(model, first) * 1e3,
        "act_mib": activation_bytes(model, test_ds, sparse) / 2**20,
        "params": model.count_params(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run (smoke test)")
    parser.add_argument("--grid", type=int, default=None, help="grid size G (default 32; 16 with --quick)")
    args = parser.parse_args()
    if args.quick:
        grid, n_train, n_test, epochs, fractions = args.grid or 16, 320, 96, 8, (2,)
    else:
        grid, n_train, n_test, epochs, fractions = args.grid or 32, 1200, 600, 6, (2, 4, 8)
    start_all = time.perf_counter()
    train_sites, y_train = make_shapes(n_train, grid, seed=1)
    test_sites, y_test = make_shapes(n_test, grid, seed=2)
    counts = np.array([len(s) for s in train_sites])
    median1 = int(np.median(downsampled_counts(train_sites, 2)))
    median2 = int(np.median(downsampled_counts(train_sites, 4)))
    print(
        f"{len(CLASSES)} classes, {n_train} train / {n_test} test shapes on a {grid}^3 grid: "
        f"{counts.mean():.0f} sites per shape ({counts.mean() / grid**3:.1%} occupancy, "
        f"{counts.min()}-{counts.max()}); median sites after the 1st / 2nd downsampling: "
        f"{median1} / {median2}"
    )
    train_ds = sparse_dataset(train_sites, y_train, shuffle_seed=0)
    test_ds = sparse_dataset(test_sites, y_test)

    dense_data = (dense_dataset(train_ds, grid), dense_dataset(test_ds, grid))
    runs = [("dense Conv3D", lambda: build_dense(grid), dense_data, False)]
    runs.append(("sparse", lambda: build_sparse(grid), (train_ds, test_ds), True))
    for f in fractions:
        caps = (max(1, median1 // f), max(1, median2 // f))
        runs.append(
            (
                f"sparse k={caps[0]}/{caps[1]}",
                lambda caps=caps: build_sparse(grid, caps, name=f"sparse_k{caps[0]}_{caps[1]}"),
                (train_ds, test_ds),
                True,
            )
        )
    rows = []
    for name, build, (train, test), sparse in runs:
        keras.utils.set_random_seed(0)  # the same initial weights for every network
        rows.append((name, train_and_measure(build(), train, test, epochs, sparse)))

    print(f"batch size {BATCH}, {epochs} epochs; memory: activation bytes per batch (a tensor-size proxy)")
    print(
        f"{'network':22s}{'test acc':>10s}{'train s/epoch':>15s}{'infer ms/batch':>16s}"
        f"{'act. MiB/batch':>16s}{'params':>9s}"
    )
    for name, r in rows:
        print(
            f"{name:22s}{r['accuracy']:10.3f}{r['epoch_s']:15.2f}{r['infer_ms']:16.1f}"
            f"{r['act_mib']:16.2f}{r['params']:9d}"
        )
    dense, sparse = rows[0][1], rows[1][1]
    print(
        f"sparse vs dense: training {dense['epoch_s'] / sparse['epoch_s']:.2f}x faster, "
        f"inference {dense['infer_ms'] / sparse['infer_ms']:.2f}x faster, "
        f"{dense['act_mib'] / sparse['act_mib']:.1f}x less activation memory "
        f"(chance accuracy {1 / len(CLASSES):.3f}; total {time.perf_counter() - start_all:.0f} s)"
    )


if __name__ == "__main__":
    main()
