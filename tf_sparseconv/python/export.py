"""SavedModel export for serving (`tsc.export`).

`export_saved_model(model, path)` writes a SavedModel whose `serving_default`
signature takes the model's inputs by their Keras input names (several for
multi-input models, e.g. the features and coordinates of a sparse map) with a
dynamic batch (or site) dimension, and returns `{"output_0": ...}` (one entry
per model output), as `model.export` does. Which to use:

* `portable=False` (default): the graph calls tf_sparseconv's compiled ops, so
  it is as fast as the Keras model; a process loading it must
  `import tf_sparseconv` first (to register the ops), which TF Serving without
  the op library cannot do.
* `portable=True`: the same model lowered to stock TensorFlow ops (every op's
  pure-TF reference: the same outputs, without the sparsity speed-ups). It
  loads and serves anywhere TensorFlow does: stock TF Serving,
  `saved_model_cli`, a process that never imports tf_sparseconv.
"""

from __future__ import annotations

import contextlib
import os

import keras
import tensorflow as tf

from tf_sparseconv.python.ops._loader import references_only

OP_PREFIX = "TfSparseConv>"


def input_structure(model):
    """The model's inputs as it takes them: a KerasTensor, or a list or dict of them."""
    try:
        return model.input  # Functional models (and called Sequentials)
    except (AttributeError, ValueError):
        inputs = list(model.inputs)
        return inputs[0] if len(inputs) == 1 else inputs


def _input_specs(model) -> list[tf.TensorSpec]:
    specs, names = [], set()
    for i, tensor in enumerate(keras.tree.flatten(input_structure(model))):
        name = getattr(tensor, "name", None) or f"input_{i}"
        if name in names:
            raise ValueError(f"model {model.name!r} has two inputs named {name!r}; give them distinct names")
        names.add(name)
        shape = [None, *tensor.shape[1:]]
        specs.append(tf.TensorSpec(shape, tf.as_dtype(tensor.dtype), name=name))
    return specs


def custom_ops_in(concrete_function) -> set[str]:
    """The tf_sparseconv op types a traced function (and the functions it calls) holds."""
    graph_def = concrete_function.graph.as_graph_def()
    nodes = list(graph_def.node)
    for function in graph_def.library.function:
        nodes += list(function.node_def)
    return {node.op for node in nodes if node.op.startswith(OP_PREFIX)}


def export_saved_model(model: keras.Model, path: str, portable: bool = False) -> str:
    """Writes `model` to `path` as a SavedModel with a `serving_default` signature.

    Args:
      model: a built Keras model (Sequential, Functional or subclassed with known inputs).
      path: the SavedModel directory (created).
      portable: lower every tf_sparseconv op to its stock-TensorFlow reference,
        so that the SavedModel loads without tf_sparseconv (see the module doc).

    Returns:
      `path`.
    """
    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` must be a Keras model, got {model!r}")
    if not model.built or not getattr(model, "inputs", None):
        raise ValueError(f"`model` {model.name!r} must be built with known inputs (e.g. from keras.Input)")
    if not isinstance(portable, bool):
        raise ValueError(f"`portable` must be a bool, got {portable!r}")
    specs = _input_specs(model)
    structure = input_structure(model)

    def serve(*args):
        inputs = keras.tree.pack_sequence_as(structure, list(args))
        with references_only() if portable else contextlib.nullcontext():
            outputs = model(inputs, training=False)
        return {f"output_{i}": value for i, value in enumerate(keras.tree.flatten(outputs))}

    function = tf.function(serve, input_signature=specs, autograph=False)
    concrete = function.get_concrete_function()
    if portable:
        leftover = custom_ops_in(concrete)
        if leftover:
            raise ValueError(
                f"portable export of {model.name!r} still holds tf_sparseconv ops {sorted(leftover)}: "
                "a layer calls the compiled library directly instead of through an op wrapper"
            )
    module = tf.Module()
    # The variables only: tracking the Keras model itself would also save the functions it has
    # traced (train/predict steps, with gradients and the compiled ops).
    module.model_variables = list(model.variables)
    module.serve = function
    os.makedirs(path, exist_ok=True)
    tf.saved_model.save(module, path, signatures={"serving_default": concrete})
    return path
