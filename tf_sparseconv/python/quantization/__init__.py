"""Low-precision quantisation-aware training (`tsc.quantization`).

`quantize_model(model, weight_bits=8, activation_bits=8, per_channel=True,
rounding="nearest")` returns a copy of a Keras model in which every layer with
kernels (Dense, Conv1D/2D/3D, DepthwiseConv2D, the `tsc.layers` convolutions)
trains with fake-quantised weights (symmetric, per output channel) and
fake-quantised outputs (affine over EMA-tracked ranges); gradients are
straight-through. `convert(qat_model)` turns it into an inference model that
stores integer weights (int8; 4- and 2-bit values packed two or four per byte)
plus float scales and predicts exactly what the QAT model predicts.
With `rounding="stochastic"`, pass `FinishWithNearestRounding(nearest_epochs=1)`
to `fit` so that the last epochs train (and calibrate the activation ranges)
with the nearest-rounded weights that inference uses.

tfmot's annotate-then-apply API works too: `quantize_annotate_layer(layer)` marks
a layer, `quantize_annotate_model(model)` marks all, `quantize_apply(model)`
quantises exactly the marked layers (with `quantize_model`'s defaults), and
`quantize_scope()` is the custom-object scope for loading.

Where activations are quantised: at the outputs of the quantised layers
(after their bias and activation function; for a sparse map, its features).
The model's input and the outputs of other layers stay float.
"""

from tf_sparseconv.python.quantization.annotate import (
    QuantizeAnnotate,
    quantize_annotate_layer,
    quantize_annotate_model,
    quantize_scope,
)
from tf_sparseconv.python.quantization.callbacks import FinishWithNearestRounding
from tf_sparseconv.python.quantization.model import convert, quantize_apply, quantize_model
from tf_sparseconv.python.quantization.quantizers import (
    activation_qparams,
    fake_quant_activations,
    fake_quant_weights,
    pack_int,
    quantize_weights_int,
    unpack_int,
    unpack_int_tf,
    weight_scales,
)
from tf_sparseconv.python.quantization.wrappers import IntegerWeightsWrapper, QuantizeWrapper, kernel_specs

__all__ = [
    "FinishWithNearestRounding",
    "IntegerWeightsWrapper",
    "QuantizeAnnotate",
    "QuantizeWrapper",
    "activation_qparams",
    "convert",
    "fake_quant_activations",
    "fake_quant_weights",
    "kernel_specs",
    "pack_int",
    "quantize_annotate_layer",
    "quantize_annotate_model",
    "quantize_apply",
    "quantize_model",
    "quantize_scope",
    "quantize_weights_int",
    "unpack_int",
    "unpack_int_tf",
    "weight_scales",
]
