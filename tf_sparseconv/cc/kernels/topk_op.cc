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
#include <vector>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/lib/core/threadpool.h"
#include "tf_sparseconv/cc/kernels/topk_common.h"

#if TF_SPARSECONV_CUDA
#include "tf_sparseconv/cc/kernels/topk_launcher.h"
#include "xla/stream_executor/stream.h"
#endif

namespace tf_sparseconv {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
namespace errors = ::tensorflow::errors;

// Storage type and format of each supported dtype.
template <typename T>
struct DTypeTraits;
template <>
struct DTypeTraits<Eigen::half> {
  using U = uint16_t;
  static constexpr FloatFormat kFormat = FloatFormat::kHalf;
  static FormatBits<U> Bits() { return HalfBits(); }
};
template <>
struct DTypeTraits<Eigen::bfloat16> {
  using U = uint16_t;
  static constexpr FloatFormat kFormat = FloatFormat::kBFloat16;
  static FormatBits<U> Bits() { return BFloat16Bits(); }
};
template <>
struct DTypeTraits<float> {
  using U = uint32_t;
  static constexpr FloatFormat kFormat = FloatFormat::kFloat;
  static FormatBits<U> Bits() { return FloatBits(); }
};
template <>
struct DTypeTraits<double> {
  using U = uint64_t;
  static constexpr FloatFormat kFormat = FloatFormat::kDouble;
  static FormatBits<U> Bits() { return DoubleBits(); }
};

namespace {

constexpr int64_t kColumnChunk = 16;   // columns of a strided axis per task
constexpr int64_t kSmallK = 32;        // insertion buffer up to this k

void ParallelFor(OpKernelContext* ctx, int64_t total, int64_t cost_per_unit,
                 const std::function<void(int64_t, int64_t)>& fn) {
  if (total <= 0) return;
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  workers->ParallelFor(total, cost_per_unit, fn);
}

// Finds the k-th largest of keys[0, n) (1 <= k < n) and how many keys are
// strictly larger. `scratch` has room for n keys.
template <typename U>
void KthLargest(const U* keys, int64_t n, int64_t k, U* scratch, U* threshold,
                int64_t* num_greater) {
  U t;
  if (k <= kSmallK) {
    // scratch[0, k) holds the k largest keys seen so far, descending.
    for (int64_t i = 0; i < k; ++i) {
      const U key = keys[i];
      int64_t j = i;
      while (j > 0 && scratch[j - 1] < key) {
        scratch[j] = scratch[j - 1];
        --j;
      }
      scratch[j] = key;
    }
    for (int64_t i = k; i < n; ++i) {
      const U key = keys[i];
      if (key <= scratch[k - 1]) continue;
      int64_t j = k - 1;
      while (j > 0 && scratch[j - 1] < key) {
        scratch[j] = scratch[j - 1];
        --j;
      }
      scratch[j] = key;
    }
    t = scratch[k - 1];
  } else {
    std::copy(keys, keys + n, scratch);
    std::nth_element(scratch, scratch + (k - 1), scratch + n, std::greater<U>());
    t = scratch[k - 1];
  }
  int64_t greater = 0;
  for (int64_t i = 0; i < k; ++i) greater += scratch[i] > t;
  *threshold = t;
  *num_greater = greater;
}

// The selection on the CPU. x, y: [outer, size, inner]; indices:
// [outer, k, inner].
template <typename U>
void TopKMaskCpu(OpKernelContext* ctx, const U* x, U* y, int32_t* indices,
                 const TopKGeometry& g, FormatBits<U> bits, ScoreMode mode) {
  const int64_t n = g.size, k = g.k, inner = g.inner;
  if (g.outer * n * inner == 0) return;
  const int64_t chunk = std::min(inner, kColumnChunk);
  const int64_t chunks_per_row = (inner + chunk - 1) / chunk;
  const int64_t units = g.outer * chunks_per_row;
  const int64_t cost = n * chunk * 12;
  auto work = [&](int64_t begin, int64_t end) {
    std::vector<U> keys(static_cast<size_t>(n * chunk));
    std::vector<U> scratch(static_cast<size_t>(n));
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t o = unit / chunks_per_row;
      const int64_t c0 = (unit % chunks_per_row) * chunk;
      const int64_t cw = std::min(chunk, inner - c0);
      const U* xs = x + o * n * inner + c0;
      U* ys = y + o * n * inner + c0;
      int32_t* is = indices + o * k * inner + c0;
      // Keys, transposed to one contiguous run per column; zeroed output.
      if (inner == 1) {
        for (int64_t i = 0; i < n; ++i) keys[i] = OrderedKey(xs[i], bits, mode);
        std::memset(ys, 0, n * sizeof(U));
      } else {
        for (int64_t i = 0; i < n; ++i) {
          const U* row = xs + i * inner;
          for (int64_t j = 0; j < cw; ++j) {
            keys[j * n + i] = OrderedKey(row[j], bits, mode);
          }
          std::memset(ys + i * inner, 0, cw * sizeof(U));
        }
      }
      for (int64_t j = 0; j < cw; ++j) {
        const U* kc = keys.data() + j * n;
        U threshold = 0;
        int64_t num_greater = 0;
        if (k < n) {
          KthLargest(kc, n, k, scratch.data(), &threshold, &num_greater);
        }
        int64_t equal_left = k - num_greater;
        int64_t w = 0;
        for (int64_t i = 0; i < n && w < k; ++i) {
          const U key = kc[i];
          if (key < threshold) continue;
          if (key == threshold) {
            if (equal_left == 0) continue;
            --equal_left;
          }
          const U v = xs[i * inner + j];
          if (mode == ScoreMode::kRelu && !IsPositive(v, bits)) {
            is[w * inner + j] = -1;
          } else {
            is[w * inner + j] = static_cast<int32_t>(i);
            ys[i * inner + j] = v;
          }
          ++w;
        }
      }
    }
  };
  ParallelFor(ctx, units, cost, work);
}

// dx = 0 except at the winners, where dx = dy. Returns false if an index is
// out of [-1, size) (nothing out of range is touched).
template <typename U>
bool TopKMaskGradCpu(OpKernelContext* ctx, const U* dy, const int32_t* indices,
                     U* dx, const TopKGeometry& g) {
  const int64_t n = g.size, k = g.k, inner = g.inner;
  std::atomic<bool> ok(true);
  auto work = [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      U* dxs = dx + o * n * inner;
      const U* dys = dy + o * n * inner;
      const int32_t* is = indices + o * k * inner;
      std::memset(dxs, 0, n * inner * sizeof(U));
      for (int64_t w = 0; w < k; ++w) {
        for (int64_t c = 0; c < inner; ++c) {
          const int64_t i = is[w * inner + c];
          if (i < 0) {
            if (i != -1) ok.store(false, std::memory_order_relaxed);
            continue;
          }
          if (i >= n) {
            ok.store(false, std::memory_order_relaxed);
            continue;
          }
          dxs[i * inner + c] = dys[i * inner + c];
        }
      }
    }
  };
  ParallelFor(ctx, g.outer, n * inner + 4 * k * inner, work);
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

using CPUDevice = Eigen::ThreadPoolDevice;

template <typename T>
struct TopKMaskFunctor<CPUDevice, T> {
  void operator()(OpKernelContext* ctx, const Tensor& x, Tensor* y,
                  Tensor* indices, const TopKGeometry& g, ScoreMode mode) {
    using U = typename DTypeTraits<T>::U;
    TopKMaskCpu<U>(ctx, reinterpret_cast<const U*>(x.flat<T>().data()),
                   reinterpret_cast<U*>(y->flat<T>().data()),
                   indices->flat<int32_t>().data(), g, DTypeTraits<T>::Bits(),
                   mode);
  }
};

template <typename T>
struct TopKMaskGradFunctor<CPUDevice, T> {
  void operator()(OpKernelContext* ctx, const Tensor& dy,
                  const Tensor& indices, Tensor* dx, const TopKGeometry& g) {
    using U = typename DTypeTraits<T>::U;
    const bool ok = TopKMaskGradCpu<U>(
        ctx, reinterpret_cast<const U*>(dy.flat<T>().data()),
        indices.flat<int32_t>().data(), reinterpret_cast<U*>(dx->flat<T>().data()),
        g);
    OP_REQUIRES(ctx, ok,
                errors::InvalidArgument("indices must be in [-1, ", g.size,
                                        ") (positions along the selection)"));
  }
};

#if TF_SPARSECONV_CUDA
using GPUDevice = Eigen::GpuDevice;

void* GpuStream(OpKernelContext* ctx) {
  return ctx->op_device_context()->stream()->platform_specific_handle().stream;
}

template <typename T>
struct TopKMaskFunctor<GPUDevice, T> {
  void operator()(OpKernelContext* ctx, const Tensor& x, Tensor* y,
                  Tensor* indices, const TopKGeometry& g, ScoreMode mode) {
    const char* err = LaunchTopKMaskGpu(
        DTypeTraits<T>::kFormat, mode, x.flat<T>().data(), y->flat<T>().data(),
        indices->flat<int32_t>().data(), g, GpuStream(ctx));
    OP_REQUIRES(ctx, err == nullptr,
                errors::Internal("top-k GPU kernel failed: ", err));
  }
};

template <typename T>
struct TopKMaskGradFunctor<GPUDevice, T> {
  void operator()(OpKernelContext* ctx, const Tensor& dy,
                  const Tensor& indices, Tensor* dx, const TopKGeometry& g) {
    // Indices come from the forward op on the same device; the GPU kernel
    // skips entries outside [0, size) rather than reading out of range.
    const char* err = LaunchTopKMaskGradGpu(
        sizeof(T), dy.flat<T>().data(), indices.flat<int32_t>().data(),
        dx->flat<T>().data(), g, GpuStream(ctx));
    OP_REQUIRES(ctx, err == nullptr,
                errors::Internal("top-k gradient GPU kernel failed: ", err));
  }
};
#endif  // TF_SPARSECONV_CUDA

template <typename Device, typename T>
class KWinnersOp : public OpKernel {
 public:
  explicit KWinnersOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("axis", &axis_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const int rank = x.dims();
    OP_REQUIRES(ctx, rank >= 1,
                errors::InvalidArgument("x must have rank >= 1, got shape ",
                                        x.shape().DebugString()));
    OP_REQUIRES(ctx, axis_ >= -rank && axis_ < rank,
                errors::InvalidArgument("axis must be in [", -rank, ", ", rank,
                                        ") for x of shape ",
                                        x.shape().DebugString(), ", got ",
                                        axis_));
    int64_t k;
    OP_REQUIRES_OK(ctx, ReadK(ctx, &k));
    const int axis = axis_ < 0 ? axis_ + rank : axis_;
    OP_REQUIRES(ctx, x.dim_size(axis) <= std::numeric_limits<int32_t>::max(),
                errors::InvalidArgument("x is too long along axis ", axis));
    TopKGeometry g = AxisGeometry(x.shape(), axis);
    g.k = std::min<int64_t>(k, g.size);
    TensorShape indices_shape = x.shape();
    indices_shape.set_dim(axis, g.k);
    Tensor* y = nullptr;
    Tensor* indices = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &y));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, indices_shape, &indices));
    TopKMaskFunctor<Device, T>()(ctx, x, y, indices, g, ScoreMode::kValue);
  }

 private:
  int axis_;
};

