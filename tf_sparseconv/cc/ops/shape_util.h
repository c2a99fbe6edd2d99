// The preamble of every family's op registrations (cc/ops/*_ops.cc): the
// headers and the shape-inference names their shape functions use.
#ifndef TF_SPARSECONV_CC_OPS_SHAPE_UTIL_H_
#define TF_SPARSECONV_CC_OPS_SHAPE_UTIL_H_

#include <initializer_list>

#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tf_sparseconv {

using ::tensorflow::Status;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

// One input of a shape function: its index, the rank it must have, and where
// its shape goes.
struct InputRank {
  int input;
  int rank;
  ShapeHandle* shape;
};

// Checks the listed inputs' ranks, in order (the first mismatch is the
// error), and stores their shapes.
inline Status WithInputRanks(InferenceContext* c, std::initializer_list<InputRank> inputs) {
  for (const InputRank& in : inputs) {
    TF_RETURN_IF_ERROR(c->WithRank(c->input(in.input), in.rank, in.shape));
  }
  return ::tensorflow::OkStatus();
}

}  // namespace tf_sparseconv

#endif  // TF_SPARSECONV_CC_OPS_SHAPE_UTIL_H_
