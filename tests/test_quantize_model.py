"""Unit tests of quantize_model and its tfmot-style relatives (annotate/apply, save/load)."""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest

import kerasq
from kerasq import QuantizeWrapper
from kerasq.data import load_digits

RNG = np.random.default_rng(2)
UNIT_RANGE = (0.0, 255.0 / 256.0)
TANH_RANGE = (-1.0, 127.0 / 128.0)
LOG_SOFTMAX_RANGE = (-15.9375, 0.0)  # TFLite int8 LOG_SOFTMAX: scale 16/256, zero point 127


# ---- helpers and fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def _weights(model):
    return [np.array(w) for w in model.get_weights()]


def _assert_weights_equal(before, after):
    assert len(before) == len(after)
    for old, new in zip(before, after):
        np.testing.assert_array_equal(old, new)


def _producer(tensor):
    """The layer that produced a symbolic tensor of a Functional model."""
    return tensor._keras_history.operation


def _wrappers(model):
    return [layer for layer in model.layers if isinstance(layer, QuantizeWrapper)]


def _wrapper_of(model, cls):
    (wrapper,) = [w for w in _wrappers(model) if isinstance(w.layer, cls)]
    return wrapper


def _conv_bn_relu_model(name="cnn", momentum=0.99):
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(8, 3, name="conv"),
            keras.layers.BatchNormalization(momentum=momentum, name="bn"),
            keras.layers.ReLU(name="relu"),
            keras.layers.MaxPooling2D(name="pool"),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(10, name="logits"),
        ],
        name=name,
    )


def _cnn():
    """Conv-BN-ReLU, Conv+ReLU, global pooling and a classifier: every layer has a range of its own."""
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, padding="same", name="conv"),
            keras.layers.BatchNormalization(momentum=0.9, name="bn"),
            keras.layers.ReLU(name="relu"),
            keras.layers.Conv2D(16, 3, strides=2, activation="relu", name="conv2"),
            keras.layers.GlobalAveragePooling2D(name="gap"),
            keras.layers.Dense(10, name="logits"),
        ],
        name="cnn",
    )


def _randomize_batchnorm(layer, rng):
    channels = layer.moving_mean.shape[0]
    layer.set_weights(
        [
            rng.uniform(0.5, 2.0, channels).astype("float32"),  # gamma
            rng.normal(0.0, 0.5, channels).astype("float32"),  # beta
            rng.normal(0.0, 0.3, channels).astype("float32"),  # moving mean
            rng.uniform(0.05, 0.5, channels).astype("float32"),  # moving variance
        ]
    )


def _compile(model, learning_rate=1e-3):
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


@pytest.fixture(scope="module")
def trained(digits):
    """A float Conv-BN-ReLU CNN trained briefly, then quantized and fine-tuned for one epoch."""
    (x_train, y_train), (x_test, y_test) = digits
    keras.utils.set_random_seed(0)
    model = _compile(_cnn(), learning_rate=1e-2)
    model.fit(x_train, y_train, epochs=5, batch_size=32, verbose=0)
    float_weights = _weights(model)
    float_layers = list(model.layers)
    float_names = [layer.name for layer in model.layers]

    qat = kerasq.quantize_model(model)
    after_quantize = _weights(model)
    _compile(qat, learning_rate=3e-3)
    history = qat.fit(x_train, y_train, epochs=1, batch_size=32, verbose=0)
    return {
        "model": model,
        "qat": qat,
        "history": history,
        "float_weights": float_weights,
        "float_layers": float_layers,
        "float_names": float_names,
        "after_quantize": after_quantize,
        "after_fit": _weights(model),
    }


# ---- the user's model is never touched ---------------------------------------------------------


def test_users_model_is_untouched(trained):
    model = trained["model"]
    _assert_weights_equal(trained["float_weights"], trained["after_quantize"])
    _assert_weights_equal(trained["float_weights"], trained["after_fit"])
    _assert_weights_equal(trained["float_weights"], _weights(model))
    assert model.layers == trained["float_layers"]
    assert [layer.name for layer in model.layers] == trained["float_names"]
    # The QAT model owns its variables: none of them is one of the user's.
    assert not {id(v) for v in trained["qat"].weights} & {id(v) for v in model.weights}
    assert not set(map(id, trained["qat"].layers)) & set(map(id, model.layers))


def test_qat_model_trains_and_starts_from_the_float_weights(trained, digits):
    (_, _), (x_test, y_test) = digits
    qat, model = trained["qat"], trained["model"]
    losses = trained["history"].history["loss"]
    assert np.isfinite(losses).all()
    float_accuracy = np.mean(np.argmax(model.predict(x_test, verbose=0), -1) == y_test)
    qat_accuracy = np.mean(np.argmax(qat.predict(x_test, verbose=0), -1) == y_test)
    assert float_accuracy > 0.8
    assert qat_accuracy > float_accuracy - 0.1
    # Fine-tuning changed the QAT copy of the kernel, not the user's.
    conv = qat.get_layer("quant_conv").layer
    assert not np.array_equal(np.asarray(conv.kernel), np.asarray(model.get_layer("conv").kernel))
    # A fresh QAT model starts from the float weights, BatchNorm statistics included.
    fresh = kerasq.quantize_model(model)
    for name in ("conv", "conv2", "logits"):
        _assert_weights_equal(_weights(model.get_layer(name)), _weights(fresh.get_layer(f"quant_{name}").layer))
    _assert_weights_equal(_weights(model.get_layer("bn")), _weights(fresh.get_layer("quant_conv").batchnorm))


def test_quantize_model_layer_types_and_names():
    model = _conv_bn_relu_model()
    qat = kerasq.quantize_model(model)
    assert kerasq.is_quantized(qat) and not kerasq.is_quantized(model)
    names = [layer.name for layer in qat.layers]
    types = [type(layer).__name__ for layer in qat.layers]
    assert types[:2] == ["InputLayer", "Quantize"]
    assert types[2:] == ["QuantizeWrapper"] * 5
    assert [w.layer.name for w in _wrappers(qat)] == ["conv", "relu", "pool", "flat", "logits"]
    assert len(set(names)) == len(names)


# ---- BatchNormalization folding ----------------------------------------------------------------


def test_batchnorm_is_folded_into_the_conv():
    model = _conv_bn_relu_model()
    qat = kerasq.quantize_model(model)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in qat.layers)
    assert not any(isinstance(w.layer, keras.layers.BatchNormalization) for w in _wrappers(qat))
    conv = _wrapper_of(qat, keras.layers.Conv2D)
    assert isinstance(conv.batchnorm, keras.layers.BatchNormalization)
    assert conv.batchnorm is not model.get_layer("bn")
    # gamma and beta train; the moving statistics are saved with the model.
    trainable = {id(v) for v in qat.trainable_weights}
    assert id(conv.batchnorm.gamma) in trainable and id(conv.batchnorm.beta) in trainable
    non_trainable = {id(v) for v in qat.non_trainable_weights}
    assert id(conv.batchnorm.moving_mean) in non_trainable
    assert id(conv.batchnorm.moving_variance) in non_trainable


