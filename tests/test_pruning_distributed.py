"""Pruning under tf.distribute.MirroredStrategy with two logical CPU devices.

Logical devices can only be configured before TensorFlow initializes its runtime, so the training runs
in a fresh Python process and the other tests' process is left as it is.
"""

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    (cpu,) = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np, kerasq
    from kerasq.data import load_digits

    (x, y), (x_test, y_test) = load_digits()
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(16, 3, activation="relu", name="conv"),
                                  keras.layers.Flatten(), keras.layers.Dense(10, name="logits")])
        schedule = kerasq.PolynomialDecay(0.0, 0.8, begin_step=0, end_step=40, frequency=10)
        pruned = kerasq.prune_low_magnitude(model, schedule)
        pruned.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       metrics=["accuracy"])
    pruned.fit(x, y, batch_size=64, epochs=4, verbose=0, callbacks=[kerasq.UpdatePruningStep()])
    layers = kerasq.pruning.pruning_layers(pruned)
    stripped = kerasq.strip_pruning(pruned)
    kernels = [np.asarray(stripped.get_layer(name).kernel) for name in ("conv", "logits")]
    # Each replica's copy of each kernel (the Keras variable holds a MirroredVariable).
    replicas = [[float(np.mean(np.asarray(v) == 0)) for v in layer.layer.kernel.value.values] for layer in layers]
    print(json.dumps({
        "replicas": strategy.num_replicas_in_sync,
        "steps": [int(layer.pruning_step.numpy()) for layer in layers],
        "sparsity": [float(np.mean(k == 0)) for k in kernels],
        "replica_sparsity": replicas,
        "accuracy": float(np.mean(np.argmax(stripped.predict(x_test, verbose=0), -1) == y_test)),
    }))
    """
)


def test_pruning_under_mirrored_strategy_with_two_devices():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["replicas"] == 2
    assert figures["steps"] == [4 * 22 - 1] * 2  # 1,347 images in batches of 64: 22 steps an epoch
    # The conv kernel has 144 weights: 115 zeros is 79.9%, half a point at most from the target.
    assert all(abs(sparsity - 0.8) <= 0.005 for sparsity in figures["sparsity"])
    assert [len(per_replica) for per_replica in figures["replica_sparsity"]] == [2, 2]
    for per_replica in figures["replica_sparsity"]:  # every replica holds the same zeros
        assert len(set(per_replica)) == 1
    assert figures["accuracy"] > 0.5  # it learns (chance is 0.1) while pruned; 4 epochs, no tuning
