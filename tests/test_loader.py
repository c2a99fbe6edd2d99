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