def test_folded_model_matches_the_float_model_at_inference(digits):
    (_, _), (x_test, _) = digits
    keras.utils.set_random_seed(3)
    model = _conv_bn_relu_model()
    _randomize_batchnorm(model.get_layer("bn"), np.random.default_rng(3))
    expected = np.asarray(model(x_test, training=False))

    # Frozen BatchNorm: a training call only calibrates the activation ranges (first batch: exact).
    scheme = kerasq.QuantizationScheme(freeze_batchnorm=True)
    qat = kerasq.quantize_model(model, scheme)
    bn_before = _weights(model.get_layer("bn"))
    qat(x_test, training=True)
    _assert_weights_equal(bn_before, _weights(_wrapper_of(qat, keras.layers.Conv2D).batchnorm))
    actual = np.asarray(qat(x_test, training=False))

    step = (expected.max() - expected.min()) / 255
    error = np.abs(actual - expected)
    assert error.max() < 4 * step, f"max error {error.max() / step:.2f} output steps"
    assert np.mean(actual.argmax(-1) == expected.argmax(-1)) > 0.95
    # Without the BatchNorm the outputs would be far away: the fold really applies it.
    unnormalized = keras.Sequential(
        [layer for layer in model.layers if not isinstance(layer, keras.layers.BatchNormalization)]
    )
    assert np.abs(np.asarray(unnormalized(x_test)) - expected).max() > 10 * step


@pytest.mark.parametrize(
    "make_layer, input_shape",
    [
        (lambda: keras.layers.Dense(6, name="kernel_layer"), (5,)),
        (lambda: keras.layers.Conv2D(6, 3, name="kernel_layer"), (6, 6, 3)),
        (lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="kernel_layer"), (6, 6, 3)),
        (lambda: keras.layers.SeparableConv2D(6, 3, depth_multiplier=2, name="kernel_layer"), (6, 6, 3)),
        (lambda: keras.layers.Conv1D(6, 3, name="kernel_layer"), (7, 3)),
    ],
    ids=["dense", "conv2d", "depthwise", "separable", "conv1d"],
)
def test_fold_math_per_layer_type(make_layer, input_shape):
    rng = np.random.default_rng(5)
    keras.utils.set_random_seed(5)
    model = keras.Sequential(
        [keras.Input(input_shape), make_layer(), keras.layers.BatchNormalization(name="bn")]
    )
    _randomize_batchnorm(model.get_layer("bn"), rng)
    data = rng.uniform(-1, 1, size=(64,) + input_shape).astype("float32")
    expected = np.asarray(model(data, training=False))

    qat = kerasq.quantize_model(model, kerasq.QuantizationScheme(freeze_batchnorm=True))
    wrapper = qat.get_layer("quant_kernel_layer")
    assert wrapper.batchnorm is not None
    qat(data, training=True)  # calibrates the ranges only
    actual = np.asarray(qat(data, training=False))
    step = (expected.max() - expected.min()) / 255
    assert np.abs(actual - expected).max() < 4 * step


def test_folded_model_matches_float_batch_statistics_in_training(digits):
    (x_train, _), _ = digits
    batch = x_train[:256]
    keras.utils.set_random_seed(4)
    model = _conv_bn_relu_model()
    _randomize_batchnorm(model.get_layer("bn"), np.random.default_rng(4))
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    expected = np.asarray(reference(batch, training=True))  # batch statistics

    # BatchNorm is frozen during QAT by default; unfrozen, training normalizes with batch statistics.
    qat = kerasq.quantize_model(model, kerasq.QuantizationScheme(freeze_batchnorm=False))
    actual = np.asarray(qat(batch, training=True))  # ranges set from this very batch
    step = (expected.max() - expected.min()) / 255
    assert np.abs(actual - expected).max() < 4 * step


def test_training_updates_the_wrappers_batchnorm_not_the_users(digits):
    (x_train, y_train), _ = digits
    model = _conv_bn_relu_model(momentum=0.5)
    user_bn = _weights(model.get_layer("bn"))
    qat = kerasq.quantize_model(model, kerasq.QuantizationScheme(freeze_batchnorm=False))
    folded = _wrapper_of(qat, keras.layers.Conv2D).batchnorm
    mean_before = np.array(folded.moving_mean)
    variance_before = np.array(folded.moving_variance)
    np.testing.assert_array_equal(mean_before, user_bn[2])

    _compile(qat).fit(x_train[:128], y_train[:128], batch_size=64, epochs=1, verbose=0)
    assert not np.allclose(np.array(folded.moving_mean), mean_before)
    assert not np.allclose(np.array(folded.moving_variance), variance_before)
    _assert_weights_equal(user_bn, _weights(model.get_layer("bn")))


def test_frozen_batchnorm_keeps_its_statistics(digits):
    (x_train, y_train), _ = digits
    model = _conv_bn_relu_model(momentum=0.5)
    qat = kerasq.quantize_model(model, kerasq.QuantizationScheme(freeze_batchnorm=True))
    folded = _wrapper_of(qat, keras.layers.Conv2D).batchnorm
    before = [np.array(folded.moving_mean), np.array(folded.moving_variance)]
    _compile(qat).fit(x_train[:128], y_train[:128], batch_size=64, epochs=1, verbose=0)
    _assert_weights_equal(before, [np.array(folded.moving_mean), np.array(folded.moving_variance)])


def test_fold_batchnorm_false_keeps_a_quantized_batchnorm():
    model = _conv_bn_relu_model()
    qat = kerasq.quantize_model(model, kerasq.QuantizationScheme(fold_batchnorm=False))
    assert _wrapper_of(qat, keras.layers.Conv2D).batchnorm is None
    assert _wrapper_of(qat, keras.layers.BatchNormalization) is not None


def test_batchnorm_after_a_conv_that_is_also_a_model_output_is_not_folded():
    inputs = keras.Input((8, 8, 1))
    conv = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    normalized = keras.layers.BatchNormalization(name="bn")(conv)
    model = keras.Model(inputs, [conv, normalized])
    qat = kerasq.quantize_model(model)
    assert _wrapper_of(qat, keras.layers.Conv2D).batchnorm is None
    # The BatchNorm stands alone, folded into a depthwise conv of its own.
    assert qat.get_layer("quant_bn").batchnorm is not None


# ---- activation fusion -------------------------------------------------------------------------


def test_relu_after_conv_is_fused():
    model = keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, name="conv"), keras.layers.ReLU(name="relu"),
         keras.layers.Flatten(), keras.layers.Dense(2)]
    )
    qat = kerasq.quantize_model(model)
    conv, relu = qat.get_layer("quant_conv"), qat.get_layer("quant_relu")
    assert conv.quantize_output is False
    assert conv.quantization_ranges() == {}
    assert relu.quantize_output is True
    assert set(relu.quantization_ranges()) == {"output"}
    data = RNG.normal(size=(8, 8, 8, 1)).astype("float32")
    qat(data, training=True)
    low, high = relu.quantization_ranges()["output"]
    assert low == 0.0 and high > 0.0
    assert conv.quantization_ranges() == {}


