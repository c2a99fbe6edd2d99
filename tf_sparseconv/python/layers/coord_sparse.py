"""Keras layers on coordinate sparse maps (sparse voxel grids).

A sparse map travels between layers as a list `[features, coords, shape]`:
`features` `[N, C]`, `coords` int32 `[N, 1 + D]` (batch index, then D spatial
indices) and `shape` int32 `[1 + D]` = `(batch_size, *spatial_shape)` — the
dense shape without channels, like `tf.SparseTensor.dense_shape`. N varies
from batch to batch (Keras sees it as the leading, "batch" dimension of
`features` and `coords`).

Entry points: `Sparsify` (a dense `[B, *spatial, C]` tensor -> sparse map) and
`SparseMap` (`[features, coords]` or `[features, coords, num_sites]` from a `tf.data`
pipeline such as `tsc.data.sparse_batches` -> sparse map, validated).
Exits: `Densify` (-> dense) and `SparseGlobalPooling` (-> `[B, C]`).
In between: `SparseConv1D/2D/3D`, `SparseMaxPooling*`/`SparseAveragePooling*`,
`SparseBatchNormalization`. Layers at the same resolution share one rulebook
per traced graph (computed by the first of them).
"""

from __future__ import annotations

import weakref
from typing import Any

import keras
import tensorflow as tf

from tf_sparseconv.python._validation import int_tuple, positive_int
from tf_sparseconv.python.layers._base import ConvWeightsMixin, check_backend
from tf_sparseconv.python.ops import coord_sparse_ops
from tf_sparseconv.python.ops._loader import converting

# --- the sparse map in Keras ---------------------------------------------------------


def _split(inputs, layer_name: str):
    if not isinstance(inputs, (list, tuple)) or len(inputs) != 3:
        raise ValueError(
            f"{layer_name} is called on a sparse map [features, coords, shape] "
            f"(from Sparsify, SparseMap or another sparse layer), got {inputs!r}"
        )
    return inputs[0], inputs[1], inputs[2]


def _dims_of(coords_shape, layer_name: str) -> int:
    width = coords_shape[-1]
    if width is None or width not in (2, 3, 4):
        raise ValueError(
            f"{layer_name}: coords must be [N, 1 + D] with D = 1, 2 or 3, got shape {coords_shape}"
        )
    return int(width) - 1


def _sparse_spec(shapes, dtype):
    """KerasTensors of a sparse map [features, coords, shape] with the given shapes."""
    return [
        keras.KerasTensor(shapes[0], dtype=dtype),
        keras.KerasTensor(shapes[1], dtype="int32"),
        keras.KerasTensor(shapes[2], dtype="int32"),
    ]


class _RulebookCache:
    """Rulebooks of the coords tensors seen in the current graph, so that layers at the same
    resolution compute the rulebook once. Keyed by the coords tensor object (held weakly) and
    the geometry; a dead or different tensor is a miss."""

    def __init__(self):
        self._entries: dict = {}

    def get(self, coords, shape, kernel_size, strides, dilations, submanifold):
        graph = tf.compat.v1.get_default_graph()
        key = (id(coords), kernel_size, strides, dilations, submanifold)
        hit = self._entries.get(key)
        if hit is not None and hit[0]() is coords and hit[1] is graph:
            return hit[2]
        rulebook = self._compute(coords, shape, kernel_size, strides, dilations, submanifold)
        try:
            ref = weakref.ref(coords)
        except TypeError:  # not weakly referenceable: no caching
            return rulebook
        self._entries = {k: v for k, v in self._entries.items() if v[0]() is not None}
        self._entries[key] = (ref, graph, rulebook)
        return rulebook

    @staticmethod
    def _compute(coords, shape, kernel_size, strides, dilations, submanifold):
        return coord_sparse_ops.Rulebook(
            *coord_sparse_ops.sparse_conv_rulebook(
                coords, shape[1:], kernel_size, strides, dilations, submanifold
            )
        )


