// GPU kernels of the channel-sparse 2-D convolution (TensorFlow-independent).
//
// Defines the launchers declared in channel_sparse_launcher.h. No TensorFlow
// headers: the file is built by the TF op build and, standalone, by
// tests/gpu/build.py. Geometry and formula: channel_sparse_common.h.
//
// Checked to compile (nvcc 13.0, -x cu -std=c++17 --expt-relaxed-constexpr
// -Xcompiler -fPIC -O3, also with -Xcompiler -Wall,-Wextra) without warnings
// for sm_75, sm_80 and sm_90 (+ compute_90 PTX). No floating-point atomics;
// half and bfloat16 only go through float conversions, so sm_75 (no native
// bfloat16 arithmetic) is fine.
//
// Every kernel is deterministic: each output element is one thread's (or
// one warp's) sum in an order fixed by the geometry and the connections,
// never by scheduling or the grid size. Connections outside [0, in_c) are
// not validated on the device (the CPU kernel and the Python wrapper do
// that where the values are known); like tf.gather on the GPU they
// contribute zero, and no kernel reads or writes through them.
//
// Kernels (A = float for half/bfloat16/float, double for double; every load
// is converted to A, every store rounds once from A):
//   * Forward: one thread per output element (b, oh, ow, o), o fastest
//     (grid-stride). The valid tap ranges [i0, i1) x [j0, j1) are computed
//     once per element, then for e < m (connection loaded once) the thread
//     walks those taps. Cost m * k_h * k_w per output, independent of in_c.
//     A warp covers 32 consecutive o of one pixel: kernel reads coalesce, x
//     reads gather inside one pixel's channel row.
//   * Backprop input: a gather over the transposed connection list (CSR:
//     row c = the flat indices k = o * m + e with connections[o, e] == c,
//     ascending), built in the workspace on every call: keys (out-of-range
//     values -> the sentinel in_c), a stable CUB radix sort of (key, k),
//     then row pointers by binary search and per entry the pair
//     (o, e * out_c + o). Then one thread (or, when dx has fewer than
//     kTargetThreads elements and rows average >= 16 entries, one warp) per
//     dx element (b, ih, iw, c), c fastest, sums dy[b, oh, ow, o] *
//     kernel[i, j, e, o] over the taps (i, j) that reach an output pixel,
//     in ascending (i, j), and over row c in ascending k (a warp's lanes
//     take every 32nd entry, then a fixed xor butterfly). Same products as
//     the forward pass; every dx element is written exactly once, so there
//     is no memset, no float atomic and no float workspace.
//   * Backprop kernel: no atomics. One block per task
//     (o-tile of W <= 32 output channels, e, chunk of kTaps taps); the block
//     is W lanes (o) x (threads / W) rows; row r sums the pixels p = r,
//     r + rows, ... in order, then a fixed shared-memory tree reduces the
//     rows. The result depends only on the geometry (block shape and chunking
//     are functions of it), never on scheduling or grid size.
// Flat indices are decomposed with 32-bit division when every tensor and
// batch * out_h * out_w * m * out_c are < 2^31, with 64-bit division
// otherwise. All work is on the given stream; no synchronisation; the only
// allocation is the caller's backprop-input workspace.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cub/cub.cuh>

#include "tf_sparseconv/cc/kernels/channel_sparse_common.h"
#include "tf_sparseconv/cc/kernels/channel_sparse_launcher.h"
#include "tf_sparseconv/cc/kernels/float_format.h"
#include "tf_sparseconv/cc/kernels/gpu_elem.cu.h"
#include "tf_sparseconv/cc/kernels/gpu_util.cu.h"