@pytest.mark.parametrize(
    "activation, fused",
    [
        (lambda: keras.layers.ReLU(max_value=6.0), True),
        (lambda: keras.layers.Activation("relu"), True),
        (lambda: keras.layers.Activation("relu6"), True),
        (lambda: keras.layers.ReLU(negative_slope=0.1), False),
        (lambda: keras.layers.LeakyReLU(0.1), False),
        (lambda: keras.layers.Activation("tanh"), False),
    ],
)
def test_which_activations_fuse(activation, fused):
    model = keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, name="conv"), activation()]
    )
    qat = kerasq.quantize_model(model)
    assert qat.get_layer("quant_conv").quantize_output is (not fused)


def test_conv_that_is_also_a_model_output_keeps_its_output_quantizer():
    inputs = keras.Input((8, 8, 1))
    conv = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    relu = keras.layers.ReLU(name="relu")(conv)
    model = keras.Model(inputs, [relu, conv])
    qat = kerasq.quantize_model(model)
    wrapper = qat.get_layer("quant_conv")
    assert wrapper.quantize_output is True
    assert "output" in wrapper.quantization_ranges()
    assert "output" in qat.get_layer("quant_relu").quantization_ranges()


def test_conv_feeding_two_layers_keeps_its_output_quantizer():
    inputs = keras.Input((8, 8, 1))
    conv = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    outputs = keras.layers.Add()([keras.layers.ReLU(name="relu")(conv), conv])
    qat = kerasq.quantize_model(keras.Model(inputs, outputs))
    assert qat.get_layer("quant_conv").quantize_output is True


def test_conv_with_its_own_relu_quantizes_its_output():
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, activation="relu", name="conv")])
    qat = kerasq.quantize_model(model)
    ranges = qat.get_layer("quant_conv").quantization_ranges()
    assert set(ranges) == {"output"}


# ---- weight quantization per layer type --------------------------------------------------------


def _one_hot_images(size, channels):
    """Every (row, column, channel) one-hot image of a size x size x channels input, in order."""
    return np.eye(size * size * channels, dtype="float32").reshape(-1, size, size, channels)


def _grid_error(values, scale):
    steps = values / scale
    return np.abs(steps - np.round(steps)).max()


def test_dense_weights_are_quantized_per_tensor():
    dense = keras.layers.Dense(3, use_bias=False, name="dense")
    wrapper = QuantizeWrapper(dense, quantize_output=False)
    wrapper.build((None, 5))
    kernel = RNG.normal(size=(5, 3)).astype("float32") * np.array([1.0, 0.01, 0.3], "float32")
    dense.kernel.assign(kernel)
    quantized = np.asarray(wrapper(np.eye(5, dtype="float32")))  # row i is kernel[i]

    scale = np.abs(kernel).max() / 127
    assert _grid_error(quantized, scale) < 2e-3
    np.testing.assert_allclose(quantized, np.round(kernel / scale) * scale, rtol=1e-5, atol=1e-7)
    # The small column has no scale of its own: it lost almost all its precision.
    small_max = np.abs(kernel[:, 1]).max()
    assert np.abs(quantized[:, 1]).max() != pytest.approx(small_max, rel=1e-3)


def test_dense_in_a_quantized_model_is_a_per_tensor_wrapper():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="dense")])
    wrapper = kerasq.quantize_model(model).get_layer("quant_dense")
    assert wrapper.handler.kernel_axes(wrapper.layer) == {"kernel": None}


def test_conv2d_weights_are_quantized_per_channel():
    conv = keras.layers.Conv2D(4, 3, use_bias=False, name="conv")
    wrapper = QuantizeWrapper(conv, quantize_output=False)
    wrapper.build((None, 3, 3, 2))
    kernel = RNG.normal(size=(3, 3, 2, 4)).astype("float32") * np.array([1.0, 0.01, 5.0, 0.2], "float32")
    conv.kernel.assign(kernel)
    outputs = np.asarray(wrapper(_one_hot_images(3, 2)))  # (18, 1, 1, 4)
    quantized = outputs.reshape(3, 3, 2, 4)

    for channel in range(4):
        scale = np.abs(kernel[..., channel]).max() / 127
        assert _grid_error(quantized[..., channel], scale) < 2e-3
        np.testing.assert_allclose(
            np.abs(quantized[..., channel]).max(), np.abs(kernel[..., channel]).max(), rtol=1e-5
        )
    scales = np.abs(quantized).reshape(-1, 4).max(axis=0) / 127
    assert len(np.unique(np.round(scales / scales.max(), 6))) == 4


def test_depthwise_weights_get_one_scale_per_output_channel():
    in_channels, multiplier = 3, 2
    depthwise = keras.layers.DepthwiseConv2D(3, depth_multiplier=multiplier, use_bias=False, name="dw")
    wrapper = QuantizeWrapper(depthwise, quantize_output=False)
    wrapper.build((None, 3, 3, in_channels))
    # Output channel c * multiplier + m has its own magnitude.
    magnitudes = np.array([1.0, 0.02, 4.0, 0.3, 0.05, 2.0], "float32").reshape(in_channels, multiplier)
    kernel = RNG.normal(size=(3, 3, in_channels, multiplier)).astype("float32") * magnitudes
    depthwise.kernel.assign(kernel)
    outputs = np.asarray(wrapper(_one_hot_images(3, in_channels)))  # (27, 1, 1, c * m)
    per_input = outputs.reshape(3, 3, in_channels, in_channels, multiplier)
    quantized = np.einsum("ijccm->ijcm", per_input)

    flat_kernel = kernel.reshape(3, 3, in_channels * multiplier)
    flat_quantized = quantized.reshape(3, 3, in_channels * multiplier)
    max_abs = np.abs(flat_kernel).reshape(-1, in_channels * multiplier).max(axis=0)
    for channel in range(in_channels * multiplier):
        scale = max_abs[channel] / 127
        assert _grid_error(flat_quantized[..., channel], scale) < 2e-3
        np.testing.assert_allclose(np.abs(flat_quantized[..., channel]).max(), max_abs[channel], rtol=1e-5)
    scales = np.abs(flat_quantized).reshape(-1, in_channels * multiplier).max(axis=0) / 127
    assert len(np.unique(np.round(scales / scales.max(), 6))) == in_channels * multiplier


def test_separable_conv_quantizes_the_depthwise_output():
    model = keras.Sequential(
        [keras.Input((8, 8, 2)), keras.layers.SeparableConv2D(4, 3, depth_multiplier=2, name="sep")]
    )
    qat = kerasq.quantize_model(model)
    wrapper = qat.get_layer("quant_sep")
    assert "depthwise" in wrapper.quantization_ranges()
    before = wrapper.quantization_ranges()["depthwise"]
    qat(RNG.normal(size=(4, 8, 8, 2)).astype("float32"), training=True)
    assert wrapper.quantization_ranges()["depthwise"] != before  # the range is learned


