// GPU kernels of the block-sparse (SBNet-style) primitives ReduceMask,
// SparseGather and SparseScatter (TensorFlow-independent).
//
// Defines the launchers declared in block_sparse_launcher.h. No TensorFlow
// headers: the file is built by the TF op build and, standalone, by
// tests/gpu/build.py. Geometry and semantics: block_sparse_common.h.
//
// Checked to compile (nvcc 13.0, -x cu -std=c++17 --expt-relaxed-constexpr
// -Xcompiler -fPIC -O3, also with -Xcompiler -Wall,-Wextra) without warnings
// for sm_75, sm_80 and sm_90 (+ compute_90 PTX). Only 32-bit integer
// atomics (index bookkeeping) and float conversions of half / bfloat16 are
// used, so sm_75 is fine.
//
// Arithmetic type A: float for half / bfloat16 / float, double for double.
//
//  * ReduceMask, phase 1: one flag (uint8) per block of the grid, then an
//    integer prefix sum over the flags by tiles of kTile flags (tile sums,
//    one-block scan of the tile sums, whose total is copied to the host).
//    Max (no avgpool): one warp per block, lanes over the columns of each
//    row, warp-shuffle max (exact in any order; NaN is ignored like
//    std::max(max, v) does). Avgpool: one thread per block summing the
//    in-range part in row-major order in A and dividing by size_h * size_w,
//    i.e. exactly the CPU kernel's order, so both devices pick the same
//    blocks. A block with no in-range part has max -inf and average 0.
//  * ReduceMask, phase 2: every tile rescans its flags (block-wide exclusive
//    scan) and writes the rows (b, bh, bw) of its active blocks at
//    tile offset + rank: increasing (b, bh, bw) order, no atomics.
//  * SparseGather: one thread per (block, row, column, channel unit), units
//    fastest (coalesced along channels). A pure bit copy, so it moves the
//    widest unit (16, 8, 4 or 2 bytes) that divides a pixel's channel row
//    and the pointers' alignment. Zeros outside the image and for index
//    rows out of range.
//  * SparseScatter: out = base (cudaMemcpyAsync when out != base), then
//    every covered element of out is written by exactly one thread, so no
//    atomics touch the data and the result is deterministic:
//      - index: the in-range index rows are bucketed by their cell
//        (b, bh, bw) in the workspace (cell counts with integer atomics, an
//        exclusive scan into cell starts, a fill, then each bucket ordered
//        by block position: every entry counts the smaller positions in its
//        bucket, positions being distinct). Each bucket is thus the sorted
//        list of the positions (index order) of the blocks at that cell.
//      - one thread per block element (k, i, j, unit) in the image finds
//        the cells covering its pixel (bh' in [bh + 1 - ceil((size_h - i) /
//        stride_h), bh + i / stride_h], likewise bw', clipped to the grid)
//        and the last block position covering the pixel (the largest
//        bucket tail). Only the thread of that last block goes on:
//        add = false: it writes its value (the last block in index order
//        wins); add = true: it computes base + the covering blocks in
//        increasing position (index order; a merge over the covering
//        buckets by binary search), in A, and rounds once.
//    The work is proportional to the blocks (n * size_h * size_w * c), not
//    to the image, beyond the copy of base.
// Flat indices are decomposed with 32-bit division when the tensors are
// < 2^31 elements, with 64-bit division otherwise. All work is on the given
// stream; only ReduceMask phase 1 synchronises it (to read the count back).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "tf_sparseconv/cc/kernels/block_sparse_common.h"
#include "tf_sparseconv/cc/kernels/block_sparse_launcher.h"
#include "tf_sparseconv/cc/kernels/float_format.h"
#include "tf_sparseconv/cc/kernels/gpu_elem.cu.h"
#include "tf_sparseconv/cc/kernels/gpu_util.cu.h"