template <typename Device, typename T>
class KWinnersGradOp : public OpKernel {
 public:
  explicit KWinnersGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("axis", &axis_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy = ctx->input(0);
    const Tensor& indices = ctx->input(1);
    const int rank = dy.dims();
    OP_REQUIRES(ctx, rank >= 1 && axis_ >= -rank && axis_ < rank,
                errors::InvalidArgument("axis ", axis_,
                                        " is out of range for grad of shape ",
                                        dy.shape().DebugString()));
    const int axis = axis_ < 0 ? axis_ + rank : axis_;
    bool match = indices.dims() == rank &&
                 indices.dim_size(axis) <= dy.dim_size(axis);
    for (int d = 0; match && d < rank; ++d) {
      match = d == axis || indices.dim_size(d) == dy.dim_size(d);
    }
    OP_REQUIRES(ctx, match,
                errors::InvalidArgument(
                    "indices must have the shape of grad with axis ", axis,
                    " of length <= ", dy.dim_size(axis), "; got indices ",
                    indices.shape().DebugString(), " and grad ",
                    dy.shape().DebugString()));
    TopKGeometry g = AxisGeometry(dy.shape(), axis);
    g.k = indices.dim_size(axis);
    Tensor* dx = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, dy.shape(), &dx));
    TopKMaskGradFunctor<Device, T>()(ctx, dy, indices, dx, g);
  }

 private:
  int axis_;
};

