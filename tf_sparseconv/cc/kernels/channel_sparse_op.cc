// CPU (and, with TF_SPARSECONV_CUDA, GPU) kernels of the channel-sparse
// convolution and its two gradient ops.
//
// CPU scheme. Work is split into tiles of kTile = 64 consecutive positions
// (output positions for the forward op and the kernel gradient, input
// positions for the input gradient) of one sample. For a tile, the operand
// is presented as "columns": for each (channel, tap), one contiguous run of
// 64 positions (row mode: pointers into source rows transposed to
// [channel][column], cached across tiles; otherwise an im2col gather).
// Every result channel r is then
//     out[r][:] = sum over its entries e and taps t of w[e][t] * col[src(e)][t][:]
// with 64-wide vector accumulators in registers: one broadcast and 64/L
// fused multiply-adds per (entry, tap). The entries of a result channel are
// a CSR row: for the forward op, row o lists the m input channels
// connections[o, :]; for the input gradient, row c lists the (output
// channel, slot) pairs that read input channel c (the transposed connection
// list) and the columns hold the gradient at the output positions that read
// each input position. Entries are bucketed by blocks of source channels
// whose columns fit in L1, and blocks are the outer loop (SparseRowsTile).
// So the work is proportional to m (the fan-in), never to Cin. The kernel
// gradient reuses the forward columns: dw[o][e][t] += <col[connections[o, e]][t], dy[o]>.
// half/bfloat16 compute in float; results are bitwise deterministic (fixed
// tiling and a fixed-order reduction of the kernel gradient's partial sums).
#define EIGEN_USE_THREADS

#include <algorithm>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <utility>
#include <type_traits>
#include <vector>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/lib/core/threadpool.h"
#include "tf_sparseconv/cc/kernels/channel_sparse_common.h"
#include "tf_sparseconv/cc/kernels/kernel_util.h"

#if TF_SPARSECONV_CUDA
#include "tf_sparseconv/cc/kernels/channel_sparse_launcher.h"
#endif

namespace tf_sparseconv {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Status;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
namespace errors = ::tensorflow::errors;

namespace {

constexpr int64_t kTile = 64;

// The vector of A the tiles are computed in (64 bytes with AVX-512: 16
// floats or 8 doubles; else 32 bytes) and the accumulator of one tile of
// kTile positions.
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#else
constexpr int kVecBytes = 32;
#endif
template <typename A>
struct Vec {
  static constexpr int kLanes = kVecBytes / sizeof(A);
  typedef A type __attribute__((vector_size(kVecBytes), may_alias));
  typedef A unaligned __attribute__((vector_size(kVecBytes), aligned(sizeof(A)), may_alias));
};

// A vector with every lane a (one vbroadcast; `V{} + a` would add 0.0 first).
template <typename A>
inline typename Vec<A>::type Splat(const A& a) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<A, float>::value) {
    return reinterpret_cast<typename Vec<A>::type>(_mm512_set1_ps(a));
  } else {
    return reinterpret_cast<typename Vec<A>::type>(_mm512_set1_pd(a));
  }
#elif defined(__AVX__)
  if constexpr (std::is_same<A, float>::value) {
    return reinterpret_cast<typename Vec<A>::type>(_mm256_broadcast_ss(&a));
  } else {
    return reinterpret_cast<typename Vec<A>::type>(_mm256_broadcast_sd(&a));
  }
#else
  typename Vec<A>::type v;
  for (int l = 0; l < Vec<A>::kLanes; ++l) v[l] = a;
  return v;
#endif
}

// Where the operand columns of one tile are: the kTile values of tap t and
// channel c start at base[t] + c * stride (contiguous; any alignment).
template <typename A>
struct Columns {
  std::vector<const A*> base;
  int64_t stride = 0;
};

// Rows that share their entry list within one source-channel block (the
// same source channels in the same order; their weights differ), in sets of
// at most GroupLimit<A>() rows. Pruning output channels in groups that keep
// the same inputs (`channel_group`) makes such rows; arbitrary lists give
// groups of one.
struct RowGroups {
  std::vector<int64_t> block_ptr;   // block kb's groups: block_ptr[kb] .. block_ptr[kb + 1]
  std::vector<int64_t> member_ptr;  // group g's rows: members[member_ptr[g] .. member_ptr[g + 1]]
  std::vector<int64_t> members;
};

// How many rows one micro-kernel call accumulates at once: each row holds
// kTile / lanes vector accumulators, so 6 rows of 4 (AVX-512 float) leave 8 of
// the 32 registers for operands; with 8 vectors per row (AVX2, or double) one.
template <typename A>
constexpr int GroupLimit() {
  return kTile / Vec<A>::kLanes <= 4 ? 6 : 1;
}

// out[k][0:kTile] += sum_{e < n} sum_t w[k][e * taps + t] * column(t, src[e])
// for the G rows k of a group: each operand vector is loaded once and used by
// the G rows (G fused multiply-adds per load instead of one).
template <typename A, int G>
void GroupTile(const A* const* base, int64_t stride, int64_t taps, const int32_t* src,
               int64_t n, const A* const* w, A* const* out) {
  using V = typename Vec<A>::type;
  using VU = typename Vec<A>::unaligned;
  constexpr int kVecs = kTile / Vec<A>::kLanes;
  V acc[G][kVecs];
  for (int k = 0; k < G; ++k) {
    for (int v = 0; v < kVecs; ++v) acc[k][v] = reinterpret_cast<const V*>(out[k])[v];
  }
  for (int64_t e = 0; e < n; ++e) {
    const int64_t offset = static_cast<int64_t>(src[e]) * stride;
    for (int64_t t = 0; t < taps; ++t) {
      const VU* c = reinterpret_cast<const VU*>(base[t] + offset);
      V cv[kVecs];
      for (int v = 0; v < kVecs; ++v) cv[v] = c[v];
      for (int k = 0; k < G; ++k) {
        const V wv = Splat(w[k][e * taps + t]);
        for (int v = 0; v < kVecs; ++v) acc[k][v] += wv * cv[v];
      }
    }
  }
  for (int k = 0; k < G; ++k) {
    for (int v = 0; v < kVecs; ++v) reinterpret_cast<V*>(out[k])[v] = acc[k][v];
  }
}

// One row (G = 1). With a tile only 4 vectors wide (AVX-512), odd taps go to
// a second accumulator set: 8 independent FMA chains hide the FMA latency.
template <typename A>
void RowTile(const A* const* base, int64_t stride, int64_t taps, const int32_t* src,
             int64_t n, const A* w, A* out) {
  using V = typename Vec<A>::type;
  using VU = typename Vec<A>::unaligned;
  constexpr int kVecs = kTile / Vec<A>::kLanes;
  V* o = reinterpret_cast<V*>(out);
  V acc[kVecs], acc2[kVecs];
  for (int v = 0; v < kVecs; ++v) acc[v] = o[v], acc2[v] = V{};
  for (int64_t e = 0; e < n; ++e) {
    const int64_t offset = static_cast<int64_t>(src[e]) * stride;
    const A* we = w + e * taps;
    int64_t t = 0;
    for (; t + 1 < taps; t += 2) {
      const V w0 = Splat(we[t]), w1 = Splat(we[t + 1]);
      const VU* c0 = reinterpret_cast<const VU*>(base[t] + offset);
      const VU* c1 = reinterpret_cast<const VU*>(base[t + 1] + offset);
      for (int v = 0; v < kVecs; ++v) acc[v] += w0 * c0[v];
      if constexpr (kVecs <= 4) {
        for (int v = 0; v < kVecs; ++v) acc2[v] += w1 * c1[v];
      } else {  // 8 vectors already make 8 chains (and AVX2 has 16 registers)
        for (int v = 0; v < kVecs; ++v) acc[v] += w1 * c1[v];
      }
    }
    if (t < taps) {
      const V w0 = Splat(we[t]);
      const VU* c0 = reinterpret_cast<const VU*>(base[t] + offset);
      for (int v = 0; v < kVecs; ++v) acc[v] += w0 * c0[v];
    }
  }
  for (int v = 0; v < kVecs; ++v) o[v] = acc[v] + acc2[v];
}

