// Block geometry of the block-sparse (SBNet-style) ops, shared by the CPU
// kernels, the GPU kernels and their TF-independent launcher (no TensorFlow
// headers).
//
// Per spatial axis (h, w), block i covers [offset + i * stride,
// offset + i * stride + size); there are grid = max(1, ceil((L - offset -
// size) / stride) + 1) blocks along an axis of length L. Out-of-range parts
// of a block read as 0 (gather) and are not written (scatter). Offsets may
// be negative (a halo that starts above/left of the image).
//
// Block indices are int32 [n, 3] rows (b, bh, bw) with 0 <= b < batch,
// 0 <= bh < limit_h, 0 <= bw < limit_w, where limit = max(grid, number of
// blocks that start inside the image = ceil((L - offset) / stride)): the grid,
// plus any further block that still overlaps the image (a halo block of
// block_sparse_conv2d: its gather blocks are larger than its stride).
//
//  * reduce_mask: mask [batch, h, w] -> the (b, bh, bw) whose max over the
//    in-range part (avgpool: the sum over it divided by size_h * size_w) is
//    > threshold, in increasing (b, bh, bw) order. A block with no in-range
//    part has max -inf and average 0.
//  * sparse_gather: x [batch, h, w, c] -> blocks [n, size_h, size_w, c].
//  * sparse_scatter: out = base [batch, h, w, c] with every block [n, size_h,
//    size_w, c] written (add = false) or added (add = true) at its place.
//    Adds of overlapping blocks are summed in a fixed order (deterministic:
//    every output element is computed by one thread, which visits the blocks
//    covering it in a fixed order, e.g. by block row, then index order).
#ifndef TF_SPARSECONV_CC_KERNELS_BLOCK_SPARSE_COMMON_H_
#define TF_SPARSECONV_CC_KERNELS_BLOCK_SPARSE_COMMON_H_

#include <cstdint>

namespace tf_sparseconv {

struct BlockGeometry {
  int64_t batch, h, w, c;
  int64_t size_h, size_w;
  int64_t stride_h, stride_w;
  int64_t offset_h, offset_w;
  int64_t grid_h, grid_w;
};

// Blocks along an axis of length `length` (at least 1).
inline int64_t BlockGridSize(int64_t length, int64_t size, int64_t stride, int64_t offset) {
  const int64_t span = length - offset - size;  // ceil(span / stride) + 1
  const int64_t steps = span >= 0 ? (span + stride - 1) / stride : -((-span) / stride);
  return steps + 1 > 1 ? steps + 1 : 1;
}

// Largest valid block index + 1 along an axis (see above).
inline int64_t BlockIndexLimit(int64_t length, int64_t size, int64_t stride, int64_t offset) {
  const int64_t grid = BlockGridSize(length, size, stride, offset);
  const int64_t span = length - offset;  // ceil(span / stride), blocks starting before L
  const int64_t starts = span > 0 ? (span + stride - 1) / stride : 0;
  return starts > grid ? starts : grid;
}

}  // namespace tf_sparseconv

#endif  // TF_SPARSECONV_CC_KERNELS_BLOCK_SPARSE_COMMON_H_
