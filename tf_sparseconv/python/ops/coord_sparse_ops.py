"""Coordinate (site-sparse) convolution (Hackel et al. 2018; submanifold: Graham et al.).

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

The convolution gathers, per kernel offset, the input rows of its pairs,
multiplies them by that offset's `[Cin, Cout]` kernel slice (one GEMM) and
adds the products into the output rows (`sparse_conv_features`), so its cost
scales with the pairs that exist, not with the dense volume. A rulebook can be
computed once and reused by every layer at the same resolution, and the
rulebook of a downsampling convolution, transposed, gives the inverse
(upsampling) convolution of a U-Net (`sparse_conv_transpose`). `topk_sites` is
the attention step that bounds the number of active sites.

Every op has a pure-TF reference (`*_reference`); inside
`_loader.for_converters()` (`tsc.export.export_litert` / `export_onnx`) the
references use only ops that the LiteRT builtins and tf2onnx + ONNX Runtime
both run correctly: stable sorts (TopKV2) instead of LowerBound, Unique and
SegmentMin; int32 per-axis geometry with nothing negative divided (no int64
FloorDiv; tf2onnx divides integers by truncation); segment sums instead of
scatters that add duplicate indices (tf2onnx's ScatterND keeps the last);
and a sentinel entry wherever a sort, scatter or segment op could see an empty
map (LiteRT's kernels fail or crash on empty tensors, tf2onnx's segment ops
too). The outputs are the same, the rulebook entry for entry.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import tensor_util

from tf_sparseconv.python.ops._common import (
    choice,
    float_tensor,
    int_scalar,
    int_tuple,
    is_int,
    positive_count,
)
from tf_sparseconv.python.ops._loader import compiled_library, converting, converting_for_onnx, dispatch

_INT32_MAX = int(np.iinfo(np.int32).max)


def _spatial_shape(spatial_shape) -> tuple[tf.Tensor, int]:
    """spatial_shape as an int32 vector and its static length D (1, 2 or 3)."""
    if isinstance(spatial_shape, (list, tuple)):
        if not all(is_int(v) for v in spatial_shape):
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
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """The rulebook of a `"SAME"` convolution on the sparse map `coords`.

    Args:
      coords: int32 `[N, 1 + D]` unique sites `(b, x_1, ..., x_D)`: `b >= 0`, `x_a` in
        `[0, spatial_shape[a])`. A bad site or a duplicate is an `InvalidArgumentError` on
        every device (the GPU kernel checks them: it reads its counts back to the host anyway).
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
        library = dispatch("sparse_conv_rulebook")
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
    """Asserts (InvalidArgumentError naming `coords`) that the sites are valid and unique.

    (The converters drop the asserts, and with them the ops only the asserts read.)
    """
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
    distinct = tf.size(tf.unique(keys).y)
    dup = tf.debugging.assert_equal(distinct, tf.size(keys), message="coords has duplicate sites")
    with tf.control_dependencies([dup]):
        return tf.identity(keys)


def _match_keys(in_keys, queries):
    """Row of `in_keys` (int64 [N], unique, >= 0) equal to each query (int64 [Q]); -1 where none.

    Binary search (`tf.searchsorted`), or, inside `for_converters()`, a merge of both key sets
    by one stable sort (TopKV2; neither converter takes LowerBound): with the inputs placed
    first, an input sorts before the queries with its key, so a query's match can only be the
    last input before it, and the inputs before it are counted by a cumulative sum.
    """
    n = tf.shape(in_keys, out_type=tf.int32)[0]
    if not converting():
        order = tf.argsort(in_keys, stable=True)
        sentinel = tf.constant([np.iinfo(np.int64).max], tf.int64)
        sorted_keys = tf.concat([tf.gather(in_keys, order), sentinel], 0)
        rows = tf.concat([order, [-1]], 0)
        at = tf.searchsorted(sorted_keys, queries, side="left", out_type=tf.int32)
        return tf.where(tf.gather(sorted_keys, at) == queries, tf.gather(rows, at), -1)
    # (A last, unmatched query keeps every tensor non-empty: LiteRT's kernels fail on empty ones.)
    merged = tf.concat([in_keys, queries, tf.constant([np.iinfo(np.int64).max], tf.int64)], 0)
    order = tf.argsort(merged, stable=True)  # int32
    is_input = order < n
    count = tf.cumsum(tf.cast(is_input, tf.int32))  # inputs at or before each sorted position
    in_rows = tf.concat([tf.boolean_mask(order, is_input), [-1]], 0)  # by ascending key
    in_sorted = tf.concat([tf.gather(in_keys, in_rows[:-1]), tf.constant([-1], tf.int64)], 0)
    last = tf.maximum(count - 1, 0)  # the last input at or before (the -1 sentinel when none)
    hit = (count > 0) & (tf.gather(in_sorted, last) == tf.gather(merged, order))
    row_sorted = tf.where(hit, tf.gather(in_rows, last), -1)
    # Back to the merged order (a permutation: scatter_nd without duplicate indices).
    row = tf.scatter_nd(order[:, None], row_sorted, tf.shape(order))
    return row[n:-1]


