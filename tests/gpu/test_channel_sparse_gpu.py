"""GPU tests of the channel-sparse convolution kernels (channel_sparse_op_gpu.cu.cc).

Runs the kernels through their ``extern "C"`` entry points (ctypes) on CuPy
device memory and compares them with an independent float64 NumPy reference:
the sparse kernel is scattered into a dense ``[k_h, k_w, in_c, out_c]`` one
and the convolution is a sum over taps of strided views of the zero-padded
input (its gradients are the adjoint sums). Tolerances are rigorous
rounding-error bounds computed from the same reference on absolute values.
No TensorFlow needed. Skips (with the reason) when nvcc, CuPy or a GPU is
missing; the compile and argument-checking tests only need nvcc, the
reference self-tests nothing.
"""

import ctypes
import os
from dataclasses import dataclass

import numpy as np
import pytest

try:
    import cupy
except Exception:  # ImportError, or CuPy without a usable CUDA
    cupy = None

FORMATS = {"float16": 0, "bfloat16": 1, "float32": 2, "float64": 3}
DTYPES = list(FORMATS)
# Storage dtype on the device (bfloat16 travels as its uint16 bit pattern).
STORAGE = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32, "float64": np.float64}
# Unit roundoff of the accumulation (float for half/bfloat16) and of the
# output format.
U_ACC = {"float16": 2.0**-24, "bfloat16": 2.0**-24, "float32": 2.0**-24, "float64": 2.0**-53}
U_OUT = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24, "float64": 2.0**-53}
# Absolute slack for results that land in the subnormal range of the output.
TINY = {"float16": 2.0**-24, "bfloat16": 2.0**-133, "float32": 2.0**-149, "float64": 0.0}
ENTRY_POINTS = (
    "tsc_channel_sparse_conv2d_gpu",
    "tsc_channel_sparse_conv2d_bias_activation_gpu",
    "tsc_channel_sparse_conv2d_backprop_input_gpu",
    "tsc_channel_sparse_conv2d_backprop_kernel_gpu",
)


# ----------------------------------------------------------------------------
# Geometry and data
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    batch: int
    in_h: int
    in_w: int
    in_c: int
    out_h: int
    out_w: int
    out_c: int
    m: int
    k_h: int
    k_w: int
    stride_h: int = 1
    stride_w: int = 1
    dil_h: int = 1
    dil_w: int = 1
    pad_top: int = 0
    pad_left: int = 0

    def as_int64(self):
        """The 16 int64 of the C entry points, in ChannelSparseGeometry order."""
        return np.array(
            [
                self.batch,
                self.in_h,
                self.in_w,
                self.in_c,
                self.out_h,
                self.out_w,
                self.out_c,
                self.m,
                self.k_h,
                self.k_w,
                self.stride_h,
                self.stride_w,
                self.dil_h,
                self.dil_w,
                self.pad_top,
                self.pad_left,
            ],
            dtype=np.int64,
        )

    @property
    def x_shape(self):
        return (self.batch, self.in_h, self.in_w, self.in_c)

    @property
    def y_shape(self):
        return (self.batch, self.out_h, self.out_w, self.out_c)

    @property
    def kernel_shape(self):
        return (self.k_h, self.k_w, self.m, self.out_c)

    @property
    def conn_shape(self):
        return (self.out_c, self.m)


