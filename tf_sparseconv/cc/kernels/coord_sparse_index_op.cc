// CPU (and, with TF_SPARSECONV_CUDA, GPU) kernels of the coordinate family's
// index bookkeeping: SparseConvRulebook, the (input site, output site) pairs
// of a "SAME"-padded convolution on a sparse map, per kernel offset, and
// TopKSites (the attention step: the k sites of highest feature norm per
// sample). Geometry and hashing: coord_sparse_common.h. Their GPU kernels are
// in coord_sparse_index_op_gpu.cu.cc; the convolution in coord_sparse_conv_op.cc.
//
// CPU scheme.
//  1. One pass over coords validates every site and inserts its packed key
//     into an open-addressing hash table (serial: O(N), and the first
//     duplicate found is reported deterministically).
//  2. Output sites: submanifold = the input sites; otherwise every input site
//     proposes, per offset, the output position that reads it (parallel over
//     fixed blocks of input rows, each block sorted and deduplicated), then
//     the proposals are merged, sorted and deduplicated: sorted packed keys
//     are (b, spatial...) order.
//  3. The rulebook is built from the output side: output site j reads, per
//     offset, at most one input position, looked up in the hash table.
//     Fixed blocks of output rows find and count their pairs per offset
//     (parallel), a prefix sum in (offset, block) order places every block's
//     run, and a second parallel pass copies them there. Offsets come out
//     grouped and sorted by output row, and the result does not depend on the thread count.
//     Submanifold rulebooks with even kernel extents (k - 1) * d are
//     symmetric: only the first half of the offsets (and the centre) is looked
//     up; the rest are mirror images, placed by one sweep over the rows.
// GPU (same results, same error messages): RulebookFunctor<GPUDevice> below and
// coord_sparse_index_op_gpu.cu.cc (sorted keys instead of the hash table).
#define EIGEN_USE_THREADS

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "tf_sparseconv/cc/kernels/coord_sparse_common.h"
#include "tf_sparseconv/cc/kernels/kernel_util.h"

#if TF_SPARSECONV_CUDA
#include "tf_sparseconv/cc/kernels/coord_sparse_launcher.h"
#endif

namespace tf_sparseconv {

namespace {

// Packed keys stay below this bound (kEmptyKey and sums stay representable).
constexpr int64_t kKeyLimit = int64_t{1} << 62;
// Sites per work block: fixed, so the output never depends on the thread count.
constexpr int64_t kBlockRows = 512;

// Largest dense site index (int32 entries) the rulebook builds instead of a
// hash table: 128 MiB.
constexpr int64_t kMaxDenseIndex = int64_t{1} << 25;

// Row of a packed site key: a dense grid of rows (-1: no site) or a hash table.
struct SiteIndex {
  const HashSlot* slots;
  int64_t capacity;
  const int32_t* grid;
  int32_t Find(int64_t key) const {
    return grid != nullptr ? grid[key] : HashFind(slots, capacity, key);
  }
};

// Enumerates, for an output site, the input positions its kernel offsets
// read that lie inside the input grid, as (offset number, packed input key)
// in increasing offset order, without per-offset divisions or bounds checks:
// the valid taps of each axis form a range, and the key of position
// o * s - pad + t * d is a base plus t * d * radix per axis. Axes are padded
// to three at the front (kernel 1, radix 0).
class NeighbourPlan {
 public:
  explicit NeighbourPlan(const ConvGeometry& g) : dims_(g.dims) {
    const int shift = kMaxCoordDims - g.dims;
    int64_t radix = 1;
    for (int a = kMaxCoordDims - 1; a >= 0; --a) {
      if (a < shift) {
        kernel_[a] = 1, stride_[a] = 0, pad_[a] = 0, length_[a] = 1, step_[a] = 0, radix_[a] = 0;
        continue;
      }
      const int src = a - shift;
      kernel_[a] = g.kernel[src];
      stride_[a] = g.stride[src];
      pad_[a] = g.pad[src];
      length_[a] = g.in_shape[src];
      dilation_[a] = g.dilation[src];
      radix_[a] = radix;
      step_[a] = g.dilation[src] * radix;
      radix *= g.in_shape[src];
    }
    volume_ = radix;
    for (int a = 0; a < shift; ++a) dilation_[a] = 1;
  }

