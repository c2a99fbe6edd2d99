// CPU (and, with TF_SPARSECONV_CUDA, GPU) kernels of the block-sparse
// primitives ReduceMask, SparseGather and SparseScatter. Semantics:
// block_sparse_common.h.
//
// CPU scheme. Channels are innermost, so the part of a block row that lies
// inside the image is one contiguous run of (columns * C) values in both
// the image and the block: gather and scatter-write are memcpy per block
// row, and scatter-add a vectorisable add loop. ReduceMask and gather are
// parallel over blocks (or block rows); scatter-write over blocks, which
// cannot overlap; scatter-add over image rows: each row adds the blocks
// covering it in a fixed order (increasing block row bh, then index order),
// found through a per-(b, bh) bucket list, so overlapping adds never race
// and the result is bitwise deterministic.
#define EIGEN_USE_THREADS

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <type_traits>
#include <unordered_set>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "tf_sparseconv/cc/kernels/block_sparse_common.h"
#include "tf_sparseconv/cc/kernels/kernel_util.h"

#if TF_SPARSECONV_CUDA
#include "tf_sparseconv/cc/kernels/block_sparse_launcher.h"
#endif

namespace tf_sparseconv {

namespace {

// Reads a (height, width) attribute of positive (or, for offsets, any) ints.
Status ReadPair(OpKernelConstruction* ctx, const char* name, bool positive, int64_t* h,
                int64_t* w) {
  std::vector<int32_t> v;
  TF_RETURN_IF_ERROR(ctx->GetAttr(name, &v));
  if (v.size() != 2) {
    return errors::InvalidArgument(name, " must have 2 entries (height, width), got ", v.size());
  }
  if (positive && (v[0] < 1 || v[1] < 1)) {
    return errors::InvalidArgument(name, " must be positive, got [", v[0], ", ", v[1], "]");
  }
  *h = v[0];
  *w = v[1];
  return ::tensorflow::OkStatus();
}

Status CheckIndicesShape(const Tensor& indices) {
  if (indices.dims() != 2 || indices.dim_size(1) != 3) {
    return errors::InvalidArgument("indices must be int32 [n, 3] rows (b, bh, bw), got shape ",
                                   indices.shape().DebugString());
  }
  return ::tensorflow::OkStatus();
}

// Index values in range (host memory only); g.grid_* are the index limits
// (FillForIndices).
Status CheckIndexValues(const Tensor& indices, const BlockGeometry& g) {
  const auto idx = indices.matrix<int32_t>();
  const int64_t limit_h = g.grid_h, limit_w = g.grid_w;
  for (int64_t k = 0; k < indices.dim_size(0); ++k) {
    const int64_t b = idx(k, 0), bh = idx(k, 1), bw = idx(k, 2);
    if (b < 0 || b >= g.batch || bh < 0 || bh >= limit_h || bw < 0 || bw >= limit_w) {
      return errors::InvalidArgument(
          "indices[", k, "] = (", b, ", ", bh, ", ", bw, ") is out of range: the batch has ",
          g.batch, " images and block indices must be below ", limit_h, " x ", limit_w,
          " (blocks that overlap the ", g.h, " x ", g.w, " image)");
    }
  }
  return ::tensorflow::OkStatus();
}

// Columns [x0, x1) of block column bw inside the image, and the first block
// column they map to.
struct Span {
  int64_t lo, hi, first;
};
inline Span ClipSpan(int64_t start, int64_t size, int64_t length) {
  const int64_t lo = std::max<int64_t>(start, 0);
  const int64_t hi = std::min<int64_t>(start + size, length);
  if (hi <= lo) return {0, 0, 0};  // entirely outside the image
  return {lo, hi, lo - start};
}

// fn(r, b, y, cols) for every row r = k * size_h + i of the n blocks [n,
// size_h, size_w, c], in parallel (gather, scatter-write): b is block k's
// image, y the image row of its row i (possibly outside the image) and cols
// its columns inside the image. cost_per_row: ParallelFor's cost per row.
template <typename Fn>
void ForEachBlockRow(OpKernelContext* ctx, const int32_t* idx, int64_t n, const BlockGeometry& g,
                     int64_t cost_per_row, const Fn& fn) {
  auto work = [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t k = r / g.size_h, i = r % g.size_h;
      const int64_t b = idx[3 * k], y = g.offset_h + idx[3 * k + 1] * g.stride_h + i;
      fn(r, b, y, ClipSpan(g.offset_w + idx[3 * k + 2] * g.stride_w, g.size_w, g.w));
    }
  };
  ParallelFor(ctx, n * g.size_h, cost_per_row, work);
}

// A freshly allocated large output is first touched by our zero-fill; on
// Linux with transparent huge pages in "madvise" mode, asking for huge pages
// turns ~500 page faults per 2 MiB into one (the faults, not the writes,
// dominate filling a fresh 64 MiB tensor). Advisory only: errors are ignored.
inline void AdviseHugePages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (bytes < static_cast<int64_t>(4 * kHuge)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

// add = false: no element may be written by two blocks.
Status CheckNoOverlap(const Tensor& indices, const BlockGeometry& g) {
  const auto idx = indices.matrix<int32_t>();
  const int64_t n = indices.dim_size(0);
  // Two blocks overlap iff they are in the same image and differ by fewer
  // than ceil(size / stride) block steps along both axes.
  const int64_t reach_h = (g.size_h + g.stride_h - 1) / g.stride_h - 1;
  const int64_t reach_w = (g.size_w + g.stride_w - 1) / g.stride_w - 1;
  std::unordered_set<int64_t> seen;
  seen.reserve(2 * n);
  auto key = [&](int64_t b, int64_t bh, int64_t bw) { return (b * g.grid_h + bh) * g.grid_w + bw; };
  for (int64_t k = 0; k < n; ++k) {
    const int64_t b = idx(k, 0), bh = idx(k, 1), bw = idx(k, 2);
    const int64_t h0 = std::max<int64_t>(0, bh - reach_h),
                  h1 = std::min(g.grid_h - 1, bh + reach_h);
    const int64_t w0 = std::max<int64_t>(0, bw - reach_w),
                  w1 = std::min(g.grid_w - 1, bw + reach_w);
    for (int64_t h = h0; h <= h1; ++h) {
      for (int64_t w = w0; w <= w1; ++w) {
        if (seen.count(key(b, h, w))) {
          return errors::InvalidArgument(
              "indices[", k, "] = (", b, ", ", bh, ", ", bw,
              ") overlaps an earlier block: with add=False blocks must not overlap "
              "(block_stride ",
              g.stride_h, "x", g.stride_w, " < block size ", g.size_h, "x", g.size_w,
              ", or a repeated index); use add=True to sum them");
        }
      }
    }
    seen.insert(key(b, bh, bw));
  }
  return ::tensorflow::OkStatus();
}

}  // namespace

// --- Device functors ------------------------------------------------------------
//
// The kernel classes below validate the inputs and allocate the outputs, then
// call these: the CPU specialisations are the engines described at the top,
// the GPU ones call the launchers of block_sparse_op_gpu.cu.cc. Index values
// are checked (Check*Indices) only on the CPU, where the indices are in host
// memory; the GPU kernels skip out-of-range blocks instead.

template <typename Device, typename T>
struct BlockSparseFunctor;

// The blocks of a scatter bucketed by (image, block row), each bucket in index
// order, for the CPU scatters that walk the output row by row.
class BlocksByRow {
 public:
  BlocksByRow(const int32_t* idx, int64_t n, const BlockGeometry& g)
      : g_(g), start_(g.batch * g.grid_h + 1, 0), order_(n) {
    for (int64_t k = 0; k < n; ++k) ++start_[Bucket(idx[3 * k], idx[3 * k + 1]) + 1];
    for (size_t q = 0; q + 1 < start_.size(); ++q) start_[q + 1] += start_[q];
    std::vector<int64_t> fill(start_.begin(), start_.end() - 1);
    for (int64_t k = 0; k < n; ++k) order_[fill[Bucket(idx[3 * k], idx[3 * k + 1])]++] = k;
  }

