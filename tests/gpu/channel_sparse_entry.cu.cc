// Test-only C entry points of channel_sparse_op_gpu.cu.cc for ctypes (tests/gpu/test_*_gpu.py):
// the launchers of channel_sparse_launcher.h with plain ints and arrays. Compiled into the
// standalone harness library by tests/gpu/build.py only, never into the
// TensorFlow op library.
// `geometry` points to 16 int64 in the field order of ChannelSparseGeometry.
#include <cstdint>

#include "tf_sparseconv/cc/kernels/channel_sparse_launcher.h"

namespace {

tf_sparseconv::ChannelSparseGeometry UnpackGeometry(const int64_t* v) {
  return {v[0], v[1], v[2],  v[3],  v[4],  v[5],  v[6],  v[7],
          v[8], v[9], v[10], v[11], v[12], v[13], v[14], v[15]};
}

constexpr const char* kNullGeometry = "tsc_channel_sparse: geometry is null";

}  // namespace

extern "C" {

const char* tsc_channel_sparse_conv2d_gpu(int format, const void* x, const void* kernel,
                                          const int32_t* connections, void* y,
                                          const int64_t* geometry, void* stream) {
  if (geometry == nullptr) return kNullGeometry;
  return tf_sparseconv::LaunchChannelSparseConv2DGpu(
      static_cast<tf_sparseconv::FloatFormat>(format), x, kernel, connections, nullptr, false, y,
      UnpackGeometry(geometry), stream);
}

const char* tsc_channel_sparse_conv2d_bias_activation_gpu(int format, const void* x,
                                                          const void* kernel,
                                                          const int32_t* connections,
                                                          const void* bias, int activation, void* y,
                                                          const int64_t* geometry, void* stream) {
  if (geometry == nullptr) return kNullGeometry;
  if (activation != 0 && activation != 1) {
    return "tsc_channel_sparse: activation must be 0 (linear) or 1 (relu)";
  }
  return tf_sparseconv::LaunchChannelSparseConv2DGpu(
      static_cast<tf_sparseconv::FloatFormat>(format), x, kernel, connections, bias,
      activation == 1, y, UnpackGeometry(geometry), stream);
}

const char* tsc_channel_sparse_conv2d_backprop_input_gpu_workspace_bytes(const int64_t* geometry,
                                                                         int64_t* bytes) {
  if (bytes == nullptr) return "tsc_channel_sparse: bytes is null";
  *bytes = 0;
  if (geometry == nullptr) return kNullGeometry;
  return tf_sparseconv::ChannelSparseConv2DBackpropInputGpuWorkspaceBytes(UnpackGeometry(geometry),
                                                                          bytes);
}

const char* tsc_channel_sparse_conv2d_backprop_input_gpu(int format, const void* dy,
                                                         const void* kernel,
                                                         const int32_t* connections, void* dx,
                                                         void* workspace, int64_t workspace_bytes,
                                                         const int64_t* geometry, void* stream) {
  if (geometry == nullptr) return kNullGeometry;
  return tf_sparseconv::LaunchChannelSparseConv2DBackpropInputGpu(
      static_cast<tf_sparseconv::FloatFormat>(format), dy, kernel, connections, dx, workspace,
      workspace_bytes, UnpackGeometry(geometry), stream);
}

const char* tsc_channel_sparse_conv2d_backprop_kernel_gpu(int format, const void* x, const void* dy,
                                                          const int32_t* connections, void* dkernel,
                                                          const int64_t* geometry, void* stream) {
  if (geometry == nullptr) return kNullGeometry;
  return tf_sparseconv::LaunchChannelSparseConv2DBackpropKernelGpu(
      static_cast<tf_sparseconv::FloatFormat>(format), x, dy, connections, dkernel,
      UnpackGeometry(geometry), stream);
}

}  // extern "C"