namespace tf_sparseconv {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxGridBlocks = int64_t{1} << 20;
constexpr int64_t kIndex32Limit = int64_t{1} << 31;
constexpr int64_t kSmallLimit = int64_t{1} << 30;  // sizes / strides, 32-bit path
constexpr int64_t kCoordLimit = int64_t{1} << 62;  // |coordinate| bound
constexpr int64_t kMaxCells = int64_t{1} << 48;    // blocks in the grid
// Prefix sums: tiles of kScanThreads threads x kScanItems consecutive items.
constexpr int kScanThreads = 256;
constexpr int kScanItems = 16;
constexpr int64_t kTile = int64_t{kScanThreads} * kScanItems;
constexpr int kTileScanThreads = 1024;  // the one-block scan of tile sums
constexpr int64_t kAlign = 256;         // workspace sub-buffers

// --- Element types ----------------------------------------------------------

using gpu::Check;
using gpu::Elem;
using gpu::LastError;
using gpu::MulNonNeg;
using gpu::Product;

__device__ __forceinline__ float NegInf(float) { return -__int_as_float(0x7f800000); }
__device__ __forceinline__ double NegInf(double) {
  return -__longlong_as_double(0x7ff0000000000000ll);
}

// --- Device helpers ---------------------------------------------------------

// Exclusive prefix sum of v over the B threads of a block (B a multiple of
// 32, <= 1024); *total is the block's sum. Every thread must call it.
template <int B>
__device__ __forceinline__ long long BlockExclusiveSum(long long v, long long* total) {
  static_assert(B % kWarpSize == 0 && B <= 1024, "B");
  constexpr int kWarps = B / kWarpSize;
  __shared__ long long warp_sums[kWarps];
  const int lane = static_cast<int>(threadIdx.x) & (kWarpSize - 1);
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  long long incl = v;
#pragma unroll
  for (int off = 1; off < kWarpSize; off <<= 1) {
    const long long t = __shfl_up_sync(kFullMask, incl, off);
    if (lane >= off) incl += t;
  }
  if (lane == kWarpSize - 1) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    long long s = lane < kWarps ? warp_sums[lane] : 0;
#pragma unroll
    for (int off = 1; off < kWarpSize; off <<= 1) {
      const long long t = __shfl_up_sync(kFullMask, s, off);
      if (lane >= off) s += t;
    }
    if (lane < kWarps) warp_sums[lane] = s;  // inclusive over warps
  }
  __syncthreads();
  const long long before = warp == 0 ? 0 : warp_sums[warp - 1];
  *total = warp_sums[kWarps - 1];
  __syncthreads();  // warp_sums is reused by the next call
  return before + incl - v;
}

// Cell (b * grid_h + bh) * grid_w + bw of an index row, or -1 if the row is
// out of range.
__device__ __forceinline__ int64_t CellOf(const int32_t* __restrict__ row, const BlockGeometry& g) {
  const int64_t b = row[0];
  const int64_t bh = row[1];
  const int64_t bw = row[2];
  if (b < 0 || b >= g.batch || bh < 0 || bh >= g.grid_h || bw < 0 || bw >= g.grid_w) {
    return -1;
  }
  return (b * g.grid_h + bh) * g.grid_w + bw;
}

// The second pass of a tiled scan: loads this thread's kScanItems entries of
// tile t (from `first`; 0 past `items`) into v and returns the scan position of
// the first one (the tile's offset plus the entries of the tile's earlier
// threads). Every thread of the block must call it.
template <typename C>
__device__ __forceinline__ long long LoadScanItems(const C* __restrict__ in, int64_t items,
                                                   const int64_t* __restrict__ tile_offsets,
                                                   int64_t t, int64_t first, C (&v)[kScanItems]) {
  long long n = 0;
#pragma unroll
  for (int r = 0; r < kScanItems; ++r) {
    v[r] = first + r < items ? in[first + r] : 0;
    n += v[r];
  }
  long long total;
  return tile_offsets[t] + BlockExclusiveSum<kScanThreads>(n, &total);
}

// --- Prefix sums by tiles ---------------------------------------------------

// sums[t] = sum of in[t * kTile, (t + 1) * kTile) (clipped to items).
template <typename C>
__global__ void __launch_bounds__(kScanThreads)
    TileSumKernel(const C* __restrict__ in, int64_t items, int64_t tiles,
                  int64_t* __restrict__ sums) {
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t first = t * kTile + threadIdx.x;
    long long s = 0;
#pragma unroll
    for (int r = 0; r < kScanItems; ++r) {
      const int64_t i = first + int64_t{r} * kScanThreads;  // coalesced
      if (i < items) s += static_cast<long long>(in[i]);
    }
    long long total;
    BlockExclusiveSum<kScanThreads>(s, &total);
    if (threadIdx.x == 0) sums[t] = total;
  }
}

// In place: sums[t] = sum of the tile sums before t; sums[tiles] = total.
// One block.
__global__ void __launch_bounds__(kTileScanThreads)
    ScanTileSumsKernel(int64_t* __restrict__ sums, int64_t tiles) {
  long long carry = 0;
  for (int64_t first = 0; first < tiles; first += kTileScanThreads) {
    const int64_t t = first + threadIdx.x;
    const long long v = t < tiles ? sums[t] : 0;
    long long total;
    const long long ex = BlockExclusiveSum<kTileScanThreads>(v, &total);
    if (t < tiles) sums[t] = carry + ex;
    carry += total;
  }
  if (threadIdx.x == 0) sums[tiles] = carry;
}

// Runs the two kernels above over `items` counts into tile_sums[tiles + 1].
template <typename C>
const char* LaunchTileScan(const C* in, int64_t items, int64_t* tile_sums, cudaStream_t stream);

// --- ReduceMask -------------------------------------------------------------

