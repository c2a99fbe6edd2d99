// CUDA kernels of StreamingConvStep behind a TensorFlow-independent launcher
// (streaming_launcher.h): one thread per output element y[b, j, f] (f fastest,
// so a warp reads one kernel row coalesced and broadcasts the frame value),
// and a copy of the last frames into the new history.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "tf_sparseconv/cc/kernels/float_format.h"
#include "tf_sparseconv/cc/kernels/gpu_elem.cu.h"
#include "tf_sparseconv/cc/kernels/gpu_util.cu.h"
#include "tf_sparseconv/cc/kernels/streaming_common.h"
#include "tf_sparseconv/cc/kernels/streaming_launcher.h"

namespace tf_sparseconv {
namespace {

using gpu::Elem;
using gpu::LastError;

constexpr int kThreads = 256;
constexpr int64_t kMaxGridBlocks = int64_t{1} << 20;

// z[b, p] of concat(history, frames).
template <typename T>
__device__ __forceinline__ const T* Frame(const T* history, const T* frames, int64_t b, int64_t p,
                                          const StreamingGeometry& g) {
  return p < g.hist ? history + (b * g.hist + p) * g.channels
                    : frames + (b * g.steps + p - g.hist) * g.channels;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    StepKernel(const T* __restrict__ history, const T* __restrict__ frames,
               const T* __restrict__ kernel, const T* __restrict__ bias, bool relu,
               T* __restrict__ y, StreamingGeometry g) {
  using A = typename Elem<T>::Acc;
  const int64_t total = g.batch * g.steps * g.filters;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t f = idx % g.filters;
    const int64_t row = idx / g.filters;
    const int64_t b = row / g.steps, j = row % g.steps;
    A acc = bias != nullptr ? Elem<T>::Load(bias[f]) : A(0);
    for (int64_t i = 0; i < g.taps; ++i) {
      const T* z = Frame(history, frames, b, j + i * g.dilation, g);
      const T* w = kernel + i * g.channels * g.filters + f;
      for (int64_t c = 0; c < g.channels; ++c) {
        acc += Elem<T>::Load(z[c]) * Elem<T>::Load(w[c * g.filters]);
      }
    }
    if (relu && acc < A(0)) acc = A(0);  // (NaN stays NaN, as in tf.nn.relu)
    y[idx] = Elem<T>::Store(acc);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    HistoryKernel(const T* __restrict__ history, const T* __restrict__ frames,
                  T* __restrict__ new_history, StreamingGeometry g) {
  const int64_t total = g.batch * g.hist * g.channels;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = idx % g.channels;
    const int64_t q = idx / g.channels % g.hist;
    const int64_t b = idx / (g.channels * g.hist);
    new_history[idx] = Frame(history, frames, b, g.steps + q, g)[c];
  }
}

unsigned GridFor(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < kMaxGridBlocks ? blocks : kMaxGridBlocks);
}

template <typename T>
const char* StepTyped(const void* history, const void* frames, const void* kernel, const void* bias,
                      bool relu, void* y, void* new_history, const StreamingGeometry& g,
                      cudaStream_t stream) {
  const int64_t outputs = g.batch * g.steps * g.filters;
  if (outputs > 0) {
    StepKernel<T><<<GridFor(outputs), kThreads, 0, stream>>>(
        static_cast<const T*>(history), static_cast<const T*>(frames),
        static_cast<const T*>(kernel), static_cast<const T*>(bias), relu, static_cast<T*>(y), g);
  }
  const int64_t kept = g.batch * g.hist * g.channels;
  if (kept > 0) {
    HistoryKernel<T><<<GridFor(kept), kThreads, 0, stream>>>(static_cast<const T*>(history),
                                                             static_cast<const T*>(frames),
                                                             static_cast<T*>(new_history), g);
  }
  return LastError();
}

}  // namespace

const char* LaunchStreamingConvStepGpu(FloatFormat format, const void* history, const void* frames,
                                       const void* kernel, const void* bias, bool relu, void* y,
                                       void* new_history, const StreamingGeometry& g,
                                       void* stream) {
  if (g.batch < 0 || g.steps < 0 || g.channels < 0 || g.filters < 0 || g.taps < 1 ||
      g.dilation < 1) {
    return "tsc_streaming: negative dimension, taps < 1 or dilation < 1";
  }
  if (g.hist != (g.taps - 1) * g.dilation) {
    return "tsc_streaming: hist must be (taps - 1) * dilation";
  }
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return gpu::DispatchFormat(format, "tsc_streaming: unknown float format", [&](auto tag) {
    using T = typename decltype(tag)::type;
    return StepTyped<T>(history, frames, kernel, bias, relu, y, new_history, g, st);
  });
}

}  // namespace tf_sparseconv
