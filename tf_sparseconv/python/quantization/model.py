"""`quantize_model`, `quantize_apply` and `convert`: quantisation-aware training of a whole model
(or of its annotated layers) and integer export."""

from __future__ import annotations

import keras
import numpy as np

from tf_sparseconv.python._clone import check_cloneable, clone_layers, fresh_layer
from tf_sparseconv.python.quantization import quantizers
from tf_sparseconv.python.quantization.annotate import QuantizeAnnotate
from tf_sparseconv.python.quantization.wrappers import (
    IntegerWeightsWrapper,
    QuantizeWrapper,
    _read,
    kernel_specs,
)


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
    check_cloneable(model, name)


def _check_options(weight_bits, activation_bits, per_channel, rounding) -> None:
    quantizers.check_bits(weight_bits, "weight_bits")
    quantizers.check_bits(activation_bits, "activation_bits", allow_none=True)
    quantizers.check_rounding(rounding)
    if not isinstance(per_channel, (bool, np.bool_)):
        raise ValueError(f"`per_channel` must be a bool, got {per_channel!r}")


def _quantize(model: keras.Model, annotated_only: bool, prefix: str, options: dict, seed) -> keras.Model:
    """The QAT copy of `model`: with `annotated_only`, only the layers marked by a
    `QuantizeAnnotate` are quantised (every marker is removed); else every layer with kernels
    (markers are looked through)."""
    counter = iter(range(1 << 30))

    def wrap(layer, preserve_sparsity):
        return QuantizeWrapper(
            fresh_layer(layer),
            **{**options, "preserve_sparsity": preserve_sparsity or options["preserve_sparsity"]},
            seed=None if seed is None else seed + next(counter),
            name=f"{prefix}{layer.name}",
        )

    def make_layer(layer):
        if isinstance(layer, (QuantizeWrapper, IntegerWeightsWrapper)):
            raise ValueError(f"`model` is already quantised (layer {layer.name!r})")
        selected = not annotated_only
        if isinstance(layer, QuantizeAnnotate):
            layer, selected = layer.layer, True
        if not selected:
            return fresh_layer(layer)
        if layer.built and kernel_specs(layer):
            return wrap(layer, False)
        if _is_pruning_wrapper(layer) and kernel_specs(layer.layer):
            # Quantise the pruned layer itself; the pruning mask is kept, frozen, as the
            # sparsity mask (pruning stops here: its schedule should have reached its end).
            return wrap(layer.layer, True)
        if _wraps_kernel(layer):
            raise ValueError(
                f"cannot quantise inside the wrapper layer {layer.name!r} "
                f"({type(layer).__name__}). For pruning wrappers, strip them first: prune, fit, "
                "strip_pruning, then quantize_model(..., preserve_sparsity=True)."
            )
        return fresh_layer(layer)  # nothing to quantise (no kernel): copied as it is

    qat_model, pairs = clone_layers(model, make_layer)
    for old, new in pairs:
        source = old.layer if isinstance(old, QuantizeAnnotate) else old  # holds the weights
        if isinstance(new, QuantizeWrapper) and _is_pruning_wrapper(source):
            new.layer.set_weights(source.layer.get_weights())
            new.set_masks_from_kernels()
            attributes = getattr(source, "pruned_attributes", [source.kernel_attribute])
            masks = getattr(source, "masks", [source.mask])
            for spec in new.specs:
                for attribute, mask in zip(attributes, masks):
                    if spec.attr == attribute and spec.index is None:
                        new.masks[spec.key].assign(mask.numpy().astype(np.float32))
        elif isinstance(new, QuantizeWrapper):
            new.layer.set_weights(source.get_weights())
            new.set_masks_from_kernels()
        elif source.weights:
            new.set_weights(source.get_weights())
    return qat_model


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
    weights are copied. `QuantizeAnnotate` markers are looked through (to
    quantise only the marked layers, use `quantize_apply`).

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
    _check_options(weight_bits, activation_bits, per_channel, rounding)
    _check_model(model)
    options = {
        "weight_bits": weight_bits,
        "activation_bits": activation_bits,
        "per_channel": per_channel,
        "rounding": rounding,
        "ema_decay": ema_decay,
        "preserve_sparsity": preserve_sparsity,
    }
    return _quantize(model, False, "quant_", options, seed)


def _has_annotation(model) -> bool:
    for layer in model.layers:
        if isinstance(layer, QuantizeAnnotate):
            return True
        if isinstance(layer, keras.Model) and _has_annotation(layer):
            return True
    return False


def quantize_apply(
    model: keras.Model,
    scheme=None,
    quantized_layer_name_prefix: str | None = "quant_",
    *,
    weight_bits: int = 8,
    activation_bits: int | None = 8,
    per_channel: bool = True,
    rounding: str = "nearest",
    ema_decay: float = 0.99,
    preserve_sparsity: bool = False,
    seed: int | None = None,
) -> keras.Model:
    """The QAT copy of an annotated model: only the marked layers are quantised (tfmot's
    `quantize_apply`).

    Each layer marked by `quantize_annotate_layer` / `quantize_annotate_model`
    that has kernels (or a `tsc.pruning` wrapper of one) becomes a
    `QuantizeWrapper`, exactly as `quantize_model` makes it (8-bit weights per
    output channel and 8-bit activations by default); marked layers without
    kernels (Flatten, pooling, ...) and unmarked layers are copied unchanged,
    and every `QuantizeAnnotate` marker is removed. Weights are copied; the
    annotated model is untouched. `convert` turns the result into integers.

    Args:
      model: a built Sequential or Functional model with at least one marked layer.
      scheme: tfmot's `QuantizeScheme`: not supported (None only; the default scheme
        is this package's 8-bit one).
      quantized_layer_name_prefix: prefix of the QuantizeWrapper names (tfmot's "quant_").
      weight_bits, activation_bits, per_channel, rounding, ema_decay,
        preserve_sparsity, seed: as in `quantize_model`, for every marked layer.

    Returns:
      The QAT model.
    """
    if scheme is not None:
        raise ValueError(
            f"`scheme` is not supported by tsc.quantization (got {scheme!r}): the marked layers are "
            "quantised with quantize_model's options (weight_bits, activation_bits, per_channel, ...)"
        )
    _check_options(weight_bits, activation_bits, per_channel, rounding)
    _check_model(model)
    if not _has_annotation(model):
        raise ValueError(
            "`model` has no layer marked for quantisation: mark layers with quantize_annotate_layer or "
            "quantize_annotate_model (or quantise every layer with quantize_model)"
        )
    if quantized_layer_name_prefix is None:
        quantized_layer_name_prefix = ""
    if not isinstance(quantized_layer_name_prefix, str):
        raise ValueError(f"`quantized_layer_name_prefix` must be a str, got {quantized_layer_name_prefix!r}")
    options = {
        "weight_bits": weight_bits,
        "activation_bits": activation_bits,
        "per_channel": per_channel,
        "rounding": rounding,
        "ema_decay": ema_decay,
        "preserve_sparsity": preserve_sparsity,
    }
    return _quantize(model, True, quantized_layer_name_prefix, options, seed)


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
                fresh_layer(layer.layer),
                weight_bits=layer.weight_bits,
                activation_bits=layer.activation_bits,
                per_channel=layer.per_channel,
                name=layer.name,
            )
        return fresh_layer(layer)

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
