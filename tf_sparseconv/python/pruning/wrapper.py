"""`PruneLowMagnitude`: a Keras wrapper that multiplies a layer's kernel by a mask."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_sparseconv.python._clone import clone_with, copy_layer_weights, find_layers, fresh_layer
from tf_sparseconv.python._kernel_layouts import kernel_layout
from tf_sparseconv.python._validation import int_tuple, positive_int
from tf_sparseconv.python.layers._base import adopt_input_of
from tf_sparseconv.python.pruning import masks
from tf_sparseconv.python.pruning.prunable_layer import has_prunable_weights_method
from tf_sparseconv.python.pruning.schedules import (
    ConstantSparsity,
    check_schedule,
    deserialize_schedule,
    serialize_schedule,
)

_DEFAULT_SCHEDULE = ConstantSparsity(0.5, 0)

_NOT_DRIVEN = (
    "PruneLowMagnitude layer {name!r} is being trained, but its pruning step was never advanced "
    "(step {step}): pass `tsc.pruning.UpdatePruningStep()` in the callbacks of `fit` (in a custom "
    "training loop: `callback.set_model(model)`, `callback.on_train_begin()` once, then "
    "`callback.on_train_batch_begin(batch)` before every step)."
)


def prunable_types() -> tuple[type, ...]:
    """The layer classes `prune_low_magnitude` wraps inside models."""
    from tf_sparseconv.python.layers import block_sparse, channel_sparse, coord_sparse

    return (
        keras.layers.Dense,
        keras.layers.Conv1D,
        keras.layers.Conv2D,
        keras.layers.Conv3D,
        keras.layers.DepthwiseConv1D,
        keras.layers.DepthwiseConv2D,
        channel_sparse.ChannelSparseConv1D,
        channel_sparse.ChannelSparseConv2D,
        block_sparse.BlockSparseConv2D,
        coord_sparse.SparseConv,
        coord_sparse.SparseConvTranspose,
    )


def check_pruning_args(
    pruning_schedule, granularity, block_shape, m_by_n, channel_group=1, block_pooling_type="AVG"
) -> tuple:
    """Validated `(schedule, granularity, block_shape, m_by_n, channel_group, block_pooling_type)`;
    ValueError naming the argument."""
    if isinstance(pruning_schedule, dict):
        pruning_schedule = deserialize_schedule(pruning_schedule)
    schedule = check_schedule(pruning_schedule)
    if granularity not in masks.GRANULARITIES:
        raise ValueError(f"`granularity` must be one of {masks.GRANULARITIES}, got {granularity!r}")
    block_shape = int_tuple(block_shape, 2, "block_shape")
    m_by_n = int_tuple(m_by_n, 2, "m_by_n")
    if m_by_n[0] >= m_by_n[1]:
        raise ValueError(f"`m_by_n` must be (m, n) with m < n, got {m_by_n!r}")
    channel_group = positive_int(channel_group, "channel_group")
    if block_pooling_type not in masks.BLOCK_POOLINGS:
        raise ValueError(
            f"`block_pooling_type` must be one of {masks.BLOCK_POOLINGS}, got {block_pooling_type!r}"
        )
    return schedule, granularity, block_shape, m_by_n, channel_group, block_pooling_type


def tfmot_arguments(
    pruning_schedule, granularity, block_shape, m_by_n, block_size=None, sparsity_m_by_n=None
) -> tuple:
    """`(pruning_schedule, granularity, block_shape, m_by_n)` with tfmot's `block_size` and
    `sparsity_m_by_n` translated (None: not given).

    `block_size=(h, w)` other than (1, 1) is `granularity="block"` with `block_shape=(h, w)`.
    `sparsity_m_by_n=(m, n)` is `granularity="m_by_n"` with tfmot's schedule: the m:n mask is
    computed once, at the first training step (step 1), and never again; the pruning schedule
    is not used (as in tfmot, where it is ignored for m:n sparsity).
    """
    if block_size is not None:
        block_size = int_tuple(block_size, 2, "block_size")
        if block_size != (1, 1):
            if granularity not in ("weight", "block"):
                raise ValueError(f"`block_size` {block_size} conflicts with `granularity={granularity!r}`")
            granularity, block_shape = "block", block_size
    if sparsity_m_by_n is not None:
        sparsity_m_by_n = int_tuple(sparsity_m_by_n, 2, "sparsity_m_by_n")
        if granularity not in ("weight", "m_by_n"):
            raise ValueError(f"`sparsity_m_by_n` conflicts with `granularity={granularity!r}`")
        m, n = sparsity_m_by_n
        if m >= n:
            raise ValueError(f"`sparsity_m_by_n` must be (m, n) with m < n, got {sparsity_m_by_n!r}")
        granularity, m_by_n = "m_by_n", sparsity_m_by_n
        pruning_schedule = ConstantSparsity(m / n, begin_step=1, end_step=1)
    return pruning_schedule, granularity, block_shape, m_by_n


def _prunable_variables(layer) -> list:
    """The variables of a built layer that a wrapper prunes: `get_prunable_weights()` when the
    layer names them (`PrunableLayer`), else its kernel."""
    if has_prunable_weights_method(layer):
        weights = list(layer.get_prunable_weights() or [])
        for weight in weights:
            if not isinstance(weight, keras.Variable):
                raise ValueError(
                    f"`get_prunable_weights()` of layer {layer.name!r} must return variables, got {weight!r}"
                )
        if not weights:
            raise ValueError(f"`get_prunable_weights()` of layer {layer.name!r} returned no weights to prune")
        return weights
    kernel = getattr(layer, "kernel", None)
    if not isinstance(kernel, keras.Variable):
        raise ValueError(
            f"`layer` {layer.name!r} ({type(layer).__name__}) has no `kernel` weight to prune (a custom "
            "layer can name its prunable weights: subclass tsc.pruning.PrunableLayer)"
        )
    return [kernel]


def _attribute_of(layer, variable) -> str:
    """The name of the layer attribute holding `variable` ("kernel" over "_kernel" storage...)."""
    names = [k for k, v in vars(layer).items() if v is variable]
    if not names:
        raise ValueError(
            f"cannot find the attribute of layer {layer.name!r} ({type(layer).__name__}) that holds "
            f"the prunable weight {getattr(variable, 'path', variable)!r}: the weights to prune must be "
            "held directly by attributes of the layer (e.g. `self.kernel`)"
        )
    stem = getattr(variable, "name", "").split("/")[-1].split(":")[0]
    for preferred in ("kernel", stem):
        if preferred in names:
            return preferred
    return names[0]


@keras.saving.register_keras_serializable(package="tf_sparseconv")
class PruneLowMagnitude(keras.layers.Wrapper):
    """Wraps a layer so that its kernel is multiplied by a 0/1 mask in the forward pass.

    The mask (kernel-shaped, non-trainable) and `pruning_step` (int64, -1 until
    training starts) are variables of this wrapper, so `.keras` files and
    `tf.train.Checkpoint` carry them. `UpdatePruningStep` advances the step and
    recomputes the mask on the schedule's pruning steps; between those the
    mask is fixed and gradients reach the kernel only where the mask is 1.
    The bias and every other weight are never pruned, unless the layer names
    its prunable weights (`PrunableLayer.get_prunable_weights`): then each of
    those gets its own mask (`masks`; `mask` is the first one's).

    Steps follow tensorflow-model-optimization: `UpdatePruningStep` sets a fresh
    wrapper's step from -1 to 0 when training begins and adds 1 before every
    batch, so the first batch runs at step 1 and the mask first changes at the
    first step `s >= 1` the schedule prunes at (for `ConstantSparsity(0.5, 0)`,
    every 100 steps: at batch 100). A training call (`training=True`) of a
    wrapper whose step is still below 1 raises a `RuntimeError` naming the
    callback.

    Args:
      layer: the Keras layer (with a `kernel` weight, or a `PrunableLayer`) to prune.
      pruning_schedule: a schedule (`ConstantSparsity`, `PolynomialDecay`,
        tfmot's, or any callable step -> (should_prune, sparsity)).
      granularity: "weight", "kernel", "block" or "m_by_n".
      block_shape: block size over the kernel's last two axes ("block").
      m_by_n: at least m zeros in every n consecutive input channels ("m_by_n").
      channel_group: "kernel" only: consecutive output channels in groups of
        this size keep the same input channels.
      block_pooling_type: "AVG" or "MAX": a block's score is the mean or the
        largest |w| in it ("block").
      **kwargs: Keras layer arguments (`name`, ...); tfmot's `block_size` and
        `sparsity_m_by_n` are accepted too (see `prune_low_magnitude`).
    """

    def __init__(
        self,
        layer: keras.layers.Layer,
        pruning_schedule=_DEFAULT_SCHEDULE,
        granularity: str = "weight",
        block_shape=(4, 4),
        m_by_n=(2, 4),
        channel_group=1,
        block_pooling_type: str = "AVG",
        **kwargs,
    ):
        if not isinstance(layer, keras.layers.Layer) or isinstance(layer, keras.Model):
            raise ValueError(f"`layer` must be a Keras layer (not a model), got {layer!r}")
        if isinstance(layer, PruneLowMagnitude):
            raise ValueError(f"`layer` {layer.name!r} is already wrapped for pruning")
        pruning_schedule, granularity, block_shape, m_by_n = tfmot_arguments(
            pruning_schedule,
            granularity,
            block_shape,
            m_by_n,
            kwargs.pop("block_size", None),
            kwargs.pop("sparsity_m_by_n", None),
        )
        (
            self.pruning_schedule,
            self.granularity,
            self.block_shape,
            self.m_by_n,
            self.channel_group,
            self.block_pooling_type,
        ) = check_pruning_args(
            pruning_schedule, granularity, block_shape, m_by_n, channel_group, block_pooling_type
        )
        kwargs.setdefault("name", f"prune_low_magnitude_{layer.name}")
        kwargs.setdefault("dtype", layer.dtype_policy)
        super().__init__(layer, **kwargs)
        self._attrs: list[str] = []
        self.masks: list = []
        self.failed_trace = False  # a training call was traced without UpdatePruningStep
        adopt_input_of(self, layer)

    # ---- weights -----------------------------------------------------------------------------
    def build(self, input_shape=None) -> None:
        if not self.layer.built:
            self.layer.build(input_shape)
            self.layer.built = True
        variables = _prunable_variables(self.layer)
        self._attrs = [_attribute_of(self.layer, v) for v in variables]
        # The first mask, then the step, then the masks of further prunable weights: the
        # variable order of single-weight wrappers (files saved before PrunableLayer support).
        self.masks = [self._add_mask(variables[0], "mask")]
        self.mask = self.masks[0]
        self.pruning_step = self.add_weight(
            name="pruning_step",
            shape=(),
            initializer=keras.initializers.Constant(-1),
            dtype="int64",
            trainable=False,
        )
        self.masks += [self._add_mask(v, f"mask_{i}") for i, v in enumerate(variables[1:], 1)]
        self.built = True

    def _add_mask(self, variable, name: str):
        return self.add_weight(
            name=name,
            shape=tuple(variable.shape),
            initializer="ones",
            dtype=variable.dtype,
            trainable=False,
            autocast=False,
        )

    @property
    def pruned_weights(self) -> list:
        """The wrapped layer's variables this wrapper prunes (its kernel, or what
        `get_prunable_weights()` names), in the order of `masks`."""
        return [getattr(self.layer, attr) for attr in self._attrs]

    @property
    def pruned_attributes(self) -> list[str]:
        """The wrapped layer's attributes holding `pruned_weights` ("_kernel", "bias", ...)."""
        return list(self._attrs)

    @property
    def pruned_weight(self) -> keras.Variable:
        """The wrapped layer's kernel variable (the first weight this wrapper prunes)."""
        return getattr(self.layer, self._attrs[0])

    @property
    def kernel_attribute(self) -> str:
        """The name of the wrapped layer's attribute holding the pruned kernel ("kernel", "_kernel")."""
        return self._attrs[0]

    @property
    def in_axis(self) -> int:
        return kernel_layout(self.layer).in_axis

    # ---- forward -----------------------------------------------------------------------------
    def _check_step_advanced(self) -> None:
        """RuntimeError when training with a step below 1 (`UpdatePruningStep` never ran). The
        step is read as a Python value, also while a `tf.function` (fit's train step) traces."""
        try:
            with tf.init_scope():
                step = int(np.asarray(keras.ops.convert_to_numpy(self.pruning_step)))
        except Exception:  # noqa: BLE001 - an unreadable variable (odd contexts): no check
            return
        if step < 1 and getattr(self, "driven_by_callback", False):
            # Built during the first training step, after UpdatePruningStep stepped the built
            # wrappers: this batch is step 1 here too, as the callback would have made it.
            from tf_sparseconv.python.pruning.callbacks import _as_bool_and_float

            with tf.init_scope():
                self.pruning_step.assign(1)
                should_prune, sparsity = _as_bool_and_float(
                    self.pruning_schedule(tf.constant(1, dtype=tf.int64))
                )
                if should_prune:
                    self.update_mask(sparsity)
            return
        if step < 1:
            if not tf.executing_eagerly():
                # The error ends the first trace of fit's train function, which then refuses to
                # create the optimizer's variables when retraced: UpdatePruningStep remakes it.
                self.failed_trace = True
            raise RuntimeError(_NOT_DRIVEN.format(name=self.name, step=step))

    def call(self, inputs, training=None) -> Any:
        if isinstance(training, (bool, np.bool_)) and training:
            self._check_step_advanced()
        originals = self.pruned_weights
        masked = []
        for variable, mask in zip(originals, self.masks):
            dtype = variable.dtype
            if self.layer.autocast and tf.as_dtype(dtype).is_floating:
                dtype = self.layer.compute_dtype
            masked.append(tf.cast(variable.value, dtype) * tf.cast(mask.value, dtype))
        # The wrapped layer reads its weights from its attributes in `call`: point them at the
        # masked tensors (gradient = upstream * mask w.r.t. the variables) for the duration of
        # the call.
        for attr, value in zip(self._attrs, masked):
            object.__setattr__(self.layer, attr, value)
        try:
            return self.layer(inputs, training=training)
        finally:
            for attr, variable in zip(self._attrs, originals):
                object.__setattr__(self.layer, attr, variable)

    def compute_output_shape(self, input_shape) -> tuple | list:
        return self.layer.compute_output_shape(input_shape)

    # ---- pruning -----------------------------------------------------------------------------
    def compute_mask_for(self, sparsity: float, index: int = 0) -> np.ndarray:
        """The mask the current |weight| (`pruned_weights[index]`, the kernel by default) gives at
        `sparsity` (nothing is assigned)."""
        weight = np.asarray(keras.ops.convert_to_numpy(self.pruned_weights[index]))
        return masks.compute_mask(
            weight,
            float(sparsity),
            self.granularity,
            self.block_shape,
            self.m_by_n,
            self.in_axis,
            channel_group=self.channel_group,
            block_pooling=self.block_pooling_type,
        )

    def update_mask(self, sparsity: float) -> None:
        """Recomputes every mask for `sparsity` from |weight| and zeroes the pruned weights."""
        for index, mask in enumerate(self.masks):
            mask.assign(self.compute_mask_for(sparsity, index))
        self.apply_mask()

    def apply_mask(self) -> None:
        """weight <- weight * mask (so the stored weights are the pruned ones)."""
        for variable, mask in zip(self.pruned_weights, self.masks):
            variable.assign(variable.value * tf.cast(mask.value, variable.dtype))

    def sparsity(self) -> float:
        """The fraction of zeros over the masks (the kernel's mask, for layers pruning only it)."""
        values = [np.asarray(keras.ops.convert_to_numpy(m)) for m in self.masks]
        size = sum(v.size for v in values)
        return float(1.0 - sum(v.sum() for v in values) / size) if size else 0.0

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return super().from_config(dict(config), custom_objects=custom_objects)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "pruning_schedule": serialize_schedule(self.pruning_schedule),
                "granularity": self.granularity,
                "block_shape": list(self.block_shape),
                "m_by_n": list(self.m_by_n),
                "channel_group": self.channel_group,
                "block_pooling_type": self.block_pooling_type,
            }
        )
        return config


