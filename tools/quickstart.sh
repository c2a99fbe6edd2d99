#!/usr/bin/env bash
# The main job: installs everything into .venv if needed, then runs
# examples/quickstart.py (train, sparsify, export, reload in a fresh process).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
export KERAS_BACKEND=tensorflow
if ! .venv/bin/python -c "import tf_sparseconv, sklearn" >/dev/null 2>&1; then
  bash tools/bootstrap.sh
fi
exec .venv/bin/python examples/quickstart.py "$@"
