"""Builds the standalone GPU kernel library used by the tests in tests/gpu/.

Every ``tf_sparseconv/cc/kernels/*_gpu.cu.cc`` file (TensorFlow-independent
CUDA code behind the launchers of ``*_launcher.h``) and the test-only
``extern "C"`` entry points beside this file (``tests/gpu/*_entry.cu.cc``)
are compiled with nvcc and linked into ONE shared library,
``tests/gpu/_build/libtsc_gpu_kernels.so``, with the CUDA runtime linked
statically (it loads without a GPU and next to CuPy's runtime). A new op
family adds its ``*_gpu.cu.cc`` and ``*_entry.cu.cc``.

Toolkit: the package build's finder (tools/build_ops.py ``find_cuda_toolkit``:
$NVCC, $CUDA_HOME/$CUDA_PATH, a pip toolkit of this Python, PATH,
/usr/local/cuda*), the first one found; no TensorFlow is involved.

Architectures: ``TSC_CUDA_ARCHS`` (e.g. ``"80,90"``) if set, else the compute
capabilities reported by ``nvidia-smi``, else sm_80 + sm_90. PTX of the
highest architecture is embedded too, for newer GPUs.

Usage: ``python3 tests/gpu/build.py [--force] [--archs 80,90] [-v]``
(``--sanitizer`` prints the compute-sanitizer found, ``--toolkit`` the
toolkit); from Python: ``build(force=False)`` returns the library path. The
build is skipped when the library is newer than every source and header and
was built with the same toolkit and flags.
"""

import argparse
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
KERNELS_DIR = os.path.join(ROOT, "tf_sparseconv", "cc", "kernels")
BUILD_DIR = os.path.join(HERE, "_build")
LIB_NAME = "libtsc_gpu_kernels.so"
LIB_PATH = os.path.join(BUILD_DIR, LIB_NAME)
DEFAULT_ARCHS = ("80", "90")

# The toolkit finder and nvcc flags of the package build (tools/build_ops.py imports
# nothing but the standard library at module level: no TensorFlow needed).
sys.path.insert(0, os.path.join(ROOT, "tools"))
import build_ops  # noqa: E402

COMMON_FLAGS = build_ops.nvcc_base_flags()
find_cuda_toolkit = build_ops.find_cuda_toolkit
find_nvcc = build_ops.find_nvcc


class BuildError(RuntimeError):
    pass


def _supported_archs(nvcc):
    try:
        out = subprocess.run(
            [nvcc, "--list-gpu-arch"], check=False, capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    archs = {a.strip()[len("compute_") :] for a in out.split() if a.strip().startswith("compute_")}
    return archs or None


def detect_archs():
    """Architectures to build for, as strings like "90"."""
    env = os.environ.get("TSC_CUDA_ARCHS", "").replace(";", ",").strip()
    if env:
        return [a.strip().replace(".", "").replace("sm_", "") for a in env.split(",") if a.strip()]
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
                check=False,
                capture_output=True,
                text=True,
                timeout=60,
            )
            caps = sorted(
                {
                    line.strip().replace(".", "")
                    for line in out.stdout.splitlines()
                    if line.strip() and line.strip()[0].isdigit()
                },
                key=_arch_key,
            )
            if out.returncode == 0 and caps:
                return caps
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    return list(DEFAULT_ARCHS)


def _arch_key(arch):
    digits = "".join(ch for ch in arch if ch.isdigit())
    return (int(digits) if digits else 0, arch)


def arch_flags(archs):
    archs = sorted(set(archs), key=_arch_key)
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    return flags


