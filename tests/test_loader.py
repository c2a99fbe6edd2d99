"""The op library loader: fallback to the pure-TF references, and clear warnings."""

import json
import shutil

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
        tsc.ops.channel_sparse_conv2d(x, kernel, connections)  # fan-in 1/2: dense dispatch
        with tsc.ops.references_only():
            tsc.ops.topk_attention(x, 5)
    assert [(c.op, c.implementation) for c in calls] == [
        ("kwinners", "compiled" if tsc.ops.is_library_loaded() else "reference"),
        ("channel_sparse_conv2d", "dense"),
        ("topk_attention", "reference"),
    ]
    assert "DENSE_DISPATCH_DENSITY" in calls[1].reason and "references_only" in calls[2].reason
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
