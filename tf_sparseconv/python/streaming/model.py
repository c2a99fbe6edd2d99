"""`to_streaming`: run a causal sequence model frame by frame, and `export_streaming`."""

from __future__ import annotations

import os

import keras
import tensorflow as tf

from tf_sparseconv.python._clone import is_cloneable
from tf_sparseconv.python._validation import positive_int
from tf_sparseconv.python.streaming.cells import StreamingError, make_cell


class _Graph:
    """A model's layer calls in execution order: each `(cell or subgraph, argument keys, output
    keys)`; keys name the tensors (KerasTensor ids)."""

    def __init__(self, model):
        self.name = model.name
        self.nodes = []  # (runner, args structure of keys, outputs structure of keys)
        if isinstance(model, keras.Sequential):
            inputs = model.inputs
            if inputs is None or len(inputs) != 1:
                raise StreamingError(f"Sequential model {model.name!r} must be built with one input")
            key = id(inputs[0])
            self.input_keys = [key]
            shape = tuple(inputs[0].shape)
            for layer in model.layers:
                out_key = f"{model.name}:{id(layer)}"
                runner = self._runner(layer, [shape])
                self.nodes.append((runner, key, out_key))
                shape = tuple(layer.compute_output_shape(shape))
                key = out_key
            self.output_keys = key
            return
        calls = []

        def record(layer, *args, **kwargs):
            outputs = layer(*args, **kwargs)
            calls.append((layer, args, kwargs, outputs))
            return outputs

        clone = keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=record)
        self.input_keys = [id(t) for t in clone.inputs]
        for layer, args, call_kwargs, outputs in calls:
            shapes = [tuple(t.shape) for t in keras.tree.flatten(args) if hasattr(t, "shape")]
            extra = sorted(k for k in call_kwargs if k not in ("training", "mask"))
            if extra:
                raise StreamingError(
                    f"layer {layer.name!r} is called with keyword arguments {extra}, "
                    "which streaming does not support"
                )
            if call_kwargs.get("training"):
                raise StreamingError(
                    f"layer {layer.name!r} is called with training=True (batch statistics, dropout at "
                    "inference), which has no streaming form"
                )
            self.nodes.append(
                (
                    self._runner(layer, shapes),
                    keras.tree.map_structure(id, args),
                    keras.tree.map_structure(id, outputs),
                )
            )
        outputs = list(clone.outputs)
        # A single output is one tensor (a nested model's consumer takes it as such).
        self.output_keys = id(outputs[0]) if len(outputs) == 1 else [id(t) for t in outputs]

    @staticmethod
    def _runner(layer, shapes):
        if isinstance(layer, keras.Model):
            if not is_cloneable(layer):
                raise StreamingError(
                    f"nested model {layer.name!r} ({type(layer).__name__}) must be Sequential or Functional"
                )
            return _Graph(layer)
        if isinstance(layer, keras.layers.InputLayer):
            return None
        return make_cell(layer, shapes)

    # ---- state -------------------------------------------------------------------------------------
    def cells(self):
        for runner, *_ in self.nodes:
            if isinstance(runner, _Graph):
                yield from runner.cells()
            elif runner is not None:
                yield runner

    def state_specs(self):
        return [spec for cell in self.cells() for spec in cell.state_specs()]

    def initial_state(self, batch_size):
        return [s for cell in self.cells() for s in cell.initial_state(batch_size)]

    # ---- step --------------------------------------------------------------------------------------
    def step(self, inputs: list, state: list):
        """`(outputs structure, new state list)`; `state` is consumed in cell order."""
        env = dict(zip(self.input_keys, inputs))
        position = 0
        new_state = []
        for runner, arg_keys, out_keys in self.nodes:
            args = keras.tree.map_structure(lambda key: env[key], arg_keys)
            if runner is None:  # an InputLayer inside a Sequential
                outputs = args
            elif isinstance(runner, _Graph):
                count = len(runner.state_specs())
                flat = keras.tree.flatten(args)
                outputs, sub_state = runner.step(flat, state[position : position + count])
                position += count
                new_state += sub_state
            else:
                count = len(runner.state_specs())
                call_args = args[0] if isinstance(args, tuple) and len(args) == 1 else args
                outputs, cell_state = runner.step(call_args, state[position : position + count])
                position += count
                new_state += cell_state
            if isinstance(out_keys, (list, tuple)):
                for key, value in zip(keras.tree.flatten(out_keys), keras.tree.flatten(outputs)):
                    env[key] = value
            else:
                env[out_keys] = outputs
        outputs = keras.tree.map_structure(lambda key: env[key], self.output_keys)
        return outputs, new_state


