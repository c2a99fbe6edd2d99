// The device functor of the channel-sparse convolution ops: the kernel classes
// (channel_sparse_op.cc) call ChannelSparseFunctor<Device, T>; the CPU
// specialisation is the engine in channel_sparse_cpu.cc, the GPU one calls the
// launchers of channel_sparse_op_gpu.cu.cc.
#ifndef TF_SPARSECONV_CC_KERNELS_CHANNEL_SPARSE_FUNCTOR_H_
#define TF_SPARSECONV_CC_KERNELS_CHANNEL_SPARSE_FUNCTOR_H_

#include <cstdint>
#include <type_traits>

#include "tf_sparseconv/cc/kernels/channel_sparse_common.h"
#include "tf_sparseconv/cc/kernels/kernel_util.h"

namespace tf_sparseconv {

// What the forward op applies to each output before storing it:
// activation(y + bias[o]) (bias may be null; relu or none).
template <typename T>
struct Epilogue {
  const T* bias = nullptr;
  bool relu = false;
};

template <typename Device, typename T>
struct ChannelSparseFunctor;

// The connections live in host memory (and are validated) on the CPU only;
// the GPU functor reads them on the device and skips out-of-range entries.
template <typename Device>
constexpr bool kCheckConnections = std::is_same<Device, CPUDevice>::value;

// Defined (and instantiated for the four float types) in channel_sparse_cpu.cc.
template <typename T>
struct ChannelSparseFunctor<CPUDevice, T> {
  static void Forward(OpKernelContext* ctx, const T* x, const T* kernel, const int32_t* conn, T* y,
                      const ChannelSparseGeometry& g, const Epilogue<T>& epilogue);
  static void BackpropInput(OpKernelContext* ctx, const T* dy, const T* kernel, const int32_t* conn,
                            T* dx, const ChannelSparseGeometry& g);
  static void BackpropKernel(OpKernelContext* ctx, const T* x, const T* dy, const int32_t* conn,
                             T* dkernel, const ChannelSparseGeometry& g);
};

}  // namespace tf_sparseconv

#endif  // TF_SPARSECONV_CC_KERNELS_CHANNEL_SPARSE_FUNCTOR_H_
