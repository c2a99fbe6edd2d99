"""Channel-sparse (channel-group) convolution (Changpinyo et al. 2017).

Each output channel `o` reads only the `m` input channels listed in
`connections[o]`, so a layer with fan-in `m` costs `m / Cin` of the dense
convolution. The connection lists are arbitrary (uniform `groups` are a special
case) and fixed: they are part of the layer's configuration.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os

import numpy as np
import tensorflow as tf

from tf_sparseconv.python import _validation
from tf_sparseconv.python.ops import _autotune
from tf_sparseconv.python.ops._autotune import current_mode
from tf_sparseconv.python.ops._common import conv2d_batch_safe, float_tensor, float_tensors, int_tuple
from tf_sparseconv.python.ops._loader import compiled_library, dispatch, load_library, record


def _pair(value, name: str) -> tuple[int, int]:
    return int_tuple(value, 2, name)


def _padding(padding) -> str:
    return _validation.padding(padding, upper=True)


def _check_operands(x, kernel, connections, x_rank: int, conv: str):
    x, kernel = float_tensors(x=x, kernel=kernel)
    connections = tf.convert_to_tensor(connections)
    if not connections.dtype.is_integer:
        raise ValueError(f"`connections` must be an int32 tensor, got {connections.dtype.name}")
    connections = tf.cast(connections, tf.int32)
    if x.shape.rank is not None and x.shape.rank != x_rank:
        layout = "[B, H, W, Cin]" if x_rank == 4 else "[B, L, Cin]"
        raise ValueError(f"{conv}: `x` must be {layout}, got shape {x.shape}")
    if kernel.shape.rank is not None and kernel.shape.rank != x_rank:
        layout = "[kh, kw, m, Cout]" if x_rank == 4 else "[k, m, Cout]"
        raise ValueError(f"{conv}: `kernel` must be {layout}, got shape {kernel.shape}")
    if connections.shape.rank is not None and connections.shape.rank != 2:
        raise ValueError(f"{conv}: `connections` must be [Cout, m], got shape {connections.shape}")
    m, cout = kernel.shape[-2], kernel.shape[-1]
    if connections.shape.rank == 2 and None not in (m, cout, *connections.shape):
        if tuple(connections.shape) != (cout, m):
            raise ValueError(
                f"{conv}: `connections` shape {tuple(connections.shape)} must be [Cout, m] = "
                f"{(cout, m)} for kernel shape {tuple(kernel.shape)}"
            )
    cin = x.shape[-1]
    if cin is not None and m is not None and m > cin:
        raise ValueError(f"{conv}: fan-in m = {m} is larger than the {cin} input channels of `x`")
    _check_connection_values(connections, cin, conv)
    return x, kernel, connections


def _static_connections(connections) -> np.ndarray | None:
    """The values of constant connection lists: a graph constant, or (inside a `tf.function`)
    an eager tensor the function captured; None when they are only known at run time."""
    values = tf.get_static_value(connections)
    if values is not None or tf.executing_eagerly():
        return values
    graph = getattr(connections, "graph", None)
    for external, internal in getattr(graph, "captures", ()):
        if internal is connections and isinstance(external, tf.__internal__.EagerTensor):
            return external.numpy()
    return None


def _check_connection_values(connections, in_channels, conv: str) -> None:
    """Validates constant connection lists before graph building (the CPU kernel checks
    them again at run time; on the GPU they stay on the device, unchecked)."""
    values = _static_connections(connections)
    if values is not None and values.ndim == 2:
        _validation.connection_lists(values, in_channels=in_channels, where=conv)


def _cpu_has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


# Where the call shape is not fully known at trace time (unknown height or width), the
# convolution runs as a dense tf.nn.conv2d on the equivalent dense kernel above this fan-in
# fraction m / Cin (and with dilation 1, which TF's CPU convolution gradients require).
# Measured break-even of the channel-sparse kernel with oneDNN's dense convolution
# ([8, 64, 64, 128] -> 128, 3x3, 2 cores; benchmarks/RESULTS.md): m / Cin = 0.5 on an AVX2
# CPU (AMD EPYC), about 0.3 on an AVX-512 CPU (Intel Sapphire Rapids). Known shapes are
# measured instead (`_autotune`).
DENSE_DISPATCH_DENSITY = 0.3 if _cpu_has_avx512() else 0.5

# The batch size a call shape is measured at when the batch is unknown at trace time (a
# Keras model traced by fit() or predict()).
AUTOTUNE_BATCH = 16


def _dense_eligible(x, kernel, connections, padding, dilations) -> str | None:
    """None when tf.nn.conv2d can run the call, else why not."""
    if dilations != (1, 1):
        return f"dilations {dilations}: TensorFlow's CPU convolution gradients need dilation 1"
    if None in (x.shape[-1], kernel.shape[-2]):
        return "the number of input channels or the fan-in is unknown at trace time"
    if 0 in x.shape or 0 in kernel.shape:  # TF's conv2d returns some empty outputs misshaped
        return "an empty input, kernel or output (the sparse kernel shapes it right)"
    if _static_connections(connections) is None:
        return "the connection lists are not constant (only constant ones are validated before the call)"
    if padding == "VALID":  # tf.nn.conv2d rejects images smaller than the kernel
        spatial, window = x.shape[1:3], kernel.shape[:2]
        if None in (*spatial, *window) or any(n < k for n, k in zip(spatial, window)):
            return "VALID padding with an image that may be smaller than the kernel"
    return None


@functools.lru_cache(maxsize=1)
def _default_device_kind() -> str:
    return "GPU" if tf.config.list_logical_devices("GPU") else "CPU"


def _op_determinism_enabled() -> bool:
    """`tf.config.experimental.enable_op_determinism()` is in force (TensorFlow exposes the
    query only internally; TF_DETERMINISTIC_OPS is its environment form)."""
    try:
        from tensorflow.python.framework import config as tf_config

        return bool(tf_config.is_op_determinism_enabled())
    except (ImportError, AttributeError):
        return os.environ.get("TF_DETERMINISTIC_OPS", "0").strip().lower() in ("1", "true")


def _device_of(x) -> str:
    """Where the call runs, as far as is known at trace time, as "CPU:0" or "GPU:1": the
    input's device when set (eager tensors, explicit `tf.device` scopes), else the default."""
    spec = tf.DeviceSpec.from_string(x.device or "")
    kind = (spec.device_type or _default_device_kind()).upper()
    return f"{kind}:{spec.device_index or 0}"


