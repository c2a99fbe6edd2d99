"""Coordinate sparse convolution: sparse_conv, sparse_conv_features, the transposed
rulebook, sparse_conv_transpose and topk_sites.

The oracle is written in NumPy straight from the dense definition (every
output site, every kernel tap, the "SAME" padding formula), independent of the
rulebook; `test_numpy_oracle_matches_tf_convolution` checks it against
`tf.nn.convolution` on the dense grid.
"""

import itertools

import numpy as np
import pytest
import tensorflow as tf
from helpers import draw_sparse_conv, op_library, random_sites
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_coord_sparse_ops import CASES as RULEBOOK_CASES

import tf_sparseconv as tsc

# --- the oracle -------------------------------------------------------------------


def oracle_conv(features, coords, kernel, shape, strides, dilations, submanifold):
    """(out_features float64, out_coords) from the definition, by brute force."""
    dims = len(shape)
    kernel = np.asarray(kernel, np.float64)
    ksize = kernel.shape[:dims]
    out_shape = [-(-n // s) for n, s in zip(shape, strides)]
    pad = [
        max((o - 1) * s + (k - 1) * d + 1 - n, 0) // 2
        for n, o, k, s, d in zip(shape, out_shape, ksize, strides, dilations)
    ]
    rows = {tuple(int(v) for v in c): i for i, c in enumerate(coords)}
    taps = list(itertools.product(*[range(k) for k in ksize]))

    def reads(site):
        b, o = site[0], site[1:]
        for t in taps:
            p = tuple(oi * s - pb + ti * d for oi, s, pb, ti, d in zip(o, strides, pad, t, dilations))
            if all(0 <= pi < n for pi, n in zip(p, shape)) and (b, *p) in rows:
                yield t, rows[(b, *p)]

    if submanifold:
        out_sites = [tuple(int(v) for v in c) for c in coords]
    else:
        batch = int(coords[:, 0].max()) + 1 if len(coords) else 0
        grid = itertools.product(range(batch), *[range(n) for n in out_shape])
        out_sites = [s for s in grid if any(True for _ in reads(s))]
    out = np.zeros([len(out_sites), kernel.shape[-1]])
    for j, site in enumerate(out_sites):
        for t, i in reads(site):
            out[j] += np.asarray(features[i], np.float64) @ kernel[t]
    return out, np.array(out_sites, np.int32).reshape(-1, 1 + dims)


def dilate(kernel, dilations):
    """The undilated equivalent of a dilated kernel (zeros between the taps)."""
    dims = len(dilations)
    span = [(k - 1) * d + 1 for k, d in zip(kernel.shape[:dims], dilations)]
    out = np.zeros([*span, *kernel.shape[dims:]], kernel.dtype)
    out[tuple(slice(None, None, d) for d in dilations)] = kernel
    return out


def sparse_input(rng, shape, batch, density, cin, dtype=np.float64):
    coords = random_sites(rng, shape, batch, density)
    features = rng.standard_normal((len(coords), cin)).astype(dtype)
    return features, coords


# (spatial_shape, kernel_size, strides, dilations, batch, density): the rulebook tests' cases
# and a dilated 3-D one with a 1-wide kernel axis.
CASES = [*RULEBOOK_CASES, ((6, 6, 5), (3, 1, 2), (1, 1, 1), (2, 1, 1), 2, 0.2)]
MODES = [(c, sub) for c in CASES for sub in (True, False) if not (sub and max(c[2]) > 1)]
IDS = [f"{len(c[0])}d-{c[0]}-k{c[1]}-s{c[2]}-d{c[3]}-{'sub' if sub else 'reg'}" for c, sub in MODES]
CONV_FNS = {"op": tsc.ops.sparse_conv, "reference": tsc.ops.sparse_conv_reference}


@pytest.fixture(scope="module")
def library():
    return op_library()


def test_numpy_oracle_matches_tf_convolution(rng):
    for shape, ksize, strides, dilations, batch, density in (CASES[4], CASES[6], CASES[8]):
        features, coords = sparse_input(rng, shape, batch, density, 2)
        kernel = rng.standard_normal((*ksize, 2, 3))
        out, out_coords = oracle_conv(features, coords, kernel, shape, strides, dilations, False)
        dense = np.zeros([batch, *shape, 2])
        dense[tuple(coords.T)] = features
        conv = tf.nn.convolution(dense, dilate(kernel, dilations), strides=list(strides), padding="SAME")
        np.testing.assert_allclose(out, conv.numpy()[tuple(out_coords.T)], atol=1e-12)
        # The output sites are the positions the receptive fields reach.
        ones = tf.nn.convolution(
            (dense != 0).any(-1, keepdims=True).astype(np.float64),
            dilate(np.ones((*ksize, 1, 1)), dilations),
            strides=list(strides),
            padding="SAME",
        )
        np.testing.assert_array_equal(np.argwhere(ones.numpy()[..., 0] > 0), out_coords)


@pytest.mark.parametrize("impl", list(CONV_FNS))
@pytest.mark.parametrize("case,submanifold", MODES, ids=IDS)
def test_sparse_conv_matches_oracle(library, rng, impl, case, submanifold):
    shape, ksize, strides, dilations, batch, density = case
    features, coords = sparse_input(rng, shape, batch, density, 3)
    kernel = rng.standard_normal((*ksize, 3, 4))
    out, out_coords, out_shape = CONV_FNS[impl](
        features, coords, kernel, shape, strides, dilations, submanifold
    )
    expected, expected_coords = oracle_conv(features, coords, kernel, shape, strides, dilations, submanifold)
    np.testing.assert_array_equal(out_coords, expected_coords)
    np.testing.assert_array_equal(out_shape, [-(-n // s) for n, s in zip(shape, strides)])
    assert out.dtype == tf.float64
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cin,cout", [(1, 1), (5, 17), (16, 48), (33, 40), (8, 64)])
def test_channel_counts_cover_every_vector_path(library, rng, cin, cout):
    features, coords = sparse_input(rng, (7, 7, 7), 2, 0.15, cin, np.float32)
    kernel = rng.standard_normal((3, 3, 3, cin, cout)).astype(np.float32)
    out, out_coords, _ = tsc.ops.sparse_conv(features, coords, kernel, (7, 7, 7))
    expected, _ = oracle_conv(features, coords, kernel, (7, 7, 7), (1, 1, 1), (1, 1, 1), True)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * np.sqrt(27 * cin))


@pytest.mark.parametrize("dtype,tol", [("float16", 2e-2), ("bfloat16", 1e-1), ("float32", 1e-5)])
@pytest.mark.parametrize("impl", list(CONV_FNS))
def test_dtypes(library, rng, dtype, tol, impl):
    shape = (6, 7)
    features, coords = sparse_input(rng, shape, 2, 0.4, 5)
    kernel = rng.standard_normal((3, 3, 5, 6)) * 0.3
    f = tf.cast(features, dtype)
    k = tf.cast(kernel, dtype)
    out, _, _ = CONV_FNS[impl](f, coords, k, shape, 2, 1, False)
    assert out.dtype == dtype
    expected, _ = oracle_conv(
        tf.cast(f, tf.float64).numpy(), coords, tf.cast(k, tf.float64).numpy(), shape, (2, 2), (1, 1), False
    )
    np.testing.assert_allclose(tf.cast(out, tf.float64), expected, rtol=tol, atol=tol * 3)


GRAD_MODES = MODES[::2]


@pytest.mark.parametrize("case,submanifold", GRAD_MODES, ids=[IDS[MODES.index(m)] for m in GRAD_MODES])
def test_gradients_float64(library, rng, case, submanifold):
    shape, ksize, strides, dilations, batch, density = case
    features, coords = sparse_input(rng, shape, batch, min(density, 0.25), 2)
    kernel = rng.standard_normal((*ksize, 2, 3))

    def conv(f, k):
        return tsc.ops.sparse_conv(f, coords, k, shape, strides, dilations, submanifold)[0]

    theoretical, numerical = tf.test.compute_gradient(conv, [features, kernel])
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=1e-7, atol=1e-7)


def test_symmetric_fast_path_equals_transposed_gradient(library, rng):
    """The submanifold gradient (same rulebook, reversed kernel) equals the general one."""
    features, coords = sparse_input(rng, (6, 7, 5), 2, 0.3, 4)
    kernel = rng.standard_normal((3, 3, 3, 4, 5))
    out_coords, ptr, pairs, _ = tsc.ops.sparse_conv_rulebook(coords, (6, 7, 5), 3)
    flat = tf.reshape(kernel, [27, 4, 5])
    dy = rng.standard_normal((len(coords), 5))
    f = tf.constant(features)
    grads = []
    for symmetric in (True, False):
        with tf.GradientTape() as tape:
            tape.watch(f)
            y = library.tf_sparse_conv_sparse_conv_features(
                f, flat, ptr, pairs, len(coords), symmetric=symmetric
            )
        grads.append(tape.gradient(y, f, output_gradients=dy))
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-12, atol=1e-12)


def test_second_order_gradients(library, rng):
    features, coords = sparse_input(rng, (6, 5), 2, 0.4, 2)
    kernel = rng.standard_normal((2, 3, 2, 3)) * 0.5

    def grad_norm(conv):
        def fn(f, k):
            with tf.GradientTape() as tape:
                tape.watch([f, k])
                y = conv(f, coords, k, (6, 5), 2, 1, False)[0]
                loss = tf.reduce_sum(tf.sin(y))
            gf, gk = tape.gradient(loss, [f, k])
            return tf.reduce_sum(tf.convert_to_tensor(gf) ** 2) + tf.reduce_sum(gk**2)

        return fn

    # Exact: the reference's autodiff; approximate: finite differences.
    ours, numerical = tf.test.compute_gradient(grad_norm(tsc.ops.sparse_conv), [features, kernel])
    reference, _ = tf.test.compute_gradient(grad_norm(tsc.ops.sparse_conv_reference), [features, kernel])
    for o, r, n in zip(ours, reference, numerical):
        np.testing.assert_allclose(o, r, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(o, n, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", list(CONV_FNS))
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_empty_maps(library, impl, dims):
    shape = (5,) * dims
    features = np.zeros([0, 3], np.float32)
    coords = np.zeros([0, 1 + dims], np.int32)
    kernel = np.ones([*(3,) * dims, 3, 2], np.float32)
    for strides, sub in ((1, True), (2, False)):
        out, out_coords, out_shape = CONV_FNS[impl](features, coords, kernel, shape, strides, 1, sub)
        assert out.shape == (0, 2) and out_coords.shape == (0, 1 + dims)
    f = tf.constant(features)
    k = tf.constant(kernel)
    with tf.GradientTape() as tape:
        tape.watch([f, k])
        y = tf.reduce_sum(CONV_FNS[impl](f, coords, k, shape)[0])
    gf, gk = tape.gradient(y, [f, k])
    assert gf.shape == (0, 3)
    np.testing.assert_array_equal(gk, np.zeros_like(kernel))


def test_zero_channels(library, rng):
    coords = random_sites(rng, (5, 5), 1, 0.4)
    out, _, _ = tsc.ops.sparse_conv(
        np.zeros([len(coords), 0], np.float32), coords, np.zeros([3, 3, 0, 4], np.float32), (5, 5)
    )
    np.testing.assert_array_equal(out, np.zeros([len(coords), 4]))
    out, _, _ = tsc.ops.sparse_conv(
        np.ones([len(coords), 2], np.float32), coords, np.zeros([3, 3, 2, 0], np.float32), (5, 5)
    )
    assert out.shape == (len(coords), 0)


def test_deterministic_on_many_tiles(library, rng):
    features, coords = sparse_input(rng, (20, 22, 24), 2, 0.1, 8, np.float32)  # ~2100 sites: 9 tiles
    kernel = rng.standard_normal((3, 3, 3, 8, 16)).astype(np.float32)
    f, k = tf.constant(features), tf.constant(kernel)
    dy = tf.constant(rng.standard_normal((len(coords), 16)).astype(np.float32))
    runs = []
    for _ in range(3):
        with tf.GradientTape() as tape:
            tape.watch([f, k])
            y = tsc.ops.sparse_conv(f, coords, k, (20, 22, 24))[0]
        runs.append([y.numpy(), *(g.numpy() for g in tape.gradient(y, [f, k], output_gradients=dy))])
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            np.testing.assert_array_equal(a, b)


def test_large_sparse_grid_uses_hash_index(library, rng):
    """A grid far larger than the sites (the rulebook's hash-table path) matches the reference."""
    shape = (300, 200, 250)
    coords = np.unique(rng.integers(0, 200, (400, 4)) % [2, 300, 200, 250], axis=0).astype(np.int32)
    features = rng.standard_normal((len(coords), 3))
    kernel = rng.standard_normal((3, 3, 3, 3, 2))
    for strides, sub in ((1, True), (2, False)):
        got = tsc.ops.sparse_conv(features, coords, kernel, shape, strides, 1, sub)
        ref = tsc.ops.sparse_conv_reference(features, coords, kernel, shape, strides, 1, sub)
        np.testing.assert_array_equal(got[1], ref[1])
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-12, atol=1e-12)
    # Clustered sites so that pairs exist.
    coords = random_sites(rng, (6, 6, 6), 1, 0.3) + np.array([0, 100, 50, 70], np.int32)
    features = rng.standard_normal((len(coords), 3))
    got = tsc.ops.sparse_conv(features, coords, kernel, shape)
    expected, _ = oracle_conv(features, coords, kernel, shape, (1, 1, 1), (1, 1, 1), True)
    np.testing.assert_allclose(got[0], expected, rtol=1e-12, atol=1e-12)


def test_rulebook_reuse(library, rng):
    features, coords = sparse_input(rng, (8, 8), 2, 0.3, 3)
    k1, k2 = rng.standard_normal((3, 3, 3, 3)), rng.standard_normal((3, 3, 3, 2))
    rulebook = tsc.ops.Rulebook(*tsc.ops.sparse_conv_rulebook(coords, (8, 8), 3))
    h, _, _ = tsc.ops.sparse_conv(features, coords, k1, (8, 8), rulebook=rulebook)
    y, _, _ = tsc.ops.sparse_conv(h, coords, k2, (8, 8), rulebook=rulebook)
    h_ref, _, _ = tsc.ops.sparse_conv(features, coords, k1, (8, 8))
    y_ref, _, _ = tsc.ops.sparse_conv(h_ref, coords, k2, (8, 8))
    np.testing.assert_array_equal(y, y_ref)


def test_in_tf_function_with_unknown_sizes(library, rng):
    features, coords = sparse_input(rng, (6, 6), 2, 0.4, 3, np.float32)
    kernel = rng.standard_normal((3, 3, 3, 2)).astype(np.float32)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, 3]),
            tf.TensorSpec([None, 3], tf.int32),
            tf.TensorSpec([3, 3, 3, 2]),
        ]
    )
    def conv(f, c, k):
        out, out_coords, _ = tsc.ops.sparse_conv(f, c, k, (6, 6), 2, 1, False)
        assert out.shape.as_list() == [None, 2]
        return out, out_coords

    out, out_coords = conv(features, coords, kernel)
    expected, expected_coords = oracle_conv(features, coords, kernel, (6, 6), (2, 2), (1, 1), False)
    np.testing.assert_array_equal(out_coords, expected_coords)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