// flags[k] for the blocks k = (b * grid_h + bh) * grid_w + bw; L lanes per
// block (1: row-major sequential sum, the CPU kernel's order; 32: one warp,
// max only).
template <typename T, int L, bool kAvg>
__global__ void __launch_bounds__(kThreads)
    BlockFlagKernel(const T* __restrict__ mask, float threshold, BlockGeometry g,
                    uint8_t* __restrict__ flags, int64_t blocks) {
  static_assert(L == 1 || L == kWarpSize, "L");
  static_assert(L == 1 || !kAvg, "avgpool sums in row-major order");
  using Acc = typename Elem<T>::Acc;
  const int lane = static_cast<int>(threadIdx.x) & (L - 1);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x / L;
  const Acc thr = static_cast<Acc>(threshold);
  for (int64_t k = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / L; k < blocks;
       k += stride) {  // uniform over the L lanes
    const int64_t bw = k % g.grid_w;
    const int64_t q = k / g.grid_w;
    const int64_t bh = q % g.grid_h;
    const int64_t b = q / g.grid_h;
    const int64_t y_start = g.offset_h + bh * g.stride_h;
    const int64_t x_start = g.offset_w + bw * g.stride_w;
    const int64_t y0 = y_start > 0 ? y_start : 0;
    const int64_t x0 = x_start > 0 ? x_start : 0;
    const int64_t y1 = y_start + g.size_h < g.h ? y_start + g.size_h : g.h;
    const int64_t x1 = x_start + g.size_w < g.w ? x_start + g.size_w : g.w;
    Acc v = kAvg ? Acc(0) : NegInf(Acc(0));
    if (y0 < y1 && x0 < x1) {
      const T* row = mask + (b * g.h + y0) * g.w;
      for (int64_t y = y0; y < y1; ++y, row += g.w) {
        for (int64_t x = x0 + lane; x < x1; x += L) {
          const Acc m = Elem<T>::Load(row[x]);
          if (kAvg) {
            v += m;
          } else {
            v = m > v ? m : v;  // NaN is ignored
          }
        }
      }
    }
    if constexpr (L > 1) {
#pragma unroll
      for (int off = L / 2; off > 0; off >>= 1) {
        const Acc o = __shfl_xor_sync(kFullMask, v, off, L);
        v = o > v ? o : v;
      }
    }
    if (lane == 0) {
      if (kAvg) v = v / static_cast<Acc>(g.size_h * g.size_w);
      flags[k] = v > thr ? 1 : 0;
    }
  }
}

// Rows (b, bh, bw) of the active blocks at tile offset + rank.
__global__ void __launch_bounds__(kScanThreads)
    ActiveRowsKernel(const uint8_t* __restrict__ flags, const int64_t* __restrict__ tile_offsets,
                     int64_t blocks, int64_t tiles, int64_t grid_h, int64_t grid_w,
                     int32_t* __restrict__ indices, int64_t count) {
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t first = t * kTile + threadIdx.x * int64_t{kScanItems};
    uint8_t f[kScanItems];
    long long pos = LoadScanItems(flags, blocks, tile_offsets, t, first, f);
#pragma unroll
    for (int r = 0; r < kScanItems; ++r) {
      if (f[r]) {
        if (pos < count) {
          const int64_t k = first + r;
          const int64_t q = k / grid_w;
          int32_t* out = indices + 3 * pos;
          out[0] = static_cast<int32_t>(q / grid_h);
          out[1] = static_cast<int32_t>(q % grid_h);
          out[2] = static_cast<int32_t>(k % grid_w);
        }
        ++pos;
      }
    }
  }
}

// --- SparseScatter: bucket index --------------------------------------------

__global__ void __launch_bounds__(kThreads)
    CellCountKernel(const int32_t* __restrict__ indices, int32_t n, BlockGeometry g,
                    int32_t* __restrict__ counts) {
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t cell = CellOf(indices + 3 * k, g);
    if (cell >= 0) atomicAdd(counts + cell, 1);
  }
}

// starts[cell] = tile offset + exclusive prefix of counts; starts[cells] =
// total.
__global__ void __launch_bounds__(kScanThreads)
    CellStartsKernel(const int32_t* __restrict__ counts, const int64_t* __restrict__ tile_offsets,
                     int64_t cells, int64_t tiles, int32_t* __restrict__ starts) {
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t first = t * kTile + threadIdx.x * int64_t{kScanItems};
    int32_t c[kScanItems];
    long long run = LoadScanItems(counts, cells, tile_offsets, t, first, c);
#pragma unroll
    for (int r = 0; r < kScanItems; ++r) {
      if (first + r < cells) starts[first + r] = static_cast<int32_t>(run);
      run += c[r];
    }
    if (first < cells && cells <= first + kScanItems) {
      starts[cells] = static_cast<int32_t>(run);
    }
  }
}

// Entries of every bucket, in any order (fill counters zeroed before).
__global__ void __launch_bounds__(kThreads)
    CellFillKernel(const int32_t* __restrict__ indices, int32_t n, BlockGeometry g,
                   const int32_t* __restrict__ starts, int32_t* __restrict__ fill,
                   int32_t* __restrict__ unsorted) {
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t cell = CellOf(indices + 3 * k, g);
    if (cell >= 0) {
      unsorted[starts[cell] + atomicAdd(fill + cell, 1)] = static_cast<int32_t>(k);
    }
  }
}

