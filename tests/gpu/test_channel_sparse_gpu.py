"""GPU tests of the channel-sparse convolution kernels (channel_sparse_op_gpu.cu.cc).

Runs the kernels through their ``extern "C"`` entry points (ctypes) on CuPy
device memory and compares them with an independent float64 NumPy reference:
the sparse kernel is scattered into a dense ``[k_h, k_w, in_c, out_c]`` one
and the convolution is a sum over taps of strided views of the zero-padded
input (its gradients are the adjoint sums). Tolerances are rigorous
rounding-error bounds computed from the same reference on absolute values
(they hold for any summation order). Every kernel must be bitwise
deterministic, and connections outside ``[0, in_c)`` (not validated on the
device) must contribute zero without any out-of-bounds access.

A NumPy model of the backprop-input algorithm (the transposed connection
list and each dx element's summation order, thread or warp per element) is
checked against the reference on the CPU, so its index math is tested
without a GPU. No TensorFlow needed. Skips (with the reason) when nvcc, CuPy
or a GPU is missing; the compile and argument-checking tests only need nvcc,
the reference and model self-tests nothing.
"""

import ctypes
from dataclasses import dataclass

import numpy as np
import pytest
from _common import (
    DTYPES,
    FORMATS,
    STORAGE,
    TINY,
    U_ACC,
    assert_close,
    assert_compiled,
    cupy,
    declare,
    dev_ptr,
    error_bound,
    garbage,
    time_ms,
    to_float64,
    to_storage,
)

ENTRY_POINTS = (
    "tsc_channel_sparse_conv2d_gpu",
    "tsc_channel_sparse_conv2d_bias_activation_gpu",
    "tsc_channel_sparse_conv2d_backprop_input_gpu",
    "tsc_channel_sparse_conv2d_backprop_kernel_gpu",
    "tsc_channel_sparse_conv2d_backprop_input_gpu_workspace_bytes",
)
# The launcher's choice for the backprop-input gather (channel_sparse_op_gpu.cu.cc,
# GatherLanes): a warp per dx element when dx has fewer than this many elements and
# out_c * m >= 16 * in_c, else a thread per element.
GATHER_TARGET_THREADS = 2**17


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


def random_connections(rng, in_c, out_c, m):
    """[out_c, m] int32, distinct values in [0, in_c) per row, random order."""
    conn = np.zeros((out_c, m), dtype=np.int32)
    for o in range(out_c):
        conn[o] = rng.permutation(in_c)[:m]
    return conn