# --- the transposed rulebook and the inverse convolution ---------------------------


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_rulebook_transpose(library, rng, impl):
    coords = random_sites(rng, (7, 8), 2, 0.3)
    out_coords, ptr, pairs, _ = tsc.ops.sparse_conv_rulebook(coords, (7, 8), 3, 2, 1, False)
    fn = (
        tsc.ops.sparse_conv_rulebook_transpose
        if impl == "op"
        else tsc.ops.sparse_conv_rulebook_transpose_reference
    )
    transposed = fn(ptr, pairs, len(coords)).numpy()
    pairs, ptr = pairs.numpy(), ptr.numpy()
    for k in range(len(ptr) - 1):
        seg, tseg = pairs[ptr[k] : ptr[k + 1]], transposed[ptr[k] : ptr[k + 1]]
        assert sorted(map(tuple, seg[:, ::-1].tolist())) == sorted(map(tuple, tseg.tolist()))
        assert np.all(np.diff(tseg[:, 1]) >= 0)  # sorted by the new dst
        # Ties (equal new dst) keep the original order, which was by old dst.
        order = np.lexsort((seg[:, 1], seg[:, 0]))
        np.testing.assert_array_equal(tseg, seg[order][:, ::-1])


def test_rulebook_transpose_both_paths(library, rng):
    """Counting sort (dense offsets) and comparison sort (sparse offsets) agree with the reference."""
    ptr = np.array([0, 6, 8], np.int32)  # offset 0: 6 pairs over 10 sources; offset 1: 2 pairs over 10
    pairs = np.array([[7, 0], [2, 1], [7, 2], [0, 3], [9, 4], [2, 5], [5, 0], [1, 3]], np.int32)
    for num_src in (10, 1000):
        got = tsc.ops.sparse_conv_rulebook_transpose(ptr, pairs, num_src)
        ref = tsc.ops.sparse_conv_rulebook_transpose_reference(ptr, pairs, num_src)
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_array_equal(got[:6], [[3, 0], [1, 2], [5, 2], [0, 7], [2, 7], [4, 9]])


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_sparse_conv_transpose_is_the_adjoint(library, rng, dims):
    shape = (9, 8, 7)[:dims]
    features, coords = sparse_input(rng, shape, 2, 0.3, 3)
    w = rng.standard_normal((*(2,) * dims, 3, 4))  # fine (3) -> coarse (4), stride 2
    rulebook = tsc.ops.Rulebook(*tsc.ops.sparse_conv_rulebook(coords, shape, 2, 2, 1, False))
    coarse = rng.standard_normal((rulebook.out_coords.shape[0], 4))
    f = tf.constant(features)
    with tf.GradientTape() as tape:
        tape.watch(f)
        y, _, _ = tsc.ops.sparse_conv(f, coords, w, shape, 2, 1, False, rulebook=rulebook)
    adjoint = tape.gradient(y, f, output_gradients=coarse)
    kernel_t = np.swapaxes(w, -1, -2)  # [..., 4, 3]
    up = tsc.ops.sparse_conv_transpose(coarse, kernel_t, rulebook, coords)
    assert up.shape == (len(coords), 3)
    np.testing.assert_allclose(up, adjoint, rtol=1e-12, atol=1e-12)
    # And it is differentiable (float64 numerical check).
    theoretical, numerical = tf.test.compute_gradient(
        lambda c, k: tsc.ops.sparse_conv_transpose(c, k, rulebook, coords), [coarse, kernel_t]
    )
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=1e-7, atol=1e-7)


