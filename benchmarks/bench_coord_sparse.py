"""Coordinate (site-sparse) submanifold convolution vs tf.nn.conv3d on the dense grid.

Every case: a submanifold 3x3x3 convolution, 32 -> 32 channels, float32, batch 1,
on a cubic grid of side L. The sites are surface-like: points sampled on the
surfaces of random shapes (spheres, boxes, tori, cylinders; random sizes,
positions and rotations, fixed seed) voxelised on the grid, shape after shape,
until exactly `round(occupancy * L^3)` sites are active (the last shape is cut
to the count). This is what a voxelised point cloud looks like: a site has
~12-14 active neighbours in its 3x3x3 window (the notes give the rulebook
pairs per site, centre included), not ~0.3 as uniformly random sites at 1 %.

Rows (ratios are stock / ours, median wall times, alternated in one process):

* forward, `L^3` at several occupancies: ours = `tsc.ops.sparse_conv` in a
  `tf.function`, *including* the rulebook computation; stock = `tf.nn.conv3d`
  ("SAME") on the dense `[1, L, L, L, 32]` input (already dense: building it is
  not timed). Each case is first checked against the dense result at the
  sites. The note gives the rulebook's share: the rulebook op and
  `sparse_conv_features` on a precomputed rulebook, timed alternately, share =
  rulebook / (rulebook + features); also the number of rulebook pairs P (with
  the centre tap) per site and the tensor-byte memory of both sides.
* forward + backward: ours = `sparse_conv` and its gradients w.r.t. features
  and kernel (rulebook included); stock = `tf.nn.conv3d` and its gradients
  w.r.t. input and filter.
* GEMM efficiency ("useful FLOP rate"): ours = `sparse_conv_features` alone on
  a precomputed rulebook, which does 2 * P * Cin * Cout useful FLOPs, called
  GEMM_REPEAT times in a while loop inside one tf.function (the op's own time:
  one tf.function call costs ~0.3-1 ms of Python and runtime overhead on this
  machine, more than the op at 1 %); "stock" = the time a dense float32
  `tf.matmul` (2048 x 2048 @ 2048 x 2048, in a `tf.function`) needs for that
  many FLOPs, i.e. `2 P Cin Cout / matmul_rate`. The ratio stock / ours is
  therefore our useful FLOP rate as a fraction of the machine's dense matmul
  rate (target 0.35), timed in alternating blocks.
* a 4-layer stack (4 x (submanifold conv + relu) at one resolution in one
  tf.function, one shared rulebook, as `SparseConv3D` layers do) vs 4 x dense
  conv3d + relu: the per-layer cost in a network, where the call overhead and the
  rulebook are shared; the note gives the cost of an empty tf.function call.
* peak memory (64^3 at 1 %, 32^3 with --quick, forward; not a `Row` because its unit is bytes,
  printed as a separate table and summarised in the note of that forward row):
  (a) tensor bytes: sparse = features + coords + rulebook (out_coords, pair_ptr,
  pairs) + output; dense = dense input + dense output; (b) measured: the rise of
  the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) while a
  fresh subprocess, already warmed up on a tiny input, creates its inputs from
  the compact site list (sparse: the feature tensor; dense: the feature tensor
  scattered into the dense grid) and runs one forward call; the median of 3
  such processes per side (1 with --quick).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import tensorflow as tf

import tf_sparseconv as tsc
from benchmarks.common import Row, _sync, time_pair

C = 32
KSIZE = 3
FAMILY = "coord sparse_conv"


# --- surface-like sites ---------------------------------------------------------------


def _rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _count(area: float, density: float = 8.0) -> int:
    return max(16, math.ceil(area * density))


def _sphere(rng, size: int) -> np.ndarray:
    r = rng.uniform(size / 16, size / 5)
    u = rng.standard_normal((_count(4 * math.pi * r * r), 3))
    return r * u / np.linalg.norm(u, axis=1, keepdims=True)


def _box(rng, size: int) -> np.ndarray:
    h = rng.uniform(size / 16, size / 5, 3)
    areas = np.array([h[1] * h[2], h[0] * h[2], h[0] * h[1]]) * 8  # both faces per axis
    n = _count(areas.sum())
    p = rng.uniform(-1, 1, (n, 3)) * h
    axis = rng.choice(3, n, p=areas / areas.sum())
    p[np.arange(n), axis] = h[axis] * rng.choice([-1.0, 1.0], n)
    return p


def _torus(rng, size: int) -> np.ndarray:
    big = rng.uniform(size / 10, size / 5)
    small = rng.uniform(size / 32, big / 2)
    n = _count(4 * math.pi**2 * big * small * (big + small) / big)  # before rejection
    u, v = rng.uniform(0, 2 * math.pi, (2, n))
    keep = rng.uniform(0, 1, n) < (big + small * np.cos(v)) / (big + small)  # uniform on the surface
    u, v = u[keep], v[keep]
    ring = big + small * np.cos(v)
    return np.stack([ring * np.cos(u), ring * np.sin(u), small * np.sin(v)], 1)


def _cylinder(rng, size: int) -> np.ndarray:
    r = rng.uniform(size / 16, size / 6)
    h = rng.uniform(size / 16, size / 4)  # half height
    side, cap = 4 * math.pi * r * h, math.pi * r * r
    n = _count(side + 2 * cap)
    t = rng.uniform(0, 2 * math.pi, n)
    on_side = rng.uniform(0, side + 2 * cap, n) < side
    rad = np.where(on_side, r, r * np.sqrt(rng.uniform(0, 1, n)))
    z = np.where(on_side, rng.uniform(-h, h, n), h * rng.choice([-1.0, 1.0], n))
    return np.stack([rad * np.cos(t), rad * np.sin(t), z], 1)


SHAPES = (_sphere, _box, _torus, _cylinder)


def surface_sites(size: int, occupancy: float, seed: int = 0) -> np.ndarray:
    """int32 `[N, 4]` sites `(0, x, y, z)`, sorted, N = round(occupancy * size^3)."""
    rng = np.random.default_rng(seed)
    target = round(occupancy * size**3)
    occupied = np.zeros(size**3, bool)
    count = 0
    while count < target:
        shape = SHAPES[rng.integers(len(SHAPES))]
        points = shape(rng, size) @ _rotation(rng).T + rng.uniform(0.15 * size, 0.85 * size, 3)
        cells = np.floor(points).astype(np.int64)
        cells = cells[np.all((cells >= 0) & (cells < size), axis=1)]
        flat = np.unique(np.ravel_multi_index(cells.T, (size,) * 3))
        new = flat[~occupied[flat]][: target - count]
        occupied[new] = True
        count += new.size
    xyz = np.stack(np.unravel_index(np.flatnonzero(occupied), (size,) * 3), 1)
    return np.concatenate([np.zeros((len(xyz), 1), np.int64), xyz], 1).astype(np.int32)


# --- the computations ------------------------------------------------------------------


def _functions(size: int):
    shape = [size] * 3

    @tf.function(jit_compile=False)
    def ours(features, coords, kernel, dense):
        del dense  # the arguments of both sides are the same (time_pair)
        return tsc.ops.sparse_conv(features, coords, kernel, shape)[0]

    @tf.function(jit_compile=False)
    def stock(features, coords, kernel, dense):
        del features, coords
        return tf.nn.conv3d(dense, kernel, [1] * 5, "SAME")

    @tf.function(jit_compile=False)
    def rulebook(features, coords, kflat, pair_ptr, pairs):
        del features, kflat, pair_ptr, pairs
        # One output (the op computes all four): the timing syncs each output it returns.
        return tsc.ops.sparse_conv_rulebook(coords, shape, KSIZE)[2]

    @tf.function(jit_compile=False)
    def gemm(features, coords, kflat, pair_ptr, pairs):
        del coords
        return tsc.ops.sparse_conv_features(features, kflat, pair_ptr, pairs, tf.shape(features)[0])

    @tf.function(jit_compile=False)
    def ours_fb(features, coords, kernel, dy, dense, dense_dy):
        del dense, dense_dy
        with tf.GradientTape() as tape:
            tape.watch([features, kernel])
            out = tsc.ops.sparse_conv(features, coords, kernel, shape)[0]
        return tape.gradient(out, [features, kernel], output_gradients=dy)

    @tf.function(jit_compile=False)
    def stock_fb(features, coords, kernel, dy, dense, dense_dy):
        del features, coords, dy
        with tf.GradientTape() as tape:
            tape.watch([dense, kernel])
            out = tf.nn.conv3d(dense, kernel, [1] * 5, "SAME")
        return tape.gradient(out, [dense, kernel], output_gradients=dense_dy)

    return ours, stock, rulebook, gemm, ours_fb, stock_fb


# Calls of the GEMM op per tf.function call in the efficiency rows: the op's own speed,
# not the ~0.3-1 ms that one tf.function call costs on this machine (measured and printed).
GEMM_REPEAT = 20


def _gemm_loop():
    """sparse_conv_features GEMM_REPEAT times inside one tf.function (a while loop over
    slightly different features, so nothing is hoisted or deduplicated)."""

    @tf.function(jit_compile=False)
    def run(features, coords, kflat, pair_ptr, pairs):
        del coords
        n = tf.shape(features)[0]

        def body(i, total):
            shifted = features + tf.cast(i, features.dtype) * 1e-7
            out = tsc.ops.sparse_conv_features(shifted, kflat, pair_ptr, pairs, n)
            return i + 1, total + out[0, 0]

        return tf.while_loop(lambda i, _: i < GEMM_REPEAT, body, (0, tf.constant(0.0)))[1]

    return run


def _stack(size: int, layers: int):
    """`layers` submanifold convs in one tf.function: ours share one rulebook (as the
    SparseConv3D layers at one resolution do); stock: the same number of dense conv3d."""
    shape = [size] * 3

    @tf.function(jit_compile=False)
    def ours(features, coords, kernel, dense):
        del dense
        rulebook = tsc.ops.Rulebook(*tsc.ops.sparse_conv_rulebook(coords, shape, KSIZE))
        h = features
        for _ in range(layers):
            h = tf.nn.relu(tsc.ops.sparse_conv(h, coords, kernel, shape, rulebook=rulebook)[0])
        return h

    @tf.function(jit_compile=False)
    def stock(features, coords, kernel, dense):
        del features, coords
        h = dense
        for _ in range(layers):
            h = tf.nn.relu(tf.nn.conv3d(h, kernel, [1] * 5, "SAME"))
        return h

    return ours, stock


def _call_overhead(features, coords, kernel, dense) -> float:
    """Median ms of one call of a tf.function that does (almost) nothing with the same arguments."""

    @tf.function(jit_compile=False)
    def nothing(features, coords, kernel, dense):
        del coords, kernel, dense
        return features[:1]

    return time_pair(nothing, nothing, features, coords, kernel, dense, repeat=21)[0]


def _inputs(size: int, occupancy: float):
    coords_np = surface_sites(size, occupancy)
    rng = np.random.default_rng(1)
    features = tf.constant(rng.standard_normal((len(coords_np), C)).astype(np.float32))
    kernel = tf.constant((rng.standard_normal((KSIZE,) * 3 + (C, C)) * 0.05).astype(np.float32))
    coords = tf.constant(coords_np)
    dense = tsc.ops.to_dense(features, coords, [size] * 3, 1)
    return features, coords, kernel, dense


def _time_warm_pair(ours, stock, *args, blocks: int = 7, inner: int = 6) -> tuple[float, float]:
    """Median ms of `ours(*args)` and `stock(*args)` in their steady state (warm caches
    and threads) while alternating blocks of calls, so that both see the same machine
    state: each block runs `ours` `inner` times (the first, right after `stock`, is
    not counted) and then `stock` once."""
    times: tuple[list, list] = ([], [])
    for block in range(blocks + 1):  # block 0: warm-up
        for i in range(inner):
            start = time.perf_counter()
            _sync(ours(*args))
            if block and i:
                times[0].append(time.perf_counter() - start)
        start = time.perf_counter()
        _sync(stock(*args))
        if block:
            times[1].append(time.perf_counter() - start)
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3


def _matmul(n: int = 2048):
    """(fn, flops): fn(*ignored) runs a dense float32 n x n @ n x n tf.matmul (tf.function)."""
    a = tf.random.stateless_normal([n, n], seed=[5, 6])
    b = tf.random.stateless_normal([n, n], seed=[7, 8])

    @tf.function(jit_compile=False)
    def matmul(*args):
        del args  # same arguments as the op it alternates with (time_pair)
        return tf.matmul(a, b)

    return matmul, 2 * n**3


def _tensor_bytes(n_sites: int, n_pairs: int, size: int) -> tuple[int, int]:
    """Bytes of the tensors alive at the end of a forward call: (sparse, dense)."""
    sparse = (
        n_sites * C * 4  # features
        + n_sites * 4 * 4  # coords
        + n_sites * 4 * 4  # out_coords
        + (KSIZE**3 + 1) * 4  # pair_ptr
        + n_pairs * 2 * 4  # pairs
        + n_sites * C * 4  # output
    )
    dense = 2 * size**3 * C * 4  # dense input + dense output
    return sparse, dense


# --- peak memory in a fresh process ----------------------------------------------------


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _memory_child(kind: str, size: int, occupancy: float) -> dict:
    """Runs in a subprocess: peak-RSS rise (bytes) of building the inputs + one forward call."""
    coords_np = surface_sites(size, occupancy)
    n = len(coords_np)
    shape = [size] * 3
    kernel = tf.constant(np.full((KSIZE,) * 3 + (C, C), 0.01, np.float32))

    if kind == "sparse":

        @tf.function(
            jit_compile=False,
            input_signature=[tf.TensorSpec([None, C]), tf.TensorSpec([None, 4], tf.int32)],
        )
        def step(features, coords):
            return tsc.ops.sparse_conv(features, coords, kernel, shape)[0]

        def run(rows, seed):
            features = tf.random.stateless_normal([rows, C], seed=[seed, 0])
            return step(features, tf.constant(coords_np[:rows]))

    else:

        @tf.function(jit_compile=False, input_signature=[tf.TensorSpec([1, None, None, None, C])])
        def step(dense):
            return tf.nn.conv3d(dense, kernel, [1] * 5, "SAME")

        def run(rows, seed):
            features = tf.random.stateless_normal([rows, C], seed=[seed, 0])
            if rows == n:
                coords, grid = coords_np, shape
            else:  # warm-up: a few sites on the diagonal of a tiny grid
                coords = np.arange(rows, dtype=np.int32)[:, None] % 8 * np.array([0, 1, 1, 1], np.int32)
                grid = [8] * 3
            return step(tsc.ops.to_dense(features, tf.constant(coords), grid, 1))

    for _ in range(2):  # warm-up: traces, thread pools, kernel caches on a tiny input
        run(8, 1).numpy()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _status_kb("VmRSS")
    out = run(n, 2)
    out.numpy()
    peak = _status_kb("VmHWM")
    return {"kind": kind, "sites": n, "peak_rise_bytes": (peak - base) * 1024, "out_shape": list(out.shape)}


def measure_peak_memory(size: int, occupancy: float, repeat: int = 3) -> dict:
    """{kind: peak-RSS rise in bytes}, the median over `repeat` fresh subprocesses
    (None where one failed, e.g. without /proc/self/clear_refs)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    result = {}
    for kind in ("sparse", "dense"):
        cmd = [sys.executable, "-m", "benchmarks.bench_coord_sparse", "--memory-child", kind]
        cmd += [str(size), str(occupancy)]
        values = []
        try:
            for _ in range(repeat):
                proc = subprocess.run(
                    cmd, check=False, cwd=root, env=env, capture_output=True, text=True, timeout=300
                )
                line = [s for s in proc.stdout.splitlines() if s.startswith("{")][-1]
                values.append(json.loads(line)["peak_rise_bytes"])
            result[kind] = statistics.median(values)
        except (subprocess.SubprocessError, IndexError, ValueError, KeyError):
            result[kind] = None
    return result