// out[r][0:kTile] = sum_{e in row r} sum_t w[e][t] * column(t, src[e]) for
// r in [0, rows), with the entries bucketed by source-channel block:
// ptr[kb * rows + r] .. ptr[kb * rows + r + 1] are the entries of row r whose
// source channel lies in block kb. Blocks are the outer loop, so that the
// columns of one block of source channels (sized to stay in L1) serve every
// row before the next block is touched: the operand loads hit L1. Within a
// block, the rows go by groups (RowGroups), and a group's accumulators stay
// in registers across all the block's entries and taps.
template <typename A>
void SparseRowsTile(const Columns<A>& cols, const int64_t* ptr, const int32_t* src,
                    const A* w, const RowGroups& groups, int64_t blocks, int64_t rows,
                    A* out) {
  constexpr int kMax = GroupLimit<A>();
  const int64_t taps = static_cast<int64_t>(cols.base.size());
  const A* const* base = cols.base.data();
  const int64_t stride = cols.stride;
  std::fill(out, out + rows * kTile, A(0));
  const A* wk[kMax];
  A* ok[kMax];
  for (int64_t kb = 0; kb < blocks; ++kb) {
    const int64_t* p = ptr + kb * rows;
    for (int64_t g = groups.block_ptr[kb]; g < groups.block_ptr[kb + 1]; ++g) {
      const int64_t* m = groups.members.data() + groups.member_ptr[g];
      const int size = static_cast<int>(groups.member_ptr[g + 1] - groups.member_ptr[g]);
      const int64_t first = p[m[0]], n = p[m[0] + 1] - first;
      for (int k = 0; k < size; ++k) {
        wk[k] = w + p[m[k]] * taps;
        ok[k] = out + m[k] * kTile;
      }
      switch (size) {
        case 1: RowTile<A>(base, stride, taps, src + first, n, wk[0], ok[0]); break;
        case 2: GroupTile<A, std::min(2, kMax)>(base, stride, taps, src + first, n, wk, ok); break;
        case 3: GroupTile<A, std::min(3, kMax)>(base, stride, taps, src + first, n, wk, ok); break;
        case 4: GroupTile<A, std::min(4, kMax)>(base, stride, taps, src + first, n, wk, ok); break;
        case 5: GroupTile<A, std::min(5, kMax)>(base, stride, taps, src + first, n, wk, ok); break;
        default: GroupTile<A, kMax>(base, stride, taps, src + first, n, wk, ok); break;
      }
    }
  }
}

// Scratch buffer aligned to 64 bytes (a cache line, and the widest vector).
template <typename A>
class Scratch {
 public:
  explicit Scratch(int64_t n) : data_(n + 64 / sizeof(A)) {}
  A* get() {
    auto p = reinterpret_cast<uintptr_t>(data_.data());
    return reinterpret_cast<A*>((p + 63) & ~uintptr_t{63});
  }

 private:
  std::vector<A> data_;
};

// dst[c * dst_stride + r] = src[r * src_stride + c] for r < rows, c < cols:
// a blocked transpose (with converting copy) in 8 x 8 blocks; float blocks use
// AVX shuffles when the build targets AVX.
template <typename S, typename D>
void Transpose(const S* src, int64_t src_stride, int64_t rows, int64_t cols, D* dst,
               int64_t dst_stride) {
  constexpr int64_t kB = 8;
  int64_t r0 = 0;
#if defined(__AVX__)
  if constexpr (std::is_same<S, float>::value && std::is_same<D, float>::value) {
    for (; r0 + kB <= rows; r0 += kB) {
      int64_t c0 = 0;
      for (; c0 + kB <= cols; c0 += kB) {
        const float* s = src + r0 * src_stride + c0;
        __m256 v0 = _mm256_loadu_ps(s + 0 * src_stride), v1 = _mm256_loadu_ps(s + 1 * src_stride);
        __m256 v2 = _mm256_loadu_ps(s + 2 * src_stride), v3 = _mm256_loadu_ps(s + 3 * src_stride);
        __m256 v4 = _mm256_loadu_ps(s + 4 * src_stride), v5 = _mm256_loadu_ps(s + 5 * src_stride);
        __m256 v6 = _mm256_loadu_ps(s + 6 * src_stride), v7 = _mm256_loadu_ps(s + 7 * src_stride);
        const __m256 t0 = _mm256_unpacklo_ps(v0, v1), t1 = _mm256_unpackhi_ps(v0, v1);
        const __m256 t2 = _mm256_unpacklo_ps(v2, v3), t3 = _mm256_unpackhi_ps(v2, v3);
        const __m256 t4 = _mm256_unpacklo_ps(v4, v5), t5 = _mm256_unpackhi_ps(v4, v5);
        const __m256 t6 = _mm256_unpacklo_ps(v6, v7), t7 = _mm256_unpackhi_ps(v6, v7);
        const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
        const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
        const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
        const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
        float* d = dst + c0 * dst_stride + r0;
        _mm256_storeu_ps(d + 0 * dst_stride, _mm256_permute2f128_ps(u0, u4, 0x20));
        _mm256_storeu_ps(d + 1 * dst_stride, _mm256_permute2f128_ps(u1, u5, 0x20));
        _mm256_storeu_ps(d + 2 * dst_stride, _mm256_permute2f128_ps(u2, u6, 0x20));
        _mm256_storeu_ps(d + 3 * dst_stride, _mm256_permute2f128_ps(u3, u7, 0x20));
        _mm256_storeu_ps(d + 4 * dst_stride, _mm256_permute2f128_ps(u0, u4, 0x31));
        _mm256_storeu_ps(d + 5 * dst_stride, _mm256_permute2f128_ps(u1, u5, 0x31));
        _mm256_storeu_ps(d + 6 * dst_stride, _mm256_permute2f128_ps(u2, u6, 0x31));
        _mm256_storeu_ps(d + 7 * dst_stride, _mm256_permute2f128_ps(u3, u7, 0x31));
      }
      for (int64_t r = r0; r < r0 + kB; ++r) {
        for (int64_t c = c0; c < cols; ++c) dst[c * dst_stride + r] = src[r * src_stride + c];
      }
    }
  }
#endif
  for (int64_t rb = r0; rb < rows; rb += kB) {
    const int64_t re = std::min(rows, rb + kB);
    for (int64_t c0 = 0; c0 < cols; c0 += kB) {
      const int64_t ce = std::min(cols, c0 + kB);
      for (int64_t c = c0; c < ce; ++c) {
        for (int64_t r = rb; r < re; ++r) {
          dst[c * dst_stride + r] = static_cast<D>(src[r * src_stride + c]);
        }
      }
    }
  }
}

// The correlation that the three ops reduce to: result position (rh, rw)
// reads, through tap (i, j), the source position
//   ((rh*a_h + off_h + i*di_h) / div_h, (rw*a_w + off_w + j*di_w) / div_w)
// when both divisions are exact and land inside the source grid (else 0).
// Forward / kernel gradient: the source is x around output positions (a =
// stride, off = -pad, di = dilation, div = 1). Input gradient: the source is
// dy around input positions (a = 1, off = pad, di = -dilation, div = stride).
struct Correlation {
  int64_t res_h, res_w, src_h, src_w, channels, k_h, k_w;
  int64_t a_h, a_w, off_h, off_w, di_h, di_w, div_h, div_w;

  static Correlation Forward(const ChannelSparseGeometry& g) {
    return {g.out_h, g.out_w, g.in_h, g.in_w, g.in_c, g.k_h, g.k_w,
            g.stride_h, g.stride_w, -g.pad_top, -g.pad_left, g.dil_h, g.dil_w, 1, 1};
  }
  static Correlation Transposed(const ChannelSparseGeometry& g) {
    return {g.in_h, g.in_w, g.out_h, g.out_w, g.out_c, g.k_h, g.k_w,
            1, 1, g.pad_top, g.pad_left, -g.dil_h, -g.dil_w, g.stride_h, g.stride_w};
  }
  // Source index along one axis, or -1.
  static int64_t Source(int64_t r, int64_t a, int64_t off, int64_t di, int64_t div,
                        int64_t k, int64_t n) {
    const int64_t num = r * a + off + k * di;
    if (num < 0 || num % div != 0 || num / div >= n) return -1;
    return num / div;
  }
};

