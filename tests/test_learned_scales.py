"""Learned step sizes (LSQ): `WeightQuantizer(learn_scale=True)` and `ActivationQuantizer(learn_range="lsq")`.

- The gradients are LSQ's (Esser et al. 2020) and LSQ+'s (Bhalgat et al. 2020), computed here from
  their formulas; the values are TensorFlow's fake-quant op's, bit for bit.
- A digits CNN trained with learned steps at 4 and 2 bits exports fully int8, at the parity floor,
  and the file's kernel scales are the learned steps.
- The steps are variables: they survive get_config, .keras, tf.train.Checkpoint and
  save_weights/load_weights; calibration starts them from the folded kernels; FreezeRanges freezes them.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasq
from kerasq.data import load_digits
from kerasq.demo import build_model

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow gradients and checkpoints")

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _host():
    """A layer to hold a quantizer's variables."""
    return keras.layers.Layer(name="host")


# ---- gradients ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_weight_gradient_is_lsq(bits, per_channel):
    rng = np.random.default_rng(bits)
    weights = tf.Variable(rng.normal(0, 0.5, (3, 3, 2, 4)).astype("float32"))
    quantizer = kerasq.WeightQuantizer(bits=bits, learn_scale=True, per_channel=per_channel)
    state = quantizer.build(_host(), "kernel", channels=4)
    steps = rng.uniform(0.05, 0.3, 4 if per_channel else ()).astype("float32")
    state["log_step"].assign(np.log(steps))
    state["seen"].assign(1.0)
    upstream = rng.normal(size=weights.shape).astype("float32")
    with tf.GradientTape() as tape:
        quantized = quantizer(weights, channel_axis=-1, state=state, training=True)
        loss = tf.reduce_sum(quantized * upstream)
    grad_w, grad_log_s = tape.gradient(loss, [weights, state["log_step"].value])

    levels = 2.0 ** (bits - 1) - 1
    w = weights.numpy()
    steps = keras.ops.convert_to_numpy(quantizer.learned_step(state, None))  # exp(log(step)), in float32
    s = steps if per_channel else np.full(4, steps, "float32")
    v = w / s
    inside = (v >= -levels) & (v <= levels)
    # The values: TensorFlow's fake-quant over +-step x levels (widened to the int8 grid below 8 bits).
    low, high = -s * levels, s * levels
    if bits < 8:
        clipped = np.clip(w, low, high)
        expected = tf.quantization.fake_quant_with_min_max_vars_per_channel(
            clipped, low * np.float32(127 / levels), high * np.float32(127 / levels), num_bits=8,
            narrow_range=True)
    else:
        expected = tf.quantization.fake_quant_with_min_max_vars_per_channel(w, low, high, num_bits=8, narrow_range=True)
    np.testing.assert_array_equal(quantized.numpy(), expected.numpy())
    # Weights: straight through inside the range, nothing for clipped ones.
    np.testing.assert_allclose(grad_w.numpy(), upstream * inside, rtol=1e-6)
    # The step: -v + round(v) inside, -Qp or Qp at the clipped ends, times 1/sqrt(N x Qp); the
    # variable holds log(step), so its gradient is that times the step.
    d_step = np.where(inside, np.round(v) - v, np.sign(v) * levels)
    if per_channel:
        per_step = w.size // 4
        want = (upstream * d_step).sum(axis=(0, 1, 2)) / np.sqrt(per_step * levels) * steps
    else:
        want = (upstream * d_step).sum() / np.sqrt(w.size * levels) * steps
    np.testing.assert_allclose(grad_log_s.numpy(), want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("symmetric", [False, True])
def test_activation_gradient_is_lsq_plus_with_an_integer_zero_point(symmetric):
    bits = 16 if symmetric else 8
    rng = np.random.default_rng(1)
    quantizer = kerasq.ActivationQuantizer(bits=bits, symmetric=symmetric, learn_range="lsq")
    state = quantizer.build(_host())
    low, high = (-1.3, 1.3) if symmetric else (-0.73, 2.9)
    state["min"].assign(-1.2 if symmetric else low)  # symmetric: the range is +-max(|min|, max)
    state["max"].assign(high)
    state["seen"].assign(1.0)
    x = tf.constant(rng.uniform(-2, 4, (8, 5, 3)).astype("float32"))
    upstream = rng.normal(size=x.shape).astype("float32")
    with tf.GradientTape() as tape:
        tape.watch(x)
        quantized = quantizer(x, state, training=True)
        loss = tf.reduce_sum(quantized * upstream)
    grad_x, grad_min, grad_max = tape.gradient(loss, [x, state["min"].value, state["max"].value])

    # The values are the fake-quant op's: its nudged range is the file's scale and zero point.
    expected = tf.quantization.fake_quant_with_min_max_vars(x, low, high, num_bits=bits, narrow_range=symmetric)
    np.testing.assert_array_equal(quantized.numpy(), expected.numpy())

    # LSQ+ on (scale s, zero point z), through s = (max - min) / n and z = qmin - min / s.
    qmin, qmax = (1.0, 2.0**bits - 1) if symmetric else (0.0, 2.0**bits - 1)
    n = qmax - qmin
    s = (high - low) / n
    z = np.round(qmin - low / s)
    v = x.numpy() / s
    below, above = v + z < qmin, v + z > qmax
    inside = ~(below | above)
    d_s = np.where(inside, np.round(v) - v, np.where(below, qmin - z, qmax - z))
    d_z = np.where(inside, 0.0, -s)
    g = 1 / np.sqrt(15 * n)  # 15 values per sample
    ds_dmin, ds_dmax = -1 / n, 1 / n
    dz_dmin, dz_dmax = -1 / s + low / s**2 * ds_dmin, low / s**2 * ds_dmax
    want_min = g * np.sum(upstream * (d_s * ds_dmin + d_z * dz_dmin))
    want_max = g * np.sum(upstream * (d_s * ds_dmax + d_z * dz_dmax))
    if symmetric:  # the range is (-max, max): both ends move with `max`
        want_min, want_max = 0.0, want_max - want_min
    np.testing.assert_allclose(grad_x.numpy(), upstream * inside, rtol=1e-6)
    np.testing.assert_allclose([grad_min.numpy(), grad_max.numpy()], [want_min, want_max], rtol=2e-3, atol=1e-5)


def test_activation_lsq_differs_from_the_fake_quant_gradient_only_in_the_range():
    """learn_range=True (the op's gradient) pulls the range only by clipped values; "lsq" also by the
    rounding error inside. The input gradient is the same straight-through one."""
    rng = np.random.default_rng(2)
    x = tf.constant(rng.uniform(-0.5, 1.5, (4, 32)).astype("float32"))
    gradients = {}
    for learn_range in (True, "lsq"):
        quantizer = kerasq.ActivationQuantizer(learn_range=learn_range)
        state = quantizer.build(_host())
        state["min"].assign(-0.4)
        state["max"].assign(1.0)
        state["seen"].assign(1.0)
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(quantizer(x, state, training=True) ** 2)
        gradients[learn_range] = tape.gradient(loss, [x, state["min"].value, state["max"].value])
    np.testing.assert_allclose(gradients[True][0].numpy(), gradients["lsq"][0].numpy(), rtol=1e-6)
    assert not np.isclose(gradients[True][2].numpy(), gradients["lsq"][2].numpy())


def test_a_frozen_step_gets_no_gradient():
    quantizer = kerasq.WeightQuantizer(bits=4, learn_scale=True)
    state = quantizer.build(_host(), "kernel", channels=3)
    state["log_step"].assign(np.log([0.1, 0.2, 0.3]))
    state["seen"].assign(-1.0)
    weights = tf.constant(np.random.default_rng(0).normal(size=(5, 3)).astype("float32"))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(quantizer(weights, channel_axis=-1, state=state, training=True))
    gradient = tape.gradient(loss, state["log_step"].value)
    assert gradient is None or not np.any(gradient)
    np.testing.assert_array_equal(state["log_step"].numpy(), np.log(np.float32([0.1, 0.2, 0.3])))


# ---- a digits CNN at 4 and 2 bits ---------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def float_cnn(digits):
    (x, y), _ = digits
    keras.utils.set_random_seed(0)
    model = build_model()
    model.compile(keras.optimizers.Adam(2e-3), LOSS)
    model.fit(x, y, epochs=5, batch_size=32, verbose=0)
    return model


def _lsq_scheme(bits, estimator="mse"):
    return kerasq.QuantizationScheme(
        weights=kerasq.WeightQuantizer(bits=bits, estimator=estimator, learn_scale=True),
        activations=kerasq.ActivationQuantizer(learn_range="lsq"),
    )


def _steps(model):
    """{"<wrapper>/<kernel>": learned step}."""
    return {f"{layer.name}/{name}": keras.ops.convert_to_numpy(quantizer.learned_step(state, None))
            for layer in kerasq.quantization.layers.quantized_layers(model)
            for name, quantizer, state in layer.weight_step_states()}


@pytest.mark.parametrize("bits", [4, 2])
def test_digits_cnn_exports_fully_int8_at_the_floor(float_cnn, digits, bits):
    (x, y), (x_test, y_test) = digits
    qat = kerasq.quantize_model(float_cnn, _lsq_scheme(bits), calibration_data=x)
    calibrated = _steps(qat)
    assert len(calibrated) == 4  # three convolutions (BatchNorm folded) and the Dense head
    keras.utils.set_random_seed(0)
    qat.compile(keras.optimizers.Adam(1e-3), LOSS)
    qat.fit(x, y, epochs=2, batch_size=32, verbose=0)
    learned = _steps(qat)
    assert any(not np.allclose(learned[k], calibrated[k]) for k in learned), "the steps did not move"

    tflite = kerasq.TFLiteModel(kerasq.export_tflite(qat))
    assert tflite.is_fully_integer, tflite.float_tensors
    report = kerasq.verify_tflite(qat, tflite, x_test)
    assert report.passed, str(report)
    assert report.outputs[0].max_diff <= max(1.0, report.outputs[0].floor_max_diff)
    accuracy = tflite.evaluate(x_test, y_test)
    assert accuracy > (0.9 if bits == 4 else 0.6), accuracy

    # The file's weight scales are the learned steps (the converter divides in float64).
    tensors = {t.name: t for t in tflite.tensors}
    for key, step in learned.items():
        layer_name = key.split("/")[0].removeprefix("quant_")
        kernel = tensors[f"{layer_name}/kernel"]
        assert kernel.dtype == "int8"
        np.testing.assert_allclose(kernel.scales, np.broadcast_to(step, kernel.scales.shape), rtol=1e-5)
        stored = tflite.weights()[f"{layer_name}/kernel"]
        assert np.abs(stored).max() <= 2 ** (bits - 1) - 1  # 2^b - 1 levels
    # Each learned activation range is the file's scale and zero point: the fake-quant op's nudging.
    checked = 0
    for layer in kerasq.quantization.layers.quantized_layers(qat):
        name = layer.name.removeprefix("quant_")
        if name not in tensors or "output" not in layer.quantization_ranges():
            continue
        low, high = layer.quantization_ranges()["output"]
        scale = (high - low) / 255
        assert tensors[name].scales[0] == pytest.approx(scale, rel=1e-6)
        assert int(tensors[name].zero_points[0]) == int(np.floor(-low / scale + 0.5)) - 128
        checked += 1
    assert checked >= 4


def test_calibration_starts_each_step_from_the_folded_kernel(float_cnn, digits):
    (x, _), _ = digits
    qat = kerasq.quantize_model(float_cnn, _lsq_scheme(3, estimator="max"), calibration_data=x[:64])
    wrapper = qat.get_layer("quant_block2_conv")
    bn = wrapper.batchnorm
    scale = np.array(bn.gamma) / np.sqrt(np.array(bn.moving_variance) + bn.epsilon)
    folded = np.array(wrapper.layer.kernel) * scale
    (_, quantizer, state), = wrapper.weight_step_states()
    step = keras.ops.convert_to_numpy(quantizer.learned_step(state, None))
    np.testing.assert_allclose(step, np.abs(folded).max(axis=(0, 1, 2)) / 3, rtol=2e-6)
    assert float(state["seen"]) == 1.0
    # Not yet started (no calibration): the estimator's step, and nothing written.
    fresh = kerasq.quantize_model(float_cnn, _lsq_scheme(3, estimator="max"))
    (_, _, state), = fresh.get_layer("quant_block2_conv").weight_step_states()
    assert float(state["seen"]) == 0.0
    np.testing.assert_array_equal(np.asarray(fresh(x[:8])), np.asarray(
        kerasq.quantize_model(float_cnn, kerasq.QuantizationScheme(
            weights=kerasq.WeightQuantizer(bits=3), activations=kerasq.ActivationQuantizer(learn_range="lsq")))(x[:8])))


def test_freeze_ranges_freezes_the_steps(float_cnn, digits):
    (x, y), _ = digits
    qat = kerasq.quantize_model(float_cnn, _lsq_scheme(4), calibration_data=x[:64])
    before = _steps(qat)
    qat.compile(keras.optimizers.Adam(1e-3), LOSS)
    qat.fit(x[:256], y[:256], epochs=1, batch_size=32, verbose=0, callbacks=[kerasq.FreezeRanges(at_epoch=0)])
    after = _steps(qat)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])
    seen = [float(state["seen"]) for layer in kerasq.quantization.layers.quantized_layers(qat)
            for _, _, state in layer.weight_step_states()]
    assert seen and all(value < 0 for value in seen)


