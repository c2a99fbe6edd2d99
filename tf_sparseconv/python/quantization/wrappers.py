"""The quantisation wrappers: `QuantizeWrapper` (training) and `IntegerWeightsWrapper` (converted).

Both wrap an ordinary layer (Keras' Dense/Conv*/DepthwiseConv*/SeparableConv*/
Conv*Transpose or any `tsc.layers` convolution) and run its own `call` with
its kernels replaced, for the duration of the call, by quantised tensors. The
layer's code is untouched, so any layer that reads its kernels from its
attributes (`layer.kernel`, ...) is covered. Their outputs (for a sparse map
`[features, coords, shape]`: the features) are then fake-quantised over a
range tracked by an exponential moving average.

Mixed precision (`mixed_float16`, `mixed_bfloat16`): as in Keras, the variables
(the wrapped layer's float kernels, the activation ranges, masks, integer
scales) stay float32 and the layer computes in its compute dtype. The kernels
are read in float32 (not autocast), fake-quantised in float32 and cast to the
compute dtype; outputs are fake-quantised over the float32 range in float32
and cast back. A wrapper takes the wrapped layer's dtype policy.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras.src.backend import AutocastScope

from tf_sparseconv.python._kernel_layouts import kernel_layout
from tf_sparseconv.python._validation import integer
from tf_sparseconv.python.ops._loader import converting
from tf_sparseconv.python.quantization import quantizers

# --- which weights of a layer are quantised ---------------------------------------------


@dataclass(frozen=True)
class KernelSpec:
    """One quantised weight: where the layer keeps it and which axes are its output channels."""

    attr: str  # the attribute the layer's call reads (the storage behind a `kernel` property)
    index: int | None  # position in a list attribute (`kernels`), or None
    channel_axes: tuple[int, ...]

    @property
    def key(self) -> str:
        return self.attr.lstrip("_") + ("" if self.index is None else f"_{self.index}")


def _storage_attr(layer, name: str) -> str | None:
    """The attribute holding the variable behind `layer.<name>` (Keras' `kernel` is a property
    over `_kernel`), or None when the layer has no such variable."""
    if isinstance(getattr(type(layer), name, None), property):
        name = "_" + name
    value = layer.__dict__.get(name)
    if isinstance(value, keras.Variable) or (
        isinstance(value, (list, tuple)) and value and all(isinstance(v, keras.Variable) for v in value)
    ):
        return name
    return None


_KERNEL_NAMES = ("kernel", "depthwise_kernel", "pointwise_kernel", "kernels")


def kernel_specs(layer: keras.layers.Layer) -> list[KernelSpec]:
    """The kernels `quantize_model` quantises in a built layer (empty: the layer is left alone)."""
    specs = []
    for name in _KERNEL_NAMES:
        attr = _storage_attr(layer, name)
        if attr is None:
            continue
        value = layer.__dict__[attr]
        axes = kernel_layout(layer, name).out_axes
        if isinstance(value, (list, tuple)):
            specs.extend(KernelSpec(attr, i, axes) for i in range(len(value)))
        else:
            specs.append(KernelSpec(attr, None, axes))
    return specs


def _build_layer(wrapper, input_shape) -> list[KernelSpec]:
    """Builds the wrapped layer (when not built yet) and returns its kernels' specs (ValueError
    when it has none)."""
    layer = wrapper.layer
    if not layer.built:
        layer.build(input_shape)
        layer.built = True
    specs = kernel_specs(layer)
    if not specs:
        raise ValueError(
            f"{type(wrapper).__name__}: layer {layer.name!r} ({type(layer).__name__}) has no kernel "
            "to quantise"
        )
    return specs


def _read(layer, spec: KernelSpec):
    value = layer.__dict__[spec.attr]
    return value if spec.index is None else value[spec.index]


def _float32_value(variable):
    """The variable's value in its own dtype (float32 under a mixed policy): not autocast to
    the compute dtype of the layer being called, as Keras does with variables read in `call`."""
    with AutocastScope(None):
        return tf.convert_to_tensor(variable)


@contextlib.contextmanager
def _kernels_replaced(layer, replacements: dict[KernelSpec, object]):
    """Within the block, the layer's kernel attributes hold `replacements` (no Keras tracking)."""
    saved = {}
    grouped: dict[str, dict] = {}
    for spec, value in replacements.items():
        grouped.setdefault(spec.attr, {})[spec.index] = value
    for attr, by_index in grouped.items():
        saved[attr] = layer.__dict__[attr]
        if None in by_index:
            new = by_index[None]
        else:
            new = list(saved[attr]) if saved[attr] is not None else [None] * (max(by_index) + 1)
            for i, v in by_index.items():
                new[i] = v
        object.__setattr__(layer, attr, new)
    try:
        yield
    finally:
        for attr, value in saved.items():
            object.__setattr__(layer, attr, value)