// Provides the operand columns of each work unit (kTile consecutive result
// positions of one sample; result positions are flattened rh * res_w + rw).
//  * Row mode (a_w == div_w == 1, i.e. stride 1 along the width, and rows of
//    at least kTile / 2 positions): a unit is a run of kTile positions of one
//    result row. The source rows it needs are transposed once into
//    [channel][column] buffers (cached across the consecutive units of a
//    shard), and the column of tap (i, j) is a pointer into source row i,
//    shifted by j: no per-tap copy at all.
//  * Plane mode (stride 1 on both axes, narrower rows, and a source plane
//    that fits in L2): the whole zero-padded source plane of a sample is
//    transposed once into [channel][padded position], and result positions
//    are numbered in the padded width Wp (q = rh * Wp + rw). Then the column
//    of tap (i, j) for the positions q0 .. q0 + kTile is the contiguous run
//    at q0 + (constant offset of the tap): no gather. The positions with
//    rw >= res_w are computed and dropped (a Wp / res_w overhead).
//  * Shifted-planes mode (preferred over plane mode when its k_w planes fit
//    in L2): one plane per kernel column j, P_j[channel][rh' * res_w + rw] =
//    source(rh' + lo_h, rw + off_w + j * di_w) (zeros outside), rows exactly
//    res_w wide. The column of tap (i, j) for result positions p0 .. p0 +
//    kTile (flat, rh * res_w + rw) is then the contiguous run of P_j at p0 +
//    (off_h + i * di_h - lo_h) * res_w: no dropped positions, and loads that
//    are vector-aligned whenever res_w is a multiple of the vector width.
//  * Gather mode (otherwise): the columns are gathered per tap and position
//    into a [tap][channel][kTile] buffer (an im2col).
// A unit's valid results are a few runs of consecutive tile positions that
// map to consecutive flat result positions (one run except in plane mode).
struct Run {
  int64_t tile_pos, result_pos, len;
};

template <typename T, typename A>
class ColumnSource {
 public:
  ColumnSource(const T* src, const Correlation& c, int64_t batch)
      : src_(src), c_(c), batch_(batch), taps_(c.k_h * c.k_w) {
    row_mode_ = c.a_w == 1 && c.div_w == 1 && c.res_w >= kTile / 2;
    if (!row_mode_ && c.a_h == 1 && c.div_h == 1 && c.a_w == 1 && c.div_w == 1) {
      const int64_t lo_h = c.off_h + std::min<int64_t>(0, (c.k_h - 1) * c.di_h);
      const int64_t hi_h = c.off_h + std::max<int64_t>(0, (c.k_h - 1) * c.di_h);
      const int64_t lo_w = c.off_w + std::min<int64_t>(0, (c.k_w - 1) * c.di_w);
      const int64_t hi_w = c.off_w + std::max<int64_t>(0, (c.k_w - 1) * c.di_w);
      plane_w_ = c.res_w + hi_w - lo_w;
      plane_lo_h_ = lo_h;
      plane_lo_w_ = lo_w;
      plane_rows_ = c.res_h + hi_h - lo_h;
      const int64_t max_tap = (hi_h - lo_h) * plane_w_ + (hi_w - lo_w);
      plane_tiles_ = (c.res_h * plane_w_ + kTile - 1) / kTile;
      plane_len_ = (std::max(plane_tiles_ * kTile + max_tap, plane_rows_ * plane_w_) + 15) / 16 * 16;
      plane_span_ = kTile + max_tap;
      const int64_t bytes = plane_len_ * c.channels * static_cast<int64_t>(sizeof(A));
      plane_mode_ = bytes <= (1 << 20) && plane_w_ * 2 <= c.res_w * 3;
      // Shifted planes: k_w planes of (res_h + hi_h - lo_h) rows of res_w.
      const int64_t tiles = (c.res_h * c.res_w + kTile - 1) / kTile;
      shifted_len_ = (std::max(tiles * kTile + (hi_h - lo_h) * c.res_w, plane_rows_ * c.res_w) + 15) / 16 * 16;
      shifted_span_ = c.k_w * (kTile + (hi_h - lo_h) * c.res_w);
      const int64_t shifted_bytes = c.k_w * shifted_len_ * c.channels * static_cast<int64_t>(sizeof(A));
      shifted_mode_ = shifted_bytes <= (3 << 19) && c.res_w > 0;
      if (shifted_mode_) plane_mode_ = false;
    }
    if (row_mode_) {
      tiles_per_row_ = (c.res_w + kTile - 1) / kTile;
      const int64_t lo = c.off_w + std::min<int64_t>(0, (c.k_w - 1) * c.di_w);
      const int64_t hi = c.off_w + std::max<int64_t>(0, (c.k_w - 1) * c.di_w);
      shift_ = std::max<int64_t>(0, -lo);
      row_len_ = (tiles_per_row_ * kTile + hi + shift_ + 7) / 8 * 8;
    }
  }

  int64_t units() const {
    if (row_mode_) return batch_ * c_.res_h * tiles_per_row_;
    if (plane_mode_) return batch_ * plane_tiles_;
    // (shifted-planes and gather mode tile the flat result positions alike)
    return batch_ * ((c_.res_h * c_.res_w + kTile - 1) / kTile);
  }
  int64_t positions() const { return c_.res_h * c_.res_w; }
  int64_t channels() const { return c_.channels; }
  int64_t taps() const { return taps_; }
  // Bytes of one source channel's columns for one unit.
  int64_t bytes_per_channel() const {
    if (plane_mode_) return static_cast<int64_t>(sizeof(A)) * plane_span_;
    if (shifted_mode_) return static_cast<int64_t>(sizeof(A)) * shifted_span_;
    return static_cast<int64_t>(sizeof(A)) *
           (row_mode_ ? c_.k_h * (kTile + std::abs((c_.k_w - 1) * c_.di_w)) : taps_ * kTile);
  }

  // Per-shard state: scratch buffers and the row cache.
  class Shard {
   public:
    explicit Shard(const ColumnSource& s) : s_(s) {
      cols_.base.resize(s.taps_);
      if (s.row_mode_) {
        const int64_t slots = s.c_.k_h + 1;
        rows_.resize(slots, Scratch<A>(s.row_len_ * s.c_.channels));
        tags_.assign(slots, {-1, -2});
        stamp_.assign(slots, 0);
      } else if (s.shifted_mode_) {
        plane_ = std::make_unique<Scratch<A>>(s.c_.k_w * s.shifted_len_ * s.c_.channels);
        const Correlation& c = s.c_;
        for (int64_t i = 0; i < c.k_h; ++i) {
          for (int64_t j = 0; j < c.k_w; ++j) {
            tap_offset_.push_back(j * c.channels * s.shifted_len_ +
                                  (c.off_h + i * c.di_h - s.plane_lo_h_) * c.res_w);
          }
        }
      } else if (s.plane_mode_) {
        plane_ = std::make_unique<Scratch<A>>(s.plane_len_ * s.c_.channels);
        const Correlation& c = s.c_;
        for (int64_t i = 0; i < c.k_h; ++i) {
          for (int64_t j = 0; j < c.k_w; ++j) {
            tap_offset_.push_back((c.off_h + i * c.di_h - s.plane_lo_h_) * s.plane_w_ +
                                  c.off_w + j * c.di_w - s.plane_lo_w_);
          }
        }
      } else {
        gathered_ = std::make_unique<Scratch<A>>(s.taps_ * s.c_.channels * kTile);
      }
    }

