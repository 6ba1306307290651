"""QAT must keep the training signal a float model has: the properties behind QAT recovering accuracy."""

import keras
import numpy as np
import tensorflow as tf

import kerasq
from kerasq import ActivationQuantizer

UNIT_RANGE = (0.0, 255.0 / 256.0)  # TFLite's fixed softmax/logistic output range


def _confident_softmax_model(margin=10.0):
    """Dense(3, softmax) on 4 features, set so that one sample is classified with p > 255/256."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    kernel = np.zeros((4, 3), "float32")
    kernel[0, 0] = margin  # feature 0 votes for class 0
    kernel[1, 1] = kernel[2, 2] = 1.0
    model.layers[-1].set_weights([kernel, np.zeros(3, "float32")])
    x = np.array([[1.0, 0.1, 0.2, 0.3], [0.9, 0.3, 0.0, 0.5]], "float32")
    y = np.array([0, 0], "int32")
    return model, x, y


def _loss_gradient_norm(model, x, y, training):
    with tf.GradientTape() as tape:
        probabilities = model(x, training=training)
        loss = keras.ops.mean(keras.losses.sparse_categorical_crossentropy(y, probabilities))
    gradients = tape.gradient(loss, model.trainable_variables)
    return float(tf.linalg.global_norm([g for g in gradients if g is not None]))


def test_fixed_range_output_is_unrounded_in_training_and_rounded_at_inference():
    quantizer = ActivationQuantizer(fixed_range=UNIT_RANGE)
    holder = keras.layers.Layer()
    state = quantizer.build(holder)
    x = np.array([0.0004, 0.1234, 0.5, 0.99987], "float32")
    np.testing.assert_array_equal(np.asarray(quantizer(x, state, training=True)), x)
    rounded = np.asarray(quantizer(x, state, training=False))
    np.testing.assert_allclose(rounded * 256, np.round(rounded * 256), atol=1e-3)  # on the 1/256 grid
    assert rounded.max() <= UNIT_RANGE[1] + 1e-7  # clipped to TFLite's range at inference
    assert np.abs(rounded - np.clip(x, *UNIT_RANGE)).max() <= 0.5 / 256 + 1e-6


def test_confidently_classified_samples_still_train_under_qat():
    """A softmax head's probability above 255/256 used to be clipped by the fixed output range in
    training, which gave every confidently classified sample exactly zero gradient (the bulk of a
    converged model's training set)."""
    model, x, y = _confident_softmax_model()
    assert float(np.asarray(model(x))[:, 0].min()) > UNIT_RANGE[1]  # the case in question
    float_norm = _loss_gradient_norm(model, x, y, training=True)
    qat = kerasq.quantize_model(model)
    qat_norm = _loss_gradient_norm(qat, x, y, training=True)
    assert float_norm > 0
    # The QAT gradient is the float one computed on quantized logits and weights: an 8-bit range over
    # about 11 logit units moves a logit by at most ~0.02, changing exp(-margin) terms by ~2%; a factor
    # of 2 either way leaves a wide margin while still excluding "zero" and "exploding".
    assert 0.5 * float_norm < qat_norm < 2.0 * float_norm


def test_inference_output_still_matches_tflites_fixed_grid():
    model, x, _ = _confident_softmax_model()
    qat = kerasq.quantize_model(model)
    qat(x, training=True)  # calibrate the learned ranges
    probabilities = np.asarray(qat(x, training=False))
    np.testing.assert_allclose(probabilities * 256, np.round(probabilities * 256), atol=1e-3)
    assert probabilities.max() <= UNIT_RANGE[1] + 1e-7


# ---- BatchNorm statistics during QAT ------------------------------------------------------------------


def _conv_bn_model():
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv")(inputs)
    x = keras.layers.BatchNormalization(momentum=0.5, name="bn")(x)
    x = keras.layers.ReLU(6.0)(x)
    outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    bn = model.get_layer("bn")
    # Moving statistics far from what a batch gives, so batch and moving normalization differ clearly.
    bn.moving_mean.assign(rng.normal(size=4).astype("float32"))
    bn.moving_variance.assign(rng.uniform(2.0, 4.0, size=4).astype("float32"))
    x = rng.normal(size=(16, 6, 6, 2)).astype("float32")
    return model, x


def _moving_statistics(qat):
    bn = qat.get_layer("quant_conv").batchnorm
    return np.asarray(bn.moving_mean).copy(), np.asarray(bn.moving_variance).copy()


def test_batchnorm_is_frozen_by_default_so_training_runs_the_deployed_network():
    model, x = _conv_bn_model()
    qat = kerasq.quantize_model(model)
    assert qat.get_layer("quant_conv").scheme.freeze_batchnorm is True
    before = _moving_statistics(qat)
    qat(x, training=True)  # the first batch sets every learned range
    trained = np.asarray(qat(x, training=True))  # the same batch again: ranges stay where they are
    # Training and inference compute the same network: equal up to float rounding of the range EMA.
    np.testing.assert_allclose(trained, np.asarray(qat(x, training=False)), atol=1e-5)
    for old, new in zip(before, _moving_statistics(qat)):
        np.testing.assert_array_equal(old, new)


def test_untrained_batchnorm_trains_with_batch_statistics_by_default():
    """QAT from scratch: statistics that still hold their initial values would normalize nothing."""
    model = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(4, 3, name="conv"),
                              keras.layers.BatchNormalization(momentum=0.5, name="bn"), keras.layers.ReLU()])
    qat = kerasq.quantize_model(model)
    assert qat.get_layer("quant_conv").scheme.freeze_batchnorm is False
    before = _moving_statistics(qat)
    qat(np.random.default_rng(1).normal(size=(16, 6, 6, 2)).astype("float32"), training=True)
    assert np.abs(before[1] - _moving_statistics(qat)[1]).max() > 1e-3