# --- the family ------------------------------------------------------------------------


def _check(ours, stock, args, coords) -> float:
    """Max abs difference between ours and the dense conv at the sites."""
    dense_out = tf.gather_nd(stock(*args), coords)
    err = float(tf.reduce_max(tf.abs(ours(*args) - dense_out)))
    if not err < 1e-3:
        raise AssertionError(f"sparse_conv differs from tf.nn.conv3d by {err}")
    return err


def _mb(nbytes) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.2f} MB"


def run(quick: bool = False) -> list[Row]:
    small, big = (32, 64) if quick else (64, 128)
    occupancies = (0.01, 0.05) if quick else (0.005, 0.01, 0.02, 0.05, 0.1)
    targets = {0.01: 30.0, 0.05: 8.0}
    matmul, matmul_flops = _matmul()
    configs = [(small, occ) for occ in occupancies] + [(big, 0.005)]
    rows, gemm_rows, curve, summary, rates = [], [], [], [], []
    memory = None
    for size, occ in configs:
        features, coords, kernel, dense = _inputs(size, occ)
        ours, stock, rulebook, gemm, _, _ = _functions(size)
        args = (features, coords, kernel, dense)
        _check(ours, stock, args, coords)
        reps = {"warmup": 1, "repeat": 7} if size >= 128 else {"repeat": 15}
        ours_ms, stock_ms = time_pair(ours, stock, *args, **reps)

        _, pair_ptr, pairs, _ = tsc.ops.sparse_conv_rulebook(coords, [size] * 3, KSIZE)
        kflat = tf.reshape(kernel, [KSIZE**3, C, C])
        parts = (features, coords, kflat, pair_ptr, pairs)
        rb_ms, gemm_ms = time_pair(rulebook, gemm, *parts, warmup=3, repeat=21)
        share = rb_ms / (rb_ms + gemm_ms)
        n, p = int(coords.shape[0]), int(pairs.shape[0])
        flops = 2 * p * C * C
        sparse_bytes, dense_bytes = _tensor_bytes(n, p, size)
        case = f"[1, {size}, {size}, {size}, {C}] -> {C}, 3x3x3 submanifold, surface {occ:.1%} ({n} sites)"
        note = (
            f"rulebook {share:.0%} (rulebook {rb_ms:.2f} ms, GEMM part {gemm_ms:.2f} ms, timed apart); "
            f"{p} pairs ({p / n:.1f}/site); tensor bytes {_mb(sparse_bytes)} vs {_mb(dense_bytes)} dense"
        )
        if size == small and occ == 0.01:
            memory = measure_peak_memory(size, occ, repeat=1 if quick else 3)
            memory["tensor_sparse"], memory["tensor_dense"] = sparse_bytes, dense_bytes
            if memory["sparse"] and memory["dense"]:
                ratio = memory["dense"] / memory["sparse"]
                note += (
                    f"; peak-RSS rise {_mb(memory['sparse'])} vs {_mb(memory['dense'])} dense = "
                    f"{ratio:.0f}x lower (target 20x: {'met' if ratio >= 20 else 'NOT met'})"
                )
        rows.append(
            Row(
                FAMILY,
                f"{case}, forward (rulebook included)",
                ours_ms,
                stock_ms,
                f"tf.nn.conv3d on the dense [1, {size}, {size}, {size}, {C}]",
                target=targets.get(occ) if size == small else None,
                note=note,
            )
        )
        efficiency = None
        if occ in (0.01, 0.05) or size == big:
            loop_ms, matmul_ms = _time_warm_pair(_gemm_loop(), matmul, *parts, inner=3)
            gemm_ms2 = loop_ms / GEMM_REPEAT
            rate = matmul_flops / (matmul_ms * 1e-3) / 1e9
            useful = flops / (gemm_ms2 * 1e-3) / 1e9
            efficiency = useful / rate
            rates.append(rate)
            gemm_rows.append(
                Row(
                    FAMILY,
                    f"{case}, sparse_conv_features alone: useful FLOP rate / dense matmul rate",
                    gemm_ms2,
                    flops / (rate * 1e9) * 1e3,
                    "tf.matmul 2048x2048 rate at the same FLOPs",
                    target=0.35,
                    note=(
                        f"useful {useful:.1f} GFLOP/s (2*P*Cin*Cout) = {efficiency:.0%} of "
                        f"dense matmul {rate:.1f} GFLOP/s ({GEMM_REPEAT} calls in one tf.function, "
                        "alternated with the matmul)"
                    ),
                )
            )
        if size == small:
            curve.append((occ, stock_ms / ours_ms))
        summary.append((size, occ, n, p, ours_ms, stock_ms, share, gemm_ms, efficiency))

    # A network-like setting: 4 layers at one resolution per call, one shared rulebook.
    for occ in (0.01, 0.05):
        features, coords, kernel, dense = _inputs(small, occ)
        ours_stack, stock_stack = _stack(small, 4)
        overhead = _call_overhead(features, coords, kernel, dense)
        stack = time_pair(ours_stack, stock_stack, features, coords, kernel, dense, repeat=9)
        n = int(coords.shape[0])
        rows.append(
            Row(
                FAMILY,
                f"[1, {small}, {small}, {small}, {C}] -> {C}, 4 x (3x3x3 submanifold conv + relu) "
                f"in one call, surface {occ:.1%} ({n} sites), forward",
                *stack,
                "4 x (tf.nn.conv3d + relu) on the dense grid",
                note=(
                    f"one rulebook for the 4 layers; per layer {stack[0] / 4:.2f} ms vs "
                    f"{stack[1] / 4:.2f} ms; a tf.function call that does nothing with the same "
                    f"arguments costs {overhead:.2f} ms here"
                ),
            )
        )

    # Forward + backward at 1 % (gradients w.r.t. features and kernel / input and filter).
    features, coords, kernel, dense = _inputs(small, 0.01)
    _, _, _, _, ours_fb, stock_fb = _functions(small)
    rng = np.random.default_rng(2)
    dy = tf.constant(rng.standard_normal((int(features.shape[0]), C)).astype(np.float32))
    dense_dy = tsc.ops.to_dense(dy, coords, [small] * 3, 1)
    reps = {"warmup": 1, "repeat": 9}
    fb = time_pair(ours_fb, stock_fb, features, coords, kernel, dy, dense, dense_dy, **reps)
    rows.append(
        Row(
            FAMILY,
            f"[1, {small}, {small}, {small}, {C}] -> {C}, 3x3x3 submanifold, surface 1.0%, "
            "forward+backward (d features, d kernel; rulebook included)",
            *fb,
            "tf.nn.conv3d + its gradients (d input, d filter) on the dense grid",
        )
    )
    rows += gemm_rows
    _print_summary(summary, memory, fb, rates)
    _plot(curve, small)
    return rows


