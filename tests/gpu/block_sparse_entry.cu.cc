// Test-only C entry points of block_sparse_op_gpu.cu.cc for ctypes (tests/gpu/test_*_gpu.py):
// the launchers of block_sparse_launcher.h with plain ints and arrays. Compiled into the
// standalone harness library by tests/gpu/build.py only, never into the
// TensorFlow op library.
// `geometry` points to 12 int64 in the field order of BlockGeometry.
#include <cstdint>
#include <cstring>

#include "tf_sparseconv/cc/kernels/block_sparse_launcher.h"

namespace {

// BlockGeometry is its 12 int64 fields, in order: a byte copy.
static_assert(sizeof(tf_sparseconv::BlockGeometry) == 12 * sizeof(int64_t), "BlockGeometry");
tf_sparseconv::BlockGeometry UnpackGeometry(const int64_t* v) {
  tf_sparseconv::BlockGeometry g;
  std::memcpy(&g, v, sizeof(g));
  return g;
}

constexpr const char* kNullGeometry = "tsc_block_sparse: geometry is null";

}  // namespace

extern "C" {

int64_t tsc_reduce_mask_gpu_workspace_bytes(const int64_t* geometry) {
  if (geometry == nullptr) return 0;
  return tf_sparseconv::ReduceMaskGpuWorkspaceBytes(UnpackGeometry(geometry));
}

const char* tsc_reduce_mask_count_gpu(int format, const void* mask, float threshold, int avgpool,
                                      const int64_t* geometry, void* workspace, int64_t* count,
                                      void* stream) {
  if (geometry == nullptr) return kNullGeometry;
  return tf_sparseconv::LaunchReduceMaskCountGpu(
      static_cast<tf_sparseconv::FloatFormat>(format), mask, threshold, avgpool != 0,
      UnpackGeometry(geometry), workspace, count, stream);
}

const char* tsc_reduce_mask_indices_gpu(const int64_t* geometry, void* workspace, int32_t* indices,
                                        int64_t count, void* stream) {
  if (geometry == nullptr) return kNullGeometry;
  return tf_sparseconv::LaunchReduceMaskIndicesGpu(UnpackGeometry(geometry), workspace, indices,
                                                   count, stream);
}

const char* tsc_sparse_gather_gpu(int format, const void* x, const int32_t* indices, int64_t n,
                                  void* blocks, const int64_t* geometry, void* stream) {
  if (geometry == nullptr) return kNullGeometry;
  return tf_sparseconv::LaunchSparseGatherGpu(static_cast<tf_sparseconv::FloatFormat>(format), x,
                                              indices, n, blocks, UnpackGeometry(geometry), stream);
}

int64_t tsc_sparse_scatter_gpu_workspace_bytes(const int64_t* geometry, int64_t n) {
  if (geometry == nullptr) return 0;
  return tf_sparseconv::SparseScatterGpuWorkspaceBytes(UnpackGeometry(geometry), n);
}

const char* tsc_sparse_scatter_gpu(int format, const void* blocks, const int32_t* indices,
                                   int64_t n, const void* base, void* out, int add,
                                   const int64_t* geometry, void* workspace, void* stream) {
  if (geometry == nullptr) return kNullGeometry;
  return tf_sparseconv::LaunchSparseScatterGpu(static_cast<tf_sparseconv::FloatFormat>(format),
                                               blocks, indices, n, base, out, add != 0,
                                               UnpackGeometry(geometry), workspace, stream);
}

}  // extern "C"
