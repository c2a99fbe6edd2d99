"""Per-shape choice between two implementations of one op call, by measurement.

A channel-sparse convolution has two ways to run: the compiled channel-sparse kernel (cost
proportional to the fan-in) and TensorFlow's dense convolution on the equivalent dense kernel
(oneDNN/cuDNN, faster per FLOP). Which one wins depends on the whole call shape (batch,
spatial size, channels, fan-in, stride, dtype, device), not on the density alone, so the
first call of each shape times both on random data of that shape, and every later call (and
every `tf.function` trace) of that shape takes the faster one, as cuDNN's autotuning does.
The choice is cached for the process: deterministic within it, visible through
`tsc.ops.explain()` and the `"tf_sparseconv"` logger, and can be forced with
`channel_sparse_implementation()` or the environment variable
`TF_SPARSECONV_CHANNEL_SPARSE` (`auto`, `sparse`, `dense` or `grouped`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterator

import tensorflow as tf

ENV_VAR = "TF_SPARSECONV_CHANNEL_SPARSE"
MODES = ("auto", "sparse", "dense", "grouped")

logger = logging.getLogger("tf_sparseconv")
_local = threading.local()
_lock = threading.Lock()
_choices: dict[Hashable, tuple[str, dict[str, float]]] = {}


def _check_mode(mode, where: str) -> str:
    value = str(mode).strip().lower() if isinstance(mode, str) else mode
    if value not in MODES:
        raise ValueError(f"{where} must be one of {MODES}, got {mode!r}")
    return value


@contextlib.contextmanager
def channel_sparse_implementation(mode: str) -> Iterator[None]:
    """Forces how `channel_sparse_conv1d/2d` (and the layers built on them) run for the calls
    made or traced in this thread within the block.

    `mode`: `"sparse"` (the compiled channel-sparse kernel), `"dense"` (`tf.nn.conv2d` on the
    equivalent dense kernel, where that applies: dilation 1 and constant connection lists;
    elsewhere the sparse kernel runs and `explain()` says why), `"grouped"` (one grouped
    `tf.nn.conv2d` on the gathered input channels, where the lists come in equal groups of
    identical consecutive rows, as `channel_group` pruning makes them) or `"auto"` (the
    default: the fastest of those that apply, measured once per call shape). The
    process-wide default comes from the environment variable `TF_SPARSECONV_CHANNEL_SPARSE`.
    """
    mode = _check_mode(mode, "`mode`")
    previous = getattr(_local, "mode", None)
    _local.mode = mode
    try:
        yield
    finally:
        _local.mode = previous


def current_mode() -> str:
    """The implementation mode in force in this thread ("auto", "sparse", "dense" or
    "grouped")."""
    mode = getattr(_local, "mode", None)
    if mode is not None:
        return mode
    return _check_mode(os.environ.get(ENV_VAR, "auto") or "auto", ENV_VAR)


def _sync(result) -> None:
    """Waits for `result` (a CPU op returns when done; a GPU one when its value is fetched)."""
    flat = tf.reshape(result, [-1])
    if flat.shape[0]:
        flat[:1].numpy()


def _time(candidates: dict[str, Callable[[], tf.Tensor]], rounds: int, budget_s: float) -> dict:
    """Best wall time (ms) of each candidate, run as a `tf.function` (as in a Keras model:
    eager per-op overheads would favour the candidate with fewer ops), over alternating
    rounds after one warm-up call each: at least `rounds`, then more until `budget_s` has
    passed (small shapes get many rounds, so a load spike does not decide), at most 50. A
    candidate that fails (e.g. out of memory at the measured shape) is left out."""
    functions = {}
    for name, fn in candidates.items():
        function = tf.function(fn, autograph=False)
        try:
            _sync(function())
        except (tf.errors.OpError, ValueError) as error:
            logger.debug("%s: left out of the measurement (%s)", name, error)
            continue
        functions[name] = function
    best = {name: float("inf") for name in functions}
    start = time.perf_counter()
    for i in range(50):
        if i >= rounds and time.perf_counter() - start > budget_s:
            break
        for name, fn in functions.items():
            t0 = time.perf_counter()
            _sync(fn())
            best[name] = min(best[name], (time.perf_counter() - t0) * 1e3)
    return best


def measured_choice(
    key: Hashable,
    candidates: Callable[[], dict[str, Callable[[], tf.Tensor]]],
    rounds: int = 3,
    budget_s: float = 0.25,
    fallback: str | None = None,
) -> tuple[str, dict[str, float], bool]:
    """`(name, times_ms, cached)`: the fastest of the callables that `candidates()` returns
    (built and timed, eagerly, outside any graph being traced, only on the first call for
    `key`), cached for the process. On a tie the first candidate wins; when every candidate
    fails, `fallback` (with no times)."""
    with _lock:
        hit = _choices.get(key)
        if hit is not None:
            return hit[0], hit[1], True
        with tf.init_scope():
            times = _time(candidates(), rounds, budget_s)
        if not times:
            if fallback is None:
                raise RuntimeError(f"every candidate failed for {key}")
            best = fallback
        else:
            best = min(times, key=times.get)
        _choices[key] = (best, times)
        return best, times, False


def clear_choices() -> None:
    """Forgets every measured choice (they are measured again on the next call)."""
    with _lock:
        _choices.clear()


def choices() -> dict[Hashable, tuple[str, dict[str, float]]]:
    """A copy of the measured choices: key -> (implementation, times in ms)."""
    with _lock:
        return dict(_choices)
