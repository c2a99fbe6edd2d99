// The operand columns of the channel-sparse CPU engine (channel_sparse_cpu.cc):
// the vector type the tiles are computed in, the correlation the three ops
// reduce to, and the column sources, which present each work unit's operand as
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

// The operand columns of each work unit (kTile consecutive result positions
// of one sample; result positions are flattened rh * res_w + rw) come from one
// of four sources, one type per mode; WithColumnSource (below) picks the mode
// once per op call, so each mode's engine is its own instantiation with no
// mode tests inside it. Every source has units(), positions(), channels(),
// taps(), bytes_per_channel() (bytes of one source channel's columns for one
// unit) and a per-shard Shard(source), whose Prepare(unit, &b, &runs) returns
// the unit's columns and sets its sample and the runs of its valid results: a
// few runs of consecutive tile positions that map to consecutive flat result
// positions (one run except in plane mode).
struct Run {
  int64_t tile_pos, result_pos, len;
};

// What every source holds besides its source tensor [batch][src_h][src_w]
// [channels]: the correlation that reads it and the batch size.
class SourceBase {
 public:
  SourceBase(const Correlation& c, int64_t batch) : c_(c), batch_(batch) {}
  int64_t positions() const { return c_.res_h * c_.res_w; }
  int64_t channels() const { return c_.channels; }
  int64_t taps() const { return c_.k_h * c_.k_w; }

 protected:
  Correlation c_;
  int64_t batch_;
};

// The range [lo, hi] of off + k * di over the taps k < n (di may be negative).
struct TapSpan {
  int64_t lo, hi;
  TapSpan(int64_t off, int64_t di, int64_t n)
      : lo(off + std::min<int64_t>(0, (n - 1) * di)),
        hi(off + std::max<int64_t>(0, (n - 1) * di)) {}
};

// Units over the flat result positions (shifted-planes and gather mode): unit
// = sample * FlatTiles + tile. FlatUnit sets the sample and the one run of a
// unit and returns its first position.
inline int64_t FlatTiles(int64_t positions) { return (positions + kTile - 1) / kTile; }
inline int64_t FlatUnit(int64_t unit, int64_t positions, int64_t* b, std::vector<Run>* runs) {
  const int64_t tiles = FlatTiles(positions);
  *b = unit / tiles;
  const int64_t p0 = unit % tiles * kTile;
  runs->clear();
  runs->push_back({0, p0, std::min(kTile, positions - p0)});
  return p0;
}

// dst[channel * len + (sh - lo_h) * width + column - s0] = the source at
// (b, sh, column) for the source rows sh in [lo_h, lo_h + rows) that exist and
// the columns s0 .. s0 + n - 1 (the plane layouts of plane and shifted-planes
// mode).
template <typename T, typename A>
void TransposeRows(const T* src, const Correlation& c, int64_t b, int64_t lo_h, int64_t rows,
                   int64_t s0, int64_t n, A* dst, int64_t width, int64_t len) {
  const int64_t ch = c.channels;
  const int64_t h1 = std::min(c.src_h, lo_h + rows);
  for (int64_t sh = std::max<int64_t>(0, lo_h); sh < h1; ++sh) {
    Transpose(src + ((b * c.src_h + sh) * c.src_w + s0) * ch, ch, n, ch, dst + (sh - lo_h) * width,
              len);
  }
}

// Row mode (stride 1 along the width, and rows of at least kTile / 2
// positions): a unit is a run of kTile positions of one result row. The
// source rows it needs are transposed once into [channel][column] buffers
// (cached across the consecutive units of a shard), and the column of tap
// (i, j) is a pointer into source row i, shifted by j: no per-tap copy at all.
template <typename T, typename A>
class RowSource : public SourceBase {
 public:
  static bool Applies(const Correlation& c) {
    return c.a_w == 1 && c.div_w == 1 && c.res_w >= kTile / 2;
  }
  RowSource(const T* src, const Correlation& c, int64_t batch) : SourceBase(c, batch), src_(src) {
    tiles_per_row_ = (c.res_w + kTile - 1) / kTile;
    const TapSpan w(c.off_w, c.di_w, c.k_w);
    shift_ = std::max<int64_t>(0, -w.lo);
    row_len_ = (tiles_per_row_ * kTile + w.hi + shift_ + 7) / 8 * 8;
  }
  int64_t units() const { return batch_ * c_.res_h * tiles_per_row_; }
  int64_t bytes_per_channel() const {
    return static_cast<int64_t>(sizeof(A)) * c_.k_h * (kTile + std::abs((c_.k_w - 1) * c_.di_w));
  }

