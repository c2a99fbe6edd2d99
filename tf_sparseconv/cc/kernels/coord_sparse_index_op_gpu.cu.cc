// GPU kernels of the index bookkeeping of coordinate sparse convolution
// (TensorFlow-independent): SparseConvRulebook and TopKSites.
//
// Defines the launchers declared in coord_sparse_launcher.h (second section).
// No TensorFlow headers: the file is built by the TF op build and,
// standalone, by tests/gpu/build.py. Semantics: the op docs in
// coord_sparse_ops.cc and the CPU kernels in coord_sparse_index_op.cc /
// coord_sparse_conv_op.cc; the GPU results are identical to the CPU ones.
//
// SparseConvRulebook, in phases with host-side counts (each phase copies a
// few scalars to the host and synchronises the stream):
//  1. Check: every coords row is validated on the device (negative batch,
//     spatial index outside the grid); the first bad row (atomicMin over row
//     numbers) and its values come back, so the OpKernel reports exactly the
//     CPU kernel's error; also the batch size (atomicMax of b + 1).
//  2. Sites: packed keys of the input sites (coord_sparse_common.h) are
//     sorted with their rows by a CUB radix sort (stable: equal keys keep
//     ascending rows). Adjacent equal keys are duplicate sites; the smallest
//     later row of a duplicate and its partner (atomicMin over the packed
//     pair) reproduce the CPU kernel's "rows A and B". Regular convolutions:
//     every (site, offset) proposes the output key that reads it (or a
//     sentinel above every key), radix sort + unique give the sorted output
//     sites; their number, less the sentinel, comes back.
//  3. Pairs: a [K, M] matrix, entry (k, j) = the input row that output j
//     reads through offset k (binary search of the sorted input keys) or -1,
//     and its flags; an exclusive scan of the flags in (k, j) order places
//     every pair, which is exactly the CPU order (grouped by offset, by
//     output row within an offset). pair_ptr[k] is the scan at (k, 0). The
//     number of pairs comes back.
//  4. Write: every found pair is written at its scanned position.
// Sorting and scanning make every result independent of scheduling; the
// only atomics are min / max reductions of integers.
//
// TopKSites: one thread per row computes the score in the CPU kernel's
// order and arithmetic (A = float for half / bfloat16 / float, double for
// double; l2 as fma(v, v, s) per element, which is how the CPU build with
// -march=native on FMA hardware contracts s + v * v, then sqrt; abs_max as
// max |v|; NaN if any value is NaN), maps it to an unsigned key that sorts
// ascending in rank order (NaN first, then larger scores; -0 = +0), and two
// stable CUB radix sorts (by rank key, then by batch) of the row numbers
// give every sample's rows in rank order, ties to the lower row. Position p
// is kept iff p < k or the row k positions earlier is of another sample.
// An exclusive scan of the keep flags over rows compacts the kept rows in
// ascending order; the first row with a negative batch and the number kept
// come back to the host.
//
// Limits (static error strings): N * K (regular rulebooks) and M * K must
// be below 2^31 (CUB item counts and int32 scan positions).
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <cub/cub.cuh>

#include "tf_sparseconv/cc/kernels/coord_sparse_common.h"
#include "tf_sparseconv/cc/kernels/coord_sparse_launcher.h"
#include "tf_sparseconv/cc/kernels/float_format.h"
#include "tf_sparseconv/cc/kernels/gpu_elem.cu.h"
#include "tf_sparseconv/cc/kernels/gpu_util.cu.h"

