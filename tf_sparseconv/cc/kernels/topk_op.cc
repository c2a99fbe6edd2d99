// CPU (and, with TF_SPARSECONV_CUDA, GPU) kernels of the top-k family:
// KWinners / TopKAttention and their gradient ops.
//
// Both forward ops reduce to one selection over x viewed as
// [outer, size, inner] (see TopKGeometry). The CPU kernel ranks the entries
// of each slice by an integer key of their bit pattern (topk_common.h), finds
// the k-th largest key T with a partial selection (a small sorted buffer for
// small k, nth_element otherwise; never a full sort), then writes the winners
// in one ascending pass: keys > T, and the first (k - #keys > T) keys == T.
// Slices of a strided axis (inner > 1) are processed 16 columns at a time so
// that every read of x is a contiguous run.
#define EIGEN_USE_THREADS

#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

#include "tf_sparseconv/cc/kernels/kernel_util.h"
#include "tf_sparseconv/cc/kernels/topk_common.h"

#if TF_SPARSECONV_CUDA
#include "tf_sparseconv/cc/kernels/topk_launcher.h"
#endif

namespace tf_sparseconv {

namespace {

constexpr int64_t kColumnChunk = 16;  // columns of a strided axis per task
constexpr int64_t kSortBelow = 24;    // radix select sorts this few keys

// Radix select: the k-th largest of keys[0, n) (1 <= k <= n), how many keys
// are strictly larger and how many are equal to it. One 256-bin histogram
// pass per byte of the key, most significant first; after each pass only the
// keys in the bin holding the k-th largest are kept (compacted into
// `scratch`, room for n keys), so the passes after the first touch few keys.
// O(n), no sort, no data-dependent branches in the inner loops.
template <typename U>
U KthLargest(const U* keys, int64_t n, int64_t k, U* scratch, int64_t* num_greater,
             int64_t* num_equal) {
  constexpr int kKeyBits = 8 * sizeof(U);
  const U* src = keys;
  int64_t m = n;
  U prefix = 0;
  int64_t greater = 0;
  uint32_t hist[256];
  for (int shift = kKeyBits - 8;; shift -= 8) {
    std::memset(hist, 0, sizeof(hist));
    for (int64_t i = 0; i < m; ++i) ++hist[(src[i] >> shift) & 0xFF];
    int digit = 255;
    int64_t above = 0;
    while (above + hist[digit] < k) above += hist[digit--];
    greater += above;
    k -= above;
    prefix |= static_cast<U>(digit) << shift;
    if (shift == 0) {
      *num_equal = hist[digit];
      break;
    }
    int64_t w = 0;
    for (int64_t i = 0; i < m; ++i) {
      const U key = src[i];
      scratch[w] = key;
      w += static_cast<int>((key >> shift) & 0xFF) == digit;
    }
    m = w;
    if (m <= kSortBelow) {
      // Few candidates left: sort them (descending) instead of more passes.
      for (int64_t i = 1; i < m; ++i) {
        const U key = scratch[i];
        int64_t j = i;
        for (; j > 0 && scratch[j - 1] < key; --j) scratch[j] = scratch[j - 1];
        scratch[j] = key;
      }
      const U t = scratch[k - 1];
      int64_t equal = 0;
      for (int64_t i = 0; i < m; ++i) {
        greater += scratch[i] > t;
        equal += scratch[i] == t;
      }
      *num_greater = greater;
      *num_equal = equal;
      return t;
    }
    src = scratch;
  }
  *num_greater = greater;
  return prefix;
}

// Per-column outcome of the selection: winners are the keys > threshold and
// the first `equal_left` keys == threshold (by position).
template <typename U>
struct ColumnSelection {
  U threshold;
  int64_t equal_left;
  bool all_equal_win;  // every key == threshold wins: a winner is key >= threshold
};

template <typename U>
ColumnSelection<U> SelectColumn(const U* keys, int64_t n, int64_t k, U* scratch) {
  if (k == n) return {U(0), n, true};  // everything wins
  int64_t num_greater, num_equal;
  const U t = KthLargest(keys, n, k, scratch, &num_greater, &num_equal);
  return {t, k - num_greater, k - num_greater == num_equal};
}

// The selection on the CPU. x, y: [outer, size, inner] (y may alias x: each
// entry is read before it is written); indices: [outer, k, inner].
template <typename U, ScoreMode kMode>
void TopKMaskCpu(OpKernelContext* ctx, const U* x, U* y, int32_t* indices, const TopKGeometry& g,
                 FormatBits<U> bits) {
  const int64_t n = g.size, k = g.k, inner = g.inner;
  if (g.outer * n * inner == 0) return;
  if (k == 0) {  // only when size == 0, handled above; kept for clarity
    return;
  }
  const int64_t chunk = std::min(inner, kColumnChunk);
  const int64_t chunks_per_row = (inner + chunk - 1) / chunk;
  const int64_t units = g.outer * chunks_per_row;
  const int64_t cost = n * chunk * 8;
  auto work = [&](int64_t begin, int64_t end) {
    std::vector<U> keys(static_cast<size_t>(n * chunk));
    std::vector<U> scratch(static_cast<size_t>(n));
    ColumnSelection<U> sel[kColumnChunk];
    int64_t winners[kColumnChunk];
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t o = unit / chunks_per_row;
      const int64_t c0 = (unit % chunks_per_row) * chunk;
      const int64_t cw = std::min(chunk, inner - c0);
      const U* xs = x + o * n * inner + c0;
      U* ys = y + o * n * inner + c0;
      int32_t* is = indices + o * k * inner + c0;
      bool fast = true;
      if (inner == 1) {
        for (int64_t i = 0; i < n; ++i) keys[i] = OrderedKey(xs[i], bits, kMode);
        sel[0] = SelectColumn(keys.data(), n, k, scratch.data());
        fast = sel[0].all_equal_win;
      } else {
        // Keys, transposed to one contiguous run per column.
        for (int64_t i = 0; i < n; ++i) {
          const U* row = xs + i * inner;
          for (int64_t j = 0; j < cw; ++j) {
            keys[j * n + i] = OrderedKey(row[j], bits, kMode);
          }
        }
        for (int64_t j = 0; j < cw; ++j) {
          sel[j] = SelectColumn(keys.data() + j * n, n, k, scratch.data());
          fast = fast && sel[j].all_equal_win;
        }
      }
      for (int64_t j = 0; j < cw; ++j) winners[j] = 0;
      auto record = [&](int64_t i, int64_t j, U v) {
        // A winner: its position (or -1 if mode=relu drops it); y's value.
        const bool survives = kMode != ScoreMode::kRelu || IsPositive(v, bits);
        is[winners[j]++ * inner + j] = survives ? static_cast<int32_t>(i) : -1;
        return survives ? v : U(0);
      };
      if (fast && inner == 1) {
        // y: one vectorisable select; then the ascending winner positions.
        const U t = sel[0].threshold;
        for (int64_t i = 0; i < n; ++i) {
          const U v = xs[i];
          const bool keep = keys[i] >= t && (kMode != ScoreMode::kRelu || IsPositive(v, bits));
          ys[i] = keep ? v : U(0);
        }
        for (int64_t i = 0; i < n; ++i) {
          if (keys[i] >= t) {
            is[winners[0]++] =
                (kMode != ScoreMode::kRelu || ys[i] != 0) ? static_cast<int32_t>(i) : -1;
          }
        }
      } else if (fast) {
        for (int64_t i = 0; i < n; ++i) {
          const U* row = xs + i * inner;
          U* out = ys + i * inner;
          for (int64_t j = 0; j < cw; ++j) {
            const U v = row[j];
            out[j] = keys[j * n + i] >= sel[j].threshold ? record(i, j, v) : U(0);
          }
        }
      } else {
        // Ties at the threshold: the first equal_left equal keys win.
        for (int64_t i = 0; i < n; ++i) {
          const U* row = xs + i * inner;
          U* out = ys + i * inner;
          for (int64_t j = 0; j < cw; ++j) {
            const U key = keys[j * n + i];
            bool win = key > sel[j].threshold;
            if (key == sel[j].threshold && sel[j].equal_left > 0) {
              --sel[j].equal_left;
              win = true;
            }
            const U v = row[j];
            out[j] = win ? record(i, j, v) : U(0);
          }
        }
      }
    }
  };
  ParallelFor(ctx, units, cost, work);
}

template <typename U>
void TopKMaskCpu(OpKernelContext* ctx, const U* x, U* y, int32_t* indices, const TopKGeometry& g,
                 FormatBits<U> bits, ScoreMode mode) {
  switch (mode) {
    case ScoreMode::kValue:
      return TopKMaskCpu<U, ScoreMode::kValue>(ctx, x, y, indices, g, bits);
    case ScoreMode::kAbs:
      return TopKMaskCpu<U, ScoreMode::kAbs>(ctx, x, y, indices, g, bits);
    case ScoreMode::kRelu:
      return TopKMaskCpu<U, ScoreMode::kRelu>(ctx, x, y, indices, g, bits);
  }
}

// dx = dy at the winners, 0 elsewhere (dx may alias dy: the winners' values
// are saved before the slice is zeroed). Entries of `indices` must be in
// [0, size) or -1 (a dropped winner); returns false otherwise, having touched
// nothing out of range.
template <typename U>
bool TopKMaskGradCpu(OpKernelContext* ctx, const U* dy, const int32_t* indices, U* dx,
                     const TopKGeometry& g) {
  const int64_t n = g.size, k = g.k, inner = g.inner;
  if (g.outer * n * inner == 0) return true;
  std::atomic<bool> ok(true);
  const int64_t chunk = std::min(inner, kColumnChunk);
  const int64_t chunks_per_row = (inner + chunk - 1) / chunk;
  auto work = [&](int64_t begin, int64_t end) {
    std::vector<U> saved(static_cast<size_t>(k * chunk));
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t o = unit / chunks_per_row;
      const int64_t c0 = (unit % chunks_per_row) * chunk;
      const int64_t cw = std::min(chunk, inner - c0);
      const U* dys = dy + o * n * inner + c0;
      U* dxs = dx + o * n * inner + c0;
      const int32_t* is = indices + o * k * inner + c0;
      bool unit_ok = true;
      for (int64_t w = 0; w < k; ++w) {
        for (int64_t j = 0; j < cw; ++j) {
          const int64_t i = is[w * inner + j];
          unit_ok = unit_ok && i >= -1 && i < n;
          saved[w * chunk + j] = (i >= 0 && i < n) ? dys[i * inner + j] : U(0);
        }
      }
      if (inner == cw) {
        std::memset(dxs, 0, n * inner * sizeof(U));
      } else {
        for (int64_t i = 0; i < n; ++i) {
          std::memset(dxs + i * inner, 0, cw * sizeof(U));
        }
      }
      for (int64_t w = 0; w < k; ++w) {
        for (int64_t j = 0; j < cw; ++j) {
          const int64_t i = is[w * inner + j];
          if (i >= 0 && i < n) dxs[i * inner + j] = saved[w * chunk + j];
        }
      }
      if (!unit_ok) ok.store(false, std::memory_order_relaxed);
    }
  };
  ParallelFor(ctx, g.outer * chunks_per_row, n * chunk + 8 * k * chunk, work);
  return ok.load();
}

