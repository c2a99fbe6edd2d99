"""Keras 3 layers of tf_sparseconv (TensorFlow backend)."""

from tf_sparseconv.python.layers.block_sparse import BlockSparseConv2D, BlockSparseResidualBlock
from tf_sparseconv.python.layers.channel_sparse import (
    ChannelSparseConv1D,
    ChannelSparseConv2D,
    channel_sparse_from_conv,
)
from tf_sparseconv.python.layers.topk import KWinners, TopKAttention

__all__ = [
    "BlockSparseConv2D",
    "BlockSparseResidualBlock",
    "ChannelSparseConv1D",
    "ChannelSparseConv2D",
    "KWinners",
    "TopKAttention",
    "channel_sparse_from_conv",
]
