// Op registrations of the top-k family: k-winners-take-all along an axis and
// top-k attention over the positions of [B, *spatial, C] feature maps.
//
// The forward ops return the masked tensor and the positions of the winners
// (int32, ascending per slice; -1 for a winner dropped by mode="relu"); the
// gradient ops scatter the upstream gradient back to those positions, which
// is cheaper than selecting again.
#include "tf_sparseconv/cc/ops/shape_util.h"

namespace tf_sparseconv {
namespace {

// Number of winners per slice for a slice of `size` entries: min(k, size),
// or unknown while k or size is.
Status WinnersDim(InferenceContext* c, DimensionHandle size, DimensionHandle* out) {
  ShapeHandle k_shape;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 0, &k_shape));
  const ::tensorflow::Tensor* k_tensor = c->input_tensor(1);
  if (k_tensor == nullptr || !c->ValueKnown(size)) {
    *out = c->UnknownDim();
    return ::tensorflow::OkStatus();
  }
  const int64_t k = k_tensor->scalar<int32_t>()();
  if (k < 1) {
    return ::tensorflow::errors::InvalidArgument("k must be >= 1, got ", k);
  }
  *out = c->MakeDim(std::min<int64_t>(k, c->Value(size)));
  return ::tensorflow::OkStatus();
}

Status KWinnersShape(InferenceContext* c) {
  ShapeHandle x = c->input(0);
  c->set_output(0, x);
  if (!c->RankKnown(x)) {
    c->set_output(1, c->UnknownShape());
    return ::tensorflow::OkStatus();
  }
  const int32_t rank = c->Rank(x);
  int64_t axis;
  TF_RETURN_IF_ERROR(c->GetAttr("axis", &axis));
  if (axis < -rank || axis >= rank) {
    return ::tensorflow::errors::InvalidArgument("axis must be in [", -rank, ", ", rank,
                                                 ") for x of rank ", rank, ", got ", axis);
  }
  if (axis < 0) axis += rank;
  DimensionHandle winners;
  TF_RETURN_IF_ERROR(WinnersDim(c, c->Dim(x, axis), &winners));
  ShapeHandle indices;
  TF_RETURN_IF_ERROR(c->ReplaceDim(x, axis, winners, &indices));
  c->set_output(1, indices);
  return ::tensorflow::OkStatus();
}

Status TopKAttentionShape(InferenceContext* c) {
  ShapeHandle x = c->input(0);
  if (c->RankKnown(x)) {
    const int32_t rank = c->Rank(x);
    if (rank < 3 || rank > 5) {
      return ::tensorflow::errors::InvalidArgument(
          "x must be [B, *spatial, C] with 1 to 3 spatial dims, got rank ", rank);
    }
  }
  c->set_output(0, x);
  if (!c->RankKnown(x)) {
    c->set_output(1, c->UnknownShape());
    return ::tensorflow::OkStatus();
  }
  std::string per;
  TF_RETURN_IF_ERROR(c->GetAttr("per", &per));
  const int32_t rank = c->Rank(x);
  DimensionHandle size = c->MakeDim(1);
  for (int32_t d = 1; d < rank - 1; ++d) {
    TF_RETURN_IF_ERROR(c->Multiply(size, c->Dim(x, d), &size));
  }
  if (per == "sample") {
    TF_RETURN_IF_ERROR(c->Multiply(size, c->Dim(x, rank - 1), &size));
  }
  DimensionHandle winners;
  TF_RETURN_IF_ERROR(WinnersDim(c, size, &winners));
  if (per == "sample") {
    c->set_output(1, c->Matrix(c->Dim(x, 0), winners));
  } else {
    c->set_output(1, c->MakeShape({c->Dim(x, 0), winners, c->Dim(x, rank - 1)}));
  }
  return ::tensorflow::OkStatus();
}

Status GradShape(InferenceContext* c) {
  c->set_output(0, c->input(0));
  return ::tensorflow::OkStatus();
}

}  // namespace

REGISTER_OP("TfSparseConv>KWinners")
    .Input("x: T")
    .Input("k: int32")
    .Output("y: T")
    .Output("indices: int32")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("axis: int = -1")
    .SetShapeFn(KWinnersShape)
    .Doc(R"doc(
k-winners-take-all: in each 1-D slice of `x` along `axis`, keeps the `k`
largest values (ties to the lower index) and sets the rest to 0.

y: `x` with all but the k winners of each slice zeroed.
indices: positions of the winners along `axis`, ascending, with `axis` of
  length min(k, size); used by the gradient.
)doc");

REGISTER_OP("TfSparseConv>KWinnersGrad")
    .Input("grad: T")
    .Input("indices: int32")
    .Output("x_grad: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("axis: int = -1")
    .SetShapeFn(GradShape)
    .Doc("Gradient of KWinners: `grad` at the winners, 0 elsewhere.");

REGISTER_OP("TfSparseConv>TopKAttention")
    .Input("x: T")
    .Input("k: int32")
    .Output("y: T")
    .Output("indices: int32")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("mode: {'abs', 'relu'} = 'abs'")
    .Attr("per: {'channel', 'sample'} = 'channel'")
    .SetShapeFn(TopKAttentionShape)
    .Doc(R"doc(
Top-k attention over [B, *spatial, C]: per sample (and per channel with
per="channel") keeps the k entries with the largest score (|x| for
mode="abs"; x for mode="relu", where only entries > 0 survive), ties to the
lower flat index, and zeroes the rest.

indices: flat positions of the winners ([B, k, C] over the spatial positions
  for per="channel", [B, k] over spatial*C for per="sample"), ascending, -1
  where a winner did not survive mode="relu".
)doc");

REGISTER_OP("TfSparseConv>TopKAttentionGrad")
    .Input("grad: T")
    .Input("indices: int32")
    .Output("x_grad: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("per: {'channel', 'sample'} = 'channel'")
    .SetShapeFn(GradShape)
    .Doc("Gradient of TopKAttention: `grad` at the winners, 0 elsewhere.");

}  // namespace tf_sparseconv
