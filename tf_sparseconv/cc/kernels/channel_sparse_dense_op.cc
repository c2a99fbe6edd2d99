// CPU (and, with TF_SPARSECONV_CUDA, GPU) kernels of ChannelSparseDenseKernel
// (channel-sparse kernel [taps, m, Cout] -> dense [taps, Cin, Cout]) and its
// adjoint ChannelSparseGatherKernel. The dense dispatch of the Python wrappers
// builds the dense kernel on every call, so it must cost a pass over the dense
// kernel, not the one-hot contraction's Cout * m * Cin per tap.
//
// CPU, dense: each dense row (t, c) is zeroed and filled from the transposed
// connection lists while it sits in L1; rows are split over TensorFlow's CPU
// thread pool. The op keeps its last result: a call with the same kernel and
// connections (inference: constant weights) returns it after comparing the
// kernel, a read of m / Cin of what a rebuild writes. Gather: taps in parallel,
// each read in kernel order (contiguous writes).
#define EIGEN_USE_THREADS

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "tensorflow/core/framework/tensor_util.h"
#include "tensorflow/core/platform/mutex.h"
#include "tf_sparseconv/cc/kernels/kernel_util.h"

#if TF_SPARSECONV_CUDA
#include "tf_sparseconv/cc/kernels/channel_sparse_dense_launcher.h"
#endif

namespace tf_sparseconv {

namespace {

// Sizes of one conversion: taps * m * Cout kernel elements, taps * Cin * Cout dense ones
// (taps: the elements of the leading, window axes `lead`).
struct DenseGeometry {
  int64_t taps = 1, m = 0, cout = 0, cin = 0;
  TensorShape lead;
};

// Checks `connections` against [cout, m] and, on the CPU, its values (in
// [0, cin), distinct per row: the two ops are each other's adjoint only then).
void CheckConnections(OpKernelContext* ctx, const Tensor& connections, const DenseGeometry& g,
                      bool check_values) {
  OP_REQUIRES(ctx,
              connections.dims() == 2 && connections.dim_size(0) == g.cout &&
                  connections.dim_size(1) == g.m,
              errors::InvalidArgument("connections must be [Cout, m] = [", g.cout, ", ", g.m,
                                      "], got shape ", connections.shape().DebugString()));
  if (!check_values) return;
  const int32_t* conn = connections.flat<int32_t>().data();
  std::vector<int32_t> row(g.m);
  for (int64_t o = 0; o < g.cout; ++o) {
    for (int64_t j = 0; j < g.m; ++j) {
      const int32_t c = conn[o * g.m + j];
      OP_REQUIRES(ctx, c >= 0 && c < g.cin,
                  errors::InvalidArgument("connections[", o, ", ", j, "] = ", c, " is not in [0, ",
                                          g.cin, ")"));
      row[j] = c;
    }
    std::sort(row.begin(), row.end());
    const auto repeated = std::adjacent_find(row.begin(), row.end());
    OP_REQUIRES(ctx, repeated == row.end(),
                errors::InvalidArgument("connections row ", o, " lists input channel ",
                                        repeated == row.end() ? 0 : *repeated, " twice"));
  }
}

// Splits a [..., a, Cout] operand (`name`; `axes` names its last two axes)
// into g->lead (and g->taps), *a and g->cout.
Status SplitOperand(const Tensor& t, const char* name, const char* axes, int64_t* a,
                    DenseGeometry* g) {
  if (t.dims() < 2) {
    return errors::InvalidArgument(name, " must be [..., ", axes, "], got shape ",
                                   t.shape().DebugString());
  }
  for (int d = 0; d + 2 < t.dims(); ++d) g->lead.AddDim(t.dim_size(d));
  g->taps = g->lead.num_elements();
  *a = t.dim_size(t.dims() - 2);
  g->cout = t.dim_size(t.dims() - 1);
  return ::tensorflow::OkStatus();
}

// The two ops' common end of checks: the connections (CheckConnections), then
// output 0 = g.lead + [rows, g.cout]; *out stays null when a check fails.
void CheckAndAllocate(OpKernelContext* ctx, const Tensor& connections, const DenseGeometry& g,
                      bool check_values, int64_t rows, Tensor** out) {
  CheckConnections(ctx, connections, g, check_values);
  if (!ctx->status().ok()) return;
  TensorShape lead = g.lead;
  lead.AddDim(rows);
  lead.AddDim(g.cout);
  OP_REQUIRES_OK(ctx, ctx->allocate_output(0, lead, out));
}

template <typename Device, typename T>
struct DenseFunctor;

// connections transposed to [m, Cout], so that the inner loops below run over o with
// contiguous kernel reads and writes one column apart.
std::vector<int32_t> TransposedConnections(const int32_t* conn, const DenseGeometry& g) {
  std::vector<int32_t> by_slot(g.m * g.cout);
  for (int64_t o = 0; o < g.cout; ++o) {
    for (int64_t j = 0; j < g.m; ++j) by_slot[j * g.cout + o] = conn[o * g.m + j];
  }
  return by_slot;
}

template <typename T>
struct DenseFunctor<CPUDevice, T> {
  // The connection lists transposed (for each input channel c, the (o, j) pairs with
  // connections[o, j] == c, in increasing o); each dense row (t, c) of Cout elements is then
  // zeroed and filled from its list while it sits in L1.
  static void ToDense(OpKernelContext* ctx, const T* kernel, const int32_t* conn, T* dense,
                      const DenseGeometry& g) {
    std::vector<int64_t> start(g.cin + 1, 0);
    for (int64_t e = 0; e < g.cout * g.m; ++e) ++start[conn[e] + 1];
    for (int64_t c = 0; c < g.cin; ++c) start[c + 1] += start[c];
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    std::vector<int32_t> out_channel(g.cout * g.m), slot(g.cout * g.m);
    for (int64_t o = 0; o < g.cout; ++o) {
      for (int64_t j = 0; j < g.m; ++j) {
        const int64_t at = fill[conn[o * g.m + j]]++;
        out_channel[at] = static_cast<int32_t>(o);
        slot[at] = static_cast<int32_t>(j);
      }
    }
    const int64_t rows = g.taps * g.cin;
    const int64_t cost = g.cout * 2 + (g.cin ? g.cout * g.m / g.cin : 0) * 8;
    ParallelFor(ctx, rows, cost, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t t = row / g.cin, c = row % g.cin;
        T* out = dense + row * g.cout;
        std::fill(out, out + g.cout, T(0));
        const T* k = kernel + t * g.m * g.cout;
        for (int64_t e = start[c]; e < start[c + 1]; ++e) {
          const int64_t o = out_channel[e];
          out[o] = k[slot[e] * g.cout + o];
        }
      }
    });
  }