    // Columns of `unit`; sets its sample and the runs of its valid results.
    const Columns<A>& Prepare(int64_t unit, int64_t* b, std::vector<Run>* runs) {
      const Correlation& c = s_.c_;
      runs->clear();
      if (s_.plane_mode_) {
        *b = unit / s_.plane_tiles_;
        const int64_t q0 = unit % s_.plane_tiles_ * kTile;
        const A* plane = Plane(*b);
        cols_.stride = s_.plane_len_;
        for (int64_t t = 0; t < s_.taps_; ++t) cols_.base[t] = plane + q0 + tap_offset_[t];
        const int64_t wp = s_.plane_w_;
        for (int64_t rh = q0 / wp; rh * wp < q0 + kTile && rh < c.res_h; ++rh) {
          const int64_t q_lo = std::max(q0, rh * wp);
          const int64_t q_hi = std::min(q0 + kTile, rh * wp + c.res_w);
          if (q_hi > q_lo) {
            runs->push_back({q_lo - q0, rh * c.res_w + (q_lo - rh * wp), q_hi - q_lo});
          }
        }
      } else if (s_.row_mode_) {
        const int64_t per_sample = c.res_h * s_.tiles_per_row_;
        *b = unit / per_sample;
        const int64_t rh = unit % per_sample / s_.tiles_per_row_;
        const int64_t rw0 = unit % s_.tiles_per_row_ * kTile;
        runs->push_back({0, rh * c.res_w + rw0, std::min(kTile, c.res_w - rw0)});
        cols_.stride = s_.row_len_;
        for (int64_t i = 0; i < c.k_h; ++i) {
          const int64_t sh = Correlation::Source(rh, c.a_h, c.off_h, c.di_h, c.div_h, i, c.src_h);
          const A* row = Row(*b, sh);
          for (int64_t j = 0; j < c.k_w; ++j) {
            cols_.base[i * c.k_w + j] = row + rw0 + c.off_w + j * c.di_w + s_.shift_;
          }
        }
      } else {
        const int64_t tiles = (s_.positions() + kTile - 1) / kTile;
        *b = unit / tiles;
        const int64_t p0 = unit % tiles * kTile;
        runs->push_back({0, p0, std::min(kTile, s_.positions() - p0)});
        if (s_.shifted_mode_) {
          const A* planes = ShiftedPlanes(*b);
          cols_.stride = s_.shifted_len_;
          for (int64_t t = 0; t < s_.taps_; ++t) cols_.base[t] = planes + p0 + tap_offset_[t];
        } else {
          Gather(*b, p0);
        }
      }
      return cols_;
    }

   private:
    // The zero-padded source plane of sample b as [channel][plane_len_]
    // (kept while consecutive units stay in the sample).
    const A* Plane(int64_t b) {
      A* dst = plane_->get();
      if (plane_sample_ == b) return dst;
      plane_sample_ = b;
      const Correlation& c = s_.c_;
      const int64_t len = s_.plane_len_, wp = s_.plane_w_, ch = c.channels;
      std::fill(dst, dst + len * ch, A(0));
      const int64_t h0 = std::max<int64_t>(0, s_.plane_lo_h_);
      const int64_t h1 = std::min(c.src_h, s_.plane_lo_h_ + s_.plane_rows_);
      const int64_t w0 = std::max<int64_t>(0, s_.plane_lo_w_);
      const int64_t w1 = std::min(c.src_w, s_.plane_lo_w_ + wp);
      if (w1 <= w0) return dst;
      for (int64_t sh = h0; sh < h1; ++sh) {
        const T* src = s_.src_ + ((b * c.src_h + sh) * c.src_w + w0) * ch;
        Transpose(src, ch, w1 - w0, ch,
                  dst + (sh - s_.plane_lo_h_) * wp + (w0 - s_.plane_lo_w_), len);
      }
      return dst;
    }

    // The k_w shifted planes of sample b as [j][channel][shifted_len_] (kept
    // while consecutive units stay in the sample).
    const A* ShiftedPlanes(int64_t b) {
      A* dst = plane_->get();
      if (plane_sample_ == b) return dst;
      plane_sample_ = b;
      const Correlation& c = s_.c_;
      const int64_t len = s_.shifted_len_, ch = c.channels, w = c.res_w;
      std::fill(dst, dst + c.k_w * ch * len, A(0));
      const int64_t h0 = std::max<int64_t>(0, s_.plane_lo_h_);
      const int64_t h1 = std::min(c.src_h, s_.plane_lo_h_ + s_.plane_rows_);
      for (int64_t j = 0; j < c.k_w; ++j) {
        // Result column rw reads source column rw + shift.
        const int64_t shift = c.off_w + j * c.di_w;
        const int64_t w0 = std::max<int64_t>(0, -shift);
        const int64_t w1 = std::min(w, c.src_w - shift);
        if (w1 <= w0) continue;
        A* plane = dst + j * ch * len;
        for (int64_t sh = h0; sh < h1; ++sh) {
          const T* src = s_.src_ + ((b * c.src_h + sh) * c.src_w + w0 + shift) * ch;
          Transpose(src, ch, w1 - w0, ch, plane + (sh - s_.plane_lo_h_) * w + w0, len);
        }
      }
      return dst;
    }

    // The source row (b, sh) transposed to [channel][row_len_] (column
    // index = source column + shift_; zeros outside the source), from the
    // cache when a recent unit used it. sh = -1: a zero row.
    const A* Row(int64_t b, int64_t sh) {
      const Correlation& c = s_.c_;
      const std::pair<int64_t, int64_t> tag{sh < 0 ? -1 : b, sh};
      ++clock_;
      int64_t victim = 0;
      for (size_t k = 0; k < tags_.size(); ++k) {
        if (tags_[k] == tag) {
          stamp_[k] = clock_;
          return rows_[k].get();
        }
        if (stamp_[k] < stamp_[victim]) victim = k;
      }
      tags_[victim] = tag;
      stamp_[victim] = clock_;
      A* dst = rows_[victim].get();
      const int64_t len = s_.row_len_, ch = c.channels;
      if (sh < 0) {
        std::fill(dst, dst + len * ch, A(0));
        return dst;
      }
      const T* src = s_.src_ + (b * c.src_h + sh) * c.src_w * ch;
      const int64_t first = s_.shift_;  // row column of source column 0
      const int64_t last = std::min(len, first + c.src_w);
      for (int64_t cc = 0; cc < ch; ++cc) {
        A* d = dst + cc * len;
        std::fill(d, d + first, A(0));
        std::fill(d + last, d + len, A(0));
      }
      // [column][channel] -> [channel][column].
      Transpose(src, ch, last - first, ch, dst + first, len);
      return dst;
    }

    void Gather(int64_t b, int64_t p0) {
      const Correlation& c = s_.c_;
      const int64_t ch = c.channels;
      A* col = gathered_->get();
      const T* rows[kTile];
      for (int64_t t = 0; t < s_.taps_; ++t) {
        const int64_t i = t / c.k_w, j = t % c.k_w;
        for (int64_t p = 0; p < kTile; ++p) {
          const int64_t pos = p0 + p;
          const int64_t rh = pos / c.res_w, rw = pos % c.res_w;
          const int64_t sh = pos < s_.positions()
              ? Correlation::Source(rh, c.a_h, c.off_h, c.di_h, c.div_h, i, c.src_h) : -1;
          const int64_t sw = Correlation::Source(rw, c.a_w, c.off_w, c.di_w, c.div_w, j, c.src_w);
          rows[p] = sh >= 0 && sw >= 0 ? s_.src_ + ((b * c.src_h + sh) * c.src_w + sw) * ch : nullptr;
        }
        A* dst_t = col + t * ch * kTile;
        constexpr int64_t kBlock = 8;
        for (int64_t c0 = 0; c0 < ch; c0 += kBlock) {
          const int64_t cw = std::min(kBlock, ch - c0);
          for (int64_t p = 0; p < kTile; ++p) {
            A* d = dst_t + c0 * kTile + p;
            const T* s = rows[p];
            if (s == nullptr) {
              for (int64_t cc = 0; cc < cw; ++cc) d[cc * kTile] = A(0);
            } else {
              for (int64_t cc = 0; cc < cw; ++cc) d[cc * kTile] = static_cast<A>(s[c0 + cc]);
            }
          }
        }
        cols_.base[t] = dst_t;
      }
      cols_.stride = kTile;
    }

