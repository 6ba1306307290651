"""Unit tests of kerasq's fake-quantizers against an independent NumPy model of the TFLite int8 spec."""

import keras
import numpy as np
import pytest

from kerasq import ActivationQuantizer, WeightQuantizer

RNG = np.random.default_rng(1)


def _per_channel_reference(weights, bits=8):
    """Symmetric narrow-range quantization, one scale per last-axis channel, in NumPy."""
    levels = 2 ** (bits - 1) - 1
    max_abs = np.abs(weights).reshape(-1, weights.shape[-1]).max(axis=0)
    scale = np.where(max_abs == 0, 1.0, max_abs) / levels
    return np.clip(np.round(weights / scale), -levels, levels) * scale, scale


# ---- WeightQuantizer -----------------------------------------------------------------------------


def test_weights_per_channel_lie_on_each_channels_grid():
    weights = RNG.normal(size=(3, 3, 4, 6)).astype("float32")
    weights[..., 1] *= 0.01  # channels of very different magnitudes
    weights[..., 4] *= 30.0
    quantized = np.asarray(WeightQuantizer(bits=8)(weights, channel_axis=-1))
    assert quantized.shape == weights.shape

    for channel in range(weights.shape[-1]):
        w, q = weights[..., channel], quantized[..., channel]
        scale = np.abs(w).max() / 127
        steps = q / scale
        np.testing.assert_allclose(steps, np.round(steps), atol=2e-3)
        assert np.abs(np.round(steps)).max() <= 127
        # The largest magnitude is representable exactly (it is the +-127 level).
        np.testing.assert_allclose(np.abs(q).max(), np.abs(w).max(), rtol=1e-6)
        # Each value rounds to its nearest level: at most half a step away.
        assert np.abs(q - w).max() <= scale / 2 * (1 + 1e-4)

    expected, _ = _per_channel_reference(weights)
    np.testing.assert_allclose(quantized, expected, rtol=1e-5, atol=1e-7)