namespace tf_sparseconv {
namespace {

constexpr int kThreads = 256;  // forward / input / transposition
constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxGridBlocks = int64_t{1} << 20;
constexpr int64_t kIndex32Limit = int64_t{1} << 31;
// Backprop input: out_c * m and in_c must be below this (int32 positions
// in the transposed list, plus lane offsets; uint32 keys).
constexpr int64_t kEntryLimit = int64_t{1} << 30;
constexpr int64_t kCoordLimit = int64_t{1} << 62;  // |coordinate| bound
// Backprop kernel: aim for at least this many resident threads before
// preferring fewer, fatter tasks.
constexpr int64_t kTargetThreads = int64_t{1} << 17;

// ---------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------

using gpu::Check;
using gpu::Elem;
using gpu::LastError;
using gpu::MemsetZero;
using gpu::MulNonNeg;
using gpu::Product;

// ---------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------

// Taps t in [*lo, *hi) are those with 0 <= base + t * dil < size, t < k
// (dil >= 1). Empty when *lo >= *hi.
__device__ __forceinline__ void TapRange(int64_t base, int64_t dil, int64_t k, int64_t size,
                                         int64_t* lo, int64_t* hi) {
  *lo = base >= 0 ? 0 : (-base + dil - 1) / dil;
  const int64_t h = base >= size ? 0 : (size - 1 - base) / dil + 1;
  *hi = h < k ? h : k;
}

// For t = out * stride (t >= 0, stride >= 1): *out, if that division is
// exact and out < size. (Stride 1, the common case, needs no division.)
__device__ __forceinline__ bool OutputCoord(int64_t t, int64_t stride, int64_t size, int64_t* out) {
  int64_t q = t;
  if (stride != 1) {
    q = t / stride;
    if (q * stride != t) return false;
  }
  *out = q;
  return q < size;
}

// Connection e of output channel o, or -1 if outside [0, in_c).
__device__ __forceinline__ int64_t Connection(const int32_t* __restrict__ conn, int64_t o,
                                              int64_t e, int64_t m, int64_t in_c) {
  const int64_t c = conn[o * m + e];
  return c >= 0 && c < in_c ? c : -1;
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

// y[b, oh, ow, o]; one thread per output element, o fastest.
template <typename T, typename Index>
__global__ void __launch_bounds__(kThreads)
    ConvForwardKernel(const T* __restrict__ x, const T* __restrict__ w,
                      const int32_t* __restrict__ conn, const T* __restrict__ bias, bool relu,
                      T* __restrict__ y, ChannelSparseGeometry g) {
  using Acc = typename Elem<T>::Acc;
  const Index out_c = static_cast<Index>(g.out_c);
  const Index out_w = static_cast<Index>(g.out_w);
  const Index out_h = static_cast<Index>(g.out_h);
  const Index total = static_cast<Index>(g.batch * g.out_h * g.out_w * g.out_c);
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  const int64_t x_image = g.in_h * g.in_w * g.in_c;
  const int64_t x_step_i = g.dil_h * g.in_w * g.in_c;  // next tap row
  const int64_t x_step_j = g.dil_w * g.in_c;           // next tap column
  const int64_t w_step_j = g.m * g.out_c;              // next tap column
  const int64_t w_step_i = g.k_w * w_step_j;           // next tap row
  for (Index idx = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += stride) {
    const Index o = idx % out_c;
    Index p = idx / out_c;
    const Index ow = p % out_w;
    p /= out_w;
    const Index oh = p % out_h;
    const Index b = p / out_h;
    const int64_t bh = static_cast<int64_t>(oh) * g.stride_h - g.pad_top;
    const int64_t bw = static_cast<int64_t>(ow) * g.stride_w - g.pad_left;
    int64_t i0, i1, j0, j1;
    TapRange(bh, g.dil_h, g.k_h, g.in_h, &i0, &i1);
    TapRange(bw, g.dil_w, g.k_w, g.in_w, &j0, &j1);
    Acc acc = Acc(0);
    if (i0 < i1 && j0 < j1) {
      // x of the first valid tap (channel 0), kernel of the first valid tap
      // (e = 0, this o).
      const T* x0 = x + static_cast<int64_t>(b) * x_image +
                    ((bh + i0 * g.dil_h) * g.in_w + bw + j0 * g.dil_w) * g.in_c;
      const T* w0 = w + i0 * w_step_i + j0 * w_step_j + static_cast<int64_t>(o);
      for (int64_t e = 0; e < g.m; ++e) {
        const int64_t c = Connection(conn, o, e, g.m, g.in_c);
        if (c < 0) continue;
        const T* xi = x0 + c;
        const T* wi = w0 + e * g.out_c;
        for (int64_t i = i0; i < i1; ++i, xi += x_step_i, wi += w_step_i) {
          const T* xj = xi;
          const T* wj = wi;
          for (int64_t j = j0; j < j1; ++j, xj += x_step_j, wj += w_step_j) {
            acc += Elem<T>::Load(*xj) * Elem<T>::Load(*wj);
          }
        }
      }
    }
    if (bias != nullptr) acc += Elem<T>::Load(bias[o]);
    if (relu && acc < Acc(0)) acc = Acc(0);  // (NaN stays NaN, as in tf.nn.relu)
    y[idx] = Elem<T>::Store(acc);
  }
}

// ---------------------------------------------------------------------------
// Backprop input (deterministic gather over the transposed connections)
// ---------------------------------------------------------------------------

// Transposed connection list, step 1: keys[k] = connections[k] (k = o * m +
// e) if it lies in [0, in_c), else the sentinel in_c (sorted after every
// channel, so out-of-range entries land in no row); vals[k] = k.
__global__ void __launch_bounds__(kThreads)
    TransposeKeysKernel(const int32_t* __restrict__ conn, int64_t n, int64_t in_c,
                        uint32_t* __restrict__ keys, int32_t* __restrict__ vals) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += stride) {
    const int64_t c = conn[k];
    keys[k] = static_cast<uint32_t>(c >= 0 && c < in_c ? c : in_c);
    vals[k] = static_cast<int32_t>(k);
  }
}

// Step 3, after a stable radix sort of (keys, vals) by key: row_ptr[c]
// (c <= in_c) = the first sorted position whose key is >= c, so row c is
// [row_ptr[c], row_ptr[c + 1]) and lists the k with connections[k] == c in
// ascending k; entries[p] = (o, e * out_c + o) for the flat index vals[p] =
// o * m + e: the column of o in dy and the offset of (e, o) in one tap of
// the kernel. (Sentinel positions >= row_ptr[in_c] are filled too, never
// read.)
__global__ void __launch_bounds__(kThreads)
    TransposeFinishKernel(const uint32_t* __restrict__ keys, const int32_t* __restrict__ vals,
                          int64_t n, int64_t in_c, int64_t m, int64_t out_c,
                          int32_t* __restrict__ row_ptr, int2* __restrict__ entries) {
  const int64_t work = n > in_c + 1 ? n : in_c + 1;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < work;
       i += stride) {
    if (i <= in_c) {
      int64_t lo = 0;
      int64_t hi = n;
      while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (static_cast<int64_t>(keys[mid]) < i) {
          lo = mid + 1;
        } else {
          hi = mid;
        }
      }
      row_ptr[i] = static_cast<int32_t>(lo);
    }
    if (i < n) {
      const int64_t k = vals[i];
      const int64_t o = k / m;
      const int64_t e = k - o * m;
      entries[i] = make_int2(static_cast<int>(o), static_cast<int>(e * out_c + o));
    }
  }
}