  // The columns of a unit, and a cache of the last k_h + 1 source rows.
  class Shard {
   public:
    explicit Shard(const RowSource& s)
        : s_(s),
          rows_(s.c_.k_h + 1, Scratch<A>(s.row_len_ * s.c_.channels)),
          tags_(s.c_.k_h + 1, {-1, -2}),
          stamp_(s.c_.k_h + 1, 0) {
      cols_.base.resize(s.taps());
      cols_.stride = s.row_len_;
    }

    const Columns<A>& Prepare(int64_t unit, int64_t* b, std::vector<Run>* runs) {
      const Correlation& c = s_.c_;
      const int64_t per_sample = c.res_h * s_.tiles_per_row_;
      *b = unit / per_sample;
      const int64_t rh = unit % per_sample / s_.tiles_per_row_;
      const int64_t rw0 = unit % s_.tiles_per_row_ * kTile;
      runs->clear();
      runs->push_back({0, rh * c.res_w + rw0, std::min(kTile, c.res_w - rw0)});
      for (int64_t i = 0; i < c.k_h; ++i) {
        const int64_t sh = Correlation::Source(rh, c.a_h, c.off_h, c.di_h, c.div_h, i, c.src_h);
        const A* row = Row(*b, sh);
        for (int64_t j = 0; j < c.k_w; ++j) {
          cols_.base[i * c.k_w + j] = row + rw0 + c.off_w + j * c.di_w + s_.shift_;
        }
      }
      return cols_;
    }

   private:
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

    const RowSource& s_;
    Columns<A> cols_;
    std::vector<Scratch<A>> rows_;
    std::vector<std::pair<int64_t, int64_t>> tags_;
    std::vector<int64_t> stamp_;
    int64_t clock_ = 0;
  };

 private:
  const T* src_;
  int64_t tiles_per_row_, shift_, row_len_;
};

// The shard of plane and shifted-planes mode: a unit's columns are runs of
// its sample's planes (Source::Fill) at the tap offsets from its first
// position (Source::Locate); the planes are kept while consecutive units stay
// in the sample.
template <typename Source, typename A>
class PlanesShard {
 public:
  explicit PlanesShard(const Source& s) : s_(s), planes_(s.buffer_size()) {
    cols_.base.resize(s.taps());
    cols_.stride = s.len_;
  }

  const Columns<A>& Prepare(int64_t unit, int64_t* b, std::vector<Run>* runs) {
    const int64_t first = s_.Locate(unit, b, runs);
    if (sample_ != *b) {
      sample_ = *b;
      s_.Fill(*b, planes_.get());
    }
    for (int64_t t = 0; t < s_.taps(); ++t) {
      cols_.base[t] = planes_.get() + first + s_.tap_offset_[t];
    }
    return cols_;
  }

 private:
  const Source& s_;
  Columns<A> cols_;
  Scratch<A> planes_;
  int64_t sample_ = -1;
};

// Plane mode (stride 1 on both axes, rows too narrow for row mode, and a
// source plane that fits in L2): the whole zero-padded source plane of a
// sample is transposed once into [channel][padded position], and result
// positions are numbered in the padded width Wp (q = rh * Wp + rw). Then the
// column of tap (i, j) for the positions q0 .. q0 + kTile is the contiguous
// run at q0 + (constant offset of the tap): no gather. The positions with
// rw >= res_w are computed and dropped (a Wp / res_w overhead).
template <typename T, typename A>
class PlaneSource : public SourceBase {
 public:
  using Shard = PlanesShard<PlaneSource, A>;

