"""tensorflow-model-optimization's guides, run with only the module swapped.

The code of tfmot's pruning comprehensive guide, its QAT comprehensive guide, its
end-to-end pruning example and its 2:4 sparsity example, with
`tfmot.sparsity.keras` -> `tsc.pruning` and `tfmot.quantization.keras` ->
`tsc.quantization`. The other edits are Keras 3's, not this package's:
`tf.keras` -> `keras`; weight files end in `.weights.h5` (Keras 3 refuses the
guides' `.tf`); notebook magics (`%tensorboard`, plots) are dropped; small data
(the guides' random arrays, sklearn's 8x8 digits instead of MNIST) and one epoch
where a guide trains longer. Not supported, and checked to fail clearly: tfmot's
`QuantizeConfig` / custom quantisers ("Experiment with quantization") and
`pruning_policy`.

tests/test_pruning.py compares the step semantics (when a mask first changes) with
tfmot itself.
"""

from __future__ import annotations

import glob
import os
import tempfile
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_sparseconv as tsc

# Keras 3 warns about the guides' `input_shape=` arguments, and the 2:4 example's softmax output
# goes to a from_logits loss (as in the example).
pytestmark = [
    pytest.mark.filterwarnings("ignore:Do not pass an `input_shape`"),
    pytest.mark.filterwarnings("ignore:Argument `input_shape` is deprecated"),
    pytest.mark.filterwarnings("ignore:.*received `from_logits=True`"),
]

# ---------------------------------------------------------------------------------------------
# the guides' setup (shared by the pruning and the QAT guide)

input_shape = [20]
x_train = np.random.default_rng(0).standard_normal((1, 20)).astype(np.float32)
y_train = keras.utils.to_categorical(np.random.default_rng(1).standard_normal(1), num_classes=20)


def setup_model():
    model = keras.Sequential([keras.layers.Dense(20, input_shape=input_shape), keras.layers.Flatten()])
    return model


@pytest.fixture(scope="module")
def pretrained_weights(tmp_path_factory):
    model = setup_model()
    model.compile(loss=keras.losses.categorical_crossentropy, optimizer="adam", metrics=["accuracy"])
    model.fit(x_train, y_train, verbose=0)
    pretrained_weights = str(tmp_path_factory.mktemp("pretrained") / "model.weights.h5")  # guide: '.tf'
    model.save_weights(pretrained_weights)
    return pretrained_weights


def get_gzipped_model_size(model):
    # Returns size of gzipped model, in bytes.
    _, keras_file = tempfile.mkstemp(".h5")
    model.save(keras_file, include_optimizer=False)
    _, zipped_file = tempfile.mkstemp(".zip")
    with zipfile.ZipFile(zipped_file, "w", compression=zipfile.ZIP_DEFLATED) as f:
        f.write(keras_file)
    return os.path.getsize(zipped_file)


def scalar_tags(log_dir) -> dict[str, list[float]]:
    """{tag: values} of the TensorBoard event files under `log_dir`."""
    values: dict[str, list[float]] = {}
    for path in glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                values.setdefault(value.tag, []).append(float(tf.make_ndarray(value.tensor)))
    return values


def wrappers(model, cls):
    return [layer for layer in model.layers if isinstance(layer, cls)]


# ---------------------------------------------------------------------------------------------
# pruning comprehensive guide: define the model


def test_prune_whole_model(pretrained_weights):
    base_model = setup_model()
    base_model.load_weights(pretrained_weights)  # optional but recommended.

    model_for_pruning = tsc.pruning.prune_low_magnitude(base_model)

    model_for_pruning.summary()
    assert len(wrappers(model_for_pruning, tsc.pruning.PruneLowMagnitude)) == 1
    np.testing.assert_allclose(model_for_pruning(x_train), base_model(x_train), rtol=1e-6)