# --- sparse_conv_features: direct use and bad input ------------------------------------


def test_features_reference_matches_op(library, rng):
    features = rng.standard_normal((7, 3))
    kernel = rng.standard_normal((3, 3, 2))
    ptr = np.array([0, 3, 3, 7], np.int32)  # an empty offset, repeated dst
    pairs = np.array([[0, 0], [6, 0], [2, 4], [1, 1], [1, 2], [5, 2], [3, 4]], np.int32)
    got = tsc.ops.sparse_conv_features(features, kernel, ptr, pairs, 5)
    ref = tsc.ops.sparse_conv_features_reference(features, kernel, ptr, pairs, 5)
    expected = np.zeros([5, 2])
    for k in range(3):
        for s, d in pairs[ptr[k] : ptr[k + 1]]:
            expected[d] += features[s] @ kernel[k]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    np.testing.assert_allclose(ref, expected, rtol=1e-12)


def _features(
    library, n=4, k=2, cin=3, cout=2, ptr=(0, 1, 2), pairs=((0, 0), (1, 1)), num_out=2, kernel_shape=None
):
    return library.tf_sparse_conv_sparse_conv_features(
        tf.zeros([n, cin]),
        tf.zeros(kernel_shape or [k, cin, cout]),
        tf.constant(ptr, tf.int32, shape=np.shape(ptr)),
        tf.constant(pairs, tf.int32, shape=np.shape(pairs)),
        tf.constant(num_out, tf.int32, shape=np.shape(num_out)),
    )


