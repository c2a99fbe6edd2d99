"""tsc.export.export_saved_model: serving_default signatures for every layer family, loaded in fresh
processes (with `import tf_sparseconv`; and, for portable exports, where it cannot be imported)."""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import random_sites, run_python

import tf_sparseconv as tsc
from tf_sparseconv.python.export import custom_ops_in, input_structure

pytestmark = pytest.mark.skipif(not tsc.ops.is_library_loaded(), reason="op library not built")


def dense_families_model():
    """Channel-sparse convs (fused bias/relu and plain), k-WTA, top-k attention, block-sparse."""
    keras.utils.set_random_seed(1)
    image = keras.Input((16, 16, 8), name="image")
    mask = keras.Input((16, 16, 1), name="mask")
    h = tsc.layers.ChannelSparseConv2D(12, 3, fan_in=2, activation="relu")(image)
    h = tsc.layers.KWinners(k=4)(h)
    h = tsc.layers.BlockSparseConv2D(12, 3, block_size=(8, 8), activation="relu")([h, mask])
    h = tsc.layers.TopKAttention(k=20)(h)
    h = tsc.layers.ChannelSparseConv2D(6, 1, fan_in=3, activation="tanh")(h)
    pooled = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(
        [image, mask], [keras.layers.Dense(3, name="logits")(pooled), h], name="dense_families"
    )


def dense_inputs(rng, batch=3):
    mask = (rng.random((batch, 16, 16, 1)) < 0.3).astype(np.float32)
    return {"image": rng.standard_normal((batch, 16, 16, 8)).astype(np.float32), "mask": mask}


def sparse_map_model():
    keras.utils.set_random_seed(2)
    features = keras.Input((3,), name="features")
    coords = keras.Input((4,), dtype="int32", name="coords")
    h = tsc.layers.SparseMap((8, 8, 8), batch_size=None)([features, coords])
    h = tsc.layers.SparseConv3D(8, 3, activation="relu")(h)
    h = tsc.layers.SparseConv3D(8, 2, strides=2, submanifold=False, activation="relu")(h)
    pooled = tsc.layers.SparseGlobalPooling("max")(h)
    return keras.Model({"features": features, "coords": coords}, keras.layers.Dense(4)(pooled), name="sparse")


def sparse_inputs(rng):
    coords = random_sites(rng, (8, 8, 8), 2, 0.1)
    return {
        "coords": coords.astype(np.int32),
        "features": rng.standard_normal((len(coords), 3)).astype(np.float32),
    }


def pruned_quantized_model(rng):
    """Kernel-pruned, stripped to channel-sparse layers, then 8-bit QAT and converted."""
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((10, 10, 4), name="pixels"),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3),
        ]
    )
    pruned = tsc.pruning.prune_low_magnitude(
        model, tsc.pruning.ConstantSparsity(0.75, 0, frequency=1), "kernel"
    )
    pruned.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = rng.standard_normal((16, 10, 10, 4)).astype(np.float32)
    pruned.fit(x, rng.integers(0, 3, 16), epochs=1, verbose=0, callbacks=[tsc.pruning.UpdatePruningStep()])
    sparse = tsc.pruning.strip_pruning(pruned, to_sparse_layers=True)
    assert any(isinstance(layer, tsc.layers.ChannelSparseConv2D) for layer in sparse.layers)
    qat = tsc.quantization.quantize_model(sparse, weight_bits=8, activation_bits=8)
    qat.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(x, rng.integers(0, 3, 16), epochs=1, verbose=0)
    return tsc.quantization.convert(qat)


