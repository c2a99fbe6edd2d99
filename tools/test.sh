#!/usr/bin/env bash
# The test command: from a fresh clone, installs everything into .venv, builds
# the op library (g++, + nvcc when a toolkit matches TensorFlow's CUDA), checks
# every .cu.cc compiles and links with each nvcc found, builds the same library
# with Bazel and loads it, lints, and runs the test suite. .ci/run calls exactly
# this. (On a machine with a GPU, tools/gpu_check.sh runs the GPU checks.)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
export KERAS_BACKEND=tensorflow
start=$(date +%s)

bash tools/bootstrap.sh

# The installed library has CUDA kernels only when a toolkit matches TensorFlow's CUDA
# (tools/build_ops.py); whatever nvcc is here still compiles every .cu.cc and links a
# CUDA variant of the library (not installed), so GPU code that does not build fails CI.
toolkits=$(.venv/bin/python tools/build_ops.py --toolkits)
if [[ "$toolkits" == *"(nvcc "* ]]; then
  echo "[test] CUDA check: every .cu.cc with each toolkit found, and a link check"
  while IFS= read -r line; do echo "[test]   $line"; done <<<"$toolkits"
  .venv/bin/python tools/build_ops.py --cuda-check
else
  echo "[test] nvcc not found: CUDA check skipped"
fi

if [ "${TF_SPARSECONV_SKIP_BAZEL:-0}" != "1" ] && [ -f tools/bazel_build.sh ]; then
  echo "[test] Bazel build"
  PY="$PWD/.venv/bin/python" bash tools/bazel_build.sh
fi

echo "[test] clang-format (.clang-format; pinned in pyproject so every machine formats alike)"
git ls-files '*.cc' '*.h' | xargs .venv/bin/clang-format --dry-run --Werror

echo "[test] ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .

echo "[test] pytest"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
echo "[test] done in $(( $(date +%s) - start )) s"
