"""The op library loader: fallback to the pure-TF references, and clear warnings."""

import importlib.util
import json
import pathlib
import shutil
import sys

import pytest
from helpers import ROOT, run_python

import tf_sparseconv as tsc

CHECK_FALLBACK = """
import warnings, numpy as np, tensorflow as tf
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import tf_sparseconv as tsc
    x = tf.random.normal((3, 40))
    y = tsc.ops.kwinners(x, 5)
    z = tsc.ops.topk_attention(tf.reshape(x, (3, 8, 5)), 2, mode="relu")
    tsc.layers.KWinners(k=2)(x)
assert not tsc.ops.is_library_loaded()
np.testing.assert_array_equal(y, tsc.ops.kwinners_reference(x, 5))
assert (np.count_nonzero(y.numpy(), axis=1) == 5).all()
messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
ours = [m for m in messages if m.startswith("tf_sparseconv:")]
assert len(ours) == 1, messages  # exactly one warning, however many ops run
print(ours[0])
"""


def test_missing_library_falls_back_with_one_warning(tmp_path):
    proc = run_python(CHECK_FALLBACK, env={"TF_SPARSECONV_LIBRARY": str(tmp_path / "missing.so")})
    assert "does not exist" in proc.stdout
    assert "pip install --no-build-isolation -e ." in proc.stdout


@pytest.mark.skipif(not tsc.ops.is_library_loaded(), reason="op library not built")
def test_mismatched_library_names_its_tensorflow_version(tmp_path):
    library = tmp_path / "_tf_sparseconv_ops.so"
    shutil.copy(ROOT / "tf_sparseconv" / "_tf_sparseconv_ops.so", library)
    (tmp_path / "_build_info.json").write_text(json.dumps({"tf_version": "2.99.0"}))
    proc = run_python(CHECK_FALLBACK, env={"TF_SPARSECONV_LIBRARY": str(library)})
    assert "built for TensorFlow 2.99.0" in proc.stdout


def test_corrupt_library_falls_back(tmp_path):
    library = tmp_path / "_tf_sparseconv_ops.so"
    library.write_bytes(b"not an ELF file")
    proc = run_python(CHECK_FALLBACK, env={"TF_SPARSECONV_LIBRARY": str(library)})
    assert "failed" in proc.stdout


def test_reference_gradients_in_fallback():
    run_python(
        """
import numpy as np, tensorflow as tf
import tf_sparseconv as tsc
x = tf.constant(np.arange(12, dtype=np.float64).reshape(2, 6))
with tf.GradientTape() as tape:
    tape.watch(x)
    y = tsc.ops.kwinners(x, 2)
g = tape.gradient(y, x).numpy()
np.testing.assert_array_equal(g, [[0, 0, 0, 0, 1, 1]] * 2)
""",
        env={"TF_SPARSECONV_FORCE_REFERENCE": "1"},
    )


BAZEL_LIBRARY = ROOT / "build" / "bazel" / "_tf_sparseconv_ops.so"


@pytest.mark.skipif(not BAZEL_LIBRARY.exists(), reason="no Bazel build (bash tools/bazel_build.sh)")
def test_bazel_built_library_runs_the_ops():
    proc = run_python(
        """
import numpy as np, tensorflow as tf
import tf_sparseconv as tsc
assert tsc.ops.is_library_loaded()
x = tf.random.stateless_normal((5, 7, 33), seed=[0, 1])
np.testing.assert_array_equal(tsc.ops.kwinners(x, 4, axis=1), tsc.ops.kwinners_reference(x, 4, axis=1))
np.testing.assert_array_equal(tsc.ops.topk_attention(x, 3), tsc.ops.topk_attention_reference(x, 3))
print("bazel library ok")
""",
        env={"TF_SPARSECONV_LIBRARY": str(BAZEL_LIBRARY)},
    )
    assert "bazel library ok" in proc.stdout


