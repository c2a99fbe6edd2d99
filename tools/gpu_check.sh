#!/usr/bin/env bash
# The GPU check, one command for a machine with an NVIDIA GPU, nvcc, CuPy, NumPy and
# pytest (TensorFlow and network not needed): builds the standalone kernel library for
# the GPU, runs tests/gpu (a skip is a failure), runs the small cases under
# compute-sanitizer memcheck, racecheck and initcheck, runs tests/test_gpu_tf.py when
# TensorFlow is importable, and prints one line per op family and an overall PASS/FAIL
# (exit 0 / 1; 2 when there is no usable GPU, found within seconds). Fits 8 minutes on
# one H100 (TSC_GPU_CHECK_BUDGET, default 450 s). Details: tests/gpu/README.md,
# tools/gpu_check.py.
#
# Python: $PYTHON, else .venv/bin/python when it imports CuPy, else python3.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import cupy" >/dev/null 2>&1; then
    PYTHON=.venv/bin/python
  fi
fi
command -v "$PYTHON" >/dev/null 2>&1 || { echo "[gpu_check] OVERALL FAIL: no Python ($PYTHON)"; exit 2; }
exec "$PYTHON" tools/gpu_check.py "$@"
