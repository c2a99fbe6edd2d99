// Test-only C entry points of topk_op_gpu.cu.cc for ctypes (tests/gpu/test_*_gpu.py):
// the launchers of topk_launcher.h with plain ints and arrays. Compiled into the
// standalone harness library by tests/gpu/build.py only, never into the
// TensorFlow op library.
#include <cstdint>

#include "tf_sparseconv/cc/kernels/topk_launcher.h"

extern "C" {

const char* tsc_topk_mask_gpu(int format, int mode, const void* x, void* y, int32_t* indices,
                              int64_t outer, int64_t size, int64_t inner, int64_t k, void* stream) {
  return tf_sparseconv::LaunchTopKMaskGpu(
      static_cast<tf_sparseconv::FloatFormat>(format), static_cast<tf_sparseconv::ScoreMode>(mode),
      x, y, indices, tf_sparseconv::TopKGeometry{outer, size, inner, k}, stream);
}

const char* tsc_topk_mask_grad_gpu(int element_bytes, const void* dy, const int32_t* indices,
                                   void* dx, int64_t outer, int64_t size, int64_t inner, int64_t k,
                                   void* stream) {
  return tf_sparseconv::LaunchTopKMaskGradGpu(
      element_bytes, dy, indices, dx, tf_sparseconv::TopKGeometry{outer, size, inner, k}, stream);
}

}  // extern "C"
