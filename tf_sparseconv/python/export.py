"""Export for serving and on-device inference (`tsc.export`).

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
  pure-TF reference in the form the LiteRT and ONNX converters take: the same
  outputs, without the sparsity speed-ups; quantised layers as TensorFlow's
  `FakeQuantWithMinMaxVars*` ops). It loads and serves anywhere TensorFlow
  does (stock TF Serving, `saved_model_cli`, a process that never imports
  tf_sparseconv) and converts with `tf.lite.TFLiteConverter.from_saved_model`
  and tf2onnx.

`export_litert(model, path)` writes a `.tflite` file (LiteRT builtin ops; a
`quantize_model`/`convert` model becomes a full-integer int8 model) and
`export_onnx(model, path)` an `.onnx` file; both go through the portable
SavedModel, and both take a `tsc.streaming.StreamingModel` too (its `step`
with the state fed in and returned: `next_state_i`).

Every exported module tracks the `tf.Variable`s behind the Keras variables
(`variable.value`): tracking the Keras wrappers instead leaves the converters
unable to freeze the weights (the TFLite model then computes with garbage).
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

from tf_sparseconv.python._validation import integer
from tf_sparseconv.python.ops._loader import for_converters, for_onnx, references_only

OP_PREFIX = "TfSparseConv>"

__all__ = [
    "export_litert",
    "export_onnx",
    "export_saved_model",
    "for_converters",
    "references_only",
]


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


def tf_variables(variables) -> list[tf.Variable]:
    """The `tf.Variable`s behind Keras variables (what an exported module must track)."""
    out = []
    for variable in variables:
        value = getattr(variable, "value", variable) if isinstance(variable, keras.Variable) else variable
        if not isinstance(value, tf.Variable):
            raise ValueError(
                f"variable {getattr(variable, 'path', variable)!r} is not backed by a tf.Variable "
                "(export needs the TensorFlow backend: KERAS_BACKEND=tensorflow)"
            )
        out.append(value)
    return out


def tracing_context(portable: bool):
    """The context a portable graph is traced in (`for_converters()`), or a no-op."""
    return for_converters() if portable else contextlib.nullcontext()


def check_portable(concrete, what: str) -> None:
    leftover = custom_ops_in(concrete)
    if leftover:
        raise ValueError(
            f"portable export of {what} still holds tf_sparseconv ops {sorted(leftover)}: "
            "a layer calls the compiled library directly instead of through an op wrapper"
        )


def _check_model(model) -> None:
    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` must be a Keras model, got {model!r}")
    if not model.built or not getattr(model, "inputs", None):
        raise ValueError(f"`model` {model.name!r} must be built with known inputs (e.g. from keras.Input)")


def _serving_function(model: keras.Model, portable: bool):
    specs = _input_specs(model)
    structure = input_structure(model)

    def serve(*args):
        inputs = keras.tree.pack_sequence_as(structure, list(args))
        with tracing_context(portable):
            outputs = model(inputs, training=False)
        return {f"output_{i}": value for i, value in enumerate(keras.tree.flatten(outputs))}

    function = tf.function(serve, input_signature=specs, autograph=False)
    concrete = function.get_concrete_function()
    if portable:
        check_portable(concrete, repr(model.name))
    return function, concrete


def export_saved_model(model: keras.Model, path: str, portable: bool = False) -> str:
    """Writes `model` to `path` as a SavedModel with a `serving_default` signature.

    Args:
      model: a built Keras model (Sequential, Functional or subclassed with known inputs).
      path: the SavedModel directory (created).
      portable: lower every tf_sparseconv op to stock TensorFlow ops, so that the
        SavedModel loads without tf_sparseconv and converts to LiteRT and ONNX
        (see the module doc).

    Returns:
      `path`.
    """
    _check_model(model)
    if not isinstance(portable, bool):
        raise ValueError(f"`portable` must be a bool, got {portable!r}")
    function, concrete = _serving_function(model, portable)
    module = tf.Module()
    # The tf.Variables only: tracking the Keras model itself would also save the functions it
    # has traced (train/predict steps, with gradients and the compiled ops), and tracking the
    # Keras variable wrappers leaves the TFLite converter unable to freeze the weights.
    module.model_variables = tf_variables(model.variables)
    module.serve = function
    os.makedirs(path, exist_ok=True)
    tf.saved_model.save(module, path, signatures={"serving_default": concrete})
    return path


# --- LiteRT (TFLite) and ONNX ------------------------------------------------------------------


def _is_streaming(model) -> bool:
    from tf_sparseconv.python.streaming.model import StreamingModel

    return isinstance(model, StreamingModel)


def is_quantized(model) -> bool:
    """Whether `model` holds `tsc.quantization` layers (QAT or converted)."""
    from tf_sparseconv.python.quantization.wrappers import IntegerWeightsWrapper, QuantizeWrapper

    keras_model = model.model if _is_streaming(model) else model
    return any(
        isinstance(layer, (QuantizeWrapper, IntegerWeightsWrapper))
        for layer in keras_model._flatten_layers(include_self=False)
    )


@contextlib.contextmanager
def float32_compute(model):
    """Within the block, the layers of `model` that compute in float16/bfloat16 (mixed
    precision) compute in float32 (their variables are float32 already): the LiteRT converter
    rejects half-precision convolutions and top-k, and integer conversion starts from float32."""
    changed = []
    try:
        for layer in model._flatten_layers(include_self=True):
            policy = getattr(layer, "dtype_policy", None)
            if policy is not None and policy.compute_dtype in ("float16", "bfloat16"):
                changed.append((layer, layer._dtype_policy))
                layer._dtype_policy = keras.dtype_policies.get("float32")
        yield
    finally:
        for layer, policy in changed:
            layer._dtype_policy = policy


def _portable_saved_model(model, path: str) -> str:
    """Writes the portable SavedModel the converters read (float32 compute); returns its
    signature key."""
    if _is_streaming(model):
        from tf_sparseconv.python.streaming.model import export_streaming

        with float32_compute(model.model):
            export_streaming(model, path, portable=True)
        return "step"
    _check_model(model)
    with float32_compute(model):
        export_saved_model(model, path, portable=True)
    return "serving_default"


def export_litert(
    model,
    path: str,
    *,
    quantize: str | None = "auto",
    integer_io: bool = False,
    representative_data=None,
) -> str:
    """Writes `model` as a LiteRT (TFLite) flatbuffer with builtin ops only.

    Args:
      model: a built Keras model, or a `tsc.streaming.StreamingModel`
        (`to_streaming(model)`): then the `.tflite` holds the `step` signature
        with external state (`frames`, `state_0`, ... -> `outputs`,
        `next_state_0`, ...; feed each `next_state_i` back as `state_i`; the
        first state is zeros of the shapes the interpreter reports).
      path: the `.tflite` file to write.
      quantize: "auto" (default): "int8" when the model holds `tsc.quantization`
        layers (`quantize_model` or `convert`), else None. "int8": a full-integer
        model (int8 CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED): the QAT
        model's weight grids and activation ranges (TensorFlow `FakeQuant` ops
        in the portable graph), and ranges it does not track (its inputs; a
        convolution's output before a separate bias add) calibrated on
        `representative_data`, which int8 needs. "dynamic": int8 weights, float activations.
        None: a float model.
      integer_io: for "int8": int8 model inputs and outputs (else float, with
        QUANTIZE/DEQUANTIZE at the edges).
      representative_data: for "int8": a few input batches (an array, a list of
        arrays for several inputs, or an iterable of such batches).

    Returns:
      `path`.
    """
    if quantize not in ("auto", "int8", "dynamic", None):
        raise ValueError(f"`quantize` must be 'auto', 'int8', 'dynamic' or None, got {quantize!r}")
    if quantize == "auto":
        quantize = "int8" if is_quantized(model) else None
    if quantize == "int8" and representative_data is None:
        raise ValueError(
            "`representative_data` is needed for an int8 model: a few hundred input samples, from "
            "which the converter calibrates the ranges the quantised model does not track (its "
            "inputs'); or pass quantize='dynamic' (int8 weights, float activations) or None (float)"
        )
    if integer_io and quantize != "int8":
        raise ValueError("`integer_io=True` needs quantize='int8'")
    with tempfile.TemporaryDirectory(prefix="tsc_litert_") as tmp:
        key = _portable_saved_model(model, tmp)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=[key])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if quantize == "dynamic":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        elif quantize == "int8":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            signature = tf.saved_model.load(tmp).signatures[key]
            specs = signature.structured_input_signature[1]
            names = _input_order(model, specs)
            dtypes = [specs[n].dtype.as_numpy_dtype for n in names]
            converter.representative_dataset = _representative(representative_data, names, dtypes)
            if integer_io:
                converter.inference_input_type = tf.int8
                converter.inference_output_type = tf.int8
        try:
            flatbuffer = converter.convert()
        except Exception as exc:
            raise ValueError(f"LiteRT conversion failed: {exc}") from exc
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(flatbuffer)
    return path


def _input_order(model, specs: dict) -> list[str]:
    """The signature's input names in the order the model takes its inputs (a streaming step:
    its frames, then its state)."""
    if _is_streaming(model):
        frames = sorted((n for n in specs if n.startswith("frames")), key=lambda n: (len(n), n))
        states = sorted((n for n in specs if n.startswith("state_")), key=lambda n: int(n[6:]))
        return frames + states
    return [spec.name for spec in _input_specs(model)]


def _representative(data, names, dtypes):
    """A TFLite representative dataset: dicts of the signature's inputs by name, one sample each.

    `data`: an array (one input), a list of arrays in the model's input order, a dict by input
    name, or an iterable (e.g. a `tf.data.Dataset`) of such batches; `(inputs, labels)` pairs
    from a dataset are taken for their inputs.
    """

    def as_list(batch):
        if isinstance(batch, dict):
            missing = [n for n in names if n not in batch]
            if missing:
                raise ValueError(f"`representative_data` batch lacks the input(s) {missing}")
            return [batch[n] for n in names]
        if isinstance(batch, (list, tuple)):
            return list(batch)
        return [batch]

    if isinstance(data, (np.ndarray, dict)) or tf.is_tensor(data):
        batches = [as_list(data)]
    elif isinstance(data, (list, tuple)) and data and all(isinstance(d, np.ndarray) for d in data):
        batches = [list(data)] if len(names) > 1 else [[d] for d in data]
    elif isinstance(data, tf.data.Dataset):
        batches = [as_list(e[0] if isinstance(e, tuple) and len(e) == 2 else e) for e in data]
    else:
        batches = [as_list(b) for b in data]

    def generate():
        for batch in batches:
            if len(batch) != len(names):
                raise ValueError(
                    f"`representative_data` batches must hold the {len(names)} input(s) {names}, "
                    f"got {len(batch)}"
                )
            first = np.asarray(batch[0])
            if first.ndim == 0:
                yield {n: np.asarray(b, d) for n, b, d in zip(names, batch, dtypes)}
                continue
            for i in range(int(first.shape[0])):  # one sample at a time: batch 1
                yield {
                    n: np.asarray(b)[i : i + 1].astype(d) if np.ndim(b) else np.asarray(b, d)
                    for n, b, d in zip(names, batch, dtypes)
                }

    return generate


def export_onnx(model, path: str, *, opset: int = 17) -> str:
    """Writes `model` (a Keras model or a `tsc.streaming.StreamingModel`) as an ONNX file.

    Goes through the portable SavedModel (stock TensorFlow ops) and tf2onnx (an
    optional dependency: `pip install tf2onnx`). Inputs keep their Keras names
    and dynamic batch; outputs are `output_0`, ... (a streaming model:
    `outputs`, `next_state_0`, ... for inputs `frames`, `state_0`, ...).

    Returns:
      `path`.
    """
    try:
        import tf2onnx
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("export_onnx needs tf2onnx: pip install tf2onnx onnxruntime") from exc
    opset = integer(opset, "opset", minimum=13)
    with tempfile.TemporaryDirectory(prefix="tsc_onnx_") as tmp:
        with for_onnx():
            key = _portable_saved_model(model, tmp)
        loaded = tf.saved_model.load(tmp)  # (kept alive: the signature reads its variables)
        signature = loaded.signatures[key]
        inputs = signature.structured_input_signature[1]
        names = list(inputs)
        specs = [tf.TensorSpec(inputs[n].shape, inputs[n].dtype, name=n) for n in names]

        def call(*args):
            return signature(**dict(zip(names, args)))

        function = tf.function(call, input_signature=specs, autograph=False)
        try:
            tf2onnx.convert.from_function(function, input_signature=specs, opset=int(opset), output_path=path)
        except Exception as exc:
            raise ValueError(f"ONNX conversion failed: {exc}") from exc
    return path
