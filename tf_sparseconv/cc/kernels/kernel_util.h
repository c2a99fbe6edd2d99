// The preamble of the OpKernels of every op family: the TensorFlow names they
// use, the device aliases, one registration macro over the four float types,
// CPU parallel loops on TensorFlow's thread pool and the raw CUDA stream
// handed to the TF-independent GPU launchers.
#ifndef TF_SPARSECONV_CC_KERNELS_KERNEL_UTIL_H_
#define TF_SPARSECONV_CC_KERNELS_KERNEL_UTIL_H_

#include <cstdint>
#include <functional>
#include <string>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/lib/core/threadpool.h"
#include "tf_sparseconv/cc/kernels/dtype_traits.h"

#if TF_SPARSECONV_CUDA
#include "xla/stream_executor/stream.h"
#endif

namespace tf_sparseconv {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Status;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
namespace errors = ::tensorflow::errors;

// The devices a functor or kernel class is templated on.
using CPUDevice = Eigen::ThreadPoolDevice;
#if TF_SPARSECONV_CUDA
using GPUDevice = Eigen::GpuDevice;
#endif

// Registration of a family's kernels: REGISTER(DEV, T) is expanded for DEV in
// CPU (and GPU in CUDA builds) and T in the four float types. Inside it,
// TSC_DEVICE(DEV) is the device name (::tensorflow::DEVICE_CPU),
// DEV##Device the device type (CPUDevice) and TSC_ON_GPU(DEV, ...) its
// arguments on the GPU only (e.g. `.HostMemory("k")`). For example:
//   #define REGISTER(DEV, T)                                              \
//     REGISTER_KERNEL_BUILDER(                                            \
//         Name("TfSparseConv>Op").Device(TSC_DEVICE(DEV)).TypeConstraint<T>("T"), \
//         MyOp<DEV##Device, T>);
//   TSC_REGISTER_FLOAT_KERNELS(REGISTER)
//   #undef REGISTER
#define TSC_DEVICE(DEV) ::tensorflow::DEVICE_##DEV
#define TSC_ON_GPU(DEV, ...) TSC_ON_GPU_##DEV(__VA_ARGS__)
#define TSC_ON_GPU_CPU(...)
#define TSC_ON_GPU_GPU(...) __VA_ARGS__
#define TSC_FOR_FLOAT_TYPES(REGISTER, DEV) \
  REGISTER(DEV, Eigen::half)               \
  REGISTER(DEV, Eigen::bfloat16)           \
  REGISTER(DEV, float)                     \
  REGISTER(DEV, double)
#if TF_SPARSECONV_CUDA
#define TSC_REGISTER_FLOAT_KERNELS(REGISTER) \
  TSC_FOR_FLOAT_TYPES(REGISTER, CPU)         \
  TSC_FOR_FLOAT_TYPES(REGISTER, GPU)
#else
#define TSC_REGISTER_FLOAT_KERNELS(REGISTER) TSC_FOR_FLOAT_TYPES(REGISTER, CPU)
#endif

// *is = (the string attribute `name` == value): the kernels' choice
// attributes (e.g. per = "sample" | "channel").
inline Status StringAttrIs(OpKernelConstruction* ctx, const char* name, const char* value,
                           bool* is) {
  std::string attr;
  TF_RETURN_IF_ERROR(ctx->GetAttr(name, &attr));
  *is = attr == value;
  return ::tensorflow::OkStatus();
}

// An input's rank check with the kernels' message: `what` (e.g. "x must be
// [B, H, W, C]") followed by ", got shape " and the tensor's shape.
inline Status CheckRank(const Tensor& t, int rank, const char* what) {
  if (t.dims() == rank) return ::tensorflow::OkStatus();
  return errors::InvalidArgument(what, ", got shape ", t.shape().DebugString());
}

// fn(begin, end) over [0, total) on the op's CPU worker threads; `cost_per_unit`
// (in cycles, roughly) lets TensorFlow choose the shard size.
inline void ParallelFor(::tensorflow::OpKernelContext* ctx, int64_t total, int64_t cost_per_unit,
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
