"""Shared fixtures of the standalone GPU kernel tests (no TensorFlow).

* ``tsc_gpu_build``: the tests/gpu/build.py module.
* ``gpu_kernels_lib``: builds tests/gpu/_build/libtsc_gpu_kernels.so once per
  session (needs nvcc only) and returns its path.
* ``gpu_lib``: the library loaded with ctypes; skips unless nvcc, CuPy and a
  CUDA GPU are all present.
"""

import ctypes
import importlib.util
import os
import shutil

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load_build_module():
    spec = importlib.util.spec_from_file_location("tsc_gpu_build", os.path.join(_HERE, "build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tsc_gpu_build = _load_build_module()


def missing_gpu_requirements():
    """List of what is missing to run kernels on a GPU (empty if nothing)."""
    missing = []
    if tsc_gpu_build.find_nvcc() is None:
        missing.append("nvcc not found")
    try:
        import cupy  # noqa: F401
    except Exception as e:  # ImportError, or a broken CUDA install
        missing.append(f"cupy not importable ({type(e).__name__}: {e})")
        cupy = None
    if cupy is not None:
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as e:
            count = 0
            missing.append(f"no CUDA GPU ({e})")
        else:
            if count == 0:
                missing.append("no CUDA GPU (device count 0)")
    elif shutil.which("nvidia-smi") is None and not os.path.exists("/dev/nvidia0"):
        missing.append("no CUDA GPU (no nvidia-smi, no /dev/nvidia0)")
    return missing


@pytest.fixture(scope="session", name="tsc_gpu_build")
def tsc_gpu_build_fixture():
    """The tests/gpu/build.py module."""
    return tsc_gpu_build


@pytest.fixture(scope="session")
def gpu_kernels_lib():
    if tsc_gpu_build.find_nvcc() is None:
        pytest.skip("nvcc not found: cannot build the GPU kernels")
    return tsc_gpu_build.build()


@pytest.fixture(scope="session")
def gpu_lib(request):
    missing = missing_gpu_requirements()
    if missing:
        pytest.skip("GPU tests need nvcc, cupy and a CUDA GPU: " + "; ".join(missing))
    return ctypes.CDLL(request.getfixturevalue("gpu_kernels_lib"))