def collect_pruned_layers(model) -> list[PruneLowMagnitude]:
    """Every `PruneLowMagnitude` in `model` (nested models included), each once."""
    return find_layers(model, PruneLowMagnitude)


def _is_prunable(layer) -> bool:
    """Whether `prune_low_magnitude(model)` wraps `layer`: a supported type, or a layer naming
    its prunable weights (`PrunableLayer`; when built, it must name at least one)."""
    if isinstance(layer, PruneLowMagnitude):
        return False
    if has_prunable_weights_method(layer):
        return not layer.built or bool(layer.get_prunable_weights())
    return isinstance(layer, prunable_types())


def prune_low_magnitude(
    to_prune,
    pruning_schedule=_DEFAULT_SCHEDULE,
    granularity: str = "weight",
    block_shape=(4, 4),
    m_by_n=(2, 4),
    channel_group=1,
    *,
    block_size=None,
    block_pooling_type: str = "AVG",
    sparsity_m_by_n=None,
    pruning_policy=None,
    **kwargs,
) -> keras.layers.Layer | keras.Model:
    """Wraps a layer, or every prunable layer of a model, for magnitude pruning.

    Args:
      to_prune: a Keras layer (returns a `PruneLowMagnitude` wrapping it), a
        list of layers (returns the list of wrappers; `InputLayer`s and wrappers
        stay as they are), or a Sequential/Functional model (returns a NEW model,
        nested models included, in which every Dense, Conv1D/2D/3D,
        DepthwiseConv1D/2D, tf_sparseconv conv layer and `PrunableLayer` is
        wrapped; the original model is untouched, weights are copied).
      pruning_schedule: `ConstantSparsity`, `PolynomialDecay`, a tfmot schedule,
        or any callable step -> (should_prune, sparsity). Default
        `ConstantSparsity(0.5, 0)` (tfmot's: 50% every 100 steps, first at step 100).
      granularity: "weight", "kernel" (whole k×k kernels of an (in, out) channel
        pair), "block" (`block_shape` blocks over the kernel's last two axes) or
        "m_by_n" (at least m zeros in every n consecutive input channels; the
        zero fraction is then max(sparsity, m / n)).
      block_shape, m_by_n: pairs of positive ints.
      channel_group: for "kernel": output channels in groups of this many
        consecutive channels keep the same input channels (scored by the
        group's summed kernel magnitudes). The stripped channel-sparse layer
        then has rows with identical connection lists, which its CPU kernel
        computes together (each loaded input column serves the whole group):
        4-6 makes it about twice as fast as 1 with AVX-512. Default 1 (every
        output channel chooses its own inputs).
      block_size: tfmot's argument: `(h, w)` other than (1, 1) is
        `granularity="block", block_shape=(h, w)`.
      block_pooling_type: "AVG" (default) or "MAX": a block's score is the mean
        or the largest |w| in it.
      sparsity_m_by_n: tfmot's argument: `(m, n)` is `granularity="m_by_n",
        m_by_n=(m, n)` with tfmot's behaviour: the m:n mask is computed once, at
        the first training step, and the pruning schedule is not used.
      pruning_policy: tfmot's experimental policies are not supported (None only).
      **kwargs: for a single layer, Keras layer arguments of the wrapper (`name`, ...).

    Returns:
      The wrapped layer(s) or the new model. Train it with the `UpdatePruningStep`
      callback (training without it raises a `RuntimeError` naming it);
      `strip_pruning` removes the wrappers afterwards.
    """
    if pruning_policy is not None:
        raise ValueError(
            f"`pruning_policy` is not supported by tsc.pruning (got {pruning_policy!r}): prune only some "
            "layers with `keras.models.clone_model(model, clone_function=...)` instead"
        )
    pruning_schedule, granularity, block_shape, m_by_n = tfmot_arguments(
        pruning_schedule, granularity, block_shape, m_by_n, block_size, sparsity_m_by_n
    )
    args = check_pruning_args(
        pruning_schedule, granularity, block_shape, m_by_n, channel_group, block_pooling_type
    )
    names = (
        "pruning_schedule",
        "granularity",
        "block_shape",
        "m_by_n",
        "channel_group",
        "block_pooling_type",
    )
    options = dict(zip(names, args))
    if isinstance(to_prune, (list, tuple)):
        wrapped = []
        for layer in to_prune:
            if isinstance(layer, PruneLowMagnitude):
                wrapped.append(layer)
            elif isinstance(layer, keras.layers.InputLayer):
                wrapped.append(fresh_layer(layer))
            else:
                wrapped.append(prune_low_magnitude(layer, **options))
        return wrapped
    if isinstance(to_prune, keras.Model):

        def clone_layer(layer):
            new = fresh_layer(layer)
            if _is_prunable(layer):
                return PruneLowMagnitude(new, **options)
            return new

        def copy_pair(old, new):
            if isinstance(new, PruneLowMagnitude) and not isinstance(old, PruneLowMagnitude):
                copy_layer_weights(old, new.layer)
            else:
                copy_layer_weights(old, new)

        return clone_with(to_prune, clone_layer, copy_pair)
    if isinstance(to_prune, keras.layers.Layer):
        if isinstance(to_prune, PruneLowMagnitude):
            raise ValueError(f"`to_prune` {to_prune.name!r} is already wrapped for pruning")
        if not (isinstance(to_prune, prunable_types()) or has_prunable_weights_method(to_prune)):
            raise ValueError(
                f"`to_prune` must be a prunable layer ({', '.join(t.__name__ for t in prunable_types())}, "
                f"or a PrunableLayer) or a model, got {type(to_prune).__name__}"
            )
        return PruneLowMagnitude(to_prune, **options, **kwargs)
    raise ValueError(f"`to_prune` must be a Keras layer, a list of layers or a model, got {to_prune!r}")
