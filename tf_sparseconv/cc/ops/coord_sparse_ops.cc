// Op registrations of the coordinate (site-sparse) convolution family. The
// rulebook op lists, for every kernel offset, which input site feeds which
// output site; the convolution itself gathers, multiplies and scatters along
// it. Geometry: tf_sparseconv/cc/kernels/coord_sparse_common.h.
#include <limits>
#include <vector>

#include "tf_sparseconv/cc/ops/shape_util.h"

namespace tf_sparseconv {
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
  TF_RETURN_IF_ERROR(WithInputRanks(c, {{0, 2, &coords}, {1, 1, &shape}}));
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

Status RulebookPairs(InferenceContext* c, int pair_ptr_input, int pairs_input, DimensionHandle* k) {
  ShapeHandle ptr, pairs;
  TF_RETURN_IF_ERROR(WithInputRanks(c, {{pair_ptr_input, 1, &ptr}, {pairs_input, 2, &pairs}}));
  DimensionHandle two;
  TF_RETURN_IF_ERROR(c->WithValue(c->Dim(pairs, 1), 2, &two));
  *k = c->Dim(ptr, 0);
  if (c->ValueKnown(*k)) {
    if (c->Value(*k) < 1) {
      return ::tensorflow::errors::InvalidArgument("pair_ptr must have K + 1 >= 1 entries");
    }
    *k = c->MakeDim(c->Value(*k) - 1);
  }
  return ::tensorflow::OkStatus();
}

// features [N, Cin], kernel [K, Cin, Cout], pair_ptr [K + 1], pairs [P, 2],
// num_out [] -> [num_out, Cout].
Status FeaturesShape(InferenceContext* c) {
  ShapeHandle features, kernel, num_out;
  TF_RETURN_IF_ERROR(WithInputRanks(c, {{0, 2, &features}, {1, 3, &kernel}, {4, 0, &num_out}}));
  DimensionHandle k, merged;
  TF_RETURN_IF_ERROR(RulebookPairs(c, 2, 3, &k));
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(kernel, 0), k, &merged));
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(features, 1), c->Dim(kernel, 1), &merged));
  DimensionHandle rows;
  TF_RETURN_IF_ERROR(c->MakeDimForScalarInput(4, &rows));
  c->set_output(0, c->Matrix(rows, c->Dim(kernel, 2)));
  return ::tensorflow::OkStatus();
}

// features [N, Cin], grad [M, Cout], pair_ptr [K + 1], pairs [P, 2] -> [K, Cin, Cout].
Status KernelGradShape(InferenceContext* c) {
  ShapeHandle features, grad;
  TF_RETURN_IF_ERROR(WithInputRanks(c, {{0, 2, &features}, {1, 2, &grad}}));
  DimensionHandle k;
  TF_RETURN_IF_ERROR(RulebookPairs(c, 2, 3, &k));
  c->set_output(0, c->MakeShape({k, c->Dim(features, 1), c->Dim(grad, 1)}));
  return ::tensorflow::OkStatus();
}

}  // namespace

REGISTER_OP("TfSparseConv>SparseConvFeatures")
    .Input("features: T")
    .Input("kernel: T")
    .Input("pair_ptr: int32")
    .Input("pairs: int32")
    .Input("num_out: int32")
    .Output("out: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("symmetric: bool = false")
    .SetShapeFn(FeaturesShape)
    .Doc(R"doc(
Gather -> GEMM per kernel offset -> scatter-add along a rulebook:

  out[dst] = sum_k sum_{(src, dst) in offset k} features[src] @ kernel[k]

features: [N, Cin]. kernel: [K, Cin, Cout]. pair_ptr: int32 [K + 1],
non-decreasing from 0 to P. pairs: int32 [P, 2] rows (src, dst) with src in
[0, N) and dst in [0, num_out), dst non-decreasing within each offset (the
rulebook of SparseConvRulebook, or its transpose). num_out: int32 scalar >= 0.
out: [num_out, Cout]; rows without pairs are 0. Summation order per output
row is the offset order: bitwise deterministic.
symmetric: a promise used only by the gradient: the pairs of offset k, with
  src and dst swapped, are exactly the pairs of offset K - 1 - k (true for a
  submanifold rulebook whose kernel extents (k - 1) * d are all even). The
  features gradient then runs on the same rulebook with the kernel reversed
  instead of on a transposed rulebook.
)doc");

REGISTER_OP("TfSparseConv>SparseConvKernelGrad")
    .Input("features: T")
    .Input("grad: T")
    .Input("pair_ptr: int32")
    .Input("pairs: int32")
    .Output("kernel_grad: T")
    .Attr("T: {half, bfloat16, float, double}")
    .SetShapeFn(KernelGradShape)
    .Doc(R"doc(
Gradient of SparseConvFeatures w.r.t. its kernel:

  kernel_grad[k] = sum_{(src, dst) in offset k} features[src]^T grad[dst]

features: [N, Cin]. grad: [M, Cout]. pair_ptr, pairs: as for
SparseConvFeatures (any order within an offset). kernel_grad: [K, Cin,
Cout], summed in a fixed order (deterministic).
)doc");

REGISTER_OP("TfSparseConv>SparseConvRulebookTranspose")
    .Input("pair_ptr: int32")
    .Input("pairs: int32")
    .Input("num_src: int32")
    .Output("transposed: int32")
    .SetShapeFn([](InferenceContext* c) {
      DimensionHandle k;
      TF_RETURN_IF_ERROR(RulebookPairs(c, 0, 1, &k));
      ShapeHandle num_src;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 0, &num_src));
      c->set_output(0, c->input(1));
      return ::tensorflow::OkStatus();
    })
    .Doc(R"doc(
The transposed rulebook: per offset, every pair (src, dst) becomes (dst, src),
sorted by its new dst (= src, ties in the original order). pair_ptr is
unchanged. SparseConvFeatures on the transposed rulebook with the kernel's
channel axes swapped is the transpose (gradient) of the convolution, and with
a downsampling rulebook it is the inverse (transposed) convolution.
pair_ptr, pairs: a rulebook as for SparseConvFeatures. num_src: int32 scalar,
the number of src rows (src values must lie in [0, num_src)).
)doc");

REGISTER_OP("TfSparseConv>TopKSites")
    .Input("features: T")
    .Input("coords: int32")
    .Input("k: int32")
    .Output("rows: int32")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("score: {'l2', 'abs_max'} = 'l2'")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle features, coords, k;
      TF_RETURN_IF_ERROR(WithInputRanks(c, {{0, 2, &features}, {1, 2, &coords}, {2, 0, &k}}));
      DimensionHandle n;
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(features, 0), c->Dim(coords, 0), &n));
      c->set_output(0, c->Vector(c->UnknownDim()));
      return ::tensorflow::OkStatus();
    })
    .Doc(R"doc(
The rows kept by the attention step of a sparse map: per batch sample
(coords[:, 0]) the k sites with the largest score ("l2": L2 norm of the
feature row, "abs_max": max |value|; NaN ranks above +inf), ties to the lower
row. rows: int32, ascending (the kept sites in their original order).
features: [N, C]. coords: int32 [N, 1 + D] (only the batch column is read;
it must be >= 0). k: int32 scalar >= 1.
)doc");

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
