"""GPU tests of ChannelSparseDenseKernel / ChannelSparseGatherKernel's CUDA kernels
(channel_sparse_dense_op_gpu.cu.cc): a channel-sparse kernel [taps, m, Cout] placed into its dense
equivalent [taps, Cin, Cout] and gathered back, on the raw bits of 2-, 4- and 8-byte elements,
against NumPy. Connection values outside [0, Cin) (not validated on the device) place nothing and
gather zero; guard zones around every output catch stray writes. No TensorFlow needed."""

import ctypes

import numpy as np
import pytest
from _common import assert_guards, cupy, declare, guarded_array

DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64}


def _signatures(lib):
    argtypes = [ctypes.c_int, *[ctypes.c_void_p] * 3, *[ctypes.c_int64] * 4, ctypes.c_void_p]
    names = ("tsc_channel_sparse_dense_kernel_gpu", "tsc_channel_sparse_gather_kernel_gpu")
    return declare(lib, dict.fromkeys(names, argtypes))


def _placed(connections, cin):
    """(o, j, c) of every entry c = connections[o, j] in [0, cin), row by row."""
    return [(o, j, c) for (o, j), c in np.ndenumerate(connections) if 0 <= c < cin]


def _np_dense(kernel, connections, cin):
    dense = np.zeros((kernel.shape[0], cin, kernel.shape[2]), kernel.dtype)
    for o, j, c in _placed(connections, cin):
        dense[:, c, o] = kernel[:, j, o]
    return dense


def _np_gather(dense, connections):
    kernel = np.zeros((dense.shape[0], connections.shape[1], dense.shape[2]), dense.dtype)
    for o, j, c in _placed(connections, dense.shape[1]):
        kernel[:, j, o] = dense[:, c, o]
    return kernel


def _run(lib, taps, cin, cout, m, connections, dtype, rng):
    lib = _signatures(lib)
    kernel = rng.standard_normal((taps, m, cout)).astype(dtype)
    dense_in = rng.standard_normal((taps, cin, cout)).astype(dtype)
    conn = cupy.asarray(connections.astype(np.int32))
    size = np.dtype(dtype).itemsize
    raw_dense, dense = guarded_array((taps, cin, cout), dtype)
    kernel_dev = cupy.asarray(kernel)  # kept alive until the synchronize below
    err = lib.tsc_channel_sparse_dense_kernel_gpu(
        size, kernel_dev.data.ptr, conn.data.ptr, dense.data.ptr, taps, m, cout, cin, None
    )
    assert err is None, err
    raw_kernel, gathered = guarded_array((taps, m, cout), dtype)
    dense_dev = cupy.asarray(dense_in)
    err = lib.tsc_channel_sparse_gather_kernel_gpu(
        size, dense_dev.data.ptr, conn.data.ptr, gathered.data.ptr, taps, m, cout, cin, None
    )
    assert err is None, err
    cupy.cuda.Device().synchronize()
    expected_dense = _np_dense(kernel, connections, cin)
    np.testing.assert_array_equal(cupy.asnumpy(dense), expected_dense)
    expected_kernel = _np_gather(dense_in, connections)
    np.testing.assert_array_equal(cupy.asnumpy(gathered), expected_kernel)
    assert_guards("dense", raw_dense)
    assert_guards("gathered", raw_kernel)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("taps, cin, cout, m", [(9, 16, 12, 5), (3, 7, 33, 7), (1, 130, 3, 2)])
def test_dense_and_gather_match_numpy(gpu_lib, dtype, taps, cin, cout, m):
    rng = np.random.default_rng(taps * 1000 + cin)
    connections = np.stack([rng.choice(cin, m, replace=False) for _ in range(cout)])
    _run(gpu_lib, taps, cin, cout, m, connections, DTYPES[dtype], rng)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_out_of_range_connections_place_nothing_and_gather_zero(gpu_lib, dtype):
    rng = np.random.default_rng(7)
    taps, cin, cout, m = 9, 10, 6, 4
    connections = np.stack([rng.choice(cin, m, replace=False) for _ in range(cout)])
    connections[0, 1] = -1
    connections[2, 0] = cin
    connections[3, 3] = np.iinfo(np.int32).max
    connections[4, 2] = np.iinfo(np.int32).min
    _run(gpu_lib, taps, cin, cout, m, connections, DTYPES[dtype], rng)


def test_empty_and_bad_arguments(gpu_lib):
    lib = _signatures(gpu_lib)
    assert lib.tsc_channel_sparse_dense_kernel_gpu(4, None, None, None, 9, 0, 0, 5, None) is None
    assert lib.tsc_channel_sparse_gather_kernel_gpu(4, None, None, None, 0, 3, 4, 5, None) is None
    assert b"elem_bytes" in lib.tsc_channel_sparse_dense_kernel_gpu(3, None, None, None, 1, 1, 1, 1, None)
    assert b"negative" in lib.tsc_channel_sparse_gather_kernel_gpu(4, None, None, None, -1, 1, 1, 1, None)