def _grouped_reason(values, dtype, device: str) -> str | None:
    """None when the grouped form applies, else why not."""
    if _groups(values) is None:
        return (
            f"the connection lists are not in equal groups of >= {MIN_GROUP_SIZE} identical consecutive rows"
        )
    if dtype == tf.float64 and "GPU" not in device.upper():
        return "TensorFlow has no CPU gradient for grouped float64 convolutions"
    return None


# The grouped form: output channels in groups of at least this many consecutive channels with
# identical connection lists (as `prune_low_magnitude(..., granularity="kernel",
# channel_group=g)` makes them) run as one grouped tf.nn.conv2d on the gathered inputs.
MIN_GROUP_SIZE = 4


def _groups(values: np.ndarray | None) -> tuple[int, np.ndarray] | None:
    """`(groups, input order)` when the rows of `values` ([Cout, m]) come in groups of
    MIN_GROUP_SIZE or more equal consecutive rows, all groups the same size: the grouped
    convolution with `groups` groups reads the input channels `order` ([groups * m]) in turn."""
    if values is None or values.ndim != 2 or values.shape[0] == 0 or values.shape[1] == 0:
        return None
    cout = values.shape[0]
    starts = np.flatnonzero(np.r_[True, np.any(values[1:] != values[:-1], axis=1)])
    size = cout // len(starts)
    if size < MIN_GROUP_SIZE or size * len(starts) != cout or np.any(starts != np.arange(0, cout, size)):
        return None
    return len(starts), values[starts].reshape(-1)