def test_weights_channel_axis_other_than_last():
    weights = RNG.normal(size=(5, 4)).astype("float32") * np.array([[1.0], [0.1], [3.0], [0.5], [2.0]])
    quantized = np.asarray(WeightQuantizer()(weights, channel_axis=0))
    expected, _ = _per_channel_reference(weights.T)
    np.testing.assert_allclose(quantized, expected.T, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("how", ["per_channel_false", "no_axis"])
def test_weights_per_tensor_use_one_scale(how):
    weights = RNG.normal(size=(8, 3)).astype("float32")
    weights[:, 0] *= 0.02
    if how == "per_channel_false":
        quantized = np.asarray(WeightQuantizer(per_channel=False)(weights, channel_axis=-1))
    else:
        quantized = np.asarray(WeightQuantizer()(weights, channel_axis=None))
    scale = np.abs(weights).max() / 127
    steps = quantized / scale
    np.testing.assert_allclose(steps, np.round(steps), atol=2e-3)
    np.testing.assert_allclose(quantized, np.round(weights / scale) * scale, rtol=1e-5, atol=1e-7)
    # The small channel did not get a scale of its own: it is coarser than per-channel would be.
    per_channel, _ = _per_channel_reference(weights)
    assert np.abs(quantized[:, 0] - weights[:, 0]).max() > np.abs(per_channel[:, 0] - weights[:, 0]).max()


def test_all_zero_channel_stays_zero_without_nan():
    weights = RNG.normal(size=(3, 3, 2, 4)).astype("float32")
    weights[..., 2] = 0.0
    quantized = np.asarray(WeightQuantizer()(weights, channel_axis=-1))
    assert np.isfinite(quantized).all()
    np.testing.assert_array_equal(quantized[..., 2], 0.0)
    expected, _ = _per_channel_reference(weights)
    np.testing.assert_allclose(quantized, expected, rtol=1e-5, atol=1e-7)
    # An all-zero tensor too.
    zeros = np.asarray(WeightQuantizer(per_channel=False)(np.zeros((3, 2), "float32")))
    assert np.isfinite(zeros).all() and not zeros.any()


def test_all_zero_channel_has_finite_gradient():
    weights = RNG.normal(size=(4, 3)).astype("float32")
    weights[:, 1] = 0.0
    variable = keras.Variable(weights)
    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = keras.ops.sum(WeightQuantizer()(variable, channel_axis=-1) * 3.0)
    gradient = np.asarray(tape.gradient(loss, variable.value))
    assert np.isfinite(gradient).all()


def test_four_bit_weights_have_at_most_15_levels_per_channel():
    weights = RNG.normal(size=(5, 5, 3, 4)).astype("float32")
    quantized = np.asarray(WeightQuantizer(bits=4)(weights, channel_axis=-1))
    for channel in range(weights.shape[-1]):
        values = quantized[..., channel]
        max_abs = np.abs(weights[..., channel]).max()
        # Distinct up to float noise; the grid is k * max_abs / 7 with |k| <= 7.
        steps = np.round(values / (max_abs / 7)).astype(int)
        np.testing.assert_allclose(values, steps * max_abs / 7, rtol=1e-5, atol=1e-6)
        assert np.abs(steps).max() <= 7
        assert 2 < len(np.unique(steps)) <= 15
        assert len(np.unique(np.round(values, 5))) <= 15
    expected, _ = _per_channel_reference(weights, bits=4)
    np.testing.assert_allclose(quantized, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [8, 6, 4, 3, 2])
def test_training_path_equals_the_exported_fake_quant_op_bit_for_bit(bits):
    """Training quantizes per-channel kernels with elementwise ops (TensorFlow's per-channel op is
    slow on small kernels); the export trace uses the op the converter reads. Both must give the
    same floats, eagerly and inside a tf.function, where Grappler rewrites arithmetic."""
    import tensorflow as tf

    from kerasq.quantization.quantizers import tracing_for_export

    quantizer = WeightQuantizer(bits=bits)

    def exported(weights, axis):
        with tracing_for_export():
            return quantizer(weights, channel_axis=axis)

    traced = tf.function(lambda weights, axis: quantizer(weights, channel_axis=axis))
    traced_export = tf.function(exported)
    for shape, axis in (((3, 3, 8, 16), -1), ((1, 1, 24, 40), -1), ((3, 3, 5, 1), -1), ((3, 3, 4, 6), 2)):
        for magnitude in (1e-3, 1.0, 30.0):
            weights = (RNG.normal(size=shape) * magnitude).astype("float32")
            weights[..., 0] = 0.0  # a dead channel
            reference = np.asarray(exported(weights, axis))
            np.testing.assert_array_equal(np.asarray(quantizer(weights, channel_axis=axis)), reference)
            np.testing.assert_array_equal(traced(tf.constant(weights), axis).numpy(), reference)
            np.testing.assert_array_equal(traced_export(tf.constant(weights), axis).numpy(), reference)


def test_training_path_passes_the_gradient_to_every_weight():
    import tensorflow as tf

    weights = tf.Variable(RNG.normal(size=(3, 3, 4, 6)).astype("float32"))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(WeightQuantizer()(weights, channel_axis=-1) * 3.0)
    np.testing.assert_array_equal(tape.gradient(loss, weights).numpy(), np.full((3, 3, 4, 6), 3.0, "float32"))


def test_weight_quantizer_config_round_trip():
    quantizer = WeightQuantizer(bits=6, per_channel=False, narrow_range=True)
    restored = WeightQuantizer.from_config(quantizer.get_config())
    assert restored == quantizer
    assert restored.get_config() == {
        "bits": 6, "per_channel": False, "narrow_range": True, "estimator": "max", "packed_int4": False,
        "learn_scale": False,
    }
    assert keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(quantizer)) == quantizer
    assert WeightQuantizer(bits=6) != quantizer
    packed = WeightQuantizer(bits=4, packed_int4=True)
    assert WeightQuantizer.from_config(packed.get_config()) == packed != WeightQuantizer(bits=4)


