"""`strip_pruning`: remove the wrappers, bake the masks in, optionally go channel-sparse."""

from __future__ import annotations

import keras
import numpy as np

from tf_sparseconv.python._clone import clone_with, copy_layer_weights, fresh_layer
from tf_sparseconv.python.layers.channel_sparse import channel_sparse_from_conv
from tf_sparseconv.python.pruning.wrapper import PruneLowMagnitude


def masked_weights(wrapper: PruneLowMagnitude) -> list[np.ndarray]:
    """weight * mask for each pruned weight of a built wrapper (the kernel first), as NumPy."""
    out = []
    for variable, mask in zip(wrapper.pruned_weights, wrapper.masks):
        weight = np.asarray(keras.ops.convert_to_numpy(variable))
        out.append(weight * np.asarray(keras.ops.convert_to_numpy(mask)).astype(weight.dtype))
    return out


def masked_kernel(wrapper: PruneLowMagnitude) -> np.ndarray:
    """kernel * mask of a built wrapper, as NumPy."""
    return masked_weights(wrapper)[0]


def _assign_masked(wrapper: PruneLowMagnitude, layer) -> None:
    """Sets `layer`'s copies of the wrapper's pruned weights to their masked values."""
    for attr, value in zip(wrapper.pruned_attributes, masked_weights(wrapper)):
        getattr(layer, attr).assign(value)


def connections_from_kernel(kernel: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """int32 `[Cout, m]` connection lists of a `[*k, Cin, Cout]` kernel's non-zero (in, out) pairs.

    With a pruning `mask` (kernel-shaped), the pairs the mask keeps instead (a kept
    kernel that happens to be all zero stays in its row, so output channels pruned
    as one group keep identical lists). `m` is the largest number of surviving
    inputs of any output channel (at least 1); shorter rows are padded with the
    lowest unused input channels (their weights are 0, so the outputs do not change).
    """
    source = kernel if mask is None else mask
    alive = np.any(source != 0, axis=tuple(range(kernel.ndim - 2)))  # [Cin, Cout]
    cin, cout = alive.shape
    m = max(1, int(alive.sum(axis=0).max()) if cout else 1)
    rows = []
    for o in range(cout):
        used = list(np.flatnonzero(alive[:, o]))
        spare = [i for i in range(cin) if not alive[i, o]]
        rows.append(sorted(used + spare[: m - len(used)]))
    return np.asarray(rows, dtype=np.int32).reshape(cout, m)


def _convertible(layer) -> bool:
    return (
        isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv1D))
        and layer.groups == 1
        and layer.data_format == "channels_last"
        and layer.padding in ("same", "valid")
    )


def _to_channel_sparse(wrapper: PruneLowMagnitude):
    """A built ChannelSparseConv for a kernel-pruned conv, or None when it saves nothing."""
    if not _convertible(wrapper.layer):
        return None
    kernel = masked_kernel(wrapper)
    mask = np.asarray(keras.ops.convert_to_numpy(wrapper.mask))
    connections = connections_from_kernel(kernel, mask)
    cin = kernel.shape[-2]
    if wrapper.granularity != "kernel" and connections.shape[1] >= cin:
        return None
    dense = fresh_layer(wrapper.layer)
    dense.build((None, *([None] * (kernel.ndim - 2)), cin))
    copy_layer_weights(wrapper.layer, dense)
    _assign_masked(wrapper, dense)
    return channel_sparse_from_conv(dense, connections)


def strip_pruning(model, to_sparse_layers: bool = False) -> keras.Model:
    """A plain copy of a pruned model: wrappers removed, masked kernels baked in.

    Args:
      model: a Sequential/Functional model holding `PruneLowMagnitude` layers
        (nested models included), or a single built `PruneLowMagnitude`.
      to_sparse_layers: also turn each pruned `Conv2D`/`Conv1D` whose masked kernel
        has whole zero (in, out) kernels (granularity "kernel", or any other that
        leaves some) into a `tsc.layers.ChannelSparseConv2D`/`1D` reading `m` inputs
        per output channel (`m` = the most surviving inputs of any output channel).

    Returns:
      The new model (or layer); its outputs equal the pruned model's.
    """
    if not isinstance(to_sparse_layers, bool):
        raise ValueError(f"`to_sparse_layers` must be a bool, got {to_sparse_layers!r}")
    converted: set[int] = set()

    def clone_layer(layer):
        if not isinstance(layer, PruneLowMagnitude):
            return fresh_layer(layer)
        if to_sparse_layers and layer.built:
            sparse = _to_channel_sparse(layer)
            if sparse is not None:
                converted.add(id(sparse))
                return sparse
        return fresh_layer(layer.layer)

    def copy(old, new):
        if id(new) in converted:
            return
        if isinstance(old, PruneLowMagnitude):
            copy_layer_weights(old.layer, new)
            if old.built:
                _assign_masked(old, new)
        else:
            copy_layer_weights(old, new)

    if isinstance(model, PruneLowMagnitude):
        new = clone_layer(model)
        if model.built and id(new) not in converted:
            new.build_from_config(model.layer.get_build_config())
            copy(model, new)
        return new
    if isinstance(model, keras.layers.Layer) and not isinstance(model, keras.Model):
        raise ValueError(f"`model` must be a Keras model or a PruneLowMagnitude layer, got {model!r}")
    return clone_with(model, clone_layer, copy)