# ---- fixed output ranges -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: keras.layers.Softmax(name="act"), UNIT_RANGE),
        (lambda: keras.layers.Activation("softmax", name="act"), UNIT_RANGE),
        (lambda: keras.layers.Dense(5, activation="softmax", name="act"), UNIT_RANGE),
        (lambda: keras.layers.Activation("sigmoid", name="act"), UNIT_RANGE),
        (lambda: keras.layers.Dense(5, activation="sigmoid", name="act"), UNIT_RANGE),
        (lambda: keras.layers.Activation("tanh", name="act"), TANH_RANGE),
        (lambda: keras.layers.Dense(5, activation="tanh", name="act"), TANH_RANGE),
        (lambda: keras.layers.Activation("log_softmax", name="act"), LOG_SOFTMAX_RANGE),
    ],
)
def test_fixed_output_ranges(make, expected):
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, name="hidden"), make()])
    qat = kerasq.quantize_model(model)
    wrapper = qat.get_layer("quant_act")
    data = RNG.normal(0, 4, size=(32, 6)).astype("float32")
    qat(data, training=True)
    qat(data * 2, training=True)
    assert wrapper.quantization_ranges()["output"] == pytest.approx(expected, abs=1e-7)
    outputs = np.asarray(qat(data, training=False))
    steps = (outputs - expected[0]) / ((expected[1] - expected[0]) / 255)
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
    if isinstance(wrapper.layer, keras.layers.Dense):
        # The pre-activation (the Dense's own output) has a learned range.
        assert wrapper.quantization_ranges()["pre_activation"] != pytest.approx(expected)


# ---- unsupported layers and skip ---------------------------------------------------------------


class Doubler(keras.layers.Layer):
    def call(self, inputs):
        return inputs * 2.0


def _model_with_unsupported():
    inputs = keras.Input((5, 3))
    hidden = keras.layers.LSTM(4, name="my_lstm")(inputs)
    hidden = Doubler(name="doubler")(hidden)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden))


def test_unsupported_layer_error_names_layer_class_and_skip():
    with pytest.raises(ValueError) as error:
        kerasq.quantize_model(_model_with_unsupported())
    message = str(error.value)
    for words in ("doubler", "Doubler", "skip="):
        assert words in message
    assert "my_lstm" not in message  # a recurrent layer is not refused: it stays a float island


@pytest.mark.parametrize(
    "skip",
    [
        ["my_lstm", "doubler"],
        [keras.layers.LSTM, Doubler],
        lambda layer: isinstance(layer, (keras.layers.LSTM, Doubler)),
    ],
    ids=["names", "classes", "predicate"],
)
def test_skipped_layers_stay_float(skip):
    model = _model_with_unsupported()
    qat = kerasq.quantize_model(model, skip=skip)
    lstm, doubler = qat.get_layer("my_lstm"), qat.get_layer("doubler")
    assert type(lstm) is keras.layers.LSTM and type(doubler) is Doubler
    assert lstm is not model.get_layer("my_lstm")
    _assert_weights_equal(_weights(model.get_layer("my_lstm")), _weights(lstm))
    assert isinstance(qat.get_layer("quant_head"), QuantizeWrapper)
    # The head is quantized, so its float input is quantized again first.
    requantize = _producer(qat.get_layer("quant_head").input)
    assert isinstance(requantize, kerasq.Quantize)
    assert _producer(requantize.input) is doubler
    data = RNG.normal(size=(3, 5, 3)).astype("float32")
    assert np.isfinite(np.asarray(qat(data))).all()


def test_skipping_a_supported_layer_by_name():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="a"), keras.layers.Dense(2, name="b")])
    qat = kerasq.quantize_model(model, skip="a")
    assert type(qat.get_layer("a")) is keras.layers.Dense
    assert isinstance(qat.get_layer("quant_b"), QuantizeWrapper)



def test_skipped_layers_of_two_nested_models_with_the_same_names():
    def block(name):
        inputs = keras.Input((4,))
        hidden = Doubler(name="double")(inputs)
        return keras.Model(inputs, keras.layers.Dense(4, name="proj")(hidden), name=name)

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Add()([block("a")(inputs), block("b")(inputs)]))
    qat = kerasq.quantize_model(model, skip=[Doubler])
    assert sum(type(layer) is Doubler for layer in qat.layers) == 2
    assert sum(isinstance(w.layer, keras.layers.Dense) for w in _wrappers(qat)) == 2


def test_skipped_layer_whose_name_a_wrapper_would_take():
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, name="dense"), keras.layers.Dense(2, name="quant_dense")]
    )
    qat = kerasq.quantize_model(model, skip=["quant_dense"])
    names = [layer.name for layer in qat.layers]
    assert len(set(names)) == len(names)
    assert sum(type(layer) is keras.layers.Dense for layer in qat.layers) == 1


def test_shared_layer_gets_one_wrapper_with_ranges_per_call():
    shared = keras.layers.Dense(4, name="shared")
    inputs = keras.Input((4,))
    model = keras.Model(inputs, shared(keras.layers.ReLU(name="relu")(shared(inputs))))
    qat = kerasq.quantize_model(model)
    dense_wrappers = [w for w in _wrappers(qat) if isinstance(w.layer, keras.layers.Dense)]
    assert len(dense_wrappers) == 1
    (wrapper,) = dense_wrappers
    assert len(wrapper.layer.weights) == 2  # one kernel, one bias for both calls
    # The first call's ReLU is fused; the second call is a model output, so it is quantized.
    assert wrapper.quantize_output == (False, True)
    assert set(wrapper.quantization_ranges()) == {"output_call1"}
    data = RNG.uniform(-1, 1, size=(16, 4)).astype("float32")
    qat(data, training=True)
    expected = np.asarray(model(data))
    step = (expected.max() - expected.min()) / 255
    assert np.abs(np.asarray(qat(data)) - expected).max() < 4 * step


def test_shared_layer_calls_learn_separate_ranges():
    shared = keras.layers.Dense(3, name="shared")
    inputs = keras.Input((3,))
    small = shared(inputs)
    large = shared(keras.layers.Rescaling(50.0, name="grow")(inputs))
    model = keras.Model(inputs, [small, large])
    qat = kerasq.quantize_model(model, skip=["grow"])
    wrapper = qat.get_layer("quant_shared")
    assert wrapper.calls == 2
    data = RNG.uniform(-1, 1, size=(32, 3)).astype("float32")
    qat(data, training=True)
    ranges = wrapper.quantization_ranges()
    width = {name: high - low for name, (low, high) in ranges.items()}
    assert width["output_call1"] > 20 * width["output"]
    # Each output within a step or two of its own range: one range for both would cost the small
    # output a fifty-times coarser grid.
    for got, want in zip(qat(data), model(data)):
        want = np.asarray(want)
        step = (want.max() - want.min()) / 255
        assert np.abs(np.asarray(got) - want).max() < 2 * step