_RULEBOOKS = _RulebookCache()


class _SparseLayer(keras.layers.Layer):
    """A layer on sparse maps: custom ops, no XLA."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        check_backend(type(self).__name__)
        self.supports_jit = False


@keras.saving.register_keras_serializable(package="tf_sparseconv")
class Sparsify(_SparseLayer):
    """Dense `[B, *spatial, C]` (D = 1, 2, 3) -> sparse map of the sites where any `|x| > threshold`."""

    def __init__(self, threshold: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if float(threshold) < 0:
            raise ValueError(f"`threshold` must be >= 0, got {threshold!r}")
        self.threshold = float(threshold)

    def call(self, x) -> Any:
        features, coords = coord_sparse_ops.from_dense(x, self.threshold)
        return [features, coords, tf.shape(x, out_type=tf.int32)[:-1]]

    def compute_output_shape(self, input_shape) -> tuple | list:
        dims = len(input_shape) - 2
        if dims not in (1, 2, 3):
            raise ValueError(f"Sparsify needs [B, *spatial, C] with 1-3 spatial axes, got {input_shape}")
        return [(None, input_shape[-1]), (None, 1 + dims), (1 + dims,)]

    def compute_output_spec(self, x) -> Any:
        shapes = self.compute_output_shape(x.shape)
        return _sparse_spec(shapes, x.dtype)

    def get_config(self) -> dict:
        return {**super().get_config(), "threshold": self.threshold}


def _first_row(where):
    """The first row (int32) where the bool vector `where` holds; its length when none does."""
    padded = tf.concat([tf.cast(where, tf.int32), [1]], 0)
    return tf.argmax(padded, output_type=tf.int32)


def _assert(condition, data):
    """`tf.debugging.Assert`; eagerly, an `InvalidArgumentError` whose message reads as a sentence."""
    if tf.executing_eagerly():
        if not bool(condition):
            words = [str(d.numpy()) if tf.is_tensor(d) else str(d) for d in data]
            raise tf.errors.InvalidArgumentError(None, None, " ".join(words))
        return None
    # int32 and string data only: tf.debugging.Assert then needs no cond, so the graph stays one
    # the LiteRT and ONNX converters take (they drop the Assert ops and the ops only they read).
    return tf.debugging.Assert(condition, data, summarize=1)


@keras.saving.register_keras_serializable(package="tf_sparseconv")
class SparseMap(_SparseLayer):
    """`[features, coords]` or `[features, coords, num_sites]` (batches from a `tf.data`
    pipeline, e.g. `tsc.data.sparse_batches`) -> sparse map.

    `spatial_shape` is the grid (D ints). The batch size, the map's `shape[0]`, is
    - the length of `num_sites` (int `[B]`, the sites of each sample, as
      `tsc.data.sparse_batches` yields them) when the layer is called on three inputs; the
      rows of `coords` must then hold exactly `num_sites[b]` sites of each sample `b`, which
      also catches site rows that were sliced into batches as if they were samples (Keras'
      `fit`/`predict`/`evaluate` on NumPy arrays do that: feed sparse maps as a `tf.data`
      pipeline);
    - else `batch_size` when given;
    - else inferred as `max(coords[:, 0]) + 1` (0 for an empty map), which misses samples
      without a site at the end of a batch; an inferred batch larger than the number of sites
      is an error asking for `batch_size` (or `num_sites`) — it cannot be told from a corrupt
      index, and a corrupt index would make the layers after allocate `[index + 1, C]`.

    Checked at run time (`InvalidArgumentError` naming the layer, the argument and the row;
    the checks stay in traced graphs and SavedModels, the LiteRT/ONNX converters drop them):
    `features` and `coords` have the same number of rows, batch indices are in `[0, batch)`,
    `num_sites` matches `coords` and, with both given, has `batch_size` entries.
    """

    def __init__(self, spatial_shape, batch_size: int | None = None, **kwargs):
        super().__init__(**kwargs)
        spatial_shape = tuple(spatial_shape)
        self.spatial_shape = int_tuple(spatial_shape, len(spatial_shape), "spatial_shape")
        if len(self.spatial_shape) not in (1, 2, 3):
            raise ValueError(f"`spatial_shape` must have 1, 2 or 3 entries, got {spatial_shape!r}")
        self.batch_size = positive_int(batch_size, "batch_size", allow_none=True)

    def _inputs(self, inputs):
        if not isinstance(inputs, (list, tuple)) or len(inputs) not in (2, 3):
            raise ValueError(
                f"SparseMap `{self.name}` is called on [features, coords] or "
                f"[features, coords, num_sites], got {inputs!r}"
            )
        return inputs[0], inputs[1], (inputs[2] if len(inputs) == 3 else None)

    def call(self, inputs) -> Any:
        features, coords, num_sites = self._inputs(inputs)
        coords = tf.cast(coords, tf.int32)
        who = f"SparseMap `{self.name}`"
        n_f, n_c = features.shape[0], coords.shape[0]
        if n_f is not None and n_c is not None and n_f != n_c:
            raise ValueError(f"{who}: `features` has {n_f} rows but `coords` has {n_c} (one row per site)")
        n = tf.shape(coords)[0]
        index = coords[:, 0]
        low_row = _first_row(index < 0)
        high_row = tf.argmax(tf.concat([index, [-1]], 0), output_type=tf.int32)
        high = tf.concat([index, [-1]], 0)[high_row]
        checks = [
            _assert(
                tf.equal(tf.shape(features)[0], n),
                [f"{who}: `features` has", tf.shape(features)[0], "rows but `coords` has", n],
            ),
            _assert(
                low_row >= n,
                [
                    f"{who}: `coords` row",
                    low_row,
                    "has batch index",
                    tf.concat([index, [0]], 0)[low_row],
                    "< 0",
                ],
            ),
        ]
        if num_sites is not None:
            num_sites = tf.reshape(tf.cast(num_sites, tf.int32), [-1])
            batch = tf.shape(num_sites)[0]
            if self.batch_size is not None:
                checks.append(
                    _assert(
                        tf.equal(batch, self.batch_size),
                        [f"{who}: `num_sites` has", batch, "samples but batch_size is", self.batch_size],
                    )
                )
            bound = "the number of samples (the length of `num_sites`)"
        elif self.batch_size is not None:
            batch = tf.constant(self.batch_size, tf.int32)
            bound = "batch_size"
        else:
            batch = high + 1
            bound = None
        if bound is not None:
            checks.append(
                _assert(
                    high < batch,
                    [f"{who}: `coords` row", high_row, "has batch index", high, f">= {bound}", batch],
                )
            )
        else:
            checks.append(
                _assert(
                    batch <= n,
                    [
                        f"{who}: `coords` row",
                        high_row,
                        "has batch index",
                        high,
                        "but the map has only",
                        n,
                        "sites: an inferred batch size larger than the number of sites is taken for a "
                        "corrupt index; pass `batch_size` to SparseMap, or call it on "
                        "[features, coords, num_sites] (tsc.data.sparse_batches yields them)",
                    ],
                )
            )
        if num_sites is not None:
            with tf.control_dependencies([c for c in checks if c is not None]):
                counts = tf.math.unsorted_segment_sum(tf.ones_like(index), index, batch)
            wrong = _first_row(tf.not_equal(counts, num_sites))
            checks.append(
                _assert(
                    wrong >= batch,
                    [
                        f"{who}: sample",
                        wrong,
                        "has",
                        tf.concat([counts, [0]], 0)[wrong],
                        "rows in `coords` but `num_sites` says",
                        tf.concat([num_sites, [0]], 0)[wrong],
                        "- were the site rows sliced into batches as if they were samples "
                        "(model.fit/predict/evaluate on NumPy arrays)? Feed sparse maps as a "
                        "tf.data pipeline, e.g. tsc.data.sparse_batches",
                    ],
                )
            )
        with tf.control_dependencies([c for c in checks if c is not None]):
            shape = tf.concat([tf.reshape(batch, [1]), tf.constant(self.spatial_shape, tf.int32)], 0)
            return [tf.identity(features), tf.identity(coords), shape]

    def compute_output_shape(self, input_shape) -> tuple | list:
        features, coords, _ = self._inputs(input_shape)
        if coords[-1] is not None and coords[-1] != 1 + len(self.spatial_shape):
            raise ValueError(
                f"SparseMap: coords must be [N, {1 + len(self.spatial_shape)}] for spatial_shape "
                f"{self.spatial_shape}, got {coords}"
            )
        if features[0] is not None and coords[0] is not None and features[0] != coords[0]:
            raise ValueError(
                f"SparseMap `{self.name}`: `features` has {features[0]} rows but `coords` has {coords[0]}"
            )
        return [tuple(features), (features[0], 1 + len(self.spatial_shape)), (1 + len(self.spatial_shape),)]

    def compute_output_spec(self, inputs) -> Any:
        features, coords, _ = self._inputs(inputs)
        shapes = self.compute_output_shape([features.shape, coords.shape])
        return _sparse_spec(shapes, features.dtype)

    def get_config(self) -> dict:
        return {**super().get_config(), "spatial_shape": self.spatial_shape, "batch_size": self.batch_size}


@keras.saving.register_keras_serializable(package="tf_sparseconv")
class Densify(_SparseLayer):
    """Sparse map -> dense `[B, *spatial, C]` (zeros at inactive sites).

    `spatial_shape` (optional) makes the spatial dims static for the layers
    that follow (e.g. `Flatten`); it must equal the map's shape.
    """

    def __init__(self, spatial_shape=None, **kwargs):
        super().__init__(**kwargs)
        if spatial_shape is not None:
            spatial_shape = tuple(spatial_shape)
            spatial_shape = int_tuple(spatial_shape, len(spatial_shape), "spatial_shape")
        self.spatial_shape = spatial_shape

    def call(self, inputs) -> Any:
        features, coords, shape = _split(inputs, "Densify")
        spatial = shape[1:]
        if self.spatial_shape is not None:
            check = tf.debugging.assert_equal(
                spatial,
                tf.constant(self.spatial_shape, tf.int32),
                message="Densify: spatial_shape differs from the map's",
            )
            with tf.control_dependencies([check]):
                spatial = tf.constant(self.spatial_shape, tf.int32)
        dims = _dims_of(coords.shape, "Densify")
        dense = coord_sparse_ops.to_dense(features, coords, tf.reshape(spatial, [dims]), shape[0])
        if self.spatial_shape is not None:
            dense = tf.ensure_shape(dense, [None, *self.spatial_shape, features.shape[-1]])
        return dense

    def compute_output_shape(self, input_shape) -> tuple | list:
        features, coords, _ = input_shape
        dims = _dims_of(coords, "Densify")
        spatial = self.spatial_shape or (None,) * dims
        return (None, *spatial, features[-1])

    def get_config(self) -> dict:
        return {**super().get_config(), "spatial_shape": self.spatial_shape}


@keras.saving.register_keras_serializable(package="tf_sparseconv")
class SparseGlobalPooling(_SparseLayer):
    """Sparse map -> `[B, C]`: max or mean over each sample's active sites (0 for a sample without)."""

    def __init__(self, mode: str = "avg", **kwargs):
        super().__init__(**kwargs)
        if mode not in ("avg", "max"):
            raise ValueError(f"`mode` must be 'avg' or 'max', got {mode!r}")
        self.mode = mode

    def call(self, inputs) -> Any:
        features, coords, shape = _split(inputs, "SparseGlobalPooling")
        segment = coords[:, 0]
        if self.mode == "avg":
            return coord_sparse_ops.unsorted_segment(features, segment, shape[0], "mean")
        pooled = coord_sparse_ops.unsorted_segment(features, segment, shape[0], "max")
        count = coord_sparse_ops.unsorted_segment(tf.ones_like(segment), segment, shape[0], "sum")
        if converting():
            # ONNX Runtime's segment max leaves -inf in an empty segment (TF: the lowest float),
            # and tf2onnx turns a float select into x * cond + y * !cond: -inf * 0 = NaN.
            pooled = tf.maximum(pooled, pooled.dtype.min)
        return tf.where(count[:, None] > 0, pooled, tf.zeros_like(pooled))

    def compute_output_shape(self, input_shape) -> tuple | list:
        return (None, input_shape[0][-1])

    def get_config(self) -> dict:
        return {**super().get_config(), "mode": self.mode}


