"""GPU tests of the block-sparse kernels (tf_sparseconv/cc/kernels/block_sparse_op_gpu.cu.cc).

Runs ReduceMask, SparseGather and SparseScatter through their ``extern "C"``
entry points (ctypes) on CuPy device memory and compares them with an
independent NumPy reference written from the semantics in
``block_sparse_common.h``:

* gather and scatter-write are bit copies: compared bit for bit;
* scatter-add sums base + the covering blocks in index order, in float for
  half / bfloat16 (double for double) with one final rounding: the reference
  does the same additions in the same order, so it is compared bit for bit
  too (and checked against exact float64 sums in the self-tests);
* reduce_mask with max is exact; with avgpool the blocks whose float64
  average is within a rounding bound of the threshold may go either way
  (an extra test checks the row-major float summation order the kernel
  documents, which is the CPU kernel's).

No TensorFlow needed. Skips (with the reason) when nvcc, CuPy or a GPU is
missing; the compile and argument-checking tests only need nvcc, the
reference self-tests nothing.
"""

import ctypes
from dataclasses import astuple, dataclass, replace

import numpy as np
import pytest
from _common import (
    ACC,
    DTYPES,
    FORMATS,
    STORAGE,
    U_ACC,
    assert_compiled,
    assert_guards,
    cupy,
    declare,
    dev_ptr,
    fail_where,
    garbage,
    guarded,
    guarded_contents,
    time_ms,
    to_float64,
    to_storage,
)

ENTRY_POINTS = (
    "tsc_reduce_mask_gpu_workspace_bytes",
    "tsc_reduce_mask_count_gpu",
    "tsc_reduce_mask_indices_gpu",
    "tsc_sparse_gather_gpu",
    "tsc_sparse_scatter_gpu_workspace_bytes",
    "tsc_sparse_scatter_gpu",
)
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


# ----------------------------------------------------------------------------
# Geometry and data
# ----------------------------------------------------------------------------


