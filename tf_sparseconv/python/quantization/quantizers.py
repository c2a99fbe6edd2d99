"""Fake-quantisation primitives and the integer packing used by `convert`.

Weights are quantised symmetrically to the signed integers
`[-qmax, qmax]`, `qmax = 2**(bits - 1) - 1` (a "narrow" range: 0 is exact and
the grid is symmetric), with `scale = max|w| / qmax` per output channel or per
tensor. Activations are quantised affinely to `[0, 2**bits - 1]` over a range
`[lo, hi]` widened to contain 0 and nudged so that 0 is exactly representable;
after a ReLU `lo` is 0 and the whole grid is spent on `[0, hi]` (unsigned).

Rounding is round-half-to-even ("nearest", `tf.round`/`np.round`) or, for
weights during training, stochastic (`floor(x / scale + u)`, `u ~ U[0, 1)`,
unbiased). Gradients are straight-through, written as
`stop_gradient(q) + (x - stop_gradient(x))`: the forward value is exactly `q`
(so a converted integer model reproduces it bit for bit) and the gradient is
the identity; for activations `x` is first clipped to the representable range,
so the gradient is 1 inside the range and 0 outside (clip-aware STE).

Mixed precision: the arithmetic is done in float32 for float16/bfloat16
inputs (scales, ranges and the rounding grid never depend on half-precision
rounding), and fake-quantised values are returned in the input's dtype;
scales and integer values come back in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from tf_sparseconv.python._validation import integer

ROUNDINGS = ("nearest", "stochastic")


def check_bits(value, name: str, allow_none: bool = False) -> int | None:
    """`value` as an int bit width in [2, 8] (None passes when `allow_none`)."""
    return integer(value, name, minimum=2, maximum=8, allow_none=allow_none)


def check_rounding(value) -> str:
    if value not in ROUNDINGS:
        raise ValueError(f"`rounding` must be one of {ROUNDINGS}, got {value!r}")
    return value


def weight_qmax(bits: int) -> int:
    """Largest quantised weight magnitude: `2**(bits - 1) - 1` (1 for 2 bits, 127 for 8)."""
    return 2 ** (bits - 1) - 1


def _quant_dtype(dtype) -> tf.DType:
    """The dtype quantisation arithmetic runs in for inputs of `dtype`: float32 for half
    precision (float16, bfloat16) and non-float inputs, the dtype itself otherwise (float32,
    float64)."""
    dtype = tf.as_dtype(dtype)
    if not dtype.is_floating or dtype in (tf.float16, tf.bfloat16):
        return tf.float32
    return dtype


def _to_quant_dtype(x):
    """`x` as a tensor in `_quant_dtype(x.dtype)`."""
    x = tf.convert_to_tensor(x)
    return tf.cast(x, _quant_dtype(x.dtype))


def _reduce_axes(rank: int, channel_axes: Sequence[int] | None) -> list[int]:
    """The axes a scale is taken over: all of them, or all but the channel axes."""
    if channel_axes is None:
        return list(range(rank))
    keep = {a % rank for a in channel_axes}
    return [a for a in range(rank) if a not in keep]


def weight_scales(w, bits: int, channel_axes: Sequence[int] | None = (-1,)) -> tf.Tensor:
    """Symmetric scales `max|w| / qmax` (keepdims), over the tensor or per channel.

    Args:
      w: the float weights.
      bits: bit width in [2, 8].
      channel_axes: the output-channel axes (one scale per entry of them), or
        None for one scale per tensor.

    Returns:
      float scales with `w`'s rank (size 1 on the reduced axes), float32 for
      half-precision `w`; an all-zero channel gets scale 1 (its weights quantise
      to 0).
    """
    w = _to_quant_dtype(w)
    axes = _reduce_axes(len(w.shape), channel_axes)
    amax = tf.reduce_max(tf.abs(w), axis=axes, keepdims=True)
    scale = amax / tf.cast(weight_qmax(bits), w.dtype)
    return tf.where(amax > 0, scale, tf.ones_like(scale))


def quantize_weights_int(
    w,
    bits: int,
    channel_axes: Sequence[int] | None = (-1,),
    rounding: str = "nearest",
    seed=None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """The integer weights and their scales: `w ≈ values * scales`.

    Args:
      w: float weights.
      bits: bit width in [2, 8].
      channel_axes: output-channel axes for per-channel scales, None for per tensor.
      rounding: "nearest" (half to even) or "stochastic".
      seed: for stochastic rounding, an int or a `keras.random.SeedGenerator`.

    Returns:
      `(values, scales)`: `values` in `w`'s float dtype (float32 for float16 and
      bfloat16) holding integers in `[-qmax, qmax]`, `scales` as from
      `weight_scales`.
    """
    bits = check_bits(bits, "bits")
    check_rounding(rounding)
    w = _to_quant_dtype(w)
    scales = tf.stop_gradient(weight_scales(w, bits, channel_axes))
    scaled = tf.stop_gradient(w) / scales
    if rounding == "stochastic":
        noise = keras.random.uniform(tf.shape(scaled), dtype=scaled.dtype, seed=seed)
        rounded = tf.floor(scaled + noise)
    else:
        rounded = tf.round(scaled)
    qmax = tf.cast(weight_qmax(bits), w.dtype)
    return tf.clip_by_value(rounded, -qmax, qmax), scales


def fake_quant_weights(
    w,
    bits: int,
    channel_axes: Sequence[int] | None = (-1,),
    rounding: str = "nearest",
    seed=None,
) -> tf.Tensor:
    """Symmetric fake quantisation of weights with a straight-through gradient.

    Returns `values * scales` (see `quantize_weights_int`; computed in float32
    for half-precision `w`, returned in `w`'s dtype); the gradient with respect
    to `w` is the identity (every weight is inside the range).
    """
    w = tf.convert_to_tensor(w)
    wq = _to_quant_dtype(w)
    values, scales = quantize_weights_int(wq, bits, channel_axes, rounding, seed)
    return tf.cast(tf.stop_gradient(values * scales) + (wq - tf.stop_gradient(wq)), w.dtype)


def activation_qparams(lo, hi, bits: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Affine parameters `(scale, zero_point)` of the range `[lo, hi]` (0 made exact).

    The range is widened to contain 0; the zero point `round(-lo / scale)` is
    an integer in `[0, 2**bits - 1]`, so the representable range is
    `[-zero_point * scale, (2**bits - 1 - zero_point) * scale]` ("nudged").
    A degenerate range (`lo == hi == 0`) gets scale 1. Computed in float32 for
    half-precision `lo` (both are cast to `lo`'s quantisation dtype).
    """
    lo = _to_quant_dtype(lo)
    hi = tf.cast(tf.convert_to_tensor(hi), lo.dtype)
    lo = tf.minimum(lo, tf.zeros([], lo.dtype))
    hi = tf.maximum(hi, tf.zeros([], lo.dtype))
    levels = tf.cast(2**bits - 1, lo.dtype)
    scale = (hi - lo) / levels
    scale = tf.where(scale > 0, scale, tf.ones_like(scale))
    zero_point = tf.clip_by_value(tf.round(-lo / scale), 0.0, levels)
    return scale, zero_point


def fake_quant_activations(x, lo, hi, bits: int) -> tf.Tensor:
    """Affine fake quantisation of `x` over `[lo, hi]` with a clip-aware straight-through gradient.

    Values outside the (nudged) range saturate; the gradient is 1 inside the
    range and 0 outside. `lo`/`hi` get no gradient. For float16/bfloat16 `x`
    the range, the rounding and the dequantisation are computed in float32
    (`lo`/`hi` are not rounded to half precision) and the result is cast to
    `x`'s dtype.
    """
    bits = check_bits(bits, "bits")
    x = tf.convert_to_tensor(x)
    xq = _to_quant_dtype(x)
    scale, zero_point = activation_qparams(
        tf.stop_gradient(tf.cast(lo, xq.dtype)), tf.stop_gradient(tf.cast(hi, xq.dtype)), bits
    )
    levels = tf.cast(2**bits - 1, xq.dtype)
    low, high = -zero_point * scale, (levels - zero_point) * scale
    clipped = tf.clip_by_value(xq, low, high)
    q = tf.clip_by_value(tf.round(tf.stop_gradient(xq) / scale) + zero_point, 0.0, levels)
    q = (q - zero_point) * scale
    return tf.cast(tf.stop_gradient(q) + (clipped - tf.stop_gradient(clipped)), x.dtype)


# --- TensorFlow's fake-quantisation ops (for the LiteRT converter) --------------------------
#
# Under `tsc.export.for_converters()` the wrappers express the same quantisation with
# TensorFlow's `FakeQuantWithMinMaxVars(PerChannel)` ops, which `TFLiteConverter` turns into
# int8 tensors. Their grids are ours: weights `narrow_range` 8-bit over `[-127 s, 127 s]`
# (our `b`-bit grid `{-qmax..qmax} * s` is a subset of it for every b <= 8, so a 2-4-bit model's
# weights are exact in int8), activations over our nudged range (the 8-bit grid of the same
# range; for 2 and 4 bits it contains the b-bit grid, as 255 / (2^b - 1) is an integer).
# TensorFlow rounds halves away from zero where we round them to even: outputs can differ by
# one step on exact ties.


def tf_fake_quant_weights(kernel, scales, channel_axes) -> tf.Tensor:
    """`kernel` (already on the grid `values * scales`) through TensorFlow's fake-quant op.

    Per channel when the scales vary along the last axis only (the layout of Dense/Conv
    kernels); per tensor when there is one scale. Other layouts (depthwise, transposed
    convolutions) are returned as they are: the converter quantises those weights per channel
    itself, exactly for 8-bit grids.
    """
    kernel = tf.convert_to_tensor(kernel)
    scales = tf.cast(tf.convert_to_tensor(scales), tf.float32)
    rank = len(kernel.shape)
    x = tf.cast(kernel, tf.float32)
    if channel_axes is None or int(np.prod(scales.shape)) == 1:
        bound = 127.0 * tf.reshape(scales, [])
        y = tf.quantization.fake_quant_with_min_max_vars(x, -bound, bound, num_bits=8, narrow_range=True)
    elif {a % rank for a in channel_axes} == {rank - 1}:
        bound = 127.0 * tf.reshape(scales, [-1])
        y = tf.quantization.fake_quant_with_min_max_vars_per_channel(
            x, -bound, bound, num_bits=8, narrow_range=True
        )
    else:
        return kernel
    return tf.cast(y, kernel.dtype)


def tf_fake_quant_activations(x, lo, hi, bits: int) -> tf.Tensor:
    """`fake_quant_activations` (inference) as TensorFlow's `FakeQuantWithMinMaxVars` (8 bits)."""
    bits = check_bits(bits, "bits")
    x = tf.convert_to_tensor(x)
    scale, zero_point = activation_qparams(tf.cast(lo, tf.float32), tf.cast(hi, tf.float32), bits)
    levels = float(2**bits - 1)
    low, high = -zero_point * scale, (levels - zero_point) * scale
    y = tf.quantization.fake_quant_with_min_max_vars(tf.cast(x, tf.float32), low, high, num_bits=8)
    return tf.cast(y, x.dtype)


# --- integer storage ------------------------------------------------------------------


def field_bits(bits: int) -> int:
    """Width of a stored value: 2 (four per byte), 4 (two per byte) or 8 (one per byte)."""
    bits = check_bits(bits, "bits")
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def packed_size(size: int, bits: int) -> int:
    """Bytes holding `size` values of `bits` bits."""
    per_byte = 8 // field_bits(bits)
    return -(-int(size) // per_byte)


def pack_int(values, bits: int) -> np.ndarray:
    """Packs signed integers of `bits` bits into an int8 byte array (NumPy).

    The values (any shape, flattened in C order) must lie in
    `[-2**(w-1), 2**(w-1) - 1]` for the field width `w = field_bits(bits)`.
    8-bit values are stored as they are; 3-4-bit values two per byte and
    2-bit values four per byte, each as a `w`-bit two's-complement field,
    the first value in the lowest bits. The tail is padded with zeros.
    """
    width = field_bits(bits)
    flat = np.asarray(values).reshape(-1).astype(np.int64)
    lo, hi = -(2 ** (width - 1)), 2 ** (width - 1) - 1
    if flat.size and (flat.min() < lo or flat.max() > hi):
        raise ValueError(
            f"`values` must lie in [{lo}, {hi}] for {bits} bits, got [{flat.min()}, {flat.max()}]"
        )
    if width == 8:
        return flat.astype(np.int8)
    per_byte = 8 // width
    padded = np.zeros(packed_size(flat.size, bits) * per_byte, np.int64)
    padded[: flat.size] = flat
    fields = (padded & (2**width - 1)).reshape(-1, per_byte)
    packed = np.zeros(fields.shape[0], np.int64)
    for j in range(per_byte):
        packed |= fields[:, j] << (width * j)
    return packed.astype(np.uint8).view(np.int8)


def unpack_int(packed, bits: int, size: int) -> np.ndarray:
    """Inverse of `pack_int` (NumPy): the first `size` values as int8."""
    width = field_bits(bits)
    data = np.asarray(packed, dtype=np.int8).reshape(-1)
    if width == 8:
        return data[:size].copy()
    per_byte = 8 // width
    unsigned = data.view(np.uint8).astype(np.int32)
    fields = np.stack([(unsigned >> (width * j)) & (2**width - 1) for j in range(per_byte)], axis=1)
    fields = np.where(fields >= 2 ** (width - 1), fields - 2**width, fields).reshape(-1)
    return fields[:size].astype(np.int8)


def unpack_int_tf(packed, bits: int, shape: Sequence[int], dtype=tf.float32) -> tf.Tensor:
    """Inverse of `pack_int` in TensorFlow: the values as `dtype`, reshaped to `shape`."""
    width = field_bits(bits)
    size = int(np.prod(shape))
    packed = tf.reshape(tf.convert_to_tensor(packed), [-1])
    if width == 8:
        return tf.reshape(tf.cast(packed[:size], dtype), shape)
    per_byte = 8 // width
    unsigned = tf.bitwise.bitwise_and(tf.cast(packed, tf.int32), 0xFF)
    fields = tf.stack(
        [
            tf.bitwise.bitwise_and(tf.bitwise.right_shift(unsigned, width * j), 2**width - 1)
            for j in range(per_byte)
        ],
        axis=1,
    )
    fields = tf.where(fields >= 2 ** (width - 1), fields - 2**width, fields)
    return tf.reshape(tf.cast(tf.reshape(fields, [-1])[:size], dtype), shape)