    const ColumnSource& s_;
    Columns<A> cols_;
    std::vector<Scratch<A>> rows_;
    std::vector<std::pair<int64_t, int64_t>> tags_;
    std::vector<int64_t> stamp_;
    int64_t clock_ = 0;
    std::unique_ptr<Scratch<A>> gathered_;
    std::unique_ptr<Scratch<A>> plane_;
    std::vector<int64_t> tap_offset_;
    int64_t plane_sample_ = -1;
  };

 private:
  const T* src_;
  Correlation c_;
  int64_t batch_, taps_;
  bool row_mode_ = false, plane_mode_ = false;
  int64_t tiles_per_row_ = 0, shift_ = 0, row_len_ = 0;
  int64_t plane_w_ = 0, plane_rows_ = 0, plane_lo_h_ = 0, plane_lo_w_ = 0;
  int64_t plane_tiles_ = 0, plane_len_ = 0, plane_span_ = 0;
  bool shifted_mode_ = false;
  int64_t shifted_len_ = 0, shifted_span_ = 0;
};

// Writes out[r][run.tile_pos + p] to y[(run.result_pos + p) * rows + r] for
// every run and p < run.len.
template <typename T, typename A>
void ScatterTile(const A* out, int64_t rows, const std::vector<Run>& runs, T* y) {
  for (const Run& run : runs) {
    Transpose(out + run.tile_pos, kTile, rows, run.len, y + run.result_pos * rows, rows);
  }
}

// The connection lists as CSR rows, weights [entry][tap]:
//   forward: row o = connections[o, :], weights kernel[t, e, o];
//   transposed: row c = the (o, e) with connections[o, e] == c, ordered by
//   (o, e), source o, weights kernel[t, e, o]. Weights are [entry][tap].
template <typename T, typename A>
struct Rows {
  std::vector<int64_t> row_ptr;
  std::vector<int32_t> src;
  std::vector<A> w;
};

template <typename T, typename A>
Rows<T, A> ForwardRows(const T* kernel, const int32_t* conn,
                       const ChannelSparseGeometry& g) {
  const int64_t taps = g.k_h * g.k_w, m = g.m, cout = g.out_c;
  Rows<T, A> rows;
  rows.row_ptr.resize(cout + 1);
  rows.src.assign(conn, conn + cout * m);
  rows.w.resize(cout * m * taps);
  for (int64_t o = 0; o <= cout; ++o) rows.row_ptr[o] = o * m;
  for (int64_t t = 0; t < taps; ++t) {
    for (int64_t e = 0; e < m; ++e) {
      for (int64_t o = 0; o < cout; ++o) {
        rows.w[(o * m + e) * taps + t] =
            static_cast<A>(kernel[(t * m + e) * cout + o]);
      }
    }
  }
  return rows;
}

template <typename T, typename A>
Rows<T, A> TransposedRows(const T* kernel, const int32_t* conn,
                          const ChannelSparseGeometry& g) {
  const int64_t taps = g.k_h * g.k_w, m = g.m, cout = g.out_c, cin = g.in_c;
  Rows<T, A> rows;
  rows.row_ptr.assign(cin + 1, 0);
  for (int64_t i = 0; i < cout * m; ++i) ++rows.row_ptr[conn[i] + 1];
  for (int64_t c = 0; c < cin; ++c) rows.row_ptr[c + 1] += rows.row_ptr[c];
  std::vector<int64_t> fill(rows.row_ptr.begin(), rows.row_ptr.end() - 1);
  rows.src.resize(cout * m);
  rows.w.resize(cout * m * taps);
  for (int64_t o = 0; o < cout; ++o) {
    for (int64_t e = 0; e < m; ++e) {
      const int64_t slot = fill[conn[o * m + e]]++;
      rows.src[slot] = static_cast<int32_t>(o);
      for (int64_t t = 0; t < taps; ++t) {
        rows.w[slot * taps + t] = static_cast<A>(kernel[(t * m + e) * cout + o]);
      }
    }
  }
  return rows;
}

// `rows` with each row's entries bucketed by source-channel block (stable):
// row_ptr becomes [block][row] (blocks * rows + 1 offsets).
template <typename T, typename A>
Rows<T, A> BlockRows(const Rows<T, A>& rows, int64_t result_channels, int64_t taps,
                     int64_t block, int64_t blocks) {
  Rows<T, A> out;
  const int64_t entries = rows.row_ptr[result_channels];
  out.row_ptr.assign(blocks * result_channels + 1, 0);
  for (int64_t r = 0; r < result_channels; ++r) {
    for (int64_t e = rows.row_ptr[r]; e < rows.row_ptr[r + 1]; ++e) {
      ++out.row_ptr[rows.src[e] / block * result_channels + r + 1];
    }
  }
  for (int64_t i = 0; i < blocks * result_channels; ++i) out.row_ptr[i + 1] += out.row_ptr[i];
  std::vector<int64_t> fill(out.row_ptr.begin(), out.row_ptr.end() - 1);
  out.src.resize(entries);
  out.w.resize(entries * taps);
  for (int64_t r = 0; r < result_channels; ++r) {
    for (int64_t e = rows.row_ptr[r]; e < rows.row_ptr[r + 1]; ++e) {
      const int64_t slot = fill[rows.src[e] / block * result_channels + r]++;
      out.src[slot] = rows.src[e];
      std::copy(rows.w.begin() + e * taps, rows.w.begin() + (e + 1) * taps,
                out.w.begin() + slot * taps);
    }
  }
  return out;
}

// The groups of `blocked` (row_ptr [block][row]): within each block, the
// non-empty rows with identical source lists, in order of their first row,
// cut into sets of at most max_group.
template <typename T, typename A>
RowGroups GroupRows(const Rows<T, A>& blocked, int64_t result_channels, int64_t blocks,
                    int max_group) {
  RowGroups groups;
  groups.block_ptr.push_back(0);
  groups.member_ptr.push_back(0);
  const int64_t* ptr = blocked.row_ptr.data();
  const int32_t* src = blocked.src.data();
  std::vector<int64_t> leader(result_channels), next(result_channels);
  for (int64_t kb = 0; kb < blocks; ++kb) {
    const int64_t* p = ptr + kb * result_channels;
    // leader[r]: the first row with r's list; next: a linked list per leader.
    std::map<std::vector<int32_t>, int64_t> seen;
    std::vector<int64_t> last(result_channels, -1);
    for (int64_t r = 0; r < result_channels; ++r) {
      next[r] = -1;
      if (p[r] == p[r + 1]) {
        leader[r] = -1;
        continue;
      }
      if (max_group == 1) {
        leader[r] = r;
        continue;
      }
      auto it = seen.emplace(std::vector<int32_t>(src + p[r], src + p[r + 1]), r).first;
      leader[r] = it->second;
      if (leader[r] != r) next[last[leader[r]]] = r;
      last[leader[r]] = r;
    }
    for (int64_t r = 0; r < result_channels; ++r) {
      if (leader[r] != r) continue;
      int size = 0;
      for (int64_t q = r; q >= 0; q = next[q]) {
        if (size == max_group) {
          groups.member_ptr.push_back(static_cast<int64_t>(groups.members.size()));
          size = 0;
        }
        groups.members.push_back(q);
        ++size;
      }
      groups.member_ptr.push_back(static_cast<int64_t>(groups.members.size()));
    }
    groups.block_ptr.push_back(static_cast<int64_t>(groups.member_ptr.size()) - 1);
  }
  return groups;
}

// What the forward op applies to each output before storing it:
// activation(y + bias[o]) (bias may be null; relu or none).
template <typename T>
struct Epilogue {
  const T* bias = nullptr;
  bool relu = false;
};

// out[r][:] = activation(out[r][:] + bias[r]) for the `rows` tiles.
template <typename A>
void ApplyEpilogue(const std::vector<A>& bias, bool relu, int64_t rows, A* out) {
  for (int64_t r = 0; r < rows; ++r) {
    A* o = out + r * kTile;
    const A b = bias.empty() ? A(0) : bias[r];
    if (relu) {
      for (int64_t p = 0; p < kTile; ++p) o[p] = std::max(o[p] + b, A(0));
    } else {
      for (int64_t p = 0; p < kTile; ++p) o[p] += b;
    }
  }
}

