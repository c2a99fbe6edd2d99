"""Sparse-map inputs (issue 14, item 1): SparseMap validates coords against the batch size (given,
from `num_sites`, or inferred and bounded by the number of sites) and the features' row count,
with errors naming the layer, the argument and the row, in eager mode, in graphs and in exported
SavedModels; `tsc.data.sparse_batches` feeds fit/evaluate/predict whole samples."""

from __future__ import annotations

import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import run_python

import tf_sparseconv as tsc

GRID = (6, 6)


def batch_of(rng, sites_per_sample, channels=2):
    """features [N, C], coords int32 [N, 3] (b, x, y): `sites_per_sample[b]` sites of sample b."""
    coords = [np.zeros((0, 3), np.int32)]
    for b, n in enumerate(sites_per_sample):
        flat = rng.choice(int(np.prod(GRID)), n, replace=False)
        coords.append(np.concatenate([np.full((n, 1), b), np.stack(np.unravel_index(flat, GRID), 1)], 1))
    coords = np.concatenate(coords).astype(np.int32)
    return rng.standard_normal((len(coords), channels)).astype(np.float32), coords


def run_both(layer, *inputs):
    """The layer eagerly and in a graph with unknown row counts; both must raise the same way."""
    yield lambda: layer(list(inputs))
    specs = [tf.TensorSpec([None, *np.shape(a)[1:]], tf.as_dtype(np.asarray(a).dtype)) for a in inputs]
    fn = tf.function(lambda *args: layer(list(args)), input_signature=specs)
    yield lambda: fn(*inputs)


def test_valid_batches_pass(rng):
    features, coords = batch_of(rng, [3, 1, 2])
    for call in run_both(tsc.layers.SparseMap(GRID), features, coords):
        np.testing.assert_array_equal(call()[2], [3, *GRID])
    for call in run_both(tsc.layers.SparseMap(GRID, batch_size=5), features, coords):
        np.testing.assert_array_equal(call()[2], [5, *GRID])
    num_sites = np.array([3, 1, 2, 0], np.int32)  # a last sample without sites
    for call in run_both(tsc.layers.SparseMap(GRID), features, coords, num_sites):
        f, c, s = call()
        np.testing.assert_array_equal(s, [4, *GRID])
        np.testing.assert_array_equal(c, coords)
        np.testing.assert_array_equal(f, features)
    # an empty map: batch 0 inferred, or the declared/counted one
    empty_f, empty_c = batch_of(rng, [])
    for call in run_both(tsc.layers.SparseMap(GRID), empty_f, empty_c):
        np.testing.assert_array_equal(call()[2], [0, *GRID])
    for call in run_both(tsc.layers.SparseMap(GRID), empty_f, empty_c, np.zeros([2], np.int32)):
        np.testing.assert_array_equal(call()[2], [2, *GRID])


@pytest.mark.parametrize(
    "case,match",
    [
        ("corrupt", r"`coords` row.*3.*has batch index.*1073741824.*only.*6.*sites.*batch_size"),
        ("negative", r"`coords` row.*2.*has batch index.*-1.*< 0"),
        ("declared", r"`coords` row.*4.*has batch index.*2.*>= batch_size.*2"),
        ("inferred", r"`coords` row.*0.*has batch index.*1.*only.*1.*sites.*batch_size"),
        ("num_sites_length", r"`coords` row.*4.*has batch index.*2.*>= the number of samples"),
        ("sliced", r"sample.*0.*has.*3.*rows in `coords` but `num_sites` says.*2.*sliced.*sparse_batches"),
        ("num_sites_vs_batch_size", r"`num_sites` has.*3.*samples but batch_size is.*4"),
    ],
)
def test_bad_batch_indices_raise_naming_layer_argument_and_row(rng, case, match):
    features, coords = batch_of(rng, [2, 2, 2])
    extra, kwargs = [], {}
    if case == "corrupt":
        coords[3, 0] = 2**30
    elif case == "negative":
        coords[2, 0] = -1
    elif case == "declared":
        kwargs["batch_size"] = 2
    elif case == "inferred":  # one site, in sample 1: batch 2 > 1 site
        features, coords = features[:1], np.array([[1, 0, 0]], np.int32)
    elif case == "num_sites_length":
        extra = [np.array([2, 2], np.int32)]
    elif case == "sliced":
        extra = [np.array([2, 2, 2], np.int32)]
        coords[2, 0] = 0  # rows that do not add up per sample (e.g. a slice of a bigger batch)
    elif case == "num_sites_vs_batch_size":
        extra, kwargs = [np.array([2, 2, 2], np.int32)], {"batch_size": 4}
    layer = tsc.layers.SparseMap(GRID, name="voxels", **kwargs)
    for call in run_both(layer, features, coords, *extra):
        with pytest.raises(tf.errors.InvalidArgumentError, match=match) as info:
            call()
        assert "SparseMap `voxels`" in str(info.value)