  // Whether any block covers row y of image b.
  bool Covers(int64_t b, int64_t y) const {
    const Range bh = BlockRows(y);
    for (int64_t r = bh.lo; r <= bh.hi; ++r) {
      if (start_[Bucket(b, r)] != start_[Bucket(b, r) + 1]) return true;
    }
    return false;
  }

  // f(k, i) for each block k covering row y of image b (i: the row inside the
  // block), by increasing block row, then index order.
  template <typename F>
  void ForEach(int64_t b, int64_t y, F&& f) const {
    const Range bh = BlockRows(y);
    for (int64_t r = bh.lo; r <= bh.hi; ++r) {
      const int64_t bucket = Bucket(b, r);
      for (int64_t q = start_[bucket]; q < start_[bucket + 1]; ++q)
        f(order_[q], y - g_.offset_h - r * g_.stride_h);
    }
  }

 private:
  struct Range {
    int64_t lo, hi;  // inclusive; empty when lo > hi
  };
  // Block rows bh with offset + bh * stride <= y < offset + bh * stride + size.
  Range BlockRows(int64_t y) const {
    const int64_t rel = y - g_.offset_h;
    return {std::max<int64_t>(0, FloorDiv(rel - g_.size_h, g_.stride_h) + 1),
            std::min<int64_t>(g_.grid_h - 1, FloorDiv(rel, g_.stride_h))};
  }
  int64_t Bucket(int64_t b, int64_t bh) const { return b * g_.grid_h + bh; }
  static int64_t FloorDiv(int64_t a, int64_t d) { return a >= 0 ? a / d : -((-a + d - 1) / d); }

