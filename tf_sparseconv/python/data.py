"""Input pipelines for sparse maps (`tsc.data`).

A sparse map's rows are sites, not samples: Keras' `fit`/`predict`/`evaluate` slice NumPy inputs
into batches of rows, which cuts samples apart (and `predict` then returns a row per batch
of sites, not per sample). Feed sparse maps as a `tf.data` pipeline of whole batches instead;
`sparse_batches` builds one from per-sample arrays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from tf_sparseconv.python._validation import positive_int


def _rows(values, name: str, sample: int, width: int | None) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim == 1 and array.size == 0 and width is not None:
        array = array.reshape(0, width or 0)
    if array.ndim != 2:
        raise ValueError(f"sparse_batches: `{name}` of sample {sample} must be 2-D, got shape {array.shape}")
    if width is not None and array.shape[1] != width:
        raise ValueError(
            f"sparse_batches: `{name}` of sample {sample} has {array.shape[1]} columns, sample 0 has {width}"
        )
    return array


def sparse_batches(
    features: Sequence | None,
    coords: Sequence,
    labels=None,
    batch_size: int = 32,
    shuffle: bool = False,
    seed: int | None = None,
    drop_remainder: bool = False,
    num_sites: bool = True,
) -> tf.data.Dataset:
    """A `tf.data.Dataset` of sparse-map batches from per-sample arrays.

    Args:
      features: one float array `[n_i, C]` per sample (`n_i` may be 0), or None for occupancy
        features (ones `[n_i, 1]`).
      coords: one int array `[n_i, D]` per sample (D = 1, 2 or 3 spatial indices, no batch
        index), the sites of sample i, unique within it.
      labels: optional, an array (or anything `tf.data.Dataset.from_tensor_slices` takes) with
        one entry per sample.
      batch_size: samples per batch.
      shuffle: shuffle the samples (again every epoch), with `seed`.
      drop_remainder: drop the last batch when it has fewer than `batch_size` samples.
      num_sites: also yield `num_sites` (int32 `[B]`, the sites of each sample); give the model
        a `keras.Input((), dtype="int32", name="num_sites")` and call `SparseMap` on
        `[features, coords, num_sites]`, so that the batch size is right when the last samples
        of a batch have no site, and rows that were not batched by sample are an error.
        False for a model that takes `features` and `coords` only.

    Returns:
      A dataset of `(x, labels)` batches, or of `x` without labels, where `x` is
      `{"features": [N, C], "coords": int32 [N, 1 + D], "num_sites": int32 [B]}`: the sites of
      the batch's B samples, the batch index prepended to each sample's coords (rows sample by
      sample, in each sample's order). Use it in `model.fit`, `model.evaluate` and
      `model.predict` (one prediction per sample, samples without sites included).
    """
    batch_size = positive_int(batch_size, "batch_size")
    coords = list(coords)
    if not coords:
        raise ValueError("sparse_batches: `coords` has no samples")
    count = len(coords)
    if features is None:
        features = [np.ones((len(c), 1), np.float32) for c in coords]
    features = list(features)
    if len(features) != count:
        raise ValueError(f"sparse_batches: `features` has {len(features)} samples but `coords` has {count}")
    # D from the first sample given as [n, D] (an empty sample may come as a flat empty array).
    shaped = [i for i, c in enumerate(coords) if np.asarray(c).ndim == 2]
    first = shaped[0] if shaped else 0
    dims = np.asarray(coords[first]).shape[-1] if shaped else None
    if dims not in (1, 2, 3):
        raise ValueError(
            f"sparse_batches: `coords` of sample {first} must be [n, D] with D = 1, 2 or 3 spatial "
            f"indices (no batch index), got shape {np.asarray(coords[first]).shape}"
        )
    channels = None
    feature_rows, coord_rows, lengths = [], [], []
    for i, (sample_features, sample_coords) in enumerate(zip(features, coords)):
        f = _rows(sample_features, "features", i, channels)
        c = _rows(sample_coords, "coords", i, dims)
        channels = f.shape[1]
        if len(f) != len(c):
            raise ValueError(
                f"sparse_batches: sample {i} has {len(f)} rows of `features` but {len(c)} of `coords`"
            )
        if c.size and not np.issubdtype(c.dtype, np.integer):
            raise ValueError(f"sparse_batches: `coords` of sample {i} must be integers, got {c.dtype}")
        feature_rows.append(f)
        coord_rows.append(c)
        lengths.append(len(c))
    flat_features = np.concatenate(feature_rows)
    if not np.issubdtype(flat_features.dtype, np.floating):
        flat_features = flat_features.astype(np.float32)
    flat_coords = np.concatenate(coord_rows).astype(np.int32)
    lengths = np.asarray(lengths, np.int64)
    samples = (
        tf.RaggedTensor.from_row_lengths(flat_features, lengths),
        tf.RaggedTensor.from_row_lengths(flat_coords, lengths),
    )
    if labels is not None:
        if len(labels) != count:
            raise ValueError(
                f"sparse_batches: `labels` has {len(labels)} entries but there are {count} samples"
            )
        samples = (*samples, labels)
    ds = tf.data.Dataset.from_tensor_slices(samples)
    if shuffle:
        ds = ds.shuffle(count, seed=seed, reshuffle_each_iteration=True)

    def to_sparse(batch_features, batch_coords, *batch_labels):
        index = tf.cast(batch_coords.value_rowids(), tf.int32)
        x = {
            "features": batch_features.flat_values,
            "coords": tf.concat([index[:, None], batch_coords.flat_values], 1),
        }
        if num_sites:
            x["num_sites"] = tf.cast(batch_coords.row_lengths(), tf.int32)
        return (x, *batch_labels) if batch_labels else x

    ds = ds.ragged_batch(int(batch_size), drop_remainder=drop_remainder)
    return ds.map(to_sparse, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


__all__ = ["sparse_batches"]
