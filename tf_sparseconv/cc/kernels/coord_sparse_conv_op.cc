// CPU (and, with TF_SPARSECONV_CUDA, GPU) kernels of the coordinate sparse
// convolution proper: SparseConvFeatures (gather -> GEMM per kernel offset ->
// scatter-add along a rulebook), its kernel gradient SparseConvKernelGrad,
// SparseConvRulebookTranspose (for the features gradient and the inverse
// convolution). The rulebook itself (SparseConvRulebook) and TopKSites are in
// coord_sparse_index_op.cc; the GPU kernels in coord_sparse_conv_op_gpu.cu.cc.
//
// CPU scheme of SparseConvFeatures ("output-stationary"). Within an offset the
// pairs are sorted by dst, so the pairs of any range of output rows are one
// contiguous run per offset, found by binary search. Output rows are cut into
// fixed tiles of kTileRows; each tile (in parallel) walks the offsets in
// order: gather the run's src rows into a dense [n, Cin] buffer, one Eigen
// GEMM with kernel[k] ([Cin, Cout]), add the [n, Cout] product into the
// tile's accumulator. The accumulator (tile x Cout) stays in cache and is
// written to the output once. No atomics, no scatter conflicts, and the
// summation order per output row (offset order) does not depend on the
// thread count: bitwise deterministic.
//
// SparseConvKernelGrad: every offset's pairs are cut into fixed chunks (the
// chunk size depends only on P); each chunk accumulates F^T G over gathered
// [n, Cin] / [n, Cout] buffers with Eigen, then the chunks of an offset are
// summed in chunk order.
#define EIGEN_USE_THREADS

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "Eigen/Core"
#include "tf_sparseconv/cc/kernels/coord_sparse_common.h"
#include "tf_sparseconv/cc/kernels/kernel_util.h"

#if TF_SPARSECONV_CUDA
#include "tf_sparseconv/cc/kernels/coord_sparse_launcher.h"
#endif

namespace tf_sparseconv {

namespace {

// Output rows per tile of SparseConvFeatures: a tile's accumulator and
// buffers (tile x max(Cin, Cout) values each) stay in L2 for C <= 256.
constexpr int64_t kTileRows = 256;

template <typename A>
using RowMajor = Eigen::Matrix<A, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// The kernel as arithmetic-type values: the tensor itself for float/double,
// a converted copy for the 16-bit types.
template <typename T, typename A>
const A* KernelAsAcc(const T* kernel, int64_t size, std::vector<A>* copy) {
  if constexpr (std::is_same<T, A>::value) {
    return kernel;
  } else {
    copy->resize(size);
    for (int64_t i = 0; i < size; ++i) (*copy)[i] = static_cast<A>(kernel[i]);
    return copy->data();
  }
}

// Copies row `src` of a [*, c] matrix into `dst` as arithmetic-type values.
template <typename T, typename A>
inline void LoadRow(const T* matrix, int64_t src, int64_t c, A* dst) {
  const T* row = matrix + src * c;
  if constexpr (std::is_same<T, A>::value) {
    std::memcpy(dst, row, sizeof(A) * c);
  } else {
    for (int64_t i = 0; i < c; ++i) dst[i] = static_cast<A>(row[i]);
  }
}

// The multiply-add core of SparseConvFeatures: for `m <= kRows` rows,
//   acc[dst[r]] += src[r] ([cin]) @ w ([cin, cout], row-major),
// with the products of kRows rows x 2 vectors of output channels held in
// registers across the whole cin loop (kRows * 2 independent FMA chains; each
// weight vector is loaded once per input channel and reused by kRows rows),
// then added to the accumulator rows in row order (dst may repeat).
// Vectors are 64 bytes (GCC vector extensions: one AVX-512 register, or two
// AVX2 ones); the columns past the last full pair of vectors run scalar.
template <typename A>
struct MicroKernel {
  static constexpr int kLanes = 64 / sizeof(A);
  // Unaligned (element-aligned), aliasing 64-byte vectors.
  typedef A Vec __attribute__((vector_size(64), aligned(sizeof(A)), may_alias));
#if defined(__AVX512F__)
  static constexpr int kRows = 8;
#else
  static constexpr int kRows = 2;
#endif