  const BlockGeometry g_;  // a copy: twelve integers
  std::vector<int64_t> start_, order_;
};

template <typename T>
struct BlockSparseFunctor<CPUDevice, T> {
  // Allocates the [count, 3] indices output itself: count is known only once
  // the blocks are reduced.
  static void ReduceMask(OpKernelContext* ctx, const T* mask, float threshold_value, bool avgpool,
                         const BlockGeometry& g) {
    using A = typename Acc<T>::type;
    const int64_t blocks = g.batch * g.grid_h * g.grid_w;
    std::vector<uint8_t> active(blocks, 0);
    const A threshold = static_cast<A>(threshold_value);
    const A area = static_cast<A>(g.size_h * g.size_w);
    auto work = [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t b = k / (g.grid_h * g.grid_w);
        const int64_t bh = k / g.grid_w % g.grid_h, bw = k % g.grid_w;
        const Span rows = ClipSpan(g.offset_h + bh * g.stride_h, g.size_h, g.h);
        const Span cols = ClipSpan(g.offset_w + bw * g.stride_w, g.size_w, g.w);
        A max = -std::numeric_limits<A>::infinity(), sum = 0;
        for (int64_t y = rows.lo; y < rows.hi; ++y) {
          const T* row = mask + (b * g.h + y) * g.w;
          for (int64_t x = cols.lo; x < cols.hi; ++x) {
            const A v = static_cast<A>(row[x]);
            max = std::max(max, v);
            sum += v;
          }
        }
        active[k] = (avgpool ? sum / area : max) > threshold;
      }
    };
    ParallelFor(ctx, blocks, 4 * g.size_h * g.size_w + 16, work);
    int64_t count = 0;
    for (uint8_t a : active) count += a;
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({count, 3}), &out));
    int32_t* idx = out->flat<int32_t>().data();
    for (int64_t k = 0; k < blocks; ++k) {
      if (!active[k]) continue;
      *idx++ = static_cast<int32_t>(k / (g.grid_h * g.grid_w));
      *idx++ = static_cast<int32_t>(k / g.grid_w % g.grid_h);
      *idx++ = static_cast<int32_t>(k % g.grid_w);
    }
  }

  static Status CheckGatherIndices(const Tensor& indices, const BlockGeometry& g) {
    return CheckIndexValues(indices, g);
  }

  // Parallel over block rows: zeros outside the image, a memcpy of the rest.
  static void Gather(OpKernelContext* ctx, const T* src, const int32_t* idx, int64_t n, T* dst,
                     const BlockGeometry& g) {
    const int64_t row_len = g.size_w * g.c;
    auto row = [&](int64_t r, int64_t b, int64_t y, const Span& cols) {
      T* out = dst + r * row_len;
      if (y < 0 || y >= g.h) {
        std::fill(out, out + row_len, T(0));
        return;
      }
      std::fill(out, out + cols.first * g.c, T(0));
      const int64_t copied = (cols.hi - cols.lo) * g.c;
      if (copied > 0)
        std::memcpy(out + cols.first * g.c, src + ((b * g.h + y) * g.w + cols.lo) * g.c,
                    copied * sizeof(T));
      std::fill(out + cols.first * g.c + copied, out + row_len, T(0));
    };
    ForEachBlockRow(ctx, idx, n, g, row_len * sizeof(T) + 32, row);
  }

  // The output may take over base's buffer: the blocks are then scattered in
  // place.
  static constexpr bool kForwardScatterBase = true;

  static Status CheckScatterIndices(const Tensor& indices, const BlockGeometry& g, bool add) {
    TF_RETURN_IF_ERROR(CheckIndexValues(indices, g));
    if (!add) return CheckNoOverlap(indices, g);
    return ::tensorflow::OkStatus();
  }

  // out [size] = base (nullptr: all zeros) with the n blocks written or added.
  static void Scatter(OpKernelContext* ctx, const T* blk, const int32_t* idx, int64_t n,
                      const T* base, T* dst, int64_t size, bool add, const BlockGeometry& g) {
    if (base == nullptr && !add) {
      ZeroAndWriteCpu(ctx, blk, idx, n, dst, g);
      return;
    }
    if (base == nullptr) {
      Zero(ctx, dst, size);
    } else if (dst != base) {
      Copy(ctx, base, dst, size);
    }
    if (n == 0) return;
    if (add) {
      AddCpu(ctx, blk, idx, n, dst, g);
    } else {
      WriteCpu(ctx, blk, idx, n, dst, g);
    }
  }

  // dst holds the zero-based write of the blocks prev_idx (same geometry):
  // their regions are zeroed again, then the n blocks written (add = false).
  static void Rewrite(OpKernelContext* ctx, const T* blk, const int32_t* idx, int64_t n,
                      const int32_t* prev_idx, int64_t prev_n, T* dst, const BlockGeometry& g) {
    auto zero_row = [&](int64_t, int64_t b, int64_t y, const Span& cols) {
      if (y < 0 || y >= g.h || cols.hi <= cols.lo) return;
      std::memset(static_cast<void*>(dst + ((b * g.h + y) * g.w + cols.lo) * g.c), 0,
                  (cols.hi - cols.lo) * g.c * sizeof(T));
    };
    ForEachBlockRow(ctx, prev_idx, prev_n, g, g.size_w * g.c * sizeof(T) + 32, zero_row);
    WriteCpu(ctx, blk, idx, n, dst, g);
  }

 private:
  static void Zero(OpKernelContext* ctx, T* dst, int64_t size) {
    AdviseHugePages(dst, size * sizeof(T));
    constexpr int64_t kChunk = 1 << 16;
    auto work = [&](int64_t begin, int64_t end) {
      const int64_t lo = begin * kChunk, hi = std::min(size, end * kChunk);
      std::memset(static_cast<void*>(dst + lo), 0, (hi - lo) * sizeof(T));
    };
    ParallelFor(ctx, (size + kChunk - 1) / kChunk, kChunk * sizeof(T) / 2, work);
  }

  static void Copy(OpKernelContext* ctx, const T* src, T* dst, int64_t size) {
    AdviseHugePages(dst, size * sizeof(T));
    constexpr int64_t kChunk = 1 << 16;
    auto work = [&](int64_t begin, int64_t end) {
      const int64_t lo = begin * kChunk, hi = std::min(size, end * kChunk);
      std::memcpy(dst + lo, src + lo, (hi - lo) * sizeof(T));
    };
    ParallelFor(ctx, (size + kChunk - 1) / kChunk, kChunk * sizeof(T), work);
  }

  // Blocks do not overlap: parallel over block rows, memcpy of the in-image part.
  static void WriteCpu(OpKernelContext* ctx, const T* blk, const int32_t* idx, int64_t n, T* dst,
                       const BlockGeometry& g) {
    const int64_t row_len = g.size_w * g.c;
    auto row = [&](int64_t r, int64_t b, int64_t y, const Span& cols) {
      if (y < 0 || y >= g.h || cols.hi <= cols.lo) return;
      std::memcpy(dst + ((b * g.h + y) * g.w + cols.lo) * g.c, blk + r * row_len + cols.first * g.c,
                  (cols.hi - cols.lo) * g.c * sizeof(T));
    };
    ForEachBlockRow(ctx, idx, n, g, row_len * sizeof(T) + 32, row);
  }

  // Parallel over image rows; each adds the blocks covering it in a fixed
  // order (increasing bh, then index order), in float for 16-bit types.
  static void AddCpu(OpKernelContext* ctx, const T* blk, const int32_t* idx, int64_t n, T* dst,
                     const BlockGeometry& g) {
    using A = typename Acc<T>::type;
    const BlocksByRow blocks(idx, n, g);
    const int64_t row_len = g.size_w * g.c;
    auto work = [&](int64_t begin, int64_t end) {
      std::vector<A> acc(std::is_same<T, A>::value ? 0 : g.w * g.c);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / g.h, y = r % g.h;
        if (!blocks.Covers(b, y)) continue;
        T* out_row = dst + r * g.w * g.c;
        A* row;
        if constexpr (std::is_same<T, A>::value) {
          row = out_row;
        } else {
          row = acc.data();
          for (int64_t e = 0; e < g.w * g.c; ++e) row[e] = static_cast<A>(out_row[e]);
        }
        blocks.ForEach(b, y, [&](int64_t k, int64_t i) {
          const Span cols = ClipSpan(g.offset_w + idx[3 * k + 2] * g.stride_w, g.size_w, g.w);
          const T* s = blk + (k * g.size_h + i) * row_len + cols.first * g.c;
          A* d = row + cols.lo * g.c;
          const int64_t len = (cols.hi - cols.lo) * g.c;
          for (int64_t e = 0; e < len; ++e) d[e] += static_cast<A>(s[e]);
        });
        if constexpr (!std::is_same<T, A>::value) {
          for (int64_t e = 0; e < g.w * g.c; ++e) out_row[e] = static_cast<T>(row[e]);
        }
      }
    };
    const int64_t buckets = std::max<int64_t>(1, g.batch * g.grid_h);
    const int64_t per_row = std::max<int64_t>(1, n * g.size_h / buckets);
    ParallelFor(ctx, g.batch * g.h, per_row * row_len * 2 + g.w * g.c + 32, work);
  }

  // Blocks written into zeros (add = false: no two blocks share an element) in
  // one pass over the output rows: a row's stretches outside every block are
  // zeroed and its blocks' rows copied in, so each element is written once,
  // while its page is hot. (Filling a fresh output costs mostly its page
  // faults, paid alike by a zero-fill followed by a block write; this saves
  // the second write of the covered part and the blocks' second pass.)
  static void ZeroAndWriteCpu(OpKernelContext* ctx, const T* blk, const int32_t* idx, int64_t n,
                              T* dst, const BlockGeometry& g) {
    AdviseHugePages(dst, g.batch * g.h * g.w * g.c * static_cast<int64_t>(sizeof(T)));
    const BlocksByRow blocks(idx, n, g);
    const int64_t row_elems = g.w * g.c, block_row = g.size_w * g.c;
    struct Piece {
      int64_t lo, hi;  // image columns
      const T* src;
    };
    auto zero = [&](T* p, int64_t count) {
      if (count > 0) std::memset(static_cast<void*>(p), 0, count * sizeof(T));
    };
    auto work = [&](int64_t begin, int64_t end) {
      std::vector<Piece> pieces;
      for (int64_t r = begin; r < end; ++r) {
        pieces.clear();
        blocks.ForEach(r / g.h, r % g.h, [&](int64_t k, int64_t i) {
          const Span cols = ClipSpan(g.offset_w + idx[3 * k + 2] * g.stride_w, g.size_w, g.w);
          if (cols.hi > cols.lo)
            pieces.push_back(
                {cols.lo, cols.hi, blk + (k * g.size_h + i) * block_row + cols.first * g.c});
        });
        std::sort(pieces.begin(), pieces.end(),
                  [](const Piece& a, const Piece& b) { return a.lo < b.lo; });
        T* out = dst + r * row_elems;
        int64_t x = 0;
        for (const Piece& p : pieces) {
          zero(out + x * g.c, (p.lo - x) * g.c);
          std::memcpy(out + p.lo * g.c, p.src, (p.hi - p.lo) * g.c * sizeof(T));
          x = p.hi;
        }
        zero(out + x * g.c, (g.w - x) * g.c);
      }
    };
    ParallelFor(ctx, g.batch * g.h, row_elems * static_cast<int64_t>(sizeof(T)), work);
  }
};

