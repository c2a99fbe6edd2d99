"""Coordinate (site-sparse) maps and the rulebook of sparse convolution.

A sparse map is `features` `[N, C]` plus `coords` int32 `[N, 1 + D]` (batch
index, then D spatial indices, D = 1, 2 or 3) inside a known `spatial_shape`
(D ints); sites are unique.

The rulebook of a `"SAME"`-padded convolution (kernel `k`, strides `s`,
dilations `d` per axis) lists, per kernel offset (row-major over the kernel
dims), the `(in_row, out_row)` pairs where input site `in_row` feeds output
site `out_row`, sorted by `out_row`. Output position `o` reads input position
`o * s - pad_before + t * d` through tap `t`, with output grid
`ceil(L / s)` and `pad_before = max((out - 1) * s + (k - 1) * d + 1 - L, 0) // 2`
per axis: exactly `tf.nn.convolution(..., padding="SAME")`.
"""

from __future__ import annotations

import numbers

import numpy as np
import tensorflow as tf

from tf_sparseconv.python.ops._common import float_tensor, int_tuple
from tf_sparseconv.python.ops._loader import load_library

_INT32_MAX = int(np.iinfo(np.int32).max)


def _is_int(value) -> bool:
    return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, bool)


def _spatial_shape(spatial_shape) -> tuple[tf.Tensor, int]:
    """spatial_shape as an int32 vector and its static length D (1, 2 or 3)."""
    if isinstance(spatial_shape, (list, tuple)):
        if not all(_is_int(v) for v in spatial_shape):
            raise ValueError(f"`spatial_shape` must be 1, 2 or 3 ints, got {spatial_shape!r}")
        spatial_shape = np.asarray(spatial_shape, np.int64).reshape([len(spatial_shape)])
    t = tf.convert_to_tensor(spatial_shape)
    if not t.dtype.is_integer:
        raise ValueError(f"`spatial_shape` must be integers, got dtype {t.dtype.name}")
    if t.shape.rank != 1 or t.shape[0] not in (1, 2, 3):
        raise ValueError(
            f"`spatial_shape` must be a vector of 1, 2 or 3 ints (static length), got shape {t.shape}"
        )
    value = tf.get_static_value(t)
    if value is not None:
        if np.any(value < 1) or np.any(value > _INT32_MAX):
            raise ValueError(f"`spatial_shape` must be positive int32 values, got {value.tolist()}")
    return tf.cast(t, tf.int32), int(t.shape[0])


def _per_axis(value, dims: int, name: str) -> tuple[int, ...]:
    return int_tuple(value, dims, name)


def _coords(coords, dims: int | None) -> tf.Tensor:
    coords = tf.convert_to_tensor(coords)
    if not coords.dtype.is_integer:
        raise ValueError(f"`coords` must be int32 [N, 1 + D], got dtype {coords.dtype.name}")
    if coords.dtype != tf.int32:
        value = tf.get_static_value(coords)
        if value is not None and value.size and (value.min() < -_INT32_MAX - 1 or value.max() > _INT32_MAX):
            raise ValueError("`coords` values must fit in int32")
        coords = tf.cast(coords, tf.int32)
    if coords.shape.rank is not None:
        width = None if dims is None else dims + 1
        if coords.shape.rank != 2 or (width is not None and coords.shape[1] not in (None, width)):
            expected = "[N, 1 + D]" if width is None else f"[N, {width}] (1 + D, D = {dims})"
            raise ValueError(
                f"`coords` must be {expected} rows (batch, spatial...), got shape {coords.shape}"
            )
    return coords


def _rulebook_args(coords, spatial_shape, kernel_size, strides, dilations, submanifold):
    shape, dims = _spatial_shape(spatial_shape)
    kernel = _per_axis(kernel_size, dims, "kernel_size")
    stride = _per_axis(strides, dims, "strides")
    dilation = _per_axis(dilations, dims, "dilations")
    if not isinstance(submanifold, (bool, np.bool_)):
        raise ValueError(f"`submanifold` must be a bool, got {submanifold!r}")
    if submanifold and any(s != 1 for s in stride):
        raise ValueError(f"`strides` must be 1 for a submanifold convolution, got {strides!r}")
    return _coords(coords, dims), shape, dims, kernel, stride, dilation, bool(submanifold)


