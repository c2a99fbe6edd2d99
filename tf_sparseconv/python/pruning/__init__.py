"""Magnitude pruning for Keras 3 (`tsc.pruning`), tfmot-compatible API.

`prune_low_magnitude` wraps layers (or every prunable layer of a model) in
`PruneLowMagnitude`; `UpdatePruningStep` drives the schedule during `fit`,
`PruningSummaries` logs sparsities to TensorBoard, and `strip_pruning` returns
a plain (optionally channel-sparse) model. Schedules `ConstantSparsity` and
`PolynomialDecay` match tensorflow-model-optimization's, whose own schedule
objects are accepted too (tfmot is never imported).
"""

from tf_sparseconv.python.pruning.callbacks import PruningSummaries, UpdatePruningStep
from tf_sparseconv.python.pruning.masks import GRANULARITIES, compute_mask
from tf_sparseconv.python.pruning.schedules import ConstantSparsity, PolynomialDecay, PruningSchedule
from tf_sparseconv.python.pruning.strip import strip_pruning
from tf_sparseconv.python.pruning.wrapper import (
    PruneLowMagnitude,
    collect_pruned_layers,
    prunable_types,
    prune_low_magnitude,
)

__all__ = [
    "GRANULARITIES",
    "ConstantSparsity",
    "PolynomialDecay",
    "PruneLowMagnitude",
    "PruningSchedule",
    "PruningSummaries",
    "UpdatePruningStep",
    "collect_pruned_layers",
    "compute_mask",
    "prunable_types",
    "prune_low_magnitude",
    "strip_pruning",
]
