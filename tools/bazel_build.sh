#!/usr/bin/env bash
# Builds the custom-op library with Bazel (CPU kernels only), offline:
#   configure.py -> bazel build //tf_sparseconv:_tf_sparseconv_ops.so
#   -> build/bazel/_tf_sparseconv_ops.so -> check that TensorFlow loads it.
# See tools/BAZEL.md.
#
# Environment:
#   PY                   Python with TensorFlow (default: <repo>/.venv/bin/python)
#   BAZEL                bazel command (default: bazel)
#   BAZEL_JOBS           parallel jobs (default: 2)
#   BAZEL_STARTUP_OPTS   extra startup options, e.g. --output_user_root=DIR
#   TF_SPARSECONV_NATIVE "1" (default): -march=native; "0": -march=x86-64-v2
# Extra arguments are passed to `bazel build`.
set -euo pipefail

start=$SECONDS
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Resolve PY against the caller's directory, without following symlinks
# (a virtualenv's python must keep its venv path).
PY="${PY:-$ROOT/.venv/bin/python}"
case "$PY" in
  /*) ;;
  */*) PY="$PWD/$PY" ;;
  *) PY="$(command -v "$PY" || true)" ;;
esac
if [[ -z "$PY" || ! -x "$PY" ]]; then
  echo "bazel_build.sh: no Python at '${PY}'; set PY=/path/to/python (with TensorFlow)" >&2
  exit 2
fi

cd "$ROOT"

# Bazel 4.2.3 and @platforms from Debian (no network needed at build time).
if ! command -v "${BAZEL:-bazel}" >/dev/null 2>&1 \
    || [[ ! -f /usr/share/bazel/tools/platforms/cpu/BUILD ]]; then
  echo "bazel_build.sh: installing bazel-bootstrap and bazel-platforms" >&2
  SUDO=""
  if [[ "$(id -u)" != 0 ]]; then SUDO="sudo"; fi
  $SUDO env DEBIAN_FRONTEND=noninteractive sh -c \
    "apt-get update -q && apt-get install -y -q bazel-bootstrap bazel-platforms"
fi
BAZEL="${BAZEL:-bazel}"
read -r -a STARTUP <<<"${BAZEL_STARTUP_OPTS:-}"

# Never leave a Bazel server behind (CI), whatever happens below.
cleanup() { "$BAZEL" "${STARTUP[@]}" shutdown >/dev/null 2>&1 || true; }
trap cleanup EXIT

echo "== configure.py --python $PY"
"$PY" configure.py --python "$PY"

FLAGS=(--jobs="${BAZEL_JOBS:-2}")
if [[ "${TF_SPARSECONV_NATIVE:-1}" == 1 ]]; then
  FLAGS+=(--config=native)
  # TensorFlow's Eigen does not compile with AVX512-FP16 (see tools/build_ops.py).
  native_macros="$("${CXX:-g++}" -march=native -dM -E -x c++ /dev/null 2>/dev/null || true)"
  if [[ "$native_macros" == *__AVX512FP16__* ]]; then
    FLAGS+=(--copt=-mno-avx512fp16)
  fi
else
  FLAGS+=(--config=portable)
fi

echo "== bazel build //tf_sparseconv:_tf_sparseconv_ops.so ${FLAGS[*]} $*"
t0=$SECONDS
"$BAZEL" "${STARTUP[@]}" build "${FLAGS[@]}" "$@" //tf_sparseconv:_tf_sparseconv_ops.so
echo "== bazel build took $((SECONDS - t0)) s"

BIN="$("$BAZEL" "${STARTUP[@]}" info "${FLAGS[@]}" "$@" bazel-bin 2>/dev/null)"
mkdir -p build/bazel
rm -f build/bazel/_tf_sparseconv_ops.so
install -m 0755 "$BIN/tf_sparseconv/_tf_sparseconv_ops.so" build/bazel/_tf_sparseconv_ops.so
echo "== wrote build/bazel/_tf_sparseconv_ops.so"

# The server is not needed any more.
cleanup

echo "== load check"
TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}" "$PY" - <<'EOF'
import glob, sys
import tensorflow as tf
lib = tf.load_op_library('build/bazel/_tf_sparseconv_ops.so'); print(sorted(n for n in dir(lib) if not n.startswith('_'))[:20])
# The generated wrapper module has <op> and <op>_eager_fallback per op.
ops = sorted(n[: -len("_eager_fallback")] for n in dir(lib) if n.endswith("_eager_fallback"))
print("%d op(s) loaded: %s" % (len(ops), ", ".join(ops)))
sources = [p for p in glob.glob("tf_sparseconv/cc/**/*.cc", recursive=True)
           if not p.endswith(".cu.cc")]
if sources and not ops:
    sys.exit("bazel_build.sh: the library registers no ops")
EOF
echo "== bazel_build.sh done in $((SECONDS - start)) s"