def test_explain_records_each_implementation_and_why():
    import logging

    import numpy as np

    x = np.random.default_rng(0).random((2, 6, 6, 16)).astype(np.float32)
    kernel = np.ones((3, 3, 8, 4), np.float32)
    connections = tsc.ops.random_connections(16, 4, fan_in=8, seed=0)
    with tsc.ops.explain() as calls:
        tsc.ops.kwinners(x, 3)
        with tsc.ops.channel_sparse_implementation("dense"):
            tsc.ops.channel_sparse_conv2d(x, kernel, connections)
        with tsc.ops.references_only():
            tsc.ops.topk_attention(x, 5)
    assert [(c.op, c.implementation) for c in calls] == [
        ("kwinners", "compiled" if tsc.ops.is_library_loaded() else "reference"),
        ("channel_sparse_conv2d", "dense"),
        ("topk_attention", "reference"),
    ]
    assert "channel_sparse_implementation('dense')" in calls[1].reason
    assert "references_only" in calls[2].reason
    with tsc.ops.explain() as outer:
        with tsc.ops.explain() as inner:  # nested, both empty on entry
            pass
        tsc.ops.kwinners(x, 3)
    assert len(outer) == 1 and inner == []
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("tf_sparseconv")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        tsc.ops.kwinners(x, 3)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    assert any("kwinners:" in r.getMessage() for r in records)


def test_explain_names_the_load_problem_in_fallback(tmp_path):
    out = run_python(
        """
import warnings; warnings.simplefilter("ignore")
import numpy as np, tf_sparseconv as tsc
with tsc.ops.explain() as calls:
    tsc.ops.kwinners(np.ones((2, 4), np.float32), 1)
print(calls[0])
""",
        env={"TF_SPARSECONV_LIBRARY": str(tmp_path / "missing.so")},
    ).stdout
    assert "kwinners: reference (the op library is not loaded:" in out and "does not exist" in out


# --------------------------------------------------------------------------- build info, CUDA toolkit