# Shapes and scalars, checked on every device.
FEATURES_BAD_SHAPES = {
    "kernel-cin": ({"kernel_shape": [2, 4, 2]}, "input channels"),
    "kernel-rank": ({"kernel_shape": [2, 3]}, "kernel must be"),
    "pair_ptr-length": ({"ptr": (0, 2)}, "pair_ptr"),
    "num_out-negative": ({"num_out": -1}, "num_out must be >= 0"),
    "num_out-vector": ({"num_out": (2,)}, "num_out"),
    "pairs-width": ({"pairs": ((0, 0, 0), (1, 1, 1))}, "pairs"),
}
# Rulebook values, checked by the CPU kernel only: on the GPU the rulebook stays in device
# memory (README, "Validation on GPU"; test_gpu_rulebook_values_are_not_checked).
FEATURES_BAD_VALUES = {
    "pair_ptr-start": ({"ptr": (1, 1, 2)}, "pair_ptr must start at 0"),
    "pair_ptr-end": ({"ptr": (0, 2, 1), "pairs": ((0, 0), (1, 1))}, "pair_ptr must start at 0 and end"),
    "pair_ptr-order": ({"ptr": (0, 2, 1, 2), "k": 3, "pairs": ((0, 0), (1, 1))}, "non-decreasing"),
    "src-large": ({"pairs": ((0, 0), (4, 1))}, r"pairs\[1, 0\] = 4 is outside \[0, 4\)"),
    "src-negative": ({"pairs": ((-1, 0), (1, 1))}, r"pairs\[0, 0\] = -1"),
    "dst-large": ({"pairs": ((0, 0), (1, 2))}, r"pairs\[1, 1\] = 2 is outside \[0, 2\).*num_out"),
    "dst-order": ({"ptr": (0, 2, 2), "pairs": ((0, 1), (1, 0))}, "non-decreasing within a kernel offset"),
}
FEATURES_BAD = {**FEATURES_BAD_SHAPES, **FEATURES_BAD_VALUES}
GPU_VISIBLE = bool(tf.config.list_physical_devices("GPU"))


