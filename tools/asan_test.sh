#!/usr/bin/env bash
# Runs the op test suite against an AddressSanitizer build of the op library:
# builds build/asan/_tf_sparseconv_ops.so (CPU kernels, -fsanitize=address),
# preloads libasan into Python and points the loader at that library.
#   bash tools/asan_test.sh [pytest args]   (default: the op tests)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export TF_CPP_MIN_LOG_LEVEL=2 KERAS_BACKEND=tensorflow
TF_SPARSECONV_ASAN=1 TF_SPARSECONV_CUDA=0 .venv/bin/python tools/build_ops.py --output build/asan/_tf_sparseconv_ops.so
libasan="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)"
# TensorFlow itself is not built with ASan: leak checking would report its
# intentional process-lifetime allocations, so only memory errors are checked.
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1:allocator_may_return_null=1
if [ "$#" -eq 0 ]; then  # the op tests of all five families
  set -- tests/test_topk_ops.py tests/test_channel_sparse_ops.py tests/test_block_sparse_ops.py \
    tests/test_coord_sparse_ops.py tests/test_coord_sparse_conv.py tests/test_streaming_ops.py
fi
LD_PRELOAD="$libasan" TF_SPARSECONV_LIBRARY="$PWD/build/asan/_tf_sparseconv_ops.so" .venv/bin/python -c "
import tf_sparseconv as tsc
assert tsc.ops.is_library_loaded(), 'the ASan library did not load'
print('[asan] loaded', tsc.ops.load_library().__file__ if hasattr(tsc.ops.load_library(), '__file__') else '')"
LD_PRELOAD="$libasan" TF_SPARSECONV_LIBRARY="$PWD/build/asan/_tf_sparseconv_ops.so" \
  .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
