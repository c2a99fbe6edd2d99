"""GPU tests of the coordinate sparse convolution kernels (coord_sparse_conv_op_gpu.cu.cc).

Runs SparseConvFeatures and SparseConvKernelGrad through their ``extern "C"``
entry points (ctypes) on CuPy device memory and compares them with an
independent float64 NumPy reference written from the semantics in
``coord_sparse_launcher.h``: per kernel offset k, ``out[dst] +=
features[src] @ kernel[k]`` (``np.add.at``) and ``kernel_grad[k] =
features[src]^T grad[dst]`` over the offset's in-range pairs. Tolerances are
rigorous rounding-error bounds computed from the same reference on absolute
values (float accumulation for half / bfloat16, one final rounding).

Rulebooks are random (sorted dst per offset, empty offsets, duplicate dst
within an offset, out-of-range src / dst that must be skipped) or the
submanifold rulebook of random 3-D voxels. No TensorFlow needed. Skips (with
the reason) when nvcc, CuPy or a GPU is missing; the compile and
argument-checking tests only need nvcc, the reference self-tests nothing.
"""

import ctypes
from dataclasses import dataclass

import numpy as np
import pytest
from _common import (
    DTYPES,
    FORMATS,
    STORAGE,
    assert_close,
    assert_compiled,
    assert_guards,
    cupy,
    declare,
    dev_ptr,
    error_bound,
    garbage,
    guarded_array,
    time_ms,
    to_float64,
    to_storage,
)

# Kernel grad: extra terms for the partial sums of the thread groups (<= 32).
GROUP_TERMS = 64
ENTRY_POINTS = ("tsc_sparse_conv_features_gpu", "tsc_sparse_conv_kernel_grad_gpu")
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rulebook:
    """pair_ptr int32 [K + 1], pairs int32 [P, 2] rows (src, dst)."""

    pair_ptr: np.ndarray
    pairs: np.ndarray

    @property
    def num_offsets(self):
        return len(self.pair_ptr) - 1

    @property
    def num_pairs(self):
        return len(self.pairs)

    def offset(self, k):
        """(src, dst) int64 arrays of offset k."""
        p = self.pairs[self.pair_ptr[k] : self.pair_ptr[k + 1]].astype(np.int64)
        return p[:, 0], p[:, 1]

    def valid(self, k, n, num_out):
        """(src, dst) of offset k's in-range pairs."""
        src, dst = self.offset(k)
        ok = (src >= 0) & (src < n) & (dst >= 0) & (dst < num_out)
        return src[ok], dst[ok]


def make_rulebook(per_offset):
    """Rulebook from a list of (src, dst) arrays, one per offset."""
    counts = [len(s) for s, _ in per_offset]
    pair_ptr = np.zeros(len(per_offset) + 1, dtype=np.int32)
    pair_ptr[1:] = np.cumsum(counts, dtype=np.int64)
    if per_offset and sum(counts):
        pairs = np.stack(
            [
                np.concatenate([np.asarray(s, np.int64) for s, _ in per_offset]),
                np.concatenate([np.asarray(d, np.int64) for _, d in per_offset]),
            ],
            axis=1,
        ).astype(np.int32)
    else:
        pairs = np.zeros((0, 2), dtype=np.int32)
    return Rulebook(pair_ptr, pairs)


def random_rulebook(rng, num_offsets, n, num_out, density=0.3, dup=0.0, bad=0.0, empty=()):
    """Random rulebook with dst non-decreasing within every offset.

    Each output row gets a pair of offset k with probability `density`, and
    then further pairs with the same dst (duplicates) with probability `dup`
    each. A fraction `bad` of the pairs get an out-of-range src, and about
    as many out-of-range dst are added at both ends of the offset (negative
    first, >= num_out last, so the order holds). Offsets in `empty` have no
    pairs.
    """
    per_offset = []
    for k in range(num_offsets):
        if k in empty or num_out == 0:
            per_offset.append((np.zeros(0, np.int64), np.zeros(0, np.int64)))
            continue
        rows = np.flatnonzero(rng.random(num_out) < density)
        dst = np.repeat(rows, rng.geometric(1.0 - dup, size=rows.size))
        src = rng.integers(0, n, size=dst.size) if n > 0 else np.zeros(dst.size, np.int64)
        if bad > 0:
            wild = rng.random(dst.size) < bad
            choices = np.array([-1, -7, n, n + 5, INT32_MAX, INT32_MIN], dtype=np.int64)
            src[wild] = rng.choice(choices, size=int(wild.sum()))
            low = np.sort(rng.choice(np.array([INT32_MIN, -100, -1]), size=rng.binomial(dst.size, bad / 2)))
            high = np.sort(
                rng.choice(np.array([num_out, num_out + 3, INT32_MAX]), size=rng.binomial(dst.size, bad / 2))
            )
            dst = np.concatenate([low, dst, high])
            src = np.concatenate(
                [rng.integers(0, max(n, 1), low.size), src, rng.integers(0, max(n, 1), high.size)]
            )
        per_offset.append((src, dst))
    return make_rulebook(per_offset)


