"""Sparse-map models (coordinate sparse convolution) on LiteRT and ONNX Runtime.

`tsc.export.export_litert` / `export_onnx` trace the model under `for_converters()`, where the
rulebook, the convolution, the attention step (`max_active_sites`) and the transposed
convolution's row alignment take forms both converters support (no LowerBound, SegmentMin or
int64 FloorDiv, no scatter that sums duplicate indices, no empty tensor). Those forms must give
the compiled ops' outputs exactly (the rulebook in the same order), and each converted model the
Keras model's outputs on a batch of several samples (one with very few sites), on a sample with
few sites, and on a map with no site at all.

(The fresh-process load of a portable SavedModel of a sparse map is in test_export.py.)
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import random_sites
from test_coord_sparse_ops import CASES, assert_rulebook, oracle_rulebook

import tf_sparseconv as tsc
from tf_sparseconv.python.ops import coord_sparse_ops
from tf_sparseconv.python.ops._loader import for_converters, load_library

pytest.importorskip("tf2onnx")
ort = pytest.importorskip("onnxruntime")

# Exact for the rulebook's integers; floats as the brief allows (relative to the output's scale).
RTOL = 1e-5

# --- the converter forms equal the compiled ops -------------------------------------------

MODES = [(c, sub) for c in CASES for sub in (True, False) if not (sub and max(c[2]) > 1)]
IDS = [f"{len(c[0])}d-k{c[1]}-s{c[2]}-d{c[3]}-{'sub' if sub else 'reg'}" for c, sub in MODES]


@pytest.mark.parametrize("case,submanifold", MODES, ids=IDS)
def test_converter_rulebook_is_the_ops(rng, case, submanifold):
    shape, kernel, strides, dilations, batch, density = case
    coords = random_sites(rng, shape, batch, density)
    with for_converters():
        got = tsc.ops.sparse_conv_rulebook(coords, shape, kernel, strides, dilations, submanifold)
    assert_rulebook(got, oracle_rulebook(coords, shape, kernel, strides, dilations, submanifold))
    if load_library() is not None:  # the compiled op's rulebook, entry for entry
        for a, b in zip(
            got, tsc.ops.sparse_conv_rulebook(coords, shape, kernel, strides, dilations, submanifold)
        ):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("submanifold", [True, False])
def test_converter_rulebook_empty_and_traced(rng, submanifold):
    strides = 1 if submanifold else 2
    with for_converters():
        out_coords, ptr, pairs, out_shape = tsc.ops.sparse_conv_rulebook(
            np.zeros([0, 3], np.int32), (5, 6), 3, strides, 1, submanifold
        )
    assert out_coords.shape == (0, 3) and pairs.shape == (0, 2)
    np.testing.assert_array_equal(ptr, np.zeros(10))
    coords = random_sites(rng, (7, 6), 3, 0.3)

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.int32), tf.TensorSpec([2], tf.int32)])
    def traced(c, shape):  # a dynamic spatial shape
        with for_converters():
            return tsc.ops.sparse_conv_rulebook(c, shape, (3, 2), strides, (1, 2), submanifold)

    got = traced(coords, tf.constant([7, 6]))
    assert_rulebook(got, oracle_rulebook(coords, (7, 6), (3, 2), (strides,) * 2, (1, 2), submanifold))


def test_converter_form_rejects_grids_beyond_int32():
    coords = np.array([[0, 5, 1]], np.int32)
    with for_converters(), pytest.raises(ValueError, match="too large for the LiteRT / ONNX form"):
        tsc.ops.sparse_conv_rulebook(coords, (2**31 - 2, 4), 3, 2, 1, False)
    # Keys are int64: a batch index times a grid volume beyond int32 is fine.
    big = np.array([[70_000, 40_000, 3], [70_000, 40_000, 4], [69_999, 40_000, 4]], np.int32)
    with for_converters():
        got = tsc.ops.sparse_conv_rulebook(big, (50_000, 50_000), 3)
    assert_rulebook(got, oracle_rulebook(big, (50_000, 50_000), (3, 3), (1, 1), (1, 1), True))


def test_match_keys_both_forms(rng):
    in_keys = rng.choice(10**12, 300, replace=False).astype(np.int64)
    queries = np.concatenate([in_keys[rng.integers(0, 300, 500)], rng.integers(0, 10**12, 200), [-1, -1]])
    rng.shuffle(queries)
    expected = np.array([{k: i for i, k in enumerate(in_keys)}.get(q, -1) for q in queries])
    np.testing.assert_array_equal(coord_sparse_ops._match_keys(in_keys, queries), expected)
    with for_converters():
        np.testing.assert_array_equal(coord_sparse_ops._match_keys(in_keys, queries), expected)
        empty = np.zeros([0], np.int64)
        np.testing.assert_array_equal(coord_sparse_ops._match_keys(empty, queries[:3]), [-1, -1, -1])


def test_converter_features_topk_and_alignment_are_the_ops(rng):
    shape = (9, 8, 7)
    coords = random_sites(rng, shape, 3, 0.15)
    features = rng.standard_normal((len(coords), 5)).astype(np.float32)
    kernel = rng.standard_normal((3, 3, 3, 5, 4)).astype(np.float32)
    expected = tsc.ops.sparse_conv(features, coords, kernel, shape, 2, 1, False)
    # the coarse sites' features (every other one) on the fine sites' coarse positions
    coarse = np.concatenate([coords[:, :1], coords[:, 1:] // 2], 1)
    with for_converters():
        got = tsc.ops.sparse_conv(features, coords, kernel, shape, 2, 1, False)
        kept = tsc.ops.topk_sites(features, coords, 7)
        aligned = coord_sparse_ops.align_rows(got[0][::2], got[1][::2], coarse, got[2])
    np.testing.assert_allclose(got[0], expected[0], rtol=RTOL, atol=RTOL)
    np.testing.assert_array_equal(got[1], expected[1])
    for a, b in zip(kept, tsc.ops.topk_sites(features, coords, 7)):
        np.testing.assert_array_equal(a, b)
    row_of = {tuple(c): i for i, c in enumerate(np.asarray(got[1])[::2].tolist())}
    values = np.asarray(got[0])[::2]
    want = np.stack([values[row_of[t]] if t in row_of else np.zeros(4) for t in map(tuple, coarse.tolist())])
    assert 0 < len(set(map(tuple, coarse.tolist())) & set(row_of)) < len(coarse)  # hits and misses
    np.testing.assert_array_equal(aligned, want.astype(np.float32))
    default = coord_sparse_ops.align_rows(got[0][::2], got[1][::2], coarse, got[2])
    np.testing.assert_array_equal(default, aligned)


# --- exported models -----------------------------------------------------------------------


def _map_inputs(dims, channels):
    features = keras.Input((channels,), name="features")
    coords = keras.Input((1 + dims,), dtype="int32", name="coords")
    return features, coords, {"features": features, "coords": coords}


def submanifold_model():
    """Submanifold 3-D convs (plain and dilated), batch norm, average global pooling."""
    keras.utils.set_random_seed(11)
    features, coords, inputs = _map_inputs(3, 3)
    h = tsc.layers.SparseMap((8, 7, 6))([features, coords])
    h = tsc.layers.SparseConv3D(6, 3, activation="relu", bias_initializer="random_normal")(h)
    h = tsc.layers.SparseBatchNormalization(
        beta_initializer="random_normal", moving_variance_initializer="ones"
    )(h)
    h = tsc.layers.SparseConv3D(5, (3, 1, 3), dilation_rate=(2, 1, 1), activation="tanh")(h)
    return keras.Model(inputs, [h[0], tsc.layers.SparseGlobalPooling("avg")(h)], name="submanifold")


def strided_attention_model():
    """Regular strided 2-D conv with the top-k attention step, then a dilated regular conv and
    max global pooling over a fixed batch size (a sample may have no site at all)."""
    keras.utils.set_random_seed(12)
    features, coords, inputs = _map_inputs(2, 2)
    h = tsc.layers.SparseMap((11, 9), batch_size=3)([features, coords])
    h = tsc.layers.SparseConv2D(4, 3, strides=2, submanifold=False, max_active_sites=4)(h)
    h = tsc.layers.SparseConv2D(3, 2, dilation_rate=(1, 2), submanifold=False, activation="relu")(h)
    pooled = tsc.layers.SparseGlobalPooling("max")(h)
    return keras.Model(inputs, [h[0], h[1], h[2], pooled], name="strided_attention")


def unet_model():
    """3-D U-Net step: strided conv down, transposed conv back onto the fine sites (from the
    coarse map after max_active_sites: a subset of the downsampling rulebook's sites)."""
    keras.utils.set_random_seed(13)
    features, coords, inputs = _map_inputs(3, 2)
    fine = tsc.layers.SparseMap((6, 7, 6))([features, coords])
    down = tsc.layers.SparseConv3D(4, 2, strides=2, submanifold=False, max_active_sites=5)(fine)
    up = tsc.layers.SparseConvTranspose3D(3, 2, strides=2, bias_initializer="random_normal")([down, fine])
    return keras.Model(inputs, up[0], name="unet")


def dense_io_pooling_model():
    """A dense 1-D signal in (Sparsify), max and average pooling (strided windows), Densify out."""
    keras.utils.set_random_seed(14)
    signal = keras.Input((23, 3), name="signal")
    h = tsc.layers.Sparsify()(signal)
    h = tsc.layers.SparseMaxPooling1D(3, strides=2)(h)
    h = tsc.layers.SparseAveragePooling1D(2)(h)
    return keras.Model(signal, [h[0], h[1], tsc.layers.Densify((6,))(h)], name="dense_io_pooling")


def _map_batch(rng, dims, shape, channels, sites_per_sample):
    """Random sites (unsorted rows) and features; `sites_per_sample` sites in sample 0, 1, ...."""
    parts = []
    for b, n in enumerate(sites_per_sample):
        flat = rng.choice(int(np.prod(shape)), size=n, replace=False)
        parts.append(np.concatenate([np.full([n, 1], b), np.stack(np.unravel_index(flat, shape), 1)], 1))
    coords = np.concatenate([np.zeros([0, 1 + dims]), *parts]).astype(np.int32)
    coords = coords[rng.permutation(len(coords))]
    features = rng.uniform(-2, 2, (len(coords), channels)).astype(np.float32)
    return {"features": features, "coords": coords}


def _batches(name, rng):
    if name == "dense_io_pooling":
        x = rng.uniform(-2, 2, (3, 23, 3)).astype(np.float32) * (rng.random((3, 23, 1)) < 0.3)
        one = np.zeros((2, 23, 3), np.float32)
        one[1, 11] = rng.uniform(-2, 2, 3)
        return [{"signal": x}, {"signal": one}, {"signal": np.zeros((1, 23, 3), np.float32)}]
    dims, shape, channels = {
        "submanifold": (3, (8, 7, 6), 3),
        "strided_attention": (2, (11, 9), 2),
        "unet": (3, (6, 7, 6), 2),
    }[name]
    several = _map_batch(rng, dims, shape, channels, [40, 2, 25] if dims == 3 else [20, 1, 12])
    few = _map_batch(rng, dims, shape, channels, [1] if name != "strided_attention" else [0, 3])
    return [several, few, _map_batch(rng, dims, shape, channels, [])]  # and no site at all


MODELS = {
    "submanifold": submanifold_model,
    "strided_attention": strided_attention_model,
    "unet": unet_model,
    "dense_io_pooling": dense_io_pooling_model,
}


def _run_litert(path, inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        runner = tf.lite.Interpreter(model_path=path).get_signature_runner()
    outputs = []
    for batch in inputs:
        got = runner(**batch)
        outputs.append([got[f"output_{i}"] for i in range(len(got))])
    return outputs


def _run_onnx(path, inputs):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    order = sorted(range(len(names)), key=lambda i: int(names[i].rsplit("_", 1)[-1]))
    return [[session.run(None, batch)[i] for i in order] for batch in inputs]


def compare(expected, got):
    """(max abs diff, max rel diff) over the outputs; asserts shapes, dtypes, exact integers."""
    worst_abs = worst_rel = 0.0
    for want, have in zip(expected, got, strict=True):
        e, g = np.asarray(want), np.asarray(have)
        assert g.shape == e.shape and g.dtype == e.dtype, (g.shape, g.dtype, e.shape, e.dtype)
        if e.dtype.kind in "iu":
            np.testing.assert_array_equal(g, e)
            continue
        diff = np.abs(g.astype(np.float64) - e)
        worst_abs = max(worst_abs, float(diff.max(initial=0.0)))
        worst_rel = max(worst_rel, float((diff / np.maximum(np.abs(e), 1e-3)).max(initial=0.0)))
        scale = float(np.abs(e).max(initial=0.0))
        np.testing.assert_allclose(g, e, rtol=RTOL, atol=RTOL * max(scale, 1.0))
    return worst_abs, worst_rel


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_case(request):
    model = MODELS[request.param]()
    inputs = _batches(request.param, np.random.default_rng(len(request.param)))
    expected = []
    for batch in inputs:
        outputs = model(batch if len(batch) > 1 else next(iter(batch.values())), training=False)
        expected.append([np.asarray(t) for t in keras.tree.flatten(outputs)])
    return request.param, model, inputs, expected


# target: (export function, file suffix, runner)
TARGETS = {
    "litert": (tsc.export.export_litert, ".tflite", _run_litert),
    "onnx": (tsc.export.export_onnx, ".onnx", _run_onnx),
}


@pytest.mark.slow
@pytest.mark.parametrize("target", list(TARGETS))
def test_converted_model_matches_keras(model_case, target, tmp_path):
    name, model, inputs, expected = model_case
    export, suffix, run = TARGETS[target]
    path = export(model, str(tmp_path / f"{name}{suffix}"))
    for want, got in zip(expected, run(path, inputs), strict=True):
        compare(want, got)