// Each bucket in increasing position: entry k goes to start + the number of
// smaller positions in its bucket (positions are distinct).
__global__ void __launch_bounds__(kThreads)
    CellSortKernel(const int32_t* __restrict__ indices, int32_t n, BlockGeometry g,
                   const int32_t* __restrict__ starts, const int32_t* __restrict__ unsorted,
                   int32_t* __restrict__ sorted) {
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t cell = CellOf(indices + 3 * k, g);
    if (cell < 0) continue;
    const int32_t s = starts[cell];
    const int32_t e = starts[cell + 1];
    const int32_t k32 = static_cast<int32_t>(k);
    int32_t rank = 0;
    for (int32_t q = s; q < e; ++q) rank += unsorted[q] < k32 ? 1 : 0;
    sorted[s + rank] = k32;
  }
}

// --- SparseGather / SparseScatter -------------------------------------------

// (block k, row i, column j, channel unit u) of element idx of blocks
// [n, size_h, size_w, units], in Index arithmetic.
template <typename Index>
struct BlockElement {
  Index k, i, j, u;
};
template <typename Index>
struct BlockElementSplit {
  Index cu, sw, sh;
  __device__ BlockElementSplit(const BlockGeometry& g, int64_t units)
      : cu(static_cast<Index>(units)),
        sw(static_cast<Index>(g.size_w)),
        sh(static_cast<Index>(g.size_h)) {}
  __device__ __forceinline__ BlockElement<Index> operator()(Index idx) const {
    Index p = idx / cu;
    const Index u = idx - p * cu;
    const Index j = p % sw;
    p /= sw;
    return {p / sh, p % sh, j, u};
  }
};

// blocks[k, i, j, u] (u: channel unit) from x; one thread per element.
template <typename U, typename Index>
__global__ void __launch_bounds__(kThreads)
    GatherKernel(const U* __restrict__ x, const int32_t* __restrict__ indices,
                 U* __restrict__ blocks, BlockGeometry g, int64_t units, int64_t total) {
  const BlockElementSplit<Index> split(g, units);
  const Index end = static_cast<Index>(total);
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index idx = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; idx < end;
       idx += stride) {
    const auto [k, i, j, u] = split(idx);
    const int32_t* row = indices + 3 * static_cast<int64_t>(k);
    const int64_t b = row[0];
    const int64_t bh = row[1];
    const int64_t bw = row[2];
    U v{};  // zero bits: +0 in every float format
    if (b >= 0 && b < g.batch && bh >= 0 && bh < g.grid_h && bw >= 0 && bw < g.grid_w) {
      const int64_t y = g.offset_h + bh * g.stride_h + static_cast<int64_t>(i);
      const int64_t xx = g.offset_w + bw * g.stride_w + static_cast<int64_t>(j);
      if (y >= 0 && y < g.h && xx >= 0 && xx < g.w) {
        v = x[((b * g.h + y) * g.w + xx) * units + static_cast<int64_t>(u)];
      }
    }
    blocks[idx] = v;
  }
}