def submanifold_rulebook(rng, num_sites, extent, kernel=3):
    """Rulebook of a submanifold 3-D convolution of `num_sites` random voxels.

    Sites are distinct voxels of an extent^3 grid (one sample), in random
    order; offset k = (a, b, c) row-major over the kernel pairs output site j
    with the input site at coords[j] + (a, b, c) - kernel // 2. dst ascends
    within every offset.
    """
    keys = rng.choice(extent**3, size=num_sites, replace=False)
    coords = np.stack(np.unravel_index(keys, (extent,) * 3), axis=1)
    order = np.argsort(keys)
    sorted_keys = keys[order]
    per_offset = []
    half = kernel // 2
    for off in np.ndindex(kernel, kernel, kernel):
        nb = coords + np.array(off) - half
        inside = np.all((nb >= 0) & (nb < extent), axis=1)
        nb_key = np.ravel_multi_index(tuple(np.clip(nb, 0, extent - 1).T), (extent,) * 3)
        at = np.minimum(np.searchsorted(sorted_keys, nb_key), num_sites - 1)
        found = inside & (sorted_keys[at] == nb_key)
        dst = np.flatnonzero(found)
        per_offset.append((order[at[found]], dst))
    return make_rulebook(per_offset)


# ----------------------------------------------------------------------------
# Independent NumPy reference (float64)
# ----------------------------------------------------------------------------


def exact_matmul(a, b):
    """a @ b without BLAS: the products summed elementwise (exact IEEE propagation of inf / NaN)."""
    return (a[:, :, None] * b[None]).sum(axis=1)


def ref_features(features, kernel, rb, num_out, matmul=np.matmul):
    """out [num_out, cout]: out[dst] += features[src] @ kernel[k] over in-range pairs."""
    n = features.shape[0]
    out = np.zeros((num_out, kernel.shape[2]))
    for k in range(rb.num_offsets):
        src, dst = rb.valid(k, n, num_out)
        np.add.at(out, dst, matmul(features[src], kernel[k]))
    return out


def ref_kernel_grad(features, grad, rb, matmul=np.matmul):
    """[K, cin, cout]: kernel_grad[k] = features[src]^T grad[dst] over in-range pairs."""
    n, m = features.shape[0], grad.shape[0]
    kg = np.zeros((rb.num_offsets, features.shape[1], grad.shape[1]))
    for k in range(rb.num_offsets):
        src, dst = rb.valid(k, n, m)
        kg[k] = matmul(features[src].T, grad[dst])
    return kg


def dense_features(features, kernel, rb, num_out):
    """The same map as dense algebra: sum_k S_k @ features @ kernel[k]."""
    n = features.shape[0]
    out = np.zeros((num_out, kernel.shape[2]))
    for k in range(rb.num_offsets):
        s = np.zeros((num_out, n))
        src, dst = rb.valid(k, n, num_out)
        np.add.at(s, (dst, src), 1.0)
        out += s @ features @ kernel[k]
    return out


# ----------------------------------------------------------------------------
# Problems and comparison
# ----------------------------------------------------------------------------