  static inline Vec Load(const A* p) { return *reinterpret_cast<const Vec*>(p); }
  static inline void AddTo(A* p, Vec v) { *reinterpret_cast<Vec*>(p) += v; }

  static void Run(const A* const* src, const int32_t* dst, int m, const A* w, int64_t cin,
                  int64_t cout, A* acc) {
    const A* s[kRows];
    for (int r = 0; r < kRows; ++r) s[r] = src[r < m ? r : 0];
    int64_t col = 0;
    for (; col + 2 * kLanes <= cout; col += 2 * kLanes) {
      Vec p0[kRows], p1[kRows];
      for (int r = 0; r < kRows; ++r) p0[r] = p1[r] = Vec{};
      const A* wc = w + col;
      for (int64_t c = 0; c < cin; ++c, wc += cout) {
        const Vec w0 = Load(wc), w1 = Load(wc + kLanes);
        for (int r = 0; r < kRows; ++r) {
          const A a = s[r][c];
          p0[r] += a * w0;
          p1[r] += a * w1;
        }
      }
      for (int r = 0; r < m; ++r) {
        A* out = acc + dst[r] * cout + col;
        AddTo(out, p0[r]);
        AddTo(out + kLanes, p1[r]);
      }
    }
    if (col + kLanes <= cout) {
      Vec p0[kRows];
      for (int r = 0; r < kRows; ++r) p0[r] = Vec{};
      const A* wc = w + col;
      for (int64_t c = 0; c < cin; ++c, wc += cout) {
        const Vec w0 = Load(wc);
        for (int r = 0; r < kRows; ++r) p0[r] += s[r][c] * w0;
      }
      for (int r = 0; r < m; ++r) AddTo(acc + dst[r] * cout + col, p0[r]);
      col += kLanes;
    }
    for (; col < cout; ++col) {
      for (int r = 0; r < m; ++r) {
        A sum = 0;
        for (int64_t c = 0; c < cin; ++c) sum += s[r][c] * w[c * cout + col];
        acc[dst[r] * cout + col] += sum;
      }
    }
  }
};

// First index in [lo, hi) of the interleaved pairs whose dst is >= value
// (dst non-decreasing over the range).
inline int64_t LowerBoundDst(const int32_t* pairs, int64_t lo, int64_t hi, int64_t value) {
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (pairs[2 * mid + 1] < value) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Checks a rulebook against its operands: pair_ptr [K + 1] non-decreasing
// from 0 to P, src in [0, num_src), dst in [0, num_dst) and (when
// `dst_sorted`) non-decreasing within each offset. Parallel over offsets; the
// error reported is the first one in pair order.
Status CheckRulebook(OpKernelContext* ctx, const Tensor& pair_ptr_t, const Tensor& pairs_t,
                     int64_t num_offsets, int64_t num_src, int64_t num_dst, bool dst_sorted,
                     const char* src_what, const char* dst_what) {
  if (pair_ptr_t.dims() != 1 || pair_ptr_t.dim_size(0) != num_offsets + 1) {
    return errors::InvalidArgument("pair_ptr must be int32 [K + 1] = [", num_offsets + 1,
                                   "] (K = kernel offsets), got shape ",
                                   pair_ptr_t.shape().DebugString());
  }
  if (pairs_t.dims() != 2 || pairs_t.dim_size(1) != 2) {
    return errors::InvalidArgument("pairs must be int32 [P, 2] rows (src, dst), got shape ",
                                   pairs_t.shape().DebugString());
  }
  const int64_t num_pairs = pairs_t.dim_size(0);
  const auto ptr = pair_ptr_t.vec<int32_t>();
  if (ptr(0) != 0 || ptr(num_offsets) != num_pairs) {
    return errors::InvalidArgument("pair_ptr must start at 0 and end at the number of pairs (",
                                   num_pairs, "), got ", ptr(0), " and ", ptr(num_offsets));
  }
  for (int64_t k = 0; k < num_offsets; ++k) {
    if (ptr(k + 1) < ptr(k)) {
      return errors::InvalidArgument("pair_ptr must be non-decreasing, but pair_ptr[", k + 1,
                                     "] = ", ptr(k + 1), " < pair_ptr[", k, "] = ", ptr(k));
    }
  }
  const int32_t* pairs = pairs_t.flat<int32_t>().data();
  // First bad pair index per offset (num_pairs: none).
  std::vector<int64_t> bad(num_offsets, num_pairs);
  ParallelFor(ctx, num_offsets,
              std::max<int64_t>(num_pairs / std::max<int64_t>(num_offsets, 1), 1) * 4,
              [&](int64_t k0, int64_t k1) {
                for (int64_t k = k0; k < k1; ++k) {
                  int64_t previous = 0;
                  for (int64_t p = ptr(k); p < ptr(k + 1); ++p) {
                    const int64_t src = pairs[2 * p], dst = pairs[2 * p + 1];
                    if (src < 0 || src >= num_src || dst < 0 || dst >= num_dst ||
                        (dst_sorted && dst < previous)) {
                      bad[k] = p;
                      break;
                    }
                    previous = dst;
                  }
                }
              });
  const int64_t p = *std::min_element(bad.begin(), bad.end());
  if (p == num_pairs) return ::tensorflow::OkStatus();
  const int64_t src = pairs[2 * p], dst = pairs[2 * p + 1];
  if (src < 0 || src >= num_src) {
    return errors::InvalidArgument("pairs[", p, ", 0] = ", src, " is outside [0, ", num_src, ") (",
                                   src_what, ")");
  }
  if (dst < 0 || dst >= num_dst) {
    return errors::InvalidArgument("pairs[", p, ", 1] = ", dst, " is outside [0, ", num_dst, ") (",
                                   dst_what, ")");
  }
  return errors::InvalidArgument("pairs[", p, ", 1] = ", dst,
                                 " breaks the order: dst must be non-decreasing within a kernel "
                                 "offset (pass a rulebook from sparse_conv_rulebook, or its "
                                 "transpose)");
}

// K, the kernel offsets of a rulebook, from pair_ptr [K + 1] (the ops that
// take K from the rulebook rather than from a kernel).
Status NumOffsets(const Tensor& pair_ptr, int64_t* num_offsets) {
  if (pair_ptr.dims() != 1 || pair_ptr.dim_size(0) < 1) {
    return errors::InvalidArgument("pair_ptr must be int32 [K + 1], got shape ",
                                   pair_ptr.shape().DebugString());
  }
  *num_offsets = pair_ptr.dim_size(0) - 1;
  return ::tensorflow::OkStatus();
}

Status ScalarCount(const Tensor& t, const char* name, int64_t* value) {
  if (t.dims() != 0) {
    return errors::InvalidArgument(name, " must be an int32 scalar, got shape ",
                                   t.shape().DebugString());
  }
  *value = t.scalar<int32_t>()();
  if (*value < 0) return errors::InvalidArgument(name, " must be >= 0, got ", *value);
  return ::tensorflow::OkStatus();
}

#if TF_SPARSECONV_CUDA
// The rulebook check of the GPU kernels: only the shape of pairs (its values
// stay in device memory).
Status CheckPairsShape(const Tensor& pairs) {
  if (pairs.dims() != 2 || pairs.dim_size(1) != 2) {
    return errors::InvalidArgument("pairs must be int32 [P, 2], got shape ",
                                   pairs.shape().DebugString());
  }
  return ::tensorflow::OkStatus();
}
#endif

}  // namespace

// ---------------------------------------------------------------------------
// Device functors
//
// The kernel classes below validate the shapes and allocate the outputs, then
// call these: the CPU specialisations are the engines described at the top,
// the GPU ones call the launchers of coord_sparse_conv_op_gpu.cu.cc. The
// rulebook's contents are checked (Check*Rulebook) only on the CPU, where it is
// in host memory; on the GPU only its shapes are.

template <typename Device, typename T>
struct SparseConvFunctor;

template <typename T>
struct SparseConvFunctor<CPUDevice, T> {
  static Status CheckFeaturesRulebook(OpKernelContext* ctx, const Tensor& pair_ptr,
                                      const Tensor& pairs, int64_t num_offsets, int64_t n,
                                      int64_t num_out) {
    return CheckRulebook(ctx, pair_ptr, pairs, num_offsets, n, num_out, true, "a row of features",
                         "an output row: num_out");
  }

