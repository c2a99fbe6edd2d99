// The preamble of every family's op registrations (cc/ops/*_ops.cc): the
// headers and the shape-inference names their shape functions use.
#ifndef TF_SPARSECONV_CC_OPS_SHAPE_UTIL_H_
#define TF_SPARSECONV_CC_OPS_SHAPE_UTIL_H_

#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tf_sparseconv {

using ::tensorflow::Status;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

}  // namespace tf_sparseconv

#endif  // TF_SPARSECONV_CC_OPS_SHAPE_UTIL_H_
