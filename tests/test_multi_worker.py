"""QAT training under tf.distribute: MultiWorkerMirroredStrategy with two worker processes on the
loopback interface, and MirroredStrategy with two logical CPU devices in one process.

Each replica sees its own share of every batch, so each computes its own activation ranges and batch
statistics. The range variables aggregate their writes by the mean across replicas, and a folded
BatchNormalization(synchronized=True) normalizes with the global batch's statistics, so every replica
ends with the same ranges and moving statistics; the tests check that they do, bit for bit.

A strategy has to be set up before TensorFlow initializes its runtime, so the training runs in fresh
Python processes and the test process is left as it is.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

WORKER_TIMEOUT_S = 240  # two TensorFlow imports on 2 shared cores, 2 short epochs, one export
INITIAL_RANGE = (-6.0, 6.0)  # ActivationQuantizer's init_min, init_max
EPOCHS, GLOBAL_BATCH = 2, 64
STEPS = EPOCHS * (1347 // GLOBAL_BATCH)  # the digits' 1,347 training images, whole batches only

# Shared by both scripts. A Conv-BN-ReLU CNN on the 8x8 digits, QAT from scratch: its BatchNorm's
# statistics are untrained, so QAT trains them with batch statistics, the case that needs them synced.
COMMON = textwrap.dedent(
    f"""
    EPOCHS, GLOBAL_BATCH = {EPOCHS}, {GLOBAL_BATCH}

    def qat_model(learned=False):
        float_model = keras.Sequential([
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(8, 3, use_bias=False, name="conv"),
            keras.layers.BatchNormalization(synchronized=True, name="bn"),
            keras.layers.ReLU(name="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(10, name="logits"),
        ])
        scheme = "int8"
        if learned:  # LSQ: trainable weight steps and activation ranges
            scheme = kerasq.QuantizationScheme(
                weights=kerasq.WeightQuantizer(learn_scale=True), activations=kerasq.ActivationQuantizer(learn_range="lsq")
            )
        model = kerasq.quantize_model(float_model, scheme=scheme)
        model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    def sharded_digits():
        (x, y), _ = load_digits()
        # Whole global batches only: a short last batch could leave a replica with no samples.
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH, drop_remainder=True)
        options = tf.data.Options()
        # In-memory data has no files to shard by: each worker takes its share of every batch.
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        return dataset.with_options(options)

    def local_batch_sums(strategy, dataset):
        # What this process's replicas trained on first: each one's share of the first global batch.
        x = next(iter(strategy.experimental_distribute_dataset(dataset)))[0]
        return [float(np.sum(part.numpy())) for part in strategy.experimental_local_results(x)]
    """
)

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(1)  # two workers share two cores
    tf.config.threading.set_inter_op_parallelism_threads(1)

    class FitMultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
        # Keras 3's fit hands Strategy.reduce a nested batch, and scalar logs with axis=0; with more
        # than one worker TensorFlow takes neither (tensorflow/tensorflow#72388). One leaf at a time,
        # scalars across replicas only.
        def reduce(self, reduce_op, value, axis):
            def reduce_one(v):
                rank = self.experimental_local_results(v)[0].shape.rank
                return super(FitMultiWorkerMirroredStrategy, self).reduce(reduce_op, v, None if rank == 0 else axis)
            return tf.nest.map_structure(reduce_one, value)

    strategy = FitMultiWorkerMirroredStrategy()  # the cluster and this worker's place in it: TF_CONFIG
    import keras, numpy as np, kerasq
    from kerasq.data import load_digits
    """
) + COMMON + textwrap.dedent(
    """
    out, task = sys.argv[1], json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = qat_model()
    dataset = sharded_digits()
    model.fit(dataset, epochs=EPOCHS, shuffle=False, verbose=0)
    np.savez(os.path.join(out, f"worker{task}.npz"), **{f"{i:02d} {v.path}": np.asarray(v) for i, v in enumerate(model.variables)})
    facts = {"replicas": strategy.num_replicas_in_sync, "batch_sums": local_batch_sums(strategy, dataset)}
    if task == 0:  # the chief exports alone, as a training job would: nothing here waits on worker 1
        _, (x_test, _) = load_digits()
        report = kerasq.verify_tflite(model, kerasq.export_tflite(model), x_test)
        facts.update(parity_passed=report.passed, parity=str(report))
    with open(os.path.join(out, f"worker{task}.json"), "w") as f:
        json.dump(facts, f)
    """
)

MIRRORED = textwrap.dedent(
    """
    import json, os, sys
    import tensorflow as tf
    (cpu,) = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np, kerasq
    from kerasq.data import load_digits
    """
) + COMMON + textwrap.dedent(
    """
    out = sys.argv[1]
    keras.utils.set_random_seed(0)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = qat_model(learned=sys.argv[2] == "learned")
    dataset = sharded_digits()
    model.fit(dataset, epochs=EPOCHS, shuffle=False, verbose=0)
    for replica in range(2):  # each replica's own copy (the Keras variable holds a MirroredVariable)
        np.savez(os.path.join(out, f"replica{replica}.npz"),
                 **{f"{i:02d} {v.path}": np.asarray(v.value.values[replica]) for i, v in enumerate(model.variables)})
    with open(os.path.join(out, "facts.json"), "w") as f:
        json.dump({"replicas": strategy.num_replicas_in_sync, "batch_sums": local_batch_sums(strategy, dataset)}, f)
    """
)