template <typename Device, typename T>
class TopKAttentionOp : public OpKernel {
 public:
  explicit TopKAttentionOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    std::string mode, per;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("mode", &mode));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("per", &per));
    mode_ = mode == "relu" ? ScoreMode::kRelu : ScoreMode::kAbs;
    per_sample_ = per == "sample";
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    OP_REQUIRES(ctx, x.dims() >= 3 && x.dims() <= 5,
                errors::InvalidArgument(
                    "x must be [B, *spatial, C] with 1 to 3 spatial dims, got "
                    "shape ",
                    x.shape().DebugString()));
    int64_t k;
    OP_REQUIRES_OK(ctx, ReadK(ctx, &k));
    TopKGeometry g = AttentionGeometry(x.shape(), per_sample_);
    OP_REQUIRES(ctx, g.size <= std::numeric_limits<int32_t>::max(),
                errors::InvalidArgument("x has too many positions per sample: ",
                                        x.shape().DebugString()));
    g.k = std::min<int64_t>(k, g.size);
    const TensorShape indices_shape =
        per_sample_ ? TensorShape({g.outer, g.k})
                    : TensorShape({g.outer, g.k, g.inner});
    Tensor* y = nullptr;
    Tensor* indices = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &y));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, indices_shape, &indices));
    TopKMaskFunctor<Device, T>()(ctx, x, y, indices, g, mode_);
  }

 private:
  ScoreMode mode_;
  bool per_sample_;
};