def _out_size(size, k, stride, dil, padding):
    """(output size, leading pad) of one spatial axis.

    padding: "valid", "same" (TF convention: extra padding at the end) or
    (pad_before, pad_after).
    """
    eff = dil * (k - 1) + 1
    if padding == "same":
        out = -(-size // stride)
        total = max((out - 1) * stride + eff - size, 0)
        return out, total // 2
    before, after = (0, 0) if padding == "valid" else padding
    return max((size + before + after - eff) // stride + 1, 0), before


def make_geometry(batch, in_h, in_w, in_c, out_c, m, k, stride=(1, 1), dil=(1, 1), padding="same"):
    """Geometry of a conv; padding: "same", "valid" or ((top, bottom), (left, right))."""
    pad_h, pad_w = (padding, padding) if isinstance(padding, str) else padding
    out_h, pad_top = _out_size(in_h, k[0], stride[0], dil[0], pad_h)
    out_w, pad_left = _out_size(in_w, k[1], stride[1], dil[1], pad_w)
    return Geometry(
        batch, in_h, in_w, in_c, out_h, out_w, out_c, m, k[0], k[1], *stride, *dil, pad_top, pad_left
    )


def bf16_bits(values):
    """bfloat16 bit patterns (round to nearest even) of finite float32 values."""
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


def random_connections(rng, in_c, out_c, m):
    """[out_c, m] int32, distinct values in [0, in_c) per row, random order."""
    conn = np.zeros((out_c, m), dtype=np.int32)
    for o in range(out_c):
        conn[o] = rng.permutation(in_c)[:m]
    return conn


# ----------------------------------------------------------------------------
# Independent NumPy reference (float64)
# ----------------------------------------------------------------------------


def dense_kernel(kernel, conn, in_c):
    """[k_h, k_w, in_c, out_c] with dense[:, :, conn[o, e], o] = kernel[:, :, e, o]."""
    k_h, k_w, _, out_c = kernel.shape
    dense = np.zeros((k_h, k_w, in_c, out_c), dtype=np.float64)
    if conn.size:
        # Advanced indices [out_c, m] x [out_c, 1] select dense[i, j] as
        # [k_h, k_w, out_c, m]; rows of conn are distinct, so no collisions.
        dense[:, :, conn, np.arange(out_c)[:, None]] = np.moveaxis(kernel, 3, 2)
    return dense


def _padded_shape(g):
    assert g.pad_top >= 0 and g.pad_left >= 0, "the reference needs pads >= 0"
    hp = max(g.pad_top + g.in_h, (g.out_h - 1) * g.stride_h + (g.k_h - 1) * g.dil_h + 1, 0)
    wp = max(g.pad_left + g.in_w, (g.out_w - 1) * g.stride_w + (g.k_w - 1) * g.dil_w + 1, 0)
    return (g.batch, hp, wp, g.in_c)


def _tap(g, i, j):
    """Index of the strided window of tap (i, j) in the padded input."""
    h0, w0 = i * g.dil_h, j * g.dil_w
    return (
        slice(None),
        slice(h0, h0 + (g.out_h - 1) * g.stride_h + 1, g.stride_h),
        slice(w0, w0 + (g.out_w - 1) * g.stride_w + 1, g.stride_w),
    )


def _interior(g):
    return (slice(None), slice(g.pad_top, g.pad_top + g.in_h), slice(g.pad_left, g.pad_left + g.in_w))


def ref_forward(x, kernel, conn, g):
    y = np.zeros(g.y_shape)
    if g.out_h == 0 or g.out_w == 0:
        return y
    xp = np.zeros(_padded_shape(g))
    xp[_interior(g)] = x
    dense = dense_kernel(kernel, conn, g.in_c)
    for i in range(g.k_h):
        for j in range(g.k_w):
            y += np.tensordot(xp[_tap(g, i, j)], dense[i, j], axes=([3], [0]))
    return y


def ref_backprop_input(dy, kernel, conn, g):
    dxp = np.zeros(_padded_shape(g))
    if g.out_h and g.out_w:
        dense = dense_kernel(kernel, conn, g.in_c)
        for i in range(g.k_h):
            for j in range(g.k_w):
                dxp[_tap(g, i, j)] += np.tensordot(dy, dense[i, j], axes=([3], [1]))
    return dxp[_interior(g)].copy()


def ref_backprop_kernel(x, dy, conn, g):
    dk = np.zeros(g.kernel_shape)
    if g.out_h == 0 or g.out_w == 0:
        return dk
    xp = np.zeros(_padded_shape(g))
    xp[_interior(g)] = x
    rows = np.arange(g.out_c)[:, None]
    for i in range(g.k_h):
        for j in range(g.k_w):
            full = np.tensordot(xp[_tap(g, i, j)], dy, axes=([0, 1, 2], [0, 1, 2]))  # [in_c, out_c]
            dk[i, j] = full[conn, rows].T if conn.size else 0.0
    return dk


def naive_forward(x, kernel, conn, g):
    """The formula of channel_sparse_common.h, literally (tiny shapes only)."""
    y = np.zeros(g.y_shape)
    for b, oh, ow, o in np.ndindex(*g.y_shape):
        s = 0.0
        for i, j, e in np.ndindex(g.k_h, g.k_w, g.m):
            ih = oh * g.stride_h - g.pad_top + i * g.dil_h
            iw = ow * g.stride_w - g.pad_left + j * g.dil_w
            if 0 <= ih < g.in_h and 0 <= iw < g.in_w:
                s += x[b, ih, iw, conn[o, e]] * kernel[i, j, e, o]
        y[b, oh, ow, o] = s
    return y


# ----------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------


def error_bound(abs_ref, terms, dtype):
    """|got - exact| bound: `terms`-term float accumulation + one final rounding."""
    return abs_ref * ((terms + 2) * U_ACC[dtype] + U_OUT[dtype]) + TINY[dtype]


def assert_close(name, got, want, bound):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    err = np.abs(got - want)
    bad = ~(err <= bound)  # NaN (e.g. an unwritten entry) is bad too
    if bad.any():
        idx = np.argwhere(bad)
        first = tuple(idx[0])
        pytest.fail(
            f"{name}: {len(idx)} of {got.size} out of bounds, first at {first}: "
            f"got {got[first]!r} want {want[first]!r} bound {np.broadcast_to(bound, got.shape)[first]!r}"
        )


class Problem:
    """Random inputs of one geometry and dtype, and their float64 references."""

    def __init__(self, g, dtype, seed=0, conn=None):
        rng = np.random.default_rng(seed)
        self.g, self.dtype = g, dtype
        self.conn = random_connections(rng, g.in_c, g.out_c, g.m) if conn is None else conn
        assert self.conn.shape == g.conn_shape
        # Inputs rounded to the dtype first: the reference sees exactly what
        # the kernels see.
        self.x_s = to_storage(rng.standard_normal(g.x_shape), dtype)
        self.k_s = to_storage(rng.standard_normal(g.kernel_shape), dtype)
        self.dy_s = to_storage(rng.standard_normal(g.y_shape), dtype)
        self.x = to_float64(self.x_s, dtype)
        self.kernel = to_float64(self.k_s, dtype)
        self.dy = to_float64(self.dy_s, dtype)

    def y_ref(self):
        g, c = self.g, self.conn
        bound = error_bound(
            ref_forward(np.abs(self.x), np.abs(self.kernel), c, g), g.m * g.k_h * g.k_w, self.dtype
        )
        return ref_forward(self.x, self.kernel, c, g), bound

    def dx_ref(self):
        g, c = self.g, self.conn
        abs_ref = ref_backprop_input(np.abs(self.dy), np.abs(self.kernel), c, g)
        bound = error_bound(abs_ref, g.out_c * g.k_h * g.k_w, self.dtype)
        return ref_backprop_input(self.dy, self.kernel, c, g), bound

    def dk_ref(self):
        g, c = self.g, self.conn
        abs_ref = ref_backprop_kernel(np.abs(self.x), np.abs(self.dy), c, g)
        bound = error_bound(abs_ref, g.batch * g.out_h * g.out_w, self.dtype)
        return ref_backprop_kernel(self.x, self.dy, c, g), bound


# ----------------------------------------------------------------------------
# Calling the kernels
# ----------------------------------------------------------------------------


def _declare(lib):
    p = ctypes.c_void_p
    sigs = {
        "tsc_channel_sparse_conv2d_gpu": [ctypes.c_int, p, p, p, p, p, p],
        "tsc_channel_sparse_conv2d_bias_activation_gpu": [ctypes.c_int, p, p, p, p, ctypes.c_int, p, p, p],
        "tsc_channel_sparse_conv2d_backprop_input_gpu": [ctypes.c_int, p, p, p, p, p, p, p],
        "tsc_channel_sparse_conv2d_backprop_kernel_gpu": [ctypes.c_int, p, p, p, p, p, p],
    }
    for name, argtypes in sigs.items():
        f = getattr(lib, name)
        f.restype = ctypes.c_char_p
        f.argtypes = argtypes
    return lib


@pytest.fixture(scope="module")
def cs_lib(gpu_lib):
    return _declare(gpu_lib)


def _garbage(shape, dtype):
    """Output buffer pre-filled with NaN, so unwritten entries show up."""
    if dtype == "bfloat16":
        return cupy.full(shape, 0x7FC1, dtype=np.uint16)
    return cupy.full(shape, np.nan, dtype=STORAGE[dtype])


def _ptr(a):
    return a.data.ptr if a is not None and a.size else None


class Device:
    """A Problem's inputs on the GPU and the three kernels on them."""

    def __init__(self, lib, prob):
        self.lib, self.prob, self.g = lib, prob, prob.g
        self.x = cupy.asarray(prob.x_s)
        self.kernel = cupy.asarray(prob.k_s)
        self.dy = cupy.asarray(prob.dy_s)
        self.conn = cupy.asarray(prob.conn)
        self.geometry = prob.g.as_int64()  # kept alive during the calls
        self.fmt = FORMATS[prob.dtype]

    def _call(self, name, *args):
        stream = cupy.cuda.get_current_stream()
        err = getattr(self.lib, name)(self.fmt, *args, self.geometry.ctypes.data, stream.ptr)
        assert err is None, err.decode()
        stream.synchronize()

    def forward(self):
        y = _garbage(self.g.y_shape, self.prob.dtype)
        self._call("tsc_channel_sparse_conv2d_gpu", _ptr(self.x), _ptr(self.kernel), _ptr(self.conn), _ptr(y))
        return to_float64(cupy.asnumpy(y), self.prob.dtype)

    def forward_bias_activation(self, bias_s, activation: int):
        """y = activation(conv + bias) from the fused entry point (bias in storage dtype)."""
        y = _garbage(self.g.y_shape, self.prob.dtype)
        bias = cupy.asarray(bias_s)
        self._call(
            "tsc_channel_sparse_conv2d_bias_activation_gpu",
            _ptr(self.x),
            _ptr(self.kernel),
            _ptr(self.conn),
            _ptr(bias),
            activation,
            _ptr(y),
        )
        return to_float64(cupy.asnumpy(y), self.prob.dtype)

    def backprop_input(self):
        dx = _garbage(self.g.x_shape, self.prob.dtype)
        ws = None
        if self.prob.dtype in ("float16", "bfloat16"):
            ws = cupy.full(self.g.x_shape, np.nan, dtype=np.float32)
        self._call(
            "tsc_channel_sparse_conv2d_backprop_input_gpu",
            _ptr(self.dy),
            _ptr(self.kernel),
            _ptr(self.conn),
            _ptr(dx),
            _ptr(ws),
        )
        return to_float64(cupy.asnumpy(dx), self.prob.dtype)

    def backprop_kernel(self, raw=False):
        dk = _garbage(self.g.kernel_shape, self.prob.dtype)
        self._call(
            "tsc_channel_sparse_conv2d_backprop_kernel_gpu",
            _ptr(self.x),
            _ptr(self.dy),
            _ptr(self.conn),
            _ptr(dk),
        )
        host = cupy.asnumpy(dk)
        return host if raw else to_float64(host, self.prob.dtype)


def check_all(lib, g, dtype, seed=0, conn=None):
    prob = Problem(g, dtype, seed=seed, conn=conn)
    dev = Device(lib, prob)
    assert_close("y", dev.forward(), *prob.y_ref())
    assert_close("dx", dev.backprop_input(), *prob.dx_ref())
    assert_close("dkernel", dev.backprop_kernel(), *prob.dk_ref())
    return dev


# ----------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------

# (name, geometry). The comments name the backprop-kernel configuration
# (threads per block, taps per task) the launcher picks.
CASES = [
    ("3x3_same", make_geometry(2, 9, 11, 8, 12, 3, (3, 3))),  # 1024 x 1
    ("3x3_valid_s2", make_geometry(2, 10, 9, 6, 5, 2, (3, 3), stride=(2, 2), padding="valid")),
    ("3x3_same_s2_d2", make_geometry(1, 12, 13, 7, 9, 4, (3, 3), stride=(2, 2), dil=(2, 2))),
    ("3x3_valid_d2_m_in_c", make_geometry(2, 11, 10, 5, 6, 5, (3, 3), dil=(2, 2), padding="valid")),
    ("3x3_same_s2_odd", make_geometry(3, 7, 8, 9, 11, 2, (3, 3), stride=(2, 2))),
    ("1x1_m1", make_geometry(3, 5, 6, 16, 33, 1, (1, 1))),
    ("1x1_s2_m_in_c", make_geometry(2, 7, 7, 6, 10, 6, (1, 1), stride=(2, 2), padding="valid")),
    ("1x1_few_pixels", make_geometry(1, 2, 3, 4, 40, 2, (1, 1))),  # 256 x 1
    ("conv1d_1x5_same", make_geometry(3, 1, 40, 10, 17, 4, (1, 5))),
    ("conv1d_1x5_s2_d2", make_geometry(2, 1, 37, 8, 19, 3, (1, 5), stride=(1, 2), dil=(1, 2))),
    ("conv1d_1x5_valid_m1", make_geometry(2, 1, 23, 6, 7, 1, (1, 5), padding="valid")),
    ("conv1d_1x3_tiny", make_geometry(1, 1, 8, 5, 32, 2, (1, 3))),  # 256 x 4
    ("3x3_tiny_image", make_geometry(1, 2, 4, 6, 20, 3, (3, 3))),  # 256 x 9
    ("3x3_12_pixels", make_geometry(1, 3, 4, 6, 20, 3, (3, 3))),  # 256 x 1
    ("5x5_tiny_image", make_geometry(1, 2, 4, 6, 20, 3, (5, 5))),  # 256 x 9, 3 tap chunks
    ("5x5_same", make_geometry(2, 8, 9, 7, 13, 3, (5, 5))),
    ("7x1_s2", make_geometry(2, 15, 6, 5, 8, 2, (7, 1), stride=(2, 1))),
    ("2x3_explicit_pads", make_geometry(2, 9, 8, 6, 7, 3, (2, 3), (2, 1), (1, 3), ((2, 1), (0, 4)))),
    ("pads_exceed_kernel", make_geometry(1, 4, 5, 3, 6, 2, (3, 3), padding=((4, 4), (3, 5)))),
    ("kernel_larger_than_input", make_geometry(2, 3, 2, 4, 5, 2, (5, 4))),
    ("out_c_70", make_geometry(2, 6, 7, 20, 70, 3, (3, 3))),  # o-tiles with masked lanes
    ("out_c_3", make_geometry(2, 6, 7, 9, 3, 4, (3, 3))),  # 4 lanes per row
    ("dense_m_in_c_128", make_geometry(2, 6, 6, 128, 128, 128, (3, 3))),  # 256 x 9
]


def case_id(case):
    return case[0]


# ----------------------------------------------------------------------------
# Tests that need nothing but NumPy (the reference itself)
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "g",
    [
        make_geometry(2, 5, 6, 4, 3, 2, (3, 3)),
        make_geometry(1, 7, 6, 3, 4, 3, (3, 2), stride=(2, 3), dil=(2, 1), padding="valid"),
        make_geometry(2, 1, 9, 5, 4, 1, (1, 5), stride=(1, 2)),
        make_geometry(1, 4, 5, 3, 6, 2, (3, 3), padding=((4, 4), (3, 5))),
        make_geometry(1, 3, 2, 2, 3, 2, (5, 4)),
    ],
    ids=["same", "valid_s23_d21", "conv1d", "big_pads", "kernel_gt_input"],
)
def test_reference_matches_formula_and_adjoints(g):
    """The reference against the literal formula; its gradients by adjointness."""
    prob = Problem(g, "float64", seed=3)
    y = ref_forward(prob.x, prob.kernel, prob.conn, g)
    np.testing.assert_allclose(y, naive_forward(prob.x, prob.kernel, prob.conn, g), rtol=1e-12, atol=1e-12)
    # y is bilinear in (x, kernel): <y, dy> = <x, dx(dy)> = <kernel, dk(x, dy)>.
    dx = ref_backprop_input(prob.dy, prob.kernel, prob.conn, g)
    dk = ref_backprop_kernel(prob.x, prob.dy, prob.conn, g)
    inner = float(np.sum(y * prob.dy))
    np.testing.assert_allclose(float(np.sum(prob.x * dx)), inner, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(float(np.sum(prob.kernel * dk)), inner, rtol=1e-10, atol=1e-10)


def test_reference_gradients_by_finite_differences():
    g = make_geometry(1, 4, 5, 3, 2, 2, (3, 2), stride=(2, 1), dil=(1, 2))
    prob = Problem(g, "float64", seed=4)

    def loss(x, k):
        return float(np.sum(ref_forward(x, k, prob.conn, g) * prob.dy))

    dx = ref_backprop_input(prob.dy, prob.kernel, prob.conn, g)
    dk = ref_backprop_kernel(prob.x, prob.dy, prob.conn, g)
    h = 1e-6
    for idx in [(0, 0, 0, 0), (0, 1, 2, 1), (0, 3, 4, 2), (0, 2, 0, 1)]:
        xp, xm = prob.x.copy(), prob.x.copy()
        xp[idx] += h
        xm[idx] -= h
        np.testing.assert_allclose(
            (loss(xp, prob.kernel) - loss(xm, prob.kernel)) / (2 * h), dx[idx], atol=1e-7
        )
    for idx in np.ndindex(*g.kernel_shape):
        kp, km = prob.kernel.copy(), prob.kernel.copy()
        kp[idx] += h
        km[idx] -= h
        np.testing.assert_allclose((loss(prob.x, kp) - loss(prob.x, km)) / (2 * h), dk[idx], atol=1e-7)


def test_geometry_helper():
    g = make_geometry(2, 9, 11, 8, 12, 3, (3, 3), stride=(2, 2))
    assert (g.out_h, g.out_w, g.pad_top, g.pad_left) == (5, 6, 1, 1)
    g = make_geometry(1, 10, 10, 1, 1, 1, (3, 3), dil=(2, 2), padding="valid")
    assert (g.out_h, g.out_w, g.pad_top, g.pad_left) == (6, 6, 0, 0)
    assert g.as_int64().tolist() == [1, 10, 10, 1, 6, 6, 1, 1, 3, 3, 1, 1, 2, 2, 0, 0]


# ----------------------------------------------------------------------------
# Tests that need nvcc only
# ----------------------------------------------------------------------------


def test_channel_sparse_kernels_compile(gpu_kernels_lib, tsc_gpu_build):
    """channel_sparse_op_gpu.cu.cc is in the library with its entry points."""
    src = os.path.join(tsc_gpu_build.KERNELS_DIR, "channel_sparse_op_gpu.cu.cc")
    assert src in tsc_gpu_build.sources()
    assert os.path.isfile(tsc_gpu_build._object_path(src))
    lib = ctypes.CDLL(gpu_kernels_lib)  # loads without a GPU (static cudart)
    for name in ENTRY_POINTS:
        assert hasattr(lib, name), name


def test_argument_errors(gpu_kernels_lib):
    """Invalid arguments are reported before any CUDA call (no GPU needed)."""
    lib = _declare(ctypes.CDLL(gpu_kernels_lib))
    fwd, fused, bin_, bk = (getattr(lib, n) for n in ENTRY_POINTS)
    good = make_geometry(1, 4, 4, 3, 2, 2, (3, 3))

    def geo(**kw):
        return np.array([*{**good.__dict__, **kw}.values()], dtype=np.int64)

    def errors(fmt, geometry):
        p = geometry.ctypes.data if geometry is not None else None
        return [
            fwd(fmt, None, None, None, None, p, None),
            fused(fmt, None, None, None, None, 1, None, p, None),
            bin_(fmt, None, None, None, None, None, p, None),
            bk(fmt, None, None, None, None, p, None),
        ]

    for fmt, g, text in [
        (7, good.as_int64(), b"unknown float format"),
        (-1, good.as_int64(), b"unknown float format"),
        (2, None, b"geometry is null"),
        (2, geo(batch=-1), b"negative dimension"),
        (2, geo(k_w=-3), b"negative dimension"),
        (2, geo(stride_h=0), b"strides and dilations"),
        (2, geo(dil_w=0), b"strides and dilations"),
        (2, geo(m=4), b"m must be <= in_c"),
        (2, geo(batch=2**40, in_h=2**40), b"too large"),
        (2, geo(stride_h=2**62), b"coordinates too large"),
    ]:
        for err in errors(fmt, g):
            assert err is not None and text in err, (fmt, g, err)
    # half / bfloat16 backprop input needs the float workspace.
    for fmt in (0, 1):
        err = bin_(fmt, None, None, None, None, None, good.as_int64().ctypes.data, None)
        assert err is not None and b"workspace" in err, err
    err = fused(2, None, None, None, None, 2, None, good.as_int64().ctypes.data, None)
    assert err is not None and b"activation must be 0 (linear) or 1 (relu)" in err, err
    # Nothing to write: success without touching CUDA.
    empty = geo(batch=0).ctypes.data
    assert fwd(2, None, None, None, None, empty, None) is None
    assert bin_(0, None, None, None, None, None, empty, None) is None
    assert bk(2, None, None, None, None, geo(out_c=0).ctypes.data, None) is None


# ----------------------------------------------------------------------------
# GPU tests
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,g", CASES, ids=[c[0] for c in CASES])
def test_conv(cs_lib, dtype, name, g):
    check_all(cs_lib, g, dtype, seed=len(name))


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_structured_connections(cs_lib, dtype):
    # Every output channel reads the same inputs (heavy atomic contention in
    # the input gradient), and a channel-shuffle pattern.
    g = make_geometry(2, 8, 8, 16, 64, 4, (3, 3))
    same = np.tile(np.array([3, 0, 15, 7], dtype=np.int32), (64, 1))
    check_all(cs_lib, g, dtype, conn=same)
    shuffle = ((np.arange(64)[:, None] * 4 + np.arange(4)[None, :]) % 16).astype(np.int32)
    check_all(cs_lib, g, dtype, conn=shuffle)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backprop_kernel_deterministic(cs_lib, dtype):
    for g in (CASES[0][1], CASES[-1][1], make_geometry(4, 20, 20, 8, 48, 3, (3, 3))):
        dev = Device(cs_lib, Problem(g, dtype, seed=5))
        first = dev.backprop_kernel(raw=True)
        for _ in range(3):
            np.testing.assert_array_equal(dev.backprop_kernel(raw=True), first)


EMPTY_CASES = [
    ("batch0", make_geometry(0, 5, 6, 4, 3, 2, (3, 3))),
    ("out_c0", make_geometry(2, 5, 6, 4, 0, 2, (3, 3))),
    ("m0", make_geometry(2, 5, 6, 4, 3, 0, (3, 3))),
    ("in_c0_m0", make_geometry(2, 5, 6, 0, 3, 0, (3, 3))),
    ("in_h0_padded", make_geometry(2, 0, 6, 4, 3, 2, (3, 3), padding=((2, 2), (1, 1)))),
    ("out_h0", make_geometry(2, 2, 6, 4, 3, 2, (3, 3), padding="valid")),
    ("k_w0", make_geometry(2, 5, 6, 4, 3, 2, (3, 0))),
    ("all0", Geometry(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,g", EMPTY_CASES, ids=[c[0] for c in EMPTY_CASES])
def test_empty(cs_lib, dtype, name, g):
    # Outputs that have entries must come back as exact zeros.
    dev = check_all(cs_lib, g, dtype)
    for got in (dev.forward(), dev.backprop_input(), dev.backprop_kernel()):
        assert not np.any(got), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", [0, 1], ids=["linear", "relu"])
@pytest.mark.parametrize(
    "name,g", [CASES[0], CASES[2], CASES[8], EMPTY_CASES[2], EMPTY_CASES[4]], ids=lambda c: str(c)[:20]
)
def test_conv_bias_activation(cs_lib, dtype, activation, name, g):
    """The fused epilogue: activation(conv + bias[o]); with m = 0 or no input, activation(bias)."""
    prob = Problem(g, dtype, seed=len(name) + activation)
    rng = np.random.default_rng(7)
    bias_s = to_storage(rng.standard_normal(g.out_c), dtype)
    bias = to_float64(bias_s, dtype)
    y, bound = prob.y_ref()
    want = y + bias
    # One more rounding (the bias add) on |conv| + |bias|.
    bound = bound + (np.abs(y) + np.abs(bias)) * 2 * U_ACC[dtype] + TINY[dtype]
    if activation:
        want = np.maximum(want, 0.0)
        assert want.size == 0 or 0.05 < np.mean(want > 0) < 0.95
    got = Device(cs_lib, prob).forward_bias_activation(bias_s, activation)
    assert_close("y_bias_activation", got, want, bound)
    # The plain entry point is unchanged (no bias).
    assert_close("y", Device(cs_lib, prob).forward(), *prob.y_ref())


def test_int64_index_path(cs_lib):
    # batch * out_h * out_w * m * out_c = 2^31: the kernels index with int64.
    g = make_geometry(1, 256, 256, 512, 64, 512, (1, 1))
    check_all(cs_lib, g, "float32", seed=6)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_timing(cs_lib, dtype, capsys):
    """Prints kernel times (informative only; no assertion on speed)."""
    lines = []
    for g in (
        make_geometry(32, 56, 56, 64, 64, 8, (3, 3)),
        make_geometry(32, 28, 28, 256, 256, 16, (1, 1)),
        make_geometry(64, 1, 1024, 64, 128, 8, (1, 5)),
    ):
        prob = Problem(g, dtype, seed=7)
        dev = Device(cs_lib, prob)
        y = cupy.empty(g.y_shape, dtype=STORAGE[dtype])
        dx = cupy.empty(g.x_shape, dtype=STORAGE[dtype])
        ws = cupy.empty(g.x_shape, dtype=np.float32)
        dk = cupy.empty(g.kernel_shape, dtype=STORAGE[dtype])
        stream = cupy.cuda.get_current_stream()
        geo = g.as_int64()
        calls = {
            "fwd": ("tsc_channel_sparse_conv2d_gpu", dev.x, dev.kernel, dev.conn, y),
            "dx": ("tsc_channel_sparse_conv2d_backprop_input_gpu", dev.dy, dev.kernel, dev.conn, dx, ws),
            "dk": ("tsc_channel_sparse_conv2d_backprop_kernel_gpu", dev.x, dev.dy, dev.conn, dk),
        }
        parts = []
        for label, (name, *arrays) in calls.items():
            f = getattr(cs_lib, name)
            args = [FORMATS[dtype], *(a.data.ptr for a in arrays), geo.ctypes.data, stream.ptr]
            assert f(*args) is None
            stream.synchronize()
            start, stop = cupy.cuda.Event(), cupy.cuda.Event()
            reps = 5
            start.record(stream)
            for _ in range(reps):
                assert f(*args) is None
            stop.record(stream)
            stop.synchronize()
            parts.append(f"{label} {cupy.cuda.get_elapsed_time(start, stop) / reps:.3f} ms")
        macs = g.batch * g.out_h * g.out_w * g.out_c * g.m * g.k_h * g.k_w
        lines.append(
            f"{dtype} {g.x_shape} k={g.k_h}x{g.k_w} m={g.m} out_c={g.out_c} ({macs / 1e9:.2f} GMAC): "
            + ", ".join(parts)
        )
    with capsys.disabled():
        print("\n" + "\n".join(lines))
