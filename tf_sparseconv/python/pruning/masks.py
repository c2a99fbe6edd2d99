"""Magnitude-pruning masks for each granularity (NumPy; run in callbacks, eagerly).

Every granularity groups the weights of a kernel into units (single weights,
whole k×k kernels of one (in, out) pair, blocks), scores each unit by its mean
|w| (a block optionally by its largest |w|), and prunes the lowest-scoring units
(ties to the lower index) until at least `ceil(sparsity * size)` weights are pruned, so the zero fraction of a
tensor lands in [s, s + one unit]. "kernel" balances the pruned kernels over the
output channels (each loses the same number first), so that the stripped
channel-sparse layer's fan-in is as small as the sparsity allows. "m_by_n" first
prunes the m smallest of every n consecutive weights along the input-channel
axis and then, if the schedule asks for more than m/n, the smallest remaining
weights.
"""

from __future__ import annotations

import math

import numpy as np

GRANULARITIES = ("weight", "kernel", "block", "m_by_n")
BLOCK_POOLINGS = ("AVG", "MAX")


def _target_count(sparsity: float, size: int) -> int:
    # 1e-9 guards against 0.5 * 10 = 5.000000001 rounding up.
    return min(size, max(0, math.ceil(float(sparsity) * size - 1e-9)))


def _prune_units(scores: np.ndarray, sizes: np.ndarray | None, target: int) -> np.ndarray:
    """Bool keep-mask over units: drop the lowest scores until `target` weights are dropped."""
    scores = scores.reshape(-1)
    keep = np.ones(scores.shape, dtype=bool)
    if target <= 0 or scores.size == 0:
        return keep
    order = np.argsort(scores, kind="stable")
    if sizes is None:
        keep[order[:target]] = False
        return keep
    before = np.cumsum(sizes.reshape(-1)[order]) - sizes.reshape(-1)[order]
    keep[order[before < target]] = False
    return keep


def _weight_mask(kernel: np.ndarray, sparsity: float) -> np.ndarray:
    return _prune_units(np.abs(kernel), None, _target_count(sparsity, kernel.size)).reshape(kernel.shape)


