"""`fit` callbacks: `UpdatePruningStep` (advances the schedule) and `PruningSummaries`."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tf_sparseconv.python._validation import positive_int
from tf_sparseconv.python.pruning.wrapper import collect_pruned_layers


def _scalar_summary(tag: str, value: float) -> None:
    """`tf.summary.scalar` without needing the tensorboard package (same event format)."""
    metadata = tf.compat.v1.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"
    tf.summary.write(tag, tf.constant(value, dtype=tf.float32), metadata=metadata)


def _as_bool_and_float(result) -> tuple[bool, float]:
    try:
        should_prune, sparsity = result
    except (TypeError, ValueError):
        raise ValueError(f"a pruning schedule must return (should_prune, sparsity), got {result!r}") from None
    return bool(np.asarray(should_prune)), float(np.asarray(sparsity))


class UpdatePruningStep(keras.callbacks.Callback):
    """Advances every wrapper's `pruning_step` and updates the masks on schedule.

    The steps are tensorflow-model-optimization's: when training begins, a fresh
    wrapper's step goes from -1 to 0; before each training batch it is
    incremented (the first batch of a fresh model runs at step 1) and, when the
    schedule says `should_prune` at that step, the mask is recomputed from |kernel|
    for the scheduled sparsity and the pruned weights are set to 0. So the mask
    first changes at the first schedule step >= 1: with `ConstantSparsity(s, 0,
    frequency=100)` at the 100th batch, as in tfmot. At the end of each epoch the
    masks are re-applied to the kernels, so saved weights are the pruned ones. A
    restored model (step >= 0) resumes where it stopped.

    In a custom training loop, drive it by hand as tfmot's guide does:
    `set_model(model)`, `on_train_begin()` once, `on_train_batch_begin(batch)`
    before each step, `on_epoch_end(epoch)` (or `batch=`) after each epoch.
    """

    def __init__(self):
        super().__init__()
        self.pruned_layers = []
        self._collected = False

    def set_model(self, model) -> None:
        super().set_model(model)
        self._collected = False

    def _collect(self):
        self.pruned_layers = collect_pruned_layers(self.model)
        for layer in self.pruned_layers:
            # A wrapper built only while the first training step traces (a model without an
            # Input) cannot be stepped before that batch: it steps itself then (see the wrapper).
            layer.driven_by_callback = True
        self._collected = True

    def on_train_begin(self, logs=None) -> None:
        self._collect()
        for layer in self.pruned_layers:
            if layer.built and int(layer.pruning_step.numpy()) < 0:
                layer.pruning_step.assign(0)
        if any(layer.failed_trace for layer in self.pruned_layers):
            # An earlier `fit` without this callback stopped while tracing its train function
            # (the wrappers' error); that function cannot be traced again, so make a new one.
            for layer in self.pruned_layers:
                layer.failed_trace = False
            make_train_function = getattr(self.model, "make_train_function", None)
            if make_train_function is not None:
                make_train_function(force=True)

    def on_train_batch_begin(self, batch=None, logs=None) -> None:
        if not self._collected:  # on_train_begin was not called (a hand-driven loop)
            self._collect()
        for layer in self.pruned_layers:
            if not layer.built:
                continue
            step = max(int(layer.pruning_step.numpy()), 0) + 1
            layer.pruning_step.assign(step)
            should_prune, sparsity = _as_bool_and_float(
                layer.pruning_schedule(tf.constant(step, dtype=tf.int64))
            )
            if should_prune:
                layer.update_mask(sparsity)

    def on_epoch_end(self, epoch=None, logs=None, batch=None) -> None:
        # `batch=`: tfmot's name for this argument (its guide calls `on_epoch_end(batch=...)`).
        if not self._collected:
            self._collect()
        for layer in self.pruned_layers:
            if layer.built:
                layer.apply_mask()


class PruningSummaries(keras.callbacks.Callback):
    """Writes each pruned layer's sparsity to TensorBoard (`tf.summary` scalars).

    Tags are `pruning/<layer name>/sparsity` (the zero fraction of the mask), plus
    `pruning/<layer name>/target_sparsity` (the schedule's value at the current
    step), at the optimizer's iteration count. Written at each epoch's begin (as
    tfmot does, so a hand-driven loop calling only `on_epoch_begin` logs too) and
    end, once per iteration count; or every `update_freq` batches when it is an
    int.

    Args:
      log_dir: the TensorBoard log directory.
      update_freq: "epoch" or a positive int (batches).
    """

    def __init__(self, log_dir: str, update_freq="epoch"):
        super().__init__()
        if not isinstance(log_dir, (str, bytes)) and not hasattr(log_dir, "__fspath__"):
            raise ValueError(f"`log_dir` must be a path, got {log_dir!r}")
        if update_freq != "epoch":
            update_freq = positive_int(update_freq, "update_freq")
        self.log_dir = str(log_dir)
        self.update_freq = update_freq
        self._writer = None
        self._batches = 0
        self._last_step = None

    def on_train_begin(self, logs=None) -> None:
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)

    def _write(self):
        layers = collect_pruned_layers(self.model)
        if not layers:
            return
        if self._writer is None:  # a hand-driven loop need not call on_train_begin
            self._writer = tf.summary.create_file_writer(self.log_dir)
        optimizer = getattr(self.model, "optimizer", None)
        iterations = getattr(optimizer, "iterations", None)
        step = int(np.asarray(iterations)) if iterations is not None else self._batches
        if step == self._last_step:
            return
        self._last_step = step
        with self._writer.as_default(step=step):
            for layer in layers:
                if not layer.built:
                    continue
                _scalar_summary(f"pruning/{layer.name}/sparsity", layer.sparsity())
                pruning_step = int(layer.pruning_step.numpy())
                if pruning_step >= 0:
                    _, target = _as_bool_and_float(
                        layer.pruning_schedule(tf.constant(pruning_step, dtype=tf.int64))
                    )
                    _scalar_summary(f"pruning/{layer.name}/target_sparsity", target)
        self._writer.flush()

    def on_train_batch_end(self, batch, logs=None) -> None:
        self._batches += 1
        if self.update_freq != "epoch" and self._batches % self.update_freq == 0:
            self._write()

    def on_epoch_begin(self, epoch=None, logs=None) -> None:
        if self.update_freq == "epoch":
            self._write()

    def on_epoch_end(self, epoch=None, logs=None) -> None:
        if self.update_freq == "epoch":
            self._write()

    def on_train_end(self, logs=None) -> None:
        if self._writer is not None:
            self._writer.flush()
