"""One streaming step of a causal 1-D convolution (`tsc.streaming`'s hot path).

`streaming_conv_step(history, frames, kernel, bias, dilation, activation)`
returns the convolution's outputs for the new `frames` and the new history: the
last `(taps - 1) * dilation` input frames, which the next step needs. At the
start of a sequence the history is zeros (the causal padding). One op per layer
and step (`StreamingConvStep`), instead of the dozen slicing, concatenation and
matmul ops of the stock-TF formulation (`streaming_conv_step_reference`), whose
fixed per-op costs dominate a step on a few frames.
"""

from __future__ import annotations

import tensorflow as tf

from tf_sparseconv.python.ops._common import float_tensor, float_tensors, int_tuple
from tf_sparseconv.python.ops._loader import dispatch

ACTIVATIONS = (None, "linear", "relu")


def _check(history, frames, kernel, bias, dilation, activation):
    frames, history, kernel = float_tensors(frames=frames, history=history, kernel=kernel)
    for tensor, name, layout in (
        (frames, "frames", "[B, t, C]"),
        (history, "history", "[B, (taps - 1) * dilation, C]"),
        (kernel, "kernel", "[taps, C, F]"),
    ):
        if tensor.shape.rank is not None and tensor.shape.rank != 3:
            raise ValueError(f"`{name}` must be {layout}, got shape {tensor.shape}")
    dilation = int_tuple(dilation, 1, "dilation")[0]
    if activation not in ACTIVATIONS:
        raise ValueError(f"`activation` must be None, 'linear' or 'relu', got {activation!r}")
    taps, channels, filters = kernel.shape if kernel.shape.rank == 3 else (None, None, None)
    if taps is not None and taps < 1:
        raise ValueError(f"`kernel` must have at least one tap, got shape {kernel.shape}")
    if channels is not None and frames.shape[-1] not in (None, channels):
        raise ValueError(f"`frames` has {frames.shape[-1]} channels but `kernel` expects {channels}")
    if taps is not None and history.shape.rank == 3 and history.shape[1] not in (None, (taps - 1) * dilation):
        hist = (taps - 1) * dilation
        raise ValueError(
            f"`history` must hold (taps - 1) * dilation = {hist} frames, got shape {history.shape}"
        )
    if bias is None:
        bias = tf.zeros([0], frames.dtype)
    else:
        bias = float_tensor(bias, "bias")
        if bias.dtype != frames.dtype:
            raise ValueError(f"`bias` dtype {bias.dtype.name} must match `frames` dtype {frames.dtype.name}")
        if bias.shape.rank is not None and (bias.shape.rank != 1 or bias.shape[0] not in (None, filters)):
            raise ValueError(f"`bias` must be [F] = [{filters}], got shape {bias.shape}")
    return history, frames, kernel, bias, dilation, "linear" if activation is None else activation


def streaming_conv_step(
    history, frames, kernel, bias=None, dilation=1, activation=None, name=None
) -> tuple[tf.Tensor, tf.Tensor]:
    """`(y, new_history)` of one step of a causal 1-D convolution (stride 1).

    Args:
      history: `[B, (taps - 1) * dilation, C]`, the previous input frames (zeros at the start).
      frames: `[B, t, C]`, the new input frames.
      kernel: `[taps, C, F]`.
      bias: optional `[F]`.
      dilation: positive int.
      activation: None/"linear" or "relu".

    Returns:
      `y` `[B, t, F]` with `y[:, j] = activation(bias + sum_i z[:, j + i * dilation] @ kernel[i])`,
      `z = concat([history, frames], axis=1)`, and `new_history = z[:, t:]`.
    """
    with tf.name_scope(name or "streaming_conv_step"):
        history, frames, kernel, bias, dilation, activation = _check(
            history, frames, kernel, bias, dilation, activation
        )
        library = dispatch("streaming_conv_step")
        if library is None:
            return streaming_conv_step_reference(history, frames, kernel, bias, dilation, activation)
        return tuple(
            library.tf_sparse_conv_streaming_conv_step(
                history, frames, kernel, bias, dilation=dilation, activation=activation
            )
        )


def _taps(z, taps: int, dilation: int):
    """The frames tap i reads for every output: z[:, i * dilation : i * dilation + t]."""
    hist = (taps - 1) * dilation
    return [z[:, i * dilation : (i * dilation - hist) or None] for i in range(taps)]


def streaming_conv_step_reference(
    history, frames, kernel, bias=None, dilation=1, activation=None
) -> tuple[tf.Tensor, tf.Tensor]:
    """Pure-TF `streaming_conv_step` (stock ops only)."""
    history, frames, kernel, bias, dilation, activation = _check(
        history, frames, kernel, bias, dilation, activation
    )
    taps = kernel.shape[0]
    z = tf.concat([history, frames], axis=1)
    y = tf.add_n([tf.einsum("btc,cf->btf", tap, kernel[i]) for i, tap in enumerate(_taps(z, taps, dilation))])
    if bias.shape[0] is None:  # [F], or [0] for none
        y = tf.cond(tf.size(bias) > 0, lambda: y + bias, lambda: y)
    elif bias.shape[0] != 0:
        y = y + bias
    if activation == "relu":
        y = tf.nn.relu(y)
    return y, z[:, tf.shape(frames)[1] :]


@tf.RegisterGradient("TfSparseConv>StreamingConvStep")
def _streaming_conv_step_grad(op, dy, dhistory):
    history, frames, kernel, bias = op.inputs
    y = op.outputs[0]
    dilation = op.get_attr("dilation")
    activation = op.get_attr("activation")
    if activation in (b"relu", "relu"):
        dy = tf.where(y > 0, dy, tf.zeros_like(dy))
    taps = kernel.shape[0] if kernel.shape[0] is not None else None
    if taps is None:
        raise ValueError("StreamingConvStep's gradient needs a kernel with a static number of taps")
    hist = (taps - 1) * dilation
    z = tf.concat([history, frames], axis=1)
    dkernel = tf.stack([tf.einsum("btc,btf->cf", tap, dy) for tap in _taps(z, taps, dilation)])
    steps = tf.shape(frames)[1]
    dz = tf.add_n(
        [
            tf.pad(
                tf.einsum("btf,cf->btc", dy, kernel[i]), [[0, 0], [i * dilation, hist - i * dilation], [0, 0]]
            )
            for i in range(taps)
        ]
    )
    if dhistory is not None:  # new_history = z[:, t:]
        dz = dz + tf.pad(dhistory, [[0, 0], [steps, 0], [0, 0]])
    if bias.shape[0] is not None:
        dbias = tf.reduce_sum(dy, axis=[0, 1]) if bias.shape[0] != 0 else tf.zeros_like(bias)
    else:  # a bias of unknown length: [F], or [0] for none
        dbias = tf.cond(
            tf.size(bias) > 0, lambda: tf.reduce_sum(dy, axis=[0, 1]), lambda: tf.zeros([0], dy.dtype)
        )
    return dz[:, :hist], dz[:, hist:], dkernel, dbias
