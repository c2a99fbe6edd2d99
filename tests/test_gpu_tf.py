"""Every op family through TensorFlow on the GPU, against the same calls on the CPU.

The tests/gpu/ harness checks the CUDA kernels without TensorFlow; this module checks the glue:
the GPU OpKernels (registration, HostMemory inputs, workspaces, streams), the gradients and the
layers, under `tf.device("/GPU:0")`, each compared with the same call under `tf.device("/CPU:0")`
on the same random inputs (float16, bfloat16, float32 and float64: every GPU kernel registers
all four). Every check asserts that the compiled GPU kernel ran:

* `tsc.ops.explain()` records the "compiled" implementation (not a reference, not a dense
  dispatch) for the public call;
* the raw op's eager outputs live on GPU:0;
* run once more inside a `tf.function` (gradients included), every `TfSparseConv>` op of the
  executed graph was placed on GPU:0 (RunMetadata's partition graphs), except
  SparseConvRulebookTranspose, which has a CPU kernel only.

The module skips when TensorFlow sees no GPU. When it sees one, an op library built without its
CUDA kernels (`_build_info.json` "cuda": false) or one that fails to load makes every test fail:
a GPU run must not pass without touching the GPU.
"""

from __future__ import annotations

import contextlib
import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.eager import context
from tensorflow.python.framework import config as tf_config

import tf_sparseconv as tsc
from tf_sparseconv.python.ops import _loader

GPUS = tf.config.list_physical_devices("GPU")
GPU, CPU = "/GPU:0", "/CPU:0"
GPU_SUFFIX = "GPU:0"  # the end of an eager tensor's / a placed node's device name on the GPU

pytestmark = pytest.mark.skipif(
    not GPUS, reason="TensorFlow sees no GPU (tf.config.list_physical_devices('GPU') is empty)"
)

for _gpu in GPUS:  # leave GPU memory to other processes (tests/gpu/ runs CuPy)
    try:
        tf.config.experimental.set_memory_growth(_gpu, True)
    except RuntimeError:  # the GPU is already initialised (another module ran ops first)
        pass

# Ops without a GPU kernel by design: TensorFlow places them on the CPU.
CPU_ONLY_OPS = {"TfSparseConv>SparseConvRulebookTranspose"}

DTYPES = [tf.float16, tf.bfloat16, tf.float32, tf.float64]
# Relative to the largest |value| of the CPU result: one or two roundings to the dtype apart,
# plus summation-order differences.
TOLERANCE = {tf.float16: 1e-2, tf.bfloat16: 5e-2, tf.float32: 2e-5, tf.float64: 1e-11}


def dtype_id(dtype):
    return dtype.name


# --- the library must have its CUDA kernels ----------------------------------------------------


def cuda_problem() -> str | None:
    """Why the GPU kernels cannot have run (None when the library has them and is loaded)."""
    library = _loader.load_library()
    if library is None:
        why = _loader._state["problem"] or "TF_SPARSECONV_FORCE_REFERENCE=1"
        return f"the op library did not load ({why}), so every op would run its pure-TF reference"
    info_path = _loader.library_path().parent / _loader.BUILD_INFO_NAME
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError) as e:
        return f"cannot read {info_path} ({e}): unknown whether the library has CUDA kernels"
    if not info.get("cuda"):
        why = info.get("cuda_reason", "no reason recorded")
        return (
            f"the op library was built without CUDA kernels ({why}); rebuild with nvcc on PATH: "
            "TF_SPARSECONV_CUDA=1 python tools/build_ops.py"
        )
    return None


@pytest.fixture(scope="module", autouse=True)
def lib():
    """The op library (failing every test if it lacks its CUDA kernels), with TF32 off for the
    stock convolutions that some paths run (cuDNN's TF32 would be the largest difference)."""
    problem = cuda_problem()
    if problem:
        pytest.fail(f"TensorFlow sees {len(GPUS)} GPU(s) but {problem}", pytrace=False)
    tf32 = tf.config.experimental.tensor_float_32_execution_enabled()
    tf.config.experimental.enable_tensor_float_32_execution(False)
    try:
        yield _loader.load_library()
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(tf32)


def test_library_has_cuda_kernels():
    assert cuda_problem() is None


# --- helpers -----------------------------------------------------------------------------------


