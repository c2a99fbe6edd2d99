"""Streaming inference (`tsc.streaming`; Deep Shifting).

A causal sequence model evaluated on a growing time series recomputes almost
everything whenever a frame arrives. `to_streaming(model)` instead keeps, for
every convolution and pooling window, the last input frames it still needs,
so that a new frame costs a constant amount of work whatever the history, and
returns exactly the full-sequence model's outputs for the new time steps
(strides and pooling stay in phase). `StreamingConv1D` is the causal
convolution (with strides and dilation) to build such models with;
`export_streaming` serves the step function from a SavedModel.
"""

from tf_sparseconv.python.streaming.cells import StreamingError
from tf_sparseconv.python.streaming.layers import StreamingConv1D
from tf_sparseconv.python.streaming.model import StreamingModel, export_streaming, to_streaming

__all__ = ["StreamingConv1D", "StreamingError", "StreamingModel", "export_streaming", "to_streaming"]