def _check_int32_geometry(shape, kernel, stride, dilation) -> None:
    """ValueError when the converter form's int32 index arithmetic could overflow (for the
    spatial dims known at trace time: a SparseMap's or Sparsify's are)."""
    known = tensor_util.constant_value_as_shape(shape).as_list()
    for n, k, s, d in zip(known, kernel, stride, dilation):
        if n is not None and int(n) + (k - 1) * d + s > _INT32_MAX:
            raise ValueError(
                f"spatial_shape {known} is too large for the LiteRT / ONNX form of the rulebook: "
                "its index arithmetic is int32, and spatial_shape + (kernel_size - 1) * dilations "
                "+ strides must stay below 2^31 on every axis"
            )


def sparse_conv_rulebook_reference(
    coords, spatial_shape, kernel_size, strides=1, dilations=1, submanifold: bool = True
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Pure-TensorFlow `sparse_conv_rulebook` (same outputs, stock ops only).

    Inside `for_converters()` it uses ops that the LiteRT builtins and tf2onnx both take: no
    LowerBound (`_match_keys`), no Unique outside the asserts (the converters drop both), no
    int64 FloorDiv and no division of negative numbers (the per-axis geometry is int32; the
    sites are still keyed in int64, so the batch size times the grid volume is not bounded).
    The outputs are the same, in the same order.
    """
    args = _rulebook_args(coords, spatial_shape, kernel_size, strides, dilations, submanifold)
    coords, shape, dims, kernel, stride, dilation, submanifold = args
    convert = converting()
    # Geometry in int32 for the converters (TFLite has no int64 FloorDiv; tf2onnx lowers an
    # integer FloorDiv to a truncating Div, so nothing negative is ever divided), else int64.
    index = tf.int32 if convert else tf.int64
    if convert:
        _check_int32_geometry(shape, kernel, stride, dilation)
    c = tf.cast(coords, index)
    in_shape = tf.cast(shape, index)
    k = tf.constant(kernel, index)
    s = tf.constant(stride, index)
    d = tf.constant(dilation, index)
    out_shape = (in_shape + s - 1) // s
    pad = tf.maximum((out_shape - 1) * s + (k - 1) * d + 1 - in_shape, 0) // 2
    # Taps of every offset, row-major over the kernel dims: [K, D].
    taps = np.stack(np.meshgrid(*[np.arange(n) for n in kernel], indexing="ij"), -1)
    taps = tf.constant(taps.reshape([-1, dims]), index)
    num_offsets = int(np.prod(kernel))
    c64 = tf.cast(coords, tf.int64)
    in_keys = _check_sites(c64, tf.cast(shape, tf.int64), dims)
    out_shape64 = tf.cast(out_shape, tf.int64)

    if submanifold:
        out_coords = coords
    elif convert:
        # Every (site, offset) proposes the output position that reads it; the sorted distinct
        # proposals (a stable sort, then the first of each run) are the output sites.
        num = c[:, None, 1:] + pad - taps * d  # [N, K, D]
        if all(v == 1 for v in stride):
            o, ok = num, num >= 0
        else:
            whole = tf.maximum(num, 0)
            o = whole // s
            ok = (num >= 0) & (whole - o * s == 0)
        ok = tf.reduce_all(ok & (o < out_shape), axis=-1)  # [N, K]
        batch = tf.broadcast_to(c[:, None, :1], tf.concat([tf.shape(o)[:2], [1]], 0))
        proposals = tf.boolean_mask(tf.concat([batch, o], -1), ok)  # [P, 1 + D]
        keys = _pack(
            tf.cast(proposals[:, 0], tf.int64), tf.cast(proposals[:, 1:], tf.int64), out_shape64, dims
        )
        # A last proposal with the largest key (sorted last, dropped) keeps the sort non-empty.
        keys = tf.concat([keys, tf.constant([np.iinfo(np.int64).max], tf.int64)], 0)
        proposals = tf.concat([proposals, tf.zeros([1, dims + 1], index)], 0)
        order = tf.argsort(keys, stable=True)
        keys = tf.gather(keys, order)
        first = keys != tf.concat([tf.constant([-1], tf.int64), keys], 0)[:-1]
        out_coords = tf.cast(tf.boolean_mask(tf.gather(proposals, order), first)[:-1], tf.int32)
        out_coords = tf.reshape(out_coords, [-1, dims + 1])
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
    oc = tf.cast(out_coords, index)
    p = oc[:, None, 1:] * s - pad + taps * d  # [M, K, D]
    inside = tf.reduce_all((p >= 0) & (p < in_shape), axis=-1)
    keys = _pack(tf.cast(oc[:, None, 0], tf.int64), tf.cast(p, tf.int64), tf.cast(in_shape, tf.int64), dims)
    query = tf.where(inside, keys, -1)
    in_row = tf.reshape(_match_keys(in_keys, tf.reshape(query, [-1])), tf.shape(query))  # [M, K]
    found_t = tf.transpose(in_row >= 0)  # [K, M]: tf.where lists (offset, out_row) row-major
    where = tf.where(found_t)
    in_rows = tf.gather_nd(tf.transpose(in_row), where)
    pairs = tf.reshape(tf.stack([in_rows, tf.cast(where[:, 1], tf.int32)], axis=1), [-1, 2])
    counts = tf.reduce_sum(tf.cast(found_t, tf.int32), axis=1)
    pair_ptr = tf.reshape(tf.concat([[0], tf.cumsum(counts)], 0), [num_offsets + 1])
    out_spatial_shape = tf.cast(out_shape, tf.int32)
    return out_coords, pair_ptr, pairs, out_spatial_shape


def from_dense(x, threshold: float = 0.0) -> tuple[tf.Tensor, tf.Tensor]:
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


def to_dense(features, coords, spatial_shape, batch_size) -> tf.Tensor:
    """The dense map `[batch_size, *spatial_shape, C]`: `features` at `coords`, zeros elsewhere."""
    features = float_tensor(features, "features")
    if features.shape.rank is not None and features.shape.rank != 2:
        raise ValueError(f"`features` must be [N, C], got shape {features.shape}")
    shape, dims = _spatial_shape(spatial_shape)
    coords = _coords(coords, dims)
    n_f, n_c = features.shape[0], coords.shape[0]
    if n_f is not None and n_c is not None and n_f != n_c:
        raise ValueError(f"`features` has {n_f} rows but `coords` has {n_c}")
    batch = int_scalar(batch_size, "batch_size", minimum=0)
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
            if converting():  # one more sample, dropped: LiteRT's SCATTER_ND dies on an empty output
                dense_shape = tf.concat([[batch + 1], shape, tf.shape(features)[1:]], 0)
                return tf.scatter_nd(coords, features, dense_shape)[:-1]
            dense_shape = tf.concat([[batch], shape, tf.shape(features)[1:]], 0)
            return tf.scatter_nd(coords, features, dense_shape)


tf.no_gradient("TfSparseConv>SparseConvRulebook")
tf.no_gradient("TfSparseConv>SparseConvRulebookTranspose")
tf.no_gradient("TfSparseConv>TopKSites")


# --- the convolution ---------------------------------------------------------------


class Rulebook(NamedTuple):
    """A convolution's rulebook (see `sparse_conv_rulebook`), reusable across layers."""

    out_coords: tf.Tensor
    pair_ptr: tf.Tensor
    pairs: tf.Tensor
    out_spatial_shape: tf.Tensor


def _features_operands(features, kernel, what: str):
    features = float_tensor(features, "features")
    kernel = float_tensor(kernel, "kernel")
    if kernel.dtype != features.dtype:
        raise ValueError(
            f"{what}: `kernel` dtype {kernel.dtype.name} must match `features` dtype {features.dtype.name}"
        )
    if features.shape.rank is not None and features.shape.rank != 2:
        raise ValueError(f"{what}: `features` must be [N, Cin], got shape {features.shape}")
    return features, kernel


def _flat_kernel(kernel, dims: int, cin, what: str):
    """`[k_1..k_D, Cin, Cout]` -> (`[K, Cin, Cout]`, kernel_size)."""
    if kernel.shape.rank is None or kernel.shape.rank != dims + 2:
        raise ValueError(
            f"{what}: `kernel` must be [k_1, ..., k_{dims}, Cin, Cout] for the D = {dims} spatial axes "
            f"of `spatial_shape` (or of `coords`), got shape {kernel.shape}: check `spatial_shape` "
            "and the kernel's rank"
        )
    size = tuple(kernel.shape[:dims])
    if None in size or min(size) < 1:
        raise ValueError(f"{what}: `kernel` needs a static, positive spatial size, got shape {kernel.shape}")
    if cin is not None and kernel.shape[-2] is not None and kernel.shape[-2] != cin:
        raise ValueError(
            f"{what}: `kernel` has {kernel.shape[-2]} input channels but `features` has {cin} "
            f"(kernel shape {kernel.shape})"
        )
    k = int(np.prod(size))
    return tf.reshape(kernel, [k, tf.shape(kernel)[-2], tf.shape(kernel)[-1]]), size


def _is_symmetric(kernel_size, dilations, submanifold: bool) -> bool:
    """True when the submanifold rulebook is its own transpose with offsets reversed."""
    return submanifold and all((k - 1) * d % 2 == 0 for k, d in zip(kernel_size, dilations))


def _features_op(features, kernel, pair_ptr, pairs, num_out, symmetric=False):
    library = dispatch("sparse_conv_features")
    if library is None:
        return sparse_conv_features_reference(features, kernel, pair_ptr, pairs, num_out)
    return library.tf_sparse_conv_sparse_conv_features(
        features, kernel, pair_ptr, pairs, num_out, symmetric=symmetric
    )


def _num_rows(value, name: str) -> tf.Tensor:
    return int_scalar(value, name, minimum=0)


def _rulebook_tensors(pair_ptr, pairs):
    pair_ptr = tf.convert_to_tensor(pair_ptr)
    pairs = tf.convert_to_tensor(pairs)
    if not pair_ptr.dtype.is_integer or not pairs.dtype.is_integer:
        raise ValueError("`pair_ptr` and `pairs` must be int32 tensors")
    if pairs.shape.rank is not None and (pairs.shape.rank != 2 or pairs.shape[1] not in (None, 2)):
        raise ValueError(f"`pairs` must be int32 [P, 2], got shape {pairs.shape}")
    return tf.cast(pair_ptr, tf.int32), tf.cast(pairs, tf.int32)


def sparse_conv_features(features, kernel, pair_ptr, pairs, num_out, name: str | None = None) -> tf.Tensor:
    """Gather -> GEMM per kernel offset -> scatter-add along a rulebook.

    `out[dst] = sum_k sum_{(src, dst) in offset k} features[src] @ kernel[k]`.

    Args:
      features: `[N, Cin]`.
      kernel: `[K, Cin, Cout]` (the spatial kernel dims flattened row-major).
      pair_ptr, pairs: a rulebook (`sparse_conv_rulebook`, or
        `sparse_conv_rulebook_transpose`): int32 `[K + 1]` and `[P, 2]` rows
        `(src, dst)`, dst non-decreasing within an offset. A malformed one is an
        `InvalidArgumentError` on the CPU; on the GPU its values are not checked
        (README, "Validation on GPU"): pairs with `src` or `dst` out of range are
        skipped, `pair_ptr` is read clamped to `[0, P]` and non-decreasing, and
        `dst` out of order gives unspecified values.
      num_out: number of output rows.

    Returns:
      `[num_out, Cout]`; rows without pairs are 0.
    """
    features, kernel = _features_operands(features, kernel, "sparse_conv_features")
    if kernel.shape.rank is not None and kernel.shape.rank != 3:
        raise ValueError(f"sparse_conv_features: `kernel` must be [K, Cin, Cout], got shape {kernel.shape}")
    pair_ptr, pairs = _rulebook_tensors(pair_ptr, pairs)
    with tf.name_scope(name or "sparse_conv_features"):
        return _features_op(features, kernel, pair_ptr, pairs, _num_rows(num_out, "num_out"))


def sparse_conv_rulebook_transpose(pair_ptr, pairs, num_src) -> tf.Tensor:
    """The transposed rulebook: pairs `(src, dst)` -> `(dst, src)`, sorted by the new dst.

    `pair_ptr` is unchanged. `num_src` is the number of rows `src` indexes.
    """
    pair_ptr, pairs = _rulebook_tensors(pair_ptr, pairs)
    num_src = _num_rows(num_src, "num_src")
    library = dispatch("sparse_conv_rulebook_transpose")
    if library is None:
        return sparse_conv_rulebook_transpose_reference(pair_ptr, pairs, num_src)
    return library.tf_sparse_conv_sparse_conv_rulebook_transpose(pair_ptr, pairs, num_src)


def sparse_conv(
    features,
    coords,
    kernel,
    spatial_shape,
    strides=1,
    dilations=1,
    submanifold: bool = True,
    rulebook: Rulebook | None = None,
    name: str | None = None,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Sparse convolution of the map `(features, coords)` (padding "SAME").

    Args:
      features: `[N, Cin]` float.
      coords: int32 `[N, 1 + D]` unique sites.
      kernel: `[k_1, ..., k_D, Cin, Cout]`.
      spatial_shape: D ints (or an int32 tensor of static length D).
      strides, dilations: an int or D ints.
      submanifold: `True` (strides 1): the output sites are the input sites
        (no fill-in); `False`: every output position whose receptive field
        holds an input site, sorted.
      rulebook: a `Rulebook` computed earlier for the same coords and geometry
        (e.g. by the previous layer at this resolution); computed when None.

    Returns:
      `(out_features [M, Cout], out_coords [M, 1 + D], out_spatial_shape [D])`,
      equal to `tf.nn.convolution(to_dense(...), kernel, strides, "SAME",
      dilations)` at the output sites.
    """
    with tf.name_scope(name or "sparse_conv"):
        features, kernel = _features_operands(features, kernel, "sparse_conv")
        shape, dims = _spatial_shape(spatial_shape)
        flat, kernel_size = _flat_kernel(kernel, dims, features.shape[-1], "sparse_conv")
        stride = _per_axis(strides, dims, "strides")
        dilation = _per_axis(dilations, dims, "dilations")
        coords = _coords(coords, dims)
        if rulebook is None:
            rulebook = Rulebook(
                *sparse_conv_rulebook(coords, shape, kernel_size, stride, dilation, submanifold)
            )
        num_out = tf.shape(rulebook.out_coords)[0]
        symmetric = _is_symmetric(kernel_size, dilation, bool(submanifold))
        out = _features_op(features, flat, rulebook.pair_ptr, rulebook.pairs, num_out, symmetric)
        return out, rulebook.out_coords, rulebook.out_spatial_shape


def sparse_conv_transpose(features, kernel, rulebook: Rulebook, coords, name: str | None = None) -> tf.Tensor:
    """Inverse (transposed) sparse convolution: back to the sites of a downsampling conv's input.

    `rulebook` is the rulebook of a (typically strided, non-submanifold)
    convolution from the sites `coords` (`N` rows) to `rulebook.out_coords`
    (`M` rows). `features` `[M, Cin]` live on those output sites; the result
    `[N, Cout]` lives on `coords`:
    `out[i] = sum_k sum_{(i, j) in offset k} features[j] @ kernel[k]`, with
    `kernel` `[k_1, ..., k_D, Cin, Cout]`. With `kernel[k] = W[k]^T` this is
    the transpose (adjoint) of the convolution with `W`; it restores the
    fine sites exactly, as in the decoder of a sparse U-Net.
    """
    with tf.name_scope(name or "sparse_conv_transpose"):
        features, kernel = _features_operands(features, kernel, "sparse_conv_transpose")
        dims = rulebook.out_coords.shape[-1] - 1 if rulebook.out_coords.shape[-1] is not None else None
        if dims is None:
            dims = kernel.shape.rank - 2
        flat, _ = _flat_kernel(kernel, dims, features.shape[-1], "sparse_conv_transpose")
        coords = _coords(coords, dims)
        num_out = tf.shape(coords)[0]
        transposed = sparse_conv_rulebook_transpose(rulebook.pair_ptr, rulebook.pairs, num_out)
        return _features_op(features, flat, rulebook.pair_ptr, transposed, num_out)


def align_rows(features, coords, target_coords, spatial_shape) -> tf.Tensor:
    """`features` (rows at the sites `coords`) on the rows of `target_coords` instead.

    Rows of `target_coords` that `coords` lacks get zeros; sites of `coords` outside
    `target_coords` are dropped. Neither needs to be sorted; `spatial_shape` (D ints) is the
    grid both live in. Gradients flow to the kept rows.
    """
    features = float_tensor(features, "features")
    shape, dims = _spatial_shape(spatial_shape)
    coords, target_coords = _coords(coords, dims), _coords(target_coords, dims)
    shape64 = tf.cast(shape, tf.int64)

    def pack(c):
        c = tf.cast(c, tf.int64)
        return _pack(c[:, 0], c[:, 1:], shape64, dims)

    rows = _match_keys(pack(coords), pack(target_coords))
    n = tf.shape(features)[0]
    # A zero row to read for the missing sites (also when `features` has no rows).
    padded = tf.concat([features, tf.zeros(tf.stack([1, tf.shape(features)[1]]), features.dtype)], 0)
    return tf.gather(padded, tf.where(rows >= 0, rows, n))


_SCORES = ("l2", "abs_max")


def topk_sites(
    features, coords, k, score: str = "l2", name: str | None = None
) -> tuple[tf.Tensor, tf.Tensor]:
    """Attention step of a sparse map: per batch sample keep the `k` highest-scoring sites.

    Args:
      features: `[N, C]`; coords: int32 `[N, 1 + D]` (the batch is column 0; a negative
        batch index is an `InvalidArgumentError` on every device).
      k: int >= 1 (or an int32 scalar tensor).
      score: `"l2"` (L2 norm of the feature row) or `"abs_max"` (max |value|).

    Returns:
      `(features, coords)` of the kept sites in their original order; ties go
      to the lower row, NaN scores rank highest. Gradients flow to the kept rows.
    """
    choice(score, "score", _SCORES)
    with tf.name_scope(name or "topk_sites"):
        features = float_tensor(features, "features")
        if features.shape.rank is not None and features.shape.rank != 2:
            raise ValueError(f"topk_sites: `features` must be [N, C], got shape {features.shape}")
        coords = _coords(coords, None)
        k = positive_count(k, "k")
        library = dispatch("topk_sites")
        if library is None:
            rows = topk_sites_rows_reference(features, coords, k, score)
        else:
            rows = library.tf_sparse_conv_top_k_sites(features, coords, k, score=score)
        return tf.gather(features, rows), tf.gather(coords, rows)


# --- gradients ----------------------------------------------------------------------


@tf.RegisterGradient("TfSparseConv>SparseConvFeatures")
def _sparse_conv_features_grad(op, grad):
    features, kernel, pair_ptr, pairs, num_out = op.inputs
    n = tf.shape(features)[0]
    library = compiled_library()
    kernel_t = tf.transpose(kernel, [0, 2, 1])
    if op.get_attr("symmetric"):
        # Offset k's pairs, swapped, are offset K-1-k's: same rulebook, kernel reversed.
        d_features = library.tf_sparse_conv_sparse_conv_features(
            grad, tf.reverse(kernel_t, [0]), pair_ptr, pairs, n, symmetric=True
        )
    else:
        transposed = library.tf_sparse_conv_sparse_conv_rulebook_transpose(pair_ptr, pairs, n)
        d_features = library.tf_sparse_conv_sparse_conv_features(grad, kernel_t, pair_ptr, transposed, n)
    d_kernel = library.tf_sparse_conv_sparse_conv_kernel_grad(features, grad, pair_ptr, pairs)
    return d_features, d_kernel, None, None, None


@tf.RegisterGradient("TfSparseConv>SparseConvKernelGrad")
def _sparse_conv_kernel_grad_grad(op, grad):
    # kernel_grad(f, g)[k] = sum f[src]^T g[dst]: bilinear in f and g.
    features, out_grad, pair_ptr, pairs = op.inputs
    library = compiled_library()
    n, m = tf.shape(features)[0], tf.shape(out_grad)[0]
    transposed = library.tf_sparse_conv_sparse_conv_rulebook_transpose(pair_ptr, pairs, n)
    d_features = library.tf_sparse_conv_sparse_conv_features(
        out_grad, tf.transpose(grad, [0, 2, 1]), pair_ptr, transposed, n
    )
    d_out_grad = library.tf_sparse_conv_sparse_conv_features(features, grad, pair_ptr, pairs, m)
    return d_features, d_out_grad, None, None


# --- pure-TensorFlow references -------------------------------------------------------


def sparse_conv_features_reference(features, kernel, pair_ptr, pairs, num_out) -> tf.Tensor:
    """Pure-TF `sparse_conv_features`: one gather / matmul / scatter-add per offset."""
    features, kernel = _features_operands(features, kernel, "sparse_conv_features")
    pair_ptr, pairs = _rulebook_tensors(pair_ptr, pairs)
    num_out = _num_rows(num_out, "num_out")
    num_offsets = kernel.shape[0]
    if num_offsets is None:
        raise ValueError("sparse_conv_features_reference needs a static number of kernel offsets")
    n = tf.shape(features)[0]
    checks = [
        tf.debugging.assert_equal(tf.shape(pair_ptr)[0], num_offsets + 1, message="pair_ptr must be [K + 1]"),
        tf.debugging.assert_equal(pair_ptr[0], 0, message="pair_ptr must start at 0"),
        tf.debugging.assert_equal(pair_ptr[-1], tf.shape(pairs)[0], message="pair_ptr must end at P"),
        tf.debugging.assert_non_negative(
            pair_ptr[1:] - pair_ptr[:-1], message="pair_ptr must be non-decreasing"
        ),
        tf.debugging.assert_non_negative(pairs, message="pairs: negative row"),
        tf.debugging.assert_less(pairs[:, 0], n, message="pairs: src outside [0, N) (a row of features)"),
        tf.debugging.assert_less(pairs[:, 1], num_out, message="pairs: dst outside [0, num_out)"),
    ]
    with tf.control_dependencies(checks):
        pairs = tf.identity(pairs)
    if num_offsets == 0:
        return tf.zeros(tf.stack([num_out, tf.shape(kernel)[2]]), features.dtype)
    # Per offset: gather its sources, one GEMM; then one segment sum over all pairs, offset by
    # offset in row order (the additions, in their order, of a scatter-add per offset; one
    # UNSORTED_SEGMENT_SUM in LiteRT). One SplitV and one Unpack instead of K slices keep the
    # graph small (the converters' time).
    counts = pair_ptr[1:] - pair_ptr[:-1]
    sources = tf.split(pairs[:, 0], counts, num=num_offsets)
    kernels = tf.unstack(kernel, num=num_offsets)
    products = [tf.matmul(tf.gather(features, src), w) for src, w in zip(sources, kernels)]
    if converting_for_onnx():
        # A scatter-add per offset (ScatterND, reduction "add"): tf2onnx lowers a segment sum to
        # a sort, a Unique and a [segments, max count] gather grid, twice as slow in onnxruntime.
        out = tf.zeros(tf.stack([num_out, tf.shape(kernel)[2]]), features.dtype)
        for dst, product in zip(tf.split(pairs[:, 1:], counts, num=num_offsets), products):
            out = tf.tensor_scatter_nd_add(out, dst, product)
        return out
    return unsorted_segment(tf.concat(products, 0), pairs[:, 1], num_out, "sum")


_SEGMENT_OPS = {
    "sum": tf.math.unsorted_segment_sum,
    "max": tf.math.unsorted_segment_max,
    "mean": tf.math.unsorted_segment_mean,
}


def unsorted_segment(data, segment_ids, num_segments, reduce: str) -> tf.Tensor:
    """`tf.math.unsorted_segment_{reduce}` (sum, max or mean) over the rows of `data`.

    Inside `for_converters()`, one zero row in one more segment (dropped) keeps `data` non-empty:
    LiteRT's and tf2onnx's segment kernels fail on an empty map.
    """
    op = _SEGMENT_OPS[reduce]
    if not converting():
        return op(data, segment_ids, num_segments)
    num_segments = tf.cast(num_segments, segment_ids.dtype)
    pad = tf.zeros(tf.concat([[1], tf.shape(data)[1:]], 0), data.dtype)
    data = tf.concat([data, pad], 0)
    segment_ids = tf.concat([segment_ids, tf.reshape(num_segments, [1])], 0)
    return op(data, segment_ids, num_segments + 1)[:-1]


def sparse_conv_rulebook_transpose_reference(pair_ptr, pairs, num_src) -> tf.Tensor:
    """Pure-TF `sparse_conv_rulebook_transpose`."""
    pair_ptr, pairs = _rulebook_tensors(pair_ptr, pairs)
    num_src = tf.cast(num_src, tf.int64)
    offset = tf.repeat(tf.range(tf.shape(pair_ptr)[0] - 1), pair_ptr[1:] - pair_ptr[:-1])
    key = tf.cast(offset, tf.int64) * (num_src + 1) + tf.cast(pairs[:, 0], tf.int64)
    if converting():  # a last, largest key (sorted last, dropped): no empty sort for LiteRT
        key = tf.concat([key, tf.constant([np.iinfo(np.int64).max], tf.int64)], 0)
        order = tf.argsort(key, stable=True)[:-1]
    else:
        order = tf.argsort(key, stable=True)
    return tf.reverse(tf.gather(pairs, order), [1])


def sparse_conv_reference(
    features, coords, kernel, spatial_shape, strides=1, dilations=1, submanifold: bool = True
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Pure-TF `sparse_conv` (reference rulebook + per-offset gather/matmul/scatter)."""
    features, kernel = _features_operands(features, kernel, "sparse_conv")
    shape, dims = _spatial_shape(spatial_shape)
    flat, kernel_size = _flat_kernel(kernel, dims, features.shape[-1], "sparse_conv")
    out_coords, pair_ptr, pairs, out_shape = sparse_conv_rulebook_reference(
        coords, shape, kernel_size, strides, dilations, submanifold
    )
    out = sparse_conv_features_reference(features, flat, pair_ptr, pairs, tf.shape(out_coords)[0])
    return out, out_coords, out_shape


def topk_sites_rows_reference(features, coords, k, score: str = "l2") -> tf.Tensor:
    """Pure-TF rows kept by `topk_sites` (int32, ascending)."""
    choice(score, "score", _SCORES)
    features = float_tensor(features, "features")
    coords = _coords(coords, None)
    k = positive_count(k, "k")
    n = tf.shape(features)[0]
    checks = [
        tf.debugging.assert_equal(
            tf.shape(coords)[0], n, message="features and coords: different row counts"
        ),
        tf.debugging.assert_non_negative(coords[:, 0], message="coords: negative batch index"),
        tf.debugging.assert_positive(k, message="k must be >= 1"),
    ]
    with tf.control_dependencies(checks):
        values = tf.cast(features, tf.float64 if features.dtype == tf.float64 else tf.float32)
    if score == "l2":
        s = tf.sqrt(tf.reduce_sum(tf.square(values), axis=1))
    else:  # max |value| (0 for C = 0), NaN when any value is NaN
        s = tf.reduce_max(tf.concat([tf.abs(values), tf.zeros([n, 1], values.dtype)], 1), axis=1)
        s = tf.where(tf.reduce_any(tf.math.is_nan(values), axis=1), tf.constant(np.nan, s.dtype), s)
    nan = tf.math.is_nan(s)
    # Order: batch ascending, NaN first, score descending, row ascending
    # (stable sorts, the last key first).
    order = tf.argsort(tf.where(nan, tf.zeros_like(s), s), direction="DESCENDING", stable=True)
    order = tf.gather(order, tf.argsort(tf.gather(tf.cast(~nan, tf.int32), order), stable=True))
    order = tf.gather(order, tf.argsort(tf.gather(coords[:, 0], order), stable=True))
    batch = tf.gather(coords[:, 0], order)
    first = tf.concat([tf.ones([tf.minimum(n, 1)], tf.bool), batch[1:] != batch[:-1]], 0)
    segment = tf.cumsum(tf.cast(first, tf.int32)) - 1
    # Rank within the sample: the position minus where its run starts (no SegmentMin: neither
    # converter takes it).
    rank = tf.range(n) - tf.gather(tf.boolean_mask(tf.range(n), first), segment)
    kept = tf.boolean_mask(order, rank < k)
    return tf.sort(kept)
