// Op registrations of the channel-sparse (channel-group) convolution:
// each output channel reads only its own list of `m` input channels
// (Changpinyo et al., "The Power of Sparsity in Convolutional Neural
// Networks"). Conv1D is expressed in Python as the in_h = k_h = 1 case.
#include "tf_sparseconv/cc/ops/shape_util.h"

namespace tf_sparseconv {
namespace {

// Output length along one spatial axis (unknown while the input length is).
Status OutputDim(InferenceContext* c, DimensionHandle in, int64_t k, int64_t stride,
                 int64_t dilation, bool same, DimensionHandle* out) {
  if (!c->ValueKnown(in)) {
    *out = c->UnknownDim();
    return ::tensorflow::OkStatus();
  }
  const int64_t n = c->Value(in);
  const int64_t span = (k - 1) * dilation + 1;
  const int64_t len = same ? (n + stride - 1) / stride : (n >= span ? (n - span) / stride + 1 : 0);
  *out = c->MakeDim(len);
  return ::tensorflow::OkStatus();
}

Status ForwardShape(InferenceContext* c) {
  ShapeHandle x, kernel, connections;
  TF_RETURN_IF_ERROR(WithInputRanks(c, {{0, 4, &x}, {1, 4, &kernel}, {2, 2, &connections}}));
  std::vector<int32_t> strides, dilations;
  std::string padding;
  TF_RETURN_IF_ERROR(c->GetAttr("strides", &strides));
  TF_RETURN_IF_ERROR(c->GetAttr("dilations", &dilations));
  TF_RETURN_IF_ERROR(c->GetAttr("padding", &padding));
  if (strides.size() != 2 || dilations.size() != 2) {
    return ::tensorflow::errors::InvalidArgument(
        "strides and dilations must have 2 entries (height, width)");
  }
  DimensionHandle out_c, m;
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(kernel, 3), c->Dim(connections, 0), &out_c));
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(kernel, 2), c->Dim(connections, 1), &m));
  DimensionHandle out_h = c->UnknownDim(), out_w = c->UnknownDim();
  DimensionHandle kh = c->Dim(kernel, 0), kw = c->Dim(kernel, 1);
  if (c->ValueKnown(kh)) {
    TF_RETURN_IF_ERROR(OutputDim(c, c->Dim(x, 1), c->Value(kh), strides[0], dilations[0],
                                 padding == "SAME", &out_h));
  }
  if (c->ValueKnown(kw)) {
    TF_RETURN_IF_ERROR(OutputDim(c, c->Dim(x, 2), c->Value(kw), strides[1], dilations[1],
                                 padding == "SAME", &out_w));
  }
  c->set_output(0, c->MakeShape({c->Dim(x, 0), out_h, out_w, out_c}));
  return ::tensorflow::OkStatus();
}

Status BiasActivationShape(InferenceContext* c) {
  TF_RETURN_IF_ERROR(ForwardShape(c));
  ShapeHandle bias, y = c->output(0);
  TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 1, &bias));
  DimensionHandle out_c;
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(y, 3), c->Dim(bias, 0), &out_c));
  c->set_output(0, c->MakeShape({c->Dim(y, 0), c->Dim(y, 1), c->Dim(y, 2), out_c}));
  return ::tensorflow::OkStatus();
}

// The output is the rank-4 shape that input `kInput` (a shape tensor) holds:
// input 0 (input_sizes) for the input gradient, 1 (kernel_sizes) for the
// kernel gradient.
template <int kInput>
Status ShapeFromSizesInput(InferenceContext* c) {
  ShapeHandle shape;
  TF_RETURN_IF_ERROR(c->MakeShapeFromShapeTensor(kInput, &shape));
  TF_RETURN_IF_ERROR(c->WithRank(shape, 4, &shape));
  c->set_output(0, shape);
  return ::tensorflow::OkStatus();
}

}  // namespace

#define TSC_CONV_ATTRS                             \
  Attr("T: {half, bfloat16, float, double}")       \
      .Attr("strides: list(int) = [1, 1]")         \
      .Attr("padding: {'SAME', 'VALID'} = 'SAME'") \
      .Attr("dilations: list(int) = [1, 1]")

REGISTER_OP("TfSparseConv>ChannelSparseConv2D")
    .Input("x: T")
    .Input("kernel: T")
    .Input("connections: int32")
    .Output("y: T")
    .TSC_CONV_ATTRS.SetShapeFn(ForwardShape)
    .Doc(R"doc(
Channel-sparse 2-D convolution: output channel o reads only the input
channels connections[o, :] (m distinct values in [0, Cin)).

x: [B, H, W, Cin].
kernel: [kh, kw, m, Cout]; kernel[:, :, e, o] connects input channel
  connections[o, e] to output channel o.
connections: int32 [Cout, m].
y: equals conv2d(x, dense) with dense[:, :, connections[o, e], o] =
  kernel[:, :, e, o] and zeros elsewhere; the cost scales with m, not Cin.
strides, dilations: [height, width].
)doc");