def sparse_channel_kernels():
    """Pins channel-sparse calls to the sparse kernel where the dispatch could pick the dense form."""
    force = getattr(tsc.ops, "channel_sparse_implementation", None)
    if force is None:
        try:
            from tf_sparseconv.python.ops._autotune import channel_sparse_implementation as force
        except ImportError:  # no dispatch to choose from
            return contextlib.nullcontext()
    return force("sparse")


def prepare(arrays, dtype):
    """NumPy inputs -> CPU tensors: floats cast to `dtype` once (both devices then read the same
    bits), integers as int32."""
    out = []
    with tf.device(CPU):
        for value in arrays:
            a = np.asarray(value)
            if np.issubdtype(a.dtype, np.floating):
                out.append(tf.cast(tf.constant(a.astype(np.float64)), dtype))
            else:
                out.append(tf.constant(a.astype(np.int32)))
    return out


def upstream(targets):
    """Fixed random output gradients for `targets`, identical on both devices."""
    grads = []
    for t in targets:
        rng = np.random.default_rng(t.shape.num_elements())
        grads.append(prepare([rng.standard_normal(t.shape.as_list())], t.dtype)[0])
    return grads


def as_numpy(t):
    if t is None:
        return None
    if isinstance(t, tf.IndexedSlices):
        t = tf.convert_to_tensor(t)
    with tf.device(CPU):
        if t.dtype.is_floating:
            return tf.cast(t, tf.float64).numpy()
        return t.numpy()


def run(device, fn, inputs, watch=(), variables=()):
    """`fn(*inputs)` eagerly on `device` (inputs copied there) and the gradients of its float
    outputs (random upstream) w.r.t. `inputs[i]` for i in `watch` and `variables`.
    Returns (outputs, gradients) as NumPy arrays."""
    with tf.device(device):
        xs = [tf.identity(t) for t in inputs]
        with tf.GradientTape() as tape:
            for i in watch:
                tape.watch(xs[i])
            outputs = tf.nest.flatten(fn(*xs))
        sources = [xs[i] for i in watch] + list(variables)
        grads = []
        targets = [o for o in outputs if o.dtype.is_floating]
        if sources and targets:
            ups = [tf.identity(u) for u in upstream(targets)]
            grads = tape.gradient(targets, sources, output_gradients=ups)
    return [as_numpy(o) for o in outputs], [as_numpy(g) for g in grads]


@contextlib.contextmanager
def graph_placements():
    """Collects {op type: devices} of every TfSparseConv op in the tf.functions first run inside
    the block (from RunMetadata's partition graphs, i.e. where the runtime placed them)."""
    ctx = context.context()
    placed: dict[str, set[str]] = {}
    ctx.enable_run_metadata()
    try:
        yield placed
        metadata = ctx.export_run_metadata()
    finally:
        ctx.disable_run_metadata()
    for graphs in metadata.function_graphs:
        for partition in graphs.partition_graphs:
            for node in partition.node:
                if node.op.startswith("TfSparseConv>"):
                    placed.setdefault(node.op, set()).add(node.device)


def gpu_graph_placements(fn, inputs, watch=(), variables=()):
    """Runs fn and its gradient as a fresh tf.function under GPU:0; returns graph_placements()."""

    def graph_fn(*xs):
        with tf.GradientTape() as tape:
            for i in watch:
                tape.watch(xs[i])
            outputs = tf.nest.flatten(fn(*xs))
        targets = [o for o in outputs if o.dtype.is_floating]
        sources = [xs[i] for i in watch] + list(variables)
        grads = []
        if sources and targets:
            grads = tape.gradient(targets, sources, output_gradients=[tf.ones_like(t) for t in targets])
        return outputs, [tf.convert_to_tensor(g) for g in grads if g is not None]

    with graph_placements() as placed:
        with tf.device(GPU):
            xs = [tf.identity(t) for t in inputs]
            tf.function(graph_fn, autograph=False)(*xs)
    return placed


def assert_on_gpu(*tensors):
    for t in tf.nest.flatten(tensors):
        assert t.device.endswith(GPU_SUFFIX), f"an output of the raw op lives on {t.device!r}, not the GPU"


def assert_compiled(calls, *ops):
    assert calls, "tsc.ops.explain() recorded no op call"
    others = [str(c) for c in calls if c.implementation != "compiled"]
    assert not others, f"not the compiled kernels: {others}"
    for op in ops:
        assert any(c.op == op for c in calls), f"{op} was not called: {[str(c) for c in calls]}"