def test_features_and_coords_row_counts_must_match(rng):
    features, coords = batch_of(rng, [2, 3])
    layer = tsc.layers.SparseMap(GRID, name="voxels")
    calls = run_both(layer, features[:4], coords)
    with pytest.raises(ValueError, match=r"SparseMap `voxels`: `features` has 4 rows but `coords` has 5"):
        next(calls)()  # static shapes: a ValueError
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"SparseMap `voxels`: `features` has.*4.*5"):
        next(calls)()
    with pytest.raises(ValueError, match="`features` has 3 rows"):  # symbolic
        layer([keras.KerasTensor((3, 2)), keras.KerasTensor((5, 3), dtype="int32")])


def test_corrupt_batch_index_fails_fast_without_allocating(tmp_path):
    """The reported crash: a batch index of 2**30 made SparseGlobalPooling allocate
    [2**30 + 1, C] floats (16 GiB here); under a 6 GiB address-space limit it must fail cleanly."""
    run_python(
        """
import resource, time
import numpy as np, tensorflow as tf, keras
import tf_sparseconv as tsc
features = keras.Input((4,), name="features")
coords = keras.Input((3,), dtype="int32", name="coords")
h = tsc.layers.SparseMap((8, 8), name="voxels")([features, coords])
model = keras.Model({"features": features, "coords": coords}, tsc.layers.SparseGlobalPooling()(h))
x = {"features": np.ones((5, 4), np.float32), "coords": np.zeros((5, 3), np.int32)}
x["coords"][:, 1] = np.arange(5)
x["coords"][3, 0] = 2**30
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
start = time.time()
for fn in (model, tf.function(model)):
    try:
        fn(x)
    except tf.errors.InvalidArgumentError as e:
        assert "SparseMap `voxels`" in str(e) and "1073741824" in str(e), str(e)
    else:
        raise AssertionError("no error")
assert time.time() - start < 20, time.time() - start
print("ok")
""",
        timeout=120,
    )


# --- tsc.data.sparse_batches and fit/evaluate/predict ---------------------------------------


def samples(rng, sizes, channels=2):
    coords = [np.stack(np.unravel_index(rng.choice(36, n, replace=False), GRID), 1) for n in sizes]
    features = [rng.standard_normal((n, channels)).astype(np.float32) for n in sizes]
    return features, coords


