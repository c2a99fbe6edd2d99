"""GPU tests of the streaming convolution step (streaming_op_gpu.cu.cc).

Runs the kernels through their ``extern "C"`` entry point (ctypes) on CuPy
device memory against an independent float64 NumPy oracle (a sum over taps of
shifted views of the concatenated history and frames), with rounding-error
bounds computed from the oracle on absolute values. No TensorFlow needed.
Skips (with the reason) when nvcc, CuPy or a GPU is missing; the compile and
argument tests need nvcc only.
"""

import ctypes

import numpy as np
import pytest
from _common import (
    FORMATS,
    STORAGE,
    U_ACC,
    U_OUT,
    assert_compiled,
    cupy,
    declare,
    garbage,
    to_float64,
    to_storage,
)

ENTRY = "tsc_streaming_conv_step_gpu"


def oracle(history, frames, kernel, bias, dilation, relu):
    z = np.concatenate([history, frames], axis=1)
    taps, steps = kernel.shape[0], frames.shape[1]
    y = np.zeros((frames.shape[0], steps, kernel.shape[2])) + (0.0 if bias is None else bias)
    for i in range(taps):
        y += np.einsum("btc,cf->btf", z[:, i * dilation : i * dilation + steps], kernel[i])
    return (np.maximum(y, 0) if relu else y), z[:, steps:]


def _declare(lib):
    p = ctypes.c_void_p
    return getattr(declare(lib, {ENTRY: [ctypes.c_int, p, p, p, p, ctypes.c_int, p, p, p, p]}), ENTRY)


def geometry(batch, steps, channels, filters, taps, dilation, hist=None):
    hist = (taps - 1) * dilation if hist is None else hist
    return np.array([batch, steps, hist, channels, filters, taps, dilation], dtype=np.int64)


def test_streaming_kernels_compile(gpu_kernels_lib, tsc_gpu_build):
    """streaming_op_gpu.cu.cc is in the library with its entry point."""
    assert_compiled(gpu_kernels_lib, tsc_gpu_build, "streaming_op_gpu.cu.cc", (ENTRY,))


def test_argument_errors(gpu_kernels_lib):
    """Invalid arguments are reported before any CUDA call (no GPU needed)."""
    step = _declare(ctypes.CDLL(gpu_kernels_lib))
    good = geometry(1, 2, 3, 4, 3, 2)

    def call(fmt=2, activation=0, g=good):
        return step(
            fmt, None, None, None, None, activation, None, None, None if g is None else g.ctypes.data, None
        )

    for kwargs, text in [
        ({"fmt": 7}, b"unknown float format"),
        ({"activation": 2}, b"activation must be"),
        ({"g": None}, b"geometry is null"),
        ({"g": geometry(-1, 2, 3, 4, 3, 2)}, b"negative dimension"),
        ({"g": geometry(1, 2, 3, 4, 0, 2)}, b"taps < 1"),
        ({"g": geometry(1, 2, 3, 4, 3, 2, hist=3)}, b"hist must be"),
    ]:
        err = call(**kwargs)
        assert err is not None and text in err, (kwargs, err)


CASES = [
    (1, 1, 40, 128, 5, 32),
    (2, 7, 5, 3, 3, 2),
    (3, 4, 8, 70, 2, 5),
    (2, 3, 6, 4, 1, 1),
    (2, 0, 6, 4, 3, 1),
]


@pytest.mark.parametrize("dtype", list(FORMATS))
@pytest.mark.parametrize("relu", [0, 1], ids=["linear", "relu"])
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_step_matches_oracle(gpu_lib, dtype, relu, case):
    step = _declare(gpu_lib)
    b, t, c, f, k, d = case
    rng = np.random.default_rng(len(str(case)) + relu)
    parts = [
        to_storage(rng.standard_normal(shape), dtype)
        for shape in ((b, (k - 1) * d, c), (b, t, c), (k, c, f), (f,))
    ]
    history, frames, kernel, bias = (to_float64(p, dtype) for p in parts)
    want_y, want_history = oracle(history, frames, kernel, bias, d, relu)
    abs_y, _ = oracle(np.abs(history), np.abs(frames), np.abs(kernel), np.abs(bias), d, False)
    bound = abs_y * ((k * c + 2) * U_ACC[dtype] + U_OUT[dtype]) + 1e-30
    dev = [cupy.asarray(p) for p in parts]
    y = garbage((b, t, f), dtype)
    new_history = cupy.zeros((b, (k - 1) * d, c), dtype=STORAGE[dtype])
    g = geometry(b, t, c, f, k, d)
    stream = cupy.cuda.get_current_stream()
    ptr = [a.data.ptr if a.size else None for a in (*dev, y, new_history)]
    err = step(
        FORMATS[dtype], ptr[0], ptr[1], ptr[2], ptr[3], relu, ptr[4], ptr[5], g.ctypes.data, stream.ptr
    )
    assert err is None, err.decode()
    stream.synchronize()
    got = to_float64(cupy.asnumpy(y), dtype)
    assert np.all(np.abs(got - want_y) <= bound), np.abs(got - want_y).max()
    np.testing.assert_array_equal(to_float64(cupy.asnumpy(new_history), dtype), want_history)