@pytest.mark.parametrize("bits", [1, 0, 17, 8.0, "8"])
def test_weight_quantizer_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        WeightQuantizer(bits=bits)


# ---- ActivationQuantizer -------------------------------------------------------------------------


def _state(quantizer):
    """The quantizer's range variables, owned by a bare layer as a wrapper layer would own them."""
    holder = keras.layers.Layer()
    return quantizer.build(holder)


def _range(quantizer, state):
    low, high = quantizer.range(state)
    return float(low), float(high)


def _nudged(low, high, steps=255):
    """TFLite/TF nudging of an asymmetric range so that 0 is on the grid."""
    scale = (high - low) / steps
    zero_point = np.clip(np.round(-low / scale), 0, steps)
    return -zero_point * scale, (steps - zero_point) * scale, scale


def test_initial_range_is_the_init_range():
    quantizer = ActivationQuantizer(init_min=-2.0, init_max=3.0)
    state = _state(quantizer)
    assert _range(quantizer, state) == pytest.approx((-2.0, 3.0))
    assert float(state["seen"]) == 0.0


def test_first_training_batch_sets_the_range_exactly():
    quantizer = ActivationQuantizer(ema_decay=0.9)
    state = _state(quantizer)
    batch = RNG.uniform(-1.7, 4.3, size=(16, 5)).astype("float32")
    quantizer(batch, state, training=True)
    assert _range(quantizer, state) == pytest.approx((batch.min(), batch.max()), abs=1e-6)
    assert float(state["seen"]) == 1.0


def test_first_batch_range_includes_zero():
    quantizer = ActivationQuantizer(ema_decay=0.9)
    state = _state(quantizer)
    positive = RNG.uniform(0.5, 2.0, size=(8, 3)).astype("float32")
    quantizer(positive, state, training=True)
    assert _range(quantizer, state) == pytest.approx((0.0, positive.max()), abs=1e-6)

    quantizer = ActivationQuantizer(ema_decay=0.9)
    state = _state(quantizer)
    negative = RNG.uniform(-3.0, -1.0, size=(8, 3)).astype("float32")
    quantizer(negative, state, training=True)
    assert _range(quantizer, state) == pytest.approx((negative.min(), 0.0), abs=1e-6)


def test_later_batches_follow_the_moving_average():
    decay = 0.9
    quantizer = ActivationQuantizer(ema_decay=decay)
    state = _state(quantizer)
    batches = [
        RNG.uniform(low, high, size=(32, 4)).astype("float32")
        for low, high in [(-1.0, 2.0), (-4.0, 1.0), (-0.5, 6.0), (-2.0, 2.0)]
    ]
    expected_min, expected_max = batches[0].min(), batches[0].max()
    quantizer(batches[0], state, training=True)
    for batch in batches[1:]:
        expected_min = decay * expected_min + (1 - decay) * batch.min()
        expected_max = decay * expected_max + (1 - decay) * batch.max()
        quantizer(batch, state, training=True)
        assert _range(quantizer, state) == pytest.approx((expected_min, expected_max), abs=1e-5)
    # The moving average actually moved away from the first batch's range.
    assert abs(expected_max - batches[0].max()) > 0.1


def test_inference_does_not_change_the_range():
    quantizer = ActivationQuantizer(ema_decay=0.5)
    state = _state(quantizer)
    before = _range(quantizer, state)
    quantizer(np.full((4, 4), 100.0, "float32"), state, training=False)
    assert _range(quantizer, state) == before
    assert float(state["seen"]) == 0.0
    quantizer(np.linspace(-1, 1, 8, dtype="float32"), state, training=True)
    calibrated = _range(quantizer, state)
    quantizer(np.full((4, 4), -50.0, "float32"), state, training=False)
    assert _range(quantizer, state) == calibrated