  // `row` is an output coords row (b, o_1, ..., o_D); offsets >= `limit` are
  // not enumerated.
  template <typename Fn>
  void ForEachInput(const int32_t* row, int64_t limit, Fn&& fn) const {
    const int shift = kMaxCoordDims - dims_;
    int64_t lo[kMaxCoordDims], hi[kMaxCoordDims];
    int64_t base = int64_t{row[0]} * volume_;
    for (int a = 0; a < kMaxCoordDims; ++a) {
      if (a < shift) {
        lo[a] = 0, hi[a] = 1;
        continue;
      }
      const int64_t start = int64_t{row[1 + a - shift]} * stride_[a] - pad_[a];  // tap 0
      const int64_t d = dilation_[a];
      lo[a] = start >= 0 ? 0 : (-start + d - 1) / d;
      hi[a] = length_[a] > start ? std::min(kernel_[a], (length_[a] - start + d - 1) / d) : 0;
      if (lo[a] >= hi[a]) return;
      base += start * radix_[a];
    }
    for (int64_t t0 = lo[0]; t0 < hi[0]; ++t0) {
      const int64_t k0 = t0 * kernel_[1], key0 = base + t0 * step_[0];
      for (int64_t t1 = lo[1]; t1 < hi[1]; ++t1) {
        const int64_t k1 = (k0 + t1) * kernel_[2], key1 = key0 + t1 * step_[1];
        for (int64_t t2 = lo[2]; t2 < hi[2]; ++t2) {
          if (k1 + t2 >= limit) return;  // offsets only grow from here
          fn(k1 + t2, key1 + t2 * step_[2]);
        }
      }
    }
  }

 private:
  int dims_;
  int64_t kernel_[kMaxCoordDims], stride_[kMaxCoordDims], pad_[kMaxCoordDims];
  int64_t length_[kMaxCoordDims], dilation_[kMaxCoordDims], radix_[kMaxCoordDims];
  int64_t step_[kMaxCoordDims];
  int64_t volume_ = 1;
};

struct FoundPair {
  int32_t in_row, out_row, offset;
};

Status ReadAxisAttr(OpKernelConstruction* ctx, const char* name, std::vector<int64_t>* out) {
  std::vector<int32_t> v;
  TF_RETURN_IF_ERROR(ctx->GetAttr(name, &v));
  if (v.empty() || v.size() > static_cast<size_t>(kMaxCoordDims)) {
    return errors::InvalidArgument(
        name, " must have 1, 2 or 3 entries (one per spatial axis), got ", v.size());
  }
  out->clear();
  for (int32_t x : v) {
    if (x < 1) return errors::InvalidArgument(name, " must be positive, got ", x);
    out->push_back(x);
  }
  return ::tensorflow::OkStatus();
}

// Number of sites of a grid with `batch` samples of the given shape, or -1
// when it reaches kKeyLimit.
int64_t GridVolume(int64_t batch, int dims, const int64_t* shape) {
  int64_t volume = std::max<int64_t>(batch, 1);
  for (int a = 0; a < dims; ++a) {
    if (volume > (kKeyLimit - 1) / shape[a]) return -1;
    volume *= shape[a];
  }
  return volume;
}

}  // namespace

// SparseConvRulebook on a device: outputs 0-3 for the validated geometry.
template <typename Device>
struct RulebookFunctor;

template <>
struct RulebookFunctor<CPUDevice> {
  static void Compute(OpKernelContext* ctx, const ConvGeometry& g, bool submanifold) {
    const Tensor& coords_t = ctx->input(0);
    const int64_t n = coords_t.dim_size(0);
    const int32_t* coords = coords_t.flat<int32_t>().data();
    // 1. Validate the sites and index them.
    SiteTable sites;
    IndexSites(ctx, g, coords, n, &sites);
    if (!ctx->status().ok()) return;
    // 2. Output sites.
    Tensor* out_coords_t = nullptr;
    WriteOutputSites(ctx, g, submanifold, coords_t, &out_coords_t);
    if (!ctx->status().ok()) return;
    // 3. The rulebook, from the output side.
    WriteRulebook(ctx, g, submanifold, sites.Index(), *out_coords_t);
    if (!ctx->status().ok()) return;
    WriteOutShape(ctx, g);
  }

 private:
  // The owner of a SiteIndex's storage.
  struct SiteTable {
    std::vector<HashSlot> table;
    std::vector<int32_t> grid;
    int64_t capacity = 0;
    bool use_grid = false;
    SiteIndex Index() const { return {table.data(), capacity, use_grid ? grid.data() : nullptr}; }
  };