// result[b, position, r] for every result channel r of `rows`, from the
// columns of `source`: the forward op (source x, rows = the connection
// lists) and the input gradient (source dy, rows = the transposed lists).
template <typename T, typename A>
void SparseRowsConvCpu(OpKernelContext* ctx, const ColumnSource<T, A>& source,
                       const Rows<T, A>& rows, int64_t result_channels,
                       int64_t cost, T* result, const Epilogue<T>& epilogue = {}) {
  std::vector<A> bias;
  if (epilogue.bias != nullptr) bias.assign(epilogue.bias, epilogue.bias + result_channels);
  const bool fused = epilogue.bias != nullptr || epilogue.relu;
  const int64_t positions = source.positions();
  // Source channels per block: their columns of one tile fill about half of
  // the L1 data cache (48 KiB on the AVX-512 CPUs, 32 KiB assumed otherwise),
  // in blocks of equal width (a short last block makes short loops).
  const int64_t channels = source.channels();
#if defined(__AVX512F__)
  constexpr int64_t kBudget = 24 << 10;
#else
  constexpr int64_t kBudget = 16 << 10;
#endif
  const int64_t widest = std::max<int64_t>(1, kBudget / std::max<int64_t>(1, source.bytes_per_channel()));
  const int64_t blocks = std::max<int64_t>(1, (channels + widest - 1) / widest);
  const int64_t block = std::max<int64_t>(1, (channels + blocks - 1) / blocks);
  const Rows<T, A> blocked = BlockRows(rows, result_channels, source.taps(), block, blocks);
  const RowGroups groups = GroupRows(blocked, result_channels, blocks, GroupLimit<A>());
  auto work = [&](int64_t begin, int64_t end) {
    typename ColumnSource<T, A>::Shard shard(source);
    Scratch<A> out(result_channels * kTile);
    std::vector<Run> runs;
    for (int64_t unit = begin; unit < end; ++unit) {
      int64_t b;
      const Columns<A>& cols = shard.Prepare(unit, &b, &runs);
      SparseRowsTile(cols, blocked.row_ptr.data(), blocked.src.data(), blocked.w.data(),
                     groups, blocks, result_channels, out.get());
      if (fused) ApplyEpilogue(bias, epilogue.relu, result_channels, out.get());
      ScatterTile(out.get(), result_channels, runs, result + b * positions * result_channels);
    }
  };
  ParallelFor(ctx, source.units(), cost, work);
}

template <typename T>
void ForwardCpu(OpKernelContext* ctx, const T* x, const T* kernel,
                const int32_t* conn, T* y, const ChannelSparseGeometry& g,
                const Epilogue<T>& epilogue) {
  using A = typename Acc<T>::type;
  SparseRowsConvCpu<T, A>(ctx, ColumnSource<T, A>(x, Correlation::Forward(g), g.batch),
                          ForwardRows<T, A>(kernel, conn, g), g.out_c,
                          kTile * g.k_h * g.k_w * (g.m * g.out_c + g.in_c), y, epilogue);
}

template <typename T>
void BackpropInputCpu(OpKernelContext* ctx, const T* dy, const T* kernel,
                      const int32_t* conn, T* dx,
                      const ChannelSparseGeometry& g) {
  using A = typename Acc<T>::type;
  SparseRowsConvCpu<T, A>(ctx, ColumnSource<T, A>(dy, Correlation::Transposed(g), g.batch),
                          TransposedRows<T, A>(kernel, conn, g), g.in_c,
                          kTile * g.k_h * g.k_w * (g.m * g.out_c + g.out_c), dx);
}

template <typename T>
void BackpropKernelCpu(OpKernelContext* ctx, const T* x, const T* dy,
                       const int32_t* conn, T* dkernel,
                       const ChannelSparseGeometry& g) {
  using A = typename Acc<T>::type;
  using V = typename Vec<A>::type;
  using VU = typename Vec<A>::unaligned;
  constexpr int kVecs = kTile / Vec<A>::kLanes;
  const int64_t taps = g.k_h * g.k_w;
  const int64_t m = g.m, cout = g.out_c;
  const ColumnSource<T, A> source(x, Correlation::Forward(g), g.batch);
  const int64_t positions = source.positions();
  const int64_t units = source.units();
  const int64_t weights = cout * m * taps;
  // A fixed number of blocks of consecutive units, each summing into its own
  // partial gradient, reduced in block order: deterministic whatever the
  // thread pool does. The partial sums are kept as vectors (one lane per
  // position residue) and reduced across lanes only once, at the end.
  const int64_t blocks = std::min<int64_t>(units, 8);
  std::vector<V> partial(blocks * weights, V{});
  auto work = [&](int64_t begin, int64_t end) {
    typename ColumnSource<T, A>::Shard shard(source);
    Scratch<A> dyt(cout * kTile);
    std::vector<Run> runs;
    for (int64_t block = begin; block < end; ++block) {
      V* dw = partial.data() + block * weights;  // [o][e][t]
      for (int64_t unit = units * block / blocks;
           unit < units * (block + 1) / blocks; ++unit) {
        int64_t b;
        const Columns<A>& cols = shard.Prepare(unit, &b, &runs);
        A* d = dyt.get();
        // dy of the unit's valid positions as [o][tile position], zeros elsewhere.
        std::fill(d, d + cout * kTile, A(0));
        for (const Run& run : runs) {
          Transpose(dy + (b * positions + run.result_pos) * cout, cout, run.len, cout,
                    d + run.tile_pos, kTile);
        }
        for (int64_t o = 0; o < cout; ++o) {
          V dv[kVecs];
          for (int v = 0; v < kVecs; ++v) dv[v] = reinterpret_cast<const V*>(d + o * kTile)[v];
          for (int64_t e = 0; e < m; ++e) {
            const int64_t offset = static_cast<int64_t>(conn[o * m + e]) * cols.stride;
            V* dwe = dw + (o * m + e) * taps;
            for (int64_t t = 0; t < taps; ++t) {
              const VU* cv = reinterpret_cast<const VU*>(cols.base[t] + offset);
              V acc = dwe[t];
              for (int v = 0; v < kVecs; ++v) acc += cv[v] * dv[v];
              dwe[t] = acc;
            }
          }
        }
      }
    }
  };
  ParallelFor(ctx, blocks,
              (units / std::max<int64_t>(blocks, 1) + 1) * kTile * taps * (m * cout + g.in_c),
              work);
  for (int64_t t = 0; t < taps; ++t) {
    for (int64_t e = 0; e < m; ++e) {
      for (int64_t o = 0; o < cout; ++o) {
        V sum = V{};
        for (int64_t block = 0; block < blocks; ++block) {
          sum += partial[block * weights + (o * m + e) * taps + t];
        }
        A total = 0;
        for (int l = 0; l < Vec<A>::kLanes; ++l) total += sum[l];
        dkernel[(t * m + e) * cout + o] = static_cast<T>(total);
      }
    }
  }
}

}  // namespace

// --- argument checks shared by the three ops -----------------------------------