#if TF_SPARSECONV_CUDA

template <typename T>
struct BlockSparseFunctor<GPUDevice, T> {
  static void ReduceMask(OpKernelContext* ctx, const T* mask, float threshold, bool avgpool,
                         const BlockGeometry& g) {
    Tensor workspace;
    OP_REQUIRES_OK(ctx,
                   ctx->allocate_temp(::tensorflow::DT_INT8,
                                      TensorShape({ReduceMaskGpuWorkspaceBytes(g)}), &workspace));
    void* ws = workspace.flat<int8_t>().data();
    int64_t count = 0;
    const char* err = LaunchReduceMaskCountGpu(DTypeTraits<T>::kFormat, mask, threshold, avgpool, g,
                                               ws, &count, GpuStream(ctx));
    OP_REQUIRES(ctx, err == nullptr, errors::Internal("GPU kernel failed: ", err));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({count, 3}), &out));
    err = LaunchReduceMaskIndicesGpu(g, ws, out->flat<int32_t>().data(), count, GpuStream(ctx));
    OP_REQUIRES(ctx, err == nullptr, errors::Internal("GPU kernel failed: ", err));
  }

  static Status CheckGatherIndices(const Tensor&, const BlockGeometry&) {
    return ::tensorflow::OkStatus();
  }

  static void Gather(OpKernelContext* ctx, const T* src, const int32_t* idx, int64_t n, T* dst,
                     const BlockGeometry& g) {
    const char* err =
        LaunchSparseGatherGpu(DTypeTraits<T>::kFormat, src, idx, n, dst, g, GpuStream(ctx));
    OP_REQUIRES(ctx, err == nullptr, errors::Internal("GPU kernel failed: ", err));
  }

  static constexpr bool kForwardScatterBase = false;

  static Status CheckScatterIndices(const Tensor&, const BlockGeometry&, bool) {
    return ::tensorflow::OkStatus();
  }

  static void Scatter(OpKernelContext* ctx, const T* blk, const int32_t* idx, int64_t n,
                      const T* base, T* dst, int64_t size, bool add, const BlockGeometry& g) {
    if (base == nullptr) {
      ::stream_executor::DeviceMemoryBase memory(dst, size * sizeof(T));
      OP_REQUIRES_OK(ctx, ctx->op_device_context()->stream()->MemZero(&memory, size * sizeof(T)));
      base = dst;
    }
    Tensor workspace;
    OP_REQUIRES_OK(
        ctx, ctx->allocate_temp(::tensorflow::DT_INT8,
                                TensorShape({SparseScatterGpuWorkspaceBytes(g, n)}), &workspace));
    const char* err = LaunchSparseScatterGpu(DTypeTraits<T>::kFormat, blk, idx, n, base, dst, add,
                                             g, workspace.flat<int8_t>().data(), GpuStream(ctx));
    OP_REQUIRES(ctx, err == nullptr, errors::Internal("GPU kernel failed: ", err));
  }
};