def test_prune_some_layers_with_clone_function(pretrained_weights):
    # Create a base model
    base_model = setup_model()
    base_model.load_weights(pretrained_weights)  # optional but recommended for model accuracy

    # Helper function uses `prune_low_magnitude` to make only the
    # Dense layers train with pruning.
    def apply_pruning_to_dense(layer):
        if isinstance(layer, keras.layers.Dense):
            return tsc.pruning.prune_low_magnitude(layer)
        return layer

    # Use `keras.models.clone_model` to apply `apply_pruning_to_dense`
    # to the layers of the model.
    model_for_pruning = keras.models.clone_model(
        base_model,
        clone_function=apply_pruning_to_dense,
    )

    model_for_pruning.summary()
    print(base_model.layers[0].name)
    assert [type(layer) for layer in model_for_pruning.layers] == [
        tsc.pruning.PruneLowMagnitude,
        keras.layers.Flatten,
    ]
    np.testing.assert_allclose(model_for_pruning(x_train), base_model(x_train), rtol=1e-6)


def test_prune_layers_while_defining_the_model():
    # Functional example: use `prune_low_magnitude` to make the `Dense` layer train with pruning.
    i = keras.Input(shape=(20,))
    x = tsc.pruning.prune_low_magnitude(keras.layers.Dense(10))(i)
    o = keras.layers.Flatten()(x)
    model_for_pruning = keras.Model(inputs=i, outputs=o)

    model_for_pruning.summary()
    assert model_for_pruning.output_shape == (None, 10)

    # Sequential example: the `input_shape=` of the wrapped layer builds the model.
    model_for_pruning = keras.Sequential(
        [
            tsc.pruning.prune_low_magnitude(keras.layers.Dense(20, input_shape=input_shape)),
            keras.layers.Flatten(),
        ]
    )

    model_for_pruning.summary()
    assert model_for_pruning.built and model_for_pruning.input_shape == (None, 20)


def test_prune_custom_layer_with_prunable_layer():
    class MyDenseLayer(keras.layers.Dense, tsc.pruning.PrunableLayer):
        def get_prunable_weights(self):
            # Prune bias also, though that usually harms model accuracy too much.
            return [self.kernel, self.bias]

    # Use `prune_low_magnitude` to make the `MyDenseLayer` layer train with pruning.
    model_for_pruning = keras.Sequential(
        [
            tsc.pruning.prune_low_magnitude(MyDenseLayer(20, input_shape=input_shape)),
            keras.layers.Flatten(),
        ]
    )

    model_for_pruning.summary()
    wrapper = model_for_pruning.layers[0]
    assert wrapper.pruned_attributes == ["_kernel", "bias"] and len(wrapper.masks) == 2
    # Beyond the guide: both named weights are pruned, the bias with its own mask.
    wrapper.layer.bias.assign(np.arange(1.0, 21.0, dtype=np.float32))
    wrapper.update_mask(0.5)
    for weight in wrapper.pruned_weights:
        assert np.mean(weight.numpy() == 0) == 0.5


# ---------------------------------------------------------------------------------------------
# pruning comprehensive guide: train the model


def test_model_fit_with_callbacks(pretrained_weights):
    # Define the model.
    base_model = setup_model()
    base_model.load_weights(pretrained_weights)  # optional but recommended for model accuracy
    model_for_pruning = tsc.pruning.prune_low_magnitude(base_model)

    log_dir = tempfile.mkdtemp()
    callbacks = [
        tsc.pruning.UpdatePruningStep(),
        # Log sparsity and other metrics in Tensorboard.
        tsc.pruning.PruningSummaries(log_dir=log_dir),
    ]

    model_for_pruning.compile(
        loss=keras.losses.categorical_crossentropy, optimizer="adam", metrics=["accuracy"]
    )

    model_for_pruning.fit(x_train, y_train, callbacks=callbacks, epochs=2, verbose=0)

    assert int(model_for_pruning.layers[0].pruning_step.numpy()) == 2  # tfmot: steps 1, 2
    assert any(tag.endswith("/sparsity") for tag in scalar_tags(log_dir))


