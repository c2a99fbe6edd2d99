// Op registrations of the coordinate (site-sparse) convolution family. The
// rulebook op lists, for every kernel offset, which input site feeds which
// output site; the convolution itself gathers, multiplies and scatters along
// it. Geometry: tf_sparseconv/cc/kernels/coord_sparse_common.h.
#include <limits>
#include <vector>

#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tf_sparseconv {

using ::tensorflow::Status;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

namespace {

// A per-axis attribute: 1 to 3 positive entries.
Status AxisAttr(InferenceContext* c, const char* name, std::vector<int32_t>* v) {
  TF_RETURN_IF_ERROR(c->GetAttr(name, v));
  if (v->empty() || v->size() > 3) {
    return ::tensorflow::errors::InvalidArgument(name, " must have 1, 2 or 3 entries, got ",
                                                 v->size());
  }
  for (int32_t x : *v) {
    if (x < 1) {
      return ::tensorflow::errors::InvalidArgument(name, " must be positive, got ", x);
    }
  }
  return ::tensorflow::OkStatus();
}

Status RulebookShape(InferenceContext* c) {
  std::vector<int32_t> kernel, strides, dilations;
  TF_RETURN_IF_ERROR(AxisAttr(c, "kernel_size", &kernel));
  TF_RETURN_IF_ERROR(AxisAttr(c, "strides", &strides));
  TF_RETURN_IF_ERROR(AxisAttr(c, "dilations", &dilations));
  const int64_t dims = static_cast<int64_t>(kernel.size());
  if (static_cast<int64_t>(strides.size()) != dims ||
      static_cast<int64_t>(dilations.size()) != dims) {
    return ::tensorflow::errors::InvalidArgument(
        "kernel_size, strides and dilations must have the same length, got ", kernel.size(), ", ",
        strides.size(), " and ", dilations.size());
  }
  bool submanifold = false;
  TF_RETURN_IF_ERROR(c->GetAttr("submanifold", &submanifold));
  ShapeHandle coords, shape;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &coords));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 1, &shape));
  DimensionHandle merged;
  TF_RETURN_IF_ERROR(c->WithValue(c->Dim(shape, 0), dims, &merged));
  TF_RETURN_IF_ERROR(c->WithValue(c->Dim(coords, 1), dims + 1, &merged));
  int64_t num_offsets = 1;
  for (int32_t k : kernel) {
    num_offsets *= k;
    if (num_offsets >= std::numeric_limits<int32_t>::max()) {
      return ::tensorflow::errors::InvalidArgument(
          "kernel_size has too many offsets (prod(kernel_size) must be below 2^31 - 1)");
    }
  }
  c->set_output(0, c->MakeShape({submanifold ? c->Dim(coords, 0) : c->UnknownDim(), dims + 1}));
  c->set_output(1, c->MakeShape({num_offsets + 1}));
  c->set_output(2, c->MakeShape({c->UnknownDim(), 2}));
  c->set_output(3, c->MakeShape({dims}));
  return ::tensorflow::OkStatus();
}

}  // namespace

REGISTER_OP("TfSparseConv>SparseConvRulebook")
    .Input("coords: int32")
    .Input("spatial_shape: int32")
    .Output("out_coords: int32")
    .Output("pair_ptr: int32")
    .Output("pairs: int32")
    .Output("out_spatial_shape: int32")
    .Attr("kernel_size: list(int)")
    .Attr("strides: list(int)")
    .Attr("dilations: list(int)")
    .Attr("submanifold: bool = true")
    .SetShapeFn(RulebookShape)
    .Doc(R"doc(
The rulebook of a "SAME"-padded convolution on a sparse map.

coords: int32 [N, 1 + D] unique sites (batch, then D spatial indices), D in
  {1, 2, 3}, inside spatial_shape.
spatial_shape: int32 [D], positive.
out_coords: int32 [M, 1 + D]: submanifold = true (strides must be 1): coords
  itself; otherwise every output position (grid ceil(spatial_shape /
  strides)) that reads at least one input site, sorted by (b, spatial...).
pair_ptr: int32 [K + 1], K = prod(kernel_size): the pairs of kernel offset
  k (row-major over the kernel dims) are pairs[pair_ptr[k]:pair_ptr[k + 1]].
pairs: int32 [P, 2] rows (in_row, out_row), grouped by offset, sorted by
  out_row within an offset. Output position o reads input position
  o * stride - pad_before + tap * dilation per axis, with pad_before =
  max((out - 1) * stride + (kernel - 1) * dilation + 1 - length, 0) / 2.
out_spatial_shape: int32 [D], ceil(spatial_shape / strides).
)doc");

}  // namespace tf_sparseconv
