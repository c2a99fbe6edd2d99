"""Layer-by-layer cloning of Sequential/Functional models (shared by tsc.pruning and tsc.quantization)."""

from __future__ import annotations

import keras


def is_cloneable(model) -> bool:
    """True for the models `keras.models.clone_model` can rebuild (Sequential, Functional)."""
    from keras.src.models.functional import Functional

    return isinstance(model, (keras.Sequential, Functional))


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
