// The operand columns of the channel-sparse CPU engine (channel_sparse_cpu.cc):
// the vector type the tiles are computed in, the correlation the three ops
// reduce to, and ColumnSource, which presents each work unit's operand as
// contiguous columns of kTile positions (row, plane, shifted-planes or
// gather mode). Included by channel_sparse_cpu.cc only.
#ifndef TF_SPARSECONV_CC_KERNELS_CHANNEL_SPARSE_COLUMNS_H_
#define TF_SPARSECONV_CC_KERNELS_CHANNEL_SPARSE_COLUMNS_H_

#include <algorithm>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "tf_sparseconv/cc/kernels/channel_sparse_common.h"

namespace tf_sparseconv {
namespace channel_sparse_cpu {

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
    return {g.out_h,    g.out_w,    g.in_h,      g.in_w,  g.in_c,  g.k_h, g.k_w, g.stride_h,
            g.stride_w, -g.pad_top, -g.pad_left, g.dil_h, g.dil_w, 1,     1};
  }
  static Correlation Transposed(const ChannelSparseGeometry& g) {
    return {g.in_h, g.in_w,    g.out_h,    g.out_w,  g.out_c,  g.k_h,      g.k_w,     1,
            1,      g.pad_top, g.pad_left, -g.dil_h, -g.dil_w, g.stride_h, g.stride_w};
  }
  // Source index along one axis, or -1.
  static int64_t Source(int64_t r, int64_t a, int64_t off, int64_t di, int64_t div, int64_t k,
                        int64_t n) {
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
      plane_len_ =
          (std::max(plane_tiles_ * kTile + max_tap, plane_rows_ * plane_w_) + 15) / 16 * 16;
      plane_span_ = kTile + max_tap;
      const int64_t bytes = plane_len_ * c.channels * static_cast<int64_t>(sizeof(A));
      plane_mode_ = bytes <= (1 << 20) && plane_w_ * 2 <= c.res_w * 3;
      // Shifted planes: k_w planes of (res_h + hi_h - lo_h) rows of res_w.
      const int64_t tiles = (c.res_h * c.res_w + kTile - 1) / kTile;
      shifted_len_ =
          (std::max(tiles * kTile + (hi_h - lo_h) * c.res_w, plane_rows_ * c.res_w) + 15) / 16 * 16;
      shifted_span_ = c.k_w * (kTile + (hi_h - lo_h) * c.res_w);
      const int64_t shifted_bytes =
          c.k_w * shifted_len_ * c.channels * static_cast<int64_t>(sizeof(A));
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
            tap_offset_.push_back((c.off_h + i * c.di_h - s.plane_lo_h_) * s.plane_w_ + c.off_w +
                                  j * c.di_w - s.plane_lo_w_);
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
        Transpose(src, ch, w1 - w0, ch, dst + (sh - s_.plane_lo_h_) * wp + (w0 - s_.plane_lo_w_),
                  len);
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
          const int64_t sh = pos < s_.positions() ? Correlation::Source(rh, c.a_h, c.off_h, c.di_h,
                                                                        c.div_h, i, c.src_h)
                                                  : -1;
          const int64_t sw = Correlation::Source(rw, c.a_w, c.off_w, c.di_w, c.div_w, j, c.src_w);
          rows[p] =
              sh >= 0 && sw >= 0 ? s_.src_ + ((b * c.src_h + sh) * c.src_w + sw) * ch : nullptr;
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

}  // namespace channel_sparse_cpu
}  // namespace tf_sparseconv

#endif  // TF_SPARSECONV_CC_KERNELS_CHANNEL_SPARSE_COLUMNS_H_