  // Validates every site (batch index, inside the grid, unique) and indexes
  // them (serial; reports the first duplicate): a dense grid of rows when the
  // grid is small next to the lookups it will serve (one load per lookup,
  // neighbours adjacent in memory), else a hash table.
  static void IndexSites(OpKernelContext* ctx, const ConvGeometry& g, const int32_t* coords,
                         int64_t n, SiteTable* sites) {
    const int dims = g.dims;
    const int64_t width = dims + 1;
    int64_t batch = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int32_t* row = coords + i * width;
      OP_REQUIRES(
          ctx, row[0] >= 0,
          errors::InvalidArgument("coords[", i, ", 0] = ", row[0], " is a negative batch index"));
      batch = std::max<int64_t>(batch, int64_t{row[0]} + 1);
      for (int a = 0; a < dims; ++a) {
        OP_REQUIRES(ctx, row[1 + a] >= 0 && row[1 + a] < g.in_shape[a],
                    errors::InvalidArgument("coords[", i, ", ", 1 + a, "] = ", row[1 + a],
                                            " is outside [0, ", g.in_shape[a], ") (spatial_shape[",
                                            a, "])"));
      }
    }
    OP_REQUIRES(ctx, GridVolume(batch, dims, g.in_shape) >= 0,
                errors::InvalidArgument("batch (", batch,
                                        ") x spatial_shape is too large to "
                                        "index with 62-bit keys"));
    const int64_t volume = GridVolume(batch, dims, g.in_shape);
    const bool use_grid =
        volume <= kMaxDenseIndex && volume <= 16 * std::max<int64_t>(n, 1) * g.num_offsets;
    sites->use_grid = use_grid;
    sites->capacity = use_grid ? 0 : HashCapacity(n);
    const int64_t capacity = sites->capacity;
    sites->table.assign(capacity, HashSlot{kEmptyKey, -1, 0});
    sites->grid.assign(use_grid ? volume : 0, -1);
    std::vector<HashSlot>& table = sites->table;
    std::vector<int32_t>& grid = sites->grid;
    for (int64_t i = 0; i < n; ++i) {
      const int32_t* row = coords + i * width;
      int64_t x[kMaxCoordDims];
      for (int a = 0; a < dims; ++a) x[a] = row[1 + a];
      const int64_t key = PackSite(dims, g.in_shape, row[0], x);
      int32_t dup = -1;
      if (use_grid) {
        dup = grid[key];
        grid[key] = static_cast<int32_t>(i);
      } else {
        dup = HashInsert(table.data(), capacity, key, static_cast<int32_t>(i));
      }
      OP_REQUIRES(ctx, dup < 0,
                  errors::InvalidArgument("coords has duplicate sites: rows ", dup, " and ", i,
                                          " are the same site; sites must be unique"));
    }
  }

