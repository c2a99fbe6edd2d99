"""SBNet-style block-sparse segmentation on generated scenes, against the same dense network.

Scenes (fixed seed, generated here): 128x128 RGB images of a noisy, slowly varying
background with a few discs, squares and triangles (random shape, size and position)
whose colour family (reddish / greenish / bluish, with random shade and pixel noise)
is their class. Task: per-pixel class (background / red / green / blue object). The
computation mask is the data's known occupancy: where objects are (dilated by
a few pixels), typically 10-15 % of the image — as a LiDAR occupancy grid or a
cheap detector would provide in a real pipeline.

Both networks have the same layers and parameter counts:
    stem 3x3 conv (16) -> 3x3 conv (32) -> 2 bottleneck residual blocks (16) -> 1x1 head (4)
The sparse network runs the stem, the 3x3 conv and the residual blocks with
`BlockSparseConv2D` / `BlockSparseResidualBlock` on the active blocks only (zeros
elsewhere, so the head predicts background there); the dense one uses
`keras.layers.Conv2D` everywhere. Reported: pixel accuracy, mean IoU over the
object classes, and wall time per training epoch and per inference batch.

    .venv/bin/python examples/block_sparse_segmentation.py [--quick]
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

CLASSES = ("background", "red", "green", "blue")


def make_scenes(n: int, size: int, seed: int):
    """Images [n, size, size, 3], labels [n, size, size] (int), occupancy masks [n, size, size, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    images = np.empty((n, size, size, 3), np.float32)
    labels = np.zeros((n, size, size), np.int32)
    for i in range(n):
        # Smooth background: a random linear ramp plus noise.
        ramp = rng.normal(0, 0.3, 3)[None, None, :] * (xx[..., None] / size) + rng.normal(0, 0.3, 3)
        images[i] = ramp + rng.normal(0, 0.15, (size, size, 3))
        for _ in range(rng.integers(1, 4)):
            shape, label = rng.integers(0, 3), rng.integers(1, 4)
            r = rng.uniform(0.04, 0.09) * size
            cy, cx = rng.uniform(r, size - r, 2)
            if shape == 0:
                region = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            elif shape == 1:
                region = (np.abs(yy - cy) < r * 0.85) & (np.abs(xx - cx) < r * 0.85)
            else:  # upward triangle
                region = (yy < cy + r * 0.7) & (yy - cy + r > 1.7 * np.abs(xx - cx))
            colour = rng.normal(-0.3, 0.3, 3)
            colour[label - 1] += rng.uniform(1.0, 2.0)  # the class's dominant channel
            images[i][region] = colour + rng.normal(0, 0.15, (int(region.sum()), 3))
            labels[i][region] = label
    occupied = labels > 0
    # Dilate the occupancy by 3 pixels (the mask need not be tight).
    padded = np.pad(occupied, ((0, 0), (3, 3), (3, 3)))
    masks = np.zeros_like(occupied)
    for dy in range(7):
        for dx in range(7):
            masks |= padded[:, dy : dy + size, dx : dx + size]
    return images, labels, masks[..., None].astype(np.float32)


def build_model(sparse: bool, size: int, block: int) -> keras.Model:
    image = keras.Input((size, size, 3), name="image")
    mask = keras.Input((size, size, 1), name="mask")
    if sparse:
        h = tsc.layers.BlockSparseConv2D(16, 3, block_size=block, activation="relu", name="stem")(
            [image, mask]
        )
        h = tsc.layers.BlockSparseConv2D(32, 3, block_size=block, activation="relu", name="conv")([h, mask])
        for i in range(2):
            h = tsc.layers.BlockSparseResidualBlock(16, 3, block_size=block, name=f"res{i}")([h, mask])
    else:
        h = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="stem")(image)
        h = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv")(h)
        for i in range(2):
            r = keras.layers.Conv2D(16, 1, activation="relu", name=f"res{i}_reduce")(h)
            r = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name=f"res{i}_conv")(r)
            r = keras.layers.Conv2D(32, 1, name=f"res{i}_expand")(r)
            h = keras.layers.Add()([h, r])
    logits = keras.layers.Conv2D(len(CLASSES), 1, name="head")(h)
    return keras.Model([image, mask], logits, name="sparse" if sparse else "dense")


def mean_iou(pred: np.ndarray, labels: np.ndarray) -> float:
    ious = []
    for c in range(1, len(CLASSES)):
        inter = np.sum((pred == c) & (labels == c))
        union = np.sum((pred == c) | (labels == c))
        if union:
            ious.append(inter / union)
    return float(np.mean(ious))


def timed_predict(model, inputs, repeat: int = 3) -> float:
    fn = tf.function(lambda a, b: model([a, b], training=False), jit_compile=False)
    a, b = (tf.constant(v) for v in inputs)
    fn(a, b)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(a, b).numpy()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run (smoke test)")
    args = parser.parse_args()
    size, n_train, n_test, epochs, block = (64, 48, 16, 2, 8) if args.quick else (128, 400, 100, 5, 16)
    x_train, y_train, m_train = make_scenes(n_train, size, seed=1)
    x_test, y_test, m_test = make_scenes(n_test, size, seed=2)
    active = tsc.ops.reduce_mask(m_test[..., 0], block, block).shape[0] * block * block / m_test[..., 0].size
    print(
        f"scenes {size}x{size}: mask covers {m_test.mean():.1%} of the pixels, its {block}x{block} "
        f"blocks {active:.1%}"
    )
    results = {}
    for sparse in (False, True):
        keras.utils.set_random_seed(0)
        model = build_model(sparse, size, block)
        model.compile(
            optimizer=keras.optimizers.Adam(3e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        # Objects are ~5 % of the pixels: weight their pixels up so that the loss is not
        # won by predicting background everywhere.
        weights = np.where(y_train > 0, 10.0, 1.0).astype(np.float32)
        fit = dict(batch_size=16, sample_weight=weights, verbose=0)
        model.fit([x_train, m_train], y_train, epochs=1, **fit)  # includes tracing
        start = time.perf_counter()
        model.fit([x_train, m_train], y_train, epochs=epochs - 1, **fit)
        epoch_s = (time.perf_counter() - start) / (epochs - 1)
        logits = model.predict([x_test, m_test], batch_size=50, verbose=0)
        pred = logits.argmax(-1)
        batch = (x_test[:50], m_test[:50])
        results[model.name] = {
            "pixel accuracy": float((pred == y_test).mean()),
            "mean IoU (objects)": mean_iou(pred, y_test),
            "train s/epoch": epoch_s,
            "inference ms / 50 images": timed_predict(model, batch) * 1e3,
            "parameters": model.count_params(),
        }
    print(f"{'':28s}{'dense':>12s}{'sparse':>12s}")
    for key in results["dense"]:
        d, s = results["dense"][key], results["sparse"][key]
        fmt = "{:12d}" if isinstance(d, int) else "{:12.3f}"
        print(f"{key:28s}{fmt.format(d)}{fmt.format(s)}")
    speed = results["dense"]["inference ms / 50 images"] / results["sparse"]["inference ms / 50 images"]
    train = results["dense"]["train s/epoch"] / results["sparse"]["train s/epoch"]
    print(f"sparse vs dense: inference {speed:.2f}x faster, training {train:.2f}x faster")


if __name__ == "__main__":
    main()