namespace tf_sparseconv {
namespace {

using gpu::Check;
using gpu::Elem;
using gpu::LastError;

constexpr int kThreads = 256;
constexpr int64_t kMaxGridBlocks = int64_t{1} << 20;
constexpr int64_t kItemLimit = (int64_t{1} << 31) - 1;
constexpr int64_t kAlign = 256;

constexpr const char* kUnknownFormat = "tsc_coord_sparse_index: unknown float format";
constexpr const char* kTooLarge =
    "tsc_coord_sparse_index: too large for the GPU kernels (N * K and M * K must be below "
    "2^31)";
constexpr const char* kBadArgument = "tsc_coord_sparse_index: invalid argument";

// Device scalars that come back to the host (one copy per phase).
struct CheckInfo {
  unsigned long long bad_row;  // first bad row, or n
  unsigned long long batch;    // max (b + 1) over the good rows
};
struct SitesInfo {
  unsigned long long dup;  // (later row << 32) | earlier row of the first duplicate, or ~0
  long long num_unique;    // CUB's count of unique output keys (with the sentinel)
  long long num_out;       // M
};
struct TopKInfo {
  unsigned long long bad_row;  // first row with a negative batch, or n
  long long kept;
};

// ---------------------------------------------------------------------------
// Per-element logic (host and device, so that it can be checked on the CPU)
// ---------------------------------------------------------------------------

#if defined(__CUDACC__)
#define TSC_IDX_HD __host__ __device__ __forceinline__
#else
#define TSC_IDX_HD inline
#endif

// Bits needed to write every value in [0, max_value] (at least 1).
TSC_IDX_HD int BitsFor(uint64_t max_value) {
  int bits = 1;
  while (bits < 64 && (max_value >> bits) != 0) ++bits;
  return bits;
}

// Whether coords row `row` lies inside the grid (b >= 0, 0 <= x < shape).
TSC_IDX_HD bool RowValid(const ConvGeometry& g, const int32_t* row) {
  if (row[0] < 0) return false;
  for (int a = 0; a < g.dims; ++a) {
    if (row[1 + a] < 0 || row[1 + a] >= g.in_shape[a]) return false;
  }
  return true;
}

// Packed key of a coords row in the grid of `shape` (the row must be valid).
TSC_IDX_HD uint64_t RowKey(int dims, const int64_t* shape, const int32_t* row) {
  int64_t x[kMaxCoordDims];
  for (int a = 0; a < dims; ++a) x[a] = row[1 + a];
  return static_cast<uint64_t>(PackSite(dims, shape, row[0], x));
}

// Output key that reads input row `row` through offset k, or `sentinel`.
TSC_IDX_HD uint64_t ProposedKey(const ConvGeometry& g, const int32_t* row, int64_t k,
                                uint64_t sentinel) {
  int64_t p[kMaxCoordDims], t[kMaxCoordDims], o[kMaxCoordDims];
  for (int a = 0; a < g.dims; ++a) p[a] = row[1 + a];
  OffsetTaps(g, k, t);
  if (!OutputPosition(g, p, t, o)) return sentinel;
  return static_cast<uint64_t>(PackSite(g.dims, g.out_shape, row[0], o));
}

// Index of `key` in the ascending keys[0, n), or -1.
TSC_IDX_HD int64_t FindKey(const uint64_t* keys, int64_t n, uint64_t key) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (keys[mid] < key) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo < n && keys[lo] == key ? lo : -1;
}

// Input row that output row `out_row` (coords (b, o...)) reads through
// offset k, or -1: sorted_keys / sorted_rows are the n input sites.
TSC_IDX_HD int32_t ReadRow(const ConvGeometry& g, const int32_t* out_row, int64_t k,
                           const uint64_t* sorted_keys, const int32_t* sorted_rows, int64_t n) {
  int64_t o[kMaxCoordDims], t[kMaxCoordDims], p[kMaxCoordDims];
  for (int a = 0; a < g.dims; ++a) o[a] = out_row[1 + a];
  OffsetTaps(g, k, t);
  if (!InputPosition(g, o, t, p)) return -1;
  const uint64_t key = static_cast<uint64_t>(PackSite(g.dims, g.in_shape, out_row[0], p));
  const int64_t at = FindKey(sorted_keys, n, key);
  return at < 0 ? -1 : sorted_rows[at];
}

// Rank keys of a score (ascending key = descending rank): NaN first, then
// larger scores; -0 and +0 are equal. Scores are >= 0 or NaN.
TSC_IDX_HD uint32_t RankKey32(float score) {
  if (score != score) return 0u;
  if (score == 0.0f) return ~0u;
  uint32_t bits;
  memcpy(&bits, &score, sizeof(bits));
  return ~bits;
}
TSC_IDX_HD uint64_t RankKey64(double score) {
  if (score != score) return 0ull;
  if (score == 0.0) return ~0ull;
  uint64_t bits;
  memcpy(&bits, &score, sizeof(bits));
  return ~bits;
}

// Whether sorted position p (rows grouped by batch, rank order within) is
// among its sample's first k.
TSC_IDX_HD bool KeepPosition(const uint32_t* batch_keys, int64_t p, int64_t k) {
  return p < k || batch_keys[p - k] != batch_keys[p];
}

// ---------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------

#define TSC_GRID_STRIDE(i, total)                                                            \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (total); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

__global__ void InitCheckKernel(CheckInfo* info, int64_t n) {
  info->bad_row = static_cast<unsigned long long>(n);
  info->batch = 0;
}

__global__ void CheckKernel(ConvGeometry g, const int32_t* __restrict__ coords, int64_t n,
                            CheckInfo* info) {
  const int width = g.dims + 1;
  TSC_GRID_STRIDE(i, n) {
    const int32_t* row = coords + i * width;
    if (!RowValid(g, row)) {
      atomicMin(&info->bad_row, static_cast<unsigned long long>(i));
    } else {
      atomicMax(&info->batch, static_cast<unsigned long long>(row[0]) + 1);
    }
  }
}

__global__ void InitSitesKernel(SitesInfo* info) {
  info->dup = ~0ull;
  info->num_unique = 0;
  info->num_out = 0;
}

__global__ void SiteKeysKernel(ConvGeometry g, const int32_t* __restrict__ coords, int64_t n,
                               uint64_t* keys, int32_t* rows) {
  const int width = g.dims + 1;
  TSC_GRID_STRIDE(i, n) {
    keys[i] = RowKey(g.dims, g.in_shape, coords + i * width);
    rows[i] = static_cast<int32_t>(i);
  }
}

__global__ void DuplicatesKernel(const uint64_t* __restrict__ keys,
                                 const int32_t* __restrict__ rows, int64_t n, SitesInfo* info) {
  TSC_GRID_STRIDE(p, n - 1) {
    if (keys[p + 1] == keys[p]) {
      const unsigned long long later = static_cast<uint32_t>(rows[p + 1]);
      const unsigned long long earlier = static_cast<uint32_t>(rows[p]);
      atomicMin(&info->dup, (later << 32) | earlier);
    }
  }
}

// proposals[i * K + k]: the output key reading row i through offset k.
__global__ void ProposeKernel(ConvGeometry g, const int32_t* __restrict__ coords, int64_t n,
                              uint64_t sentinel, uint64_t* proposals) {
  const int width = g.dims + 1;
  const int64_t num_offsets = g.num_offsets;
  TSC_GRID_STRIDE(idx, n * num_offsets) {
    const int64_t i = idx / num_offsets;
    proposals[idx] = ProposedKey(g, coords + i * width, idx - i * num_offsets, sentinel);
  }
}

__global__ void FinishSitesKernel(const uint64_t* __restrict__ unique, uint64_t sentinel,
                                  SitesInfo* info, int64_t submanifold_n) {
  if (submanifold_n >= 0) {
    info->num_out = submanifold_n;
    return;
  }
  const long long u = info->num_unique;
  info->num_out = u > 0 && unique[u - 1] == sentinel ? u - 1 : u;
}

__global__ void UnpackKernel(ConvGeometry g, const uint64_t* __restrict__ keys, int64_t m,
                             int32_t* out_coords) {
  const int width = g.dims + 1;
  TSC_GRID_STRIDE(j, m) {
    int64_t site[1 + kMaxCoordDims];
    UnpackSite(g.dims, g.out_shape, static_cast<int64_t>(keys[j]), site);
    for (int c = 0; c < width; ++c) out_coords[j * width + c] = static_cast<int32_t>(site[c]);
  }
}

// read[k * M + j], flags[k * M + j] for every offset k and output row j.
__global__ void ReadRowsKernel(ConvGeometry g, const int32_t* __restrict__ out_coords, int64_t m,
                               const uint64_t* __restrict__ sorted_keys,
                               const int32_t* __restrict__ sorted_rows, int64_t n, int32_t* read,
                               int32_t* flags) {
  const int width = g.dims + 1;
  TSC_GRID_STRIDE(idx, g.num_offsets * m) {
    const int64_t k = idx / m, j = idx - k * m;
    const int32_t r = ReadRow(g, out_coords + j * width, k, sorted_keys, sorted_rows, n);
    read[idx] = r;
    flags[idx] = r >= 0 ? 1 : 0;
  }
}

// pair_ptr[k] = positions[k * M] (k < K), pair_ptr[K] = total; *total too.
__global__ void PairPtrKernel(const int32_t* __restrict__ positions,
                              const int32_t* __restrict__ flags, int64_t num_offsets, int64_t m,
                              int32_t* pair_ptr, long long* total) {
  const int64_t cells = num_offsets * m;
  TSC_GRID_STRIDE(k, num_offsets + 1) {
    if (cells == 0) {
      pair_ptr[k] = 0;
    } else if (k < num_offsets) {
      pair_ptr[k] = positions[k * m];
    } else {
      const int32_t t = positions[cells - 1] + flags[cells - 1];
      pair_ptr[k] = t;
      *total = t;
    }
  }
  if (cells == 0 && blockIdx.x == 0 && threadIdx.x == 0) *total = 0;
}

__global__ void WritePairsKernel(const int32_t* __restrict__ read,
                                 const int32_t* __restrict__ positions, int64_t cells, int64_t m,
                                 int64_t num_pairs, int32_t* pairs) {
  TSC_GRID_STRIDE(idx, cells) {
    const int32_t r = read[idx];
    const int64_t at = positions[idx];
    if (r >= 0 && at < num_pairs) {
      pairs[2 * at] = r;
      pairs[2 * at + 1] = static_cast<int32_t>(idx % m);
    }
  }
}

// TopKSites: score keys (rank order) and row numbers; first negative batch.
template <typename T, typename K>
__global__ void ScoreKernel(const T* __restrict__ features, int64_t n, int64_t c,
                            const int32_t* __restrict__ coords, int64_t width, bool l2, K* keys,
                            int32_t* rows, TopKInfo* info) {
  using A = typename Elem<T>::Acc;
  TSC_GRID_STRIDE(i, n) {
    const T* row = features + i * c;
    A s = 0;
    bool nan = false;
    for (int64_t x = 0; x < c; ++x) {
      const A v = Elem<T>::Load(row[x]);
      nan |= v != v;
      s = l2 ? fma(v, v, s) : (s < fabs(v) ? fabs(v) : s);
    }
    if (l2) s = sqrt(s);
    if constexpr (sizeof(K) == 4) {
      keys[i] = nan ? K(0) : RankKey32(static_cast<float>(s));
    } else {
      keys[i] = nan ? K(0) : RankKey64(static_cast<double>(s));
    }
    rows[i] = static_cast<int32_t>(i);
    if (coords[i * width] < 0) atomicMin(&info->bad_row, static_cast<unsigned long long>(i));
  }
}

__global__ void InitTopKKernel(TopKInfo* info, int64_t n) {
  info->bad_row = static_cast<unsigned long long>(n);
  info->kept = 0;
}

__global__ void BatchKeysKernel(const int32_t* __restrict__ rows,
                                const int32_t* __restrict__ coords, int64_t n, int64_t width,
                                uint32_t* batch_keys) {
  TSC_GRID_STRIDE(p, n) { batch_keys[p] = static_cast<uint32_t>(coords[rows[p] * width]); }
}

__global__ void KeepKernel(const uint32_t* __restrict__ batch_keys,
                           const int32_t* __restrict__ rows, int64_t n, int64_t k, int32_t* keep) {
  TSC_GRID_STRIDE(p, n) { keep[rows[p]] = KeepPosition(batch_keys, p, k) ? 1 : 0; }
}

__global__ void KeptCountKernel(const int32_t* __restrict__ positions,
                                const int32_t* __restrict__ keep, int64_t n, TopKInfo* info) {
  info->kept = static_cast<long long>(positions[n - 1]) + keep[n - 1];
}

__global__ void CompactKernel(const int32_t* __restrict__ keep,
                              const int32_t* __restrict__ positions, int64_t n, int64_t kept,
                              int32_t* out) {
  TSC_GRID_STRIDE(i, n) {
    const int64_t at = positions[i];
    if (keep[i] && at < kept) out[at] = static_cast<int32_t>(i);
  }
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

unsigned GridFor(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < kMaxGridBlocks ? blocks : kMaxGridBlocks);
}

int64_t AlignUp(int64_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

// Carves aligned regions out of a workspace; with base == nullptr it only
// counts the bytes (so sizing and use share one layout).
class Carver {
 public:
  explicit Carver(void* base) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(base);
    base_ = base == nullptr ? nullptr : reinterpret_cast<char*>((p + kAlign - 1) / kAlign * kAlign);
  }
  template <typename T>
  T* Take(int64_t count) {
    char* at = base_ == nullptr ? nullptr : base_ + used_;
    used_ += AlignUp(static_cast<int64_t>(sizeof(T)) * (count > 0 ? count : 1));
    return reinterpret_cast<T*>(at);
  }
  void* Bytes(int64_t bytes) { return Take<char>(bytes); }
  int64_t Total() const { return used_ + kAlign; }  // + alignment slack of the base

 private:
  char* base_ = nullptr;
  int64_t used_ = 0;
};

bool GeometryOk(const ConvGeometry& g) {
  if (g.dims < 1 || g.dims > kMaxCoordDims || g.num_offsets < 1) return false;
  for (int a = 0; a < g.dims; ++a) {
    if (g.in_shape[a] < 1 || g.kernel[a] < 1 || g.stride[a] < 1 || g.dilation[a] < 1) {
      return false;
    }
  }
  return true;
}

int64_t OutVolume(const ConvGeometry& g, int64_t batch) {
  int64_t v = batch > 0 ? batch : 1;
  for (int a = 0; a < g.dims; ++a) v *= g.out_shape[a];
  return v;
}

int64_t InVolume(const ConvGeometry& g, int64_t batch) {
  int64_t v = batch > 0 ? batch : 1;
  for (int a = 0; a < g.dims; ++a) v *= g.in_shape[a];
  return v;
}

// CUB temporary bytes of the sorts / scans the phases run.
// (Pairs: Key keys, all of whose bits are sorted, and int32 values.)
template <typename Key>
size_t SortPairsBytes(int64_t n) {
  size_t bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const Key*>(nullptr),
                                  static_cast<Key*>(nullptr), static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr), static_cast<int>(n), 0,
                                  static_cast<int>(8 * sizeof(Key)));
  return bytes;
}
size_t SortKeysBytes64(int64_t n) {
  size_t bytes = 0;
  cub::DeviceRadixSort::SortKeys(nullptr, bytes, static_cast<const uint64_t*>(nullptr),
                                 static_cast<uint64_t*>(nullptr), static_cast<int>(n), 0, 64);
  return bytes;
}
size_t UniqueBytes64(int64_t n) {
  size_t bytes = 0;
  cub::DeviceSelect::Unique(nullptr, bytes, static_cast<const uint64_t*>(nullptr),
                            static_cast<uint64_t*>(nullptr), static_cast<long long*>(nullptr),
                            static_cast<int>(n));
  return bytes;
}
size_t ScanBytes(int64_t n) {
  size_t bytes = 0;
  cub::DeviceScan::ExclusiveSum(nullptr, bytes, static_cast<const int32_t*>(nullptr),
                                static_cast<int32_t*>(nullptr), static_cast<int>(n));
  return bytes;
}
int64_t Max(int64_t a, int64_t b) { return a > b ? a : b; }