// Reads the scalar k input and checks k >= 1.
::tensorflow::Status ReadK(OpKernelContext* ctx, int64_t* k) {
  const Tensor& k_tensor = ctx->input(1);
  if (!::tensorflow::TensorShapeUtils::IsScalar(k_tensor.shape())) {
    return errors::InvalidArgument("k must be a scalar, got shape ",
                                   k_tensor.shape().DebugString());
  }
  *k = k_tensor.scalar<int32_t>()();
  if (*k < 1) return errors::InvalidArgument("k must be >= 1, got ", *k);
  return ::tensorflow::OkStatus();
}

// The output that has the shape of input `input`: on the CPU the input's
// buffer is reused when nothing else holds it (the kernels allow aliasing).
template <typename Device>
::tensorflow::Status SameShapeOutput(OpKernelContext* ctx, int input, Tensor** out) {
  if (std::is_same<Device, Eigen::ThreadPoolDevice>::value) {
    return ctx->forward_input_or_allocate_output({input}, 0, ctx->input(input).shape(), out);
  }
  return ctx->allocate_output(0, ctx->input(input).shape(), out);
}

// [outer, size, inner] of x for a selection along `axis`.
TopKGeometry AxisGeometry(const TensorShape& shape, int axis) {
  TopKGeometry g{1, shape.dim_size(axis), 1, 0};
  for (int d = 0; d < axis; ++d) g.outer *= shape.dim_size(d);
  for (int d = axis + 1; d < shape.dims(); ++d) g.inner *= shape.dim_size(d);
  return g;
}

