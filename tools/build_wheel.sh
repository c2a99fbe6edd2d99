#!/usr/bin/env bash
# Builds the release wheel into dist/ with .venv's TensorFlow (run tools/bootstrap.sh first):
# a platform wheel (e.g. tf_sparseconv-0.1.0-cp311-cp311-linux_x86_64.whl) holding the op library
# and _build_info.json, requiring the TensorFlow minor release it was compiled against.
#
# The library is compiled for the portable x86-64-v2 baseline (SSE4.2, POPCNT; no AVX), so its
# C++ objects differ from the -march=native ones of the editable install: the first run compiles
# them (cached in build/obj afterwards). TF_SPARSECONV_NATIVE=1 builds a wheel for this CPU only;
# the CUDA kernels follow TF_SPARSECONV_CUDA / TF_SPARSECONV_CUDA_ARCHS as in tools/build_ops.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

[ -x .venv/bin/python ] || { echo "[build_wheel] no .venv: run tools/bootstrap.sh first"; exit 1; }
export PIP_DISABLE_PIP_VERSION_CHECK=1 TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
mkdir -p dist
# --no-build-isolation: the library is compiled against the TensorFlow installed in .venv.
.venv/bin/python -m pip wheel --no-build-isolation --no-deps -w dist . "$@"
.venv/bin/python - <<'PY'
import json, pathlib, re, zipfile

wheel = max(pathlib.Path("dist").glob("tf_sparseconv-*.whl"), key=lambda p: p.stat().st_mtime)
with zipfile.ZipFile(wheel) as zf:
    info = json.loads(zf.read("tf_sparseconv/_build_info.json"))
    metadata = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
pin = re.search(r"^Requires-Dist: (tensorflow[<>=!~].*)$", metadata, re.M).group(1)
print(f"[build_wheel] {wheel} ({wheel.stat().st_size / 2**20:.1f} MiB): TensorFlow {info['tf_version']}, "
      f"CPU flags {' '.join(info['cpu_flags'])}, CUDA kernels: {info['cuda']}; requires {pin}")
PY