#endif  // TF_SPARSECONV_CUDA

// --- Kernels ---------------------------------------------------------------------

class BlockOpBase : public OpKernel {
 public:
  explicit BlockOpBase(OpKernelConstruction* ctx) : OpKernel(ctx) {}

 protected:
  // The block attributes: block_stride, block_offset and (with_size)
  // block_size; scatter takes its block size from the blocks instead.
  Status ReadBlockAttrs(OpKernelConstruction* ctx, bool with_size) {
    if (with_size) TF_RETURN_IF_ERROR(ReadPair(ctx, "block_size", true, &size_h_, &size_w_));
    TF_RETURN_IF_ERROR(ReadPair(ctx, "block_stride", true, &stride_h_, &stride_w_));
    return ReadPair(ctx, "block_offset", false, &offset_h_, &offset_w_);
  }
  // The geometry for an image [batch, h, w, c] and blocks of size_h x size_w
  // (the block size is a per-call value for scatter, so it is passed in:
  // Compute may run concurrently on one kernel and must not write members).
  void Fill(int64_t batch, int64_t h, int64_t w, int64_t c, int64_t size_h, int64_t size_w,
            BlockGeometry* g) const {
    g->batch = batch;
    g->h = h;
    g->w = w;
    g->c = c;
    g->size_h = size_h;
    g->size_w = size_w;
    g->stride_h = stride_h_;
    g->stride_w = stride_w_;
    g->offset_h = offset_h_;
    g->offset_w = offset_w_;
    g->grid_h = BlockGridSize(h, size_h, stride_h_, offset_h_);
    g->grid_w = BlockGridSize(w, size_w, stride_w_, offset_w_);
  }
  // For gather/scatter: grid_* become the index limits (BlockIndexLimit), so
  // that halo blocks past the formula's grid are addressable.
  void FillForIndices(int64_t batch, int64_t h, int64_t w, int64_t c, int64_t size_h,
                      int64_t size_w, BlockGeometry* g) const {
    Fill(batch, h, w, c, size_h, size_w, g);
    g->grid_h = BlockIndexLimit(h, size_h, stride_h_, offset_h_);
    g->grid_w = BlockIndexLimit(w, size_w, stride_w_, offset_w_);
  }
  // Block grids whose indices fit in int32 (the index tensors' type).
  static Status CheckGridSize(const BlockGeometry& g) {
    constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
    if (g.grid_h > kMax || g.grid_w > kMax || g.batch > kMax ||
        (g.grid_h * g.grid_w > (int64_t{1} << 40) / std::max<int64_t>(1, g.batch))) {
      return errors::InvalidArgument("the block grid (", g.batch, " x ", g.grid_h, " x ", g.grid_w,
                                     ") is too large: check block_size, block_stride and "
                                     "block_offset against the image size ",
                                     g.h, " x ", g.w);
    }
    return ::tensorflow::OkStatus();
  }
  int64_t size_h_ = 0, size_w_ = 0, stride_h_ = 1, stride_w_ = 1, offset_h_ = 0, offset_w_ = 0;
};