def _kernel_feeds_op(layer) -> bool:
    """Whether the layer hands its kernel, unchanged, to one convolution or matmul op (Keras'
    Dense/Conv1D-3D, BlockSparseConv2D): only then may a `FakeQuant` op sit on the kernel for
    the TFLite converter, which wants it right before the op. Other layers (channel-sparse
    ones expand their kernel to a dense one first, sparse-map convolutions slice it per
    offset) get float weights on the quantisation grid, which the converter quantises per
    channel itself (exactly, at 8 bits)."""
    from keras.src.layers.convolutional.base_conv import BaseConv
    from keras.src.layers.convolutional.base_conv_transpose import BaseConvTranspose
    from keras.src.layers.convolutional.base_depthwise_conv import BaseDepthwiseConv
    from keras.src.layers.convolutional.base_separable_conv import BaseSeparableConv

    from tf_sparseconv.python.layers.block_sparse import BlockSparseConv2D

    if isinstance(layer, (BaseConvTranspose, BaseDepthwiseConv, BaseSeparableConv)):
        return False
    return isinstance(layer, (BaseConv, BlockSparseConv2D))


def converter_kernel(layer, values, scales, channel_axes) -> tf.Tensor:
    """The kernel `values * scales` (NumPy) as a graph constant for the LiteRT/ONNX converters:
    through TensorFlow's `FakeQuant` op where the kernel feeds its op directly (the TFLite
    converter then stores these int8 values and scales), plain otherwise (the converter
    quantises it per channel itself). A constant, not variable reads and arithmetic, so that
    no converter computes weights at run time."""
    kernel = tf.constant(np.asarray(values, np.float32) * np.asarray(scales, np.float32))
    if _kernel_feeds_op(layer):
        kernel = quantizers.tf_fake_quant_weights(kernel, scales, channel_axes)
    return tf.cast(kernel, _compute_dtype_of(layer))


def _main_output(outputs):
    """(tensor to quantise, rebuild function): a tensor itself, or the first entry of a list
    (the features of a sparse map `[features, coords, shape]`)."""
    if isinstance(outputs, (list, tuple)):
        first = outputs[0]
        return first, lambda q: type(outputs)([q, *outputs[1:]])
    return outputs, lambda q: q


# --- activation ranges -----------------------------------------------------------------


