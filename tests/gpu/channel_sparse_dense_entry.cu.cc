// Test-only C entry points of channel_sparse_dense_op_gpu.cu.cc for ctypes
// (tests/gpu/test_*_gpu.py): the launchers of channel_sparse_dense_launcher.h with plain ints and
// arrays. Compiled into the standalone harness library by tests/gpu/build.py only, never into the
// TensorFlow op library.
#include <cstdint>

#include "tf_sparseconv/cc/kernels/channel_sparse_dense_launcher.h"

extern "C" {

const char* tsc_channel_sparse_dense_kernel_gpu(int elem_bytes, const void* kernel,
                                                const int32_t* connections, void* dense,
                                                int64_t taps, int64_t m, int64_t cout, int64_t cin,
                                                void* stream) {
  return tf_sparseconv::LaunchChannelSparseDenseKernelGpu(elem_bytes, kernel, connections, dense,
                                                          taps, m, cout, cin, stream);
}

const char* tsc_channel_sparse_gather_kernel_gpu(int elem_bytes, const void* dense,
                                                 const int32_t* connections, void* kernel,
                                                 int64_t taps, int64_t m, int64_t cout, int64_t cin,
                                                 void* stream) {
  return tf_sparseconv::LaunchChannelSparseGatherKernelGpu(elem_bytes, dense, connections, kernel,
                                                           taps, m, cout, cin, stream);
}

}  // extern "C"