def test_layer_schemes_learn_steps_only_where_asked(float_cnn, digits):
    (x, _), (x_test, _) = digits
    qat = kerasq.quantize_model(float_cnn, layer_schemes={"block2_conv": _lsq_scheme(4)}, calibration_data=x[:128])
    assert list(_steps(qat)) == ["quant_block2_conv/kernel"]
    report = kerasq.verify_tflite(qat, kerasq.export_tflite(qat), x_test[:128])
    assert report.passed, str(report)


# ---- configuration, files, checkpoints ----------------------------------------------------------
def test_config_round_trip():
    weights = kerasq.WeightQuantizer(bits=3, estimator="mse", learn_scale=True)
    activations = kerasq.ActivationQuantizer(learn_range="lsq")
    assert weights.get_config()["learn_scale"] is True
    assert activations.get_config()["learn_range"] == "lsq"
    for quantizer in (weights, activations):
        restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(quantizer))
        assert restored == quantizer and restored.get_config() == quantizer.get_config()
    scheme = kerasq.QuantizationScheme(weights=weights, activations=activations)
    assert kerasq.QuantizationScheme.from_config(scheme.get_config()) == scheme
    assert kerasq.WeightQuantizer(bits=3) != weights
    assert kerasq.ActivationQuantizer(learn_range=True) != activations


