"""Top-k family: k-winners-take-all and top-k attention.

``kwinners`` keeps the k largest values of each slice along an axis (the
hypercolumn paper's k-WTA); ``topk_attention`` keeps the k strongest entries
per sample (and channel) of a feature map, bounding its number of non-zeros
(Hackel et al.'s attention step). Gradients flow to the kept entries only.
"""

from __future__ import annotations

import tensorflow as tf

from tf_sparseconv.python.ops._common import choice, float_tensor, normalize_axis, positive_count
from tf_sparseconv.python.ops._loader import compiled_library, dispatch


def kwinners(x, k, axis: int = -1, name: str | None = None) -> tf.Tensor:
    """k-winners-take-all along `axis`.

    Args:
      x: float tensor (float16, bfloat16, float32 or float64), any rank >= 1.
      k: int >= 1 (or an int32 scalar tensor): winners per slice; `k >= size`
        keeps everything.
      axis: the axis whose 1-D slices compete.
      name: optional name scope.

    Returns:
      `x` with all but the `k` largest values of each slice set to 0 (ties go
      to the lower index).
    """
    with tf.name_scope(name or "kwinners"):
        x = float_tensor(x, "x")
        k = positive_count(k, "k")
        rank = x.shape.rank
        if rank == 0:
            raise ValueError("`x` must have rank >= 1, got a scalar")
        axis = normalize_axis(axis, rank)
        library = dispatch("kwinners")
        if library is None:
            return kwinners_reference(x, k, axis)
        y, _ = library.tf_sparse_conv_k_winners(x, k, axis=axis)
        return y


def topk_attention(x, k, mode: str = "abs", per: str = "channel", name: str | None = None) -> tf.Tensor:
    """Top-k attention over the positions of a `[B, *spatial, C]` feature map.

    Args:
      x: float tensor `[B, *spatial, C]` with 1 to 3 spatial dims.
      k: int >= 1 (or int32 scalar tensor): entries kept per selection set.
      mode: "abs" scores |x|; "relu" scores x and keeps only entries > 0.
      per: "channel": each (sample, channel) keeps k spatial positions;
        "sample": each sample keeps k entries over positions and channels.
      name: optional name scope.

    Returns:
      `x` with all but the selected entries set to 0 (ties go to the lower flat
      index); at most `k` non-zeros per selection set.
    """
    with tf.name_scope(name or "topk_attention"):
        x = float_tensor(x, "x")
        k = positive_count(k, "k")
        mode = choice(mode, "mode", ("abs", "relu"))
        per = choice(per, "per", ("channel", "sample"))
        rank = x.shape.rank
        if rank is not None and not 3 <= rank <= 5:
            raise ValueError(f"`x` must be [B, *spatial, C] with 1 to 3 spatial dims, got shape {x.shape}")
        library = dispatch("topk_attention")
        if library is None:
            return topk_attention_reference(x, k, mode, per)
        y, _ = library.tf_sparse_conv_top_k_attention(x, k, mode=mode, per=per)
        return y


# --- gradients ------------------------------------------------------------------


@tf.RegisterGradient("TfSparseConv>KWinners")
def _kwinners_grad(op, grad, _indices_grad):
    axis = op.get_attr("axis")
    return [compiled_library().tf_sparse_conv_k_winners_grad(grad, op.outputs[1], axis=axis), None]


@tf.RegisterGradient("TfSparseConv>KWinnersGrad")
def _kwinners_grad_grad(op, grad):
    # The gradient op is a projection onto the winners: its own adjoint.
    axis = op.get_attr("axis")
    return [compiled_library().tf_sparse_conv_k_winners_grad(grad, op.inputs[1], axis=axis), None]


@tf.RegisterGradient("TfSparseConv>TopKAttention")
def _topk_attention_grad(op, grad, _indices_grad):
    per = op.get_attr("per").decode()
    return [compiled_library().tf_sparse_conv_top_k_attention_grad(grad, op.outputs[1], per=per), None]


@tf.RegisterGradient("TfSparseConv>TopKAttentionGrad")
def _topk_attention_grad_grad(op, grad):
    per = op.get_attr("per").decode()
    return [compiled_library().tf_sparse_conv_top_k_attention_grad(grad, op.inputs[1], per=per), None]


# --- pure-TensorFlow references ---------------------------------------------------


def _keep_topk_last_axis(scores: tf.Tensor, k: tf.Tensor) -> tf.Tensor:
    """Boolean mask of the k largest scores of each row (ties: lower index)."""
    n = tf.shape(scores)[-1]
    kk = tf.minimum(k, n)
    values = tf.math.top_k(scores, kk, sorted=False).values
    threshold = tf.reduce_min(values, axis=-1, keepdims=True)  # k-th largest (+inf if empty)
    greater = scores > threshold
    equal = tf.equal(scores, threshold)
    needed = kk - tf.reduce_sum(tf.cast(greater, tf.int32), axis=-1, keepdims=True)
    rank_among_equal = tf.cumsum(tf.cast(equal, tf.int32), axis=-1, exclusive=True)
    return tf.logical_or(greater, tf.logical_and(equal, rank_among_equal < needed))


def kwinners_reference(x, k, axis: int = -1) -> tf.Tensor:
    """Pure-TF `kwinners` (stock ops only)."""
    x = float_tensor(x, "x")
    k = positive_count(k, "k")
    rank = x.shape.rank
    if rank is None:
        raise ValueError("`x` must have a known rank")
    axis = normalize_axis(axis, rank)
    perm = None
    if axis != rank - 1:
        perm = [d for d in range(rank) if d != axis] + [axis]
        x = tf.transpose(x, perm)
    y = tf.where(_keep_topk_last_axis(x, k), x, tf.zeros_like(x))
    if perm is not None:
        y = tf.transpose(y, [perm.index(d) for d in range(rank)])
    return y


def topk_attention_reference(x, k, mode: str = "abs", per: str = "channel") -> tf.Tensor:
    """Pure-TF `topk_attention` (stock ops only)."""
    x = float_tensor(x, "x")
    k = positive_count(k, "k")
    mode = choice(mode, "mode", ("abs", "relu"))
    per = choice(per, "per", ("channel", "sample"))
    shape = tf.shape(x)
    batch, channels = shape[0], shape[-1]
    if per == "sample":
        rows = tf.reshape(x, [batch, -1])
    else:
        rows = tf.transpose(tf.reshape(x, [batch, -1, channels]), [0, 2, 1])
    scores = tf.abs(rows) if mode == "abs" else rows
    keep = _keep_topk_last_axis(scores, k)
    if mode == "relu":
        keep = tf.logical_and(keep, rows > 0)
    kept = tf.where(keep, rows, tf.zeros_like(rows))
    if per == "channel":
        kept = tf.transpose(kept, [0, 2, 1])
    return tf.reshape(kept, shape)
