"""Keras 3 layers of tf_sparseconv (TensorFlow backend)."""

from tf_sparseconv.python.layers.topk import KWinners, TopKAttention

__all__ = ["KWinners", "TopKAttention"]