// Layout of the sites workspace: the persistent part (used again by the
// pairs phase) first, then scratch.
struct SitesLayout {
  uint64_t* sorted_keys;  // [n] input keys, ascending
  int32_t* sorted_rows;   // [n] their rows
  uint64_t* out_keys;     // [n * K] unique output keys (regular convolutions)
  uint64_t* keys_in;      // [n]
  int32_t* rows_in;       // [n]
  uint64_t* proposals;    // [n * K]
  SitesInfo* info;
  void* temp;
  int64_t temp_bytes;
  int64_t total;
};

bool SitesSizes(const ConvGeometry& g, int64_t n, bool submanifold, int64_t* nk) {
  if (n < 0 || n > kItemLimit) return false;
  *nk = submanifold ? 0 : n * g.num_offsets;
  return g.num_offsets <= kItemLimit && (n == 0 || *nk / n == g.num_offsets) && *nk <= kItemLimit;
}

SitesLayout MakeSitesLayout(void* base, int64_t n, int64_t nk) {
  Carver c(base);
  SitesLayout l{};
  l.sorted_keys = c.Take<uint64_t>(n);
  l.sorted_rows = c.Take<int32_t>(n);
  l.out_keys = c.Take<uint64_t>(nk);
  l.keys_in = c.Take<uint64_t>(n);
  l.rows_in = c.Take<int32_t>(n);
  l.proposals = c.Take<uint64_t>(nk);
  l.info = c.Take<SitesInfo>(1);
  l.temp_bytes = static_cast<int64_t>(SortPairsBytes<uint64_t>(n));
  if (nk > 0) {
    l.temp_bytes = Max(l.temp_bytes, static_cast<int64_t>(SortKeysBytes64(nk)));
    l.temp_bytes = Max(l.temp_bytes, static_cast<int64_t>(UniqueBytes64(nk)));
  }
  l.temp = c.Bytes(l.temp_bytes);
  l.total = c.Total();
  return l;
}

