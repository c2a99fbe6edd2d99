// TensorFlow-independent launchers for the GPU kernels of the channel-sparse
// convolution (raw device pointers, a cudaStream_t passed as void*). Each
// returns nullptr on success or a static error string. Layouts and the
// formula are in channel_sparse_common.h; `format` is the dtype of x, kernel,
// y, dy, dx and dkernel (float_format.h's FloatFormat). Arithmetic is in float
// for half/bfloat16 and in the dtype otherwise. Results are bitwise
// deterministic. `connections` (device memory) are not validated: entries
// outside [0, in_c) contribute nothing and are never dereferenced.
#ifndef TF_SPARSECONV_CC_KERNELS_CHANNEL_SPARSE_LAUNCHER_H_
#define TF_SPARSECONV_CC_KERNELS_CHANNEL_SPARSE_LAUNCHER_H_

#include <cstdint>

#include "tf_sparseconv/cc/kernels/channel_sparse_common.h"
#include "tf_sparseconv/cc/kernels/float_format.h"

namespace tf_sparseconv {

// y = activation(conv(x, kernel, connections) + bias): `bias` ([out_c], the
// dtype of x) may be nullptr (no bias); `relu` selects max(., 0).
const char* LaunchChannelSparseConv2DGpu(FloatFormat format, const void* x, const void* kernel,
                                         const int32_t* connections, const void* bias, bool relu,
                                         void* y, const ChannelSparseGeometry& g, void* stream);

// *bytes = the size of the device workspace that
// LaunchChannelSparseConv2DBackpropInputGpu needs for this geometry (0 when
// it launches no kernel: empty x, y or kernel). Needs the current CUDA
// device of the later launch (CUB sizes its sort scratch for it); returns
// the launcher's error for an invalid or too large geometry.
const char* ChannelSparseConv2DBackpropInputGpuWorkspaceBytes(const ChannelSparseGeometry& g,
                                                              int64_t* bytes);

// dx = d(sum(y * dy)) / dx, deterministic (a gather over the transposed
// connection list, which is rebuilt in `workspace` on every call: a device
// buffer of workspace_bytes >= ChannelSparseConv2DBackpropInputGpuWorkspaceBytes
// bytes, any alignment, contents ignored; may be nullptr when that size is
// 0). Limits: in_c and out_c * m below 2^30.
const char* LaunchChannelSparseConv2DBackpropInputGpu(FloatFormat format, const void* dy,
                                                      const void* kernel,
                                                      const int32_t* connections, void* dx,
                                                      void* workspace, int64_t workspace_bytes,
                                                      const ChannelSparseGeometry& g, void* stream);

// dkernel [k_h, k_w, m, out_c] = d(sum(y * dy)) / dkernel (deterministic:
// no atomics; entries whose connection is out of range are 0).
const char* LaunchChannelSparseConv2DBackpropKernelGpu(FloatFormat format, const void* x,
                                                       const void* dy, const int32_t* connections,
                                                       void* dkernel,
                                                       const ChannelSparseGeometry& g,
                                                       void* stream);

}  // namespace tf_sparseconv

#endif  // TF_SPARSECONV_CC_KERNELS_CHANNEL_SPARSE_LAUNCHER_H_
