"""Builds tf_sparseconv's op library against the installed TensorFlow.

The default build route (``pip install``/``setup.py`` call this; so can you:
``python tools/build_ops.py``). Compiler flags come only from ``tf.sysconfig``
plus optimisation flags.

CUDA: the kernels (``*.cu.cc``) are compiled and linked in when TensorFlow is a
CUDA build and a CUDA toolkit of TensorFlow's CUDA major version is found
(``find_cuda_toolkit``: $NVCC, $CUDA_HOME/$CUDA_PATH, a pip toolkit in this
Python's site-packages, PATH, /usr/local/cuda*). An nvcc of another major
version (e.g. CUDA 13 for TensorFlow's CUDA 12) is not used: the library is
then CPU-only and ``_build_info.json``'s ``cuda_reason`` says why. There is no
CUDA runtime of our own (no cudart_static): the ``cuda*`` symbols resolve
against ``libtensorflow_framework.so.2``, i.e. TensorFlow's own CUDA runtime,
the one TensorFlow's GPU kernels and streams use.

Environment:
  TF_SPARSECONV_CUDA    "auto" (default), "1" (require CUDA: an error when no
                        toolkit matches TensorFlow's), "0" (CPU only).
  TF_SPARSECONV_CUDA_ARCHS  e.g. "75,80,90" (default); the last also gets PTX.
  NVCC, CUDA_HOME       the toolkit to try first.
  TF_SPARSECONV_NATIVE  "1": -march=native; "0": portable -march=x86-64-v2 (SSE4.2,
                        POPCNT; no AVX). Default "1", except for wheels (`pip wheel`,
                        `python -m build --wheel`), which are portable unless it is set.
  TF_SPARSECONV_ASAN    "1": build with AddressSanitizer (for the ASan run).
  TF_SPARSECONV_JOBS    parallel compile jobs (default: CPU count).

``python tools/build_ops.py --cuda-check`` (CI) compiles every ``.cu.cc`` with
every toolkit found and links a CUDA variant of the library with the
TensorFlow-matching one, or else the newest one (a link check only: it is not
installed). ``--toolkits`` lists the toolkits found; ``--pip-toolkit`` prints
the pip requirements of a toolkit matching TensorFlow, when PyPI has one.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
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
    tf_cuda = bool(info.get("is_cuda_build"))
    return (
        list(tf.sysconfig.get_compile_flags()),
        list(tf.sysconfig.get_link_flags()),
        {
            "tf_version": tf.__version__,
            "tf_cuda": tf_cuda,
            "tf_cuda_version": str(info.get("cuda_version"))
            if tf_cuda and info.get("cuda_version")
            else None,
        },
    )


# --------------------------------------------------------------------------- CUDA toolkits


@dataclasses.dataclass(frozen=True)
class CudaToolkit:
    """An nvcc and its CUDA version ("12.5.82"); ``include_dirs``: extra -I its layout needs."""

    nvcc: str
    version: str
    include_dirs: tuple[str, ...] = ()

    @property
    def major(self) -> int:
        return _major_minor(self.version)[0]

    @property
    def major_minor(self) -> tuple[int, int]:
        return _major_minor(self.version)

    def __str__(self) -> str:
        return f"CUDA {self.version} (nvcc {self.nvcc})"


def _major_minor(version: str) -> tuple[int, int]:
    parts = [int(p) for p in re.findall(r"\d+", version)[:2]]
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


def _numbers(path: Path) -> tuple[int, ...]:
    """Version-like numbers in a path, for newest-first ordering of /usr/local/cuda-12.5 etc."""
    return tuple(int(n) for n in re.findall(r"\d+", str(path)))


@functools.cache
def nvcc_version(nvcc: str) -> str | None:
    """CUDA version of an nvcc ("13.0.88", from `nvcc --version`), or None when it does not run."""
    try:
        out = subprocess.run([nvcc, "--version"], check=False, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)(?:, V(\d+(?:\.\d+)+))?", out.stdout)
    return (match.group(2) or match.group(1)) if match else None


def _nvcc_candidates() -> list[tuple[str, tuple[str, ...]]]:
    """(nvcc, extra include dirs) in priority order, each executable file once."""
    found: list[tuple[str, tuple[str, ...]]] = []

    def add(path: str | Path | None, includes: tuple[Path, ...] = ()) -> None:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            found.append((str(path), tuple(str(d) for d in includes if d.is_dir())))

    add(os.environ.get("NVCC"))
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            add(os.path.join(os.environ[var], "bin", "nvcc"))
    # pip toolkits of this Python: CUDA >= 13 wheels (nvidia-cuda-nvcc & co.) share one tree,
    # nvidia/cu13/, whose nvcc.profile finds the headers; the CUDA <= 12 layout keeps the
    # runtime and CCCL headers in sibling packages.
    for site in sorted({sysconfig.get_paths()[k] for k in ("purelib", "platlib")}):
        nvidia = Path(site) / "nvidia"
        for nvcc in sorted(nvidia.glob("cu[0-9]*/bin/nvcc"), key=_numbers, reverse=True):
            add(nvcc)
        add(
            nvidia / "cuda_nvcc" / "bin" / "nvcc",
            (nvidia / "cuda_runtime" / "include", nvidia / "cuda_cccl" / "include"),
        )
    add(shutil.which("nvcc"))
    add("/usr/local/cuda/bin/nvcc")
    for nvcc in sorted(Path("/usr/local").glob("cuda-*/bin/nvcc"), key=_numbers, reverse=True):
        add(nvcc)
    unique, seen = [], set()
    for nvcc, includes in found:
        if os.path.realpath(nvcc) not in seen:
            seen.add(os.path.realpath(nvcc))
            unique.append((nvcc, includes))
    return unique


def cuda_toolkits() -> list[CudaToolkit]:
    """Every toolkit found: $NVCC, $CUDA_HOME/$CUDA_PATH, this Python's pip one, PATH, /usr/local/cuda*."""
    toolkits = []
    for nvcc, includes in _nvcc_candidates():
        version = nvcc_version(nvcc)
        if version:
            toolkits.append(CudaToolkit(nvcc, version, includes))
    return toolkits


