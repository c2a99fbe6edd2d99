"""GPU tests of the top-k mask kernels (tf_sparseconv/cc/kernels/topk_op_gpu.cu.cc).

Runs the kernels through their ``extern "C"`` entry points (ctypes) on CuPy
device memory and compares them, bit for bit, with an independent NumPy
reference built on stable sorts. No TensorFlow needed. Skips (with the reason)
when nvcc, CuPy or a GPU is missing; ``test_kernels_compile`` only needs nvcc.
"""

import ctypes
import os
import time

import numpy as np
import pytest
from _common import DTYPES, FORMATS, assert_guards, cupy, declare, fail_where, guarded_array, time_ms

UINT = {"float16": np.uint16, "bfloat16": np.uint16, "float32": np.uint32, "float64": np.uint64}
MODES = {"value": 0, "abs": 1, "relu": 2}

# Sign bit, +inf bit pattern and the quiet-NaN bit of every format.
SIGN = {"float16": 0x8000, "bfloat16": 0x8000, "float32": 0x80000000, "float64": 0x8000000000000000}
INF = {"float16": 0x7C00, "bfloat16": 0x7F80, "float32": 0x7F800000, "float64": 0x7FF0000000000000}
QUIET = {"float16": 0x0200, "bfloat16": 0x0040, "float32": 0x00400000, "float64": 0x0008000000000000}


# ----------------------------------------------------------------------------
# Conversions and data
# ----------------------------------------------------------------------------


def f32_to_bf16_bits(values):
    """bfloat16 bit patterns of float32 values (round to nearest even)."""
    f = np.ascontiguousarray(values, dtype=np.float32)
    b = f.view(np.uint32).astype(np.uint64)
    out = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(f)
    out[nan] = ((b[nan] >> 16) | 0x40).astype(np.uint16)  # stay NaN
    return out


def float_to_bits(values, dtype):
    values = np.asarray(values, dtype=np.float64)
    if dtype == "float16":
        return values.astype(np.float16).view(np.uint16)
    if dtype == "bfloat16":
        return f32_to_bf16_bits(values.astype(np.float32))
    if dtype == "float32":
        return values.astype(np.float32).view(np.uint32)
    return values.view(np.uint64).copy()


def bits_to_float64(bits, dtype):
    """Exact float64 values of bit patterns (NaN stays NaN, -0 stays -0)."""
    bits = np.ascontiguousarray(bits, dtype=UINT[dtype])
    with np.errstate(invalid="ignore"):  # signalling NaNs warn on casts
        return _bits_to_float64(bits, dtype)


def _bits_to_float64(bits, dtype):
    if dtype == "float16":
        return bits.view(np.float16).astype(np.float64)
    if dtype == "bfloat16":
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if dtype == "float32":
        return bits.view(np.float32).astype(np.float64)
    return bits.view(np.float64).copy()


def special_bits(dtype):
    """+-0, +-inf, NaNs of both signs and payloads, subnormals, +-max."""
    u, s, inf, q = UINT[dtype], SIGN[dtype], INF[dtype], QUIET[dtype]
    pats = [
        0,
        s,
        inf,
        s | inf,
        inf | q,
        s | inf | q,
        inf | 1,
        s | inf | 1,
        (s << 1) - 1,
        1,
        s | 1,
        inf - 1,
        s | (inf - 1),
    ]
    return np.array(pats, dtype=u)


def make_bits(rng, dtype, n, dist):
    """n bit patterns of `dtype` drawn from distribution `dist`."""
    u = UINT[dtype]
    if dist == "normal":
        return float_to_bits(rng.standard_normal(n) * 8.0, dtype)
    if dist == "ties":
        # Few distinct values, +0 and -0 mixed: exercises the lower-index
        # tie rule (and -0 == +0).
        v = rng.integers(-3, 4, n).astype(np.float64)
        v[(v == 0) & (rng.random(n) < 0.5)] = -0.0
        return float_to_bits(v, dtype)
    if dist == "special":
        b = float_to_bits(rng.standard_normal(n) * 8.0, dtype)
        pick = rng.random(n) < 0.3
        sp = special_bits(dtype)
        b[pick] = sp[rng.integers(0, len(sp), int(pick.sum()))]
        return b
    if dist == "bits":
        info = np.iinfo(u)
        return rng.integers(0, int(info.max), n, dtype=u, endpoint=True)
    raise ValueError(dist)


# ----------------------------------------------------------------------------
# Independent NumPy reference
# ----------------------------------------------------------------------------


