// Op registrations of the block-sparse (SBNet-style) primitives: reduce a
// computation mask to a list of active blocks, gather those blocks from a
// dense tensor, scatter (write or add) blocks back into one. Block geometry
// and semantics: tf_sparseconv/cc/kernels/block_sparse_common.h. The
// block-sparse convolution itself is composed in Python (gather with a
// halo -> dense convolution on the blocks -> scatter).
#include "tf_sparseconv/cc/ops/shape_util.h"

namespace tf_sparseconv {
namespace {

// A (height, width) attribute; sizes and strides must be positive.
Status PairAttr(InferenceContext* c, const char* name, std::vector<int32_t>* v,
                bool positive = true) {
  TF_RETURN_IF_ERROR(c->GetAttr(name, v));
  if (v->size() != 2) {
    return ::tensorflow::errors::InvalidArgument(name, " must have 2 entries (height, width)");
  }
  if (positive && ((*v)[0] < 1 || (*v)[1] < 1)) {
    return ::tensorflow::errors::InvalidArgument(name, " must be positive, got [", (*v)[0], ", ",
                                                 (*v)[1], "]");
  }
  return ::tensorflow::OkStatus();
}

Status ReduceMaskShape(InferenceContext* c) {
  ShapeHandle mask;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &mask));
  c->set_output(0, c->MakeShape({c->UnknownDim(), 3}));
  return ::tensorflow::OkStatus();
}

Status GatherShape(InferenceContext* c) {
  ShapeHandle x, indices;
  TF_RETURN_IF_ERROR(WithInputRanks(c, {{0, 4, &x}, {1, 2, &indices}}));
  DimensionHandle three;
  TF_RETURN_IF_ERROR(c->WithValue(c->Dim(indices, 1), 3, &three));
  std::vector<int32_t> size;
  TF_RETURN_IF_ERROR(PairAttr(c, "block_size", &size));
  c->set_output(0, c->MakeShape({c->Dim(indices, 0), size[0], size[1], c->Dim(x, 3)}));
  return ::tensorflow::OkStatus();
}

Status ScatterShape(InferenceContext* c) {
  ShapeHandle blocks, indices, base;
  TF_RETURN_IF_ERROR(WithInputRanks(c, {{0, 4, &blocks}, {1, 2, &indices}, {2, 4, &base}}));
  DimensionHandle merged;
  TF_RETURN_IF_ERROR(c->WithValue(c->Dim(indices, 1), 3, &merged));
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(blocks, 0), c->Dim(indices, 0), &merged));
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(blocks, 3), c->Dim(base, 3), &merged));
  c->set_output(0, base);
  return ::tensorflow::OkStatus();
}

}  // namespace

REGISTER_OP("TfSparseConv>ReduceMask")
    .Input("mask: T")
    .Output("indices: int32")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("block_size: list(int)")
    .Attr("block_stride: list(int)")
    .Attr("block_offset: list(int) = [0, 0]")
    .Attr("threshold: float = 0.0")
    .Attr("avgpool: bool = false")
    .SetShapeFn(ReduceMaskShape)
    .Doc(R"doc(
The active blocks of a computation mask.

mask: [B, H, W].
indices: int32 [n, 3] rows (b, bh, bw), in increasing order, of the blocks
  whose max over their in-range part (avgpool: sum over it divided by the
  block area) is > threshold. Block bh covers rows
  [offset_h + bh * stride_h, ... + size_h); likewise for columns.
)doc");

REGISTER_OP("TfSparseConv>SparseGather")
    .Input("x: T")
    .Input("indices: int32")
    .Output("blocks: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("block_size: list(int)")
    .Attr("block_stride: list(int)")
    .Attr("block_offset: list(int) = [0, 0]")
    .SetShapeFn(GatherShape)
    .Doc(R"doc(
Gathers blocks [n, size_h, size_w, C] of x [B, H, W, C] at the given block
indices (rows (b, bh, bw)); zeros where a block leaves the image.
)doc");

REGISTER_OP("TfSparseConv>SparseScatter")
    .Input("blocks: T")
    .Input("indices: int32")
    .Input("base: T")
    .Output("out: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("block_stride: list(int)")
    .Attr("block_offset: list(int) = [0, 0]")
    .Attr("add: bool = false")
    .SetShapeFn(ScatterShape)
    .Doc(R"doc(
A copy of base [B, H, W, C] with every block [n, size_h, size_w, C] written
(add = false; overlapping blocks are an error) or added (add = true,
deterministic) at its place, clipped to the image.
)doc");

REGISTER_OP("TfSparseConv>SparseScatterZeros")
    .Input("blocks: T")
    .Input("indices: int32")
    .Input("shape: int32")
    .Output("out: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("block_stride: list(int)")
    .Attr("block_offset: list(int) = [0, 0]")
    .Attr("add: bool = false")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle blocks, indices, out;
      TF_RETURN_IF_ERROR(WithInputRanks(c, {{0, 4, &blocks}, {1, 2, &indices}}));
      TF_RETURN_IF_ERROR(c->MakeShapeFromShapeTensor(2, &out));
      TF_RETURN_IF_ERROR(c->WithRank(out, 4, &out));
      DimensionHandle merged;
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(blocks, 3), c->Dim(out, 3), &merged));
      TF_RETURN_IF_ERROR(c->ReplaceDim(out, 3, merged, &out));
      c->set_output(0, out);
      return ::tensorflow::OkStatus();
    })
    .Doc(R"doc(
SparseScatter onto an all-zero base of the given shape [B, H, W, C] (the base
is never materialised: the output is zero-filled and the blocks written or
added once). Internal: what block_sparse_conv2d and the gather gradient use.
)doc");

}  // namespace tf_sparseconv