// Covered elements of out; see the header comment. V is the element type
// (kAdd) or a bit-copy unit (!kAdd); `units` values of V per pixel.
// base and out may alias (then base is not read when !kAdd).
template <typename V, typename Index, bool kAdd>
__global__ void __launch_bounds__(kThreads)
    ScatterKernel(const V* blocks, const int32_t* __restrict__ indices, const V* base, V* out,
                  const int32_t* __restrict__ starts, const int32_t* __restrict__ sorted,
                  BlockGeometry g, int64_t units, int64_t total) {
  const BlockElementSplit<Index> split(g, units);
  const Index st_h = static_cast<Index>(g.stride_h);
  const Index st_w = static_cast<Index>(g.stride_w);
  const Index end = static_cast<Index>(total);
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index idx = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; idx < end;
       idx += stride) {
    const auto [k, i, j, u] = split(idx);
    const int64_t cell = CellOf(indices + 3 * static_cast<int64_t>(k), g);
    if (cell < 0) continue;  // out-of-range index row: skipped
    const int64_t b = indices[3 * static_cast<int64_t>(k)];
    const int64_t bh = indices[3 * static_cast<int64_t>(k) + 1];
    const int64_t bw = indices[3 * static_cast<int64_t>(k) + 2];
    const int64_t y = g.offset_h + bh * g.stride_h + static_cast<int64_t>(i);
    const int64_t xx = g.offset_w + bw * g.stride_w + static_cast<int64_t>(j);
    if (y < 0 || y >= g.h || xx < 0 || xx >= g.w) continue;
    // Block rows / columns covering (y, xx), clipped to the grid.
    int64_t h0 = bh + 1 - static_cast<int64_t>((split.sh - i + st_h - 1) / st_h);
    int64_t h1 = bh + static_cast<int64_t>(i / st_h);
    int64_t w0 = bw + 1 - static_cast<int64_t>((split.sw - j + st_w - 1) / st_w);
    int64_t w1 = bw + static_cast<int64_t>(j / st_w);
    h0 = h0 > 0 ? h0 : 0;
    w0 = w0 > 0 ? w0 : 0;
    h1 = h1 < g.grid_h - 1 ? h1 : g.grid_h - 1;
    w1 = w1 < g.grid_w - 1 ? w1 : g.grid_w - 1;
    const int64_t image_cells = b * g.grid_h;
    // The last block (in index order) covering the pixel writes it.
    int32_t last = -1;
    for (int64_t hh = h0; hh <= h1; ++hh) {
      const int32_t* st = starts + (image_cells + hh) * g.grid_w;
      for (int64_t ww = w0; ww <= w1; ++ww) {
        const int32_t s = st[ww];
        const int32_t e = st[ww + 1];
        if (e > s) {
          const int32_t tail = sorted[e - 1];
          last = tail > last ? tail : last;
        }
      }
    }
    if (last != static_cast<int32_t>(k)) continue;
    const int64_t o = ((b * g.h + y) * g.w + xx) * units + static_cast<int64_t>(u);
    if constexpr (!kAdd) {
      out[o] = blocks[idx];
    } else {
      using Acc = typename Elem<V>::Acc;
      Acc acc = Elem<V>::Load(base[o]);
      // Merge of the covering buckets: the blocks in increasing position,
      // ending with k itself.
      int32_t prev = -1;
      for (;;) {
        int32_t next = INT32_MAX;
        int64_t nh = 0;
        int64_t nw = 0;
        for (int64_t hh = h0; hh <= h1; ++hh) {
          const int32_t* st = starts + (image_cells + hh) * g.grid_w;
          for (int64_t ww = w0; ww <= w1; ++ww) {
            int32_t lo = st[ww];
            int32_t hi = st[ww + 1];
            while (lo < hi) {  // first entry > prev
              const int32_t mid = lo + (hi - lo) / 2;
              if (sorted[mid] <= prev) {
                lo = mid + 1;
              } else {
                hi = mid;
              }
            }
            if (lo < st[ww + 1] && sorted[lo] < next) {
              next = sorted[lo];
              nh = hh;
              nw = ww;
            }
          }
        }
        if (next == INT32_MAX) break;  // not reached: k is in a bucket
        const int64_t ii = static_cast<int64_t>(i) + (bh - nh) * g.stride_h;
        const int64_t jj = static_cast<int64_t>(j) + (bw - nw) * g.stride_w;
        acc += Elem<V>::Load(
            blocks[((static_cast<int64_t>(next) * g.size_h + ii) * g.size_w + jj) * units +
                   static_cast<int64_t>(u)]);
        prev = next;
        if (next == static_cast<int32_t>(k)) break;
      }
      out[o] = Elem<V>::Store(acc);
    }
  }
}

// --- Host side --------------------------------------------------------------

unsigned GridFor(int64_t work, int64_t threads) {
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<unsigned>(blocks < kMaxGridBlocks ? blocks : kMaxGridBlocks);
}

unsigned GridForTiles(int64_t tiles) {
  return static_cast<unsigned>(tiles < kMaxGridBlocks ? tiles : kMaxGridBlocks);
}

int64_t Align(int64_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

int64_t Tiles(int64_t items) { return (items + kTile - 1) / kTile; }

constexpr const char* kUnknownFormat = "tsc_block_sparse: unknown float format";

// Sizes derived from a geometry (all checked for overflow).
struct Sizes {
  int64_t x;      // batch * h * w * c
  int64_t cells;  // batch * grid_h * grid_w
  int64_t block;  // size_h * size_w * c
};

const char* CheckGeometry(const BlockGeometry& g, Sizes* s) {
  if (g.batch < 0 || g.h < 0 || g.w < 0 || g.c < 0 || g.grid_h < 0 || g.grid_w < 0) {
    return "tsc_block_sparse: negative dimension";
  }
  if (g.size_h < 1 || g.size_w < 1) {
    return "tsc_block_sparse: block size must be >= 1";
  }
  if (g.stride_h < 1 || g.stride_w < 1) {
    return "tsc_block_sparse: block stride must be >= 1";
  }
  if (!Product(g.batch, g.h, g.w, g.c, &s->x) || !Product(g.size_h, g.size_w, g.c, 1, &s->block)) {
    return "tsc_block_sparse: tensor too large";
  }
  if (!Product(g.batch, g.grid_h, g.grid_w, 1, &s->cells) || s->cells > kMaxCells) {
    return "tsc_block_sparse: block grid too large";
  }
  // Every block coordinate offset + i * stride + size (and the same for w)
  // must fit comfortably in int64.
  const int64_t offsets[2] = {g.offset_h, g.offset_w};
  const int64_t grids[2] = {g.grid_h, g.grid_w};
  const int64_t strides[2] = {g.stride_h, g.stride_w};
  const int64_t sizes[2] = {g.size_h, g.size_w};
  for (int a = 0; a < 2; ++a) {
    int64_t reach = 0;
    if (offsets[a] <= -kCoordLimit || offsets[a] >= kCoordLimit || sizes[a] >= kCoordLimit ||
        !MulNonNeg(grids[a] > 0 ? grids[a] : 0, strides[a], &reach) || reach >= kCoordLimit) {
      return "tsc_block_sparse: coordinates too large";
    }
  }
  return nullptr;
}

// Also checks n (index rows) and *elems = n * size_h * size_w * c.
const char* CheckBlocks(const BlockGeometry& g, int64_t n, Sizes* s, int64_t* elems) {
  if (const char* err = CheckGeometry(g, s)) return err;
  if (n < 0) return "tsc_block_sparse: negative number of blocks";
  if (n >= kIndex32Limit) return "tsc_block_sparse: too many blocks (>= 2^31)";
  if (!MulNonNeg(n, s->block, elems)) return "tsc_block_sparse: tensor too large";
  return nullptr;
}

// The 32-bit index path: every flat index and the divisors fit.
bool Use32(const BlockGeometry& g, const Sizes& s, int64_t elems) {
  return s.x < kIndex32Limit && elems < kIndex32Limit && g.size_h < kSmallLimit &&
         g.size_w < kSmallLimit && g.stride_h < kSmallLimit && g.stride_w < kSmallLimit;
}

// Widest unit in {16, 8, 4, 2} bytes dividing row_bytes and every pointer's
// address (the null pointer is aligned to anything).
int CopyUnit(int64_t row_bytes, const void* a, const void* b, const void* c) {
  for (int u = 16; u > 2; u /= 2) {
    const uintptr_t mis = reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b) |
                          reinterpret_cast<uintptr_t>(c);
    if (row_bytes % u == 0 && mis % static_cast<uintptr_t>(u) == 0) return u;
  }
  return 2;
}

