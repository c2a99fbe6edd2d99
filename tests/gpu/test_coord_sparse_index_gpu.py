"""GPU tests of the index bookkeeping kernels (coord_sparse_index_op_gpu.cu.cc).

Runs the SparseConvRulebook phases (check, sites, pairs, write pairs) and
TopKSites through their ``extern "C"`` entry points (ctypes) on CuPy device
memory and compares them with independent NumPy oracles written from the op
docs in ``coord_sparse_ops.cc``:

* rulebook: out_coords (submanifold: the input coords; else every output
  position that reads an input site, sorted by (b, spatial...)), pair_ptr
  and pairs grouped by offset (row-major over the kernel) and sorted by
  out_row, found through a dict of the input sites; the first bad row, the
  first duplicate (rows A < B) and the batch size of the check phases;
* top-k sites: per sample the k rows with the largest score ("l2" or
  "abs_max", NaN above +inf, ties to the lower row), ascending. Features are
  multiples of 1/4 in a small range, so every score is exact in float and
  ties are real ties.

No TensorFlow needed. Skips (with the reason) when nvcc, CuPy or a GPU is
missing; the compile and argument-checking tests only need nvcc, the oracle
self-tests nothing.
"""

import ctypes
import itertools

import numpy as np
import pytest
from _common import FORMATS, assert_compiled, assert_guards, cupy, declare, dev_ptr, guarded_array, to_storage

ENTRY_POINTS = (
    "tsc_rulebook_check_gpu_workspace_bytes",
    "tsc_rulebook_check_gpu",
    "tsc_rulebook_sites_gpu_workspace_bytes",
    "tsc_rulebook_sites_gpu",
    "tsc_rulebook_pairs_gpu_workspace_bytes",
    "tsc_rulebook_pairs_gpu",
    "tsc_rulebook_write_pairs_gpu",
    "tsc_topk_sites_gpu_workspace_bytes",
    "tsc_topk_sites_gpu",
    "tsc_topk_sites_rows_gpu",
)


# ----------------------------------------------------------------------------
# NumPy oracles
# ----------------------------------------------------------------------------