class Problem:
    """Random operands of one rulebook and dtype, and their float64 references.

    features [n, cin], kernel [K, cin, cout], grad [num_out, cout], all
    rounded to the dtype first so that the reference sees exactly what the
    kernels see.
    """

    def __init__(self, rb, n, num_out, cin, cout, dtype, seed=0):
        rng = np.random.default_rng(seed)
        self.rb, self.n, self.num_out, self.cin, self.cout, self.dtype = rb, n, num_out, cin, cout, dtype
        self.f_s = to_storage(rng.standard_normal((n, cin)), dtype)
        self.k_s = to_storage(rng.standard_normal((rb.num_offsets, cin, cout)), dtype)
        self.g_s = to_storage(rng.standard_normal((num_out, cout)), dtype)
        self.refresh()

    def refresh(self):
        """Float64 views of the stored operands (after editing *_s)."""
        self.features = to_float64(self.f_s, self.dtype)
        self.kernel = to_float64(self.k_s, self.dtype)
        self.grad = to_float64(self.g_s, self.dtype)

    def pairs_per_row(self):
        """In-range pairs of every output row, over all offsets ([num_out, 1])."""
        counts = np.zeros(self.num_out, dtype=np.int64)
        for k in range(self.rb.num_offsets):
            counts += np.bincount(self.rb.valid(k, self.n, self.num_out)[1], minlength=self.num_out)
        return counts[:, None]

    def pairs_per_offset(self):
        """In-range pairs of every offset ([K, 1, 1])."""
        counts = [len(self.rb.valid(k, self.n, self.num_out)[0]) for k in range(self.rb.num_offsets)]
        return np.array(counts, dtype=np.int64).reshape(-1, 1, 1)

    def features_ref(self):
        abs_ref = ref_features(np.abs(self.features), np.abs(self.kernel), self.rb, self.num_out)
        bound = error_bound(abs_ref, self.cin + self.pairs_per_row(), self.dtype)
        return ref_features(self.features, self.kernel, self.rb, self.num_out), bound

    def kernel_grad_ref(self):
        abs_ref = ref_kernel_grad(np.abs(self.features), np.abs(self.grad), self.rb)
        bound = error_bound(abs_ref, self.pairs_per_offset() + GROUP_TERMS, self.dtype)
        return ref_kernel_grad(self.features, self.grad, self.rb), bound


# ----------------------------------------------------------------------------
# Calling the kernels
# ----------------------------------------------------------------------------


def _declare(lib):
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    sigs = {
        # format, features, n, kernel, K, cin, cout, pair_ptr, pairs, P, num_out, out, stream
        "tsc_sparse_conv_features_gpu": [ctypes.c_int, p, i64, p, i64, i64, i64, p, p, i64, i64, p, p],
        # format, features, n, grad, m, K, cin, cout, pair_ptr, pairs, P, kernel_grad, stream
        "tsc_sparse_conv_kernel_grad_gpu": [ctypes.c_int, p, i64, p, i64, i64, i64, i64, p, p, i64, p, p],
    }
    return declare(lib, sigs)


@pytest.fixture(scope="module")
def cs_lib(gpu_lib):
    return _declare(gpu_lib)


class Device:
    """A Problem's operands on the GPU and the two kernels on them."""

    def __init__(self, lib, prob):
        self.lib, self.prob = lib, prob
        self.features = cupy.asarray(prob.f_s)
        self.kernel = cupy.asarray(prob.k_s)
        self.grad = cupy.asarray(prob.g_s)
        self.pair_ptr = cupy.asarray(prob.rb.pair_ptr)
        self.pairs = cupy.asarray(prob.rb.pairs)
        self.fmt = FORMATS[prob.dtype]

    def _call(self, name, *args):
        stream = cupy.cuda.get_current_stream()
        err = getattr(self.lib, name)(self.fmt, *args, stream.ptr)
        assert err is None, err.decode()
        stream.synchronize()

    def _run(self, name, out_shape, operand, before, after, raw):
        """One kernel into a NaN-filled output: features, n, operand, *before, K, cin, cout,
        pair_ptr, pairs, P, *after, out (float64, or the storage with raw)."""
        p = self.prob
        out = garbage(out_shape, p.dtype)
        sizes = (p.rb.num_offsets, p.cin, p.cout)
        rulebook = (dev_ptr(self.pair_ptr), dev_ptr(self.pairs), p.rb.num_pairs)
        operands = (dev_ptr(self.features), p.n, dev_ptr(operand))
        self._call(name, *operands, *before, *sizes, *rulebook, *after, dev_ptr(out))
        host = cupy.asnumpy(out)
        return host if raw else to_float64(host, p.dtype)

    def run_features(self, raw=False):
        p = self.prob
        shape = (p.num_out, p.cout)
        return self._run("tsc_sparse_conv_features_gpu", shape, self.kernel, (), (p.num_out,), raw)

    def run_kernel_grad(self, raw=False):
        p = self.prob
        shape = (p.rb.num_offsets, p.cin, p.cout)
        return self._run("tsc_sparse_conv_kernel_grad_gpu", shape, self.grad, (p.num_out,), (), raw)