def _build_ops():
    """A fresh copy of tools/build_ops.py (its caches empty)."""
    spec = importlib.util.spec_from_file_location("build_ops_under_test", ROOT / "tools" / "build_ops.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _fake_nvcc(directory, version):
    """An executable `nvcc` in `directory` that reports CUDA `version` (e.g. "12.5.82")."""
    directory.mkdir(parents=True, exist_ok=True)
    nvcc = directory / "nvcc"
    major_minor = ".".join(version.split(".")[:2])
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {major_minor}, V{version}'\n")
    nvcc.chmod(0o755)
    return nvcc


@pytest.mark.skipif(not tsc.ops.is_library_loaded(), reason="op library not built")
def test_build_info_records_the_toolkit_and_tensorflows_cuda():
    import tensorflow as tf

    info = json.loads((ROOT / "tf_sparseconv" / "_build_info.json").read_text())
    tf_info = tf.sysconfig.get_build_info()
    assert info["tf_cuda"] == bool(tf_info.get("is_cuda_build"))
    if info["tf_cuda"]:
        assert info["tf_cuda_version"] == tf_info["cuda_version"]
    assert info["cuda_reason"]
    if info["cuda"]:
        # Built with a toolkit of TensorFlow's CUDA major version, bound to TensorFlow's runtime.
        assert info["cuda_toolkit"].split(".")[0] == info["tf_cuda_version"].split(".")[0]
        assert pathlib.Path(info["nvcc"]).is_file()
        assert "libtensorflow_framework.so.2" in info["cuda_runtime"]
    else:
        assert info["cuda_toolkit"] is None and info["nvcc"] is None and info["cuda_runtime"] is None


@pytest.mark.skipif(not tsc.ops.is_library_loaded(), reason="op library not built")
@pytest.mark.skipif(shutil.which("nm") is None, reason="no nm")
def test_library_has_no_cuda_runtime_of_its_own():
    library = ROOT / "tf_sparseconv" / "_tf_sparseconv_ops.so"
    assert _build_ops().defined_cuda_runtime_symbols(library) == []


def test_toolkit_finder_matches_tensorflows_major_version(tmp_path, monkeypatch):
    build_ops = _build_ops()
    nvcc13 = _fake_nvcc(tmp_path / "cuda-13.0" / "bin", "13.0.88")
    nvcc12 = _fake_nvcc(tmp_path / "cuda-12.5" / "bin", "12.5.82")
    monkeypatch.setenv("NVCC", str(nvcc13))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda-12.5"))
    assert build_ops.find_cuda_toolkit().nvcc == str(nvcc13)  # $NVCC first
    toolkit = build_ops.find_cuda_toolkit("12.5.1")
    assert (toolkit.nvcc, toolkit.version, toolkit.major_minor) == (str(nvcc12), "12.5.82", (12, 5))


def test_toolkit_finder_sees_pip_toolkits(tmp_path, monkeypatch):
    build_ops = _build_ops()
    site = tmp_path / "site-packages"
    nvcc13 = _fake_nvcc(site / "nvidia" / "cu13" / "bin", "13.0.88")  # CUDA >= 13 wheels: one tree
    nvcc12 = _fake_nvcc(site / "nvidia" / "cuda_nvcc" / "bin", "12.5.82")  # CUDA 12 layout
    (site / "nvidia" / "cuda_runtime" / "include").mkdir(parents=True)
    monkeypatch.setattr(
        build_ops.sysconfig, "get_paths", lambda: {"purelib": str(site), "platlib": str(site)}
    )
    for var in ("NVCC", "CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    assert build_ops.find_cuda_toolkit("13.0.2").nvcc == str(nvcc13)
    toolkit = build_ops.find_cuda_toolkit("12.5.1")
    assert toolkit.nvcc == str(nvcc12)
    assert toolkit.include_dirs == (str(site / "nvidia" / "cuda_runtime" / "include"),)
    assert f"-I{site / 'nvidia' / 'cuda_runtime' / 'include'}" in build_ops.nvcc_command(toolkit)


def test_mismatched_nvcc_builds_cpu_only_or_fails_naming_both_versions(monkeypatch):
    build_ops = _build_ops()
    monkeypatch.setattr(
        build_ops, "cuda_toolkits", lambda: [build_ops.CudaToolkit("/opt/cuda/bin/nvcc", "13.0.88")]
    )
    monkeypatch.setenv("TF_SPARSECONV_CUDA", "auto")
    use, why, toolkit = build_ops.cuda_wanted(True, "12.5.1")
    assert (use, toolkit) == (False, None)
    assert "CUDA 13.0.88 (nvcc /opt/cuda/bin/nvcc)" in why and "CUDA 12.5.1" in why and "CUDA_HOME" in why
    monkeypatch.setenv("TF_SPARSECONV_CUDA", "1")
    with pytest.raises(
        RuntimeError, match=r"TF_SPARSECONV_CUDA=1 but .*13\.0\.88.*12\.5\.1.*cuda-toolkit-12-5"
    ):
        build_ops.cuda_wanted(True, "12.5.1")
    use, why, toolkit = build_ops.cuda_wanted(True, "13.0.2")  # a match, forced
    assert use and toolkit.version == "13.0.88" and "matches TensorFlow's CUDA 13.0.2" in why
    monkeypatch.setenv("TF_SPARSECONV_CUDA", "0")
    assert build_ops.cuda_wanted(True, "13.0.2") == (False, "disabled by TF_SPARSECONV_CUDA=0", None)


def test_pip_toolkit_requirements():
    build_ops = _build_ops()
    assert build_ops.pip_toolkit_requirements("12.5.1") is None  # PyPI's CUDA 12 wheels hold no nvcc
    assert build_ops.pip_toolkit_requirements("13.0.2") == [
        "nvidia-cuda-nvcc==13.0.*",
        "nvidia-nvvm==13.0.*",
        "nvidia-cuda-crt==13.0.*",
        "nvidia-cuda-runtime==13.0.*",
        "nvidia-cuda-cccl==13.0.*",
    ]
    assert 'pip install "nvidia-cuda-nvcc==13.1.*"' in build_ops.toolkit_hint("13.1.0")
