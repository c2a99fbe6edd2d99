"""tsc.pruning: schedules (vs tfmot), granularities, the wrapper, callbacks, strip_pruning."""

from __future__ import annotations

import glob
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import run_python

import tf_sparseconv as tsc
from tf_sparseconv.python import pruning

# ---------------------------------------------------------------------------------------------
# helpers


def conv_model(seed: int = 0, in_channels: int = 8) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, in_channels))
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.Conv2D(16, 3, strides=2, padding="valid", dilation_rate=1)(h)
    h = keras.layers.Flatten()(h)
    outputs = keras.layers.Dense(3)(h)
    return keras.Model(inputs, outputs)


def data(rng, n: int = 64, shape=(8, 8, 8)):
    x = rng.standard_normal((n, *shape)).astype(np.float32)
    return x, rng.integers(0, 3, n)


def fit(model, x, y, epochs: int = 2, optimizer=None, callbacks=()):
    if not model.compiled:
        model.compile(
            optimizer=optimizer or keras.optimizers.Adam(1e-2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[pruning.UpdatePruningStep(), *callbacks],
    )
    return model


def zero_fraction(wrapper) -> float:
    return float(np.mean(wrapper.pruned_weight.numpy() == 0))


def masks_of(model):
    return [(w.mask.numpy(), int(w.pruning_step.numpy())) for w in pruning.collect_pruned_layers(model)]


def assert_same_weights(a: keras.Model, b: keras.Model, **tol):
    assert len(a.weights) == len(b.weights)
    for wa, wb in zip(a.weights, b.weights):
        np.testing.assert_allclose(wa.numpy(), wb.numpy(), err_msg=wa.path, **tol)


# ---------------------------------------------------------------------------------------------
# schedules

SCHEDULES = [
    ("ConstantSparsity", {"target_sparsity": 0.5, "begin_step": 0}),
    ("ConstantSparsity", {"target_sparsity": 0.8, "begin_step": 10, "end_step": 50, "frequency": 7}),
    ("ConstantSparsity", {"target_sparsity": 0.3, "begin_step": 5, "end_step": -1, "frequency": 1}),
    ("PolynomialDecay", {"initial_sparsity": 0.0, "final_sparsity": 0.8, "begin_step": 0, "end_step": 100}),
    (
        "PolynomialDecay",
        {
            "initial_sparsity": 0.2,
            "final_sparsity": 0.9,
            "begin_step": 10,
            "end_step": 60,
            "power": 2,
            "frequency": 5,
        },
    ),
    (
        "PolynomialDecay",
        {"initial_sparsity": 0.1, "final_sparsity": 0.5, "begin_step": 3, "end_step": 17, "power": 1},
    ),
]
STEPS = list(range(0, 130))

# tfmot's step semantics: wrapper arguments (`P` is the pruning module) -> (step, zero fraction
# of the mask) after each of 102 batches of one `fit`.
STEP_CASES = {
    "default": "{}",  # ConstantSparsity(0.5, 0): every 100 steps, the first at step 100
    "constant_f3": "dict(pruning_schedule=P.ConstantSparsity(0.5, 0, frequency=3))",
    "constant_b2": "dict(pruning_schedule=P.ConstantSparsity(0.5, np.int64(2), frequency=1))",
    "poly": "dict(pruning_schedule=P.PolynomialDecay(0.0, 0.75, 1, np.int32(7), frequency=2))",
    "m_by_n": "dict(sparsity_m_by_n=(2, 4))",  # tfmot: the m:n mask once, at step 1
}
RECORD_STEPS = """
def record_steps(P, keras, case):
    keras.utils.set_random_seed(0)
    layer = P.prune_low_magnitude(keras.layers.Dense(8), **eval(case))
    model = keras.Sequential([keras.Input((16,)), layer])
    model.compile(keras.optimizers.SGD(0.01), "mse")
    mask = lambda: (layer.pruning_vars[0][1] if hasattr(layer, "pruning_vars") else layer.mask).numpy()
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append([int(layer.pruning_step.numpy()), float(np.mean(mask() == 0))])

    x = np.random.default_rng(0).standard_normal((102, 16)).astype("float32")
    model.fit(x, x[:, :8], batch_size=1, verbose=0, callbacks=[P.UpdatePruningStep(), Record()])
    return seen
"""


def test_schedules_match_tfmot_and_tfmot_schedules_are_accepted():
    ours = []
    for name, config in SCHEDULES:
        schedule = getattr(pruning, name)(**config)
        values = [schedule(tf.constant(s, tf.int64)) for s in STEPS]
        ours.append([[bool(p), float(v)] for p, v in values])
    proc = run_python(
        f"""
import json
import numpy as np, keras, tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras
from tf_sparseconv.python import pruning
out = []
for name, config in {SCHEDULES!r}:
    schedule = getattr(tfmot.sparsity.keras, name)(**config)
    out.append([[bool(p), float(v)] for p, v in
                (schedule(tf.constant(s, tf.int64)) for s in {STEPS!r})])
{RECORD_STEPS}
steps = {{name: record_steps(tfmot.sparsity.keras, tf_keras, case) for name, case in {STEP_CASES!r}.items()}}
print("STEPS" + json.dumps(steps))
# tfmot's own schedule objects drive our wrapper as they are, and serialise as ours.
keras.utils.set_random_seed(0)
layer = keras.layers.Dense(8)
sched = tfmot.sparsity.keras.ConstantSparsity(0.75, 0, frequency=1)
model = keras.Sequential([keras.Input((16,)), pruning.prune_low_magnitude(layer, sched)])
model.compile("sgd", "mse")
model.fit(np.ones((8, 16), "float32"), np.zeros((8, 8), "float32"), batch_size=4, verbose=0,
          callbacks=[pruning.UpdatePruningStep()])
wrapper = model.layers[0]
assert wrapper.pruning_schedule is sched
assert float(np.mean(wrapper.mask.numpy() == 0)) == 0.75, wrapper.mask.numpy()
clone = pruning.PruneLowMagnitude.from_config(wrapper.get_config())
assert clone.pruning_schedule == pruning.ConstantSparsity(0.75, 0, frequency=1), clone.pruning_schedule
print("RESULT" + json.dumps(out))
"""
    )
    theirs = json.loads(proc.stdout.split("RESULT")[-1])
    for (name, config), a, b in zip(SCHEDULES, ours, theirs):
        assert [p for p, _ in a] == [p for p, _ in b], (name, config)
        np.testing.assert_allclose([v for _, v in a], [v for _, v in b], rtol=1e-6, atol=1e-7)

    # tfmot's step semantics: the same step numbers, and each mask first changes (and then
    # changes) at the same batch; ours prunes ceil(s * size) weights, tfmot round(s * size).
    their_steps = json.loads(proc.stdout.split("STEPS")[-1].split("RESULT")[0])
    scope = {"np": np}
    exec(RECORD_STEPS, scope)
    for name, case in STEP_CASES.items():
        our_steps = scope["record_steps"](pruning, keras, case)
        assert [s for s, _ in our_steps] == [s for s, _ in their_steps[name]] == list(range(1, 103)), name
        for (step, a), (_, b) in zip(our_steps, their_steps[name]):
            assert abs(a - b) <= 1 / 128 + 1e-9 and (a == 0) == (b == 0), (name, step, a, b)


def test_importing_pruning_does_not_import_tfmot():
    run_python(
        """
import sys
import tf_sparseconv
from tf_sparseconv.python import pruning
pruning.prune_low_magnitude(tf_sparseconv.layers.ChannelSparseConv2D(4, 3, fan_in=2))
bad = [m for m in sys.modules if m.startswith(("tensorflow_model_optimization", "tf_keras"))]
assert not bad, bad
"""
    )


def test_numpy_integers_and_tfmot_arguments():
    # tfmot's pruning example: end_step = np.ceil(num_images / batch_size).astype(np.int32) * epochs
    end_step = np.ceil(54000 / 128).astype(np.int32) * 2
    schedule = pruning.PolynomialDecay(np.float32(0.5), 0.8, np.int64(0), end_step, frequency=np.int16(50))
    assert schedule.end_step == 844 and type(schedule.end_step) is int and type(schedule.frequency) is int
    assert pruning.ConstantSparsity(0.5, np.array(3)).begin_step == 3
    wrapper = pruning.prune_low_magnitude(
        keras.layers.Dense(8), schedule, block_shape=(np.int64(2), 4), channel_group=np.int32(2)
    )
    assert wrapper.block_shape == (2, 4) and type(wrapper.channel_group) is int
    # block_size= is granularity="block"; sparsity_m_by_n= is "m_by_n", its mask set once at step 1.
    wrapper = pruning.prune_low_magnitude(keras.layers.Dense(8), block_size=[1, 16], block_pooling_type="MAX")
    assert (wrapper.granularity, wrapper.block_shape, wrapper.block_pooling_type) == ("block", (1, 16), "MAX")
    assert pruning.prune_low_magnitude(keras.layers.Dense(8), block_size=(1, 1)).granularity == "weight"
    wrapper = pruning.prune_low_magnitude(keras.layers.Dense(8), sparsity_m_by_n=(2, 4))
    assert (wrapper.granularity, wrapper.m_by_n) == ("m_by_n", (2, 4))
    assert wrapper.pruning_schedule == pruning.ConstantSparsity(0.5, 1, end_step=1)
    # a list of layers gives a list of wrappers (tfmot)
    layers = pruning.prune_low_magnitude([keras.layers.Dense(4), keras.layers.Conv2D(4, 3)])
    assert [type(layer) for layer in layers] == [pruning.PruneLowMagnitude] * 2
    # block_pooling_type="MAX": the blocks with the largest |w| survive
    kernel = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    mask = pruning.compute_mask(kernel, 0.5, "block", block_shape=(4, 4), block_pooling="MAX")
    block_max = np.abs(kernel).reshape(2, 4, 2, 4).max(axis=(1, 3))
    keep = mask.reshape(2, 4, 2, 4)[:, 0, :, 0] == 1
    assert keep.sum() == 2 and block_max[keep].min() > block_max[~keep].max()


def test_training_without_update_pruning_step_raises(rng):
    x, y = data(rng, 16)
    model = pruning.prune_low_magnitude(conv_model(), pruning.ConstantSparsity(0.5, 0, frequency=1))
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(RuntimeError, match="UpdatePruningStep"):
        model.fit(x, y, batch_size=8, verbose=0)
    with pytest.raises(RuntimeError, match="UpdatePruningStep"):  # an eager custom loop
        model(x[:2], training=True)
    model(x[:2])  # inference needs no callback
    fit(model, x, y, epochs=1)  # with the callback, the same model trains (a new train function)
    for wrapper in pruning.collect_pruned_layers(model):
        assert int(wrapper.pruning_step.numpy()) == 2 and wrapper.sparsity() == pytest.approx(0.5, abs=0.05)


def test_schedule_values_and_config():
    schedule = pruning.PolynomialDecay(0.0, 0.8, 0, 10, frequency=5)
    prune, sparsity = schedule(10)
    assert bool(prune) and float(sparsity) == pytest.approx(0.8)
    assert not bool(schedule(3)[0]) and not bool(schedule(11)[0])
    assert float(schedule(0)[1]) == 0.0
    constant = pruning.ConstantSparsity(0.5, 0)
    assert constant.end_step == -1 and constant.frequency == 100 and bool(constant(10**6)[0])
    for s in (schedule, constant):
        assert type(s).from_config(s.get_config()) == s
        assert keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(s)) == s


