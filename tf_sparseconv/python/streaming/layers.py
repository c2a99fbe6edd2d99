"""`StreamingConv1D`: a causal 1-D convolution that `to_streaming` runs frame by frame."""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf
from keras import activations

from tf_sparseconv.python._validation import int_tuple, positive_int
from tf_sparseconv.python.layers._base import ConvWeightsMixin
from tf_sparseconv.python.ops.streaming_ops import streaming_conv_step


def _positive(value, name: str) -> int:
    """A positive int, or a 1-tuple of one (Keras' Conv1D accepts both)."""
    return int_tuple(value, 1, name)[0]


def conv_step(history, frames, kernel, bias, activation, dilation: int) -> tuple[tf.Tensor, tf.Tensor]:
    """`(y, new_history)` of a causal stride-1 convolution (kernel [k, C, F], optional bias, a
    Keras activation) on new `frames`: one `StreamingConvStep` op, with a linear or relu
    activation fused into it and any other applied after."""
    fused = activation is None or activation in (activations.linear, activations.relu)
    y, new_history = streaming_conv_step(
        history,
        frames,
        tf.cast(kernel, frames.dtype),
        None if bias is None else tf.cast(bias, frames.dtype),
        dilation,
        "relu" if activation is activations.relu else None,
    )
    return (y if fused else activation(y)), new_history


def valid_conv(x, kernel, bias, activation, stride: int, dilation: int) -> tf.Tensor:
    """Outputs of the windows `[j * stride, j * stride + span - 1]` of `x` (no padding), by the
    same op (`conv_step` on the window's first `span - 1` frames as history)."""
    span = (int(kernel.shape[0]) - 1) * dilation + 1
    y, _ = conv_step(x[:, : span - 1], x[:, span - 1 :], kernel, bias, activation, dilation)
    return y[:, ::stride] if stride > 1 else y


@keras.saving.register_keras_serializable(package="tf_sparseconv")
class StreamingConv1D(ConvWeightsMixin, keras.layers.Layer):
    """Causal convolution over `[B, T, C]` (kernel `[k, C, filters]`).

    Output frame `j` reads the input frames `j * strides - (k - 1) * dilation_rate`
    ... `j * strides` (frames before the start are zeros), so it depends on no
    future frame and is ready as soon as input frame `j * strides` has arrived;
    a sequence of `T` frames gives `ceil(T / strides)` outputs. On a full
    sequence this is `keras.layers.Conv1D(padding="causal")` (which TensorFlow
    cannot run with both `strides > 1` and `dilation_rate > 1`; this layer can).
    `tsc.streaming.to_streaming` runs it on new frames only, with the last
    `(k - 1) * dilation_rate` input frames kept as state. Both run the same op
    (`StreamingConvStep`, bias and relu fused), which computes every output
    with the same arithmetic whatever the number of frames: the streamed
    outputs are bitwise equal to the full-sequence ones (so that a k-winners
    selection downstream cannot flip on a rounding difference).

    Args:
      filters: number of output channels.
      kernel_size: taps `k`.
      strides, dilation_rate: positive ints.
      activation, use_bias, initializers, regularizers, constraints: as for
        `keras.layers.Conv1D`.
    """

    config_attributes = ("filters", "kernel_size", "strides", "dilation_rate")

    def __init__(
        self,
        filters: int,
        kernel_size: int,
        strides: int = 1,
        dilation_rate: int = 1,
        activation=None,
        use_bias: bool = True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        **kwargs,
    ):
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        self.filters = positive_int(filters, "filters")
        self.kernel_size = _positive(kernel_size, "kernel_size")
        self.strides = _positive(strides, "strides")
        self.dilation_rate = _positive(dilation_rate, "dilation_rate")
        self._init_conv_args(locals())
        self.input_spec = keras.layers.InputSpec(ndim=3)
        self.supports_jit = False  # a custom op

    @property
    def span(self) -> int:
        """Input frames one output reads: `(kernel_size - 1) * dilation_rate + 1`."""
        return (self.kernel_size - 1) * self.dilation_rate + 1

    def build(self, input_shape) -> None:
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(
                f"{self.name}: the channel dimension of the input must be known, got {input_shape}"
            )
        self.kernel = self._kernel("kernel", (self.kernel_size, channels, self.filters))
        self.bias = self._bias("bias", self.filters) if self.use_bias else None
        self.input_spec = keras.layers.InputSpec(ndim=3, axes={-1: channels})
        self.built = True

    def step(self, history, frames) -> tuple:
        """`(outputs at every new frame (stride 1), new history)`: one `StreamingConvStep`."""
        return conv_step(history, frames, self.kernel, self.bias, self.activation, self.dilation_rate)

    def convolve_valid(self, x) -> tf.Tensor:
        """Outputs of the windows `[j * strides, j * strides + span - 1]` of `x` (no padding)."""
        return valid_conv(x, self.kernel, self.bias, self.activation, self.strides, self.dilation_rate)

    def call(self, inputs) -> Any:
        channels = inputs.shape[-1] if inputs.shape[-1] is not None else tf.shape(inputs)[-1]
        history = tf.zeros([tf.shape(inputs)[0], self.span - 1, channels], inputs.dtype)  # causal padding
        y, _ = self.step(history, inputs)
        return y[:, :: self.strides] if self.strides > 1 else y

    def compute_output_shape(self, input_shape) -> tuple | list:
        steps = input_shape[1]
        if steps is not None:
            steps = -(-steps // self.strides)
        return (input_shape[0], steps, self.filters)