def skewed_connections(rng, in_c, out_c, m, hot=2, used=None):
    """[out_c, m] int32 (distinct per row, shuffled) where channels 0 .. hot - 1 are in
    every row (each read out_c times), the other entries are drawn from hot .. used - 1,
    and channels used .. in_c - 1 are never read (used defaults to max(in_c // 2 + 1, m))."""
    used = max(in_c // 2 + 1, m) if used is None else used
    assert hot <= m <= in_c and m - hot <= used - hot <= in_c
    conn = np.zeros((out_c, m), dtype=np.int32)
    for o in range(out_c):
        rest = hot + rng.permutation(used - hot)[: m - hot]
        conn[o] = rng.permutation(np.concatenate([np.arange(hot), rest]))
    return conn


# ----------------------------------------------------------------------------
# Independent NumPy reference (float64)
# ----------------------------------------------------------------------------


def valid_connections(conn, in_c):
    """Mask of the entries in [0, in_c) (the others contribute zero on the GPU)."""
    return (conn >= 0) & (conn < in_c)


def dense_kernel(kernel, conn, in_c):
    """[k_h, k_w, in_c, out_c] with dense[:, :, conn[o, e], o] += kernel[:, :, e, o].

    Entries outside [0, in_c) are dropped (they contribute zero, as in the GPU
    kernels, which do not validate the connections); repeated entries of a row add.
    """
    k_h, k_w, m, out_c = kernel.shape
    dense = np.zeros((in_c, out_c, k_h, k_w), dtype=np.float64)
    if conn.size:
        valid = valid_connections(conn, in_c)
        o_idx, e_idx = np.nonzero(valid)
        # kernel as [m, out_c, k_h, k_w]; one [k_h, k_w] block per valid (o, e).
        blocks = np.moveaxis(kernel, (2, 3), (0, 1))[e_idx, o_idx]
        np.add.at(dense, (conn[o_idx, e_idx], o_idx), blocks)
    return np.moveaxis(dense, (0, 1), (2, 3))


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


def _padded(x, g):
    """x zero-padded as the convolution reads it."""
    xp = np.zeros(_padded_shape(g))
    xp[_interior(g)] = x
    return xp


def ref_forward(x, kernel, conn, g):
    y = np.zeros(g.y_shape)
    if g.out_h == 0 or g.out_w == 0:
        return y
    xp = _padded(x, g)
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
    xp = _padded(x, g)
    rows = np.arange(g.out_c)[:, None]
    valid = valid_connections(conn, g.in_c)
    safe = np.where(valid, conn, 0)
    for i in range(g.k_h):
        for j in range(g.k_w):
            full = np.tensordot(xp[_tap(g, i, j)], dy, axes=([0, 1, 2], [0, 1, 2]))  # [in_c, out_c]
            dk[i, j] = np.where(valid, full[safe, rows], 0.0).T if conn.size else 0.0
    return dk


def naive_forward(x, kernel, conn, g):
    """The formula of channel_sparse_common.h, literally (tiny shapes only)."""
    y = np.zeros(g.y_shape)
    for b, oh, ow, o in np.ndindex(*g.y_shape):
        s = 0.0
        for i, j, e in np.ndindex(g.k_h, g.k_w, g.m):
            ih = oh * g.stride_h - g.pad_top + i * g.dil_h
            iw = ow * g.stride_w - g.pad_left + j * g.dil_w
            if 0 <= ih < g.in_h and 0 <= iw < g.in_w and 0 <= conn[o, e] < g.in_c:
                s += x[b, ih, iw, conn[o, e]] * kernel[i, j, e, o]
        y[b, oh, ow, o] = s
    return y


# ----------------------------------------------------------------------------
# NumPy model of the backprop-input gather (channel_sparse_op_gpu.cu.cc)
# ----------------------------------------------------------------------------


def gather_lanes(g):
    """Lanes per dx element the launcher picks (GatherLanes): 32 or 1."""
    small = g.batch * g.in_h * g.in_w * g.in_c < GATHER_TARGET_THREADS
    return 32 if small and g.out_c * g.m >= 16 * g.in_c else 1


def transpose_connections(conn, in_c):
    """The transposed list as the kernels build it: (row_ptr [in_c + 1], o [n], w [n]).

    Keys are the connections with out-of-range values replaced by the sentinel
    in_c; a stable sort of the flat indices k = o * m + e by key (CUB's radix sort
    is stable); row_ptr[c] = first sorted position with key >= c (binary search);
    entry p = (o, e * out_c + o) of the k at sorted position p.
    """
    out_c, m = conn.shape
    flat = conn.reshape(-1).astype(np.int64)
    keys = np.where((flat >= 0) & (flat < in_c), flat, in_c)
    order = np.argsort(keys, kind="stable")
    row_ptr = np.searchsorted(keys[order], np.arange(in_c + 1), side="left")
    o, e = order // m, order % m
    return row_ptr, o, e * out_c + o


def emulate_backprop_input(dy, kernel, conn, g, lanes=None):
    """dx computed with the kernel's index math and summation order (float64).

    Lane l of a dx element (b, ih, iw, c) sums, over the taps (i, j) in ascending
    order whose output pixel exists, the entries row_ptr[c] + l, + l + lanes, ...;
    the lanes' partial sums are then combined by the xor butterfly (as
    __shfl_xor_sync with offsets 16, 8, 4, 2, 1) and lane 0's value is dx.
    Tiny shapes only (pure Python loops).
    """
    lanes = gather_lanes(g) if lanes is None else lanes
    dx = np.zeros(g.x_shape)
    if dx.size == 0 or dy.size == 0 or kernel.size == 0:
        return dx
    row_ptr, ent_o, ent_w = transpose_connections(conn, g.in_c)
    w_taps = kernel.reshape(g.k_h * g.k_w, g.m * g.out_c)  # [tap, e * out_c + o]

    def taps(t0, k, dil, stride, size):
        """(tap, output coordinate) of one axis' taps, ascending, whose output pixel exists."""
        for i in range(k):
            t = t0 - i * dil
            if t < 0:
                break
            if t % stride == 0 and t // stride < size:
                yield i, t // stride

    for b, ih, iw, c in np.ndindex(*g.x_shape):
        part = [0.0] * lanes
        for lane in range(lanes):
            r0, r1 = row_ptr[c] + lane, row_ptr[c + 1]
            if r0 >= r1:
                continue
            acc = 0.0
            for i, oh in taps(ih + g.pad_top, g.k_h, g.dil_h, g.stride_h, g.out_h):
                for j, ow in taps(iw + g.pad_left, g.k_w, g.dil_w, g.stride_w, g.out_w):
                    for r in range(r0, r1, lanes):
                        acc += dy[b, oh, ow, ent_o[r]] * w_taps[i * g.k_w + j, ent_w[r]]
            part[lane] = acc
        off = lanes // 2
        while off:
            part = [part[lane] + part[lane ^ off] for lane in range(lanes)]
            off //= 2
        dx[b, ih, iw, c] = part[0]
    return dx


# ----------------------------------------------------------------------------
# Problems and their references
# ----------------------------------------------------------------------------


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
        # Terms of one dx element: the longest row of the transposed list per tap.
        uses = np.bincount(c[valid_connections(c, g.in_c)].ravel(), minlength=1)
        bound = error_bound(abs_ref, max(int(uses.max()), 1) * g.k_h * g.k_w, self.dtype)
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
        "tsc_channel_sparse_conv2d_backprop_input_gpu": [ctypes.c_int, p, p, p, p, p, ctypes.c_int64, p, p],
        "tsc_channel_sparse_conv2d_backprop_kernel_gpu": [ctypes.c_int, p, p, p, p, p, p],
        "tsc_channel_sparse_conv2d_backprop_input_gpu_workspace_bytes": [p, p],
    }
    return declare(lib, sigs)