@pytest.mark.parametrize("schedule", ["guide", "every_step"])
def test_custom_training_loop(pretrained_weights, schedule):
    # Define the model.
    base_model = setup_model()
    base_model.load_weights(pretrained_weights)  # optional but recommended for model accuracy
    if schedule == "guide":
        model_for_pruning = tsc.pruning.prune_low_magnitude(base_model)
    else:  # beyond the guide: a schedule that prunes within the loop's two steps
        model_for_pruning = tsc.pruning.prune_low_magnitude(
            base_model, pruning_schedule=tsc.pruning.ConstantSparsity(0.5, 0, frequency=1)
        )

    # Boilerplate
    loss = keras.losses.categorical_crossentropy
    optimizer = keras.optimizers.Adam()
    log_dir = tempfile.mkdtemp()
    unused_arg = -1
    epochs = 2
    batches = 1  # example is hardcoded so that the number of batches cannot change.

    # Non-boilerplate.
    model_for_pruning.optimizer = optimizer
    step_callback = tsc.pruning.UpdatePruningStep()
    step_callback.set_model(model_for_pruning)
    log_callback = tsc.pruning.PruningSummaries(
        log_dir=log_dir
    )  # Log sparsity and other metrics in Tensorboard.
    log_callback.set_model(model_for_pruning)

    step_callback.on_train_begin()  # run pruning callback
    for _ in range(epochs):
        log_callback.on_epoch_begin(epoch=unused_arg)  # run pruning callback
        for _ in range(batches):
            step_callback.on_train_batch_begin(batch=unused_arg)  # run pruning callback

            with tf.GradientTape() as tape:
                logits = model_for_pruning(x_train, training=True)
                loss_value = loss(y_train, logits)
                grads = tape.gradient(loss_value, model_for_pruning.trainable_variables)
                optimizer.apply_gradients(zip(grads, model_for_pruning.trainable_variables))

        step_callback.on_epoch_end(batch=unused_arg)  # run pruning callback

    wrapper = model_for_pruning.layers[0]
    assert int(wrapper.pruning_step.numpy()) == 2
    expected = 0.0 if schedule == "guide" else 0.5  # the default schedule prunes at step 100
    assert np.mean(wrapper.pruned_weight.numpy() == 0) == expected
    sparsity = [v for tag, v in scalar_tags(log_dir).items() if tag.endswith("/sparsity")]
    assert len(sparsity) == 1 and len(sparsity[0]) == epochs  # one point per epoch begin


# ---------------------------------------------------------------------------------------------
# pruning comprehensive guide: checkpoint, deserialize, deploy


def test_checkpoint_and_deserialize(pretrained_weights):
    # Define the model.
    base_model = setup_model()
    base_model.load_weights(pretrained_weights)  # optional but recommended for model accuracy
    model_for_pruning = tsc.pruning.prune_low_magnitude(base_model)

    _, keras_model_file = tempfile.mkstemp(".h5")

    # Checkpoint: saving the optimizer is necessary (include_optimizer=True is the default).
    model_for_pruning.save(keras_model_file, include_optimizer=True)

    # Deserialize model.
    with tsc.pruning.prune_scope():
        loaded_model = keras.models.load_model(keras_model_file)

    loaded_model.summary()
    assert isinstance(loaded_model.layers[0], tsc.pruning.PruneLowMagnitude)
    np.testing.assert_allclose(loaded_model(x_train), model_for_pruning(x_train), rtol=1e-6)


def test_export_with_size_compression(pretrained_weights):
    # Define the model.
    base_model = setup_model()
    base_model.load_weights(pretrained_weights)  # optional but recommended for model accuracy
    model_for_pruning = tsc.pruning.prune_low_magnitude(base_model)

    # Typically you train the model here.

    model_for_export = tsc.pruning.strip_pruning(model_for_pruning)

    print("final model")
    model_for_export.summary()

    print("\n")
    size = get_gzipped_model_size(model_for_pruning)
    print(f"Size of gzipped pruned model without stripping: {size:.2f} bytes")
    print(
        f"Size of gzipped pruned model with stripping: {get_gzipped_model_size(model_for_export):.2f} bytes"
    )
    assert [type(layer) for layer in model_for_export.layers] == [keras.layers.Dense, keras.layers.Flatten]