# --- convolution -----------------------------------------------------------------------


class SparseConv(ConvWeightsMixin, _SparseLayer):
    """Sparse convolution on a sparse map (base of `SparseConv1D/2D/3D`).

    Submanifold (`submanifold=True`, strides 1): the output sites are the input
    sites — no fill-in, the map keeps its sparsity through deep stacks.
    Regular (`submanifold=False`): the output sites are every output position
    whose receptive field holds an input site (the dense convolution's support);
    with `strides` it downsamples, `shape` becomes `ceil(shape / strides)`.
    At the output sites the result is exactly
    `activation(tf.nn.convolution(dense, kernel, strides, "SAME", dilation_rate) + bias)`.
    `max_active_sites=k` then keeps the k sites per sample with the largest
    L2 norm (`tsc.ops.topk_sites`): the attention step of Hackel et al. that
    bounds the fill-in, and so the memory and compute, of the layers after it.
    """

    rank: int = 0

    config_attributes = (
        "filters",
        "kernel_size",
        "strides",
        "dilation_rate",
        "submanifold",
        "max_active_sites",
        "activity_regularizer",
    )

    def __init__(
        self,
        filters: int,
        kernel_size,
        strides=1,
        dilation_rate=1,
        submanifold: bool = True,
        max_active_sites: int | None = None,
        activation=None,
        use_bias: bool = True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        **kwargs,
    ):
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        self.filters = positive_int(filters, "filters")
        self.kernel_size = int_tuple(kernel_size, self.rank, "kernel_size")
        self.strides = int_tuple(strides, self.rank, "strides")
        self.dilation_rate = int_tuple(dilation_rate, self.rank, "dilation_rate")
        self.submanifold = bool(submanifold)
        if self.submanifold and max(self.strides) > 1:
            raise ValueError(f"`strides` must be 1 for a submanifold convolution, got {strides!r}")
        self.max_active_sites = positive_int(max_active_sites, "max_active_sites", allow_none=True)
        self._init_conv_args(locals())

    def build(self, input_shape) -> None:
        features, coords, _ = _split(input_shape, type(self).__name__)
        if features[-1] is None:
            raise ValueError(f"{type(self).__name__} needs a known number of input channels, got {features}")
        if coords[-1] is not None and coords[-1] != 1 + self.rank:
            raise ValueError(f"{type(self).__name__} needs coords [N, {1 + self.rank}], got {coords}")
        self.kernel = self._kernel("kernel", (*self.kernel_size, features[-1], self.filters))
        self.bias = self._bias("bias", self.filters) if self.use_bias else None
        self.built = True

    def call(self, inputs) -> Any:
        features, coords, shape = _split(inputs, type(self).__name__)
        kernel = tf.cast(self.kernel, features.dtype)
        rulebook = _RULEBOOKS.get(
            coords, shape, self.kernel_size, self.strides, self.dilation_rate, self.submanifold
        )
        out, out_coords, out_spatial = coord_sparse_ops.sparse_conv(
            features,
            coords,
            kernel,
            shape[1:],
            self.strides,
            self.dilation_rate,
            self.submanifold,
            rulebook=rulebook,
        )
        if self.submanifold:
            # The same sites: hand on the input coords tensor itself, so that the next layer at
            # this resolution finds the rulebook in the cache.
            out_coords = coords
        if self.bias is not None:
            out = out + tf.cast(self.bias, out.dtype)
        out = self.activation(out)
        if self.max_active_sites is not None:
            out, out_coords = coord_sparse_ops.topk_sites(out, out_coords, self.max_active_sites)
        return [out, out_coords, tf.concat([shape[:1], out_spatial], 0)]

    def compute_output_shape(self, input_shape) -> tuple | list:
        features, coords, shape = _split(input_shape, type(self).__name__)
        return [(None, self.filters), (None, 1 + self.rank), (1 + self.rank,)]

    def compute_output_spec(self, inputs) -> Any:
        features, _, _ = _split(inputs, type(self).__name__)
        shapes = self.compute_output_shape([t.shape for t in inputs])
        dtype = self.compute_dtype if features.dtype != "float64" else "float64"
        return _sparse_spec(shapes, dtype)