def test_keras_file_round_trip_of_a_shared_layer(tmp_path):
    shared = keras.layers.Dense(3, name="shared")
    pool = keras.layers.MaxPooling1D(2, name="pool")
    inputs = keras.Input((4, 3))
    grown = keras.layers.Rescaling(20.0, name="grow")(inputs)
    model = keras.Model(inputs, [pool(shared(inputs)), pool(shared(grown))])
    qat = kerasq.quantize_model(model, skip=["grow"])
    data = RNG.uniform(-1, 1, size=(16, 4, 3)).astype("float32")
    qat(data, training=True)
    path = tmp_path / "shared.keras"
    qat.save(path)
    loaded = keras.saving.load_model(path)
    for got, want in zip(loaded(data), qat(data)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    wrapper = loaded.get_layer("quant_shared")
    assert wrapper.quantization_ranges() == qat.get_layer("quant_shared").quantization_ranges()
    assert loaded.get_layer("quant_pool").output_range_of(1)[1] is wrapper.output_range_of(1)[1]


def test_ops_feeding_only_a_concatenate_round_once_to_its_range():
    """TFLite writes them at the concatenation's scale (measured: 0 steps apart vs 1-3 otherwise)."""
    inputs = keras.Input((4,))
    only = keras.layers.Dense(3, name="only")(inputs)
    through = keras.layers.Reshape((3,), name="reshape")(keras.layers.Dense(3, name="through")(inputs))
    shared = keras.layers.Dense(3, name="also_read")(inputs)
    fixed = keras.layers.Softmax(name="softmax")(keras.layers.Dense(3, name="logits")(inputs))
    joined = keras.layers.Concatenate(name="join")([only, through, shared, fixed])
    model = keras.Model(inputs, [joined, keras.layers.Dense(2, name="other")(shared)])
    qat = kerasq.quantize_model(model)
    assert qat.get_layer("quant_only").quantize_output is False
    assert qat.get_layer("quant_through").quantize_output is False
    assert qat.get_layer("quant_also_read").quantize_output is True  # read by another op too
    assert qat.get_layer("quant_softmax").quantize_output is True  # TFLite fixes its range
    assert "output" in qat.get_layer("quant_join").quantization_ranges()


class NoShape(keras.layers.Layer):
    """A custom layer with no `compute_output_shape`, as many are."""

    def call(self, inputs):
        return keras.ops.concatenate([inputs, -inputs], axis=-1)


def test_wrapping_a_layer_without_compute_output_shape():
    kerasq.register_handler(NoShape, kerasq.quantization.LayerHandler())
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(NoShape(name="mirror")(inputs)))
    qat = kerasq.quantize_model(model)
    assert isinstance(qat.get_layer("quant_mirror"), QuantizeWrapper)
    assert tuple(qat.get_layer("quant_mirror").output.shape) == (None, 6)
    annotated = kerasq.quantize_apply(kerasq.quantize_annotate_model(model))
    assert tuple(annotated.output.shape) == (None, 2)


def test_shared_pass_through_layer_keeps_each_inputs_range():
    pool = keras.layers.MaxPooling1D(2, name="pool")
    inputs = keras.Input((4, 2))
    left = keras.layers.Dense(2, name="left")(inputs)
    right = keras.layers.Dense(2, name="right")(keras.layers.Rescaling(30.0, name="grow")(inputs))
    model = keras.Model(inputs, [pool(left), pool(right)])
    qat = kerasq.quantize_model(model, skip=["grow"])
    wrapper = qat.get_layer("quant_pool")
    assert wrapper.output_range_of(0)[1] is qat.get_layer("quant_left").output_range[1]
    assert wrapper.output_range_of(1)[1] is qat.get_layer("quant_right").output_range[1]


def test_call_index_out_of_range_is_a_clear_error():
    wrapper = QuantizeWrapper(keras.layers.Dense(2), quantize_output=[True, True])
    with pytest.raises(ValueError, match="call_index must be an int from 0 to 1"):
        wrapper(keras.ops.ones((1, 3)), call_index=2)


def test_dict_inputs_each_get_a_quantize_layer():
    a, b = keras.Input((4,), name="a"), keras.Input((2,), name="b")
    model = keras.Model({"a": a, "b": b}, keras.layers.Dense(2, name="head")(keras.layers.Concatenate()([a, b])))
    qat = kerasq.quantize_model(model)
    assert sum(isinstance(layer, kerasq.Quantize) for layer in qat.layers) == 2
    data = {"a": RNG.normal(size=(3, 4)).astype("float32"), "b": RNG.normal(size=(3, 2)).astype("float32")}
    assert np.asarray(qat(data)).shape == (3, 2)


def test_integer_inputs_are_not_quantized():
    inputs = keras.Input((5,), dtype="int32")
    embedded = keras.layers.Embedding(10, 4, name="emb")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling1D()(embedded)))
    qat = kerasq.quantize_model(model, skip=["emb"])
    emb = qat.get_layer("emb")
    assert isinstance(_producer(emb.input), keras.layers.InputLayer)  # straight from the int input
    (quantize,) = [layer for layer in qat.layers if isinstance(layer, kerasq.Quantize)]
    assert _producer(quantize.input) is emb  # the float embedding is quantized for the next layer


def test_skip_rejects_other_things():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    with pytest.raises(TypeError, match="skip"):
        kerasq.quantize_model(model, skip=[3])


def test_no_quantize_between_two_skipped_layers():
    inputs = keras.Input((5, 3))
    hidden = keras.layers.LSTM(4, return_sequences=True, name="lstm1")(inputs)
    hidden = keras.layers.LSTM(4, name="lstm2")(hidden)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden))
    qat = kerasq.quantize_model(model, skip=[keras.layers.LSTM])
    assert _producer(qat.get_layer("lstm2").input) is qat.get_layer("lstm1")


# ---- annotate / apply --------------------------------------------------------------------------


def _annotated_model():
    inputs = keras.Input((4,), name="x")
    hidden = kerasq.quantize_annotate_layer(keras.layers.Dense(3, name="a"))(inputs)
    hidden = keras.layers.Dense(3, name="b")(hidden)
    outputs = kerasq.quantize_annotate_layer(keras.layers.Dense(2, name="c"))(hidden)
    return keras.Model(inputs, outputs)


def test_quantize_apply_wraps_only_annotated_layers():
    model = _annotated_model()
    qat = kerasq.quantize_apply(model)
    wrapped = sorted(w.layer.name for w in _wrappers(qat))
    assert wrapped == ["a", "c"]
    assert type(qat.get_layer("b")) is keras.layers.Dense
    assert not any(isinstance(layer, kerasq.QuantizeAnnotate) for layer in qat.layers)
    # The weights are the model's.
    annotated_a = [l for l in model.layers if isinstance(l, kerasq.QuantizeAnnotate)][0]
    _assert_weights_equal(_weights(annotated_a), _weights(qat.get_layer("quant_a").layer))


