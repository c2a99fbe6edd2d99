"""Timing helpers shared by the benchmark families: each row compares one of our
ops with the best stock-TensorFlow implementation of the same computation,
measured in the same process, on the same inputs."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import tensorflow as tf


@dataclasses.dataclass
class Row:
    family: str
    case: str
    ours_ms: float
    stock_ms: float
    stock_name: str
    target: float | None = None  # required speed-up (stock / ours), if any
    floor_ms: float | None = None  # a copy with the same memory traffic (lower bound)
    note: str = ""

    @property
    def speedup(self) -> float:
        return self.stock_ms / self.ours_ms

    @property
    def verdict(self) -> str:
        if self.target is None:
            return ""
        return "met" if self.speedup >= self.target else "NOT met"


def time_pair(
    ours: Callable, stock: Callable, *args, warmup: int = 2, repeat: int = 9
) -> tuple[float, float]:
    """Median wall times (ms) of `ours(*args)` and `stock(*args)`, measured alternately so
    that both see the same machine state (caches, allocator, other load)."""
    for _ in range(warmup):
        _sync(ours(*args))
        _sync(stock(*args))
    times: tuple[list, list] = ([], [])
    for _ in range(repeat):
        for fn, bucket in ((ours, times[0]), (stock, times[1])):
            start = time.perf_counter()
            _sync(fn(*args))
            bucket.append(time.perf_counter() - start)
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3


def _sync(result) -> None:
    """Waits for `result` (a tf.function returns when its CPU kernels are done; on a GPU,
    fetching one element waits for the stream)."""
    for t in tf.nest.flatten(result):
        if isinstance(t, tf.Tensor) and t.shape.num_elements():
            tf.reshape(t, [-1])[:1].numpy()


def forward_backward(fn: Callable[[tf.Tensor], tf.Tensor]) -> Callable[[tf.Tensor, tf.Tensor], tuple]:
    """A tf.function computing fn(x) and its gradient for upstream gradient dy."""

    @tf.function(jit_compile=False)
    def run(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x)
        return y, tape.gradient(y, x, output_gradients=dy)

    return run


def forward(fn: Callable[[tf.Tensor], tf.Tensor]) -> Callable[[tf.Tensor], tf.Tensor]:
    return tf.function(fn, jit_compile=False)


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| family | case | ours (ms) | stock TF (ms) | stock TF implementation | speed-up | target "
        "| copy floor (ms) | note |",
        "|---|---|---:|---:|---|---:|---|---:|---|",
    ]
    for r in rows:
        target = f"≥ {r.target:g}× ({r.verdict})" if r.target else ""
        lines.append(
            f"| {r.family} | {r.case} | {r.ours_ms:.2f} | {r.stock_ms:.2f} | {r.stock_name} | "
            f"{r.speedup:.2f}× | {target} | {'' if r.floor_ms is None else f'{r.floor_ms:.2f}'} | {r.note} |"
        )
    return "\n".join(lines)
