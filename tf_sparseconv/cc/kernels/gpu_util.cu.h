// The CUDA error check of every *_gpu.cu.cc (no TensorFlow headers): the
// launchers return nullptr on success, else CUDA's message.
#ifndef TF_SPARSECONV_CC_KERNELS_GPU_UTIL_CU_H_
#define TF_SPARSECONV_CC_KERNELS_GPU_UTIL_CU_H_

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace tf_sparseconv {
namespace gpu {

// nullptr if `err` is cudaSuccess, else CUDA's message for it.
inline const char* Check(cudaError_t err) {
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// The check of the last launch (cudaGetLastError, which also clears it).
inline const char* LastError() { return Check(cudaGetLastError()); }

// Zeroes `bytes` bytes at `p` on `stream`.
inline const char* MemsetZero(void* p, int64_t bytes, cudaStream_t stream) {
  return Check(cudaMemsetAsync(p, 0, static_cast<size_t>(bytes), stream));
}

}  // namespace gpu
}  // namespace tf_sparseconv

#endif  // TF_SPARSECONV_CC_KERNELS_GPU_UTIL_CU_H_