def test_quantize_apply_leaves_a_float_output_float():
    inputs = keras.Input((4,))
    hidden = kerasq.quantize_annotate_layer(keras.layers.Dense(3))(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="last")(hidden))
    qat = kerasq.quantize_apply(model)
    assert [type(layer).__name__ for layer in qat.layers] == [
        "InputLayer", "Quantize", "QuantizeWrapper", "Dense",
    ]


def test_quantize_annotate_layer_rejects_models():
    with pytest.raises(TypeError):
        kerasq.quantize_annotate_layer(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]))


def test_quantize_annotate_model_then_apply_wraps_all():
    model = _conv_bn_relu_model()
    annotated = kerasq.quantize_annotate_model(model)
    inner = [layer for layer in annotated.layers if not isinstance(layer, keras.layers.InputLayer)]
    assert inner and all(isinstance(layer, kerasq.QuantizeAnnotate) for layer in inner)
    data = RNG.uniform(size=(4, 8, 8, 1)).astype("float32")
    # Annotation changes nothing numerically, and the user's model is untouched.
    np.testing.assert_array_equal(np.asarray(annotated(data)), np.asarray(model(data)))

    applied = kerasq.quantize_apply(annotated)
    direct = kerasq.quantize_model(model)
    assert [type(layer).__name__ for layer in applied.layers] == [
        type(layer).__name__ for layer in direct.layers
    ]
    assert [w.layer.name for w in _wrappers(applied)] == [w.layer.name for w in _wrappers(direct)]
    assert _wrapper_of(applied, keras.layers.Conv2D).batchnorm is not None


# ---- saving and loading ------------------------------------------------------------------------


def test_keras_file_round_trip_after_fit(trained, digits, tmp_path):
    (x_train, y_train), (x_test, _) = digits
    qat = trained["qat"]
    path = tmp_path / "qat.keras"
    qat.save(path)
    loaded = keras.saving.load_model(path)
    assert [type(layer).__name__ for layer in loaded.layers] == [type(layer).__name__ for layer in qat.layers]
    np.testing.assert_array_equal(loaded.predict(x_test, verbose=0), qat.predict(x_test, verbose=0))
    for name in ("quant_conv", "quant_relu", "quant_conv2", "quant_gap", "quant_logits"):
        assert loaded.get_layer(name).quantization_ranges() == qat.get_layer(name).quantization_ranges()
    assert loaded.get_layer("quant_conv").batchnorm is not None

    before = _weights(loaded)
    history = loaded.fit(x_train[:256], y_train[:256], batch_size=64, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert any(not np.array_equal(old, new) for old, new in zip(before, _weights(loaded)))



def test_keras_file_round_trip_with_pass_through_layers(digits, tmp_path):
    (x_train, _), (x_test, _) = digits
    qat = kerasq.quantize_model(_conv_bn_relu_model())
    qat(x_train[:256], training=True)
    path = tmp_path / "pass_through.keras"
    qat.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x_test, verbose=0), qat.predict(x_test, verbose=0))


def test_pass_through_wrappers_own_no_variables():
    qat = kerasq.quantize_model(_conv_bn_relu_model())
    for name in ("quant_pool", "quant_flat"):
        assert qat.get_layer(name).weights == []


def test_loading_needs_no_custom_objects_in_a_fresh_process(trained, tmp_path):
    path = tmp_path / "qat.keras"
    trained["qat"].save(path)
    data = RNG.uniform(size=(5, 8, 8, 1)).astype("float32")
    np.save(tmp_path / "data.npy", data)
    expected = np.asarray(trained["qat"](data, training=False))
    script = (
        "import sys, numpy as np, keras, kerasq\n"
        f"model = keras.saving.load_model({str(path)!r})\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, np.asarray(model(np.load({str(tmp_path / 'data.npy')!r}))))\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=120)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)


def test_scheme_is_in_the_config_and_round_trips(tmp_path):
    scheme = kerasq.QuantizationScheme(
        activations=kerasq.ActivationQuantizer(ema_decay=0.9), freeze_batchnorm=True
    )
    qat = kerasq.quantize_model(_cnn(), scheme)

    default_config = kerasq.quantize_model(_cnn()).get_config()
    conv_config = next(c for c in default_config["layers"] if c["config"]["name"] == "quant_conv")
    serialized = json.dumps(conv_config)
    scheme_config = conv_config["config"]["scheme"]["config"]
    assert scheme_config["activations"]["config"]["ema_decay"] == 0.99
    assert scheme_config["weights"]["config"]["bits"] == 8
    assert scheme_config["weights"]["config"]["narrow_range"] is True
    assert "ema_decay" in serialized

    config = qat.get_config()
    conv_config = next(c for c in config["layers"] if c["config"]["name"] == "quant_conv")
    assert conv_config["config"]["scheme"]["config"]["activations"]["config"]["ema_decay"] == 0.9

    path = tmp_path / "scheme.keras"
    qat.save(path)
    loaded = keras.saving.load_model(path)
    for wrapper in _wrappers(loaded):
        assert wrapper.scheme == scheme
        assert wrapper.scheme.activations.ema_decay == 0.9
        assert wrapper.scheme.weights.bits == 8 and wrapper.scheme.weights.narrow_range
        assert wrapper.scheme.freeze_batchnorm is True
    (input_quantizer,) = [l for l in loaded.layers if isinstance(l, kerasq.Quantize)]
    assert input_quantizer.quantizer.ema_decay == 0.9

    # The loaded model really averages with 0.9: two training calls on the input quantizer.
    first = np.full((2, 8, 8, 1), 1.0, "float32")
    first[0, 0, 0, 0] = -1.0
    second = np.full((2, 8, 8, 1), 3.0, "float32")
    second[0, 0, 0, 0] = -2.0
    input_quantizer(first, training=True)
    input_quantizer(second, training=True)
    low, high = input_quantizer.quantizer.range(input_quantizer._range)
    assert float(low) == pytest.approx(0.9 * -1.0 + 0.1 * -2.0, abs=1e-6)
    assert float(high) == pytest.approx(0.9 * 1.0 + 0.1 * 3.0, abs=1e-6)


# ---- nested models -----------------------------------------------------------------------------


def test_mobilenetv2_backbone_is_inlined_and_all_batchnorms_folded():
    backbone = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, include_top=False
    )
    inputs = keras.Input((32, 32, 3))
    pooled = keras.layers.GlobalAveragePooling2D(name="gap")(backbone(inputs))
    model = keras.Model(inputs, keras.layers.Dense(10, name="head")(pooled))
    qat = kerasq.quantize_model(model)

    assert not any(isinstance(layer, keras.Model) for layer in qat.layers)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in qat.layers)
    assert not any(isinstance(w.layer, keras.layers.BatchNormalization) for w in _wrappers(qat))
    batchnorms = [l for l in backbone.layers if isinstance(l, keras.layers.BatchNormalization)]
    folded = [w for w in _wrappers(qat) if w.batchnorm is not None]
    assert len(folded) == len(batchnorms) > 0
    assert {w.batchnorm.name for w in folded} == {bn.name for bn in batchnorms}
    depthwise = [w for w in _wrappers(qat) if isinstance(w.layer, keras.layers.DepthwiseConv2D)]
    assert depthwise and all(w.batchnorm is not None for w in depthwise)

    data = RNG.uniform(size=(2, 32, 32, 3)).astype("float32")
    outputs = np.asarray(qat(data, training=False))
    assert outputs.shape == (2, 10) and np.isfinite(outputs).all()


