"""The wheel: built from this tree, installed into a clean venv, one op of each family run from there.

What the slow test builds: `pip wheel --no-build-isolation --no-deps` (tools/build_wheel.sh's
command) with TF_SPARSECONV_NATIVE as the editable install had it (default "1"), not the release
wheel's portable x86-64-v2 flags. The portable C++ objects are a full recompile (about 100 s on
2 cores, measured), whereas the editable install's objects in build/obj are reused, so the build
is a link and a zip (the wheel test takes about 30 s). Packaging, metadata, installation and the
library loading from the installed wheel are what it checks; that wheels default to the portable
flags is checked without a build (`test_wheels_default_to_portable_cpu_flags`), and
tools/build_wheel.sh builds the portable release wheel.

The clean venv sees .venv's TensorFlow (and Keras, NumPy) through a `.pth` file that lists .venv's
site-packages as a plain path entry: the `.pth` files there (the editable install's finder) are
not processed, so `tf_sparseconv` can come only from the installed wheel.
"""

import hashlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import build_ops  # noqa: E402

SMOKE = r"""
import json, os, sys, warnings

import numpy as np

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import tf_sparseconv as tsc
from tf_sparseconv.python.ops import _loader

rng = np.random.default_rng(0)


def normal(*shape):
    return rng.normal(size=shape).astype(np.float32)


def err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


errors = {}
x = normal(4, 64)
errors["kwinners"] = err(tsc.ops.kwinners(x, 8), tsc.ops.kwinners_reference(x, 8))

x, kernel = normal(2, 9, 9, 16), normal(3, 3, 4, 8)
conn = tsc.ops.random_connections(16, 8, fan_in=4, seed=1)  # fan-in 1/4: the sparse kernel, not dense
errors["channel_sparse_conv2d"] = err(
    tsc.ops.channel_sparse_conv2d(x, kernel, conn), tsc.ops.channel_sparse_conv2d_reference(x, kernel, conn)
)

x, kernel = normal(2, 16, 16, 4), normal(3, 3, 4, 6)
mask = np.zeros((2, 16, 16), np.float32)
mask[0, 1, 2] = mask[1, 9, 13] = mask[1, 15, 0] = 1.0  # 3 of 32 blocks of 4x4
errors["block_sparse_conv2d"] = err(
    tsc.ops.block_sparse_conv2d(x, kernel, mask, 4), tsc.ops.block_sparse_conv2d_reference(x, kernel, mask, 4)
)

flat = rng.choice(2 * 10 * 10, size=60, replace=False)
coords = np.stack(np.unravel_index(flat, (2, 10, 10)), 1).astype(np.int32)
features, kernel = normal(60, 5), normal(3, 3, 5, 7)
out, out_coords, _ = tsc.ops.sparse_conv(features, coords, kernel, [10, 10])
ref, ref_coords, _ = tsc.ops.sparse_conv_reference(features, coords, kernel, [10, 10])
assert np.array_equal(out_coords, ref_coords), "sparse_conv: output sites differ"
errors["sparse_conv"] = err(out, ref)

history, frames, kernel, bias = normal(3, 4, 6), normal(3, 5, 6), normal(3, 6, 4), normal(4)
y, h = tsc.ops.streaming_conv_step(history, frames, kernel, bias, dilation=2, activation="relu")
y_ref, h_ref = tsc.ops.streaming_conv_step_reference(history, frames, kernel, bias, 2, "relu")
errors["streaming_conv_step"] = max(err(y, y_ref), err(h, h_ref))

print("SMOKE " + json.dumps({
    "file": tsc.__file__,
    "library": str(_loader.library_path()),
    "loaded": tsc.ops.is_library_loaded(),
    "warnings": [str(w.message) for w in caught if issubclass(w.category, _loader.LibraryWarning)],
    "errors": errors,
}))
"""