class StreamingModel(tf.Module):
    """A model run frame by frame (see `to_streaming`).

    `step(frames)` takes the newest `t >= 1` frames `[B, t, C]` of every input
    (a tensor, a NumPy array, or a list of them for several inputs) and returns
    the model's outputs for exactly the output frames that these input frames
    complete, equal to the full-sequence model's outputs at those time steps.
    The per-layer state (the last input frames each convolution or pooling
    window still needs, and the frame counts that keep strides in phase) is
    kept between calls; `reset_states()` starts a new sequence. The batch size
    is fixed by the first `step` after a reset.

    `initial_state(batch_size)` and `step_with_state(frames, state)` are the
    same computation with the state passed in and out (a list of tensors):
    what `export_streaming` serves.
    """

    def __init__(self, model: keras.Model):
        super().__init__(name=f"streaming_{model.name}")
        self.model = model
        self._graph = _Graph(model)
        self._input_dtypes = [tf.as_dtype(t.dtype) for t in model.inputs]
        self._input_channels = [t.shape[-1] for t in model.inputs]
        # The state of `step`: variables (batch dimension None) created at the first step, so that
        # the compiled step takes only the frames (a tf.function call with a dozen state tensors
        # in and out costs more than the step itself).
        self._variables = None
        self._batch = None
        self._fresh = True
        self._concrete_step = None
        self._step_fn = tf.function(self._pure_step, reduce_retracing=True, autograph=False)
        self._variable_step_fn = tf.function(
            self._variable_step, input_signature=self.input_specs, autograph=False
        )

    @property
    def state_specs(self) -> list[tf.TensorSpec]:
        """Specs of the state tensors (batch dimension None), in `step_with_state` order."""
        return self._graph.state_specs()

    @property
    def input_specs(self) -> list[tf.TensorSpec]:
        return [tf.TensorSpec([None, None, c], d) for c, d in zip(self._input_channels, self._input_dtypes)]

    def initial_state(self, batch_size) -> list[tf.Tensor]:
        return self._graph.initial_state(batch_size)

    def _frames(self, frames) -> list[tf.Tensor]:
        items = list(frames) if isinstance(frames, (list, tuple)) else [frames]
        if len(items) != len(self._input_dtypes):
            raise ValueError(f"`frames` must hold {len(self._input_dtypes)} input(s), got {len(items)}")
        tensors = []
        for i, (item, dtype, channels) in enumerate(zip(items, self._input_dtypes, self._input_channels)):
            if isinstance(item, tf.Tensor) and item.dtype == dtype and item.shape.rank == 3:
                if channels is None or item.shape[-1] == channels:
                    tensors.append(item)  # the common case, without further checks
                    continue
            tensor = tf.convert_to_tensor(item, dtype_hint=dtype)
            if tensor.dtype != dtype:
                tensor = tf.cast(tensor, dtype)
            if tensor.shape.rank != 3 or (channels is not None and tensor.shape[-1] not in (None, channels)):
                raise ValueError(
                    f"`frames` input {i} must be [batch, time, {channels}], got shape {tensor.shape}"
                )
            tensors.append(tensor)
        steps = {t.shape[1] for t in tensors}
        if len(steps) > 1:
            raise ValueError(f"every input must bring the same number of frames, got {sorted(steps)}")
        return tensors

    def _pure_step(self, frames, state):
        outputs, new_state = self._graph.step(list(frames), list(state))
        if isinstance(outputs, (list, tuple)) and len(outputs) == 1:
            outputs = outputs[0]
        return outputs, new_state

    def step_with_state_graph(self, frames, state) -> tuple:
        """`step_with_state` for use inside a tf.function or tf.while_loop the caller compiles
        (no nested tf.function call): frames a tensor (or list), state a list of tensors."""
        items = list(frames) if isinstance(frames, (list, tuple)) else [frames]
        return self._pure_step(items, list(state))

    def step_with_state(self, frames, state) -> tuple:
        """`(outputs, new_state)` for `frames` given `state` (from `initial_state` or a previous step)."""
        return self._step_fn(self._frames(frames), list(state))

    def _variable_step(self, *frames):
        state = [v.read_value() for v in self._variables]
        outputs, new_state = self._pure_step(frames, state)
        with tf.control_dependencies([v.assign(s) for v, s in zip(self._variables, new_state)]):
            return tf.nest.map_structure(tf.identity, outputs)

    def step(self, frames) -> tuple:
        tensors = self._frames(frames)
        batch = int(tensors[0].shape[0])
        if self._variables is None:
            self._variables = [
                tf.Variable(
                    s, trainable=False, shape=tf.TensorShape([None, *s.shape[1:]]) if s.shape.rank else []
                )
                for s in self.initial_state(batch)
            ]
        elif self._fresh:
            for variable, value in zip(self._variables, self.initial_state(batch)):
                variable.assign(value)
        elif batch != self._batch:
            raise ValueError(
                f"`frames` has batch size {batch} but this sequence started with {self._batch}; "
                "call reset_states() first"
            )
        self._batch, self._fresh = batch, False
        if self._concrete_step is None:  # calling the traced graph directly saves a dispatch
            self._concrete_step = self._variable_step_fn.get_concrete_function()
        return self._concrete_step(*tensors)

    def reset_states(self) -> None:
        """Forget the history: the next `step` starts a new sequence."""
        self._fresh = True

    def __call__(self, frames):
        return self.step(frames)