def find_cuda_toolkit(cuda_version: str | None = None) -> CudaToolkit | None:
    """The toolkit to build with: the first one found, or, given `cuda_version` (TensorFlow's),
    the first of its major version, preferring its major.minor. None when there is none."""
    toolkits = cuda_toolkits()
    if cuda_version is None:
        return toolkits[0] if toolkits else None
    return _pick_toolkit(toolkits, cuda_version)


def _pick_toolkit(toolkits: list[CudaToolkit], cuda_version: str) -> CudaToolkit | None:
    want = _major_minor(cuda_version)
    same_major = [t for t in toolkits if t.major == want[0]]
    exact = [t for t in same_major if t.major_minor == want]
    return (exact or same_major or [None])[0]


def find_nvcc() -> str | None:
    """Path of the first nvcc found (see find_cuda_toolkit), or None."""
    toolkit = find_cuda_toolkit()
    return toolkit.nvcc if toolkit else None


# From CUDA 13 on, PyPI's nvidia-cuda-nvcc holds nvcc itself; the CUDA 12 wheels
# (nvidia-cuda-nvcc-cu12, up to 12.9) hold ptxas, libnvvm and headers, but no nvcc.
PIP_NVCC_FIRST_MAJOR = 13


def pip_toolkit_requirements(cuda_version: str) -> list[str] | None:
    """pip requirements of a toolkit of `cuda_version`'s major.minor, or None when PyPI has none."""
    major, minor = _major_minor(cuda_version)
    if major < PIP_NVCC_FIRST_MAJOR:
        return None
    names = ("nvidia-cuda-nvcc", "nvidia-nvvm", "nvidia-cuda-crt", "nvidia-cuda-runtime", "nvidia-cuda-cccl")
    return [f"{name}=={major}.{minor}.*" for name in names]


def toolkit_hint(cuda_version: str) -> str:
    """How to get a toolkit matching TensorFlow's CUDA `cuda_version`."""
    major, minor = _major_minor(cuda_version)
    requirements = pip_toolkit_requirements(cuda_version)
    if requirements:
        return "python -m pip install " + " ".join(f'"{r}"' for r in requirements)
    return (
        f"install a CUDA {major}.x toolkit (ideally {major}.{minor}, e.g. NVIDIA's "
        f"cuda-toolkit-{major}-{minor}) and set CUDA_HOME or NVCC "
        f"(PyPI's nvidia-cuda-nvcc-cu{major} holds no nvcc)"
    )