@keras.saving.register_keras_serializable(package="tf_sparseconv")
class SparseConv1D(SparseConv):
    """Sparse convolution over 1-D sparse maps (coords `[N, 2]`); see `SparseConv`."""

    rank = 1


@keras.saving.register_keras_serializable(package="tf_sparseconv")
class SparseConv2D(SparseConv):
    """Sparse convolution over 2-D sparse maps (coords `[N, 3]`); see `SparseConv`."""

    rank = 2


@keras.saving.register_keras_serializable(package="tf_sparseconv")
class SparseConv3D(SparseConv):
    """Sparse convolution over 3-D sparse maps (voxel grids, coords `[N, 4]`); see `SparseConv`."""

    rank = 3


class SparseConvTranspose(ConvWeightsMixin, _SparseLayer):
    """Inverse (transposed) sparse convolution: upsample a coarse map onto a fine map's sites.

    Called on `[coarse, fine]` (two sparse maps): `fine` is the map a strided
    `SparseConv` (same `kernel_size` and `strides`) downsampled, `coarse` a map
    on that convolution's output grid (e.g. its output, processed further; its
    sites may be a subset, as after `max_active_sites`). The output lives on
    `fine`'s sites (the U-Net decoder restores the encoder's sites exactly) and
    equals `activation(conv_transpose(dense(coarse), kernel, strides, "same") + bias)`
    there, `conv_transpose` being Keras' `ConvNDTranspose(padding="same")` /
    `tf.nn.conv3d_transpose` (the adjoint of the "SAME" strided convolution).
    The kernel has Keras' transposed-convolution layout `[k_1..k_D, filters, Cin]`.
    The downsampling rulebook is reused when the fine map's coords are the same
    tensor the downsampling layer saw.
    """

    rank: int = 0

    config_attributes = ("filters", "kernel_size", "strides", "activity_regularizer")

    def __init__(
        self,
        filters: int,
        kernel_size,
        strides=2,
        activation=None,
        use_bias: bool = True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        **kwargs,
    ):
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        self.filters = positive_int(filters, "filters")
        self.kernel_size = int_tuple(kernel_size, self.rank, "kernel_size")
        self.strides = int_tuple(strides, self.rank, "strides")
        self._init_conv_args(locals())

    def _maps(self, inputs):
        if not isinstance(inputs, (list, tuple)) or len(inputs) != 2:
            raise ValueError(f"{type(self).__name__} is called on [coarse, fine] sparse maps, got {inputs!r}")
        return _split(inputs[0], type(self).__name__), _split(inputs[1], type(self).__name__)

    def build(self, input_shape) -> None:
        (coarse, coarse_coords, _), (_, fine_coords, _) = self._maps(input_shape)
        if coarse[-1] is None:
            raise ValueError(f"{type(self).__name__} needs a known number of input channels, got {coarse}")
        for coords in (coarse_coords, fine_coords):
            if coords[-1] is not None and coords[-1] != 1 + self.rank:
                raise ValueError(f"{type(self).__name__} needs coords [N, {1 + self.rank}], got {coords}")
        self.kernel = self._kernel("kernel", (*self.kernel_size, self.filters, coarse[-1]))
        self.bias = self._bias("bias", self.filters) if self.use_bias else None
        self.built = True

    def call(self, inputs) -> Any:
        (features, coarse_coords, _), (_, fine_coords, fine_shape) = self._maps(inputs)
        rulebook = _RULEBOOKS.get(
            fine_coords, fine_shape, self.kernel_size, self.strides, (1,) * self.rank, False
        )
        # The coarse features in the rulebook's output order (zeros at sites the coarse map lacks).
        aligned = coord_sparse_ops.align_rows(
            features, coarse_coords, rulebook.out_coords, rulebook.out_spatial_shape
        )
        kernel = tf.cast(self.kernel, features.dtype)
        kernel = tf.transpose(kernel, [*range(self.rank), self.rank + 1, self.rank])  # [..., Cin, filters]
        out = coord_sparse_ops.sparse_conv_transpose(aligned, kernel, rulebook, fine_coords)
        if self.bias is not None:
            out = out + tf.cast(self.bias, out.dtype)
        return [self.activation(out), fine_coords, fine_shape]

    def compute_output_shape(self, input_shape) -> tuple | list:
        (_, _, _), (_, fine_coords, fine_shape) = self._maps(input_shape)
        return [(None, self.filters), tuple(fine_coords), tuple(fine_shape)]

    def compute_output_spec(self, inputs) -> Any:
        (features, _, _), _ = self._maps(inputs)
        shapes = self.compute_output_shape([[t.shape for t in m] for m in inputs])
        return _sparse_spec(shapes, self.compute_dtype if features.dtype != "float64" else "float64")