def _choose(x, kernel, connections, strides, padding, dilations, library) -> tuple[str, str]:
    """("sparse", "dense" or "grouped", why) for one call (see `_autotune`)."""
    not_dense = _dense_eligible(x, kernel, connections, padding, dilations)
    mode = current_mode()
    if mode == "sparse":
        return "sparse", "channel_sparse_implementation('sparse')"
    if not_dense is not None:
        return "sparse", f"the dense form does not apply: {not_dense}"
    values = np.ascontiguousarray(_static_connections(connections), np.int32)
    device = _device_of(x)
    not_grouped = _grouped_reason(values, x.dtype, device)
    if mode == "dense":
        return "dense", "channel_sparse_implementation('dense')"
    if mode == "grouped":
        if not_grouped is None:
            return "grouped", "channel_sparse_implementation('grouped')"
        return "sparse", f"the grouped form does not apply: {not_grouped}"
    m, cin = kernel.shape[-2], x.shape[-1]
    rule = "dense" if m > DENSE_DISPATCH_DENSITY * cin else "sparse"
    relation = ">" if rule == "dense" else "<="
    rule_reason = f"fan-in {m} of {cin} {relation} DENSE_DISPATCH_DENSITY {DENSE_DISPATCH_DENSITY} x Cin"
    if library is None:  # references (and converter forms): the fixed rule
        return rule, f"{rule_reason} (the pure-TF forms)"
    shape = [AUTOTUNE_BATCH if x.shape[0] is None else x.shape[0], *x.shape[1:]]
    if None in shape or None in kernel.shape:
        return rule, f"shape {x.shape} not fully known: {rule_reason}"
    if _op_determinism_enabled():
        # As TensorFlow turns cuDNN's autotuning off: a timing must not decide which kernel runs.
        return rule, f"op determinism is enabled (no timing decides): {rule_reason}"
    key = (
        "channel_sparse_conv2d",
        device,
        x.dtype.name,
        tuple(shape),
        tuple(kernel.shape),
        tuple(strides),
        padding,
        hashlib.sha1(values.tobytes()).hexdigest(),
    )

    def candidates():
        xm = tf.random.stateless_normal(shape, [1, 2], dtype=x.dtype)
        km = tf.random.stateless_normal(kernel.shape, [3, 4], dtype=x.dtype)
        cm = tf.constant(values)
        attrs = {"strides": list(strides), "padding": padding, "dilations": [1, 1]}
        found = {
            "dense": lambda: _dense_conv2d(xm, km, cm, strides, padding),
            "sparse": lambda: library.tf_sparse_conv_channel_sparse_conv2d(xm, km, cm, **attrs),
        }
        if not_grouped is None:
            found["grouped"] = lambda: _grouped_conv2d(xm, km, values, strides, padding)
        return found

    with tf.device(x.device) if x.device else contextlib.nullcontext():
        best, times, cached = _autotune.measured_choice(key, candidates, fallback="sparse")
    where = "cached" if cached else "measured now"
    detail = ", ".join(f"{name} {ms:.3g} ms" for name, ms in times.items())
    return best, f"fastest at {tuple(shape)} x {tuple(kernel.shape)} on {device} ({where}: {detail})"


def _gather_channels(x, order: np.ndarray):
    """`tf.gather(x, order, axis=-1)`; for up to 256 input channels as a 1x1 convolution with
    a one-hot kernel (oneDNN's GEMM outpaces TensorFlow's element-wise gather there)."""
    cin = x.shape[-1]
    if cin <= 256:
        selection = np.zeros((1, 1, cin, len(order)), x.dtype.as_numpy_dtype)
        selection[0, 0, order, np.arange(len(order))] = 1
        return tf.nn.conv2d(x, tf.constant(selection), 1, "VALID")
    return tf.gather(x, order, axis=-1)


def _grouped_conv2d(x, kernel, values: np.ndarray, strides, padding):
    """The grouped form (`_groups`): one grouped tf.nn.conv2d on the gathered input channels."""
    _, order = _groups(values)
    return conv2d_batch_safe(_gather_channels(x, order), kernel, strides, padding)


def _dense_conv2d(x, kernel, connections, strides, padding):
    """tf.nn.conv2d on the dense kernel (`dense_kernel`: the compiled op where there is one)."""
    return conv2d_batch_safe(x, dense_kernel(kernel, connections, int(x.shape[-1])), strides, padding)


FUSED_ACTIVATIONS = (None, "linear", "relu")