def sparse_conv_rulebook(
    coords,
    spatial_shape,
    kernel_size,
    strides=1,
    dilations=1,
    submanifold: bool = True,
    name: str | None = None,
):
    """The rulebook of a `"SAME"` convolution on the sparse map `coords`.

    Args:
      coords: int32 `[N, 1 + D]` unique sites `(b, x_1, ..., x_D)`.
      spatial_shape: D positive ints (list or int32 tensor of static length).
      kernel_size, strides, dilations: an int or D ints each.
      submanifold: `True` (strides must be 1): the output sites are the input
        sites in input order; `False`: every output position that reads at
        least one input site, sorted by `(b, spatial...)`.

    Returns:
      `(out_coords, pair_ptr, pairs, out_spatial_shape)`: int32 `[M, 1 + D]`,
      int32 `[K + 1]` (K = prod(kernel_size); offset `k`'s pairs are
      `pairs[pair_ptr[k]:pair_ptr[k + 1]]`), int32 `[P, 2]` rows
      `(in_row, out_row)` grouped by offset and sorted by `out_row`, and int32
      `[D]` `ceil(spatial_shape / strides)`.
    """
    args = _rulebook_args(coords, spatial_shape, kernel_size, strides, dilations, submanifold)
    coords, shape, _, kernel, stride, dilation, submanifold = args
    with tf.name_scope(name or "sparse_conv_rulebook"):
        library = load_library()
        if library is None:
            return sparse_conv_rulebook_reference(coords, shape, kernel, stride, dilation, submanifold)
        return tuple(
            library.tf_sparse_conv_sparse_conv_rulebook(
                coords,
                shape,
                kernel_size=list(kernel),
                strides=list(stride),
                dilations=list(dilation),
                submanifold=submanifold,
            )
        )


def _pack(batch, positions, shape, dims: int):
    """Mixed-radix int64 key of (batch, positions[..., 0..D)) in a grid of `shape`."""
    key = batch
    for a in range(dims):
        key = key * shape[a] + positions[..., a]
    return key


def _check_sites(coords64, shape64, dims: int):
    """Asserts (InvalidArgumentError naming `coords`) that the sites are valid and unique."""
    checks = [
        tf.debugging.assert_non_negative(coords64[:, 0], message="coords: negative batch index"),
        tf.debugging.assert_non_negative(
            coords64[:, 1:], message="coords: spatial index outside [0, spatial_shape)"
        ),
        tf.debugging.assert_less(
            coords64[:, 1:], shape64[None, :], message="coords: spatial index outside [0, spatial_shape)"
        ),
    ]
    with tf.control_dependencies(checks):
        keys = _pack(coords64[:, 0], coords64[:, 1:], shape64, dims)
    unique = tf.size(tf.unique(keys).y)
    dup = tf.debugging.assert_equal(unique, tf.size(keys), message="coords has duplicate sites")
    with tf.control_dependencies([dup]):
        return tf.identity(keys)


def sparse_conv_rulebook_reference(
    coords, spatial_shape, kernel_size, strides=1, dilations=1, submanifold: bool = True
):
    """Pure-TensorFlow `sparse_conv_rulebook` (same outputs, stock ops only)."""
    args = _rulebook_args(coords, spatial_shape, kernel_size, strides, dilations, submanifold)
    coords, shape, dims, kernel, stride, dilation, submanifold = args
    c = tf.cast(coords, tf.int64)
    in_shape = tf.cast(shape, tf.int64)
    k = tf.constant(kernel, tf.int64)
    s = tf.constant(stride, tf.int64)
    d = tf.constant(dilation, tf.int64)
    out_shape = (in_shape + s - 1) // s
    pad = tf.maximum((out_shape - 1) * s + (k - 1) * d + 1 - in_shape, 0) // 2
    # Taps of every offset, row-major over the kernel dims: [K, D].
    taps = tf.reshape(
        tf.stack(tf.meshgrid(*[tf.range(n, dtype=tf.int64) for n in kernel], indexing="ij"), -1), [-1, dims]
    )
    num_offsets = int(np.prod(kernel))
    in_keys = _check_sites(c, in_shape, dims)

    if submanifold:
        out_coords = coords
    else:
        # Every (site, offset) proposes the output position that reads it.
        num = c[:, None, 1:] + pad - taps * d  # [N, K, D]
        o = num // s
        ok = tf.reduce_all((num >= 0) & (num % s == 0) & (o < out_shape), axis=-1)
        keys = _pack(c[:, None, 0], o, out_shape, dims)
        keys = tf.sort(tf.unique(tf.boolean_mask(keys, ok)).y)
        cols = []
        for a in reversed(range(dims)):
            cols.append(keys % out_shape[a])
            keys = keys // out_shape[a]
        cols.append(keys)
        out_coords = tf.cast(tf.reshape(tf.stack(cols[::-1], axis=-1), [-1, dims + 1]), tf.int32)

    # Every (output site, offset) reads one position; match it against the inputs.
    oc = tf.cast(out_coords, tf.int64)
    p = oc[:, None, 1:] * s - pad + taps * d  # [M, K, D]
    inside = tf.reduce_all((p >= 0) & (p < in_shape), axis=-1)
    query = tf.where(inside, _pack(oc[:, None, 0], p, in_shape, dims), -1)
    order = tf.argsort(in_keys, stable=True)
    sentinel = tf.constant([np.iinfo(np.int64).max], tf.int64)
    sorted_keys = tf.concat([tf.gather(in_keys, order), sentinel], 0)
    rows = tf.concat([tf.cast(order, tf.int64), [-1]], 0)
    flat = tf.reshape(query, [-1])
    at = tf.searchsorted(sorted_keys, flat, side="left", out_type=tf.int64)
    found = tf.reshape(tf.gather(sorted_keys, at) == flat, tf.shape(query)) & inside  # [M, K]
    in_row = tf.reshape(tf.gather(rows, at), tf.shape(query))
    found_t = tf.transpose(found)  # [K, M]: tf.where lists (offset, out_row) row-major
    where = tf.where(found_t)
    in_rows = tf.gather_nd(tf.transpose(in_row), where)
    pairs = tf.cast(tf.reshape(tf.stack([in_rows, where[:, 1]], axis=1), [-1, 2]), tf.int32)
    counts = tf.reduce_sum(tf.cast(found_t, tf.int32), axis=1)
    pair_ptr = tf.reshape(tf.concat([[0], tf.cumsum(counts)], 0), [num_offsets + 1])
    out_spatial_shape = tf.cast(out_shape, tf.int32)
    return out_coords, pair_ptr, pairs, out_spatial_shape


