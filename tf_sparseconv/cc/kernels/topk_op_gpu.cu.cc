// GPU kernels of the top-k selection family (TensorFlow-independent).
//
// Defines the launchers declared in topk_launcher.h. No TensorFlow headers:
// the file is built by the TF op build and, standalone, by tests/gpu/build.py.
//
// Checked to compile (nvcc 13.0, -x cu -std=c++17 --expt-relaxed-constexpr
// -Xcompiler -fPIC -O3, also with -Xcompiler -Wall,-Wextra) without warnings
// and without register spills of note for:
//   (no -gencode: nvcc 13's default, sm_75)
//   -gencode arch=compute_75,code=sm_75
//   -gencode arch=compute_80,code=sm_80
//   -gencode arch=compute_90,code=[sm_90,compute_90]
// nvcc 13 no longer accepts sm_70 ("Unsupported gpu architecture
// 'compute_70'"); the code itself only needs warp shuffles and shared-memory
// atomics, so an older nvcc could still target sm_70.
//
// Algorithm (per slice (o, c) of `size` entries with stride `inner`):
//   1. Radix select over the ordered keys (topk_common.h), 8-bit digits from
//      the most significant one (2, 4 or 8 passes; stops early as soon as
//      the digit bin holding the k-th largest key is taken whole). Each pass
//      builds a 256-bin histogram in shared memory of the keys that still
//      match the selected prefix. The result is a masked threshold
//      (prefix, mask) and krem: winners are the keys with
//      (key & mask) > prefix, plus the first krem keys (by position) with
//      (key & mask) == prefix.
//   2. An ordered block-wide scan over positions (chunks of B * R entries)
//      counts, for every entry, the "greater" and "equal" entries before it;
//      a winner's output slot is greater_before + min(equal_before, krem).
//      Every y entry of the slice is written here (x bits or zero).
// One thread block per slice (grid-stride over slices); the block size is
// chosen by the slice length. Slices that fit one chunk keep their values in
// registers, so short slices read x once. No global scratch, no allocation.
#include <cuda_runtime.h>

#include <cstdint>

#include "tf_sparseconv/cc/kernels/gpu_util.cu.h"
#include "tf_sparseconv/cc/kernels/topk_common.h"
#include "tf_sparseconv/cc/kernels/topk_launcher.h"

namespace tf_sparseconv {
namespace {

constexpr int kWarpSize = 32;
constexpr int kRadixBits = 8;
constexpr int kBins = 1 << kRadixBits;
constexpr int kBinsPerLane = kBins / kWarpSize;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxGridBlocks = int64_t{1} << 20;

__device__ __forceinline__ uint32_t MinU32(uint32_t a, uint32_t b) { return a < b ? a : b; }

// Shared memory of one block of the mask kernel.
template <int B, int R>
struct MaskSmem {
  static constexpr int kNumWarps = B / kWarpSize;
  static constexpr int kScanEntries = R * kNumWarps;
  // Radix histogram. Zero at the start of every pass (invariant).
  unsigned int hist[kBins];
  // Per-(row, warp) totals of a chunk, then their exclusive prefixes.
  // Double-buffered across chunks. Packed counts: greater << 16 | equal.
  unsigned int scan[2][kScanEntries];
  unsigned int chunk_total[2];
  // Result of the bin search of a radix pass.
  unsigned int sel_digit;
  unsigned int sel_above;
  unsigned int sel_count;
};

// One block per slice. B threads, R entries per thread per chunk.
template <typename U, int B, int R>
__global__ void __launch_bounds__(B)
    TopKMaskKernel(const U* __restrict__ x, U* __restrict__ y, int32_t* __restrict__ indices,
                   int64_t outer, int64_t size, int64_t inner, int64_t k, FormatBits<U> f,
                   ScoreMode mode) {
  static_assert(B % kWarpSize == 0 && B >= kWarpSize && B <= 1024, "B");
  static_assert(R >= 1, "R");
  static_assert(B * R < (1 << 16), "packed 16-bit counts per chunk");
  using Smem = MaskSmem<B, R>;
  constexpr int kChunk = B * R;
  constexpr int kPasses = static_cast<int>(sizeof(U)) * 8 / kRadixBits;
  constexpr int kScanEntries = Smem::kScanEntries;
  constexpr int kScanPerLane = (kScanEntries + kWarpSize - 1) / kWarpSize;

  __shared__ Smem sm;

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & (kWarpSize - 1);
  const int warp = tid / kWarpSize;
  const int64_t slices = outer * inner;
  const uint32_t n = static_cast<uint32_t>(size);  // size < 2^31
  const uint32_t kk = static_cast<uint32_t>(k);    // 1 <= k <= size
  const bool single_chunk = n <= static_cast<uint32_t>(kChunk);
  const bool relu = mode == ScoreMode::kRelu;

  for (int i = tid; i < kBins; i += B) sm.hist[i] = 0u;
  __syncthreads();

  for (int64_t s = blockIdx.x; s < slices; s += gridDim.x) {
    const int64_t o = s / inner;
    const int64_t c = s - o * inner;
    const U* xs = x + o * size * inner + c;
    U* ys = y + o * size * inner + c;
    int32_t* is = indices + o * k * inner + c;

    // Bits of the current chunk (kept across passes when single_chunk).
    U bits[R];
    if (single_chunk) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const uint32_t pos = static_cast<uint32_t>(r * B + tid);
        bits[r] = pos < n ? xs[static_cast<int64_t>(pos) * inner] : U(0);
      }
    }

