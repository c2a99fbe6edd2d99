"""Builds tf_sparseconv's op library against the installed TensorFlow.

The default build route (``pip install``/``setup.py`` call this; so can you:
``python tools/build_ops.py``). Compiler flags come only from ``tf.sysconfig``
plus optimisation flags; CUDA kernels (``*.cu.cc``) are compiled with nvcc and
linked in when nvcc is present and TensorFlow is a CUDA build.

Environment:
  TF_SPARSECONV_CUDA    "auto" (default), "1" (require CUDA), "0" (CPU only).
  TF_SPARSECONV_CUDA_ARCHS  e.g. "75,80,90" (default); the last also gets PTX.
  TF_SPARSECONV_NATIVE  "1": -march=native; "0": portable -march=x86-64-v2 (SSE4.2,
                        POPCNT; no AVX). Default "1", except for wheels (`pip wheel`,
                        `python -m build --wheel`), which are portable unless it is set.
  TF_SPARSECONV_ASAN    "1": build with AddressSanitizer (for the ASan run).
  TF_SPARSECONV_JOBS    parallel compile jobs (default: CPU count).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CC_DIR = ROOT / "tf_sparseconv" / "cc"
LIBRARY_NAME = "_tf_sparseconv_ops.so"
BUILD_INFO_NAME = "_build_info.json"
OBJ_DIR = ROOT / "build" / "obj"


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default).strip().lower()


def tf_flags() -> tuple[list[str], list[str], dict]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    info = dict(tf.sysconfig.get_build_info())
    return (
        list(tf.sysconfig.get_compile_flags()),
        list(tf.sysconfig.get_link_flags()),
        {"tf_version": tf.__version__, "tf_cuda": bool(info.get("is_cuda_build"))},
    )


def find_nvcc() -> str | None:
    """Path of nvcc ($NVCC, PATH, $CUDA_HOME/$CUDA_PATH, /usr/local/cuda), or None."""
    candidates = [os.environ.get("NVCC"), shutil.which("nvcc")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def cuda_library_dir(nvcc: str) -> Path:
    """The directory holding libcudart_static.a for this nvcc."""
    homes = [Path(nvcc).resolve().parent.parent, Path("/usr/local/cuda")]
    if os.environ.get("CUDA_HOME"):
        homes.insert(0, Path(os.environ["CUDA_HOME"]))
    for home in homes:
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib"):
            if (home / sub / "libcudart_static.a").exists():
                return home / sub
    raise RuntimeError(f"libcudart_static.a not found near {nvcc}; set CUDA_HOME")


def cuda_wanted(tf_cuda: bool) -> tuple[bool, str]:
    setting = _env("TF_SPARSECONV_CUDA", "auto")
    nvcc = find_nvcc()
    if setting in ("0", "off", "false", "no"):
        return False, "disabled by TF_SPARSECONV_CUDA=0"
    if not cuda_sources():
        return False, "no CUDA sources"
    if setting in ("1", "on", "true", "yes"):
        if not nvcc:
            raise RuntimeError("TF_SPARSECONV_CUDA=1 but nvcc was not found")
        return True, "forced by TF_SPARSECONV_CUDA=1"
    if not nvcc:
        return False, "nvcc not found"
    if not tf_cuda:
        return False, "TensorFlow is not a CUDA build"
    return True, "nvcc found and TensorFlow is a CUDA build"


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
        h.update(b"\0")
    return h.hexdigest()[:24]


def _headers_digest() -> bytes:
    return b"".join(p.read_bytes() for p in sorted(CC_DIR.rglob("*.h")))


def _compile(cmd: list[str], src: Path, obj: Path) -> str:
    if obj.exists():
        return f"cached {src.relative_to(ROOT)}"
    tmp = obj.with_suffix(".tmp.o")
    proc = subprocess.run(cmd + ["-c", str(src), "-o", str(tmp)], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"compiling {src} failed:\n{' '.join(cmd)}\n{proc.stderr[-8000:]}")
    tmp.replace(obj)
    return f"compiled {src.relative_to(ROOT)}"


def native_has_avx512fp16(cxx: str | None = None) -> bool:
    """True when `-march=native` enables AVX512-FP16 for this compiler and CPU."""
    cxx = cxx or os.environ.get("CXX", "g++")
    proc = subprocess.run(
        [cxx, "-march=native", "-dM", "-E", "-x", "c++", os.devnull],
        check=False,
        capture_output=True,
        text=True,
    )
    return "__AVX512FP16__" in proc.stdout


PORTABLE_CPU_FLAGS = ["-march=x86-64-v2"]


def native_wanted(default: bool = True) -> bool:
    """TF_SPARSECONV_NATIVE == "1"; `default` when it is unset."""
    if "TF_SPARSECONV_NATIVE" not in os.environ:
        return default
    return _env("TF_SPARSECONV_NATIVE", "1") == "1"


def cpu_flags(native: bool, cxx: str | None = None) -> list[str]:
    """The -march flags: this CPU's (`native`), or the portable x86-64-v2 baseline."""
    if not native:
        return list(PORTABLE_CPU_FLAGS)
    # TensorFlow's bundled Eigen does not compile with AVX512-FP16 enabled (its
    # PacketMathFP16.h specialisations break), so -march=native on a CPU that
    # has it (Sapphire Rapids and later) turns that extension off again.
    return ["-march=native", "-mno-avx512fp16"] if native_has_avx512fp16(cxx) else ["-march=native"]


