"""Keras layers for block-sparse convolution driven by a computation mask (SBNet)."""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from tf_sparseconv.python import _validation
from tf_sparseconv.python._validation import int_tuple, positive_int
from tf_sparseconv.python.layers._base import ConvWeightsMixin, check_backend
from tf_sparseconv.python.ops import block_sparse_ops
from tf_sparseconv.python.ops._common import conv2d_batch_safe


def _split_inputs(inputs, layer_name: str):
    if not isinstance(inputs, (list, tuple)) or len(inputs) != 2:
        raise ValueError(f"{layer_name} is called on [x, mask], got {inputs!r}")
    return inputs[0], inputs[1]


@keras.saving.register_keras_serializable(package="tf_sparseconv")
class BlockSparseConv2D(ConvWeightsMixin, keras.layers.Layer):
    """2-D convolution computed only in the active blocks of a mask (SBNet).

    Called on `[x, mask]` with `x` `[B, H, W, Cin]` and `mask` `[B, H, W]` or
    `[B, H, W, 1]` at the input resolution (any float/bool dtype). The mask is
    reduced to blocks of `block_size` (`reduce_mask` with `threshold` and
    `avgpool`); the output is `activation(conv2d(x, kernel) + bias)` inside the
    active output blocks (`block_size / strides` each) and exactly 0 elsewhere.
    The work scales with the number of active blocks.

    Args:
      filters, kernel_size, strides, padding ("same"/"valid"), use_bias,
      activation, initializers, regularizers, constraints: as for
      `keras.layers.Conv2D`.
      block_size: int or pair, a multiple of `strides`.
      threshold, avgpool: see `tsc.ops.reduce_mask`.
    """

    config_attributes = (
        "filters",
        "kernel_size",
        "block_size",
        "threshold",
        "avgpool",
        "strides",
        "padding",
        "activity_regularizer",
    )

    def __init__(
        self,
        filters: int,
        kernel_size,
        block_size=16,
        threshold: float = 0.0,
        avgpool: bool = False,
        strides=1,
        padding: str = "same",
        use_bias: bool = True,
        activation=None,
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
        check_backend(type(self).__name__)
        self.filters = positive_int(filters, "filters")
        self.kernel_size = int_tuple(kernel_size, 2, "kernel_size")
        self.block_size = int_tuple(block_size, 2, "block_size")
        self.strides = int_tuple(strides, 2, "strides")
        self.padding = _validation.padding(padding)
        # Validates block_size vs strides now rather than at the first call.
        block_sparse_ops.BlockConvGeometry(
            self.kernel_size, self.block_size, self.strides, self.padding.upper()
        )
        self.threshold = float(threshold)
        self.avgpool = bool(avgpool)
        self._init_conv_args(locals())
        self.supports_jit = False

    def build(self, input_shape) -> None:
        x_shape, _ = _split_inputs(input_shape, type(self).__name__)
        if x_shape[-1] is None:
            raise ValueError(f"{type(self).__name__} needs a known number of input channels, got {x_shape}")
        self.kernel = self._kernel("kernel", (*self.kernel_size, x_shape[-1], self.filters))
        self.bias = self._bias("bias", self.filters) if self.use_bias else None
        self.built = True

    def call(self, inputs) -> Any:
        x, mask = _split_inputs(inputs, type(self).__name__)
        kernel = tf.cast(self.kernel, x.dtype)
        bias = None if self.bias is None else tf.cast(self.bias, x.dtype)
        x, kernel, mask = block_sparse_ops._check_conv_operands(x, kernel, mask, type(self).__name__)
        indices = block_sparse_ops.reduce_mask(
            mask, self.block_size, self.block_size, (0, 0), self.threshold, self.avgpool
        )
        return block_sparse_ops.block_conv2d_on_indices(
            x,
            kernel,
            indices,
            self.block_size,
            self.strides,
            self.padding.upper(),
            bias=bias,
            activation=self.activation,
        )

    def compute_output_shape(self, input_shape) -> tuple | list:
        x_shape, _ = _split_inputs(input_shape, type(self).__name__)
        spatial = []
        for n, k, s in zip(x_shape[1:3], self.kernel_size, self.strides):
            if n is None:
                spatial.append(None)
            elif self.padding == "same":
                spatial.append(-(-n // s))
            else:
                spatial.append(max((n - k) // s + 1, 0))
        return (x_shape[0], *spatial, self.filters)


@keras.saving.register_keras_serializable(package="tf_sparseconv")
class BlockSparseResidualBlock(ConvWeightsMixin, keras.layers.Layer):
    """SBNet's sparse residual block: `x + f(x)` computed only in the active blocks.

    Called on `[x, mask]` (`x` `[B, H, W, C]`, mask at the same resolution).
    The active blocks (of `block_size`, with the halo the `kernel_size`
    convolution needs) are gathered from `x` once; the bottleneck
    `f = conv1x1(C -> bottleneck_filters) -> activation -> conv kxk ->
    activation -> conv1x1(-> C)` runs on the gathered blocks only; the result
    is scatter-added into `x`. Outside the active blocks the output is `x`
    unchanged; inside, it equals the dense residual block with SAME padding
    (the first convolution's output is zeroed where the halo leaves the image,
    as the dense block's zero padding would be).
    """

    config_attributes = ("bottleneck_filters", "kernel_size", "block_size", "threshold", "avgpool")

    def __init__(
        self,
        bottleneck_filters: int,
        kernel_size=3,
        block_size=16,
        threshold: float = 0.0,
        avgpool: bool = False,
        activation="relu",
        use_bias: bool = True,
        kernel_initializer="he_normal",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_backend(type(self).__name__)
        self.bottleneck_filters = positive_int(bottleneck_filters, "bottleneck_filters")
        self.kernel_size = int_tuple(kernel_size, 2, "kernel_size")
        self.block_size = int_tuple(block_size, 2, "block_size")
        self.threshold = float(threshold)
        self.avgpool = bool(avgpool)
        self._init_conv_args(locals())
        self.supports_jit = False

    def build(self, input_shape) -> None:
        x_shape, _ = _split_inputs(input_shape, type(self).__name__)
        channels = x_shape[-1]
        if channels is None:
            raise ValueError(f"{type(self).__name__} needs a known number of channels, got {x_shape}")
        f = self.bottleneck_filters
        self.kernels = [
            self._kernel("kernel_reduce", (1, 1, channels, f)),
            self._kernel("kernel_conv", (*self.kernel_size, f, f)),
            self._kernel("kernel_expand", (1, 1, f, channels)),
        ]
        self.biases = (
            [self._bias("bias_reduce", f), self._bias("bias_conv", f), self._bias("bias_expand", channels)]
            if self.use_bias
            else [None, None, None]
        )
        self.built = True

    def call(self, inputs) -> Any:
        x, mask = _split_inputs(inputs, type(self).__name__)
        x, _, mask = block_sparse_ops._check_conv_operands(
            x, tf.cast(self.kernels[0], x.dtype), mask, type(self).__name__
        )
        kh, kw = self.kernel_size
        size = (self.block_size[0] + kh - 1, self.block_size[1] + kw - 1)
        offset = (-((kh - 1) // 2), -((kw - 1) // 2))
        indices = block_sparse_ops.reduce_mask(
            mask, self.block_size, self.block_size, (0, 0), self.threshold, self.avgpool
        )
        blocks = block_sparse_ops.sparse_gather(x, indices, size, self.block_size, offset)
        # Which gathered positions are inside the image (the dense block's
        # zero padding applies to the input of the kxk convolution).
        ones = tf.ones_like(x[..., :1])
        inside = block_sparse_ops.sparse_gather(ones, indices, size, self.block_size, offset)
        k1, k2, k3 = (tf.cast(k, x.dtype) for k in self.kernels)
        b1, b2, b3 = (None if b is None else tf.cast(b, x.dtype) for b in self.biases)

        def conv(h, kernel, bias, padding="VALID"):
            h = conv2d_batch_safe(h, kernel, (1, 1), padding)
            return h if bias is None else tf.nn.bias_add(h, bias)

        h = self.activation(conv(blocks, k1, b1)) * inside
        h = self.activation(conv(h, k2, b2))
        h = conv(h, k3, b3)
        h = tf.reshape(h, [-1, self.block_size[0], self.block_size[1], tf.shape(x)[3]])  # static shape
        return block_sparse_ops.sparse_scatter(h, indices, x, self.block_size, (0, 0), add=True)

    def compute_output_shape(self, input_shape) -> tuple | list:
        x_shape, _ = _split_inputs(input_shape, type(self).__name__)
        return tuple(x_shape)