// dx[b, ih, iw, c] = sum over the taps (i, j) whose output pixel
// (oh, ow) = ((ih + pad_top - i * dil_h) / stride_h,
//             (iw + pad_left - j * dil_w) / stride_w)
// exists (exact division, inside [0, out_h) x [0, out_w)), in ascending
// (i, j), of the sum over row c of the transposed list, in ascending
// position, of dy[b, oh, ow, o] * w[i, j, e, o].
// kLanes consecutive threads own one dx element (c fastest): lane l takes
// the positions row_ptr[c] + l, + l + kLanes, ... of every tap; with
// kLanes = 32 the warp's partial sums are then combined by a fixed xor
// butterfly. Each element is written once (zero when nothing reaches it);
// the order of every sum depends only on the geometry and the connections.
template <typename T, typename Index, int kLanes>
__global__ void __launch_bounds__(kThreads)
    ConvBackpropInputKernel(const T* __restrict__ dy, const T* __restrict__ w,
                            const int32_t* __restrict__ row_ptr, const int2* __restrict__ entries,
                            T* __restrict__ dx, ChannelSparseGeometry g) {
  using Acc = typename Elem<T>::Acc;
  static_assert(kLanes == 1 || kLanes == kWarpSize, "kLanes");
  static_assert(kThreads % kWarpSize == 0, "kThreads");
  const Index in_c = static_cast<Index>(g.in_c);
  const Index in_w = static_cast<Index>(g.in_w);
  const Index in_h = static_cast<Index>(g.in_h);
  const Index total = static_cast<Index>(g.batch * g.in_h * g.in_w * g.in_c);
  const int lane = static_cast<int>(threadIdx.x) % kLanes;
  // Every lane of a warp sees the same idx sequence (kLanes == 32), so the
  // shuffles below are executed by full warps.
  const Index stride = static_cast<Index>(gridDim.x) * (blockDim.x / kLanes);
  const int64_t w_tap = g.m * g.out_c;  // kernel elements per tap
  for (Index idx = static_cast<Index>(blockIdx.x) * (blockDim.x / kLanes) +
                   static_cast<Index>(threadIdx.x / kLanes);
       idx < total; idx += stride) {
    const Index c = idx % in_c;
    Index p = idx / in_c;
    const Index iw = p % in_w;
    p /= in_w;
    const Index ih = p % in_h;
    const Index b = p / in_h;
    const int32_t r0 = row_ptr[c] + lane;
    const int32_t r1 = row_ptr[c + 1];
    Acc acc = Acc(0);
    if (r0 < r1) {
      // oh * stride_h = th0 - i * dil_h, ow * stride_w = tw0 - j * dil_w.
      const int64_t th0 = static_cast<int64_t>(ih) + g.pad_top;
      const int64_t tw0 = static_cast<int64_t>(iw) + g.pad_left;
      const T* dy_b = dy + static_cast<int64_t>(b) * g.out_h * g.out_w * g.out_c;
      for (int64_t i = 0; i < g.k_h; ++i) {
        const int64_t th = th0 - i * g.dil_h;
        if (th < 0) break;  // th only decreases with i
        int64_t oh;
        if (!OutputCoord(th, g.stride_h, g.out_h, &oh)) continue;
        for (int64_t j = 0; j < g.k_w; ++j) {
          const int64_t tw = tw0 - j * g.dil_w;
          if (tw < 0) break;
          int64_t ow;
          if (!OutputCoord(tw, g.stride_w, g.out_w, &ow)) continue;
          const T* dy_p = dy_b + (oh * g.out_w + ow) * g.out_c;
          const T* w_p = w + (i * g.k_w + j) * w_tap;
          for (int32_t r = r0; r < r1; r += kLanes) {
            const int2 en = entries[r];
            acc += Elem<T>::Load(dy_p[en.x]) * Elem<T>::Load(w_p[en.y]);
          }
        }
      }
    }
    if constexpr (kLanes > 1) {
#pragma unroll
      for (int off = kLanes / 2; off > 0; off >>= 1) {
        acc += __shfl_xor_sync(kFullMask, acc, off);
      }
    }
    if (lane == 0) dx[idx] = Elem<T>::Store(acc);
  }
}