def cuda_wanted(tf_cuda: bool, tf_cuda_version: str | None = None) -> tuple[bool, str, CudaToolkit | None]:
    """(build the CUDA kernels?, why, the toolkit to build them with)."""
    setting = _env("TF_SPARSECONV_CUDA", "auto")
    forced = setting in ("1", "on", "true", "yes")
    if setting in ("0", "off", "false", "no"):
        return False, "disabled by TF_SPARSECONV_CUDA=0", None
    if not cuda_sources():
        return False, "no CUDA sources", None

    def without(why: str) -> tuple[bool, str, None]:
        if forced:
            raise RuntimeError(f"TF_SPARSECONV_CUDA=1 but {why}")
        return False, why, None

    if not tf_cuda or not tf_cuda_version:
        return without("TensorFlow is not a CUDA build")
    toolkit = find_cuda_toolkit(tf_cuda_version)
    if toolkit is None:
        major = _major_minor(tf_cuda_version)[0]
        hint = toolkit_hint(tf_cuda_version)
        others = list({t.version: t for t in reversed(cuda_toolkits())}.values())[::-1]  # one per version
        if not others:
            return without(f"nvcc not found (TensorFlow is built with CUDA {tf_cuda_version}; {hint})")
        seen = ", ".join(str(t) for t in others)
        return without(
            f"no CUDA {major} toolkit: found {seen}, but TensorFlow is built with CUDA {tf_cuda_version} "
            f"and its CUDA {major} runtime would run the kernels (unsupported); {hint}"
        )
    forced_note = "forced by TF_SPARSECONV_CUDA=1: " if forced else ""
    return True, f"{forced_note}{toolkit} matches TensorFlow's CUDA {tf_cuda_version}", toolkit


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


def nvcc_command(toolkit: CudaToolkit) -> list[str]:
    return [
        toolkit.nvcc,
        *nvcc_base_flags(),
        *[f"-I{d}" for d in toolkit.include_dirs],
        *nvcc_arch_flags(),
    ]


def uses_cuda_macro(src: Path) -> bool:
    """Whether `src` or a project header it includes (transitively) tests TF_SPARSECONV_CUDA.

    Only those files are compiled with -DTF_SPARSECONV_CUDA=1, so the other objects
    are shared by the CPU-only and the CUDA builds.
    """
    seen: set[Path] = set()
    todo = [src]
    while todo:
        path = todo.pop()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        text = path.read_text(errors="replace")
        if "TF_SPARSECONV_CUDA" in text:
            return True
        todo += [ROOT / inc for inc in re.findall(r'#include\s+"(tf_sparseconv/[^"]+)"', text)]
    return False


Task = tuple[list[str], Path, Path]  # (compile command, source, object)


def _cxx_command(
    compile_flags: list[str], native: bool | None
) -> tuple[list[str], list[str], list[str], bool]:
    """(g++ command without CUDA define, link options, -march flags, ASan?)."""
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
    return [cxx, f"-I{ROOT}", *compile_flags, *opt], opt, march, asan


def _cxx_tasks(cxx_cmd: list[str], cuda: bool, headers: bytes) -> list[Task]:
    tasks = []
    for src in cxx_sources():
        cmd = cxx_cmd + (["-DTF_SPARSECONV_CUDA=1"] if cuda and uses_cuda_macro(src) else [])
        key = _digest(" ".join(cmd).encode(), src.read_bytes(), headers)
        tasks.append((cmd, src, OBJ_DIR / f"{src.stem}-{key}.o"))
    return tasks


def _cuda_tasks(toolkit: CudaToolkit, obj_dir: Path, headers: bytes) -> list[Task]:
    cmd = nvcc_command(toolkit)
    tasks = []
    for src in cuda_sources():
        key = _digest(" ".join(cmd).encode(), toolkit.version.encode(), src.read_bytes(), headers)
        tasks.append((cmd, src, obj_dir / f"{src.name[:-6]}-cu-{key}.o"))
    return tasks


def _compile_all(tasks: list[Task], verbose: bool) -> None:
    for obj in {t[2].parent for t in tasks}:
        obj.mkdir(parents=True, exist_ok=True)
    jobs = int(os.environ.get("TF_SPARSECONV_JOBS", os.cpu_count() or 2))
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for msg in pool.map(lambda t: _compile(*t), tasks):
            if verbose:
                print(f"[tf_sparseconv]   {msg}", flush=True)