def _kernel_mask(
    kernel: np.ndarray, sparsity: float, in_axis: int = -2, channel_group: int = 1
) -> np.ndarray:
    """Whole k×k kernels of (in, out) channel pairs, balanced over the output channels: each
    output channel first loses the same number of its weakest input kernels, and the rest of
    the target goes to the weakest remaining pairs. Every output channel then keeps (nearly)
    the same fan-in, which is what a channel-sparse layer needs (`strip_pruning(...,
    to_sparse_layers=True)` pads every row to the largest fan-in).

    With `channel_group` g > 1, the output channels go in groups of g consecutive channels
    (the last may be smaller) that are pruned as one: an input channel's score for a group is
    its mean kernel magnitude over the group's channels, and the group keeps or drops it for
    all of them, so the group's channels share one connection list."""
    if kernel.ndim <= 2:
        return _weight_mask(kernel, sparsity)
    spatial = tuple(range(kernel.ndim - 2))
    scores = np.abs(kernel).mean(axis=spatial)  # [A, B] over the last two axes
    if in_axis % kernel.ndim == kernel.ndim - 1:  # [..., out, in]: make it [in, out]
        scores = scores.T
    taps = int(np.prod(kernel.shape[:-2]))
    units = math.ceil(_target_count(sparsity, kernel.size) / taps)
    cin, cout = scores.shape
    group = max(1, min(int(channel_group), cout))
    starts = np.arange(0, cout, group)
    sizes = np.diff(np.append(starts, cout))  # output channels per group
    scores = np.add.reduceat(scores, starts, axis=1) / sizes  # [Cin, groups]
    per_out = min(units // max(cout, 1), cin)
    keep = np.ones(scores.shape, dtype=bool)
    if per_out:
        weakest = np.argsort(scores, axis=0, kind="stable")[:per_out]  # [per_out, groups]
        np.put_along_axis(keep, weakest, False, axis=0)
    rest = units - per_out * cout  # (in, out) pairs still to drop
    if rest > 0:
        remaining = np.where(keep, scores, np.inf).reshape(-1)
        pair_sizes = np.broadcast_to(sizes, scores.shape).reshape(-1)
        order = np.argsort(remaining, kind="stable")
        before = np.cumsum(pair_sizes[order]) - pair_sizes[order]
        keep.reshape(-1)[order[before < rest]] = False
    keep = np.repeat(keep, sizes, axis=1)  # [Cin, Cout]
    if in_axis % kernel.ndim == kernel.ndim - 1:
        keep = keep.T
    return np.broadcast_to(keep, kernel.shape)


def _block_mask(
    kernel: np.ndarray, sparsity: float, block_shape: tuple[int, int], pooling: str = "AVG"
) -> np.ndarray:
    shape = kernel.shape if kernel.ndim >= 2 else (1, *kernel.shape)
    w = np.abs(kernel).reshape(-1, *shape[-2:])  # [lead, A, B]
    lead, a, b = w.shape
    bh, bw = block_shape
    nh, nw = -(-a // bh), -(-b // bw)
    padded = np.zeros((lead, nh * bh, nw * bw), dtype=np.float64)
    padded[:, :a, :b] = w
    ones = np.zeros((nh * bh, nw * bw))
    ones[:a, :b] = 1.0
    sizes = ones.reshape(nh, bh, nw, bw).sum(axis=(1, 3))
    if pooling == "MAX":  # the largest |w| of each block (the padding is 0, below any |w|)
        scores = padded.reshape(lead, nh, bh, nw, bw).max(axis=(2, 4))
    else:  # mean |w| over the in-range part of each block
        scores = padded.reshape(lead, nh, bh, nw, bw).sum(axis=(2, 4)) / sizes
    sizes = np.broadcast_to(sizes, scores.shape).astype(np.int64)
    keep = _prune_units(scores, sizes, _target_count(sparsity, kernel.size)).reshape(lead, nh, nw)
    full = np.repeat(np.repeat(keep, bh, axis=1), bw, axis=2)[:, :a, :b]
    return full.reshape(kernel.shape)


def _m_by_n_mask(kernel: np.ndarray, sparsity: float, m_by_n: tuple[int, int], in_axis: int) -> np.ndarray:
    m, n = m_by_n
    w = np.moveaxis(np.abs(kernel).astype(np.float64), in_axis, -1)  # [..., Cin]
    cin = w.shape[-1]
    rows = w.reshape(-1, cin)
    pruned = np.zeros(rows.shape, dtype=bool)
    for start in range(0, cin, n):
        group = rows[:, start : start + n]
        drop = m if group.shape[1] == n else (m * group.shape[1]) // n
        if drop:
            smallest = np.argsort(group, axis=1, kind="stable")[:, :drop]
            np.put_along_axis(pruned[:, start : start + n], smallest, True, axis=1)
    # Then the smallest survivors, up to max(sparsity, m / n) of the tensor.
    scores = np.where(pruned, -1.0, rows)
    target = _target_count(max(float(sparsity), m / n), kernel.size)
    keep = _prune_units(scores, None, max(target, int(pruned.sum()))).reshape(w.shape)
    return np.moveaxis(keep, -1, in_axis)


def compute_mask(
    kernel: np.ndarray,
    sparsity: float,
    granularity: str,
    block_shape: tuple[int, int] = (4, 4),
    m_by_n: tuple[int, int] = (2, 4),
    in_axis: int = -2,
    channel_group: int = 1,
    block_pooling: str = "AVG",
) -> np.ndarray:
    """The 0/1 mask (kernel's dtype) pruning `kernel` to `sparsity` at `granularity`
    (`channel_group`: output channels per group for "kernel"; `block_pooling`: "AVG" or "MAX",
    how a "block" is scored from its |w|)."""
    kernel = np.asarray(kernel)
    if granularity == "weight":
        keep = _weight_mask(kernel, sparsity)
    elif granularity == "kernel":
        keep = _kernel_mask(kernel, sparsity, in_axis, channel_group)
    elif granularity == "block":
        keep = _block_mask(kernel, sparsity, block_shape, block_pooling)
    elif granularity == "m_by_n":
        keep = _m_by_n_mask(kernel, sparsity, m_by_n, in_axis if kernel.ndim > 1 else -1)
    else:
        raise ValueError(f"`granularity` must be one of {GRANULARITIES}, got {granularity!r}")
    return keep.astype(kernel.dtype)