struct PairsLayout {
  int32_t* read;       // [K * M]
  int32_t* flags;      // [K * M]
  int32_t* positions;  // [K * M]
  long long* total;
  void* temp;
  int64_t temp_bytes;
  int64_t total_bytes;
};

bool PairsCells(const ConvGeometry& g, int64_t m, int64_t* cells) {
  if (m < 0 || m > kItemLimit || g.num_offsets > kItemLimit) return false;
  *cells = m * g.num_offsets;
  return (m == 0 || *cells / m == g.num_offsets) && *cells <= kItemLimit;
}

PairsLayout MakePairsLayout(void* base, int64_t cells) {
  Carver c(base);
  PairsLayout l{};
  l.read = c.Take<int32_t>(cells);
  l.flags = c.Take<int32_t>(cells);
  l.positions = c.Take<int32_t>(cells);
  l.total = c.Take<long long>(1);
  l.temp_bytes = static_cast<int64_t>(ScanBytes(cells));
  l.temp = c.Bytes(l.temp_bytes);
  l.total_bytes = c.Total();
  return l;
}

struct TopKLayout {
  uint64_t* keys_a;    // [n] rank keys (32- or 64-bit), then batch keys
  uint64_t* keys_b;    // [n]
  int32_t* rows_a;     // [n]
  int32_t* rows_b;     // [n]
  int32_t* keep;       // [n]
  int32_t* positions;  // [n]
  TopKInfo* info;
  void* temp;
  int64_t temp_bytes;
  int64_t total;
};