def _link(cxx_cmd: list[str], opt: list[str], output: Path, tasks: list[Task], link_flags: list[str]) -> None:
    # -z defs: an unresolved symbol (e.g. a GPU launcher whose .cu.cc is missing) fails the
    # build here instead of the library load at import time. No CUDA runtime of our own: the
    # cuda* symbols of the nvcc objects resolve against libtensorflow_framework.so.2 (in
    # link_flags), i.e. TensorFlow's CUDA runtime, which loads its libcudart when first used.
    # Linked beside it and renamed over it: a process loading the library meanwhile sees the
    # old file or the new one, never a half-written one.
    partial = output.with_name(output.name + ".partial")
    link = [cxx_cmd[0], "-shared", "-Wl,-z,defs", *opt, "-o", str(partial), *[str(t[2]) for t in tasks]]
    output.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(link + link_flags, check=True)
    partial.replace(output)
    own = defined_cuda_runtime_symbols(output)
    if own:
        raise RuntimeError(
            f"{output} defines CUDA runtime symbols ({', '.join(own[:5])}, ...): a second runtime"
        )


def defined_cuda_runtime_symbols(library: Path) -> list[str]:
    """CUDA runtime symbols (cuda*, __cuda*) that `library` defines itself ([] without nm)."""
    nm = shutil.which("nm")
    if nm is None:
        return []
    out = subprocess.run(
        [nm, "-D", "--defined-only", str(library)], check=True, capture_output=True, text=True
    )
    names = [line.split()[-1] for line in out.stdout.splitlines() if line.strip()]
    return [n for n in names if re.match(r"(__)?cuda[A-Z]", n)]


def build(output: Path | None = None, verbose: bool = True, native: bool | None = None) -> Path:
    """Compiles the op library to ``output`` (default: in the package).

    ``native``: -march=native (True) or the portable baseline (False); None
    reads TF_SPARSECONV_NATIVE (default: native).
    """
    output = Path(output) if output else ROOT / "tf_sparseconv" / LIBRARY_NAME
    compile_flags, link_flags, info = tf_flags()
    use_cuda, why, toolkit = cuda_wanted(info["tf_cuda"], info["tf_cuda_version"])
    cxx_cmd, opt, march, asan = _cxx_command(compile_flags, native)
    headers = _headers_digest()
    tasks = _cxx_tasks(cxx_cmd, use_cuda, headers)
    if use_cuda:
        tasks += _cuda_tasks(toolkit, OBJ_DIR, headers)
    if verbose:
        print(
            f"[tf_sparseconv] building {output.name} for TensorFlow {info['tf_version']}; "
            f"CUDA: {'on' if use_cuda else 'off'} ({why})",
            flush=True,
        )
    _compile_all(tasks, verbose)
    _link(cxx_cmd, opt, output, tasks, link_flags)
    build_info = {
        **info,
        "cuda": use_cuda,
        "cuda_reason": why,
        "cuda_toolkit": toolkit.version if use_cuda else None,
        "nvcc": toolkit.nvcc if use_cuda else None,
        "cuda_archs": os.environ.get("TF_SPARSECONV_CUDA_ARCHS", "75,80,90") if use_cuda else None,
        "cuda_runtime": (
            f"TensorFlow's (libtensorflow_framework.so.2, CUDA {info['tf_cuda_version']})"
            if use_cuda
            else None
        ),
        "asan": asan,
        "cpu_flags": march,
        "compile_flags": compile_flags,
        "link_flags": link_flags,
    }
    (output.parent / BUILD_INFO_NAME).write_text(json.dumps(build_info, indent=2) + "\n")
    if verbose:
        print(f"[tf_sparseconv] wrote {output}", flush=True)
    return output


CUDA_CHECK_DIR = ROOT / "build" / "cuda_check"


def tf_build_info() -> dict | None:
    """TensorFlow's build info (``tf.sysconfig.get_build_info()``) without importing TensorFlow."""
    spec = importlib.util.find_spec("tensorflow")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "python" / "platform" / "build_info.py"
    if not path.is_file():
        return None
    namespace: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    return dict(namespace.get("build_info", {}))


