// Element types of the CUDA kernels (no TensorFlow headers): the arithmetic
// type of each storage type (float for half/bfloat16) and its conversions,
// and DispatchFormat, the storage type of a FloatFormat. Shared by every
// *_gpu.cu.cc.
#ifndef TF_SPARSECONV_CC_KERNELS_GPU_ELEM_CU_H_
#define TF_SPARSECONV_CC_KERNELS_GPU_ELEM_CU_H_

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "tf_sparseconv/cc/kernels/float_format.h"

namespace tf_sparseconv {
namespace gpu {

template <typename T>
struct Elem;

template <>
struct Elem<__half> {
  using Acc = float;
  static __device__ __forceinline__ float Load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half Store(float v) { return __float2half_rn(v); }
};

template <>
struct Elem<__nv_bfloat16> {
  using Acc = float;
  static __device__ __forceinline__ float Load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 Store(float v) { return __float2bfloat16_rn(v); }
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

// A type as a value, for the generic lambdas DispatchFormat calls.
template <typename T>
struct TypeTag {
  using type = T;
};

// fn(TypeTag<T>{}) with T the CUDA storage type of `format` (__half,
// __nv_bfloat16, float, double); `unknown` for a format out of range. E.g.
//   return DispatchFormat(format, kUnknownFormat, [&](auto tag) {
//     return LaunchTyped<typename decltype(tag)::type>(...);
//   });
template <typename Fn>
const char* DispatchFormat(FloatFormat format, const char* unknown, Fn&& fn) {
  switch (format) {
    case FloatFormat::kHalf:
      return fn(TypeTag<__half>{});
    case FloatFormat::kBFloat16:
      return fn(TypeTag<__nv_bfloat16>{});
    case FloatFormat::kFloat:
      return fn(TypeTag<float>{});
    case FloatFormat::kDouble:
      return fn(TypeTag<double>{});
  }
  return unknown;
}

}  // namespace gpu
}  // namespace tf_sparseconv

#endif  // TF_SPARSECONV_CC_KERNELS_GPU_ELEM_CU_H_