def _flat(outputs):
    return [np.asarray(o) for o in keras.tree.flatten(outputs)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every model exported both ways, with its inputs and expected outputs saved to disk."""
    root = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(0)
    cases = {
        "dense_families": (dense_families_model(), dense_inputs(rng)),
        "sparse_map": (sparse_map_model(), sparse_inputs(rng)),
        "pruned_quantized": (
            pruned_quantized_model(rng),
            {"pixels": rng.standard_normal((5, 10, 10, 4)).astype(np.float32)},
        ),
    }
    manifest = {}
    for name, (model, inputs) in cases.items():
        structure = input_structure(model)
        ordered = [inputs[t.name] for t in keras.tree.flatten(structure)]
        structured = keras.tree.pack_sequence_as(structure, ordered)
        expected = _flat(model(structured, training=False))
        np.savez(root / f"{name}_in.npz", **inputs)
        np.savez(root / f"{name}_out.npz", *expected)
        for portable in (False, True):
            path = str(root / f"{name}_{'portable' if portable else 'native'}")
            tsc.export.export_saved_model(model, path, portable=portable)
        manifest[name] = len(expected)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


LOAD_AND_COMPARE = """
import json, os, sys
import numpy as np, tensorflow as tf
root, variant, atol = {root!r}, {variant!r}, {atol!r}
for name, n_out in json.loads(open(os.path.join(root, "manifest.json")).read()).items():
    serve = tf.saved_model.load(os.path.join(root, name + "_" + variant)).signatures["serving_default"]
    inputs = dict(np.load(os.path.join(root, name + "_in.npz")))
    expected = np.load(os.path.join(root, name + "_out.npz"))
    assert set(serve.structured_input_signature[1]) == set(inputs), (name, serve.structured_input_signature)
    got = serve(**{{k: tf.constant(v) for k, v in inputs.items()}})
    assert sorted(got) == ["output_%d" % i for i in range(n_out)], sorted(got)
    for i in range(n_out):
        np.testing.assert_allclose(
            got["output_%d" % i], expected["arr_%d" % i], rtol=atol, atol=atol, err_msg=name
        )
    print("ok", name, variant)
"""


def test_native_export_loads_after_import_in_a_fresh_process(exported):
    code = "import tf_sparseconv\n" + LOAD_AND_COMPARE.format(root=str(exported), variant="native", atol=1e-6)
    out = run_python(code).stdout
    assert out.count("ok ") == 3, out


def test_portable_export_loads_where_tf_sparseconv_cannot_be_imported(exported):
    # tf_sparseconv is made unimportable: the portable graphs must hold stock ops only.
    code = "import sys\nsys.modules['tf_sparseconv'] = None\n" + LOAD_AND_COMPARE.format(
        root=str(exported), variant="portable", atol=1e-4
    )
    out = run_python(code).stdout
    assert out.count("ok ") == 3, out


def test_native_graph_uses_the_compiled_ops_and_portable_does_not(exported):
    native = tf.saved_model.load(str(exported / "dense_families_native")).signatures["serving_default"]
    portable = tf.saved_model.load(str(exported / "dense_families_portable")).signatures["serving_default"]
    used = custom_ops_in(native)
    expected = {"TfSparseConv>KWinners", "TfSparseConv>ChannelSparseConv2DBiasActivation"}
    assert expected <= used, used
    assert not custom_ops_in(portable)


def test_signature_has_dynamic_batch_and_keras_names(exported, rng):
    serve = tf.saved_model.load(str(exported / "dense_families_native")).signatures["serving_default"]
    specs = serve.structured_input_signature[1]
    assert specs["image"].shape.as_list() == [None, 16, 16, 8] and specs["mask"].shape.as_list() == [
        None,
        16,
        16,
        1,
    ]
    for batch in (1, 7):
        out = serve(**{k: tf.constant(v) for k, v in dense_inputs(rng, batch).items()})
        assert out["output_0"].shape == (batch, 3)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="`model`"):
        tsc.export.export_saved_model(keras.layers.Dense(2), str(tmp_path))
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="`portable`"):
        tsc.export.export_saved_model(model, str(tmp_path), portable="yes")
    assert os.path.isdir(tsc.export.export_saved_model(model, str(tmp_path / "plain")))


def test_gradients_of_compiled_ops_inside_references_only(rng):
    """references_only() changes which ops new calls build, not how ops already in a graph
    differentiate (their gradient functions still need the compiled gradient ops)."""
    from tf_sparseconv.python.ops._loader import references_only

    x = tf.constant(rng.standard_normal((2, 6, 6, 8)).astype(np.float32))
    kernel = tf.constant(rng.standard_normal((3, 3, 2, 4)).astype(np.float32))
    connections = tsc.ops.random_connections(8, 4, fan_in=2)
    with tf.GradientTape() as tape:
        tape.watch([x, kernel])
        y = tsc.ops.kwinners(tsc.ops.channel_sparse_conv2d(x, kernel, connections), 2)
    with references_only():
        assert tsc.ops.load_library() is None
        dx, dkernel = tape.gradient(y, [x, kernel])
    with tf.GradientTape() as tape:
        tape.watch([x, kernel])
        y_ref = tsc.ops.kwinners_reference(
            tsc.ops.channel_sparse_conv2d_reference(x, kernel, connections), 2, -1
        )
    ref = tape.gradient(y_ref, [x, kernel])
    np.testing.assert_allclose(dx, ref[0], atol=1e-4)
    np.testing.assert_allclose(dkernel, ref[1], atol=1e-4)
