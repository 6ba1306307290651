"""LeakyReLU, PReLU and bilinear upsampling simulate the int8 kernels LiteRT runs by default (XNNPACK):
bit for bit on the op alone, and at the kernel-path floor in a small trained model."""

import keras
import numpy as np
import pytest

import kerasq

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _layer(kind):
    if kind == "leaky_relu":
        return keras.layers.LeakyReLU(negative_slope=0.2)
    if kind == "prelu":
        return keras.layers.PReLU(alpha_initializer=keras.initializers.RandomUniform(0.05, 0.4), shared_axes=[1, 2])
    return keras.layers.UpSampling2D(2, interpolation="bilinear")


@pytest.mark.parametrize("kind", ["leaky_relu", "prelu", "bilinear"])
@pytest.mark.parametrize("low, high", [(-3.0, 5.0), (-2.0, 0.7)])
def test_the_op_alone_matches_the_default_kernels_bit_for_bit(kind, low, high):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 8, 8))
    model = keras.Model(inputs, _layer(kind)(inputs))
    rng = np.random.default_rng(0)
    qat = kerasq.quantize_model(model, calibration_data=rng.uniform(low, high, (64, 4, 8, 8)).astype("float32"))
    tflite = kerasq.TFLiteModel(kerasq.export_tflite(qat))
    assert tflite.ops == [{"leaky_relu": "LEAKY_RELU", "prelu": "PRELU", "bilinear": "RESIZE_BILINEAR"}[kind]]
    (in_scale, in_zero), (out_scale, out_zero) = tflite.input_quantization[0], tflite.output_quantization[0]
    levels = rng.permuted(np.tile(np.arange(-128, 128), 32)).reshape(32, 4, 8, 8).astype("int8")  # each level 32 times
    x = ((levels.astype("float32") - in_zero) * in_scale).astype("float32")
    simulated = np.round(np.asarray(qat(x, training=False)) / out_scale) + out_zero
    default = tflite.predict(levels, raw=True).astype("float32")
    if kind != "prelu":
        np.testing.assert_array_equal(simulated, default)
        return
    # PRELU rounds an exact tie of input x alpha away from zero, the simulation up: 3 values in 8192 here.
    assert np.abs(simulated - default).max() <= 1
    assert np.mean(simulated != default) < 0.001


@pytest.mark.parametrize("kind", ["leaky_relu", "prelu", "bilinear"])
def test_a_small_trained_model_is_at_the_floor(kind, digits):
    (x, y), (x_test, _) = digits
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    h = _layer(kind)(keras.layers.Conv2D(8, 3, padding="same")(inputs))
    h = keras.layers.Conv2D(8, 3, strides=2)(h)
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(h)))
    model.compile(keras.optimizers.Adam(1e-3), LOSS)
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)
    qat = kerasq.quantize_model(model, calibration_data=x[:256])
    qat.compile(keras.optimizers.Adam(1e-4), LOSS)
    qat.fit(x, y, epochs=1, batch_size=32, verbose=0)
    report = kerasq.verify_tflite(qat, kerasq.export_tflite(qat), x_test)
    assert report.passed and report.fully_integer, str(report)
    # Only float rounding in the convolutions is left between the model and the default kernels.
    assert report.outputs[0].max_diff <= 1 + 1e-3, str(report)