def check_all(lib, prob):
    dev = Device(lib, prob)
    assert_close("features", dev.run_features(), *prob.features_ref())
    assert_close("kernel_grad", dev.run_kernel_grad(), *prob.kernel_grad_ref())
    return dev


# ----------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    n: int
    num_out: int
    num_offsets: int
    cin: int
    cout: int
    density: float = 0.3
    dup: float = 0.0
    bad: float = 0.0
    empty: tuple = ()

    def problem(self, dtype, seed=None):
        seed = len(self.name) if seed is None else seed
        rng = np.random.default_rng(seed + 1000)
        rb = random_rulebook(
            rng, self.num_offsets, self.n, self.num_out, self.density, self.dup, self.bad, self.empty
        )
        return Problem(rb, self.n, self.num_out, self.cin, self.cout, dtype, seed=seed)


# The comments name the forward channel tile (TN) and the kernel-grad tile
# (TI x TJ) the launchers pick.
CASES = [
    Case("tiny_1x1", 5, 4, 3, 1, 1, density=0.7),  # TN 16, 16 x 16
    Case("cin3_cout32", 300, 250, 27, 3, 32),  # TN 32
    Case("cin32_cout3", 260, 300, 27, 32, 3),  # TN 16
    Case("c32_k9", 400, 500, 9, 32, 32),  # 16 x 16 (few tasks: halved)
    Case("c67", 200, 300, 8, 67, 67, empty=(2,)),  # 2 channel tiles, ragged
    Case("cin67_cout1", 150, 210, 5, 67, 1, density=0.5),
    Case("cin1_cout67", 150, 210, 5, 1, 67, density=0.5),
    Case("c256_k27", 120, 130, 27, 256, 256, density=0.1),  # TN 64, 64 x 64 tiles
    Case("c128_k4", 90, 100, 4, 128, 96, density=0.4),
    Case("empty_offsets", 100, 150, 10, 16, 16, empty=(0, 3, 4, 9)),
    Case("duplicates", 200, 180, 6, 19, 33, density=0.5, dup=0.5),  # several rounds per tile
    Case("long_runs", 300, 5, 3, 9, 20, density=1.0, dup=0.97),  # runs of ~30 pairs, > 1 per row tile
    Case("out_of_range", 250, 260, 9, 12, 40, density=0.4, bad=0.2),
    Case("out_of_range_dups", 120, 90, 4, 7, 70, density=0.6, dup=0.4, bad=0.3),
    Case("many_tiles", 3000, 2600, 27, 16, 64, density=0.15),  # multi-step block search
    Case("long_offsets", 5000, 40000, 2, 8, 8, density=0.9),  # ~36k pairs/offset: max groups
]


# ----------------------------------------------------------------------------
# Tests that need nothing but NumPy (the reference itself)
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES[:6] + [CASES[10], CASES[12]], ids=lambda c: c.name)
def test_reference_matches_dense_and_adjoint(case):
    """The reference against dense algebra; the kernel grad by adjointness."""
    prob = case.problem("float64", seed=3)
    out = ref_features(prob.features, prob.kernel, prob.rb, prob.num_out)
    dense = dense_features(prob.features, prob.kernel, prob.rb, prob.num_out)
    np.testing.assert_allclose(out, dense, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        out,
        ref_features(prob.features, prob.kernel, prob.rb, prob.num_out, exact_matmul),
        rtol=1e-12,
        atol=1e-12,
    )
    # out is linear in kernel: <out, grad> = <kernel, kernel_grad(features, grad)>.
    kg = ref_kernel_grad(prob.features, prob.grad, prob.rb)
    np.testing.assert_allclose(
        kg, ref_kernel_grad(prob.features, prob.grad, prob.rb, exact_matmul), atol=1e-12
    )
    np.testing.assert_allclose(
        float(np.sum(prob.kernel * kg)), float(np.sum(out * prob.grad)), rtol=1e-10, atol=1e-10
    )