  static void Gather(OpKernelContext* ctx, const T* dense, const int32_t* conn, T* kernel,
                     const DenseGeometry& g) {
    const std::vector<int32_t> by_slot = TransposedConnections(conn, g);
    ParallelFor(ctx, g.taps, g.m * g.cout * 4, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const T* d = dense + t * g.cin * g.cout;
        T* k = kernel + t * g.m * g.cout;
        for (int64_t e = 0; e < g.m * g.cout; ++e) k[e] = d[by_slot[e] * g.cout + e % g.cout];
      }
    });
  }
};

#if TF_SPARSECONV_CUDA

template <typename T>
struct DenseFunctor<GPUDevice, T> {
  static void ToDense(OpKernelContext* ctx, const T* kernel, const int32_t* conn, T* dense,
                      const DenseGeometry& g) {
    const char* err = LaunchChannelSparseDenseKernelGpu(sizeof(T), kernel, conn, dense, g.taps, g.m,
                                                        g.cout, g.cin, GpuStream(ctx));
    OP_REQUIRES(ctx, err == nullptr, errors::Internal("GPU kernel failed: ", err));
  }
  static void Gather(OpKernelContext* ctx, const T* dense, const int32_t* conn, T* kernel,
                     const DenseGeometry& g) {
    const char* err = LaunchChannelSparseGatherKernelGpu(sizeof(T), dense, conn, kernel, g.taps,
                                                         g.m, g.cout, g.cin, GpuStream(ctx));
    OP_REQUIRES(ctx, err == nullptr, errors::Internal("GPU kernel failed: ", err));
  }
};
#endif  // TF_SPARSECONV_CUDA

template <typename Device>
constexpr bool kOnCpu = std::is_same<Device, CPUDevice>::value;

