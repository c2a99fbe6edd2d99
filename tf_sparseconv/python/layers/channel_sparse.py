"""Keras layers for channel-sparse (channel-group) convolution."""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
from keras import activations

from tf_sparseconv.python import _validation
from tf_sparseconv.python._validation import int_tuple, positive_int
from tf_sparseconv.python.layers._base import ConvWeightsMixin, check_backend
from tf_sparseconv.python.ops import channel_sparse_ops


class _ChannelSparseConv(ConvWeightsMixin, keras.layers.Layer):
    """Shared implementation of ChannelSparseConv1D/2D (channels-last)."""

    rank: int
    # The op, `channel_sparse_conv2d` or `channel_sparse_conv1d` (as a staticmethod).
    _conv_op: Callable
    config_attributes = (
        "filters",
        "kernel_size",
        "density",
        "fan_in",
        "connections",
        "connection_seed",
        "strides",
        "padding",
        "dilation_rate",
        "activity_regularizer",
    )

    def __init__(
        self,
        filters: int,
        kernel_size,
        density: float | None = None,
        fan_in: int | None = None,
        connections=None,
        connection_seed: int = 0,
        strides=1,
        padding: str = "same",
        dilation_rate=1,
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
        _validation.exactly_one(density=density, fan_in=fan_in, connections=connections)
        self.kernel_size = int_tuple(kernel_size, self.rank, "kernel_size")
        self.strides = int_tuple(strides, self.rank, "strides")
        self.dilation_rate = int_tuple(dilation_rate, self.rank, "dilation_rate")
        self.padding = _validation.padding(padding)
        self.density = _validation.fraction(
            density, "density", allow_zero=False, allow_one=True, allow_none=True
        )
        self.fan_in = positive_int(fan_in, "fan_in", allow_none=True)
        self.connections = None
        if connections is not None:
            self.connections = _validation.connection_lists(connections, rows=self.filters)
        self.connection_seed = int(connection_seed)
        self._init_conv_args(locals())
        self.input_spec = keras.layers.InputSpec(ndim=self.rank + 2)
        self.supports_jit = False

    @property
    def fan_in_channels(self) -> int | None:
        """m: the input channels each output channel reads (known once built)."""
        return None if self.connections is None else int(self.connections.shape[1])

    def build(self, input_shape):
        in_channels = input_shape[-1]
        if in_channels is None:
            raise ValueError(
                f"{type(self).__name__} needs a known number of input channels, got {input_shape}"
            )
        if self.connections is None:
            self.connections = channel_sparse_ops.random_connections(
                in_channels, self.filters, density=self.density, fan_in=self.fan_in, seed=self.connection_seed
            )
        elif self.connections.max() >= in_channels or self.connections.shape[1] > in_channels:
            raise ValueError(
                f"`connections` refer to input channel {int(self.connections.max())} but the input has "
                f"{in_channels} channels"
            )
        self.input_spec = keras.layers.InputSpec(ndim=self.rank + 2, axes={-1: in_channels})
        self.kernel = self._kernel(
            "kernel",
            (*self.kernel_size, self.fan_in_channels, self.filters),
            initializer=self._fan_aware_initializer(in_channels),
        )
        self.bias = self._bias("bias", self.filters) if self.use_bias else None
        self.built = True

    def _fan_aware_initializer(self, in_channels: int):
        """The kernel initialiser, scaled for the layer's real fans.

        The kernel has shape [*kernel_size, m, filters], so Keras' variance-scaling
        initialisers already see the real fan-in (prod(kernel_size) * m) but take
        prod(kernel_size) * filters as the fan-out, where the real one is
        prod(kernel_size) * m * filters / in_channels (each input channel feeds
        m * filters / in_channels outputs). Glorot/"fan_avg" and "fan_out" scalings
        are corrected for that; other initialisers are used as they are.
        """
        init = self.kernel_initializer
        if not isinstance(init, keras.initializers.VarianceScaling) or init.mode == "fan_in":
            return init
        taps = int(np.prod(self.kernel_size))
        fan_in = taps * self.fan_in_channels
        shape_fan_out = taps * self.filters
        real_fan_out = taps * self.fan_in_channels * self.filters / in_channels
        if init.mode == "fan_out":
            factor = shape_fan_out / real_fan_out
        else:
            factor = (fan_in + shape_fan_out) / (fan_in + real_fan_out)
        return keras.initializers.VarianceScaling(
            scale=init.scale * factor,
            mode=init.mode,
            distribution=init.distribution,
            seed=getattr(init, "seed", None),
        )

    def _convolve(self, inputs, kernel, connections, bias=None, activation=None):
        return self._conv_op(
            inputs,
            kernel,
            connections,
            self.strides,
            self.padding.upper(),
            self.dilation_rate,
            bias,
            activation,
        )

    def _fused_activation(self):
        """ "relu"/"linear" when the op can apply the activation itself, else None."""
        if self.activation is None or self.activation is activations.linear:
            return "linear"
        if self.activation is activations.relu:
            return "relu"
        return None

    def call(self, inputs):
        kernel = tf.cast(self.kernel, inputs.dtype)
        connections = tf.constant(self.connections)
        fused = self._fused_activation()
        if self.bias is not None and fused is not None:
            # Bias and relu in the op's output stage (one pass over the output).
            bias = tf.cast(self.bias, inputs.dtype)
            return self._convolve(inputs, kernel, connections, bias, fused)
        outputs = self._convolve(inputs, kernel, connections)
        if self.bias is not None:
            outputs = tf.nn.bias_add(outputs, tf.cast(self.bias, outputs.dtype))
        return self.activation(outputs) if self.activation is not None else outputs

    def compute_output_shape(self, input_shape):
        spatial = []
        for n, k, s, d in zip(input_shape[1:-1], self.kernel_size, self.strides, self.dilation_rate):
            if n is None:
                spatial.append(None)
            elif self.padding == "same":
                spatial.append(-(-n // s))
            else:
                span = (k - 1) * d + 1
                spatial.append((n - span) // s + 1 if n >= span else 0)
        return (input_shape[0], *spatial, self.filters)

    def get_config(self):
        config = super().get_config()
        if self.connections is not None:
            # Once built, the exact connection lists (they define the model).
            config.update(density=None, fan_in=None, connections=self.connections.tolist())
        return config


@keras.saving.register_keras_serializable(package="tf_sparseconv")
class ChannelSparseConv2D(_ChannelSparseConv):
    """2-D convolution in which each output channel reads only `m` input channels.

    Args:
      filters: output channels.
      kernel_size: int or (kh, kw).
      density: fraction of input channels each output channel reads
        (`m = max(1, round(density * in_channels))`), or
      fan_in: `m` directly, or
      connections: explicit int `[filters, m]` connection lists.
      connection_seed: seed of the random connection lists (density/fan_in).
      strides, padding ("same"/"valid"), dilation_rate, use_bias, activation,
      initializers, regularizers, constraints: as for `keras.layers.Conv2D`.

    The connection lists are drawn at build time and stored in the config, so
    save/load and `from_config` restore them exactly. The cost scales with `m`.
    """

    rank = 2
    _conv_op = staticmethod(channel_sparse_ops.channel_sparse_conv2d)


@keras.saving.register_keras_serializable(package="tf_sparseconv")
class ChannelSparseConv1D(_ChannelSparseConv):
    """1-D form of `ChannelSparseConv2D` over `[B, L, C]` (kernel `[k, m, filters]`)."""

    rank = 1
    _conv_op = staticmethod(channel_sparse_ops.channel_sparse_conv1d)  # takes 1-tuples too


def channel_sparse_from_conv(conv_layer: keras.layers.Layer, connections) -> _ChannelSparseConv:
    """A built ChannelSparseConv2D/1D with the weights of a dense Conv2D/Conv1D.

    `connections[o]` lists the input channels output channel `o` keeps; the sparse
    kernel takes `kernel[..., connections[o, j], o]` from the dense one (weights of
    dropped connections are discarded, so the outputs are identical when they were
    zero). The activation, bias, padding, strides and dilation are carried over.
    """
    if isinstance(conv_layer, keras.layers.Conv2D):
        cls = ChannelSparseConv2D
    elif isinstance(conv_layer, keras.layers.Conv1D):
        cls = ChannelSparseConv1D
    else:
        raise ValueError(f"`conv_layer` must be a keras Conv2D or Conv1D, got {type(conv_layer).__name__}")
    if not conv_layer.built:
        raise ValueError("`conv_layer` must be built (it provides the weights)")
    if conv_layer.groups != 1 or conv_layer.data_format != "channels_last":
        raise ValueError("only channels_last convolutions with groups=1 can be converted")
    _validation.padding(conv_layer.padding, "conv_layer.padding")
    dense = np.asarray(keras.ops.convert_to_numpy(conv_layer.kernel))
    connections = _validation.connection_lists(connections, conv_layer.filters, in_channels=dense.shape[-2])
    config = conv_layer.get_config()
    layer = cls(
        filters=conv_layer.filters,
        kernel_size=conv_layer.kernel_size,
        connections=connections,
        strides=conv_layer.strides,
        padding=conv_layer.padding,
        dilation_rate=conv_layer.dilation_rate,
        use_bias=conv_layer.use_bias,
        activation=config["activation"],
        kernel_initializer=config["kernel_initializer"],
        bias_initializer=config["bias_initializer"],
        kernel_regularizer=config["kernel_regularizer"],
        bias_regularizer=config["bias_regularizer"],
        activity_regularizer=config["activity_regularizer"],
        kernel_constraint=config["kernel_constraint"],
        bias_constraint=config["bias_constraint"],
        name=conv_layer.name,
        dtype=conv_layer.dtype_policy,
    )
    layer.build((None, *([None] * (cls.rank)), dense.shape[-2]))
    out = np.arange(conv_layer.filters)
    sparse = dense[..., connections, out[:, None]]  # [*k, filters, m]
    sparse = np.moveaxis(sparse, -2, -1)  # [*k, m, filters]
    layer.kernel.assign(sparse)
    if conv_layer.use_bias:
        layer.bias.assign(keras.ops.convert_to_numpy(conv_layer.bias))
    return layer
