"""Distributed training with tf.distribute (issue 7): our layers, ops and pruning callbacks under
MirroredStrategy (logical CPU devices) and MultiWorkerMirroredStrategy (two worker processes on
127.0.0.1), checked against a single-device run of the same model, data and global batch.

Every scenario runs in fresh processes: logical devices must be configured before TensorFlow
initialises, and each worker of a multi-worker cluster is its own process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import ROOT, run_python

# One script for every scenario; TSC_DIST_MODE picks the strategy, TSC_DIST_OUT the output folder
# (result.json: loss history and facts; weights.npz: every model and optimizer variable, one entry
# "<path>@<replica>" per local replica).
SCRIPT = r'''
import json
import os
from pathlib import Path

import numpy as np
import tensorflow as tf

mode = os.environ["TSC_DIST_MODE"]  # "single", "mirrored" or "worker"
out = Path(os.environ["TSC_DIST_OUT"])

# The strategy first: logical devices must be set before TensorFlow initialises its devices, and
# MultiWorkerMirroredStrategy must exist before any other op runs.
if mode == "mirrored":
    (cpu,) = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
elif mode == "worker":

    class MultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
        """Keras 3's `fit` calls `strategy.reduce` on nests of values (the first data batch) and
        with `axis=0` on scalar logs; MultiWorkerMirroredStrategy handles neither (MirroredStrategy
        does). keras-team/keras#20585."""

        def reduce(self, reduce_op, value, axis=None):
            reduce_one = super().reduce

            def one(v):
                rank = self.experimental_local_results(v)[0].shape.rank
                return reduce_one(reduce_op, v, None if rank == 0 else axis)

            return tf.nest.map_structure(one, value)

    strategy = MultiWorkerStrategy()  # the cluster and this worker's task come from TF_CONFIG
else:
    strategy = tf.distribute.get_strategy()

import keras

import tf_sparseconv as tsc

rng = np.random.default_rng(0)
x = rng.standard_normal((64, 8, 8, 4)).astype("float32")
mask = (rng.random((64, 8, 8, 1)) < 0.08).astype("float32")  # about 3/4 of the 4x4 blocks active
y = np.argmax(x[..., :3].mean(axis=(1, 2)), axis=-1)  # labels the model can learn