def test_reference_skips_out_of_range_pairs():
    f = np.arange(6.0).reshape(3, 2)
    w = np.ones((2, 2, 1))
    rb = make_rulebook([([0, 1, 2, 7], [-1, 0, 0, 1]), ([-1, 2, 1, 0], [0, 1, 1, 5])])
    # offset 0: (1, 0), (2, 0) in range; offset 1: (2, 1), (1, 1).
    np.testing.assert_array_equal(ref_features(f, w, rb, 2), [[5.0 + 9.0], [9.0 + 5.0]])
    g = np.array([[1.0], [10.0]])
    np.testing.assert_array_equal(ref_kernel_grad(f, g, rb)[:, :, 0], [[6.0, 8.0], [60.0, 80.0]])


@pytest.mark.parametrize("case", [c for c in CASES if c.dup or c.bad or c.empty], ids=lambda c: c.name)
def test_random_rulebook_invariants(case):
    rb = case.problem("float32").rb
    assert rb.pair_ptr.dtype == np.int32 and rb.pairs.dtype == np.int32
    assert rb.pair_ptr[0] == 0 and rb.pair_ptr[-1] == rb.num_pairs
    assert np.all(np.diff(rb.pair_ptr) >= 0)
    for k in range(rb.num_offsets):
        src, dst = rb.offset(k)
        assert np.all(np.diff(dst) >= 0), k
        if k in case.empty:
            assert len(dst) == 0
    all_src, all_dst = rb.pairs[:, 0], rb.pairs[:, 1]
    if case.bad:
        assert np.any((all_src < 0) | (all_src >= case.n))
        assert np.any(all_dst < 0) and np.any(all_dst >= case.num_out)
    if case.dup:
        assert any(np.any(np.diff(rb.offset(k)[1]) == 0) for k in range(rb.num_offsets))


def test_submanifold_rulebook():
    rng = np.random.default_rng(0)
    rb = submanifold_rulebook(rng, 500, 12)
    assert rb.num_offsets == 27
    src, dst = rb.offset(13)  # the centre: every site with itself
    np.testing.assert_array_equal(src, np.arange(500))
    np.testing.assert_array_equal(dst, np.arange(500))
    for k in range(27):
        s, d = rb.offset(k)
        assert np.all(np.diff(d) > 0) and np.all((s >= 0) & (s < 500))
        # Offsets k and 26 - k are mirror images: the transposed pairs.
        s2, d2 = rb.offset(26 - k)
        assert sorted(zip(s.tolist(), d.tolist())) == sorted(zip(d2.tolist(), s2.tolist()))


# ----------------------------------------------------------------------------
# Tests that need nvcc only
# ----------------------------------------------------------------------------


def test_coord_sparse_kernels_compile(gpu_kernels_lib, tsc_gpu_build):
    """coord_sparse_conv_op_gpu.cu.cc is in the library with its entry points."""
    assert_compiled(gpu_kernels_lib, tsc_gpu_build, "coord_sparse_conv_op_gpu.cu.cc", ENTRY_POINTS)