template <typename Device, typename T>
class ChannelSparseDenseKernelOp : public OpKernel {
 public:
  explicit ChannelSparseDenseKernelOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("in_channels", &in_channels_));
    OP_REQUIRES(
        ctx, in_channels_ >= 1 && in_channels_ <= std::numeric_limits<int32_t>::max(),
        errors::InvalidArgument("in_channels must be in [1, 2^31) (connections are int32), got ",
                                in_channels_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& kernel = ctx->input(0);
    const Tensor& connections = ctx->input(1);
    DenseGeometry g;
    OP_REQUIRES_OK(ctx, SplitOperand(kernel, "kernel", "m, Cout", &g.m, &g));
    g.cin = in_channels_;
    OP_REQUIRES(
        ctx, g.m <= g.cin,
        errors::InvalidArgument("kernel fan-in m = ", g.m, " is larger than in_channels ", g.cin));
    if constexpr (kOnCpu<Device>) {
      // The last inputs were validated when they were kept: a repeat needs no second check.
      ::tensorflow::mutex_lock lock(mu_);
      if (SameAsLast(kernel, connections)) {
        ctx->set_output(0, last_dense_);
        return;
      }
    }
    Tensor* dense = nullptr;
    CheckAndAllocate(ctx, connections, g, kOnCpu<Device>, g.cin, &dense);
    if (dense == nullptr || dense->NumElements() == 0) return;
    DenseFunctor<Device, T>::ToDense(ctx, kernel.flat<T>().data(),
                                     connections.flat<int32_t>().data(), dense->flat<T>().data(),
                                     g);
    if constexpr (kOnCpu<Device>) {
      // Keep copies of the inputs (the caller may reuse their buffers) and the result (shared
      // with the output: TensorFlow forwards no buffer another reference holds).
      ::tensorflow::mutex_lock lock(mu_);
      last_kernel_ = ::tensorflow::tensor::DeepCopy(kernel);
      last_connections_ = ::tensorflow::tensor::DeepCopy(connections);
      last_dense_ = *dense;
    }
  }

 private:
  bool SameAsLast(const Tensor& kernel, const Tensor& connections) const {
    return last_kernel_.IsInitialized() && last_kernel_.shape() == kernel.shape() &&
           last_connections_.shape() == connections.shape() &&
           std::memcmp(last_kernel_.tensor_data().data(), kernel.tensor_data().data(),
                       kernel.tensor_data().size()) == 0 &&
           std::memcmp(last_connections_.tensor_data().data(), connections.tensor_data().data(),
                       connections.tensor_data().size()) == 0;
  }

  int64_t in_channels_ = 1;
  ::tensorflow::mutex mu_;
  Tensor last_kernel_ TF_GUARDED_BY(mu_);
  Tensor last_connections_ TF_GUARDED_BY(mu_);
  Tensor last_dense_ TF_GUARDED_BY(mu_);
};

template <typename Device, typename T>
class ChannelSparseGatherKernelOp : public OpKernel {
 public:
  explicit ChannelSparseGatherKernelOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dense = ctx->input(0);
    const Tensor& connections = ctx->input(1);
    DenseGeometry g;
    OP_REQUIRES_OK(ctx, SplitOperand(dense, "dense", "Cin, Cout", &g.cin, &g));
    OP_REQUIRES(ctx, connections.dims() == 2,
                errors::InvalidArgument("connections must be [Cout, m], got shape ",
                                        connections.shape().DebugString()));
    g.m = connections.dim_size(1);
    Tensor* kernel = nullptr;
    CheckAndAllocate(ctx, connections, g, kOnCpu<Device>, g.m, &kernel);
    if (kernel == nullptr || kernel->NumElements() == 0) return;
    DenseFunctor<Device, T>::Gather(ctx, dense.flat<T>().data(), connections.flat<int32_t>().data(),
                                    kernel->flat<T>().data(), g);
  }
};

}  // namespace

#define TSC_REGISTER_OP(DEV, T, NAME, OP)                                            \
  REGISTER_KERNEL_BUILDER(Name(NAME).Device(TSC_DEVICE(DEV)).TypeConstraint<T>("T"), \
                          OP<DEV##Device, T>);
#define TSC_REGISTER(DEV, T)                                                                   \
  TSC_REGISTER_OP(DEV, T, "TfSparseConv>ChannelSparseDenseKernel", ChannelSparseDenseKernelOp) \
  TSC_REGISTER_OP(DEV, T, "TfSparseConv>ChannelSparseGatherKernel", ChannelSparseGatherKernelOp)
TSC_REGISTER_FLOAT_KERNELS(TSC_REGISTER)
#undef TSC_REGISTER
#undef TSC_REGISTER_OP

}  // namespace tf_sparseconv