// ---------------------------------------------------------------------------
// Backprop kernel (deterministic)
// ---------------------------------------------------------------------------

// One block per task (o-tile, e, tap chunk); see the header comment.
// 1 << log2w = W lanes per row (W <= B, power of two); tasks are ordered
// o-tile-major so that blocks running together share dy columns.
template <typename T, typename Index, int B, int kTaps>
__global__ void __launch_bounds__(B)
    ConvBackpropKernelKernel(const T* __restrict__ x, const T* __restrict__ dy,
                             const int32_t* __restrict__ conn, T* __restrict__ dk,
                             ChannelSparseGeometry g, int log2w, int64_t tap_chunks) {
  using Acc = typename Elem<T>::Acc;
  static_assert(B >= 32 && B <= 1024 && (B & (B - 1)) == 0, "B");
  static_assert(kTaps >= 1, "kTaps");
  __shared__ Acc red[kTaps * B];

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & ((1 << log2w) - 1);
  const int row = tid >> log2w;
  const int rows = B >> log2w;
  const Index out_w = static_cast<Index>(g.out_w);
  const Index out_h = static_cast<Index>(g.out_h);
  const Index pixels = static_cast<Index>(g.batch * g.out_h * g.out_w);
  const int64_t taps = g.k_h * g.k_w;
  const int64_t o_tiles = ((g.out_c - 1) >> log2w) + 1;
  const int64_t tasks = o_tiles * g.m * tap_chunks;
  const int64_t x_image = g.in_h * g.in_w * g.in_c;

  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t tc = task % tap_chunks;
    const int64_t rest = task / tap_chunks;
    const int64_t e = rest % g.m;
    const int64_t o = ((rest / g.m) << log2w) + lane;
    const int64_t t0 = tc * kTaps;
    const int64_t c = o < g.out_c ? Connection(conn, o, e, g.m, g.in_c) : -1;

    // Row / column offsets (relative to oh * stride_h, ow * stride_w) of
    // the taps of this chunk; tap t0 + t is (i, j) = divmod(t0 + t, k_w).
    int64_t off_h[kTaps];
    int64_t off_w[kTaps];
    bool tap_ok[kTaps];
#pragma unroll
    for (int t = 0; t < kTaps; ++t) {
      const int64_t tt = t0 + t;
      tap_ok[t] = tt < taps;
      const int64_t ti = tap_ok[t] ? tt / g.k_w : 0;
      const int64_t tj = tap_ok[t] ? tt - ti * g.k_w : 0;
      off_h[t] = ti * g.dil_h - g.pad_top;
      off_w[t] = tj * g.dil_w - g.pad_left;
    }

    Acc acc[kTaps];
#pragma unroll
    for (int t = 0; t < kTaps; ++t) acc[t] = Acc(0);

    if (c >= 0) {
      for (Index p = static_cast<Index>(row); p < pixels; p += static_cast<Index>(rows)) {
        Index q = p;
        const Index ow = q % out_w;
        q /= out_w;
        const Index oh = q % out_h;
        const Index b = q / out_h;
        const Acc gy = Elem<T>::Load(dy[static_cast<int64_t>(p) * g.out_c + o]);
        const T* xb = x + static_cast<int64_t>(b) * x_image + c;
        const int64_t bh = static_cast<int64_t>(oh) * g.stride_h;
        const int64_t bw = static_cast<int64_t>(ow) * g.stride_w;
#pragma unroll
        for (int t = 0; t < kTaps; ++t) {
          const int64_t ih = bh + off_h[t];
          const int64_t iw = bw + off_w[t];
          if (tap_ok[t] && ih >= 0 && ih < g.in_h && iw >= 0 && iw < g.in_w) {
            acc[t] += Elem<T>::Load(xb[(ih * g.in_w + iw) * g.in_c]) * gy;
          }
        }
      }
    }

    // Fixed-order tree over the rows (rows is a power of two).
#pragma unroll
    for (int t = 0; t < kTaps; ++t) red[t * B + tid] = acc[t];
    __syncthreads();
    for (int s = rows >> 1; s > 0; s >>= 1) {
      if (row < s) {
        const int src = tid + (s << log2w);
#pragma unroll
        for (int t = 0; t < kTaps; ++t) red[t * B + tid] += red[t * B + src];
      }
      __syncthreads();
    }
    if (row == 0 && o < g.out_c) {
#pragma unroll
      for (int t = 0; t < kTaps; ++t) {
        if (tap_ok[t]) {
          dk[((t0 + t) * g.m + e) * g.out_c + o] = Elem<T>::Store(red[t * B + tid]);
        }
      }
    }
    __syncthreads();  // red is reused by the next task
  }
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

