// Traits of the four dtypes every op family registers (Eigen::half,
// Eigen::bfloat16, float, double): the storage type, float format and bit
// layout (DTypeTraits) and the arithmetic type (Acc).
#ifndef TF_SPARSECONV_CC_KERNELS_DTYPE_TRAITS_H_
#define TF_SPARSECONV_CC_KERNELS_DTYPE_TRAITS_H_

#include <cstdint>

#include "tensorflow/core/framework/numeric_types.h"
#include "tf_sparseconv/cc/kernels/float_format.h"

namespace tf_sparseconv {

// Storage type (an unsigned integer of the same width), float format and bit
// layout of each supported dtype.
template <typename T>
struct DTypeTraits;
template <>
struct DTypeTraits<Eigen::half> {
  using U = uint16_t;
  static constexpr FloatFormat kFormat = FloatFormat::kHalf;
  static FormatBits<U> Bits() { return HalfBits(); }
};
template <>
struct DTypeTraits<Eigen::bfloat16> {
  using U = uint16_t;
  static constexpr FloatFormat kFormat = FloatFormat::kBFloat16;
  static FormatBits<U> Bits() { return BFloat16Bits(); }
};
template <>
struct DTypeTraits<float> {
  using U = uint32_t;
  static constexpr FloatFormat kFormat = FloatFormat::kFloat;
  static FormatBits<U> Bits() { return FloatBits(); }
};
template <>
struct DTypeTraits<double> {
  using U = uint64_t;
  static constexpr FloatFormat kFormat = FloatFormat::kDouble;
  static FormatBits<U> Bits() { return DoubleBits(); }
};

// Arithmetic (accumulation) type of each storage type: float for the 16-bit
// types, else the type itself.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

}  // namespace tf_sparseconv

#endif  // TF_SPARSECONV_CC_KERNELS_DTYPE_TRAITS_H_
