"""`PruneLowMagnitude`: a Keras wrapper that multiplies a layer's kernel by a mask."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tf_sparseconv.python._clone import clone_layers, is_cloneable
from tf_sparseconv.python.pruning import masks
from tf_sparseconv.python.pruning.schedules import (
    ConstantSparsity,
    check_schedule,
    deserialize_schedule,
    serialize_schedule,
)

_DEFAULT_SCHEDULE = ConstantSparsity(0.5, 0)


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


def _in_axis(layer) -> int:
    """The kernel axis of the input channels (-2, or -1 for [*k, out, in] transposed kernels)."""
    from tf_sparseconv.python.layers import coord_sparse

    transposed = (coord_sparse.SparseConvTranspose, keras.layers.Conv1DTranspose)
    transposed += (keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)
    return -1 if isinstance(layer, transposed) else -2


def _pair(value, name: str) -> tuple[int, int]:
    try:
        pair = tuple(int(v) for v in value)
        ok = len(pair) == 2 and all(not isinstance(v, bool) and int(v) == v for v in value)
    except (TypeError, ValueError):
        ok = False
    if not ok or min(pair) < 1:
        raise ValueError(f"`{name}` must be a pair of positive ints, got {value!r}")
    return pair


def check_pruning_args(pruning_schedule, granularity, block_shape, m_by_n, channel_group=1):
    """Validated `(schedule, granularity, block_shape, m_by_n, channel_group)`; ValueError naming
    the argument."""
    if isinstance(pruning_schedule, dict):
        pruning_schedule = deserialize_schedule(pruning_schedule)
    schedule = check_schedule(pruning_schedule)
    if granularity not in masks.GRANULARITIES:
        raise ValueError(f"`granularity` must be one of {masks.GRANULARITIES}, got {granularity!r}")
    block_shape = _pair(block_shape, "block_shape")
    m_by_n = _pair(m_by_n, "m_by_n")
    if m_by_n[0] >= m_by_n[1]:
        raise ValueError(f"`m_by_n` must be (m, n) with m < n, got {m_by_n!r}")
    if (
        isinstance(channel_group, bool)
        or not isinstance(channel_group, (int, np.integer))
        or channel_group < 1
    ):
        raise ValueError(f"`channel_group` must be a positive int, got {channel_group!r}")
    return schedule, granularity, block_shape, m_by_n, int(channel_group)


@keras.saving.register_keras_serializable(package="tf_sparseconv")
class PruneLowMagnitude(keras.layers.Wrapper):
    """Wraps a layer so that its kernel is multiplied by a 0/1 mask in the forward pass.

    The mask (kernel-shaped, non-trainable) and `pruning_step` (int64, -1 until
    training starts) are variables of this wrapper, so `.keras` files and
    `tf.train.Checkpoint` carry them. `UpdatePruningStep` advances the step and
    recomputes the mask on the schedule's pruning steps; between those the
    mask is fixed and gradients reach the kernel only where the mask is 1.
    The bias and every other weight are never pruned.

    Args:
      layer: the Keras layer (with a `kernel` weight) to prune.
      pruning_schedule: a schedule (`ConstantSparsity`, `PolynomialDecay`,
        tfmot's, or any callable step -> (should_prune, sparsity)).
      granularity: "weight", "kernel", "block" or "m_by_n".
      block_shape: block size over the kernel's last two axes ("block").
      m_by_n: at least m zeros in every n consecutive input channels ("m_by_n").
      channel_group: "kernel" only: consecutive output channels in groups of
        this size keep the same input channels.
    """

    def __init__(
        self,
        layer: keras.layers.Layer,
        pruning_schedule=_DEFAULT_SCHEDULE,
        granularity: str = "weight",
        block_shape=(4, 4),
        m_by_n=(2, 4),
        channel_group=1,
        **kwargs,
    ):
        if not isinstance(layer, keras.layers.Layer) or isinstance(layer, keras.Model):
            raise ValueError(f"`layer` must be a Keras layer (not a model), got {layer!r}")
        if isinstance(layer, PruneLowMagnitude):
            raise ValueError(f"`layer` {layer.name!r} is already wrapped for pruning")
        (
            self.pruning_schedule,
            self.granularity,
            self.block_shape,
            self.m_by_n,
            self.channel_group,
        ) = check_pruning_args(pruning_schedule, granularity, block_shape, m_by_n, channel_group)
        kwargs.setdefault("name", f"prune_low_magnitude_{layer.name}")
        kwargs.setdefault("dtype", layer.dtype_policy)
        super().__init__(layer, **kwargs)
        self._kernel_attr = None
        self.input_spec = layer.input_spec

    # ---- weights -----------------------------------------------------------------------------
    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
            self.layer.built = True
        kernel = getattr(self.layer, "kernel", None)
        if not isinstance(kernel, keras.Variable):
            raise ValueError(
                f"`layer` {self.layer.name!r} ({type(self.layer).__name__}) has no `kernel` weight to prune"
            )
        names = [k for k, v in vars(self.layer).items() if v is kernel]
        if not names:
            raise ValueError(f"cannot find the kernel attribute of {type(self.layer).__name__}")
        self._kernel_attr = "kernel" if "kernel" in names else names[0]
        self.mask = self.add_weight(
            name="mask",
            shape=tuple(kernel.shape),
            initializer="ones",
            dtype=kernel.dtype,
            trainable=False,
            autocast=False,
        )
        self.pruning_step = self.add_weight(
            name="pruning_step",
            shape=(),
            initializer=keras.initializers.Constant(-1),
            dtype="int64",
            trainable=False,
        )
        self.built = True

    @property
    def pruned_weight(self) -> keras.Variable:
        """The wrapped layer's kernel variable (the weight this wrapper prunes)."""
        return getattr(self.layer, self._kernel_attr)

    @property
    def kernel_attribute(self) -> str:
        """The name of the wrapped layer's attribute holding the pruned kernel ("kernel", "_kernel")."""
        return self._kernel_attr

    @property
    def in_axis(self) -> int:
        return _in_axis(self.layer)

    # ---- forward -----------------------------------------------------------------------------
    def call(self, inputs, training=None):
        kernel = self.pruned_weight
        dtype = kernel.dtype
        if self.layer.autocast and tf.as_dtype(dtype).is_floating:
            dtype = self.layer.compute_dtype
        masked = tf.cast(kernel.value, dtype) * tf.cast(self.mask.value, dtype)
        # The wrapped layer reads its kernel attribute in `call`: point it at the masked
        # tensor (gradient = upstream * mask w.r.t. the variable) for the duration of the call.
        object.__setattr__(self.layer, self._kernel_attr, masked)
        try:
            return self.layer(inputs, training=training)
        finally:
            object.__setattr__(self.layer, self._kernel_attr, kernel)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    # ---- pruning -----------------------------------------------------------------------------
    def compute_mask_for(self, sparsity: float) -> np.ndarray:
        """The mask the current |kernel| gives at `sparsity` (nothing is assigned)."""
        kernel = np.asarray(keras.ops.convert_to_numpy(self.pruned_weight))
        return masks.compute_mask(
            kernel,
            float(sparsity),
            self.granularity,
            self.block_shape,
            self.m_by_n,
            self.in_axis,
            channel_group=self.channel_group,
        )

    def update_mask(self, sparsity: float) -> None:
        """Recomputes the mask for `sparsity` from |kernel| and zeroes the pruned weights."""
        mask = self.compute_mask_for(sparsity)
        self.mask.assign(mask)
        self.apply_mask()

    def apply_mask(self) -> None:
        """kernel <- kernel * mask (so the stored weights are the pruned ones)."""
        kernel = self.pruned_weight
        kernel.assign(kernel.value * tf.cast(self.mask.value, kernel.dtype))

    def sparsity(self) -> float:
        """The fraction of zeros in the mask."""
        mask = np.asarray(keras.ops.convert_to_numpy(self.mask))
        return float(1.0 - mask.mean()) if mask.size else 0.0

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return super().from_config(dict(config), custom_objects=custom_objects)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "pruning_schedule": serialize_schedule(self.pruning_schedule),
                "granularity": self.granularity,
                "block_shape": list(self.block_shape),
                "m_by_n": list(self.m_by_n),
                "channel_group": self.channel_group,
            }
        )
        return config