@pytest.fixture(scope="module")
def cs_lib(gpu_lib):
    return _declare(gpu_lib)


def workspace_bytes(lib, g):
    """Backprop-input workspace size from the entry point (asserts success)."""
    out = ctypes.c_int64(-1)
    geometry = g.as_int64()
    err = lib.tsc_channel_sparse_conv2d_backprop_input_gpu_workspace_bytes(
        geometry.ctypes.data, ctypes.addressof(out)
    )
    assert err is None, err.decode()
    assert out.value >= 0
    return out.value


class Guarded:
    """An output buffer with NaN-filled guard zones on both sides (out-of-bounds writes show)."""

    GUARD = 4096  # elements on each side

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), dtype
        self.n = int(np.prod(shape))
        self.buf = garbage((self.n + 2 * self.GUARD,), dtype)
        self.fill = cupy.asnumpy(self.buf[:1]).view(np.uint8).copy()
        self.view = self.buf[self.GUARD : self.GUARD + self.n].reshape(self.shape)

    def result(self):
        """The view as float64 (after checking both guard zones are intact)."""
        host = cupy.asnumpy(self.buf)
        guards = np.concatenate([host[: self.GUARD], host[self.GUARD + self.n :]])
        per = guards.view(np.uint8).reshape(len(guards), -1)
        assert (per == self.fill).all(), "write outside the output tensor"
        return to_float64(host[self.GUARD : self.GUARD + self.n].reshape(self.shape), self.dtype)


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

    def _guarded_call(self, name, shape, inputs, *scalars, raw=False):
        """Runs `name` on the device arrays `inputs` into a Guarded output of `shape`; returns
        its float64 values (raw: its storage) after checking the guard zones."""
        out = Guarded(shape, self.prob.dtype)
        self._call(name, *(dev_ptr(a) for a in inputs), dev_ptr(out.view), *scalars)
        values = out.result()  # checks the guard zones
        return cupy.asnumpy(out.view) if raw else values

    def forward(self, raw=False):
        inputs = (self.x, self.kernel, self.conn)
        return self._guarded_call("tsc_channel_sparse_conv2d_gpu", self.g.y_shape, inputs, raw=raw)

    def forward_bias_activation(self, bias_s, activation: int):
        """y = activation(conv + bias) from the fused entry point (bias in storage dtype)."""
        y = garbage(self.g.y_shape, self.prob.dtype)
        bias = cupy.asarray(bias_s)
        self._call(
            "tsc_channel_sparse_conv2d_bias_activation_gpu",
            dev_ptr(self.x),
            dev_ptr(self.kernel),
            dev_ptr(self.conn),
            dev_ptr(bias),
            activation,
            dev_ptr(y),
        )
        return to_float64(cupy.asnumpy(y), self.prob.dtype)

    def backprop_input(self, raw=False, ws_fill=0xA5):
        """dx; the workspace is filled with ws_fill bytes first (its contents must not
        matter) and has guard zones of another byte on both sides, checked after the call."""
        size = workspace_bytes(self.lib, self.g)
        guard, guard_fill = Guarded.GUARD, 0xC3 if ws_fill != 0xC3 else 0x3C
        ws = cupy.full(size + 2 * guard, guard_fill, dtype=np.uint8)
        ws[guard : guard + size] = ws_fill
        dx = self._guarded_call(
            "tsc_channel_sparse_conv2d_backprop_input_gpu",
            self.g.x_shape,
            (self.dy, self.kernel, self.conn),
            ws.data.ptr + guard if size else None,
            size,
            raw=raw,
        )
        host_ws = cupy.asnumpy(ws)
        assert (host_ws[:guard] == guard_fill).all(), "write before the workspace"
        assert (host_ws[guard + size :] == guard_fill).all(), "write after the workspace"
        return dx

    def backprop_kernel(self, raw=False):
        inputs = (self.x, self.dy, self.conn)
        return self._guarded_call(
            "tsc_channel_sparse_conv2d_backprop_kernel_gpu", self.g.kernel_shape, inputs, raw=raw
        )


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