class _ActivationRangeMixin:
    """EMA-tracked output range `[activation_min, activation_max]` (non-trainable variables).

    Before the first training batch the range is unset and outputs pass through
    unquantised; the first batch sets it, later ones move it by
    `range = ema_decay * range + (1 - ema_decay) * batch_range`.
    """

    def _add_range_variables(self):
        # float32 under mixed precision, and not autocast (like BatchNormalization's statistics).
        self.activation_min = self.add_weight(
            name="activation_min", shape=(), initializer="zeros", trainable=False, autocast=False
        )
        self.activation_max = self.add_weight(
            name="activation_max", shape=(), initializer="zeros", trainable=False, autocast=False
        )
        self.range_initialized = self.add_weight(
            name="range_initialized", shape=(), initializer="zeros", trainable=False, autocast=False
        )

    def _quantize_output(self, outputs, training: bool):
        if self.activation_bits is None:
            return outputs
        x, rebuild = _main_output(outputs)
        if not x.dtype.is_floating:
            return outputs
        lo, hi = _float32_value(self.activation_min), _float32_value(self.activation_max)
        initialized = _float32_value(self.range_initialized) > 0.5
        if training:
            has_values = tf.size(x) > 0
            safe = tf.where(has_values, tf.stop_gradient(tf.cast(x, tf.float32)), tf.zeros([], tf.float32))
            batch_lo, batch_hi = tf.reduce_min(safe), tf.reduce_max(safe)
            decay = tf.constant(self.ema_decay, tf.float32)
            lo_new = tf.where(initialized, decay * lo + (1.0 - decay) * batch_lo, batch_lo)
            hi_new = tf.where(initialized, decay * hi + (1.0 - decay) * batch_hi, batch_hi)
            lo = tf.where(has_values, lo_new, lo)
            hi = tf.where(has_values, hi_new, hi)
            initialized = tf.logical_or(initialized, has_values)
            self.activation_min.assign(lo)
            self.activation_max.assign(hi)
            self.range_initialized.assign(tf.cast(initialized, tf.float32))
        if converting() and not training:
            # TensorFlow's fake-quant op (the TFLite converter's int8 ranges); an unset range
            # (never trained) leaves the output in float, as below.
            with tf.init_scope():  # the variable's value now (a Python decision, no Select op)
                initialized = bool(np.asarray(self.range_initialized.value.numpy()) > 0.5)
            if not initialized:
                return outputs
            return rebuild(quantizers.tf_fake_quant_activations(x, lo, hi, self.activation_bits))
        q = quantizers.fake_quant_activations(x, lo, hi, self.activation_bits)
        return rebuild(tf.where(initialized, q, x))


def _compute_dtype_of(layer):
    return keras.backend.standardize_dtype(layer.compute_dtype)


def _with_layer_dtype(layer, kwargs: dict) -> dict:
    """`kwargs` with the wrapped layer's dtype policy unless one is given: a wrapper computes
    in its layer's dtype (a float32 output layer in a mixed-precision model stays float32)."""
    if kwargs.get("dtype") is None:
        kwargs["dtype"] = layer.dtype_policy
    return kwargs


# --- quantisation-aware training ----------------------------------------------------------


class _QuantizedWrapper(_ActivationRangeMixin, keras.layers.Wrapper):
    """What `QuantizeWrapper` and `IntegerWeightsWrapper` share: the bit widths and
    `per_channel` in the config, the wrapped layer's output shape."""

    # The constructor arguments the config holds after the wrapped layer's (same-named attributes).
    config_attributes: tuple[str, ...] = ("weight_bits", "activation_bits", "per_channel")

    def compute_output_shape(self, input_shape) -> tuple | list:
        return self.layer.compute_output_shape(input_shape)

    def get_config(self) -> dict:
        return {**super().get_config(), **{name: getattr(self, name) for name in self.config_attributes}}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return super().from_config(dict(config), custom_objects=custom_objects)  # leaves `config` as it is


