// Test-only C entry points of coord_sparse_index_op_gpu.cu.cc for ctypes (tests/gpu/test_*_gpu.py):
// the launchers of coord_sparse_launcher.h with plain ints and arrays. Compiled into the
// standalone harness library by tests/gpu/build.py only, never into the
// TensorFlow op library.
// `geometry`: 13 int64 = dims, in_shape[3], kernel_size[3], strides[3],
// dilations[3] (unused entries ignored); booleans as int.
#include <cstdint>

#include "tf_sparseconv/cc/kernels/coord_sparse_launcher.h"

// ---------------------------------------------------------------------------
// C entry points (tests/gpu/)
// ---------------------------------------------------------------------------

namespace {

// geometry: 13 int64 = dims, in_shape[3], kernel[3], strides[3], dilations[3].
tf_sparseconv::ConvGeometry GeometryFrom(const int64_t* v) {
  tf_sparseconv::ConvGeometry g{};
  g.dims = static_cast<int>(v[0]);
  if (g.dims < 1 || g.dims > tf_sparseconv::kMaxCoordDims) {
    g.dims = 0;
    return g;
  }
  for (int a = 0; a < g.dims; ++a) {
    g.in_shape[a] = v[1 + a];
    g.kernel[a] = v[4 + a];
    g.stride[a] = v[7 + a];
    g.dilation[a] = v[10 + a];
  }
  for (int a = 0; a < g.dims; ++a) {
    if (g.in_shape[a] < 1 || g.kernel[a] < 1 || g.stride[a] < 1 || g.dilation[a] < 1) {
      g.dims = 0;
      return g;
    }
  }
  tf_sparseconv::FinishGeometry(&g);
  return g;
}

}  // namespace

extern "C" {

int64_t tsc_rulebook_check_gpu_workspace_bytes() {
  return tf_sparseconv::RulebookCheckGpuWorkspaceBytes();
}

const char* tsc_rulebook_check_gpu(const int64_t* geometry, const int32_t* coords, int64_t n,
                                   void* workspace, int64_t* bad_row, int32_t* bad_values,
                                   int64_t* batch, void* stream) {
  return tf_sparseconv::LaunchRulebookCheckGpu(GeometryFrom(geometry), coords, n, workspace,
                                               bad_row, bad_values, batch, stream);
}

int64_t tsc_rulebook_sites_gpu_workspace_bytes(const int64_t* geometry, int64_t n,
                                               int submanifold) {
  return tf_sparseconv::RulebookSitesGpuWorkspaceBytes(GeometryFrom(geometry), n, submanifold != 0);
}

const char* tsc_rulebook_sites_gpu(const int64_t* geometry, const int32_t* coords, int64_t n,
                                   int64_t batch, int submanifold, void* workspace,
                                   int64_t* dup_later, int64_t* dup_earlier, int64_t* num_out,
                                   void* stream) {
  return tf_sparseconv::LaunchRulebookSitesGpu(GeometryFrom(geometry), coords, n, batch,
                                               submanifold != 0, workspace, dup_later, dup_earlier,
                                               num_out, stream);
}

int64_t tsc_rulebook_pairs_gpu_workspace_bytes(const int64_t* geometry, int64_t num_out) {
  return tf_sparseconv::RulebookPairsGpuWorkspaceBytes(GeometryFrom(geometry), num_out);
}

const char* tsc_rulebook_pairs_gpu(const int64_t* geometry, const int32_t* coords, int64_t n,
                                   int submanifold, const void* sites_workspace, int64_t num_out,
                                   int32_t* out_coords, void* workspace, int32_t* pair_ptr,
                                   int64_t* num_pairs, void* stream) {
  return tf_sparseconv::LaunchRulebookPairsGpu(GeometryFrom(geometry), coords, n, submanifold != 0,
                                               sites_workspace, num_out, out_coords, workspace,
                                               pair_ptr, num_pairs, stream);
}

const char* tsc_rulebook_write_pairs_gpu(const int64_t* geometry, int64_t num_out,
                                         const void* workspace, int64_t num_pairs, int32_t* pairs,
                                         void* stream) {
  return tf_sparseconv::LaunchRulebookWritePairsGpu(GeometryFrom(geometry), num_out, workspace,
                                                    num_pairs, pairs, stream);
}

int64_t tsc_topk_sites_gpu_workspace_bytes(int64_t n) {
  return tf_sparseconv::TopKSitesGpuWorkspaceBytes(n);
}

const char* tsc_topk_sites_gpu(int format, const void* features, int64_t n, int64_t c,
                               const int32_t* coords, int64_t width, int64_t k, int l2,
                               void* workspace, int64_t* bad_row, int32_t* bad_batch, int64_t* kept,
                               void* stream) {
  return tf_sparseconv::LaunchTopKSitesGpu(static_cast<tf_sparseconv::FloatFormat>(format),
                                           features, n, c, coords, width, k, l2 != 0, workspace,
                                           bad_row, bad_batch, kept, stream);
}

const char* tsc_topk_sites_rows_gpu(const void* workspace, int64_t n, int64_t kept, int32_t* rows,
                                    void* stream) {
  return tf_sparseconv::LaunchTopKSitesRowsGpu(workspace, n, kept, rows, stream);
}

}  // extern "C"
