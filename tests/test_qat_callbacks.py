"""The callbacks that steer QAT from `model.fit`: each phase switch reaches the compiled training step,
survives resumed training, and works under MirroredStrategy."""

import json
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasq

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(32, activation="relu", name="hidden"),
        keras.layers.Dense(10, name="logits"),
    ])


def _cnn_with_batchnorm():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.ReLU(name="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(10, name="logits"),
    ])


class _BatchLosses(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))


def test_delay_quantization_trains_in_float_then_quantized(digits):
    (x, y), _ = digits
    x = x.reshape(len(x), -1)[:128]
    y = y[:128]
    float_model = _mlp()
    qat = kerasq.quantize_model(float_model)
    # Learning rate 0: the weights stay, so each batch's loss says which network ran. The loss a
    # Keras fit reports is the running mean over the epoch's batches: compare those means.
    qat.compile(keras.optimizers.SGD(0.0), LOSS)
    float_model.compile(keras.optimizers.SGD(0.0), LOSS)
    float_losses = [float(float_model.evaluate(x[i:i + 32], y[i:i + 32], verbose=0)) for i in range(0, 128, 32)]
    recorder = _BatchLosses()
    qat.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0,
            callbacks=[kerasq.DelayQuantization(steps=2), recorder])
    running_float = np.cumsum(float_losses) / np.arange(1, 5)
    np.testing.assert_allclose(recorder.losses[:2], running_float[:2], rtol=1e-5)  # float for 2 steps
    assert not np.allclose(recorder.losses[2:], running_float[2:], rtol=1e-5)  # then quantized
    assert all(layer.quantization_enabled for layer in kerasq.quantization.callbacks.quantized_layers(qat))
    # The ranges followed the data during the delay: the input's range is the data's, not +-6.
    assert qat.layers[1].quantization_ranges()["output"] == (0.0, pytest.approx(1.0, abs=0.01))


def test_delay_quantization_resumes_from_the_optimizer_step(digits):
    (x, y), _ = digits
    qat = kerasq.quantize_model(_mlp())
    qat.compile(keras.optimizers.Adam(1e-3), LOSS)
    x = x.reshape(len(x), -1)[:64]
    qat.fit(x, y[:64], batch_size=32, epochs=1, verbose=0)  # 2 optimizer steps already
    seen = []

    class Probe(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            seen.append(qat.get_layer("quant_hidden").quantization_enabled)

    qat.fit(x, y[:64], batch_size=32, epochs=2, verbose=0, callbacks=[kerasq.DelayQuantization(steps=4), Probe()])
    assert seen == [False, False, True, True]  # steps 2 and 3 in float, quantized from step 4


def test_freeze_batchnorm_stops_the_statistics_at_its_epoch(digits):
    (x, y), _ = digits
    qat = kerasq.quantize_model(_cnn_with_batchnorm(), kerasq.QuantizationScheme(freeze_batchnorm=False))
    qat.compile(keras.optimizers.Adam(1e-3), LOSS)
    wrapper = qat.get_layer("quant_conv")
    means = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            means.append(np.asarray(wrapper.batchnorm.moving_mean).copy())

    qat.fit(x[:256], y[:256], epochs=3, verbose=0, callbacks=[kerasq.FreezeBatchNorm(at_epoch=1), Record()])
    initial = np.zeros_like(means[0])
    assert not np.array_equal(means[0], initial)  # epoch 0: batch statistics, moving ones updated
    np.testing.assert_array_equal(means[1], means[0])  # epochs 1 and 2: frozen
    np.testing.assert_array_equal(means[2], means[0])
    assert wrapper.batchnorm_frozen


@pytest.mark.parametrize("learn_range", [False, True])
def test_freeze_ranges_fixes_every_range_and_survives_saving(digits, tmp_path, learn_range):
    (x, y), _ = digits
    x = x.reshape(len(x), -1)[:256]
    scheme = kerasq.QuantizationScheme(activations=kerasq.ActivationQuantizer(ema_decay=0.5, learn_range=learn_range))
    qat = kerasq.quantize_model(_mlp(), scheme)
    qat.compile(keras.optimizers.Adam(1e-2), LOSS)
    ranges = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            ranges.append(qat.get_layer("quant_hidden").quantization_ranges())

    qat.fit(x, y[:256], epochs=3, verbose=0, callbacks=[kerasq.FreezeRanges(at_epoch=2), Record()])
    assert ranges[1] != ranges[0]  # moving before the freeze
    assert ranges[2] == ranges[1]  # not after
    qat.save(tmp_path / "qat.keras")
    loaded = keras.saving.load_model(tmp_path / "qat.keras")
    loaded.compile(keras.optimizers.SGD(1e-2), LOSS)
    # No callback: the freeze is in the saved state (for learned ranges it stops their gradient;
    # plain SGD then leaves them, where Adam's momentum would still carry them a little).
    loaded.fit(x, y[:256], epochs=1, verbose=0)
    assert loaded.get_layer("quant_hidden").quantization_ranges() == ranges[2]


def test_quantization_summaries_write_ranges_clipping_and_weight_error(digits, tmp_path):
    (x, y), _ = digits
    qat = kerasq.quantize_model(_cnn_with_batchnorm())
    qat.compile(keras.optimizers.Adam(1e-3), LOSS)
    summaries = kerasq.QuantizationSummaries(tmp_path, data=x[:128])
    qat.fit(x[:256], y[:256], batch_size=32, epochs=2, verbose=0, callbacks=[summaries])
    scalars = {}
    for path in (tmp_path / "quantization").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, float(tf.make_ndarray(value.tensor))))
    low, high = qat.get_layer("quant_relu").quantization_ranges()["output"]
    assert [step for step, _ in scalars["quant_relu/output/max"]] == [8, 16]  # optimizer steps
    assert scalars["quant_relu/output/max"][-1][1] == pytest.approx(high)
    assert scalars["quant_relu/output/min"][-1][1] == pytest.approx(low)
    clipped = scalars["quant_relu/output/clipped"][-1][1]
    assert 0.0 <= clipped < 0.05  # a moving-average range clips only the largest values
    error = scalars["quant_conv/kernel/quantization_error"][-1][1]
    assert 0.0 < error < 0.02  # 8-bit per-channel weights: well under 1% RMS for a kernel like this
    assert "quant_logits/kernel/quantization_error" in scalars