def _run(cmd, **kwargs):
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise AssertionError(
            f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc


def _tensorflow_pin() -> str:
    """`tensorflow<X.Y+1,>=X.Y` (setuptools' normalised order) for the installed TensorFlow X.Y.z."""
    major, minor = (int(v) for v in importlib.metadata.version("tensorflow").split(".")[:2])
    return f"tensorflow<{major}.{minor + 1},>={major}.{minor}"


def test_wheels_default_to_portable_cpu_flags(monkeypatch):
    monkeypatch.delenv("TF_SPARSECONV_NATIVE", raising=False)
    assert build_ops.native_wanted(default=False) is False  # what setup.py asks for in a wheel build
    assert build_ops.native_wanted() is True  # editable installs and tools/build_ops.py
    assert build_ops.cpu_flags(native=False) == ["-march=x86-64-v2"]
    monkeypatch.setenv("TF_SPARSECONV_NATIVE", "1")
    assert build_ops.native_wanted(default=False) is True
    monkeypatch.setenv("TF_SPARSECONV_NATIVE", "0")
    assert build_ops.native_wanted() is False


@pytest.mark.slow
def test_wheel_installs_into_clean_venv_and_runs_every_family(tmp_path):
    native = os.environ.get("TF_SPARSECONV_NATIVE", "1")
    env = {**os.environ, "TF_SPARSECONV_NATIVE": native, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    dist = tmp_path / "dist"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-build-isolation",
            "--no-deps",
            "-w",
            str(dist),
            str(ROOT),
        ],
        cwd=ROOT,
        env=env,
    )

    (wheel,) = dist.glob("*.whl")
    version = importlib.metadata.version("tensorflow")
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert re.fullmatch(rf"tf_sparseconv-[^-]+-{py}-{py}-linux_\w+\.whl", wheel.name), wheel.name
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert {"tf_sparseconv/_tf_sparseconv_ops.so", "tf_sparseconv/_build_info.json"} <= names
        library_digest = hashlib.sha256(zf.read("tf_sparseconv/_tf_sparseconv_ops.so")).hexdigest()
        info = json.loads(zf.read("tf_sparseconv/_build_info.json"))
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        wheel_info = zf.read(next(n for n in names if n.endswith(".dist-info/WHEEL"))).decode()
    assert info["tf_version"] == version
    assert (info["cpu_flags"][0] == "-march=native") == (native == "1"), info["cpu_flags"]
    assert "Root-Is-Purelib: false" in wheel_info
    header = metadata.split("\n\n")[0]  # the README follows
    tf_requirements = re.findall(r"^Requires-Dist: (tensorflow\b[^-].*)$", header, re.M)
    assert tf_requirements == [_tensorflow_pin()], tf_requirements
    assert not any(n.startswith(("tests/", "tools/", "benchmarks/")) for n in names)

    # A clean venv (no pip: .venv's pip installs into it), the wheel installed before TensorFlow
    # is made visible so that pip sees an empty environment.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    install = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "--no-compile",
            str(wheel),
        ],
        env=env,
    )
    assert "Building" not in install.stdout + install.stderr  # a wheel installs; nothing compiles
    site = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('platlib'))"]).stdout.strip()
    )
    installed = site / "tf_sparseconv" / "_tf_sparseconv_ops.so"
    assert hashlib.sha256(installed.read_bytes()).hexdigest() == library_digest
    outer = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (site / "_tf_sparseconv_test_outer_site.pth").write_text("".join(f"{p}\n" for p in sorted(outer)))

    # -I: neither PYTHONPATH nor the working directory (outside the repository) is on sys.path.
    clean_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "TF_SPARSECONV_"))
    }
    clean_env.update(TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    work = tmp_path / "elsewhere"
    work.mkdir()
    proc = _run([str(python), "-I", "-c", SMOKE], cwd=work, env=clean_env, timeout=600)
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("SMOKE "))[6:])

    assert Path(result["file"]).resolve().is_relative_to(venv.resolve()), result["file"]
    assert Path(result["library"]).resolve() == installed.resolve(), result["library"]
    assert result["loaded"] is True, result["warnings"]
    assert result["warnings"] == []
    assert set(result["errors"]) == {
        "kwinners",
        "channel_sparse_conv2d",
        "block_sparse_conv2d",
        "sparse_conv",
        "streaming_conv_step",
    }
    for op, error in result["errors"].items():
        assert error < 1e-4, (op, error)