def test_fixed_range_is_never_changed_by_training():
    quantizer = ActivationQuantizer(ema_decay=0.5, fixed_range=(0.0, 255.0 / 256.0))
    state = _state(quantizer)
    for _ in range(3):
        quantizer(RNG.uniform(-5, 5, size=(8, 8)).astype("float32"), state, training=True)
    assert _range(quantizer, state) == pytest.approx((0.0, 255.0 / 256.0), abs=1e-7)
    assert ActivationQuantizer(ema_decay=0.5).with_fixed_range((-1.0, 127 / 128)).fixed_range == (-1.0, 127 / 128)


def test_outputs_lie_on_the_nudged_255_step_grid():
    quantizer = ActivationQuantizer(init_min=-1.3, init_max=2.9)
    state = _state(quantizer)
    low, high = _range(quantizer, state)
    nudged_low, nudged_high, scale = _nudged(low, high)
    assert nudged_low != pytest.approx(low, abs=1e-9)  # this range needs nudging
    inputs = np.linspace(-3.0, 5.0, 997, dtype="float32")
    outputs = np.asarray(quantizer(inputs, state, training=False))

    steps = (outputs - nudged_low) / scale
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
    assert steps.min() == pytest.approx(0, abs=1e-3) and steps.max() == pytest.approx(255, abs=1e-3)
    assert outputs.min() == pytest.approx(nudged_low, abs=1e-5)
    assert outputs.max() == pytest.approx(nudged_high, abs=1e-5)
    # 0 is exactly representable.
    assert 0.0 in np.asarray(quantizer(np.zeros(3, "float32"), state, training=False))
    # Inside the range, each value rounds to its nearest level.
    inside = (inputs > nudged_low) & (inputs < nudged_high)
    assert np.abs(outputs[inside] - inputs[inside]).max() <= scale / 2 * (1 + 1e-3)
    expected = np.clip(np.round((inputs - nudged_low) / scale), 0, 255) * scale + nudged_low
    np.testing.assert_allclose(outputs, expected, atol=1e-5)


def test_symmetric_activation_range():
    quantizer = ActivationQuantizer(bits=16, symmetric=True)
    state = _state(quantizer)
    quantizer(np.array([-1.0, 3.0], "float32"), state, training=True)
    assert _range(quantizer, state) == pytest.approx((-3.0, 3.0))


def test_all_zero_activation_gives_no_nan():
    quantizer = ActivationQuantizer()
    state = _state(quantizer)
    outputs = np.asarray(quantizer(np.zeros((4, 4), "float32"), state, training=True))
    assert np.isfinite(outputs).all() and not outputs.any()
    low, high = _range(quantizer, state)
    assert high > low


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"bits": 16, "symmetric": True, "ema_decay": 0.0, "init_min": -1.0, "init_max": 0.0},
        {"ema_decay": 0.9, "fixed_range": (0.0, 255.0 / 256.0)},
    ],
)
def test_activation_quantizer_config_round_trip(kwargs):
    quantizer = ActivationQuantizer(**kwargs)
    config = quantizer.get_config()
    restored = ActivationQuantizer.from_config(config)
    assert restored == quantizer
    assert restored.get_config() == config
    for key, value in kwargs.items():
        expected = list(value) if key == "fixed_range" else value
        assert config[key] == expected
    serialized = keras.saving.serialize_keras_object(quantizer)
    assert keras.saving.deserialize_keras_object(serialized) == quantizer
    assert ActivationQuantizer(ema_decay=0.5) != ActivationQuantizer(ema_decay=0.6)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"bits": 1}, "bits"),
        ({"bits": 32}, "bits"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"ema_decay": -0.1}, "ema_decay"),
        ({"init_min": 0.5, "init_max": 2.0}, "init_min"),
        ({"init_min": -2.0, "init_max": -0.5}, "init_max"),
        ({"init_min": 0.0, "init_max": 0.0}, "init_min"),
        ({"fixed_range": (0.5, 1.0)}, "fixed_range"),
    ],
)
def test_activation_quantizer_bad_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words) as error:
        ActivationQuantizer(**kwargs)
    # The message shows the value that was given.
    given = next(iter(kwargs.values()))
    assert str(given if not isinstance(given, tuple) else given[0]) in str(error.value)