@pytest.mark.parametrize(
    "callback", [kerasq.DelayQuantization(1), kerasq.FreezeBatchNorm(0), kerasq.FreezeRanges(0),
                 kerasq.QuantizationSummaries("unused")],
    ids=lambda c: type(c).__name__,
)
def test_callbacks_on_a_float_model_say_what_to_do(callback, digits):
    (x, y), _ = digits
    model = _mlp()
    model.compile("adam", LOSS)
    with pytest.raises(ValueError, match="quantize_model"):
        model.fit(x.reshape(len(x), -1)[:32], y[:32], verbose=0, callbacks=[callback])


def test_bad_callback_arguments():
    with pytest.raises(ValueError, match="steps must be a positive int"):
        kerasq.DelayQuantization(0)
    with pytest.raises(ValueError, match="at_epoch must be an epoch index"):
        kerasq.FreezeRanges(-1)
    with pytest.raises(ValueError, match="at_epoch must be an epoch index"):
        kerasq.FreezeBatchNorm(1.5)


MIRRORED = textwrap.dedent(
    """
    import json, os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    (cpu,) = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np, kerasq
    from kerasq.data import load_digits

    (x, y), _ = load_digits()
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(8, 3, use_bias=False, name="conv"),
                                  keras.layers.BatchNormalization(), keras.layers.ReLU(), keras.layers.Flatten(),
                                  keras.layers.Dense(10, name="logits")])
        qat = kerasq.quantize_model(model, kerasq.QuantizationScheme(freeze_batchnorm=False))
        qat.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ranges = []
    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            ranges.append(qat.get_layer("quant_re_lu").quantization_ranges()["output"])
    qat.fit(x[:512], y[:512], batch_size=64, epochs=3, verbose=0, callbacks=[
        kerasq.DelayQuantization(steps=4), kerasq.FreezeBatchNorm(at_epoch=1), kerasq.FreezeRanges(at_epoch=2), Record()])
    wrapper = qat.get_layer("quant_conv")
    seen = qat.get_layer("quant_re_lu")._ranges[0]["output"]["seen"]
    print(json.dumps({
        "ranges": ranges,
        "replica_seen": [float(v.numpy()) for v in seen.value.values],
        "enabled": wrapper.quantization_enabled,
        "frozen": wrapper.batchnorm_frozen,
    }))
    """
)


def test_callbacks_under_mirrored_strategy_with_two_devices():
    result = subprocess.run([sys.executable, "-c", MIRRORED], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["enabled"] and figures["frozen"]
    assert figures["ranges"][1] != figures["ranges"][0] and figures["ranges"][2] == figures["ranges"][1]
    seen = figures["replica_seen"]
    assert len(seen) == 2 and seen[0] == seen[1] < 0  # frozen on every replica
