"""Argument checks shared by the op wrappers (ValueError before graph building)."""

from __future__ import annotations

import numbers

import numpy as np
import tensorflow as tf

from tf_sparseconv.python._validation import as_int, choice, int_tuple, is_int  # noqa: F401 (re-exported)

FLOAT_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)


def float_tensor(value, name: str) -> tf.Tensor:
    """Converts `value` to a tensor and checks that it is a supported float."""
    t = tf.convert_to_tensor(value, name=name)
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"`{name}` must be float16, bfloat16, float32 or float64, got {t.dtype.name}")
    return t


def float_tensors(**named) -> list[tf.Tensor]:
    """`float_tensor` of each argument (in order), all of the first one's dtype."""
    tensors = [float_tensor(value, name) for name, value in named.items()]
    first_name, first = next(iter(named)), tensors[0]
    for name, tensor in zip(named, tensors):
        if tensor.dtype != first.dtype:
            raise ValueError(
                f"`{name}` dtype {tensor.dtype.name} must match `{first_name}` dtype {first.dtype.name}"
            )
    return tensors


def int_scalar(value, name: str, minimum: int = 1) -> tf.Tensor:
    """An int32 scalar `>= minimum` (a count k, a row count): Python and NumPy numbers are
    checked here, tensors by the op."""
    if isinstance(value, (numbers.Number, np.number)):
        count = as_int(value)
        if count is None or count < minimum:
            raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
        if count > np.iinfo(np.int32).max:
            raise ValueError(f"`{name}` must fit in int32, got {value!r}")
        return tf.constant(count, tf.int32)
    t = tf.convert_to_tensor(value)
    if not t.dtype.is_integer:
        raise ValueError(f"`{name}` must be an integer, got dtype {t.dtype.name}")
    if t.shape.rank is not None and t.shape.rank != 0:
        raise ValueError(f"`{name}` must be a scalar, got shape {t.shape}")
    return tf.cast(t, tf.int32)


def positive_count(value, name: str) -> tf.Tensor:
    """A count (k, ...) >= 1: Python ints are checked here, tensors by the op."""
    return int_scalar(value, name, minimum=1)


def normalize_axis(axis, rank: int | None, name: str = "axis") -> int:
    if as_int(axis) is None:
        raise ValueError(f"`{name}` must be an integer, got {axis!r}")
    axis = as_int(axis)
    if rank is None:
        return axis
    if not -rank <= axis < rank:
        raise ValueError(f"`{name}` must be in [{-rank}, {rank}) for a rank-{rank} input, got {axis}")
    return axis % rank


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