@keras.saving.register_keras_serializable(package="tf_sparseconv")
class QuantizeWrapper(_QuantizedWrapper):
    """Quantisation-aware training of one layer: fake-quantised kernels and outputs.

    The wrapped layer keeps its float kernels (trainable, original shapes); each
    call runs the layer with `fake_quant_weights(kernel)` in their place
    (symmetric, `weight_bits`, per output channel or per tensor; stochastic
    rounding during training when `rounding="stochastic"`) and fake-quantises
    the output (`activation_bits`, asymmetric over an EMA-tracked range, 0
    exact, unsigned after a ReLU; None leaves outputs in float). Gradients are
    straight-through.

    With `rounding="stochastic"` the wrapper has a non-trainable variable
    `stochastic_rounding` (1: training calls round stochastically, 0: they
    round to nearest, as inference always does). It is read inside the
    traced call, so `set_stochastic_rounding` takes effect in a compiled
    `fit` without retracing (see `FinishWithNearestRounding`), and it is
    saved with the model.

    Args:
      layer: a layer with kernels (see `kernel_specs`), e.g. Dense, Conv2D,
        DepthwiseConv2D, ChannelSparseConv2D, BlockSparseConv2D, SparseConv3D.
      weight_bits: 2-8.
      activation_bits: 2-8, or None.
      per_channel: one weight scale per output channel (else per tensor).
      rounding: "nearest" or "stochastic".
      ema_decay: decay of the activation range's moving average, in [0, 1).
      preserve_sparsity: keep the kernel's zeros at wrap time at zero (a
        non-trainable mask), for pruned-then-stripped models.
      seed: seed of the stochastic rounding (None: random).
    """

    config_attributes = (
        *_QuantizedWrapper.config_attributes,
        "rounding",
        "ema_decay",
        "preserve_sparsity",
        "seed",
    )

    def __init__(
        self,
        layer: keras.layers.Layer,
        weight_bits: int = 8,
        activation_bits: int | None = 8,
        per_channel: bool = True,
        rounding: str = "nearest",
        ema_decay: float = 0.99,
        preserve_sparsity: bool = False,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(layer, **_with_layer_dtype(layer, kwargs))
        self.weight_bits = quantizers.check_bits(weight_bits, "weight_bits")
        self.activation_bits = quantizers.check_bits(activation_bits, "activation_bits", allow_none=True)
        if not isinstance(per_channel, (bool, np.bool_)):
            raise ValueError(f"`per_channel` must be a bool, got {per_channel!r}")
        self.per_channel = bool(per_channel)
        self.rounding = quantizers.check_rounding(rounding)
        if not isinstance(ema_decay, (int, float)) or not 0.0 <= float(ema_decay) < 1.0:
            raise ValueError(f"`ema_decay` must be a number in [0, 1), got {ema_decay!r}")
        self.ema_decay = float(ema_decay)
        self.preserve_sparsity = bool(preserve_sparsity)
        self.seed = integer(seed, "seed", allow_none=True)
        self.seed_generator = keras.random.SeedGenerator(seed) if self.rounding == "stochastic" else None
        self.supports_jit = getattr(layer, "supports_jit", True)
        self.specs: list[KernelSpec] = []
        self.stochastic_rounding = None  # the switch variable (built, rounding="stochastic")

    def build(self, input_shape=None) -> None:
        self.specs = _build_layer(self, input_shape)
        self.masks = {}
        if self.preserve_sparsity:
            for spec in self.specs:
                kernel = _read(self.layer, spec)
                self.masks[spec.key] = self.add_weight(
                    name=f"{spec.key}_mask",
                    shape=kernel.shape,
                    initializer="ones",
                    trainable=False,
                    autocast=False,
                )
        self._add_range_variables()
        if self.rounding == "stochastic":
            self.stochastic_rounding = self.add_weight(
                name="stochastic_rounding", shape=(), initializer="ones", trainable=False, autocast=False
            )
        self.built = True

    def set_stochastic_rounding(self, enabled: bool) -> None:
        """Switches training-time weight rounding between stochastic (True) and nearest (False).

        Only for `rounding="stochastic"` wrappers (built); inference always rounds to nearest.
        """
        if not isinstance(enabled, (bool, np.bool_)):
            raise ValueError(f"`enabled` must be a bool, got {enabled!r}")
        if self.rounding != "stochastic":
            raise ValueError(
                f"set_stochastic_rounding: layer {self.name!r} has rounding={self.rounding!r}; "
                "only rounding='stochastic' wrappers can switch"
            )
        if not self.built:
            raise ValueError(f"set_stochastic_rounding: layer {self.name!r} is not built")
        self.stochastic_rounding.assign(1.0 if enabled else 0.0)

    def set_masks_from_kernels(self) -> None:
        """Sets each sparsity mask to `kernel != 0` (call after copying pruned weights in)."""
        for spec in self.specs:
            if spec.key in self.masks:
                mask = self.masks[spec.key]
                kernel = _float32_value(_read(self.layer, spec))
                mask.assign(tf.cast(tf.not_equal(kernel, 0), mask.dtype))

    def channel_axes(self, spec: KernelSpec) -> tuple[int, ...] | None:
        return spec.channel_axes if self.per_channel else None

    def _masked_kernel(self, spec: KernelSpec):
        """The float kernel (in its variable dtype, float32 under mixed precision) times its mask."""
        kernel = _float32_value(_read(self.layer, spec))
        if spec.key in self.masks:
            kernel = kernel * tf.cast(_float32_value(self.masks[spec.key]), kernel.dtype)
        return kernel

    def quantized_kernel(self, spec: KernelSpec, training: bool = False) -> tf.Tensor:
        """The fake-quantised kernel the layer runs with (in the layer's compute dtype, from
        float32 arithmetic; straight-through gradient)."""
        kernel = self._masked_kernel(spec)
        axes = self.channel_axes(spec)
        q = quantizers.fake_quant_weights(kernel, self.weight_bits, axes)
        if training and self.rounding == "stochastic":
            # Both roundings, selected by the variable (not by Python), so that switching
            # takes effect in an already traced train function.
            q_stochastic = quantizers.fake_quant_weights(
                kernel, self.weight_bits, axes, rounding="stochastic", seed=self.seed_generator
            )
            q = tf.where(_float32_value(self.stochastic_rounding) > 0.5, q_stochastic, q)
        elif converting() and not training:
            return self._converter_kernel(spec)
        return tf.cast(q, _compute_dtype_of(self.layer))

    def _converter_kernel(self, spec: KernelSpec):
        """The inference kernel for `for_converters()` graphs (see `converter_kernel`)."""
        with tf.init_scope():
            values, scales = self.integer_kernel(spec)
            values, scales = values.numpy(), scales.numpy()
        return converter_kernel(self.layer, values, scales, self.channel_axes(spec))

    def integer_kernel(self, spec: KernelSpec) -> tuple[tf.Tensor, tf.Tensor]:
        """`(values, scales)` of the kernel with nearest rounding (what `convert` stores)."""
        return quantizers.quantize_weights_int(
            self._masked_kernel(spec), self.weight_bits, self.channel_axes(spec)
        )

    def call(self, inputs, training=None) -> Any:
        training = bool(training)
        replacements = {spec: self.quantized_kernel(spec, training) for spec in self.specs}
        with _kernels_replaced(self.layer, replacements):
            outputs = self.layer(inputs)
        return self._quantize_output(outputs, training)

    def compute_output_spec(self, inputs, training=None) -> Any:
        return self.layer.compute_output_spec(inputs)


# --- converted (integer weights) -----------------------------------------------------------


@keras.saving.register_keras_serializable(package="tf_sparseconv")
class IntegerWeightsWrapper(_QuantizedWrapper):
    """Inference form of `QuantizeWrapper`: integer kernels plus float scales.

    Each kernel is stored as an int8 variable `<name>_values` (8-bit weights one
    per byte; 3-4-bit two per byte, 2-bit four per byte, see `pack_int`) and a
    float variable `<name>_scale` (per output channel or per tensor, with the
    kernel's rank); the wrapped layer holds no float kernel. A call unpacks
    the integers, multiplies by the scales and runs the layer with that
    kernel, then fake-quantises the output over the frozen range, which
    reproduces the QAT model's inference exactly. All variables are
    non-trainable.
    """

    def __init__(
        self,
        layer: keras.layers.Layer,
        weight_bits: int = 8,
        activation_bits: int | None = 8,
        per_channel: bool = True,
        **kwargs,
    ):
        super().__init__(layer, **_with_layer_dtype(layer, kwargs))
        self.weight_bits = quantizers.check_bits(weight_bits, "weight_bits")
        self.activation_bits = quantizers.check_bits(activation_bits, "activation_bits", allow_none=True)
        self.per_channel = bool(per_channel)
        self.supports_jit = getattr(layer, "supports_jit", True)
        self.trainable = False
        self.specs: list[KernelSpec] = []

    def build(self, input_shape=None) -> None:
        self.specs = _build_layer(self, input_shape)
        self.kernel_shapes = {}
        self.values = {}
        self.scales = {}
        # Drop the layer's float kernels: the integer values replace them.
        attrs = {}
        for spec in self.specs:
            variable = _read(self.layer, spec)
            shape = tuple(int(d) for d in variable.shape)
            self.kernel_shapes[spec.key] = shape
            self.layer._untrack_variable(variable)
            attrs.setdefault(spec.attr, self.layer.__dict__[spec.attr])
            size = int(np.prod(shape))
            self.values[spec.key] = self.add_weight(
                name=f"{spec.key}_values",
                shape=(quantizers.packed_size(size, self.weight_bits),),
                initializer="zeros",
                dtype="int8",
                trainable=False,
            )
            axes = quantizers._reduce_axes(len(shape), spec.channel_axes if self.per_channel else None)
            scale_shape = tuple(1 if a in axes else d for a, d in enumerate(shape))
            self.scales[spec.key] = self.add_weight(
                name=f"{spec.key}_scale",
                shape=scale_shape,
                initializer="ones",
                trainable=False,
                autocast=False,
            )
        for attr, value in attrs.items():
            delattr(self.layer, attr)  # removes TensorFlow's tracking of the attribute too
            object.__setattr__(
                self.layer, attr, None if not isinstance(value, (list, tuple)) else [None] * len(value)
            )
        # Keras' own Dense/Conv save and load their kernel by name; the layer has none now, so
        # it saves and loads its remaining variables (biases, ...) in order, as a base Layer does.
        for method in ("save_own_variables", "load_own_variables"):
            bound = types.MethodType(getattr(keras.layers.Layer, method), self.layer)
            object.__setattr__(self.layer, method, bound)
        self._add_range_variables()
        self.built = True

    def set_integer_kernel(self, spec: KernelSpec, values, scales) -> None:
        self.values[spec.key].assign(
            quantizers.pack_int(np.rint(np.asarray(values)).astype(np.int64), self.weight_bits)
        )
        self.scales[spec.key].assign(np.asarray(scales, np.float32).reshape(self.scales[spec.key].shape))

    def dequantized_kernel(self, spec: KernelSpec) -> tf.Tensor:
        shape = self.kernel_shapes[spec.key]
        if converting():
            with tf.init_scope():
                packed = self.values[spec.key].value.numpy()
                scales = self.scales[spec.key].value.numpy()
            values = quantizers.unpack_int(packed, self.weight_bits, int(np.prod(shape))).reshape(shape)
            axes = spec.channel_axes if self.per_channel else None
            return converter_kernel(self.layer, values, scales, axes)
        values = quantizers.unpack_int_tf(
            tf.convert_to_tensor(self.values[spec.key]), self.weight_bits, shape
        )
        kernel = values * _float32_value(self.scales[spec.key])  # float32, cast once
        return tf.cast(kernel, _compute_dtype_of(self.layer))

    def call(self, inputs) -> Any:
        replacements = {spec: self.dequantized_kernel(spec) for spec in self.specs}
        with _kernels_replaced(self.layer, replacements):
            outputs = self.layer(inputs)
        return self._quantize_output(outputs, training=False)

    def compute_output_spec(self, inputs) -> Any:
        replacements = {spec: self.dequantized_kernel(spec) for spec in self.specs}
        with _kernels_replaced(self.layer, replacements):
            return self.layer.compute_output_spec(inputs)