TopKLayout MakeTopKLayout(void* base, int64_t n) {
  Carver c(base);
  TopKLayout l{};
  l.keys_a = c.Take<uint64_t>(n);
  l.keys_b = c.Take<uint64_t>(n);
  l.rows_a = c.Take<int32_t>(n);
  l.rows_b = c.Take<int32_t>(n);
  l.keep = c.Take<int32_t>(n);
  l.positions = c.Take<int32_t>(n);
  l.info = c.Take<TopKInfo>(1);
  l.temp_bytes = Max(Max(static_cast<int64_t>(SortPairsBytes<uint64_t>(n)),
                         static_cast<int64_t>(SortPairsBytes<uint32_t>(n))),
                     static_cast<int64_t>(ScanBytes(n)));
  l.temp = c.Bytes(l.temp_bytes);
  l.total = c.Total();
  return l;
}

template <typename T>
const char* LaunchScores(const void* features, int64_t n, int64_t c, const int32_t* coords,
                         int64_t width, bool l2, const TopKLayout& l, cudaStream_t st) {
  if (sizeof(typename Elem<T>::Acc) == 8) {
    ScoreKernel<T, uint64_t><<<GridFor(n), kThreads, 0, st>>>(
        static_cast<const T*>(features), n, c, coords, width, l2, l.keys_a, l.rows_a, l.info);
  } else {
    ScoreKernel<T, uint32_t>
        <<<GridFor(n), kThreads, 0, st>>>(static_cast<const T*>(features), n, c, coords, width, l2,
                                          reinterpret_cast<uint32_t*>(l.keys_a), l.rows_a, l.info);
  }
  return LastError();
}

}  // namespace

