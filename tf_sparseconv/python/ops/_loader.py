"""Cached, never-raising load of the compiled op library.

``load_library()`` loads ``_tf_sparseconv_ops.so`` once and returns the module
of generated op wrappers, or ``None`` when the library is missing, was built
for another TensorFlow version, or fails to load. In that case it emits one
warning that names the TensorFlow version the library was built for and the
command that rebuilds it, and the ops fall back to their pure-TF references.

Environment:
  TF_SPARSECONV_LIBRARY          path of the library to load instead of the
                                 one in the package.
  TF_SPARSECONV_FORCE_REFERENCE  "1": never load; use the pure-TF references.

Which implementation an op call takes (the compiled kernel, a dense dispatch,
or the pure-TF reference, and why) is logged at DEBUG level on the
``"tf_sparseconv"`` logger and recorded inside ``explain()``.

``references_only()`` is a context manager under which ``load_library()``
returns ``None`` in the current thread, so that the functions traced inside it
(for a portable SavedModel) hold stock TensorFlow ops only. ``for_converters()``
goes further, for graphs that LiteRT's and ONNX's converters must take: the
references pick the forms those converters support (e.g. a block-sparse
convolution as the dense convolution times the block mask, int32 index
arithmetic) and quantised layers emit TensorFlow's ``FakeQuantWithMinMaxVars``
ops, which the TFLite converter turns into integer kernels.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import tensorflow as tf

LIBRARY_NAME = "_tf_sparseconv_ops.so"
BUILD_INFO_NAME = "_build_info.json"
REBUILD_COMMAND = "pip install --no-build-isolation -e . (or: python tools/build_ops.py)"

_PACKAGE_DIR = Path(__file__).resolve().parent.parent.parent

_lock = threading.Lock()
_state: dict = {"tried": False, "library": None, "problem": None}
_local = threading.local()


@contextlib.contextmanager
def _thread_flag(name: str, value: bool = True):
    """Sets the thread-local flag `name` to `value` within the block (then restores it)."""
    previous = getattr(_local, name, False)
    setattr(_local, name, value)
    try:
        yield
    finally:
        setattr(_local, name, previous)


def references_only():
    """Within this context (in this thread), every op runs its pure-TF reference."""
    return _thread_flag("references_only")


@contextlib.contextmanager
def for_converters():
    """`references_only()`, with every op in the form the LiteRT and ONNX converters take."""
    with _thread_flag("for_converters"), references_only():
        yield


def converting() -> bool:
    """True inside `for_converters()` (in this thread)."""
    return getattr(_local, "for_converters", False)


def for_onnx():
    """Marks graphs traced inside as meant for ONNX (onnxruntime rejects some empty tensors
    that TensorFlow and LiteRT take, e.g. a convolution over 0 frames)."""
    return _thread_flag("for_onnx")


def converting_for_onnx() -> bool:
    """True inside both `for_converters()` and `for_onnx()` (in this thread)."""
    return converting() and getattr(_local, "for_onnx", False)


class LibraryWarning(RuntimeWarning):
    """The compiled op library could not be used; ops run their references."""


def library_path() -> Path:
    override = os.environ.get("TF_SPARSECONV_LIBRARY")
    return Path(override) if override else _PACKAGE_DIR / LIBRARY_NAME


def _built_for(path: Path) -> str | None:
    info = path.parent / BUILD_INFO_NAME
    try:
        return json.loads(info.read_text()).get("tf_version")
    except (OSError, ValueError):
        return None


def _minor(version: str) -> tuple[str, ...]:
    """`(major, minor)`: TensorFlow keeps its op ABI within a minor release (2.21.0 -> 2.21.1),
    which is also the range a wheel of this package requires."""
    return tuple(version.split(".")[:2])


def _load(path: Path) -> tuple[ModuleType | None, str | None]:
    if not path.exists():
        return None, f"the op library {path} does not exist (the package was not built)"
    built_for = _built_for(path)
    if built_for is not None and _minor(built_for) != _minor(tf.__version__):
        return None, (
            f"the op library was built for TensorFlow {built_for} but TensorFlow "
            f"{tf.__version__} is installed"
        )
    try:
        return tf.load_op_library(str(path)), None
    except Exception as exc:  # noqa: BLE001 - any load failure means: fall back
        where = f" (built for TensorFlow {built_for})" if built_for else ""
        return None, f"loading {path}{where} failed: {exc}"


def load_library() -> ModuleType | None:
    """Returns the op library module, loading it on the first call (None inside
    `references_only()`)."""
    if getattr(_local, "references_only", False):
        return None
    if _state["tried"]:
        return _state["library"]
    with _lock:
        if not _state["tried"]:
            if os.environ.get("TF_SPARSECONV_FORCE_REFERENCE", "0") == "1":
                library, problem = None, None
            else:
                library, problem = _load(library_path())
            if problem:
                warnings.warn(
                    f"tf_sparseconv: {problem}. The ops fall back to their (slower) "
                    f"pure-TensorFlow references. Rebuild with: {REBUILD_COMMAND}",
                    LibraryWarning,
                    stacklevel=2,
                )
            _state.update(tried=True, library=library, problem=problem)
    return _state["library"]


def compiled_library() -> ModuleType | None:
    """The op library even inside `references_only()`: for the gradient functions of ops that
    are already in a graph (they must differentiate the compiled op that is there)."""
    with _thread_flag("references_only", False):
        return load_library()


def is_library_loaded() -> bool:
    """True when the compiled kernels (not the references) run the ops."""
    return load_library() is not None


# --- which implementation ran -----------------------------------------------------------------

logger = logging.getLogger("tf_sparseconv")


class Dispatch(NamedTuple):
    """One op call's implementation: `op` (the `tsc.ops` function), `implementation`
    ("compiled", "dense", "grouped" or "reference") and `reason`."""

    op: str
    implementation: str
    reason: str

    def __str__(self) -> str:
        return f"{self.op}: {self.implementation} ({self.reason})"


def _recorders() -> list:
    if not hasattr(_local, "recorders"):
        _local.recorders = []
    return _local.recorders


@contextlib.contextmanager
def explain():
    """Records which implementation each op call takes, in this thread.

    ```python
    with tsc.ops.explain() as calls:
        model.predict(x)  # or a direct op call, or tf.function tracing
    for call in calls:
        print(call)  # e.g. "channel_sparse_conv2d: dense (fan-in 12 of 16 > 0.3 x Cin ...)"
    ```

    The choice is made in Python when an op is called eagerly or when a `tf.function` (a
    Keras `predict`/`fit` step, an export) is traced: inside a compiled function the record
    says what the traced graph holds, once per trace. The same lines go to the
    `"tf_sparseconv"` logger at DEBUG level
    (`logging.getLogger("tf_sparseconv").setLevel(logging.DEBUG)`).
    """
    records: list[Dispatch] = []
    stack = _recorders()
    stack.append(records)
    try:
        yield records
    finally:
        for i in range(len(stack) - 1, -1, -1):  # by identity: equal (e.g. empty) lists differ
            if stack[i] is records:
                del stack[i]
                break


def record(op: str, implementation: str, reason: str) -> None:
    """Logs (DEBUG) and records (inside `explain()`) one op call's implementation."""
    stack = _recorders()
    if not stack and not logger.isEnabledFor(logging.DEBUG):
        return
    entry = Dispatch(op, implementation, reason)
    logger.debug("%s", entry)
    for records in stack:
        records.append(entry)


def dispatch(op: str) -> ModuleType | None:
    """`load_library()` for the op `op`, recording which implementation it takes and why."""
    library = load_library()
    if not _recorders() and not logger.isEnabledFor(logging.DEBUG):
        return library
    if library is not None:
        record(op, "compiled", f"C++/CUDA kernel from {library_path().name}")
    elif converting():
        record(op, "reference", "inside for_converters(): the converter-friendly pure-TF form")
    elif getattr(_local, "references_only", False):
        record(op, "reference", "inside references_only(): stock TensorFlow ops")
    elif os.environ.get("TF_SPARSECONV_FORCE_REFERENCE", "0") == "1":
        record(op, "reference", "TF_SPARSECONV_FORCE_REFERENCE=1")
    else:
        record(op, "reference", f"the op library is not loaded: {_state['problem']}")
    return library