// [outer, size, inner] of x [B, *spatial, C] for top-k attention.
TopKGeometry AttentionGeometry(const TensorShape& shape, bool per_sample) {
  const int rank = shape.dims();
  TopKGeometry g{shape.dim_size(0), 1, shape.dim_size(rank - 1), 0};
  for (int d = 1; d < rank - 1; ++d) g.size *= shape.dim_size(d);
  if (per_sample) {
    g.size *= g.inner;
    g.inner = 1;
  }
  return g;
}

}  // namespace

// Device-specific halves of the kernels.
template <typename Device, typename T>
struct TopKMaskFunctor;
template <typename Device, typename T>
struct TopKMaskGradFunctor;

template <typename T>
struct TopKMaskFunctor<CPUDevice, T> {
  void operator()(OpKernelContext* ctx, const Tensor& x, Tensor* y, Tensor* indices,
                  const TopKGeometry& g, ScoreMode mode) {
    using U = typename DTypeTraits<T>::U;
    TopKMaskCpu<U>(ctx, reinterpret_cast<const U*>(x.flat<T>().data()),
                   reinterpret_cast<U*>(y->flat<T>().data()), indices->flat<int32_t>().data(), g,
                   DTypeTraits<T>::Bits(), mode);
  }
};

template <typename T>
struct TopKMaskGradFunctor<CPUDevice, T> {
  void operator()(OpKernelContext* ctx, const Tensor& dy, const Tensor& indices, Tensor* dx,
                  const TopKGeometry& g) {
    using U = typename DTypeTraits<T>::U;
    const bool ok = TopKMaskGradCpu<U>(ctx, reinterpret_cast<const U*>(dy.flat<T>().data()),
                                       indices.flat<int32_t>().data(),
                                       reinterpret_cast<U*>(dx->flat<T>().data()), g);
    OP_REQUIRES(ctx, ok,
                errors::InvalidArgument("indices must be in [-1, ", g.size,
                                        ") (positions along the selection)"));
  }
};

