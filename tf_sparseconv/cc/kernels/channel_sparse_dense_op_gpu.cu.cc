// CUDA kernels of ChannelSparseDenseKernel and ChannelSparseGatherKernel
// behind a TensorFlow-independent launcher (channel_sparse_dense_launcher.h):
// one thread per kernel element (t, j, o), o fastest, so a warp reads the
// sparse kernel coalesced. The dense kernel is zeroed first; distinct
// connections per row make every placement write a different element.
#include <cuda_runtime.h>

#include <cstdint>

#include "tf_sparseconv/cc/kernels/channel_sparse_dense_launcher.h"

namespace tf_sparseconv {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridBlocks = int64_t{1} << 20;

// Both directions: kernel index (t, j, o) <-> dense index (t, c, o) with
// c = connections[o, j]; `to_dense` places, else gathers (zero for c out of range).
template <typename U, bool to_dense>
__global__ void __launch_bounds__(kThreads)
    PlaceKernel(const U* __restrict__ src, const int32_t* __restrict__ connections,
                U* __restrict__ dst, int64_t taps, int64_t m, int64_t cout, int64_t cin) {
  const int64_t total = taps * m * cout;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = idx % cout;
    const int64_t j = idx / cout % m;
    const int64_t t = idx / (cout * m);
    const int32_t c = connections[o * m + j];
    const bool valid = c >= 0 && c < cin;
    const int64_t dense_idx = (t * cin + c) * cout + o;
    if (to_dense) {
      if (valid) dst[dense_idx] = src[idx];
    } else {
      dst[idx] = valid ? src[dense_idx] : U(0);
    }
  }
}

template <bool to_dense>
const char* Launch(int elem_bytes, const void* src, const int32_t* connections, void* dst,
                   int64_t taps, int64_t m, int64_t cout, int64_t cin, void* stream) {
  if (taps < 0 || m < 0 || cout < 0 || cin < 0) return "channel_sparse_dense: negative size";
  if (elem_bytes != 2 && elem_bytes != 4 && elem_bytes != 8) {
    return "channel_sparse_dense: elem_bytes must be 2, 4 or 8";
  }
  auto s = static_cast<cudaStream_t>(stream);
  if (to_dense && taps * cin * cout > 0) {
    if (cudaMemsetAsync(dst, 0, taps * cin * cout * elem_bytes, s) != cudaSuccess) {
      return "channel_sparse_dense: cudaMemsetAsync failed";
    }
  }
  const int64_t total = taps * m * cout;
  if (total == 0) return nullptr;
  const int64_t wanted = (total + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(wanted < kMaxGridBlocks ? wanted : kMaxGridBlocks);
  switch (elem_bytes) {
    case 2:
      PlaceKernel<uint16_t, to_dense>
          <<<blocks, kThreads, 0, s>>>(static_cast<const uint16_t*>(src), connections,
                                       static_cast<uint16_t*>(dst), taps, m, cout, cin);
      break;
    case 4:
      PlaceKernel<uint32_t, to_dense>
          <<<blocks, kThreads, 0, s>>>(static_cast<const uint32_t*>(src), connections,
                                       static_cast<uint32_t*>(dst), taps, m, cout, cin);
      break;
    case 8:
      PlaceKernel<uint64_t, to_dense>
          <<<blocks, kThreads, 0, s>>>(static_cast<const uint64_t*>(src), connections,
                                       static_cast<uint64_t*>(dst), taps, m, cout, cin);
      break;
    default:
      return "channel_sparse_dense: elem_bytes must be 2, 4 or 8";
  }
  return cudaGetLastError() == cudaSuccess ? nullptr : "channel_sparse_dense: kernel launch failed";
}

}  // namespace

const char* LaunchChannelSparseDenseKernelGpu(int elem_bytes, const void* kernel,
                                              const int32_t* connections, void* dense, int64_t taps,
                                              int64_t m, int64_t cout, int64_t cin, void* stream) {
  return Launch<true>(elem_bytes, kernel, connections, dense, taps, m, cout, cin, stream);
}

const char* LaunchChannelSparseGatherKernelGpu(int elem_bytes, const void* dense,
                                               const int32_t* connections, void* kernel,
                                               int64_t taps, int64_t m, int64_t cout, int64_t cin,
                                               void* stream) {
  return Launch<false>(elem_bytes, dense, connections, kernel, taps, m, cout, cin, stream);
}

}  // namespace tf_sparseconv