def to_streaming(model: keras.Model) -> StreamingModel:
    """A `StreamingModel` running `model` (Sequential or Functional, nested models included) frame by
    frame. Every layer must be streamable (see `StreamingModel`); otherwise a `StreamingError`
    (a `ValueError`) names the first layer that is not and why (e.g. `Conv1D(padding="same")`
    reads future frames)."""
    if not isinstance(model, keras.Model) or not is_cloneable(model):
        raise ValueError(f"`model` must be a built Sequential or Functional Keras model, got {model!r}")
    if not model.built or not model.inputs:
        raise ValueError(f"`model` {model.name!r} must be built (with known inputs)")
    for tensor in model.inputs:
        if len(tensor.shape) != 3:
            raise StreamingError(
                f"model input {tensor.name!r} must be [batch, time, channels], got {tensor.shape}"
            )
    return StreamingModel(model)


def _output_dict(outputs) -> dict:
    flat = keras.tree.flatten(outputs)
    if len(flat) == 1:
        return {"outputs": flat[0]}
    return {f"outputs_{i}": value for i, value in enumerate(flat)}


def export_streaming(
    model, path: str, state: str = "external", batch_size: int | None = None, portable: bool = False
) -> str:
    """Writes a SavedModel that serves `model` (a Keras model or a `StreamingModel`) frame by frame.

    state="external" (default; for servers keeping one state per client, and the
      form LiteRT and ONNX take): signatures `initial_state(batch_size)` ->
      `{state_0, ...}` and `step(frames, state_0, ...)` ->
      `{outputs, next_state_0, ...}` (`outputs_0`, ... for several outputs;
      `frames`, `frames_1`, ... for several inputs); feed each `next_state_i`
      back as `state_i`.
    state="internal": the state lives in the SavedModel's variables, for a
      fixed `batch_size` (default 1): signatures `step(frames)` -> `{outputs}`
      and `reset_states()` -> `{reset}`. For TF Serving only: converters freeze
      variables, so LiteRT/ONNX need the external state (`export_litert` and
      `export_onnx` of a `StreamingModel` use it).
    portable=True: stock TensorFlow ops only (loads without tf_sparseconv and
      converts with `TFLiteConverter.from_saved_model` and tf2onnx); otherwise
      loading needs `import tf_sparseconv` first when the model uses its ops.
    Returns `path`.
    """
    from tf_sparseconv.python.export import check_portable, tf_variables, tracing_context

    if state not in ("external", "internal"):
        raise ValueError(f"`state` must be 'external' or 'internal', got {state!r}")
    if state == "external" and batch_size is not None:
        raise ValueError(
            "`batch_size` applies to state='internal' only (the external state's batch is dynamic)"
        )
    if not isinstance(portable, bool):
        raise ValueError(f"`portable` must be a bool, got {portable!r}")
    streaming = model if isinstance(model, StreamingModel) else to_streaming(model)
    batch_size = positive_int(batch_size, "batch_size", allow_none=True)
    module = tf.Module()
    # The tf.Variables (not the model: its traced functions; not the Keras wrappers: converters
    # could not freeze them).
    module.model_variables = tf_variables(streaming.model.variables)
    frame_specs = [
        tf.TensorSpec(spec.shape, spec.dtype, name="frames" if i == 0 else f"frames_{i}")
        for i, spec in enumerate(streaming.input_specs)
    ]
    state_specs = [
        tf.TensorSpec(spec.shape, spec.dtype, name=f"state_{i}")
        for i, spec in enumerate(streaming.state_specs)
    ]
    what = f"the streaming step of {streaming.model.name!r}"
    if state == "external":

        @tf.function(input_signature=[tf.TensorSpec([], tf.int32, name="batch_size")], autograph=False)
        def initial_state(batch):
            return {f"state_{i}": s for i, s in enumerate(streaming.initial_state(batch))}

        @tf.function(input_signature=frame_specs + state_specs, autograph=False)
        def step(*args):
            frames, states = list(args[: len(frame_specs)]), list(args[len(frame_specs) :])
            with tracing_context(portable):
                outputs, new_state = streaming._graph.step(frames, states)
            return {**_output_dict(outputs), **{f"next_state_{i}": s for i, s in enumerate(new_state)}}

        concrete = step.get_concrete_function()
        module.initial_state, module.step = initial_state, step
        signatures = {"initial_state": initial_state, "step": concrete}
    else:
        batch = 1 if batch_size is None else int(batch_size)
        module.state = [
            tf.Variable(s, trainable=False, name=f"state_{i}")
            for i, s in enumerate(streaming.initial_state(batch))
        ]
        fixed = [tf.TensorSpec([batch, *spec.shape[1:]], spec.dtype, name=spec.name) for spec in frame_specs]

        @tf.function(input_signature=fixed, autograph=False)
        def step(*frames):
            with tracing_context(portable):
                outputs, new_state = streaming._graph.step(
                    list(frames), [v.read_value() for v in module.state]
                )
            with tf.control_dependencies([v.assign(s) for v, s in zip(module.state, new_state)]):
                return {k: tf.identity(v) for k, v in _output_dict(outputs).items()}

        @tf.function(input_signature=[], autograph=False)
        def reset_states():
            initial = streaming.initial_state(batch)
            with tf.control_dependencies([v.assign(s) for v, s in zip(module.state, initial)]):
                return {"reset": tf.constant(True)}

        concrete = step.get_concrete_function()
        module.step, module.reset_states = step, reset_states
        signatures = {"step": concrete, "reset_states": reset_states}
    if portable:
        check_portable(concrete, what)
    os.makedirs(path, exist_ok=True)
    tf.saved_model.save(module, path, signatures=signatures)
    return path