    // ---- 1. radix select ----------------------------------------------
    U prefix = 0;
    U mask = 0;
    uint32_t krem = kk;
    if (kk < n) {
      for (int pass = 0; pass < kPasses; ++pass) {
        const int shift = (kPasses - 1 - pass) * kRadixBits;
        for (uint32_t start = 0; start < n; start += kChunk) {
          if (!single_chunk) {
#pragma unroll
            for (int r = 0; r < R; ++r) {
              const uint32_t pos = start + static_cast<uint32_t>(r * B + tid);
              bits[r] = pos < n ? xs[static_cast<int64_t>(pos) * inner] : U(0);
            }
          }
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const uint32_t pos = start + static_cast<uint32_t>(r * B + tid);
            if (pos < n) {
              const U key = OrderedKey<U>(bits[r], f, mode);
              if (static_cast<U>(key & mask) == prefix) {
                const unsigned digit = static_cast<unsigned>(key >> shift) & (kBins - 1u);
                atomicAdd(&sm.hist[digit], 1u);
              }
            }
          }
        }
        __syncthreads();
        if (warp == 0) {
          // Lane l owns bins [l * 8, l * 8 + 8). Find the bin d with
          // (#candidates with digit > d) < krem <= (#... with digit >= d).
          unsigned own[kBinsPerLane];
          unsigned lane_sum = 0;
#pragma unroll
          for (int b = 0; b < kBinsPerLane; ++b) {
            own[b] = sm.hist[lane * kBinsPerLane + b];
            lane_sum += own[b];
            sm.hist[lane * kBinsPerLane + b] = 0u;  // ready for next pass
          }
          // Inclusive suffix sum over lanes (lanes >= this one).
          unsigned suffix = lane_sum;
#pragma unroll
          for (int off = 1; off < kWarpSize; off <<= 1) {
            const unsigned t = __shfl_down_sync(kFullMask, suffix, off);
            if (lane + off < kWarpSize) suffix += t;
          }
          unsigned cum = suffix - lane_sum;  // candidates in higher lanes
#pragma unroll
          for (int b = kBinsPerLane - 1; b >= 0; --b) {
            if (cum < krem && cum + own[b] >= krem) {
              sm.sel_digit = static_cast<unsigned>(lane * kBinsPerLane + b);
              sm.sel_above = cum;
              sm.sel_count = own[b];
            }
            cum += own[b];
          }
        }
        __syncthreads();
        const unsigned digit = sm.sel_digit;
        const unsigned above = sm.sel_above;
        const unsigned count = sm.sel_count;
        prefix = static_cast<U>(prefix | (static_cast<U>(digit) << shift));
        mask = static_cast<U>(mask | (static_cast<U>(kBins - 1) << shift));
        krem -= above;
        if (count == krem) break;  // the whole bin wins (block-uniform)
      }
    }
    // Now exactly k - krem keys have (key & mask) > prefix, and at least
    // krem keys have (key & mask) == prefix.

    // ---- 2. ordered scan: emit y and indices ----------------------------
    uint32_t run_gt = 0;  // "greater" entries before the current chunk
    uint32_t run_eq = 0;  // "equal" entries before the current chunk
    int buf = 0;
    for (uint32_t start = 0; start < n; start += kChunk, buf ^= 1) {
      if (run_gt + MinU32(run_eq, krem) == kk) {
        // All winners emitted (block-uniform): the rest of y is zero.
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const uint32_t pos = start + static_cast<uint32_t>(r * B + tid);
          if (pos < n) ys[static_cast<int64_t>(pos) * inner] = U(0);
        }
        continue;
      }
      if (!single_chunk) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const uint32_t pos = start + static_cast<uint32_t>(r * B + tid);
          bits[r] = pos < n ? xs[static_cast<int64_t>(pos) * inner] : U(0);
        }
      }
      // Packed flags / counts: greater << 16 | equal (at most B * R each).
      unsigned flags[R];
      unsigned incl[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const uint32_t pos = start + static_cast<uint32_t>(r * B + tid);
        unsigned v = 0u;
        if (pos < n) {
          const U mk = static_cast<U>(OrderedKey<U>(bits[r], f, mode) & mask);
          if (mk > prefix) {
            v = 1u << 16;
          } else if (mk == prefix) {
            v = 1u;
          }
        }
        flags[r] = v;
        incl[r] = v;
      }
      // Warp-level inclusive scans, one per row r.
