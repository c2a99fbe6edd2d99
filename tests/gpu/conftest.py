"""Shared fixtures of the standalone GPU kernel tests (no TensorFlow).

The tables and helpers the test files share (CuPy or None, dtype tables, storage
conversions, error bounds, guarded device buffers) are in _common.py.

* ``tsc_gpu_build``: the tests/gpu/build.py module.
* ``gpu_kernels_lib``: builds tests/gpu/_build/libtsc_gpu_kernels.so once per
  session (needs nvcc only) and returns its path.
* ``gpu_lib``: the library loaded with ctypes; skips unless nvcc, CuPy and a
  CUDA GPU are all present.

Environment (tools/gpu_check.sh sets both):

* ``TSC_GPU_REQUIRED=1``: a GPU is required: what would skip fails instead
  (the fixtures above and any test that skips), so a run cannot pass by
  skipping.
* ``TSC_GPU_SMALL=1``: only small cases, for the compute-sanitizer runs:
  deselects the tests that run no kernel (NumPy only), the timing tests, the
  int64-index tests (2^31-element tensors) and the grid-stride / many-slice
  stress tests, and keeps the dtypes in
  ``TSC_GPU_SMALL_DTYPES`` (default ``float32,float16``; ``all`` keeps every
  dtype); CuPy's memory pool is off, so every array is its own allocation.
"""

import ctypes
import importlib.util
import os
import shutil

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))

# Test names (substrings) left out by TSC_GPU_SMALL=1: large or long-running cases.
LARGE_TESTS = ("timing", "int64_index", "grid_stride", "many_short_slices")


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


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def gpu_required():
    """TSC_GPU_REQUIRED=1: missing GPU requirements and skips are failures."""
    return _flag("TSC_GPU_REQUIRED")


def _skip_or_fail(reason):
    if gpu_required():
        pytest.fail(f"TSC_GPU_REQUIRED=1: {reason}", pytrace=False)
    pytest.skip(reason)


def _is_small(item):
    """Whether `item` is one of TSC_GPU_SMALL=1's cases."""
    name = getattr(item, "originalname", None) or item.name
    if any(part in name for part in LARGE_TESTS):
        return False
    if not {"gpu_lib", "gpu_kernels_lib"} & set(getattr(item, "fixturenames", ())):
        return False  # NumPy only: nothing for a sanitizer to see
    dtypes = os.environ.get("TSC_GPU_SMALL_DTYPES", "float32,float16").replace(" ", "")
    params = getattr(getattr(item, "callspec", None), "params", {})
    return dtypes == "all" or "dtype" not in params or params["dtype"] in dtypes.split(",")


def pytest_configure(config):
    if _flag("TSC_GPU_SMALL"):
        # Every CuPy array its own cudaMalloc: compute-sanitizer then sees an access past
        # an array's end (within a pooled block it would not).
        try:
            import cupy
        except Exception:  # no CuPy: the fixtures say so
            return
        cupy.cuda.set_allocator(None)


def pytest_collection_modifyitems(config, items):
    if not _flag("TSC_GPU_SMALL"):
        return
    # This hook sees every collected item, not only those of tests/gpu.
    here = os.path.realpath(_HERE)
    mine = [os.path.dirname(os.path.realpath(str(item.path))) == here for item in items]
    deselected = [item for item, m in zip(items, mine) if m and not _is_small(item)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        dropped = {id(item) for item in deselected}
        items[:] = [item for item in items if id(item) not in dropped]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if gpu_required() and report.skipped and not hasattr(report, "wasxfail"):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        report.outcome = "failed"
        report.longrepr = f"TSC_GPU_REQUIRED=1, but the test skipped: {reason}"


@pytest.fixture(scope="session", name="tsc_gpu_build")
def tsc_gpu_build_fixture():
    """The tests/gpu/build.py module."""
    return tsc_gpu_build


@pytest.fixture(scope="session")
def gpu_kernels_lib():
    if tsc_gpu_build.find_nvcc() is None:
        _skip_or_fail("nvcc not found: cannot build the GPU kernels")
    return tsc_gpu_build.build()


@pytest.fixture(scope="session")
def gpu_lib(request):
    missing = missing_gpu_requirements()
    if missing:
        _skip_or_fail("GPU tests need nvcc, cupy and a CUDA GPU: " + "; ".join(missing))
    return ctypes.CDLL(request.getfixturevalue("gpu_kernels_lib"))