with strategy.scope():
    keras.utils.set_random_seed(0)
    inputs = [keras.Input((8, 8, 4), name="x"), keras.Input((8, 8, 1), name="mask")]
    h = tsc.layers.ChannelSparseConv2D(8, 3, fan_in=2, activation="relu")(inputs[0])
    h = tsc.layers.KWinners(k=4)(h)
    h = tsc.layers.BlockSparseConv2D(8, 3, block_size=4, activation="relu")([h, inputs[1]])
    outputs = keras.layers.Dense(3)(keras.layers.Flatten()(h))
    # Masks recomputed every 2nd step up to step 8 (sparsity 0 -> 0.5), then kept.
    schedule = tsc.pruning.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=8, frequency=2)
    model = tsc.pruning.prune_low_magnitude(keras.Model(inputs, outputs), schedule)
    model.compile(
        optimizer=keras.optimizers.SGD(0.2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
history = model.fit(
    [x, mask],
    y,
    batch_size=16,  # the global batch: 8 per replica with two replicas
    epochs=4,
    shuffle=False,
    verbose=0,
    callbacks=[tsc.pruning.UpdatePruningStep()],
)

arrays = {}
for v in [*model.weights, *model.optimizer.variables]:
    for i, value in enumerate(strategy.experimental_local_results(v.value)):
        arrays[f"{v.path}@{i}"] = np.asarray(value)
np.savez(out / "weights.npz", **arrays)

result = {
    "loss": history.history["loss"],
    "replicas": strategy.num_replicas_in_sync,
    "devices": [t.device for t in strategy.experimental_local_results(model.weights[0].value)],
    "library_loaded": tsc.ops.is_library_loaded(),
}
if mode == "worker":
    resolver = strategy.cluster_resolver
    result["chief"] = resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0
    )
    if result["chief"]:  # only the chief saves; the file must reload to the same model
        model.save(out / "model.keras")
        loaded = keras.models.load_model(out / "model.keras")
        batch = [x[:8], mask[:8]]
        diff = np.asarray(loaded(batch)) - np.asarray(model(batch))
        result["reload_max_diff"] = float(np.abs(diff).max())
(out / "result.json").write_text(json.dumps(result))
'''

REPLICAS = 2
STEPS = 64 // 16 * 4  # batches per epoch * epochs
FINAL_SPARSITY = 0.5
# The distributed runs differ from the single-device run only in the float32 summation order of
# the gradient (per-replica half-batch gradients all-reduced, instead of one full-batch gradient):
# a few ulp per step. Measured over the 16 SGD steps: loss <= 1.2e-7 relative, weights <= 6e-8.
# Wrong loss scaling, an unsynchronised mask or step, or a replica on stale weights changes the
# loss at the 1e-2 level.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5
TIMEOUT = 300


def _env(mode: str, out, **extra) -> dict:
    # CPU only: the same devices and kernels for the reference and the distributed runs.
    return {"TSC_DIST_MODE": mode, "TSC_DIST_OUT": str(out), "CUDA_VISIBLE_DEVICES": "", **extra}


def _load(out) -> tuple[dict, dict[str, list[np.ndarray]]]:
    """(result.json, {variable path: [value per local replica]})."""
    result = json.loads((out / "result.json").read_text())
    replicas: dict[str, dict[int, np.ndarray]] = {}
    with np.load(out / "weights.npz") as npz:
        for key in npz.files:
            path, index = key.rsplit("@", 1)
            replicas.setdefault(path, {})[int(index)] = npz[key]
    return result, {path: [values[i] for i in sorted(values)] for path, values in replicas.items()}


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _is_mask(path: str) -> bool:
    return path.endswith("/mask")


def _assert_matches_reference(result, variables, reference):
    ref_result, ref_variables = reference
    assert result["library_loaded"]
    np.testing.assert_allclose(result["loss"], ref_result["loss"], rtol=LOSS_RTOL)
    assert ref_result["loss"][-1] < 0.9 * ref_result["loss"][0], ref_result["loss"]  # it trained
    assert variables.keys() == ref_variables.keys()
    for path, values in variables.items():
        ref = ref_variables[path][0]
        if _is_mask(path) or path.endswith("pruning_step") or "iteration" in path:
            np.testing.assert_array_equal(values[0], ref, err_msg=path)
        else:
            np.testing.assert_allclose(values[0], ref, rtol=0, atol=WEIGHT_ATOL, err_msg=path)


def _assert_pruned(variables):
    masks = {p: v[0] for p, v in variables.items() if _is_mask(p)}
    assert len(masks) == 3, sorted(variables)
    for path, mask in masks.items():
        zeros = float(np.mean(mask == 0))
        assert FINAL_SPARSITY <= zeros <= FINAL_SPARSITY + 0.05, (path, zeros)
        # "prune_low_magnitude_<layer>/mask" -> "prune_low_magnitude_<layer>/<layer>/kernel"
        prefix = path.removesuffix("mask")
        (kernel,) = [v[0] for p, v in variables.items() if p.startswith(prefix) and p.endswith("/kernel")]
        assert np.all(kernel[mask == 0] == 0), path  # the pruned weights are 0
    for path, values in variables.items():
        if path.endswith("pruning_step"):
            assert int(values[0]) == STEPS, (path, values[0])  # the first batch is step 1 (tfmot)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-device run: (result.json, variables)."""
    out = tmp_path_factory.mktemp("single")
    run_python(SCRIPT, env=_env("single", out), timeout=TIMEOUT)
    return _load(out)


def test_mirrored_strategy_on_logical_cpu_devices(reference, tmp_path):
    run_python(SCRIPT, env=_env("mirrored", tmp_path), timeout=TIMEOUT)
    result, variables = _load(tmp_path)
    assert result["replicas"] == REPLICAS
    assert [d.rsplit(":", 2)[-2:] for d in result["devices"]] == [["CPU", "0"], ["CPU", "1"]]
    # Every variable (kernels, biases, masks, pruning steps, optimizer state) is the same on every
    # replica, bit for bit.
    for path, values in variables.items():
        assert len(values) == REPLICAS, path
        for value in values[1:]:
            np.testing.assert_array_equal(value, values[0], err_msg=path)
    _assert_pruned(variables)
    _assert_matches_reference(result, variables, reference)


def test_multi_worker_mirrored_strategy_two_workers_on_loopback(reference, tmp_path):
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(REPLICAS)]}
    outs = [tmp_path / f"worker{i}" for i in range(REPLICAS)]
    logs = [tmp_path / f"worker{i}.log" for i in range(REPLICAS)]
    procs: list[subprocess.Popen] = []

    def output() -> str:
        return "\n".join(f"--- worker {i}:\n{log.read_text()[-6000:]}" for i, log in enumerate(logs))

    try:
        for i, (out, log) in enumerate(zip(outs, logs)):
            out.mkdir()
            tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
            env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow"}
            env.update(_env("worker", out, TF_CONFIG=tf_config))
            with open(log, "w") as stream:
                command = [sys.executable, "-c", SCRIPT]
                proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=stream, stderr=subprocess.STDOUT)
                procs.append(proc)
        deadline = time.monotonic() + TIMEOUT
        # A worker that fails leaves the other waiting on a collective: stop at the first failure.
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"the workers did not finish in {TIMEOUT} s\n{output()}")
            time.sleep(0.2)
        codes = [p.poll() for p in procs]
        assert codes == [0] * REPLICAS, f"worker exit codes {codes}\n{output()}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    runs = [_load(out) for out in outs]
    for result, variables in runs:
        assert result["replicas"] == REPLICAS  # one replica per worker, two in sync
        assert all(len(values) == 1 for values in variables.values())
        _assert_pruned(variables)
        _assert_matches_reference(result, variables, reference)
    # The workers end with the same weights, masks and steps, bit for bit, and report the same loss.
    (result0, variables0), (result1, variables1) = runs
    assert result0["loss"] == result1["loss"]
    assert variables0.keys() == variables1.keys()
    for path in variables0:
        np.testing.assert_array_equal(variables0[path][0], variables1[path][0], err_msg=path)
    # Only the chief (worker 0) saved the model, and the file reloads to the same predictions.
    assert [result["chief"] for result, _ in runs] == [True, False]
    assert (outs[0] / "model.keras").exists() and not (outs[1] / "model.keras").exists()
    assert result0["reload_max_diff"] == 0.0