  static void Features(OpKernelContext* ctx, const T* features, int64_t /*n*/, const T* kernel,
                       int64_t num_offsets, int64_t cin, int64_t cout, const int32_t* ptr,
                       const int32_t* pairs, int64_t /*num_pairs*/, int64_t num_out, T* out) {
    using A = typename Acc<T>::type;
    if (num_out == 0 || cout == 0) return;
    std::vector<A> kernel_copy;
    const A* w = KernelAsAcc<T, A>(kernel, num_offsets * cin * cout, &kernel_copy);
    const int64_t num_tiles = (num_out + kTileRows - 1) / kTileRows;
    const int64_t num_pairs = ptr[num_offsets];
    const int64_t cost = std::max<int64_t>(
        (num_pairs / num_tiles + 1) * (cin * cout * 2 + cin + cout) + num_offsets * 40, 1000);
    using Kernel = MicroKernel<A>;
    ParallelFor(ctx, num_tiles, cost, [&](int64_t t0, int64_t t1) {
      std::vector<A> acc(kTileRows * cout), converted(Kernel::kRows * std::max<int64_t>(cin, 1));
      for (int64_t tile = t0; tile < t1; ++tile) {
        const int64_t j0 = tile * kTileRows, j1 = std::min(num_out, j0 + kTileRows);
        std::fill(acc.begin(), acc.end(), A(0));
        for (int64_t k = 0; k < num_offsets; ++k) {
          const int64_t lo = LowerBoundDst(pairs, ptr[k], ptr[k + 1], j0);
          const int64_t hi = LowerBoundDst(pairs, lo, ptr[k + 1], j1);
          if (hi == lo) continue;
          const A* wk = w + k * cin * cout;
          for (int64_t s0 = lo; s0 < hi; s0 += Kernel::kRows) {
            const int m = static_cast<int>(std::min<int64_t>(hi - s0, Kernel::kRows));
            const A* src[Kernel::kRows];
            int32_t local[Kernel::kRows];
            for (int r = 0; r < m; ++r) {
              const int64_t row = pairs[2 * (s0 + r)];
              if constexpr (std::is_same<T, A>::value) {
                src[r] = features + row * cin;
              } else {  // 16-bit storage: convert the row first
                A* buffer = converted.data() + r * cin;
                LoadRow<T, A>(features, row, cin, buffer);
                src[r] = buffer;
              }
              local[r] = static_cast<int32_t>(pairs[2 * (s0 + r) + 1] - j0);
            }
            Kernel::Run(src, local, m, wk, cin, cout, acc.data());
          }
        }
        T* o = out + j0 * cout;
        const int64_t count = (j1 - j0) * cout;
        for (int64_t i = 0; i < count; ++i) o[i] = static_cast<T>(acc[i]);
      }
    });
  }

