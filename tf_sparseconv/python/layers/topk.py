"""Keras layers for k-winners-take-all and top-k attention."""

from __future__ import annotations

import math
from typing import Any

import keras
import tensorflow as tf

from tf_sparseconv.python import _validation
from tf_sparseconv.python.layers._base import check_backend, count_from_fraction
from tf_sparseconv.python.ops import _common, topk_ops


@keras.saving.register_keras_serializable(package="tf_sparseconv")
class KWinners(keras.layers.Layer):
    """k-winners-take-all: keeps the `k` largest activations along `axis`.

    Args:
      k: number of winners per slice (int >= 1).
      sparsity: alternatively, the fraction in [0, 1) of each slice to zero:
        `k = max(1, round((1 - sparsity) * size))`.
      axis: the axis whose slices compete (default: channels).

    Exactly one of `k` and `sparsity` is given. Gradients flow to the winners.
    """

    def __init__(self, k: int | None = None, sparsity: float | None = None, axis: int = -1, **kwargs):
        super().__init__(**kwargs)
        check_backend(type(self).__name__)
        _validation.exactly_one(k=k, sparsity=sparsity)
        self.k = _validation.positive_int(k, "k", allow_none=True)
        self.sparsity = _validation.fraction(
            sparsity, "sparsity", allow_zero=True, allow_one=False, allow_none=True
        )
        self.axis = _common.normalize_axis(axis, None)
        self.supports_jit = False

    def build(self, input_shape) -> None:
        _common.normalize_axis(self.axis, len(input_shape))
        self.built = True

    def winners(self, size) -> int | tf.Tensor:
        """Winners per slice for a slice of `size` entries (int or tensor)."""
        if self.k is not None:
            return self.k
        return count_from_fraction(1.0 - self.sparsity, size)

    def call(self, inputs) -> Any:
        size = inputs.shape[self.axis]
        if size is None:
            size = tf.shape(inputs)[self.axis]
        return topk_ops.kwinners(inputs, self.winners(size), axis=self.axis)

    def compute_output_shape(self, input_shape) -> tuple | list:
        return tuple(input_shape)

    def get_config(self) -> dict:
        return {**super().get_config(), "k": self.k, "sparsity": self.sparsity, "axis": self.axis}


@keras.saving.register_keras_serializable(package="tf_sparseconv")
class TopKAttention(keras.layers.Layer):
    """Top-k attention: keeps the `k` strongest entries of a feature map.

    Args:
      k: entries kept per selection set (int >= 1).
      density: alternatively, the kept fraction in (0, 1] of each selection set
        of `n` entries: `k = max(1, round(density * n))`.
      mode: "abs" scores |x|; "relu" scores x and keeps only positive entries.
      per: "channel" selects spatial positions per (sample, channel);
        "sample" selects over all positions and channels of a sample.

    Input `[B, *spatial, C]` with 1 to 3 spatial dims.
    """

    def __init__(
        self,
        k: int | None = None,
        density: float | None = None,
        mode: str = "abs",
        per: str = "channel",
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_backend(type(self).__name__)
        _validation.exactly_one(k=k, density=density)
        self.k = _validation.positive_int(k, "k", allow_none=True)
        self.density = _validation.fraction(
            density, "density", allow_zero=False, allow_one=True, allow_none=True
        )
        self.mode = _common.choice(mode, "mode", ("abs", "relu"))
        self.per = _common.choice(per, "per", ("channel", "sample"))
        self.supports_jit = False

    def build(self, input_shape) -> None:
        if not 3 <= len(input_shape) <= 5:
            raise ValueError(
                f"{type(self).__name__} expects [B, *spatial, C] with 1 to 3 spatial dims, got {input_shape}"
            )
        self.built = True

    def _set_size(self, inputs):
        dims = inputs.shape[1:] if self.per == "sample" else inputs.shape[1:-1]
        if all(d is not None for d in dims):
            return math.prod(dims)
        dyn = tf.shape(inputs)
        return tf.reduce_prod(dyn[1:] if self.per == "sample" else dyn[1:-1])

    def call(self, inputs) -> Any:
        k = self.k if self.k is not None else count_from_fraction(self.density, self._set_size(inputs))
        return topk_ops.topk_attention(inputs, k, mode=self.mode, per=self.per)

    def compute_output_shape(self, input_shape) -> tuple | list:
        return tuple(input_shape)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "k": self.k,
            "density": self.density,
            "mode": self.mode,
            "per": self.per,
        }
