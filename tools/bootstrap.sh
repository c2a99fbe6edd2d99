#!/usr/bin/env bash
# Creates .venv (if needed) and installs tf_sparseconv into it, editable, with
# everything its tests, examples and benchmarks need; the op library is
# compiled against the installed TensorFlow (tools/build_ops.py).
# Sourced or run by tools/test.sh and tools/quickstart.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q --upgrade "pip>=24" "setuptools>=68" wheel 2>&1 | grep -v "^WARNING: Location" || true

# Dependencies first (the op library is built against TensorFlow, so it must
# be installed before the package is built); pyproject.toml is the one list.
mapfile -t requirements < <(.venv/bin/python - <<'PY'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["test"]))
PY
)
echo "[bootstrap] installing: ${requirements[*]}"
.venv/bin/python -m pip install -q "${requirements[@]}" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import tensorflow, keras" 2>/dev/null || { echo "[bootstrap] dependency install failed"; exit 1; }

# The CUDA kernels are built only with a toolkit of TensorFlow's CUDA major version
# (tools/build_ops.py). When none is here and PyPI has one (CUDA >= 13: nvidia-cuda-nvcc
# & co., pinned to TensorFlow's major.minor), it goes into .venv. For TensorFlow's CUDA 12
# PyPI has no nvcc (nvidia-cuda-nvcc-cu12 holds ptxas only): the op library is then
# CPU-only unless a CUDA 12 toolkit is installed (CUDA_HOME or NVCC); TF_SPARSECONV_CUDA=0
# skips this.
mapfile -t cuda_toolkit < <(.venv/bin/python tools/build_ops.py --pip-toolkit)
if [ "${#cuda_toolkit[@]}" -gt 0 ]; then
  echo "[bootstrap] installing the CUDA toolkit matching TensorFlow's: ${cuda_toolkit[*]}"
  .venv/bin/python -m pip install -q "${cuda_toolkit[@]}" 2>&1 | grep -v "^WARNING: Location" || true
fi

echo "[bootstrap] building and installing tf_sparseconv (editable)"
.venv/bin/python -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "
import os; os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
import tf_sparseconv as tsc, json, pathlib
assert tsc.ops.is_library_loaded(), 'the op library did not load'
info = json.loads((pathlib.Path(tsc.__file__).parent / '_build_info.json').read_text())
print(f\"[bootstrap] tf_sparseconv {tsc.__version__}: op library loaded (TF {info['tf_version']}, CUDA kernels: {info['cuda']} - {info['cuda_reason']})\")
"