# Tiny geometries for the NumPy model of the gather: both lane counts, strides,
# dilations, explicit and oversized pads, 1-D, kernel larger than the input.
MODEL_CASES = [
    make_geometry(2, 5, 6, 6, 10, 3, (3, 3)),
    make_geometry(1, 7, 6, 5, 12, 2, (3, 2), stride=(2, 3), dil=(2, 1), padding="valid"),
    make_geometry(2, 1, 11, 4, 9, 2, (1, 5), stride=(1, 2), dil=(1, 2)),
    make_geometry(1, 4, 5, 3, 8, 2, (3, 3), padding=((4, 4), (3, 5))),
    make_geometry(1, 3, 2, 4, 6, 3, (5, 4)),
    make_geometry(1, 6, 5, 4, 7, 3, (2, 3), (2, 1), (1, 3), ((2, 1), (0, 4))),
]


def test_transpose_model_lists_each_connection_once_in_order():
    rng = np.random.default_rng(0)
    for in_c, out_c, m in [(6, 10, 3), (4, 9, 4), (16, 64, 4), (5, 1, 1)]:
        conn = skewed_connections(rng, in_c, out_c, m, hot=1)
        conn[rng.random(conn.shape) < 0.2] = -1
        if out_c > 1:
            conn[-1, 0] = in_c  # out of range
        row_ptr, ent_o, ent_w = transpose_connections(conn, in_c)
        assert row_ptr[0] == 0 and np.all(np.diff(row_ptr) >= 0)
        assert row_ptr[in_c] == valid_connections(conn, in_c).sum()
        for c in range(in_c):
            # Row c: exactly the (o, e) with conn[o, e] == c, ascending o * m + e.
            o_want, e_want = np.nonzero(conn == c)
            rows = slice(row_ptr[c], row_ptr[c + 1])
            np.testing.assert_array_equal(ent_o[rows], o_want)
            np.testing.assert_array_equal(ent_w[rows], e_want * out_c + o_want)


