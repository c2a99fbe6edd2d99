"""Keras 3 layers of tf_sparseconv (TensorFlow backend).

Every layer class of the package is reachable here, including those that live with their
training tools: `StreamingConv1D` (`tsc.streaming`), `PruneLowMagnitude` (`tsc.pruning`),
`QuantizeWrapper`, `IntegerWeightsWrapper` and `QuantizeAnnotate` (`tsc.quantization`).
Those are imported on first access (they import this module themselves).
"""

from tf_sparseconv.python.layers.block_sparse import BlockSparseConv2D, BlockSparseResidualBlock
from tf_sparseconv.python.layers.channel_sparse import (
    ChannelSparseConv1D,
    ChannelSparseConv2D,
    channel_sparse_from_conv,
)
from tf_sparseconv.python.layers.coord_sparse import (
    Densify,
    SparseAveragePooling1D,
    SparseAveragePooling2D,
    SparseAveragePooling3D,
    SparseBatchNormalization,
    SparseConv1D,
    SparseConv2D,
    SparseConv3D,
    SparseConvTranspose1D,
    SparseConvTranspose2D,
    SparseConvTranspose3D,
    SparseGlobalPooling,
    SparseMap,
    SparseMaxPooling1D,
    SparseMaxPooling2D,
    SparseMaxPooling3D,
    Sparsify,
)
from tf_sparseconv.python.layers.topk import KWinners, TopKAttention

__all__ = [
    "BlockSparseConv2D",
    "BlockSparseResidualBlock",
    "ChannelSparseConv1D",
    "ChannelSparseConv2D",
    "Densify",
    "KWinners",
    "SparseAveragePooling1D",
    "SparseAveragePooling2D",
    "SparseAveragePooling3D",
    "SparseBatchNormalization",
    "SparseConv1D",
    "SparseConv2D",
    "SparseConv3D",
    "SparseConvTranspose1D",
    "SparseConvTranspose2D",
    "SparseConvTranspose3D",
    "SparseGlobalPooling",
    "SparseMap",
    "SparseMaxPooling1D",
    "SparseMaxPooling2D",
    "SparseMaxPooling3D",
    "Sparsify",
    "TopKAttention",
    "channel_sparse_from_conv",
    "IntegerWeightsWrapper",
    "PruneLowMagnitude",
    "QuantizeAnnotate",
    "QuantizeWrapper",
    "StreamingConv1D",
]

_ELSEWHERE = {
    "StreamingConv1D": "tf_sparseconv.python.streaming.layers",
    "PruneLowMagnitude": "tf_sparseconv.python.pruning.wrapper",
    "QuantizeWrapper": "tf_sparseconv.python.quantization.wrappers",
    "IntegerWeightsWrapper": "tf_sparseconv.python.quantization.wrappers",
    "QuantizeAnnotate": "tf_sparseconv.python.quantization.annotate",
}


def __getattr__(name: str):
    if name in _ELSEWHERE:
        import importlib

        return getattr(importlib.import_module(_ELSEWHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_ELSEWHERE))
