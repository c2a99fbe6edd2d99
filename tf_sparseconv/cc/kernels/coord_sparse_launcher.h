// TensorFlow-independent launchers for the GPU kernels of coordinate sparse
// convolution (raw device pointers, a cudaStream_t passed as void*). Each
// returns nullptr on success or a static error string. `format` is the dtype
// of the float tensors (topk_common.h's FloatFormat); half and bfloat16
// accumulate in float, float in float, double in double.
//
// Rulebook layout (SparseConvRulebook / SparseConvRulebookTranspose): pair_ptr
// int32 [K + 1], non-decreasing from 0 to P; pairs int32 [P, 2] rows
// (src, dst); the pairs of kernel offset k are pairs[pair_ptr[k] : pair_ptr[k+1]],
// and within an offset dst is non-decreasing. All of them are device memory.
// Pairs whose src or dst is out of range are skipped (the CPU kernels reject
// them; on the GPU the rulebook stays in device memory).
#ifndef TF_SPARSECONV_CC_KERNELS_COORD_SPARSE_LAUNCHER_H_
#define TF_SPARSECONV_CC_KERNELS_COORD_SPARSE_LAUNCHER_H_

#include <cstdint>

#include "tf_sparseconv/cc/kernels/topk_common.h"

namespace tf_sparseconv {

// out [num_out, cout] = 0, then for every offset k and pair (src, dst) of k:
//   out[dst] += features[src] ([n, cin] row) @ kernel[k] ([cin, cout]),
// summed per output row in offset order (deterministic, no atomics).
const char* LaunchSparseConvFeaturesGpu(FloatFormat format, const void* features, int64_t n,
                                        const void* kernel, int64_t num_offsets, int64_t cin,
                                        int64_t cout, const int32_t* pair_ptr,
                                        const int32_t* pairs, int64_t num_pairs,
                                        int64_t num_out, void* out, void* stream);

// kernel_grad [K, cin, cout]: kernel_grad[k] = sum over the pairs (src, dst)
// of offset k of features[src]^T grad[dst] ([cin] x [cout] outer products),
// summed in a fixed order (deterministic, no atomics). grad is [m, cout].
const char* LaunchSparseConvKernelGradGpu(FloatFormat format, const void* features,
                                          int64_t n, const void* grad, int64_t m,
                                          int64_t num_offsets, int64_t cin, int64_t cout,
                                          const int32_t* pair_ptr, const int32_t* pairs,
                                          int64_t num_pairs, void* kernel_grad, void* stream);

}  // namespace tf_sparseconv

extern "C" {
// C entry points for ctypes (tests/gpu/).
const char* tsc_sparse_conv_features_gpu(int format, const void* features, int64_t n,
                                         const void* kernel, int64_t num_offsets, int64_t cin,
                                         int64_t cout, const int32_t* pair_ptr,
                                         const int32_t* pairs, int64_t num_pairs,
                                         int64_t num_out, void* out, void* stream);
const char* tsc_sparse_conv_kernel_grad_gpu(int format, const void* features, int64_t n,
                                            const void* grad, int64_t m, int64_t num_offsets,
                                            int64_t cin, int64_t cout, const int32_t* pair_ptr,
                                            const int32_t* pairs, int64_t num_pairs,
                                            void* kernel_grad, void* stream);
}

#endif  // TF_SPARSECONV_CC_KERNELS_COORD_SPARSE_LAUNCHER_H_
