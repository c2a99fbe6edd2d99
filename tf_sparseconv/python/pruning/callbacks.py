"""`fit` callbacks: `UpdatePruningStep` (advances the schedule) and `PruningSummaries`."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

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

    At the start of each training batch, each `PruneLowMagnitude` layer's step is
    incremented (the first batch of a fresh model is step 0, as in tfmot) and,
    when its schedule says `should_prune`, its mask is recomputed from |kernel|
    for the scheduled sparsity and the pruned weights are set to 0. At the end
    of each epoch the masks are re-applied to the kernels, so saved weights are
    the pruned ones. A restored model (step >= 0) resumes where it stopped.
    """

    def __init__(self):
        super().__init__()
        self.pruned_layers = []

    def on_train_begin(self, logs=None):
        self.pruned_layers = collect_pruned_layers(self.model)

    def on_train_batch_begin(self, batch, logs=None):
        for layer in self.pruned_layers:
            if not layer.built:
                continue
            step = int(layer.pruning_step.numpy()) + 1
            layer.pruning_step.assign(step)
            should_prune, sparsity = _as_bool_and_float(
                layer.pruning_schedule(tf.constant(step, dtype=tf.int64))
            )
            if should_prune:
                layer.update_mask(sparsity)

    def on_epoch_end(self, epoch, logs=None):
        for layer in self.pruned_layers:
            if layer.built:
                layer.apply_mask()


class PruningSummaries(keras.callbacks.Callback):
    """Writes each pruned layer's sparsity to TensorBoard (`tf.summary` scalars).

    Tags are `pruning/<layer name>/sparsity` (the zero fraction of the mask), plus
    `pruning/<layer name>/target_sparsity` (the schedule's value at the current
    step). Written at each epoch end, or every `update_freq` batches when it is
    an int.

    Args:
      log_dir: the TensorBoard log directory.
      update_freq: "epoch" or a positive int (batches).
    """

    def __init__(self, log_dir: str, update_freq="epoch"):
        super().__init__()
        if not isinstance(log_dir, (str, bytes)) and not hasattr(log_dir, "__fspath__"):
            raise ValueError(f"`log_dir` must be a path, got {log_dir!r}")
        if update_freq != "epoch" and (
            not isinstance(update_freq, int) or isinstance(update_freq, bool) or update_freq < 1
        ):
            raise ValueError(f"`update_freq` must be 'epoch' or a positive int, got {update_freq!r}")
        self.log_dir = str(log_dir)
        self.update_freq = update_freq
        self._writer = None
        self._batches = 0

    def on_train_begin(self, logs=None):
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)

    def _write(self):
        layers = collect_pruned_layers(self.model)
        if not layers or self._writer is None:
            return
        optimizer = getattr(self.model, "optimizer", None)
        iterations = getattr(optimizer, "iterations", None)
        step = int(np.asarray(iterations)) if iterations is not None else self._batches
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

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1
        if self.update_freq != "epoch" and self._batches % self.update_freq == 0:
            self._write()

    def on_epoch_end(self, epoch, logs=None):
        if self.update_freq == "epoch":
            self._write()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()