#if TF_SPARSECONV_CUDA

template <typename T>
struct TopKMaskFunctor<GPUDevice, T> {
  void operator()(OpKernelContext* ctx, const Tensor& x, Tensor* y, Tensor* indices,
                  const TopKGeometry& g, ScoreMode mode) {
    const char* err =
        LaunchTopKMaskGpu(DTypeTraits<T>::kFormat, mode, x.flat<T>().data(), y->flat<T>().data(),
                          indices->flat<int32_t>().data(), g, GpuStream(ctx));
    OP_REQUIRES(ctx, err == nullptr, errors::Internal("top-k GPU kernel failed: ", err));
  }
};

template <typename T>
struct TopKMaskGradFunctor<GPUDevice, T> {
  void operator()(OpKernelContext* ctx, const Tensor& dy, const Tensor& indices, Tensor* dx,
                  const TopKGeometry& g) {
    // Indices come from the forward op on the same device; the GPU kernel
    // skips entries outside [0, size) rather than reading out of range.
    const char* err =
        LaunchTopKMaskGradGpu(sizeof(T), dy.flat<T>().data(), indices.flat<int32_t>().data(),
                              dx->flat<T>().data(), g, GpuStream(ctx));
    OP_REQUIRES(ctx, err == nullptr, errors::Internal("top-k gradient GPU kernel failed: ", err));
  }
};
#endif  // TF_SPARSECONV_CUDA

