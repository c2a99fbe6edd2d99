// Geometry of a channel-sparse 2-D convolution, shared by the CPU kernels,
// the GPU kernels and their TF-independent launcher (no TensorFlow headers).
//
// x [batch, in_h, in_w, in_c]; kernel [k_h, k_w, m, out_c]; connections
// [out_c, m] (int32, distinct values in [0, in_c) per row); y [batch, out_h,
// out_w, out_c] with
//   y[b, oh, ow, o] = sum_{i < k_h, j < k_w, e < m}
//       x[b, oh*stride_h - pad_top + i*dil_h, ow*stride_w - pad_left + j*dil_w,
//         connections[o, e]] * kernel[i, j, e, o]
// where x reads as 0 outside the image. Conv1D is the case in_h = k_h = 1.
#ifndef TF_SPARSECONV_CC_KERNELS_CHANNEL_SPARSE_COMMON_H_
#define TF_SPARSECONV_CC_KERNELS_CHANNEL_SPARSE_COMMON_H_

#include <cstdint>

namespace tf_sparseconv {

struct ChannelSparseGeometry {
  int64_t batch;
  int64_t in_h, in_w, in_c;
  int64_t out_h, out_w, out_c;
  int64_t m;  // input channels per output channel (fan-in)
  int64_t k_h, k_w;
  int64_t stride_h, stride_w;
  int64_t dil_h, dil_w;
  int64_t pad_top, pad_left;
};

}  // namespace tf_sparseconv

#endif  // TF_SPARSECONV_CC_KERNELS_CHANNEL_SPARSE_COMMON_H_