# ---- import side effects -----------------------------------------------------------------------


def test_import_changes_no_environment_or_keras_setting():
    script = """
import json, os
import keras
def snapshot():
    return {
        "environ": dict(os.environ),
        "floatx": keras.config.floatx(),
        "image_data_format": keras.config.image_data_format(),
        "backend": keras.config.backend(),
        "epsilon": keras.config.epsilon(),
        "dtype_policy": keras.config.dtype_policy().name,
    }
before = snapshot()
import kerasq
after = snapshot()
changed = sorted(k for k in set(before["environ"]) | set(after["environ"])
                 if before["environ"].get(k) != after["environ"].get(k))
print(json.dumps({"same": before == after, "changed_env": changed,
                  "before": {k: v for k, v in before.items() if k != "environ"},
                  "after": {k: v for k, v in after.items() if k != "environ"}}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=120
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["changed_env"] == []
    assert report["before"] == report["after"]
    assert report["same"]


def test_bare_operations_are_quantized_unless_skipped():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(4, name="dense")(inputs)
    x = keras.ops.mean(hidden * 2.0, axis=-1, keepdims=True)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x - hidden))
    operations = {type(op).__name__: op.name for op in model.operations}
    qat = kerasq.quantize_model(model)
    quantized = {layer.name for layer in qat.layers if isinstance(layer, kerasq.Quantize)}
    assert {f"{operations[kind]}_quantize" for kind in ("Multiply", "Mean", "Subtract")} <= quantized
    data = RNG.uniform(-1, 1, size=(16, 4)).astype("float32")
    qat(data, training=True)
    expected = np.asarray(model(data))
    assert np.abs(np.asarray(qat(data)) - expected).max() < 0.1 * np.abs(expected).max()

    mean_name = operations["Mean"]
    skipped = kerasq.quantize_model(model, skip=[mean_name])
    assert f"{mean_name}_quantize" not in {layer.name for layer in skipped.layers}
    assert f"{mean_name}_quantize" not in {layer.name for layer in kerasq.quantize_apply(model).layers}


def test_standalone_batchnorm_runs_as_a_folded_depthwise_conv(tmp_path):
    inputs = keras.Input((6, 6, 2))
    joined = keras.layers.Concatenate()([keras.layers.Conv2D(3, 3)(inputs), keras.layers.Conv2D(3, 3)(inputs)])
    bn = keras.layers.BatchNormalization(name="bn")
    model = keras.Model(inputs, keras.layers.ReLU(name="relu")(bn(joined)))
    data = RNG.uniform(-1, 1, size=(16, 6, 6, 2)).astype("float32")
    bn(joined)  # built
    bn.set_weights([w + RNG.uniform(0.5, 1.5, size=w.shape).astype("float32") for w in bn.get_weights()])
    before = _weights(model)
    # Frozen BatchNorm, so the calibration pass below moves only the ranges, not the statistics.
    qat = kerasq.quantize_model(model, kerasq.QuantizationScheme(freeze_batchnorm=True))
    wrapper = qat.get_layer("quant_bn")
    assert isinstance(wrapper.layer, keras.layers.DepthwiseConv2D) and not wrapper.layer.trainable
    assert wrapper.batchnorm is not None and wrapper.quantize_output is False  # the ReLU fuses
    _assert_weights_equal(_weights(wrapper.batchnorm), _weights(bn))
    expected = np.asarray(model(data))
    step = (expected.max() - expected.min()) / 255
    qat(data, training=True)
    assert np.abs(np.asarray(qat(data)) - expected).max() < 4 * step
    _assert_weights_equal(before, _weights(model))
    qat.save(tmp_path / "bn.keras")
    loaded = keras.saving.load_model(tmp_path / "bn.keras")
    np.testing.assert_array_equal(np.asarray(loaded(data)), np.asarray(qat(data)))


def test_standalone_batchnorm_on_features_runs_as_a_length_one_sequence(tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.BatchNormalization(name="bn")(keras.layers.ReLU()(inputs)))
    model.get_layer("bn").set_weights([RNG.uniform(0.5, 2.0, size=4).astype("float32") for _ in range(4)])
    qat = kerasq.quantize_model(model, kerasq.QuantizationScheme(freeze_batchnorm=True))
    assert isinstance(qat.get_layer("quant_bn").layer, keras.layers.DepthwiseConv1D)
    data = RNG.uniform(-1, 1, size=(32, 4)).astype("float32")
    qat(data, training=True)
    expected = np.asarray(model(data))
    assert np.asarray(qat(data)).shape == (32, 4)
    assert np.abs(np.asarray(qat(data)) - expected).max() < 2 * (expected.max() - expected.min()) / 255
    qat.save(tmp_path / "bn.keras")
    np.testing.assert_array_equal(np.asarray(keras.saving.load_model(tmp_path / "bn.keras")(data)), np.asarray(qat(data)))


def test_standalone_batchnorm_stays_a_layer_without_folding():
    unfolded = kerasq.QuantizationScheme(fold_batchnorm=False)
    image = keras.Input((4, 4, 2))
    conv_model = keras.Model(image, keras.layers.BatchNormalization(name="bn")(image))
    qat = kerasq.quantize_model(conv_model, unfolded)
    assert type(qat.get_layer("quant_bn").layer) is keras.layers.BatchNormalization


def test_embedding_table_is_quantized_with_one_scale(tmp_path):
    inputs = keras.Input((5,), dtype="int32")
    model = keras.Model(inputs, keras.layers.Embedding(12, 4, name="embed")(inputs))
    before = _weights(model)
    qat = kerasq.quantize_model(model)
    wrapper = qat.get_layer("quant_embed")
    assert isinstance(wrapper, QuantizeWrapper) and wrapper.quantization_ranges() == {}
    tokens = RNG.integers(0, 12, size=(3, 5)).astype("int32")
    table = np.asarray(model.get_layer("embed").embeddings)
    step = np.abs(table).max() / 127
    got = np.asarray(qat(tokens))
    np.testing.assert_allclose(got, np.rint(table[tokens] / step) * step, atol=1e-6)
    _assert_weights_equal(before, _weights(model))
    qat.save(tmp_path / "embed.keras")
    np.testing.assert_array_equal(np.asarray(keras.saving.load_model(tmp_path / "embed.keras")(tokens)), got)


def test_quantizing_a_quantized_model_says_so():
    qat = kerasq.quantize_model(keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]))
    with pytest.raises(ValueError, match="already quantized"):
        kerasq.quantize_model(qat)


@pytest.mark.parametrize("interpolation, resize_op", [("nearest", "RESIZE_NEAREST_NEIGHBOR"), ("bilinear", "RESIZE_BILINEAR")])
def test_upsampling_exports_as_one_resize_op_on_every_kernel_path(interpolation, resize_op):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.UpSampling2D(interpolation=interpolation)(x)
    model = keras.Model(inputs, keras.layers.Conv2D(2, 1)(x))
    data = RNG.uniform(size=(64, 8, 8, 3)).astype("float32")
    qat = kerasq.quantize_model(model)
    for _ in range(3):
        qat(data, training=True)
    tflite = kerasq.TFLiteModel(kerasq.export_tflite(qat))
    assert sorted(set(tflite.ops)) == ["CONV_2D", resize_op] and tflite.is_fully_integer
    report = kerasq.verify_tflite(qat, tflite, data)
    assert report.passed and "reference" in report.floor_kernels, str(report)
    # The float layer computes the same as Keras's own UpSampling2D.
    np.testing.assert_array_equal(np.asarray(model(data[:4])), np.asarray(keras.Model(inputs, model.outputs)(data[:4])))


def test_preserve_sparsity_keeps_pruned_zeros_through_training_and_in_the_file(digits, tmp_path):
    (x_train, y_train), _ = digits
    model = _cnn()
    for layer in model.layers:  # prune 70% of every kernel by magnitude, as a stripped pruned model holds them
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            kernel = np.asarray(layer.kernel)
            kernel[np.abs(kernel) < np.quantile(np.abs(kernel), 0.7)] = 0.0
            layer.kernel.assign(kernel)
    zeros = {layer.name: np.asarray(layer.kernel) == 0 for layer in model.layers if hasattr(layer, "kernel")}
    qat = kerasq.quantize_model(model, preserve_sparsity=True)
    qat.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(x_train[:256], y_train[:256], epochs=2, verbose=0)  # a large rate would regrow them at once
    for name, mask in zeros.items():
        kernel = np.asarray(qat.get_layer(f"quant_{name}").layer.kernel)
        assert np.all(kernel[mask] == 0), name
    # .keras files keep the constraint: training after loading keeps the zeros too.
    path = str(tmp_path / "sparse_qat.keras")
    qat.save(path)
    loaded = keras.models.load_model(path)
    loaded.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    loaded.fit(x_train[:64], y_train[:64], epochs=1, verbose=0)
    assert np.all(np.asarray(loaded.get_layer("quant_conv").layer.kernel)[zeros["conv"]] == 0)
    # The int8 file holds the zeros: every conv and dense weight tensor is at least 70% zeros.
    tflite = kerasq.TFLiteModel(kerasq.export_tflite(qat))
    int8_weights = [w for w in tflite.weights().values() if w.dtype == np.int8 and w.ndim >= 2]
    assert len(int8_weights) == 3
    assert all(np.mean(w == 0) >= 0.7 for w in int8_weights)
    # Without the option the optimizer regrows them.
    plain = kerasq.quantize_model(model)
    plain.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    plain.fit(x_train[:256], y_train[:256], epochs=1, verbose=0)
    assert not np.all(np.asarray(plain.get_layer("quant_conv").layer.kernel)[zeros["conv"]] == 0)


def test_annotated_first_layer_keeps_its_input_shape_as_in_tfmots_guide():
    model = keras.Sequential([
        kerasq.quantize_annotate_layer(keras.layers.Conv2D(4, 3, input_shape=(8, 8, 1))),
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    ])
    assert model.input_shape == (None, 8, 8, 1)
    qat = kerasq.quantize_apply(model)
    assert isinstance(qat.layers[2], QuantizeWrapper) and qat.output_shape == (None, 10)


def test_a_diverged_model_is_refused_at_export_naming_the_weight():
    model = _cnn()
    qat = kerasq.quantize_model(model)
    qat.get_layer("quant_logits").layer.kernel.assign(np.full((16, 10), np.nan, "float32"))
    with pytest.raises(kerasq.ExportError, match=r"NaN or infinite values in 'quant_logits/logits/kernel'.*learning rate"):
        kerasq.export_tflite(qat)


def test_multi_output_model_keeps_its_output_names_for_dict_losses(digits, tmp_path):
    (x_train, y_train), (x_test, y_test) = digits
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Flatten()(keras.layers.Conv2D(8, 3, activation="relu")(inputs))
    digit = keras.layers.Dense(10, name="digit")(x)
    parity = keras.layers.Dense(2, name="parity")(x)
    model = keras.Model(inputs, [digit, parity])
    qat = kerasq.quantize_model(model)
    assert qat.output_names == ["digit", "parity"]
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    qat.compile("adam", loss={"digit": loss, "parity": loss}, metrics={"digit": ["accuracy"]})
    history = qat.fit(x_train, {"digit": y_train, "parity": y_train % 2}, epochs=1, verbose=0)
    assert "digit_accuracy" in history.history
    path = str(tmp_path / "two_outputs.keras")
    qat.save(path)
    assert keras.models.load_model(path).output_names == ["digit", "parity"]
    tflite = kerasq.TFLiteModel(kerasq.export_tflite(qat))
    assert tflite.output_names == ["digit", "parity"] and tflite.is_fully_integer
    assert kerasq.verify_tflite(qat, tflite, x_test).passed


def test_augmentation_layers_train_with_qat_and_leave_nothing_in_the_file(digits):
    (x_train, y_train), (x_test, _) = digits
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.RandomFlip("horizontal"),
        keras.layers.RandomRotation(0.05),
        keras.layers.RandomContrast(0.2),
        keras.layers.Conv2D(8, 3, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    ])
    qat = kerasq.quantize_model(model)
    flip = next(w for w in _wrappers(qat) if isinstance(w.layer, keras.layers.RandomFlip))
    x = x_train[:64]
    assert not np.array_equal(np.asarray(flip(x, training=True)), x)  # still augments while training
    np.testing.assert_array_equal(np.asarray(flip(x, training=False)), x)
    qat.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(x_train, y_train, epochs=1, verbose=0)
    tflite = kerasq.TFLiteModel(kerasq.export_tflite(qat))
    assert sorted(set(tflite.ops)) == ["CONV_2D", "FULLY_CONNECTED", "RESHAPE"] and tflite.is_fully_integer
    assert kerasq.verify_tflite(qat, tflite, x_test).passed


def test_float64_constants_are_cast_where_exact_and_named_where_not():
    def model_scaled_by(value):
        inputs = keras.Input((4,))
        hidden = keras.layers.Dense(4)(inputs)
        return keras.Model(inputs, keras.layers.Dense(2)(hidden * value))

    qat = kerasq.quantize_model(model_scaled_by(1 / np.sqrt(4.0)))  # 0.5: exact in float32
    qat(RNG.uniform(size=(8, 4)).astype("float32"), training=True)
    assert kerasq.TFLiteModel(kerasq.export_tflite(qat)).is_fully_integer
    with pytest.raises(ValueError, match=r"(?s)float64 constants change.*Multiply.*0\.577.*np\.float32"):
        kerasq.quantize_model(model_scaled_by(1 / np.sqrt(3.0)))