def cxx_sources() -> list[Path]:
    return sorted(p for p in CC_DIR.rglob("*.cc") if not p.name.endswith(".cu.cc"))


def cuda_sources() -> list[Path]:
    return sorted(CC_DIR.rglob("*.cu.cc"))


def nvcc_arch_flags() -> list[str]:
    archs = [
        a.strip() for a in os.environ.get("TF_SPARSECONV_CUDA_ARCHS", "75,80,90").split(",") if a.strip()
    ]
    flags = []
    for i, a in enumerate(archs):
        code = f"[sm_{a},compute_{a}]" if i == len(archs) - 1 else f"sm_{a}"
        flags += ["-gencode", f"arch=compute_{a},code={code}"]
    return flags


def nvcc_base_flags() -> list[str]:
    """nvcc flags for every .cu.cc, without architectures (shared with tests/gpu/build.py)."""
    return ["-x", "cu", "-std=c++17", "--expt-relaxed-constexpr", "-O3", "-Xcompiler", "-fPIC", f"-I{ROOT}"]


def nvcc_command(nvcc: str) -> list[str]:
    return [nvcc, *nvcc_base_flags(), *nvcc_arch_flags()]


def build(output: Path | None = None, verbose: bool = True, native: bool | None = None) -> Path:
    """Compiles the op library to ``output`` (default: in the package).

    ``native``: -march=native (True) or the portable baseline (False); None
    reads TF_SPARSECONV_NATIVE (default: native).
    """
    output = Path(output) if output else ROOT / "tf_sparseconv" / LIBRARY_NAME
    compile_flags, link_flags, info = tf_flags()
    use_cuda, why = cuda_wanted(info["tf_cuda"])
    cxx = os.environ.get("CXX", "g++")
    opt = [
        "-O3",
        "-fPIC",
        "-Wno-deprecated-declarations",
        "-Wno-interference-size",
        "-Wno-unknown-warning-option",
    ]
    march = cpu_flags(native_wanted() if native is None else native, cxx)
    opt += march
    asan = _env("TF_SPARSECONV_ASAN", "0") == "1"
    if asan:
        opt += ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]
    defines = ["-DTF_SPARSECONV_CUDA=1"] if use_cuda else []
    cxx_cmd = [cxx, f"-I{ROOT}", *compile_flags, *opt, *defines]
    OBJ_DIR.mkdir(parents=True, exist_ok=True)
    headers = _headers_digest()
    jobs = int(os.environ.get("TF_SPARSECONV_JOBS", os.cpu_count() or 2))
    tasks = []
    for src in cxx_sources():
        key = _digest(" ".join(cxx_cmd).encode(), src.read_bytes(), headers)
        tasks.append((cxx_cmd, src, OBJ_DIR / f"{src.stem}-{key}.o"))
    nvcc = find_nvcc() if use_cuda else None
    if use_cuda:
        nv_cmd = nvcc_command(nvcc)
        for src in cuda_sources():
            key = _digest(" ".join(nv_cmd).encode(), src.read_bytes(), headers)
            tasks.append((nv_cmd, src, OBJ_DIR / f"{src.name[:-6]}-cu-{key}.o"))
    if verbose:
        print(
            f"[tf_sparseconv] building {output.name} for TensorFlow {info['tf_version']}; "
            f"CUDA: {'on' if use_cuda else 'off'} ({why})",
            flush=True,
        )
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for msg in pool.map(lambda t: _compile(*t), tasks):
            if verbose:
                print(f"[tf_sparseconv]   {msg}", flush=True)
    # -z defs: an unresolved symbol (e.g. a GPU launcher whose .cu.cc is missing) fails the
    # build here instead of the library load at import time.
    link = [cxx, "-shared", "-Wl,-z,defs", *opt, "-o", str(output), *[str(t[2]) for t in tasks], *link_flags]
    if use_cuda:
        link += [f"-L{cuda_library_dir(nvcc)}", "-lcudart_static", "-ldl", "-lrt", "-lpthread"]
    output.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(link, check=True)
    build_info = {
        **info,
        "cuda": use_cuda,
        "cuda_reason": why,
        "asan": asan,
        "cpu_flags": march,
        "compile_flags": compile_flags,
        "link_flags": link_flags,
    }
    (output.parent / BUILD_INFO_NAME).write_text(json.dumps(build_info, indent=2) + "\n")
    if verbose:
        print(f"[tf_sparseconv] wrote {output}", flush=True)
    return output


def compile_cuda_only() -> None:
    """Compiles every .cu.cc with nvcc (no link): CI's check that GPU code builds."""
    nvcc = find_nvcc()
    if not nvcc:
        raise SystemExit("nvcc not found")
    out = ROOT / "build" / "cuda_check"
    out.mkdir(parents=True, exist_ok=True)
    for src in cuda_sources():
        subprocess.run(
            nvcc_command(nvcc) + ["-c", str(src), "-o", str(out / (src.name[:-6] + ".o"))], check=True
        )
        print(f"[tf_sparseconv] nvcc ok: {src.relative_to(ROOT)}", flush=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build tf_sparseconv's op library.")
    parser.add_argument("--cuda-only", action="store_true", help="only check that every .cu.cc compiles")
    parser.add_argument("--output", type=Path, default=None, help="library path (default: in the package)")
    args = parser.parse_args()
    if args.cuda_only:
        compile_cuda_only()
    else:
        build(args.output)