  static Status CheckKernelGradRulebook(OpKernelContext* ctx, const Tensor& pair_ptr,
                                        const Tensor& pairs, int64_t num_offsets, int64_t n,
                                        int64_t m) {
    return CheckRulebook(ctx, pair_ptr, pairs, num_offsets, n, m, false, "a row of features",
                         "a row of grad");
  }

  static void KernelGrad(OpKernelContext* ctx, const T* features, int64_t /*n*/, const T* grad,
                         int64_t /*m*/, int64_t num_offsets, int64_t cin, int64_t cout,
                         const int32_t* ptr, const int32_t* pairs, int64_t /*num_pairs*/, T* out) {
    using A = typename Acc<T>::type;
    const int64_t total = num_offsets * cin * cout;
    if (total == 0) return;
    const int64_t num_pairs = ptr[num_offsets];
    // Fixed chunking (depends on P only): at most ~256 chunks plus one per offset.
    const int64_t chunk = std::max<int64_t>(1024, (num_pairs + 255) / 256);
    struct Chunk {
      int64_t offset, begin, end;
    };
    std::vector<Chunk> chunks;
    std::vector<int64_t> first_chunk(num_offsets + 1, 0);
    for (int64_t k = 0; k < num_offsets; ++k) {
      first_chunk[k] = static_cast<int64_t>(chunks.size());
      for (int64_t b = ptr[k]; b < ptr[k + 1]; b += chunk) {
        chunks.push_back(Chunk{k, b, std::min<int64_t>(b + chunk, ptr[k + 1])});
      }
    }
    first_chunk[num_offsets] = static_cast<int64_t>(chunks.size());
    const int64_t num_chunks = static_cast<int64_t>(chunks.size());
    std::vector<A> partial(num_chunks * cin * cout);
    ParallelFor(ctx, num_chunks, chunk * (cin * cout * 2 + cin + cout),
                [&](int64_t c0, int64_t c1) {
                  std::vector<A> f(kTileRows * std::max<int64_t>(cin, 1)),
                      g(kTileRows * std::max<int64_t>(cout, 1));
                  for (int64_t c = c0; c < c1; ++c) {
                    Eigen::Map<RowMajor<A>> sum(partial.data() + c * cin * cout, cin, cout);
                    sum.setZero();
                    for (int64_t s0 = chunks[c].begin; s0 < chunks[c].end; s0 += kTileRows) {
                      const int64_t m = std::min(chunks[c].end - s0, kTileRows);
                      for (int64_t r = 0; r < m; ++r) {
                        LoadRow<T, A>(features, pairs[2 * (s0 + r)], cin, f.data() + r * cin);
                        LoadRow<T, A>(grad, pairs[2 * (s0 + r) + 1], cout, g.data() + r * cout);
                      }
                      Eigen::Map<const RowMajor<A>> fm(f.data(), m, cin);
                      Eigen::Map<const RowMajor<A>> gm(g.data(), m, cout);
                      sum.noalias() += fm.transpose() * gm;
                    }
                  }
                });
    ParallelFor(ctx, num_offsets, (first_chunk[1] + 1) * cin * cout, [&](int64_t k0, int64_t k1) {
      std::vector<A> sum(cin * cout);
      for (int64_t k = k0; k < k1; ++k) {
        std::fill(sum.begin(), sum.end(), A(0));
        for (int64_t c = first_chunk[k]; c < first_chunk[k + 1]; ++c) {
          const A* p = partial.data() + c * cin * cout;
          for (int64_t i = 0; i < cin * cout; ++i) sum[i] += p[i];
        }
        T* o = out + k * cin * cout;
        for (int64_t i = 0; i < cin * cout; ++i) o[i] = static_cast<T>(sum[i]);
      }
    });
  }
};

#if TF_SPARSECONV_CUDA

template <typename T>
struct SparseConvFunctor<GPUDevice, T> {
  static Status CheckFeaturesRulebook(OpKernelContext*, const Tensor& pair_ptr, const Tensor& pairs,
                                      int64_t num_offsets, int64_t, int64_t) {
    if (pair_ptr.dims() != 1 || pair_ptr.dim_size(0) != num_offsets + 1) {
      return errors::InvalidArgument("pair_ptr must be int32 [K + 1] = [", num_offsets + 1,
                                     "], got shape ", pair_ptr.shape().DebugString());
    }
    return CheckPairsShape(pairs);
  }

