"""Helpers shared by the test modules (imported as `from helpers import ...`)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh Python process (the package's own interpreter)."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-6000:]}")
    return proc


def op_library():
    """The compiled op library; skips the test where it is not built."""
    from tf_sparseconv.python.ops._loader import load_library

    lib = load_library()
    if lib is None:
        pytest.skip("the op library is not built")
    return lib


def draw_sparse_conv(data, max_extent: int, max_kernel: int, max_dilation: int) -> tuple:
    """(shape, kernel_size, strides, dilations, submanifold, batch, density) of a sparse convolution
    drawn with hypothesis' `data`: 1 to 3 spatial dims, strides 1 where submanifold."""
    from hypothesis import strategies as st

    dims = data.draw(st.integers(1, 3), "dims")

    def sizes(high, label=None):
        return tuple(data.draw(st.lists(st.integers(1, high), min_size=dims, max_size=dims), label))

    shape = sizes(max_extent, "shape")
    kernel = sizes(max_kernel, "kernel")
    dilations = sizes(max_dilation, "dilations")
    submanifold = data.draw(st.booleans(), "submanifold")
    strides = (1,) * dims if submanifold else sizes(3)
    batch = data.draw(st.integers(1, 3), "batch")
    density = data.draw(st.floats(0.0, 1.0), "density")
    return shape, kernel, strides, dilations, submanifold, batch, density


def random_sites(rng, shape, batch, density) -> np.ndarray:
    """Unique random sites int32 [n, 1 + D] (batch, spatial...) of a sparse map, in random order."""
    volume = batch * int(np.prod(shape))
    flat = rng.choice(volume, size=int(round(density * volume)), replace=False)
    return np.stack(np.unravel_index(flat, (batch, *shape)), 1).astype(np.int32).reshape(-1, 1 + len(shape))
