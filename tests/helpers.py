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


def random_sites(rng, shape, batch, density) -> np.ndarray:
    """Unique random sites int32 [n, 1 + D] (batch, spatial...) of a sparse map, in random order."""
    volume = batch * int(np.prod(shape))
    flat = rng.choice(volume, size=int(round(density * volume)), replace=False)
    return np.stack(np.unravel_index(flat, (batch, *shape)), 1).astype(np.int32).reshape(-1, 1 + len(shape))
