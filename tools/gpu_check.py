"""The GPU check, for a machine with an NVIDIA GPU: ``bash tools/gpu_check.sh``.

Needs nvcc, CuPy, NumPy and pytest; no TensorFlow, no network. Steps:

1. preflight: nvidia-smi lists a GPU, a CUDA toolkit is found (tools/build_ops.py's
   finder), this Python imports CuPy and sees the GPU; else FAIL at once (exit 2);
2. builds the standalone kernel library (tests/gpu/build.py) for the GPU's architecture;
3. runs, in parallel, per op family (one per tests/gpu/test_*.py):
   * the family's tests, where a skip is a failure (TSC_GPU_REQUIRED=1),
   * its small cases (TSC_GPU_SMALL=1, CuPy's memory pool off) under
     compute-sanitizer memcheck, racecheck and initcheck
     (a missing compute-sanitizer fails these steps),
   * and tests/test_gpu_tf.py (TensorFlow on the GPU) when a Python here imports
     TensorFlow;
4. prints one line per family and an overall PASS/FAIL (exit 0/1).

Every step runs under one time budget (``--budget``, default 450 s; a step
still running at its end is a failure). Logs and JUnit files go to ``--out``
(default build/gpu_check).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU_TESTS = ROOT / "tests" / "gpu"
TF_TESTS = ROOT / "tests" / "test_gpu_tf.py"
SANITIZER_TOOLS = ("memcheck", "racecheck", "initcheck")
SANITIZER_ERROR_EXIT = 86


def say(message: str = "") -> None:
    print(f"[gpu_check] {message}" if message else "", flush=True)


def _load_harness_build():
    spec = importlib.util.spec_from_file_location("tsc_gpu_build", GPU_TESTS / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int | None, str]:
    """(exit code or None on timeout/missing, output); never raises."""
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s: {' '.join(cmd)}"
    except OSError as e:
        return None, f"{e}"
    return proc.returncode, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- preflight


@dataclasses.dataclass
class Setup:
    gpus: list[str]
    archs: list[str]
    toolkit: object
    sanitizer: str | None
    python: str
    cupy: str
    tf_python: str | None


def preflight(python: str) -> tuple[Setup | None, list[str]]:
    problems = []
    gpus, archs = [], []
    smi = shutil.which("nvidia-smi")
    if smi is None:
        problems.append("nvidia-smi not found (no NVIDIA driver here)")
    else:
        code, out = _run(
            [smi, "--query-gpu=name,compute_cap,driver_version,memory.total", "--format=csv,noheader"], 30
        )
        gpus = [line.strip() for line in out.splitlines() if line.strip()] if code == 0 else []
        if not gpus:
            problems.append(f"nvidia-smi lists no GPU: {out.strip()[-300:]}")
        for gpu in gpus:
            fields = [f.strip() for f in gpu.split(",")]
            if len(fields) > 1 and re.fullmatch(r"\d+\.\d+", fields[1]):
                archs.append(fields[1].replace(".", ""))
    build = _load_harness_build()
    toolkit = build.find_cuda_toolkit()
    if toolkit is None:
        problems.append("nvcc not found (set NVCC or CUDA_HOME, or add it to PATH)")
    code, out = _run(
        [
            python,
            "-c",
            "import cupy, numpy, pytest; "
            "print('cupy', cupy.__version__, 'devices', cupy.cuda.runtime.getDeviceCount())",
        ],
        120,
    )
    cupy_line = out.strip().splitlines()[-1] if out.strip() else ""
    if code != 0:
        problems.append(f"{python} cannot import cupy, numpy and pytest or use the GPU: {cupy_line[-300:]}")
    elif cupy_line.endswith("devices 0"):
        problems.append(f"CuPy sees no GPU ({cupy_line})")
    if problems:
        return None, problems
    tf_python = None
    for candidate in dict.fromkeys([str(ROOT / ".venv" / "bin" / "python"), python]):
        if os.access(candidate, os.X_OK) and _run([candidate, "-c", "import tensorflow"], 120)[0] == 0:
            tf_python = candidate
            break
    sanitizer = build.find_compute_sanitizer(toolkit.nvcc)
    archs = sorted(set(archs), key=lambda a: int(re.sub(r"\D", "", a) or 0)) or list(build.DEFAULT_ARCHS)
    return Setup(gpus, archs, toolkit, sanitizer, python, cupy_line, tf_python), []


# --------------------------------------------------------------------------- tasks


@dataclasses.dataclass
class Task:
    family: str
    step: str  # "tests", a sanitizer tool, or "tensorflow"
    cmd: list[str]
    env: dict
    log: Path
    junit: Path
    code: int | None = None
    timed_out: bool = False
    not_started: bool = False
    seconds: float = 0.0
    counts: dict = dataclasses.field(default_factory=dict)
    summary: str = ""

    @property
    def ok(self) -> bool:
        c = self.counts
        return (
            self.code == 0
            and c.get("tests", 0) > 0
            and c.get("failures", 0) + c.get("errors", 0) + c.get("skipped", 0) == 0
        )

    def describe(self) -> str:
        c = self.counts
        if self.not_started:
            return f"{self.step} not started (time budget spent)"
        if self.timed_out:
            return f"{self.step} TIMED OUT after {self.seconds:.0f} s"
        if self.code is None:
            return f"{self.step} not run"
        passed = c.get("tests", 0) - c.get("failures", 0) - c.get("errors", 0) - c.get("skipped", 0)
        bad = [f"{c[k]} {k}" for k in ("failures", "errors", "skipped") if c.get(k)]
        text = f"{self.step} {passed}/{c.get('tests', 0)} passed" + (f" ({', '.join(bad)})" if bad else "")
        if self.step in SANITIZER_TOOLS:
            if self.code == SANITIZER_ERROR_EXIT:
                text = f"{self.step}: {self.summary or 'errors'} ({passed} tests)"
            elif self.ok:
                text = f"{self.step} clean ({passed} tests)"
        if not self.ok and not bad and self.code not in (0, SANITIZER_ERROR_EXIT):
            text += f" (exit {self.code})"
        return f"{text}, {self.seconds:.0f} s"


def _junit_counts(path: Path) -> dict:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts: dict = {}
    for suite in suites:
        for key in ("tests", "failures", "errors", "skipped"):
            counts[key] = counts.get(key, 0) + int(suite.get(key, 0))
    return counts


def _sanitizer_summary(log: str) -> str:
    lines = re.findall(r"(?:ERROR|RACECHECK) SUMMARY: .*", log)
    return lines[-1].strip() if lines else ""


def run_task(task: Task, deadline: float) -> Task:
    timeout = deadline - time.monotonic()
    start = time.monotonic()
    if timeout < 5:
        task.not_started = True
        task.log.write_text("not started: no time left in the budget\n")
        return task
    with task.log.open("w") as log:
        log.write("$ " + " ".join(task.cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(
            task.cmd, stdout=log, stderr=subprocess.STDOUT, env=task.env, cwd=ROOT, start_new_session=True
        )
        try:
            task.code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: pytest and, under a sanitizer, the target
            proc.wait()
            task.timed_out = True
    task.seconds = time.monotonic() - start
    task.counts = _junit_counts(task.junit)
    task.summary = _sanitizer_summary(task.log.read_text(errors="replace"))
    return task


def make_tasks(setup: Setup, families: dict[str, Path], out: Path) -> tuple[list[Task], list[str]]:
    base_env = dict(os.environ)
    base_env.update(TSC_GPU_REQUIRED="1", TSC_CUDA_ARCHS=",".join(setup.archs), PYTHONDONTWRITEBYTECODE="1")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        base_env.setdefault(var, "2")  # many test processes share the CPUs
    pytest = [setup.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "junit_family=xunit2"]
    tasks, notes = [], []
    for family, path in families.items():
        junit = out / f"tests-{family}.xml"
        cmd = [*pytest, str(path.relative_to(ROOT)), f"--junitxml={junit}"]
        tasks.append(Task(family, "tests", cmd, base_env, out / f"tests-{family}.log", junit))
    for tool in SANITIZER_TOOLS:
        for family, path in families.items():
            junit = out / f"{tool}-{family}.xml"
            if setup.sanitizer is None:
                tasks.append(Task(family, tool, [], {}, out / f"{tool}-{family}.log", junit))
                continue
            sanitizer = [
                setup.sanitizer,
                "--tool",
                tool,
                "--error-exitcode",
                str(SANITIZER_ERROR_EXIT),
                "--print-limit",
                "20",
                "--launch-timeout",
                "120",
            ]
            cmd = [*sanitizer, *pytest, "-x", str(path.relative_to(ROOT)), f"--junitxml={junit}"]
            env = {**base_env, "TSC_GPU_SMALL": "1"}
            tasks.append(Task(family, tool, cmd, env, out / f"{tool}-{family}.log", junit))
    if TF_TESTS.exists() and setup.tf_python:
        junit = out / "tensorflow.xml"
        env = {**base_env, "TF_FORCE_GPU_ALLOW_GROWTH": "true", "TF_CPP_MIN_LOG_LEVEL": "2"}
        cmd = [setup.tf_python, *pytest[1:], str(TF_TESTS.relative_to(ROOT)), f"--junitxml={junit}"]
        tasks.append(Task("tensorflow", "tests", cmd, env, out / "tensorflow.log", junit))
    elif TF_TESTS.exists():
        notes.append(f"tensorflow: {TF_TESTS.relative_to(ROOT)} not run (no Python here imports TensorFlow)")
    else:
        notes.append(f"tensorflow: no {TF_TESTS.relative_to(ROOT)}")
    return tasks, notes


# --------------------------------------------------------------------------- main


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--budget",
        type=float,
        default=float(os.environ.get("TSC_GPU_CHECK_BUDGET", "450")),
        help="seconds for everything (default 450, TSC_GPU_CHECK_BUDGET)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("TSC_GPU_CHECK_OUT", ROOT / "build" / "gpu_check")),
        help="logs and JUnit files (default build/gpu_check, TSC_GPU_CHECK_OUT)",
    )
    parser.add_argument("--families", default="", help="comma-separated subset, e.g. topk,streaming")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 4, help="parallel test processes")
    args = parser.parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget
    python = sys.executable

    families = {p.stem[len("test_") : -len("_gpu")]: p for p in sorted(GPU_TESTS.glob("test_*_gpu.py"))}
    if args.families:
        wanted = [f.strip() for f in args.families.split(",") if f.strip()]
        unknown = [f for f in wanted if f not in families]
        if unknown:
            say(f"unknown families {unknown}; known: {', '.join(families)}")
            return 2
        families = {f: families[f] for f in wanted}

    say(f"preflight ({python})")
    setup, problems = preflight(python)
    if setup is None:
        for problem in problems:
            say(f"  {problem}")
        say(f"OVERALL FAIL: no usable GPU setup here ({len(problems)} problem(s) above); nothing was run")
        return 2
    for gpu in setup.gpus:
        say(f"  GPU: {gpu}")
    say(f"  toolkit: {setup.toolkit}; archs: sm_{', sm_'.join(setup.archs)}; {setup.cupy}")
    say(
        f"  compute-sanitizer: {setup.sanitizer}"
        if setup.sanitizer
        else "  compute-sanitizer: NOT FOUND ($COMPUTE_SANITIZER, PATH, the toolkit's bin/ and "
        "compute-sanitizer/, /usr/local/cuda*, pip nvidia packages): the sanitizer steps fail"
    )
    say(f"  TensorFlow: {setup.tf_python or 'not importable (tests/test_gpu_tf.py not run)'}")

    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)

    say(f"build: tests/gpu/build.py --archs {','.join(setup.archs)}")
    build_log = args.out / "build.log"
    t0 = time.monotonic()
    code, out = _run(
        [python, str(GPU_TESTS / "build.py"), "-v", "--archs", ",".join(setup.archs)],
        max(5.0, min(300.0, deadline - time.monotonic())),
    )
    build_log.write_text(out)
    if code != 0:
        say(f"build FAILED after {time.monotonic() - t0:.0f} s:\n{_tail(build_log, 40)}")
        say(f"OVERALL FAIL: the kernel library did not build (log {build_log})")
        return 1
    say(f"build ok in {time.monotonic() - t0:.0f} s")

    tasks, notes = make_tasks(setup, families, args.out)
    runnable = [t for t in tasks if t.cmd]
    left = deadline - time.monotonic()
    say(f"running {len(runnable)} test processes ({args.jobs} at a time) within {left:.0f} s")
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        done = list(pool.map(lambda t: run_task(t, deadline), runnable))
    for task in done:
        if not task.ok:
            say(f"--- {task.family} {task.step}: {task.describe()} (log {task.log}):\n{_tail(task.log)}")

    say()
    say(f"summary ({setup.gpus[0] if setup.gpus else 'GPU'}; {time.monotonic() - start:.0f} s)")
    all_ok = True
    width = max(len(f) for f in [*families, "tensorflow"])
    for family in [*families, "tensorflow"]:
        mine = [t for t in tasks if t.family == family]
        if not mine:
            continue
        parts = []
        for task in mine:
            if not task.cmd:
                parts.append(f"{task.step}: compute-sanitizer not found")
            else:
                parts.append(task.describe())
        ok = all(t.cmd and t.ok for t in mine)
        all_ok &= ok
        say(f"{family:<{width}}  {'PASS' if ok else 'FAIL'}  " + " | ".join(parts))
    for note in notes:
        say(note)
    say(f"OVERALL {'PASS' if all_ok else 'FAIL'} in {time.monotonic() - start:.0f} s (logs: {args.out})")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
