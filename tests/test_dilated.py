"""Dilated convolutions are one int8 op each in the file, as post-training quantization makes them:
no SPACE_TO_BATCH_ND/BATCH_TO_SPACE_ND around a float convolution."""

import keras
import pytest

import kerasq
from kerasq.export.flatbuffer import read_graph

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
LAYERS = {
    "Conv1D": lambda: keras.layers.Conv1D(12, 3, padding="same", dilation_rate=2, use_bias=False),
    "Conv2D": lambda: keras.layers.Conv2D(12, 3, padding="same", dilation_rate=2, use_bias=False),
    "DepthwiseConv1D": lambda: keras.layers.DepthwiseConv1D(3, padding="valid", dilation_rate=2, use_bias=False),
    "DepthwiseConv2D": lambda: keras.layers.DepthwiseConv2D(3, padding="valid", dilation_rate=2, use_bias=False),
    "SeparableConv2D": lambda: keras.layers.SeparableConv2D(12, 3, padding="same", dilation_rate=(2, 1)),
}


@pytest.mark.parametrize("kind", LAYERS)
def test_dilated_convolution_is_one_int8_op_at_the_floor(kind, digits):
    (x, y), (x_test, _) = digits
    if kind.endswith("1D"):
        x, x_test = x.reshape(-1, 8, 8), x_test.reshape(-1, 8, 8)
    keras.utils.set_random_seed(0)
    stem = keras.layers.Conv1D(12, 1, activation="relu") if kind.endswith("1D") else keras.layers.Conv2D(12, 1, activation="relu")
    model = keras.Sequential([
        keras.Input(x.shape[1:]), stem, LAYERS[kind](), keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.Flatten(), keras.layers.Dense(10),
    ])
    model.compile(keras.optimizers.Adam(3e-3), LOSS)
    model.fit(x, y, epochs=4, verbose=0)
    qat = kerasq.quantize_model(model)
    qat.compile(keras.optimizers.Adam(1e-4), LOSS)
    qat.fit(x, y, epochs=1, verbose=0)
    content = kerasq.export_tflite(qat)
    ops = [op.name for op in read_graph(content).ops]
    assert "SPACE_TO_BATCH_ND" not in ops and "BATCH_TO_SPACE_ND" not in ops, ops
    tflite = kerasq.TFLiteModel(content)
    assert tflite.is_fully_integer, tflite.float_tensors
    post_training = kerasq.TFLiteModel(kerasq.export_tflite(model, representative_data=x[:200]))
    assert len(tflite.float_tensors) <= len(post_training.float_tensors)  # never less integer than PTQ
    # Training runs the dilated op through keras.ops, the export trace TensorFlow's own dilated op:
    # the same arithmetic, so the file is at the floor.
    report = kerasq.verify_tflite(qat, tflite, x_test)
    assert report.passed and report.fully_integer and report.as_dict()["float_ops"] == []