// The kernels' common tail: y (x's shape, input 0's buffer where it may be
// forwarded) and the [.., k, ..] indices allocated, then the functor.
template <typename Device, typename T>
void AllocateAndMask(OpKernelContext* ctx, const TensorShape& indices_shape, const TopKGeometry& g,
                     ScoreMode mode) {
  Tensor* y = nullptr;
  Tensor* indices = nullptr;
  OP_REQUIRES_OK(ctx, SameShapeOutput<Device>(ctx, 0, &y));
  OP_REQUIRES_OK(ctx, ctx->allocate_output(1, indices_shape, &indices));
  TopKMaskFunctor<Device, T>()(ctx, ctx->input(0), y, indices, g, mode);
}

// The gradients' tail: dx (grad's shape) from grad (input 0) and indices
// (input 1).
template <typename Device, typename T>
void AllocateAndMaskGrad(OpKernelContext* ctx, const TopKGeometry& g) {
  Tensor* dx = nullptr;
  OP_REQUIRES_OK(ctx, SameShapeOutput<Device>(ctx, 0, &dx));
  TopKMaskGradFunctor<Device, T>()(ctx, ctx->input(0), ctx->input(1), dx, g);
}

// KWinners and its gradient: the `axis` attribute.
class AxisOpBase : public OpKernel {
 public:
  explicit AxisOpBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("axis", &axis_));
  }

 protected:
  int axis_;
};

template <typename Device, typename T>
class KWinnersOp : public AxisOpBase {
 public:
  explicit KWinnersOp(OpKernelConstruction* ctx) : AxisOpBase(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const int rank = x.dims();
    OP_REQUIRES(
        ctx, rank >= 1,
        errors::InvalidArgument("x must have rank >= 1, got shape ", x.shape().DebugString()));
    OP_REQUIRES(ctx, axis_ >= -rank && axis_ < rank,
                errors::InvalidArgument("axis must be in [", -rank, ", ", rank, ") for x of shape ",
                                        x.shape().DebugString(), ", got ", axis_));
    int64_t k;
    OP_REQUIRES_OK(ctx, ReadK(ctx, &k));
    const int axis = axis_ < 0 ? axis_ + rank : axis_;
    OP_REQUIRES(ctx, x.dim_size(axis) <= std::numeric_limits<int32_t>::max(),
                errors::InvalidArgument("x is too long along axis ", axis));
    TopKGeometry g = AxisGeometry(x.shape(), axis);
    g.k = std::min<int64_t>(k, g.size);
    TensorShape indices_shape = x.shape();
    indices_shape.set_dim(axis, g.k);
    AllocateAndMask<Device, T>(ctx, indices_shape, g, ScoreMode::kValue);
  }
};

template <typename Device, typename T>
class KWinnersGradOp : public AxisOpBase {
 public:
  explicit KWinnersGradOp(OpKernelConstruction* ctx) : AxisOpBase(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy = ctx->input(0);
    const Tensor& indices = ctx->input(1);
    const int rank = dy.dims();
    OP_REQUIRES(ctx, rank >= 1 && axis_ >= -rank && axis_ < rank,
                errors::InvalidArgument("axis ", axis_, " is out of range for grad of shape ",
                                        dy.shape().DebugString()));
    const int axis = axis_ < 0 ? axis_ + rank : axis_;
    bool match = indices.dims() == rank && indices.dim_size(axis) <= dy.dim_size(axis);
    for (int d = 0; match && d < rank; ++d) {
      match = d == axis || indices.dim_size(d) == dy.dim_size(d);
    }
    OP_REQUIRES(ctx, match,
                errors::InvalidArgument("indices must have the shape of grad with axis ", axis,
                                        " of length <= ", dy.dim_size(axis), "; got indices ",
                                        indices.shape().DebugString(), " and grad ",
                                        dy.shape().DebugString()));
    TopKGeometry g = AxisGeometry(dy.shape(), axis);
    g.k = indices.dim_size(axis);
    AllocateAndMaskGrad<Device, T>(ctx, g);
  }
};

