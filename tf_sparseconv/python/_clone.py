"""Layer-by-layer cloning of Sequential/Functional models, all of it: shared by tsc.pruning,
tsc.quantization and tsc.streaming."""

from __future__ import annotations

import keras


def is_cloneable(model) -> bool:
    """True for the models `keras.models.clone_model` can rebuild (Sequential, Functional)."""
    from keras.src.models.functional import Functional

    return isinstance(model, (keras.Sequential, Functional))


def check_cloneable(model, name: str = "model") -> None:
    """ValueError naming `name` unless `model` is a Sequential or Functional model."""
    if not is_cloneable(model):
        raise ValueError(
            f"`{name}` must be a Sequential or Functional Keras model, got {type(model).__name__} "
            "(subclassed models cannot be cloned; wrap their layers yourself)"
        )


def fresh_layer(layer: keras.layers.Layer) -> keras.layers.Layer:
    """A new, unbuilt layer from `layer`'s config (a Lambda's Python function is reused: the
    model is already in memory, so Keras' safe mode for loading files does not apply)."""
    from keras.src.saving.serialization_lib import SafeModeScope

    with SafeModeScope(False):
        return layer.__class__.from_config(layer.get_config())


def copy_layer_weights(old, new) -> None:
    """Assigns `old`'s weights to `new`'s, in order (the same count)."""
    old_weights, new_weights = old.weights, new.weights
    if len(old_weights) != len(new_weights):
        raise ValueError(
            f"cannot copy the weights of {old.name!r}: {len(old_weights)} weights, the clone has "
            f"{len(new_weights)}"
        )
    for source, target in zip(old_weights, new_weights):
        target.assign(source.value)


def find_layers(model, layer_type: type) -> list:
    """Every layer of `layer_type` in `model` (nested models included, not looking inside the
    layers found), each once, in depth-first order."""
    found: list = []
    seen: set[int] = set()

    def visit(layer):
        if id(layer) in seen:
            return
        seen.add(id(layer))
        if isinstance(layer, layer_type):
            found.append(layer)
            return
        for child in getattr(layer, "layers", None) or []:
            visit(child)

    visit(model)
    return found


def clone_layers(model, make_layer):
    """`keras.models.clone_model(model, recursive=True)` with `make_layer(old) -> new` for every
    layer (nested models included). Returns `(new_model, pairs)`, `pairs` listing each
    `(old_layer, new_layer)` in cloning order, for the caller to copy weights."""
    pairs = []

    def clone_function(layer):
        new = make_layer(layer)
        pairs.append((layer, new))
        return new

    return keras.models.clone_model(model, clone_function=clone_function, recursive=True), pairs


def clone_with(model, make_layer, copy_weights) -> keras.Model:
    """`clone_layers` with the weights copied: `copy_weights(old_layer, new_layer)` runs for each
    cloned layer once the new model is built."""
    check_cloneable(model)
    new_model, pairs = clone_layers(model, make_layer)
    for old, new in pairs:
        copy_weights(old, new)
    return new_model