  static void Features(OpKernelContext* ctx, const T* features, int64_t n, const T* kernel,
                       int64_t num_offsets, int64_t cin, int64_t cout, const int32_t* ptr,
                       const int32_t* pairs, int64_t num_pairs, int64_t num_out, T* out) {
    const char* err =
        LaunchSparseConvFeaturesGpu(DTypeTraits<T>::kFormat, features, n, kernel, num_offsets, cin,
                                    cout, ptr, pairs, num_pairs, num_out, out, GpuStream(ctx));
    OP_REQUIRES(ctx, err == nullptr, errors::Internal("SparseConvFeatures GPU: ", err));
  }

  static Status CheckKernelGradRulebook(OpKernelContext*, const Tensor&, const Tensor& pairs,
                                        int64_t, int64_t, int64_t) {
    return CheckPairsShape(pairs);
  }

  static void KernelGrad(OpKernelContext* ctx, const T* features, int64_t n, const T* grad,
                         int64_t m, int64_t num_offsets, int64_t cin, int64_t cout,
                         const int32_t* ptr, const int32_t* pairs, int64_t num_pairs, T* out) {
    const char* err =
        LaunchSparseConvKernelGradGpu(DTypeTraits<T>::kFormat, features, n, grad, m, num_offsets,
                                      cin, cout, ptr, pairs, num_pairs, out, GpuStream(ctx));
    OP_REQUIRES(ctx, err == nullptr, errors::Internal("SparseConvKernelGrad GPU: ", err));
  }
};

#endif  // TF_SPARSECONV_CUDA

// ---------------------------------------------------------------------------
// SparseConvFeatures

template <typename Device, typename T>
class SparseConvFeaturesOp : public OpKernel {
 public:
  explicit SparseConvFeaturesOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    using Functor = SparseConvFunctor<Device, T>;
    const Tensor& features_t = ctx->input(0);
    const Tensor& kernel_t = ctx->input(1);
    const Tensor& pair_ptr_t = ctx->input(2);
    const Tensor& pairs_t = ctx->input(3);
    OP_REQUIRES_OK(ctx, CheckRank(features_t, 2, "features must be [N, Cin]"));
    OP_REQUIRES(ctx, kernel_t.dims() == 3,
                errors::InvalidArgument("kernel must be [K, Cin, Cout] (the spatial kernel "
                                        "dims flattened), got shape ",
                                        kernel_t.shape().DebugString()));
    OP_REQUIRES(ctx, kernel_t.dim_size(1) == features_t.dim_size(1),
                errors::InvalidArgument(
                    "kernel has ", kernel_t.dim_size(1), " input channels but features has ",
                    features_t.dim_size(1), " (kernel shape ", kernel_t.shape().DebugString(),
                    ", features shape ", features_t.shape().DebugString(), ")"));
    int64_t num_out = 0;
    OP_REQUIRES_OK(ctx, ScalarCount(ctx->input(4), "num_out", &num_out));
    const int64_t n = features_t.dim_size(0);
    const int64_t num_offsets = kernel_t.dim_size(0);
    const int64_t cin = kernel_t.dim_size(1), cout = kernel_t.dim_size(2);
    OP_REQUIRES(ctx, n <= kInt32Max,
                errors::InvalidArgument("features has more than 2^31 - 1 rows"));
    Tensor* out_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({num_out, cout}), &out_t));
    OP_REQUIRES_OK(
        ctx, Functor::CheckFeaturesRulebook(ctx, pair_ptr_t, pairs_t, num_offsets, n, num_out));
    Functor::Features(ctx, features_t.flat<T>().data(), n, kernel_t.flat<T>().data(), num_offsets,
                      cin, cout, pair_ptr_t.vec<int32_t>().data(), pairs_t.flat<int32_t>().data(),
                      pairs_t.dim_size(0), num_out, out_t->flat<T>().data());
  }
};

