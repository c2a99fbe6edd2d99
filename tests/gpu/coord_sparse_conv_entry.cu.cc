// Test-only C entry points of coord_sparse_conv_op_gpu.cu.cc for ctypes (tests/gpu/test_*_gpu.py):
// the launchers of coord_sparse_launcher.h with plain ints and arrays. Compiled into the
// standalone harness library by tests/gpu/build.py only, never into the
// TensorFlow op library.
#include <cstdint>

#include "tf_sparseconv/cc/kernels/coord_sparse_launcher.h"

extern "C" {

const char* tsc_sparse_conv_features_gpu(int format, const void* features, int64_t n,
                                         const void* kernel, int64_t num_offsets, int64_t cin,
                                         int64_t cout, const int32_t* pair_ptr,
                                         const int32_t* pairs, int64_t num_pairs, int64_t num_out,
                                         void* out, void* stream) {
  return tf_sparseconv::LaunchSparseConvFeaturesGpu(
      static_cast<tf_sparseconv::FloatFormat>(format), features, n, kernel, num_offsets, cin, cout,
      pair_ptr, pairs, num_pairs, num_out, out, stream);
}

const char* tsc_sparse_conv_kernel_grad_gpu(int format, const void* features, int64_t n,
                                            const void* grad, int64_t m, int64_t num_offsets,
                                            int64_t cin, int64_t cout, const int32_t* pair_ptr,
                                            const int32_t* pairs, int64_t num_pairs,
                                            void* kernel_grad, void* stream) {
  return tf_sparseconv::LaunchSparseConvKernelGradGpu(
      static_cast<tf_sparseconv::FloatFormat>(format), features, n, grad, m, num_offsets, cin, cout,
      pair_ptr, pairs, num_pairs, kernel_grad, stream);
}

}  // extern "C"
