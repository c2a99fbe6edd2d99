"""Argument checks shared by the op wrappers (ValueError before graph building)."""

from __future__ import annotations

import numbers

import numpy as np
import tensorflow as tf

FLOAT_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)


def float_tensor(value, name: str) -> tf.Tensor:
    """Converts `value` to a tensor and checks that it is a supported float."""
    t = tf.convert_to_tensor(value, name=name)
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"`{name}` must be float16, bfloat16, float32 or float64, got {t.dtype.name}")
    return t


def positive_count(value, name: str) -> tf.Tensor:
    """A count (k, ...) >= 1: Python ints are checked here, tensors by the op."""
    if isinstance(value, (numbers.Integral, np.integer)):
        if isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")
        if value > np.iinfo(np.int32).max:
            raise ValueError(f"`{name}` must fit in int32, got {value!r}")
        return tf.constant(int(value), tf.int32)
    if isinstance(value, numbers.Number):
        raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")
    t = tf.convert_to_tensor(value)
    if not t.dtype.is_integer:
        raise ValueError(f"`{name}` must be an integer, got dtype {t.dtype.name}")
    if t.shape.rank is not None and t.shape.rank != 0:
        raise ValueError(f"`{name}` must be a scalar, got shape {t.shape}")
    return tf.cast(t, tf.int32)


def normalize_axis(axis, rank: int | None, name: str = "axis") -> int:
    if not isinstance(axis, (numbers.Integral, np.integer)) or isinstance(axis, bool):
        raise ValueError(f"`{name}` must be an int, got {axis!r}")
    axis = int(axis)
    if rank is None:
        return axis
    if not -rank <= axis < rank:
        raise ValueError(f"`{name}` must be in [{-rank}, {rank}) for a rank-{rank} input, got {axis}")
    return axis % rank


def choice(value, name: str, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"`{name}` must be one of {options}, got {value!r}")
    return value


def int_tuple(value, rank: int, name: str, minimum: int | None = 1) -> tuple[int, ...]:
    """An int, or `rank` ints, as a tuple of Python ints (sizes, strides, dilations, offsets).

    Bools and non-integral values are rejected, every entry must fit in int32 (op attributes
    are int32) and be `>= minimum` (no lower bound when `minimum` is None).
    """
    if isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, bool):
        value = (value,) * rank
    try:
        entries = tuple(value)
    except TypeError:
        raise ValueError(f"`{name}` must be an int or {rank} ints, got {value!r}") from None
    exact = all(isinstance(v, (numbers.Integral, np.integer)) and not isinstance(v, bool) for v in entries)
    if len(entries) != rank or not exact:
        raise ValueError(f"`{name}` must be an int or {rank} ints, got {value!r}")
    limit = np.iinfo(np.int32)
    low = limit.min if minimum is None else minimum
    if min(entries) < low or max(entries) > limit.max:
        bound = f">= {minimum}" if minimum is not None else "in int32 range"
        raise ValueError(f"`{name}` entries must be {bound}, got {value!r}")
    return tuple(int(v) for v in entries)


def conv2d_batch_safe(x, kernel, strides, padding: str):
    """`tf.nn.conv2d(x, kernel, strides, padding)` (dilation 1) with the right shape for empty
    batches: TensorFlow 2.21's CPU conv2d returns a wrongly shaped tensor for batch 0 (input
    spatial dims and/or Cin channels, depending on the CPU's oneDNN path), so the output shape is
    computed here from the geometry (SAME: ceil(L / s); VALID: max((L - k) // s + 1, 0))."""
    y = tf.nn.conv2d(x, kernel, list(strides), padding)
    if x.shape.is_fully_defined() and x.shape.num_elements() > 0:
        return y
    shape, kshape = tf.shape(x), tf.shape(kernel)
    out = []
    for axis, stride in ((1, strides[0]), (2, strides[1])):
        length = shape[axis]
        if padding == "SAME":
            out.append((length + stride - 1) // stride)
        else:
            out.append(tf.maximum((length - kshape[axis - 1]) // stride + 1, 0))
    return tf.reshape(y, [shape[0], out[0], out[1], kshape[3]])
