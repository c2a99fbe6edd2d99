// GPU kernels of the coordinate sparse convolution (TensorFlow-independent):
// SparseConvFeatures (gather -> GEMM per kernel offset -> scatter-add along a
// rulebook) and its kernel gradient SparseConvKernelGrad.
//
// Defines the launchers declared in coord_sparse_launcher.h. No TensorFlow
// headers: the file is built by the TF op build and, standalone, by
// tests/gpu/build.py. Semantics: coord_sparse_launcher.h and the CPU kernels
// in coord_sparse_conv_op.cc.
//
// Checked to compile (nvcc 13.0, -x cu -std=c++17 --expt-relaxed-constexpr
// -Xcompiler -fPIC -O3, also with -Xcompiler -Wall,-Wextra) without warnings
// for sm_75, sm_80 and sm_90 (+ compute_90 PTX). No atomics at all; half and
// bfloat16 only go through float conversions.
//
// Arithmetic type A: float for half / bfloat16 / float, double for double.
// Every load is converted to A, every store rounds once from A. Both kernels
// are deterministic: the summation order of every output element is a
// function of the shapes and the rulebook only (never of scheduling, grid
// size or device).
//
//  * Features ("output-stationary"): a thread block owns a tile of
//    kRows = 64 output rows x TN output channels (TN = 16, 32 or 64: the
//    smallest that covers cout, at most 64); each thread owns R x 4 outputs
//    (R = 4, 2 for TN = 16; rows ty + (64 / R) i, channels tx + (TN / 4) j)
//    and accumulates them in registers (256 / 128 / 128 threads per block).
//    For every offset k in order the block finds the run of k's pairs whose
//    dst lies in its rows (dst is non-decreasing within an offset) with a
//    block-wide blockDim-ary search (each step probes blockDim evenly spaced
//    pairs and counts those below the bound with __syncthreads_count), then
//    marks each tile row's own run [begin, end) of pairs. Round t (t = 0, 1,
//    ...; one round unless a dst repeats within the offset) takes the t-th
//    pair of every row that has one: a dense [64, cin] @ [cin, TN] product
//    of the gathered feature rows (zero rows for rows without a pair or with
//    src out of range) and kernel[k], cin staged through shared memory in
//    chunks of 16 (A tile stored transposed, B tile row-major; coalesced
//    global loads along channels). The product is accumulated in a separate
//    register tile and added to the row's accumulator only when the row has
//    a valid pair in the round, so rows without a pair are never touched
//    (no 0 * inf). Per output element the order is therefore:
//    offsets in order, pairs of an offset in order, each pair's dot product
//    over cin summed in channel order. Pairs with dst out of [0, num_out)
//    never fall in a tile; those with src out of [0, n) are skipped.
//  * Kernel grad: one block per task (k, cin tile of TI, cout tile of TJ),
//    TI, TJ in {16, 32, 64}: the smallest covering cin / cout, halved while
//    there are fewer than kGradTargetBlocks tasks. The block is G groups of
//    TI * TJ / 16 threads (4 x 4 outputs each, strided as above); the
//    offset's pairs are cut into slabs of kSlab = 16 consecutive pairs and
//    group g takes slabs g, g + G, g + 2G, ... in order (the block stages G
//    slabs at a time: src / dst of the pairs, then the gathered feature rows
//    [16 G, TI] and gradient rows [16 G, TJ] in shared memory; an
//    out-of-range pair stages zero rows on both sides, so it adds exact
//    zeros). At the end the groups' partial sums are added to group 0's in
//    group order through shared memory and group 0 writes the tile. G is a
//    function of (K, P, cin, cout, dtype) only: enough slabs per group
//    (about 4 on average), at most 512 threads and a shared-memory budget.
//    Without a workspace in the launcher contract there is no cross-block
//    reduction, so parallelism is bounded by the number of tasks.
// pair_ptr and pairs are read on the device; pair_ptr values are clamped to
// [0, P] (a malformed one cannot cause out-of-bounds reads). Global offsets
// are computed in int64, tile / task indices in 32 bits (checked). All work
// is on the given stream; no synchronisation, no allocation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "tf_sparseconv/cc/kernels/coord_sparse_launcher.h"
#include "tf_sparseconv/cc/kernels/float_format.h"
#include "tf_sparseconv/cc/kernels/gpu_elem.cu.h"
#include "tf_sparseconv/cc/kernels/gpu_util.cu.h"