def grid_size(length, size, stride, offset):
    """Blocks along an axis: max(1, ceil((length - offset - size) / stride) + 1)."""
    span = length - offset - size
    return max(1, -(-span // stride) + 1)


@dataclass(frozen=True)
class Geometry:
    batch: int
    h: int
    w: int
    c: int
    size_h: int
    size_w: int
    stride_h: int
    stride_w: int
    offset_h: int
    offset_w: int
    grid_h: int
    grid_w: int

    def as_int64(self):
        """The 12 int64 of the C entry points, in BlockGeometry order."""
        return np.array(astuple(self), dtype=np.int64)

    @property
    def x_shape(self):
        return (self.batch, self.h, self.w, self.c)

    @property
    def mask_shape(self):
        return (self.batch, self.h, self.w)

    def blocks_shape(self, n):
        return (n, self.size_h, self.size_w, self.c)

    @property
    def cells(self):
        return self.batch * self.grid_h * self.grid_w


def make_geometry(batch, h, w, c, size, stride=None, offset=(0, 0)):
    stride = size if stride is None else stride
    return Geometry(
        batch,
        h,
        w,
        c,
        size[0],
        size[1],
        stride[0],
        stride[1],
        offset[0],
        offset[1],
        grid_size(h, size[0], stride[0], offset[0]),
        grid_size(w, size[1], stride[1], offset[1]),
    )


def random_values(rng, shape, dtype, lo=0.25, hi=4.0):
    """Random storage values with |v| in [lo, hi), random signs: never zero."""
    mag = rng.uniform(lo, hi, size=shape)
    sign = np.where(rng.random(size=shape) < 0.5, -1.0, 1.0)
    return to_storage(mag * sign, dtype)


def bad_rows(g):
    """Index rows out of range in every possible way."""
    return np.array(
        [
            (-1, 0, 0),
            (g.batch, 0, 0),
            (0, -1, 0),
            (0, g.grid_h, 0),
            (0, 0, -1),
            (0, 0, g.grid_w),
            (INT32_MIN, INT32_MAX, 0),
            (0, INT32_MIN, INT32_MAX),
        ],
        dtype=np.int32,
    )


def random_indices(rng, g, frac=0.5, dup=0, bad=0):
    """A random subset (fraction `frac`, at least one) of the cells in random
    order, plus `dup` repeated rows and `bad` out-of-range rows at random
    positions. int32 [n, 3]."""
    cells = np.array(list(np.ndindex(g.batch, g.grid_h, g.grid_w)), dtype=np.int32).reshape(-1, 3)
    if len(cells) == 0:
        rows = np.zeros((0, 3), np.int32)
    else:
        take = max(1, round(frac * len(cells)))
        rows = cells[rng.permutation(len(cells))[:take]]
        if dup:
            rows = np.concatenate([rows, rows[rng.integers(0, len(rows), dup)]])
    if bad:
        bads = bad_rows(g)
        rows = np.concatenate([rows, bads[rng.integers(0, len(bads), bad)]])
    return np.ascontiguousarray(rows[rng.permutation(len(rows))], dtype=np.int32)


# ----------------------------------------------------------------------------
# Independent NumPy reference
# ----------------------------------------------------------------------------


def valid(row, g):
    b, bh, bw = (int(v) for v in row)
    return 0 <= b < g.batch and 0 <= bh < g.grid_h and 0 <= bw < g.grid_w


def clip(start, size, length):
    """(lo, hi) of [start, start + size) inside [0, length), and lo - start."""
    lo, hi = max(start, 0), min(start + size, length)
    return lo, max(lo, hi), lo - start


def placement(row, g):
    """(b, image rows, image cols, block rows, block cols) of a valid row, as slices."""
    b, bh, bw = (int(v) for v in row)
    y0, y1, i0 = clip(g.offset_h + bh * g.stride_h, g.size_h, g.h)
    x0, x1, j0 = clip(g.offset_w + bw * g.stride_w, g.size_w, g.w)
    return (
        b,
        slice(y0, y1),
        slice(x0, x1),
        slice(i0, i0 + y1 - y0),
        slice(j0, j0 + x1 - x0),
    )


def ref_gather(x, idx, g):
    """blocks [n, size_h, size_w, c] (same dtype as x); zeros outside."""
    out = np.zeros(g.blocks_shape(len(idx)), dtype=x.dtype)
    for k, row in enumerate(idx):
        if valid(row, g):
            b, ys, xs, is_, js = placement(row, g)
            out[k, is_, js] = x[b, ys, xs]
    return out


def ref_scatter_write(blocks, idx, base, g):
    """base with the blocks written in index order (the last one wins)."""
    out = base.copy()
    for k, row in enumerate(idx):
        if valid(row, g):
            b, ys, xs, is_, js = placement(row, g)
            out[b, ys, xs] = blocks[k, is_, js]
    return out


def ref_scatter_add(blocks_s, idx, base_s, g, dtype):
    """Storage of base + blocks, summed in ACC[dtype] in index order, rounded once."""
    acc = to_float64(base_s, dtype).astype(ACC[dtype])
    blk = to_float64(blocks_s, dtype).astype(ACC[dtype])
    for k, row in enumerate(idx):
        if valid(row, g):
            b, ys, xs, is_, js = placement(row, g)
            acc[b, ys, xs] += blk[k, is_, js]
    return to_storage(acc, dtype)


def exact_scatter_add(blocks, idx, base, g):
    """float64 sum and sum of absolute values (for error bounds)."""
    out, mag = base.copy(), np.abs(base)
    for k, row in enumerate(idx):
        if valid(row, g):
            b, ys, xs, is_, js = placement(row, g)
            out[b, ys, xs] += blocks[k, is_, js]
            mag[b, ys, xs] += np.abs(blocks[k, is_, js])
    return out, mag


def block_stats(mask, g):
    """Per cell (b, bh, bw): max (-inf if empty), float64 sum and sum of |v|."""
    shape = (g.batch, g.grid_h, g.grid_w)
    mx, sm, ab = np.full(shape, -np.inf), np.zeros(shape), np.zeros(shape)
    for b, bh, bw in np.ndindex(*shape):
        _, ys, xs, _, _ = placement((b, bh, bw), g)
        part = mask[b, ys, xs]
        if part.size:
            mx[b, bh, bw] = part.max()
            sm[b, bh, bw] = part.sum()
            ab[b, bh, bw] = np.abs(part).sum()
    return mx, sm, ab


def ref_reduce_mask(mask, g, threshold, avgpool, dtype):
    """(rows that must be active, rows that may go either way), int32 [., 3]
    in increasing (b, bh, bw) order. `mask` holds exact float64 values."""
    thr = float(np.float32(threshold))
    mx, sm, ab = block_stats(mask, g)
    if avgpool:
        area = g.size_h * g.size_w
        avg = sm / area
        # Summation error of up to area terms in ACC, plus the division.
        bound = (area + 2) * U_ACC[dtype] * ab / area + 1e-300
        sure = avg - bound > thr
        maybe = np.abs(avg - thr) <= bound
    else:
        sure = mx > thr
        maybe = np.zeros_like(sure)
    return np.argwhere(sure).astype(np.int32), np.argwhere(maybe).astype(np.int32)


def rowmajor_reduce_mask_avg(mask_s, g, threshold, dtype):
    """Active rows of avgpool when every block sums its in-range part in
    row-major order in ACC[dtype] and divides by the area (the CPU kernel)."""
    acc_t = ACC[dtype]
    mask = to_float64(mask_s, dtype).astype(acc_t)
    bh = np.arange(g.grid_h)[:, None]
    bw = np.arange(g.grid_w)[None, :]
    acc = np.zeros((g.batch, g.grid_h, g.grid_w), dtype=acc_t)
    if g.h == 0 or g.w == 0:  # nothing in range: every average is 0
        return np.argwhere(acc > acc_t(np.float32(threshold))).astype(np.int32)
    for i in range(g.size_h):
        y = g.offset_h + bh * g.stride_h + i  # [grid_h, 1]
        for j in range(g.size_w):
            x = g.offset_w + bw * g.stride_w + j  # [1, grid_w]
            ok = (y >= 0) & (y < g.h) & (x >= 0) & (x < g.w)
            vals = mask[:, np.clip(y, 0, g.h - 1), np.clip(x, 0, g.w - 1)]  # [batch, grid_h, grid_w]
            acc = acc + np.where(ok, vals, acc_t(0)).astype(acc_t)
    avg = acc / acc_t(g.size_h * g.size_w)
    return np.argwhere(avg > acc_t(np.float32(threshold))).astype(np.int32)


# Literal per-element versions of the semantics (tiny shapes only).


def covers(row, g, y, x):
    _, bh, bw = (int(v) for v in row)
    y0 = g.offset_h + bh * g.stride_h
    x0 = g.offset_w + bw * g.stride_w
    return y0 <= y < y0 + g.size_h and x0 <= x < x0 + g.size_w, y - y0, x - x0


def naive_gather(x, idx, g):
    out = np.full(g.blocks_shape(len(idx)), np.nan)
    for k, i, j, ch in np.ndindex(*out.shape):
        b, bh, bw = (int(v) for v in idx[k])
        y, xx = g.offset_h + bh * g.stride_h + i, g.offset_w + bw * g.stride_w + j
        inside = valid(idx[k], g) and 0 <= y < g.h and 0 <= xx < g.w
        out[k, i, j, ch] = x[b, y, xx, ch] if inside else 0.0
    return out


def naive_scatter(blocks, idx, base, g, add, acc_t=np.float64):
    out = np.array(base, dtype=np.float64)
    for b, y, x, ch in np.ndindex(*base.shape):
        v = acc_t(base[b, y, x, ch])
        for k, row in enumerate(idx):
            if not valid(row, g) or int(row[0]) != b:
                continue
            hit, i, j = covers(row, g, y, x)
            if hit:
                v = v + acc_t(blocks[k, i, j, ch]) if add else acc_t(blocks[k, i, j, ch])
        out[b, y, x, ch] = v
    return out


def naive_reduce_mask(mask, g, threshold, avgpool):
    rows = []
    for b, bh, bw in np.ndindex(g.batch, g.grid_h, g.grid_w):
        vals = [mask[b, y, x] for y in range(g.h) for x in range(g.w) if covers((b, bh, bw), g, y, x)[0]]
        if avgpool:
            score = sum(vals) / (g.size_h * g.size_w)
        else:
            score = max(vals) if vals else -np.inf
        if score > threshold:
            rows.append((b, bh, bw))
    return np.array(rows, dtype=np.int32).reshape(-1, 3)


# ----------------------------------------------------------------------------
# Calling the kernels
# ----------------------------------------------------------------------------


def _declare(lib):
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    sigs = {
        "tsc_reduce_mask_gpu_workspace_bytes": ([p], i64),
        "tsc_reduce_mask_count_gpu": [i32, p, ctypes.c_float, i32, p, p, ctypes.POINTER(i64), p],
        "tsc_reduce_mask_indices_gpu": [p, p, p, i64, p],
        "tsc_sparse_gather_gpu": [i32, p, p, i64, p, p, p],
        "tsc_sparse_scatter_gpu_workspace_bytes": ([p, i64], i64),
        "tsc_sparse_scatter_gpu": [i32, p, p, i64, p, p, i32, p, p, p],
    }
    return declare(lib, sigs)


@pytest.fixture(scope="module")
def bs_lib(gpu_lib):
    return _declare(gpu_lib)


def _workspace(nbytes):
    """Workspace filled with garbage (the kernels must not rely on zeros)."""
    return cupy.full(max(int(nbytes), 0), 0xA5, dtype=np.uint8) if nbytes else None


def _check(err):
    assert err is None, err.decode()


def run_reduce_mask(lib, mask_s, g, threshold, avgpool, dtype):
    """int32 [count, 3] rows from the two-phase kernels."""
    stream = cupy.cuda.get_current_stream()
    geo = g.as_int64()
    mask = cupy.asarray(mask_s)
    ws = _workspace(lib.tsc_reduce_mask_gpu_workspace_bytes(geo.ctypes.data))
    count = ctypes.c_int64(-1)
    _check(
        lib.tsc_reduce_mask_count_gpu(
            FORMATS[dtype],
            dev_ptr(mask),
            threshold,
            int(avgpool),
            geo.ctypes.data,
            dev_ptr(ws),
            ctypes.byref(count),
            stream.ptr,
        )
    )
    assert 0 <= count.value <= g.cells
    rows = cupy.full((count.value, 3), -7, dtype=np.int32)
    _check(
        lib.tsc_reduce_mask_indices_gpu(geo.ctypes.data, dev_ptr(ws), dev_ptr(rows), count.value, stream.ptr)
    )
    stream.synchronize()
    return cupy.asnumpy(rows)


def run_gather(lib, x_s, idx, g, dtype, x_dev=None):
    stream = cupy.cuda.get_current_stream()
    geo = g.as_int64()
    x = cupy.asarray(x_s) if x_dev is None else x_dev
    d_idx = cupy.asarray(idx)
    out = garbage(g.blocks_shape(len(idx)), dtype)
    _check(
        lib.tsc_sparse_gather_gpu(
            FORMATS[dtype], dev_ptr(x), dev_ptr(d_idx), len(idx), dev_ptr(out), geo.ctypes.data, stream.ptr
        )
    )
    stream.synchronize()
    return cupy.asnumpy(out)


def run_scatter(lib, blocks_s, idx, base_s, g, dtype, add, in_place=False, raw=False):
    """out (host storage); base_s may be a host or a device array."""
    stream = cupy.cuda.get_current_stream()
    geo = g.as_int64()
    blocks = cupy.asarray(blocks_s)
    d_idx = cupy.asarray(idx)
    if in_place or not isinstance(base_s, cupy.ndarray):
        base = cupy.array(base_s, copy=True)  # never modify the caller's array
    else:
        base = base_s
    out = base if in_place else garbage(g.x_shape, dtype)
    ws = _workspace(lib.tsc_sparse_scatter_gpu_workspace_bytes(geo.ctypes.data, len(idx)))
    _check(
        lib.tsc_sparse_scatter_gpu(
            FORMATS[dtype],
            dev_ptr(blocks),
            dev_ptr(d_idx),
            len(idx),
            dev_ptr(base),
            dev_ptr(out),
            int(add),
            geo.ctypes.data,
            dev_ptr(ws),
            stream.ptr,
        )
    )
    stream.synchronize()
    return out if raw else cupy.asnumpy(out)


def assert_bits_equal(name, got, want):
    got, want = np.ascontiguousarray(got), np.ascontiguousarray(want)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
    if got.size == 0:
        return
    # Compare bit patterns: NaN (an unwritten entry) never matches a value.
    ok = got.view(np.uint8).reshape(got.shape + (-1,)) == want.view(np.uint8).reshape(want.shape + (-1,))
    fail_where(name, ~ok.all(axis=-1), got, want, "differ")


def check_rows(name, got, sure, maybe):
    """got: increasing (b, bh, bw), containing every `sure` row and only
    `sure` or `maybe` rows."""
    got = np.asarray(got).reshape(-1, 3)
    keys = [tuple(r) for r in got.tolist()]
    assert keys == sorted(set(keys)), f"{name}: rows not strictly increasing: {keys[:20]}"
    got_set, sure_set = set(keys), {tuple(r) for r in sure.tolist()}
    maybe_set = {tuple(r) for r in maybe.tolist()}
    missing = sure_set - got_set
    extra = got_set - sure_set - maybe_set
    assert not missing and not extra, f"{name}: missing {sorted(missing)[:10]}, extra {sorted(extra)[:10]}"


# ----------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------

# (name, geometry). Blocks hang off the bottom / right edge in most cases.
CASES = [
    ("plain_4x4", make_geometry(2, 17, 19, 8, (4, 4))),
    ("halo_6x6_s4_neg_offset", make_geometry(2, 16, 15, 5, (6, 6), (4, 4), (-1, -1))),
    ("stride1_3x3", make_geometry(1, 9, 8, 3, (3, 3), (1, 1), (-1, -1))),
    ("rect_5x7_s3x6_mixed_offset", make_geometry(3, 13, 21, 16, (5, 7), (3, 6), (2, -3))),
    ("blocks_larger_than_image", make_geometry(1, 7, 6, 4, (10, 9), (10, 9), (-2, -1))),
    ("far_negative_offset", make_geometry(2, 8, 9, 2, (3, 3), (2, 2), (-5, -6))),
    ("c1", make_geometry(2, 11, 10, 1, (3, 4), (2, 3), (0, -1))),
    ("c3_odd", make_geometry(2, 10, 12, 3, (4, 3), (4, 3), (-1, 0))),
    ("gaps_stride_gt_size", make_geometry(2, 20, 20, 4, (3, 3), (5, 5), (1, 0))),
    ("one_pixel_blocks", make_geometry(1, 5, 6, 6, (1, 1), (1, 1))),
    ("wide_channels", make_geometry(1, 9, 9, 72, (4, 4), (3, 3), (-1, -1))),
    ("many_tiles", make_geometry(2, 130, 129, 2, (2, 2), (2, 2))),
]

# Geometries where at least one dimension is empty.
EMPTY_CASES = [
    ("batch0", make_geometry(0, 6, 7, 3, (3, 3))),
    ("c0", make_geometry(2, 6, 7, 0, (3, 3))),
    ("h0", make_geometry(2, 0, 7, 3, (3, 3), (2, 2), (-1, 0))),
    ("all0", make_geometry(0, 0, 0, 0, (1, 1))),
]


def case_ids(cases):
    return [c[0] for c in cases]


# ----------------------------------------------------------------------------
# Tests that need nothing but NumPy (the reference itself)
# ----------------------------------------------------------------------------


def test_grid_size_matches_definition():
    """The grid formula against 'blocks until one reaches the end'."""
    for length in range(0, 12):
        for size in range(1, 6):
            for stride in range(1, 6):
                for offset in range(-7, 5):
                    count = 1
                    while offset + (count - 1) * stride + size < length:
                        count += 1
                    assert grid_size(length, size, stride, offset) == count


@pytest.mark.parametrize(
    "g",
    [
        make_geometry(2, 5, 6, 2, (3, 2), (2, 2), (-1, 1)),
        make_geometry(1, 4, 5, 3, (2, 3), (1, 1), (-2, 0)),
        make_geometry(1, 3, 3, 1, (5, 4), (5, 4), (-1, -1)),
        make_geometry(2, 6, 4, 2, (2, 2), (3, 3), (-4, 0)),
    ],
    ids=["halo", "stride1", "big_blocks", "gaps_far_offset"],
)
def test_reference_matches_literal_semantics(g):
    rng = np.random.default_rng(1)
    x = to_float64(random_values(rng, g.x_shape, "float64"), "float64")
    idx = random_indices(rng, g, frac=0.7, dup=3, bad=4)
    blocks = rng.standard_normal(g.blocks_shape(len(idx)))
    base = rng.standard_normal(g.x_shape)
    np.testing.assert_array_equal(ref_gather(x, idx, g), naive_gather(x, idx, g))
    np.testing.assert_array_equal(
        ref_scatter_write(blocks, idx, base, g), naive_scatter(blocks, idx, base, g, False)
    )
    exact, _ = exact_scatter_add(blocks, idx, base, g)
    np.testing.assert_allclose(exact, naive_scatter(blocks, idx, base, g, True), rtol=1e-12, atol=1e-12)
    # The float emulation of scatter-add is the literal per-element loop in
    # float32, bit for bit.
    b32, base32 = to_storage(blocks, "float32"), to_storage(base, "float32")
    emulated = ref_scatter_add(b32, idx, base32, g, "float32")
    literal = naive_scatter(b32, idx, base32, g, True, acc_t=np.float32).astype(np.float32)
    assert_bits_equal("scatter_add emulation", emulated, literal)
    mask = x[..., 0]
    for avgpool in (False, True):
        for thr in (-0.5, 0.0, 0.7):
            sure, maybe = ref_reduce_mask(mask, g, thr, avgpool, "float64")
            assert len(maybe) == 0 or avgpool
            check_rows("reduce_mask reference", naive_reduce_mask(mask, g, thr, avgpool), sure, maybe)


def test_reference_gather_scatter_adjoint():
    """<gather(x), blocks> == <x, scatter_add(blocks, base=0)>."""
    g = make_geometry(2, 9, 8, 3, (4, 5), (3, 2), (-2, -1))
    rng = np.random.default_rng(2)
    x = rng.standard_normal(g.x_shape)
    idx = random_indices(rng, g, frac=0.6, dup=4, bad=3)
    blocks = rng.standard_normal(g.blocks_shape(len(idx)))
    lhs = float(np.sum(ref_gather(x, idx, g) * blocks))
    scattered, _ = exact_scatter_add(blocks, idx, np.zeros(g.x_shape), g)
    np.testing.assert_allclose(lhs, float(np.sum(x * scattered)), rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_scatter_add_rounding(dtype):
    """The dtype emulation of scatter-add is within rounding of the exact sum."""
    g = make_geometry(1, 10, 11, 3, (4, 4), (2, 3), (-1, -2))
    rng = np.random.default_rng(3)
    idx = random_indices(rng, g, frac=1.0, dup=5)
    blocks_s = random_values(rng, g.blocks_shape(len(idx)), dtype)
    base_s = random_values(rng, g.x_shape, dtype)
    got = to_float64(ref_scatter_add(blocks_s, idx, base_s, g, dtype), dtype)
    exact, mag = exact_scatter_add(to_float64(blocks_s, dtype), idx, to_float64(base_s, dtype), g)
    u_out = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24, "float64": 2.0**-53}[dtype]
    terms = len(idx) + 1
    tiny = 2.0**-24 if dtype == "float16" else 0.0  # subnormal results
    bound = mag * (terms * U_ACC[dtype]) + np.abs(exact) * u_out * 1.0001 + tiny
    assert np.all(np.abs(got - exact) <= bound)


def test_reference_avgpool_rowmajor_matches_exact():
    g = make_geometry(2, 13, 12, 1, (4, 3), (3, 3), (-1, -1))
    rng = np.random.default_rng(4)
    for dtype in DTYPES:
        mask_s = random_values(rng, g.mask_shape, dtype)
        for thr in (-0.3, 0.0, 0.4):
            sure, maybe = ref_reduce_mask(to_float64(mask_s, dtype), g, thr, True, dtype)
            check_rows("row-major emulation", rowmajor_reduce_mask_avg(mask_s, g, thr, dtype), sure, maybe)


def test_geometry_helper():
    g = make_geometry(2, 17, 19, 8, (4, 4))
    assert (g.grid_h, g.grid_w) == (5, 5)
    g = make_geometry(1, 16, 15, 5, (6, 6), (4, 4), (-1, -1))
    assert (g.grid_h, g.grid_w) == (4, 4)
    assert g.as_int64().tolist() == [1, 16, 15, 5, 6, 6, 4, 4, -1, -1, 4, 4]
    assert make_geometry(1, 0, 0, 1, (3, 3)).grid_h == 1


# ----------------------------------------------------------------------------
# Tests that need nvcc only
# ----------------------------------------------------------------------------


def test_block_sparse_kernels_compile(gpu_kernels_lib, tsc_gpu_build):
    """block_sparse_op_gpu.cu.cc is in the library with its entry points."""
    assert_compiled(gpu_kernels_lib, tsc_gpu_build, "block_sparse_op_gpu.cu.cc", ENTRY_POINTS)


def test_workspace_sizes(gpu_kernels_lib):
    lib = _declare(ctypes.CDLL(gpu_kernels_lib))
    for _, g in CASES + EMPTY_CASES:
        geo = g.as_int64().ctypes.data
        tiles = -(-g.cells // 4096)
        rm = lib.tsc_reduce_mask_gpu_workspace_bytes(geo)
        if g.cells:
            assert rm >= g.cells + 8 * (tiles + 1), (g, rm)
        else:
            assert rm == 0
        for n in (0, 1, 37):
            ss = lib.tsc_sparse_scatter_gpu_workspace_bytes(geo, n)
            if g.cells and n:
                assert ss >= 4 * (2 * g.cells + 1) + 8 * (tiles + 1) + 8 * n, (g, n, ss)
            else:
                assert ss == 0
    # Invalid geometry or null: 0 (the launchers report the error).
    bad = replace(CASES[0][1], stride_h=0).as_int64()
    assert lib.tsc_reduce_mask_gpu_workspace_bytes(bad.ctypes.data) == 0
    assert lib.tsc_sparse_scatter_gpu_workspace_bytes(bad.ctypes.data, 5) == 0
    assert lib.tsc_reduce_mask_gpu_workspace_bytes(None) == 0
    assert lib.tsc_sparse_scatter_gpu_workspace_bytes(None, 5) == 0
    assert lib.tsc_sparse_scatter_gpu_workspace_bytes(CASES[0][1].as_int64().ctypes.data, -1) == 0


def test_argument_errors(gpu_kernels_lib):
    """Invalid arguments are reported before any CUDA call (no GPU needed)."""
    lib = _declare(ctypes.CDLL(gpu_kernels_lib))
    good = make_geometry(2, 8, 8, 3, (3, 3), (2, 2), (-1, -1))
    count = ctypes.c_int64(-1)

    def geo(**kw):
        return replace(good, **kw).as_int64()

    def errors(fmt, geometry, n=4):
        p = geometry.ctypes.data if geometry is not None else None
        return [
            lib.tsc_reduce_mask_count_gpu(fmt, None, 0.0, 0, p, None, ctypes.byref(count), None),
            lib.tsc_sparse_gather_gpu(fmt, None, None, n, None, p, None),
            lib.tsc_sparse_scatter_gpu(fmt, None, None, n, None, None, 1, p, None, None),
        ]

    for fmt, g, text in [
        (7, good.as_int64(), b"unknown float format"),
        (-1, good.as_int64(), b"unknown float format"),
        (2, None, b"geometry is null"),
        (2, geo(batch=-1), b"negative dimension"),
        (2, geo(c=-2), b"negative dimension"),
        (2, geo(grid_w=-1), b"negative dimension"),
        (2, geo(size_h=0), b"block size must be >= 1"),
        (2, geo(size_w=-3), b"block size must be >= 1"),
        (2, geo(stride_h=0), b"block stride must be >= 1"),
        (2, geo(stride_w=-1), b"block stride must be >= 1"),
        (2, geo(batch=2**40, h=2**40), b"too large"),
        (2, geo(grid_h=2**30, grid_w=2**30), b"block grid too large"),
        (2, geo(offset_h=2**62), b"coordinates too large"),
        (2, geo(offset_w=-(2**62)), b"coordinates too large"),
        (2, geo(stride_w=2**61), b"coordinates too large"),
    ]:
        for err in errors(fmt, g):
            assert err is not None and text in err, (fmt, g, err)
    for n, text in [(-1, b"negative number of blocks"), (2**31, b"too many blocks")]:
        for err in errors(2, good.as_int64(), n)[1:]:
            assert err is not None and text in err, (n, err)
    p = good.as_int64()
    pp = p.ctypes.data
    # ReduceMask: a grid that int32 rows cannot hold, a null count, no
    # workspace, a count that phase 1 cannot have returned.
    err = lib.tsc_reduce_mask_count_gpu(
        2, None, 0.0, 0, geo(grid_w=2**31).ctypes.data, None, ctypes.byref(count), None
    )
    assert err is not None and b"int32" in err, err
    err = lib.tsc_reduce_mask_count_gpu(2, None, 0.0, 0, pp, None, None, None)
    assert err is not None and b"count is null" in err, err
    err = lib.tsc_reduce_mask_count_gpu(2, None, 0.0, 1, pp, None, ctypes.byref(count), None)
    assert err is not None and b"workspace" in err, err
    for bad_count in (-1, good.cells + 1):
        err = lib.tsc_reduce_mask_indices_gpu(pp, None, None, bad_count, None)
        assert err is not None and b"count out of range" in err, err
    assert lib.tsc_reduce_mask_indices_gpu(None, None, None, 0, None) == b"tsc_block_sparse: geometry is null"
    # Scatter with blocks but no workspace.
    err = lib.tsc_sparse_scatter_gpu(2, None, None, 3, None, None, 0, pp, None, None)
    assert err is not None and b"workspace" in err, err
    # Nothing to do: success without touching CUDA.
    count.value = -1
    for fmt in range(4):
        assert (
            lib.tsc_reduce_mask_count_gpu(
                fmt, None, 0.0, 1, geo(batch=0).ctypes.data, None, ctypes.byref(count), None
            )
            is None
        )
        assert count.value == 0
        assert lib.tsc_reduce_mask_indices_gpu(pp, None, None, 0, None) is None
        assert lib.tsc_sparse_gather_gpu(fmt, None, None, 0, None, pp, None) is None
        assert lib.tsc_sparse_gather_gpu(fmt, None, None, 5, None, geo(c=0).ctypes.data, None) is None
        for add in (0, 1):
            assert (
                lib.tsc_sparse_scatter_gpu(
                    fmt, None, None, 5, None, None, add, geo(batch=0).ctypes.data, None, None
                )
                is None
            )
            assert lib.tsc_sparse_scatter_gpu(fmt, None, None, 0, None, None, add, pp, None, None) is None


# ----------------------------------------------------------------------------
# GPU tests
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,g", CASES, ids=case_ids(CASES))
def test_gather(bs_lib, dtype, name, g):
    rng = np.random.default_rng(len(name))
    x_s = random_values(rng, g.x_shape, dtype)
    idx = random_indices(rng, g, frac=0.6, dup=2, bad=5)
    assert_bits_equal("gather", run_gather(bs_lib, x_s, idx, g, dtype), ref_gather(x_s, idx, g))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,g", CASES, ids=case_ids(CASES))
def test_scatter_add(bs_lib, dtype, name, g):
    rng = np.random.default_rng(100 + len(name))
    idx = random_indices(rng, g, frac=0.7, dup=3, bad=5)  # random order
    blocks_s = random_values(rng, g.blocks_shape(len(idx)), dtype)
    base_s = random_values(rng, g.x_shape, dtype)
    got = run_scatter(bs_lib, blocks_s, idx, base_s, g, dtype, add=True)
    assert_bits_equal("scatter_add", got, ref_scatter_add(blocks_s, idx, base_s, g, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,g", CASES, ids=case_ids(CASES))
def test_scatter_write(bs_lib, dtype, name, g):
    rng = np.random.default_rng(200 + len(name))
    # Overlaps and repeats included: the last block in index order wins.
    idx = random_indices(rng, g, frac=0.7, dup=3, bad=5)
    blocks_s = random_values(rng, g.blocks_shape(len(idx)), dtype)
    base_s = random_values(rng, g.x_shape, dtype)
    want = ref_scatter_write(blocks_s, idx, base_s, g)
    assert_bits_equal("scatter_write", run_scatter(bs_lib, blocks_s, idx, base_s, g, dtype, add=False), want)
    got = run_scatter(bs_lib, blocks_s, idx, base_s, g, dtype, add=False, in_place=True)
    assert_bits_equal("scatter_write in place", got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,g", CASES, ids=case_ids(CASES))
def test_reduce_mask(bs_lib, dtype, name, g):
    rng = np.random.default_rng(300 + len(name))
    mask_s = random_values(rng, g.mask_shape, dtype)
    mask = to_float64(mask_s, dtype)
    for avgpool, thresholds in ((False, (-np.inf, -1.0, 2.5, 3.9, 10.0)), (True, (-0.2, 0.0, 0.3))):
        for thr in thresholds:
            got = run_reduce_mask(bs_lib, mask_s, g, thr, avgpool, dtype)
            sure, maybe = ref_reduce_mask(mask, g, thr, avgpool, dtype)
            check_rows(f"reduce_mask avgpool={avgpool} thr={thr}", got, sure, maybe)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reduce_mask_avgpool_rowmajor_order(bs_lib, dtype):
    """avgpool sums each block in row-major order in float / double (the CPU
    kernel's order), so both devices select the same blocks."""
    for name, g in CASES:
        rng = np.random.default_rng(400 + len(name))
        mask_s = random_values(rng, g.mask_shape, dtype, lo=0.01, hi=1.0)
        for thr in (-0.05, 0.0, 0.05):
            got = run_reduce_mask(bs_lib, mask_s, g, thr, True, dtype)
            np.testing.assert_array_equal(got, rowmajor_reduce_mask_avg(mask_s, g, thr, dtype), err_msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reduce_mask_empty_blocks(bs_lib, dtype):
    """Blocks with no in-range part: max -inf (never active), average 0."""
    g = make_geometry(2, 6, 7, 1, (3, 3), (2, 2), (-7, -6))
    assert g.grid_h >= 5 and g.grid_w >= 5
    mask_s = random_values(np.random.default_rng(5), g.mask_shape, dtype)
    mask = to_float64(mask_s, dtype)
    empty = set()
    for cell in np.ndindex(2, g.grid_h, g.grid_w):
        _, ys, xs, _, _ = placement(cell, g)
        if ys.stop <= ys.start or xs.stop <= xs.start:
            empty.add(cell)
    assert len(empty) >= 2 * (g.grid_h + g.grid_w)  # two block rows and columns at least
    # max: every block with pixels is active at -inf, the empty ones never.
    got = {tuple(r) for r in run_reduce_mask(bs_lib, mask_s, g, -np.inf, False, dtype).tolist()}
    assert got == set(np.ndindex(2, g.grid_h, g.grid_w)) - empty
    # avgpool: empty blocks average 0.
    got = {tuple(r) for r in run_reduce_mask(bs_lib, mask_s, g, -1e-30, True, dtype).tolist()}
    assert empty <= got
    got = {tuple(r) for r in run_reduce_mask(bs_lib, mask_s, g, 0.0, True, dtype).tolist()}
    assert not (empty & got)
    sure, maybe = ref_reduce_mask(mask, g, 0.0, True, dtype)
    check_rows("avgpool thr=0", sorted(got), sure, maybe)
    # mask with h = 0: one block row, nothing in range.
    g0 = make_geometry(3, 0, 5, 1, (2, 2))
    rows = run_reduce_mask(bs_lib, np.zeros(g0.mask_shape, STORAGE[dtype]), g0, -0.5, True, dtype)
    np.testing.assert_array_equal(rows, np.argwhere(np.ones((3, g0.grid_h, g0.grid_w))))
    assert len(run_reduce_mask(bs_lib, np.zeros(g0.mask_shape, STORAGE[dtype]), g0, -0.5, False, dtype)) == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_of_range_indices_only(bs_lib, dtype):
    g = make_geometry(2, 7, 9, 3, (3, 4), (2, 3), (-1, -1))
    rng = np.random.default_rng(6)
    idx = bad_rows(g)
    x_s = random_values(rng, g.x_shape, dtype)
    got = run_gather(bs_lib, x_s, idx, g, dtype)
    assert not got.view(np.uint8).any()  # all +0
    blocks_s = random_values(rng, g.blocks_shape(len(idx)), dtype)
    for add in (False, True):
        assert_bits_equal("scatter bad rows", run_scatter(bs_lib, blocks_s, idx, x_s, g, dtype, add), x_s)


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_of_range_rows_stay_in_bounds(bs_lib, dtype):
    """Index values are not checked on the GPU (README, "Validation on GPU"): bad rows (out of
    range every way, int32 extremes included) among good ones gather zeros and are skipped by
    both scatters, and nothing is written outside the output or the workspace (the guard zones
    around them keep their bytes)."""
    g = make_geometry(2, 7, 9, 3, (3, 4), (2, 3), (-1, -1))
    rng = np.random.default_rng(9)
    idx = random_indices(rng, g, frac=0.5, dup=2, bad=24)
    assert sum(not valid(row, g) for row in idx) == 24
    x_s = random_values(rng, g.x_shape, dtype)
    blocks_s = random_values(rng, g.blocks_shape(len(idx)), dtype)
    stream = cupy.cuda.get_current_stream()
    geo = g.as_int64()
    x, d_idx, d_blocks = cupy.asarray(x_s), cupy.asarray(idx), cupy.asarray(blocks_s)
    shape = g.blocks_shape(len(idx))
    out, p = guarded(blocks_s.nbytes)
    _check(
        bs_lib.tsc_sparse_gather_gpu(
            FORMATS[dtype], dev_ptr(x), dev_ptr(d_idx), len(idx), p, geo.ctypes.data, stream.ptr
        )
    )
    stream.synchronize()
    assert_guards("gather output", out)
    assert_bits_equal("gather", guarded_contents(out, shape, dtype), ref_gather(x_s, idx, g))
    for add in (False, True):
        out, p = guarded(x_s.nbytes)
        ws, w = guarded(bs_lib.tsc_sparse_scatter_gpu_workspace_bytes(geo.ctypes.data, len(idx)))
        _check(
            bs_lib.tsc_sparse_scatter_gpu(
                FORMATS[dtype],
                dev_ptr(d_blocks),
                dev_ptr(d_idx),
                len(idx),
                dev_ptr(x),
                p,
                int(add),
                geo.ctypes.data,
                w,
                stream.ptr,
            )
        )
        stream.synchronize()
        assert_guards(f"scatter (add={add}) output", out)
        assert_guards(f"scatter (add={add}) workspace", ws)
        want = (
            ref_scatter_add(blocks_s, idx, x_s, g, dtype) if add else ref_scatter_write(blocks_s, idx, x_s, g)
        )
        assert_bits_equal(f"scatter (add={add})", guarded_contents(out, g.x_shape, dtype), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,g", EMPTY_CASES, ids=case_ids(EMPTY_CASES))
def test_empty(bs_lib, dtype, name, g):
    rng = np.random.default_rng(7)
    x_s = random_values(rng, g.x_shape, dtype)
    for idx in (np.zeros((0, 3), np.int32), random_indices(rng, g, frac=0.5, bad=3)):
        got = run_gather(bs_lib, x_s, idx, g, dtype)
        assert_bits_equal("gather", got, ref_gather(x_s, idx, g))
        blocks_s = random_values(rng, g.blocks_shape(len(idx)), dtype)
        for add in (False, True):
            got = run_scatter(bs_lib, blocks_s, idx, x_s, g, dtype, add)
            want = (
                ref_scatter_add(blocks_s, idx, x_s, g, dtype)
                if add
                else ref_scatter_write(blocks_s, idx, x_s, g)
            )
            assert_bits_equal(f"scatter add={add}", got, want)
    mask_s = random_values(rng, g.mask_shape, dtype)
    for avgpool in (False, True):
        sure, maybe = ref_reduce_mask(to_float64(mask_s, dtype), g, -0.5, avgpool, dtype)
        check_rows(name, run_reduce_mask(bs_lib, mask_s, g, -0.5, avgpool, dtype), sure, maybe)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_n0_copies_base(bs_lib, dtype):
    g = CASES[1][1]
    base_s = random_values(np.random.default_rng(8), g.x_shape, dtype)
    for add in (False, True):
        got = run_scatter(
            bs_lib,
            np.zeros(g.blocks_shape(0), STORAGE[dtype]),
            np.zeros((0, 3), np.int32),
            base_s,
            g,
            dtype,
            add,
        )
        assert_bits_equal("scatter n=0", got, base_s)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_add_deterministic(bs_lib, dtype):
    """Heavy overlap (stride 1, repeats): bitwise equal across runs and to
    the index-order reference."""
    g = make_geometry(2, 24, 23, 37, (5, 5), (1, 2), (-2, -2))
    rng = np.random.default_rng(9)
    idx = random_indices(rng, g, frac=0.9, dup=40, bad=6)
    blocks_s = random_values(rng, g.blocks_shape(len(idx)), dtype)
    base_s = random_values(rng, g.x_shape, dtype)
    first = run_scatter(bs_lib, blocks_s, idx, base_s, g, dtype, add=True)
    assert_bits_equal("scatter_add", first, ref_scatter_add(blocks_s, idx, base_s, g, dtype))
    for _ in range(3):
        assert_bits_equal(
            "scatter_add rerun", run_scatter(bs_lib, blocks_s, idx, base_s, g, dtype, add=True), first
        )
    # The order matters (float sums): a different order is a different
    # reference, and the kernel follows it.
    perm = rng.permutation(len(idx))
    got = run_scatter(bs_lib, blocks_s[perm], idx[perm], base_s, g, dtype, add=True)
    assert_bits_equal(
        "scatter_add permuted", got, ref_scatter_add(blocks_s[perm], idx[perm], base_s, g, dtype)
    )
    # Same cell many times in a row.
    many = np.repeat(idx[:1], 300, axis=0)
    blocks_m = random_values(rng, g.blocks_shape(len(many)), dtype)
    got = run_scatter(bs_lib, blocks_m, many, base_s, g, dtype, add=True)
    assert_bits_equal("scatter_add repeats", got, ref_scatter_add(blocks_m, many, base_s, g, dtype))
    mask_s = random_values(rng, g.mask_shape, dtype)
    rows = run_reduce_mask(bs_lib, mask_s, g, 0.1, True, dtype)
    for _ in range(2):
        np.testing.assert_array_equal(run_reduce_mask(bs_lib, mask_s, g, 0.1, True, dtype), rows)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_misaligned_pointers(bs_lib, dtype):
    """Pointers one element off 16-byte alignment: narrower copy units."""
    g = make_geometry(2, 9, 10, 8, (3, 4), (3, 3), (-1, 0))
    rng = np.random.default_rng(10)
    idx = random_indices(rng, g, frac=0.6, dup=2, bad=2)
    x_s = random_values(rng, g.x_shape, dtype)
    size = int(np.prod(g.x_shape))
    x_buf = cupy.empty(size + 1, dtype=STORAGE[dtype])
    x_dev = x_buf[1:].reshape(g.x_shape)
    x_dev[...] = cupy.asarray(x_s)
    stream = cupy.cuda.get_current_stream()
    geo = g.as_int64()
    d_idx = cupy.asarray(idx)
    out_buf = cupy.full(int(np.prod(g.blocks_shape(len(idx)))) + 1, np.nan, dtype=STORAGE[dtype])
    out = out_buf[1:]
    _check(
        bs_lib.tsc_sparse_gather_gpu(
            FORMATS[dtype],
            x_dev.data.ptr,
            d_idx.data.ptr,
            len(idx),
            out.data.ptr,
            geo.ctypes.data,
            stream.ptr,
        )
    )
    stream.synchronize()
    want = ref_gather(x_s, idx, g)
    assert_bits_equal("gather misaligned", cupy.asnumpy(out).reshape(want.shape), want)
    # Scatter-write from the misaligned blocks into a misaligned out.
    res_buf = cupy.full(size + 1, np.nan, dtype=STORAGE[dtype])
    res = res_buf[1:]
    ws = _workspace(bs_lib.tsc_sparse_scatter_gpu_workspace_bytes(geo.ctypes.data, len(idx)))
    base = cupy.asarray(x_s)
    blocks_s = random_values(rng, g.blocks_shape(len(idx)), dtype)
    out[...] = cupy.asarray(blocks_s).ravel()
    _check(
        bs_lib.tsc_sparse_scatter_gpu(
            FORMATS[dtype],
            out.data.ptr,
            d_idx.data.ptr,
            len(idx),
            base.data.ptr,
            res.data.ptr,
            0,
            geo.ctypes.data,
            dev_ptr(ws),
            stream.ptr,
        )
    )
    stream.synchronize()
    assert_bits_equal(
        "scatter misaligned", cupy.asnumpy(res).reshape(g.x_shape), ref_scatter_write(blocks_s, idx, x_s, g)
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_pipeline_reduce_gather_scatter(bs_lib, dtype):
    """reduce_mask -> gather -> scatter-write onto zeros restores x on the
    active blocks (non-overlapping) and leaves zeros elsewhere."""
    g = make_geometry(3, 33, 31, 6, (8, 8), (8, 8), (-3, -2))
    rng = np.random.default_rng(11)
    mask_s = random_values(rng, g.mask_shape, dtype)
    x_s = random_values(rng, g.x_shape, dtype)
    idx = run_reduce_mask(bs_lib, mask_s, g, 3.95, False, dtype)
    sure, _ = ref_reduce_mask(to_float64(mask_s, dtype), g, 3.95, False, dtype)
    np.testing.assert_array_equal(idx, sure)
    assert 0 < len(idx) < g.cells
    blocks = run_gather(bs_lib, x_s, idx, g, dtype)
    zeros = np.zeros(g.x_shape, dtype=STORAGE[dtype])
    got = run_scatter(bs_lib, blocks, idx, zeros, g, dtype, add=False)
    assert_bits_equal("roundtrip", got, ref_scatter_write(ref_gather(x_s, idx, g), idx, zeros, g))


def test_int64_index_path(bs_lib):
    """x with 2^31 elements (half): gather and scatter index with int64."""
    g = make_geometry(1, 2**15, 2**12, 16, (5, 7), (5, 7), (-2, -3))
    assert int(np.prod(g.x_shape)) == 2**31
    dtype = "float16"
    rng = np.random.default_rng(12)
    x = cupy.tile(cupy.asarray(random_values(rng, (1, 64, g.w, g.c), dtype)), (1, g.h // 64, 1, 1))
    idx = np.array(
        [
            (0, g.grid_h - 1, g.grid_w - 1),
            (0, 0, 0),
            (0, g.grid_h // 2, 7),
            (0, g.grid_h - 1, 0),
            (0, 1, g.grid_w - 1),
        ],
        dtype=np.int32,
    )
    idx = np.concatenate([idx, idx[:2]])  # repeats, for the add
    blocks = run_gather(bs_lib, None, idx, g, dtype, x_dev=x)

    def window(row):
        b, ys, xs, is_, js = placement(row, g)
        return (b, ys, xs), (is_, js)

    for k, row in enumerate(idx):
        (b, ys, xs), (is_, js) = window(row)
        want = np.zeros(g.blocks_shape(1)[1:], dtype=np.float16)
        want[is_, js] = cupy.asnumpy(x[b, ys, xs])
        assert_bits_equal(f"gather {tuple(row)}", blocks[k], want)
    out = run_scatter(bs_lib, blocks, idx, x, g, dtype, add=True, raw=True)
    for row in idx[:5]:
        (b, ys, xs), _ = window(row)
        acc = cupy.asnumpy(x[b, ys, xs]).astype(np.float32)
        for k, other in enumerate(idx):
            if tuple(other) == tuple(row):
                _, (is_, js) = window(other)
                acc += blocks[k, is_, js].astype(np.float32)
        assert_bits_equal(f"scatter {tuple(row)}", cupy.asnumpy(out[b, ys, xs]), acc.astype(np.float16))
    # Untouched pixels keep base.
    assert_bits_equal(
        "untouched", cupy.asnumpy(out[0, 100:110, 100:120]), cupy.asnumpy(x[0, 100:110, 100:120])
    )


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_timing(bs_lib, dtype, capsys):
    """Prints kernel times (informative only; no assertion on speed)."""
    lines = []
    fmt = FORMATS[dtype]
    for g, frac in (
        (make_geometry(8, 256, 256, 64, (18, 18), (16, 16), (-1, -1)), 0.3),
        (make_geometry(4, 512, 512, 32, (9, 9), (8, 8), (-1, -1)), 0.1),
    ):
        rng = np.random.default_rng(13)
        idx = random_indices(rng, g, frac=frac)
        n = len(idx)
        geo = g.as_int64().ctypes.data
        stream = cupy.cuda.get_current_stream()
        x = cupy.asarray(random_values(rng, g.x_shape, dtype))
        mask = cupy.asarray(random_values(rng, g.mask_shape, dtype))
        d_idx = cupy.asarray(idx)
        blocks = cupy.empty(g.blocks_shape(n), dtype=STORAGE[dtype])
        out = cupy.empty(g.x_shape, dtype=STORAGE[dtype])
        ws = _workspace(bs_lib.tsc_sparse_scatter_gpu_workspace_bytes(geo, n))
        ws_rm = _workspace(bs_lib.tsc_reduce_mask_gpu_workspace_bytes(geo))
        count = ctypes.c_int64(0)
        p = [a.data.ptr for a in (x, mask, d_idx, blocks, out, ws, ws_rm)]
        x_p, mask_p, idx_p, blocks_p, out_p, ws_p, ws_rm_p = p
        calls = [
            (
                "reduce_mask(count)",
                bs_lib.tsc_reduce_mask_count_gpu,
                (fmt, mask_p, 3.0, 0, geo, ws_rm_p, ctypes.byref(count), stream.ptr),
            ),
            ("gather", bs_lib.tsc_sparse_gather_gpu, (fmt, x_p, idx_p, n, blocks_p, geo, stream.ptr)),
            (
                "scatter_write",
                bs_lib.tsc_sparse_scatter_gpu,
                (fmt, blocks_p, idx_p, n, x_p, out_p, 0, geo, ws_p, stream.ptr),
            ),
            (
                "scatter_add",
                bs_lib.tsc_sparse_scatter_gpu,
                (fmt, blocks_p, idx_p, n, x_p, out_p, 1, geo, ws_p, stream.ptr),
            ),
        ]
        parts = []
        for label, f, args in calls:
            parts.append(f"{label} {time_ms(f, args, reps=10):.3f} ms")
        lines.append(
            f"{dtype} x{g.x_shape} block {g.size_h}x{g.size_w}/{g.stride_h} n={n}: " + ", ".join(parts)
        )
    with capsys.disabled():
        print("\n" + "\n".join(lines))
