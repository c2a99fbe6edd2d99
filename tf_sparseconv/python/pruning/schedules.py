"""Pruning schedules with tensorflow-model-optimization's signatures and values.

A schedule maps the pruning step (int) to `(should_prune, sparsity)`: a bool
scalar tensor (prune at this step?) and a float32 scalar tensor (the fraction of
weights that should be zero after pruning). Any callable with that contract is
accepted by `prune_low_magnitude`, including tfmot's own schedule objects
(duck-typed: tfmot is never imported here).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tf_sparseconv.python._validation import as_int, integer, is_int


def _check_step(value, name: str, allow_minus_one: bool = False) -> int:
    if allow_minus_one and as_int(value) == -1:
        return -1
    return integer(value, name, minimum=0)


def _check_sparsity(value, name: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be in [0, 1), got {value}")
    return value


class PruningSchedule:
    """Base class: `schedule(step)` -> `(should_prune, sparsity)` tensors."""

    # The constructor arguments, which a schedule stores under their names: its config.
    config_attributes: tuple[str, ...] | None = None

    def __call__(self, step):
        raise NotImplementedError

    def get_config(self) -> dict:
        if self.config_attributes is None:
            raise NotImplementedError
        return {name: getattr(self, name) for name in self.config_attributes}

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    @staticmethod
    def _should_prune_in_step(step, begin_step: int, end_step: int, frequency: int):
        """True when `begin_step <= step <= end_step` (no end if -1) and on a frequency beat."""
        step = tf.cast(step, tf.int64)
        in_range = tf.logical_and(
            step >= begin_step,
            tf.logical_or(step <= end_step, tf.constant(end_step < 0)),
        )
        on_beat = tf.equal(tf.math.floormod(step - begin_step, frequency), 0)
        return tf.logical_and(in_range, on_beat)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.get_config() == other.get_config()

    __hash__ = object.__hash__


@keras.saving.register_keras_serializable(package="tf_sparseconv")
class ConstantSparsity(PruningSchedule):
    """Prune to `target_sparsity` every `frequency` steps from `begin_step` to `end_step`.

    Args:
      target_sparsity: fraction of zeros, in [0, 1).
      begin_step: first step at which to prune (>= 0).
      end_step: last step at which to prune; -1 prunes for ever.
      frequency: prune every `frequency` steps (>= 1).
    """

    config_attributes = ("target_sparsity", "begin_step", "end_step", "frequency")

    def __init__(self, target_sparsity: float, begin_step: int, end_step: int = -1, frequency: int = 100):
        self.target_sparsity = _check_sparsity(target_sparsity, "target_sparsity")
        self.begin_step = _check_step(begin_step, "begin_step")
        self.end_step = _check_step(end_step, "end_step", allow_minus_one=True)
        self.frequency = _check_step(frequency, "frequency")
        if self.frequency < 1:
            raise ValueError(f"`frequency` must be >= 1, got {frequency}")
        if self.end_step != -1 and self.end_step < self.begin_step:
            raise ValueError(f"`end_step` ({end_step}) must be >= `begin_step` ({begin_step}) or -1")

    def __call__(self, step):
        return (
            self._should_prune_in_step(step, self.begin_step, self.end_step, self.frequency),
            tf.constant(self.target_sparsity, dtype=tf.float32),
        )


@keras.saving.register_keras_serializable(package="tf_sparseconv")
class PolynomialDecay(PruningSchedule):
    """Sparsity rising from `initial_sparsity` to `final_sparsity` as a polynomial.

    `sparsity(step) = final + (initial - final) * (1 - p) ** power` with
    `p = clip((step - begin_step) / (end_step - begin_step), 0, 1)`; pruning
    happens every `frequency` steps in `[begin_step, end_step]`.

    Args:
      initial_sparsity, final_sparsity: fractions of zeros, in [0, 1).
      begin_step: first pruning step (>= 0); end_step: last one (> begin_step).
      power: the exponent of the decay (3 by default, as tfmot).
      frequency: prune every `frequency` steps (>= 1).
    """

    config_attributes = ("initial_sparsity", "final_sparsity", "begin_step", "end_step", "power", "frequency")

    def __init__(
        self,
        initial_sparsity: float,
        final_sparsity: float,
        begin_step: int,
        end_step: int,
        power: float = 3,
        frequency: int = 100,
    ):
        self.initial_sparsity = _check_sparsity(initial_sparsity, "initial_sparsity")
        self.final_sparsity = _check_sparsity(final_sparsity, "final_sparsity")
        self.begin_step = _check_step(begin_step, "begin_step")
        self.end_step = _check_step(end_step, "end_step")
        self.frequency = _check_step(frequency, "frequency")
        if self.frequency < 1:
            raise ValueError(f"`frequency` must be >= 1, got {frequency}")
        if self.end_step <= self.begin_step:
            raise ValueError(f"`end_step` ({end_step}) must be > `begin_step` ({begin_step})")
        try:
            self.power = int(power) if is_int(power) else float(power)
        except (TypeError, ValueError):
            raise ValueError(f"`power` must be a number, got {power!r}") from None

    def __call__(self, step):
        p = tf.cast(tf.cast(step, tf.int64) - self.begin_step, tf.float32) / float(
            self.end_step - self.begin_step
        )
        p = tf.clip_by_value(p, 0.0, 1.0)
        sparsity = (self.initial_sparsity - self.final_sparsity) * tf.pow(
            1.0 - p, float(self.power)
        ) + self.final_sparsity
        return (
            self._should_prune_in_step(step, self.begin_step, self.end_step, self.frequency),
            tf.cast(sparsity, tf.float32),
        )


_OURS = {"ConstantSparsity": ConstantSparsity, "PolynomialDecay": PolynomialDecay}


def check_schedule(schedule, name: str = "pruning_schedule") -> object:
    """`schedule` if it is a usable schedule (ours, tfmot's, any such callable), else ValueError."""
    if not callable(schedule) or isinstance(schedule, type):
        raise ValueError(
            f"`{name}` must be a pruning schedule (callable step -> (should_prune, sparsity)), "
            f"got {schedule!r}"
        )
    return schedule


def serialize_schedule(schedule) -> dict:
    """A Keras-serialisable dict; tfmot's ConstantSparsity/PolynomialDecay become ours."""
    if isinstance(schedule, PruningSchedule):
        return keras.saving.serialize_keras_object(schedule)
    get_config = getattr(schedule, "get_config", None)
    if get_config is not None:
        config = get_config()
        # tfmot's schedules return {"class_name": ..., "config": {...}}.
        if isinstance(config, dict) and config.get("class_name") in _OURS and "config" in config:
            ours = _OURS[config["class_name"]].from_config(dict(config["config"]))
            return keras.saving.serialize_keras_object(ours)
    try:
        return keras.saving.serialize_keras_object(schedule)
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise ValueError(
            f"`pruning_schedule` {schedule!r} cannot be serialised; register it with "
            "`keras.saving.register_keras_serializable` or use tsc.pruning's schedules"
        ) from err


def deserialize_schedule(config) -> dict:
    if config is None or callable(config):
        return config
    return keras.saving.deserialize_keras_object(config)