class Reference:
    """Top-k masks of one input, computed with stable sorts on floats.

    Ranking: NaN first (whatever its sign), then by decreasing value (|value|
    in "abs" mode; -0 == +0), ties by increasing position.
    """

    def __init__(self, bits, dtype, mode, geometry):
        outer, size, inner = geometry
        self.dtype, self.mode, self.geometry = dtype, mode, geometry
        slices = outer * inner
        b = np.asarray(bits, dtype=UINT[dtype]).reshape(outer, size, inner)
        self.bits = np.moveaxis(b, 1, 2).reshape(slices, size)
        self.values = bits_to_float64(self.bits, dtype)
        score = np.abs(self.values) if mode == "abs" else self.values
        nan = np.isnan(score)
        score = np.where(nan, 0.0, score) + 0.0  # canonical +0
        # lexsort: last key is primary. NaN (False for ~nan) first, then
        # decreasing score; lexsort is stable, so ties keep position order.
        if slices and size:
            self.order = np.lexsort((-score, ~nan), axis=-1)
        else:
            self.order = np.zeros((slices, size), dtype=np.int64)

    def mask(self, k):
        """(y bits [outer, size, inner], indices int32 [outer, k, inner])."""
        outer, size, inner = self.geometry
        slices = outer * inner
        winners = np.sort(self.order[:, :k], axis=1)
        y = np.zeros_like(self.bits)
        keep = np.ones(winners.shape, dtype=bool)
        if self.mode == "relu":
            keep = np.take_along_axis(self.values, winners, axis=1) > 0
        wbits = np.take_along_axis(self.bits, winners, axis=1)
        np.put_along_axis(y, winners, np.where(keep, wbits, 0), axis=1)
        idx = np.where(keep, winners, -1).astype(np.int32)
        y = np.moveaxis(y.reshape(outer, inner, size), 2, 1)
        idx = np.moveaxis(idx.reshape(outer, inner, k), 2, 1)
        assert idx.shape == (outer, k, inner) and slices == outer * inner
        return np.ascontiguousarray(y), np.ascontiguousarray(idx)


def reference_grad(dy_bits, indices, geometry, k):
    """dx = 0 except dx[o, idx, c] = dy[o, idx, c] for idx >= 0."""
    outer, size, inner = geometry
    dy = np.asarray(dy_bits).reshape(outer, size, inner)
    dx = np.zeros_like(dy)
    idx = np.asarray(indices).reshape(outer, k, inner)
    o, _, c = np.nonzero(idx >= 0)
    pos = idx[idx >= 0]
    dx[o, pos, c] = dy[o, pos, c]
    return dx