// ---------------------------------------------------------------------------
// SparseConvRulebook launchers
// ---------------------------------------------------------------------------

int64_t RulebookCheckGpuWorkspaceBytes() {
  Carver c(nullptr);
  c.Take<CheckInfo>(1);
  return c.Total();
}

const char* LaunchRulebookCheckGpu(const ConvGeometry& g, const int32_t* coords, int64_t n,
                                   void* workspace, int64_t* bad_row, int32_t* bad_values,
                                   int64_t* batch, void* stream) {
  if (!GeometryOk(g) || n < 0) return kBadArgument;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  Carver c(workspace);
  CheckInfo* info = c.Take<CheckInfo>(1);
  InitCheckKernel<<<1, 1, 0, st>>>(info, n);
  const char* err = LastError();
  if (err) return err;
  if (n > 0) {
    CheckKernel<<<GridFor(n), kThreads, 0, st>>>(g, coords, n, info);
    if ((err = LastError())) return err;
  }
  CheckInfo host{};
  if ((err = Check(cudaMemcpyAsync(&host, info, sizeof(host), cudaMemcpyDeviceToHost, st)))) {
    return err;
  }
  if ((err = Check(cudaStreamSynchronize(st)))) return err;
  *bad_row = static_cast<int64_t>(host.bad_row);
  *batch = static_cast<int64_t>(host.batch);
  if (*bad_row < n) {
    const int64_t width = g.dims + 1;
    if ((err = Check(cudaMemcpyAsync(bad_values, coords + *bad_row * width, sizeof(int32_t) * width,
                                     cudaMemcpyDeviceToHost, st)))) {
      return err;
    }
    if ((err = Check(cudaStreamSynchronize(st)))) return err;
  }
  return nullptr;
}

int64_t RulebookSitesGpuWorkspaceBytes(const ConvGeometry& g, int64_t n, bool submanifold) {
  int64_t nk = 0;
  if (!GeometryOk(g) || !SitesSizes(g, n, submanifold, &nk)) return -1;
  return MakeSitesLayout(nullptr, n, nk).total;
}

const char* LaunchRulebookSitesGpu(const ConvGeometry& g, const int32_t* coords, int64_t n,
                                   int64_t batch, bool submanifold, void* workspace,
                                   int64_t* dup_later, int64_t* dup_earlier, int64_t* num_out,
                                   void* stream) {
  int64_t nk = 0;
  if (!GeometryOk(g) || batch < 0) return kBadArgument;
  if (!SitesSizes(g, n, submanifold, &nk)) return kTooLarge;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const SitesLayout l = MakeSitesLayout(workspace, n, nk);
  InitSitesKernel<<<1, 1, 0, st>>>(l.info);
  const char* err = LastError();
  if (err) return err;
  if (n > 0) {
    const int in_bits = BitsFor(static_cast<uint64_t>(InVolume(g, batch) - 1));
    SiteKeysKernel<<<GridFor(n), kThreads, 0, st>>>(g, coords, n, l.keys_in, l.rows_in);
    if ((err = LastError())) return err;
    size_t bytes = static_cast<size_t>(l.temp_bytes);
    if ((err = Check(cub::DeviceRadixSort::SortPairs(l.temp, bytes, l.keys_in, l.sorted_keys,
                                                     l.rows_in, l.sorted_rows, static_cast<int>(n),
                                                     0, in_bits, st)))) {
      return err;
    }
    if (n > 1) {
      DuplicatesKernel<<<GridFor(n - 1), kThreads, 0, st>>>(l.sorted_keys, l.sorted_rows, n,
                                                            l.info);
      if ((err = LastError())) return err;
    }
  }
  const uint64_t sentinel = static_cast<uint64_t>(OutVolume(g, batch));
  if (nk > 0) {
    // Proposals in out_keys (scratch), sorted into proposals, unique back
    // into out_keys.
    ProposeKernel<<<GridFor(nk), kThreads, 0, st>>>(g, coords, n, sentinel, l.out_keys);
    if ((err = LastError())) return err;
    const int out_bits = BitsFor(sentinel);
    size_t bytes = static_cast<size_t>(l.temp_bytes);
    if ((err = Check(cub::DeviceRadixSort::SortKeys(l.temp, bytes, l.out_keys, l.proposals,
                                                    static_cast<int>(nk), 0, out_bits, st)))) {
      return err;
    }
    bytes = static_cast<size_t>(l.temp_bytes);
    if ((err = Check(cub::DeviceSelect::Unique(l.temp, bytes, l.proposals, l.out_keys,
                                               &l.info->num_unique, static_cast<int>(nk), st)))) {
      return err;
    }
  }
  FinishSitesKernel<<<1, 1, 0, st>>>(l.out_keys, sentinel, l.info, submanifold ? n : -1);
  if ((err = LastError())) return err;
  SitesInfo host{};
  if ((err = Check(cudaMemcpyAsync(&host, l.info, sizeof(host), cudaMemcpyDeviceToHost, st)))) {
    return err;
  }
  if ((err = Check(cudaStreamSynchronize(st)))) return err;
  if (host.dup == ~0ull) {
    *dup_later = -1;
    *dup_earlier = -1;
  } else {
    *dup_later = static_cast<int64_t>(host.dup >> 32);
    *dup_earlier = static_cast<int64_t>(host.dup & 0xffffffffull);
  }
  *num_out = host.num_out;
  return nullptr;
}

