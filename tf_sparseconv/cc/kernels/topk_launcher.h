// TensorFlow-independent launchers for the GPU kernels of the top-k family.
// They take raw device pointers and a cudaStream_t passed as void*, so that
// the kernels can be built and tested without TensorFlow (tests/gpu/) and
// called from the TF OpKernels (topk_op.cc). Each returns nullptr on success
// or a static error string.
#ifndef TF_SPARSECONV_CC_KERNELS_TOPK_LAUNCHER_H_
#define TF_SPARSECONV_CC_KERNELS_TOPK_LAUNCHER_H_

#include <cstdint>

#include "tf_sparseconv/cc/kernels/topk_common.h"

namespace tf_sparseconv {

// y[o, i, c] = x[o, i, c] for the k winners of slice (o, c) (that survive,
// for kRelu), 0 elsewhere; indices as described for TopKGeometry.
const char* LaunchTopKMaskGpu(FloatFormat format, ScoreMode mode, const void* x, void* y,
                              int32_t* indices, TopKGeometry geometry, void* stream);

// dx = 0 except dx[o, indices[o, j, c], c] = dy[o, indices[o, j, c], c] for
// indices in [0, size). -1 marks a dropped winner; other values outside
// [0, size) are skipped too (not checked on the GPU: the CPU kernel rejects
// them). `element_bytes` is 2, 4 or 8 (the gradient is a bit copy).
const char* LaunchTopKMaskGradGpu(int element_bytes, const void* dy, const int32_t* indices,
                                  void* dx, TopKGeometry geometry, void* stream);

}  // namespace tf_sparseconv

#endif  // TF_SPARSECONV_CC_KERNELS_TOPK_LAUNCHER_H_