unsigned GridFor(int64_t work, int64_t threads) {
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<unsigned>(blocks < kMaxGridBlocks ? blocks : kMaxGridBlocks);
}

// Sizes derived from a geometry (all checked for overflow).
struct Sizes {
  int64_t x;         // batch * in_h * in_w * in_c
  int64_t y;         // batch * out_h * out_w * out_c
  int64_t pixels;    // batch * out_h * out_w
  int64_t taps;      // k_h * k_w
  int64_t kernel;    // k_h * k_w * m * out_c
  int64_t products;  // batch * out_h * out_w * m * out_c (MACs per tap)
  bool index32;      // all of the above < 2^31
};

const char* CheckGeometry(const ChannelSparseGeometry& g, Sizes* s) {
  if (g.batch < 0 || g.in_h < 0 || g.in_w < 0 || g.in_c < 0 || g.out_h < 0 || g.out_w < 0 ||
      g.out_c < 0 || g.m < 0 || g.k_h < 0 || g.k_w < 0) {
    return "tsc_channel_sparse: negative dimension";
  }
  if (g.stride_h < 1 || g.stride_w < 1 || g.dil_h < 1 || g.dil_w < 1) {
    return "tsc_channel_sparse: strides and dilations must be >= 1";
  }
  if (g.out_c > 0 && g.m > g.in_c) {
    return "tsc_channel_sparse: m must be <= in_c";
  }
  if (!Product(g.batch, g.in_h, g.in_w, g.in_c, &s->x) ||
      !Product(g.batch, g.out_h, g.out_w, 1, &s->pixels) ||
      !Product(s->pixels, g.out_c, 1, 1, &s->y) || !Product(g.k_h, g.k_w, 1, 1, &s->taps) ||
      !Product(s->taps, g.m, g.out_c, 1, &s->kernel) || !Product(s->y, g.m, 1, 1, &s->products)) {
    return "tsc_channel_sparse: tensor too large";
  }
  // Every input coordinate oh * stride_h - pad_top + i * dil_h, and every
  // ih + pad_top - i * dil_h of the backprop-input gather (and the same for
  // w) must fit comfortably in int64.
  struct Axis {
    int64_t in, pad, out, stride, k, dil;
  };
  const Axis axes[2] = {{g.in_h, g.pad_top, g.out_h, g.stride_h, g.k_h, g.dil_h},
                        {g.in_w, g.pad_left, g.out_w, g.stride_w, g.k_w, g.dil_w}};
  for (const Axis& a : axes) {
    int64_t reach_o = 0;
    int64_t reach_k = 0;
    if (a.pad <= -kCoordLimit || a.pad >= kCoordLimit || a.in >= kCoordLimit ||
        !MulNonNeg(a.out > 0 ? a.out - 1 : 0, a.stride, &reach_o) ||
        !MulNonNeg(a.k > 0 ? a.k - 1 : 0, a.dil, &reach_k) || reach_o >= kCoordLimit ||
        reach_k >= kCoordLimit) {
      return "tsc_channel_sparse: coordinates too large";
    }
  }
  // (products is not an index of any kernel; bounding it too keeps the
  // 64-bit instantiations reachable by a test of moderate size.)
  s->index32 = s->x < kIndex32Limit && s->y < kIndex32Limit && s->kernel < kIndex32Limit &&
               s->products < kIndex32Limit;
  return nullptr;
}

// ---- forward ----

template <typename T>
const char* ForwardTyped(const void* x, const void* kernel, const int32_t* conn, const void* bias,
                         bool relu, void* y, const ChannelSparseGeometry& g, const Sizes& s,
                         cudaStream_t stream) {
  const unsigned grid = GridFor(s.y, kThreads);
  if (s.index32) {
    ConvForwardKernel<T, uint32_t><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(kernel), conn, static_cast<const T*>(bias),
        relu, static_cast<T*>(y), g);
  } else {
    ConvForwardKernel<T, int64_t><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(kernel), conn, static_cast<const T*>(bias),
        relu, static_cast<T*>(y), g);
  }
  return LastError();
}