  // Output 0, the output sites: the input sites (submanifold) or every output
  // position that reads one, in packed-key order.
  static void WriteOutputSites(OpKernelContext* ctx, const ConvGeometry& g, bool submanifold,
                               const Tensor& coords_t, Tensor** out_coords) {
    const int dims = g.dims;
    const int64_t n = coords_t.dim_size(0);
    const int64_t width = dims + 1;
    const int32_t* coords = coords_t.flat<int32_t>().data();
    Tensor*& out_coords_t = *out_coords;
    if (submanifold) {
      OP_REQUIRES_OK(ctx, ctx->allocate_output(0, coords_t.shape(), &out_coords_t));
      if (n > 0) {
        std::memcpy(out_coords_t->flat<int32_t>().data(), coords,
                    sizeof(int32_t) * static_cast<size_t>(n * width));
      }
    } else {
      std::vector<int64_t> out_keys;
      OutputSites(ctx, g, coords, n, &out_keys);
      const int64_t m = static_cast<int64_t>(out_keys.size());
      OP_REQUIRES(ctx, m <= kInt32Max,
                  errors::InvalidArgument("the convolution has more than 2^31 - 1 output sites"));
      OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({m, width}), &out_coords_t));
      int32_t* out = out_coords_t->flat<int32_t>().data();
      for (int64_t j = 0; j < m; ++j) {
        int64_t site[1 + kMaxCoordDims];
        UnpackSite(dims, g.out_shape, out_keys[j], site);
        for (int64_t c = 0; c < width; ++c) out[j * width + c] = static_cast<int32_t>(site[c]);
      }
    }
  }

  // Outputs 1 and 2, the rulebook: every output site looks up, per offset,
  // the input site it reads.
  static void WriteRulebook(OpKernelContext* ctx, const ConvGeometry& g, bool submanifold,
                            const SiteIndex& index, const Tensor& out_coords_t) {
    const int dims = g.dims;
    const int64_t width = dims + 1;
    const int64_t m = out_coords_t.dim_size(0);
    const int32_t* out_coords = out_coords_t.flat<int32_t>().data();
    const int64_t num_offsets = g.num_offsets;
    const int64_t num_blocks = (m + kBlockRows - 1) / kBlockRows;
    // A submanifold rulebook whose kernel extents (k - 1) * d are all even is
    // symmetric: output j reads input i through offset k exactly when output i
    // reads input j through offset K - 1 - k. Then only the offsets below
    // `limit` (the first half and the centre) are looked up, and the others
    // are their mirror images (half the lookups).
    bool mirror = submanifold;
    for (int a = 0; a < dims; ++a) mirror &= (g.kernel[a] - 1) * g.dilation[a] % 2 == 0;
    const int64_t limit = mirror ? (num_offsets + 1) / 2 : num_offsets;

    // Pass 1, parallel over fixed blocks of output rows: every block finds
    // its pairs in (out_row, offset) order and counts them per offset.
    std::vector<std::vector<FoundPair>> found(num_blocks);
    std::vector<int64_t> counts(num_blocks * num_offsets, 0);
    const NeighbourPlan plan(g);
    ParallelFor(ctx, num_blocks, kBlockRows * num_offsets * 20, [&](int64_t b0, int64_t b1) {
      for (int64_t blk = b0; blk < b1; ++blk) {
        int64_t* count = counts.data() + blk * num_offsets;
        std::vector<FoundPair>& mine = found[blk];
        const int64_t end = std::min(m, (blk + 1) * kBlockRows);
        for (int64_t j = blk * kBlockRows; j < end; ++j) {
          const int32_t* row = out_coords + j * width;
          plan.ForEachInput(row, limit, [&](int64_t k, int64_t key) {
            const int32_t i = index.Find(key);
            if (i < 0) return;
            mine.push_back(FoundPair{i, static_cast<int32_t>(j), static_cast<int32_t>(k)});
            ++count[k];
          });
        }
      }
    });
    // Start of every (offset, block) run: offset-major, then block order.
    Tensor* pair_ptr_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({num_offsets + 1}), &pair_ptr_t));
    auto pair_ptr = pair_ptr_t->vec<int32_t>();
    int64_t total = 0;
    std::vector<int64_t> start(num_offsets + 1, 0);
    for (int64_t k = 0; k < num_offsets; ++k) {
      start[k] = total;
      pair_ptr(k) = static_cast<int32_t>(std::min(total, kInt32Max));
      if (k >= limit) {  // the mirror image of offset K - 1 - k
        total += start[num_offsets - k] - start[num_offsets - 1 - k];
        continue;
      }
      for (int64_t blk = 0; blk < num_blocks; ++blk) {
        const int64_t c = counts[blk * num_offsets + k];
        counts[blk * num_offsets + k] = total;
        total += c;
      }
    }
    start[num_offsets] = total;
    OP_REQUIRES(ctx, total <= kInt32Max,
                errors::InvalidArgument("the rulebook has ", total, " pairs, more than 2^31 - 1"));
    pair_ptr(num_offsets) = static_cast<int32_t>(total);
    Tensor* pairs_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({total, 2}), &pairs_t));
    int32_t* pairs = pairs_t->flat<int32_t>().data();
    // Pass 2: every block writes its runs (in out_row order within an offset).
    ParallelFor(ctx, num_blocks, kBlockRows * num_offsets * 4, [&](int64_t b0, int64_t b1) {
      for (int64_t blk = b0; blk < b1; ++blk) {
        int64_t* next = counts.data() + blk * num_offsets;
        for (const FoundPair& f : found[blk]) {
          const int64_t at = next[f.offset]++;
          pairs[2 * at] = f.in_row;
          pairs[2 * at + 1] = f.out_row;
        }
        std::vector<FoundPair>().swap(found[blk]);
      }
    });
    // Mirrored offsets: the pairs (i, j) of offset K - 1 - k become (j, i),
    // sorted by their new out_row i (each i appears at most once per offset).
    if (limit < num_offsets) {
      ParallelFor(ctx, num_offsets - limit, m * 2 + total / num_offsets * 4,
                  [&](int64_t k0, int64_t k1) {
                    std::vector<int32_t> slot(m, -1);
                    for (int64_t k = limit + k0; k < limit + k1; ++k) {
                      const int64_t src = num_offsets - 1 - k;
                      for (int64_t p = start[src]; p < start[src + 1]; ++p) {
                        slot[pairs[2 * p]] = pairs[2 * p + 1];
                      }
                      int64_t at = start[k];
                      for (int64_t i = 0; i < m; ++i) {
                        if (slot[i] < 0) continue;
                        pairs[2 * at] = slot[i];
                        pairs[2 * at + 1] = static_cast<int32_t>(i);
                        ++at;
                        slot[i] = -1;
                      }
                    }
                  });
    }
  }

  // Output 3, the output grid's spatial shape.
  static void WriteOutShape(OpKernelContext* ctx, const ConvGeometry& g) {
    const int dims = g.dims;
    Tensor* out_shape_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, TensorShape({dims}), &out_shape_t));
    for (int a = 0; a < dims; ++a) {
      out_shape_t->vec<int32_t>()(a) = static_cast<int32_t>(g.out_shape[a]);
    }
  }

  // Sorted, unique packed keys (output grid) of every output position that
  // reads at least one of the n input sites.
  static void OutputSites(OpKernelContext* ctx, const ConvGeometry& g, const int32_t* coords,
                          int64_t n, std::vector<int64_t>* out_keys) {
    const int dims = g.dims;
    const int64_t width = dims + 1;
    const int64_t num_offsets = g.num_offsets;
    const int64_t num_blocks = (n + kBlockRows - 1) / kBlockRows;
    std::vector<std::vector<int64_t>> proposals(num_blocks);
    ParallelFor(ctx, num_blocks, kBlockRows * num_offsets * 80, [&](int64_t b0, int64_t b1) {
      int64_t taps[kMaxCoordDims], o[kMaxCoordDims], p[kMaxCoordDims];
      for (int64_t blk = b0; blk < b1; ++blk) {
        std::vector<int64_t>& mine = proposals[blk];
        const int64_t end = std::min(n, (blk + 1) * kBlockRows);
        for (int64_t i = blk * kBlockRows; i < end; ++i) {
          const int32_t* row = coords + i * width;
          for (int a = 0; a < dims; ++a) p[a] = row[1 + a];
          for (int64_t k = 0; k < num_offsets; ++k) {
            OffsetTaps(g, k, taps);
            if (OutputPosition(g, p, taps, o)) {
              mine.push_back(PackSite(dims, g.out_shape, row[0], o));
            }
          }
        }
        std::sort(mine.begin(), mine.end());
        mine.erase(std::unique(mine.begin(), mine.end()), mine.end());
      }
    });
    size_t total = 0;
    for (const auto& v : proposals) total += v.size();
    out_keys->clear();
    out_keys->reserve(total);
    for (auto& v : proposals) {
      out_keys->insert(out_keys->end(), v.begin(), v.end());
      std::vector<int64_t>().swap(v);
    }
    std::sort(out_keys->begin(), out_keys->end());
    out_keys->erase(std::unique(out_keys->begin(), out_keys->end()), out_keys->end());
  }
};