def assert_placed_on_gpu(placed, ops):
    assert placed, "no TfSparseConv op ran in the tf.function (run metadata collected nothing)"
    missing = [op for op in ops if op not in placed]
    assert not missing, f"ops expected in the graph did not run: {missing} (ran: {sorted(placed)})"
    elsewhere = {
        op: sorted(devices)
        for op, devices in placed.items()
        if op not in CPU_ONLY_OPS and not all(d.endswith(GPU_SUFFIX) for d in devices)
    }
    assert not elsewhere, f"ops not placed on the GPU: {elsewhere}"


def assert_close(gpu, cpu, dtype, what, exact=False, factor=1.0):
    if cpu is None or gpu is None:
        assert cpu is None and gpu is None, f"{what}: a gradient is None on one device only"
        return
    assert gpu.shape == cpu.shape, f"{what}: shape {gpu.shape} on the GPU, {cpu.shape} on the CPU"
    if exact or not np.issubdtype(cpu.dtype, np.floating):
        np.testing.assert_array_equal(gpu, cpu, err_msg=f"{what} (GPU vs CPU, exact)")
        return
    tol = TOLERANCE[dtype] * factor
    scale = max(1.0, float(np.max(np.abs(cpu)))) if cpu.size else 1.0
    np.testing.assert_allclose(gpu, cpu, rtol=tol, atol=tol * scale, err_msg=f"{what} (GPU vs CPU)")


def check(
    fn, arrays, dtype=tf.float32, watch=(), ops=(), exact=False, exact_grads=False, explained=(), factor=1.0
):
    """fn on the GPU equals fn on the CPU (outputs and gradients), the compiled kernels ran, and
    every TfSparseConv op (`ops` at least) was placed on the GPU. `factor` widens the tolerance
    where stock convolutions (cuDNN vs oneDNN algorithms) are part of the computation."""
    inputs = prepare(arrays, dtype)
    with tsc.ops.explain() as calls:
        gpu_out, gpu_grads = run(GPU, fn, inputs, watch)
    assert_compiled(calls, *explained)
    cpu_out, cpu_grads = run(CPU, fn, inputs, watch)
    for i, (g, c) in enumerate(zip(gpu_out, cpu_out)):
        assert_close(g, c, dtype, f"output {i}", exact, factor)
    for i, (g, c) in enumerate(zip(gpu_grads, cpu_grads)):
        assert_close(g, c, dtype, f"gradient w.r.t. input {watch[i]}", exact_grads, factor)
    assert_placed_on_gpu(gpu_graph_placements(fn, inputs, watch), ops)
    return gpu_out


def on_gpu(*tensors):
    """Copies CPU tensors to the GPU (inside a GPU device scope)."""
    with tf.device(GPU):
        return [tf.identity(t) for t in tensors]


