"""Smoke runs of the examples (tiny settings), each in a fresh process."""

from __future__ import annotations

import re

from helpers import ROOT, run_python


def test_block_sparse_segmentation_quick():
    script = ROOT / "examples" / "block_sparse_segmentation.py"
    code = (
        "import sys, runpy\n"
        "sys.argv = ['x', '--quick']\n"
        f"runpy.run_path({str(script)!r}, run_name='__main__')"
    )
    out = run_python(code, timeout=600).stdout
    accuracy = re.search(r"pixel accuracy\s+([\d.]+)\s+([\d.]+)", out)
    assert accuracy, out
    # The generated scenes are mostly background; both networks must at least learn that.
    assert min(float(accuracy.group(1)), float(accuracy.group(2))) > 0.8, out
    assert re.search(r"sparse vs dense: inference [\d.]+x faster", out), out


def test_voxel_shape_classification_quick():
    script = ROOT / "examples" / "voxel_shape_classification.py"
    code = (
        "import sys, runpy\n"
        "sys.argv = ['x', '--quick']\n"
        f"runpy.run_path({str(script)!r}, run_name='__main__')"
    )
    out = run_python(code, timeout=600).stdout
    row = r"\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+\d+$"
    dense = re.search(r"^dense Conv3D" + row, out, re.MULTILINE)
    sparse = re.search(r"^sparse" + row, out, re.MULTILINE)
    assert dense and sparse, out
    # Six classes (chance 1/6): both networks must clearly beat it even on the tiny run.
    assert float(dense.group(1)) > 0.3, out
    assert float(sparse.group(1)) > 0.3, out
    assert re.search(r"^sparse k=\d+/\d+" + row, out, re.MULTILINE), out
    assert re.search(r"sparse vs dense: training [\d.]+x faster, inference [\d.]+x faster", out), out
