// Shared, TensorFlow-independent pieces of the top-k selection family
// (k-winners-take-all and top-k attention). Compiled by g++ for the CPU
// kernels and by nvcc for the GPU kernels, so everything here is plain C++
// usable from host and device code.
//
// Values are ranked through an order-preserving map of their IEEE bit
// pattern onto an unsigned integer of the same width ("key"). This gives a
// total order for every float format we support (half, bfloat16, float,
// double) without converting to float, makes the selection deterministic,
// and lets one implementation serve all four dtypes:
//   * -0 and +0 rank equal (ties are then broken by the lower index);
//   * NaN ranks above +inf (whatever its sign bit);
//   * in "abs" mode the key of x is the key of |x|.
#ifndef TF_SPARSECONV_CC_KERNELS_TOPK_COMMON_H_
#define TF_SPARSECONV_CC_KERNELS_TOPK_COMMON_H_

#include <cstdint>

#include "tf_sparseconv/cc/kernels/float_format.h"

namespace tf_sparseconv {

// How entries are scored. kValue: score x (k-winners). kAbs: score |x|.
// kRelu: score x, and only entries > 0 survive the selection.
enum class ScoreMode : int { kValue = 0, kAbs = 1, kRelu = 2 };

// Order-preserving key of the value with bit pattern `b` under `mode`
// (kRelu ranks like kValue).
// Written with selects only, so that loops over it vectorise.
template <typename U>
TSC_HOST_DEVICE U OrderedKey(U b, FormatBits<U> f, ScoreMode mode) {
  const U mag = static_cast<U>(b & static_cast<U>(~f.sign));
  const U flipped = (b & f.sign) ? static_cast<U>(~b) : static_cast<U>(b | f.sign);
  // -0 ranks as +0; |x| ranks by magnitude.
  const U key =
      mode == ScoreMode::kAbs ? static_cast<U>(mag | f.sign) : (mag == 0 ? f.sign : flipped);
  return mag > f.inf ? static_cast<U>(~U(0)) : key;  // NaN: highest
}

// True if the value with bit pattern `b` is > 0 (NaN is not).
template <typename U>
TSC_HOST_DEVICE bool IsPositive(U b, FormatBits<U> f) {
  return !(b & f.sign) && b != 0 && b <= f.inf;
}

// Geometry of a selection: x is viewed as [outer, size, inner]; each of the
// outer * inner slices of `size` entries (stride `inner`) keeps `k` entries,
// 0 <= k <= size. The winners' positions are written to `indices`, viewed as
// [outer, k, inner], in ascending order of position; a winner that does not
// survive (kRelu, value <= 0) is written as -1.
struct TopKGeometry {
  int64_t outer;
  int64_t size;
  int64_t inner;
  int64_t k;
};

}  // namespace tf_sparseconv

#endif  // TF_SPARSECONV_CC_KERNELS_TOPK_COMMON_H_