#if TF_SPARSECONV_CUDA
template <>
struct RulebookFunctor<GPUDevice> {
  // The same rulebook on the GPU (coord_sparse_index_op_gpu.cu.cc), in phases
  // with host-side counts: check the sites, sort them and find the output
  // sites, then the pairs. coords is device memory, spatial_shape and
  // out_spatial_shape host memory.
  static void Compute(OpKernelContext* ctx, const ConvGeometry& g, bool submanifold) {
    const Tensor& coords_t = ctx->input(0);
    const int dims = g.dims;
    const int64_t n = coords_t.dim_size(0);
    const int32_t* coords = coords_t.flat<int32_t>().data();
    void* stream = GpuStream(ctx);

    // 1. Validate the sites (the CPU kernel's messages); find the batch size.
    Tensor check_ws;
    OP_REQUIRES_OK(ctx,
                   ctx->allocate_temp(::tensorflow::DT_INT8,
                                      TensorShape({RulebookCheckGpuWorkspaceBytes()}), &check_ws));
    int64_t bad = n, batch = 0;
    int32_t row[1 + kMaxCoordDims] = {0, 0, 0, 0};
    const char* err = LaunchRulebookCheckGpu(g, coords, n, check_ws.flat<int8_t>().data(), &bad,
                                             row, &batch, stream);
    OP_REQUIRES(ctx, err == nullptr, errors::Internal("SparseConvRulebook GPU: ", err));
    if (bad < n) {
      OP_REQUIRES(
          ctx, row[0] >= 0,
          errors::InvalidArgument("coords[", bad, ", 0] = ", row[0], " is a negative batch index"));
      for (int a = 0; a < dims; ++a) {
        OP_REQUIRES(ctx, row[1 + a] >= 0 && row[1 + a] < g.in_shape[a],
                    errors::InvalidArgument("coords[", bad, ", ", 1 + a, "] = ", row[1 + a],
                                            " is outside [0, ", g.in_shape[a], ") (spatial_shape[",
                                            a, "])"));
      }
      OP_REQUIRES(ctx, false, errors::Internal("SparseConvRulebook GPU: inconsistent check"));
    }
    OP_REQUIRES(ctx, GridVolume(batch, dims, g.in_shape) >= 0,
                errors::InvalidArgument("batch (", batch,
                                        ") x spatial_shape is too large to "
                                        "index with 62-bit keys"));

    // 2. Sorted sites, duplicates, output sites.
    const int64_t sites_bytes = RulebookSitesGpuWorkspaceBytes(g, n, submanifold);
    OP_REQUIRES(ctx, sites_bytes >= 0,
                errors::InvalidArgument("SparseConvRulebook GPU: ", n, " sites x ", g.num_offsets,
                                        " offsets is too large (must be below 2^31)"));
    Tensor sites_ws;
    OP_REQUIRES_OK(
        ctx, ctx->allocate_temp(::tensorflow::DT_INT8, TensorShape({sites_bytes}), &sites_ws));
    int64_t dup_later = -1, dup_earlier = -1, m = 0;
    err = LaunchRulebookSitesGpu(g, coords, n, batch, submanifold, sites_ws.flat<int8_t>().data(),
                                 &dup_later, &dup_earlier, &m, stream);
    OP_REQUIRES(ctx, err == nullptr, errors::Internal("SparseConvRulebook GPU: ", err));
    OP_REQUIRES(ctx, dup_later < 0,
                errors::InvalidArgument("coords has duplicate sites: rows ", dup_earlier, " and ",
                                        dup_later, " are the same site; sites must be unique"));
    OP_REQUIRES(ctx, m <= kInt32Max,
                errors::InvalidArgument("the convolution has more than 2^31 - 1 output sites"));

    // 3. Output sites and pair_ptr; 4. pairs.
    const int64_t width = dims + 1;
    Tensor* out_coords_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({m, width}), &out_coords_t));
    Tensor* pair_ptr_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({g.num_offsets + 1}), &pair_ptr_t));
    const int64_t pairs_bytes = RulebookPairsGpuWorkspaceBytes(g, m);
    OP_REQUIRES(
        ctx, pairs_bytes >= 0,
        errors::InvalidArgument("SparseConvRulebook GPU: ", m, " output sites x ", g.num_offsets,
                                " offsets is too large (must be below 2^31)"));
    Tensor pairs_ws;
    OP_REQUIRES_OK(
        ctx, ctx->allocate_temp(::tensorflow::DT_INT8, TensorShape({pairs_bytes}), &pairs_ws));
    int64_t total = 0;
    err =
        LaunchRulebookPairsGpu(g, coords, n, submanifold, sites_ws.flat<int8_t>().data(), m,
                               out_coords_t->flat<int32_t>().data(), pairs_ws.flat<int8_t>().data(),
                               pair_ptr_t->flat<int32_t>().data(), &total, stream);
    OP_REQUIRES(ctx, err == nullptr, errors::Internal("SparseConvRulebook GPU: ", err));
    OP_REQUIRES(ctx, total <= kInt32Max,
                errors::InvalidArgument("the rulebook has ", total, " pairs, more than 2^31 - 1"));
    Tensor* pairs_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({total, 2}), &pairs_t));
    err = LaunchRulebookWritePairsGpu(g, m, pairs_ws.flat<int8_t>().data(), total,
                                      pairs_t->flat<int32_t>().data(), stream);
    OP_REQUIRES(ctx, err == nullptr, errors::Internal("SparseConvRulebook GPU: ", err));

    Tensor* out_shape_t = nullptr;  // host memory
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, TensorShape({dims}), &out_shape_t));
    for (int a = 0; a < dims; ++a) {
      out_shape_t->vec<int32_t>()(a) = static_cast<int32_t>(g.out_shape[a]);
    }
  }
};
#endif  // TF_SPARSECONV_CUDA

