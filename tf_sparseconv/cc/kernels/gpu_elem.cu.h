// Element types of the CUDA kernels (no TensorFlow headers): the arithmetic
// type of each storage type (float for half/bfloat16) and its conversions.
// Shared by every *_gpu.cu.cc.
#ifndef TF_SPARSECONV_CC_KERNELS_GPU_ELEM_CU_H_
#define TF_SPARSECONV_CC_KERNELS_GPU_ELEM_CU_H_

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace tf_sparseconv {
namespace gpu {

template <typename T>
struct Elem;

template <>
struct Elem<__half> {
  using Acc = float;
  static __device__ __forceinline__ float Load(__half v) {
    return __half2float(v);
  }
  static __device__ __forceinline__ __half Store(float v) {
    return __float2half_rn(v);
  }
};

template <>
struct Elem<__nv_bfloat16> {
  using Acc = float;
  static __device__ __forceinline__ float Load(__nv_bfloat16 v) {
    return __bfloat162float(v);
  }
  static __device__ __forceinline__ __nv_bfloat16 Store(float v) {
    return __float2bfloat16_rn(v);
  }
};

template <>
struct Elem<float> {
  using Acc = float;
  static __device__ __forceinline__ float Load(float v) { return v; }
  static __device__ __forceinline__ float Store(float v) { return v; }
};

template <>
struct Elem<double> {
  using Acc = double;
  static __device__ __forceinline__ double Load(double v) { return v; }
  static __device__ __forceinline__ double Store(double v) { return v; }
};

}  // namespace gpu
}  // namespace tf_sparseconv

#endif  // TF_SPARSECONV_CC_KERNELS_GPU_ELEM_CU_H_