  PlaneSource(const T* src, const Correlation& c, int64_t batch) : SourceBase(c, batch), src_(src) {
    const TapSpan h(c.off_h, c.di_h, c.k_h), w(c.off_w, c.di_w, c.k_w);
    wp_ = c.res_w + w.hi - w.lo;
    lo_h_ = h.lo;
    lo_w_ = w.lo;
    rows_ = c.res_h + h.hi - h.lo;
    const int64_t max_tap = (h.hi - h.lo) * wp_ + (w.hi - w.lo);
    tiles_ = (c.res_h * wp_ + kTile - 1) / kTile;
    len_ = (std::max(tiles_ * kTile + max_tap, rows_ * wp_) + 15) / 16 * 16;
    span_ = kTile + max_tap;
    for (int64_t i = 0; i < c.k_h; ++i) {
      for (int64_t j = 0; j < c.k_w; ++j) {
        tap_offset_.push_back((c.off_h + i * c.di_h - lo_h_) * wp_ + c.off_w + j * c.di_w - lo_w_);
      }
    }
  }
  // Whether the plane fits in L2 (1 MiB) and the padding adds at most half.
  bool Fits() const {
    return len_ * c_.channels * static_cast<int64_t>(sizeof(A)) <= (1 << 20) &&
           wp_ * 2 <= c_.res_w * 3;
  }
  int64_t units() const { return batch_ * tiles_; }
  int64_t bytes_per_channel() const { return static_cast<int64_t>(sizeof(A)) * span_; }

 private:
  friend Shard;
  int64_t buffer_size() const { return len_ * c_.channels; }

  // Sets the sample and the runs (one per result row) of `unit`; returns its
  // first padded position q0.
  int64_t Locate(int64_t unit, int64_t* b, std::vector<Run>* runs) const {
    *b = unit / tiles_;
    const int64_t q0 = unit % tiles_ * kTile;
    runs->clear();
    for (int64_t rh = q0 / wp_; rh * wp_ < q0 + kTile && rh < c_.res_h; ++rh) {
      const int64_t q_lo = std::max(q0, rh * wp_);
      const int64_t q_hi = std::min(q0 + kTile, rh * wp_ + c_.res_w);
      if (q_hi > q_lo) {
        runs->push_back({q_lo - q0, rh * c_.res_w + (q_lo - rh * wp_), q_hi - q_lo});
      }
    }
    return q0;
  }

  // dst = the zero-padded source plane of sample b as [channel][len_].
  void Fill(int64_t b, A* dst) const {
    std::fill(dst, dst + len_ * c_.channels, A(0));
    const int64_t w0 = std::max<int64_t>(0, lo_w_);
    const int64_t w1 = std::min(c_.src_w, lo_w_ + wp_);
    if (w1 <= w0) return;
    TransposeRows(src_, c_, b, lo_h_, rows_, w0, w1 - w0, dst + (w0 - lo_w_), wp_, len_);
  }

  const T* src_;
  int64_t wp_, rows_, lo_h_, lo_w_, tiles_, len_, span_;
  std::vector<int64_t> tap_offset_;
};

// Shifted-planes mode (stride 1 on both axes, rows too narrow for row mode;
// preferred over plane mode when its k_w planes fit in L2): one plane per
// kernel column j, P_j[channel][rh' * res_w + rw] = source(rh' + lo_h, rw +
// off_w + j * di_w) (zeros outside), rows exactly res_w wide. The column of
// tap (i, j) for result positions p0 .. p0 + kTile (flat) is then the
// contiguous run of P_j at p0 + (off_h + i * di_h - lo_h) * res_w: no dropped
// positions, and loads that are vector-aligned whenever res_w is a multiple of
// the vector width.
template <typename T, typename A>
class ShiftedSource : public SourceBase {
 public:
  using Shard = PlanesShard<ShiftedSource, A>;

  ShiftedSource(const T* src, const Correlation& c, int64_t batch)
      : SourceBase(c, batch), src_(src) {
    const TapSpan h(c.off_h, c.di_h, c.k_h);
    lo_h_ = h.lo;
    rows_ = c.res_h + h.hi - h.lo;
    const int64_t reach = (h.hi - h.lo) * c.res_w;  // offset of the last kernel row
    len_ = (std::max(FlatTiles(positions()) * kTile + reach, rows_ * c.res_w) + 15) / 16 * 16;
    span_ = c.k_w * (kTile + reach);
    for (int64_t i = 0; i < c.k_h; ++i) {
      for (int64_t j = 0; j < c.k_w; ++j) {
        tap_offset_.push_back(j * c.channels * len_ + (c.off_h + i * c.di_h - lo_h_) * c.res_w);
      }
    }
  }
  // Whether the k_w planes fit in L2 (1.5 MiB).
  bool Fits() const {
    return buffer_size() * static_cast<int64_t>(sizeof(A)) <= (3 << 19) && c_.res_w > 0;
  }
  int64_t units() const { return batch_ * FlatTiles(positions()); }
  int64_t bytes_per_channel() const { return static_cast<int64_t>(sizeof(A)) * span_; }