template <typename Device>
class SparseConvRulebookOp : public OpKernel {
 public:
  explicit SparseConvRulebookOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadAxisAttr(ctx, "kernel_size", &kernel_));
    OP_REQUIRES_OK(ctx, ReadAxisAttr(ctx, "strides", &strides_));
    OP_REQUIRES_OK(ctx, ReadAxisAttr(ctx, "dilations", &dilations_));
    OP_REQUIRES(ctx, strides_.size() == kernel_.size() && dilations_.size() == kernel_.size(),
                errors::InvalidArgument(
                    "kernel_size, strides and dilations must have the same length, got ",
                    kernel_.size(), ", ", strides_.size(), " and ", dilations_.size()));
    int64_t num_offsets = 1;
    for (int64_t k : kernel_) num_offsets = std::min(num_offsets * k, kInt32Max);
    OP_REQUIRES(ctx, num_offsets < kInt32Max,
                errors::InvalidArgument("kernel_size has too many offsets (prod(kernel_size) must "
                                        "be below 2^31 - 1)"));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("submanifold", &submanifold_));
    if (submanifold_) {
      for (int64_t s : strides_) {
        OP_REQUIRES(ctx, s == 1,
                    errors::InvalidArgument(
                        "strides must be all 1 for a submanifold convolution, got stride ", s));
      }
    }
  }

  void Compute(OpKernelContext* ctx) override {
    ConvGeometry g{};
    CheckInputs(ctx, &g);
    if (!ctx->status().ok()) return;
    RulebookFunctor<Device>::Compute(ctx, g, submanifold_);
  }

 private:
  // The shapes of coords and spatial_shape; the geometry.
  void CheckInputs(OpKernelContext* ctx, ConvGeometry* g) const {
    const Tensor& coords_t = ctx->input(0);
    const Tensor& shape_t = ctx->input(1);
    const int dims = static_cast<int>(kernel_.size());
    OP_REQUIRES(ctx, shape_t.dims() == 1 && shape_t.dim_size(0) >= 1 && shape_t.dim_size(0) <= 3,
                errors::InvalidArgument("spatial_shape must be a vector of D = 1, 2 or 3 ints, "
                                        "got shape ",
                                        shape_t.shape().DebugString()));
    OP_REQUIRES(ctx, shape_t.dim_size(0) == dims,
                errors::InvalidArgument("spatial_shape has ", shape_t.dim_size(0),
                                        " entries but kernel_size, strides and dilations have ",
                                        dims, " (one per spatial axis)"));
    OP_REQUIRES(ctx, coords_t.dims() == 2 && coords_t.dim_size(1) == dims + 1,
                errors::InvalidArgument("coords must be int32 [N, 1 + D] = [N, ", dims + 1,
                                        "] rows (batch, spatial...), got shape ",
                                        coords_t.shape().DebugString()));
    OP_REQUIRES(ctx, coords_t.dim_size(0) <= kInt32Max,
                errors::InvalidArgument("coords has more than 2^31 - 1 rows: ",
                                        coords_t.shape().DebugString()));

    g->dims = dims;
    const auto shape_v = shape_t.vec<int32_t>();
    for (int a = 0; a < dims; ++a) {
      OP_REQUIRES(ctx, shape_v(a) >= 1,
                  errors::InvalidArgument("spatial_shape must be positive, got ", shape_v(a),
                                          " at axis ", a));
      g->in_shape[a] = shape_v(a);
      g->kernel[a] = kernel_[a];
      g->stride[a] = strides_[a];
      g->dilation[a] = dilations_[a];
    }
    FinishGeometry(g);
  }

  std::vector<int64_t> kernel_, strides_, dilations_;
  bool submanifold_ = true;
};

