"""Preprocessing inside the model: Rescaling (with an offset) and Normalization run as one int8
DEPTHWISE_CONV_2D in the file, never less integer than post-training quantization makes them."""

import keras
import numpy as np
import pytest

import kerasq
from kerasq.export.flatbuffer import read_graph

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


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
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(hidden)))
    model.compile(keras.optimizers.Adam(3e-3), LOSS)
    model.fit(x, y, epochs=4, verbose=0)
    qat = kerasq.quantize_model(model)
    qat.compile(keras.optimizers.Adam(1e-4), LOSS)
    qat.fit(x, y, epochs=1, verbose=0)
    content = kerasq.export_tflite(qat)
    ops = [op.name for op in read_graph(content).ops]
    assert ops[0] == "DEPTHWISE_CONV_2D" and "MUL" not in ops and "ADD" not in ops, ops
    tflite = kerasq.TFLiteModel(content)
    assert tflite.is_fully_integer
    assert kerasq.verify_tflite(qat, tflite, x_test).passed
    qat.save(tmp_path / "qat.keras")  # the frozen BatchNorm standing in for the layer saves and loads
    loaded = keras.saving.load_model(tmp_path / "qat.keras")
    np.testing.assert_array_equal(loaded.predict(x_test, verbose=0), qat.predict(x_test, verbose=0))