def collect_pruned_layers(model) -> list[PruneLowMagnitude]:
    """Every `PruneLowMagnitude` in `model` (nested models included), each once."""
    found: list[PruneLowMagnitude] = []
    seen: set[int] = set()

    def visit(layer):
        if id(layer) in seen:
            return
        seen.add(id(layer))
        if isinstance(layer, PruneLowMagnitude):
            found.append(layer)
            return
        for child in getattr(layer, "layers", None) or []:
            visit(child)

    visit(model)
    return found


def clone_with(model, clone_layer, copy_weights):
    """`keras.models.clone_model(recursive=True)` with `clone_layer(layer)` and weights copied.

    `copy_weights(old_layer, new_layer)` runs for each cloned layer after the new
    model is built.
    """
    if not is_cloneable(model):
        raise ValueError(
            f"`model` must be a Sequential or Functional Keras model, got {type(model).__name__} "
            "(subclassed models cannot be cloned; wrap their layers yourself)"
        )
    new_model, pairs = clone_layers(model, clone_layer)
    for old, new in pairs:
        copy_weights(old, new)
    return new_model


def _default_clone(layer):
    return layer.__class__.from_config(layer.get_config())


def copy_layer_weights(old, new) -> None:
    old_weights, new_weights = old.weights, new.weights
    if len(old_weights) != len(new_weights):
        raise ValueError(
            f"cannot copy the weights of {old.name!r}: {len(old_weights)} weights, the clone has "
            f"{len(new_weights)}"
        )
    for source, target in zip(old_weights, new_weights):
        target.assign(source.value)