// ---------------------------------------------------------------------------
// SparseConvKernelGrad

template <typename Device, typename T>
class SparseConvKernelGradOp : public OpKernel {
 public:
  explicit SparseConvKernelGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    using Functor = SparseConvFunctor<Device, T>;
    const Tensor& features_t = ctx->input(0);
    const Tensor& grad_t = ctx->input(1);
    const Tensor& pair_ptr_t = ctx->input(2);
    const Tensor& pairs_t = ctx->input(3);
    OP_REQUIRES_OK(ctx, CheckRank(features_t, 2, "features must be [N, Cin]"));
    OP_REQUIRES_OK(ctx, CheckRank(grad_t, 2, "grad must be [M, Cout]"));
    int64_t num_offsets = 0;
    OP_REQUIRES_OK(ctx, NumOffsets(pair_ptr_t, &num_offsets));
    const int64_t cin = features_t.dim_size(1), cout = grad_t.dim_size(1);
    Tensor* out_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({num_offsets, cin, cout}), &out_t));
    OP_REQUIRES_OK(ctx,
                   Functor::CheckKernelGradRulebook(ctx, pair_ptr_t, pairs_t, num_offsets,
                                                    features_t.dim_size(0), grad_t.dim_size(0)));
    Functor::KernelGrad(ctx, features_t.flat<T>().data(), features_t.dim_size(0),
                        grad_t.flat<T>().data(), grad_t.dim_size(0), num_offsets, cin, cout,
                        pair_ptr_t.vec<int32_t>().data(), pairs_t.flat<int32_t>().data(),
                        pairs_t.dim_size(0), out_t->flat<T>().data());
  }
};