int64_t RulebookPairsGpuWorkspaceBytes(const ConvGeometry& g, int64_t num_out) {
  int64_t cells = 0;
  if (!GeometryOk(g) || !PairsCells(g, num_out, &cells)) return -1;
  return MakePairsLayout(nullptr, cells).total_bytes;
}

const char* LaunchRulebookPairsGpu(const ConvGeometry& g, const int32_t* coords, int64_t n,
                                   bool submanifold, const void* sites_workspace, int64_t num_out,
                                   int32_t* out_coords, void* workspace, int32_t* pair_ptr,
                                   int64_t* num_pairs, void* stream) {
  int64_t nk = 0, cells = 0;
  if (!GeometryOk(g)) return kBadArgument;
  if (!SitesSizes(g, n, submanifold, &nk) || !PairsCells(g, num_out, &cells)) return kTooLarge;
  if (submanifold && num_out != n) return kBadArgument;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  // Only the persistent part of the sites layout is read (no CUB query needed
  // for its addresses, but MakeSitesLayout is cheap and keeps one layout).
  const SitesLayout s = MakeSitesLayout(const_cast<void*>(sites_workspace), n, nk);
  const PairsLayout l = MakePairsLayout(workspace, cells);
  const int64_t width = g.dims + 1;
  const char* err = nullptr;
  if (num_out > 0) {
    if (submanifold) {
      if ((err = Check(cudaMemcpyAsync(out_coords, coords, sizeof(int32_t) * num_out * width,
                                       cudaMemcpyDeviceToDevice, st)))) {
        return err;
      }
    } else {
      UnpackKernel<<<GridFor(num_out), kThreads, 0, st>>>(g, s.out_keys, num_out, out_coords);
      if ((err = LastError())) return err;
    }
  }
  if (cells > 0) {
    ReadRowsKernel<<<GridFor(cells), kThreads, 0, st>>>(g, out_coords, num_out, s.sorted_keys,
                                                        s.sorted_rows, n, l.read, l.flags);
    if ((err = LastError())) return err;
    size_t bytes = static_cast<size_t>(l.temp_bytes);
    if ((err = Check(cub::DeviceScan::ExclusiveSum(l.temp, bytes, l.flags, l.positions,
                                                   static_cast<int>(cells), st)))) {
      return err;
    }
  }
  PairPtrKernel<<<GridFor(g.num_offsets + 1), kThreads, 0, st>>>(
      l.positions, l.flags, g.num_offsets, num_out, pair_ptr, l.total);
  if ((err = LastError())) return err;
  long long total = 0;
  if ((err = Check(cudaMemcpyAsync(&total, l.total, sizeof(total), cudaMemcpyDeviceToHost, st)))) {
    return err;
  }
  if ((err = Check(cudaStreamSynchronize(st)))) return err;
  *num_pairs = total;
  return nullptr;
}

const char* LaunchRulebookWritePairsGpu(const ConvGeometry& g, int64_t num_out,
                                        const void* workspace, int64_t num_pairs, int32_t* pairs,
                                        void* stream) {
  int64_t cells = 0;
  if (!GeometryOk(g)) return kBadArgument;
  if (!PairsCells(g, num_out, &cells)) return kTooLarge;
  if (num_pairs < 0 || num_pairs > cells) return kBadArgument;
  if (num_pairs == 0) return nullptr;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const PairsLayout l = MakePairsLayout(const_cast<void*>(workspace), cells);
  WritePairsKernel<<<GridFor(cells), kThreads, 0, st>>>(l.read, l.positions, cells, num_out,
                                                        num_pairs, pairs);
  return LastError();
}

