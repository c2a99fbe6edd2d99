// The float formats of the supported dtypes (half, bfloat16, float, double)
// as the TensorFlow-independent GPU launchers see them: storage width and the
// sign and +inf bit patterns. Plain C++ usable from host and device code
// (compiled by g++ and nvcc).
#ifndef TF_SPARSECONV_CC_KERNELS_FLOAT_FORMAT_H_
#define TF_SPARSECONV_CC_KERNELS_FLOAT_FORMAT_H_

#include <cstdint>

#if defined(__CUDACC__)
#define TSC_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TSC_HOST_DEVICE inline
#endif

namespace tf_sparseconv {

// The float formats, by storage width and the bit pattern of +inf.
enum class FloatFormat : int { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };

// Storage width in bytes of a float format.
TSC_HOST_DEVICE int FormatBytes(FloatFormat format) {
  switch (format) {
    case FloatFormat::kHalf:
    case FloatFormat::kBFloat16:
      return 2;
    case FloatFormat::kFloat:
      return 4;
    case FloatFormat::kDouble:
      return 8;
  }
  return 0;
}

template <typename U>
struct FormatBits {
  U sign;  // the sign bit
  U inf;   // bit pattern of +inf; |bits| > inf means NaN
};

TSC_HOST_DEVICE FormatBits<uint16_t> HalfBits() { return {0x8000u, 0x7C00u}; }
TSC_HOST_DEVICE FormatBits<uint16_t> BFloat16Bits() { return {0x8000u, 0x7F80u}; }
TSC_HOST_DEVICE FormatBits<uint32_t> FloatBits() { return {0x80000000u, 0x7F800000u}; }
TSC_HOST_DEVICE FormatBits<uint64_t> DoubleBits() {
  return {0x8000000000000000ull, 0x7FF0000000000000ull};
}

}  // namespace tf_sparseconv

#endif  // TF_SPARSECONV_CC_KERNELS_FLOAT_FORMAT_H_
