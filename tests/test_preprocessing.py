"""Preprocessing inside the model: Rescaling (with an offset) and Normalization run as one int8
DEPTHWISE_CONV_2D in the file, never less integer than post-training quantization makes them."""

import keras
import numpy as np
import pytest

import kerasq
from kerasq.export.flatbuffer import read_graph

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _trained_qat(model, x, y, float_epochs):
    """`model` trained in float, quantized and fine-tuned for an epoch."""
    model.compile(keras.optimizers.Adam(3e-3), LOSS)
    model.fit(x, y, epochs=float_epochs, verbose=0)
    qat = kerasq.quantize_model(model)
    qat.compile(keras.optimizers.Adam(1e-4), LOSS)
    qat.fit(x, y, epochs=1, verbose=0)
    return qat


def _rescaling(x):
    return keras.layers.Rescaling(1 / 127.5, offset=-1.0)


def _normalization(x):
    layer = keras.layers.Normalization()
    layer.adapt(x)
    return layer


@pytest.mark.parametrize("preprocessing", [_rescaling, _normalization], ids=["Rescaling", "Normalization"])
def test_affine_preprocessing_is_an_int8_op_at_the_floor(preprocessing, digits, tmp_path):
    (x, y), (x_test, _) = digits
    x, x_test = x * 255.0, x_test * 255.0  # pixel values, as a camera gives them
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    hidden = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(preprocessing(x)(inputs))
    qat = _trained_qat(keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(hidden))), x, y, 4)
    content = kerasq.export_tflite(qat)
    ops = [op.name for op in read_graph(content).ops]
    assert ops[0] == "DEPTHWISE_CONV_2D" and "MUL" not in ops and "ADD" not in ops, ops
    tflite = kerasq.TFLiteModel(content)
    assert tflite.is_fully_integer
    assert kerasq.verify_tflite(qat, tflite, x_test).passed
    qat.save(tmp_path / "qat.keras")  # the frozen BatchNorm standing in for the layer saves and loads
    loaded = keras.saving.load_model(tmp_path / "qat.keras")
    np.testing.assert_array_equal(loaded.predict(x_test, verbose=0), qat.predict(x_test, verbose=0))


def test_mobilenet_v3_small_with_its_preprocessing_exports_fully_int8_at_the_floor(digits_32):
    """keras.applications' MobileNetV3Small with include_preprocessing=True (its Rescaling(1/127.5,
    offset=-1) in front) on camera-range pixels: the QAT file is fully integer, as post-training int8
    makes it, and within the floor of its Keras model. benchmarks/applications.py trains it (and
    MobileNetV3Large, EfficientNetB0) to accuracy; this checks the file on a short run."""
    (x, y), (x_test, _) = digits_32
    x = np.repeat(x[:512], 3, axis=-1) * 255.0
    x_test = np.repeat(x_test[:150], 3, axis=-1) * 255.0
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), weights=None, classes=10, include_preprocessing=True,
        classifier_activation=None,
    )
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9  # the default 0.999 leaves the moving statistics at their start on 512 images
    model.compile(keras.optimizers.Adam(3e-3), LOSS)
    model.fit(x, y[:512], epochs=2, batch_size=32, verbose=0)
    qat = kerasq.quantize_model(model, calibration_data=x[:128])
    qat.compile(keras.optimizers.Adam(1e-4), LOSS)
    qat.fit(x, y[:512], epochs=1, batch_size=32, verbose=0)
    tflite = kerasq.TFLiteModel(kerasq.export_tflite(qat))
    assert tflite.is_fully_integer, tflite.float_tensors
    report = kerasq.verify_tflite(qat, tflite, x_test)
    assert report.passed, report


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
def test_resizing_and_center_crop_are_single_int8_ops_at_the_floor(interpolation, digits):
    """Resizing is one int8 RESIZE op and CenterCrop one int8 STRIDED_SLICE: no shape arithmetic in
    the file (post-training int8 of the same model computes the flattened shape at run time)."""
    (x, y), (x_test, _) = digits
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    hidden = keras.layers.Resizing(14, 14, interpolation=interpolation)(inputs)
    hidden = keras.layers.Conv2D(8, 3, activation="relu")(hidden)
    hidden = keras.layers.CenterCrop(8, 8)(hidden)
    qat = _trained_qat(keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(hidden))), x, y, 3)
    content = kerasq.export_tflite(qat)
    resize = "RESIZE_BILINEAR" if interpolation == "bilinear" else "RESIZE_NEAREST_NEIGHBOR"
    assert [op.name for op in read_graph(content).ops] == [
        resize, "CONV_2D", "STRIDED_SLICE", "RESHAPE", "FULLY_CONNECTED"
    ]
    tflite = kerasq.TFLiteModel(content)
    assert tflite.is_fully_integer
    report = kerasq.verify_tflite(qat, tflite, x_test)
    assert report.passed, report


@pytest.mark.parametrize("scale, offset", [(2.0, -1.0), (0.5, 0.25), (2.0, -0.3)])
def test_an_affine_map_exact_on_the_input_grid_rounds_as_the_file_does(scale, offset):
    """Rescaling(2, offset=-1) maps the 256 levels of [0, 1] onto half steps of [-1, 1]: the int32
    bias, which the converter rounds half away from zero in float64, decides every output's
    rounding. The QAT model rounds its bias the same way, so it equals the file on every level."""
    inputs = keras.Input((16, 16, 1))
    model = keras.Model(inputs, keras.layers.Rescaling(scale, offset=offset)(inputs))
    levels = (np.arange(256, dtype="float32") / 255.0).reshape(1, 16, 16, 1)
    qat = kerasq.quantize_model(model, calibration_data=levels)
    tflite = kerasq.TFLiteModel(kerasq.export_tflite(qat))
    expected = qat.predict(levels, verbose=0)
    np.testing.assert_array_equal(np.round(tflite.predict(levels) / tflite.output_step(0)),
                                  np.round(expected / tflite.output_step(0)))
