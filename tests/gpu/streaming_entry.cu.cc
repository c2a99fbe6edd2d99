// Test-only C entry points of streaming_op_gpu.cu.cc for ctypes (tests/gpu/test_*_gpu.py):
// the launchers of streaming_launcher.h with plain ints and arrays. Compiled into the
// standalone harness library by tests/gpu/build.py only, never into the
// TensorFlow op library.
// `geometry` points to 7 int64 in the field order of StreamingGeometry;
// activation 0 = linear, 1 = relu.
#include <cstdint>
#include <cstring>

#include "tf_sparseconv/cc/kernels/streaming_launcher.h"

extern "C" {

const char* tsc_streaming_conv_step_gpu(int format, const void* history, const void* frames,
                                        const void* kernel, const void* bias, int activation,
                                        void* y, void* new_history, const int64_t* geometry,
                                        void* stream) {
  if (geometry == nullptr) return "tsc_streaming: geometry is null";
  if (activation != 0 && activation != 1) {
    return "tsc_streaming: activation must be 0 (linear) or 1 (relu)";
  }
  if (format < 0 || format > 3) return "tsc_streaming: unknown float format";
  // StreamingGeometry is its 7 int64 fields, in order: a byte copy.
  static_assert(sizeof(tf_sparseconv::StreamingGeometry) == 7 * sizeof(int64_t),
                "StreamingGeometry");
  tf_sparseconv::StreamingGeometry g;
  std::memcpy(&g, geometry, sizeof(g));
  return tf_sparseconv::LaunchStreamingConvStepGpu(static_cast<tf_sparseconv::FloatFormat>(format),
                                                   history, frames, kernel, bias, activation == 1,
                                                   y, new_history, g, stream);
}

}  // extern "C"