def test_block_sparsity(rng):
    base_model = setup_model()

    # For using intrinsics on a CPU with 128-bit registers, together with 8-bit
    # quantized weights, a 1x16 block size is nice because the block perfectly
    # fits into the register.
    pruning_params = {"block_size": [1, 16]}
    model_for_pruning = tsc.pruning.prune_low_magnitude(base_model, **pruning_params)

    model_for_pruning.summary()
    wrapper = model_for_pruning.layers[0]
    assert wrapper.granularity == "block" and wrapper.block_shape == (1, 16)
    wrapper.update_mask(0.5)  # beyond the guide: the mask is made of 1x16 blocks
    mask = wrapper.mask.numpy()
    assert (mask[:, :16] == mask[:, :1]).all() and (mask[:, 16:] == mask[:, 16:17]).all()


# ---------------------------------------------------------------------------------------------
# the end-to-end pruning example (MNIST there, sklearn's digits here)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)
    return images[:1500], data.target[:1500], images[1500:], data.target[1500:]


def test_pruning_with_keras_example(digits):
    train_images, train_labels, test_images, test_labels = digits
    train_images, train_labels = train_images[:1000], train_labels[:1000]  # 113 steps of 8 below
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.layers.InputLayer(input_shape=(8, 8)),
            keras.layers.Reshape(target_shape=(8, 8, 1)),
            keras.layers.Conv2D(filters=12, kernel_size=(3, 3), activation="relu"),
            keras.layers.MaxPooling2D(pool_size=(2, 2)),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(train_images, train_labels, epochs=1, validation_split=0.1, verbose=0)

    prune_low_magnitude = tsc.pruning.prune_low_magnitude

    # Compute end step to finish pruning after 1 epoch (the example: 2 epochs of batch 128).
    batch_size = 8
    epochs = 1
    validation_split = 0.1  # 10% of training set will be used for validation set.

    num_images = train_images.shape[0] * (1 - validation_split)
    end_step = np.ceil(num_images / batch_size).astype(np.int32) * epochs

    # Define model for pruning.
    pruning_params = {
        "pruning_schedule": tsc.pruning.PolynomialDecay(
            initial_sparsity=0.50, final_sparsity=0.80, begin_step=0, end_step=end_step
        )
    }

    model_for_pruning = prune_low_magnitude(model, **pruning_params)

    # `prune_low_magnitude` requires a recompile.
    model_for_pruning.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )

    model_for_pruning.summary()

    logdir = tempfile.mkdtemp()

    callbacks = [
        tsc.pruning.UpdatePruningStep(),
        tsc.pruning.PruningSummaries(log_dir=logdir),
    ]

    model_for_pruning.fit(
        train_images,
        train_labels,
        batch_size=batch_size,
        epochs=epochs,
        validation_split=validation_split,
        callbacks=callbacks,
        verbose=0,
    )

    _, model_for_pruning_accuracy = model_for_pruning.evaluate(test_images, test_labels, verbose=0)
    model_for_export = tsc.pruning.strip_pruning(model_for_pruning)

    # 113 steps: the masks were updated at step 100 (the only beat of frequency 100 in the run).
    schedule = pruning_params["pruning_schedule"]
    expected = float(schedule(100)[1])
    for layer in model_for_export.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            assert expected <= np.mean(layer.kernel.numpy() == 0) <= expected + 0.05, layer.name
    assert model_for_pruning_accuracy > 0.2  # above chance (0.1) after a short run
    np.testing.assert_allclose(
        model_for_export(test_images), model_for_pruning(test_images), rtol=1e-5, atol=1e-5
    )