REGISTER_KERNEL_BUILDER(Name("TfSparseConv>SparseConvRulebook").Device(::tensorflow::DEVICE_CPU),
                        SparseConvRulebookOp<CPUDevice>);

#if TF_SPARSECONV_CUDA
REGISTER_KERNEL_BUILDER(Name("TfSparseConv>SparseConvRulebook")
                            .Device(::tensorflow::DEVICE_GPU)
                            .HostMemory("spatial_shape")
                            .HostMemory("out_spatial_shape"),
                        SparseConvRulebookOp<GPUDevice>);
#endif

// ---------------------------------------------------------------------------
// TopKSites

namespace {

// Score of a feature row: L2 norm or max |value| (NaN if any value is NaN).
template <typename T, typename A>
A RowScore(const T* row, int64_t c, bool l2) {
  A s = 0;
  bool nan = false;
  for (int64_t i = 0; i < c; ++i) {
    const A v = static_cast<A>(row[i]);
    nan |= std::isnan(v);
    s = l2 ? s + v * v : std::max(s, std::abs(v));
  }
  return nan ? std::numeric_limits<A>::quiet_NaN() : (l2 ? std::sqrt(s) : s);
}

// Strict "ranks above": larger score first (NaN above everything), then lower row.
template <typename A>
struct RanksAbove {
  const A* score;
  bool operator()(int32_t a, int32_t b) const {
    const A sa = score[a], sb = score[b];
    const bool na = std::isnan(sa), nb = std::isnan(sb);
    if (na != nb) return na;
    if (!na && sa != sb) return sa > sb;
    return a < b;
  }
};

}  // namespace

// The device halves of TopKSites: the kept rows of features [n, c] (coords
// [n, width]), written as output 0 (allocated here: their number is known
// only once they are selected).
template <typename Device, typename T>
struct TopKSitesFunctor;

template <typename T>
struct TopKSitesFunctor<CPUDevice, T> {
  void operator()(OpKernelContext* ctx, const T* features, int64_t n, int64_t c,
                  const int32_t* coords, int64_t width, int64_t k, bool l2) {
    using A = typename Acc<T>::type;
    int64_t batch = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int32_t b = coords[i * width];
      OP_REQUIRES(
          ctx, b >= 0,
          errors::InvalidArgument("coords[", i, ", 0] = ", b, " is a negative batch index"));
      batch = std::max<int64_t>(batch, int64_t{b} + 1);
    }
    // Rows grouped by sample, ascending within each: counting sort when the
    // batch indices are dense, a sort of (b, row) keys otherwise.
    std::vector<int32_t> order(n);
    std::vector<int64_t> start;
    if (batch <= 2 * n + 16) {
      start.assign(batch + 1, 0);
      for (int64_t i = 0; i < n; ++i) ++start[coords[i * width] + 1];
      for (int64_t b = 0; b < batch; ++b) start[b + 1] += start[b];
      std::vector<int64_t> next(start.begin(), start.end() - 1);
      for (int64_t i = 0; i < n; ++i) order[next[coords[i * width]]++] = static_cast<int32_t>(i);
    } else {
      std::vector<uint64_t> keys(n);
      for (int64_t i = 0; i < n; ++i) {
        keys[i] = (static_cast<uint64_t>(coords[i * width]) << 32) | static_cast<uint64_t>(i);
      }
      std::sort(keys.begin(), keys.end());
      start.push_back(0);
      for (int64_t i = 0; i < n; ++i) {
        order[i] = static_cast<int32_t>(keys[i] & 0xffffffffu);
        if (i > 0 && (keys[i] >> 32) != (keys[i - 1] >> 32)) start.push_back(i);
      }
      start.push_back(n);
    }
    const int64_t groups = static_cast<int64_t>(start.size()) - 1;
    std::vector<A> score(n);
    std::vector<uint8_t> keep(n, 0);
    ParallelFor(ctx, n, c * 3 + 5, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) score[i] = RowScore<T, A>(features + i * c, c, l2);
    });
    ParallelFor(ctx, groups, std::max<int64_t>(n / std::max<int64_t>(groups, 1), 1) * 20,
                [&](int64_t g0, int64_t g1) {
                  for (int64_t g = g0; g < g1; ++g) {
                    int32_t* first = order.data() + start[g];
                    int32_t* last = order.data() + start[g + 1];
                    if (last - first > k) {
                      std::nth_element(first, first + k, last, RanksAbove<A>{score.data()});
                      last = first + k;
                    }
                    for (int32_t* it = first; it < last; ++it) keep[*it] = 1;
                  }
                });
    int64_t kept = 0;
    for (int64_t i = 0; i < n; ++i) kept += keep[i];
    Tensor* rows_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({kept}), &rows_t));
    int32_t* rows = rows_t->flat<int32_t>().data();
    for (int64_t i = 0, at = 0; i < n; ++i) {
      if (keep[i]) rows[at++] = static_cast<int32_t>(i);
    }
  }
};