def _small_net():
    """Conv-BN-ReLU, a Dense called twice, the logits."""
    inputs = keras.Input((6, 6, 1))
    x = keras.layers.Conv2D(4, 3, use_bias=False, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    shared = keras.layers.Dense(4, name="shared")
    x = shared(keras.layers.ReLU(name="between")(shared(x)))
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(x), name="net")


RNG = np.random.default_rng(0)
X = RNG.uniform(0, 1, size=(32, 6, 6, 1)).astype("float32")
Y = RNG.integers(0, 3, size=32)


def _trained_small(seed=1):
    keras.utils.set_random_seed(seed)
    qat = kerasq.quantize_model(_small_net(), _lsq_scheme(2, estimator="max"))
    qat.compile(keras.optimizers.Adam(1e-2), LOSS)
    qat.fit(X, Y, batch_size=8, epochs=2, verbose=0)
    return qat


def _fresh_small(seed=2):
    keras.utils.set_random_seed(seed)
    qat = kerasq.quantize_model(_small_net(), _lsq_scheme(2, estimator="max"))
    qat.compile(keras.optimizers.Adam(1e-2), LOSS)
    qat.optimizer.build(qat.trainable_variables)
    for variable in qat.variables + qat.optimizer.variables:
        variable.assign(np.array(variable) + 1)
    return qat