@pytest.mark.parametrize("kwargs,match", list(FEATURES_BAD.values()), ids=list(FEATURES_BAD))
def test_features_op_rejects_bad_input(library, kwargs, match):
    with tf.device("/CPU:0"), pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=match):
        _features(library, **kwargs)


@pytest.mark.skipif(not GPU_VISIBLE, reason="TensorFlow sees no GPU")
@pytest.mark.parametrize("kwargs,match", list(FEATURES_BAD_SHAPES.values()), ids=list(FEATURES_BAD_SHAPES))
def test_features_op_rejects_bad_shapes_on_gpu(library, kwargs, match):
    with tf.device("/GPU:0"), pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=match):
        _features(library, **kwargs)


def np_valid_pairs(ptr, pairs, n, num_out):
    """The (offset, src, dst) a malformed rulebook means on the GPU: pair_ptr clamped to [0, P]
    and made non-decreasing (offset k: pairs[lo_k : max(lo_k, min(ptr[k + 1], P))], lo_k =
    clamp(ptr[k], 0, P)), pairs with src or dst out of range skipped."""
    p = len(pairs)
    for k in range(len(ptr) - 1):
        lo = min(max(ptr[k], 0), p)
        hi = min(max(ptr[k + 1], lo), p)
        for src, dst in pairs[lo:hi]:
            if 0 <= src < n and 0 <= dst < num_out:
                yield k, src, dst