# --- top-k -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape,axis,k", [((48, 999), -1, 37), ((6, 300, 20), 1, 25)], ids=["last", "inner"])
def test_kwinners(lib, rng, dtype, shape, axis, k):
    x = rng.standard_normal(shape)
    (xg,) = on_gpu(*prepare([x], dtype))
    with tf.device(GPU):
        y, indices = lib.tf_sparse_conv_k_winners(xg, k, axis=axis)
    assert_on_gpu(y, indices)
    check(
        lambda x: tsc.ops.kwinners(x, k, axis=axis),
        [x],
        dtype,
        watch=[0],
        ops=["TfSparseConv>KWinners", "TfSparseConv>KWinnersGrad"],
        exact=True,  # a selection: copies of x, ties to the lower index on both devices
        exact_grads=True,
        explained=["kwinners"],
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mode,per", [("abs", "channel"), ("relu", "sample")])
def test_topk_attention(lib, rng, dtype, mode, per):
    x = rng.standard_normal((3, 19, 21, 24))
    (xg,) = on_gpu(*prepare([x], dtype))
    with tf.device(GPU):
        y, indices = lib.tf_sparse_conv_top_k_attention(xg, 30, mode=mode, per=per)
    assert_on_gpu(y, indices)
    check(
        lambda x: tsc.ops.topk_attention(x, 30, mode=mode, per=per),
        [x],
        dtype,
        watch=[0],
        ops=["TfSparseConv>TopKAttention", "TfSparseConv>TopKAttentionGrad"],
        exact=True,
        exact_grads=True,
        explained=["topk_attention"],
    )


# --- channel-sparse ----------------------------------------------------------------------------

CHANNEL_CASES = {
    # x shape, kernel size, fan-in, Cout, strides, padding, dilations, bias + relu
    "same": ((2, 23, 21, 16), (3, 3), 4, 24, (1, 1), "SAME", (1, 1), False),
    "strided-dilated-bias-relu": ((2, 23, 21, 16), (3, 2), 4, 24, (2, 1), "VALID", (1, 2), True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", list(CHANNEL_CASES.values()), ids=list(CHANNEL_CASES))
def test_channel_sparse_conv2d(lib, rng, dtype, case):
    shape, (kh, kw), m, cout, strides, padding, dilations, fused = case
    x = rng.standard_normal(shape)
    kernel = rng.standard_normal((kh, kw, m, cout)) / np.sqrt(kh * kw * m)
    connections = tsc.ops.random_connections(shape[-1], cout, fan_in=m, seed=3)
    bias = rng.standard_normal(cout)
    xg, kg, cg, bg = on_gpu(*prepare([x, kernel, connections, bias], dtype))
    attrs = {"strides": list(strides), "padding": padding, "dilations": list(dilations)}
    with tf.device(GPU):
        y = lib.tf_sparse_conv_channel_sparse_conv2d(xg, kg, cg, **attrs)
        yb = lib.tf_sparse_conv_channel_sparse_conv2d_bias_activation(
            xg, kg, cg, bg, activation="relu", **attrs
        )
    assert_on_gpu(y, yb)

    def fn(x, kernel, connections, bias):
        return tsc.ops.channel_sparse_conv2d(
            x,
            kernel,
            connections,
            strides,
            padding,
            dilations,
            bias=bias if fused else None,
            activation="relu" if fused else None,
        )

    forward = (
        "TfSparseConv>ChannelSparseConv2DBiasActivation" if fused else "TfSparseConv>ChannelSparseConv2D"
    )
    grads = [
        "TfSparseConv>ChannelSparseConv2DBackpropInput",
        "TfSparseConv>ChannelSparseConv2DBackpropKernel",
    ]
    with sparse_channel_kernels():
        check(
            fn,
            [x, kernel, connections, bias],
            dtype,
            watch=[0, 1, 3] if fused else [0, 1],
            ops=[forward, *grads],
            explained=["channel_sparse_conv2d"],
        )


@pytest.mark.parametrize("dtype", [tf.float16, tf.float32], ids=dtype_id)
def test_channel_sparse_conv1d(rng, dtype):
    x = rng.standard_normal((3, 50, 16))
    kernel = rng.standard_normal((5, 4, 8)) / np.sqrt(20)
    connections = tsc.ops.random_connections(16, 8, fan_in=4, seed=5)
    with sparse_channel_kernels():
        check(
            lambda x, k, c: tsc.ops.channel_sparse_conv1d(x, k, c, strides=2, padding="SAME"),
            [x, kernel, connections],
            dtype,
            watch=[0, 1],
            ops=["TfSparseConv>ChannelSparseConv2D", "TfSparseConv>ChannelSparseConv2DBackpropInput"],
        )


# --- block-sparse ------------------------------------------------------------------------------


def index_limit(length, size, stride, offset):
    """block_sparse_common.h's BlockIndexLimit."""
    grid = max(1, -((size + offset - length) // stride) + 1)
    starts = -((offset - length) // stride) if length > offset else 0
    return max(grid, starts)


def some_blocks(rng, batch, limits, fraction):
    rows = np.argwhere(np.ones((batch, *limits), bool)).astype(np.int32)
    keep = rng.random(len(rows)) < fraction
    keep[rng.integers(len(rows))] = True
    return rng.permutation(rows[keep])


def blocky_mask(rng, batch, height, width, block, fraction=0.4):
    """A mask whose active blocks (of `block` x `block`) are a random `fraction`: some blocks
    active and some not, so block_sparse_conv2d takes its sparse path."""
    grid = (-(-height // block), -(-width // block))
    active = rng.random((batch, *grid)) < fraction
    active[0, 0, 0], active[-1, -1, -1] = True, False
    pixels = np.kron(active, np.ones((block, block)))[:, :height, :width]
    return pixels * (rng.integers(1, 17, pixels.shape) / 16.0)  # k/16: exact in every dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("avgpool,threshold", [(False, 0.9), (True, 0.15)], ids=["max", "avgpool"])
def test_reduce_mask(lib, rng, dtype, avgpool, threshold):
    mask = rng.integers(1, 17, (3, 61, 67)) / 16.0 * (rng.random((3, 61, 67)) < 0.3)  # k/16: exact
    size, stride, offset = (5, 7), (3, 4), (-1, 2)  # a 20 x 16 grid
    (mg,) = on_gpu(*prepare([mask], dtype))
    with tf.device(GPU):
        indices = lib.tf_sparse_conv_reduce_mask(
            mg,
            block_size=list(size),
            block_stride=list(stride),
            block_offset=list(offset),
            threshold=threshold,
            avgpool=avgpool,
        )
    assert_on_gpu(indices)
    out = check(
        lambda m: tsc.ops.reduce_mask(m, size, stride, offset, threshold, avgpool),
        [mask],
        dtype,
        ops=["TfSparseConv>ReduceMask"],
        explained=["reduce_mask"],
    )
    assert 0 < len(out[0]) < 3 * 20 * 16  # some blocks active, not all


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_sparse_gather_and_scatter(lib, rng, dtype):
    x = rng.standard_normal((3, 40, 44, 16))
    size, stride, offset = (6, 7), (4, 5), (-1, -2)
    limits = (index_limit(40, 6, 4, -1), index_limit(44, 7, 5, -2))
    indices = some_blocks(rng, 3, limits, 0.5)
    blocks = rng.standard_normal((len(indices), *size, 16))
    xg, ig = on_gpu(*prepare([x, indices], dtype))
    with tf.device(GPU):
        gathered = lib.tf_sparse_conv_sparse_gather(
            xg, ig, block_size=list(size), block_stride=list(stride), block_offset=list(offset)
        )
    assert_on_gpu(gathered)
    check(
        lambda x, i: tsc.ops.sparse_gather(x, i, size, stride, offset),
        [x, indices],
        dtype,
        watch=[0],
        ops=["TfSparseConv>SparseGather", "TfSparseConv>SparseScatterZeros"],
        exact=True,  # a copy
        explained=["sparse_gather"],
    )
    # Overlapping adds (stride < size), in index order on both devices.
    check(
        lambda b, i, base: tsc.ops.sparse_scatter(b, i, base, stride, offset, add=True),
        [blocks, indices, x],
        dtype,
        watch=[0, 2],
        ops=["TfSparseConv>SparseScatter", "TfSparseConv>SparseGather"],
        exact_grads=True,  # gathers of the upstream gradient
        explained=["sparse_scatter"],
    )
    # Writes of non-overlapping blocks (stride = size).
    limits = (index_limit(40, 6, 6, 0), index_limit(44, 7, 7, 0))
    indices = some_blocks(rng, 3, limits, 0.5)
    check(
        lambda b, i, base: tsc.ops.sparse_scatter(b, i, base, size, add=False),
        [rng.standard_normal((len(indices), *size, 16)), indices, x],
        dtype,
        watch=[0, 2],
        ops=["TfSparseConv>SparseScatter"],
        exact=True,
        exact_grads=True,
        explained=["sparse_scatter"],
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("strides", [1, 2])
def test_block_sparse_conv2d(rng, dtype, strides):
    x = rng.standard_normal((2, 37, 41, 8))
    kernel = rng.standard_normal((3, 3, 8, 16)) / np.sqrt(72)
    mask = blocky_mask(rng, 2, 37, 41, 8)
    check(
        lambda x, k, m: tsc.ops.block_sparse_conv2d(x, k, m, 8, strides=strides),
        [x, kernel, mask],
        dtype,
        watch=[0, 1],
        ops=["TfSparseConv>ReduceMask", "TfSparseConv>SparseGather", "TfSparseConv>SparseScatterZeros"],
        explained=["reduce_mask", "sparse_gather", "sparse_scatter"],
        factor=10.0,  # the dense convolution of the blocks: cuDNN vs oneDNN
    )


# --- coordinate sparse -------------------------------------------------------------------------

SHAPE3 = (24, 22, 20)


def random_sites(rng, shape, batch, density):
    """Unique sites int32 [n, 1 + D] in random order (n > 64: TensorFlow keeps small int32-only
    inputs on the host and would run the rulebook op there)."""
    volume = batch * int(np.prod(shape))
    flat = rng.choice(volume, size=int(round(density * volume)), replace=False)
    coords = np.stack(np.unravel_index(flat, (batch, *shape)), 1).astype(np.int32)
    assert coords.size > 64
    return coords


RULEBOOK_CASES = {
    # kernel size, strides, dilations, submanifold
    "submanifold-3": ((3, 3, 3), (1, 1, 1), (1, 1, 1), True),
    "submanifold-dilated": ((3, 2, 3), (1, 1, 1), (2, 1, 1), True),
    "strided-2": ((2, 2, 2), (2, 2, 2), (1, 1, 1), False),
    "regular-3": ((3, 3, 3), (2, 1, 2), (1, 1, 1), False),
}


def rulebook_on_gpu(lib, coords, case):
    """The compiled SparseConvRulebook op on `coords` in SHAPE3, placed on the GPU."""
    ksize, strides, dilations, submanifold = case
    with tf.device(GPU):
        return lib.tf_sparse_conv_sparse_conv_rulebook(
            coords,
            tf.constant(SHAPE3, tf.int32),
            kernel_size=list(ksize),
            strides=list(strides),
            dilations=list(dilations),
            submanifold=submanifold,
        )


@pytest.mark.parametrize("case", list(RULEBOOK_CASES.values()), ids=list(RULEBOOK_CASES))
def test_sparse_conv_rulebook(lib, rng, case):
    ksize, strides, dilations, submanifold = case
    coords = random_sites(rng, SHAPE3, 2, 0.04)
    (cg,) = on_gpu(*prepare([coords], tf.float32))
    out_coords, pair_ptr, pairs, _ = rulebook_on_gpu(lib, cg, case)
    assert_on_gpu(out_coords, pair_ptr, pairs)
    out = check(
        lambda c: tsc.ops.sparse_conv_rulebook(c, SHAPE3, ksize, strides, dilations, submanifold),
        [coords],
        ops=["TfSparseConv>SparseConvRulebook"],
        explained=["sparse_conv_rulebook"],
    )
    assert len(out[2]) >= len(coords)  # every site feeds an output: the test is not vacuous


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", list(RULEBOOK_CASES.values()), ids=list(RULEBOOK_CASES))
def test_sparse_conv(lib, rng, dtype, case):
    ksize, strides, dilations, submanifold = case
    coords = random_sites(rng, SHAPE3, 2, 0.04)
    features = rng.standard_normal((len(coords), 8))
    kernel = rng.standard_normal((*ksize, 8, 12)) / np.sqrt(8 * np.prod(ksize))
    fg, kg = on_gpu(*prepare([features, kernel.reshape(-1, 8, 12)], dtype))
    (cg,) = on_gpu(*prepare([coords], dtype))
    out_coords, pair_ptr, pairs, _ = rulebook_on_gpu(lib, cg, case)
    with tf.device(GPU):
        out = lib.tf_sparse_conv_sparse_conv_features(fg, kg, pair_ptr, pairs, tf.shape(out_coords)[0])
        grad = lib.tf_sparse_conv_sparse_conv_kernel_grad(fg, out, pair_ptr, pairs)
    assert_on_gpu(out, grad)
    ops = [
        "TfSparseConv>SparseConvRulebook",
        "TfSparseConv>SparseConvFeatures",
        "TfSparseConv>SparseConvKernelGrad",
    ]
    check(
        lambda f, c, k: tsc.ops.sparse_conv(f, c, k, SHAPE3, strides, dilations, submanifold),
        [features, coords, kernel],
        dtype,
        watch=[0, 2],
        ops=ops,
        explained=["sparse_conv_rulebook", "sparse_conv_features"],
    )


@pytest.mark.parametrize("dtype", [tf.float16, tf.float32], ids=dtype_id)
def test_sparse_conv_transpose(rng, dtype):
    coords = random_sites(rng, SHAPE3, 2, 0.04)
    (rb_coords,) = prepare([coords], dtype)

    def fn(coarse_features, kernel):
        rulebook = tsc.ops.Rulebook(
            *tsc.ops.sparse_conv_rulebook(tf.identity(rb_coords), SHAPE3, 2, 2, 1, False)
        )
        return tsc.ops.sparse_conv_transpose(coarse_features, kernel, rulebook, tf.identity(rb_coords))

    with tf.device(CPU):
        m = int(tsc.ops.sparse_conv_rulebook(coords, SHAPE3, 2, 2, 1, False)[0].shape[0])
    check(
        fn,
        [rng.standard_normal((m, 6)), rng.standard_normal((2, 2, 2, 6, 5)) / np.sqrt(48)],
        dtype,
        watch=[0, 1],
        ops=["TfSparseConv>SparseConvFeatures", "TfSparseConv>SparseConvRulebook"],
        explained=["sparse_conv_features"],
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("score", ["l2", "abs_max"])
def test_topk_sites(lib, rng, dtype, score):
    coords = random_sites(rng, SHAPE3, 3, 0.02)
    features = rng.standard_normal((len(coords), 6))
    fg, cg = on_gpu(*prepare([features, coords], dtype))
    with tf.device(GPU):
        rows = lib.tf_sparse_conv_top_k_sites(fg, cg, 40, score=score)
    assert_on_gpu(rows)
    out = check(
        lambda f, c: tsc.ops.topk_sites(f, c, 40, score),
        [features, coords],
        dtype,
        watch=[0],
        ops=["TfSparseConv>TopKSites"],
        exact=True,
        exact_grads=True,
        explained=["topk_sites"],
    )
    assert len(out[0]) == 3 * 40


# --- streaming ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
def test_streaming_conv_step(lib, rng, dtype, relu):
    taps, dilation = 3, 3
    history = rng.standard_normal((4, (taps - 1) * dilation, 32))
    frames = rng.standard_normal((4, 9, 32))
    kernel = rng.standard_normal((taps, 32, 48)) / np.sqrt(96)
    bias = rng.standard_normal(48)
    hg, xg, kg, bg = on_gpu(*prepare([history, frames, kernel, bias], dtype))
    with tf.device(GPU):
        y, new_history = lib.tf_sparse_conv_streaming_conv_step(hg, xg, kg, bg, dilation=dilation)
    assert_on_gpu(y, new_history)
    activation = "relu" if relu else None
    check(
        lambda h, x, k, b: tsc.ops.streaming_conv_step(h, x, k, b, dilation, activation),
        [history, frames, kernel, bias],
        dtype,
        watch=[0, 1, 2, 3],
        ops=["TfSparseConv>StreamingConvStep"],
        explained=["streaming_conv_step"],
    )


# --- layers: one or more per family, float32 ---------------------------------------------------


def layer_case(name, rng):
    """(model callable, NumPy inputs, its layers, explained ops, expected graph ops)."""
    conv = {"activation": "relu", "bias_initializer": "random_normal"}  # the convolutions' options
    if name == "KWinners+TopKAttention":
        kw, att = tsc.layers.KWinners(k=20), tsc.layers.TopKAttention(k=10, mode="relu")
        return (
            lambda x: att(kw(x)),
            [rng.standard_normal((4, 11, 13, 40))],
            [kw, att],
            ["kwinners", "topk_attention"],
            [
                "TfSparseConv>KWinners",
                "TfSparseConv>KWinnersGrad",
                "TfSparseConv>TopKAttention",
                "TfSparseConv>TopKAttentionGrad",
            ],
        )
    if name == "ChannelSparseConv2D":
        layer = tsc.layers.ChannelSparseConv2D(24, 3, fan_in=4, **conv)
        return (
            layer,
            [rng.standard_normal((2, 19, 17, 16))],
            [layer],
            ["channel_sparse_conv2d"],
            [
                "TfSparseConv>ChannelSparseConv2DBackpropInput",
                "TfSparseConv>ChannelSparseConv2DBackpropKernel",
            ],
        )
    if name == "BlockSparseConv2D":
        layer = tsc.layers.BlockSparseConv2D(16, 3, block_size=8, **conv)
        return (
            lambda x, mask: layer([x, mask]),
            [rng.standard_normal((2, 37, 41, 8)), blocky_mask(rng, 2, 37, 41, 8)],
            [layer],
            ["reduce_mask", "sparse_gather"],
            ["TfSparseConv>ReduceMask", "TfSparseConv>SparseGather"],
        )
    if name == "SparseConv3D":
        sparsify = tsc.layers.Sparsify()
        conv1 = tsc.layers.SparseConv3D(8, 3, **conv)
        conv2 = tsc.layers.SparseConv3D(12, 2, strides=2, submanifold=False, max_active_sites=30)
        x = rng.standard_normal((2, 16, 15, 14, 3)) * (rng.random((2, 16, 15, 14, 1)) < 0.08)
        return (
            lambda x: conv2(conv1(sparsify(x))),
            [x],
            [conv1, conv2],
            ["sparse_conv_rulebook", "sparse_conv_features", "topk_sites"],
            [
                "TfSparseConv>SparseConvRulebook",
                "TfSparseConv>SparseConvFeatures",
                "TfSparseConv>SparseConvKernelGrad",
                "TfSparseConv>TopKSites",
            ],
        )
    if name == "StreamingConv1D":
        layer = tsc.layers.StreamingConv1D(16, 3, dilation_rate=2, activation="relu")
        return (
            layer,
            [rng.standard_normal((3, 40, 8))],
            [layer],
            ["streaming_conv_step"],
            ["TfSparseConv>StreamingConvStep"],
        )
    raise AssertionError(name)


LAYERS = [
    "KWinners+TopKAttention",
    "ChannelSparseConv2D",
    "BlockSparseConv2D",
    "SparseConv3D",
    "StreamingConv1D",
]


@pytest.mark.parametrize("name", LAYERS)
def test_layer(rng, name):
    """A layer's outputs and gradients (input and weights) on the GPU equal the CPU's."""
    keras.utils.set_random_seed(7)
    model, arrays, layers, explained, ops = layer_case(name, rng)
    inputs = prepare(arrays, tf.float32)
    with tf.device(CPU), sparse_channel_kernels():
        model(*inputs)  # builds the weights
    variables = [v.value for layer in layers for v in layer.trainable_variables]
    watch = [0]
    factor = 10.0 if name == "BlockSparseConv2D" else 1.0  # cuDNN vs oneDNN convolutions
    with sparse_channel_kernels():
        with tsc.ops.explain() as calls:
            gpu_out, gpu_grads = run(GPU, model, inputs, watch, variables)
        assert_compiled(calls, *explained)
        cpu_out, cpu_grads = run(CPU, model, inputs, watch, variables)
        for i, (g, c) in enumerate(zip(gpu_out, cpu_out)):
            assert_close(g, c, tf.float32, f"{name} output {i}", factor=factor)
        for i, (g, c) in enumerate(zip(gpu_grads, cpu_grads)):
            assert_close(g, c, tf.float32, f"{name} gradient {i}", factor=factor)
        assert_placed_on_gpu(gpu_graph_placements(model, inputs, watch, variables), ops)


# --- determinism of the channel-sparse input gradient ------------------------------------------


@pytest.mark.parametrize("dtype", [tf.float16, tf.float32, tf.float64], ids=dtype_id)
def test_channel_sparse_backprop_input_deterministic(lib, rng, dtype):
    """Under enable_op_determinism() the GPU input gradient (each dx element sums up to
    kh * kw * Cout * m / Cin products) is bitwise the same from run to run, and close to the CPU's."""
    x_shape = (4, 48, 40, 32)
    kernel = rng.standard_normal((3, 3, 8, 64)) / np.sqrt(72)
    connections = tsc.ops.random_connections(32, 64, fan_in=8, seed=11)
    dy = rng.standard_normal((4, 48, 40, 64))
    x, kernel_t, conn_t, dy_t = prepare([rng.standard_normal(x_shape), kernel, connections, dy], dtype)
    attrs = {"strides": [1, 1], "padding": "SAME", "dilations": [1, 1]}

    def backprop_input(device):
        with tf.device(device):
            k, c, g = (tf.identity(t) for t in (kernel_t, conn_t, dy_t))
            return lib.tf_sparse_conv_channel_sparse_conv2d_backprop_input(
                tf.constant(x_shape, tf.int32), k, c, g, **attrs
            )

    def registered_gradient():
        with sparse_channel_kernels():
            _, (dx,) = run(GPU, tsc.ops.channel_sparse_conv2d, [x, kernel_t, conn_t], watch=[0])
        return dx

    was_deterministic = tf_config.is_op_determinism_enabled()
    tf.config.experimental.enable_op_determinism()
    try:
        runs = [backprop_input(GPU) for _ in range(3)]
        assert_on_gpu(*runs)
        first = runs[0].numpy().tobytes()
        assert all(r.numpy().tobytes() == first for r in runs[1:]), "runs of the GPU input gradient differ"
        via_tape = [registered_gradient() for _ in range(2)]
        assert via_tape[0].tobytes() == via_tape[1].tobytes(), "runs of the registered gradient differ"
    finally:
        if not was_deterministic:
            tf_config.disable_op_determinism()
    assert_close(as_numpy(runs[0]), as_numpy(backprop_input(CPU)), dtype, "dx")