# ---------------------------------------------------------------------------------------------
# masks


def test_compute_mask_structures(rng):
    kernel = rng.standard_normal((3, 3, 10, 12)).astype(np.float32)
    # m_by_n: at least 2 zeros in every 4 consecutive input channels (the tail group of 2: 1 zero).
    mask = pruning.compute_mask(kernel, 0.5, "m_by_n", m_by_n=(2, 4))
    groups = mask[:, :, :8].reshape(3, 3, 2, 4, 12)
    assert (groups.sum(axis=3) <= 2).all()
    assert 0.5 <= np.mean(mask == 0) <= 0.55
    # kernel: whole 3x3 kernels of (in, out) pairs.
    mask = pruning.compute_mask(kernel, 0.6, "kernel")
    assert (mask == mask[:1, :1]).all() and 0.6 <= np.mean(mask == 0) <= 0.65
    # block: 4x4 blocks over the last two axes (partial blocks at the edges).
    mask = pruning.compute_mask(kernel, 0.4, "block", block_shape=(4, 4))
    padded = np.pad(mask, ((0, 0), (0, 0), (0, 2), (0, 0)), constant_values=-1)
    blocks = padded.reshape(3, 3, 3, 4, 3, 4).transpose(0, 1, 2, 4, 3, 5).reshape(3, 3, 3, 3, 16)
    for block in blocks.reshape(-1, 16):
        assert len(set(block[block >= 0].tolist())) == 1
    assert 0.4 <= np.mean(mask == 0) <= 0.45
    # weight: exactly ceil(s * size) zeros, the smallest magnitudes.
    mask = pruning.compute_mask(kernel, 0.3, "weight")
    assert (mask == 0).sum() == int(np.ceil(0.3 * kernel.size))
    assert np.abs(kernel[mask == 0]).max() <= np.abs(kernel[mask == 1]).min()