template <typename Device, typename T>
class ReduceMaskOp : public BlockOpBase {
 public:
  explicit ReduceMaskOp(OpKernelConstruction* ctx) : BlockOpBase(ctx) {
    OP_REQUIRES_OK(ctx, ReadBlockAttrs(ctx, /*with_size=*/true));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("threshold", &threshold_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("avgpool", &avgpool_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& mask = ctx->input(0);
    OP_REQUIRES_OK(ctx, CheckRank(mask, 3, "mask must be [B, H, W]"));
    BlockGeometry g;
    Fill(mask.dim_size(0), mask.dim_size(1), mask.dim_size(2), 1, size_h_, size_w_, &g);
    OP_REQUIRES_OK(ctx, CheckGridSize(g));
    BlockSparseFunctor<Device, T>::ReduceMask(ctx, mask.flat<T>().data(), threshold_, avgpool_, g);
  }

 private:
  float threshold_ = 0;
  bool avgpool_ = false;
};

template <typename Device, typename T>
class SparseGatherOp : public BlockOpBase {
 public:
  explicit SparseGatherOp(OpKernelConstruction* ctx) : BlockOpBase(ctx) {
    OP_REQUIRES_OK(ctx, ReadBlockAttrs(ctx, /*with_size=*/true));
  }

  void Compute(OpKernelContext* ctx) override {
    using Functor = BlockSparseFunctor<Device, T>;
    const Tensor& x = ctx->input(0);
    const Tensor& indices = ctx->input(1);
    OP_REQUIRES_OK(ctx, CheckRank(x, 4, "x must be [B, H, W, C]"));
    OP_REQUIRES_OK(ctx, CheckIndicesShape(indices));
    BlockGeometry g;
    FillForIndices(x.dim_size(0), x.dim_size(1), x.dim_size(2), x.dim_size(3), size_h_, size_w_,
                   &g);
    const int64_t n = indices.dim_size(0);
    OP_REQUIRES_OK(ctx, Functor::CheckGatherIndices(indices, g));
    TensorShape blocks_shape;
    OP_REQUIRES_OK(ctx, TensorShape::BuildTensorShape({n, g.size_h, g.size_w, g.c}, &blocks_shape));
    Tensor* blocks = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, blocks_shape, &blocks));
    if (blocks->NumElements() == 0) return;
    Functor::Gather(ctx, x.flat<T>().data(), indices.flat<int32_t>().data(), n,
                    blocks->flat<T>().data(), g);
  }
};

