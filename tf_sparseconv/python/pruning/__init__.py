"""Magnitude pruning for Keras 3 (`tsc.pruning`), tfmot-compatible API.

`prune_low_magnitude` wraps layers (or every prunable layer of a model) in
`PruneLowMagnitude`; `UpdatePruningStep` drives the schedule during `fit`,
`PruningSummaries` logs sparsities to TensorBoard, and `strip_pruning` returns
a plain (optionally channel-sparse) model. Schedules `ConstantSparsity` and
`PolynomialDecay` match tensorflow-model-optimization's, whose own schedule
objects are accepted too (tfmot is never imported). tfmot's pruning code runs
with only the module swapped (`prune_scope`, `PrunableLayer`, `block_size=`,
`sparsity_m_by_n=`, NumPy integers, callbacks driven by hand, tfmot's steps).
"""

import keras

from tf_sparseconv.python.pruning.callbacks import PruningSummaries, UpdatePruningStep
from tf_sparseconv.python.pruning.masks import GRANULARITIES, compute_mask
from tf_sparseconv.python.pruning.prunable_layer import PrunableLayer
from tf_sparseconv.python.pruning.schedules import ConstantSparsity, PolynomialDecay, PruningSchedule
from tf_sparseconv.python.pruning.strip import strip_pruning
from tf_sparseconv.python.pruning.wrapper import (
    PruneLowMagnitude,
    collect_pruned_layers,
    prunable_types,
    prune_low_magnitude,
)


def prune_scope() -> keras.saving.CustomObjectScope:
    """A Keras custom-object scope with the pruning classes (tfmot's `prune_scope`).

    Not needed with tf_sparseconv (its classes are registered Keras serialisables, so
    `keras.models.load_model` finds them anyway); kept so that tfmot code runs unchanged:

    ```python
    with tsc.pruning.prune_scope():
        loaded = keras.models.load_model(path)
    ```
    """
    return keras.saving.custom_object_scope(
        {
            "PruneLowMagnitude": PruneLowMagnitude,
            "ConstantSparsity": ConstantSparsity,
            "PolynomialDecay": PolynomialDecay,
        }
    )


__all__ = [
    "GRANULARITIES",
    "ConstantSparsity",
    "PolynomialDecay",
    "PrunableLayer",
    "PruneLowMagnitude",
    "PruningSchedule",
    "PruningSummaries",
    "UpdatePruningStep",
    "collect_pruned_layers",
    "compute_mask",
    "prunable_types",
    "prune_low_magnitude",
    "prune_scope",
    "strip_pruning",
]