@pytest.mark.parametrize("lanes", [1, 32])
@pytest.mark.parametrize("g", MODEL_CASES, ids=range(len(MODEL_CASES)))
def test_gather_model_matches_reference(g, lanes):
    """The gather's index math reproduces the adjoint exactly (integer data: exact sums),
    with skewed lists, out-of-range values and a repeated channel in one row."""
    rng = np.random.default_rng(g.in_c + lanes)
    for conn in (
        skewed_connections(rng, g.in_c, g.out_c, g.m, hot=1),
        out_of_range_connections(rng, g.in_c, g.out_c, g.m),
    ):
        dy = rng.integers(-4, 5, g.y_shape).astype(np.float64)
        kernel = rng.integers(-4, 5, g.kernel_shape).astype(np.float64)
        want = ref_backprop_input(dy, kernel, conn, g)
        np.testing.assert_array_equal(emulate_backprop_input(dy, kernel, conn, g, lanes), want)


def test_gather_model_random_data():
    g = MODEL_CASES[1]
    prob = Problem(g, "float64", seed=8)
    np.testing.assert_allclose(
        emulate_backprop_input(prob.dy, prob.kernel, prob.conn, g),
        ref_backprop_input(prob.dy, prob.kernel, prob.conn, g),
        rtol=1e-12,
        atol=1e-12,
    )


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
    assert_compiled(gpu_kernels_lib, tsc_gpu_build, "channel_sparse_op_gpu.cu.cc", ENTRY_POINTS)


def test_argument_errors(gpu_kernels_lib):
    """Invalid arguments are reported before any CUDA call (no GPU needed)."""
    lib = _declare(ctypes.CDLL(gpu_kernels_lib))
    fwd, fused, bin_, bk, ws_bytes = (getattr(lib, n) for n in ENTRY_POINTS)
    good = make_geometry(1, 4, 4, 3, 2, 2, (3, 3))

    def geo(**kw):
        return np.array([*{**good.__dict__, **kw}.values()], dtype=np.int64)

    def errors(fmt, geometry):
        p = geometry.ctypes.data if geometry is not None else None
        return [
            fwd(fmt, None, None, None, None, p, None),
            fused(fmt, None, None, None, None, 1, None, p, None),
            bin_(fmt, None, None, None, None, None, 0, p, None),
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
        (2, geo(in_h=2**62, in_w=1, in_c=1, m=1), b"coordinates too large"),
    ]:
        for err in errors(fmt, g):
            assert err is not None and text in err, (fmt, g, err)
    # Backprop input needs its workspace (every dtype) once there is work to do
    # (its size is checked against the CUB-sized layout, which needs a GPU).
    for fmt in (0, 1, 2, 3):
        err = bin_(fmt, None, None, None, None, None, 0, good.as_int64().ctypes.data, None)
        assert err is not None and b"workspace" in err, err
    # ... and in_c, out_c * m below 2^30 (int32 positions in the transposed list).
    big = geo(in_c=2**30, m=2, out_c=2, batch=1, in_h=1, in_w=1)
    err = bin_(2, None, None, None, None, None, 0, big.ctypes.data, None)
    assert err is not None and b"below 2^30" in err, err
    # Workspace sizes: errors as the launcher's, 0 (without CUDA) when nothing runs.
    size = ctypes.c_int64(-1)
    assert b"geometry is null" in ws_bytes(None, ctypes.addressof(size))
    assert b"negative dimension" in ws_bytes(geo(batch=-1).ctypes.data, ctypes.addressof(size))
    assert b"below 2^30" in ws_bytes(big.ctypes.data, ctypes.addressof(size))
    assert b"bytes is null" in ws_bytes(good.as_int64().ctypes.data, None)
    for empty_g in (geo(batch=0), geo(m=0), geo(out_c=0), geo(k_h=0)):
        size.value = -1
        assert ws_bytes(empty_g.ctypes.data, ctypes.addressof(size)) is None
        assert size.value == 0
    err = fused(2, None, None, None, None, 2, None, good.as_int64().ctypes.data, None)
    assert err is not None and b"activation must be 0 (linear) or 1 (relu)" in err, err
    # Nothing to write: success without touching CUDA.
    empty = geo(batch=0).ctypes.data
    assert fwd(2, None, None, None, None, empty, None) is None
    assert bin_(0, None, None, None, None, None, 0, empty, None) is None
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
    # Every output channel reads the same inputs (rows of 64 entries in the
    # transposed list, 12 empty rows), and a channel-shuffle pattern.
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


