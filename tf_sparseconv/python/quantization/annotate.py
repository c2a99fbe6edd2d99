"""tfmot's annotate-then-apply QAT API: `quantize_annotate_layer`, `quantize_annotate_model`,
`quantize_apply`, `quantize_scope`.

`quantize_annotate_layer(layer)` wraps a layer in `QuantizeAnnotate`, a pass-through
marker; `quantize_annotate_model(model)` marks every layer of a copy of a model;
`quantize_apply(model)` returns a copy in which exactly the marked layers that have
kernels are `QuantizeWrapper`s (`quantize_model`'s machinery and defaults: 8-bit
weights per output channel, 8-bit activations) and every marker is removed.
tfmot's `QuantizeConfig` (custom quantisers per layer) is not supported.
"""

from __future__ import annotations

from typing import Any

import keras

from tf_sparseconv.python._clone import is_cloneable
from tf_sparseconv.python.layers._base import adopt_input_of

_CONFIG_UNSUPPORTED = (
    "`quantize_config` is not supported by tsc.quantization (got {config!r}): annotated layers "
    "are quantised with the defaults of `quantize_model` (8-bit weights per output channel, 8-bit "
    "activations); for other bit widths pass them to `quantize_apply(model, weight_bits=..., "
    "activation_bits=...)`"
)


@keras.saving.register_keras_serializable(package="tf_sparseconv")
class QuantizeAnnotate(keras.layers.Wrapper):
    """Marks a layer for `quantize_apply`; calls the layer unchanged (no quantisation yet).

    Args:
      layer: the Keras layer to quantise.
      **kwargs: Keras layer arguments (`name`, ...).
    """

    def __init__(self, layer: keras.layers.Layer, **kwargs):
        if not isinstance(layer, keras.layers.Layer) or isinstance(layer, keras.Model):
            raise ValueError(f"`layer` must be a Keras layer (not a model), got {layer!r}")
        if isinstance(layer, QuantizeAnnotate):
            raise ValueError(f"`layer` {layer.name!r} is already annotated")
        kwargs.setdefault("name", f"quantize_annotate_{layer.name}")
        kwargs.setdefault("dtype", layer.dtype_policy)
        super().__init__(layer, **kwargs)
        adopt_input_of(self, layer)

    def build(self, input_shape=None) -> None:
        if not self.layer.built:
            self.layer.build(input_shape)
            self.layer.built = True
        self.built = True

    def call(self, inputs, training=None) -> Any:
        return self.layer(inputs, training=training)

    def compute_output_shape(self, input_shape) -> tuple | list:
        return self.layer.compute_output_shape(input_shape)

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return super().from_config(dict(config), custom_objects=custom_objects)


def quantize_annotate_layer(to_annotate: keras.layers.Layer, quantize_config=None) -> QuantizeAnnotate:
    """Marks a layer to be quantised by `quantize_apply` (tfmot's function of that name).

    Args:
      to_annotate: a Keras layer (not a model).
      quantize_config: tfmot's per-layer `QuantizeConfig`: not supported (None only).

    Returns:
      The layer wrapped in a `QuantizeAnnotate` marker (usable in Sequential and
      Functional models, also as the first layer of a Sequential with `input_shape=`).
    """
    if quantize_config is not None:
        raise ValueError(_CONFIG_UNSUPPORTED.format(config=quantize_config))
    if not isinstance(to_annotate, keras.layers.Layer) or isinstance(to_annotate, keras.Model):
        raise ValueError(f"`to_annotate` must be a Keras layer (not a model), got {to_annotate!r}")
    return QuantizeAnnotate(to_annotate)


def quantize_annotate_model(to_annotate: keras.Model) -> keras.Model:
    """A copy of a Sequential/Functional model with every layer marked for `quantize_apply`
    (layers already marked stay as they are; weights are shared with `to_annotate`, as tfmot's
    clone does).

    Args:
      to_annotate: a Sequential or Functional model (nested models are not supported, as in tfmot).

    Returns:
      The annotated model (pass it to `quantize_apply`).
    """
    if not isinstance(to_annotate, keras.Model) or not is_cloneable(to_annotate):
        raise ValueError(
            "`to_annotate` must be a Keras Sequential or Functional model (use quantize_annotate_layer "
            f"for single layers), got {type(to_annotate).__name__}"
        )

    def annotate(layer):
        if isinstance(layer, QuantizeAnnotate):
            return layer
        if isinstance(layer, keras.Model):
            raise ValueError(
                f"quantize_annotate_model: the nested model {layer.name!r} is not supported (as in tfmot); "
                "annotate its layers with quantize_annotate_layer, or use quantize_model"
            )
        return QuantizeAnnotate(layer)

    return keras.models.clone_model(to_annotate, clone_function=annotate)


def quantize_scope(*args) -> keras.saving.CustomObjectScope:
    """A Keras custom-object scope with the quantisation classes (tfmot's `quantize_scope`).

    tf_sparseconv's classes are registered Keras serialisables, so `.keras` and `.h5`
    files load without it; kept so that tfmot code runs unchanged. Extra `{name: class}`
    dicts in `args` join the scope (as tfmot's custom layers do).
    """
    from tf_sparseconv.python.quantization.wrappers import IntegerWeightsWrapper, QuantizeWrapper

    objects = {}
    for extra in args:
        if not isinstance(extra, dict):
            raise ValueError(f"`quantize_scope` takes dicts of {{name: class}}, got {extra!r}")
        objects.update(extra)
    objects.update(
        {
            "QuantizeAnnotate": QuantizeAnnotate,
            "QuantizeWrapper": QuantizeWrapper,
            "IntegerWeightsWrapper": IntegerWeightsWrapper,
        }
    )
    return keras.saving.custom_object_scope(objects)