def test_argument_errors(gpu_kernels_lib):
    """Invalid arguments are reported before any CUDA call (no GPU needed)."""
    lib = _declare(ctypes.CDLL(gpu_kernels_lib))
    fwd, kgrad = (getattr(lib, n) for n in ENTRY_POINTS)
    fake = 16  # a non-null pointer that is never dereferenced

    def features(fmt=2, n=4, k=3, cin=2, cout=5, p=6, num_out=7, out=fake, inputs=fake):
        return fwd(fmt, inputs, n, inputs, k, cin, cout, inputs, inputs, p, num_out, out, None)

    def kernel_grad(fmt=2, n=4, m=7, k=3, cin=2, cout=5, p=6, out=fake, inputs=fake):
        return kgrad(fmt, inputs, n, inputs, m, k, cin, cout, inputs, inputs, p, out, None)

    def expect(err, text):
        assert err is not None and text in err, err

    for call in (features, kernel_grad):
        expect(call(fmt=7), b"unknown float format")
        expect(call(fmt=-1), b"unknown float format")
        for dim in ("n", "k", "cin", "cout", "p"):
            expect(call(**{dim: -1}), b"negative dimension")
        expect(call(cin=2**40, n=2**40), b"too large")
        expect(call(out=None), b"is null")
        expect(call(inputs=None), b"null input")
    expect(features(num_out=-2), b"negative dimension")
    expect(kernel_grad(m=-2), b"negative dimension")
    expect(features(num_out=2**40, cout=2**40), b"too large")
    expect(kernel_grad(k=2**30, cin=2**20, cout=2**20), b"too large")
    # Nothing to write: success without touching CUDA (or the pointers).
    for fmt in range(4):
        assert features(fmt=fmt, num_out=0, out=None, inputs=None) is None
        assert features(fmt=fmt, cout=0, out=None, inputs=None) is None
        assert kernel_grad(fmt=fmt, k=0, out=None, inputs=None) is None
        assert kernel_grad(fmt=fmt, cin=0, out=None, inputs=None) is None
        assert kernel_grad(fmt=fmt, cout=0, out=None, inputs=None) is None