template <typename Device, typename T>
class TopKAttentionOp : public OpKernel {
 public:
  explicit TopKAttentionOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    bool relu = false;
    OP_REQUIRES_OK(ctx, StringAttrIs(ctx, "mode", "relu", &relu));
    OP_REQUIRES_OK(ctx, StringAttrIs(ctx, "per", "sample", &per_sample_));
    mode_ = relu ? ScoreMode::kRelu : ScoreMode::kAbs;
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    OP_REQUIRES(ctx, x.dims() >= 3 && x.dims() <= 5,
                errors::InvalidArgument("x must be [B, *spatial, C] with 1 to 3 spatial dims, got "
                                        "shape ",
                                        x.shape().DebugString()));
    int64_t k;
    OP_REQUIRES_OK(ctx, ReadK(ctx, &k));
    TopKGeometry g = AttentionGeometry(x.shape(), per_sample_);
    OP_REQUIRES(
        ctx, g.size <= std::numeric_limits<int32_t>::max(),
        errors::InvalidArgument("x has too many positions per sample: ", x.shape().DebugString()));
    g.k = std::min<int64_t>(k, g.size);
    const TensorShape indices_shape =
        per_sample_ ? TensorShape({g.outer, g.k}) : TensorShape({g.outer, g.k, g.inner});
    AllocateAndMask<Device, T>(ctx, indices_shape, g, mode_);
  }

 private:
  ScoreMode mode_;
  bool per_sample_;
};

template <typename Device, typename T>
class TopKAttentionGradOp : public OpKernel {
 public:
  explicit TopKAttentionGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, StringAttrIs(ctx, "per", "sample", &per_sample_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy = ctx->input(0);
    const Tensor& indices = ctx->input(1);
    OP_REQUIRES(ctx, dy.dims() >= 3 && dy.dims() <= 5,
                errors::InvalidArgument("grad must be [B, *spatial, C] with 1 to 3 spatial dims, "
                                        "got shape ",
                                        dy.shape().DebugString()));
    TopKGeometry g = AttentionGeometry(dy.shape(), per_sample_);
    const bool match =
        per_sample_
            ? indices.dims() == 2 && indices.dim_size(0) == g.outer && indices.dim_size(1) <= g.size
            : indices.dims() == 3 && indices.dim_size(0) == g.outer &&
                  indices.dim_size(1) <= g.size && indices.dim_size(2) == g.inner;
    OP_REQUIRES(ctx, match,
                errors::InvalidArgument(
                    "indices ", indices.shape().DebugString(), " do not match grad ",
                    dy.shape().DebugString(),
                    per_sample_ ? " (per='sample': [B, k])" : " (per='channel': [B, k, C])"));
    g.k = indices.dim_size(1);
    AllocateAndMaskGrad<Device, T>(ctx, g);
  }

 private:
  bool per_sample_;
};

#define TSC_REGISTER(DEV, T)                                                                 \
  REGISTER_KERNEL_BUILDER(Name("TfSparseConv>KWinners")                                      \
                              .Device(TSC_DEVICE(DEV))                                       \
                              .HostMemory("k")                                               \
                              .TypeConstraint<T>("T"),                                       \
                          KWinnersOp<DEV##Device, T>);                                       \
  REGISTER_KERNEL_BUILDER(                                                                   \
      Name("TfSparseConv>KWinnersGrad").Device(TSC_DEVICE(DEV)).TypeConstraint<T>("T"),      \
      KWinnersGradOp<DEV##Device, T>);                                                       \
  REGISTER_KERNEL_BUILDER(Name("TfSparseConv>TopKAttention")                                 \
                              .Device(TSC_DEVICE(DEV))                                       \
                              .HostMemory("k")                                               \
                              .TypeConstraint<T>("T"),                                       \
                          TopKAttentionOp<DEV##Device, T>);                                  \
  REGISTER_KERNEL_BUILDER(                                                                   \
      Name("TfSparseConv>TopKAttentionGrad").Device(TSC_DEVICE(DEV)).TypeConstraint<T>("T"), \
      TopKAttentionGradOp<DEV##Device, T>);
TSC_REGISTER_FLOAT_KERNELS(TSC_REGISTER)
#undef TSC_REGISTER

}  // namespace tf_sparseconv