# Backprop input with skewed connection lists: channels 0 and 1 read by every
# output channel, about half the channels never read. (name, geometry, lanes
# per dx element the launcher picks.)
SKEWED_CASES = [
    ("3x3_same_warp", make_geometry(2, 7, 9, 16, 64, 4, (3, 3)), 32),
    ("3x3_same_thread", make_geometry(2, 7, 9, 16, 24, 4, (3, 3)), 1),
    ("3x3_s2_d2_pads_warp", make_geometry(1, 9, 8, 12, 96, 3, (3, 3), (2, 2), (2, 2), ((2, 1), (0, 3))), 32),
    ("3x3_valid_s2_thread", make_geometry(2, 10, 9, 20, 30, 5, (3, 3), stride=(2, 2), padding="valid"), 1),
    ("conv1d_1x5_s2_warp", make_geometry(3, 1, 23, 8, 48, 3, (1, 5), stride=(1, 2)), 32),
    ("conv1d_1x3_d3_thread", make_geometry(2, 1, 30, 10, 12, 3, (1, 3), dil=(1, 3), padding="valid"), 1),
    ("1x1_many_pixels_thread", make_geometry(2, 96, 96, 16, 64, 4, (1, 1)), 1),  # dx >= 2^17 elements
    ("m_in_c_warp", make_geometry(1, 5, 6, 6, 40, 6, (2, 2)), 32),  # every row reads every channel
]


def test_skewed_cases_cover_both_gather_modes():
    assert {lanes for _, _, lanes in SKEWED_CASES} == {1, 32}
    for name, g, lanes in SKEWED_CASES:
        assert gather_lanes(g) == lanes, name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,g,lanes", SKEWED_CASES, ids=[c[0] for c in SKEWED_CASES])
def test_backprop_input_skewed_connections(cs_lib, dtype, name, g, lanes):
    """dx with channels read out_c times and channels never read (exact zeros there)."""
    conn = skewed_connections(np.random.default_rng(len(name)), g.in_c, g.out_c, g.m)
    prob = Problem(g, dtype, seed=len(name), conn=conn)
    dev = Device(cs_lib, prob)
    got = dev.backprop_input()
    assert_close("dx", got, *prob.dx_ref())
    unused = np.setdiff1d(np.arange(g.in_c), conn)
    assert not np.any(got[..., unused])
    assert_close("y", dev.forward(), *prob.y_ref())
    assert_close("dkernel", dev.backprop_kernel(), *prob.dk_ref())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name,g,lanes", SKEWED_CASES[:6], ids=[c[0] for c in SKEWED_CASES[:6]])