def test_sparsity_2_by_4_example(digits):
    train_images, train_labels, test_images, test_labels = digits
    prune_low_magnitude = tsc.pruning.prune_low_magnitude
    keras.utils.set_random_seed(0)

    pruning_params_2_by_4 = {
        "sparsity_m_by_n": (2, 4),
    }
    pruning_params_unstructured = {
        "pruning_schedule": tsc.pruning.ConstantSparsity(target_sparsity=0.5, begin_step=0, frequency=100)
    }

    model = keras.Sequential(
        [
            prune_low_magnitude(
                keras.layers.Conv2D(
                    32,
                    5,
                    padding="same",
                    activation="relu",
                    input_shape=(8, 8, 1),
                    name="unstructured_pruning",
                ),
                **pruning_params_unstructured,
            ),
            keras.layers.MaxPooling2D((2, 2), (2, 2), padding="same"),
            prune_low_magnitude(
                keras.layers.Conv2D(64, 5, padding="same", name="structural_pruning"), **pruning_params_2_by_4
            ),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.MaxPooling2D((2, 2), (2, 2), padding="same"),
            keras.layers.Flatten(),
            prune_low_magnitude(
                keras.layers.Dense(1024, activation="relu", name="structural_pruning_dense"),
                **pruning_params_2_by_4,
            ),
            keras.layers.Dropout(0.4),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )

    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )

    model.summary()

    batch_size = 128
    epochs = 1

    model.fit(
        train_images[..., None],
        train_labels,
        batch_size=batch_size,
        epochs=epochs,
        verbose=0,
        callbacks=tsc.pruning.UpdatePruningStep(),
        validation_split=0.1,
    )

    model = tsc.pruning.strip_pruning(model)

    # 11 steps: the 2:4 masks were set at the first step; the unstructured one (every 100
    # steps) not yet. Each group of 4 consecutive input channels keeps at most 2 weights.
    assert np.all(model.get_layer("unstructured_pruning").kernel.numpy() != 0)
    for name in ("structural_pruning", "structural_pruning_dense"):
        kernel = model.get_layer(name).kernel.numpy()
        groups = np.moveaxis(kernel, -2, -1).reshape(-1, 4)
        assert ((groups != 0).sum(axis=1) <= 2).all() and np.mean(kernel == 0) == 0.5, name


# ---------------------------------------------------------------------------------------------
# QAT comprehensive guide


def test_quantize_whole_model(pretrained_weights):
    base_model = setup_model()
    base_model.load_weights(pretrained_weights)  # optional but recommended for model accuracy

    quant_aware_model = tsc.quantization.quantize_model(base_model)
    quant_aware_model.summary()
    assert len(wrappers(quant_aware_model, tsc.quantization.QuantizeWrapper)) == 1


def test_quantize_some_layers_with_clone_function(pretrained_weights):
    # Create a base model
    base_model = setup_model()
    base_model.load_weights(pretrained_weights)  # optional but recommended for model accuracy

    # Helper function uses `quantize_annotate_layer` to annotate that only the
    # Dense layers should be quantized.
    def apply_quantization_to_dense(layer):
        if isinstance(layer, keras.layers.Dense):
            return tsc.quantization.quantize_annotate_layer(layer)
        return layer

    # Use `keras.models.clone_model` to apply `apply_quantization_to_dense`
    # to the layers of the model.
    annotated_model = keras.models.clone_model(
        base_model,
        clone_function=apply_quantization_to_dense,
    )

    # Now that the Dense layers are annotated,
    # `quantize_apply` actually makes the model quantization aware.
    quant_aware_model = tsc.quantization.quantize_apply(annotated_model)
    quant_aware_model.summary()
    print(base_model.layers[0].name)

    assert [type(layer) for layer in quant_aware_model.layers] == [
        tsc.quantization.QuantizeWrapper,
        keras.layers.Flatten,
    ]
    qat = quant_aware_model.layers[0]
    assert qat.name == "quant_" + base_model.layers[0].name and qat.weight_bits == 8
    np.testing.assert_array_equal(qat.layer.kernel.numpy(), base_model.layers[0].kernel.numpy())
    # Untrained activation ranges pass outputs through: only the 8-bit weights differ.
    np.testing.assert_allclose(quant_aware_model(x_train), base_model(x_train), atol=0.1)