// The output of a large zero-based scatter (add = false), kept from one call
// to the next and handed out again once nobody else holds it: its buffer's
// reference count is back to this cache's alone, so every consumer is done
// with it, and none wrote to it in place (TensorFlow forwards a buffer to an
// op's output only when its count is one, never while it is kept here).
// Filling a fresh output is dominated by its page faults (most of a
// block-sparse convolution's scatter at 10 % active blocks); the kept one
// needs only the previous call's blocks zeroed and this call's written. It
// holds one output-sized buffer per kernel between calls, and while it is
// kept, the op consuming it cannot reuse it for its own output in place (a
// ReLU after it allocates instead). CPU only; TF_SPARSECONV_KEEP_OUTPUT=0
// turns it off.
template <typename Device, typename T>
class KeptZeroOutput {
 public:
  bool Scatter(OpKernelContext*, const TensorShape&, const T*, const int32_t*, int64_t,
               const BlockGeometry&) {
    return false;
  }
};

template <typename T>
class KeptZeroOutput<CPUDevice, T> {
 public:
  // Sets output 0 to the scatter of the n blocks into zeros and returns true,
  // or returns false: the caller allocates and scatters as usual.
  bool Scatter(OpKernelContext* ctx, const TensorShape& shape, const T* blk, const int32_t* idx,
               int64_t n, const BlockGeometry& g) {
    if (!enabled_ || shape.num_elements() * static_cast<int64_t>(sizeof(T)) < kMinBytes) {
      return false;
    }
    std::unique_lock<std::mutex> lock(mu_, std::try_to_lock);
    if (!lock.owns_lock()) return false;  // a concurrent call allocates its own
    using Functor = BlockSparseFunctor<CPUDevice, T>;
    if (kept_.IsInitialized() && kept_.RefCountIsOne() && kept_.shape() == shape &&
        std::memcmp(&g, &kept_geometry_, sizeof(g)) == 0) {
      Functor::Rewrite(ctx, blk, idx, n, kept_indices_.data(), kept_indices_.size() / 3,
                       kept_.flat<T>().data(), g);
    } else {
      Tensor fresh;
      // With output 0's allocator attributes, as allocate_output would use.
      if (!ctx->allocate_temp(::tensorflow::DataTypeToEnum<T>::value, shape, &fresh,
                              ctx->output_alloc_attr(0))
               .ok()) {
        return false;
      }
      Functor::Scatter(ctx, blk, idx, n, nullptr, fresh.flat<T>().data(), fresh.NumElements(),
                       /*add=*/false, g);
      kept_ = fresh;
    }
    kept_indices_.assign(idx, idx + 3 * n);
    kept_geometry_ = g;
    ctx->set_output(0, kept_);
    return true;
  }

 private:
  static constexpr int64_t kMinBytes = int64_t{8} << 20;
  // TF_SPARSECONV_KEEP_OUTPUT=0 turns it off (read when the kernel is made).
  const bool enabled_ = [] {
    const char* env = std::getenv("TF_SPARSECONV_KEEP_OUTPUT");
    return env == nullptr || std::string(env) != "0";
  }();
  std::mutex mu_;
  Tensor kept_;
  std::vector<int32_t> kept_indices_;
  BlockGeometry kept_geometry_{};
};

