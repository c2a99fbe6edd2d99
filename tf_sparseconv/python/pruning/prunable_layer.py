"""`PrunableLayer`: a custom Keras layer names the weights `prune_low_magnitude` prunes."""

from __future__ import annotations

import abc


class PrunableLayer(abc.ABC):
    """Mix-in for a Keras layer whose prunable weights are not (only) its `kernel`.

    As in tensorflow-model-optimization: subclass it next to the layer class and
    return, from `get_prunable_weights()`, the variables to prune (each gets its
    own mask). Any layer with a `get_prunable_weights` method is treated the
    same way, whether or not it subclasses this class. `PruneLowMagnitude`
    masks a weight by replacing, during the wrapped layer's call, the layer
    attribute that holds the variable, so each returned variable must be held
    directly by an attribute of the layer (`self.kernel`, `self.bias`, ...).

    Example:

    ```python
    class MyDense(keras.layers.Dense, tsc.pruning.PrunableLayer):
        def get_prunable_weights(self):
            return [self.kernel, self.bias]
    ```
    """

    @abc.abstractmethod
    def get_prunable_weights(self) -> list:
        """The variables of the (built) layer to prune."""
        raise NotImplementedError


def has_prunable_weights_method(layer) -> bool:
    """Whether `layer` names its prunable weights (`PrunableLayer` or a `get_prunable_weights`)."""
    return isinstance(layer, PrunableLayer) or callable(getattr(layer, "get_prunable_weights", None))