#pragma unroll
      for (int off = 1; off < kWarpSize; off <<= 1) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const unsigned t = __shfl_up_sync(kFullMask, incl[r], off);
          if (lane >= off) incl[r] += t;
        }
      }
      if (lane == kWarpSize - 1) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          sm.scan[buf][r * Smem::kNumWarps + warp] = incl[r];
        }
      }
      __syncthreads();
      if (warp == 0) {
        // Exclusive scan of the (row, warp) totals in row-major order, which
        // is the order of positions.
        const int first = lane * kScanPerLane;
        unsigned vals[kScanPerLane];
        unsigned lane_sum = 0u;
#pragma unroll
        for (int e = 0; e < kScanPerLane; ++e) {
          vals[e] = first + e < kScanEntries ? sm.scan[buf][first + e] : 0u;
          lane_sum += vals[e];
        }
        unsigned lane_incl = lane_sum;
#pragma unroll
        for (int off = 1; off < kWarpSize; off <<= 1) {
          const unsigned t = __shfl_up_sync(kFullMask, lane_incl, off);
          if (lane >= off) lane_incl += t;
        }
        unsigned acc = lane_incl - lane_sum;
#pragma unroll
        for (int e = 0; e < kScanPerLane; ++e) {
          if (first + e < kScanEntries) sm.scan[buf][first + e] = acc;
          acc += vals[e];
        }
        if (lane == kWarpSize - 1) sm.chunk_total[buf] = lane_incl;
      }
      __syncthreads();
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const uint32_t pos = start + static_cast<uint32_t>(r * B + tid);
        if (pos >= n) continue;
        const unsigned before = sm.scan[buf][r * Smem::kNumWarps + warp] + incl[r] - flags[r];
        const uint32_t gt_before = run_gt + (before >> 16);
        const uint32_t eq_before = run_eq + (before & 0xffffu);
        const bool is_gt = (flags[r] >> 16) != 0u;
        const bool is_eq = (flags[r] & 0xffffu) != 0u;
        const int64_t y_off = static_cast<int64_t>(pos) * inner;
        if (is_gt || (is_eq && eq_before < krem)) {
          const uint32_t j = gt_before + MinU32(eq_before, krem);
          const bool keep = !relu || IsPositive<U>(bits[r], f);
          ys[y_off] = keep ? bits[r] : U(0);
          is[static_cast<int64_t>(j) * inner] = keep ? static_cast<int32_t>(pos) : int32_t{-1};
        } else {
          ys[y_off] = U(0);
        }
      }
      const unsigned total = sm.chunk_total[buf];
      run_gt += total >> 16;
      run_eq += total & 0xffffu;
    }
    // Keep the scan buffers and the selection of this slice alive until
    // every thread is done with them.
    __syncthreads();
  }
}

// dx[o, indices[o, j, c], c] = dy[...] for indices >= 0 (dx is zeroed
// beforehand on the same stream).
template <typename U>
__global__ void TopKMaskGradKernel(const U* __restrict__ dy, const int32_t* __restrict__ indices,
                                   U* __restrict__ dx, int64_t outer, int64_t size, int64_t inner,
                                   int64_t k) {
  const int64_t total = outer * k * inner;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += stride) {
    const int32_t idx = indices[e];
    if (idx < 0 || idx >= size) continue;
    const int64_t o = e / (k * inner);
    const int64_t c = e - (e / inner) * inner;
    const int64_t off = (o * size + idx) * inner + c;
    dx[off] = dy[off];
  }
}

using gpu::Check;
using gpu::LastError;

int64_t GridFor(int64_t work) { return work < kMaxGridBlocks ? work : kMaxGridBlocks; }

template <typename U, int B, int R>
const char* LaunchMaskConfig(FormatBits<U> f, ScoreMode mode, const void* x, void* y,
                             int32_t* indices, const TopKGeometry& g, cudaStream_t stream) {
  const int64_t grid = GridFor(g.outer * g.inner);
  TopKMaskKernel<U, B, R><<<static_cast<unsigned>(grid), B, 0, stream>>>(
      static_cast<const U*>(x), static_cast<U*>(y), indices, g.outer, g.size, g.inner, g.k, f,
      mode);
  return LastError();
}

