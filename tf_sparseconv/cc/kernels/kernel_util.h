// Helpers shared by the OpKernels of every op family: the storage format of
// each supported dtype, CPU parallel loops on TensorFlow's thread pool, and
// the raw CUDA stream handed to the TF-independent GPU launchers.
#ifndef TF_SPARSECONV_CC_KERNELS_KERNEL_UTIL_H_
#define TF_SPARSECONV_CC_KERNELS_KERNEL_UTIL_H_

#include <cstdint>
#include <functional>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/lib/core/threadpool.h"
#include "tf_sparseconv/cc/kernels/topk_common.h"

#if TF_SPARSECONV_CUDA
#include "xla/stream_executor/stream.h"
#endif

namespace tf_sparseconv {

// Storage type (an unsigned integer of the same width), float format and bit
// layout of each supported dtype.
template <typename T>
struct DTypeTraits;
template <>
struct DTypeTraits<Eigen::half> {
  using U = uint16_t;
  static constexpr FloatFormat kFormat = FloatFormat::kHalf;
  static FormatBits<U> Bits() { return HalfBits(); }
};
template <>
struct DTypeTraits<Eigen::bfloat16> {
  using U = uint16_t;
  static constexpr FloatFormat kFormat = FloatFormat::kBFloat16;
  static FormatBits<U> Bits() { return BFloat16Bits(); }
};
template <>
struct DTypeTraits<float> {
  using U = uint32_t;
  static constexpr FloatFormat kFormat = FloatFormat::kFloat;
  static FormatBits<U> Bits() { return FloatBits(); }
};
template <>
struct DTypeTraits<double> {
  using U = uint64_t;
  static constexpr FloatFormat kFormat = FloatFormat::kDouble;
  static FormatBits<U> Bits() { return DoubleBits(); }
};

// Arithmetic (accumulation) type of each storage type: float for the 16-bit
// types, else the type itself.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

// fn(begin, end) over [0, total) on the op's CPU worker threads; `cost_per_unit`
// (in cycles, roughly) lets TensorFlow choose the shard size.
inline void ParallelFor(::tensorflow::OpKernelContext* ctx, int64_t total,
                        int64_t cost_per_unit,
                        const std::function<void(int64_t, int64_t)>& fn) {
  if (total <= 0) return;
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  workers->ParallelFor(total, cost_per_unit, fn);
}

#if TF_SPARSECONV_CUDA
// The op's cudaStream_t, as the void* the launchers take.
inline void* GpuStream(::tensorflow::OpKernelContext* ctx) {
  return ctx->op_device_context()->stream()->platform_specific_handle().stream;
}
#endif

}  // namespace tf_sparseconv

#endif  // TF_SPARSECONV_CC_KERNELS_KERNEL_UTIL_H_