# ----------------------------------------------------------------------------
# GPU tests
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_coord_sparse(cs_lib, dtype, case):
    check_all(cs_lib, case.problem(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_submanifold_3d(cs_lib, dtype):
    rng = np.random.default_rng(11)
    rb = submanifold_rulebook(rng, 1500, 16)
    check_all(cs_lib, Problem(rb, 1500, 1500, 24, 40, dtype, seed=12))


def clamped_rulebook(pair_ptr, pairs):
    """The rulebook the kernels read from any pair_ptr: offset k's pairs are
    pairs[lo_k : max(lo_k, min(pair_ptr[k + 1], P))] with lo_k = clamp(pair_ptr[k], 0, P)."""
    p = len(pairs)
    per_offset = []
    for k in range(len(pair_ptr) - 1):
        lo = min(max(int(pair_ptr[k]), 0), p)
        hi = min(max(int(pair_ptr[k + 1]), lo), p)
        per_offset.append((pairs[lo:hi, 0], pairs[lo:hi, 1]))
    return make_rulebook(per_offset)


def run_guarded(lib, name, prob, pair_ptr, pairs, shape, *sizes):
    """One kernel on prob's operands with the given (possibly malformed) rulebook, the output
    between guard zones; returns its float64 values after checking the guards."""
    stream = cupy.cuda.get_current_stream()
    whole, out = guarded_array(shape, STORAGE[prob.dtype])
    f = cupy.asarray(prob.f_s)
    other = cupy.asarray(prob.k_s if name == "tsc_sparse_conv_features_gpu" else prob.g_s)
    d_ptr, d_pairs = cupy.asarray(pair_ptr), cupy.asarray(pairs)
    if name == "tsc_sparse_conv_features_gpu":  # n, kernel, K, cin, cout, ptr, pairs, P, num_out
        args = (prob.n, dev_ptr(other), len(pair_ptr) - 1, prob.cin, prob.cout)
        tail = (dev_ptr(d_ptr), dev_ptr(d_pairs), len(pairs), prob.num_out)
    else:  # n, grad, m, K, cin, cout, ptr, pairs, P
        args = (prob.n, dev_ptr(other), prob.num_out, len(pair_ptr) - 1, prob.cin, prob.cout)
        tail = (dev_ptr(d_ptr), dev_ptr(d_pairs), len(pairs))
    err = getattr(lib, name)(FORMATS[prob.dtype], dev_ptr(f), *args, *tail, out.data.ptr, stream.ptr)
    assert err is None, err.decode()
    stream.synchronize()
    assert_guards(name, whole)
    return to_float64(cupy.asnumpy(out), prob.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_malformed_pair_ptr_is_clamped(cs_lib, dtype):
    """pair_ptr is not checked on the GPU (README, "Validation on GPU"): a pair_ptr that does
    not start at 0, end at P or rise reads as clamped to [0, P] and non-decreasing, pairs out of
    range are skipped, and nothing is written outside the output (guard zones)."""
    rng = np.random.default_rng(21)
    n, num_out, num_pairs, k = 50, 40, 300, 6
    # dst ascending over all pairs, so any contiguous range is a valid offset.
    dst = np.sort(rng.integers(-5, num_out + 5, num_pairs))
    src = rng.integers(-3, n + 3, num_pairs)
    pairs = np.stack([src, dst], axis=1).astype(np.int32)
    good = np.linspace(0, num_pairs, k + 1).astype(np.int32)
    for pair_ptr in (
        good + 7,  # not starting at 0, ending past P
        good[::-1].copy(),  # decreasing
        good - 60,  # negative
        np.array([INT32_MIN, 0, INT32_MAX, 5, num_pairs, -1, 2 * num_pairs], np.int32),
    ):
        prob = Problem(clamped_rulebook(pair_ptr, pairs), n, num_out, 5, 7, dtype, seed=3)
        out = run_guarded(cs_lib, "tsc_sparse_conv_features_gpu", prob, pair_ptr, pairs, (num_out, 7))
        assert_close(f"features, pair_ptr {pair_ptr.tolist()}", out, *prob.features_ref())
        grad = run_guarded(cs_lib, "tsc_sparse_conv_kernel_grad_gpu", prob, pair_ptr, pairs, (k, 5, 7))
        assert_close(f"kernel_grad, pair_ptr {pair_ptr.tolist()}", grad, *prob.kernel_grad_ref())


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic(cs_lib, dtype):
    """Repeated runs are bitwise equal (no atomics, fixed summation order)."""
    for case in (CASES[10], CASES[11], CASES[13], CASES[15]):
        dev = Device(cs_lib, case.problem(dtype, seed=5))
        first_f = dev.run_features(raw=True)
        first_k = dev.run_kernel_grad(raw=True)
        for _ in range(3):
            np.testing.assert_array_equal(dev.run_features(raw=True), first_f)
            np.testing.assert_array_equal(dev.run_kernel_grad(raw=True), first_k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_stays_in_its_pairs(cs_lib, dtype):
    """inf in kernel[k] / a feature row reaches exactly the outputs of its pairs.

    Rows without a pair of offset k must not see kernel[k] at all (no
    0 * inf), and skipped (out-of-range) pairs contribute nothing.
    """
    case = Case("nonfinite", 80, 140, 5, 7, 70, density=0.3, dup=0.2, bad=0.2)
    prob = case.problem(dtype, seed=21)
    k_s = prob.k_s.copy()
    f_s = prob.f_s.copy()
    inf, minus_inf = to_storage([np.inf, -np.inf], dtype)
    k_s[2, 3, 5] = inf
    k_s[2, 0, 66] = inf
    k_s[4, 6, 1] = minus_inf
    f_s[prob.rb.valid(1, prob.n, prob.num_out)[0][0], 4] = inf  # a row offset 1 uses
    prob.k_s, prob.f_s = k_s, f_s
    prob.refresh()
    dev = Device(cs_lib, prob)
    with np.errstate(invalid="ignore"):  # inf - inf, 0 * inf in the reference
        wants = (
            ref_features(prob.features, prob.kernel, prob.rb, prob.num_out, exact_matmul),
            ref_kernel_grad(prob.features, prob.grad, prob.rb, exact_matmul),
        )
    gots = (dev.run_features(), dev.run_kernel_grad())
    for name, got, want in zip(("features", "kernel_grad"), gots, wants):
        finite = np.isfinite(want)
        assert (~finite).any() and finite.any(), name
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=name)
        np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want), err_msg=name)
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=name)
        # The finite entries as usual (bounds from the finite operands).
        clean = Problem(prob.rb, prob.n, prob.num_out, prob.cin, prob.cout, dtype, seed=21)
        ref, bound = clean.features_ref() if name == "features" else clean.kernel_grad_ref()
        assert_close(name, got[finite], ref[finite], bound[finite])


