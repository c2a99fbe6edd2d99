// The kernels of the channel-sparse convolution and its two gradient ops:
// attribute and shape checks, then ChannelSparseFunctor<Device, T>
// (channel_sparse_functor.h): the CPU engine (channel_sparse_cpu.cc) or, with
// TF_SPARSECONV_CUDA, the GPU launchers (channel_sparse_op_gpu.cu.cc).
#define EIGEN_USE_THREADS

#include <cstdint>
#include <string>
#include <vector>

#include "tf_sparseconv/cc/kernels/channel_sparse_common.h"
#include "tf_sparseconv/cc/kernels/channel_sparse_functor.h"
#include "tf_sparseconv/cc/kernels/kernel_util.h"

#if TF_SPARSECONV_CUDA
#include "tf_sparseconv/cc/kernels/channel_sparse_launcher.h"
#endif

namespace tf_sparseconv {

// --- argument checks shared by the three ops -----------------------------------

class ChannelSparseBase : public OpKernel {
 public:
  explicit ChannelSparseBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
    std::vector<int32_t> strides, dilations;
    std::string padding;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("strides", &strides));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("dilations", &dilations));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("padding", &padding));
    OP_REQUIRES(ctx, strides.size() == 2 && strides[0] >= 1 && strides[1] >= 1,
                errors::InvalidArgument("strides must be 2 positive ints (height, width)"));
    OP_REQUIRES(ctx, dilations.size() == 2 && dilations[0] >= 1 && dilations[1] >= 1,
                errors::InvalidArgument("dilations must be 2 positive ints (height, width)"));
    stride_h_ = strides[0];
    stride_w_ = strides[1];
    dil_h_ = dilations[0];
    dil_w_ = dilations[1];
    same_ = padding == "SAME";
  }

 protected:
  // Validates shapes (and, when the connections are in host memory, their
  // values: the GPU kernels instead skip out-of-range connections); fills
  // the geometry.
  Status Geometry(const TensorShape& x, const TensorShape& kernel, const Tensor& connections,
                  bool check_values, ChannelSparseGeometry* g) const {
    if (x.dims() != 4) {
      return errors::InvalidArgument("x must be [B, H, W, Cin], got shape ", x.DebugString());
    }
    if (kernel.dims() != 4) {
      return errors::InvalidArgument("kernel must be [kh, kw, m, Cout], got shape ",
                                     kernel.DebugString());
    }
    if (connections.dims() != 2) {
      return errors::InvalidArgument("connections must be [Cout, m], got shape ",
                                     connections.shape().DebugString());
    }
    if (connections.dim_size(0) != kernel.dim_size(3) ||
        connections.dim_size(1) != kernel.dim_size(2)) {
      return errors::InvalidArgument("connections ", connections.shape().DebugString(),
                                     " must be [Cout, m] for kernel ", kernel.DebugString(),
                                     " [kh, kw, m, Cout]");
    }
    if (kernel.dim_size(0) < 1 || kernel.dim_size(1) < 1) {
      return errors::InvalidArgument("kernel must have positive spatial size, got ",
                                     kernel.DebugString());
    }
    g->batch = x.dim_size(0);
    g->in_h = x.dim_size(1);
    g->in_w = x.dim_size(2);
    g->in_c = x.dim_size(3);
    g->k_h = kernel.dim_size(0);
    g->k_w = kernel.dim_size(1);
    g->m = kernel.dim_size(2);
    g->out_c = kernel.dim_size(3);
    g->stride_h = stride_h_;
    g->stride_w = stride_w_;
    g->dil_h = dil_h_;
    g->dil_w = dil_w_;
    if (g->m > g->in_c) {
      return errors::InvalidArgument("connections has m = ", g->m,
                                     " entries per row but x has only ", g->in_c,
                                     " input channels");
    }
    auto axis = [&](int64_t n, int64_t k, int64_t s, int64_t d, int64_t* out, int64_t* pad) {
      const int64_t span = (k - 1) * d + 1;
      if (same_) {
        *out = (n + s - 1) / s;
        *pad = std::max<int64_t>((*out - 1) * s + span - n, 0) / 2;
      } else {
        *out = n >= span ? (n - span) / s + 1 : 0;
        *pad = 0;
      }
    };
    axis(g->in_h, g->k_h, g->stride_h, g->dil_h, &g->out_h, &g->pad_top);
    axis(g->in_w, g->k_w, g->stride_w, g->dil_w, &g->out_w, &g->pad_left);
    if (!check_values) return ::tensorflow::OkStatus();
    // Connection values: in range, distinct per row.
    const auto conn = connections.matrix<int32_t>();
    std::vector<int64_t> seen(g->in_c, -1);
    for (int64_t o = 0; o < g->out_c; ++o) {
      for (int64_t e = 0; e < g->m; ++e) {
        const int32_t c = conn(o, e);
        if (c < 0 || c >= g->in_c) {
          return errors::InvalidArgument("connections[", o, ", ", e, "] = ", c,
                                         " is out of range [0, ", g->in_c, ")");
        }
        if (seen[c] == o) {
          return errors::InvalidArgument("connections row ", o, " lists input channel ", c,
                                         " twice");
        }
        seen[c] = o;
      }
    }
    return ::tensorflow::OkStatus();
  }

  static Status ShapeFromSizes(const Tensor& sizes, const char* name, TensorShape* shape) {
    if (sizes.dims() != 1 || sizes.NumElements() != 4) {
      return errors::InvalidArgument(name, " must be a vector of 4 ints, got shape ",
                                     sizes.shape().DebugString());
    }
    auto v = sizes.vec<int32_t>();
    for (int i = 0; i < 4; ++i) {
      if (v(i) < 0) {
        return errors::InvalidArgument(name, " must be non-negative, got ", v(i));
      }
    }
    return TensorShape::BuildTensorShape({v(0), v(1), v(2), v(3)}, shape);
  }

  static Status CheckGrad(const Tensor& grad, const ChannelSparseGeometry& g) {
    const TensorShape expected({g.batch, g.out_h, g.out_w, g.out_c});
    if (grad.shape() != expected) {
      return errors::InvalidArgument("grad must have the output shape ", expected.DebugString(),
                                     ", got ", grad.shape().DebugString());
    }
    return ::tensorflow::OkStatus();
  }

  int64_t stride_h_, stride_w_, dil_h_, dil_w_;
  bool same_;
};