// fn(TypeTag<U>{}) with U the type of CopyUnit's unit (uint4, uint2, uint32_t
// or uint16_t).
template <typename Fn>
const char* DispatchCopyUnit(int64_t row_bytes, const void* a, const void* b, const void* c,
                             Fn&& fn) {
  switch (CopyUnit(row_bytes, a, b, c)) {
    case 16:
      return fn(gpu::TypeTag<uint4>{});
    case 8:
      return fn(gpu::TypeTag<uint2>{});
    case 4:
      return fn(gpu::TypeTag<uint32_t>{});
    default:
      return fn(gpu::TypeTag<uint16_t>{});
  }
}

template <typename C>
const char* LaunchTileScan(const C* in, int64_t items, int64_t* tile_sums, cudaStream_t stream) {
  const int64_t tiles = Tiles(items);
  TileSumKernel<C><<<GridForTiles(tiles), kScanThreads, 0, stream>>>(in, items, tiles, tile_sums);
  if (const char* err = LastError()) return err;
  ScanTileSumsKernel<<<1, kTileScanThreads, 0, stream>>>(tile_sums, tiles);
  return LastError();
}

// ---- ReduceMask ----

// Workspace: flags uint8[blocks], tile sums int64[tiles + 1].
struct MaskLayout {
  int64_t tile_sums;
  int64_t bytes;
};

MaskLayout MakeMaskLayout(int64_t blocks) {
  MaskLayout m{0, 0};
  if (blocks == 0) return m;
  m.tile_sums = Align(blocks);
  m.bytes = m.tile_sums + Align((Tiles(blocks) + 1) * int64_t{sizeof(int64_t)});
  return m;
}

const char* CheckMaskGeometry(const BlockGeometry& g, Sizes* s) {
  if (const char* err = CheckGeometry(g, s)) return err;
  if (g.batch > INT32_MAX || g.grid_h > INT32_MAX || g.grid_w > INT32_MAX) {
    return "tsc_block_sparse: block grid too large for int32 indices";
  }
  return nullptr;
}

template <typename T>
const char* FlagsTyped(const void* mask, float threshold, bool avgpool, const BlockGeometry& g,
                       int64_t blocks, uint8_t* flags, cudaStream_t stream) {
  const T* m = static_cast<const T*>(mask);
  if (avgpool) {
    BlockFlagKernel<T, 1, true>
        <<<GridFor(blocks, kThreads), kThreads, 0, stream>>>(m, threshold, g, flags, blocks);
  } else if (g.size_w >= 8) {
    BlockFlagKernel<T, kWarpSize, false>
        <<<GridFor(blocks * kWarpSize, kThreads), kThreads, 0, stream>>>(m, threshold, g, flags,
                                                                         blocks);
  } else {
    BlockFlagKernel<T, 1, false>
        <<<GridFor(blocks, kThreads), kThreads, 0, stream>>>(m, threshold, g, flags, blocks);
  }
  return LastError();
}

// ---- SparseScatter ----

// Workspace: counts int32[cells] (then fill counters), starts
// int32[cells + 1], tile sums int64[tiles + 1], unsorted and sorted
// int32[n].
struct ScatterLayout {
  int64_t starts, tile_sums, unsorted, sorted, bytes;
};