def from_dense(x, threshold: float = 0.0):
    """The sites of `x` `[B, *spatial, C]` (D = 1, 2, 3) where any channel has `|x| > threshold`.

    Returns:
      `(features, coords)`: `[N, C]` and int32 `[N, 1 + D]`, sorted by `(b, spatial...)`.
    """
    x = float_tensor(x, "x")
    if x.shape.rank is None or x.shape.rank not in (3, 4, 5):
        raise ValueError(f"`x` must be [B, *spatial, C] with 1, 2 or 3 spatial axes, got shape {x.shape}")
    if not isinstance(threshold, numbers.Real) or isinstance(threshold, bool) or threshold < 0:
        raise ValueError(f"`threshold` must be a number >= 0, got {threshold!r}")
    with tf.name_scope("from_dense"):
        active = tf.reduce_any(tf.abs(x) > tf.cast(threshold, x.dtype), axis=-1)
        where = tf.where(active)  # row-major: sorted by (b, spatial...)
        return tf.gather_nd(x, where), tf.cast(where, tf.int32)


def to_dense(features, coords, spatial_shape, batch_size):
    """The dense map `[batch_size, *spatial_shape, C]`: `features` at `coords`, zeros elsewhere."""
    features = float_tensor(features, "features")
    if features.shape.rank is not None and features.shape.rank != 2:
        raise ValueError(f"`features` must be [N, C], got shape {features.shape}")
    shape, dims = _spatial_shape(spatial_shape)
    coords = _coords(coords, dims)
    n_f, n_c = features.shape[0], coords.shape[0]
    if n_f is not None and n_c is not None and n_f != n_c:
        raise ValueError(f"`features` has {n_f} rows but `coords` has {n_c}")
    if _is_int(batch_size):
        if batch_size < 0:
            raise ValueError(f"`batch_size` must be >= 0, got {batch_size!r}")
    elif isinstance(batch_size, numbers.Number):
        raise ValueError(f"`batch_size` must be an int, got {batch_size!r}")
    batch = tf.cast(tf.convert_to_tensor(batch_size), tf.int32)
    with tf.name_scope("to_dense"):
        checks = [
            tf.debugging.assert_equal(
                tf.shape(features)[0],
                tf.shape(coords)[0],
                message="features and coords: different row counts",
            ),
            tf.debugging.assert_non_negative(coords, message="coords: negative index"),
            tf.debugging.assert_less(coords[:, 0], batch, message="coords: batch index >= batch_size"),
            tf.debugging.assert_less(
                coords[:, 1:], shape[None, :], message="coords: spatial index outside [0, spatial_shape)"
            ),
        ]
        with tf.control_dependencies(checks):
            dense_shape = tf.concat([[batch], shape, tf.shape(features)[1:]], 0)
            return tf.scatter_nd(coords, features, dense_shape)


tf.no_gradient("TfSparseConv>SparseConvRulebook")
