"""Smoke runs of the examples (tiny settings), each in a fresh process."""

from __future__ import annotations

import re

from helpers import ROOT, run_python


def run_example(name: str, timeout: int = 600) -> str:
    """The output of `examples/<name>.py --quick`, run as __main__ in a fresh process."""
    script = ROOT / "examples" / f"{name}.py"
    code = (
        "import sys, runpy\n"
        "sys.argv = ['x', '--quick']\n"
        f"runpy.run_path({str(script)!r}, run_name='__main__')"
    )
    return run_python(code, timeout=timeout).stdout


def test_block_sparse_segmentation_quick():
    out = run_example("block_sparse_segmentation")
    accuracy = re.search(r"pixel accuracy\s+([\d.]+)\s+([\d.]+)", out)
    assert accuracy, out
    # The generated scenes are mostly background; both networks must at least learn that.
    assert min(float(accuracy.group(1)), float(accuracy.group(2))) > 0.8, out
    assert re.search(r"sparse vs dense: inference [\d.]+x faster", out), out


def test_voxel_shape_classification_quick():
    out = run_example("voxel_shape_classification")
    row = r"\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+\d+$"
    dense = re.search(r"^dense Conv3D" + row, out, re.MULTILINE)
    sparse = re.search(r"^sparse" + row, out, re.MULTILINE)
    assert dense and sparse, out
    # Six classes (chance 1/6): both networks must clearly beat it even on the tiny run.
    assert float(dense.group(1)) > 0.3, out
    assert float(sparse.group(1)) > 0.3, out
    assert re.search(r"^sparse k=\d+/\d+" + row, out, re.MULTILINE), out
    assert re.search(r"sparse vs dense: training [\d.]+x faster, inference [\d.]+x faster", out), out


def test_pruning_experiment_quick():
    out = run_example("pruning_experiment")
    row = r"^\| {} \| {} \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$"
    for dataset in ("digits", "MNIST-1D"):
        dense = re.search(row.format(dataset, r"dense \(baseline\)"), out, re.MULTILINE)
        assert dense, out
        # Ten classes (chance 0.1): even after the tiny run both nets must clearly beat it.
        assert float(dense.group(3)) > 0.5, out
        for granularity, target in (("weight", 0.75), ("kernel", 0.75), ("block", 0.75), ("m_by_n 2:4", 0.5)):
            match = re.search(row.format(dataset, granularity), out, re.MULTILINE)
            assert match, (granularity, out)
            assert float(match.group(1)) == target, out
            # The measured zero fraction lands within one pruning unit above the target.
            assert target - 1e-6 <= float(match.group(2)) <= target + 0.05, out
            assert float(match.group(3)) > 0.4, out
    for group in (1, 4):
        assert f"channel_group={group}: stripped sparse vs pruned outputs: allclose True" in out, out
        assert re.search(rf"channel_group={group}: sparse vs dense: inference speed-up [\d.]+x", out), out
    assert re.search(r"total wall time: [\d.]+ s", out), out


def test_quickstart_quick():
    """The main job end to end: train, prune, strip to channel-sparse, quantise, convert, export, reload."""
    out = run_example("quickstart")
    assert re.search(r"conv2 is ChannelSparseConv2D with fan-in 8 of 32", out), out
    reloaded = re.search(
        r"reloaded in a fresh process: test accuracy ([\d.]+), max \|served - in-process\| = ([\d.e+-]+)", out
    )
    assert reloaded, out
    assert float(reloaded.group(1)) > 0.6 and float(reloaded.group(2)) < 1e-4, out
    portable = re.search(
        r"portable SavedModel \(stock TF ops\) reloaded without tf_sparseconv: test accuracy ([\d.]+), "
        r"max \|served - in-process\| = ([\d.e+-]+)",
        out,
    )
    assert portable and float(portable.group(1)) > 0.6 and float(portable.group(2)) < 1e-4, out
    litert = re.search(
        r"LiteRT int8 model: .*int8 CONV_2D, FULLY_CONNECTED\): test accuracy ([\d.]+) "
        r"\(Keras QAT model ([\d.]+)\)",
        out,
    )
    assert litert and abs(float(litert.group(1)) - float(litert.group(2))) <= 0.02, out
    onnx = re.search(r"ONNX model: .*max \|onnxruntime - Keras\| = ([\d.e+-]+)", out)
    assert onnx and float(onnx.group(1)) < 0.05, out


def test_qat_experiment_quick():
    out = run_example("qat_experiment")
    assert "QAT table" in out, out
    rows = re.findall(r"\| plain \| W8/A8 \| nearest \| ([\d.]+) ± [\d.]+ \| ([\d.]+) ± [\d.]+ \|", out)
    assert rows, out
    qat, converted = (float(v) for v in rows[0])
    assert qat == converted and qat > 30.0, out  # percent; chance is 10


def test_keyword_spotting_streaming_quick():
    """Trained on clips, streamed frame by frame: equal to the full sequence, exported and served."""
    out = run_example("keyword_spotting_streaming")
    trained = re.search(r"test accuracy on isolated clips: ([\d.]+)", out)
    assert trained and float(trained.group(1)) > 1 / 7, out  # seven classes
    streamed = re.search(r"max \|streaming - full sequence\| = ([\d.e+-]+)", out)
    assert streamed and float(streamed.group(1)) <= 1e-5, out
    assert re.search(r"latency per frame: streaming step [\d.]+ ms", out), out
    served = re.search(r"max \|served - full\| = ([\d.e+-]+)", out)
    assert served and float(served.group(1)) <= 1e-5, out
    litert = re.search(
        r"LiteRT step \([\d.]+ KiB \.tflite, external state\): (\d+) frames one at a time, "
        r"max \|LiteRT - full\| / max \|full\| = ([\d.e+-]+)",
        out,
    )
    assert litert and int(litert.group(1)) >= 200 and float(litert.group(2)) <= 1e-5, out
