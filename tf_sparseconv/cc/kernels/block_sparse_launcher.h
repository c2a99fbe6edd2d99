// TensorFlow-independent launchers for the GPU kernels of the block-sparse
// ops (raw device pointers, a cudaStream_t passed as void*). Each returns
// nullptr on success or a static error string. Semantics and layouts are in
// block_sparse_common.h; `format` is the dtype of mask / x / blocks / base /
// out (float_format.h's FloatFormat). For gather and scatter, g.grid_h and
// g.grid_w are the index limits (BlockIndexLimit), not the grid formula:
// rows with b, bh or bw outside [0, batch) x [0, grid_h) x [0, grid_w) are
// skipped (gather: all-zero block).
#ifndef TF_SPARSECONV_CC_KERNELS_BLOCK_SPARSE_LAUNCHER_H_
#define TF_SPARSECONV_CC_KERNELS_BLOCK_SPARSE_LAUNCHER_H_

#include <cstdint>

#include "tf_sparseconv/cc/kernels/block_sparse_common.h"
#include "tf_sparseconv/cc/kernels/float_format.h"

namespace tf_sparseconv {

// Device workspace (bytes) that LaunchReduceMaskGpu needs for a geometry
// (g.c is ignored).
int64_t ReduceMaskGpuWorkspaceBytes(const BlockGeometry& g);

// reduce_mask, phase 1: marks the active blocks in `workspace` and copies
// their number to *count (host memory; the call synchronises the stream).
const char* LaunchReduceMaskCountGpu(FloatFormat format, const void* mask, float threshold,
                                     bool avgpool, const BlockGeometry& g, void* workspace,
                                     int64_t* count, void* stream);

// reduce_mask, phase 2: writes the `count` active blocks as int32 rows
// (b, bh, bw) in increasing order to `indices` [count, 3] (deterministic).
// `workspace` is the one phase 1 filled.
const char* LaunchReduceMaskIndicesGpu(const BlockGeometry& g, void* workspace, int32_t* indices,
                                       int64_t count, void* stream);

// blocks [n, size_h, size_w, c] = gather(x [batch, h, w, c]); a block whose
// index is out of range reads as zeros.
const char* LaunchSparseGatherGpu(FloatFormat format, const void* x, const int32_t* indices,
                                  int64_t n, void* blocks, const BlockGeometry& g, void* stream);

// out = base with the n blocks written (add = false) or added (add = true),
// deterministically (each output element is summed by one thread, over the
// blocks covering it in index order). `workspace` is a device buffer of
// SparseScatterGpuWorkspaceBytes(g, n) bytes (e.g. a per-block-row index of
// the blocks). Blocks whose index is out of range are skipped (the CPU
// kernels reject them; on the GPU the indices stay in device memory).
int64_t SparseScatterGpuWorkspaceBytes(const BlockGeometry& g, int64_t n);
const char* LaunchSparseScatterGpu(FloatFormat format, const void* blocks, const int32_t* indices,
                                   int64_t n, const void* base, void* out, bool add,
                                   const BlockGeometry& g, void* workspace, void* stream);

}  // namespace tf_sparseconv

#endif  // TF_SPARSECONV_CC_KERNELS_BLOCK_SPARSE_LAUNCHER_H_
