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
