"""kerasq.QuantizedGradients: gradients quantized to a few bits before the wrapped optimizer uses them."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import kerasq
from kerasq.quantization.gradients import QuantizedGradients, quantize_gradient

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _quantized_once(gradient, optimizer=None, **options):
    """What the wrapped optimizer receives for `gradient`: SGD at learning rate 1 from zero weights."""
    weight = keras.Variable(np.zeros(gradient.shape, "float32"))
    optimizer = optimizer or QuantizedGradients(keras.optimizers.SGD(1.0), **options)
    optimizer.apply([keras.ops.convert_to_tensor(gradient, "float32")], [weight])
    return -np.asarray(weight)


def _small_cnn():
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(16, 3, use_bias=False),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    ])


def _accuracy(model, x, y):
    return float(np.mean(np.argmax(model.predict(x, verbose=0), -1) == y))


def test_stochastic_rounding_is_unbiased():
    # 4 bits: levels -7..7 of scale 1/7 (the leading 1.0 is the largest magnitude). Each group holds
    # N copies of one value x (in levels); each copy is rounded on its own, up with probability frac(x).
    copies = 20_000
    values = [k + f for k in (0, 3, -4, 6) for f in (0.1, 0.25, 0.5, 0.9)]
    gradient = np.concatenate([[1.0]] + [np.full(copies, v / 7) for v in values]).astype("float32")
    levels = _quantized_once(gradient, bits=4, seed=0)[1:].reshape(len(values), copies) * 7
    for value, group in zip(values, levels):
        assert set(np.round(group, 4)) <= {np.floor(value), np.ceil(value)}
        # The mean of N independent roundings has standard deviation sqrt(f(1 - f) / N) <= 0.0035
        # levels; 0.02 levels is over 5.6 of them: a false failure has probability below 1e-7 per
        # group, while round-to-nearest would be off by min(f, 1 - f) >= 0.1 level.
        assert abs(group.mean() - value) < 0.02, (value, group.mean())


def test_rounding_is_reproducible_with_a_seed_and_fresh_at_each_step():
    gradient = np.linspace(-1, 1, 1001).astype("float32")
    first = _quantized_once(gradient, bits=3, seed=7)
    np.testing.assert_array_equal(first, _quantized_once(gradient, bits=3, seed=7))
    optimizer = QuantizedGradients(keras.optimizers.SGD(1.0), bits=3, seed=7)
    weight = keras.Variable(np.zeros(gradient.shape, "float32"))
    steps = []
    for _ in range(2):
        before = np.asarray(weight)
        optimizer.apply([keras.ops.convert_to_tensor(gradient)], [weight])
        steps.append(before - np.asarray(weight))
    np.testing.assert_array_equal(steps[0], first)
    assert not np.array_equal(steps[0], steps[1])  # the seed generator moved on


def test_round_to_nearest_takes_the_nearest_level():
    gradient = np.array([1.0, 0.49 / 7, 0.51 / 7, -2.4 / 7, -2.6 / 7, 6.9 / 7], "float32")
    quantized = _quantized_once(gradient, bits=4, stochastic_rounding=False)
    np.testing.assert_allclose(quantized * 7, [7, 0, 1, -2, -3, 7], atol=1e-5)


@pytest.mark.parametrize("stochastic_rounding", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 8])
def test_each_tensor_takes_at_most_2_to_the_bits_minus_1_values(bits, stochastic_rounding):
    gradient = np.random.default_rng(bits).normal(size=(100, 100)).astype("float32")
    quantized = _quantized_once(gradient, bits=bits, stochastic_rounding=stochastic_rounding, seed=0)
    scale = np.abs(gradient).max() / (2 ** (bits - 1) - 1)
    assert len(np.unique(quantized)) <= 2**bits - 1
    np.testing.assert_allclose(quantized / scale, np.round(quantized / scale), atol=1e-3)
    assert np.abs(quantized).max() == pytest.approx(np.abs(gradient).max())


@pytest.mark.parametrize("stochastic_rounding", [True, False])
def test_a_zero_gradient_stays_zero(stochastic_rounding):
    zeros = np.zeros((3, 4), "float32")
    quantized = _quantized_once(zeros, bits=8, stochastic_rounding=stochastic_rounding, seed=0)
    np.testing.assert_array_equal(quantized, zeros)
    np.testing.assert_array_equal(np.asarray(quantize_gradient(zeros, 2, noise=np.full((3, 4), 0.99))), zeros)


def test_sparse_gradients_are_quantized_on_their_rows():
    import tensorflow as tf

    weight = keras.Variable(np.zeros((5, 3), "float32"))
    optimizer = QuantizedGradients(keras.optimizers.SGD(1.0), bits=2, stochastic_rounding=False)
    rows = tf.IndexedSlices(tf.constant([[1.0, 0.4, -0.6], [0.2, -1.0, 0.0]]), tf.constant([1, 3]), tf.constant([5, 3]))
    optimizer.apply([rows], [weight])
    np.testing.assert_array_equal(-np.asarray(weight), [[0, 0, 0], [1, 0, -1], [0, 0, 0], [0, -1, 0], [0, 0, 0]])


@pytest.mark.parametrize("bits", [1, 17, 0, 8.0, "8", True])
def test_bits_outside_2_to_16_are_refused(bits):
    with pytest.raises(ValueError, match=rf"bits must be an integer from 2 to 16; got {bits!r}"):
        QuantizedGradients(keras.optimizers.Adam(), bits=bits)


def test_other_arguments_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"takes no clipnorm: set it on the optimizer it wraps"):
        QuantizedGradients(keras.optimizers.Adam(), clipnorm=1.0)
    with pytest.raises(TypeError, match=r"wraps a keras.optimizers.Optimizer"):
        QuantizedGradients(object())
    assert isinstance(QuantizedGradients("adam").inner_optimizer, keras.optimizers.Adam)


def test_config_round_trips_with_a_learning_rate_schedule():
    schedule = keras.optimizers.schedules.ExponentialDecay(1e-3, decay_steps=10, decay_rate=0.5)
    optimizer = QuantizedGradients(keras.optimizers.Adam(schedule, beta_1=0.8), bits=6, stochastic_rounding=False,
                                   seed=3, name="q6")
    config = optimizer.get_config()
    restored = QuantizedGradients.from_config(config)
    assert restored.get_config() == config
    assert kerasq.QuantizedGradients is QuantizedGradients
    assert keras.optimizers.serialize(optimizer)["registered_name"] == "kerasq>QuantizedGradients"
    again = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(again, QuantizedGradients) and again.get_config() == config
    assert isinstance(again.inner_optimizer._learning_rate, keras.optimizers.schedules.ExponentialDecay)
    assert again.inner_optimizer.beta_1 == 0.8 and (again.bits, again.seed, again.name) == (6, 3, "q6")


def test_learning_rate_and_iterations_are_the_wrapped_optimizers():
    inner = keras.optimizers.SGD(0.5)
    optimizer = QuantizedGradients(inner)
    optimizer.learning_rate = 0.25
    assert float(inner.learning_rate) == 0.25 == float(optimizer.learning_rate)
    _quantized_once(np.ones(3, "float32"), optimizer=optimizer)
    assert int(optimizer.iterations) == int(inner.iterations) == 1


def test_keras_file_restores_the_state_and_training_continues_bit_exactly(digits, tmp_path):
    (x, y), _ = digits
    x, y = x[:256], y[:256]
    keras.utils.set_random_seed(0)
    model = _small_cnn()
    schedule = keras.optimizers.schedules.ExponentialDecay(3e-3, decay_steps=4, decay_rate=0.9)
    model.compile(QuantizedGradients(keras.optimizers.Adam(schedule), bits=6, seed=1), LOSS)
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")

    optimizer = loaded.optimizer
    assert isinstance(optimizer, QuantizedGradients) and isinstance(optimizer.inner_optimizer, keras.optimizers.Adam)
    assert int(optimizer.iterations) == 8
    assert float(optimizer.learning_rate) == pytest.approx(float(model.optimizer.learning_rate))
    assert len(optimizer.variables) == len(model.optimizer.variables)
    for saved, restored in zip(model.optimizer.variables, optimizer.variables):  # Adam's moments, the seeds
        np.testing.assert_array_equal(np.asarray(restored), np.asarray(saved), err_msg=restored.path)
    assert any("momentum" in v.path for v in optimizer.variables)

    for each in (model, loaded):
        each.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    for original, continued in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(continued, original)


def test_training_at_8_bits_matches_the_plain_optimizer(digits):
    (x, y), (x_test, y_test) = digits
    accuracies = {}
    for bits in (None, 8):
        keras.utils.set_random_seed(0)  # the same initial weights and batches for both
        model = _small_cnn()
        optimizer = keras.optimizers.Adam(3e-3)
        model.compile(optimizer if bits is None else QuantizedGradients(optimizer, bits=bits, seed=0), LOSS)
        model.fit(x, y, batch_size=32, epochs=5, verbose=0)
        accuracies[bits] = _accuracy(model, x_test, y_test)
    # One test image is 0.22 points. After 5 epochs this model is at about 97% on any seed (the float
    # model's spread over seeds 0-3 was 0.22 points, 8 bits matched float on each within 0.22). A
    # different CPU's float rounding acts like another seed, so 2 points (9 images) is far outside
    # that noise, while gradients that were wrong (zeroed, sign-flipped, mis-scaled) lose far more.
    assert accuracies[None] > 0.9
    assert abs(accuracies[8] - accuracies[None]) <= 0.02, accuracies


MIRRORED = textwrap.dedent(
    """
    import json, os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    (cpu,) = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np, kerasq
    from kerasq.data import load_digits

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

    def one_step(gradient_by_replica, **options):
        # One apply under strategy.run, each replica with its own row of gradient_by_replica; SGD at
        # learning rate 1 from zero weights, so -weight is the sum of what the replicas sent.
        with strategy.scope():
            weight = keras.Variable(np.zeros(gradient_by_replica.shape[1:], "float32"))
            optimizer = kerasq.QuantizedGradients(keras.optimizers.SGD(1.0), **options)
            optimizer.build([weight])
        table = tf.constant(gradient_by_replica, tf.float32)

        @tf.function
        def step():
            def replica_step():
                replica = tf.distribute.get_replica_context().replica_id_in_sync_group
                optimizer.apply([tf.gather(table, replica)], [weight])
            strategy.run(replica_step)

        step()
        return [(-np.asarray(copy)).tolist() for copy in weight.value.values]

    same_half = np.full((2, 2001), 0.5, "float32")
    same_half[:, 0] = 1.0
    summed_halves = one_step(same_half, bits=2, seed=3)[0][1:]

    (x, y), (x_test, y_test) = load_digits()
    with strategy.scope():
        model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(16, 3, activation="relu"),
                                  keras.layers.Flatten(), keras.layers.Dense(10)])
        model.compile(kerasq.QuantizedGradients(keras.optimizers.Adam(3e-3), bits=8, seed=0),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=64, epochs=3, verbose=0)
    optimizer = model.optimizer
    seeds = [v for v in optimizer.variables if "seed" in v.path][0]
    print(json.dumps({
        "replicas": strategy.num_replicas_in_sync,
        "per_replica_then_summed": one_step(np.array([[1.0, 0.4], [0.4, 1.0]]), bits=2, stochastic_rounding=False),
        "summed_halves": {str(level): [int(v) for v in summed_halves].count(level) for level in (0, 1, 2)},
        "iterations": int(optimizer.iterations.numpy()),
        "seed_counters": [int(np.asarray(copy)[1]) for copy in seeds.value.values],
        "kernels_alike": all(np.array_equal(*[np.asarray(c) for c in v.value.values]) for v in model.weights),
        "accuracy": float(np.mean(np.argmax(model.predict(x_test, verbose=0), -1) == y_test)),
    }))
    """
)


def test_each_replica_quantizes_before_the_cross_replica_sum():
    result = subprocess.run([sys.executable, "-c", MIRRORED], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["replicas"] == 2
    # 2 bits, round-to-nearest: replica 0 sends q([1, 0.4]) = [1, 0], replica 1 q([0.4, 1]) = [0, 1],
    # summing to [1, 1]; quantizing after the sum would have given q([1.4, 1.4]) = [1.4, 1.4].
    assert figures["per_replica_then_summed"] == [[1.0, 1.0], [1.0, 1.0]]
    # Both replicas round the same 2,000 halves (each to 0 or 1, at random). With the same noise they
    # would always agree (sums 0 or 2); independently, they disagree on about half (sum 1).
    counts = figures["summed_halves"]
    assert counts["0"] + counts["1"] + counts["2"] == 2000 and 800 < counts["1"] < 1200, counts
    # 1,347 images in batches of 64: 22 steps an epoch; each replica drew 4 seeds (one per tensor) a step.
    assert figures["iterations"] == 3 * 22
    assert figures["seed_counters"] == [3 * 22 * 4] * 2
    assert figures["kernels_alike"]
    assert figures["accuracy"] > 0.8  # 3 epochs, no tuning: it learns (chance is 0.1)


JAX = textwrap.dedent(
    """
    import json, os, sys, tempfile
    import keras, numpy as np, kerasq
    from kerasq.data import load_digits

    assert keras.backend.backend() == "jax"
    keras.utils.set_random_seed(0)
    (x, y), (x_test, y_test) = load_digits()
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(8, 3, activation="relu"),
                              keras.layers.Flatten(), keras.layers.Dense(10)])
    model.compile(kerasq.QuantizedGradients(keras.optimizers.Adam(3e-3), bits=8, seed=0),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=64, epochs=3, verbose=0)
    path = os.path.join(tempfile.mkdtemp(), "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    seeds = [v for v in model.optimizer.variables if "seed" in v.path][0]
    print(json.dumps({
        "iterations": int(model.optimizer.iterations),
        "seed_counter": int(np.asarray(seeds)[1]),
        "restored": all(np.array_equal(np.asarray(a), np.asarray(b))
                        for a, b in zip(model.optimizer.variables, loaded.optimizer.variables)),
        "accuracy": float(np.mean(np.argmax(model.predict(x_test, verbose=0), -1) == y_test)),
    }))
    """
)


def test_trains_and_saves_on_jax():
    pytest.importorskip("jax")
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", JAX], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["iterations"] == 3 * 22
    # JAX trains in a stateless, compiled step: the seed state is carried out of it at every step.
    assert figures["seed_counter"] == 3 * 22 * 4
    assert figures["restored"]
    assert figures["accuracy"] > 0.8