@pytest.mark.parametrize(
    ("granularity", "final"), [("weight", 0.6), ("kernel", 0.6), ("block", 0.4), ("m_by_n", 0.5)]
)
def test_fit_reaches_final_sparsity(rng, granularity, final):
    x, y = data(rng)
    model = pruning.prune_low_magnitude(
        conv_model(),
        pruning.PolynomialDecay(0.0, final, 0, 10, frequency=2),
        granularity=granularity,
    )
    fit(model, x, y, epochs=2)  # steps 1-16 (tfmot's numbering); the last pruning step is 10
    wrappers = pruning.collect_pruned_layers(model)
    assert len(wrappers) == 3
    for wrapper in wrappers:
        assert int(wrapper.pruning_step.numpy()) == 16
        assert final <= zero_fraction(wrapper) <= final + 0.05, (wrapper.name, zero_fraction(wrapper))
        bias = wrapper.layer.bias.numpy()
        assert np.all(bias != 0)  # biases are trained, never pruned
        mask = wrapper.mask.numpy()
        if granularity == "kernel" and mask.ndim == 4:
            assert (mask == mask[:1, :1]).all()
        if granularity == "m_by_n":
            cin = mask.shape[-2] - mask.shape[-2] % 4
            groups = np.moveaxis(mask, -2, -1)[..., :cin].reshape(-1, 4)
            assert (groups.sum(axis=1) <= 2).all()


