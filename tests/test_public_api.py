"""The public names users look for (issue 14): every layer class in `tsc.layers`, the loader's
context managers in `tsc.ops`, a `py.typed` marker."""

import inspect
from pathlib import Path

import keras

import tf_sparseconv as tsc
from tf_sparseconv.python import pruning, quantization, streaming


def _layer_classes(module):
    return {
        name
        for name, value in inspect.getmembers(module, inspect.isclass)
        if issubclass(value, keras.layers.Layer) and not name.startswith("_")
    }


def test_every_layer_class_is_in_tsc_layers():
    wanted = set()
    for module in (pruning, quantization, streaming):
        wanted |= _layer_classes(module)
    wanted |= {"StreamingConv1D", "PruneLowMagnitude", "QuantizeWrapper", "IntegerWeightsWrapper"}
    missing = {name for name in wanted if not hasattr(tsc.layers, name)}
    assert not missing, missing
    assert wanted <= set(dir(tsc.layers))
    assert tsc.layers.StreamingConv1D is streaming.StreamingConv1D
    assert tsc.layers.QuantizeWrapper is quantization.QuantizeWrapper


def test_loader_contexts_are_in_tsc_ops_and_export():
    for name in ("references_only", "for_converters", "explain"):
        assert callable(getattr(tsc.ops, name))
    assert tsc.export.references_only is tsc.ops.references_only


def test_py_typed_marker_ships():
    assert (Path(tsc.__file__).parent / "py.typed").exists()
