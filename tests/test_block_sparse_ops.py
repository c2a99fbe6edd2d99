"""Block-sparse (SBNet-style) ops: reduce_mask, sparse_gather, sparse_scatter, block_sparse_conv2d.

Every op is checked against an independent NumPy oracle written here from API.md section 3 and
the geometry in cc/kernels/block_sparse_common.h (block i covers [offset + i*stride, offset +
i*stride + size); out-of-range parts read as 0 and are not written; a block with no in-range part
has max -inf and average 0; overlapping adds are summed in index order), and against its pure-TF
reference.
"""

import numpy as np
import pytest
import tensorflow as tf
from helpers import run_python
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tf_sparseconv as tsc

BAD_INPUT = (tf.errors.InvalidArgumentError, ValueError)


# --- an independent NumPy oracle ---------------------------------------------------


def pair(value):
    return (int(value), int(value)) if np.isscalar(value) else tuple(int(v) for v in value)


def grid_len(length, size, stride, offset):
    """Blocks along one axis: max(1, ceil((L - offset - size) / stride) + 1)."""
    return max(1, -(-(length - offset - size) // stride) + 1)


def block_span(start, size, length):
    """The in-range part [lo, hi) of [start, start + size) and its slice inside the block."""
    lo, hi = min(max(start, 0), length), min(max(start + size, 0), length)
    return slice(lo, hi), slice(lo - start, hi - start)


def all_blocks(batch, grid):
    return np.array(
        [(b, i, j) for b in range(batch) for i in range(grid[0]) for j in range(grid[1])], np.int32
    ).reshape(-1, 3)


def np_block_values(mask, size, stride, offset, avgpool):
    """[B, grid_h, grid_w] max (or sum / full area) of each block's in-range part, in float64."""
    m = np.asarray(mask, np.float64)
    if m.ndim == 4:
        m = m[..., 0]
    batch, h, w = m.shape
    (sh, sw), (th, tw), (oh, ow) = pair(size), pair(stride), pair(offset)
    gh, gw = grid_len(h, sh, th, oh), grid_len(w, sw, tw, ow)
    values = np.empty((batch, gh, gw))
    for b in range(batch):
        for i in range(gh):
            rows, _ = block_span(oh + i * th, sh, h)
            for j in range(gw):
                cols, _ = block_span(ow + j * tw, sw, w)
                part = m[b, rows, cols]
                if avgpool:
                    values[b, i, j] = part.sum() / (sh * sw)
                else:
                    values[b, i, j] = part.max() if part.size else -np.inf
    return values


def np_reduce_mask(mask, size, stride, offset=(0, 0), threshold=0.0, avgpool=False, margin=1e-6):
    values = np_block_values(mask, size, stride, offset, avgpool)
    finite = values[np.isfinite(values)]
    # Test inputs keep every block value clear of the threshold by more than a rounding error.
    # Exact ties are fine where no rounding happens (a max, or an average of zeros at 0).
    if margin:
        close = np.abs(finite - threshold) <= margin
        exact = (finite == threshold) & (not avgpool or threshold == 0)
        assert not (close & ~exact).any(), "bad test input: a block value sits on the threshold"
    return np.argwhere(values > threshold).astype(np.int32).reshape(-1, 3)


def np_gather(x, indices, size, stride, offset=(0, 0)):
    x = np.asarray(x)
    _, h, w, c = x.shape
    (sh, sw), (th, tw), (oh, ow) = pair(size), pair(stride), pair(offset)
    out = np.zeros((len(indices), sh, sw, c), x.dtype)
    for n, (b, i, j) in enumerate(np.asarray(indices).reshape(-1, 3)):
        rows, brows = block_span(oh + i * th, sh, h)
        cols, bcols = block_span(ow + j * tw, sw, w)
        out[n, brows, bcols] = x[b, rows, cols]
    return out


def np_scatter(blocks, indices, base, stride, offset=(0, 0), add=False):
    """base with the blocks written / added in index order (in base's dtype: a float32 base gives
    the float32 sum in index order, element by element)."""
    blocks, out = np.asarray(blocks), np.array(base, copy=True)
    _, h, w, _ = out.shape
    sh, sw = blocks.shape[1:3]
    (th, tw), (oh, ow) = pair(stride), pair(offset)
    for n, (b, i, j) in enumerate(np.asarray(indices).reshape(-1, 3)):
        rows, brows = block_span(oh + i * th, sh, h)
        cols, bcols = block_span(ow + j * tw, sw, w)
        if add:
            out[b, rows, cols] += blocks[n, brows, bcols]
        else:
            out[b, rows, cols] = blocks[n, brows, bcols]
    return out


def np_written(indices, base_shape, size, stride, offset=(0, 0)):
    """Boolean [B, H, W]: the positions some block writes to."""
    written = np.zeros(base_shape[:3], bool)
    (sh, sw), (th, tw), (oh, ow) = pair(size), pair(stride), pair(offset)
    for b, i, j in np.asarray(indices).reshape(-1, 3):
        rows, _ = block_span(oh + i * th, sh, base_shape[1])
        cols, _ = block_span(ow + j * tw, sw, base_shape[2])
        written[b, rows, cols] = True
    return written


def conv_geometry(length, k, s, padding):
    if padding == "SAME":
        out = -(-length // s)
        return out, max((out - 1) * s + k - length, 0) // 2
    return max((length - k) // s + 1, 0), 0


def np_conv2d(x, kernel, strides, padding):
    """Dense conv2d (TF's SAME / VALID padding) in float64, by kernel taps."""
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    b, h, w, _ = x.shape
    kh, kw, _, cout = kernel.shape
    sh, sw = pair(strides)
    out_h, top = conv_geometry(h, kh, sh, padding)
    out_w, left = conv_geometry(w, kw, sw, padding)
    padded = np.zeros((b, max(h, (out_h - 1) * sh + kh), max(w, (out_w - 1) * sw + kw), x.shape[3]))
    padded[:, top : top + h, left : left + w] = x
    y = np.zeros((b, out_h, out_w, cout))
    for i in range(kh):
        for j in range(kw):
            taps = padded[:, i : i + (out_h - 1) * sh + 1 : sh, j : j + (out_w - 1) * sw + 1 : sw]
            y += taps @ kernel[i, j]
    return y


def np_block_sparse_conv2d(x, kernel, mask, block_size, strides, padding, threshold=0.0, avgpool=False):
    """(expected output, boolean [B, out_h, out_w] of the active output positions)."""
    dense = np_conv2d(x, kernel, strides, padding)
    (bh, bw), (sh, sw) = pair(block_size), pair(strides)
    active = np.zeros(dense.shape[:3], bool)
    for b, i, j in np_reduce_mask(mask, block_size, block_size, (0, 0), threshold, avgpool):
        active[b, i * bh // sh : (i + 1) * bh // sh, j * bw // sw : (j + 1) * bw // sw] = True
    return dense * active[..., None], active


# --- helpers -----------------------------------------------------------------------


def to_np(t):
    return np.asarray(tf.cast(t, tf.float64) if t.dtype == tf.bfloat16 else t)


def assert_bitwise_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    assert a.tobytes() == b.tobytes()


def assert_exactly_equal(a, b):
    """Same shape, dtype and values (0.0 == -0.0): for copies, where no rounding happens."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)


def assert_rejects(fn, pattern):
    """Bad input: InvalidArgumentError or ValueError whose message matches `pattern`."""
    with pytest.raises(BAD_INPUT, match=pattern):
        out = fn()
        _ = [np.asarray(t) for t in tf.nest.flatten(out)]  # force any lazy evaluation


def dyadic_mask(rng, shape, density=0.3):
    """Mask values k/16 (exact in every float dtype), zero outside a random `density` fraction."""
    values = rng.integers(1, 17, size=shape) / 16.0
    return (values * (rng.random(shape) < density)).astype(np.float32)


def random_indices(rng, batch, grid, fraction=0.5, shuffle=False):
    rows = all_blocks(batch, grid)
    keep = rng.random(len(rows)) < fraction
    if not keep.any():
        keep[rng.integers(len(rows))] = True
    rows = rows[keep]
    return rng.permutation(rows) if shuffle else rows


def both(name):
    """The compiled op and its pure-TF reference, as pytest params."""
    return [
        pytest.param(name, id="op"),
        pytest.param(name + "_reference", id="reference"),
    ]


def op(name):
    return getattr(tsc.ops, name)


# --- reduce_mask -------------------------------------------------------------------


def test_oracle_grid_by_hand():
    # Hand-computed counts, so the oracle's formula is itself checked.
    assert grid_len(10, 3, 2, -1) == 5  # starts -1, 1, 3, 5, 7
    assert grid_len(10, 3, 3, 0) == 4  # starts 0, 3, 6, 9 (last block is clipped)
    assert grid_len(9, 3, 3, 0) == 3
    assert grid_len(2, 4, 1, 0) == 1  # image smaller than a block
    assert grid_len(10, 3, 2, 12) == 1  # offset past the image
    assert grid_len(4, 2, 3, -5) == 4  # starts -5, -2, 1, 4: the first and last are fully outside
    assert grid_len(7, 2, 1, 1) == 5


GRID_CASES = [
    # (H, W, size, stride, offset)
    (10, 10, (3, 3), (2, 3), (-1, 0)),
    (9, 7, (3, 2), (3, 2), (0, 0)),
    (2, 3, (4, 5), (1, 2), (0, 0)),
    (10, 6, (3, 3), (2, 2), (12, 7)),
    (4, 4, (2, 2), (3, 3), (-5, -5)),
    (7, 11, (2, 4), (1, 5), (1, -2)),
]


@pytest.mark.parametrize("name", both("reduce_mask"))
@pytest.mark.parametrize("case", GRID_CASES, ids=[str(i) for i in range(len(GRID_CASES))])
def test_reduce_mask_grid(name, case):
    h, w, size, stride, offset = case
    grid = (grid_len(h, size[0], stride[0], offset[0]), grid_len(w, size[1], stride[1], offset[1]))
    # avgpool with a negative threshold: every block is active (a block with no in-range part
    # averages 0 > -1), so the result lists the whole grid.
    got = op(name)(tf.zeros((2, h, w)), size, stride, offset, threshold=-1.0, avgpool=True)
    assert got.dtype == tf.int32
    np.testing.assert_array_equal(got, all_blocks(2, grid))
    # max with a negative threshold: only blocks with an in-range part (max -inf otherwise).
    got = op(name)(tf.zeros((2, h, w)), size, stride, offset, threshold=-1.0)
    expected = np_reduce_mask(np.zeros((2, h, w)), size, stride, offset, -1.0, margin=0)
    np.testing.assert_array_equal(got, expected)


REDUCE_CASES = [
    # (B, H, W, size, stride, offset, threshold, avgpool)
    (2, 10, 13, 3, 3, 0, 0.0, False),
    (2, 10, 13, 3, 3, 0, 0.55, False),
    (1, 10, 13, (3, 4), (2, 3), 0, 0.3, False),  # stride < size: overlapping blocks
    (2, 9, 9, 4, 5, (-1, -2), 0.0, False),  # negative offsets, gaps between blocks
    (1, 8, 9, 3, 2, (-5, 1), 0.07, True),
    (1, 8, 9, 3, 2, (-5, 1), -0.01, True),  # fully-outside blocks average 0 > -0.01
    (1, 8, 9, 3, 2, (-5, 1), -0.01, False),  # ... but their max is -inf
    (3, 7, 6, 2, 1, 1, 0.2, True),
    (2, 5, 4, 8, 8, 0, 0.0, False),  # image smaller than a block: one block
    (1, 5, 6, 3, 3, (6, 0), 0.0, False),  # offset past the image
    (2, 12, 11, (4, 3), (4, 3), 0, 0.011, True),
]


@pytest.mark.parametrize("name", both("reduce_mask"))
@pytest.mark.parametrize("case", REDUCE_CASES, ids=[str(i) for i in range(len(REDUCE_CASES))])
def test_reduce_mask_matches_oracle(rng, name, case):
    b, h, w, size, stride, offset, threshold, avgpool = case
    mask = dyadic_mask(rng, (b, h, w), density=0.15)
    expected = np_reduce_mask(mask, size, stride, offset, threshold, avgpool)
    for m in (mask, mask[..., None]):  # [B, H, W] and [B, H, W, 1]
        got = op(name)(
            tf.constant(m), size, stride, block_offset=offset, threshold=threshold, avgpool=avgpool
        )
        assert got.dtype == tf.int32 and got.shape.rank == 2 and got.shape[1] == 3
        np.testing.assert_array_equal(got, expected)  # sorted by (b, bh, bw)


@pytest.mark.parametrize("name", both("reduce_mask"))
def test_reduce_mask_threshold_is_strict_and_avg_uses_full_area(name):
    mask = np.zeros((1, 5, 5), np.float32)
    mask[0, 1, 1] = 0.5
    mask[0, 4, 4] = 1.0  # the only in-range pixel of the clipped block (1, 1)
    got = op(name)(mask, 4, 4, threshold=0.5)  # strict: 0.5 is not > 0.5
    np.testing.assert_array_equal(got, [[0, 1, 1]])
    got = op(name)(mask, 4, 4, threshold=0.25)
    np.testing.assert_array_equal(got, [[0, 0, 0], [0, 1, 1]])
    # avgpool divides by the full block area (16), not by the in-range area: 1/16 = 0.0625.
    got = op(name)(mask, 4, 4, threshold=0.05, avgpool=True)
    np.testing.assert_array_equal(got, [[0, 1, 1]])
    got = op(name)(mask, 4, 4, threshold=0.1, avgpool=True)
    np.testing.assert_array_equal(np.asarray(got).reshape(-1, 3), np.zeros((0, 3)))
    # Negative mask values: a block's max can be negative.
    neg = -np.ones((1, 4, 4), np.float32)
    neg[0, 0, 0] = -0.25
    np.testing.assert_array_equal(op(name)(neg, 2, 2, threshold=-0.5), [[0, 0, 0]])


@pytest.mark.parametrize("name", both("reduce_mask"))
def test_reduce_mask_empty(name):
    for mask, kwargs in [
        (np.zeros((2, 6, 7), np.float32), {}),  # nothing above threshold
        (np.zeros((0, 6, 7), np.float32), {}),  # batch 0
        (np.zeros((0, 6, 7, 1), np.float32), {"avgpool": True, "threshold": -1.0}),
        (np.ones((1, 6, 7), np.float32), {"threshold": 1.0}),
    ]:
        got = op(name)(mask, 3, 3, **kwargs)
        assert got.dtype == tf.int32
        assert tuple(got.shape) == (0, 3)


# --- sparse_gather -----------------------------------------------------------------

GATHER_CASES = [
    # (B, H, W, C, size, stride, offset)
    (2, 9, 10, 3, 3, 3, 0),
    (1, 10, 13, 2, (3, 4), (2, 3), 0),  # overlapping
    (2, 9, 9, 4, (4, 3), (5, 2), (-1, -2)),  # negative offsets, stride > size along h
    (1, 8, 9, 2, 3, 2, (-5, 1)),  # blocks fully outside the image
    (2, 5, 4, 3, 8, 8, 0),  # image smaller than a block
    (1, 6, 7, 1, 1, 1, 0),  # 1x1 blocks
    (1, 7, 6, 2, (2, 6), (2, 6), (3, -2)),
]


@pytest.mark.parametrize("name", both("sparse_gather"))
@pytest.mark.parametrize("case", GATHER_CASES, ids=[str(i) for i in range(len(GATHER_CASES))])
def test_sparse_gather_matches_oracle(rng, name, case):
    b, h, w, c, size, stride, offset = case
    (sh, sw), (th, tw), (oh, ow) = pair(size), pair(stride), pair(offset)
    grid = (grid_len(h, sh, th, oh), grid_len(w, sw, tw, ow))
    x = rng.standard_normal((b, h, w, c)).astype(np.float32)
    for some in (all_blocks(b, grid), random_indices(rng, b, grid, shuffle=True)):
        indices = np.concatenate([some, some[:1]])  # a repeated block too
        got = op(name)(tf.constant(x), tf.constant(indices), size, stride, block_offset=offset)
        assert got.dtype == tf.float32 and tuple(got.shape) == (len(indices), sh, sw, c)
        assert_exactly_equal(got, np_gather(x, indices, size, stride, offset))


@pytest.mark.parametrize("name", both("sparse_gather"))
def test_sparse_gather_empty(rng, name):
    x = rng.standard_normal((2, 6, 7, 3)).astype(np.float32)
    got = op(name)(x, np.zeros((0, 3), np.int32), (2, 4), 2)
    assert tuple(got.shape) == (0, 2, 4, 3) and got.dtype == tf.float32
    got = op(name)(np.zeros((0, 6, 7, 3), np.float32), np.zeros((0, 3), np.int32), 3, 3)
    assert tuple(got.shape) == (0, 3, 3, 3)


# --- sparse_scatter ----------------------------------------------------------------

SCATTER_CASES = [
    # (B, H, W, C, size, stride, offset, add)
    (2, 9, 10, 3, 3, 3, 0, False),
    (2, 9, 10, 3, 3, 3, 0, True),
    (1, 10, 13, 2, (3, 4), (2, 3), 0, True),  # overlapping adds
    (1, 8, 9, 2, 3, 1, (-2, -1), True),  # heavily overlapping adds, negative offsets
    (2, 9, 9, 4, (4, 3), (5, 4), (-1, -2), False),  # gaps, clipped blocks
    (1, 8, 9, 2, 3, 4, (-5, 1), False),  # blocks fully outside the image
    (2, 5, 4, 3, 8, 8, 0, False),  # image smaller than a block
    (2, 5, 4, 3, 8, 8, 0, True),
    (1, 7, 6, 2, (2, 6), (2, 6), (3, -2), True),
]


@pytest.mark.parametrize("name", both("sparse_scatter"))
@pytest.mark.parametrize("case", SCATTER_CASES, ids=[str(i) for i in range(len(SCATTER_CASES))])
def test_sparse_scatter_matches_oracle(rng, name, case):
    b, h, w, c, size, stride, offset, add = case
    (sh, sw), (th, tw), (oh, ow) = pair(size), pair(stride), pair(offset)
    grid = (grid_len(h, sh, th, oh), grid_len(w, sw, tw, ow))
    base = rng.standard_normal((b, h, w, c)).astype(np.float32)
    base_before = base.copy()
    for indices in (all_blocks(b, grid), random_indices(rng, b, grid, shuffle=True)):
        blocks = rng.standard_normal((len(indices), sh, sw, c)).astype(np.float32)
        got = op(name)(
            tf.constant(blocks), tf.constant(indices), tf.constant(base), stride, block_offset=offset, add=add
        )
        expected = np_scatter(blocks, indices, base, stride, offset, add)
        assert got.dtype == tf.float32 and tuple(got.shape) == base.shape
        if add:
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
        else:
            assert_exactly_equal(got, expected)
        assert_bitwise_equal(base, base_before)  # a copy: base itself is untouched


@pytest.mark.parametrize("case", SCATTER_CASES, ids=[str(i) for i in range(len(SCATTER_CASES))])
def test_scatter_into_zeros_matches_oracle(rng, case):
    # block_sparse_conv2d's scatter: the zero base is never materialised (SparseScatterZeros;
    # with add=False one pass over the output rows zeroes what no block covers and copies the
    # blocks' rows in). Blocks of random data, in random order; some clipped, some outside.
    from tf_sparseconv.python.ops.block_sparse_ops import scatter_into_zeros

    b, h, w, c, size, stride, offset, add = case
    (sh, sw), (th, tw), (oh, ow) = pair(size), pair(stride), pair(offset)
    grid = (grid_len(h, sh, th, oh), grid_len(w, sw, tw, ow))
    zeros = np.zeros((b, h, w, c), np.float32)
    picks = [all_blocks(b, grid), random_indices(rng, b, grid, shuffle=True), np.zeros((0, 3), np.int32)]
    for indices in picks:
        blocks = rng.standard_normal((len(indices), sh, sw, c)).astype(np.float32)
        got = scatter_into_zeros(blocks, indices, [b, h, w, c], (th, tw), (oh, ow), add=add)
        expected = np_scatter(blocks, indices, zeros, stride, offset, add)
        assert got.dtype == tf.float32 and tuple(got.shape) == zeros.shape
        if add:
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
        else:
            assert_exactly_equal(got, expected)


def test_scatter_into_zeros_small_stride_disjoint_blocks(rng):
    from tf_sparseconv.python.ops.block_sparse_ops import scatter_into_zeros

    indices = np.array([[0, 3, 0], [0, 0, 0], [0, 6, 4], [1, 2, 5]], np.int32)
    blocks = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    got = scatter_into_zeros(blocks, indices, [2, 9, 9, 2], (1, 1))
    assert_exactly_equal(got, np_scatter(blocks, indices, np.zeros((2, 9, 9, 2), np.float32), 1))


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "tf.function"])
def test_scatter_into_zeros_kept_output(rng, traced):
    # A large zero-based scatter keeps its output and hands it out again once nobody holds it
    # (block_sparse_op.cc, KeptZeroOutput): the previous call's blocks are zeroed, this call's
    # written. Consecutive calls with other blocks (some shared, none, then all), another shape,
    # and an output still held by the caller (it must never change) all match the oracle.
    from tf_sparseconv.python.ops.block_sparse_ops import scatter_into_zeros

    shape = [2, 256, 256, 32]  # 16 MiB: above the 8 MiB from which the output is kept
    grid = (256 // 16, 256 // 16)

    def scatter(blocks, indices, out_shape):
        return scatter_into_zeros(blocks, indices, out_shape, (16, 16))

    if traced:
        scatter = tf.function(scatter)
    every = all_blocks(2, grid)
    picks = [every[rng.permutation(len(every))[:40]] for _ in range(3)]
    picks += [picks[0], np.zeros((0, 3), np.int32), every, picks[1]]
    held = []
    for i, pick in enumerate(picks):
        indices = np.ascontiguousarray(pick, np.int32)
        blocks = rng.standard_normal((len(indices), 16, 16, 32)).astype(np.float32)
        got = scatter(tf.constant(blocks), tf.constant(indices), tf.constant(shape))
        expected = np_scatter(blocks, indices, np.zeros(shape, np.float32), 16, 0)
        assert_exactly_equal(got, expected)
        if i % 2 == 0:
            held.append((got, expected))  # still referenced: the next calls must not touch it
        del got  # (the others are released before the next call, so their buffer is kept)
    for got, expected in held:
        assert_exactly_equal(got, expected)
    other = [1, 128, 512, 32]  # another shape of the same size: a fresh output
    indices = np.array([[0, 3, 7], [0, 0, 31]], np.int32)
    blocks = rng.standard_normal((2, 16, 16, 32)).astype(np.float32)
    got = scatter(tf.constant(blocks), tf.constant(indices), tf.constant(other))
    assert_exactly_equal(got, np_scatter(blocks, indices, np.zeros(other, np.float32), 16, 0))


@pytest.mark.parametrize("name", both("sparse_scatter"))
def test_sparse_scatter_add_heavy_overlap(rng, name):
    # Every pixel is covered by up to 32 blocks (each index twice, unsorted) of very different
    # magnitudes. The sum order is the op's (block_sparse_common.h: a fixed order); the result
    # must match the exact sum to float32 accuracy and be bitwise reproducible.
    base = (rng.standard_normal((1, 9, 9, 2)) * 1e3).astype(np.float32)
    grid = (grid_len(9, 4, 1, -1), grid_len(9, 4, 1, -1))
    indices = rng.permutation(np.concatenate([all_blocks(1, grid)] * 2))
    scales = 10.0 ** rng.integers(-4, 4, size=(len(indices), 1, 1, 1))
    blocks = (rng.standard_normal((len(indices), 4, 4, 2)) * scales).astype(np.float32)
    got = op(name)(blocks, indices, base, 1, block_offset=-1, add=True)
    exact = np_scatter(blocks.astype(np.float64), indices, base.astype(np.float64), 1, -1, add=True)
    magnitude = np_scatter(
        np.abs(blocks.astype(np.float64)), indices, np.abs(base.astype(np.float64)), 1, -1, True
    )
    assert np.all(np.abs(np.asarray(got, np.float64) - exact) <= 64 * np.finfo(np.float32).eps * magnitude)
    assert_bitwise_equal(got, op(name)(blocks, indices, base, 1, block_offset=-1, add=True))


@pytest.mark.parametrize("name", both("sparse_scatter"))
def test_sparse_scatter_write_with_small_stride_but_disjoint_blocks(rng, name):
    # API.md: with add=False "overlapping blocks are an error unless block_stride >= block_size".
    # Read (as implemented) as: blocks that actually overlap are an error (see test_bad_input);
    # stride < size with disjoint (here: touching) blocks is a valid write.
    base = rng.standard_normal((1, 9, 9, 2)).astype(np.float32)
    indices = np.array([[0, 3, 0], [0, 0, 0], [0, 6, 4]], np.int32)
    blocks = rng.standard_normal((3, 3, 3, 2)).astype(np.float32)
    got = op(name)(blocks, indices, base, 1, add=False)
    assert_exactly_equal(got, np_scatter(blocks, indices, base, 1))


@pytest.mark.parametrize("name", both("sparse_scatter"))
def test_sparse_scatter_empty(rng, name):
    base = rng.standard_normal((2, 6, 7, 3)).astype(np.float32)
    for add in (False, True):
        got = op(name)(np.zeros((0, 2, 4, 3), np.float32), np.zeros((0, 3), np.int32), base, 2, add=add)
        assert_exactly_equal(got, base)
        got = op(name)(
            np.zeros((0, 3, 3, 3), np.float32),
            np.zeros((0, 3), np.int32),
            np.zeros((0, 6, 7, 3), np.float32),
            3,
            add=add,
        )
        assert tuple(got.shape) == (0, 6, 7, 3)


# --- gradients (float64, numeric) --------------------------------------------------


@pytest.mark.parametrize("name", both("sparse_gather"))
def test_sparse_gather_gradient(rng, name):
    x = rng.standard_normal((2, 5, 6, 1))
    size, stride, offset = (3, 2), (2, 2), (-1, 0)
    grid = (grid_len(5, 3, 2, -1), grid_len(6, 2, 2, 0))
    indices = random_indices(rng, 2, grid, fraction=0.6, shuffle=True)
    indices = np.concatenate([indices, indices[:2]])  # repeated blocks: their gradients add up
    if not name.endswith("_reference"):  # (slow for the multi-op reference; its tape check follows)
        theoretical, numerical = tf.test.compute_gradient(
            lambda t: op(name)(t, indices, size, stride, block_offset=offset), [tf.constant(x)]
        )
        np.testing.assert_allclose(theoretical[0], numerical[0], rtol=1e-7, atol=1e-7)
    # The analytic gradient is the scatter-add of the upstream gradient.
    xt = tf.constant(x)
    dy = rng.standard_normal((len(indices), 3, 2, 1))
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = op(name)(xt, indices, size, stride, block_offset=offset)
    gx = tape.gradient(y, xt, output_gradients=dy)
    np.testing.assert_allclose(gx, np_scatter(dy, indices, np.zeros_like(x), stride, offset, add=True))


@pytest.mark.parametrize("name", both("sparse_scatter"))
@pytest.mark.parametrize(
    "add, size, stride, offset",
    [
        (True, 3, 2, (-1, 0)),
        (True, (2, 3), 1, (0, -2)),
        (False, 3, 3, (-1, 0)),
        (False, (2, 3), (3, 4), (1, -1)),
    ],
    ids=["add-overlap", "add-stride1", "write", "write-gaps"],
)
def test_sparse_scatter_gradient(rng, name, add, size, stride, offset):
    b, h, w, c = 2, 5, 6, 1
    (sh, sw), (th, tw), (oh, ow) = pair(size), pair(stride), pair(offset)
    grid = (grid_len(h, sh, th, oh), grid_len(w, sw, tw, ow))
    indices = random_indices(rng, b, grid, fraction=0.6, shuffle=True)
    blocks = rng.standard_normal((len(indices), sh, sw, c))
    base = rng.standard_normal((b, h, w, c))
    fn = lambda bl, ba: op(name)(bl, indices, ba, stride, block_offset=offset, add=add)  # noqa: E731
    if not name.endswith("_reference"):  # (slow for the multi-op reference; its tape check follows)
        theoretical, numerical = tf.test.compute_gradient(fn, [tf.constant(blocks), tf.constant(base)])
        for t, n in zip(theoretical, numerical):
            np.testing.assert_allclose(t, n, rtol=1e-7, atol=1e-7)
    # Explicitly: d blocks = gather(dy) (zeros outside the image); d base = dy, with 0 on the
    # overwritten region when add=False.
    dy = rng.standard_normal(base.shape)
    bl, ba = tf.constant(blocks), tf.constant(base)
    with tf.GradientTape() as tape:
        tape.watch([bl, ba])
        y = fn(bl, ba)
    g_blocks, g_base = tape.gradient(y, [bl, ba], output_gradients=dy)
    np.testing.assert_allclose(g_blocks, np_gather(dy, indices, size, stride, offset))
    written = np_written(indices, base.shape, size, stride, offset)
    expected_base = dy if add else np.where(written[..., None], 0.0, dy)
    np.testing.assert_allclose(g_base, expected_base)
    if not add:
        assert written.any() and (~written).any()


# --- block_sparse_conv2d -----------------------------------------------------------

CONV_CASES = {
    # id: (B, H, W, Cin, Cout, kh, kw, strides, padding, block_size, mask kind, threshold, avgpool)
    "same-3x3-bs4": (2, 13, 11, 3, 4, 3, 3, 1, "SAME", 4, "random", 0.0, False),
    "same-3x3-s2": (1, 12, 12, 2, 3, 3, 3, 2, "SAME", 4, "random", 0.0, False),
    "valid-5x5-bs3x4": (2, 10, 9, 3, 2, 5, 5, 1, "VALID", (3, 4), "random", 0.4, False),
    "same-1x1-bs5": (1, 9, 14, 2, 3, 1, 1, 1, "SAME", 5, "random", 0.0, False),
    "same-2x2-even": (1, 11, 10, 3, 2, 2, 2, 1, "SAME", 4, "random", 0.0, False),
    "same-4x4-even-s2": (2, 12, 13, 2, 3, 4, 4, 2, "SAME", 6, "random", 0.01, True),
    "valid-3x3-s2": (1, 9, 10, 2, 2, 3, 3, 2, "VALID", (4, 6), "random", 0.0, False),
    "valid-4x4-s2": (1, 14, 11, 2, 3, 4, 4, 2, "VALID", 4, "random", 0.3, False),
    "same-5x3-s2x1": (1, 7, 9, 2, 2, 5, 3, (2, 1), "SAME", (4, 3), "random", 0.0, False),
    "valid-2x4-s1x2": (2, 8, 12, 2, 2, 2, 4, (1, 2), "VALID", (3, 4), "random", 0.02, True),
    "image-smaller-than-block": (2, 5, 6, 2, 3, 3, 3, 1, "SAME", 8, "random", 0.0, False),
    "image-smaller-valid-s2": (1, 5, 7, 2, 3, 3, 3, 2, "VALID", 8, "random", 0.0, False),
    "all-active": (3, 8, 8, 2, 2, 3, 3, 1, "SAME", 4, "all", -1.0, False),
    "none-active": (2, 8, 9, 2, 2, 3, 3, 1, "SAME", 4, "none", 0.0, False),
    "batch3-same-s2": (3, 10, 10, 2, 2, 3, 3, 2, "SAME", (2, 4), "random", 0.0, False),
}


def make_conv_case(rng, case, dtype=np.float32):
    b, h, w, cin, cout, kh, kw, strides, padding, block_size, kind, threshold, avgpool = case
    x = rng.standard_normal((b, h, w, cin)).astype(dtype)
    kernel = rng.standard_normal((kh, kw, cin, cout)).astype(dtype)
    if kind == "random":
        mask = dyadic_mask(rng, (b, h, w), density=0.06)
    elif kind == "all":
        mask = rng.random((b, h, w)).astype(np.float32)
    else:
        mask = np.zeros((b, h, w), np.float32)
    kwargs = {"strides": strides, "padding": padding, "threshold": threshold, "avgpool": avgpool}
    return x, kernel, mask.astype(dtype), block_size, kwargs


@pytest.mark.parametrize("name", both("block_sparse_conv2d"))
@pytest.mark.parametrize("case", list(CONV_CASES.values()), ids=list(CONV_CASES))
def test_block_sparse_conv2d_matches_dense_conv(rng, name, case):
    x, kernel, mask, block_size, kw = make_conv_case(rng, case)
    expected, active = np_block_sparse_conv2d(x, kernel, mask, block_size, **kw)
    kind = case[10]
    assert active.all() if kind == "all" else (not active.any() if kind == "none" else active.any())
    xt, kt = tf.constant(x), tf.constant(kernel)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([xt, kt])
        got = op(name)(xt, kt, tf.constant(mask), block_size, **kw)
        dense = tf.nn.conv2d(xt, kt, kw["strides"], kw["padding"]) * active[..., None].astype(np.float32)
    assert got.dtype == tf.float32 and tuple(got.shape) == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert np.all(np.asarray(got)[~active] == 0)  # exactly 0 outside the active output blocks
    np.testing.assert_allclose(dense, expected, rtol=1e-4, atol=1e-4)  # the oracle agrees with TF
    # Gradients equal those of the masked dense convolution.
    dy = rng.standard_normal(expected.shape).astype(np.float32)
    g_got = tape.gradient(got, [xt, kt], output_gradients=dy)
    g_dense = tape.gradient(dense, [xt, kt], output_gradients=dy)
    for a, b in zip(g_got, g_dense):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case_id", ["same-3x3-s2", "valid-5x5-bs3x4", "same-4x4-even-s2", "none-active"])
def test_block_sparse_conv2d_op_equals_reference(rng, case_id):
    x, kernel, mask, block_size, kw = make_conv_case(rng, CONV_CASES[case_id])
    ours = tsc.ops.block_sparse_conv2d(x, kernel, mask, block_size, **kw)
    ref = tsc.ops.block_sparse_conv2d_reference(x, kernel, mask, block_size, **kw)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    # A [B, H, W, 1] mask works too.
    np.testing.assert_array_equal(
        ours, tsc.ops.block_sparse_conv2d(x, kernel, mask[..., None], block_size, **kw)
    )


@pytest.mark.parametrize("name", both("block_sparse_conv2d"))
def test_block_sparse_conv2d_halo_comes_from_x(rng, name):
    # One active block in the middle: its outputs need the inputs around it, all of which lie in
    # inactive blocks (mask 0); they must be read from x anyway.
    x = rng.standard_normal((1, 12, 12, 2)).astype(np.float32)
    kernel = rng.standard_normal((5, 5, 2, 3)).astype(np.float32)
    mask = np.zeros((1, 12, 12), np.float32)
    mask[0, 5, 6] = 1.0
    got = np.array(op(name)(x, kernel, mask, 4))
    dense = np_conv2d(x, kernel, 1, "SAME")
    np.testing.assert_allclose(got[:, 4:8, 4:8], dense[:, 4:8, 4:8], rtol=1e-4, atol=1e-4)
    got[:, 4:8, 4:8] = 0
    assert not got.any()


@pytest.mark.parametrize("name", both("block_sparse_conv2d"))
def test_block_sparse_conv2d_empty_batch(name):
    kernel = tf.ones((3, 3, 2, 5))
    for strides, padding, out_hw in [(1, "SAME", (8, 8)), (1, "VALID", (6, 6)), (2, "SAME", (4, 4))]:
        got = op(name)(
            tf.zeros((0, 8, 8, 2)), kernel, tf.zeros((0, 8, 8)), 4, strides=strides, padding=padding
        )
        assert tuple(got.shape) == (0, *out_hw, 5)


@pytest.mark.parametrize("name", ["block_sparse_conv2d"])  # reference gradients: see the tape checks
@pytest.mark.parametrize(
    "case, pixels",
    [
        ((1, 6, 7, 1, 2, 3, 3, 1, "SAME", 4, "none", 0.0, False), [(0, 1, 5)]),
        ((1, 7, 10, 1, 2, 2, 4, 2, "VALID", (2, 4), "none", 0.0, False), [(0, 0, 5), (0, 3, 1)]),
    ],
    ids=["same", "valid-s2-even"],
)
def test_block_sparse_conv2d_gradient(rng, name, case, pixels):
    x, kernel, mask, block_size, kw = make_conv_case(rng, case, np.float64)
    for pixel in pixels:  # one active block each
        mask[pixel] = 1.0
    _, active = np_block_sparse_conv2d(x, kernel, mask, block_size, **kw)
    assert active.any() and (~active).any()
    theoretical, numerical = tf.test.compute_gradient(
        lambda a, k: op(name)(a, k, mask, block_size, **kw), [tf.constant(x), tf.constant(kernel)]
    )
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=1e-6, atol=1e-6)


def test_block_sparse_conv2d_none_active_gradient_is_zero(rng):
    x, kernel, mask, block_size, kw = make_conv_case(rng, CONV_CASES["none-active"])
    xt, kt = tf.constant(x), tf.constant(kernel)
    with tf.GradientTape() as tape:
        tape.watch([xt, kt])
        y = tsc.ops.block_sparse_conv2d(xt, kt, mask, block_size, **kw)
    assert not np.asarray(y).any()
    for g in tape.gradient(y, [xt, kt], output_gradients=tf.ones_like(y)):
        assert g is None or not np.asarray(g).any()


def test_block_sparse_conv2d_eager_call_runs_one_cached_function(rng):
    """An eager call runs as a cached tf.function (issue 17: eager within 15 % of traced): same
    values and gradients as inside a tf.function, one trace for many shapes, and references_only()
    gets its own (reference) function."""
    from tf_sparseconv.python.ops import block_sparse_ops

    x, kernel, mask, block_size, kw = make_conv_case(rng, CONV_CASES["same-3x3-bs4"])
    mask[0, :3, :3] = 1.0
    xt, kt = tf.constant(x), tf.constant(kernel)
    traced = tf.function(lambda a, k: tsc.ops.block_sparse_conv2d(a, k, mask, block_size, **kw))
    block_sparse_ops._eager_block_sparse_conv2d.cache_clear()
    with tsc.ops.explain() as calls, tf.GradientTape(persistent=True) as tape:
        tape.watch([xt, kt])
        eager = tsc.ops.block_sparse_conv2d(xt, kt, mask, block_size, **kw)
        graph = traced(xt, kt)
    assert calls[0].op == "block_sparse_conv2d" and "cached tf.function" in calls[0].reason
    np.testing.assert_array_equal(eager, graph)
    for a, b in zip(tape.gradient(eager, [xt, kt]), tape.gradient(graph, [xt, kt])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    for size in (x.shape[1] + 3, x.shape[1] + 5):  # other image sizes: the same function
        bigger = rng.standard_normal((1, size, size, x.shape[-1])).astype(np.float32)
        tsc.ops.block_sparse_conv2d(bigger, kernel, np.ones(bigger.shape[:3], np.float32), block_size, **kw)
    assert block_sparse_ops._eager_block_sparse_conv2d.cache_info().currsize == 1
    with tsc.ops.references_only(), tsc.ops.explain() as calls:
        reference = tsc.ops.block_sparse_conv2d(xt, kt, mask, block_size, **kw)
    assert calls[0].implementation == "reference"
    np.testing.assert_allclose(reference, eager, rtol=1e-5, atol=1e-5)


# --- determinism -------------------------------------------------------------------


def test_deterministic(rng):
    mask = dyadic_mask(rng, (2, 17, 19), density=0.2)
    x = rng.standard_normal((2, 17, 19, 5)).astype(np.float32)
    kernel = tf.constant(rng.standard_normal((3, 3, 5, 4)).astype(np.float32))
    runs = []
    for _ in range(2):
        idx = tsc.ops.reduce_mask(mask, 4, 1, (-1, -1))
        blocks = tsc.ops.sparse_gather(x, idx, 4, 1, (-1, -1))
        added = tsc.ops.sparse_scatter(blocks * 1.37, idx, x, 1, (-1, -1), add=True)  # heavy overlap
        idx_w = tsc.ops.reduce_mask(mask, 4, 4, avgpool=True, threshold=0.01)
        written = tsc.ops.sparse_scatter(tsc.ops.sparse_gather(x, idx_w, 4, 4) * 2.0, idx_w, x, 4)
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch([xt, kernel])
            y = tsc.ops.block_sparse_conv2d(xt, kernel, mask, 4)
            z = tsc.ops.sparse_scatter(
                tsc.ops.sparse_gather(y, idx, 4, 1, (-1, -1)), idx, y, 1, (-1, -1), add=True
            )
        grads = tape.gradient(z, [xt, kernel], output_gradients=tf.cos(z))
        runs.append([idx, blocks, added, idx_w, written, y, z, *grads])
    assert len(runs[0][0]) > 10 and len(runs[0][3]) > 1
    for a, b in zip(*runs):
        assert_bitwise_equal(a, b)


# --- dtypes ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float64], ids=lambda d: d.name)
def test_dtypes(rng, dtype):
    tol = {tf.float16: 2e-2, tf.bfloat16: 1e-1, tf.float64: 1e-10}[dtype]
    cast = lambda a: tf.cast(tf.constant(a), dtype)  # noqa: E731
    rounded = lambda a: to_np(cast(a))  # noqa: E731  (the input as the op sees it, in float64)

    mask = dyadic_mask(rng, (2, 10, 11), density=0.2)
    for avgpool, thr in [(False, 0.5), (True, 0.0732421875)]:  # bfloat16-exact thresholds
        got = tsc.ops.reduce_mask(cast(mask), 3, 2, (-1, 0), threshold=thr, avgpool=avgpool)
        np.testing.assert_array_equal(got, np_reduce_mask(mask, 3, 2, (-1, 0), thr, avgpool))

    x = rng.standard_normal((2, 10, 11, 3))
    idx = tsc.ops.reduce_mask(mask, 3, 2, (-1, 0))
    blocks = tsc.ops.sparse_gather(cast(x), idx, 3, 2, (-1, 0))
    assert blocks.dtype == dtype
    np.testing.assert_array_equal(to_np(blocks), np_gather(rounded(x), idx, 3, 2, (-1, 0)))
    out = tsc.ops.sparse_scatter(blocks, idx, cast(x), 2, (-1, 0), add=True)  # overlapping adds
    assert out.dtype == dtype
    expected = np_scatter(to_np(blocks), idx, rounded(x), 2, (-1, 0), add=True)
    np.testing.assert_allclose(to_np(out), expected, rtol=tol, atol=tol)
    # A write with stride 3 (no overlaps): keep the indices inside that grid (4 x 4 here).
    inside = (np.asarray(idx)[:, 1:] < 4).all(axis=1)
    idx_w = np.asarray(idx)[inside]
    out = tsc.ops.sparse_scatter(tf.boolean_mask(blocks, inside), idx_w, cast(x), 3, (-1, 0))
    assert out.dtype == dtype
    expected = np_scatter(np_gather(rounded(x), idx_w, 3, 2, (-1, 0)), idx_w, rounded(x), 3, (-1, 0))
    np.testing.assert_array_equal(to_np(out), expected)

    x, kernel, mask, block_size, kw = make_conv_case(rng, CONV_CASES["same-3x3-s2"], np.float64)
    got = tsc.ops.block_sparse_conv2d(cast(x), cast(kernel), cast(mask), block_size, **kw)
    assert got.dtype == dtype
    expected, _ = np_block_sparse_conv2d(rounded(x), rounded(kernel), mask, block_size, **kw)
    np.testing.assert_allclose(to_np(got), expected, rtol=tol, atol=4 * tol)
    # Gradients run in the low-precision dtype too.
    xt, kt = cast(x), cast(kernel)
    with tf.GradientTape() as tape:
        tape.watch([xt, kt])
        y = tsc.ops.block_sparse_conv2d(xt, kt, cast(mask), block_size, **kw)
    gx, gk = tape.gradient(y, [xt, kt])
    assert gx.dtype == gk.dtype == dtype
    assert np.isfinite(to_np(gx)).all() and np.isfinite(to_np(gk)).all()


# --- tf.function with unknown static shapes ----------------------------------------


@pytest.mark.parametrize("suffix", ["", "_reference"], ids=["op", "reference"])
def test_tf_function_unknown_shapes(rng, suffix):
    reduce_mask, gather, scatter = (
        op(n + suffix) for n in ("reduce_mask", "sparse_gather", "sparse_scatter")
    )
    c = 3

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None, None], tf.float32),
            tf.TensorSpec([None, None, None, c], tf.float32),
        ]
    )
    def pipeline(mask, x):
        idx = reduce_mask(mask, (3, 4), (2, 3), (-1, -1))
        blocks = gather(x, idx, (3, 4), (2, 3), (-1, -1))
        out = scatter(blocks * 2.0, idx, x, (2, 3), (-1, -1), add=True)
        return idx, blocks, out

    idx_s, blocks_s, out_s = pipeline.get_concrete_function().structured_outputs
    assert idx_s.shape.as_list() == [None, 3]
    assert blocks_s.shape.as_list() == [None, 3, 4, c]
    assert out_s.shape.as_list() == [None, None, None, c]
    for shape in [(2, 9, 10), (1, 4, 13)]:  # one trace, two shapes
        mask = dyadic_mask(rng, shape, density=0.2)
        x = rng.standard_normal((*shape, c)).astype(np.float32)
        idx, blocks, out = pipeline(mask, x)
        exp_idx = np_reduce_mask(mask, (3, 4), (2, 3), (-1, -1))
        np.testing.assert_array_equal(idx, exp_idx)
        np.testing.assert_array_equal(blocks, np_gather(x, exp_idx, (3, 4), (2, 3), (-1, -1)))
        expected = np_scatter(2 * np.asarray(blocks), exp_idx, x, (2, 3), (-1, -1), add=True)
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", both("sparse_scatter"))
def test_tf_function_scatter_unknown_block_shape(rng, name):
    # Fully unknown blocks (block size only known at run time) and a dynamic index tensor.
    scatter = op(name)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None, None, None], tf.float32),
            tf.TensorSpec([None, 3], tf.int32),
            tf.TensorSpec([None, None, None, None], tf.float32),
        ]
    )
    def write(blocks, idx, base):
        return scatter(blocks, idx, base, 3, 0, add=False)

    base = rng.standard_normal((2, 7, 8, 2)).astype(np.float32)
    idx = np.array([[1, 2, 0], [0, 0, 2], [1, 1, 1]], np.int32)
    blocks = rng.standard_normal((3, 3, 3, 2)).astype(np.float32)
    assert_exactly_equal(write(blocks, idx, base), np_scatter(blocks, idx, base, 3, 0))


@pytest.mark.parametrize("name", both("block_sparse_conv2d"))
@pytest.mark.parametrize(
    "block_size, strides, padding, k",
    [((4, 2), 2, "SAME", 3), (4, 1, "SAME", 4), (4, 2, "VALID", 3), (6, 3, "SAME", 5)],
    ids=["same-s2", "same-even", "valid-s2", "same-s3"],
)
def test_tf_function_conv_unknown_shapes(rng, name, block_size, strides, padding, k):
    conv, c = op(name), 3

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None, None, c], tf.float32),
            tf.TensorSpec([k, k, c, 2], tf.float32),
            tf.TensorSpec([None, None, None], tf.float32),
        ]
    )
    def conv_and_grad(x, kernel, mask):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            y = conv(x, kernel, mask, block_size, strides=strides, padding=padding)
        return y, *tape.gradient(y, [x, kernel], output_gradients=tf.sin(y))

    assert conv_and_grad.get_concrete_function().structured_outputs[0].shape.as_list() == [
        None,
        None,
        None,
        2,
    ]
    for shape in [(2, 9, 10), (1, 6, 13), (1, 8, 8)]:
        x = rng.standard_normal((*shape, c)).astype(np.float32)
        kernel = rng.standard_normal((k, k, c, 2)).astype(np.float32)
        mask = dyadic_mask(rng, shape, density=0.1)
        y, gx, gk = conv_and_grad(x, kernel, mask)
        expected, active = np_block_sparse_conv2d(x, kernel, mask, block_size, strides, padding)
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
        xt, kt = tf.constant(x), tf.constant(kernel)
        with tf.GradientTape() as tape:
            tape.watch([xt, kt])
            dense = tf.nn.conv2d(xt, kt, strides, padding) * active[..., None].astype(np.float32)
        for a, b in zip([gx, gk], tape.gradient(dense, [xt, kt], output_gradients=tf.sin(y))):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


# --- bad input ---------------------------------------------------------------------


def names(*args):
    """A regex matching any of the argument names as a whole word."""
    return "|".join(rf"(?<!\w){a}(?!\w)" for a in args)


_MASK, _X = tf.ones((2, 6, 7)), tf.ones((2, 6, 7, 3))
_IDX, _BLOCKS, _KERNEL = tf.constant([[0, 0, 0], [1, 1, 1]]), tf.ones((2, 3, 3, 3)), tf.ones((3, 3, 3, 4))
_OVERLAP = tf.constant([[0, 0, 0], [0, 1, 0]])  # with size 3 and stride_h < 3: rows overlap


def _overlap_dynamic(scatter):
    # Indices unknown until run time: the kernel itself must find the overlap.
    fn = tf.function(
        lambda i: scatter(_BLOCKS, i, _X, (1, 3), add=False),
        input_signature=[tf.TensorSpec([None, 3], tf.int32)],
    )
    return fn(_OVERLAP)


BAD_CASES = {
    # id: (op, call, regex the message must match)
    "mask-rank2": ("reduce_mask", lambda f: f(tf.ones((6, 7)), 3, 3), names("mask")),
    "mask-rank5": ("reduce_mask", lambda f: f(tf.ones((2, 6, 7, 1, 1)), 3, 3), names("mask")),
    "mask-2-channels": ("reduce_mask", lambda f: f(tf.ones((2, 6, 7, 2)), 3, 3), names("mask")),
    "rm-size-0": ("reduce_mask", lambda f: f(_MASK, 0, 3), names("block_size")),
    "rm-size-neg": ("reduce_mask", lambda f: f(_MASK, -2, 3), names("block_size")),
    "rm-size-pair-0": ("reduce_mask", lambda f: f(_MASK, (3, 0), 3), names("block_size")),
    "rm-size-triple": ("reduce_mask", lambda f: f(_MASK, (3, 3, 3), 3), names("block_size")),
    "rm-stride-0": ("reduce_mask", lambda f: f(_MASK, 3, 0), names("block_stride")),
    "rm-stride-neg": ("reduce_mask", lambda f: f(_MASK, 3, (2, -1)), names("block_stride")),
    "gather-x-rank3": ("sparse_gather", lambda f: f(tf.ones((6, 7, 3)), _IDX, 3, 3), names("x")),
    "gather-idx-2-cols": (
        "sparse_gather",
        lambda f: f(_X, tf.constant([[0, 0], [1, 1]]), 3, 3),
        names("indices"),
    ),
    "gather-idx-rank1": ("sparse_gather", lambda f: f(_X, tf.constant([0, 0, 0]), 3, 3), names("indices")),
    "gather-size-0": ("sparse_gather", lambda f: f(_X, _IDX, 0, 3), names("block_size")),
    "gather-size-neg": ("sparse_gather", lambda f: f(_X, _IDX, (2, -1), 3), names("block_size")),
    "gather-stride-0": ("sparse_gather", lambda f: f(_X, _IDX, 3, 0), names("block_stride")),
    "gather-stride-neg": ("sparse_gather", lambda f: f(_X, _IDX, 3, -1), names("block_stride")),
    "scatter-blocks-rank3": ("sparse_scatter", lambda f: f(tf.ones((2, 3, 3)), _IDX, _X, 3), names("blocks")),
    "scatter-base-rank3": (
        "sparse_scatter",
        lambda f: f(_BLOCKS, _IDX, tf.ones((6, 7, 3)), 3),
        names("base"),
    ),
    "scatter-channels": (
        "sparse_scatter",
        lambda f: f(tf.ones((2, 3, 3, 2)), _IDX, _X, 3),
        names("blocks", "base"),
    ),
    "scatter-n-mismatch": (
        "sparse_scatter",
        lambda f: f(_BLOCKS, _IDX[:1], _X, 3),
        names("indices", "blocks"),
    ),
    "scatter-idx-2-cols": (
        "sparse_scatter",
        lambda f: f(_BLOCKS, tf.constant([[0, 0], [1, 1]]), _X, 3),
        names("indices"),
    ),
    "scatter-stride-0": ("sparse_scatter", lambda f: f(_BLOCKS, _IDX, _X, 0), names("block_stride")),
    "scatter-stride-neg": ("sparse_scatter", lambda f: f(_BLOCKS, _IDX, _X, (3, -3)), names("block_stride")),
    "scatter-write-overlap-1x3": (
        "sparse_scatter",
        lambda f: f(_BLOCKS, _OVERLAP, _X, (1, 3), add=False),
        "(?i)overlap|" + names("add", "block_stride"),
    ),
    "scatter-write-overlap-2": (
        "sparse_scatter",
        lambda f: f(_BLOCKS, _OVERLAP, _X, 2, add=False),
        "(?i)overlap|" + names("add", "block_stride"),
    ),
    "scatter-write-repeated-index": (
        "sparse_scatter",
        lambda f: f(_BLOCKS, tf.constant([[1, 1, 1], [1, 1, 1]]), _X, 3, add=False),
        "(?i)overlap|" + names("add", "block_stride", "indices"),
    ),
    "scatter-write-overlap-dynamic": (
        "sparse_scatter",
        _overlap_dynamic,
        "(?i)overlap|" + names("add", "block_stride"),
    ),
    "conv-x-rank3": ("block_sparse_conv2d", lambda f: f(tf.ones((6, 7, 3)), _KERNEL, _MASK, 4), names("x")),
    "conv-kernel-rank3": (
        "block_sparse_conv2d",
        lambda f: f(_X, tf.ones((3, 3, 4)), _MASK, 4),
        names("kernel"),
    ),
    "conv-cin-mismatch": (
        "block_sparse_conv2d",
        lambda f: f(_X, tf.ones((3, 3, 2, 4)), _MASK, 4),
        names("kernel", "x"),
    ),
    "conv-mask-width": (
        "block_sparse_conv2d",
        lambda f: f(_X, _KERNEL, tf.ones((2, 6, 8)), 4),
        names("mask"),
    ),
    "conv-mask-height-4d": (
        "block_sparse_conv2d",
        lambda f: f(_X, _KERNEL, tf.ones((2, 5, 7, 1)), 4),
        names("mask"),
    ),
    "conv-mask-rank2": ("block_sparse_conv2d", lambda f: f(_X, _KERNEL, tf.ones((6, 7)), 4), names("mask")),
    "conv-bs3-s2": (
        "block_sparse_conv2d",
        lambda f: f(_X, _KERNEL, _MASK, 3, strides=2),
        names("block_size", "strides"),
    ),
    "conv-bs4x3-s2": (
        "block_sparse_conv2d",
        lambda f: f(_X, _KERNEL, _MASK, (4, 3), strides=(2, 2)),
        names("block_size", "strides"),
    ),
    "conv-bs4-s1x3": (
        "block_sparse_conv2d",
        lambda f: f(_X, _KERNEL, _MASK, 4, strides=(1, 3)),
        names("block_size", "strides"),
    ),
    "conv-bs-0": ("block_sparse_conv2d", lambda f: f(_X, _KERNEL, _MASK, 0), names("block_size")),
    "conv-bs-neg": ("block_sparse_conv2d", lambda f: f(_X, _KERNEL, _MASK, -4), names("block_size")),
    "conv-strides-0": (
        "block_sparse_conv2d",
        lambda f: f(_X, _KERNEL, _MASK, 4, strides=0),
        names("strides"),
    ),
    "conv-strides-neg": (
        "block_sparse_conv2d",
        lambda f: f(_X, _KERNEL, _MASK, 4, strides=(2, -2)),
        names("strides"),
    ),
    "conv-padding": (
        "block_sparse_conv2d",
        lambda f: f(_X, _KERNEL, _MASK, 4, padding="FULL"),
        names("padding"),
    ),
}


# Index values only the CPU kernels check: on the GPU the indices stay in device memory
# (README, "Validation on GPU"; test_gpu_index_values_are_not_checked).
CPU_CHECKED = {
    "scatter-write-overlap-1x3",
    "scatter-write-overlap-2",
    "scatter-write-repeated-index",
    "scatter-write-overlap-dynamic",
}
GPU_VISIBLE = bool(tf.config.list_physical_devices("GPU"))


@pytest.mark.parametrize("suffix", ["", "_reference"], ids=["op", "reference"])
@pytest.mark.parametrize("case", list(BAD_CASES.values()), ids=list(BAD_CASES))
def test_bad_input(suffix, case):
    name, call, pattern = case
    with tf.device("/CPU:0"):
        assert_rejects(lambda: call(op(name + suffix)), pattern)


@pytest.mark.skipif(not GPU_VISIBLE, reason="TensorFlow sees no GPU")
@pytest.mark.parametrize(
    "case",
    [c for k, c in BAD_CASES.items() if k not in CPU_CHECKED],
    ids=[k for k in BAD_CASES if k not in CPU_CHECKED],
)
def test_bad_input_on_gpu(case):
    """Shapes and attributes are checked on the GPU too."""
    name, call, pattern = case
    with tf.device("/GPU:0"):
        assert_rejects(lambda: call(op(name)), pattern)


@pytest.mark.skipif(not GPU_VISIBLE, reason="TensorFlow sees no GPU")
def test_gpu_index_values_are_not_checked(rng):
    """On the GPU (README, "Validation on GPU") index values are not checked, as tf.gather does
    there: a row outside the index limits gathers zeros and is skipped by scatters (never an
    out-of-bounds access), and overlapping writes (add=False) are not rejected: the last block
    in index order wins."""
    x = rng.standard_normal((2, 7, 8, 3)).astype(np.float32)
    good = np.array([[0, 0, 0], [1, 3, 3], [0, 2, 1]], np.int32)  # size 3, stride 2: limits 4 x 4
    bad = np.array(
        [[2, 0, 0], [-1, 0, 0], [0, 4, 0], [0, 0, 4], [0, -1, 0], [0, 0, -1], [0, 9, 9]]
        + [[2**31 - 1, 0, 0], [0, -(2**31), 0], [0, 0, 2**31 - 1]],
        np.int32,
    )
    idx = np.concatenate([good[:1], bad[:5], good[1:], bad[5:]])
    keep = np.isin(np.arange(len(idx)), [0, 6, 7])
    blocks = rng.standard_normal((len(idx), 3, 3, 3)).astype(np.float32)
    dy = rng.standard_normal((len(idx), 3, 3, 3)).astype(np.float32)
    with tf.device("/GPU:0"):
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            gathered = tsc.ops.sparse_gather(xt, idx, 3, 2)
        dx = tape.gradient(gathered, xt, output_gradients=tf.constant(dy))
        added = tsc.ops.sparse_scatter(blocks, idx, x, 2, add=True)
        # Stride 3: limits 3 x 3 for writes; (0, 3, 0) is one past.
        write_idx = np.array([[0, 0, 1], [0, 3, 0], [1, 2, 2], [-5, 1, 1]], np.int32)
        written = tsc.ops.sparse_scatter(blocks[:4], write_idx, x, 3, add=False)
        # Stride 2 < size 3 and a repeated index: overlapping writes.
        overlap_idx = np.array([[0, 0, 0], [0, 1, 0], [1, 2, 2], [1, 2, 2]], np.int32)
        overlapping = tsc.ops.sparse_scatter(blocks[:4], overlap_idx, x, 2, add=False)
    assert gathered.device.endswith("GPU:0") and added.device.endswith("GPU:0")
    expected = np.zeros_like(gathered.numpy())
    expected[keep] = np_gather(x, idx[keep], 3, 2)
    assert_exactly_equal(gathered, expected)
    np.testing.assert_allclose(dx, np_scatter(dy[keep], idx[keep], np.zeros_like(x), 2, add=True), rtol=1e-6)
    np.testing.assert_allclose(added, np_scatter(blocks[keep], idx[keep], x, 2, add=True), rtol=1e-6)
    w_keep = [0, 2]
    assert_exactly_equal(written, np_scatter(blocks[w_keep], write_idx[w_keep], x, 3))
    assert_exactly_equal(overlapping, np_scatter(blocks[:4], overlap_idx, x, 2))


def index_limit(length, size, stride, offset):
    """block_sparse_common.h: valid block indices along an axis are [0, limit), limit = max(grid,
    number of blocks that start inside the image) (halo blocks past the grid still overlap it)."""
    starts = -(-(length - offset) // stride) if length > offset else 0
    return max(grid_len(length, size, stride, offset), starts)


def test_oracle_index_limit_by_hand():
    assert (grid_len(7, 3, 2, 0), index_limit(7, 3, 2, 0)) == (3, 4)  # block 3 covers [6, 9)
    assert (grid_len(8, 3, 2, 0), index_limit(8, 3, 2, 0)) == (4, 4)
    assert (grid_len(7, 3, 3, 0), index_limit(7, 3, 3, 0)) == (3, 3)
    assert (grid_len(7, 3, 4, 0), index_limit(7, 3, 4, 0)) == (2, 2)
    assert (grid_len(7, 3, 2, 12), index_limit(7, 3, 2, 12)) == (1, 1)
    assert (grid_len(4, 2, 3, -5), index_limit(4, 2, 3, -5)) == (4, 4)


@pytest.mark.parametrize("suffix", ["", "_reference"], ids=["op", "reference"])
def test_index_limits(rng, suffix):
    gather, scatter = op("sparse_gather" + suffix), op("sparse_scatter" + suffix)
    x = rng.standard_normal((2, 7, 8, 3)).astype(np.float32)
    # size 3, stride 2: grid 3 x 4, index limits 4 x 4. Halo block (1, 3, 3) is past the grid
    # along h but still overlaps the image (row 6): accepted, read and written like any block.
    ok = np.array([[1, 3, 3], [0, 2, 3], [1, 3, 0]], np.int32)
    blocks = gather(x, ok, 3, 2)
    assert_exactly_equal(blocks, np_gather(x, ok, 3, 2))
    np.testing.assert_allclose(
        scatter(blocks, ok, x, 2, add=True), np_scatter(blocks, ok, x, 2, add=True), rtol=1e-6
    )
    # Write with stride 3 (no overlaps): limits 3 x 3; block (1, 2, 2) covers rows 6-8, columns 6-8.
    ok = np.array([[1, 2, 2], [0, 0, 1]], np.int32)
    assert_exactly_equal(scatter(blocks[:2], ok, x, 3), np_scatter(blocks[:2], ok, x, 3))

    # The CPU kernels check index values; the GPU ones skip bad rows instead
    # (test_gpu_index_values_are_not_checked).
    with tf.device("/CPU:0"):
        xt = tf.constant(x)

        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.int32)])
        def gather_dynamic(idx):  # indices unknown until run time: the kernel must check them
            return gather(xt, idx, 3, 2)

        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.int32), tf.TensorSpec([], tf.bool)])
        def scatter_dynamic(idx, add):
            return tf.cond(
                add,
                lambda: scatter(tf.ones((2, 3, 3, 3)), idx, xt, 2, add=True),
                lambda: scatter(tf.ones((2, 3, 3, 3)), idx, xt, 3, add=False),
            )

        failures = []
        for row in [[2, 0, 0], [-1, 0, 0], [0, 4, 0], [0, 0, 4], [0, -1, 0], [0, 0, -1], [0, 9, 9]]:
            idx = tf.constant([[0, 0, 0], row], tf.int32)
            for what, call in [
                ("gather", lambda idx=idx: gather(xt, idx, 3, 2)),
                ("gather in tf.function", lambda idx=idx: gather_dynamic(idx)),
                ("scatter add", lambda idx=idx: scatter(tf.ones((2, 3, 3, 3)), idx, xt, 2, add=True)),
                ("scatter add in tf.function", lambda idx=idx: scatter_dynamic(idx, tf.constant(True))),
            ]:
                try:
                    assert_rejects(call, names("indices"))
                except (AssertionError, pytest.fail.Exception) as e:
                    failures.append(f"{what} with row {row}: {str(e).splitlines()[0]}")
        # Stride 3 (size 3): limits 3 x 3, so (0, 3, 0) is one past.
        idx = tf.constant([[0, 0, 0], [0, 3, 0]], tf.int32)
        for what, call in [
            ("scatter write", lambda: scatter(tf.ones((2, 3, 3, 3)), idx, xt, 3, add=False)),
            ("scatter write in tf.function", lambda: scatter_dynamic(idx, tf.constant(False))),
        ]:
            try:
                assert_rejects(call, names("indices"))
            except (AssertionError, pytest.fail.Exception) as e:
                failures.append(f"{what} with row [0, 3, 0]: {str(e).splitlines()[0]}")
    assert not failures, "\n".join(failures)


_OUTSIDE_SCRIPT = """
import numpy as np
import tf_sparseconv as tsc
x = np.arange(1, 1 + 5 * 6 * 2, dtype=np.float32).reshape(1, 5, 6, 2)
one = np.array([[0, 0, 0]], np.int32)
# block (0, 0, 0) lies entirely outside the image: left, above, right, below, by more than its size
for offset in [(0, -3), (-3, 0), (0, 8), (7, 0), (-4, -4), (9, 9)]:
    for op in ("sparse_gather", "sparse_gather_reference"):
        got = getattr(tsc.ops, op)(x, one, 1, 1, offset)
        assert got.shape == (1, 1, 1, 2) and not np.asarray(got).any(), (op, offset, got)
    for op in ("sparse_scatter", "sparse_scatter_reference"):
        for add in (False, True):
            got = getattr(tsc.ops, op)(np.ones((1, 1, 1, 2), np.float32), one, x, 1, offset, add=add)
            assert (np.asarray(got) == x).all(), (op, offset, add)
    for op in ("reduce_mask", "reduce_mask_reference"):
        got = getattr(tsc.ops, op)(np.ones((1, 5, 6), np.float32), 1, 1, offset, threshold=-1.0, avgpool=True)
        assert got.shape[1] == 3, (op, offset)
print("ok")
"""


def test_blocks_entirely_outside_the_image_do_not_crash():
    # In a subprocess, so that a crash is reported as a failure instead of killing the test run.
    assert "ok" in run_python(_OUTSIDE_SCRIPT, timeout=120).stdout


# --- fuzz: gather -> scatter-add round trips ----------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 11),
    w=st.integers(1, 11),
    c=st.integers(1, 3),
    size=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    stride=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    offset=st.tuples(st.integers(-4, 4), st.integers(-4, 4)),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_round_trip(b, h, w, c, size, stride, offset, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, h, w, c)).astype(np.float32)
    mask = dyadic_mask(rng, (b, h, w), density=0.2)
    grid = (grid_len(h, size[0], stride[0], offset[0]), grid_len(w, size[1], stride[1], offset[1]))
    idx = tsc.ops.reduce_mask(mask, size, stride, offset)
    np.testing.assert_array_equal(idx, np_reduce_mask(mask, size, stride, offset))
    indices = random_indices(rng, b, grid, fraction=0.7, shuffle=True)
    indices = np.concatenate([indices, indices[: int(rng.integers(0, 3))]])  # maybe repeats
    blocks = tsc.ops.sparse_gather(x, indices, size, stride, offset)
    assert_exactly_equal(blocks, np_gather(x, indices, size, stride, offset))
    base = rng.standard_normal(x.shape).astype(np.float32)
    out = tsc.ops.sparse_scatter(blocks, indices, base, stride, offset, add=True)
    np.testing.assert_allclose(out, np_scatter(blocks, indices, base, stride, offset, add=True), atol=1e-5)
    ref = tsc.ops.sparse_scatter_reference(blocks, indices, base, stride, offset, add=True)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    # Gathering the scatter-added map again: each block sees itself plus its overlaps.
    again = tsc.ops.sparse_gather(out, indices, size, stride, offset)
    np.testing.assert_allclose(
        again, np_gather(np.asarray(out), indices, size, stride, offset), rtol=0, atol=0
    )
    if min(np.subtract(stride, size)) >= 0:  # non-overlapping: a write round trip is exact
        unique = np.unique(indices, axis=0)
        blocks = tsc.ops.sparse_gather(x, unique, size, stride, offset)
        written = tsc.ops.sparse_scatter(blocks, unique, base, stride, offset, add=False)
        region = np_written(unique, x.shape, size, stride, offset)[..., None]
        assert_exactly_equal(written, np.where(region, x, base))