def prune_low_magnitude(
    to_prune,
    pruning_schedule=_DEFAULT_SCHEDULE,
    granularity: str = "weight",
    block_shape=(4, 4),
    m_by_n=(2, 4),
    channel_group=1,
):
    """Wraps a layer, or every prunable layer of a model, for magnitude pruning.

    Args:
      to_prune: a Keras layer (returns a `PruneLowMagnitude` wrapping it), or a
        Sequential/Functional model (returns a NEW model, nested models included,
        in which every Dense, Conv1D/2D/3D, DepthwiseConv1D/2D and tf_sparseconv
        conv layer is wrapped; the original model is untouched, weights are copied).
      pruning_schedule: `ConstantSparsity`, `PolynomialDecay`, a tfmot schedule,
        or any callable step -> (should_prune, sparsity). Default
        `ConstantSparsity(0.5, 0)`.
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

    Returns:
      The wrapped layer or the new model. Train it with the `UpdatePruningStep`
      callback; `strip_pruning` removes the wrappers afterwards.
    """
    args = check_pruning_args(pruning_schedule, granularity, block_shape, m_by_n, channel_group)
    kwargs = dict(zip(("pruning_schedule", "granularity", "block_shape", "m_by_n", "channel_group"), args))
    if isinstance(to_prune, keras.Model):
        supported = prunable_types()

        def clone_layer(layer):
            new = _default_clone(layer)
            if isinstance(layer, supported) and not isinstance(layer, PruneLowMagnitude):
                return PruneLowMagnitude(new, **kwargs)
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
        if not isinstance(to_prune, prunable_types()):
            raise ValueError(
                f"`to_prune` must be a prunable layer ({', '.join(t.__name__ for t in prunable_types())}) "
                f"or a model, got {type(to_prune).__name__}"
            )
        return PruneLowMagnitude(to_prune, **kwargs)
    raise ValueError(f"`to_prune` must be a Keras layer or model, got {to_prune!r}")