def test_gradient_flows_only_where_mask_is_one(rng):
    layer = keras.layers.Dense(6)
    wrapper = pruning.prune_low_magnitude(layer)
    x = tf.constant(rng.standard_normal((5, 10)).astype(np.float32))
    wrapper(x)
    wrapper.update_mask(0.5)
    mask = wrapper.mask.numpy()
    assert np.mean(mask == 0) == 0.5
    with tf.GradientTape() as tape:
        out = wrapper(x)
        loss = tf.reduce_sum(out**2)
    grad = tape.gradient(loss, layer.kernel)
    assert np.all(grad.numpy()[mask == 0] == 0) and np.all(grad.numpy()[mask == 1] != 0)
    expected = x.numpy() @ (layer.kernel.numpy() * mask) + layer.bias.numpy()
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert isinstance(layer.kernel, keras.Variable)  # the swap is undone


# ---------------------------------------------------------------------------------------------
# the wrapper on every prunable layer type


def _models(rng):
    """(model, number of prunable layers, inputs) for every prunable layer type."""

    def functional(shape, *layers):
        inputs = keras.Input(shape)
        h = inputs
        for layer in layers:
            h = layer(h)
        return keras.Model(inputs, keras.layers.Flatten()(h))

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    inputs, mask = keras.Input((8, 8, 4)), keras.Input((8, 8))
    h = keras.layers.Conv2D(8, 3, padding="same")(inputs)
    h = tsc.layers.BlockSparseConv2D(8, 3, block_size=4)([h, mask])
    block = keras.Model([inputs, mask], keras.layers.Flatten()(h))
    sparse_in = keras.Input((8, 8, 4))
    h = tsc.layers.SparseConv2D(6, 3)(tsc.layers.Sparsify()(sparse_in))
    sparse = keras.Model(sparse_in, keras.layers.Flatten()(tsc.layers.Densify((8, 8))(h)))
    return [
        (
            functional(
                (8, 8, 4),
                keras.layers.Conv2D(8, 3, padding="same"),
                keras.layers.DepthwiseConv2D(3, depth_multiplier=2),
                tsc.layers.ChannelSparseConv2D(8, 3, fan_in=4),
                keras.layers.Dense(5),
            ),
            4,
            normal(3, 8, 8, 4),
        ),
        (
            functional(
                (12, 6),
                keras.layers.Conv1D(8, 3),
                keras.layers.DepthwiseConv1D(3),
                tsc.layers.ChannelSparseConv1D(8, 3, fan_in=2),
            ),
            3,
            normal(3, 12, 6),
        ),
        (functional((6, 6, 6, 2), keras.layers.Conv3D(4, 3)), 1, normal(3, 6, 6, 6, 2)),
        (block, 2, [normal(3, 8, 8, 4), (normal(3, 8, 8) > 1).astype(np.float32)]),
        (sparse, 1, normal(3, 8, 8, 4) * (rng.random((3, 8, 8, 1)) < 0.3)),
    ]


