"""Pieces shared by the Keras layers."""

from __future__ import annotations

import keras
from keras import activations, constraints, initializers, regularizers


def adopt_input_of(wrapper: keras.layers.Layer, layer: keras.layers.Layer) -> None:
    """A wrapper takes its layer's input spec and Keras' `input_shape=` argument: Keras 3's
    Sequential builds itself from its first layer's (`Sequential([prune_low_magnitude(
    Dense(10, input_shape=(784,)))])`, as tfmot's guides write)."""
    wrapper.input_spec = layer.input_spec
    if getattr(layer, "_input_shape_arg", None) is not None:
        wrapper._input_shape_arg = layer._input_shape_arg


def check_backend(layer_name: str) -> None:
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(
            f"{layer_name} runs TensorFlow custom ops and needs KERAS_BACKEND=tensorflow "
            f"(the active Keras backend is {backend!r})"
        )


def count_from_fraction(fraction: float, size):
    """`max(1, round(fraction * size))` for a static int or a dynamic tensor size."""
    import tensorflow as tf

    if isinstance(size, int):
        return max(1, round(fraction * size))
    size = tf.cast(size, tf.float64)
    return tf.maximum(1, tf.cast(tf.round(fraction * size), tf.int32))


class ConvWeightsMixin:
    """Keras-style activation, use_bias and initializer/regularizer/constraint arguments of the
    kernels and biases, and the config of a convolution layer.

    A layer's constructor keeps its explicit Keras signature and hands its arguments on with
    `self._init_conv_args(locals())`. `get_config` returns the base layer's config, then the
    attributes named in `config_attributes` (the layer's own constructor arguments, stored
    under their names), then `activation`, `use_bias` and the weight arguments.
    """

    config_attributes: tuple[str, ...] = ()

    def _init_conv_args(self, args: dict) -> None:
        """Stores the activation, use_bias, initializer, regularizer and constraint arguments
        found in `args` (the constructor's `locals()`) under their names."""
        self.activation = activations.get(args["activation"])
        self.use_bias = bool(args["use_bias"])
        self.kernel_initializer = initializers.get(args["kernel_initializer"])
        self.bias_initializer = initializers.get(args["bias_initializer"])
        self.kernel_regularizer = regularizers.get(args["kernel_regularizer"])
        self.bias_regularizer = regularizers.get(args["bias_regularizer"])
        self.kernel_constraint = constraints.get(args["kernel_constraint"])
        self.bias_constraint = constraints.get(args["bias_constraint"])

    def _kernel(self, name, shape, initializer=None):
        return self.add_weight(
            name=name,
            shape=shape,
            initializer=initializer or self.kernel_initializer,
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )

    def _bias(self, name, size):
        return self.add_weight(
            name=name,
            shape=(size,),
            initializer=self.bias_initializer,
            regularizer=self.bias_regularizer,
            constraint=self.bias_constraint,
        )

    def get_config(self) -> dict:
        config = super().get_config()
        for name in self.config_attributes:
            value = getattr(self, name)
            # A layer that lists it always has the key (None included); Keras' own config has
            # it only when it is set.
            config[name] = regularizers.serialize(value) if name == "activity_regularizer" else value
        config.update(
            {
                "activation": activations.serialize(self.activation),
                "use_bias": self.use_bias,
                "kernel_initializer": initializers.serialize(self.kernel_initializer),
                "bias_initializer": initializers.serialize(self.bias_initializer),
                "kernel_regularizer": regularizers.serialize(self.kernel_regularizer),
                "bias_regularizer": regularizers.serialize(self.bias_regularizer),
                "kernel_constraint": constraints.serialize(self.kernel_constraint),
                "bias_constraint": constraints.serialize(self.bias_constraint),
            }
        )
        return config