def test_quantize_layers_while_defining_the_model():
    # Functional example: use `quantize_annotate_layer` to annotate that the `Dense` layer
    # should be quantized.
    i = keras.Input(shape=(20,))
    x = tsc.quantization.quantize_annotate_layer(keras.layers.Dense(10))(i)
    o = keras.layers.Flatten()(x)
    annotated_model = keras.Model(inputs=i, outputs=o)

    # Use `quantize_apply` to actually make the model quantization aware.
    quant_aware_model = tsc.quantization.quantize_apply(annotated_model)

    quant_aware_model.summary()
    assert len(wrappers(quant_aware_model, tsc.quantization.QuantizeWrapper)) == 1

    # Sequential example.
    annotated_model = keras.Sequential(
        [
            tsc.quantization.quantize_annotate_layer(keras.layers.Dense(20, input_shape=input_shape)),
            keras.layers.Flatten(),
        ]
    )

    # Use `quantize_apply` to actually make the model quantization aware.
    quant_aware_model = tsc.quantization.quantize_apply(annotated_model)

    quant_aware_model.summary()
    assert annotated_model.built
    assert [type(layer) for layer in quant_aware_model.layers] == [
        tsc.quantization.QuantizeWrapper,
        keras.layers.Flatten,
    ]


def test_quantize_annotate_model_then_apply(rng):
    # As the guide's "Experiment with quantization" use cases, with the default config.
    quantize_annotate_layer = tsc.quantization.quantize_annotate_layer
    quantize_annotate_model = tsc.quantization.quantize_annotate_model
    quantize_scope = tsc.quantization.quantize_scope

    class CustomLayer(keras.layers.Dense):
        pass

    model = quantize_annotate_model(
        keras.Sequential(
            [
                quantize_annotate_layer(CustomLayer(20, input_shape=(20,))),
                keras.layers.Dense(5),
                keras.layers.Flatten(),
            ]
        )
    )

    with quantize_scope({"CustomLayer": CustomLayer}):
        # Use `quantize_apply` to actually make the model quantization aware.
        quant_aware_model = tsc.quantization.quantize_apply(model)

    quant_aware_model.summary()
    assert [type(layer) for layer in quant_aware_model.layers] == [
        tsc.quantization.QuantizeWrapper,
        tsc.quantization.QuantizeWrapper,
        keras.layers.Flatten,
    ]
    assert type(quant_aware_model.layers[0].layer) is CustomLayer
    x = rng.standard_normal((32, 20)).astype(np.float32)
    quant_aware_model.compile("adam", "mse")
    quant_aware_model.fit(x, x[:, :5], verbose=0)
    converted = tsc.quantization.convert(quant_aware_model)
    np.testing.assert_allclose(converted(x), quant_aware_model(x), atol=1e-5)


def test_quantization_checkpoint_and_deserialize(pretrained_weights):
    # Define the model.
    base_model = setup_model()
    base_model.load_weights(pretrained_weights)  # optional but recommended for model accuracy
    quant_aware_model = tsc.quantization.quantize_model(base_model)

    # Save or checkpoint the model.
    _, keras_model_file = tempfile.mkstemp(".h5")
    quant_aware_model.save(keras_model_file)

    # `quantize_scope` is needed for deserializing HDF5 models.
    with tsc.quantization.quantize_scope():
        loaded_model = keras.models.load_model(keras_model_file)

    loaded_model.summary()
    np.testing.assert_allclose(loaded_model(x_train), quant_aware_model(x_train), rtol=1e-6)


def test_create_and_deploy_quantized_model(pretrained_weights):
    base_model = setup_model()
    base_model.load_weights(pretrained_weights)  # the guide's setup_pretrained_model()
    quant_aware_model = tsc.quantization.quantize_model(base_model)

    # Typically you train the model here.

    converter = tf.lite.TFLiteConverter.from_keras_model(quant_aware_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]

    quantized_tflite_model = converter.convert()
    assert len(quantized_tflite_model) > 0


def test_experimental_quantize_config_is_not_supported():
    with pytest.raises(ValueError, match="quantize_config"):
        tsc.quantization.quantize_annotate_layer(keras.layers.Dense(20), quantize_config=object())
    model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(20)])
    with pytest.raises(ValueError, match="scheme"):
        tsc.quantization.quantize_apply(tsc.quantization.quantize_annotate_model(model), scheme=object())
    with pytest.raises(ValueError, match="marked"):
        tsc.quantization.quantize_apply(model)
    with pytest.raises(ValueError, match="pruning_policy"):
        tsc.pruning.prune_low_magnitude(model, pruning_policy=object())
    assert not hasattr(tsc.quantization, "QuantizeConfig")
