"""`quantize_model` and `convert`: whole-model quantisation-aware training and integer export."""

from __future__ import annotations

import keras
import numpy as np

from tf_sparseconv.python._clone import clone_layers, is_cloneable
from tf_sparseconv.python.quantization import quantizers
from tf_sparseconv.python.quantization.wrappers import (
    IntegerWeightsWrapper,
    QuantizeWrapper,
    _read,
    kernel_specs,
)


def _clone_layer(layer: keras.layers.Layer) -> keras.layers.Layer:
    """A fresh layer from `layer`'s config (a Lambda's Python function is reused: the model is
    already in memory, so Keras' safe mode for loading files does not apply)."""
    from keras.src.saving.serialization_lib import SafeModeScope

    with SafeModeScope(False):
        return layer.__class__.from_config(layer.get_config())


def _wraps_kernel(layer) -> bool:
    """Whether `layer` wraps (via `.layer`, as Keras wrappers and pruning wrappers do) a layer
    with kernels."""
    inner = getattr(layer, "layer", None)
    while isinstance(inner, keras.layers.Layer):
        if inner.built and kernel_specs(inner):
            return True
        inner = getattr(inner, "layer", None)
    return False


def _is_pruning_wrapper(layer) -> bool:
    """A `tsc.pruning` wrapper (duck-typed): wraps `.layer`, whose kernel attribute
    `kernel_attribute` it multiplies by its `mask` variable in the forward pass."""
    return (
        isinstance(getattr(layer, "layer", None), keras.layers.Layer)
        and isinstance(getattr(layer, "kernel_attribute", None), str)
        and isinstance(getattr(layer, "mask", None), keras.Variable)
    )


def _check_model(model, name: str = "model"):
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"`{name}` must be a Keras Sequential or Functional model, got {type(model).__name__}"
        )
    if not model.built:
        raise ValueError(f"`{name}` must be built (call it once or give it an Input)")
    if not is_cloneable(model):
        raise ValueError(
            f"`{name}` must be a Sequential or Functional model (subclassed models cannot be cloned), "
            f"got {type(model).__name__}"
        )