@pytest.fixture(scope="module")
def trained_small():
    return _trained_small()


def test_small_net_has_per_channel_and_per_tensor_steps(trained_small):
    shapes = {key: value.shape for key, value in _steps(trained_small).items()}
    # Conv per channel, the Dense head per tensor. The Dense called twice has none: the converter
    # requantizes a kernel that feeds several FULLY_CONNECTED ops from its values (8-bit scales per
    # channel), so it keeps the estimator's step.
    assert shapes == {"quant_conv/kernel": (4,), "quant_logits/kernel": ()}


def test_keras_file_restores_the_steps(trained_small, tmp_path):
    path = tmp_path / "lsq.keras"
    trained_small.save(path)
    loaded = keras.saving.load_model(path)
    for key, value in _steps(trained_small).items():
        np.testing.assert_array_equal(_steps(loaded)[key], value)
    np.testing.assert_array_equal(np.asarray(loaded(X)), np.asarray(trained_small(X)))
    assert loaded.get_layer("quant_conv").scheme == trained_small.get_layer("quant_conv").scheme
    # and it trains on, its steps still learned
    loaded.compile(keras.optimizers.Adam(1e-2), LOSS)
    loaded.fit(X, Y, batch_size=8, epochs=1, verbose=0)
    assert any(not np.array_equal(_steps(loaded)[k], v) for k, v in _steps(trained_small).items())