// --- device dispatch --------------------------------------------------------------

// The CPU functor is the engine of channel_sparse_cpu.cc.

#if TF_SPARSECONV_CUDA

template <typename T>
struct ChannelSparseFunctor<GPUDevice, T> {
  static void Forward(OpKernelContext* ctx, const T* x, const T* kernel, const int32_t* conn, T* y,
                      const ChannelSparseGeometry& g, const Epilogue<T>& epilogue) {
    const char* err =
        LaunchChannelSparseConv2DGpu(DTypeTraits<T>::kFormat, x, kernel, conn, epilogue.bias,
                                     epilogue.relu, y, g, GpuStream(ctx));
    OP_REQUIRES(ctx, err == nullptr, errors::Internal("GPU kernel failed: ", err));
  }
  static void BackpropInput(OpKernelContext* ctx, const T* dy, const T* kernel, const int32_t* conn,
                            T* dx, const ChannelSparseGeometry& g) {
    // Deterministic gather; the transposed connection list is built in a
    // temporary workspace (the connections stay on the device).
    int64_t bytes = 0;
    const char* err = ChannelSparseConv2DBackpropInputGpuWorkspaceBytes(g, &bytes);
    OP_REQUIRES(ctx, err == nullptr, errors::Internal("GPU kernel failed: ", err));
    Tensor workspace;
    void* ws = nullptr;
    if (bytes > 0) {
      OP_REQUIRES_OK(ctx,
                     ctx->allocate_temp(::tensorflow::DT_INT8, TensorShape({bytes}), &workspace));
      ws = workspace.flat<int8_t>().data();
    }
    err = LaunchChannelSparseConv2DBackpropInputGpu(DTypeTraits<T>::kFormat, dy, kernel, conn, dx,
                                                    ws, bytes, g, GpuStream(ctx));
    OP_REQUIRES(ctx, err == nullptr, errors::Internal("GPU kernel failed: ", err));
  }
  static void BackpropKernel(OpKernelContext* ctx, const T* x, const T* dy, const int32_t* conn,
                             T* dkernel, const ChannelSparseGeometry& g) {
    const char* err = LaunchChannelSparseConv2DBackpropKernelGpu(DTypeTraits<T>::kFormat, x, dy,
                                                                 conn, dkernel, g, GpuStream(ctx));
    OP_REQUIRES(ctx, err == nullptr, errors::Internal("GPU kernel failed: ", err));
  }
};
#endif  // TF_SPARSECONV_CUDA

// ChannelSparseConv2D, and with kBiasActivation ChannelSparseConv2DBiasActivation
// (input 3: the bias; attr "activation"), which fuses both into the output stage.
template <typename Device, typename T, bool kBiasActivation = false>
class ChannelSparseConv2DOp : public ChannelSparseBase {
 public:
  explicit ChannelSparseConv2DOp(OpKernelConstruction* ctx) : ChannelSparseBase(ctx) {
    if (kBiasActivation) OP_REQUIRES_OK(ctx, ReadActivation(ctx, &relu_));
  }
  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& kernel = ctx->input(1);
    const Tensor& connections = ctx->input(2);
    ChannelSparseGeometry g;
    OP_REQUIRES_OK(ctx,
                   Geometry(x.shape(), kernel.shape(), connections, kCheckConnections<Device>, &g));
    Epilogue<T> epilogue;
    if (kBiasActivation) {
      const Tensor& bias = ctx->input(3);
      OP_REQUIRES(ctx, bias.dims() == 1 && bias.dim_size(0) == g.out_c,
                  errors::InvalidArgument("bias must be [Cout] = [", g.out_c, "], got shape ",
                                          bias.shape().DebugString()));
      epilogue = {bias.flat<T>().data(), relu_};
    }
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx,
                   ctx->allocate_output(0, TensorShape({g.batch, g.out_h, g.out_w, g.out_c}), &y));
    // Empty operands (m = 0, no input positions) are handled by the
    // kernels, which then write zeros.
    if (y->NumElements() == 0) return;
    ChannelSparseFunctor<Device, T>::Forward(ctx, x.flat<T>().data(), kernel.flat<T>().data(),
                                             connections.flat<int32_t>().data(),
                                             y->flat<T>().data(), g, epilogue);
  }

 private:
  // The "activation" attr: 'relu' (*relu = true) or 'linear'.
  static Status ReadActivation(OpKernelConstruction* ctx, bool* relu) {
    std::string activation;
    TF_RETURN_IF_ERROR(ctx->GetAttr("activation", &activation));
    if (activation != "linear" && activation != "relu") {
      return errors::InvalidArgument("activation must be 'linear' or 'relu', got '", activation,
                                     "'");
    }
    *relu = activation == "relu";
    return ::tensorflow::OkStatus();
  }

  bool relu_ = false;
};