def test_backprop_input_exact_on_integers(cs_lib, dtype, name, g, lanes):
    """Small integer operands: every partial sum is exact, so dx must equal the
    reference exactly (any index error, missed or doubled term shows)."""
    conn = skewed_connections(np.random.default_rng(len(name)), g.in_c, g.out_c, g.m)
    prob = Problem(g, dtype, seed=1, conn=conn)
    rng = np.random.default_rng(2)
    prob.dy_s = to_storage(rng.integers(-3, 4, g.y_shape), dtype)
    prob.k_s = to_storage(rng.integers(-3, 4, g.kernel_shape), dtype)
    prob.dy, prob.kernel = to_float64(prob.dy_s, dtype), to_float64(prob.k_s, dtype)
    got = Device(cs_lib, prob).backprop_input()
    np.testing.assert_array_equal(got, ref_backprop_input(prob.dy, prob.kernel, conn, g))


@pytest.mark.parametrize("dtype", DTYPES)
def test_backprop_input_deterministic(cs_lib, dtype):
    """Bitwise equal dx on repeated calls (whatever the workspace held before),
    in both gather modes, with heavily repeated input channels."""
    for name, g, _ in (SKEWED_CASES[0], SKEWED_CASES[1], SKEWED_CASES[6], ("dense", CASES[-1][1], 32)):
        conn = skewed_connections(np.random.default_rng(9), g.in_c, g.out_c, g.m, hot=min(4, g.m))
        dev = Device(cs_lib, Problem(g, dtype, seed=11, conn=conn))
        first = dev.backprop_input(raw=True)
        for fill in (0x00, 0xFF, 0x5A):
            np.testing.assert_array_equal(dev.backprop_input(raw=True, ws_fill=fill), first, err_msg=name)
        # Forward and kernel gradient too (no atomics anywhere).
        y, dk = dev.forward(raw=True), dev.backprop_kernel(raw=True)
        np.testing.assert_array_equal(dev.forward(raw=True), y, err_msg=name)
        np.testing.assert_array_equal(dev.backprop_kernel(raw=True), dk, err_msg=name)


def test_backprop_input_workspace_too_small(cs_lib):
    g = SKEWED_CASES[0][1]
    dev = Device(cs_lib, Problem(g, "float32"))
    size = workspace_bytes(cs_lib, g)
    assert size >= 24 * g.out_c * g.m  # keys and values (double buffers) and entries
    ws = cupy.zeros(size, dtype=np.uint8)
    dx = cupy.zeros(g.x_shape, dtype=np.float32)
    err = cs_lib.tsc_channel_sparse_conv2d_backprop_input_gpu(
        FORMATS["float32"],
        dev_ptr(dev.dy),
        dev_ptr(dev.kernel),
        dev_ptr(dev.conn),
        dev_ptr(dx),
        dev_ptr(ws),
        size - 1,
        dev.geometry.ctypes.data,
        cupy.cuda.get_current_stream().ptr,
    )
    assert err is not None and b"workspace is smaller" in err, err
    assert not cupy.any(dx)  # nothing launched


def out_of_range_connections(rng, in_c, out_c, m):
    """Random valid lists with about a third of the entries replaced by values outside
    [0, in_c) (-1, in_c, in_c + 7, INT32_MIN, INT32_MAX), one row entirely invalid,
    and a repeated channel in one row (not validated on the device either)."""
    conn = random_connections(rng, in_c, out_c, m).astype(np.int64)
    bad = np.array([-1, in_c, in_c + 7, -(2**31), 2**31 - 1])
    mask = rng.random(conn.shape) < 0.35
    conn[mask] = rng.choice(bad, size=int(mask.sum()))
    conn[0] = rng.choice(bad, size=m)
    if m >= 2 and out_c >= 2:
        conn[1, :2] = 0
    return conn.astype(np.int32)


