"""Pieces shared by the Keras layers."""

from __future__ import annotations

import keras
from keras import constraints, initializers, regularizers


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


def check_fraction(value, name: str, *, allow_zero: bool, allow_one: bool) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a number, got {value!r}") from None
    lo_ok = value >= 0 if allow_zero else value > 0
    hi_ok = value <= 1 if allow_one else value < 1
    if not (lo_ok and hi_ok):
        lo = "[0" if allow_zero else "(0"
        hi = "1]" if allow_one else "1)"
        raise ValueError(f"`{name}` must be in {lo}, {hi}, got {value}")
    return value


def check_exactly_one(**kwargs) -> None:
    given = [k for k, v in kwargs.items() if v is not None]
    if len(given) != 1:
        names = " or ".join(f"`{k}`" for k in kwargs)
        raise ValueError(f"Pass exactly one of {names}; got {given or 'none'}")


def positive_int(value, name: str, allow_none: bool = False):
    """`value` as a positive int (bools rejected); None passes when `allow_none`."""
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"`{name}` must be a positive int{extra}, got {value!r}")
    return value


def int_tuple(value, rank: int, name: str) -> tuple[int, ...]:
    """A positive int, or `rank` of them, as a tuple (Keras-style kernel_size/strides)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * rank
    try:
        result = tuple(int(v) for v in value)
    except TypeError:
        raise ValueError(f"`{name}` must be an int or a tuple of {rank} ints, got {value!r}") from None
    if len(result) != rank or min(result) < 1:
        raise ValueError(f"`{name}` must be a positive int or a tuple of {rank} positive ints, got {value!r}")
    return result


class ConvWeightsMixin:
    """Keras-style initializer/regularizer/constraint arguments of the kernels and biases."""

    def _init_weight_args(
        self,
        kernel_initializer,
        bias_initializer,
        kernel_regularizer,
        bias_regularizer,
        kernel_constraint,
        bias_constraint,
    ):
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.kernel_regularizer = regularizers.get(kernel_regularizer)
        self.bias_regularizer = regularizers.get(bias_regularizer)
        self.kernel_constraint = constraints.get(kernel_constraint)
        self.bias_constraint = constraints.get(bias_constraint)

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

    def _weight_config(self):
        return {
            "kernel_initializer": initializers.serialize(self.kernel_initializer),
            "bias_initializer": initializers.serialize(self.bias_initializer),
            "kernel_regularizer": regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": regularizers.serialize(self.bias_regularizer),
            "kernel_constraint": constraints.serialize(self.kernel_constraint),
            "bias_constraint": constraints.serialize(self.bias_constraint),
        }