@pytest.mark.parametrize("index", range(5))
def test_every_prunable_layer_is_wrapped_and_masked(rng, index):
    model, expected, x = _models(rng)[index]
    before = model.predict(x, verbose=0)
    pruned = pruning.prune_low_magnitude(model, pruning.ConstantSparsity(0.5, 0))
    wrappers = pruning.collect_pruned_layers(pruned)
    assert len(wrappers) == expected
    np.testing.assert_allclose(pruned.predict(x, verbose=0), before, rtol=1e-5, atol=1e-5)
    original = {layer.name: layer for layer in model.layers}
    for wrapper in wrappers:
        wrapper.update_mask(0.5)
        target = original[wrapper.layer.name]
        target.kernel.assign(target.kernel.numpy() * wrapper.mask.numpy())
    np.testing.assert_allclose(
        pruned.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5
    )


def test_wrapped_layer_in_functional_model_config_and_keras_round_trip(rng, tmp_path):
    x, y = data(rng, 32)
    layer = pruning.prune_low_magnitude(
        keras.layers.Conv2D(8, 3, activation="relu"),
        pruning.PolynomialDecay(0.1, 0.7, 2, 20, frequency=3),
        granularity="block",
        block_shape=(2, 4),
    )
    config = layer.get_config()
    clone = pruning.PruneLowMagnitude.from_config(config)
    assert clone.get_config() == config and clone.block_shape == (2, 4)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, pruning.PruneLowMagnitude) and restored.granularity == "block"
    inputs = keras.Input((8, 8, 8))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(layer(inputs))))
    fit(model, x, y, epochs=1)
    assert int(layer.pruning_step.numpy()) == 4 and layer.sparsity() > 0
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# resuming mid-schedule