// ---------------------------------------------------------------------------
// SparseConvRulebookTranspose

class SparseConvRulebookTransposeOp : public OpKernel {
 public:
  explicit SparseConvRulebookTransposeOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& pair_ptr_t = ctx->input(0);
    const Tensor& pairs_t = ctx->input(1);
    int64_t num_src = 0;
    OP_REQUIRES_OK(ctx, ScalarCount(ctx->input(2), "num_src", &num_src));
    int64_t num_offsets = 0;
    OP_REQUIRES_OK(ctx, NumOffsets(pair_ptr_t, &num_offsets));
    OP_REQUIRES_OK(ctx, CheckRulebook(ctx, pair_ptr_t, pairs_t, num_offsets, num_src, kInt32Max,
                                      false, "num_src", "int32"));
    Tensor* out_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, pairs_t.shape(), &out_t));
    const int32_t* ptr = pair_ptr_t.vec<int32_t>().data();
    const int32_t* pairs = pairs_t.flat<int32_t>().data();
    int32_t* out = out_t->flat<int32_t>().data();
    const int64_t num_pairs = pairs_t.dim_size(0);
    ParallelFor(ctx, num_offsets, num_pairs / std::max<int64_t>(num_offsets, 1) * 30 + 100,
                [&](int64_t k0, int64_t k1) {
                  std::vector<int32_t> count;
                  std::vector<uint64_t> keys;
                  for (int64_t k = k0; k < k1; ++k) {
                    const int64_t lo = ptr[k], hi = ptr[k + 1], m = hi - lo;
                    if (m == 0) continue;
                    if (m * 16 >= num_src) {
                      // Counting sort by src: stable, so ties keep dst order.
                      count.assign(num_src + 1, 0);
                      for (int64_t p = lo; p < hi; ++p) ++count[pairs[2 * p] + 1];
                      for (int64_t i = 0; i < num_src; ++i) count[i + 1] += count[i];
                      for (int64_t p = lo; p < hi; ++p) {
                        const int64_t at = lo + count[pairs[2 * p]]++;
                        out[2 * at] = pairs[2 * p + 1];
                        out[2 * at + 1] = pairs[2 * p];
                      }
                    } else {
                      keys.resize(m);
                      for (int64_t p = lo; p < hi; ++p) {
                        keys[p - lo] = (static_cast<uint64_t>(pairs[2 * p]) << 32) |
                                       static_cast<uint64_t>(p - lo);
                      }
                      std::sort(keys.begin(), keys.end());
                      for (int64_t r = 0; r < m; ++r) {
                        const int64_t p = lo + static_cast<int64_t>(keys[r] & 0xffffffffu);
                        out[2 * (lo + r)] = pairs[2 * p + 1];
                        out[2 * (lo + r) + 1] = pairs[2 * p];
                      }
                    }
                  }
                });
  }
};

// SparseConvRulebook and TopKSites are registered in coord_sparse_index_op.cc.
#define TSC_REGISTER(DEV, T)                                                                    \
  REGISTER_KERNEL_BUILDER(Name("TfSparseConv>SparseConvFeatures")                               \
                              .Device(TSC_DEVICE(DEV))                                          \
                              .TypeConstraint<T>("T") TSC_ON_GPU(DEV, .HostMemory("num_out")),  \
                          SparseConvFeaturesOp<DEV##Device, T>);                                \
  REGISTER_KERNEL_BUILDER(                                                                      \
      Name("TfSparseConv>SparseConvKernelGrad").Device(TSC_DEVICE(DEV)).TypeConstraint<T>("T"), \
      SparseConvKernelGradOp<DEV##Device, T>);
TSC_REGISTER_FLOAT_KERNELS(TSC_REGISTER)
#undef TSC_REGISTER

// SparseConvRulebookTranspose is CPU-only (TensorFlow places it on the CPU and
// copies its int32 result).
REGISTER_KERNEL_BUILDER(Name("TfSparseConv>SparseConvRulebookTranspose").Device(TSC_DEVICE(CPU)),
                        SparseConvRulebookTransposeOp);

}  // namespace tf_sparseconv
