"""Custom TensorFlow ops of tf_sparseconv, with gradients and pure-TF references.

Every op here runs the compiled C++/CUDA kernel when the op library is loaded
and otherwise its pure-TensorFlow reference (same semantics, stock ops only).
The references are public (``*_reference``) as test oracles and for portable
export.
"""

from tf_sparseconv.python.ops._autotune import channel_sparse_implementation
from tf_sparseconv.python.ops._loader import (
    Dispatch,
    explain,
    for_converters,
    is_library_loaded,
    load_library,
    references_only,
)
from tf_sparseconv.python.ops.block_sparse_ops import (
    block_sparse_conv2d,
    block_sparse_conv2d_reference,
    reduce_mask,
    reduce_mask_reference,
    sparse_gather,
    sparse_gather_reference,
    sparse_scatter,
    sparse_scatter_reference,
)
from tf_sparseconv.python.ops.channel_sparse_ops import (
    channel_sparse_conv1d,
    channel_sparse_conv1d_reference,
    channel_sparse_conv2d,
    channel_sparse_conv2d_reference,
    dense_kernel,
    random_connections,
)
from tf_sparseconv.python.ops.coord_sparse_ops import (
    Rulebook,
    from_dense,
    sparse_conv,
    sparse_conv_features,
    sparse_conv_features_reference,
    sparse_conv_reference,
    sparse_conv_rulebook,
    sparse_conv_rulebook_reference,
    sparse_conv_rulebook_transpose,
    sparse_conv_rulebook_transpose_reference,
    sparse_conv_transpose,
    to_dense,
    topk_sites,
    topk_sites_rows_reference,
)
from tf_sparseconv.python.ops.streaming_ops import streaming_conv_step, streaming_conv_step_reference
from tf_sparseconv.python.ops.topk_ops import (
    kwinners,
    kwinners_reference,
    topk_attention,
    topk_attention_reference,
)

__all__ = [
    "streaming_conv_step",
    "streaming_conv_step_reference",
    "block_sparse_conv2d",
    "block_sparse_conv2d_reference",
    "reduce_mask",
    "reduce_mask_reference",
    "sparse_gather",
    "sparse_gather_reference",
    "sparse_scatter",
    "sparse_scatter_reference",
    "channel_sparse_conv1d",
    "channel_sparse_conv1d_reference",
    "channel_sparse_conv2d",
    "channel_sparse_conv2d_reference",
    "dense_kernel",
    "channel_sparse_implementation",
    "Rulebook",
    "from_dense",
    "sparse_conv",
    "sparse_conv_features",
    "sparse_conv_features_reference",
    "sparse_conv_reference",
    "sparse_conv_rulebook",
    "sparse_conv_rulebook_reference",
    "sparse_conv_rulebook_transpose",
    "sparse_conv_rulebook_transpose_reference",
    "sparse_conv_transpose",
    "to_dense",
    "topk_sites",
    "topk_sites_rows_reference",
    "random_connections",
    "is_library_loaded",
    "for_converters",
    "Dispatch",
    "explain",
    "references_only",
    "kwinners",
    "kwinners_reference",
    "load_library",
    "topk_attention",
    "topk_attention_reference",
]
