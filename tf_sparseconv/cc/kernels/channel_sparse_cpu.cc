// The CPU engine of the channel-sparse convolution and its two gradient ops
// (ChannelSparseFunctor<CPUDevice, T>, channel_sparse_functor.h); the operand
// columns are in channel_sparse_columns.h.
//
// CPU scheme. Work is split into tiles of kTile = 64 consecutive positions
// (output positions for the forward op and the kernel gradient, input
// positions for the input gradient) of one sample. For a tile, the operand
// is presented as "columns": for each (channel, tap), one contiguous run of
// 64 positions (row mode: pointers into source rows transposed to
// [channel][column], cached across tiles; plane modes: runs of a sample's
// transposed source plane; otherwise an im2col gather), from the column source
// of the op call's mode: the engine is instantiated once per mode.
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
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "tf_sparseconv/cc/kernels/channel_sparse_columns.h"
#include "tf_sparseconv/cc/kernels/channel_sparse_functor.h"

namespace tf_sparseconv {
namespace channel_sparse_cpu {
namespace {

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
void GroupTile(const A* const* base, int64_t stride, int64_t taps, const int32_t* src, int64_t n,
               const A* const* w, A* const* out) {
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

// GroupTile<A, size> for a group of 2 .. GroupLimit<A>() rows (GroupRows
// makes no larger ones): G counts up to size, one instantiation per size.
template <typename A, int G = std::min(2, GroupLimit<A>())>
void SizedGroupTile(int size, const A* const* base, int64_t stride, int64_t taps,
                    const int32_t* src, int64_t n, const A* const* w, A* const* out) {
  if constexpr (G < GroupLimit<A>()) {
    if (size > G) {
      SizedGroupTile<A, G + 1>(size, base, stride, taps, src, n, w, out);
      return;
    }
  }
  GroupTile<A, G>(base, stride, taps, src, n, w, out);
}

// One row (G = 1). With a tile only 4 vectors wide (AVX-512), odd taps go to
// a second accumulator set: 8 independent FMA chains hide the FMA latency.
template <typename A>
void RowTile(const A* const* base, int64_t stride, int64_t taps, const int32_t* src, int64_t n,
             const A* w, A* out) {
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
void SparseRowsTile(const Columns<A>& cols, const int64_t* ptr, const int32_t* src, const A* w,
                    const RowGroups& groups, int64_t blocks, int64_t rows, A* out) {
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
      if (size == 1) {
        RowTile<A>(base, stride, taps, src + first, n, wk[0], ok[0]);
      } else {
        SizedGroupTile<A>(size, base, stride, taps, src + first, n, wk, ok);
      }
    }
  }
}

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
Rows<T, A> ForwardRows(const T* kernel, const int32_t* conn, const ChannelSparseGeometry& g) {
  const int64_t taps = g.k_h * g.k_w, m = g.m, cout = g.out_c;
  Rows<T, A> rows;
  rows.row_ptr.resize(cout + 1);
  rows.src.assign(conn, conn + cout * m);
  rows.w.resize(cout * m * taps);
  for (int64_t o = 0; o <= cout; ++o) rows.row_ptr[o] = o * m;
  for (int64_t t = 0; t < taps; ++t) {
    for (int64_t e = 0; e < m; ++e) {
      for (int64_t o = 0; o < cout; ++o) {
        rows.w[(o * m + e) * taps + t] = static_cast<A>(kernel[(t * m + e) * cout + o]);
      }
    }
  }
  return rows;
}

template <typename T, typename A>
Rows<T, A> TransposedRows(const T* kernel, const int32_t* conn, const ChannelSparseGeometry& g) {
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
Rows<T, A> BlockRows(const Rows<T, A>& rows, int64_t result_channels, int64_t taps, int64_t block,
                     int64_t blocks) {
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
// columns of `source` (one of the column sources of channel_sparse_columns.h):
// the forward op (source x, rows = the connection lists) and the input
// gradient (source dy, rows = the transposed lists).
template <typename T, typename A, typename Source>
void SparseRowsConvCpu(OpKernelContext* ctx, const Source& source, const Rows<T, A>& rows,
                       int64_t result_channels, int64_t cost, T* result,
                       const Epilogue<T>& epilogue = {}) {
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
  const int64_t widest =
      std::max<int64_t>(1, kBudget / std::max<int64_t>(1, source.bytes_per_channel()));
  const int64_t blocks = std::max<int64_t>(1, (channels + widest - 1) / widest);
  const int64_t block = std::max<int64_t>(1, (channels + blocks - 1) / blocks);
  const Rows<T, A> blocked = BlockRows(rows, result_channels, source.taps(), block, blocks);
  const RowGroups groups = GroupRows(blocked, result_channels, blocks, GroupLimit<A>());
  auto work = [&](int64_t begin, int64_t end) {
    typename Source::Shard shard(source);
    Scratch<A> out(result_channels * kTile);
    std::vector<Run> runs;
    for (int64_t unit = begin; unit < end; ++unit) {
      int64_t b;
      const Columns<A>& cols = shard.Prepare(unit, &b, &runs);
      SparseRowsTile(cols, blocked.row_ptr.data(), blocked.src.data(), blocked.w.data(), groups,
                     blocks, result_channels, out.get());
      if (fused) ApplyEpilogue(bias, epilogue.relu, result_channels, out.get());
      ScatterTile(out.get(), result_channels, runs, result + b * positions * result_channels);
    }
  };
  ParallelFor(ctx, source.units(), cost, work);
}

template <typename T>
void ForwardCpu(OpKernelContext* ctx, const T* x, const T* kernel, const int32_t* conn, T* y,
                const ChannelSparseGeometry& g, const Epilogue<T>& epilogue) {
  using A = typename Acc<T>::type;
  const Rows<T, A> rows = ForwardRows<T, A>(kernel, conn, g);
  WithColumnSource<T, A>(x, Correlation::Forward(g), g.batch, [&](const auto& source) {
    SparseRowsConvCpu(ctx, source, rows, g.out_c, kTile * g.k_h * g.k_w * (g.m * g.out_c + g.in_c),
                      y, epilogue);
  });
}

template <typename T>
void BackpropInputCpu(OpKernelContext* ctx, const T* dy, const T* kernel, const int32_t* conn,
                      T* dx, const ChannelSparseGeometry& g) {
  using A = typename Acc<T>::type;
  const Rows<T, A> rows = TransposedRows<T, A>(kernel, conn, g);
  WithColumnSource<T, A>(dy, Correlation::Transposed(g), g.batch, [&](const auto& source) {
    SparseRowsConvCpu(ctx, source, rows, g.in_c, kTile * g.k_h * g.k_w * (g.m * g.out_c + g.out_c),
                      dx);
  });
}

// The kernel gradient from the forward columns of x (`source`).
template <typename T, typename Source>
void KernelGradCpu(OpKernelContext* ctx, const Source& source, const T* dy, const int32_t* conn,
                   T* dkernel, const ChannelSparseGeometry& g) {
  using A = typename Acc<T>::type;
  using V = typename Vec<A>::type;
  using VU = typename Vec<A>::unaligned;
  constexpr int kVecs = kTile / Vec<A>::kLanes;
  const int64_t taps = g.k_h * g.k_w;
  const int64_t m = g.m, cout = g.out_c;
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
    typename Source::Shard shard(source);
    Scratch<A> dyt(cout * kTile);
    std::vector<Run> runs;
    for (int64_t block = begin; block < end; ++block) {
      V* dw = partial.data() + block * weights;  // [o][e][t]
      for (int64_t unit = units * block / blocks; unit < units * (block + 1) / blocks; ++unit) {
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

template <typename T>
void BackpropKernelCpu(OpKernelContext* ctx, const T* x, const T* dy, const int32_t* conn,
                       T* dkernel, const ChannelSparseGeometry& g) {
  using A = typename Acc<T>::type;
  WithColumnSource<T, A>(x, Correlation::Forward(g), g.batch, [&](const auto& source) {
    KernelGradCpu(ctx, source, dy, conn, dkernel, g);
  });
}

}  // namespace
}  // namespace channel_sparse_cpu

template <typename T>
void ChannelSparseFunctor<CPUDevice, T>::Forward(OpKernelContext* ctx, const T* x, const T* kernel,
                                                 const int32_t* conn, T* y,
                                                 const ChannelSparseGeometry& g,
                                                 const Epilogue<T>& epilogue) {
  channel_sparse_cpu::ForwardCpu(ctx, x, kernel, conn, y, g, epilogue);
}

template <typename T>
void ChannelSparseFunctor<CPUDevice, T>::BackpropInput(OpKernelContext* ctx, const T* dy,
                                                       const T* kernel, const int32_t* conn, T* dx,
                                                       const ChannelSparseGeometry& g) {
  channel_sparse_cpu::BackpropInputCpu(ctx, dy, kernel, conn, dx, g);
}

template <typename T>
void ChannelSparseFunctor<CPUDevice, T>::BackpropKernel(OpKernelContext* ctx, const T* x,
                                                        const T* dy, const int32_t* conn,
                                                        T* dkernel,
                                                        const ChannelSparseGeometry& g) {
  channel_sparse_cpu::BackpropKernelCpu(ctx, x, dy, conn, dkernel, g);
}

template struct ChannelSparseFunctor<CPUDevice, Eigen::half>;
template struct ChannelSparseFunctor<CPUDevice, Eigen::bfloat16>;
template struct ChannelSparseFunctor<CPUDevice, float>;
template struct ChannelSparseFunctor<CPUDevice, double>;

}  // namespace tf_sparseconv
