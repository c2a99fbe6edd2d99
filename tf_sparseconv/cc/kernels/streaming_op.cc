// CPU (and, with TF_SPARSECONV_CUDA, GPU) kernels of StreamingConvStep.
//
// CPU: the (output row, block of filters) units are split over the thread
// pool; a unit accumulates in registers, in the accumulation type, taps *
// channels broadcast-multiply-adds of a contiguous kernel row segment, then
// applies the bias and the activation. The new history is a copy of the last
// frames.
#define EIGEN_USE_THREADS

#include <algorithm>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "tf_sparseconv/cc/kernels/kernel_util.h"
#include "tf_sparseconv/cc/kernels/streaming_common.h"

#if TF_SPARSECONV_CUDA
#include "tf_sparseconv/cc/kernels/streaming_launcher.h"
#endif

namespace tf_sparseconv {

namespace {

template <typename T>
void StepCpu(OpKernelContext* ctx, const T* history, const T* frames, const T* kernel,
             const T* bias, bool relu, T* y, T* new_history, const StreamingGeometry& g) {
  using A = typename Acc<T>::type;
  const int64_t c_count = g.channels, f_count = g.filters;
  // z[b, p]: the history for p < hist, then the new frames.
  auto z = [&](int64_t b, int64_t p) -> const T* {
    return p < g.hist ? history + (b * g.hist + p) * c_count
                      : frames + (b * g.steps + p - g.hist) * c_count;
  };
  // The kernel in the accumulation type (converted only for half/bfloat16).
  std::vector<A> converted;
  const A* w_data;
  if constexpr (std::is_same<T, A>::value) {
    w_data = kernel;
  } else {
    converted.resize(g.taps * c_count * f_count);
    for (size_t i = 0; i < converted.size(); ++i) converted[i] = static_cast<A>(kernel[i]);
    w_data = converted.data();
  }
  // Work units: (up to kRows consecutive output rows, block of kBlock
  // filters). The block's accumulators stay in registers across all taps and
  // channels; each (tap, channel) loads one contiguous kernel row segment and
  // adds it, times each row's broadcast frame value, to every row's
  // accumulators. Every output sums in the same order however the rows are
  // grouped (so t frames give bitwise the outputs of t calls on one frame).
  constexpr int64_t kBlock = 64 / sizeof(A) * 4;  // 4 vectors of 64 bytes
  constexpr int64_t kRows = 4;
  const int64_t rows = g.batch * g.steps;
  const int64_t row_blocks = (rows + kRows - 1) / kRows;
  const int64_t blocks = (f_count + kBlock - 1) / kBlock;
  auto units = [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t row0 = unit / blocks * kRows, f0 = unit % blocks * kBlock;
      const int64_t count = std::min(kRows, rows - row0);
      const int64_t width = std::min(kBlock, f_count - f0);
      A acc[kRows][kBlock];
      for (int64_t r = 0; r < kRows; ++r) {
        for (int64_t f = 0; f < kBlock; ++f) {
          acc[r][f] = bias != nullptr && f < width ? static_cast<A>(bias[f0 + f]) : A(0);
        }
      }
      for (int64_t i = 0; i < g.taps; ++i) {
        const T* zr[kRows];
        for (int64_t r = 0; r < kRows; ++r) {
          const int64_t row = row0 + std::min(r, count - 1);  // (padding rows repeat the last)
          zr[r] = z(row / g.steps, row % g.steps + i * g.dilation);
        }
        const A* wi = w_data + i * c_count * f_count + f0;
        if (width == kBlock && count == kRows) {
          for (int64_t c = 0; c < c_count; ++c) {
            const A* wc = wi + c * f_count;
            for (int64_t r = 0; r < kRows; ++r) {
              const A a = static_cast<A>(zr[r][c]);
              for (int64_t f = 0; f < kBlock; ++f) acc[r][f] += a * wc[f];
            }
          }
        } else if (width == kBlock && count == 1) {  // one new frame: the streaming case
          A* acc0 = acc[0];
          for (int64_t c = 0; c < c_count; ++c) {
            const A a = static_cast<A>(zr[0][c]);
            const A* wc = wi + c * f_count;
            for (int64_t f = 0; f < kBlock; ++f) acc0[f] += a * wc[f];
          }
        } else {
          for (int64_t c = 0; c < c_count; ++c) {
            const A* wc = wi + c * f_count;
            for (int64_t r = 0; r < count; ++r) {
              const A a = static_cast<A>(zr[r][c]);
              for (int64_t f = 0; f < width; ++f) acc[r][f] += a * wc[f];
            }
          }
        }
      }
      for (int64_t r = 0; r < count; ++r) {
        T* yr = y + (row0 + r) * f_count + f0;
        for (int64_t f = 0; f < width; ++f) {
          const A v =
              relu && acc[r][f] < A(0) ? A(0) : acc[r][f];  // (NaN stays NaN, as in tf.nn.relu)
          yr[f] = static_cast<T>(v);
        }
      }
    }
  };
  ParallelFor(ctx, row_blocks * blocks, std::min(kRows, rows) * g.taps * c_count * kBlock, units);
  for (int64_t b = 0; b < g.batch; ++b) {
    for (int64_t q = 0; q < g.hist; ++q) {
      std::memcpy(new_history + (b * g.hist + q) * c_count, z(b, g.steps + q), c_count * sizeof(T));
    }
  }
}

}  // namespace