def toolkit_root(nvcc):
    """The toolkit directory of `nvcc` (its TOP in `nvcc -dryrun`, which sees through wrapper scripts)."""
    try:
        out = subprocess.run(
            [nvcc, "-dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
    except (OSError, subprocess.SubprocessError):
        match = None
    if match:
        return os.path.normpath(match.group(1).strip())
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def find_compute_sanitizer(nvcc=None):
    """Path of compute-sanitizer, or None: $COMPUTE_SANITIZER, PATH, the toolkit of `nvcc`
    (default: the one found), /usr/local/cuda*, a pip NVIDIA package of this Python."""
    candidates = [os.environ.get("COMPUTE_SANITIZER"), shutil.which("compute-sanitizer")]
    if nvcc is None:
        nvcc = find_nvcc()
    roots = [toolkit_root(nvcc)] if nvcc else []
    roots += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in roots:
        candidates.append(os.path.join(root, "bin", "compute-sanitizer"))
        candidates.append(os.path.join(root, "compute-sanitizer", "compute-sanitizer"))
    for site in sorted({sysconfig.get_paths()[k] for k in ("purelib", "platlib")}):
        for pattern in ("nvidia/*/bin/compute-sanitizer", "nvidia/*/compute-sanitizer/compute-sanitizer"):
            candidates += sorted(glob.glob(os.path.join(site, pattern)))
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def sources():
    """The kernels (tf_sparseconv/cc/kernels/*_gpu.cu.cc) and their test-only C entry points
    (tests/gpu/*_entry.cu.cc, which the TensorFlow op library does not compile)."""
    return sorted(glob.glob(os.path.join(KERNELS_DIR, "*_gpu.cu.cc"))) + sorted(
        glob.glob(os.path.join(HERE, "*_entry.cu.cc"))
    )


def _inputs():
    headers = glob.glob(os.path.join(ROOT, "tf_sparseconv", "cc", "**", "*.h"), recursive=True)
    return sources() + headers + [os.path.abspath(__file__)]


def _object_path(src):
    name = os.path.basename(src)[: -len(".cu.cc")]
    return os.path.join(BUILD_DIR, "obj", name + ".o")


def _run(cmd, verbose):
    if verbose:
        print(" ".join(cmd), flush=True)
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    if verbose and (proc.stdout or proc.stderr):
        print(proc.stdout + proc.stderr, flush=True)
    return proc


def build(force=False, archs=None, verbose=False):
    """Builds (if needed) and returns the path of the shared library."""
    toolkit = find_cuda_toolkit()
    if toolkit is None:
        raise BuildError("nvcc not found (set NVCC or CUDA_HOME, or add it to PATH)")
    nvcc = toolkit.nvcc
    srcs = sources()
    if not srcs:
        raise BuildError("no *_gpu.cu.cc files in " + KERNELS_DIR)
    archs = list(archs) if archs else detect_archs()
    supported = _supported_archs(nvcc)
    if supported is not None:
        bad = [a for a in archs if a not in supported]
        if bad:
            raise BuildError(
                "nvcc {} does not support sm_{} (supported: {}); set TSC_CUDA_ARCHS".format(
                    nvcc, ",".join(bad), ",".join(sorted(supported, key=_arch_key))
                )
            )
    flags = COMMON_FLAGS + [f"-I{d}" for d in toolkit.include_dirs] + arch_flags(archs)
    stamp = "\n".join([nvcc, toolkit.version] + flags + srcs)
    stamp_path = os.path.join(BUILD_DIR, "build.stamp")

    if not force and os.path.exists(LIB_PATH) and os.path.exists(stamp_path):
        with open(stamp_path) as f:
            same_flags = f.read() == stamp
        lib_time = os.path.getmtime(LIB_PATH)
        if same_flags and all(os.path.getmtime(p) <= lib_time for p in _inputs()):
            return LIB_PATH

    os.makedirs(os.path.join(BUILD_DIR, "obj"), exist_ok=True)

    def compile_one(src):
        obj = _object_path(src)
        _run([nvcc] + flags + ["-c", src, "-o", obj], verbose)
        return obj

    workers = max(1, min(len(srcs), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        objs = list(pool.map(compile_one, srcs))

    tmp = f"{LIB_PATH}.tmp.{os.getpid()}"
    _run([nvcc, "-shared", "-cudart", "static"] + arch_flags(archs) + objs + ["-o", tmp], verbose)
    os.replace(tmp, LIB_PATH)
    with open(stamp_path, "w") as f:
        f.write(stamp)
    return LIB_PATH


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument(
        "--archs",
        default=None,
        help="comma-separated list, e.g. 80,90 (default: TSC_CUDA_ARCHS, nvidia-smi, or 80,90)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--toolkit", action="store_true", help="print the CUDA toolkit used, build nothing")
    parser.add_argument(
        "--sanitizer", action="store_true", help="print the compute-sanitizer found, build nothing"
    )
    args = parser.parse_args(argv)
    if args.toolkit or args.sanitizer:
        toolkit = find_cuda_toolkit()
        found = (str(toolkit) if toolkit else None) if args.toolkit else find_compute_sanitizer()
        if found is None:
            print("nvcc not found" if args.toolkit else "compute-sanitizer not found", file=sys.stderr)
            return 1
        print(found)
        return 0
    archs = args.archs.split(",") if args.archs else None
    try:
        path = build(force=args.force, archs=archs, verbose=args.verbose)
    except BuildError as e:
        print(e, file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