@keras.saving.register_keras_serializable(package="tf_sparseconv")
class SparseConvTranspose1D(SparseConvTranspose):
    """Inverse sparse convolution over 1-D sparse maps; see `SparseConvTranspose`."""

    rank = 1


@keras.saving.register_keras_serializable(package="tf_sparseconv")
class SparseConvTranspose2D(SparseConvTranspose):
    """Inverse sparse convolution over 2-D sparse maps; see `SparseConvTranspose`."""

    rank = 2


@keras.saving.register_keras_serializable(package="tf_sparseconv")
class SparseConvTranspose3D(SparseConvTranspose):
    """Inverse sparse convolution over 3-D sparse maps (U-Net decoders); see `SparseConvTranspose`."""

    rank = 3


# --- pooling and normalisation ---------------------------------------------------------


class SparsePooling(_SparseLayer):
    """Max or average pooling over the active sites of each window ("SAME" windows).

    The output sites are the windows holding at least one active site (sorted);
    the value is the max (or mean) over those sites only — inactive sites are
    absent, not zeros. `strides` defaults to `pool_size`; `shape` becomes
    `ceil(shape / strides)`.
    """

    rank: int = 0
    mode: str = "max"

    def __init__(self, pool_size=2, strides=None, **kwargs):
        super().__init__(**kwargs)
        self.pool_size = int_tuple(pool_size, self.rank, "pool_size")
        self.strides = self.pool_size if strides is None else int_tuple(strides, self.rank, "strides")

    def call(self, inputs) -> Any:
        features, coords, shape = _split(inputs, type(self).__name__)
        rulebook = _RULEBOOKS.get(coords, shape, self.pool_size, self.strides, (1,) * self.rank, False)
        num_out = tf.shape(rulebook.out_coords)[0]
        values = tf.gather(features, rulebook.pairs[:, 0])
        reduce = "max" if self.mode == "max" else "mean"
        out = coord_sparse_ops.unsorted_segment(values, rulebook.pairs[:, 1], num_out, reduce)
        return [out, rulebook.out_coords, tf.concat([shape[:1], rulebook.out_spatial_shape], 0)]

    def compute_output_shape(self, input_shape) -> tuple | list:
        features, _, _ = _split(input_shape, type(self).__name__)
        return [(None, features[-1]), (None, 1 + self.rank), (1 + self.rank,)]

    def compute_output_spec(self, inputs) -> Any:
        shapes = self.compute_output_shape([t.shape for t in inputs])
        return _sparse_spec(shapes, inputs[0].dtype)

    def get_config(self) -> dict:
        return {**super().get_config(), "pool_size": self.pool_size, "strides": self.strides}