// ---- backprop input ----

// Carves 256-byte aligned regions out of a workspace; with base == nullptr
// it only counts, so sizing and use share one layout.
class Carver {
 public:
  explicit Carver(void* base) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(base);
    base_ = base == nullptr ? nullptr : reinterpret_cast<char*>((p + kAlign - 1) / kAlign * kAlign);
  }
  template <typename U>
  U* Take(int64_t count) {
    char* at = base_ == nullptr ? nullptr : base_ + used_;
    const int64_t bytes = static_cast<int64_t>(sizeof(U)) * (count > 0 ? count : 1);
    used_ += (bytes + kAlign - 1) / kAlign * kAlign;
    return reinterpret_cast<U*>(at);
  }
  int64_t Total() const { return used_ + kAlign; }  // + slack to align base

 private:
  static constexpr int64_t kAlign = 256;
  char* base_ = nullptr;
  int64_t used_ = 0;
};

// The transposed connection list in the workspace (n = out_c * m).
struct TransposeLayout {
  uint32_t* keys[2];  // [n] each: the radix sort's key double buffer
  int32_t* vals[2];   // [n] each: its value double buffer
  int32_t* row_ptr;   // [in_c + 1]
  int2* entries;      // [n]
  void* temp;         // CUB radix sort scratch
  size_t temp_bytes;
  int key_bits;   // keys are < 2^key_bits (values 0 .. in_c)
  int64_t total;  // bytes of the whole workspace
};

// Backprop-input limits: entries, row pointers and kernel offsets are int32
// (with headroom for the lane offsets), keys uint32.
const char* CheckTransposeLimits(const ChannelSparseGeometry& g) {
  if (g.out_c * g.m >= kEntryLimit || g.in_c >= kEntryLimit) {
    return "tsc_channel_sparse: backprop input needs in_c and out_c * m "
           "below 2^30";
  }
  return nullptr;
}

// Needs a current CUDA device (CUB sizes its scratch for it).
const char* MakeTransposeLayout(void* base, const ChannelSparseGeometry& g, TransposeLayout* l) {
  const int64_t n = g.out_c * g.m;
  Carver c(base);
  l->keys[0] = c.Take<uint32_t>(n);
  l->keys[1] = c.Take<uint32_t>(n);
  l->vals[0] = c.Take<int32_t>(n);
  l->vals[1] = c.Take<int32_t>(n);
  l->row_ptr = c.Take<int32_t>(g.in_c + 1);
  l->entries = c.Take<int2>(n);
  l->key_bits = 1;
  while ((int64_t{1} << l->key_bits) <= g.in_c) ++l->key_bits;
  l->temp_bytes = 0;
  cub::DoubleBuffer<uint32_t> keys(l->keys[0], l->keys[1]);
  cub::DoubleBuffer<int32_t> vals(l->vals[0], l->vals[1]);
  if (const char* err = Check(cub::DeviceRadixSort::SortPairs(
          nullptr, l->temp_bytes, keys, vals, static_cast<int>(n), 0, l->key_bits))) {
    return err;
  }
  l->temp = c.Take<char>(static_cast<int64_t>(l->temp_bytes));
  l->total = c.Total();
  return nullptr;
}

// Warp per dx element when there are too few elements to fill the GPU with
// one thread each and the rows of the transposed list average >= 16
// entries; else one thread per element. A function of the geometry only.
int GatherLanes(const ChannelSparseGeometry& g, const Sizes& s) {
  return s.x < kTargetThreads && g.out_c * g.m >= 16 * g.in_c ? kWarpSize : 1;
}

// Builds the transposed connection list (keys, stable CUB radix sort, row
// pointers and entries) in `l`. Integer work only: deterministic.
const char* BuildTranspose(const int32_t* conn, const ChannelSparseGeometry& g,
                           const TransposeLayout& l, cudaStream_t stream) {
  const int64_t n = g.out_c * g.m;
  TransposeKeysKernel<<<GridFor(n, kThreads), kThreads, 0, stream>>>(conn, n, g.in_c, l.keys[0],
                                                                     l.vals[0]);
  if (const char* err = LastError()) return err;
  // The sort ping-pongs between the two halves of each double buffer and
  // records (on the host) which half holds the result: Current().
  cub::DoubleBuffer<uint32_t> keys(l.keys[0], l.keys[1]);
  cub::DoubleBuffer<int32_t> vals(l.vals[0], l.vals[1]);
  size_t temp_bytes = l.temp_bytes;
  if (const char* err = Check(cub::DeviceRadixSort::SortPairs(
          l.temp, temp_bytes, keys, vals, static_cast<int>(n), 0, l.key_bits, stream))) {
    return err;
  }
  const int64_t finish = n > g.in_c + 1 ? n : g.in_c + 1;
  TransposeFinishKernel<<<GridFor(finish, kThreads), kThreads, 0, stream>>>(
      keys.Current(), vals.Current(), n, g.in_c, g.m, g.out_c, l.row_ptr, l.entries);
  return LastError();
}