def _print_summary(summary, memory, fb, rates) -> None:
    print("\ncoord_sparse: submanifold 3x3x3 conv, 32->32, float32, surface-like sites, batch 1")
    print(
        f"{'grid':>6} {'occ':>6} {'sites':>7} {'pairs':>8} {'ours ms':>8} {'dense ms':>9} "
        f"{'speed-up':>8} {'rulebook':>9} {'GEMM ms':>8} {'GEMM/matmul':>11}"
    )
    for size, occ, n, p, ours_ms, stock_ms, share, gemm_ms, efficiency in summary:
        eff = "" if efficiency is None else f"{efficiency:.0%}"
        print(
            f"{size:>5}³ {occ:>6.1%} {n:>7} {p:>8} {ours_ms:>8.2f} {stock_ms:>9.2f} "
            f"{stock_ms / ours_ms:>7.1f}x {share:>9.0%} {gemm_ms:>8.2f} {eff:>11}"
        )
    print(
        f"dense tf.matmul 2048^2 during the GEMM timings: {min(rates):.0f}-{max(rates):.0f} GFLOP/s "
        "(this machine's state: it varies between runs)"
    )
    print(f"forward+backward at 1%: {fb[0]:.2f} ms vs {fb[1]:.2f} ms dense ({fb[1] / fb[0]:.1f}x)")
    if memory is not None:
        print("peak memory, forward at 1% (sparse vs dense):")
        print(
            f"  tensor bytes (inputs + rulebook + outputs): {_mb(memory['tensor_sparse'])} vs "
            f"{_mb(memory['tensor_dense'])} ({memory['tensor_dense'] / memory['tensor_sparse']:.0f}x)"
        )
        ratio = f"({memory['dense'] / memory['sparse']:.0f}x)" if memory["sparse"] and memory["dense"] else ""
        sparse, dense = _mb(memory["sparse"]), _mb(memory["dense"])
        print(f"  peak-RSS rise in a fresh process: {sparse} vs {dense} {ratio}")


def _plot(curve, size: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    occ = [c[0] * 100 for c in curve]
    ax.plot(occ, [c[1] for c in curve], "o-", label="sparse_conv (rulebook included)")
    ax.plot(occ, [100 / o for o in occ], ":", color="grey", label="1 / occupancy")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("occupied sites (%)")
    ax.set_ylabel("speed-up vs tf.nn.conv3d (×)")
    ax.set_title(f"submanifold conv, {size}³×32→32, 3×3×3, surface sites")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = os.path.join(os.path.dirname(__file__), "out")
    os.makedirs(out, exist_ok=True)
    fig.savefig(os.path.join(out, "coord_sparse.png"), dpi=120)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--memory-child":
        print(json.dumps(_memory_child(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))))
    else:
        sys.exit("usage: python -m benchmarks.run --only coord_sparse [--quick]")
