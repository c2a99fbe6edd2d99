// Host helpers of every *_gpu.cu.cc (no TensorFlow headers): the CUDA error
// check (the launchers return nullptr on success, else CUDA's message) and
// overflow-checked size products.
#ifndef TF_SPARSECONV_CC_KERNELS_GPU_UTIL_CU_H_
#define TF_SPARSECONV_CC_KERNELS_GPU_UTIL_CU_H_

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <limits>

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

// *out = a * b for a, b >= 0; false on int64 overflow.
inline bool MulNonNeg(int64_t a, int64_t b, int64_t* out) {
  if (a != 0 && b > std::numeric_limits<int64_t>::max() / a) return false;
  *out = a * b;
  return true;
}

// *out = a * b * c * d (all >= 0); false on int64 overflow.
inline bool Product(int64_t a, int64_t b, int64_t c, int64_t d, int64_t* out) {
  return MulNonNeg(a, b, out) && MulNonNeg(*out, c, out) && MulNonNeg(*out, d, out);
}

}  // namespace gpu
}  // namespace tf_sparseconv

#endif  // TF_SPARSECONV_CC_KERNELS_GPU_UTIL_CU_H_