def _check_epilogue(bias, activation, kernel):
    if activation not in FUSED_ACTIVATIONS:
        raise ValueError(f"`activation` must be None, 'linear' or 'relu', got {activation!r}")
    activation = "linear" if activation is None else activation
    if bias is None:
        return None, activation
    bias = float_tensor(bias, "bias")
    if bias.dtype != kernel.dtype:
        raise ValueError(f"`bias` dtype {bias.dtype.name} must match `kernel` dtype {kernel.dtype.name}")
    if bias.shape.rank is not None and bias.shape.rank != 1:
        raise ValueError(f"`bias` must be [Cout], got shape {bias.shape}")
    cout = kernel.shape[-1]
    if bias.shape.rank == 1 and None not in (bias.shape[0], cout) and bias.shape[0] != cout:
        raise ValueError(f"`bias` must be [Cout] = [{cout}], got shape {bias.shape}")
    return bias, activation


def _apply_epilogue(y, bias, activation):
    if bias is not None:
        y = tf.nn.bias_add(y, bias)
    return tf.nn.relu(y) if activation == "relu" else y


def channel_sparse_conv2d(
    x, kernel, connections, strides=1, padding="SAME", dilations=1, bias=None, activation=None, name=None
) -> tf.Tensor:
    """Channel-sparse 2-D convolution.

    The channel-sparse kernels and their gradients are bitwise deterministic on
    the CPU and the GPU (the GPU input gradient gathers over the transposed
    connection list: no atomics); where the dense `tf.nn.conv2d` form runs
    instead, `tf.config.experimental.enable_op_determinism()` makes that one
    deterministic too.

    Args:
      x: `[B, H, W, Cin]` float tensor.
      kernel: `[kh, kw, m, Cout]`; `kernel[:, :, j, o]` connects input channel
        `connections[o, j]` to output channel `o`.
      connections: int32 `[Cout, m]`, distinct input channels in `[0, Cin)` per
        row. Constant lists are checked here and any list again by the CPU
        kernel (`InvalidArgumentError`); the GPU kernels read the list on the
        device unchecked, where (as `tf.gather` on the GPU) an entry outside
        `[0, Cin)` contributes zero and its kernel gradient is zero.
      strides, dilations: int or (height, width).
      padding: "SAME" or "VALID".
      bias: optional `[Cout]` bias added to the output.
      activation: None (or "linear") or "relu", applied after the bias.
      name: optional name scope.

    Returns:
      `[B, OH, OW, Cout]`: `activation(tf.nn.conv2d(x, dense, strides, padding,
      dilations) + bias)` for the dense kernel with `dense[:, :, connections[o, j], o]
      = kernel[:, :, j, o]` and zeros elsewhere, at a cost proportional to `m`.
      Where the dense convolution on that kernel is faster (high fan-in, shapes
      where oneDNN/cuDNN outpace the sparse kernel), or, for connection lists in
      equal groups of identical consecutive rows, one grouped convolution on the
      gathered inputs, that runs instead: the first call of each shape times the
      candidates and later calls take the fastest (a fixed fan-in rule under
      `enable_op_determinism()`; see `tsc.ops.channel_sparse_implementation` to
      force one, and `tsc.ops.explain()` to see which ran). With a bias, the compiled op
      adds it and applies the activation in its output stage
      (`ChannelSparseConv2DBiasActivation`: one pass over the output instead
      of three, as TensorFlow fuses Conv2D + BiasAdd + Relu).
    """
    with tf.name_scope(name or "channel_sparse_conv2d"):
        x, kernel, connections = _check_operands(x, kernel, connections, 4, "channel_sparse_conv2d")
        bias, activation = _check_epilogue(bias, activation, kernel)
        strides, dilations = _pair(strides, "strides"), _pair(dilations, "dilations")
        padding = _padding(padding)
        library = load_library()
        implementation, reason = _choose(x, kernel, connections, strides, padding, dilations, library)
        if implementation == "dense":
            record("channel_sparse_conv2d", "dense", reason)
            y = _dense_conv2d(x, kernel, connections, strides, padding)
            return _apply_epilogue(y, bias, activation)
        if implementation == "grouped":
            record("channel_sparse_conv2d", "grouped", reason)
            values = np.asarray(_static_connections(connections), np.int32)
            return _apply_epilogue(_grouped_conv2d(x, kernel, values, strides, padding), bias, activation)
        if library is None:
            dispatch("channel_sparse_conv2d")  # records why the reference runs
        else:
            record("channel_sparse_conv2d", "compiled", reason)
        if library is None:
            y = channel_sparse_conv2d_reference(x, kernel, connections, strides, padding, dilations)
            return _apply_epilogue(y, bias, activation)
        attrs = {"strides": list(strides), "padding": padding, "dilations": list(dilations)}
        if bias is None:
            y = library.tf_sparse_conv_channel_sparse_conv2d(x, kernel, connections, **attrs)
            return _apply_epilogue(y, None, activation)
        return library.tf_sparse_conv_channel_sparse_conv2d_bias_activation(
            x, kernel, connections, bias, activation=activation, **attrs
        )