def quantize_model(
    model: keras.Model,
    weight_bits: int = 8,
    activation_bits: int | None = 8,
    per_channel: bool = True,
    rounding: str = "nearest",
    ema_decay: float = 0.99,
    preserve_sparsity: bool = False,
    seed: int | None = None,
) -> keras.Model:
    """A copy of `model` for quantisation-aware training.

    Every layer with kernels — Dense, Conv1D/2D/3D, DepthwiseConv1D/2D,
    SeparableConv*, Conv*Transpose and the `tsc.layers` convolutions
    (ChannelSparseConv1D/2D, BlockSparseConv2D, SparseConv1D/2D/3D,
    SparseConvTranspose*, BlockSparseResidualBlock) — is wrapped in a
    `QuantizeWrapper`: its float kernels stay trainable weights of the original
    shapes and are fake-quantised in the forward pass (symmetric, per output
    channel when `per_channel`), and its outputs (for sparse maps: the
    features) are fake-quantised over EMA-tracked ranges. Other layers
    (KWinners, TopKAttention, pooling, normalisation, activations, ...) are
    copied unchanged: KWinners keeps a subset of its quantised inputs and
    zeros, which stay on the grid. The original model is untouched; all
    weights are copied.

    Pruning: a `tsc.pruning` wrapper is replaced by a QuantizeWrapper of the
    layer it prunes, with its current mask frozen as the sparsity mask (so
    prune → fit to the final sparsity → quantize_model → fit → convert keeps
    the pruned zeros; pruning stops at quantize_model). Equivalently: prune,
    fit, strip_pruning, then quantize_model(preserve_sparsity=True). Any other
    layer that wraps a layer with kernels (e.g. TimeDistributed(Dense)) is an
    error.

    Args:
      model: a built Sequential or Functional model.
      weight_bits: 2-8.
      activation_bits: 2-8, or None to keep activations in float.
      per_channel: per-output-channel weight scales (else one per tensor).
      rounding: "nearest" or "stochastic" (weights, during training only; inference
        rounds to nearest, so end `fit` with `FinishWithNearestRounding`).
      ema_decay: decay of the activation ranges' moving averages.
      preserve_sparsity: keep exact zeros of the kernels at zero while training.
      seed: seed of the stochastic rounding (wrapper `i` gets `seed + i`).

    Returns:
      The QAT model (call `compile` and `fit` on it, then `convert`).
    """
    quantizers.check_bits(weight_bits, "weight_bits")
    quantizers.check_bits(activation_bits, "activation_bits", allow_none=True)
    quantizers.check_rounding(rounding)
    if not isinstance(per_channel, (bool, np.bool_)):
        raise ValueError(f"`per_channel` must be a bool, got {per_channel!r}")
    _check_model(model)
    counter = iter(range(1 << 30))

    def make_layer(layer):
        if isinstance(layer, (QuantizeWrapper, IntegerWeightsWrapper)):
            raise ValueError(f"`model` is already quantised (layer {layer.name!r})")
        if layer.built and kernel_specs(layer):
            return QuantizeWrapper(
                _clone_layer(layer),
                weight_bits=weight_bits,
                activation_bits=activation_bits,
                per_channel=per_channel,
                rounding=rounding,
                ema_decay=ema_decay,
                preserve_sparsity=preserve_sparsity,
                seed=None if seed is None else seed + next(counter),
                name=f"quant_{layer.name}",
            )
        if _is_pruning_wrapper(layer) and kernel_specs(layer.layer):
            # Quantise the pruned layer itself; the pruning mask is kept, frozen, as the
            # sparsity mask (pruning stops here: its schedule should have reached its end).
            return QuantizeWrapper(
                _clone_layer(layer.layer),
                weight_bits=weight_bits,
                activation_bits=activation_bits,
                per_channel=per_channel,
                rounding=rounding,
                ema_decay=ema_decay,
                preserve_sparsity=True,
                seed=None if seed is None else seed + next(counter),
                name=f"quant_{layer.layer.name}",
            )
        if _wraps_kernel(layer):
            raise ValueError(
                f"quantize_model cannot quantise inside the wrapper layer {layer.name!r} "
                f"({type(layer).__name__}). For pruning wrappers, strip them first: prune, fit, "
                "strip_pruning, then quantize_model(..., preserve_sparsity=True)."
            )
        return _clone_layer(layer)

    qat_model, pairs = clone_layers(model, make_layer)
    for old, new in pairs:
        if isinstance(new, QuantizeWrapper) and _is_pruning_wrapper(old):
            new.layer.set_weights(old.layer.get_weights())
            new.set_masks_from_kernels()
            for spec in new.specs:
                if spec.attr == old.kernel_attribute and spec.index is None:
                    new.masks[spec.key].assign(old.mask.numpy().astype(np.float32))
        elif isinstance(new, QuantizeWrapper):
            new.layer.set_weights(old.get_weights())
            new.set_masks_from_kernels()
        elif old.weights:
            new.set_weights(old.get_weights())
    return qat_model


def convert(qat_model: keras.Model) -> keras.Model:
    """The inference model of a QAT model: integer kernels plus float scales.

    Each `QuantizeWrapper` becomes an `IntegerWeightsWrapper` holding its
    kernels as int8 variables (8-bit values one per byte, 3-4-bit two per
    byte, 2-bit four per byte) and float scales, and the QAT model's frozen
    activation ranges; its predictions equal the QAT model's in inference
    mode. Other layers and weights (biases, normalisation) are copied.

    Args:
      qat_model: a model from `quantize_model` (trained or not).

    Returns:
      A new model (non-trainable quantised layers) for `predict`, `.keras` save and `export`.
    """
    _check_model(qat_model, "qat_model")

    def make_layer(layer):
        if isinstance(layer, QuantizeWrapper):
            return IntegerWeightsWrapper(
                _clone_layer(layer.layer),
                weight_bits=layer.weight_bits,
                activation_bits=layer.activation_bits,
                per_channel=layer.per_channel,
                name=layer.name,
            )
        return _clone_layer(layer)

    converted, pairs = clone_layers(qat_model, make_layer)
    if not any(isinstance(new, IntegerWeightsWrapper) for _, new in pairs):
        raise ValueError("`qat_model` has no QuantizeWrapper layer: make it with quantize_model")
    for old, new in pairs:
        if isinstance(new, IntegerWeightsWrapper):
            kernel_ids = {id(_read(old.layer, spec)) for spec in old.specs}
            rest = [w for w in old.layer.weights if id(w) not in kernel_ids]
            for target, source in zip(new.layer.weights, rest, strict=True):
                target.assign(source)
            for old_spec, new_spec in zip(old.specs, new.specs, strict=True):
                values, scales = old.integer_kernel(old_spec)
                new.set_integer_kernel(new_spec, values.numpy(), scales.numpy())
            new.activation_min.assign(old.activation_min)
            new.activation_max.assign(old.activation_max)
            new.range_initialized.assign(old.range_initialized)
        elif old.weights:
            new.set_weights(old.get_weights())
    return converted
