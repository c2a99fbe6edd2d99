"""`fit` callback: `FinishWithNearestRounding` (stochastic-rounding QAT ends with nearest rounding)."""

from __future__ import annotations

import keras

from tf_sparseconv.python._clone import find_layers
from tf_sparseconv.python._validation import positive_int
from tf_sparseconv.python.quantization.wrappers import QuantizeWrapper


def stochastic_wrappers(model) -> list[QuantizeWrapper]:
    """Every `QuantizeWrapper` with `rounding="stochastic"` in `model` (nested models included)."""
    return [layer for layer in find_layers(model, QuantizeWrapper) if layer.rounding == "stochastic"]


class FinishWithNearestRounding(keras.callbacks.Callback):
    """Trains the last `nearest_epochs` epochs of `fit` with nearest-rounded weights.

    `quantize_model(..., rounding="stochastic")` rounds the weights
    stochastically in training forward passes, but inference (`predict`,
    `evaluate`, `convert`) rounds them to nearest: a network, and its
    EMA-tracked activation ranges, trained only under stochastic rounding is
    evaluated with weights it never saw (at 2 bits this can cost most of the
    accuracy). With this callback the epochs before the last `nearest_epochs`
    round stochastically and the last ones to nearest, so the network is
    fine-tuned, and its activation ranges recalibrated, under the weights
    inference uses.

    At the start of each epoch it sets every stochastic `QuantizeWrapper`'s
    `stochastic_rounding` variable (see `QuantizeWrapper.set_stochastic_rounding`);
    the compiled train function reads the variable, so nothing is retraced.
    The epoch count is `fit`'s `epochs` (with `initial_epoch`, the last
    epochs are still those just before `epochs`); with `nearest_epochs >=
    epochs` every epoch is nearest. After `fit` the wrappers stay on nearest
    rounding (saved with the model); another `fit` with this callback starts
    stochastic again. Raises `ValueError` at the start of `fit` when the model
    has no `rounding="stochastic"` wrapper.

    Args:
      nearest_epochs: the number of final epochs with nearest rounding (>= 1).
    """

    def __init__(self, nearest_epochs: int = 1):
        super().__init__()
        self.nearest_epochs = positive_int(nearest_epochs, "nearest_epochs")
        self.wrappers: list[QuantizeWrapper] = []

    def on_train_begin(self, logs=None) -> None:
        self.wrappers = stochastic_wrappers(self.model)
        if not self.wrappers:
            raise ValueError(
                "FinishWithNearestRounding: the model has no QuantizeWrapper with rounding='stochastic' "
                "(make it with tsc.quantization.quantize_model(..., rounding='stochastic'))"
            )

    def on_epoch_begin(self, epoch, logs=None) -> None:
        stochastic = epoch < self.params["epochs"] - self.nearest_epochs
        for wrapper in self.wrappers:
            if wrapper.built:
                wrapper.set_stochastic_rounding(stochastic)