def test_unfrozen_batchnorm_uses_and_updates_batch_statistics():
    model, x = _conv_bn_model()
    qat = kerasq.quantize_model(model, kerasq.QuantizationScheme(freeze_batchnorm=False))
    before = _moving_statistics(qat)
    trained = np.asarray(qat(x, training=True))
    # Moving variances were set to 2-4 against a batch's ~0.5-2: outputs and statistics move visibly.
    assert np.abs(trained - np.asarray(qat(x, training=False))).max() > 1e-2
    assert np.abs(before[1] - _moving_statistics(qat)[1]).max() > 1e-2


def test_batchnorm_freezes_after_the_given_number_of_steps():
    model, x = _conv_bn_model()
    qat = kerasq.quantize_model(model, kerasq.QuantizationScheme(freeze_batchnorm=2))
    history = [_moving_statistics(qat)[1]]
    for _ in range(4):
        qat(x, training=True)
        history.append(_moving_statistics(qat)[1])
    assert np.abs(history[1] - history[0]).max() > 1e-2  # steps 1 and 2 update the moving statistics
    assert np.abs(history[2] - history[1]).max() > 1e-3  # (momentum 0.5: the second step moves less)
    np.testing.assert_array_equal(history[3], history[2])  # from step 3 on they are frozen
    np.testing.assert_array_equal(history[4], history[2])
    np.testing.assert_allclose(
        np.asarray(qat(x, training=True)), np.asarray(qat(x, training=False)), atol=1e-5
    )
    config = qat.get_layer("quant_conv").scheme.get_config()
    assert kerasq.QuantizationScheme.from_config(config).freeze_batchnorm == 2


def test_freeze_batchnorm_rejects_what_is_not_a_step_count():
    for bad in (-1, 2.5, "yes"):
        try:
            kerasq.QuantizationScheme(freeze_batchnorm=bad)
        except ValueError as error:
            assert "freeze_batchnorm" in str(error)
        else:
            raise AssertionError(f"freeze_batchnorm={bad!r} was accepted")
