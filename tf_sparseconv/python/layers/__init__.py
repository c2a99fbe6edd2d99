"""Keras 3 layers of tf_sparseconv (TensorFlow backend)."""

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
]