class ChannelSparseBase : public OpKernel {
 public:
  explicit ChannelSparseBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
    std::vector<int32_t> strides, dilations;
    std::string padding;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("strides", &strides));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("dilations", &dilations));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("padding", &padding));
    OP_REQUIRES(ctx, strides.size() == 2 && strides[0] >= 1 && strides[1] >= 1,
                errors::InvalidArgument(
                    "strides must be 2 positive ints (height, width)"));
    OP_REQUIRES(ctx,
                dilations.size() == 2 && dilations[0] >= 1 && dilations[1] >= 1,
                errors::InvalidArgument(
                    "dilations must be 2 positive ints (height, width)"));
    stride_h_ = strides[0];
    stride_w_ = strides[1];
    dil_h_ = dilations[0];
    dil_w_ = dilations[1];
    same_ = padding == "SAME";
  }

 protected:
  // Validates shapes (and, when the connections are in host memory, their
  // values: the GPU kernels instead skip out-of-range connections); fills
  // the geometry.
  Status Geometry(const TensorShape& x, const TensorShape& kernel,
                  const Tensor& connections, bool check_values,
                  ChannelSparseGeometry* g) const {
    if (x.dims() != 4) {
      return errors::InvalidArgument("x must be [B, H, W, Cin], got shape ",
                                     x.DebugString());
    }
    if (kernel.dims() != 4) {
      return errors::InvalidArgument("kernel must be [kh, kw, m, Cout], got shape ",
                                     kernel.DebugString());
    }
    if (connections.dims() != 2) {
      return errors::InvalidArgument("connections must be [Cout, m], got shape ",
                                     connections.shape().DebugString());
    }
    if (connections.dim_size(0) != kernel.dim_size(3) ||
        connections.dim_size(1) != kernel.dim_size(2)) {
      return errors::InvalidArgument(
          "connections ", connections.shape().DebugString(),
          " must be [Cout, m] for kernel ", kernel.DebugString(),
          " [kh, kw, m, Cout]");
    }
    if (kernel.dim_size(0) < 1 || kernel.dim_size(1) < 1) {
      return errors::InvalidArgument("kernel must have positive spatial size, got ",
                                     kernel.DebugString());
    }
    g->batch = x.dim_size(0);
    g->in_h = x.dim_size(1);
    g->in_w = x.dim_size(2);
    g->in_c = x.dim_size(3);
    g->k_h = kernel.dim_size(0);
    g->k_w = kernel.dim_size(1);
    g->m = kernel.dim_size(2);
    g->out_c = kernel.dim_size(3);
    g->stride_h = stride_h_;
    g->stride_w = stride_w_;
    g->dil_h = dil_h_;
    g->dil_w = dil_w_;
    if (g->m > g->in_c) {
      return errors::InvalidArgument("connections has m = ", g->m,
                                     " entries per row but x has only ", g->in_c,
                                     " input channels");
    }
    auto axis = [&](int64_t n, int64_t k, int64_t s, int64_t d, int64_t* out,
                    int64_t* pad) {
      const int64_t span = (k - 1) * d + 1;
      if (same_) {
        *out = (n + s - 1) / s;
        *pad = std::max<int64_t>((*out - 1) * s + span - n, 0) / 2;
      } else {
        *out = n >= span ? (n - span) / s + 1 : 0;
        *pad = 0;
      }
    };
    axis(g->in_h, g->k_h, g->stride_h, g->dil_h, &g->out_h, &g->pad_top);
    axis(g->in_w, g->k_w, g->stride_w, g->dil_w, &g->out_w, &g->pad_left);
    if (!check_values) return ::tensorflow::OkStatus();
    // Connection values: in range, distinct per row.
    const auto conn = connections.matrix<int32_t>();
    std::vector<int64_t> seen(g->in_c, -1);
    for (int64_t o = 0; o < g->out_c; ++o) {
      for (int64_t e = 0; e < g->m; ++e) {
        const int32_t c = conn(o, e);
        if (c < 0 || c >= g->in_c) {
          return errors::InvalidArgument("connections[", o, ", ", e, "] = ", c,
                                         " is out of range [0, ", g->in_c, ")");
        }
        if (seen[c] == o) {
          return errors::InvalidArgument("connections row ", o,
                                         " lists input channel ", c, " twice");
        }
        seen[c] = o;
      }
    }
    return ::tensorflow::OkStatus();
  }

  static Status ShapeFromSizes(const Tensor& sizes, const char* name,
                               TensorShape* shape) {
    if (sizes.dims() != 1 || sizes.NumElements() != 4) {
      return errors::InvalidArgument(name, " must be a vector of 4 ints, got shape ",
                                     sizes.shape().DebugString());
    }
    auto v = sizes.vec<int32_t>();
    for (int i = 0; i < 4; ++i) {
      if (v(i) < 0) {
        return errors::InvalidArgument(name, " must be non-negative, got ", v(i));
      }
    }
    return TensorShape::BuildTensorShape({v(0), v(1), v(2), v(3)}, shape);
  }

  static Status CheckGrad(const Tensor& grad, const ChannelSparseGeometry& g) {
    const TensorShape expected({g.batch, g.out_h, g.out_w, g.out_c});
    if (grad.shape() != expected) {
      return errors::InvalidArgument("grad must have the output shape ",
                                     expected.DebugString(), ", got ",
                                     grad.shape().DebugString());
    }
    return ::tensorflow::OkStatus();
  }

  int64_t stride_h_, stride_w_, dil_h_, dil_w_;
  bool same_;
};

// --- device dispatch --------------------------------------------------------------

template <typename Device, typename T>
struct ChannelSparseFunctor;

using CPUDevice = Eigen::ThreadPoolDevice;

template <typename T>
struct ChannelSparseFunctor<CPUDevice, T> {
  static void Forward(OpKernelContext* ctx, const T* x, const T* kernel,
                      const int32_t* conn, T* y, const ChannelSparseGeometry& g,
                      const Epilogue<T>& epilogue) {
    ForwardCpu(ctx, x, kernel, conn, y, g, epilogue);
  }
  static void BackpropInput(OpKernelContext* ctx, const T* dy, const T* kernel,
                            const int32_t* conn, T* dx,
                            const ChannelSparseGeometry& g) {
    BackpropInputCpu(ctx, dy, kernel, conn, dx, g);
  }
  static void BackpropKernel(OpKernelContext* ctx, const T* x, const T* dy,
                             const int32_t* conn, T* dkernel,
                             const ChannelSparseGeometry& g) {
    BackpropKernelCpu(ctx, x, dy, conn, dkernel, g);
  }
};

#if TF_SPARSECONV_CUDA
using GPUDevice = Eigen::GpuDevice;

template <typename T>
struct ChannelSparseFunctor<GPUDevice, T> {
  static void Forward(OpKernelContext* ctx, const T* x, const T* kernel,
                      const int32_t* conn, T* y, const ChannelSparseGeometry& g,
                      const Epilogue<T>& epilogue) {
    const char* err = LaunchChannelSparseConv2DGpu(DTypeTraits<T>::kFormat, x, kernel, conn,
                                                   epilogue.bias, epilogue.relu, y, g,
                                                   GpuStream(ctx));
    OP_REQUIRES(ctx, err == nullptr, errors::Internal("GPU kernel failed: ", err));
  }
  static void BackpropInput(OpKernelContext* ctx, const T* dy, const T* kernel,
                            const int32_t* conn, T* dx,
                            const ChannelSparseGeometry& g) {
    // Deterministic gather; the transposed connection list is built in a
    // temporary workspace (the connections stay on the device).
    int64_t bytes = 0;
    const char* err = ChannelSparseConv2DBackpropInputGpuWorkspaceBytes(g, &bytes);
    OP_REQUIRES(ctx, err == nullptr, errors::Internal("GPU kernel failed: ", err));
    Tensor workspace;
    void* ws = nullptr;
    if (bytes > 0) {
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(::tensorflow::DT_INT8, TensorShape({bytes}),
                                             &workspace));
      ws = workspace.flat<int8_t>().data();
    }
    err = LaunchChannelSparseConv2DBackpropInputGpu(
        DTypeTraits<T>::kFormat, dy, kernel, conn, dx, ws, bytes, g, GpuStream(ctx));
    OP_REQUIRES(ctx, err == nullptr, errors::Internal("GPU kernel failed: ", err));
  }
  static void BackpropKernel(OpKernelContext* ctx, const T* x, const T* dy,
                             const int32_t* conn, T* dkernel,
                             const ChannelSparseGeometry& g) {
    const char* err = LaunchChannelSparseConv2DBackpropKernelGpu(
        DTypeTraits<T>::kFormat, x, dy, conn, dkernel, g, GpuStream(ctx));
    OP_REQUIRES(ctx, err == nullptr, errors::Internal("GPU kernel failed: ", err));
  }
};
#endif  // TF_SPARSECONV_CUDA

// Connections live in host memory (and are validated) on the CPU only.
template <typename Device>
constexpr bool kCheckConnections = std::is_same<Device, CPUDevice>::value;