template <typename Device, typename T>
class TopKAttentionGradOp : public OpKernel {
 public:
  explicit TopKAttentionGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    std::string per;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("per", &per));
    per_sample_ = per == "sample";
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy = ctx->input(0);
    const Tensor& indices = ctx->input(1);
    OP_REQUIRES(ctx, dy.dims() >= 3 && dy.dims() <= 5,
                errors::InvalidArgument(
                    "grad must be [B, *spatial, C] with 1 to 3 spatial dims, "
                    "got shape ",
                    dy.shape().DebugString()));
    TopKGeometry g = AttentionGeometry(dy.shape(), per_sample_);
    const bool match =
        per_sample_
            ? indices.dims() == 2 && indices.dim_size(0) == g.outer &&
                  indices.dim_size(1) <= g.size
            : indices.dims() == 3 && indices.dim_size(0) == g.outer &&
                  indices.dim_size(1) <= g.size &&
                  indices.dim_size(2) == g.inner;
    OP_REQUIRES(ctx, match,
                errors::InvalidArgument(
                    "indices ", indices.shape().DebugString(),
                    " do not match grad ", dy.shape().DebugString(),
                    per_sample_ ? " (per='sample': [B, k])"
                                : " (per='channel': [B, k, C])"));
    g.k = indices.dim_size(1);
    Tensor* dx = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, dy.shape(), &dx));
    TopKMaskGradFunctor<Device, T>()(ctx, dy, indices, dx, g);
  }

 private:
  bool per_sample_;
};

#define TSC_REGISTER_TOPK(DEVICE, DEVICE_TYPE, T)                              \
  REGISTER_KERNEL_BUILDER(Name("TfSparseConv>KWinners")                        \
                              .Device(DEVICE)                                  \
                              .HostMemory("k")                                 \
                              .TypeConstraint<T>("T"),                         \
                          KWinnersOp<DEVICE_TYPE, T>);                         \
  REGISTER_KERNEL_BUILDER(                                                     \
      Name("TfSparseConv>KWinnersGrad").Device(DEVICE).TypeConstraint<T>("T"), \
      KWinnersGradOp<DEVICE_TYPE, T>);                                         \
  REGISTER_KERNEL_BUILDER(Name("TfSparseConv>TopKAttention")                   \
                              .Device(DEVICE)                                  \
                              .HostMemory("k")                                 \
                              .TypeConstraint<T>("T"),                         \
                          TopKAttentionOp<DEVICE_TYPE, T>);                    \
  REGISTER_KERNEL_BUILDER(Name("TfSparseConv>TopKAttentionGrad")               \
                              .Device(DEVICE)                                  \
                              .TypeConstraint<T>("T"),                         \
                          TopKAttentionGradOp<DEVICE_TYPE, T>);

#define TSC_REGISTER_TOPK_CPU(T) TSC_REGISTER_TOPK(DEVICE_CPU, CPUDevice, T)
TSC_REGISTER_TOPK_CPU(Eigen::half);
TSC_REGISTER_TOPK_CPU(Eigen::bfloat16);
TSC_REGISTER_TOPK_CPU(float);
TSC_REGISTER_TOPK_CPU(double);
#undef TSC_REGISTER_TOPK_CPU

#if TF_SPARSECONV_CUDA
#define TSC_REGISTER_TOPK_GPU(T) \
  TSC_REGISTER_TOPK(::tensorflow::DEVICE_GPU, GPUDevice, T)
TSC_REGISTER_TOPK_GPU(Eigen::half);
TSC_REGISTER_TOPK_GPU(Eigen::bfloat16);
TSC_REGISTER_TOPK_GPU(float);
TSC_REGISTER_TOPK_GPU(double);
#undef TSC_REGISTER_TOPK_GPU
#endif

#undef TSC_REGISTER_TOPK

}  // namespace tf_sparseconv