def assert_same(name, got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    fail_where(name, got != want, got, want, "differ")


# ----------------------------------------------------------------------------
# Calling the kernels
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def topk_lib(gpu_lib):
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    sigs = {
        "tsc_topk_mask_gpu": [ctypes.c_int, ctypes.c_int, p, p, p, i64, i64, i64, i64, p],
        "tsc_topk_mask_grad_gpu": [ctypes.c_int, p, p, p, i64, i64, i64, i64, p],
    }
    return declare(gpu_lib, sigs)


def _garbage(shape, dtype):
    # Pre-fill outputs so that entries the kernel fails to write show up.
    if np.dtype(dtype) == np.int32:
        return cupy.full(shape, -7, dtype=np.int32)
    return cupy.full(shape, np.iinfo(dtype).max // 3, dtype=dtype)


def gpu_mask(lib, x_dev, dtype, mode, geometry, k):
    outer, size, inner = geometry
    y = _garbage((outer, size, inner), UINT[dtype])
    idx = _garbage((outer, k, inner), np.int32)
    stream = cupy.cuda.get_current_stream()
    pointers = (x_dev.data.ptr, y.data.ptr, idx.data.ptr)
    err = lib.tsc_topk_mask_gpu(FORMATS[dtype], MODES[mode], *pointers, *geometry, k, stream.ptr)
    assert err is None, err.decode()
    stream.synchronize()
    return cupy.asnumpy(y), cupy.asnumpy(idx)


def gpu_grad(lib, dy_bits, indices, geometry, k):
    """dx from the mask-gradient kernel, written between guard zones (checked: nothing is
    written outside dx, whatever the indices)."""
    outer, size, inner = geometry
    dy = cupy.asarray(np.ascontiguousarray(dy_bits).reshape(outer, size, inner))
    ind = cupy.asarray(np.ascontiguousarray(indices, dtype=np.int32))
    whole, dx = guarded_array(dy.shape, dy.dtype)
    dx.fill(np.iinfo(dy.dtype).max // 3)  # unwritten entries show up (as in _garbage)
    stream = cupy.cuda.get_current_stream()
    err = lib.tsc_topk_mask_grad_gpu(
        dy.dtype.itemsize, dy.data.ptr, ind.data.ptr, dx.data.ptr, outer, size, inner, k, stream.ptr
    )
    assert err is None, err.decode()
    stream.synchronize()
    assert_guards("dx", whole)
    return cupy.asnumpy(dx)


def geometry_id(geometry):
    return "x".join(str(d) for d in geometry)


def ks_for(size):
    return sorted({k for k in (0, 1, 2, size // 3, size // 2, size - 1, size) if 0 <= k <= size})


def check_mask(lib, dtype, mode, geometry, dist, ks=None, seed=0):
    outer, size, inner = geometry
    rng = np.random.default_rng(seed)
    bits = make_bits(rng, dtype, outer * size * inner, dist).reshape(outer, size, inner)
    ref = Reference(bits, dtype, mode, geometry)
    x_dev = cupy.asarray(bits)
    for k in ks_for(size) if ks is None else ks:
        y, idx = gpu_mask(lib, x_dev, dtype, mode, geometry, k)
        y_ref, idx_ref = ref.mask(k)
        assert_same(f"y (k={k})", y, y_ref)
        assert_same(f"indices (k={k})", idx, idx_ref)


# ----------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------


def test_kernels_compile(gpu_kernels_lib, tsc_gpu_build):
    """Every *_gpu.cu.cc compiles into the library (needs nvcc, not a GPU)."""
    assert os.path.isfile(gpu_kernels_lib)
    for src in tsc_gpu_build.sources():
        assert os.path.isfile(tsc_gpu_build._object_path(src)), src
    lib = ctypes.CDLL(gpu_kernels_lib)  # loads without a GPU (static cudart)
    for name in ("tsc_topk_mask_gpu", "tsc_topk_mask_grad_gpu"):
        assert hasattr(lib, name), name


# (name, geometry (outer, size, inner), distribution)
GEOMETRIES = [
    ("long_few", (3, 200000, 1), "normal"),
    ("inner37", (4, 1000, 37), "normal"),
    ("ties_short", (700, 256, 1), "ties"),
    ("ties_mid", (5, 3000, 3), "ties"),
    ("ties_long", (2, 70000, 1), "ties"),
    ("special_short", (64, 100, 2), "special"),
    ("special_long", (2, 20000, 1), "special"),
    ("bits", (6, 5000, 1), "bits"),
    ("size1", (7, 1, 3), "normal"),
    ("size2", (9, 2, 1), "ties"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name,geometry,dist", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def test_mask(topk_lib, dtype, mode, name, geometry, dist):
    check_mask(topk_lib, dtype, mode, geometry, dist)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", list(MODES))
def test_mask_many_short_slices(topk_lib, dtype, mode):
    # 65536 slices of 256.
    check_mask(topk_lib, dtype, mode, (65536, 256, 1), "normal", ks=[0, 1, 100, 255, 256])


# Sizes around the block-size / chunk thresholds of the kernel.
@pytest.mark.parametrize(
    "size", [3, 31, 32, 33, 255, 256, 257, 2047, 2048, 2049, 4095, 4096, 4097, 16384, 16385, 40000]
)
@pytest.mark.parametrize("dist", ["ties", "special"])
def test_mask_sizes(topk_lib, size, dist):
    for dtype in DTYPES:
        for mode in MODES:
            check_mask(
                topk_lib,
                dtype,
                mode,
                (3, size, 2),
                dist,
                ks=sorted({1, size // 2, size - 1, size} - {0}),
                seed=size,
            )


def test_mask_grid_stride(topk_lib):
    # More slices than the kernel's grid cap (2^20 blocks).
    check_mask(topk_lib, "float32", "value", (1100000, 4, 1), "ties", ks=[1, 3])


@pytest.mark.parametrize("geometry", [(0, 10, 3), (5, 0, 3), (2, 7, 0), (0, 0, 0)], ids=geometry_id)
def test_mask_empty(topk_lib, geometry):
    outer, size, inner = geometry
    for dtype in DTYPES:
        for k in sorted({0, size}):
            check_mask(topk_lib, dtype, "value", geometry, "normal", ks=[k])


def test_mask_signed_zero_and_nan_order(topk_lib):
    # Hand-written slice: NaNs rank above +inf (first by position), -0 == +0.
    for dtype in DTYPES:
        s, inf, q = SIGN[dtype], INF[dtype], QUIET[dtype]
        pats = [s, 0, inf, s | inf | q, 0, s, inf | q, s | inf]
        bits = np.array(pats, dtype=UINT[dtype]).reshape(1, -1, 1)
        x_dev = cupy.asarray(bits)
        for mode in MODES:
            ref = Reference(bits, dtype, mode, bits.shape)
            for k in range(len(pats) + 1):
                y, idx = gpu_mask(topk_lib, x_dev, dtype, mode, bits.shape, k)
                y_ref, idx_ref = ref.mask(k)
                assert_same(f"y {dtype} {mode} k={k}", y, y_ref)
                assert_same(f"idx {dtype} {mode} k={k}", idx, idx_ref)
        # Spelled out for "value": NaNs at 3 and 6, then +inf at 2, then the
        # zeros in position order.
        ref = Reference(bits, dtype, "value", bits.shape)
        assert ref.mask(5)[1].ravel().tolist() == [0, 1, 2, 3, 6]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "geometry", [(3, 200000, 1), (4, 1000, 37), (700, 256, 1), (2, 7, 0), (0, 5, 2)], ids=geometry_id
)
def test_mask_grad(topk_lib, dtype, geometry):
    outer, size, inner = geometry
    rng = np.random.default_rng(1)
    n = outer * size * inner
    dy = make_bits(rng, dtype, n, "bits").reshape(outer, size, inner)
    x = make_bits(rng, dtype, n, "special").reshape(outer, size, inner)
    for mode in ("value", "relu"):  # relu: indices hold -1 entries
        ref = Reference(x, dtype, mode, geometry)
        for k in ks_for(size):
            _, idx = ref.mask(k)
            dx = gpu_grad(topk_lib, dy, idx, geometry, k)
            assert_same(f"dx ({mode}, k={k})", dx, reference_grad(dy, idx, geometry, k))


def test_mask_grad_explicit_minus_one(topk_lib):
    geometry = (2, 6, 3)
    dy = np.arange(1, 37, dtype=np.uint32).reshape(geometry)
    idx = np.array([[[0, -1, 5], [4, 2, -1]], [[-1, -1, -1], [5, 0, 3]]], dtype=np.int32)
    dx = gpu_grad(topk_lib, dy, idx, geometry, 2)
    assert_same("dx", dx, reference_grad(dy, idx, geometry, 2))
    assert int(np.count_nonzero(dx)) == 8


@pytest.mark.parametrize("element_bytes", [2, 4, 8])
def test_mask_grad_out_of_range_indices(topk_lib, element_bytes):
    """Indices are not checked on the GPU (README, "Validation on GPU"): entries outside
    [0, size) other than -1 (a dropped winner) contribute nothing either, and nothing is written
    outside dx (the guard zones around it keep their bytes)."""
    geometry = (3, 7, 5)
    outer, size, inner = geometry
    k = 4
    uint = {2: np.uint16, 4: np.uint32, 8: np.uint64}[element_bytes]
    rng = np.random.default_rng(5)
    dy = rng.integers(1, 2**15, size=geometry).astype(uint)
    idx = rng.integers(0, size, size=(outer, k, inner)).astype(np.int32)
    wild = np.array([size, size + 1, -2, -(2**31), 2**31 - 1, 10 * size], np.int32)
    mask = rng.random(idx.shape) < 0.4
    idx[mask] = rng.choice(wild, size=int(mask.sum()))
    dx = gpu_grad(topk_lib, dy, idx, geometry, k)
    kept = np.where((idx >= 0) & (idx < size), idx, -1)
    assert_same("dx", dx, reference_grad(dy, kept, geometry, k))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_mask_timing(topk_lib, dtype, capsys):
    """Prints kernel times (informative only; no assertion on speed)."""
    rng = np.random.default_rng(2)
    lines = []
    for geometry, k in [((65536, 256, 1), 32), ((3, 1000000, 1), 1000), ((4, 100000, 37), 100)]:
        outer, size, inner = geometry
        x = cupy.asarray(make_bits(rng, dtype, outer * size * inner, "normal"))
        y = cupy.empty_like(x)
        idx = cupy.empty((outer * k * inner,), dtype=np.int32)
        stream = cupy.cuda.get_current_stream()
        pointers = (x.data.ptr, y.data.ptr, idx.data.ptr)
        args = (FORMATS[dtype], MODES["value"], *pointers, *geometry, k, stream.ptr)
        ms = time_ms(topk_lib.tsc_topk_mask_gpu, args, reps=10)
        gbs = x.nbytes * 2 / (ms * 1e-3) / 1e9
        lines.append(f"{dtype} {geometry} k={k}: {ms:.3f} ms ({gbs:.1f} GB/s x+y)")
    t0 = time.time()
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert time.time() - t0 < 60
