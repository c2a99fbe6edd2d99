"""tf_sparseconv: sparse convolutional networks for Keras 3 / TensorFlow.

``import tf_sparseconv as tsc``, then use ``tsc.ops`` (the custom ops with
their gradients and pure-TensorFlow references), ``tsc.layers`` (Keras 3
layers built on them), ``tsc.pruning`` (magnitude pruning for Keras 3),
``tsc.quantization`` (low-precision quantisation-aware training, integer export),
``tsc.streaming`` (frame-by-frame inference of causal sequence models) and
``tsc.export`` (SavedModels for serving, optionally lowered to stock TF ops).

Importing the package loads the compiled op library once (never raising: on a
missing or mismatched library it warns and falls back to the pure-TF
references), so that SavedModels which use the ops can be loaded afterwards.
"""

from tf_sparseconv.python import data, export, layers, ops, pruning, quantization, streaming
from tf_sparseconv.version import __version__

ops.load_library()

__all__ = ["__version__", "data", "export", "layers", "ops", "pruning", "quantization", "streaming"]
