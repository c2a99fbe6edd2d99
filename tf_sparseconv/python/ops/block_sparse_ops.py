"""Block-sparse convolution on dense tensors (SBNet, Ren et al. 2018).

A computation mask is reduced to a list of active blocks (`reduce_mask`); the
blocks are gathered from the dense input with the halo the convolution needs
(`sparse_gather`), convolved densely as a batch of small images, and scattered
back (`sparse_scatter`, write or add). The work scales with the number of
active blocks, and every step is a real op with a gradient: the gradient of a
gather is a scatter-add (overlapping halos sum), that of a scatter a gather.

Block geometry, per spatial axis: block `i` covers
`[offset + i * stride, offset + i * stride + size)`; there are
`max(1, ceil((L - offset - size) / stride) + 1)` blocks along an axis of length
`L`. Out-of-range parts of a block read as 0 and are not written.
"""

from __future__ import annotations

import contextlib
import functools
import numbers

import numpy as np
import tensorflow as tf

from tf_sparseconv.python import _validation
from tf_sparseconv.python.ops._common import conv2d_batch_safe, float_tensor, float_tensors, int_tuple, is_int
from tf_sparseconv.python.ops._loader import compiled_library, dispatch, load_library, record, references_only


def _pair(value, name: str, minimum: int | None = 1) -> tuple[int, int]:
    return int_tuple(value, 2, name, minimum)


def _indices(indices) -> tf.Tensor:
    indices = tf.convert_to_tensor(indices)
    if not indices.dtype.is_integer:
        raise ValueError(f"`indices` must be an int32 tensor [n, 3], got dtype {indices.dtype.name}")
    if indices.dtype != tf.int32:
        # Wider integers must fit in int32 (a silent wrap would address another block).
        lo, hi = np.iinfo(np.int32).min, np.iinfo(np.int32).max
        value = tf.get_static_value(indices)
        if value is not None:
            if value.size and (value.min() < lo or value.max() > hi):
                raise ValueError("`indices` values must fit in int32")
        else:
            fits = tf.reduce_all((indices >= lo) & (indices <= hi))
            with tf.control_dependencies([tf.debugging.Assert(fits, ["`indices` values must fit in int32"])]):
                indices = tf.identity(indices)
        indices = tf.cast(indices, tf.int32)
    if indices.shape.rank is not None and (indices.shape.rank != 2 or indices.shape[1] not in (None, 3)):
        raise ValueError(f"`indices` must be [n, 3] rows (b, bh, bw), got shape {indices.shape}")
    return indices


def _mask(mask) -> tf.Tensor:
    mask = tf.convert_to_tensor(mask, name="mask")
    if mask.dtype == tf.bool or mask.dtype.is_integer:
        mask = tf.cast(mask, tf.float32)
    mask = float_tensor(mask, "mask")
    rank = mask.shape.rank
    if rank == 4:
        if mask.shape[-1] not in (None, 1):
            raise ValueError(f"`mask` must be [B, H, W] or [B, H, W, 1], got shape {mask.shape}")
        mask = tf.squeeze(mask, -1)
    elif rank is None:  # [B, H, W] or [B, H, W, 1], known at run time only
        mask = tf.reshape(mask, tf.shape(mask)[:3])
    elif rank != 3:
        raise ValueError(f"`mask` must be [B, H, W] or [B, H, W, 1], got shape {mask.shape}")
    return mask


def _check_rank(t, rank: int, name: str, layout: str) -> None:
    if t.shape.rank is not None and t.shape.rank != rank:
        raise ValueError(f"`{name}` must be {layout}, got shape {t.shape}")


def _check_scatter_operands(blocks, indices, base):
    blocks, base = float_tensors(blocks=blocks, base=base)
    _check_rank(blocks, 4, "blocks", "[n, size_h, size_w, C]")
    _check_rank(base, 4, "base", "[B, H, W, C]")
    indices = _indices(indices)
    if None not in (blocks.shape.rank, base.shape.rank):
        if None not in (blocks.shape[-1], base.shape[-1]) and blocks.shape[-1] != base.shape[-1]:
            raise ValueError(f"`blocks` has {blocks.shape[-1]} channels but `base` has {base.shape[-1]}")
    if blocks.shape.rank is not None and indices.shape.rank == 2:
        n_blocks, n_indices = blocks.shape[0], indices.shape[0]
        if None not in (n_blocks, n_indices) and n_blocks != n_indices:
            raise ValueError(f"`blocks` has {n_blocks} blocks but `indices` has {n_indices} rows")
    return blocks, indices, base