OUT_OF_RANGE_CASES = [
    ("3x3_same_thread", make_geometry(2, 6, 7, 9, 11, 3, (3, 3))),
    ("3x3_s2_d2_warp", make_geometry(1, 8, 9, 6, 96, 4, (3, 3), (2, 2), (2, 2))),
    ("conv1d_valid", make_geometry(2, 1, 19, 7, 10, 3, (1, 5), padding="valid")),
    ("1x1_m_in_c", make_geometry(2, 4, 5, 4, 70, 4, (1, 1))),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,g", OUT_OF_RANGE_CASES, ids=[c[0] for c in OUT_OF_RANGE_CASES])
def test_out_of_range_connections(cs_lib, dtype, name, g):
    """Connections outside [0, in_c) contribute zero (dkernel entries through them are
    0), repeats add, and no kernel writes outside its output (guard zones) or faults
    (INT32_MIN / INT32_MAX would read far outside x)."""
    conn = out_of_range_connections(np.random.default_rng(len(name)), g.in_c, g.out_c, g.m)
    assert not valid_connections(conn, g.in_c).all()
    prob = Problem(g, dtype, seed=len(name), conn=conn)
    dev = Device(cs_lib, prob)
    assert_close("y", dev.forward(), *prob.y_ref())
    assert_close("dx", dev.backprop_input(), *prob.dx_ref())
    dk = dev.backprop_kernel()
    assert_close("dkernel", dk, *prob.dk_ref())
    assert not np.any(dk[:, :, ~valid_connections(conn, g.in_c).T])
    # The same with the fused bias / relu entry point.
    bias_s = to_storage(np.random.default_rng(1).standard_normal(g.out_c), dtype)
    y, bound = prob.y_ref()
    want = np.maximum(y + to_float64(bias_s, dtype), 0.0)
    bound = bound + (np.abs(y) + np.abs(to_float64(bias_s, dtype))) * 2 * U_ACC[dtype] + TINY[dtype]
    assert_close("y_bias_relu", dev.forward_bias_activation(bias_s, 1), want, bound)


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
    # batch * out_h * out_w * m * out_c = 2^31: the kernels index with int64
    # (the launcher bounds that product too, so this moderate size reaches the
    # 64-bit instantiations; the backprop input gathers one thread per element).
    g = make_geometry(1, 256, 256, 512, 64, 512, (1, 1))
    assert gather_lanes(g) == 1
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
        ws = cupy.empty(max(workspace_bytes(cs_lib, g), 1), dtype=np.uint8)
        dk = cupy.empty(g.kernel_shape, dtype=STORAGE[dtype])
        stream = cupy.cuda.get_current_stream()
        geo = g.as_int64()
        calls = {  # label: (entry point, device arrays, trailing scalars)
            "fwd": ("tsc_channel_sparse_conv2d_gpu", (dev.x, dev.kernel, dev.conn, y), ()),
            "dx": (
                "tsc_channel_sparse_conv2d_backprop_input_gpu",
                (dev.dy, dev.kernel, dev.conn, dx, ws),
                (ws.size,),
            ),
            "dk": ("tsc_channel_sparse_conv2d_backprop_kernel_gpu", (dev.x, dev.dy, dev.conn, dk), ()),
        }
        parts = []
        for label, (name, arrays, scalars) in calls.items():
            args = [FORMATS[dtype], *(a.data.ptr for a in arrays), *scalars, geo.ctypes.data, stream.ptr]
            parts.append(f"{label} {time_ms(getattr(cs_lib, name), args, reps=5):.3f} ms")
        macs = g.batch * g.out_h * g.out_w * g.out_c * g.m * g.k_h * g.k_w
        lines.append(
            f"{dtype} {g.x_shape} k={g.k_h}x{g.k_w} m={g.m} out_c={g.out_c} ({macs / 1e9:.2f} GMAC): "
            + ", ".join(parts)
        )
    with capsys.disabled():
        print("\n" + "\n".join(lines))
