"""Sequence layers in a QAT model: GRU, LSTM and Bidirectional are float islands between quantized
layers, unrolled over their known sequence length so the file converts to plain TFLite ops (Keras 3's
while loop needs TensorFlow ops TFLite does not have); MultiHeadAttention runs int8."""

import keras
import pytest

import kerasq

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
RECURRENT = {
    "GRU": lambda: keras.layers.GRU(16),
    "LSTM": lambda: keras.layers.LSTM(16),
    "Bidirectional": lambda: keras.layers.Bidirectional(keras.layers.GRU(8)),
}


@pytest.mark.parametrize("kind", RECURRENT)
def test_keyword_spotting_style_model_exports_with_a_float_island_at_the_floor(kind, digits):
    (x, y), (x_test, y_test) = digits
    x, x_test = x.reshape(-1, 8, 8), x_test.reshape(-1, 8, 8)  # 8 time steps of 8 features
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8)), keras.layers.Conv1D(16, 3, padding="same", activation="relu"),
        RECURRENT[kind](), keras.layers.Dense(10),
    ])
    model.compile(keras.optimizers.Adam(3e-3), LOSS, metrics=["accuracy"])
    model.fit(x, y, epochs=6, verbose=0)
    qat = kerasq.quantize_model(model)  # not refused: the recurrent layer stays float
    assert sum(isinstance(layer, kerasq.QuantizeWrapper) for layer in qat.layers) == 2  # the Conv1D and the Dense
    qat.compile(keras.optimizers.Adam(1e-4), LOSS, metrics=["accuracy"])
    qat.fit(x, y, epochs=1, verbose=0)
    tflite = kerasq.TFLiteModel(kerasq.export_tflite(qat))
    report = kerasq.verify_tflite(qat, tflite, x_test)
    assert report.passed
    assert {"FULLY_CONNECTED", "LOGISTIC", "TANH"} <= {name for name, _ in report.float_ops}  # the gates, in float
    # 6 float epochs reach about 88-91%; the file keeps it within 9 of 450 test images.
    assert tflite.evaluate(x_test, y_test) >= model.evaluate(x_test, y_test, verbose=0)[1] - 0.02


def test_time_distributed_dense_is_quantized_as_the_dense_it_wraps(digits):
    (x, y), (x_test, y_test) = digits
    x, x_test = x.reshape(-1, 8, 8), x_test.reshape(-1, 8, 8)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8)), keras.layers.TimeDistributed(keras.layers.Dense(16, activation="relu")),
        keras.layers.Flatten(), keras.layers.Dense(10),
    ])
    model.compile(keras.optimizers.Adam(3e-3), LOSS, metrics=["accuracy"])
    model.fit(x, y, epochs=6, verbose=0)
    qat = kerasq.quantize_model(model, calibration_data=x)
    wrapped = [type(layer.layer).__name__ for layer in qat.layers if isinstance(layer, kerasq.QuantizeWrapper)]
    assert wrapped == ["Dense", "Flatten", "Dense"]  # the Dense over every time step at once
    qat.compile(keras.optimizers.Adam(1e-4), LOSS)
    qat.fit(x, y, epochs=1, verbose=0)
    tflite = kerasq.TFLiteModel(kerasq.export_tflite(qat))
    report = kerasq.verify_tflite(qat, tflite, x_test)
    assert report.passed and report.fully_integer
    assert tflite.evaluate(x_test, y_test) >= model.evaluate(x_test, y_test, verbose=0)[1] - 0.02


def test_attention_block_exports_fully_int8_at_the_floor(digits):
    (x, y), (x_test, y_test) = digits
    x, x_test = x.reshape(-1, 8, 8), x_test.reshape(-1, 8, 8)  # 8 tokens of 8 features
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8))
    hidden = keras.layers.Dense(16)(inputs)
    attended = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8)(hidden, hidden)
    hidden = keras.layers.LayerNormalization()(keras.layers.Add()([hidden, attended]))
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.GlobalAveragePooling1D()(hidden)))
    model.compile(keras.optimizers.Adam(3e-3), LOSS, metrics=["accuracy"])
    model.fit(x, y, epochs=8, verbose=0)
    qat = kerasq.quantize_model(model, calibration_data=x)
    qat.compile(keras.optimizers.Adam(1e-4), LOSS)
    qat.fit(x, y, epochs=1, verbose=0)
    tflite = kerasq.TFLiteModel(kerasq.export_tflite(qat))
    report = kerasq.verify_tflite(qat, tflite, x_test)
    assert report.passed and report.fully_integer
    assert {"BATCH_MATMUL", "SOFTMAX", "RSQRT"} <= set(tflite.ops)
    assert tflite.evaluate(x_test, y_test) >= model.evaluate(x_test, y_test, verbose=0)[1] - 0.02