template <typename Device, typename T>
using ChannelSparseConv2DBiasActivationOp = ChannelSparseConv2DOp<Device, T, true>;

template <typename Device, typename T>
class ChannelSparseConv2DBackpropInputOp : public ChannelSparseBase {
 public:
  using ChannelSparseBase::ChannelSparseBase;
  void Compute(OpKernelContext* ctx) override {
    TensorShape x_shape;
    OP_REQUIRES_OK(ctx, ShapeFromSizes(ctx->input(0), "input_sizes", &x_shape));
    const Tensor& kernel = ctx->input(1);
    const Tensor& connections = ctx->input(2);
    const Tensor& grad = ctx->input(3);
    ChannelSparseGeometry g;
    OP_REQUIRES_OK(ctx,
                   Geometry(x_shape, kernel.shape(), connections, kCheckConnections<Device>, &g));
    OP_REQUIRES_OK(ctx, CheckGrad(grad, g));
    Tensor* dx = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x_shape, &dx));
    if (dx->NumElements() == 0) return;
    ChannelSparseFunctor<Device, T>::BackpropInput(
        ctx, grad.flat<T>().data(), kernel.flat<T>().data(), connections.flat<int32_t>().data(),
        dx->flat<T>().data(), g);
  }
};

template <typename Device, typename T>
class ChannelSparseConv2DBackpropKernelOp : public ChannelSparseBase {
 public:
  using ChannelSparseBase::ChannelSparseBase;
  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    TensorShape kernel_shape;
    OP_REQUIRES_OK(ctx, ShapeFromSizes(ctx->input(1), "kernel_sizes", &kernel_shape));
    const Tensor& connections = ctx->input(2);
    const Tensor& grad = ctx->input(3);
    ChannelSparseGeometry g;
    OP_REQUIRES_OK(ctx,
                   Geometry(x.shape(), kernel_shape, connections, kCheckConnections<Device>, &g));
    OP_REQUIRES_OK(ctx, CheckGrad(grad, g));
    Tensor* dkernel = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, kernel_shape, &dkernel));
    if (dkernel->NumElements() == 0) return;
    ChannelSparseFunctor<Device, T>::BackpropKernel(ctx, x.flat<T>().data(), grad.flat<T>().data(),
                                                    connections.flat<int32_t>().data(),
                                                    dkernel->flat<T>().data(), g);
  }
};

// On the CPU the connections are read (and validated) in host memory; on the
// GPU they stay on the device and the kernels skip out-of-range entries.
#define TSC_REGISTER(DEV, T)                                                                       \
  REGISTER_KERNEL_BUILDER(                                                                         \
      Name("TfSparseConv>ChannelSparseConv2D").Device(TSC_DEVICE(DEV)).TypeConstraint<T>("T"),     \
      ChannelSparseConv2DOp<DEV##Device, T>);                                                      \
  REGISTER_KERNEL_BUILDER(Name("TfSparseConv>ChannelSparseConv2DBiasActivation")                   \
                              .Device(TSC_DEVICE(DEV))                                             \
                              .TypeConstraint<T>("T"),                                             \
                          ChannelSparseConv2DBiasActivationOp<DEV##Device, T>);                    \
  REGISTER_KERNEL_BUILDER(Name("TfSparseConv>ChannelSparseConv2DBackpropInput")                    \
                              .Device(TSC_DEVICE(DEV)) TSC_ON_GPU(DEV, .HostMemory("input_sizes")) \
                              .TypeConstraint<T>("T"),                                             \
                          ChannelSparseConv2DBackpropInputOp<DEV##Device, T>);                     \
  REGISTER_KERNEL_BUILDER(Name("TfSparseConv>ChannelSparseConv2DBackpropKernel")                   \
                              .Device(TSC_DEVICE(DEV))                                             \
                                  TSC_ON_GPU(DEV, .HostMemory("kernel_sizes"))                     \
                              .TypeConstraint<T>("T"),                                             \
                          ChannelSparseConv2DBackpropKernelOp<DEV##Device, T>);
TSC_REGISTER_FLOAT_KERNELS(TSC_REGISTER)
#undef TSC_REGISTER

}  // namespace tf_sparseconv