template <typename T, typename Index, int kLanes>
const char* BackpropInputConfig(const void* dy, const void* kernel, void* dx,
                                const TransposeLayout& l, const ChannelSparseGeometry& g,
                                const Sizes& s, cudaStream_t stream) {
  const unsigned grid = GridFor(s.x * kLanes, kThreads);
  ConvBackpropInputKernel<T, Index, kLanes>
      <<<grid, kThreads, 0, stream>>>(static_cast<const T*>(dy), static_cast<const T*>(kernel),
                                      l.row_ptr, l.entries, static_cast<T*>(dx), g);
  return LastError();
}

template <typename T>
const char* BackpropInputTyped(const void* dy, const void* kernel, void* dx,
                               const TransposeLayout& l, const ChannelSparseGeometry& g,
                               const Sizes& s, cudaStream_t stream) {
  if (GatherLanes(g, s) == kWarpSize) {
    return s.index32 ? BackpropInputConfig<T, uint32_t, kWarpSize>(dy, kernel, dx, l, g, s, stream)
                     : BackpropInputConfig<T, int64_t, kWarpSize>(dy, kernel, dx, l, g, s, stream);
  }
  return s.index32 ? BackpropInputConfig<T, uint32_t, 1>(dy, kernel, dx, l, g, s, stream)
                   : BackpropInputConfig<T, int64_t, 1>(dy, kernel, dx, l, g, s, stream);
}

// ---- backprop kernel ----

template <typename T, typename Index, int B, int kTaps>
const char* BackpropKernelConfig(const void* x, const void* dy, const int32_t* conn, void* dkernel,
                                 const ChannelSparseGeometry& g, int log2w, int64_t tasks,
                                 cudaStream_t stream) {
  const int64_t tap_chunks = (g.k_h * g.k_w + kTaps - 1) / kTaps;
  const unsigned grid = static_cast<unsigned>(tasks < kMaxGridBlocks ? tasks : kMaxGridBlocks);
  ConvBackpropKernelKernel<T, Index, B, kTaps>
      <<<grid, B, 0, stream>>>(static_cast<const T*>(x), static_cast<const T*>(dy), conn,
                               static_cast<T*>(dkernel), g, log2w, tap_chunks);
  return LastError();
}

template <typename T, typename Index>
const char* BackpropKernelIndexed(const void* x, const void* dy, const int32_t* conn, void* dkernel,
                                  const ChannelSparseGeometry& g, const Sizes& s,
                                  cudaStream_t stream) {
  // W = lanes per row: the smallest power of two >= out_c, at most 32.
  int log2w = 0;
  while (log2w < 5 && (int64_t{1} << log2w) < g.out_c) ++log2w;
  const int64_t w = int64_t{1} << log2w;
  const int64_t base_tasks = ((g.out_c + w - 1) / w) * g.m;
  // Threads per task that can have work: one row per pixel.
  const int64_t useful = s.pixels < kIndex32Limit / w ? s.pixels * w : kIndex32Limit;
  int taps_per_task = s.taps == 1 ? 1 : (s.taps <= 4 ? 4 : 9);
  int64_t tasks = base_tasks * ((s.taps + taps_per_task - 1) / taps_per_task);
  // Few tasks: split the taps (more blocks), then use bigger blocks.
  if (taps_per_task > 1 && tasks * kThreads < kTargetThreads && useful > kThreads) {
    taps_per_task = 1;
    tasks = base_tasks * s.taps;
  }
  const bool big = tasks * kThreads < kTargetThreads && useful > 2 * kThreads;
  if (big) {
    return BackpropKernelConfig<T, Index, 1024, 1>(x, dy, conn, dkernel, g, log2w,
                                                   base_tasks * s.taps, stream);
  }
  switch (taps_per_task) {
    case 1:
      return BackpropKernelConfig<T, Index, kThreads, 1>(x, dy, conn, dkernel, g, log2w, tasks,
                                                         stream);
    case 4:
      return BackpropKernelConfig<T, Index, kThreads, 4>(x, dy, conn, dkernel, g, log2w, tasks,
                                                         stream);
    default:
      return BackpropKernelConfig<T, Index, kThreads, 9>(x, dy, conn, dkernel, g, log2w, tasks,
                                                         stream);
  }
}