#if TF_SPARSECONV_CUDA
// The same selection on the GPU (coord_sparse_index_op_gpu.cu.cc): features
// and coords are device memory, k host memory; the number of kept rows (and
// the first negative batch index) come back to the host.
template <typename T>
struct TopKSitesFunctor<GPUDevice, T> {
  void operator()(OpKernelContext* ctx, const T* features, int64_t n, int64_t c,
                  const int32_t* coords, int64_t width, int64_t k, bool l2) {
    const int64_t bytes = TopKSitesGpuWorkspaceBytes(n);
    OP_REQUIRES(ctx, bytes >= 0, errors::InvalidArgument("features has too many rows"));
    Tensor workspace;
    OP_REQUIRES_OK(ctx,
                   ctx->allocate_temp(::tensorflow::DT_INT8, TensorShape({bytes}), &workspace));
    void* ws = workspace.flat<int8_t>().data();
    int64_t bad = n, kept = 0;
    int32_t bad_batch = 0;
    const char* err = LaunchTopKSitesGpu(DTypeTraits<T>::kFormat, features, n, c, coords, width, k,
                                         l2, ws, &bad, &bad_batch, &kept, GpuStream(ctx));
    OP_REQUIRES(ctx, err == nullptr, errors::Internal("TopKSites GPU: ", err));
    OP_REQUIRES(ctx, bad >= n,
                errors::InvalidArgument("coords[", bad, ", 0] = ", bad_batch,
                                        " is a negative batch index"));
    Tensor* rows_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({kept}), &rows_t));
    err = LaunchTopKSitesRowsGpu(ws, n, kept, rows_t->flat<int32_t>().data(), GpuStream(ctx));
    OP_REQUIRES(ctx, err == nullptr, errors::Internal("TopKSites GPU: ", err));
  }
};
#endif  // TF_SPARSECONV_CUDA

template <typename Device, typename T>
class TopKSitesOp : public OpKernel {
 public:
  explicit TopKSitesOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, StringAttrIs(ctx, "score", "l2", &l2_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& features_t = ctx->input(0);
    const Tensor& coords_t = ctx->input(1);
    const Tensor& k_t = ctx->input(2);
    OP_REQUIRES_OK(ctx, CheckRank(features_t, 2, "features must be [N, C]"));
    OP_REQUIRES(ctx,
                coords_t.dims() == 2 && coords_t.dim_size(1) >= 2 &&
                    coords_t.dim_size(1) <= 1 + kMaxCoordDims,
                errors::InvalidArgument("coords must be int32 [N, 1 + D] (D = 1, 2, 3), got shape ",
                                        coords_t.shape().DebugString()));
    OP_REQUIRES(ctx, coords_t.dim_size(0) == features_t.dim_size(0),
                errors::InvalidArgument("features has ", features_t.dim_size(0),
                                        " rows but coords has ", coords_t.dim_size(0)));
    OP_REQUIRES_OK(ctx, CheckRank(k_t, 0, "k must be an int32 scalar"));
    const int64_t k = k_t.scalar<int32_t>()();
    OP_REQUIRES(ctx, k >= 1, errors::InvalidArgument("k must be >= 1, got ", k));
    const int64_t n = features_t.dim_size(0), c = features_t.dim_size(1);
    const int64_t width = coords_t.dim_size(1);
    OP_REQUIRES(ctx, n <= kInt32Max,
                errors::InvalidArgument("features has more than 2^31 - 1 rows"));
    TopKSitesFunctor<Device, T>()(ctx, features_t.flat<T>().data(), n, c,
                                  coords_t.flat<int32_t>().data(), width, k, l2_);
  }

 private:
  bool l2_ = true;
};

// TopKSites on the GPU: k in host memory; the kept rows are computed on the
// device (coord_sparse_index_op_gpu.cu.cc).
#define TSC_REGISTER(DEV, T)                                                             \
  REGISTER_KERNEL_BUILDER(Name("TfSparseConv>TopKSites")                                 \
                              .Device(TSC_DEVICE(DEV))                                   \
                              .TypeConstraint<T>("T") TSC_ON_GPU(DEV, .HostMemory("k")), \
                          TopKSitesOp<DEV##Device, T>);
TSC_REGISTER_FLOAT_KERNELS(TSC_REGISTER)
#undef TSC_REGISTER

}  // namespace tf_sparseconv