namespace tf_sparseconv {
namespace {

using gpu::Elem;
using gpu::LastError;
using gpu::MemsetZero;
using gpu::MulNonNeg;

constexpr int64_t kMaxGridBlocks = int64_t{1} << 20;
constexpr int64_t kIndex32Limit = int64_t{1} << 31;

// Features: output rows per tile, input channels per staged chunk, outputs
// per thread (FeaturesRegRows(TN) rows x kRegCols channels).
constexpr int kRows = 64;
constexpr int kChunk = 16;
constexpr int kRegCols = 4;
// 4 rows per thread (2 for TN = 16): 256, 128, 128 threads for TN = 64, 32,
// 16, so that no thread stages more than 8 gathered values per chunk.
constexpr int FeaturesRegRows(int tn) { return tn <= 16 ? 2 : 4; }
constexpr int FeaturesThreads(int tn) { return (kRows / FeaturesRegRows(tn)) * (tn / kRegCols); }
// Padding of the transposed A tile: a row stride of 2 (mod 32) banks makes
// the staging stores (16 channels of 2 rows per warp) conflict-free.
constexpr int kRowsPadded = kRows + 2;
// Resident threads per SM the register allocation must allow: 512 (at most
// 128 registers per thread), 256 for double.
template <typename T>
constexpr int FeaturesMinBlocks(int tn) {
  return (sizeof(T) == 8 ? 256 : 512) / FeaturesThreads(tn);
}

// Kernel grad: pairs per slab, outputs per thread (4 x 4), block limits.
constexpr int kSlab = 16;
constexpr int kGradReg = 4;
constexpr int kGradMaxThreads = 512;
constexpr int64_t kGradSmemBudget = 40 * 1024;  // bytes of staging per block
constexpr int64_t kGradTargetBlocks = 256;
constexpr int64_t kGradSlabsPerGroup = 4;

constexpr const char* kUnknownFormat = "tsc_coord_sparse: unknown float format";
constexpr const char* kTooLarge = "tsc_coord_sparse: tensor too large";

// ---------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------

__device__ __forceinline__ int64_t PairSrc(const int32_t* __restrict__ pairs, int64_t p) {
  return __ldg(pairs + 2 * p);
}

__device__ __forceinline__ int64_t PairDst(const int32_t* __restrict__ pairs, int64_t p) {
  return __ldg(pairs + 2 * p + 1);
}

// The pairs [*lo, *hi) of offset k, with pair_ptr clamped to [0, num_pairs]
// and *hi >= *lo (a malformed pair_ptr cannot cause out-of-bounds reads).
__device__ __forceinline__ void OffsetRange(const int32_t* __restrict__ pair_ptr, int64_t k,
                                            int64_t num_pairs, int64_t* lo, int64_t* hi) {
  int64_t a = __ldg(pair_ptr + k);
  int64_t b = __ldg(pair_ptr + k + 1);
  a = a < 0 ? 0 : (a > num_pairs ? num_pairs : a);
  b = b < a ? a : (b > num_pairs ? num_pairs : b);
  *lo = a;
  *hi = b;
}

// First indices in [lo, hi) whose dst is >= v0, resp. >= v1 (hi if none), for
// dst non-decreasing over [lo, hi). Every thread of the block must call it
// with the same arguments; all get the same results. A blockDim-ary search:
// each step probes blockDim evenly spaced pairs of the remaining range and
// counts those below the bound (true on a prefix of the probes). Always
// terminates inside [lo, hi], even on unsorted input. Ranges come from the
// int32 pair_ptr, so lengths fit in 32 bits (no 64-bit division).
__device__ void BlockLowerBounds(const int32_t* __restrict__ pairs, int64_t lo, int64_t hi,
                                 int64_t v0, int64_t v1, int64_t* r0, int64_t* r1) {
  const uint32_t t = threadIdx.x;
  const uint32_t nt = blockDim.x;
  // The answer lies in [l, h]; each step shrinks h - l below the step.
  int64_t l0 = lo, h0 = hi, l1 = lo, h1 = hi;
  while (l0 < h0 || l1 < h1) {
    const uint32_t s0 = (static_cast<uint32_t>(h0 - l0) + nt - 1) / nt;
    const uint32_t s1 = (static_cast<uint32_t>(h1 - l1) + nt - 1) / nt;
    const int64_t q0 = l0 + static_cast<int64_t>(t) * s0;
    const int64_t q1 = l1 + static_cast<int64_t>(t) * s1;
    const bool below0 = q0 < h0 && PairDst(pairs, q0) < v0;
    const bool below1 = q1 < h1 && PairDst(pairs, q1) < v1;
    const int64_t c0 = __syncthreads_count(below0);
    const int64_t c1 = __syncthreads_count(below1);
    if (l0 < h0) {
      if (c0 == 0) {
        h0 = l0;
      } else {
        const int64_t base = l0;
        l0 = base + (c0 - 1) * s0 + 1;
        const int64_t end = base + c0 * s0;
        h0 = end < h0 ? end : h0;
      }
    }
    if (l1 < h1) {
      if (c1 == 0) {
        h1 = l1;
      } else {
        const int64_t base = l1;
        l1 = base + (c1 - 1) * s1 + 1;
        const int64_t end = base + c1 * s1;
        h1 = end < h1 ? end : h1;
      }
    }
  }
  *r0 = l0;
  *r1 = l1;
}

// ---------------------------------------------------------------------------
// Features
// ---------------------------------------------------------------------------

// out [num_out, cout]; one block per tile of kRows rows x TN channels
// (grid-stride over the tiles, channel tiles of a row tile adjacent).
template <typename T, int TN>
__global__ void __launch_bounds__(FeaturesThreads(TN), FeaturesMinBlocks<T>(TN))
    SparseConvFeaturesKernel(const T* __restrict__ features, int64_t n,
                             const T* __restrict__ kernel, int64_t num_offsets, int64_t cin,
                             int64_t cout, const int32_t* __restrict__ pair_ptr,
                             const int32_t* __restrict__ pairs, int64_t num_pairs, int64_t num_out,
                             T* __restrict__ out) {
  using Acc = typename Elem<T>::Acc;
  constexpr int kRegRows = FeaturesRegRows(TN);
  constexpr int kRowThreads = kRows / kRegRows;
  constexpr int kColThreads = TN / kRegCols;
  constexpr int kThreads = FeaturesThreads(TN);
  constexpr int kALoads = kRows * kChunk / kThreads;
  constexpr int kBLoads = kChunk * TN / kThreads;
  static_assert(kRows * kChunk % kThreads == 0, "A tile split");
  static_assert(kChunk * TN % kThreads == 0, "B tile split");
  static_assert(kThreads >= kRows, "one thread per tile row");

  __shared__ Acc a_tile[kChunk][kRowsPadded];  // gathered rows, transposed
  __shared__ Acc b_tile[kChunk][TN];           // kernel[k] chunk
  __shared__ int64_t row_begin[kRows];         // run of pairs of a tile row
  __shared__ int64_t row_end[kRows];
  __shared__ int32_t row_src[kRows];  // src of the round, -1: none

  const int tid = threadIdx.x;
  const int tx = tid % kColThreads;
  const int ty = tid / kColThreads;
  // Tile counts are < 2^31 (checked by the launcher): 32-bit division.
  const uint32_t col_tiles = static_cast<uint32_t>((cout + TN - 1) / TN);
  const uint32_t tiles = static_cast<uint32_t>((num_out + kRows - 1) / kRows) * col_tiles;

  for (uint32_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t j0 = static_cast<int64_t>(tile / col_tiles) * kRows;
    const int64_t j1 = j0 + kRows < num_out ? j0 + kRows : num_out;
    const int64_t n0 = static_cast<int64_t>(tile % col_tiles) * TN;
    Acc acc[kRegRows][kRegCols];
#pragma unroll
    for (int i = 0; i < kRegRows; ++i) {
#pragma unroll
      for (int j = 0; j < kRegCols; ++j) acc[i][j] = Acc(0);
    }

    for (int64_t k = 0; k < num_offsets; ++k) {
      int64_t lo, hi;
      OffsetRange(pair_ptr, k, num_pairs, &lo, &hi);
      if (lo == hi) continue;  // uniform
      int64_t a, b;
      BlockLowerBounds(pairs, lo, hi, j0, j1, &a, &b);
      if (a >= b) continue;  // uniform

      // Run of each tile row: pairs [row_begin, row_end) (empty if
      // begin >= end). Safe to overwrite: the last reads of the previous
      // offset precede the barriers of BlockLowerBounds.
      if (tid < kRows) {
        row_begin[tid] = b;
        row_end[tid] = a;
      }
      __syncthreads();
      for (int64_t p = a + tid; p < b; p += kThreads) {
        const int64_t d = PairDst(pairs, p);
        const int64_t r = d - j0;
        if (r < 0 || r >= kRows) continue;  // only if dst is not sorted
        if (p == a || PairDst(pairs, p - 1) != d) row_begin[r] = p;
        if (p + 1 == b || PairDst(pairs, p + 1) != d) row_end[r] = p + 1;
      }
      __syncthreads();

      const T* w = kernel + k * cin * cout;
      for (int64_t t = 0;; ++t) {
        // Round t: the t-th pair of each row's run.
        bool more = false;
        bool valid = false;
        if (tid < kRows) {
          const int64_t p = row_begin[tid] + t;
          int32_t s = -1;
          if (p < row_end[tid]) {
            more = true;
            const int64_t src = PairSrc(pairs, p);
            if (src >= 0 && src < n) s = static_cast<int32_t>(src);
          }
          row_src[tid] = s;
          valid = s >= 0;
        }
        if (!__syncthreads_or(more)) break;  // uniform
        if (!__syncthreads_or(valid)) continue;

        bool row_valid[kRegRows];
#pragma unroll
        for (int i = 0; i < kRegRows; ++i) {
          row_valid[i] = row_src[ty + i * kRowThreads] >= 0;
        }
        Acc prod[kRegRows][kRegCols];
#pragma unroll
        for (int i = 0; i < kRegRows; ++i) {
#pragma unroll
          for (int j = 0; j < kRegCols; ++j) prod[i][j] = Acc(0);
        }

        // Chunk [c0, c0 + kChunk) of the gathered rows and of kernel[k].
        // Element e = tid + q * kThreads is (row e / kChunk, channel
        // e % kChunk) of A, (channel e / TN, column e % TN) of B:
        // consecutive threads read consecutive channels of a feature row and
        // consecutive columns of the kernel.
        for (int64_t c0 = 0; c0 < cin; c0 += kChunk) {
#pragma unroll
          for (int q = 0; q < kALoads; ++q) {
            const int e = tid + q * kThreads;
            const int64_t c = c0 + e % kChunk;
            const int32_t s = row_src[e / kChunk];
            a_tile[e % kChunk][e / kChunk] =
                s >= 0 && c < cin ? Elem<T>::Load(features[s * cin + c]) : Acc(0);
          }
#pragma unroll
          for (int q = 0; q < kBLoads; ++q) {
            const int e = tid + q * kThreads;
            const int64_t c = c0 + e / TN;
            const int64_t col = n0 + e % TN;
            b_tile[e / TN][e % TN] =
                c < cin && col < cout ? Elem<T>::Load(w[c * cout + col]) : Acc(0);
          }
          __syncthreads();
#pragma unroll
          for (int kk = 0; kk < kChunk; ++kk) {
            Acc av[kRegRows];
            Acc bv[kRegCols];
#pragma unroll
            for (int i = 0; i < kRegRows; ++i) {
              av[i] = a_tile[kk][ty + i * kRowThreads];
            }
#pragma unroll
            for (int j = 0; j < kRegCols; ++j) {
              bv[j] = b_tile[kk][tx + j * kColThreads];
            }
#pragma unroll
            for (int i = 0; i < kRegRows; ++i) {
#pragma unroll
              for (int j = 0; j < kRegCols; ++j) prod[i][j] += av[i] * bv[j];
            }
          }
          __syncthreads();
        }
#pragma unroll
        for (int i = 0; i < kRegRows; ++i) {
          if (row_valid[i]) {
#pragma unroll
            for (int j = 0; j < kRegCols; ++j) acc[i][j] += prod[i][j];
          }
        }
      }
    }

#pragma unroll
    for (int i = 0; i < kRegRows; ++i) {
      const int64_t row = j0 + ty + i * kRowThreads;
      if (row >= j1) continue;
#pragma unroll
      for (int j = 0; j < kRegCols; ++j) {
        const int64_t col = n0 + tx + j * kColThreads;
        if (col < cout) out[row * cout + col] = Elem<T>::Store(acc[i][j]);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Kernel grad
// ---------------------------------------------------------------------------

// Shared memory of a kernel-grad block: max(G kSlab (TI + TJ), TI TJ) values
// of A (staging, then the group reduction) + 2 G kSlab int32 (src, dst).
int64_t GradSmemBytes(int ti, int tj, int groups, int64_t acc_bytes) {
  const int64_t span = int64_t{groups} * kSlab;
  const int64_t staging = span * (ti + tj);
  const int64_t reduce = int64_t{ti} * tj;
  return (staging > reduce ? staging : reduce) * acc_bytes + 2 * span * 4;
}

// kernel_grad [K, cin, cout]; one block per task (k, cin tile, cout tile),
// grid-stride over the tasks; blockDim.x = groups * TI * TJ / 16.
template <typename T, int TI, int TJ>
__global__ void __launch_bounds__(kGradMaxThreads)
    SparseConvKernelGradKernel(const T* __restrict__ features, int64_t n,
                               const T* __restrict__ grad, int64_t m, int64_t num_offsets,
                               int64_t cin, int64_t cout, const int32_t* __restrict__ pair_ptr,
                               const int32_t* __restrict__ pairs, int64_t num_pairs,
                               T* __restrict__ kernel_grad, int groups) {
  using Acc = typename Elem<T>::Acc;
  constexpr int kRowT = TI / kGradReg;  // threads along cin in a group
  constexpr int kColT = TJ / kGradReg;  // threads along cout in a group
  constexpr int kGroupThreads = kRowT * kColT;
  extern __shared__ __align__(16) unsigned char grad_smem[];

  const int span = groups * kSlab;
  Acc* f_tile = reinterpret_cast<Acc*>(grad_smem);  // [span][TI]
  Acc* g_tile = f_tile + span * TI;                 // [span][TJ]
  Acc* red = f_tile;                                // [TI][TJ], at the end
  const int staging = span * (TI + TJ) > TI * TJ ? span * (TI + TJ) : TI * TJ;
  int32_t* slab_src =
      reinterpret_cast<int32_t*>(grad_smem + static_cast<size_t>(staging) * sizeof(Acc));  // [span]
  int32_t* slab_dst = slab_src + span;                                                     // [span]

  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  const int grp = tid / kGroupThreads;
  const int lt = tid % kGroupThreads;
  const int tx = lt % kColT;
  const int ty = lt / kColT;
  // Task counts are < 2^31 (checked by the launcher): 32-bit division.
  const uint32_t i_tiles = static_cast<uint32_t>((cin + TI - 1) / TI);
  const uint32_t j_tiles = static_cast<uint32_t>((cout + TJ - 1) / TJ);
  const uint32_t tasks = static_cast<uint32_t>(num_offsets) * i_tiles * j_tiles;

  for (uint32_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t i0 = static_cast<int64_t>((task / j_tiles) % i_tiles) * TI;
    const int64_t j0 = static_cast<int64_t>(task % j_tiles) * TJ;
    const int64_t k = task / (j_tiles * i_tiles);
    int64_t lo, hi;
    OffsetRange(pair_ptr, k, num_pairs, &lo, &hi);

    Acc acc[kGradReg][kGradReg];
#pragma unroll
    for (int i = 0; i < kGradReg; ++i) {
#pragma unroll
      for (int j = 0; j < kGradReg; ++j) acc[i][j] = Acc(0);
    }

    for (int64_t base = lo; base < hi; base += span) {  // uniform
      // The pairs of the G slabs; -1 for pairs past the offset's end or out
      // of range (staged as zero rows on both sides).
      for (int e = tid; e < span; e += nthreads) {
        const int64_t p = base + e;
        int32_t s = -1, d = -1;
        if (p < hi) {
          const int64_t src = PairSrc(pairs, p);
          const int64_t dst = PairDst(pairs, p);
          if (src >= 0 && src < n && dst >= 0 && dst < m) {
            s = static_cast<int32_t>(src);
            d = static_cast<int32_t>(dst);
          }
        }
        slab_src[e] = s;
        slab_dst[e] = d;
      }
      __syncthreads();
      for (int e = tid; e < span * TI; e += nthreads) {
        const int32_t s = slab_src[e / TI];
        const int64_t c = i0 + e % TI;
        f_tile[e] = s >= 0 && c < cin ? Elem<T>::Load(features[s * cin + c]) : Acc(0);
      }
      for (int e = tid; e < span * TJ; e += nthreads) {
        const int32_t d = slab_dst[e / TJ];
        const int64_t c = j0 + e % TJ;
        g_tile[e] = d >= 0 && c < cout ? Elem<T>::Load(grad[d * cout + c]) : Acc(0);
      }
      __syncthreads();
      const Acc* fr = f_tile + grp * kSlab * TI;
      const Acc* gr = g_tile + grp * kSlab * TJ;
#pragma unroll
      for (int pp = 0; pp < kSlab; ++pp) {
        Acc av[kGradReg];
        Acc bv[kGradReg];
#pragma unroll
        for (int i = 0; i < kGradReg; ++i) av[i] = fr[pp * TI + ty + i * kRowT];
#pragma unroll
        for (int j = 0; j < kGradReg; ++j) bv[j] = gr[pp * TJ + tx + j * kColT];
#pragma unroll
        for (int i = 0; i < kGradReg; ++i) {
#pragma unroll
          for (int j = 0; j < kGradReg; ++j) acc[i][j] += av[i] * bv[j];
        }
      }
      __syncthreads();
    }

    // Group partial sums into group 0, in group order.
    for (int g = 1; g < groups; ++g) {  // uniform
      if (grp == g) {
#pragma unroll
        for (int i = 0; i < kGradReg; ++i) {
#pragma unroll
          for (int j = 0; j < kGradReg; ++j) {
            red[(ty + i * kRowT) * TJ + tx + j * kColT] = acc[i][j];
          }
        }
      }
      __syncthreads();
      if (grp == 0) {
#pragma unroll
        for (int i = 0; i < kGradReg; ++i) {
#pragma unroll
          for (int j = 0; j < kGradReg; ++j) {
            acc[i][j] += red[(ty + i * kRowT) * TJ + tx + j * kColT];
          }
        }
      }
      __syncthreads();
    }

    if (grp == 0) {
      T* o = kernel_grad + k * cin * cout;
#pragma unroll
      for (int i = 0; i < kGradReg; ++i) {
        const int64_t r = i0 + ty + i * kRowT;
        if (r >= cin) continue;
#pragma unroll
        for (int j = 0; j < kGradReg; ++j) {
          const int64_t c = j0 + tx + j * kColT;
          if (c < cout) o[r * cout + c] = Elem<T>::Store(acc[i][j]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

unsigned GridFor(int64_t blocks) {
  return static_cast<unsigned>(blocks < kMaxGridBlocks ? blocks : kMaxGridBlocks);
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Channel tile: the smallest of 16, 32, 64 that covers c (64 above).
int PickTile(int64_t c) { return c <= 16 ? 16 : (c <= 32 ? 32 : 64); }

// ---- features ----

struct FeaturesArgs {
  const void* features;
  int64_t n;
  const void* kernel;
  int64_t num_offsets, cin, cout;
  const int32_t* pair_ptr;
  const int32_t* pairs;
  int64_t num_pairs, num_out;
  void* out;
};

template <typename T, int TN>
const char* FeaturesConfig(const FeaturesArgs& a, cudaStream_t stream) {
  constexpr int kThreads = FeaturesThreads(TN);
  const int64_t tiles = CeilDiv(a.num_out, kRows) * CeilDiv(a.cout, TN);
  if (tiles >= kIndex32Limit) return kTooLarge;
  SparseConvFeaturesKernel<T, TN><<<GridFor(tiles), kThreads, 0, stream>>>(
      static_cast<const T*>(a.features), a.n, static_cast<const T*>(a.kernel), a.num_offsets, a.cin,
      a.cout, a.pair_ptr, a.pairs, a.num_pairs, a.num_out, static_cast<T*>(a.out));
  return LastError();
}

template <typename T>
const char* FeaturesTyped(const FeaturesArgs& a, cudaStream_t stream) {
  switch (PickTile(a.cout)) {
    case 16:
      return FeaturesConfig<T, 16>(a, stream);
    case 32:
      return FeaturesConfig<T, 32>(a, stream);
    default:
      return FeaturesConfig<T, 64>(a, stream);
  }
}

// ---- kernel grad ----

struct GradArgs {
  const void* features;
  int64_t n;
  const void* grad;
  int64_t m, num_offsets, cin, cout;
  const int32_t* pair_ptr;
  const int32_t* pairs;
  int64_t num_pairs;
  void* kernel_grad;
};

// Groups per block: about kGradSlabsPerGroup slabs per group for the average
// offset, within kGradMaxThreads threads and kGradSmemBudget bytes. Depends
// on the shapes only (the summation order must not depend on the device).
int GradGroups(int ti, int tj, int64_t acc_bytes, const GradArgs& a) {
  const int64_t group_threads = int64_t{ti} * tj / (kGradReg * kGradReg);
  int64_t cap = kGradMaxThreads / group_threads;
  const int64_t per_group = kSlab * ((ti + tj) * acc_bytes + 2 * 4);
  if (kGradSmemBudget / per_group < cap) cap = kGradSmemBudget / per_group;
  const int64_t avg = CeilDiv(a.num_pairs, a.num_offsets);
  int64_t want = CeilDiv(avg, kGradSlabsPerGroup * kSlab);
  if (want > cap) want = cap;
  return static_cast<int>(want < 1 ? 1 : want);
}

template <typename T, int TI, int TJ>
const char* GradConfig(const GradArgs& a, cudaStream_t stream) {
  using Acc = typename Elem<T>::Acc;
  const int groups = GradGroups(TI, TJ, sizeof(Acc), a);
  const int threads = groups * (TI / kGradReg) * (TJ / kGradReg);
  const int64_t smem = GradSmemBytes(TI, TJ, groups, sizeof(Acc));
  if (smem > 48 * 1024) return "tsc_coord_sparse: kernel grad shared memory";
  const int64_t tasks = a.num_offsets * CeilDiv(a.cin, TI) * CeilDiv(a.cout, TJ);
  if (tasks >= kIndex32Limit) return kTooLarge;
  SparseConvKernelGradKernel<T, TI, TJ>
      <<<GridFor(tasks), threads, static_cast<size_t>(smem), stream>>>(
          static_cast<const T*>(a.features), a.n, static_cast<const T*>(a.grad), a.m, a.num_offsets,
          a.cin, a.cout, a.pair_ptr, a.pairs, a.num_pairs, static_cast<T*>(a.kernel_grad), groups);
  return LastError();
}

template <typename T, int TI>
const char* GradTileJ(int tj, const GradArgs& a, cudaStream_t stream) {
  switch (tj) {
    case 16:
      return GradConfig<T, TI, 16>(a, stream);
    case 32:
      return GradConfig<T, TI, 32>(a, stream);
    default:
      return GradConfig<T, TI, 64>(a, stream);
  }
}

template <typename T>
const char* GradTyped(const GradArgs& a, cudaStream_t stream) {
  // The smallest tiles covering cin / cout, halved (the larger first) while
  // there are few tasks and halving adds tiles.
  int ti = PickTile(a.cin);
  int tj = PickTile(a.cout);
  while (a.num_offsets * CeilDiv(a.cin, ti) * CeilDiv(a.cout, tj) < kGradTargetBlocks) {
    const bool can_i = ti > 16 && a.cin > ti / 2;
    const bool can_j = tj > 16 && a.cout > tj / 2;
    if (can_i && (ti >= tj || !can_j)) {
      ti /= 2;
    } else if (can_j) {
      tj /= 2;
    } else {
      break;
    }
  }
  switch (ti) {
    case 16:
      return GradTileJ<T, 16>(tj, a, stream);
    case 32:
      return GradTileJ<T, 32>(tj, a, stream);
    default:
      return GradTileJ<T, 64>(tj, a, stream);
  }
}

// The launchers' first checks: *bytes = the element size of `format`, and
// no negative dimension.
const char* FormatAndDims(FloatFormat format, std::initializer_list<int64_t> dims, int* bytes) {
  *bytes = FormatBytes(format);
  if (*bytes == 0) return kUnknownFormat;
  for (int64_t d : dims) {
    if (d < 0) return "tsc_coord_sparse: negative dimension";
  }
  return nullptr;
}

// The launchers' last steps, once out's size (out_bytes) is known: nothing to
// write for an empty output, an error for a null one, zeros when `zeros`, an
// error when an input is null, else typed(TypeTag<T>) for the format's type.
template <typename Typed>
const char* WriteOutput(FloatFormat format, void* out, int64_t out_bytes, const char* out_is_null,
                        bool zeros, bool null_input, cudaStream_t st, const Typed& typed) {
  if (out_bytes == 0) return nullptr;  // nothing to write
  if (out == nullptr) return out_is_null;
  if (zeros) return MemsetZero(out, out_bytes, st);
  if (null_input) return "tsc_coord_sparse: null input";
  return gpu::DispatchFormat(format, kUnknownFormat, typed);
}

}  // namespace

const char* LaunchSparseConvFeaturesGpu(FloatFormat format, const void* features, int64_t n,
                                        const void* kernel, int64_t num_offsets, int64_t cin,
                                        int64_t cout, const int32_t* pair_ptr, const int32_t* pairs,
                                        int64_t num_pairs, int64_t num_out, void* out,
                                        void* stream) {
  int bytes = 0;
  if (const char* err =
          FormatAndDims(format, {n, num_offsets, cin, cout, num_pairs, num_out}, &bytes)) {
    return err;
  }
  int64_t out_size, in_size, kernel_size;
  if (!MulNonNeg(num_out, cout, &out_size) || !MulNonNeg(n, cin, &in_size) ||
      !MulNonNeg(num_offsets, cin, &kernel_size) || !MulNonNeg(kernel_size, cout, &kernel_size) ||
      !MulNonNeg(out_size, bytes, &out_size)) {
    return kTooLarge;
  }
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const FeaturesArgs a{features, n,     kernel,    num_offsets, cin, cout,
                       pair_ptr, pairs, num_pairs, num_out,     out};
  // No offsets, channels, pairs or input rows: out is all zeros.
  const bool zeros = num_offsets == 0 || cin == 0 || num_pairs == 0 || n == 0;
  const bool null_input =
      features == nullptr || kernel == nullptr || pair_ptr == nullptr || pairs == nullptr;
  return WriteOutput(format, out, out_size, "tsc_coord_sparse: out is null", zeros, null_input, st,
                     [&](auto tag) { return FeaturesTyped<typename decltype(tag)::type>(a, st); });
}

const char* LaunchSparseConvKernelGradGpu(FloatFormat format, const void* features, int64_t n,
                                          const void* grad, int64_t m, int64_t num_offsets,
                                          int64_t cin, int64_t cout, const int32_t* pair_ptr,
                                          const int32_t* pairs, int64_t num_pairs,
                                          void* kernel_grad, void* stream) {
  int bytes = 0;
  if (const char* err = FormatAndDims(format, {n, m, num_offsets, cin, cout, num_pairs}, &bytes)) {
    return err;
  }
  int64_t size, in_size, grad_size;
  if (!MulNonNeg(num_offsets, cin, &size) || !MulNonNeg(size, cout, &size) ||
      !MulNonNeg(size, bytes, &size) || !MulNonNeg(n, cin, &in_size) ||
      !MulNonNeg(m, cout, &grad_size)) {
    return kTooLarge;
  }
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const GradArgs a{features, n,        grad,  m,         num_offsets, cin,
                   cout,     pair_ptr, pairs, num_pairs, kernel_grad};
  // No pairs, or none can be in range: kernel_grad is all zeros.
  const bool zeros = num_pairs == 0 || n == 0 || m == 0;
  const bool null_input =
      features == nullptr || grad == nullptr || pair_ptr == nullptr || pairs == nullptr;
  return WriteOutput(format, kernel_grad, size, "tsc_coord_sparse: kernel_grad is null", zeros,
                     null_input, st,
                     [&](auto tag) { return GradTyped<typename decltype(tag)::type>(a, st); });
}

}  // namespace tf_sparseconv
