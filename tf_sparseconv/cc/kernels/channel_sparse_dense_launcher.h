// TensorFlow-independent launchers of the GPU kernels that convert between a
// channel-sparse kernel [taps, m, Cout] and its dense equivalent
// [taps, Cin, Cout] (raw device pointers, a cudaStream_t passed as void*).
// Both are pure placements of elements, so they work on the raw bits of any
// dtype of `elem_bytes` 2, 4 or 8 bytes. Connection values outside [0, Cin)
// are not validated on the device (the CPU kernels reject them): they place
// nothing and gather zero. Each returns nullptr on success or a static error
// string.
#ifndef TF_SPARSECONV_CC_KERNELS_CHANNEL_SPARSE_DENSE_LAUNCHER_H_
#define TF_SPARSECONV_CC_KERNELS_CHANNEL_SPARSE_DENSE_LAUNCHER_H_

#include <cstdint>

namespace tf_sparseconv {

// dense[t, connections[o, j], o] = kernel[t, j, o], zeros elsewhere.
const char* LaunchChannelSparseDenseKernelGpu(int elem_bytes, const void* kernel,
                                              const int32_t* connections, void* dense, int64_t taps,
                                              int64_t m, int64_t cout, int64_t cin, void* stream);

// kernel[t, j, o] = dense[t, connections[o, j], o].
const char* LaunchChannelSparseGatherKernelGpu(int elem_bytes, const void* dense,
                                               const int32_t* connections, void* kernel,
                                               int64_t taps, int64_t m, int64_t cout, int64_t cin,
                                               void* stream);

}  // namespace tf_sparseconv

#endif  // TF_SPARSECONV_CC_KERNELS_CHANNEL_SPARSE_DENSE_LAUNCHER_H_
