"""KWinners and TopKAttention Keras layers."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from layer_checks import check_layer_in_models, check_mixed_precision

import tf_sparseconv as tsc

pytestmark = pytest.mark.skipif(not tsc.ops.is_library_loaded(), reason="op library not built")


def test_kwinners_semantics():
    x = tf.random.normal((3, 5, 20))
    np.testing.assert_array_equal(tsc.layers.KWinners(k=4)(x), tsc.ops.kwinners(x, 4))
    # sparsity 0.75 of 20 keeps round(5.0) = 5 per slice; along axis 1 keeps round(1.25) = 1.
    np.testing.assert_array_equal(tsc.layers.KWinners(sparsity=0.75)(x), tsc.ops.kwinners(x, 5))
    np.testing.assert_array_equal(
        tsc.layers.KWinners(sparsity=0.75, axis=1)(x), tsc.ops.kwinners(x, 1, axis=1)
    )
    # sparsity close to 1 still keeps one winner
    assert np.count_nonzero(tsc.layers.KWinners(sparsity=0.999)(x).numpy(), axis=-1).max() == 1


def test_topk_attention_semantics_static_and_dynamic():
    x = tf.random.normal((2, 6, 5, 4))
    layer = tsc.layers.TopKAttention(density=0.1, mode="relu")  # round(0.1 * 30) = 3 per channel
    np.testing.assert_array_equal(layer(x), tsc.ops.topk_attention(x, 3, mode="relu"))
    per_sample = tsc.layers.TopKAttention(density=0.05, per="sample")  # round(0.05 * 120) = 6
    np.testing.assert_array_equal(per_sample(x), tsc.ops.topk_attention(x, 6, per="sample"))
    # unknown spatial size: k is computed inside the graph
    inputs = keras.Input((None, None, 4))
    model = keras.Model(inputs, tsc.layers.TopKAttention(density=0.1, mode="relu")(inputs))
    np.testing.assert_array_equal(model(x), tsc.ops.topk_attention(x, 3, mode="relu"))
    assert model.output_shape == (None, None, None, 4)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("make_layer", "shape"),
    [
        (lambda **kw: tsc.layers.KWinners(k=3, **kw), (6, 5)),
        (lambda **kw: tsc.layers.KWinners(sparsity=0.5, axis=1, **kw), (6, 5)),
        (lambda **kw: tsc.layers.TopKAttention(density=0.25, **kw), (4, 4, 5)),
        (lambda **kw: tsc.layers.TopKAttention(k=5, mode="relu", per="sample", **kw), (7, 5)),
    ],
    ids=["kwinners-k", "kwinners-sparsity-axis1", "attention-density", "attention-relu-sample"],
)
def test_layer_in_models(make_layer, shape, tmp_path):
    check_layer_in_models(make_layer, shape, tmp_path)


@pytest.mark.parametrize(
    "make_layer",
    [lambda **kw: tsc.layers.KWinners(k=2, **kw), lambda **kw: tsc.layers.TopKAttention(k=3, **kw)],
)
def test_mixed_precision(make_layer):
    check_mixed_precision(make_layer, (5, 6, 4))


def test_compute_output_shape_and_bad_arguments():
    assert tsc.layers.KWinners(k=1).compute_output_shape((None, 7, 3)) == (None, 7, 3)
    assert tsc.layers.TopKAttention(k=1).compute_output_shape((None, 7, 7, 3)) == (None, 7, 7, 3)
    with pytest.raises(ValueError, match="exactly one of `k` or `sparsity`"):
        tsc.layers.KWinners()
    with pytest.raises(ValueError, match="exactly one of `k` or `sparsity`"):
        tsc.layers.KWinners(k=2, sparsity=0.5)
    with pytest.raises(ValueError, match="`sparsity` must be in"):
        tsc.layers.KWinners(sparsity=1.0)
    with pytest.raises(ValueError, match="`k` must be an integer >= 1"):
        tsc.layers.KWinners(k=0)
    with pytest.raises(ValueError, match="`density` must be in"):
        tsc.layers.TopKAttention(density=0.0)
    with pytest.raises(ValueError, match="`mode` must be one of"):
        tsc.layers.TopKAttention(k=1, mode="top")
    with pytest.raises(ValueError, match="1 to 3 spatial dims"):
        tsc.layers.TopKAttention(k=1)(tf.ones((2, 3)))
    with pytest.raises(ValueError, match="`axis` must be in"):
        tsc.layers.KWinners(k=1, axis=3)(tf.ones((2, 3)))