template <typename Device, typename T>
struct StreamingStepFunctor;

template <typename T>
struct StreamingStepFunctor<CPUDevice, T> {
  static void Compute(OpKernelContext* ctx, const T* history, const T* frames, const T* kernel,
                      const T* bias, bool relu, T* y, T* new_history, const StreamingGeometry& g) {
    StepCpu(ctx, history, frames, kernel, bias, relu, y, new_history, g);
  }
};

#if TF_SPARSECONV_CUDA

template <typename T>
struct StreamingStepFunctor<GPUDevice, T> {
  static void Compute(OpKernelContext* ctx, const T* history, const T* frames, const T* kernel,
                      const T* bias, bool relu, T* y, T* new_history, const StreamingGeometry& g) {
    const char* err = LaunchStreamingConvStepGpu(DTypeTraits<T>::kFormat, history, frames, kernel,
                                                 bias, relu, y, new_history, g, GpuStream(ctx));
    OP_REQUIRES(ctx, err == nullptr, errors::Internal("GPU kernel failed: ", err));
  }
};
#endif  // TF_SPARSECONV_CUDA

template <typename Device, typename T>
class StreamingConvStepOp : public OpKernel {
 public:
  explicit StreamingConvStepOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("dilation", &dilation_));
    OP_REQUIRES(ctx, dilation_ >= 1,
                errors::InvalidArgument("dilation must be >= 1, got ", dilation_));
    std::string activation;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("activation", &activation));
    OP_REQUIRES(
        ctx, activation == "linear" || activation == "relu",
        errors::InvalidArgument("activation must be 'linear' or 'relu', got '", activation, "'"));
    relu_ = activation == "relu";
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& history = ctx->input(0);
    const Tensor& frames = ctx->input(1);
    const Tensor& kernel = ctx->input(2);
    const Tensor& bias = ctx->input(3);
    OP_REQUIRES_OK(ctx, CheckRank(history, 3, "history must be [B, hist, C]"));
    OP_REQUIRES_OK(ctx, CheckRank(frames, 3, "frames must be [B, t, C]"));
    OP_REQUIRES(ctx, kernel.dims() == 3 && kernel.dim_size(0) >= 1,
                errors::InvalidArgument("kernel must be [taps >= 1, C, F], got shape ",
                                        kernel.shape().DebugString()));
    StreamingGeometry g;
    g.batch = frames.dim_size(0);
    g.steps = frames.dim_size(1);
    g.channels = frames.dim_size(2);
    g.taps = kernel.dim_size(0);
    g.filters = kernel.dim_size(2);
    g.dilation = dilation_;
    g.hist = (g.taps - 1) * g.dilation;
    OP_REQUIRES(ctx, kernel.dim_size(1) == g.channels,
                errors::InvalidArgument("kernel has ", kernel.dim_size(1),
                                        " input channels but frames has ", g.channels));
    OP_REQUIRES(ctx,
                history.dim_size(0) == g.batch && history.dim_size(1) == g.hist &&
                    history.dim_size(2) == g.channels,
                errors::InvalidArgument("history must be [B, (taps - 1) * dilation, C] = [",
                                        g.batch, ", ", g.hist, ", ", g.channels, "], got shape ",
                                        history.shape().DebugString()));
    OP_REQUIRES(ctx, bias.dims() == 1 && (bias.dim_size(0) == g.filters || bias.dim_size(0) == 0),
                errors::InvalidArgument("bias must be [F] = [", g.filters, "] or [0], got shape ",
                                        bias.shape().DebugString()));
    Tensor* y = nullptr;
    Tensor* new_history = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({g.batch, g.steps, g.filters}), &y));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, history.shape(), &new_history));
    if (y->NumElements() == 0 && new_history->NumElements() == 0) return;
    StreamingStepFunctor<Device, T>::Compute(
        ctx, history.flat<T>().data(), frames.flat<T>().data(), kernel.flat<T>().data(),
        bias.NumElements() ? bias.flat<T>().data() : nullptr, relu_, y->flat<T>().data(),
        new_history->flat<T>().data(), g);
  }

 private:
  int dilation_ = 1;
  bool relu_ = false;
};

#define TSC_REGISTER(DEV, T)                                                                 \
  REGISTER_KERNEL_BUILDER(                                                                   \
      Name("TfSparseConv>StreamingConvStep").Device(TSC_DEVICE(DEV)).TypeConstraint<T>("T"), \
      StreamingConvStepOp<DEV##Device, T>);
TSC_REGISTER_FLOAT_KERNELS(TSC_REGISTER)
#undef TSC_REGISTER

}  // namespace tf_sparseconv
