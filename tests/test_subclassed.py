"""Subclassed models: quantized through their call() where it can be followed, refused with the way
out where it cannot; and `keras.ops.relu` written in a model fuses as a ReLU layer does."""

import keras
import numpy as np
import pytest

import kerasq

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class DigitsNet(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(16, 3, padding="same", use_bias=False)
        self.bn = keras.layers.BatchNormalization()
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.head = keras.layers.Dense(10)

    def call(self, x, training=None):
        return self.head(self.pool(keras.ops.relu(self.bn(self.conv(x), training=training))))


class BranchesOnValues(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(3)

    def call(self, x):
        if float(keras.ops.convert_to_numpy(keras.ops.sum(x))) > 0:  # a Python branch on tensor values
            return self.dense(x)
        return x


def _train(model, data, epochs, learning_rate=3e-3):
    (x, y), _ = data
    model.compile(keras.optimizers.Adam(learning_rate), LOSS, metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, verbose=0)
    return model


def test_subclassed_model_is_quantized_through_its_call(digits):
    keras.utils.set_random_seed(0)
    model = _train(DigitsNet(), digits, epochs=10)
    before = [np.array(w) for w in model.get_weights()]
    qat = kerasq.quantize_model(model)
    wrapped = {type(layer.layer).__name__ for layer in qat.layers if isinstance(layer, kerasq.QuantizeWrapper)}
    assert {"Conv2D", "Dense"} <= wrapped  # its sublayers, each wrapped (the BatchNorm folded)
    _train(qat, digits, epochs=1, learning_rate=1e-4)
    _, (x_test, y_test) = digits
    tflite = kerasq.TFLiteModel(kerasq.export_tflite(qat))
    assert tflite.is_fully_integer
    assert kerasq.verify_tflite(qat, tflite, x_test).passed
    float_accuracy = model.evaluate(x_test, y_test, verbose=0)[1]
    assert tflite.evaluate(x_test, y_test) >= float_accuracy - 0.02  # 9 of 450 images: QAT's usual band
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))  # the user's model is untouched


def test_a_call_that_cannot_be_followed_says_how_to_make_the_model_functional():
    model = BranchesOnValues()
    model(np.ones((2, 4), "float32"))
    with pytest.raises(TypeError, match="keras.Model\\(inputs, outputs"):
        kerasq.quantize_model(model)


def test_an_unbuilt_subclassed_model_is_asked_to_be_built():
    with pytest.raises(TypeError, match="model.build\\(input_shape\\)"):
        kerasq.quantize_model(DigitsNet())


def test_bare_relu_after_a_conv_fuses_as_the_converter_fuses_it(digits):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.BatchNormalization()(keras.layers.Conv2D(16, 3, padding="same", use_bias=False)(inputs))
    x = keras.ops.relu(x)
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(x)))
    _train(model, digits, epochs=10)
    qat = _train(kerasq.quantize_model(model), digits, epochs=1, learning_rate=1e-4)
    conv = next(layer for layer in qat.layers if isinstance(getattr(layer, "layer", None), keras.layers.Conv2D))
    # No range between the conv and the relu: the file's CONV_2D has the relu fused and one output
    # scale, so a second rounding in the model put it 2 steps from its file.
    assert "pre_activation" not in conv.quantization_ranges()
    _, (x_test, _) = digits
    assert kerasq.verify_tflite(qat, kerasq.TFLiteModel(kerasq.export_tflite(qat)), x_test).passed