template <typename T>
const char* BackpropKernelTyped(const void* x, const void* dy, const int32_t* conn, void* dkernel,
                                const ChannelSparseGeometry& g, const Sizes& s,
                                cudaStream_t stream) {
  return s.index32 ? BackpropKernelIndexed<T, uint32_t>(x, dy, conn, dkernel, g, s, stream)
                   : BackpropKernelIndexed<T, int64_t>(x, dy, conn, dkernel, g, s, stream);
}

}  // namespace

const char* LaunchChannelSparseConv2DGpu(FloatFormat format, const void* x, const void* kernel,
                                         const int32_t* connections, const void* bias, bool relu,
                                         void* y, const ChannelSparseGeometry& g, void* stream) {
  const int bytes = FormatBytes(format);
  if (bytes == 0) return "tsc_channel_sparse: unknown float format";
  Sizes s;
  if (const char* err = CheckGeometry(g, &s)) return err;
  if (s.y == 0) return nullptr;  // nothing to write
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if ((s.x == 0 || s.kernel == 0) && bias == nullptr) {
    // No input, no taps or m == 0: y is all zeros (relu keeps them).
    return MemsetZero(y, s.y * bytes, st);
  }
  // (With a bias the kernel runs anyway: its empty sums give activation(bias).)
  return gpu::DispatchFormat(format, "tsc_channel_sparse: unknown float format", [&](auto tag) {
    using T = typename decltype(tag)::type;
    return ForwardTyped<T>(x, kernel, connections, bias, relu, y, g, s, st);
  });
}

const char* ChannelSparseConv2DBackpropInputGpuWorkspaceBytes(const ChannelSparseGeometry& g,
                                                              int64_t* bytes) {
  *bytes = 0;
  Sizes s;
  if (const char* err = CheckGeometry(g, &s)) return err;
  if (s.x == 0 || s.y == 0 || s.kernel == 0) return nullptr;  // no kernels
  if (const char* err = CheckTransposeLimits(g)) return err;
  TransposeLayout l;
  if (const char* err = MakeTransposeLayout(nullptr, g, &l)) return err;
  *bytes = l.total;
  return nullptr;
}

const char* LaunchChannelSparseConv2DBackpropInputGpu(
    FloatFormat format, const void* dy, const void* kernel, const int32_t* connections, void* dx,
    void* workspace, int64_t workspace_bytes, const ChannelSparseGeometry& g, void* stream) {
  const int bytes = FormatBytes(format);
  if (bytes == 0) return "tsc_channel_sparse: unknown float format";
  Sizes s;
  if (const char* err = CheckGeometry(g, &s)) return err;
  if (s.x == 0) return nullptr;  // nothing to write
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (s.y == 0 || s.kernel == 0) {
    // No output gradient, no taps or m == 0: dx is all zeros.
    return MemsetZero(dx, s.x * bytes, st);
  }
  if (const char* err = CheckTransposeLimits(g)) return err;
  if (workspace == nullptr) {
    return "tsc_channel_sparse: backprop input needs a workspace of "
           "ChannelSparseConv2DBackpropInputGpuWorkspaceBytes bytes";
  }
  TransposeLayout l;
  if (const char* err = MakeTransposeLayout(workspace, g, &l)) return err;
  if (workspace_bytes < l.total) {
    return "tsc_channel_sparse: backprop input workspace is smaller than "
           "ChannelSparseConv2DBackpropInputGpuWorkspaceBytes";
  }
  if (const char* err = BuildTranspose(connections, g, l, st)) return err;
  return gpu::DispatchFormat(format, "tsc_channel_sparse: unknown float format", [&](auto tag) {
    using T = typename decltype(tag)::type;
    return BackpropInputTyped<T>(dy, kernel, dx, l, g, s, st);
  });
}

const char* LaunchChannelSparseConv2DBackpropKernelGpu(FloatFormat format, const void* x,
                                                       const void* dy, const int32_t* connections,
                                                       void* dkernel,
                                                       const ChannelSparseGeometry& g,
                                                       void* stream) {
  const int bytes = FormatBytes(format);
  if (bytes == 0) return "tsc_channel_sparse: unknown float format";
  Sizes s;
  if (const char* err = CheckGeometry(g, &s)) return err;
  if (s.kernel == 0) return nullptr;  // nothing to write
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (s.pixels == 0 || s.x == 0) {
    // No output pixels or no input: dkernel is all zeros.
    return MemsetZero(dkernel, s.kernel * bytes, st);
  }
  return gpu::DispatchFormat(format, "tsc_channel_sparse: unknown float format", [&](auto tag) {
    using T = typename decltype(tag)::type;
    return BackpropKernelTyped<T>(x, dy, connections, dkernel, g, s, st);
  });
}

}  // namespace tf_sparseconv
