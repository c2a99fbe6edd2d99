"""What the tests/gpu/test_*_gpu.py files share (no TensorFlow).

* ``cupy``: the module, or None where it cannot be imported (the ``gpu_lib``
  fixture of conftest.py then skips, with the reason, before any test uses it);
* the dtype tables: the entry points' format codes, the storage dtype on the
  device, unit roundoffs of the accumulation and of the output;
* conversions between float64 values and device storage (bfloat16 travels as
  its uint16 bit pattern);
* rounding-error bounds and the comparison that reports the first bad entry;
* device buffers: NaN-filled outputs, guard zones around a buffer;
* ctypes signatures of the entry points, and the check that a kernel source
  is compiled into the library with its entry points (needs nvcc only).
"""

import ctypes
import os

import numpy as np
import pytest

try:
    import cupy
except Exception:  # ImportError, or CuPy without a usable CUDA
    cupy = None

# Float format codes of the C entry points.
FORMATS = {"float16": 0, "bfloat16": 1, "float32": 2, "float64": 3}
DTYPES = list(FORMATS)
# Storage dtype on the device (bfloat16 travels as its uint16 bit pattern).
STORAGE = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32, "float64": np.float64}
# Accumulation dtype of the kernels (float for half / bfloat16).
ACC = {"float16": np.float32, "bfloat16": np.float32, "float32": np.float32, "float64": np.float64}
# Unit roundoff of the accumulation and of the output format.
U_ACC = {"float16": 2.0**-24, "bfloat16": 2.0**-24, "float32": 2.0**-24, "float64": 2.0**-53}
U_OUT = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24, "float64": 2.0**-53}
# Absolute slack for results that land in the subnormal range of the output.
TINY = {"float16": 2.0**-24, "bfloat16": 2.0**-133, "float32": 2.0**-149, "float64": 0.0}

GUARD = 4096  # bytes of PATTERN on each side of a guarded buffer (keeps 256-byte alignment)
PATTERN = 0x5A


# ----------------------------------------------------------------------------
# Storage conversions
# ----------------------------------------------------------------------------


def bf16_bits(values):
    """bfloat16 bit patterns (round to nearest even) of finite float32 values (inf kept)."""
    b = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


def to_storage(values, dtype):
    """values (float64) rounded to `dtype`, in the device storage dtype."""
    values = np.asarray(values, dtype=np.float64)
    if dtype == "bfloat16":
        return bf16_bits(values.astype(np.float32))
    return values.astype(STORAGE[dtype])


def to_float64(stored, dtype):
    """Exact float64 values of device storage."""
    stored = np.asarray(stored)
    if dtype == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return stored.astype(np.float64)


# ----------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------


def error_bound(abs_ref, terms, dtype):
    """|got - exact| bound: `terms`-term float accumulation + one final rounding."""
    return abs_ref * ((terms + 2) * U_ACC[dtype] + U_OUT[dtype]) + TINY[dtype]


def fail_where(name, bad, got, want, what, bound=None):
    """Fails if `bad` marks any entry, saying how many and showing the first (and its bound)."""
    if not bad.any():
        return
    idx = np.argwhere(bad)
    first = tuple(idx[0])
    limit = "" if bound is None else f" bound {np.broadcast_to(bound, got.shape)[first]!r}"
    pytest.fail(
        f"{name}: {len(idx)} of {got.size} {what}, first at {first}: "
        f"got {got[first]!r} want {want[first]!r}{limit}"
    )


def assert_close(name, got, want, bound):
    """|got - want| <= bound everywhere (NaN, e.g. an unwritten entry, fails)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    err = np.abs(got - want)
    fail_where(name, ~(err <= bound), got, want, "out of bounds", bound)  # NaN is bad too


# ----------------------------------------------------------------------------
# Device buffers
# ----------------------------------------------------------------------------


def dev_ptr(a):
    """Device address of a CuPy array (None for None or an empty array)."""
    return a.data.ptr if a is not None and a.size else None


def garbage(shape, dtype):
    """Output buffer pre-filled with NaN, so unwritten entries show up."""
    if dtype == "bfloat16":
        return cupy.full(shape, 0x7FC1, dtype=np.uint16)
    return cupy.full(shape, np.nan, dtype=STORAGE[dtype])


def guarded(nbytes):
    """A device buffer of `nbytes` between two guard zones: (whole allocation, buffer address)."""
    whole = cupy.full(int(nbytes) + 2 * GUARD, PATTERN, dtype=np.uint8)
    return whole, whole.data.ptr + GUARD


def guarded_array(shape, dtype):
    """A device array of `shape` and `dtype` between two guard zones: (whole allocation, array)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    whole = cupy.full(nbytes + 2 * GUARD, PATTERN, dtype=np.uint8)
    return whole, whole[GUARD : GUARD + nbytes].view(dtype).reshape(shape)


def assert_guards(name, whole):
    """Both guard zones of a `guarded` allocation keep their bytes."""
    host = cupy.asnumpy(whole)
    for side, zone in (("before", host[:GUARD]), ("after", host[len(host) - GUARD :])):
        changed = np.flatnonzero(zone != PATTERN)
        assert changed.size == 0, f"{name}: {changed.size} bytes written {side} the buffer"


def guarded_contents(whole, shape, dtype):
    """The buffer of a `guarded` allocation as a host array of storage dtype `dtype`."""
    return cupy.asnumpy(whole[GUARD : len(whole) - GUARD]).view(STORAGE[dtype]).reshape(shape)


# ----------------------------------------------------------------------------
# The library (nvcc only)
# ----------------------------------------------------------------------------


def declare(lib, signatures):
    """Sets the ctypes signatures of entry points and returns `lib`. `signatures`: name ->
    argtypes (the entry point returns an error message, None on success) or name ->
    (argtypes, restype)."""
    for name, signature in signatures.items():
        argtypes, restype = signature if isinstance(signature, tuple) else (signature, ctypes.c_char_p)
        f = getattr(lib, name)
        f.argtypes, f.restype = argtypes, restype
    return lib


def time_ms(f, args, reps):
    """Milliseconds per call of entry point `f(*args)` on the current stream (its last
    argument), over `reps` calls after a warm-up call; every call must succeed."""
    stream = cupy.cuda.get_current_stream()
    err = f(*args)
    assert err is None, err.decode()
    stream.synchronize()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record(stream)
    for _ in range(reps):
        err = f(*args)
        assert err is None, err.decode()
    stop.record(stream)
    stop.synchronize()
    return cupy.cuda.get_elapsed_time(start, stop) / reps


def assert_compiled(gpu_kernels_lib, tsc_gpu_build, source, entry_points):
    """`source` (a file of tf_sparseconv/cc/kernels) is compiled into the library, which
    exports `entry_points`."""
    src = os.path.join(tsc_gpu_build.KERNELS_DIR, source)
    assert src in tsc_gpu_build.sources()
    assert os.path.isfile(tsc_gpu_build._object_path(src))
    lib = ctypes.CDLL(gpu_kernels_lib)  # loads without a GPU (static cudart)
    for name in entry_points:
        assert hasattr(lib, name), name
    return lib