def _pooling(name: str, rank: int, mode: str):
    cls = type(
        name,
        (SparsePooling,),
        {
            "rank": rank,
            "mode": mode,
            "__doc__": f"{mode} pooling over {rank}-D sparse maps; see `SparsePooling`.",
        },
    )
    cls.__module__ = __name__
    return keras.saving.register_keras_serializable(package="tf_sparseconv")(cls)


SparseMaxPooling1D = _pooling("SparseMaxPooling1D", 1, "max")
SparseMaxPooling2D = _pooling("SparseMaxPooling2D", 2, "max")
SparseMaxPooling3D = _pooling("SparseMaxPooling3D", 3, "max")
SparseAveragePooling1D = _pooling("SparseAveragePooling1D", 1, "avg")
SparseAveragePooling2D = _pooling("SparseAveragePooling2D", 2, "avg")
SparseAveragePooling3D = _pooling("SparseAveragePooling3D", 3, "avg")


@keras.saving.register_keras_serializable(package="tf_sparseconv")
class SparseBatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` over the active sites' features of a sparse map.

    Statistics are taken over the N active sites (inactive sites do not
    exist); coords and shape pass through. Takes BatchNormalization's arguments
    (`axis` is fixed to the channels).
    """

    def __init__(self, **kwargs):
        axis = kwargs.pop("axis", -1)
        if axis not in (-1, [-1], (-1,)):
            raise ValueError(f"SparseBatchNormalization normalises the channels (axis -1), got axis={axis!r}")
        super().__init__(axis=-1, **kwargs)

    def build(self, input_shape) -> None:
        features, _, _ = _split(input_shape, "SparseBatchNormalization")
        super().build(tuple(features))
        self.input_spec = None  # BatchNormalization's spec describes the features alone

    def call(self, inputs, training=None, mask=None) -> Any:
        features, coords, shape = _split(inputs, "SparseBatchNormalization")
        return [super().call(features, training=training), coords, shape]

    def compute_output_shape(self, input_shape) -> tuple | list:
        return [tuple(s) for s in input_shape]

    def compute_output_spec(self, inputs, training=None, mask=None) -> Any:
        features, coords, shape = inputs
        dtype = self.compute_dtype if features.dtype != "float64" else "float64"
        return [
            keras.KerasTensor(features.shape, dtype=dtype),
            keras.KerasTensor(coords.shape, dtype=coords.dtype),
            keras.KerasTensor(shape.shape, dtype=shape.dtype),
        ]

    def get_config(self) -> dict:
        config = super().get_config()
        config.pop("axis", None)
        return config


__all__ = [
    "Densify",
    "SparseAveragePooling1D",
    "SparseAveragePooling2D",
    "SparseAveragePooling3D",
    "SparseBatchNormalization",
    "SparseConv",
    "SparseConv1D",
    "SparseConv2D",
    "SparseConv3D",
    "SparseConvTranspose",
    "SparseConvTranspose1D",
    "SparseConvTranspose2D",
    "SparseConvTranspose3D",
    "SparseGlobalPooling",
    "SparseMap",
    "SparseMaxPooling1D",
    "SparseMaxPooling2D",
    "SparseMaxPooling3D",
    "SparsePooling",
    "Sparsify",
]