def test_sparse_batches_layout(rng):
    features, coords = samples(rng, [3, 0, 2, 4, 0])
    labels = np.arange(5)
    batches = list(tsc.data.sparse_batches(features, coords, labels, batch_size=2))
    assert len(batches) == 3
    start = 0
    for x, y in batches:
        b = len(y)
        np.testing.assert_array_equal(y, labels[start : start + b])
        np.testing.assert_array_equal(x["num_sites"], [len(c) for c in coords[start : start + b]])
        want_c = [
            np.concatenate([np.full((len(c), 1), i), c], 1) for i, c in enumerate(coords[start : start + b])
        ]
        np.testing.assert_array_equal(x["coords"], np.concatenate(want_c).reshape(-1, 3))
        np.testing.assert_array_equal(
            x["features"], np.concatenate(features[start : start + b]).reshape(-1, 2)
        )
        assert x["coords"].dtype == tf.int32 and x["features"].dtype == tf.float32
        start += b
    x = next(iter(tsc.data.sparse_batches(None, coords, batch_size=5, num_sites=False)))
    assert set(x) == {"features", "coords"}
    np.testing.assert_array_equal(x["features"], np.ones((9, 1)))
    assert len(list(tsc.data.sparse_batches(features, coords, batch_size=2, drop_remainder=True))) == 2
    order = [
        [int(v) for v in y]
        for _, y in tsc.data.sparse_batches(features, coords, labels, batch_size=5, shuffle=True, seed=3)
    ]
    assert sorted(order[0]) == list(range(5))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"coords": []}, "no samples"),
        ({"features": [np.zeros((2, 2))]}, "`features` has 1 samples"),
        (
            {"coords": [np.zeros((2, 2), int), np.zeros((3, 2), int)]},
            "sample 1 has 2 rows of `features` but 3",
        ),
        ({"coords": [np.zeros((2, 4), int)] * 2}, "D = 1, 2 or 3"),
        ({"labels": [0]}, "`labels` has 1 entries"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_sparse_batches_bad_arguments(kwargs, match):
    args = {"features": [np.zeros((2, 2)), np.zeros((2, 2))], "coords": [np.zeros((2, 2), int)] * 2}
    with pytest.raises(ValueError, match=match):
        tsc.data.sparse_batches(**{**args, **kwargs})


def voxel_model(num_sites=True):
    features = keras.Input((2,), name="features")
    coords = keras.Input((3,), dtype="int32", name="coords")
    inputs = {"features": features, "coords": coords}
    if num_sites:
        inputs["num_sites"] = keras.Input((), dtype="int32", name="num_sites")
        h = tsc.layers.SparseMap(GRID, name="voxels")([features, coords, inputs["num_sites"]])
    else:
        h = tsc.layers.SparseMap(GRID, name="voxels")([features, coords])
    h = tsc.layers.SparseConv2D(4, 3, activation="relu")(h)
    outputs = keras.layers.Dense(3)(tsc.layers.SparseGlobalPooling("max")(h))
    return keras.Model(inputs, outputs)


def test_fit_evaluate_predict_with_sparse_batches(rng):
    keras.utils.set_random_seed(0)
    sizes = [4, 7, 0, 5, 3, 6, 2, 0]  # the last sample of the last batch has no site
    features, coords = samples(rng, sizes)
    labels = rng.integers(0, 3, len(sizes))
    model = voxel_model()
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    train = tsc.data.sparse_batches(features, coords, labels, batch_size=3, shuffle=True, seed=0)
    history = model.fit(train, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert np.isfinite(
        model.evaluate(tsc.data.sparse_batches(features, coords, labels, batch_size=3), verbose=0)
    )
    predicted = model.predict(tsc.data.sparse_batches(features, coords, batch_size=3), verbose=0)
    assert predicted.shape == (len(sizes), 3)
    one_by_one = [
        model.predict(tsc.data.sparse_batches([f], [c], batch_size=1), verbose=0)[0]
        for f, c in zip(features, coords)
    ]
    np.testing.assert_allclose(predicted, one_by_one, rtol=1e-5, atol=1e-6)
    # an empty sample pools to zeros: its logits are the Dense bias
    np.testing.assert_allclose(predicted[-1], model.layers[-1].bias.numpy(), atol=1e-6)


def test_numpy_sparse_maps_in_predict_are_an_error_not_a_wrong_answer(rng):
    """Keras slices NumPy inputs by rows; with `num_sites` the slices cannot pass unnoticed."""
    features, coords = samples(rng, [3, 3, 4, 2])
    x = next(iter(tsc.data.sparse_batches(features, coords, batch_size=4)))
    x = {k: v.numpy() for k, v in x.items()}
    model = voxel_model()
    assert model(x).shape == (4, 3)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match="cardinality"):  # 12 site rows, 4 samples
        model.fit(x, np.zeros(4), verbose=0)
    # (Keras 3.15's own cardinality check fails with an AttributeError on a dict in predict)
    with pytest.raises((ValueError, AttributeError)):
        model.predict(x, verbose=0)
    # as many site rows as samples (by chance): Keras slices both by 2 rows, SparseMap notices
    few_f, few_c = samples(rng, [2, 0, 1, 1])
    x = next(iter(tsc.data.sparse_batches(few_f, few_c, batch_size=4)))
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="SparseMap `voxels`.*(sliced|number of samples)"
    ):
        model.predict({k: np.asarray(v) for k, v in x.items()}, batch_size=2, verbose=0)


def test_checks_survive_export_saved_model(rng, tmp_path):
    model = voxel_model(num_sites=False)
    path = tsc.export.export_saved_model(model, os.path.join(tmp_path, "served"))
    served = tf.saved_model.load(path).signatures["serving_default"]
    features, coords = batch_of(rng, [2, 3])
    out = served(features=tf.constant(features), coords=tf.constant(coords))
    np.testing.assert_allclose(
        next(iter(out.values())), model({"features": features, "coords": coords}), rtol=1e-5
    )
    coords[1, 0] = 2**30
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"SparseMap `voxels`: `coords` row.*1073741824"):
        served(features=tf.constant(features), coords=tf.constant(coords))


@pytest.mark.slow
def test_num_sites_model_converts_to_litert_and_onnx(rng, tmp_path):
    """The converters drop SparseMap's checks (Assert ops) and the ops only they read."""
    model = voxel_model()
    features, coords = samples(rng, [3, 0, 4, 0])
    x = {k: v.numpy() for k, v in next(iter(tsc.data.sparse_batches(features, coords, batch_size=4))).items()}
    want = model(x).numpy()
    path = tsc.export.export_litert(model, str(tmp_path / "voxels.tflite"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        runner = tf.lite.Interpreter(model_path=path).get_signature_runner()
    np.testing.assert_allclose(next(iter(runner(**x).values())), want, rtol=1e-5, atol=1e-6)
    ort = pytest.importorskip("onnxruntime")
    path = tsc.export.export_onnx(model, str(tmp_path / "voxels.onnx"))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, x)[0], want, rtol=1e-5, atol=1e-6)