I32 = np.iinfo(np.int32)


@pytest.mark.skipif(not GPU_VISIBLE, reason="TensorFlow sees no GPU")
@pytest.mark.parametrize(
    "ptr,pairs",
    [
        ((1, 1, 2), ((0, 0), (1, 1))),  # pair_ptr not starting at 0
        ((0, 2, 1), ((0, 0), (1, 1))),  # not ending at P
        ((0, 2, 1, 2), ((0, 0), (1, 1))),  # decreasing
        ((-3, 1, 2), ((0, 0), (1, 1))),  # negative
        ((0, 5, 9), ((0, 0), (1, 1))),  # past P
        ((0, 1, 2), ((0, 0), (4, 1))),  # src >= N
        ((0, 1, 2), ((-1, 0), (1, 1))),  # src < 0
        ((0, 1, 2), ((0, 0), (1, 2))),  # dst >= num_out
        ((0, 2, 4), ((3, I32.min), (2, -1), (0, 0), (I32.max, I32.max))),  # extremes
    ],
)
def test_gpu_rulebook_values_are_not_checked(library, rng, ptr, pairs):
    """On the GPU (README, "Validation on GPU") rulebook values are not checked, as tf.gather
    does there: pair_ptr is clamped and pairs with src or dst out of range are skipped (never an
    out-of-bounds access), by the convolution and by its kernel gradient."""
    features = rng.standard_normal((4, 3)).astype(np.float32)
    kernel = rng.standard_normal((len(ptr) - 1, 3, 2)).astype(np.float32)
    grad = rng.standard_normal((2, 2)).astype(np.float32)
    ptr_t, pairs_t = np.array(ptr, np.int32), np.array(pairs, np.int32)
    with tf.device("/GPU:0"):
        out = library.tf_sparse_conv_sparse_conv_features(features, kernel, ptr_t, pairs_t, 2)
        kernel_grad = library.tf_sparse_conv_sparse_conv_kernel_grad(features, grad, ptr_t, pairs_t)
    assert out.device.endswith("GPU:0") and kernel_grad.device.endswith("GPU:0")
    expected_out, expected_grad = np.zeros((2, 2)), np.zeros(kernel.shape)
    for k, src, dst in np_valid_pairs(ptr, pairs, 4, 2):
        expected_out[dst] += features[src].astype(np.float64) @ kernel[k]
        expected_grad[k] += np.outer(features[src], grad[dst])
    np.testing.assert_allclose(out, expected_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kernel_grad, expected_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not GPU_VISIBLE, reason="TensorFlow sees no GPU")
def test_gpu_unsorted_rulebook_is_memory_safe(library, rng):
    """dst out of order within an offset is not checked on the GPU: the values are unspecified,
    but the call returns finite values of the right shape."""
    features = rng.standard_normal((4, 3)).astype(np.float32)
    kernel = rng.standard_normal((2, 3, 2)).astype(np.float32)
    pairs = np.array([[0, 1], [1, 0], [2, 1], [3, 0]], np.int32)
    with tf.device("/GPU:0"):
        out = library.tf_sparse_conv_sparse_conv_features(
            features, kernel, np.array([0, 4, 4], np.int32), pairs, 2
        )
    assert out.shape == (2, 2) and np.isfinite(out).all()


