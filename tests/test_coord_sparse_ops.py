"""Coordinate sparse maps: from_dense / to_dense and the convolution rulebook.

The rulebook is checked against a brute-force NumPy oracle written straight
from the dense definition (every output position, every kernel offset), and
that oracle against `tf.nn.convolution` itself with one-hot kernels.
"""

import itertools

import numpy as np
import pytest
import tensorflow as tf
from helpers import draw_sparse_conv, op_library, random_sites
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tf_sparseconv as tsc

# --- the oracle -------------------------------------------------------------------


def _geometry(shape, kernel, strides, dilations):
    out = [-(-n // s) for n, s in zip(shape, strides)]
    pad = [
        max((o - 1) * s + (k - 1) * d + 1 - n, 0) // 2
        for n, o, k, s, d in zip(shape, out, kernel, strides, dilations)
    ]
    return out, pad


def oracle_rulebook(coords, shape, kernel, strides, dilations, submanifold):
    """(out_coords, pair_ptr, pairs, out_shape) by brute force over the output grid."""
    coords = np.asarray(coords, np.int64).reshape(-1, 1 + len(shape))
    out_shape, pad = _geometry(shape, kernel, strides, dilations)
    site_row = {tuple(int(v) for v in r): i for i, r in enumerate(coords)}
    offsets = list(itertools.product(*[range(k) for k in kernel]))  # row-major

    def reads(b, o, taps):
        p = tuple(oi * s - pb + t * d for oi, s, pb, t, d in zip(o, strides, pad, taps, dilations))
        if all(0 <= pi < n for pi, n in zip(p, shape)):
            return site_row.get((b, *p))
        return None

    if submanifold:
        out_sites = [tuple(int(v) for v in r) for r in coords]
    else:
        batch = int(coords[:, 0].max()) + 1 if len(coords) else 0
        out_sites = [
            (b, *o)
            for b in range(batch)
            for o in itertools.product(*[range(n) for n in out_shape])
            if any(reads(b, o, t) is not None for t in offsets)
        ]
    per_offset = [[] for _ in offsets]
    for j, (b, *o) in enumerate(out_sites):
        for k, taps in enumerate(offsets):
            i = reads(b, o, taps)
            if i is not None:
                per_offset[k].append((i, j))
    ptr = np.cumsum([0] + [len(v) for v in per_offset])
    pairs = np.array([p for v in per_offset for p in v], np.int64).reshape(-1, 2)
    out_coords = np.array(out_sites, np.int64).reshape(-1, 1 + len(shape))
    return out_coords, ptr, pairs, np.array(out_shape)


def dense_rulebook(coords, shape, batch, kernel, strides, dilations):
    """Per offset, {(in_row, out_position)} from tf.nn.convolution with a one-hot kernel.

    TF has no strided dilated convolution, so a dilated kernel is spelled out
    as its undilated equivalent of size (k - 1) * d + 1 (same "SAME" padding).
    """
    coords = np.asarray(coords)
    dense = np.zeros([batch, *shape, 1], np.float32)
    dense[..., 0][tuple(coords.T)] = np.arange(1, len(coords) + 1)  # row + 1
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    result = []
    for taps in itertools.product(*[range(k) for k in kernel]):
        w = np.zeros([*span, 1, 1], np.float32)
        w[tuple(t * d for t, d in zip(taps, dilations))] = 1.0
        y = tf.nn.convolution(dense, w, strides=list(strides), padding="SAME").numpy()
        hits = np.argwhere(y[..., 0] > 0)
        result.append({(int(y[tuple(h)][0]) - 1, tuple(int(v) for v in h)) for h in hits})
    return result


def assert_rulebook(got, expected):
    out_coords, ptr, pairs, out_shape = (np.asarray(t) for t in got)
    e_coords, e_ptr, e_pairs, e_shape = expected
    np.testing.assert_array_equal(out_shape, e_shape)
    assert out_coords.dtype == ptr.dtype == pairs.dtype == np.int32
    np.testing.assert_array_equal(out_coords.reshape(e_coords.shape), e_coords)
    assert ptr.shape == e_ptr.shape
    for k in range(len(e_ptr) - 1):  # as sets per offset first (clearer failures)
        got_k = {tuple(p) for p in pairs[ptr[k] : ptr[k + 1]].tolist()}
        exp_k = {tuple(p) for p in e_pairs[e_ptr[k] : e_ptr[k + 1]].tolist()}
        assert got_k == exp_k, f"offset {k}: missing {exp_k - got_k}, extra {got_k - exp_k}"
    np.testing.assert_array_equal(ptr, e_ptr)
    np.testing.assert_array_equal(pairs.reshape(-1, 2), e_pairs)  # the documented order


# (spatial_shape, kernel_size, strides, dilations, batch, density)
CASES = [
    ((9,), (3,), (1,), (1,), 2, 0.4),
    ((10,), (2,), (2,), (1,), 3, 0.3),
    ((11,), (4,), (3,), (2,), 2, 0.3),
    ((7, 6), (3, 3), (1, 1), (1, 1), 2, 0.25),
    ((8, 9), (2, 3), (2, 1), (1, 2), 2, 0.2),
    ((6, 7), (3, 3), (3, 3), (1, 1), 1, 0.3),
    ((5, 5), (4, 4), (2, 2), (2, 2), 2, 0.3),
    ((5, 4, 6), (3, 3, 3), (1, 1, 1), (1, 1, 1), 2, 0.15),
    ((6, 5, 4), (2, 3, 2), (2, 2, 2), (1, 2, 1), 2, 0.15),
    ((4, 5, 5), (3, 3, 3), (3, 1, 2), (1, 1, 1), 1, 0.2),
    ((9, 8), (2, 3), (1, 1), (2, 1), 2, 0.3),  # symmetric (mirrored) with an even offset count
    ((7, 6, 5), (3, 1, 3), (1, 1, 1), (2, 1, 1), 2, 0.3),  # symmetric, dilated
]
MODES = [(c, sub) for c in CASES for sub in (True, False) if not (sub and max(c[2]) > 1)]
IDS = [f"{len(c[0])}d-{c[0]}-k{c[1]}-s{c[2]}-d{c[3]}-{'sub' if sub else 'reg'}" for c, sub in MODES]


@pytest.fixture(scope="module")
def library():
    return op_library()


@pytest.mark.parametrize("case,submanifold", MODES, ids=IDS)
def test_op_matches_oracle(library, rng, case, submanifold):
    shape, kernel, strides, dilations, batch, density = case
    coords = random_sites(rng, shape, batch, density)
    got = tsc.ops.sparse_conv_rulebook(coords, shape, kernel, strides, dilations, submanifold)
    assert_rulebook(got, oracle_rulebook(coords, shape, kernel, strides, dilations, submanifold))


@pytest.mark.parametrize("case,submanifold", MODES, ids=IDS)
def test_reference_matches_oracle(rng, case, submanifold):
    shape, kernel, strides, dilations, batch, density = case
    coords = random_sites(rng, shape, batch, density)
    got = tsc.ops.sparse_conv_rulebook_reference(coords, shape, kernel, strides, dilations, submanifold)
    assert_rulebook(got, oracle_rulebook(coords, shape, kernel, strides, dilations, submanifold))


@pytest.mark.parametrize(
    "case", [CASES[i] for i in (2, 4, 6, 8)], ids=lambda c: f"{c[0]}-k{c[1]}-s{c[2]}-d{c[3]}"
)
def test_oracle_matches_dense_convolution(rng, case):
    shape, kernel, strides, dilations, batch, density = case
    coords = random_sites(rng, shape, batch, density)
    out_coords, ptr, pairs, out_shape = oracle_rulebook(coords, shape, kernel, strides, dilations, False)
    dense = dense_rulebook(coords, shape, batch, kernel, strides, dilations)
    for k, expected in enumerate(dense):
        got = {(int(i), tuple(int(v) for v in out_coords[j])) for i, j in pairs[ptr[k] : ptr[k + 1]]}
        assert got == expected
    # Output sites are exactly the positions the dense convolution reaches.
    reached = sorted({pos for per in dense for _, pos in per})
    assert [tuple(r) for r in out_coords.tolist()] == reached


@pytest.mark.parametrize("submanifold", [True, False])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_empty_input(library, dims, submanifold):
    shape, kernel = (5,) * dims, (3,) * dims
    coords = np.zeros([0, 1 + dims], np.int32)
    strides = 1 if submanifold else 2
    for fn in (tsc.ops.sparse_conv_rulebook, tsc.ops.sparse_conv_rulebook_reference):
        out_coords, ptr, pairs, out_shape = fn(coords, shape, kernel, strides, 1, submanifold)
        assert out_coords.shape == (0, 1 + dims) and pairs.shape == (0, 2)
        np.testing.assert_array_equal(ptr, np.zeros(3**dims + 1))
        np.testing.assert_array_equal(out_shape, [-(-5 // strides)] * dims)


def test_deterministic_and_matches_reference_on_many_blocks(library, rng):
    shape, kernel = (24, 20, 22), (3, 3, 3)
    coords = random_sites(rng, shape, 2, 0.08)  # ~1700 sites: several work blocks
    for strides, sub in (((1, 1, 1), True), ((2, 2, 2), False), ((1, 1, 1), False)):
        runs = [
            tsc.ops.sparse_conv_rulebook(coords, shape, kernel, strides, (1, 2, 1), sub) for _ in range(3)
        ]
        for run in runs[1:]:
            for a, b in zip(runs[0], run):
                np.testing.assert_array_equal(a, b)
        ref = tsc.ops.sparse_conv_rulebook_reference(coords, shape, kernel, strides, (1, 2, 1), sub)
        for a, b in zip(runs[0], ref):
            np.testing.assert_array_equal(a, b)


def test_in_tf_function_static_shapes(library, rng):
    coords = random_sites(rng, (6, 6), 2, 0.3)

    @tf.function
    def f(c):
        return tsc.ops.sparse_conv_rulebook(c, [6, 6], 3, 2, 1, submanifold=False)

    out_coords, ptr, pairs, out_shape = f(tf.constant(coords))
    conc = f.get_concrete_function(tf.TensorSpec([None, 3], tf.int32)).structured_outputs
    assert conc[0].shape.as_list() == [None, 3] and conc[1].shape.as_list() == [10]
    assert conc[2].shape.as_list() == [None, 2] and conc[3].shape.as_list() == [2]
    assert_rulebook(
        (out_coords, ptr, pairs, out_shape), oracle_rulebook(coords, (6, 6), (3, 3), (2, 2), (1, 1), False)
    )


# --- from_dense / to_dense -----------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_from_dense_to_dense_round_trip(rng, dims):
    shape = (5, 4, 3)[:dims]
    x = rng.normal(size=(2, *shape, 3)).astype(np.float32)
    x *= rng.random((2, *shape, 1)) < 0.3
    features, coords = tsc.ops.from_dense(x)
    expected = np.argwhere(np.any(np.abs(x) > 0, axis=-1))
    np.testing.assert_array_equal(coords, expected)  # sorted by (b, spatial...)
    assert coords.dtype == tf.int32
    np.testing.assert_array_equal(features, x[tuple(expected.T)])
    np.testing.assert_array_equal(tsc.ops.to_dense(features, coords, shape, 2), x)


def test_from_dense_threshold_and_empty():
    x = np.zeros([1, 3, 3, 2], np.float32)
    x[0, 1, 2, 1] = -0.5
    x[0, 2, 0, 0] = 0.2
    features, coords = tsc.ops.from_dense(x, threshold=0.3)
    np.testing.assert_array_equal(coords, [[0, 1, 2]])
    np.testing.assert_array_equal(features, [[0.0, -0.5]])
    features, coords = tsc.ops.from_dense(np.zeros([2, 4, 4, 3], np.float32))
    assert features.shape == (0, 3) and coords.shape == (0, 3)
    dense = tsc.ops.to_dense(features, coords, [4, 4], 2)
    np.testing.assert_array_equal(dense, np.zeros([2, 4, 4, 3]))


def test_to_dense_gradient():
    features = tf.constant([[1.0, 2.0], [3.0, 4.0]])
    coords = tf.constant([[0, 1], [1, 0]])
    with tf.GradientTape() as tape:
        tape.watch(features)
        y = tf.reduce_sum(tsc.ops.to_dense(features, coords, [3], 2) * 2.0)
    np.testing.assert_array_equal(tape.gradient(y, features), np.full([2, 2], 2.0))


@pytest.mark.parametrize(
    "features,coords,shape,batch,match",
    [
        (np.zeros([2, 1]), [[0, 1], [0, 3]], [3], 1, "coords"),
        (np.zeros([2, 1]), [[0, 1], [-1, 0]], [3], 1, "coords"),
        (np.zeros([2, 1]), [[0, 1], [1, 0]], [3], 1, "batch_size"),
    ],
)
def test_to_dense_bad_values(features, coords, shape, batch, match):
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
        tsc.ops.to_dense(np.asarray(features, np.float32), coords, shape, batch)


def test_to_dense_bad_arguments():
    f = np.zeros([2, 1], np.float32)
    with pytest.raises(ValueError, match="features"):
        tsc.ops.to_dense(f, [[0, 1]], [3], 1)
    with pytest.raises(ValueError, match="coords"):
        tsc.ops.to_dense(f, [[0, 1, 1], [0, 0, 0]], [3], 1)
    with pytest.raises(ValueError, match="spatial_shape"):
        tsc.ops.to_dense(f, [[0, 1], [0, 0]], [3, 3, 3, 3], 1)
    with pytest.raises(ValueError, match="batch_size"):
        tsc.ops.to_dense(f, [[0, 1], [0, 0]], [3], -1)
    with pytest.raises(ValueError, match="x"):
        tsc.ops.from_dense(np.zeros([2, 3], np.float32))


# --- bad input ---------------------------------------------------------------------


def _raw(library, coords, shape, kernel=(3,), strides=(1,), dilations=(1,), submanifold=True):
    return library.tf_sparse_conv_sparse_conv_rulebook(
        tf.constant(coords, tf.int32, shape=np.shape(coords)),
        tf.constant(shape, tf.int32, shape=np.shape(shape)),
        kernel_size=list(kernel),
        strides=list(strides),
        dilations=list(dilations),
        submanifold=submanifold,
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"coords": [0, 1], "shape": [4]}, "coords"),  # rank 1
        ({"coords": [[0, 1, 1]], "shape": [4]}, "coords"),  # width != 1 + D
        ({"coords": [[0, 1]], "shape": [[4]]}, "spatial_shape"),
        ({"coords": [[0, 1, 1, 1, 1]], "shape": [4, 4, 4, 4], "kernel": (3,) * 4}, "kernel_size"),
        ({"coords": [[0, 1, 1, 1, 1]], "shape": [4, 4, 4, 4]}, "spatial_shape"),  # D = 4
        ({"coords": [[0, 1, 1]], "shape": [4, 4]}, "spatial_shape"),  # D != len(kernel_size)
        ({"coords": [[-1, 1]], "shape": [4]}, "coords.*negative batch"),
        ({"coords": [[0, 4]], "shape": [4]}, r"coords\[0, 1\].*outside"),
        ({"coords": [[0, 1], [0, -1]], "shape": [4]}, r"coords\[1, 1\].*outside"),
        ({"coords": [[0, 1], [1, 1], [0, 1]], "shape": [4]}, "coords has duplicate sites: rows 0 and 2"),
        ({"coords": [[0, 1]], "shape": [0]}, "spatial_shape must be positive"),
        ({"coords": [[0, 1]], "shape": [4], "kernel": (0,)}, "kernel_size must be positive"),
        ({"coords": [[0, 1]], "shape": [4], "strides": (1, 1)}, "same length"),
        ({"coords": [[0, 1]], "shape": [4], "dilations": (0,)}, "dilations must be positive"),
        ({"coords": [[0, 1]], "shape": [4], "strides": (2,)}, "strides must be all 1"),
    ],
)
def test_op_rejects_bad_input(library, kwargs, match):
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
        _raw(library, **kwargs)


def test_op_accepts_regular_stride(library):
    out = _raw(library, [[0, 2]], [4], strides=(2,), submanifold=False)  # read by o = 0 and 1
    np.testing.assert_array_equal(out[0], [[0, 0], [0, 1]])


@pytest.mark.parametrize("fn", [tsc.ops.sparse_conv_rulebook, tsc.ops.sparse_conv_rulebook_reference])
@pytest.mark.parametrize(
    "coords,match",
    [([[-1, 1]], "batch"), ([[0, 5]], "spatial_shape"), ([[0, 1], [0, 1]], "duplicate")],
)
def test_bad_values_raise_invalid_argument(fn, coords, match):
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
        fn(np.asarray(coords, np.int32), [5], 3)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        (([[0, 1]], [5], 3), {"strides": 2}, "strides"),  # submanifold needs stride 1
        (([[0, 1]], [5], (3, 3)), {}, "kernel_size"),
        (([[0, 1]], [5], 0), {}, "kernel_size"),
        (([[0, 1]], [5], 3), {"strides": 0, "submanifold": False}, "strides"),
        (([[0, 1]], [5], 3), {"dilations": (1, 1)}, "dilations"),
        (([[0, 1, 1]], [5], 3), {}, "coords"),
        (([[0.0, 1.0]], [5], 3), {}, "coords"),
        (([[0, 1, 1, 1, 1]], [5, 5, 5, 5], 3), {}, "spatial_shape"),
        (([[0, 1]], [0], 3), {}, "spatial_shape"),
        (([[0, 1]], [5], 3), {"submanifold": "yes"}, "submanifold"),
    ],
)
def test_python_checks(args, kwargs, match):
    for fn in (tsc.ops.sparse_conv_rulebook, tsc.ops.sparse_conv_rulebook_reference):
        with pytest.raises(ValueError, match=match):
            fn(*args, **kwargs)


def test_no_gradient_registered(library):
    from tensorflow.python.framework import ops as tf_ops

    with tf.Graph().as_default():
        out = tsc.ops.sparse_conv_rulebook(tf.constant([[0, 1], [0, 2]]), [4], 3)
        assert tf_ops.get_gradient_function(out[0].op) is None  # registered as not differentiable


# --- fuzz ------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_op_vs_oracle(library, data):
    shape, kernel, strides, dilations, submanifold, batch, density = draw_sparse_conv(data, 6, 4, 3)
    seed = data.draw(st.integers(0, 2**31 - 1), "seed")
    coords = random_sites(np.random.default_rng(seed), shape, batch, density)
    expected = oracle_rulebook(coords, shape, kernel, strides, dilations, submanifold)
    assert_rulebook(
        tsc.ops.sparse_conv_rulebook(coords, shape, kernel, strides, dilations, submanifold), expected
    )


def test_op_rejects_huge_kernel(library):
    with pytest.raises(tf.errors.InvalidArgumentError, match="kernel_size"):
        _raw(
            library,
            [[0, 1, 1, 1]],
            [4, 4, 4],
            kernel=(2000, 2000, 2000),
            strides=(1,) * 3,
            dilations=(1,) * 3,
        )