def test_checkpoint_restore_resumes_exactly(rng, tmp_path):
    x, y = data(rng)
    schedule = pruning.PolynomialDecay(0.0, 0.7, 0, 20, frequency=3)

    def make(seed):
        model = pruning.prune_low_magnitude(conv_model(seed), schedule, granularity="kernel")
        model.compile(
            keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
        return model

    a = fit(make(0), x, y, epochs=1)
    path = tf.train.Checkpoint(model=a).save(os.path.join(tmp_path, "ckpt"))
    b = make(1)
    tf.train.Checkpoint(model=b).restore(path).assert_existing_objects_matched()
    assert len(masks_of(a)) == len(masks_of(b)) == 3
    for (mask_a, step_a), (mask_b, step_b) in zip(masks_of(a), masks_of(b)):
        assert step_a == step_b == 8
        np.testing.assert_array_equal(mask_a, mask_b)
    assert_same_weights(a, b, rtol=0, atol=0)
    fit(a, x, y, epochs=2)
    fit(b, x, y, epochs=2)
    assert_same_weights(a, b, rtol=1e-6, atol=1e-7)
    assert all(step == 24 for _, step in masks_of(b))


def test_keras_round_trip_mid_schedule(rng, tmp_path):
    x, y = data(rng)
    model = pruning.prune_low_magnitude(
        conv_model(), pruning.PolynomialDecay(0.0, 0.6, 0, 20, frequency=4), granularity="m_by_n"
    )
    fit(model, x, y, epochs=1)
    path = os.path.join(tmp_path, "pruned.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert all(isinstance(w, pruning.PruneLowMagnitude) for w in pruning.collect_pruned_layers(loaded))
    for (mask_a, step_a), (mask_b, step_b) in zip(masks_of(model), masks_of(loaded)):
        assert step_a == step_b == 8
        np.testing.assert_array_equal(mask_a, mask_b)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)
    fit(model, x, y, epochs=2)
    fit(loaded, x, y, epochs=2)
    assert_same_weights(model, loaded, rtol=1e-5, atol=1e-6)
    for wrapper in pruning.collect_pruned_layers(loaded):
        assert 0.6 <= zero_fraction(wrapper) <= 0.65


# ---------------------------------------------------------------------------------------------
# models: nested, untouched originals


def test_nested_model_and_original_untouched(rng):
    x, y = data(rng)
    keras.utils.set_random_seed(3)
    inner = keras.Sequential(
        [keras.Input((8, 8, 8)), keras.layers.Conv2D(8, 3, activation="relu")], name="inner"
    )
    inputs = keras.Input((8, 8, 8))
    outputs = keras.layers.Dense(3)(keras.layers.Flatten()(inner(inputs)))
    model = keras.Model(inputs, outputs)
    weights = [w.numpy().copy() for w in model.weights]
    before = model.predict(x, verbose=0)
    pruned = pruning.prune_low_magnitude(model, pruning.ConstantSparsity(0.5, 0, frequency=4))
    assert pruned is not model
    assert isinstance(pruned.layers[1], keras.Sequential)
    assert isinstance(pruned.layers[1].layers[0], pruning.PruneLowMagnitude)
    assert isinstance(pruned.layers[-1], pruning.PruneLowMagnitude)
    np.testing.assert_allclose(pruned.predict(x, verbose=0), before, rtol=1e-6)
    fit(pruned, x, y, epochs=1)
    assert len(pruning.collect_pruned_layers(pruned)) == 2
    for wrapper in pruning.collect_pruned_layers(pruned):
        assert 0.5 <= zero_fraction(wrapper) <= 0.55
    # the original model is untouched: same layer types, same weights
    assert type(model.layers[-1]) is keras.layers.Dense and type(inner.layers[0]) is keras.layers.Conv2D
    for w, saved in zip(model.weights, weights):
        np.testing.assert_array_equal(w.numpy(), saved)
    stripped = pruning.strip_pruning(pruned)
    assert type(stripped.layers[1].layers[0]) is keras.layers.Conv2D
    np.testing.assert_allclose(stripped.predict(x, verbose=0), pruned.predict(x, verbose=0), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# strip_pruning


def test_strip_pruning_plain_and_to_sparse_layers(rng):
    x, y = data(rng)
    keras.utils.set_random_seed(5)
    model_2d = keras.Sequential(
        [
            keras.Input((8, 8, 8)),
            keras.layers.Conv2D(12, 3, padding="same", dilation_rate=2, activation="relu"),
            keras.layers.Conv2D(16, 3, strides=2, padding="valid", use_bias=False),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )
    x1 = rng.standard_normal((64, 10, 6)).astype(np.float32)
    inputs = keras.Input((10, 6))
    h = keras.layers.Conv1D(8, 3, strides=2, padding="same", activation="tanh")(inputs)
    model_1d = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(h)))
    for model, xs, strict in ((model_2d, x, True), (model_1d, x1, False)):
        pruned = pruning.prune_low_magnitude(model, pruning.ConstantSparsity(0.6, 0, frequency=4), "kernel")
        fit(pruned, xs, y, epochs=1)
        expected = pruned.predict(xs, verbose=0)
        plain = pruning.strip_pruning(pruned)
        assert [type(layer) for layer in plain.layers] == [type(layer) for layer in model.layers]
        np.testing.assert_allclose(plain.predict(xs, verbose=0), expected, rtol=1e-5, atol=1e-6)
        sparse = pruning.strip_pruning(pruned, to_sparse_layers=True)
        np.testing.assert_allclose(sparse.predict(xs, verbose=0), expected, rtol=1e-4, atol=1e-5)
        convs = [
            layer for layer in model.layers if isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D))
        ]
        sparse_convs = [
            layer
            for layer in sparse.layers
            if isinstance(layer, (tsc.layers.ChannelSparseConv2D, tsc.layers.ChannelSparseConv1D))
        ]
        assert len(sparse_convs) == len(convs)
        for conv, channel_sparse in zip(convs, sparse_convs):
            # m = the most surviving inputs of any output channel: fewer than Cin here for 2-D
            if strict:
                assert channel_sparse.fan_in_channels < conv.kernel.shape[-2]
            else:
                assert channel_sparse.fan_in_channels <= conv.kernel.shape[-2]
            assert channel_sparse.strides == conv.strides and channel_sparse.padding == conv.padding
            assert channel_sparse.dilation_rate == conv.dilation_rate
            assert channel_sparse.use_bias == conv.use_bias
            assert channel_sparse.kernel.shape[-2] == channel_sparse.fan_in_channels
        assert sparse.count_params() < plain.count_params() or not strict
        assert isinstance(sparse.layers[-1], keras.layers.Dense)


def test_strip_weight_pruned_conv_stays_dense_and_single_layer(rng):
    x, y = data(rng, 32)
    pruned = pruning.prune_low_magnitude(conv_model(), pruning.ConstantSparsity(0.5, 0, frequency=2))
    fit(pruned, x, y, epochs=1)
    sparse = pruning.strip_pruning(pruned, to_sparse_layers=True)
    # weight pruning at 50% leaves no whole (in, out) kernel zero: nothing to convert
    assert [type(layer) for layer in sparse.layers[1:3]] == [keras.layers.Conv2D] * 2
    np.testing.assert_allclose(sparse.predict(x, verbose=0), pruned.predict(x, verbose=0), rtol=1e-6)
    wrapper = pruning.collect_pruned_layers(pruned)[0]
    layer = pruning.strip_pruning(wrapper)
    assert type(layer) is keras.layers.Conv2D
    np.testing.assert_array_equal(layer.kernel.numpy(), wrapper.pruned_weight.numpy() * wrapper.mask.numpy())


# ---------------------------------------------------------------------------------------------
# callbacks, precision, arguments