def test_checkpoints_restore_the_steps(trained_small, tmp_path):
    expected = _steps(trained_small)
    path = tf.train.Checkpoint(model=trained_small).write(str(tmp_path / "ckpt"))
    stored = [name for name, _ in tf.train.list_variables(path)]
    assert any("kernel_log_step" in name for name in stored)
    fresh = _fresh_small()
    tf.train.Checkpoint(model=fresh).read(path).assert_consumed()
    for key, value in expected.items():
        np.testing.assert_array_equal(_steps(fresh)[key], value)
    np.testing.assert_array_equal(np.asarray(fresh(X)), np.asarray(trained_small(X)))

    weights_path = str(tmp_path / "lsq.weights.h5")
    trained_small.save_weights(weights_path)
    other = _fresh_small(seed=3)
    other.load_weights(weights_path)
    for key, value in expected.items():
        np.testing.assert_array_equal(_steps(other)[key], value)


# ---- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("make, message", [
    (lambda: kerasq.WeightQuantizer(bits=4, learn_scale="yes"), "learn_scale must be True or False"),
    (lambda: kerasq.WeightQuantizer(bits=4, learn_scale=True, narrow_range=False), "narrow_range=True"),
    (lambda: kerasq.ActivationQuantizer(learn_range="pact"), "learn_range must be False, True"),
    (lambda: kerasq.ActivationQuantizer(learn_range=None), "learn_range must be False, True"),
])
def test_bad_input_says_what_to_do(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_batch_statistics_batchnorm_exports_at_the_floor(trained_small):
    """The small net's BatchNorm was never trained, so QAT normalizes with batch statistics while the
    step learns on the kernel folded with the moving ones, the kernel the file stores."""
    wrapper = trained_small.get_layer("quant_conv")
    assert wrapper.batchnorm is not None and wrapper.scheme.freeze_batchnorm is False
    tflite = kerasq.TFLiteModel(kerasq.export_tflite(trained_small))
    assert tflite.is_fully_integer, tflite.float_tensors
    report = kerasq.verify_tflite(trained_small, tflite, X)
    assert report.passed, str(report)


@pytest.mark.parametrize("learn", [False, True])
def test_a_dense_called_twice_rounds_its_bias_as_the_file_does(learn):
    """The converter stores a kernel that feeds several FULLY_CONNECTED ops with 8-bit scales per
    channel (largest magnitude / 127) whatever its bit width, and each bias on that finer grid:
    the QAT model rounds its biases so too (with the 2-bit grid they were up to 4 steps off)."""
    keras.utils.set_random_seed(1)
    scheme = kerasq.QuantizationScheme(weights=kerasq.WeightQuantizer(bits=2, learn_scale=learn),
                                       activations=kerasq.ActivationQuantizer(learn_range="lsq" if learn else False))
    qat = kerasq.quantize_model(_small_net(), scheme)
    qat.compile(keras.optimizers.Adam(1e-2), LOSS)
    qat.fit(X, Y, batch_size=8, epochs=2, verbose=0)
    tflite = kerasq.TFLiteModel(kerasq.export_tflite(qat))
    kernel = next(t for t in tflite.tensors if t.name == "shared/kernel")
    stored = tflite.weights()["shared/kernel"]
    assert np.abs(stored).max(axis=1).tolist() == [127] * 4  # requantized to 8 bits per channel
    report = kerasq.verify_tflite(qat, tflite, X)
    assert report.passed and report.outputs[0].max_diff <= 1 + 1e-3, str(report)
    assert len(kernel.scales) == 4


def test_steps_start_learning_when_a_delay_ends():
    """Under DelayQuantization the model trains in float first: its steps learn nothing then, and
    learn once quantization starts; the file is fully int8 at the floor."""
    keras.utils.set_random_seed(3)
    qat = kerasq.quantize_model(_small_net(), _lsq_scheme(4, estimator="max"))
    qat.compile(keras.optimizers.Adam(1e-2), LOSS)
    states = {f"{layer.name}/{name}": state for layer in kerasq.quantization.layers.quantized_layers(qat)
              for name, _, state in layer.weight_step_states()}
    log_steps = lambda: {k: keras.ops.convert_to_numpy(s["log_step"]).copy() for k, s in states.items()}  # noqa: E731
    before = log_steps()
    qat.fit(X, Y, batch_size=8, epochs=1, verbose=0, callbacks=[kerasq.DelayQuantization(steps=4)])  # 4 batches
    np.testing.assert_equal(log_steps(), before)  # all in float: nothing learned
    qat.fit(X, Y, batch_size=8, epochs=2, verbose=0, callbacks=[kerasq.DelayQuantization(steps=4)])
    learned = log_steps()
    assert all(np.isfinite(v).all() for v in learned.values())
    assert any(not np.array_equal(learned[k], before[k]) for k in before)
    tflite = kerasq.TFLiteModel(kerasq.export_tflite(qat))
    assert tflite.is_fully_integer
    assert kerasq.verify_tflite(qat, tflite, X).passed
