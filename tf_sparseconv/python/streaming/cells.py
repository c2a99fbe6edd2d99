"""The streaming form of each layer call: its state and its step on new frames.

A *window* layer's output `j` reads a window of `span` consecutive input frames
ending at input time `tau_j = first + j * stride` (causal convolutions: the
window ends at `j * stride` and starts in the zero left padding, `first = 0`;
"valid" convolutions and pooling: `first = span - 1`). Its state is the last
`span - 1` input frames (zeros at the start, which is exactly the causal
padding) and the number of input frames seen (int32, kept modulo the stride
once past `first`), so a step on `t` new frames
convolves `span - 1 + t` frames and emits exactly the outputs whose windows
end among the new frames, in the phase the full sequence has. *Frame* layers
(Dense, activations, normalisation at inference, merges, k-WTA over channels)
act on each frame alone and have no state.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tf_sparseconv.python.layers.channel_sparse import ChannelSparseConv1D
from tf_sparseconv.python.layers.topk import KWinners
from tf_sparseconv.python.ops._loader import converting_for_onnx
from tf_sparseconv.python.streaming.layers import StreamingConv1D, conv_step, valid_conv


class StreamingError(ValueError):
    """A layer (or model structure) that cannot run frame by frame."""


def _append_zero_frames(frames, count):
    """`frames` `[B, T, C]` with `count` zero frames appended (C stays static)."""
    shape = tf.shape(frames)
    zeros = tf.zeros(tf.stack([shape[0], count, shape[2]]), frames.dtype)
    out = tf.concat([frames, zeros], axis=1)
    out.set_shape([frames.shape[0], None, frames.shape[2]])
    return out


def _at_least_one_frame(frames, t):
    """`frames` `[B, T, C]`, with one zero frame appended when `t` is 0."""
    return _append_zero_frames(frames, tf.maximum(1 - t, 0))


class Cell:
    """One layer call of the streaming graph."""

    def __init__(self, layer):
        self.layer = layer

    def state_specs(self) -> list[tf.TensorSpec]:
        """Specs of the state tensors (batch dimension None)."""
        return []

    def initial_state(self, batch_size) -> list[tf.Tensor]:
        return []

    def step(self, inputs, state) -> tuple:
        """`(outputs for the new frames, new state)`."""
        raise NotImplementedError


class FrameCell(Cell):
    """A layer that maps each frame on its own (no state)."""

    def step(self, inputs, state) -> tuple:
        return self.layer(inputs, training=False), []


class WindowCell(Cell):
    """A layer whose output j reads input frames `[tau_j - span + 1, tau_j]`,
    `tau_j = first + j * stride`; `valid(x)` computes the outputs of every full
    window `[j * stride, j * stride + span - 1]` of `x`."""

    def __init__(self, layer, channels: int, span: int, stride: int, first: int, valid):
        super().__init__(layer)
        self.channels, self.span, self.stride, self.first = int(channels), int(span), int(stride), int(first)
        self.valid = valid
        self.dtype = tf.as_dtype(layer.compute_dtype)

    @property
    def every_frame(self) -> bool:
        """Causal with stride 1: every new frame ends a window (no frame count needed)."""
        return self.stride == 1 and self.first == 0

    @property
    def stateless(self) -> bool:
        """One frame per window, every frame: nothing to keep (e.g. a Dense or 1-tap conv)."""
        return self.every_frame and self.span == 1

    def state_specs(self) -> list[tf.TensorSpec]:
        if self.stateless:
            return []
        specs = [tf.TensorSpec([None, self.span - 1, self.channels], self.dtype)]
        return specs if self.every_frame else specs + [tf.TensorSpec([], tf.int32)]

    def initial_state(self, batch_size) -> list[tf.Tensor]:
        if self.stateless:
            return []
        state = [tf.zeros([batch_size, self.span - 1, self.channels], self.dtype)]
        return state if self.every_frame else state + [tf.zeros([], tf.int32)]

    def _history(self, x, state):
        """The kept frames (an empty [B, 0, C] for a stateless cell)."""
        if self.stateless:
            return tf.zeros(tf.stack([tf.shape(x)[0], 0, tf.shape(x)[2]]), self.dtype)
        return state[0]

    def step(self, inputs, state) -> tuple:
        x = inputs if inputs.dtype == self.dtype else tf.cast(inputs, self.dtype)
        frames = tf.concat([self._history(x, state), x], axis=1)  # [B, span - 1 + t, C]
        kept = frames[:, frames.shape[1] - (self.span - 1) :] if frames.shape[1] is not None else None
        if kept is None:
            kept = frames[:, -(self.span - 1) :] if self.span > 1 else frames[:, :0]
            kept.set_shape([None, self.span - 1, self.channels])  # (loop-invariant state shapes)
        if self.every_frame:
            if converting_for_onnx():
                # At least one window: onnxruntime's Conv rejects an empty time axis, which a
                # step of 0 frames (after a stride) hands on. (Not for LiteRT: its converter
                # rejects a convolution of such run-time padded frames.)
                t = tf.shape(x)[1]
                padded = _at_least_one_frame(frames, t)
                return self.valid(padded)[:, :t], [] if self.stateless else [kept]
            return self.valid(frames), [] if self.stateless else [kept]
        # The frame count, int32 and bounded (< first + stride): only whether it has reached
        # `first` and its phase modulo the stride matter, so it never overflows however long
        # the stream, and the step converts to LiteRT and ONNX (no int64 arithmetic).
        seen = state[1]
        t = tf.shape(x)[1]
        total = seen + t
        phase = self.first + (total - self.first) % self.stride
        new_state = [kept, tf.where(total < self.first, total, phase)]
        # The first output time at or after both `seen` and `first`, in phase.
        start_time = tf.maximum(seen, self.first)
        tau = self.first + (start_time - self.first + self.stride - 1) // self.stride * self.stride
        start = tau - seen  # index in `frames` of that output's window start
        available = tf.maximum(self.span - 1 + t - start, 0)
        count = tf.where(available >= self.span, (available - self.span) // self.stride + 1, 0)
        window = frames[:, tf.minimum(start, self.span - 1 + t) :]
        # At least one full window, so that the op always has a valid shape.
        # (zeros concatenated, not tf.pad: a Pad of run-time amounts loses the channel count in
        # the LiteRT converter's shape inference, and a convolution downstream then fails)
        window = _append_zero_frames(window, tf.maximum(self.span - available, 0))
        return self.valid(window)[:, :count], new_state


class ConvStepCell(WindowCell):
    """A causal stride-1 convolution (kernel [k, C, F], bias, activation): one
    `StreamingConvStep` op per step (bias and relu fused), the history as state."""

    def __init__(self, layer, channels: int, dilation: int, per_frame: bool = False):
        # per_frame: a Dense layer (kernel [C, F]) run as a one-tap convolution.
        kernel_size = 1 if per_frame else int(layer.kernel.shape[0])
        super().__init__(layer, channels, (kernel_size - 1) * dilation + 1, 1, 0, None)
        self.dilation = int(dilation)
        self.per_frame = per_frame

    def step(self, inputs, state) -> tuple:
        layer = self.layer
        x = inputs if inputs.dtype == self.dtype else tf.cast(inputs, self.dtype)
        kernel = tf.expand_dims(layer.kernel, 0) if self.per_frame else layer.kernel
        activation = getattr(layer, "activation", None)
        bias = getattr(layer, "bias", None)
        y, history = conv_step(self._history(x, state), x, kernel, bias, activation, self.dilation)
        return y, [] if self.stateless else [history]


_FRAME_LAYERS = (
    keras.layers.Dense,
    keras.layers.Activation,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.ELU,
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.AlphaDropout,
    keras.layers.ActivityRegularization,
    keras.layers.Rescaling,
    keras.layers.Identity,
    keras.layers.Add,
    keras.layers.Subtract,
    keras.layers.Multiply,
    keras.layers.Average,
    keras.layers.Maximum,
    keras.layers.Minimum,
)


def _last_axis(axis, rank: int = 3) -> bool:
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    return all(int(a) % rank == rank - 1 for a in axes)


def _conv_cell(layer, channels, valid):
    """The cell of a 1-D convolution layer (Keras' `kernel_size`, `strides`, `dilation_rate`
    and `padding` attributes) whose `valid(x)` gives the outputs of the windows of `x`."""
    stride, dilation, padding = layer.strides[0], layer.dilation_rate[0], layer.padding.lower()
    span = (layer.kernel_size[0] - 1) * dilation + 1
    if padding == "causal":
        return WindowCell(layer, channels, span, stride, 0, valid)
    if padding == "valid":
        return WindowCell(layer, channels, span, stride, span - 1, valid)
    if span == 1 and stride == 1:  # a 1-tap "same" convolution reads only its own frame
        return WindowCell(layer, channels, 1, 1, 0, valid)
    raise StreamingError(
        f"layer {layer.name!r} ({type(layer).__name__}, padding={padding!r}) reads future frames and "
        "cannot stream; use padding='causal' (or tsc.streaming.StreamingConv1D) or 'valid'"
    )


def _conv_valid(layer, stride: int, dilation: int):
    """`valid(x)` of a Keras Conv1D (kernel [k, C, F], bias, activation): `valid_conv`."""
    return lambda x: valid_conv(x, layer.kernel, layer.bias, layer.activation, stride, dilation)


def make_cell(layer, input_shapes) -> Cell:
    """The streaming cell of one call of `layer` on inputs of `input_shapes` ([B, T, C] each)."""
    name = f"layer {layer.name!r} ({type(layer).__name__})"
    for shape in input_shapes:
        if len(shape) != 3:
            raise StreamingError(
                f"{name}: streaming needs [batch, time, channels] tensors, got shape {shape}"
            )
    channels = input_shapes[0][-1] if input_shapes else None
    if isinstance(layer, StreamingConv1D) and layer.strides == 1:
        return ConvStepCell(layer, channels, layer.dilation_rate)
    if isinstance(layer, StreamingConv1D):  # strided: the windows ending among the new frames
        return WindowCell(layer, channels, layer.span, layer.strides, 0, layer.convolve_valid)
    if isinstance(layer, ChannelSparseConv1D):
        # Its own call on a window is the valid convolution (padding 'valid', or
        # 'same' with one tap and stride 1, which pads nothing).
        return _conv_cell(layer, channels, lambda x: layer(x, training=False))
    if isinstance(layer, keras.layers.Conv1D):
        if layer.groups != 1 or layer.data_format != "channels_last":
            raise StreamingError(f"{name}: only channels_last Conv1D with groups=1 can stream")
        if layer.padding == "causal" and layer.strides[0] == 1:
            return ConvStepCell(layer, channels, layer.dilation_rate[0])
        return _conv_cell(layer, channels, _conv_valid(layer, layer.strides[0], layer.dilation_rate[0]))
    if isinstance(layer, (keras.layers.MaxPooling1D, keras.layers.AveragePooling1D)):
        if layer.data_format != "channels_last":
            raise StreamingError(f"{name}: only channels_last pooling can stream")
        if layer.padding != "valid":
            raise StreamingError(
                f"{name}: padding={layer.padding!r} pools over future frames and cannot stream; use 'valid'"
            )
        size, stride = layer.pool_size[0], layer.strides[0]
        return WindowCell(layer, channels, size, stride, size - 1, lambda x: layer(x, training=False))
    if (
        type(layer) is keras.layers.Dense
        and getattr(layer, "quantization_mode", None) is None
        and not getattr(layer, "lora_enabled", False)
        and channels is not None
    ):
        return ConvStepCell(layer, channels, 1, per_frame=True)  # one op, bias/relu fused
    if isinstance(layer, _FRAME_LAYERS):
        return FrameCell(layer)
    if isinstance(layer, keras.layers.Softmax):
        if not _last_axis(layer.axis):
            raise StreamingError(f"{name}: a softmax over the time axis cannot stream (use axis=-1)")
        return FrameCell(layer)
    if isinstance(layer, keras.layers.Concatenate):
        if not _last_axis(layer.axis):
            raise StreamingError(f"{name}: only concatenation along the channel axis can stream")
        return FrameCell(layer)
    if isinstance(layer, (keras.layers.BatchNormalization, keras.layers.LayerNormalization)):
        if not _last_axis(layer.axis):
            raise StreamingError(f"{name}: normalisation over the time axis cannot stream")
        return FrameCell(layer)
    if isinstance(layer, KWinners):
        if not _last_axis(layer.axis):
            raise StreamingError(f"{name}: k-winners along the time axis cannot stream (use axis=-1)")
        return FrameCell(layer)
    raise StreamingError(
        f"{name} cannot stream: streamable layers are StreamingConv1D, Conv1D and ChannelSparseConv1D "
        "(causal or valid padding), MaxPooling1D/AveragePooling1D (valid), KWinners over channels, "
        "and per-frame layers (Dense, activations, dropout, batch/layer normalisation, merges)"
    )