def channel_sparse_conv1d(
    x, kernel, connections, strides=1, padding="SAME", dilations=1, bias=None, activation=None, name=None
) -> tf.Tensor:
    """Channel-sparse 1-D convolution over `[B, L, Cin]` with kernel `[k, m, Cout]`.

    Same semantics as `channel_sparse_conv2d` (it is its `H = kh = 1` case).
    """
    with tf.name_scope(name or "channel_sparse_conv1d"):
        x, kernel, connections = _check_operands(x, kernel, connections, 3, "channel_sparse_conv1d")
        stride, dilation = _single(strides, "strides"), _single(dilations, "dilations")
        y = channel_sparse_conv2d(
            x[:, None], kernel[None], connections, (1, stride), padding, (1, dilation), bias, activation
        )
        return y[:, 0]


def _single(value, name: str) -> int:
    return int_tuple(value, 1, name)[0]


def random_connections(
    in_channels: int, out_channels: int, density=None, fan_in=None, seed: int = 0
) -> np.ndarray:
    """Random connection lists: int32 `[out_channels, m]`, rows sorted.

    `m = fan_in`, or `max(1, round(density * in_channels))`. Each row lists `m`
    distinct input channels; every input channel feeds at least one output
    channel when `m * out_channels >= in_channels`; reproducible from `seed`.
    """
    in_channels = _validation.positive_int(in_channels, "in_channels")
    out_channels = _validation.positive_int(out_channels, "out_channels")
    _validation.exactly_one(density=density, fan_in=fan_in)
    if density is not None:
        density = _validation.fraction(density, "density", allow_zero=False, allow_one=True)
        m = max(1, round(density * in_channels))
    else:
        m = _validation.integer(fan_in, "fan_in", minimum=1, maximum=in_channels)
    rng = np.random.default_rng(seed)
    # A stream of whole permutations covers every input channel before any repeats.
    stream = np.concatenate(
        [rng.permutation(in_channels) for _ in range(-(-m * out_channels // in_channels))]
    )
    rows = stream[: m * out_channels].reshape(out_channels, m).copy()
    for row in rows:  # a row that straddles two permutations may repeat a channel
        values, first = np.unique(row, return_index=True)
        if len(values) < m:
            duplicate = np.setdiff1d(np.arange(m), first)
            unused = np.setdiff1d(np.arange(in_channels), values)
            row[duplicate] = rng.choice(unused, size=len(duplicate), replace=False)
    return np.sort(rows, axis=1).astype(np.int32)


# --- gradients --------------------------------------------------------------------


def _attrs(op):
    return {name: op.get_attr(name) for name in ("strides", "padding", "dilations")}


def _conv(op, x, kernel, connections):
    """The channel-sparse convolution of `x` by `kernel` (the attributes of `op`)."""
    return compiled_library().tf_sparse_conv_channel_sparse_conv2d(x, kernel, connections, **_attrs(op))


def _input_grad(op, x, kernel, connections, grad):
    """`dx` of `_conv(op, x, kernel, connections)` whose output has gradient `grad`."""
    return compiled_library().tf_sparse_conv_channel_sparse_conv2d_backprop_input(
        tf.shape(x, out_type=tf.int32), kernel, connections, grad, **_attrs(op)
    )


def _kernel_grad(op, x, kernel, connections, grad):
    """`dkernel` of `_conv(op, x, kernel, connections)` whose output has gradient `grad`."""
    return compiled_library().tf_sparse_conv_channel_sparse_conv2d_backprop_kernel(
        x, tf.shape(kernel, out_type=tf.int32), connections, grad, **_attrs(op)
    )


def _input_and_kernel_grads(op, x, kernel, connections, grad):
    """`(dx, dkernel)` of `_conv(op, x, kernel, connections)` whose output has gradient `grad`."""
    return _input_grad(op, x, kernel, connections, grad), _kernel_grad(op, x, kernel, connections, grad)


@tf.RegisterGradient("TfSparseConv>ChannelSparseConv2D")
def _channel_sparse_conv2d_grad(op, grad):
    x, kernel, connections = op.inputs
    return (*_input_and_kernel_grads(op, x, kernel, connections, grad), None)


@tf.RegisterGradient("TfSparseConv>ChannelSparseConv2DBiasActivation")
def _channel_sparse_conv2d_bias_activation_grad(op, grad):
    x, kernel, connections, _ = op.inputs
    if op.get_attr("activation") == b"relu" or op.get_attr("activation") == "relu":
        # d relu(z) / dz = [y > 0] with y = relu(z) (the output holds the mask).
        grad = tf.where(op.outputs[0] > 0, grad, tf.zeros_like(grad))
    dx, dkernel = _input_and_kernel_grads(op, x, kernel, connections, grad)
    dbias = tf.reduce_sum(grad, axis=[0, 1, 2])
    return dx, dkernel, None, dbias


@tf.RegisterGradient("TfSparseConv>ChannelSparseConv2DBackpropInput")
def _backprop_input_grad(op, grad):
    # dx = A^T(dy; kernel): linear in dy and in kernel (`grad` is an input-shaped tensor).
    _, kernel, connections, dy = op.inputs
    ddy = _conv(op, grad, kernel, connections)
    return None, _kernel_grad(op, grad, kernel, connections, dy), None, ddy


@tf.RegisterGradient("TfSparseConv>ChannelSparseConv2DBackpropKernel")
def _backprop_kernel_grad(op, grad):
    # dkernel: linear in x and in dy (`grad` is a kernel-shaped tensor).
    x, _, connections, dy = op.inputs
    dx = _input_grad(op, x, grad, connections, dy)
    return dx, None, None, _conv(op, x, grad, connections)


# --- pure-TensorFlow references -------------------------------------------------------


def dense_kernel(kernel, connections, in_channels) -> tf.Tensor:
    """The dense `[kh, kw, Cin, Cout]` kernel equivalent to a channel-sparse one
    (`[..., m, Cout]` kernels of any window rank): one pass over the dense kernel with the
    compiled op, differentiable; stock ops inside `references_only()`."""
    kernel = float_tensor(kernel, "kernel")
    connections = tf.cast(tf.convert_to_tensor(connections), tf.int32)
    library = load_library()
    if library is None or not _validation.is_int(in_channels):
        return _dense_kernel_reference(kernel, connections, in_channels)
    return library.tf_sparse_conv_channel_sparse_dense_kernel(
        kernel, connections, in_channels=int(in_channels)
    )


def _dense_kernel_reference(kernel, connections, in_channels) -> tf.Tensor:
    """Pure-TF `dense_kernel` (a one-hot contraction: stock ops the converters fold)."""
    selection = tf.one_hot(connections, in_channels, dtype=kernel.dtype)  # [Cout, m, Cin]
    return tf.einsum("...eo,oec->...co", kernel, selection)


@tf.RegisterGradient("TfSparseConv>ChannelSparseDenseKernel")
def _dense_kernel_grad(op, grad):
    connections = op.inputs[1]
    return compiled_library().tf_sparse_conv_channel_sparse_gather_kernel(grad, connections), None


@tf.RegisterGradient("TfSparseConv>ChannelSparseGatherKernel")
def _gather_kernel_grad(op, grad):
    connections, cin = op.inputs[1], op.inputs[0].shape[-2]
    if cin is None:
        return _dense_kernel_reference(grad, connections, tf.shape(op.inputs[0])[-2]), None
    library = compiled_library()
    return library.tf_sparse_conv_channel_sparse_dense_kernel(grad, connections, in_channels=cin), None


def _same_padding(n, k, stride, dilation):
    span = (k - 1) * dilation + 1
    if stride == 1 and isinstance(span, int):  # independent of the length: static
        total = span - 1
    else:
        out = (n + stride - 1) // stride
        total = _max0((out - 1) * stride + span - n)
    return total // 2, total - total // 2


def _zero_pad(x, axis: int, before, after):
    """`tf.pad` with zeros along `axis`; amounts known only at run time as concatenated zeros
    (the LiteRT converter fails on a Pad of run-time amounts feeding a VALID convolution)."""
    if isinstance(before, int) and isinstance(after, int):
        if before == after == 0:
            return x
        paddings = [[0, 0]] * 4
        paddings[axis] = [before, after]
        return tf.pad(x, paddings)
    parts = []
    for amount in (before, after):
        shape = tf.unstack(tf.shape(x))
        shape[axis] = amount
        parts.append(tf.zeros(tf.stack(shape), x.dtype))
    y = tf.concat([parts[0], x, parts[1]], axis)
    static = x.shape.as_list()
    static[axis] = None
    y.set_shape(static)
    return y


def _max0(value):
    return max(value, 0) if isinstance(value, int) else tf.maximum(value, 0)


def channel_sparse_conv2d_reference(
    x, kernel, connections, strides=1, padding="SAME", dilations=1
) -> tf.Tensor:
    """Pure-TF `channel_sparse_conv2d`: the dense-kernel convolution (stock ops only)."""
    x, kernel, connections = _check_operands(x, kernel, connections, 4, "channel_sparse_conv2d")
    (sh, sw), (dh, dw) = _pair(strides, "strides"), _pair(dilations, "dilations")
    padding = _padding(padding)
    # Static sizes where known (Python ints: padding a known axis stays known, which the LiteRT
    # converter needs for the convolution).
    shape, kshape = tf.shape(x), tf.shape(kernel)
    batch, h, w, cin = (x.shape[i] if x.shape[i] is not None else shape[i] for i in range(4))
    kh, kw, cout = (kernel.shape[i] if kernel.shape[i] is not None else kshape[i] for i in (0, 1, 3))
    dense = _dense_kernel_reference(kernel, connections, cin)
    span_h, span_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    if padding == "SAME":
        (pt, pb), (pl, pr) = _same_padding(h, kh, sh, dh), _same_padding(w, kw, sw, dw)
        out_h, out_w = (h + sh - 1) // sh, (w + sw - 1) // sw
    else:  # pad the end only so that an image smaller than the kernel still convolves
        (pt, pb), (pl, pr) = (0, _max0(span_h - h)), (0, _max0(span_w - w))
        out_h = _max0((h - span_h) // sh + 1)
        out_w = _max0((w - span_w) // sw + 1)
    x = _zero_pad(_zero_pad(x, 1, pt, pb), 2, pl, pr)
    # Stride-1 dilated VALID convolution, then subsampling: exact for any
    # stride/dilation combination (tf.nn.conv2d rejects strides > 1 with
    # dilations > 1, and its CPU gradient rejects dilations > 1;
    # tf.nn.convolution dilates through space_to_batch, which differentiates).
    y = tf.nn.convolution(x, dense, strides=1, padding="VALID", dilations=[dh, dw])
    y = y[:, ::sh, ::sw][:, :out_h, :out_w]
    # Empty batches: tf.nn.conv2d returns a wrongly shaped [0, H, W, Cin].
    return tf.reshape(y, [batch, out_h, out_w, cout])


def channel_sparse_conv1d_reference(
    x, kernel, connections, strides=1, padding="SAME", dilations=1
) -> tf.Tensor:
    """Pure-TF `channel_sparse_conv1d`."""
    x, kernel, connections = _check_operands(x, kernel, connections, 3, "channel_sparse_conv1d")
    stride, dilation = _single(strides, "strides"), _single(dilations, "dilations")
    y = channel_sparse_conv2d_reference(
        x[:, None], kernel[None], connections, (1, stride), padding, (1, dilation)
    )
    return y[:, 0]