def index_limit(length, size: int, stride: int, offset: int) -> tf.Tensor:
    """Largest valid block index + 1 along an axis: the grid, plus any further block that
    still overlaps the image (`max(grid, ceil((length - offset) / stride))`)."""
    starts = tf.maximum(-((offset - length) // stride), 0)
    return tf.maximum(grid_size(length, size, stride, offset), starts)


def _assert_indices(indices, shape, size, stride, offset):
    """Run-time check of index values (the stock-op references' counterpart of the kernels')."""
    limit_h = index_limit(shape[1], size[0], stride[0], offset[0])
    limit_w = index_limit(shape[2], size[1], stride[1], offset[1])
    ok = tf.reduce_all(
        (indices[:, 0] >= 0)
        & (indices[:, 0] < shape[0])
        & (indices[:, 1] >= 0)
        & (indices[:, 1] < limit_h)
        & (indices[:, 2] >= 0)
        & (indices[:, 2] < limit_w)
    )
    return tf.debugging.Assert(
        ok,
        ["indices out of range: batch", shape[0], "block index limits", limit_h, limit_w, "indices", indices],
        summarize=12,
    )


def grid_size(length, size: int, stride: int, offset: int) -> int | tf.Tensor:
    """Blocks along an axis: `max(1, ceil((length - offset - size) / stride) + 1)`."""
    if is_int(length):
        return max(1, -((size + offset - int(length)) // stride) + 1)
    return tf.maximum(1, -((size + offset - length) // stride) + 1)


# --- ops ------------------------------------------------------------------------------


def reduce_mask(
    mask, block_size, block_stride, block_offset=(0, 0), threshold=0.0, avgpool=False, name=None
) -> tf.Tensor:
    """The active blocks of a computation mask.

    Args:
      mask: `[B, H, W]` or `[B, H, W, 1]` (float; bool/int are cast).
      block_size, block_stride: int or (height, width), positive.
      block_offset: int or (height, width), may be negative.
      threshold: a block is active when its max (with `avgpool`, the sum over
        its in-range part divided by the full block area) is `> threshold`.
      avgpool: see `threshold`.

    Returns:
      int32 `[n, 3]` rows `(b, bh, bw)`, sorted.
    """
    size, stride = _pair(block_size, "block_size"), _pair(block_stride, "block_stride")
    offset = _pair(block_offset, "block_offset", minimum=None)
    if not isinstance(threshold, numbers.Real) or isinstance(threshold, bool):
        raise ValueError(f"`threshold` must be a number, got {threshold!r}")
    with tf.name_scope(name or "reduce_mask"):
        mask = _mask(mask)
        library = dispatch("reduce_mask")
        if library is None:
            return reduce_mask_reference(mask, size, stride, offset, threshold, avgpool)
        return library.tf_sparse_conv_reduce_mask(
            mask,
            block_size=list(size),
            block_stride=list(stride),
            block_offset=list(offset),
            threshold=float(threshold),
            avgpool=bool(avgpool),
        )


def sparse_gather(x, indices, block_size, block_stride, block_offset=(0, 0), name=None) -> tf.Tensor:
    """Gathers blocks `[n, size_h, size_w, C]` of `x` `[B, H, W, C]` (zeros outside the image).

    `indices` are int32 `[n, 3]` rows `(b, bh, bw)` with `b` in `[0, B)` and `bh`, `bw` below
    the index limits (the grid, plus any further block that still overlaps the image). A row
    out of range is an `InvalidArgumentError` on the CPU; on the GPU index values are not
    checked (README, "Validation on GPU"): such a row gathers a block of zeros.
    """
    size, stride = _pair(block_size, "block_size"), _pair(block_stride, "block_stride")
    offset = _pair(block_offset, "block_offset", minimum=None)
    with tf.name_scope(name or "sparse_gather"):
        x = float_tensor(x, "x")
        _check_rank(x, 4, "x", "[B, H, W, C]")
        indices = _indices(indices)
        library = dispatch("sparse_gather")
        if library is None:
            return sparse_gather_reference(x, indices, size, stride, offset)
        return library.tf_sparse_conv_sparse_gather(
            x, indices, block_size=list(size), block_stride=list(stride), block_offset=list(offset)
        )


def sparse_scatter(
    blocks, indices, base, block_stride, block_offset=(0, 0), add=False, name=None
) -> tf.Tensor:
    """A copy of `base` `[B, H, W, C]` with `blocks` `[n, size_h, size_w, C]` written or added.

    With `add=False` the blocks overwrite `base` (overlapping blocks are an
    error); with `add=True` they are summed into it (overlaps sum, in a fixed,
    deterministic order). Parts of a block outside the image are dropped.
    `indices` are rows `(b, bh, bw)` as for `sparse_gather`. On the CPU an
    index out of range or an overlap with `add=False` is an
    `InvalidArgumentError`; on the GPU index values are not checked (README,
    "Validation on GPU"): a row out of range is skipped, and of overlapping
    blocks written with `add=False` the last one in index order wins.
    """
    stride = _pair(block_stride, "block_stride")
    offset = _pair(block_offset, "block_offset", minimum=None)
    with tf.name_scope(name or "sparse_scatter"):
        blocks, indices, base = _check_scatter_operands(blocks, indices, base)
        library = dispatch("sparse_scatter")
        if library is None:
            return sparse_scatter_reference(blocks, indices, base, stride, offset, add)
        return library.tf_sparse_conv_sparse_scatter(
            blocks, indices, base, block_stride=list(stride), block_offset=list(offset), add=bool(add)
        )


class BlockConvGeometry:
    """How `block_sparse_conv2d` tiles a convolution into blocks (static ints).

    Mask block `(b, i, j)` (size `block_size`, stride `block_size`, at the
    input resolution) owns output block `(b, i, j)` of size
    `out_block = block_size / strides`. Computing it needs the input window of
    size `gather_size = block_size + kernel - strides` starting at
    `i * block_size - pad_before`, i.e. a gather with stride `block_size` and
    offset `-pad_before`, followed by a VALID strided convolution.
    """

    def __init__(self, kernel_size, block_size, strides, padding):
        self.kernel_size, self.block_size, self.strides = kernel_size, block_size, strides
        self.padding = padding
        for bs, s, axis in zip(block_size, strides, ("height", "width")):
            if bs % s:
                raise ValueError(
                    f"`block_size` ({bs}) must be a multiple of `strides` ({s}) along the {axis}"
                )
        self.out_block = tuple(bs // s for bs, s in zip(block_size, strides))
        self.gather_size = tuple(bs + k - s for bs, k, s in zip(block_size, kernel_size, strides))


def _same_pad_before(length, k: int, s: int):
    if s == 1:  # independent of the length
        return max(k - 1, 0) // 2
    out = -(-length // s)
    total = (out - 1) * s + k - length
    if is_int(total):
        return max(int(total), 0) // 2
    return tf.maximum(total, 0) // 2


def _conv_out_size(length, k: int, s: int, padding: str):
    if padding == "SAME":
        return -(-length // s)
    if is_int(length):
        return max((int(length) - k) // s + 1, 0)
    return tf.maximum((length - k) // s + 1, 0)


def _check_conv_operands(x, kernel, mask, conv: str):
    x, kernel = float_tensors(x=x, kernel=kernel)
    _check_rank(x, 4, "x", "[B, H, W, Cin]")
    _check_rank(kernel, 4, "kernel", "[kh, kw, Cin, Cout]")
    if None in kernel.shape[:2]:
        raise ValueError(f"{conv}: the kernel's spatial size must be known statically, got {kernel.shape}")
    if None not in (x.shape[-1], kernel.shape[2]) and x.shape[-1] != kernel.shape[2]:
        raise ValueError(f"{conv}: `kernel` has {kernel.shape[2]} input channels, `x` has {x.shape[-1]}")
    mask = _mask(mask)
    for axis, label in ((0, "batch"), (1, "height"), (2, "width")):
        a, b = x.shape[axis], mask.shape[axis]
        if a is not None and b is not None and a != b:
            raise ValueError(
                f"{conv}: `mask` {label} {b} must match `x` {label} {a} (mask {mask.shape}, x {x.shape})"
            )
    if not (x.shape[:3].is_fully_defined() and mask.shape.is_fully_defined()):
        same = tf.debugging.assert_equal(
            tf.shape(x)[:3], tf.shape(mask), message=f"{conv}: `mask` must be [B, H, W] of `x` [B, H, W, Cin]"
        )
        with tf.control_dependencies([same]):
            mask = tf.identity(mask)
    return x, kernel, mask


def block_sparse_conv2d(
    x, kernel, mask, block_size, strides=1, padding="SAME", threshold=0.0, avgpool=False, name=None
) -> tf.Tensor:
    """Convolution computed only inside the active blocks of `mask` (SBNet).

    Args:
      x: `[B, H, W, Cin]`.
      kernel: `[kh, kw, Cin, Cout]` (spatial size known statically).
      mask: `[B, H, W]` or `[B, H, W, 1]` at the input resolution.
      block_size: int or pair, a multiple of `strides`.
      strides: int or pair.
      padding: "SAME" or "VALID".
      threshold, avgpool: see `reduce_mask` (blocks of size and stride `block_size`).

    Returns:
      `[B, OH, OW, Cout]`: `tf.nn.conv2d(x, kernel, strides, padding)` at every
      output position inside an active output block (input block `(b, i, j)`
      maps to output rows `[i * bs_h / s_h, (i + 1) * bs_h / s_h)` and the
      matching columns), 0 elsewhere. The halo is read from `x`, never decided
      by the mask. Cost scales with the active blocks.
    """
    size, strides = _pair(block_size, "block_size"), _pair(strides, "strides")
    padding = _validation.padding(padding, upper=True)
    with tf.name_scope(name or "block_sparse_conv2d"):
        x, kernel, mask = _check_conv_operands(x, kernel, mask, "block_sparse_conv2d")
        plain = isinstance(threshold, numbers.Real) and isinstance(avgpool, bool)
        # (Not for an empty batch: inside a graph TF 2.21's CPU conv2d returns it with Cin channels.)
        if tf.executing_eagerly() and plain and x.shape[0] != 0:
            # An eager call runs its dozen small ops as one cached tf.function: per-op eager
            # dispatch would add milliseconds to a call that computes in tens of them.
            compiled = load_library() is not None
            fn = _eager_block_sparse_conv2d(size, strides, padding, float(threshold), avgpool, compiled)
            record(
                "block_sparse_conv2d",
                "compiled" if compiled else "reference",
                "eager call run as a cached tf.function (one per block size, strides, padding, "
                "threshold, avgpool)",
            )
            return fn(x, kernel, mask)
        indices = reduce_mask(mask, size, size, (0, 0), threshold, avgpool)
        return block_conv2d_on_indices(x, kernel, indices, size, strides, padding)


@functools.lru_cache(maxsize=64)
def _eager_block_sparse_conv2d(size, strides, padding, threshold, avgpool, compiled):
    """The traced body of eager `block_sparse_conv2d` calls with these static arguments
    (`compiled`: whether the op library ran when it was made; references_only() makes
    another). TensorFlow traces it once per input shape (static shapes keep the best graph)."""

    def body(x, kernel, mask):
        with contextlib.nullcontext() if compiled else references_only():
            indices = reduce_mask(mask, size, size, (0, 0), threshold, avgpool)
            return block_conv2d_on_indices(x, kernel, indices, size, strides, padding)

    return tf.function(body, autograph=False)


def block_conv2d_on_indices(
    x, kernel, indices, block_size, strides, padding, bias=None, activation=None
) -> tf.Tensor:
    """`block_sparse_conv2d` for given active blocks (`reduce_mask(mask, block_size, block_size)`).

    `bias` and `activation` (optional) are applied to the computed blocks only,
    so positions outside the active blocks stay exactly 0. With SAME padding,
    when every block of every image is active, the result is the dense
    convolution and runs as one `tf.nn.conv2d` (no gather/scatter).
    """
    BlockConvGeometry(tuple(int(v) for v in kernel.shape[:2]), block_size, strides, padding)  # validates
    if padding == "SAME":
        shape = tf.shape(x)
        total = shape[0] * grid_size(shape[1], block_size[0], block_size[0], 0)
        total *= grid_size(shape[2], block_size[1], block_size[1], 0)

        def dense():
            y = conv2d_batch_safe(x, kernel, strides, "SAME")
            y = y if bias is None else tf.nn.bias_add(y, bias)
            return y if activation is None else activation(y)

        def sparse():
            return _blocks_conv2d(x, kernel, indices, block_size, strides, padding, bias, activation)

        return tf.cond(tf.shape(indices)[0] == total, dense, sparse)
    return _blocks_conv2d(x, kernel, indices, block_size, strides, padding, bias, activation)


def _blocks_conv2d(x, kernel, indices, block_size, strides, padding, bias, activation):
    k = tuple(int(v) for v in kernel.shape[:2])
    geo = BlockConvGeometry(k, block_size, strides, padding)
    shape = tf.shape(x)
    batch = shape[0]
    dims = [
        x.shape[1] if x.shape[1] is not None else shape[1],
        x.shape[2] if x.shape[2] is not None else shape[2],
    ]
    offsets = []
    for axis in range(2):
        if padding == "VALID":
            offsets.append(0)
            continue
        pad = _same_pad_before(dims[axis], k[axis], strides[axis])
        if isinstance(pad, int):
            offsets.append(-pad)
        else:
            # Unknown length and stride > 1: the padding before the image is
            # only known at run time, and a gather offset is static; pad the
            # image explicitly and gather from offset 0.
            paddings = [[0, 0], [0, 0], [0, 0], [0, 0]]
            paddings[axis + 1] = [pad, 0]
            x = tf.pad(x, paddings)
            offsets.append(0)
    out_h = _conv_out_size(dims[0], k[0], strides[0], padding)
    out_w = _conv_out_size(dims[1], k[1], strides[1], padding)
    if padding == "VALID":
        # Blocks whose output block lies entirely past the (smaller) output.
        grid_h = grid_size(out_h, geo.out_block[0], geo.out_block[0], 0)
        grid_w = grid_size(out_w, geo.out_block[1], geo.out_block[1], 0)
        keep = (indices[:, 1] < grid_h) & (indices[:, 2] < grid_w)
        indices = tf.boolean_mask(indices, keep)
    blocks = sparse_gather(x, indices, geo.gather_size, block_size, offsets)
    y = conv2d_batch_safe(blocks, kernel, strides, "VALID")
    y = tf.reshape(y, [-1, geo.out_block[0], geo.out_block[1], tf.shape(kernel)[3]])  # static shape
    if bias is not None:
        y = tf.nn.bias_add(y, bias)
    if activation is not None:
        y = activation(y)
    shape = tf.stack([batch, out_h, out_w, tf.shape(kernel)[3]])
    return scatter_into_zeros(y, indices, shape, geo.out_block, (0, 0), add=False)


def scatter_into_zeros(blocks, indices, shape, block_stride, block_offset=(0, 0), add=False) -> tf.Tensor:
    """`sparse_scatter(blocks, indices, tf.zeros(shape), ...)` without materialising the zeros
    first (the output is written once)."""
    library = dispatch("sparse_scatter")
    shape = tf.cast(shape, tf.int32)
    if library is None:
        base = tf.zeros(shape, blocks.dtype)
        return sparse_scatter_reference(blocks, indices, base, block_stride, block_offset, add)
    return library.tf_sparse_conv_sparse_scatter_zeros(
        blocks,
        indices,
        shape,
        block_stride=list(block_stride),
        block_offset=list(block_offset),
        add=bool(add),
    )


# --- gradients ------------------------------------------------------------------------


def _attr_list(op, name):
    return [int(v) for v in op.get_attr(name)]


tf.no_gradient("TfSparseConv>ReduceMask")


@tf.RegisterGradient("TfSparseConv>SparseGather")
def _sparse_gather_grad(op, grad):
    # Adjoint of a gather: scatter-add into zeros (overlapping halos sum).
    x, indices = op.inputs
    dx = compiled_library().tf_sparse_conv_sparse_scatter_zeros(
        grad,
        indices,
        tf.shape(x, out_type=tf.int32),
        block_stride=_attr_list(op, "block_stride"),
        block_offset=_attr_list(op, "block_offset"),
        add=True,
    )
    return dx, None


@tf.RegisterGradient("TfSparseConv>SparseScatter")
def _sparse_scatter_grad(op, grad):
    blocks, indices, _ = op.inputs
    stride, offset = _attr_list(op, "block_stride"), _attr_list(op, "block_offset")
    size = blocks.shape[1:3]
    library = compiled_library()
    if None in size:  # the gather op needs a static block size: use the stock-op gather
        dblocks = _gather_reference(grad, indices, tf.unstack(tf.shape(blocks)[1:3]), stride, offset)
    else:
        dblocks = library.tf_sparse_conv_sparse_gather(
            grad, indices, block_size=[int(v) for v in size], block_stride=stride, block_offset=offset
        )
    if op.get_attr("add"):
        dbase = grad
    else:  # the overwritten region of base does not reach the output
        dbase = library.tf_sparse_conv_sparse_scatter(
            tf.zeros_like(blocks), indices, grad, block_stride=stride, block_offset=offset, add=False
        )
    return dblocks, None, dbase


@tf.RegisterGradient("TfSparseConv>SparseScatterZeros")
def _sparse_scatter_zeros_grad(op, grad):
    blocks, indices, _ = op.inputs
    stride, offset = _attr_list(op, "block_stride"), _attr_list(op, "block_offset")
    size = blocks.shape[1:3]
    if None in size:
        return _gather_reference(grad, indices, tf.unstack(tf.shape(blocks)[1:3]), stride, offset), None, None
    dblocks = compiled_library().tf_sparse_conv_sparse_gather(
        grad, indices, block_size=[int(v) for v in size], block_stride=stride, block_offset=offset
    )
    return dblocks, None, None


# --- pure-TensorFlow references -------------------------------------------------------


def _frame(t, axis: int, length, size: int, stride: int, offset: int, fill):
    """`t` cropped/padded with `fill` along `axis` to rows [offset, offset + (grid-1)*stride + size)."""
    grid = grid_size(length, size, stride, offset)
    end = offset + (grid - 1) * stride + size
    before = tf.maximum(-offset, 0)
    after = tf.maximum(end - length, 0)
    paddings = [[0, 0]] * t.shape.rank
    paddings[axis] = [before, after]
    t = tf.pad(t, paddings, constant_values=fill)
    begin = [0] * t.shape.rank
    begin[axis] = tf.maximum(offset, 0)
    sizes = [-1] * t.shape.rank
    sizes[axis] = end - offset
    return tf.slice(t, begin, sizes), grid


def _block_values(mask, size, stride, offset, avgpool):
    """Per-block max (or in-range sum / area): `[B, grid_h, grid_w]`, float32 or float64."""
    dtype = tf.float64 if mask.dtype == tf.float64 else tf.float32
    m = tf.cast(mask, dtype)[..., None]
    shape = tf.shape(m)
    fill = 0.0 if avgpool else -np.inf
    m, _ = _frame(m, 1, shape[1], size[0], stride[0], offset[0], fill)
    m, _ = _frame(m, 2, shape[2], size[1], stride[1], offset[1], fill)
    pool = tf.nn.avg_pool2d if avgpool else tf.nn.max_pool2d
    # avg_pool2d with VALID divides every window by the full block area.
    return pool(m, list(size), list(stride), "VALID")[..., 0]


def reduce_mask_reference(
    mask, block_size, block_stride, block_offset=(0, 0), threshold=0.0, avgpool=False
) -> tf.Tensor:
    """Pure-TF `reduce_mask` (pooling + `tf.where`)."""
    size, stride = _pair(block_size, "block_size"), _pair(block_stride, "block_stride")
    offset = _pair(block_offset, "block_offset", minimum=None)
    mask = _mask(mask)
    values = _block_values(mask, size, stride, offset, avgpool)
    return tf.cast(tf.where(values > tf.cast(threshold, values.dtype)), tf.int32)


def _block_coordinates(indices, x_shape, size, stride, offset):
    """Image coordinates `[n, size_h, size_w]` (rows, cols) of every block element, and the
    in-range mask."""
    rows = offset[0] + indices[:, 1:2] * stride[0] + tf.range(size[0])[None, :]  # [n, sh]
    cols = offset[1] + indices[:, 2:3] * stride[1] + tf.range(size[1])[None, :]  # [n, sw]
    rows = tf.broadcast_to(rows[:, :, None], [tf.shape(indices)[0], size[0], size[1]])
    cols = tf.broadcast_to(cols[:, None, :], [tf.shape(indices)[0], size[0], size[1]])
    b = tf.broadcast_to(indices[:, 0][:, None, None], tf.shape(rows))
    inside = (rows >= 0) & (rows < x_shape[1]) & (cols >= 0) & (cols < x_shape[2])
    return tf.stack([b, rows, cols], -1), inside


def sparse_gather_reference(x, indices, block_size, block_stride, block_offset=(0, 0)) -> tf.Tensor:
    """Pure-TF `sparse_gather` (`tf.gather_nd` of every block element)."""
    size, stride = _pair(block_size, "block_size"), _pair(block_stride, "block_stride")
    offset = _pair(block_offset, "block_offset", minimum=None)
    x = float_tensor(x, "x")
    _check_rank(x, 4, "x", "[B, H, W, C]")
    indices = _indices(indices)
    with tf.control_dependencies([_assert_indices(indices, tf.shape(x), size, stride, offset)]):
        return _gather_reference(x, indices, size, stride, offset)


def _gather_reference(x, indices, size, stride, offset):
    """`sparse_gather_reference` for checked arguments; `size` may hold scalar tensors."""
    coords, inside = _block_coordinates(indices, tf.shape(x), size, stride, offset)
    safe = tf.where(inside[..., None], coords, tf.zeros_like(coords))
    values = tf.gather_nd(x, safe)
    return values * tf.cast(inside, x.dtype)[..., None]


def sparse_scatter_reference(
    blocks, indices, base, block_stride, block_offset=(0, 0), add=False
) -> tf.Tensor:
    """Pure-TF `sparse_scatter` (`tf.tensor_scatter_nd_add` / `_update` of the in-image elements)."""
    stride = _pair(block_stride, "block_stride")
    offset = _pair(block_offset, "block_offset", minimum=None)
    blocks, indices, base = _check_scatter_operands(blocks, indices, base)
    size = [blocks.shape[i] if blocks.shape[i] is not None else tf.shape(blocks)[i] for i in (1, 2)]
    shape = tf.shape(base)
    checks = [
        _assert_indices(indices, shape, size, stride, offset),
        tf.debugging.assert_equal(
            tf.shape(blocks)[0], tf.shape(indices)[0], message="`blocks` and `indices` must have as many rows"
        ),
    ]
    with tf.control_dependencies(checks):
        indices, blocks = tf.identity(indices), tf.identity(blocks)
    coords, inside = _block_coordinates(indices, shape, size, stride, offset)
    coords = tf.boolean_mask(coords, inside)
    values = tf.boolean_mask(blocks, inside)
    if not add:
        # add=False: no element may be written twice (in-image overlaps).
        counts = tf.tensor_scatter_nd_add(
            tf.zeros(shape[:3], tf.int32), coords, tf.ones(tf.shape(coords)[:1], tf.int32)
        )
        overlap = tf.debugging.assert_less_equal(
            tf.reduce_max(tf.concat([tf.reshape(counts, [-1]), [0]], 0)),
            1,
            message="blocks overlap: with add=False blocks must not overlap (block_stride < block size, "
            "or a repeated index); use add=True to sum them",
        )
        with tf.control_dependencies([overlap]):
            values = tf.identity(values)
    if add:
        return tf.tensor_scatter_nd_add(base, coords, values)
    return tf.tensor_scatter_nd_update(base, coords, values)


def block_sparse_conv2d_reference(
    x, kernel, mask, block_size, strides=1, padding="SAME", threshold=0.0, avgpool=False
) -> tf.Tensor:
    """Pure-TF `block_sparse_conv2d`: the dense convolution times the upsampled block mask."""
    size, strides = _pair(block_size, "block_size"), _pair(strides, "strides")
    padding = _validation.padding(padding, upper=True)
    x, kernel, mask = _check_conv_operands(x, kernel, mask, "block_sparse_conv2d")
    geo = BlockConvGeometry(tuple(int(v) for v in kernel.shape[:2]), size, strides, padding)
    active = _block_values(mask, size, size, (0, 0), avgpool) > tf.cast(
        threshold, tf.float64 if mask.dtype == tf.float64 else tf.float32
    )
    y = tf.nn.conv2d(x, kernel, list(strides), padding)
    shape = tf.shape(x)
    out_h = _conv_out_size(shape[1], geo.kernel_size[0], strides[0], padding)
    out_w = _conv_out_size(shape[2], geo.kernel_size[1], strides[1], padding)
    y = tf.reshape(y, [shape[0], out_h, out_w, tf.shape(kernel)[3]])
    up = tf.repeat(tf.repeat(active, geo.out_block[0], axis=1), geo.out_block[1], axis=2)
    up = tf.pad(
        up, [[0, 0], [0, tf.maximum(out_h - tf.shape(up)[1], 0)], [0, tf.maximum(out_w - tf.shape(up)[2], 0)]]
    )
    up = up[:, :out_h, :out_w]
    return y * tf.cast(up, y.dtype)[..., None]