def _free_ports(count):
    """Ports the OS reports free now (bound to port 0, then released for the workers to take)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _tail(text, chars=4000):
    return text[-chars:] if text else "(nothing)"


def _run_two_workers(out_dir):
    """Starts both workers and waits for them, `WORKER_TIMEOUT_S` at most; returns their exit codes
    (-9: killed) and stderrs. A worker that fails leaves its peer waiting on a collective, so a
    failure, like the time limit, ends both."""
    ports = _free_ports(2)
    cluster = {"worker": [f"localhost:{port}" for port in ports]}
    workers = []
    for index in range(2):
        config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CONFIG": json.dumps(config), "TF_CPP_MIN_LOG_LEVEL": "3"}
        workers.append(subprocess.Popen([sys.executable, "-c", WORKER, str(out_dir)], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [None, None]
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    try:
        while None in outputs and time.monotonic() < deadline:
            for index, worker in enumerate(workers):
                if outputs[index] is None:
                    try:
                        outputs[index] = worker.communicate(timeout=0.5)
                    except subprocess.TimeoutExpired:
                        pass
            if any(output is not None and worker.returncode != 0 for output, worker in zip(outputs, workers)):
                break
    finally:
        for index, worker in enumerate(workers):
            if outputs[index] is None:
                worker.kill()
                outputs[index] = worker.communicate()
    return [worker.returncode for worker in workers], [stderr for _, stderr in outputs]


def _worker_report(codes, stderrs):
    return "\n".join(f"--- worker {index} (exit code {code}{', killed' if code == -9 else ''}), stderr tail:\n{_tail(stderr)}"
                     for index, (code, stderr) in enumerate(zip(codes, stderrs)))


def _assert_identical_trained_copies(copies, who):
    """Both copies of the model's variables hold the same values, and every range was learned."""
    assert copies[0].keys() == copies[1].keys()
    ranges = [name for name in copies[0] if name.endswith(("_min", "_max"))]
    moving = [name for name in copies[0] if "moving_" in name]
    # The input, the ReLU and the logits: a min and a max each; the folded BatchNorm's two statistics.
    assert len(ranges) == 6 and len(moving) == 2, sorted(copies[0])
    # Bit-exact, no tolerance: every copy applies the same all-reduced gradients, range writes and
    # batch statistics with the same kernels (a sum of two floats is the same in either order).
    differing = [name for name in copies[0] if not np.array_equal(copies[0][name], copies[1][name])]
    assert not differing, {name: (f"{who} 0:", copies[0][name], f"{who} 1:", copies[1][name]) for name in differing}
    # Every range observed every training step, in both copies...
    seen = {name: float(copies[0][name]) for name in copies[0] if name.endswith("output_seen")}
    assert len(seen) == 3 and set(seen.values()) == {STEPS}, seen
    # ... and was estimated from the data: none is left at its initial value.
    unmoved = {name: float(copies[0][name]) for name in ranges if float(copies[0][name]) in INITIAL_RANGE}
    assert not unmoved, unmoved


def test_qat_trains_with_multi_worker_mirrored_strategy_across_two_processes(tmp_path):
    codes, stderrs = _run_two_workers(tmp_path)
    assert codes == [0, 0], _worker_report(codes, stderrs)
    facts = [json.loads((tmp_path / f"worker{index}.json").read_text()) for index in range(2)]
    copies = [dict(np.load(tmp_path / f"worker{index}.npz")) for index in range(2)]
    assert [f["replicas"] for f in facts] == [2, 2]  # one replica in each worker, both in sync
    # The workers trained on different halves of each batch, so each alone would estimate other ranges.
    assert facts[0]["batch_sums"] != facts[1]["batch_sums"]
    _assert_identical_trained_copies(copies, "worker")
    assert facts[0]["parity_passed"], facts[0]["parity"]


@pytest.mark.parametrize("ranges", ["estimated", "learned"])
def test_qat_replicas_agree_under_mirrored_strategy_with_two_devices(ranges, tmp_path):
    """Replicas end with the same weights and ranges; with LSQ's learned steps and ranges too."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", MIRRORED, str(tmp_path), ranges], capture_output=True, text=True,
                            timeout=WORKER_TIMEOUT_S, env=env)
    assert result.returncode == 0, _tail(result.stderr)
    facts = json.loads((tmp_path / "facts.json").read_text())
    assert facts["replicas"] == 2
    first, second = facts["batch_sums"]
    assert first != second  # the two replicas saw different halves of each batch
    _assert_identical_trained_copies([dict(np.load(tmp_path / f"replica{i}.npz")) for i in range(2)], "replica")