template <typename Device, typename T>
class ChannelSparseConv2DOp : public ChannelSparseBase {
 public:
  using ChannelSparseBase::ChannelSparseBase;
  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& kernel = ctx->input(1);
    const Tensor& connections = ctx->input(2);
    ChannelSparseGeometry g;
    OP_REQUIRES_OK(ctx, Geometry(x.shape(), kernel.shape(), connections, kCheckConnections<Device>, &g));
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            0, TensorShape({g.batch, g.out_h, g.out_w, g.out_c}), &y));
    // Empty operands (m = 0, no input positions) are handled by the
    // kernels, which then write zeros.
    if (y->NumElements() == 0) return;
    ChannelSparseFunctor<Device, T>::Forward(
        ctx, x.flat<T>().data(), kernel.flat<T>().data(),
        connections.flat<int32_t>().data(), y->flat<T>().data(), g, Epilogue<T>{});
  }
};

template <typename Device, typename T>
class ChannelSparseConv2DBiasActivationOp : public ChannelSparseBase {
 public:
  explicit ChannelSparseConv2DBiasActivationOp(OpKernelConstruction* ctx)
      : ChannelSparseBase(ctx) {
    std::string activation;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("activation", &activation));
    OP_REQUIRES(ctx, activation == "linear" || activation == "relu",
                errors::InvalidArgument("activation must be 'linear' or 'relu', got '",
                                        activation, "'"));
    relu_ = activation == "relu";
  }
  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& kernel = ctx->input(1);
    const Tensor& connections = ctx->input(2);
    const Tensor& bias = ctx->input(3);
    ChannelSparseGeometry g;
    OP_REQUIRES_OK(ctx, Geometry(x.shape(), kernel.shape(), connections, kCheckConnections<Device>, &g));
    OP_REQUIRES(ctx, bias.dims() == 1 && bias.dim_size(0) == g.out_c,
                errors::InvalidArgument("bias must be [Cout] = [", g.out_c, "], got shape ",
                                        bias.shape().DebugString()));
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            0, TensorShape({g.batch, g.out_h, g.out_w, g.out_c}), &y));
    if (y->NumElements() == 0) return;
    ChannelSparseFunctor<Device, T>::Forward(
        ctx, x.flat<T>().data(), kernel.flat<T>().data(),
        connections.flat<int32_t>().data(), y->flat<T>().data(), g,
        Epilogue<T>{bias.flat<T>().data(), relu_});
  }

 private:
  bool relu_ = false;
};

template <typename Device, typename T>
class ChannelSparseConv2DBackpropInputOp : public ChannelSparseBase {
 public:
  using ChannelSparseBase::ChannelSparseBase;
  void Compute(OpKernelContext* ctx) override {
    TensorShape x_shape;
    OP_REQUIRES_OK(ctx, ShapeFromSizes(ctx->input(0), "input_sizes", &x_shape));
    const Tensor& kernel = ctx->input(1);
    const Tensor& connections = ctx->input(2);
    const Tensor& grad = ctx->input(3);
    ChannelSparseGeometry g;
    OP_REQUIRES_OK(ctx, Geometry(x_shape, kernel.shape(), connections, kCheckConnections<Device>, &g));
    OP_REQUIRES_OK(ctx, CheckGrad(grad, g));
    Tensor* dx = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x_shape, &dx));
    if (dx->NumElements() == 0) return;
    ChannelSparseFunctor<Device, T>::BackpropInput(
        ctx, grad.flat<T>().data(), kernel.flat<T>().data(),
        connections.flat<int32_t>().data(), dx->flat<T>().data(), g);
  }
};

template <typename Device, typename T>
class ChannelSparseConv2DBackpropKernelOp : public ChannelSparseBase {
 public:
  using ChannelSparseBase::ChannelSparseBase;
  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    TensorShape kernel_shape;
    OP_REQUIRES_OK(ctx, ShapeFromSizes(ctx->input(1), "kernel_sizes", &kernel_shape));
    const Tensor& connections = ctx->input(2);
    const Tensor& grad = ctx->input(3);
    ChannelSparseGeometry g;
    OP_REQUIRES_OK(ctx, Geometry(x.shape(), kernel_shape, connections, kCheckConnections<Device>, &g));
    OP_REQUIRES_OK(ctx, CheckGrad(grad, g));
    Tensor* dkernel = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, kernel_shape, &dkernel));
    if (dkernel->NumElements() == 0) return;
    ChannelSparseFunctor<Device, T>::BackpropKernel(
        ctx, x.flat<T>().data(), grad.flat<T>().data(),
        connections.flat<int32_t>().data(), dkernel->flat<T>().data(), g);
  }
};

// On the CPU the connections are read (and validated) in host memory; on the
// GPU they stay on the device and the kernels skip out-of-range entries.
#define TSC_REGISTER_CPU(T)                                                   \
  REGISTER_KERNEL_BUILDER(Name("TfSparseConv>ChannelSparseConv2D")            \
                              .Device(::tensorflow::DEVICE_CPU)               \
                              .TypeConstraint<T>("T"),                        \
                          ChannelSparseConv2DOp<CPUDevice, T>);               \
  REGISTER_KERNEL_BUILDER(                                                    \
      Name("TfSparseConv>ChannelSparseConv2DBiasActivation")                  \
          .Device(::tensorflow::DEVICE_CPU)                                   \
          .TypeConstraint<T>("T"),                                            \
      ChannelSparseConv2DBiasActivationOp<CPUDevice, T>);                     \
  REGISTER_KERNEL_BUILDER(Name("TfSparseConv>ChannelSparseConv2DBackpropInput") \
                              .Device(::tensorflow::DEVICE_CPU)               \
                              .TypeConstraint<T>("T"),                        \
                          ChannelSparseConv2DBackpropInputOp<CPUDevice, T>);  \
  REGISTER_KERNEL_BUILDER(                                                    \
      Name("TfSparseConv>ChannelSparseConv2DBackpropKernel")                  \
          .Device(::tensorflow::DEVICE_CPU)                                   \
          .TypeConstraint<T>("T"),                                            \
      ChannelSparseConv2DBackpropKernelOp<CPUDevice, T>);
TSC_REGISTER_CPU(Eigen::half);
TSC_REGISTER_CPU(Eigen::bfloat16);
TSC_REGISTER_CPU(float);
TSC_REGISTER_CPU(double);
#undef TSC_REGISTER_CPU

#if TF_SPARSECONV_CUDA
#define TSC_REGISTER_GPU(T)                                                   \
  REGISTER_KERNEL_BUILDER(Name("TfSparseConv>ChannelSparseConv2D")            \
                              .Device(::tensorflow::DEVICE_GPU)               \
                              .TypeConstraint<T>("T"),                        \
                          ChannelSparseConv2DOp<GPUDevice, T>);               \
  REGISTER_KERNEL_BUILDER(                                                    \
      Name("TfSparseConv>ChannelSparseConv2DBiasActivation")                  \
          .Device(::tensorflow::DEVICE_GPU)                                   \
          .TypeConstraint<T>("T"),                                            \
      ChannelSparseConv2DBiasActivationOp<GPUDevice, T>);                     \
  REGISTER_KERNEL_BUILDER(Name("TfSparseConv>ChannelSparseConv2DBackpropInput") \
                              .Device(::tensorflow::DEVICE_GPU)               \
                              .HostMemory("input_sizes")                      \
                              .TypeConstraint<T>("T"),                        \
                          ChannelSparseConv2DBackpropInputOp<GPUDevice, T>);  \
  REGISTER_KERNEL_BUILDER(                                                    \
      Name("TfSparseConv>ChannelSparseConv2DBackpropKernel")                  \
          .Device(::tensorflow::DEVICE_GPU)                                   \
          .HostMemory("kernel_sizes")                                         \
          .TypeConstraint<T>("T"),                                            \
      ChannelSparseConv2DBackpropKernelOp<GPUDevice, T>);
TSC_REGISTER_GPU(Eigen::half);
TSC_REGISTER_GPU(Eigen::bfloat16);
TSC_REGISTER_GPU(float);
TSC_REGISTER_GPU(double);
#undef TSC_REGISTER_GPU
#endif  // TF_SPARSECONV_CUDA

}  // namespace tf_sparseconv
