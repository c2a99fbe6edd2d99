// TensorFlow-independent launchers for the GPU kernels of coordinate sparse
// convolution (raw device pointers, a cudaStream_t passed as void*). Each
// returns nullptr on success or a static error string. `format` is the dtype
// of the float tensors (float_format.h's FloatFormat); half and bfloat16
// accumulate in float, float in float, double in double.
//
// Rulebook layout (SparseConvRulebook / SparseConvRulebookTranspose): pair_ptr
// int32 [K + 1], non-decreasing from 0 to P; pairs int32 [P, 2] rows
// (src, dst); the pairs of kernel offset k are pairs[pair_ptr[k] : pair_ptr[k+1]],
// and within an offset dst is non-decreasing. All of them are device memory.
// The rulebook's values are not checked on the GPU (the CPU kernels reject a
// bad one; on the GPU it stays in device memory, as tf.gather's indices do:
// README, "Validation on GPU"), but no value can cause an out-of-bounds
// access: pairs whose src or dst is out of range are skipped, pair_ptr is
// read clamped to [0, P] and non-decreasing (offset k: [lo_k, max(lo_k,
// min(pair_ptr[k + 1], P))) with lo_k = clamp(pair_ptr[k], 0, P)), and a dst
// out of order within an offset gives unspecified values.
#ifndef TF_SPARSECONV_CC_KERNELS_COORD_SPARSE_LAUNCHER_H_
#define TF_SPARSECONV_CC_KERNELS_COORD_SPARSE_LAUNCHER_H_

#include <cstdint>

#include "tf_sparseconv/cc/kernels/float_format.h"

namespace tf_sparseconv {

// out [num_out, cout] = 0, then for every offset k and pair (src, dst) of k:
//   out[dst] += features[src] ([n, cin] row) @ kernel[k] ([cin, cout]),
// summed per output row in offset order (deterministic, no atomics).
const char* LaunchSparseConvFeaturesGpu(FloatFormat format, const void* features, int64_t n,
                                        const void* kernel, int64_t num_offsets, int64_t cin,
                                        int64_t cout, const int32_t* pair_ptr, const int32_t* pairs,
                                        int64_t num_pairs, int64_t num_out, void* out,
                                        void* stream);

// kernel_grad [K, cin, cout]: kernel_grad[k] = sum over the pairs (src, dst)
// of offset k of features[src]^T grad[dst] ([cin] x [cout] outer products),
// summed in a fixed order (deterministic, no atomics). grad is [m, cout].
const char* LaunchSparseConvKernelGradGpu(FloatFormat format, const void* features, int64_t n,
                                          const void* grad, int64_t m, int64_t num_offsets,
                                          int64_t cin, int64_t cout, const int32_t* pair_ptr,
                                          const int32_t* pairs, int64_t num_pairs,
                                          void* kernel_grad, void* stream);

}  // namespace tf_sparseconv

// ---------------------------------------------------------------------------
// Index bookkeeping on the GPU (coord_sparse_index_op_gpu.cu.cc):
// SparseConvRulebook and TopKSites. Results are identical to the CPU kernels'
// (coord_sparse_index_op.cc). Workspaces are device
// buffers of at least the ...WorkspaceBytes(...) bytes (any alignment); a
// negative size means the problem is too large for the GPU kernels. Calls
// that return host-side counts synchronise the stream. Limits: N * K (regular
// convolutions) and M * K must be below 2^31.

#include "tf_sparseconv/cc/kernels/coord_sparse_common.h"

namespace tf_sparseconv {

// SparseConvRulebook, phase 1: validates coords int32 [n, 1 + g.dims] on the
// device. *bad_row = the first row with a negative batch or a spatial index
// outside g.in_shape (n if none), and then bad_values (host, 1 + g.dims
// int32) = that row; *batch = max(b) + 1 over the rows (0 if n = 0).
int64_t RulebookCheckGpuWorkspaceBytes();
const char* LaunchRulebookCheckGpu(const ConvGeometry& g, const int32_t* coords, int64_t n,
                                   void* workspace, int64_t* bad_row, int32_t* bad_values,
                                   int64_t* batch, void* stream);

// Phases 2-4 take coords that phase 1 accepted (the OpKernel stops at its
// error); fed others they return a meaningless rulebook, still in bounds
// (pairs in [0, n) x [0, num_out), pair_ptr from 0 to P).
//
// Phase 2: sorts the input sites in `workspace` (which
// phase 3 reads again) and finds the output sites. *dup_later / *dup_earlier
// = the CPU kernel's first duplicate (the smallest row that repeats an
// earlier site, and that earlier row), or -1; *num_out = M (n when
// submanifold).
int64_t RulebookSitesGpuWorkspaceBytes(const ConvGeometry& g, int64_t n, bool submanifold);
const char* LaunchRulebookSitesGpu(const ConvGeometry& g, const int32_t* coords, int64_t n,
                                   int64_t batch, bool submanifold, void* workspace,
                                   int64_t* dup_later, int64_t* dup_earlier, int64_t* num_out,
                                   void* stream);

// Phase 3: writes out_coords int32 [num_out, 1 + g.dims] and pair_ptr int32
// [K + 1] (device) and *num_pairs = P (host); fills `workspace` for phase 4.
int64_t RulebookPairsGpuWorkspaceBytes(const ConvGeometry& g, int64_t num_out);
const char* LaunchRulebookPairsGpu(const ConvGeometry& g, const int32_t* coords, int64_t n,
                                   bool submanifold, const void* sites_workspace, int64_t num_out,
                                   int32_t* out_coords, void* workspace, int32_t* pair_ptr,
                                   int64_t* num_pairs, void* stream);

// Phase 4: writes pairs int32 [num_pairs, 2] (in_row, out_row) from the
// phase 3 workspace.
const char* LaunchRulebookWritePairsGpu(const ConvGeometry& g, int64_t num_out,
                                        const void* workspace, int64_t num_pairs, int32_t* pairs,
                                        void* stream);

// TopKSites, phase 1: features [n, c] of `format`, coords int32 [n, width]
// (column 0 = batch), k >= 1, l2 (else abs_max). *bad_row = the first row
// with a negative batch (n if none; then *bad_batch = its batch), *kept = the
// number of kept rows. Phase 2 writes them, ascending, to rows int32 [kept].
int64_t TopKSitesGpuWorkspaceBytes(int64_t n);
const char* LaunchTopKSitesGpu(FloatFormat format, const void* features, int64_t n, int64_t c,
                               const int32_t* coords, int64_t width, int64_t k, bool l2,
                               void* workspace, int64_t* bad_row, int32_t* bad_batch, int64_t* kept,
                               void* stream);
const char* LaunchTopKSitesRowsGpu(const void* workspace, int64_t n, int64_t kept, int32_t* rows,
                                   void* stream);

}  // namespace tf_sparseconv

#endif  // TF_SPARSECONV_CC_KERNELS_COORD_SPARSE_LAUNCHER_H_
