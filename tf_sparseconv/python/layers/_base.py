"""Pieces shared by the Keras layers."""

from __future__ import annotations

import keras


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