def test_pruning_summaries_write_sparsity_scalars(rng, tmp_path):
    x, y = data(rng, 32)
    log_dir = os.path.join(tmp_path, "logs")
    model = pruning.prune_low_magnitude(conv_model(), pruning.ConstantSparsity(0.5, 0, frequency=1))
    fit(model, x, y, epochs=2, callbacks=[pruning.PruningSummaries(log_dir)])
    values = {}
    for path in glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                values.setdefault(value.tag, []).append(float(tf.make_ndarray(value.tensor)))
    tags = [t for t in values if "sparsity" in t and "target" not in t]
    assert len(tags) == 3, values.keys()
    for tag in tags:
        # at the begin (as tfmot) and end of each epoch, once per optimizer step: 0, 4, 8
        assert len(values[tag]) == 3 and values[tag][-1] == pytest.approx(0.5, abs=0.05)


def test_mixed_precision(rng):
    x, y = data(rng, 16)
    wrapper = pruning.prune_low_magnitude(
        keras.layers.Conv2D(8, 3, dtype="mixed_float16"), pruning.ConstantSparsity(0.5, 0, frequency=1)
    )
    assert wrapper(tf.constant(x[:2])).dtype == tf.float16
    model = keras.Sequential(
        [
            keras.Input((8, 8, 8)),
            wrapper,
            keras.layers.Flatten(),
            keras.layers.Dense(3, dtype="float32"),
        ]
    )
    fit(model, x, y, epochs=1)
    assert wrapper.pruned_weight.dtype == "float32" and wrapper.sparsity() == 0.5
    assert np.isfinite(model.predict(x, verbose=0)).all()


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(2)

    def call(self, x):
        return self.dense(x)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: pruning.prune_low_magnitude(keras.layers.Dense(2), granularity="channel"), "granularity"),
        (lambda: pruning.prune_low_magnitude(keras.layers.Dense(2), block_shape=(0, 4)), "block_shape"),
        (lambda: pruning.prune_low_magnitude(keras.layers.Dense(2), m_by_n=(4, 4)), "m_by_n"),
        (lambda: pruning.prune_low_magnitude(keras.layers.Dense(2), m_by_n=2), "m_by_n"),
        (
            lambda: pruning.prune_low_magnitude(keras.layers.Dense(2), pruning_schedule=0.5),
            "pruning_schedule",
        ),
        (lambda: pruning.prune_low_magnitude(keras.layers.Flatten()), "to_prune"),
        (lambda: pruning.prune_low_magnitude("dense"), "to_prune"),
        (lambda: pruning.prune_low_magnitude(_Subclassed()), "model"),
        (lambda: pruning.prune_low_magnitude(pruning.prune_low_magnitude(keras.layers.Dense(2))), "to_prune"),
        (lambda: pruning.prune_low_magnitude(keras.layers.Dense(2), channel_group=0), "channel_group"),
        (lambda: pruning.prune_low_magnitude(keras.layers.Dense(2), channel_group=2.0), "channel_group"),
        (lambda: pruning.prune_low_magnitude(keras.layers.Dense(2), block_size=(0, 4)), "block_size"),
        (
            lambda: pruning.prune_low_magnitude(
                keras.layers.Dense(2), granularity="kernel", block_size=(2, 2)
            ),
            "block_size",
        ),
        (
            lambda: pruning.prune_low_magnitude(keras.layers.Dense(2), sparsity_m_by_n=(4, 4)),
            "sparsity_m_by_n",
        ),
        (
            lambda: pruning.prune_low_magnitude(keras.layers.Dense(2), block_pooling_type="SUM"),
            "block_pooling",
        ),
        (lambda: pruning.ConstantSparsity(0.5, 2.5), "begin_step"),
        (lambda: pruning.ConstantSparsity(1.0, 0), "target_sparsity"),
        (lambda: pruning.ConstantSparsity(0.5, -1), "begin_step"),
        (lambda: pruning.ConstantSparsity(0.5, 10, end_step=5), "end_step"),
        (lambda: pruning.ConstantSparsity(0.5, 0, frequency=0), "frequency"),
        (lambda: pruning.PolynomialDecay(0.0, 0.5, 10, 10), "end_step"),
        (lambda: pruning.PolynomialDecay(-0.1, 0.5, 0, 10), "initial_sparsity"),
        (lambda: pruning.PolynomialDecay(0.0, 1.5, 0, 10), "final_sparsity"),
        (lambda: pruning.PruningSummaries(None), "log_dir"),
        (lambda: pruning.strip_pruning(conv_model(), to_sparse_layers="yes"), "to_sparse_layers"),
        (lambda: pruning.strip_pruning(_Subclassed()), "model"),
    ],
)
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_kernel_granularity_is_balanced_over_output_channels():
    """Every output channel keeps the same number of input kernels (the channel-sparse fan-in)."""
    rng = np.random.default_rng(3)
    kernel = rng.standard_normal((3, 3, 32, 16)) * rng.random((1, 1, 32, 16)) ** 3  # skewed pairs
    mask = pruning.compute_mask(kernel, 0.75, "kernel")
    alive = mask.any(axis=(0, 1))  # [Cin, Cout]
    np.testing.assert_array_equal(alive.sum(axis=0), np.full(16, 8))
    assert np.isclose(1 - mask.mean(), 0.75)
    # Transposed layout [k, k, out, in]: balanced over the output axis (-2) instead.
    mask_t = pruning.compute_mask(np.swapaxes(kernel, -1, -2), 0.75, "kernel", in_axis=-1)
    np.testing.assert_array_equal(np.swapaxes(mask_t, -1, -2), mask)


