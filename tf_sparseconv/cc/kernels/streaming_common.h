// Geometry of one streaming step of a causal 1-D convolution, shared by the
// CPU kernel, the GPU kernels and their TF-independent launcher (no
// TensorFlow headers).
//
// history [batch, hist, channels] (the last hist = (taps - 1) * dilation input
// frames), frames [batch, steps, channels], kernel [taps, channels, filters],
// bias [filters] or none. With z = concat(history, frames) along time:
//   y[b, j, f] = act(bias[f] + sum_{i < taps, c} z[b, j + i*dilation, c] * kernel[i, c, f])
//   new_history[b, q, c] = z[b, steps + q, c]           (q < hist)
// act is the identity or relu.
#ifndef TF_SPARSECONV_CC_KERNELS_STREAMING_COMMON_H_
#define TF_SPARSECONV_CC_KERNELS_STREAMING_COMMON_H_

#include <cstdint>

namespace tf_sparseconv {

struct StreamingGeometry {
  int64_t batch;
  int64_t steps;  // new frames
  int64_t hist;   // kept frames: (taps - 1) * dilation
  int64_t channels;
  int64_t filters;
  int64_t taps;
  int64_t dilation;
};

}  // namespace tf_sparseconv

#endif  // TF_SPARSECONV_CC_KERNELS_STREAMING_COMMON_H_