REGISTER_OP("TfSparseConv>ChannelSparseConv2DBiasActivation")
    .Input("x: T")
    .Input("kernel: T")
    .Input("connections: int32")
    .Input("bias: T")
    .Output("y: T")
    .TSC_CONV_ATTRS.Attr("activation: {'linear', 'relu'} = 'linear'")
    .SetShapeFn(BiasActivationShape)
    .Doc(R"doc(
ChannelSparseConv2D with the bias and activation fused into its output
stage (one pass over y instead of three, as TensorFlow's _FusedConv2D does
for dense convolutions).

bias: [Cout].
y: activation(ChannelSparseConv2D(x, kernel, connections) + bias).
activation: 'linear' (none) or 'relu'.
)doc");

REGISTER_OP("TfSparseConv>ChannelSparseConv2DBackpropInput")
    .Input("input_sizes: int32")
    .Input("kernel: T")
    .Input("connections: int32")
    .Input("grad: T")
    .Output("x_grad: T")
    .TSC_CONV_ATTRS.SetShapeFn(ShapeFromSizesInput<0>)
    .Doc("Gradient of ChannelSparseConv2D with respect to x.");

REGISTER_OP("TfSparseConv>ChannelSparseConv2DBackpropKernel")
    .Input("x: T")
    .Input("kernel_sizes: int32")
    .Input("connections: int32")
    .Input("grad: T")
    .Output("kernel_grad: T")
    .TSC_CONV_ATTRS.SetShapeFn(ShapeFromSizesInput<1>)
    .Doc("Gradient of ChannelSparseConv2D with respect to kernel.");

#undef TSC_CONV_ATTRS

// The dense kernel of a channel-sparse one and back: what the dense dispatch
// of the Python wrappers (tf.nn.conv2d where it is faster) needs on every call,
// in one pass over the dense kernel (a one-hot contraction costs Cout * m * Cin).
namespace {

Status DenseKernelShape(InferenceContext* c) {
  ShapeHandle kernel, connections, lead;
  TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(0), 2, &kernel));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &connections));
  const int32_t rank = c->Rank(kernel);
  DimensionHandle m, cout;
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(kernel, rank - 2), c->Dim(connections, 1), &m));
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(kernel, rank - 1), c->Dim(connections, 0), &cout));
  int64_t in_channels;
  TF_RETURN_IF_ERROR(c->GetAttr("in_channels", &in_channels));
  TF_RETURN_IF_ERROR(c->Subshape(kernel, 0, rank - 2, &lead));
  ShapeHandle out;
  TF_RETURN_IF_ERROR(c->Concatenate(lead, c->MakeShape({c->MakeDim(in_channels), cout}), &out));
  c->set_output(0, out);
  return ::tensorflow::OkStatus();
}

Status GatherKernelShape(InferenceContext* c) {
  ShapeHandle dense, connections, lead;
  TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(0), 2, &dense));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &connections));
  const int32_t rank = c->Rank(dense);
  DimensionHandle cout;
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(dense, rank - 1), c->Dim(connections, 0), &cout));
  TF_RETURN_IF_ERROR(c->Subshape(dense, 0, rank - 2, &lead));
  ShapeHandle out;
  TF_RETURN_IF_ERROR(c->Concatenate(lead, c->MakeShape({c->Dim(connections, 1), cout}), &out));
  c->set_output(0, out);
  return ::tensorflow::OkStatus();
}

}  // namespace

REGISTER_OP("TfSparseConv>ChannelSparseDenseKernel")
    .Input("kernel: T")
    .Input("connections: int32")
    .Output("dense: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("in_channels: int >= 1")
    .SetShapeFn(DenseKernelShape)
    .Doc(R"doc(
The dense kernel equivalent to a channel-sparse one.

kernel: [..., m, Cout] (any leading kernel-window axes).
connections: [Cout, m], distinct values in [0, in_channels) per row.
dense: [..., in_channels, Cout], dense[..., connections[o, j], o] =
  kernel[..., j, o] and zeros elsewhere.
)doc");

REGISTER_OP("TfSparseConv>ChannelSparseGatherKernel")
    .Input("dense: T")
    .Input("connections: int32")
    .Output("kernel: T")
    .Attr("T: {half, bfloat16, float, double}")
    .SetShapeFn(GatherKernelShape)
    .Doc(R"doc(
The channel-sparse part of a dense kernel (the adjoint of
ChannelSparseDenseKernel, so each is the other's gradient).

dense: [..., Cin, Cout].
connections: [Cout, m], values in [0, Cin).
kernel: [..., m, Cout], kernel[..., j, o] = dense[..., connections[o, j], o].
)doc");

}  // namespace tf_sparseconv