 private:
  friend Shard;
  int64_t buffer_size() const { return c_.k_w * len_ * c_.channels; }
  int64_t Locate(int64_t unit, int64_t* b, std::vector<Run>* runs) const {
    return FlatUnit(unit, positions(), b, runs);
  }

  // dst = the k_w shifted planes of sample b as [j][channel][len_].
  void Fill(int64_t b, A* dst) const {
    std::fill(dst, dst + buffer_size(), A(0));
    for (int64_t j = 0; j < c_.k_w; ++j) {
      // Result column rw reads source column rw + shift.
      const int64_t shift = c_.off_w + j * c_.di_w;
      const int64_t w0 = std::max<int64_t>(0, -shift);
      const int64_t w1 = std::min(c_.res_w, c_.src_w - shift);
      if (w1 <= w0) continue;
      TransposeRows(src_, c_, b, lo_h_, rows_, w0 + shift, w1 - w0,
                    dst + j * c_.channels * len_ + w0, c_.res_w, len_);
    }
  }

  const T* src_;
  int64_t rows_, lo_h_, len_, span_;
  std::vector<int64_t> tap_offset_;
};

// Gather mode (any strides; where no other mode applies): the columns are
// gathered per tap and position into a [tap][channel][kTile] buffer (an
// im2col).
template <typename T, typename A>
class GatherSource : public SourceBase {
 public:
  GatherSource(const T* src, const Correlation& c, int64_t batch)
      : SourceBase(c, batch), src_(src) {}
  int64_t units() const { return batch_ * FlatTiles(positions()); }
  int64_t bytes_per_channel() const { return static_cast<int64_t>(sizeof(A)) * taps() * kTile; }

  class Shard {
   public:
    explicit Shard(const GatherSource& s) : s_(s), gathered_(s.taps() * s.c_.channels * kTile) {
      cols_.base.resize(s.taps());
      for (int64_t t = 0; t < s.taps(); ++t) {
        cols_.base[t] = gathered_.get() + t * s.c_.channels * kTile;
      }
      cols_.stride = kTile;
    }

    const Columns<A>& Prepare(int64_t unit, int64_t* b, std::vector<Run>* runs) {
      const int64_t p0 = FlatUnit(unit, s_.positions(), b, runs);
      const Correlation& c = s_.c_;
      const int64_t ch = c.channels;
      const T* rows[kTile];
      for (int64_t t = 0; t < s_.taps(); ++t) {
        const int64_t i = t / c.k_w, j = t % c.k_w;
        for (int64_t p = 0; p < kTile; ++p) {
          const int64_t pos = p0 + p;
          const int64_t rh = pos / c.res_w, rw = pos % c.res_w;
          const int64_t sh = pos < s_.positions() ? Correlation::Source(rh, c.a_h, c.off_h, c.di_h,
                                                                        c.div_h, i, c.src_h)
                                                  : -1;
          const int64_t sw = Correlation::Source(rw, c.a_w, c.off_w, c.di_w, c.div_w, j, c.src_w);
          rows[p] =
              sh >= 0 && sw >= 0 ? s_.src_ + ((*b * c.src_h + sh) * c.src_w + sw) * ch : nullptr;
        }
        A* dst_t = gathered_.get() + t * ch * kTile;
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
      }
      return cols_;
    }

   private:
    const GatherSource& s_;
    Columns<A> cols_;
    Scratch<A> gathered_;
  };

 private:
  const T* src_;
};

// Calls f(source) with the source of the mode that applies: row mode, else
// (stride 1 on both axes) shifted planes or else a plane when they fit in L2,
// else the gather.
template <typename T, typename A, typename F>
void WithColumnSource(const T* src, const Correlation& c, int64_t batch, F&& f) {
  if (RowSource<T, A>::Applies(c)) {
    f(RowSource<T, A>(src, c, batch));
    return;
  }
  if (c.a_h == 1 && c.div_h == 1 && c.a_w == 1 && c.div_w == 1) {
    const ShiftedSource<T, A> shifted(src, c, batch);
    if (shifted.Fits()) {
      f(shifted);
      return;
    }
    const PlaneSource<T, A> plane(src, c, batch);
    if (plane.Fits()) {
      f(plane);
      return;
    }
  }
  f(GatherSource<T, A>(src, c, batch));
}

}  // namespace channel_sparse_cpu
}  // namespace tf_sparseconv

#endif  // TF_SPARSECONV_CC_KERNELS_CHANNEL_SPARSE_COLUMNS_H_