// ---------------------------------------------------------------------------
// TopKSites launchers
// ---------------------------------------------------------------------------

int64_t TopKSitesGpuWorkspaceBytes(int64_t n) {
  if (n < 0 || n > kItemLimit) return -1;
  return MakeTopKLayout(nullptr, n).total;
}

const char* LaunchTopKSitesGpu(FloatFormat format, const void* features, int64_t n, int64_t c,
                               const int32_t* coords, int64_t width, int64_t k, bool l2,
                               void* workspace, int64_t* bad_row, int32_t* bad_batch, int64_t* kept,
                               void* stream) {
  if (n < 0 || c < 0 || width < 1 || k < 1) return kBadArgument;
  if (n > kItemLimit) return kTooLarge;
  if (FormatBytes(format) == 0) return kUnknownFormat;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const TopKLayout l = MakeTopKLayout(workspace, n);
  InitTopKKernel<<<1, 1, 0, st>>>(l.info, n);
  const char* err = LastError();
  if (err) return err;
  if (n > 0) {
    err = gpu::DispatchFormat(format, kUnknownFormat, [&](auto tag) {
      using T = typename decltype(tag)::type;
      return LaunchScores<T>(features, n, c, coords, width, l2, l, st);
    });
    if (err) return err;
    // Rank order (stable: ties keep ascending rows), then by batch (stable).
    size_t bytes = static_cast<size_t>(l.temp_bytes);
    if (format == FloatFormat::kDouble) {
      err = Check(cub::DeviceRadixSort::SortPairs(l.temp, bytes, l.keys_a, l.keys_b, l.rows_a,
                                                  l.rows_b, static_cast<int>(n), 0, 64, st));
    } else {
      err = Check(cub::DeviceRadixSort::SortPairs(l.temp, bytes,
                                                  reinterpret_cast<const uint32_t*>(l.keys_a),
                                                  reinterpret_cast<uint32_t*>(l.keys_b), l.rows_a,
                                                  l.rows_b, static_cast<int>(n), 0, 32, st));
    }
    if (err) return err;
    uint32_t* batch_in = reinterpret_cast<uint32_t*>(l.keys_a);
    uint32_t* batch_sorted = reinterpret_cast<uint32_t*>(l.keys_b);
    BatchKeysKernel<<<GridFor(n), kThreads, 0, st>>>(l.rows_b, coords, n, width, batch_in);
    if ((err = LastError())) return err;
    bytes = static_cast<size_t>(l.temp_bytes);
    if ((err =
             Check(cub::DeviceRadixSort::SortPairs(l.temp, bytes, batch_in, batch_sorted, l.rows_b,
                                                   l.rows_a, static_cast<int>(n), 0, 32, st)))) {
      return err;
    }
    KeepKernel<<<GridFor(n), kThreads, 0, st>>>(batch_sorted, l.rows_a, n, k, l.keep);
    if ((err = LastError())) return err;
    bytes = static_cast<size_t>(l.temp_bytes);
    if ((err = Check(cub::DeviceScan::ExclusiveSum(l.temp, bytes, l.keep, l.positions,
                                                   static_cast<int>(n), st)))) {
      return err;
    }
    KeptCountKernel<<<1, 1, 0, st>>>(l.positions, l.keep, n, l.info);
    if ((err = LastError())) return err;
  }
  TopKInfo host{};
  if ((err = Check(cudaMemcpyAsync(&host, l.info, sizeof(host), cudaMemcpyDeviceToHost, st)))) {
    return err;
  }
  if ((err = Check(cudaStreamSynchronize(st)))) return err;
  *bad_row = static_cast<int64_t>(host.bad_row);
  *kept = host.kept;
  if (*bad_row < n) {
    if ((err = Check(cudaMemcpyAsync(bad_batch, coords + *bad_row * width, sizeof(int32_t),
                                     cudaMemcpyDeviceToHost, st)))) {
      return err;
    }
    if ((err = Check(cudaStreamSynchronize(st)))) return err;
  }
  return nullptr;
}

const char* LaunchTopKSitesRowsGpu(const void* workspace, int64_t n, int64_t kept, int32_t* rows,
                                   void* stream) {
  if (n < 0 || kept < 0 || kept > n) return kBadArgument;
  if (n > kItemLimit) return kTooLarge;
  if (kept == 0) return nullptr;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const TopKLayout l = MakeTopKLayout(const_cast<void*>(workspace), n);
  CompactKernel<<<GridFor(n), kThreads, 0, st>>>(l.keep, l.positions, n, kept, rows);
  return LastError();
}

}  // namespace tf_sparseconv
