// TensorFlow-independent launcher of the GPU kernels of StreamingConvStep
// (raw device pointers, a cudaStream_t passed as void*). Returns nullptr on
// success or a static error string. Layouts and the formula are in
// streaming_common.h; `format` is the dtype of every float operand
// (float_format.h's FloatFormat); arithmetic in float for half/bfloat16.
#ifndef TF_SPARSECONV_CC_KERNELS_STREAMING_LAUNCHER_H_
#define TF_SPARSECONV_CC_KERNELS_STREAMING_LAUNCHER_H_

#include <cstdint>

#include "tf_sparseconv/cc/kernels/float_format.h"
#include "tf_sparseconv/cc/kernels/streaming_common.h"

namespace tf_sparseconv {

// `bias` may be nullptr (no bias); `relu` selects max(., 0).
const char* LaunchStreamingConvStepGpu(FloatFormat format, const void* history, const void* frames,
                                       const void* kernel, const void* bias, bool relu, void* y,
                                       void* new_history, const StreamingGeometry& g, void* stream);

}  // namespace tf_sparseconv

#endif  // TF_SPARSECONV_CC_KERNELS_STREAMING_LAUNCHER_H_
