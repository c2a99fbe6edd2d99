// Geometry of coordinate (site-sparse) convolution, shared by the CPU kernel
// and a later GPU kernel (no TensorFlow headers).
//
// A sparse map is coords int32 [N, 1 + D] (batch, then D spatial indices,
// D = 1, 2, 3) inside spatial_shape [D]. A convolution with kernel_size k,
// strides s and dilations d (per axis) and padding "SAME" has the output grid
// out = ceil(L / s) per axis and
//
//   pad_before = max((out - 1) * s + (k - 1) * d + 1 - L, 0) / 2,
//
// so output position o reads, through kernel tap t (0 <= t < k), input
// position p = o * s - pad_before + t * d. Kernel offsets are numbered in
// row-major order over the kernel dims. The rulebook lists, per offset, the
// (input row, output row) pairs where an input site sits at p for an output
// site at o, sorted by output row.
//
// Sites are located through an open-addressing hash table (linear probing,
// power-of-two capacity) of packed keys: key = mixed-radix number of
// (b, x_0, ..., x_{D-1}) with radices (., L_0, ..., L_{D-1}), so that key
// order is (b, spatial...) order. Empty slots hold kEmptyKey.
#ifndef TF_SPARSECONV_CC_KERNELS_COORD_SPARSE_COMMON_H_
#define TF_SPARSECONV_CC_KERNELS_COORD_SPARSE_COMMON_H_

#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define TSC_COORD_HD __host__ __device__ inline
#else
#define TSC_COORD_HD inline
#endif

namespace tf_sparseconv {

constexpr int kMaxCoordDims = 3;
constexpr int64_t kEmptyKey = -1;
// Row counts and indices are int32 in the rulebooks and site lists.
constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

struct ConvGeometry {
  int dims;  // D
  int64_t in_shape[kMaxCoordDims];
  int64_t out_shape[kMaxCoordDims];
  int64_t kernel[kMaxCoordDims];
  int64_t stride[kMaxCoordDims];
  int64_t dilation[kMaxCoordDims];
  int64_t pad[kMaxCoordDims];  // pad_before
  int64_t num_offsets;         // prod(kernel)
};

// ceil(length / stride).
TSC_COORD_HD int64_t ConvOutSize(int64_t length, int64_t stride) {
  return (length + stride - 1) / stride;
}

// Padding before the first element for padding "SAME".
TSC_COORD_HD int64_t ConvPadBefore(int64_t length, int64_t out, int64_t kernel, int64_t stride,
                                   int64_t dilation) {
  const int64_t total = (out - 1) * stride + (kernel - 1) * dilation + 1 - length;
  return total > 0 ? total / 2 : 0;
}

// Fills out_shape, pad and num_offsets from the other fields.
TSC_COORD_HD void FinishGeometry(ConvGeometry* g) {
  g->num_offsets = 1;
  for (int a = 0; a < g->dims; ++a) {
    g->out_shape[a] = ConvOutSize(g->in_shape[a], g->stride[a]);
    g->pad[a] =
        ConvPadBefore(g->in_shape[a], g->out_shape[a], g->kernel[a], g->stride[a], g->dilation[a]);
    g->num_offsets *= g->kernel[a];
  }
}

// Kernel taps t[0..D) of offset number `offset` (row-major over the kernel).
TSC_COORD_HD void OffsetTaps(const ConvGeometry& g, int64_t offset, int64_t* taps) {
  for (int a = g.dims - 1; a >= 0; --a) {
    taps[a] = offset % g.kernel[a];
    offset /= g.kernel[a];
  }
}

// Packed key of site (b, x) in a grid of the given shape.
TSC_COORD_HD int64_t PackSite(int dims, const int64_t* shape, int64_t b, const int64_t* x) {
  int64_t key = b;
  for (int a = 0; a < dims; ++a) key = key * shape[a] + x[a];
  return key;
}

// Inverse of PackSite: writes (b, x) to out[0..1+D).
TSC_COORD_HD void UnpackSite(int dims, const int64_t* shape, int64_t key, int64_t* out) {
  for (int a = dims - 1; a >= 0; --a) {
    out[1 + a] = key % shape[a];
    key /= shape[a];
  }
  out[0] = key;
}

// Input position read by output position `o` through taps `t`; false when
// it lies outside the input grid.
TSC_COORD_HD bool InputPosition(const ConvGeometry& g, const int64_t* o, const int64_t* t,
                                int64_t* p) {
  for (int a = 0; a < g.dims; ++a) {
    p[a] = o[a] * g.stride[a] - g.pad[a] + t[a] * g.dilation[a];
    if (p[a] < 0 || p[a] >= g.in_shape[a]) return false;
  }
  return true;
}

// Output position that reads input position `p` through taps `t`; false
// when there is none (not on the stride lattice, or outside the output grid).
TSC_COORD_HD bool OutputPosition(const ConvGeometry& g, const int64_t* p, const int64_t* t,
                                 int64_t* o) {
  for (int a = 0; a < g.dims; ++a) {
    const int64_t num = p[a] + g.pad[a] - t[a] * g.dilation[a];
    if (num < 0 || num % g.stride[a] != 0) return false;
    o[a] = num / g.stride[a];
    if (o[a] >= g.out_shape[a]) return false;
  }
  return true;
}

// A 64-bit finaliser (good avalanche) for hashing packed keys.
TSC_COORD_HD uint64_t MixKey(int64_t key) {
  uint64_t z = static_cast<uint64_t>(key) + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Hash capacity for n keys: a power of two >= 2n (load factor <= 1/2), >= 16.
inline int64_t HashCapacity(int64_t n) {
  int64_t cap = 16;
  while (cap < 2 * n) cap <<= 1;
  return cap;
}

// One hash slot: the packed key (kEmptyKey when free) and its row, side by
// side so that a probe touches one cache line.
struct HashSlot {
  int64_t key;
  int32_t row;
  int32_t unused;
};

// Row stored under `key`, or -1. `slots` has `capacity` entries.
TSC_COORD_HD int32_t HashFind(const HashSlot* slots, int64_t capacity, int64_t key) {
  const uint64_t mask = static_cast<uint64_t>(capacity) - 1;
  for (uint64_t slot = MixKey(key) & mask;; slot = (slot + 1) & mask) {
    const int64_t k = slots[slot].key;
    if (k == key) return slots[slot].row;
    if (k == kEmptyKey) return -1;
  }
}

// Inserts key -> row (single writer); returns the row already stored under
// `key` (a duplicate) or -1 when it was inserted.
inline int32_t HashInsert(HashSlot* slots, int64_t capacity, int64_t key, int32_t row) {
  const uint64_t mask = static_cast<uint64_t>(capacity) - 1;
  for (uint64_t slot = MixKey(key) & mask;; slot = (slot + 1) & mask) {
    const int64_t k = slots[slot].key;
    if (k == key) return slots[slot].row;
    if (k == kEmptyKey) {
      slots[slot].key = key;
      slots[slot].row = row;
      return -1;
    }
  }
}

}  // namespace tf_sparseconv

#endif  // TF_SPARSECONV_CC_KERNELS_COORD_SPARSE_COMMON_H_