template <typename U>
const char* LaunchMaskTyped(FormatBits<U> f, ScoreMode mode, const void* x, void* y,
                            int32_t* indices, const TopKGeometry& g, cudaStream_t stream) {
  if (g.size <= 256) {
    return LaunchMaskConfig<U, 64, 4>(f, mode, x, y, indices, g, stream);
  }
  if (g.size <= 2048) {
    return LaunchMaskConfig<U, 256, 8>(f, mode, x, y, indices, g, stream);
  }
  if (g.size <= 16384) {
    return LaunchMaskConfig<U, 512, 8>(f, mode, x, y, indices, g, stream);
  }
  return LaunchMaskConfig<U, 1024, 4>(f, mode, x, y, indices, g, stream);
}

// Validates a geometry; returns an error string or nullptr.
const char* CheckGeometry(const TopKGeometry& g) {
  if (g.outer < 0 || g.size < 0 || g.inner < 0) {
    return "tsc_topk: negative dimension";
  }
  if (g.k < 0 || g.k > g.size) return "tsc_topk: k must be in [0, size]";
  if (g.size > INT32_MAX) {
    return "tsc_topk: size must be < 2^31 (int32 indices)";
  }
  if (g.outer > 0 && g.inner > 0 && g.size > 0 && g.size > INT64_MAX / g.outer / g.inner) {
    return "tsc_topk: tensor too large";
  }
  return nullptr;
}

}  // namespace

const char* LaunchTopKMaskGpu(FloatFormat format, ScoreMode mode, const void* x, void* y,
                              int32_t* indices, TopKGeometry geometry, void* stream) {
  const int bytes = FormatBytes(format);
  if (bytes == 0) return "tsc_topk: unknown float format";
  if (mode != ScoreMode::kValue && mode != ScoreMode::kAbs && mode != ScoreMode::kRelu) {
    return "tsc_topk: unknown score mode";
  }
  if (const char* err = CheckGeometry(geometry)) return err;
  const TopKGeometry& g = geometry;
  if (g.outer == 0 || g.inner == 0 || g.size == 0) return nullptr;  // empty
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (g.k == 0) {
    return Check(cudaMemsetAsync(y, 0, static_cast<size_t>(g.outer * g.size * g.inner) * bytes, s));
  }
  switch (format) {
    case FloatFormat::kHalf:
      return LaunchMaskTyped<uint16_t>(HalfBits(), mode, x, y, indices, g, s);
    case FloatFormat::kBFloat16:
      return LaunchMaskTyped<uint16_t>(BFloat16Bits(), mode, x, y, indices, g, s);
    case FloatFormat::kFloat:
      return LaunchMaskTyped<uint32_t>(FloatBits(), mode, x, y, indices, g, s);
    case FloatFormat::kDouble:
      return LaunchMaskTyped<uint64_t>(DoubleBits(), mode, x, y, indices, g, s);
  }
  return "tsc_topk: unknown float format";
}

const char* LaunchTopKMaskGradGpu(int element_bytes, const void* dy, const int32_t* indices,
                                  void* dx, TopKGeometry geometry, void* stream) {
  if (element_bytes != 2 && element_bytes != 4 && element_bytes != 8) {
    return "tsc_topk: element_bytes must be 2, 4 or 8";
  }
  if (const char* err = CheckGeometry(geometry)) return err;
  const TopKGeometry& g = geometry;
  const int64_t elements = g.outer * g.size * g.inner;
  if (elements == 0) return nullptr;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (const char* err =
          Check(cudaMemsetAsync(dx, 0, static_cast<size_t>(elements) * element_bytes, s))) {
    return err;
  }
  const int64_t entries = g.outer * g.k * g.inner;
  if (entries == 0) return nullptr;
  constexpr int kThreads = 256;
  const unsigned grid = static_cast<unsigned>(GridFor((entries + kThreads - 1) / kThreads));
  switch (element_bytes) {
    case 2:
      TopKMaskGradKernel<uint16_t><<<grid, kThreads, 0, s>>>(static_cast<const uint16_t*>(dy),
                                                             indices, static_cast<uint16_t*>(dx),
                                                             g.outer, g.size, g.inner, g.k);
      break;
    case 4:
      TopKMaskGradKernel<uint32_t><<<grid, kThreads, 0, s>>>(static_cast<const uint32_t*>(dy),
                                                             indices, static_cast<uint32_t*>(dx),
                                                             g.outer, g.size, g.inner, g.k);
      break;
    default:
      TopKMaskGradKernel<uint64_t><<<grid, kThreads, 0, s>>>(static_cast<const uint64_t*>(dy),
                                                             indices, static_cast<uint64_t*>(dx),
                                                             g.outer, g.size, g.inner, g.k);
      break;
  }
  return LastError();
}

}  // namespace tf_sparseconv