def cuda_check(verbose: bool = True) -> Path | None:
    """CI's CUDA check (builds nothing that gets installed).

    Compiles every .cu.cc with every CUDA version found and, when TensorFlow
    is importable and a CUDA build, links a CUDA variant of the op library
    (-z defs, no runtime of its own) with the toolkit matching TensorFlow's
    CUDA, else the newest: the GPU glue of the OpKernels and the launchers
    must link whatever toolkit the library is built with. Returns the linked
    library (None: compile only).
    """
    toolkits: list[CudaToolkit] = []
    for toolkit in cuda_toolkits():
        if toolkit.version not in {t.version for t in toolkits}:
            toolkits.append(toolkit)
    if not toolkits:
        raise SystemExit("[tf_sparseconv] CUDA check: nvcc not found")
    headers = _headers_digest()
    cuda_tasks = {t.version: _cuda_tasks(t, CUDA_CHECK_DIR / "obj", headers) for t in toolkits}
    try:
        compile_flags, link_flags, info = tf_flags()
    except ImportError:
        compile_flags, link_flags, info = [], [], None
    linked = None
    tasks = [task for group in cuda_tasks.values() for task in group]
    if info is not None and info["tf_cuda_version"]:  # a CPU-only TensorFlow has no runtime to link
        want = info["tf_cuda_version"]
        linked = _pick_toolkit(toolkits, want) or max(toolkits, key=lambda t: _numbers(t.version))
        cxx_cmd, opt, _, _ = _cxx_command(compile_flags, None)
        cxx_tasks = _cxx_tasks(cxx_cmd, True, headers)
        tasks = cxx_tasks + tasks
    if verbose:
        print(f"[tf_sparseconv] CUDA check: {', '.join(str(t) for t in toolkits)}", flush=True)
    _compile_all(tasks, verbose)
    if linked is None:
        return None
    output = CUDA_CHECK_DIR / LIBRARY_NAME
    _link(cxx_cmd, opt, output, cxx_tasks + cuda_tasks[linked.version], link_flags)
    if verbose:
        same = _pick_toolkit([linked], want) is not None
        note = "" if same else f" (link check only: TensorFlow's CUDA is {want})"
        print(
            f"[tf_sparseconv] CUDA check: linked {output.relative_to(ROOT)} with CUDA {linked.version}"
            f"{note}; its cuda* symbols resolve against libtensorflow_framework.so.2",
            flush=True,
        )
    return output


def pip_toolkit_wanted() -> tuple[list[str], str]:
    """(pip requirements of the toolkit matching TensorFlow's CUDA, or [], why): what bootstrap installs."""
    import platform

    if _env("TF_SPARSECONV_CUDA", "auto") in ("0", "off", "false", "no"):
        return [], "TF_SPARSECONV_CUDA=0"
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return [], f"no pip CUDA toolkit for {platform.system()} {platform.machine()}"
    info = tf_build_info()
    if not info or not info.get("is_cuda_build") or not info.get("cuda_version"):
        return [], "TensorFlow is not a CUDA build"
    want = str(info["cuda_version"])
    toolkit = find_cuda_toolkit(want)
    if toolkit is not None:
        return [], f"{toolkit} matches TensorFlow's CUDA {want}"
    requirements = pip_toolkit_requirements(want)
    if requirements is None:
        return [], f"no CUDA {want} toolkit here and none on PyPI: {toolkit_hint(want)}"
    return requirements, f"TensorFlow is built with CUDA {want}"


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Build tf_sparseconv's op library.")
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--cuda-check",
        "--cuda-only",
        action="store_true",
        help="compile every .cu.cc with each toolkit found and link-check a CUDA variant (CI)",
    )
    group.add_argument("--toolkits", action="store_true", help="list the CUDA toolkits found")
    group.add_argument(
        "--pip-toolkit",
        action="store_true",
        help="print the pip requirements of a toolkit matching TensorFlow's CUDA (nothing if none is needed)",
    )
    parser.add_argument("--output", type=Path, default=None, help="library path (default: in the package)")
    args = parser.parse_args(argv)
    if args.cuda_check:
        cuda_check()
    elif args.toolkits:
        info = tf_build_info() or {}
        want = str(info["cuda_version"]) if info.get("is_cuda_build") and info.get("cuda_version") else None
        print(f"TensorFlow's CUDA: {want or 'none (not a CUDA build)'}")
        chosen = find_cuda_toolkit(want) if want else None
        for toolkit in cuda_toolkits():
            print(f"{'*' if toolkit == chosen else ' '} {toolkit}")
    elif args.pip_toolkit:
        requirements, why = pip_toolkit_wanted()
        print(
            f"[tf_sparseconv] pip CUDA toolkit: {', '.join(requirements) or 'none'} ({why})", file=sys.stderr
        )
        for requirement in requirements:
            print(requirement)
    else:
        build(args.output)


if __name__ == "__main__":
    main()
