#!/usr/bin/env bash
# The test command: from a fresh clone, installs everything into .venv, builds
# the op library (g++ + nvcc when available), checks every .cu.cc compiles with
# nvcc, builds the same library with Bazel and loads it, lints, and runs the
# test suite. .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
export KERAS_BACKEND=tensorflow
start=$(date +%s)

bash tools/bootstrap.sh

if command -v nvcc >/dev/null 2>&1; then
  echo "[test] nvcc: compiling every .cu.cc"
  .venv/bin/python tools/build_ops.py --cuda-only
else
  echo "[test] nvcc not found: CUDA compile check skipped"
fi

if [ "${TF_SPARSECONV_SKIP_BAZEL:-0}" != "1" ] && [ -f tools/bazel_build.sh ]; then
  echo "[test] Bazel build"
  PY="$PWD/.venv/bin/python" bash tools/bazel_build.sh
fi

echo "[test] ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .

echo "[test] pytest"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
echo "[test] done in $(( $(date +%s) - start )) s"