ScatterLayout MakeScatterLayout(int64_t cells, int64_t n) {
  ScatterLayout l{0, 0, 0, 0, 0};
  if (cells == 0 || n == 0) return l;
  constexpr int64_t i32 = sizeof(int32_t);
  l.starts = Align(cells * i32);
  l.tile_sums = l.starts + Align((cells + 1) * i32);
  l.unsorted = l.tile_sums + Align((Tiles(cells) + 1) * int64_t{sizeof(int64_t)});
  l.sorted = l.unsorted + Align(n * i32);
  l.bytes = l.sorted + Align(n * i32);
  return l;
}

template <typename V, bool kAdd>
const char* ScatterConfig(const void* blocks, const int32_t* indices, const void* base, void* out,
                          const int32_t* starts, const int32_t* sorted, const BlockGeometry& g,
                          int64_t units, int64_t total, bool use32, cudaStream_t stream) {
  const unsigned grid = GridFor(total, kThreads);
  if (use32) {
    ScatterKernel<V, uint32_t, kAdd><<<grid, kThreads, 0, stream>>>(
        static_cast<const V*>(blocks), indices, static_cast<const V*>(base), static_cast<V*>(out),
        starts, sorted, g, units, total);
  } else {
    ScatterKernel<V, int64_t, kAdd><<<grid, kThreads, 0, stream>>>(
        static_cast<const V*>(blocks), indices, static_cast<const V*>(base), static_cast<V*>(out),
        starts, sorted, g, units, total);
  }
  return LastError();
}

template <typename U>
const char* GatherConfig(const void* x, const int32_t* indices, void* blocks,
                         const BlockGeometry& g, int64_t units, int64_t total, bool use32,
                         cudaStream_t stream) {
  const unsigned grid = GridFor(total, kThreads);
  if (use32) {
    GatherKernel<U, uint32_t><<<grid, kThreads, 0, stream>>>(
        static_cast<const U*>(x), indices, static_cast<U*>(blocks), g, units, total);
  } else {
    GatherKernel<U, int64_t><<<grid, kThreads, 0, stream>>>(
        static_cast<const U*>(x), indices, static_cast<U*>(blocks), g, units, total);
  }
  return LastError();
}

}  // namespace

// --- Launchers --------------------------------------------------------------

int64_t ReduceMaskGpuWorkspaceBytes(const BlockGeometry& g) {
  Sizes s;
  if (CheckMaskGeometry(g, &s) != nullptr) return 0;  // the launch reports it
  return MakeMaskLayout(s.cells).bytes;
}

const char* LaunchReduceMaskCountGpu(FloatFormat format, const void* mask, float threshold,
                                     bool avgpool, const BlockGeometry& g, void* workspace,
                                     int64_t* count, void* stream) {
  if (FormatBytes(format) == 0) return kUnknownFormat;
  if (count == nullptr) return "tsc_block_sparse: count is null";
  Sizes s;
  if (const char* err = CheckMaskGeometry(g, &s)) return err;
  *count = 0;
  if (s.cells == 0) return nullptr;  // no blocks
  if (workspace == nullptr) return "tsc_block_sparse: reduce_mask needs a workspace";
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const MaskLayout layout = MakeMaskLayout(s.cells);
  char* ws = static_cast<char*>(workspace);
  uint8_t* flags = reinterpret_cast<uint8_t*>(ws);
  int64_t* tile_sums = reinterpret_cast<int64_t*>(ws + layout.tile_sums);
  const char* err = kUnknownFormat;
  err = gpu::DispatchFormat(format, kUnknownFormat, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return FlagsTyped<T>(mask, threshold, avgpool, g, s.cells, flags, st);
  });
  if (err) return err;
  if ((err = LaunchTileScan(flags, s.cells, tile_sums, st))) return err;
  int64_t total = 0;
  if ((err = Check(cudaMemcpyAsync(&total, tile_sums + Tiles(s.cells), sizeof(total),
                                   cudaMemcpyDeviceToHost, st)))) {
    return err;
  }
  if ((err = Check(cudaStreamSynchronize(st)))) return err;
  *count = total;
  return nullptr;
}

const char* LaunchReduceMaskIndicesGpu(const BlockGeometry& g, void* workspace, int32_t* indices,
                                       int64_t count, void* stream) {
  Sizes s;
  if (const char* err = CheckMaskGeometry(g, &s)) return err;
  if (count < 0 || count > s.cells) {
    return "tsc_block_sparse: count out of range (not the one phase 1 returned)";
  }
  if (count == 0) return nullptr;
  if (workspace == nullptr) return "tsc_block_sparse: reduce_mask needs a workspace";
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const MaskLayout layout = MakeMaskLayout(s.cells);
  const char* ws = static_cast<const char*>(workspace);
  const int64_t tiles = Tiles(s.cells);
  ActiveRowsKernel<<<GridForTiles(tiles), kScanThreads, 0, st>>>(
      reinterpret_cast<const uint8_t*>(ws), reinterpret_cast<const int64_t*>(ws + layout.tile_sums),
      s.cells, tiles, g.grid_h, g.grid_w, indices, count);
  return LastError();
}