EMPTY_CASES = [
    # (name, n, num_out, cin, cout, rulebook builder)
    ("num_out0", 10, 0, 4, 3, lambda rng: make_rulebook([([1, 2], [0, 1]), ([], [])])),
    ("cout0", 10, 6, 4, 0, lambda rng: make_rulebook([([1, 2], [0, 1])])),
    ("cin0", 10, 6, 0, 3, lambda rng: make_rulebook([([1, 2], [0, 1]), ([3], [5])])),
    ("k0", 10, 6, 4, 3, lambda rng: make_rulebook([])),
    ("p0", 10, 6, 4, 3, lambda rng: make_rulebook([([], [])] * 4)),
    ("n0", 0, 6, 4, 3, lambda rng: make_rulebook([([0, 1], [0, 1]), ([-1, 0], [2, 2])])),
    (
        "all_out_of_range",
        10,
        6,
        4,
        3,
        lambda rng: make_rulebook([([10, -1, 3], [-5, 2, 6]), ([2], [INT32_MAX])]),
    ),
    ("all0", 0, 0, 0, 0, lambda rng: make_rulebook([])),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,n,num_out,cin,cout,build", EMPTY_CASES, ids=[c[0] for c in EMPTY_CASES])
def test_empty(cs_lib, dtype, name, n, num_out, cin, cout, build):
    # Outputs that have entries must come back as exact zeros.
    prob = Problem(build(np.random.default_rng(0)), n, num_out, cin, cout, dtype)
    dev = check_all(cs_lib, prob)
    for got in (dev.run_features(), dev.run_kernel_grad()):
        assert not np.any(got), name


def test_kernel_grad_zero_grad_rows(cs_lib):
    """m = 0 (grad has no rows): every pair is out of range, kernel_grad is 0."""
    prob = CASES[1].problem("float32")
    dev = Device(cs_lib, prob)
    kg = garbage((prob.rb.num_offsets, prob.cin, prob.cout), "float32")
    args = (dev_ptr(dev.features), prob.n, None, 0, prob.rb.num_offsets, prob.cin, prob.cout)
    dev._call(
        "tsc_sparse_conv_kernel_grad_gpu",
        *args,
        dev_ptr(dev.pair_ptr),
        dev_ptr(dev.pairs),
        prob.rb.num_pairs,
        dev_ptr(kg),
    )
    assert not np.any(cupy.asnumpy(kg))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_timing(cs_lib, dtype, capsys):
    """Prints kernel times (informative only; no assertion on speed)."""
    lines = []
    rng = np.random.default_rng(7)
    for sites, extent, cin, cout in ((200_000, 96, 64, 64), (200_000, 96, 16, 128), (50_000, 64, 256, 256)):
        rb = submanifold_rulebook(rng, sites, extent)
        prob = Problem(rb, sites, sites, cin, cout, dtype, seed=8)
        dev = Device(cs_lib, prob)
        out = cupy.empty((sites, cout), dtype=STORAGE[dtype])
        kg = cupy.empty((rb.num_offsets, cin, cout), dtype=STORAGE[dtype])
        stream = cupy.cuda.get_current_stream()
        common = (dev_ptr(dev.pair_ptr), dev_ptr(dev.pairs), rb.num_pairs)
        calls = {
            "features": (
                cs_lib.tsc_sparse_conv_features_gpu,
                (
                    dev_ptr(dev.features),
                    sites,
                    dev_ptr(dev.kernel),
                    rb.num_offsets,
                    cin,
                    cout,
                    *common,
                    sites,
                    dev_ptr(out),
                ),
            ),
            "kernel_grad": (
                cs_lib.tsc_sparse_conv_kernel_grad_gpu,
                (
                    dev_ptr(dev.features),
                    sites,
                    dev_ptr(dev.grad),
                    sites,
                    rb.num_offsets,
                    cin,
                    cout,
                    *common,
                    dev_ptr(kg),
                ),
            ),
        }
        parts = []
        for label, (f, operands) in calls.items():
            parts.append(f"{label} {time_ms(f, (FORMATS[dtype], *operands, stream.ptr), reps=5):.3f} ms")
        gmac = rb.num_pairs * cin * cout / 1e9
        lines.append(
            f"{dtype} sites={sites} P={rb.num_pairs} cin={cin} cout={cout} ({gmac:.2f} GMAC): "
            + ", ".join(parts)
        )
    with capsys.disabled():
        print("\n" + "\n".join(lines))