def test_kernel_grad_and_transpose_reject_bad_input(library):
    # The CPU kernel checks the rulebook; the GPU one skips bad pairs
    # (test_gpu_rulebook_values_are_not_checked). The transpose has a CPU kernel only.
    with tf.device("/CPU:0"), pytest.raises(tf.errors.InvalidArgumentError, match=r"pairs\[0, 1\] = 5"):
        library.tf_sparse_conv_sparse_conv_kernel_grad(tf.zeros([2, 3]), tf.zeros([2, 4]), [0, 1], [[0, 5]])
    with pytest.raises(tf.errors.InvalidArgumentError, match="num_src"):
        library.tf_sparse_conv_sparse_conv_rulebook_transpose([0, 1], [[3, 0]], 2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="num_src must be >= 0"):
        library.tf_sparse_conv_sparse_conv_rulebook_transpose([0, 0], tf.zeros([0, 2], tf.int32), -1)


@pytest.mark.parametrize("fn", list(CONV_FNS.values()))
@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((np.zeros([2, 3]), [[0, 1], [0, 2]], np.zeros([3, 3, 3, 2]), [5]), {}, "kernel"),  # rank vs D
        ((np.zeros([2, 3]), [[0, 1], [0, 2]], np.zeros([3, 4, 2]), [5]), {}, "input channels"),
        ((np.zeros([2, 3]), [[0, 1], [0, 2]], np.zeros([3, 3, 2], np.float32), [5]), {}, "dtype"),
        ((np.zeros([2, 3, 1]), [[0, 1], [0, 2]], np.zeros([3, 3, 2]), [5]), {}, "features"),
        ((np.zeros([2, 3]), [[0, 1], [0, 2]], np.zeros([3, 3, 2]), [5]), {"strides": 2}, "strides"),
        ((np.zeros([2, 3]), [[0, 1, 1], [0, 2, 1]], np.zeros([3, 3, 2]), [5]), {}, "coords"),
        ((np.zeros([2, 3], np.int32), [[0, 1], [0, 2]], np.zeros([3, 3, 2]), [5]), {}, "features"),
    ],
)
def test_sparse_conv_python_checks(fn, args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)


@pytest.mark.parametrize("fn", list(CONV_FNS.values()))
def test_sparse_conv_bad_coords(fn):
    with pytest.raises(tf.errors.InvalidArgumentError, match="duplicate"):
        fn(np.zeros([2, 1]), [[0, 1], [0, 1]], np.zeros([3, 1, 1]), [5])
    with pytest.raises(tf.errors.InvalidArgumentError, match="spatial_shape"):
        fn(np.zeros([2, 1]), [[0, 1], [0, 5]], np.zeros([3, 1, 1]), [5])


# --- topk_sites ------------------------------------------------------------------------


def oracle_topk_rows(features, coords, k, score):
    f = np.asarray(features, np.float64)
    s = np.sqrt((f**2).sum(1)) if score == "l2" else np.abs(f).max(1, initial=0.0)
    s = np.where(np.isnan(f).any(1), np.nan, s)
    kept = []
    for b in np.unique(coords[:, 0]):
        rows = np.nonzero(coords[:, 0] == b)[0]
        key = sorted(rows, key=lambda r: (0 if np.isnan(s[r]) else 1, -s[r] if not np.isnan(s[r]) else 0, r))
        kept += key[:k]
    return np.array(sorted(kept), np.int64)


@pytest.mark.parametrize("impl", ["op", "reference"])
@pytest.mark.parametrize("score", ["l2", "abs_max"])
@pytest.mark.parametrize("k", [1, 3, 10, 1000])
def test_topk_sites_matches_oracle(library, rng, impl, score, k):
    n = 80
    features = rng.standard_normal((n, 4)).astype(np.float32)
    features[5] = features[9]  # ties -> lower row
    features[11] = features[12] = features[30]
    features[20, 2] = np.nan  # NaN ranks first
    coords = np.stack([rng.integers(0, 4, n), rng.integers(0, 50, n)], 1).astype(np.int32)  # unsorted batch
    expected = oracle_topk_rows(features, coords, k, score)
    if impl == "op":
        f, c = tsc.ops.topk_sites(features, coords, k, score)
        np.testing.assert_array_equal(c, coords[expected])
        np.testing.assert_array_equal(f, features[expected])
    else:
        np.testing.assert_array_equal(tsc.ops.topk_sites_rows_reference(features, coords, k, score), expected)


def test_topk_sites_sparse_batch_indices_and_dtypes(library, rng):
    coords = np.array([[7, 0], [1_000_000, 1], [7, 2], [3, 3], [1_000_000, 4]], np.int32)  # sort path
    for dtype in (np.float16, np.float32, np.float64):
        features = np.array([[1], [-3], [2], [0.5], [-4]], dtype)
        _, c = tsc.ops.topk_sites(features, coords, 1, "abs_max")
        np.testing.assert_array_equal(c[:, 1], [2, 3, 4])
    f, _ = tsc.ops.topk_sites(tf.constant(features, tf.bfloat16), coords, 1)
    assert f.dtype == tf.bfloat16