const char* LaunchSparseGatherGpu(FloatFormat format, const void* x, const int32_t* indices,
                                  int64_t n, void* blocks, const BlockGeometry& g, void* stream) {
  const int bytes = FormatBytes(format);
  if (bytes == 0) return kUnknownFormat;
  Sizes s;
  int64_t elems = 0;
  if (const char* err = CheckBlocks(g, n, &s, &elems)) return err;
  if (elems == 0) return nullptr;  // nothing to write
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const bool use32 = Use32(g, s, elems);
  const int64_t row_bytes = g.c * bytes;
  return DispatchCopyUnit(row_bytes, x, blocks, nullptr, [&](auto tag) {
    using U = typename decltype(tag)::type;
    constexpr int64_t kUnit = sizeof(U);
    return GatherConfig<U>(x, indices, blocks, g, row_bytes / kUnit, elems * bytes / kUnit, use32,
                           st);
  });
}

int64_t SparseScatterGpuWorkspaceBytes(const BlockGeometry& g, int64_t n) {
  Sizes s;
  int64_t elems = 0;
  if (CheckBlocks(g, n, &s, &elems) != nullptr) return 0;  // the launch reports it
  return MakeScatterLayout(s.cells, n).bytes;
}

const char* LaunchSparseScatterGpu(FloatFormat format, const void* blocks, const int32_t* indices,
                                   int64_t n, const void* base, void* out, bool add,
                                   const BlockGeometry& g, void* workspace, void* stream) {
  const int bytes = FormatBytes(format);
  if (bytes == 0) return kUnknownFormat;
  Sizes s;
  int64_t elems = 0;
  if (const char* err = CheckBlocks(g, n, &s, &elems)) return err;
  if (s.x == 0) return nullptr;  // nothing to write
  const ScatterLayout layout = MakeScatterLayout(s.cells, n);
  const bool any_blocks = layout.bytes > 0 && elems > 0;
  if (any_blocks && workspace == nullptr) {
    return "tsc_block_sparse: sparse_scatter needs a workspace";
  }
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const char* err = nullptr;
  if (out != base) {
    if ((err = Check(cudaMemcpyAsync(out, base, static_cast<size_t>(s.x * bytes),
                                     cudaMemcpyDeviceToDevice, st)))) {
      return err;
    }
  }
  if (!any_blocks) return nullptr;

  // Bucket index of the blocks by cell (see the header comment).
  char* ws = static_cast<char*>(workspace);
  int32_t* counts = reinterpret_cast<int32_t*>(ws);
  int32_t* starts = reinterpret_cast<int32_t*>(ws + layout.starts);
  int64_t* tile_sums = reinterpret_cast<int64_t*>(ws + layout.tile_sums);
  int32_t* unsorted = reinterpret_cast<int32_t*>(ws + layout.unsorted);
  int32_t* sorted = reinterpret_cast<int32_t*>(ws + layout.sorted);
  const int32_t n32 = static_cast<int32_t>(n);
  const unsigned grid_n = GridFor(n, kThreads);
  const size_t count_bytes = static_cast<size_t>(s.cells) * sizeof(int32_t);
  if ((err = Check(cudaMemsetAsync(counts, 0, count_bytes, st)))) return err;
  CellCountKernel<<<grid_n, kThreads, 0, st>>>(indices, n32, g, counts);
  if ((err = LastError())) return err;
  if ((err = LaunchTileScan(counts, s.cells, tile_sums, st))) return err;
  const int64_t tiles = Tiles(s.cells);
  CellStartsKernel<<<GridForTiles(tiles), kScanThreads, 0, st>>>(counts, tile_sums, s.cells, tiles,
                                                                 starts);
  if ((err = LastError())) return err;
  if ((err = Check(cudaMemsetAsync(counts, 0, count_bytes, st)))) return err;
  CellFillKernel<<<grid_n, kThreads, 0, st>>>(indices, n32, g, starts, counts, unsorted);
  if ((err = LastError())) return err;
  CellSortKernel<<<grid_n, kThreads, 0, st>>>(indices, n32, g, starts, unsorted, sorted);
  if ((err = LastError())) return err;

  const bool use32 = Use32(g, s, elems);
  if (add) {
    return gpu::DispatchFormat(format, kUnknownFormat, [&](auto tag) {
      using T = typename decltype(tag)::type;
      return ScatterConfig<T, true>(blocks, indices, base, out, starts, sorted, g, g.c, elems,
                                    use32, st);
    });
  }
  const int64_t row_bytes = g.c * bytes;
  return DispatchCopyUnit(row_bytes, blocks, base, out, [&](auto tag) {
    using U = typename decltype(tag)::type;
    constexpr int64_t kUnit = sizeof(U);
    return ScatterConfig<U, false>(blocks, indices, base, out, starts, sorted, g, row_bytes / kUnit,
                                   elems * bytes / kUnit, use32, st);
  });
}

}  // namespace tf_sparseconv