def geometry(shape, kernel, strides, dilations):
    """(out_shape, pad) per axis for padding "SAME"."""
    out = [(length + s - 1) // s for length, s in zip(shape, strides)]
    pad = [
        max((o - 1) * s + (k - 1) * d + 1 - length, 0) // 2
        for o, s, k, d, length in zip(out, strides, kernel, dilations, shape)
    ]
    return out, pad


def ref_check(coords, shape):
    """(first bad row or n, batch size, (later, earlier) of the first duplicate or None)."""
    n = len(coords)
    for i, row in enumerate(coords):
        if row[0] < 0 or any(not 0 <= x < s for x, s in zip(row[1:], shape)):
            return i, None, None
    batch = int(coords[:, 0].max()) + 1 if n else 0
    seen = {}
    for i, row in enumerate(coords):
        key = tuple(int(x) for x in row)
        if key in seen:
            return n, batch, (i, seen[key])
        seen[key] = i
    return n, batch, None


def ref_rulebook(coords, shape, kernel, strides, dilations, submanifold):
    """(out_coords, pair_ptr, pairs) of valid, unique coords."""
    dims = len(shape)
    out_shape, pad = geometry(shape, kernel, strides, dilations)
    taps = list(itertools.product(*[range(k) for k in kernel]))  # row-major
    sites = {tuple(int(x) for x in row): i for i, row in enumerate(coords)}
    if submanifold:
        out = np.asarray(coords, np.int32).reshape(-1, dims + 1)
    else:
        found = set()
        for row in coords:
            for t in taps:
                o = []
                for a in range(dims):
                    num = int(row[1 + a]) + pad[a] - t[a] * dilations[a]
                    if num < 0 or num % strides[a] or num // strides[a] >= out_shape[a]:
                        break
                    o.append(num // strides[a])
                else:
                    found.add((int(row[0]), *o))
        out = np.array(sorted(found), np.int32).reshape(-1, dims + 1)
    pair_ptr, pairs = [0], []
    for t in taps:
        for j, row in enumerate(out):
            p = tuple(int(row[1 + a]) * strides[a] - pad[a] + t[a] * dilations[a] for a in range(dims))
            i = sites.get((int(row[0]), *p))
            if i is not None:
                pairs.append((i, j))
        pair_ptr.append(len(pairs))
    return out, np.array(pair_ptr, np.int32), np.array(pairs, np.int32).reshape(-1, 2)


def ref_topk_rows(values, batch, k, score):
    """values: exact float64 [n, c]; the kept rows, ascending."""
    n = len(values)
    rank = []
    for i in range(n):
        v = values[i]
        if np.isnan(v).any():
            s = np.inf
            nan = 1
        else:
            s = float(np.sqrt(np.sum(v * v))) if score == "l2" else float(np.max(np.abs(v), initial=0.0))
            nan = 0
        rank.append((int(batch[i]), -nan, -s, i))
    rank.sort()
    kept, count = [], {}
    for b, _, _, i in rank:
        if count.get(b, 0) < k:
            kept.append(i)
            count[b] = count.get(b, 0) + 1
    return np.array(sorted(kept), np.int32)


def random_sites(rng, batch, shape, n):
    """n unique sites in [0, batch) x shape, random order."""
    volume = batch * int(np.prod(shape))
    keys = rng.choice(volume, size=min(n, volume), replace=False)
    cols = []
    for s in reversed(shape):
        cols.append(keys % s)
        keys = keys // s
    cols.append(keys)
    return np.stack(cols[::-1], axis=1).astype(np.int32).reshape(-1, len(shape) + 1)


# ----------------------------------------------------------------------------
# Oracle self-tests (no GPU)
# ----------------------------------------------------------------------------


def test_ref_rulebook_by_hand():
    coords = np.array([[0, 0], [0, 1], [0, 3]], np.int32)
    out, ptr, pairs = ref_rulebook(coords, [4], [3], [1], [1], True)
    np.testing.assert_array_equal(out, coords)
    # offset 0 reads o - 1, offset 1 reads o, offset 2 reads o + 1
    np.testing.assert_array_equal(ptr, [0, 1, 4, 5])
    np.testing.assert_array_equal(pairs, [[0, 1], [0, 0], [1, 1], [2, 2], [1, 0]])
    out, ptr, pairs = ref_rulebook(coords, [4], [2], [2], [1], False)
    # out = 2, pad = 0: output o reads 2 o and 2 o + 1
    np.testing.assert_array_equal(out, [[0, 0], [0, 1]])
    np.testing.assert_array_equal(ptr, [0, 1, 3])
    np.testing.assert_array_equal(pairs, [[0, 0], [1, 0], [2, 1]])


def test_ref_check_and_topk_by_hand():
    coords = np.array([[0, 1], [1, 2], [0, 1], [1, 2]], np.int32)
    assert ref_check(coords, [3]) == (4, 2, (2, 0))
    assert ref_check(np.array([[0, 1], [0, 3]], np.int32), [3])[0] == 1
    values = np.array([[1.0], [np.nan], [-3.0], [3.0], [0.0]])
    batch = np.array([0, 0, 0, 0, 1])
    np.testing.assert_array_equal(ref_topk_rows(values, batch, 2, "l2"), [1, 2, 4])
    np.testing.assert_array_equal(ref_topk_rows(values, batch, 3, "abs_max"), [1, 2, 3, 4])


# ----------------------------------------------------------------------------
# Calling the kernels
# ----------------------------------------------------------------------------


def _declare(lib):
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    sigs = {
        "tsc_rulebook_check_gpu_workspace_bytes": ([], i64),
        "tsc_rulebook_check_gpu": ([p, p, i64, p, p, p, p, p], ctypes.c_char_p),
        "tsc_rulebook_sites_gpu_workspace_bytes": ([p, i64, i32], i64),
        "tsc_rulebook_sites_gpu": ([p, p, i64, i64, i32, p, p, p, p, p], ctypes.c_char_p),
        "tsc_rulebook_pairs_gpu_workspace_bytes": ([p, i64], i64),
        "tsc_rulebook_pairs_gpu": ([p, p, i64, i32, p, i64, p, p, p, p, p], ctypes.c_char_p),
        "tsc_rulebook_write_pairs_gpu": ([p, i64, p, i64, p, p], ctypes.c_char_p),
        "tsc_topk_sites_gpu_workspace_bytes": ([i64], i64),
        "tsc_topk_sites_gpu": ([i32, p, i64, i64, p, i64, i64, i32, p, p, p, p, p], ctypes.c_char_p),
        "tsc_topk_sites_rows_gpu": ([p, i64, i64, p, p], ctypes.c_char_p),
    }
    return declare(lib, sigs)


def _geometry_array(shape, kernel, strides, dilations):
    g = np.ones(13, np.int64)
    dims = len(shape)
    g[0] = dims
    g[1 : 1 + dims] = shape
    g[4 : 4 + dims] = kernel
    g[7 : 7 + dims] = strides
    g[10 : 10 + dims] = dilations
    return g


def _ok(err):
    assert err is None, err.decode()


def gpu_rulebook(lib, coords, shape, kernel, strides, dilations, submanifold):
    """("bad", row, values) | ("dup", later, earlier) | ("ok", batch, out, ptr, pairs)."""
    g = _geometry_array(shape, kernel, strides, dilations)
    gp = g.ctypes.data
    dims = len(shape)
    n = len(coords)
    stream = cupy.cuda.get_current_stream()
    d_coords = cupy.asarray(np.ascontiguousarray(coords, np.int32))
    ws = cupy.empty(lib.tsc_rulebook_check_gpu_workspace_bytes(), np.int8)
    bad, batch = ctypes.c_int64(-5), ctypes.c_int64(-5)
    values = (ctypes.c_int32 * 4)()
    _ok(
        lib.tsc_rulebook_check_gpu(
            gp, dev_ptr(d_coords), n, dev_ptr(ws), ctypes.byref(bad), values, ctypes.byref(batch), stream.ptr
        )
    )
    if bad.value < n:
        return "bad", bad.value, list(values)[: dims + 1]
    assert bad.value == n
    sub = int(submanifold)
    sites_bytes = lib.tsc_rulebook_sites_gpu_workspace_bytes(gp, n, sub)
    assert sites_bytes > 0
    sites_ws = cupy.empty(sites_bytes, np.int8)
    later, earlier, m = ctypes.c_int64(-5), ctypes.c_int64(-5), ctypes.c_int64(-5)
    _ok(
        lib.tsc_rulebook_sites_gpu(
            gp,
            dev_ptr(d_coords),
            n,
            batch.value,
            sub,
            dev_ptr(sites_ws),
            ctypes.byref(later),
            ctypes.byref(earlier),
            ctypes.byref(m),
            stream.ptr,
        )
    )
    if later.value >= 0:
        return "dup", later.value, earlier.value
    assert earlier.value == -1
    num_offsets = int(np.prod(kernel))
    out = cupy.full((m.value, dims + 1), -7, np.int32)
    pair_ptr = cupy.full(num_offsets + 1, -7, np.int32)
    pairs_bytes = lib.tsc_rulebook_pairs_gpu_workspace_bytes(gp, m.value)
    assert pairs_bytes > 0
    pairs_ws = cupy.empty(pairs_bytes, np.int8)
    total = ctypes.c_int64(-5)
    _ok(
        lib.tsc_rulebook_pairs_gpu(
            gp,
            dev_ptr(d_coords),
            n,
            sub,
            dev_ptr(sites_ws),
            m.value,
            dev_ptr(out),
            dev_ptr(pairs_ws),
            dev_ptr(pair_ptr),
            ctypes.byref(total),
            stream.ptr,
        )
    )
    pairs = cupy.full((total.value, 2), -7, np.int32)
    _ok(
        lib.tsc_rulebook_write_pairs_gpu(
            gp, m.value, dev_ptr(pairs_ws), total.value, dev_ptr(pairs), stream.ptr
        )
    )
    stream.synchronize()
    return "ok", batch.value, cupy.asnumpy(out), cupy.asnumpy(pair_ptr), cupy.asnumpy(pairs)


def gpu_topk(lib, stored, dtype, batch, width, k, score):
    n, c = stored.shape
    coords = np.zeros((n, width), np.int32)
    coords[:, 0] = batch
    if width > 1:
        coords[:, 1:] = np.arange(n)[:, None] % 5
    stream = cupy.cuda.get_current_stream()
    d_f = cupy.asarray(np.ascontiguousarray(stored))
    d_c = cupy.asarray(coords)
    ws = cupy.empty(lib.tsc_topk_sites_gpu_workspace_bytes(n), np.int8)
    bad, bad_batch, kept = ctypes.c_int64(-5), ctypes.c_int32(0), ctypes.c_int64(-5)
    _ok(
        lib.tsc_topk_sites_gpu(
            FORMATS[dtype],
            dev_ptr(d_f),
            n,
            c,
            dev_ptr(d_c),
            width,
            k,
            int(score == "l2"),
            dev_ptr(ws),
            ctypes.byref(bad),
            ctypes.byref(bad_batch),
            ctypes.byref(kept),
            stream.ptr,
        )
    )
    if bad.value < n:
        return "bad", bad.value, bad_batch.value
    rows = cupy.full(kept.value, -7, np.int32)
    _ok(lib.tsc_topk_sites_rows_gpu(dev_ptr(ws), n, kept.value, dev_ptr(rows), stream.ptr))
    stream.synchronize()
    return "ok", cupy.asnumpy(rows)


@pytest.fixture(scope="module")
def idx_lib(gpu_lib):
    return _declare(gpu_lib)


# ----------------------------------------------------------------------------
# Build / argument tests (nvcc only)
# ----------------------------------------------------------------------------


def test_coord_sparse_index_kernels_compile(gpu_kernels_lib, tsc_gpu_build):
    """coord_sparse_index_op_gpu.cu.cc is in the library with its entry points."""
    assert_compiled(gpu_kernels_lib, tsc_gpu_build, "coord_sparse_index_op_gpu.cu.cc", ENTRY_POINTS)


def test_argument_errors(gpu_kernels_lib):
    """Invalid arguments are reported before any CUDA call (no GPU needed)."""
    lib = _declare(ctypes.CDLL(gpu_kernels_lib))
    bad_geometry = np.zeros(13, np.int64)  # dims = 0
    out = ctypes.c_int64()
    values = (ctypes.c_int32 * 4)()
    err = lib.tsc_rulebook_check_gpu(
        bad_geometry.ctypes.data, None, 0, None, ctypes.byref(out), values, ctypes.byref(out), None
    )
    assert err is not None and b"invalid argument" in err
    g = _geometry_array([8, 8], [3, 3], [1, 1], [1, 1])
    assert lib.tsc_rulebook_sites_gpu_workspace_bytes(g.ctypes.data, 2**31, 1) < 0
    assert lib.tsc_rulebook_sites_gpu_workspace_bytes(g.ctypes.data, 2**28, 0) < 0  # N * K >= 2^31
    assert lib.tsc_rulebook_pairs_gpu_workspace_bytes(g.ctypes.data, 2**28) < 0
    assert lib.tsc_rulebook_sites_gpu_workspace_bytes(bad_geometry.ctypes.data, 4, 1) < 0
    assert lib.tsc_topk_sites_gpu_workspace_bytes(-1) < 0
    assert lib.tsc_topk_sites_gpu_workspace_bytes(2**31) < 0
    kept = ctypes.c_int64()
    b32 = ctypes.c_int32()
    err = lib.tsc_topk_sites_gpu(
        2, None, 0, 1, None, 2, 0, 1, None, ctypes.byref(out), ctypes.byref(b32), ctypes.byref(kept), None
    )
    assert err is not None and b"invalid argument" in err  # k = 0
    err = lib.tsc_topk_sites_gpu(
        9, None, 0, 1, None, 2, 1, 1, None, ctypes.byref(out), ctypes.byref(b32), ctypes.byref(kept), None
    )
    assert err is not None and b"unknown float format" in err
    err = lib.tsc_topk_sites_rows_gpu(None, 4, 5, None, None)  # kept > n
    assert err is not None and b"invalid argument" in err


# ----------------------------------------------------------------------------
# GPU tests
# ----------------------------------------------------------------------------

RULEBOOK_CASES = [
    # shape, kernel, strides, dilations, submanifold, batch, n
    ([7], [3], [1], [1], True, 2, 9),
    ([9], [4], [2], [2], False, 3, 12),
    ([6, 5], [3, 3], [1, 1], [1, 1], True, 2, 25),
    ([6, 5], [2, 3], [2, 1], [1, 2], False, 2, 25),
    ([5, 4, 6], [3, 3, 3], [1, 1, 1], [1, 1, 1], True, 2, 60),
    ([5, 4, 6], [2, 2, 2], [2, 2, 2], [1, 1, 1], False, 2, 60),
    ([7, 3, 5], [3, 1, 2], [3, 1, 2], [2, 1, 1], False, 3, 40),
    ([1, 1, 1], [3, 3, 3], [1, 1, 1], [1, 1, 1], False, 4, 4),
    ([40, 40, 40], [3, 3, 3], [1, 1, 1], [1, 1, 1], True, 3, 20000),
    ([40, 40, 40], [3, 3, 3], [2, 2, 2], [1, 1, 1], False, 3, 20000),
    ([300, 200], [5, 5], [1, 1], [2, 1], False, 2, 30000),
]


@pytest.mark.parametrize("case", range(len(RULEBOOK_CASES)))
def test_rulebook_matches_reference(idx_lib, case):
    shape, kernel, strides, dilations, sub, batch, n = RULEBOOK_CASES[case]
    rng = np.random.default_rng(case)
    for trial, count in enumerate([0, 1, n]):
        coords = random_sites(rng, batch, shape, count)
        got = gpu_rulebook(idx_lib, coords, shape, kernel, strides, dilations, sub)
        assert got[0] == "ok", (trial, got)
        want_batch = int(coords[:, 0].max()) + 1 if len(coords) else 0
        assert got[1] == want_batch
        out, ptr, pairs = ref_rulebook(coords, shape, kernel, strides, dilations, sub)
        np.testing.assert_array_equal(got[2], out)
        np.testing.assert_array_equal(got[3], ptr)
        np.testing.assert_array_equal(got[4], pairs)


def test_rulebook_deterministic(idx_lib):
    rng = np.random.default_rng(7)
    coords = random_sites(rng, 2, [30, 30, 30], 8000)
    a = gpu_rulebook(idx_lib, coords, [30, 30, 30], [3, 3, 3], [2, 2, 2], [1, 1, 1], False)
    b = gpu_rulebook(idx_lib, coords, [30, 30, 30], [3, 3, 3], [2, 2, 2], [1, 1, 1], False)
    for x, y in zip(a[2:], b[2:]):
        np.testing.assert_array_equal(x, y)


def test_rulebook_errors(idx_lib):
    rng = np.random.default_rng(11)
    shape = [6, 7]
    for trial in range(30):
        coords = random_sites(rng, 3, shape, 40)
        kind = trial % 3
        if kind == 0:
            coords[rng.integers(40), 0] = -int(rng.integers(1, 5))
        elif kind == 1:
            a = int(rng.integers(2))
            coords[rng.integers(40), 1 + a] = shape[a] + int(rng.integers(0, 3)) if trial % 2 else -1
        for _ in range(2):  # a second bad row later or earlier
            if kind < 2 and rng.random() < 0.5:
                coords[rng.integers(40), 0] = -1
        if kind == 2:
            i, j = sorted(rng.choice(40, size=2, replace=False))
            coords[j] = coords[i]
            if rng.random() < 0.5:
                k, m = sorted(rng.choice(40, size=2, replace=False))
                coords[m] = coords[k]
        bad, _, dup = ref_check(coords, shape)
        got = gpu_rulebook(idx_lib, coords, shape, [3, 3], [1, 1], [1, 1], True)
        if bad < len(coords):
            assert got[0] == "bad" and got[1] == bad, got
            assert got[2] == list(coords[bad])
        else:
            assert dup is not None
            assert got == ("dup", dup[0], dup[1])


def test_unchecked_coords_stay_in_bounds(idx_lib):
    """Phases 2-4 take coords that phase 1 accepted (the op stops at phase 1's error). Fed
    out-of-range coords anyway, as a caller that skipped the check would, they return a
    meaningless rulebook but stay in bounds: no CUDA error, every pair within [0, N) x [0, M),
    pair_ptr non-decreasing from 0 to P, nothing written outside the outputs (guard zones)."""
    rng = np.random.default_rng(13)
    shape = [6, 7]
    i32 = np.iinfo(np.int32)
    coords = random_sites(rng, 3, shape, 40)
    bad = [[-1, 2, 2], [0, 6, 1], [1, -4, 7], [i32.min, i32.max, 0], [2, 0, i32.min], [i32.max, 5, 5]]
    coords[[3, 17, 25, 31, 36, 38]] = bad
    n = len(coords)
    d_coords = cupy.asarray(np.ascontiguousarray(coords, np.int32))
    stream = cupy.cuda.get_current_stream()
    for kernel, strides, submanifold in [([3, 3], [1, 1], 1), ([3, 2], [2, 1], 0), ([2, 2], [2, 2], 0)]:
        g = _geometry_array(shape, kernel, strides, [1, 1])
        gp = g.ctypes.data
        sites_ws = cupy.empty(idx_lib.tsc_rulebook_sites_gpu_workspace_bytes(gp, n, submanifold), np.int8)
        later, earlier, m = ctypes.c_int64(-5), ctypes.c_int64(-5), ctypes.c_int64(-5)
        _ok(
            idx_lib.tsc_rulebook_sites_gpu(
                gp, dev_ptr(d_coords), n, 3, submanifold, dev_ptr(sites_ws),
                ctypes.byref(later), ctypes.byref(earlier), ctypes.byref(m), stream.ptr,
            )
        )  # fmt: skip
        assert 0 <= m.value <= n * int(np.prod(kernel))
        num_offsets = int(np.prod(kernel))
        out_whole, out = guarded_array((m.value, 3), np.int32)
        ptr_whole, pair_ptr = guarded_array((num_offsets + 1,), np.int32)
        pairs_ws = cupy.empty(idx_lib.tsc_rulebook_pairs_gpu_workspace_bytes(gp, m.value), np.int8)
        total = ctypes.c_int64(-5)
        _ok(
            idx_lib.tsc_rulebook_pairs_gpu(
                gp, dev_ptr(d_coords), n, submanifold, dev_ptr(sites_ws), m.value, dev_ptr(out),
                dev_ptr(pairs_ws), dev_ptr(pair_ptr), ctypes.byref(total), stream.ptr,
            )
        )  # fmt: skip
        assert 0 <= total.value <= m.value * num_offsets
        pairs_whole, pairs = guarded_array((total.value, 2), np.int32)
        _ok(
            idx_lib.tsc_rulebook_write_pairs_gpu(
                gp, m.value, dev_ptr(pairs_ws), total.value, dev_ptr(pairs), stream.ptr
            )
        )
        stream.synchronize()
        for name, whole in (("out_coords", out_whole), ("pair_ptr", ptr_whole), ("pairs", pairs_whole)):
            assert_guards(name, whole)
        ptr_host, pairs_host = cupy.asnumpy(pair_ptr), cupy.asnumpy(pairs)
        assert ptr_host[0] == 0 and ptr_host[-1] == total.value and (np.diff(ptr_host) >= 0).all()
        assert ((pairs_host[:, 0] >= 0) & (pairs_host[:, 0] < n)).all()
        assert ((pairs_host[:, 1] >= 0) & (pairs_host[:, 1] < m.value)).all()


TOPK_DTYPES = list(FORMATS)


@pytest.mark.parametrize("dtype", TOPK_DTYPES)
@pytest.mark.parametrize("score", ["l2", "abs_max"])
def test_topk_sites_matches_reference(idx_lib, dtype, score):
    rng = np.random.default_rng(FORMATS[dtype] * 2 + (score == "l2"))
    for trial in range(12):
        n = int(rng.choice([0, 1, 7, 100, 5000]))
        c = int(rng.choice([0, 1, 3, 16]))
        values = rng.integers(-8, 9, size=(n, c)) / 4.0
        if n and c and trial % 3 == 0:
            for _ in range(4):
                values[rng.integers(n), rng.integers(c)] = rng.choice([np.nan, np.inf, -np.inf, -0.0])
        spread = int(rng.choice([1, 3, 50, 10**6]))
        batch = rng.integers(0, spread, size=n)
        k = int(rng.choice([1, 2, 5, 1000]))
        width = int(rng.integers(2, 5))
        got = gpu_topk(idx_lib, to_storage(values, dtype), dtype, batch, width, k, score)
        assert got[0] == "ok", got
        np.testing.assert_array_equal(got[1], ref_topk_rows(values, batch, k, score))


def test_topk_sites_negative_batch(idx_lib):
    values = np.ones((10, 2))
    batch = np.array([0, 1, 2, -3, 0, -1, 0, 0, 0, 0])
    assert gpu_topk(idx_lib, to_storage(values, "float32"), "float32", batch, 2, 2, "l2") == ("bad", 3, -3)