def test_kernel_granularity_channel_group_shares_inputs_within_groups():
    """channel_group=g: each group of g consecutive output channels keeps one input set, chosen by
    the group's mean kernel magnitude; the target is still met (the last group may be smaller)."""
    rng = np.random.default_rng(4)
    kernel = rng.standard_normal((3, 3, 24, 14)) * rng.random((1, 1, 24, 14)) ** 3
    mask = pruning.compute_mask(kernel, 0.75, "kernel", channel_group=4)
    alive = mask.any(axis=(0, 1))  # [Cin, Cout]
    assert (mask == mask[:1, :1]).all()
    for start in range(0, 14, 4):
        group = alive[:, start : start + 4]
        assert (group == group[:, :1]).all()
        # The kept inputs are the group's strongest (mean |w| over its channels and taps).
        score = np.abs(kernel[..., start : start + 4]).mean(axis=(0, 1, 3))
        assert score[group[:, 0]].min() >= score[~group[:, 0]].max()
    assert 0.75 <= 1 - mask.mean() <= 0.75 + 4 / 24 / 14 + 1e-9
    np.testing.assert_array_equal(alive.sum(axis=0), np.full(14, 6))
    # channel_group=1 is the per-channel mask.
    np.testing.assert_array_equal(
        pruning.compute_mask(kernel, 0.75, "kernel", channel_group=1),
        pruning.compute_mask(kernel, 0.75, "kernel"),
    )


def test_channel_group_strips_to_identical_connection_rows(rng, tmp_path):
    x, y = data(rng)
    keras.utils.set_random_seed(6)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 8)),
            keras.layers.Conv2D(12, 3, padding="same", activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )
    pruned = pruning.prune_low_magnitude(
        model, pruning.ConstantSparsity(0.75, 0, frequency=2), "kernel", channel_group=4
    )
    assert all(
        layer.channel_group == 4 for layer in pruned.layers if isinstance(layer, pruning.PruneLowMagnitude)
    )
    fit(pruned, x, y, epochs=1)
    path = str(tmp_path / "grouped.keras")
    pruned.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.layers[0].channel_group == 4
    expected = pruned.predict(x, verbose=0)
    sparse = pruning.strip_pruning(pruned, to_sparse_layers=True)
    conv = sparse.layers[0]
    assert isinstance(conv, tsc.layers.ChannelSparseConv2D) and conv.fan_in_channels == 2
    rows = np.asarray(conv.connections).reshape(3, 4, -1)
    assert (rows == rows[:, :1]).all()
    np.testing.assert_allclose(sparse.predict(x, verbose=0), expected, rtol=1e-4, atol=1e-5)


def test_wrapper_built_during_the_first_training_step_is_stepped():
    """A model without an Input builds its wrappers while fit traces the first step, after
    UpdatePruningStep stepped the built ones: that batch is step 1 there too (no false
    missing-callback error), and pruning proceeds."""
    rng = np.random.default_rng(0)
    x, y = rng.random((64, 10)).astype("float32"), rng.random((64, 4)).astype("float32")
    schedule = tsc.pruning.ConstantSparsity(0.5, 0, frequency=1)
    model = keras.Sequential([tsc.pruning.prune_low_magnitude(keras.layers.Dense(4), schedule)])
    model.compile("sgd", "mse")
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[tsc.pruning.UpdatePruningStep()])
    wrapper = model.layers[0]
    assert int(wrapper.pruning_step.numpy()) == 8
    assert float(np.mean(wrapper.mask.numpy() == 0)) == 0.5
