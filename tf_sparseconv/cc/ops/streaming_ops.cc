// Op registration of the streaming step of a causal 1-D convolution (the hot
// path of tsc.streaming): one op per layer and frame instead of a dozen.
#include "tf_sparseconv/cc/ops/shape_util.h"

namespace tf_sparseconv {
namespace {

Status StreamingConvStepShape(InferenceContext* c) {
  ShapeHandle history, frames, kernel, bias;
  TF_RETURN_IF_ERROR(
      WithInputRanks(c, {{0, 3, &history}, {1, 3, &frames}, {2, 3, &kernel}, {3, 1, &bias}}));
  DimensionHandle batch, channels;
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(history, 0), c->Dim(frames, 0), &batch));
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(history, 2), c->Dim(frames, 2), &channels));
  TF_RETURN_IF_ERROR(c->Merge(channels, c->Dim(kernel, 1), &channels));
  int dilation;
  TF_RETURN_IF_ERROR(c->GetAttr("dilation", &dilation));
  DimensionHandle hist = c->Dim(history, 1);
  if (c->ValueKnown(c->Dim(kernel, 0))) {
    const int64_t taps = c->Value(c->Dim(kernel, 0));
    TF_RETURN_IF_ERROR(c->Merge(hist, c->MakeDim((taps - 1) * dilation), &hist));
  }
  c->set_output(0, c->MakeShape({batch, c->Dim(frames, 1), c->Dim(kernel, 2)}));
  c->set_output(1, c->MakeShape({batch, hist, channels}));
  return ::tensorflow::OkStatus();
}

}  // namespace

REGISTER_OP("TfSparseConv>StreamingConvStep")
    .Input("history: T")
    .Input("frames: T")
    .Input("kernel: T")
    .Input("bias: T")
    .Output("y: T")
    .Output("new_history: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("dilation: int >= 1 = 1")
    .Attr("activation: {'linear', 'relu'} = 'linear'")
    .SetShapeFn(StreamingConvStepShape)
    .Doc(R"doc(
One streaming step of a causal 1-D convolution (stride 1): the outputs for the
new frames, computed from them and the kept history, and the new history.

history: [B, (taps - 1) * dilation, C], the last input frames (zeros at the
  start of a sequence: the causal padding).
frames: [B, t, C], the new input frames (t >= 0).
kernel: [taps, C, F].
bias: [F], or [0] for none.
y: [B, t, F], y[b, j] = activation(bias + sum_i z[b, j + i * dilation] @ kernel[i])
  with z = concat(history, frames) along time.
new_history: [B, (taps - 1) * dilation, C], the last frames of z.
)doc");

}  // namespace tf_sparseconv