// SparseScatter (kZeroBase = false: base is input 2) and the internal
// SparseScatterZeros (kZeroBase = true: input 2 is the shape of an all-zero
// base, which is never materialised: the output is zero-filled in place, so
// scattering computed blocks into an otherwise empty tensor writes it once).
template <typename Device, typename T, bool kZeroBase>
class SparseScatterOp : public BlockOpBase {
 public:
  explicit SparseScatterOp(OpKernelConstruction* ctx) : BlockOpBase(ctx) {
    OP_REQUIRES_OK(ctx, ReadBlockAttrs(ctx, /*with_size=*/false));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("add", &add_));
  }

  void Compute(OpKernelContext* ctx) override {
    using Functor = BlockSparseFunctor<Device, T>;
    const Tensor& blocks = ctx->input(0);
    const Tensor& indices = ctx->input(1);
    TensorShape base_shape;
    if constexpr (kZeroBase) {
      const Tensor& shape = ctx->input(2);
      OP_REQUIRES(
          ctx, shape.dims() == 1 && shape.NumElements() == 4,
          errors::InvalidArgument("shape must be a vector of 4 ints [B, H, W, C], got shape ",
                                  shape.shape().DebugString()));
      const auto v = shape.vec<int32_t>();
      for (int i = 0; i < 4; ++i) {
        OP_REQUIRES(ctx, v(i) >= 0,
                    errors::InvalidArgument("shape must be non-negative, got ", v(i)));
      }
      OP_REQUIRES_OK(ctx, TensorShape::BuildTensorShape({v(0), v(1), v(2), v(3)}, &base_shape));
    } else {
      base_shape = ctx->input(2).shape();
    }
    OP_REQUIRES_OK(ctx, CheckRank(blocks, 4, "blocks must be [n, size_h, size_w, C]"));
    OP_REQUIRES(
        ctx, base_shape.dims() == 4,
        errors::InvalidArgument("base must be [B, H, W, C], got shape ", base_shape.DebugString()));
    OP_REQUIRES_OK(ctx, CheckIndicesShape(indices));
    const int64_t n = indices.dim_size(0);
    OP_REQUIRES(ctx, blocks.dim_size(0) == n,
                errors::InvalidArgument("blocks has ", blocks.dim_size(0),
                                        " blocks but indices has ", n, " rows"));
    OP_REQUIRES(ctx, blocks.dim_size(3) == base_shape.dim_size(3),
                errors::InvalidArgument("blocks has ", blocks.dim_size(3),
                                        " channels but base has ", base_shape.dim_size(3)));
    OP_REQUIRES(ctx, n == 0 || (blocks.dim_size(1) > 0 && blocks.dim_size(2) > 0),
                errors::InvalidArgument("blocks must have a positive block size, got shape ",
                                        blocks.shape().DebugString()));
    BlockGeometry g;
    FillForIndices(base_shape.dim_size(0), base_shape.dim_size(1), base_shape.dim_size(2),
                   base_shape.dim_size(3), std::max<int64_t>(1, blocks.dim_size(1)),
                   std::max<int64_t>(1, blocks.dim_size(2)), &g);
    OP_REQUIRES_OK(ctx, Functor::CheckScatterIndices(indices, g, add_));
    if (kZeroBase && !add_ &&
        kept_.Scatter(ctx, base_shape, blocks.flat<T>().data(), indices.flat<int32_t>().data(), n,
                      g)) {
      return;
    }
    Tensor* out = nullptr;
    if (!kZeroBase && Functor::kForwardScatterBase) {
      OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({2}, 0, base_shape, &out));
    } else {
      OP_REQUIRES_OK(ctx, ctx->allocate_output(0, base_shape, &out));
    }
    if (out->NumElements() == 0) return;
    const T* base = kZeroBase ? nullptr : ctx->input(2).flat<T>().data();
    Functor::Scatter(ctx, blocks.flat<T>().data(), indices.flat<int32_t>().data(), n, base,
                     out->flat<T>().data(), out->NumElements(), add_, g);
  }

 private:
  bool add_ = false;
  KeptZeroOutput<Device, T> kept_;
};

#define TSC_REGISTER(DEV, T)                                                             \
  REGISTER_KERNEL_BUILDER(                                                               \
      Name("TfSparseConv>ReduceMask").Device(TSC_DEVICE(DEV)).TypeConstraint<T>("T"),    \
      ReduceMaskOp<DEV##Device, T>);                                                     \
  REGISTER_KERNEL_BUILDER(                                                               \
      Name("TfSparseConv>SparseGather").Device(TSC_DEVICE(DEV)).TypeConstraint<T>("T"),  \
      SparseGatherOp<DEV##Device, T>);                                                   \
  REGISTER_KERNEL_BUILDER(                                                               \
      Name("TfSparseConv>SparseScatter").Device(TSC_DEVICE(DEV)).TypeConstraint<T>("T"), \
      SparseScatterOp<DEV##Device, T, false>);                                           \
  REGISTER_KERNEL_BUILDER(Name("TfSparseConv>SparseScatterZeros")                        \
                              .Device(TSC_DEVICE(DEV))                                   \
                              .HostMemory("shape")                                       \
                              .TypeConstraint<T>("T"),                                   \
                          SparseScatterOp<DEV##Device, T, true>);
TSC_REGISTER_FLOAT_KERNELS(TSC_REGISTER)
#undef TSC_REGISTER

}  // namespace tf_sparseconv