def test_topk_sites_gradient_and_empty(library, rng):
    features = rng.standard_normal((10, 3))
    coords = np.stack([np.repeat([0, 1], 5), np.arange(10)], 1).astype(np.int32)
    theoretical, numerical = tf.test.compute_gradient(
        lambda f: tsc.ops.topk_sites(f, coords, 2)[0], [features]
    )
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=1e-8)
    f, c = tsc.ops.topk_sites(np.zeros([0, 3], np.float32), np.zeros([0, 4], np.int32), 5)
    assert f.shape == (0, 3) and c.shape == (0, 4)


@pytest.mark.parametrize(
    "features,coords,k,match",
    [
        (np.zeros([2, 1]), [[0, 1], [0, 2]], 0, "k"),
        (np.zeros([2, 1]), [[-1, 1], [0, 2]], 1, "negative batch"),
        (np.zeros([3, 1]), [[0, 1], [0, 2]], 1, "rows"),
    ],
)
def test_topk_sites_bad_input(library, features, coords, k, match):
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=match):
        tsc.ops.topk_sites(features, coords, k)
    with pytest.raises(tf.errors.InvalidArgumentError):
        library.tf_sparse_conv_top_k_sites(features, coords, tf.constant(k))
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
        tsc.ops.topk_sites_rows_reference(features, coords, k)


def _sites_with_bad_row(value):
    """100 unique 1-D sites (b, x) in a grid of 40 (200 int32 values: enough for TensorFlow to
    run the op on the GPU instead of pinning it to the host), row 57 replaced by `value`."""
    coords = np.array([(b, x) for b in range(3) for x in range(40)][:100], np.int32)
    coords[57] = value
    return coords


@pytest.mark.skipif(not GPU_VISIBLE, reason="TensorFlow sees no GPU")
@pytest.mark.parametrize(
    "row,match",
    [
        ((-1, 3), r"coords\[57, 0\] = -1 is a negative batch index"),
        ((0, 40), r"coords\[57, 1\] = 40 is outside \[0, 40\)"),
        ((1, -2), r"coords\[57, 1\] = -2 is outside"),
        ((0, 3), "duplicate sites: rows 3 and 57"),
    ],
)
def test_gpu_rulebook_rejects_bad_coords(library, row, match):
    """The rulebook reads its counts back to the host anyway, so the GPU kernel checks the
    sites too (README, "Validation on GPU"): the CPU kernel's errors, from either device."""
    coords = _sites_with_bad_row(row)
    features = np.ones((100, 2), np.float32)
    for device in ("/CPU:0", "/GPU:0"):
        with tf.device(device):
            with pytest.raises(tf.errors.InvalidArgumentError, match=match):
                library.tf_sparse_conv_sparse_conv_rulebook(
                    tf.constant(coords), [40], kernel_size=[3], strides=[1], dilations=[1], submanifold=True
                )
            with pytest.raises(tf.errors.InvalidArgumentError, match=match):
                tsc.ops.sparse_conv(features, coords, np.ones((3, 2, 4), np.float32), [40])


@pytest.mark.skipif(not GPU_VISIBLE, reason="TensorFlow sees no GPU")
def test_gpu_topk_sites_rejects_negative_batch(library):
    coords = _sites_with_bad_row((-4, 7))
    features = np.arange(200, dtype=np.float32).reshape(100, 2)
    for device in ("/CPU:0", "/GPU:0"):
        with tf.device(device), pytest.raises(tf.errors.InvalidArgumentError, match=r"coords\[57, 0\] = -4"):
            tsc.ops.topk_sites(features, coords, 5)


def test_topk_sites_bad_score():
    with pytest.raises(ValueError, match="score"):
        tsc.ops.topk_sites(np.zeros([1, 1]), [[0, 0]], 1, score="l1")


# --- fuzz ------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_sparse_conv_vs_oracle(library, data):
    shape, ksize, strides, dilations, submanifold, batch, density = draw_sparse_conv(data, 5, 3, 2)
    cin, cout = data.draw(st.integers(1, 5), "cin"), data.draw(st.integers(1, 20), "cout")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1), "seed"))
    features, coords = sparse_input(rng, shape, batch, density, cin, np.float32)
    kernel = rng.standard_normal((*ksize, cin, cout)).astype(np.float32)
    out, out_coords, _ = tsc.ops.sparse_conv(features, coords, kernel, shape, strides, dilations, submanifold)
    expected, expected_coords = oracle_conv(features, coords, kernel, shape, strides, dilations, submanifold)
    np.testing.assert_array_equal(out_coords, expected_coords)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
