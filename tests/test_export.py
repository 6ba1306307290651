"""export_tflite on real digits: float, post-training int8 and fake-quant (QAT-like) models."""

import os

import keras
import numpy as np
import pytest

import kerasq
from kerasq.data import load_digits
from fake_quant_layers import FakeQuant, QConv, QDense
from kerasq.export import ExportError, TFLiteModel, export_tflite, verify_tflite




def compile_fit(model, data, epochs=3):
    (x_train, y_train), _ = data
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=epochs, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def float_cnn(digits):
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ],
        name="float_cnn",
    )
    return compile_fit(model, digits)


@pytest.fixture(scope="module")
def qat_cnn(digits):
    keras.utils.set_random_seed(2)
    inputs = keras.Input((8, 8, 1), name="image")
    x = FakeQuant(0.0, 1.0)(inputs)
    x = FakeQuant(0.0, 6.0)(QConv(8)(x))
    x = keras.layers.Flatten()(x)
    outputs = FakeQuant(-16.0, 16.0, name="logits")(QDense(10)(x))
    return compile_fit(keras.Model(inputs, outputs, name="qat_cnn"), digits)


@pytest.fixture(scope="module")
def ptq_bytes(float_cnn, digits):
    (x_train, _), _ = digits
    return export_tflite(float_cnn, representative_data=x_train)


def weights_of(model):
    return [w.copy() for w in model.get_weights()]


# ---- float mode ---------------------------------------------------------------------------------------

def test_float_export_matches_keras(float_cnn, digits):
    _, (x_test, y_test) = digits
    tflite = TFLiteModel(export_tflite(float_cnn))
    assert tflite.input_details[0]["dtype"] == np.float32
    assert list(tflite.input_details[0]["shape_signature"]) == [-1, 8, 8, 1]  # dynamic batch
    np.testing.assert_allclose(tflite.predict(x_test), float_cnn.predict(x_test, verbose=0), atol=1e-5)
    assert not tflite.is_fully_integer


def test_float_export_writes_file_atomically(float_cnn, tmp_path):
    path = tmp_path / "new" / "dir" / "model.tflite"
    content = export_tflite(float_cnn, path)
    assert path.read_bytes() == content
    path.write_bytes(b"old contents")
    export_tflite(float_cnn, str(path))
    assert path.read_bytes() == content
    assert sorted(os.listdir(path.parent)) == ["model.tflite"]  # no temporary files left behind


def test_failed_export_leaves_existing_file_alone(tmp_path):
    path = tmp_path / "model.tflite"
    path.write_bytes(b"previous export")
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda t: keras.ops.erfinv(t * 0.1))(inputs))
    with pytest.raises(ExportError):
        export_tflite(model, path)
    assert path.read_bytes() == b"previous export"
    assert os.listdir(tmp_path) == ["model.tflite"]


# ---- post-training int8 -------------------------------------------------------------------------------

def test_ptq_is_fully_integer_and_accurate(float_cnn, ptq_bytes, digits):
    _, (x_test, y_test) = digits
    tflite = TFLiteModel(ptq_bytes)
    assert tflite.is_fully_integer, tflite.float_tensors
    assert tflite.float_tensors == []
    assert tflite.input_details[0]["dtype"] == np.int8
    assert tflite.output_details[0]["dtype"] == np.int8
    float_accuracy = float(np.mean(float_cnn.predict(x_test, verbose=0).argmax(-1) == y_test))
    assert float_accuracy > 0.7
    assert tflite.evaluate(x_test, y_test) >= float_accuracy - 0.03


def test_ptq_batch_sizes_give_identical_results(ptq_bytes, digits):
    _, (x_test, _) = digits
    tflite = TFLiteModel(ptq_bytes)
    whole = tflite.predict_raw(x_test, batch_size=len(x_test))
    assert whole.dtype == np.int8
    for batch_size in (1, 7):
        np.testing.assert_array_equal(tflite.predict_raw(x_test, batch_size=batch_size), whole)
    np.testing.assert_array_equal(tflite.predict_raw(x_test[:1]), whole[:1])


def test_ptq_accepts_generators_of_x_y_batches(float_cnn, digits):
    (x_train, y_train), _ = digits

    def batches():
        for start in range(0, 96, 32):
            yield x_train[start : start + 32], y_train[start : start + 32]

    tflite = TFLiteModel(export_tflite(float_cnn, representative_data=batches()))
    assert tflite.is_fully_integer


def test_ptq_float_io(float_cnn, digits):
    (x_train, _), (x_test, _) = digits
    content = export_tflite(float_cnn, representative_data=x_train[:50], input_type="float32", output_type=np.float32)
    tflite = TFLiteModel(content)
    assert tflite.input_details[0]["dtype"] == np.float32
    assert tflite.output_details[0]["dtype"] == np.float32
    assert tflite.is_fully_integer  # float only at the edges: QUANTIZE in, DEQUANTIZE out
    assert tflite.ops[0] == "QUANTIZE" and tflite.ops[-1] == "DEQUANTIZE"


# ---- fake-quant (QAT) models --------------------------------------------------------------------------

def test_fake_quant_model_converts_to_int8_without_data(qat_cnn, digits):
    _, (x_test, y_test) = digits
    content = export_tflite(qat_cnn)
    tflite = TFLiteModel(content)
    assert tflite.is_fully_integer, tflite.float_tensors
    assert tflite.input_details[0]["dtype"] == np.int8
    assert tflite.output_quantization[0][0] == pytest.approx(32.0 / 255.0)  # the logits' fake-quant range
    report = verify_tflite(qat_cnn, content, x_test)
    assert report.passed, str(report)
    assert report.outputs[0].max_diff <= 1.0
    assert abs(tflite.evaluate(x_test, y_test) - qat_cnn.evaluate(x_test, y_test, verbose=0)[1]) < 0.01


# ---- inputs and outputs -------------------------------------------------------------------------------

def multi_io_model():
    keras.utils.set_random_seed(3)
    a = keras.Input((6,), name="zeta")  # names sort opposite to the model's order
    b = keras.Input((6,), name="alpha")
    h = keras.layers.Dense(8, activation="relu")(keras.layers.Concatenate()([a, keras.layers.Dense(6)(b)]))
    outputs = [
        keras.layers.Dense(4, name="z_head")(h),
        keras.layers.Dense(3, name="m_head")(h),
        keras.layers.Dense(2, name="a_head")(a - b),
    ]
    return keras.Model([a, b], outputs)


def test_multi_input_multi_output_keeps_order():
    model = multi_io_model()
    x = [np.random.default_rng(0).normal(size=(20, 6)).astype("float32") for _ in range(2)]
    tflite = TFLiteModel(export_tflite(model))
    assert tflite.input_names == ["zeta", "alpha"]
    assert tflite.output_names == ["z_head", "m_head", "a_head"]
    expected = model.predict(x, verbose=0)
    got = tflite.predict(x, batch_size=7)
    assert [g.shape for g in got] == [e.shape for e in expected]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, atol=1e-5)


def test_qat_file_outputs_keep_the_float_model_names():
    model = multi_io_model()
    qat = kerasq.quantize_model(model, skip=["a_head"])  # a float layer, its output quantized after it
    assert TFLiteModel(export_tflite(qat)).output_names == ["z_head", "m_head", "a_head"]


def test_multi_input_ptq_with_tuple_and_generator():
    model = multi_io_model()
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(64, 6)).astype("float32"), rng.normal(size=(64, 6)).astype("float32"))
    tflite = TFLiteModel(export_tflite(model, representative_data=x))
    assert tflite.is_fully_integer
    assert [d["dtype"] for d in tflite.output_details] == [np.int8] * 3
    got = tflite.predict(list(x))
    for g, e in zip(got, model.predict(list(x), verbose=0)):
        assert np.abs(g - e).max() < 0.15 * (np.abs(e).max() + 1)  # int8, so close, not equal

    def gen():
        yield [x[0][:10], x[1][:10]]
        yield [x[0][10:], x[1][10:]]

    assert TFLiteModel(export_tflite(model, representative_data=gen())).is_fully_integer


def test_dict_input_model():
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    model = keras.Model({"a": a, "b": b}, keras.layers.Dense(2)(keras.layers.Concatenate()([a, b])))
    x = {"a": np.ones((4, 3), "float32"), "b": np.full((4, 2), 2.0, "float32")}
    tflite = TFLiteModel(export_tflite(model))
    np.testing.assert_allclose(tflite.predict([x["a"], x["b"]]), model.predict(x, verbose=0), atol=1e-5)


def test_user_model_is_unchanged(float_cnn, qat_cnn, digits):
    (x_train, _), _ = digits
    for model, kwargs in ((float_cnn, {}), (float_cnn, {"representative_data": x_train[:40]}), (qat_cnn, {})):
        before = weights_of(model)
        names = [w.path for w in model.weights]
        export_tflite(model, **kwargs)
        assert [w.path for w in model.weights] == names
        for b, a in zip(before, model.get_weights()):
            np.testing.assert_array_equal(a, b)


def test_export_is_quiet(float_cnn, digits, capfd):
    (x_train, _), _ = digits
    environ = dict(os.environ)
    export_tflite(float_cnn, representative_data=x_train[:20])
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert dict(os.environ) == environ


# ---- errors -------------------------------------------------------------------------------------------

def test_not_a_keras_model():
    with pytest.raises(TypeError, match=r"expects a Keras 3 model.*got an object of type 'dict'"):
        export_tflite({"not": "a model"})


def test_wrong_shape_representative_data(float_cnn):
    with pytest.raises(ValueError, match=r"representative_data.*\(None, 8, 8, 1\).*float32.*got shape \(5, 8, 8\)"):
        export_tflite(float_cnn, representative_data=np.zeros((5, 8, 8), "float32"))
    with pytest.raises(ValueError, match=r"x\[None\]"):
        export_tflite(float_cnn, representative_data=np.zeros((8, 8, 1), "float32"))
    with pytest.raises(ValueError, match=r"got shape \(5, 9, 9, 1\)"):
        export_tflite(float_cnn, representative_data=np.zeros((5, 9, 9, 1), "float32"))


def test_non_finite_or_non_numeric_representative_data(float_cnn):
    bad = np.zeros((5, 8, 8, 1), "float32")
    bad[2, 3, 4, 0] = np.nan
    with pytest.raises(ValueError, match=r"1 NaN and 0 inf.*\(2, 3, 4, 0\)"):
        export_tflite(float_cnn, representative_data=bad)
    bad[2, 3, 4, 0] = np.inf
    with pytest.raises(ValueError, match="0 NaN and 1 inf"):
        export_tflite(float_cnn, representative_data=bad)
    with pytest.raises(ValueError, match="dtype <U"):
        export_tflite(float_cnn, representative_data=np.full((5, 8, 8, 1), "a"))
    with pytest.raises(ValueError, match="empty"):
        export_tflite(float_cnn, representative_data=iter([]))


def test_multi_input_data_errors_name_every_input():
    model = multi_io_model()
    with pytest.raises(ValueError, match=r"2 inputs.*'zeta' with shape \(None, 6\).*'alpha'"):
        export_tflite(model, representative_data=np.zeros((4, 6), "float32"))
    with pytest.raises(ValueError, match="same number of samples"):
        export_tflite(model, representative_data=(np.zeros((4, 6)), np.zeros((3, 6))))


def test_io_type_errors(float_cnn, qat_cnn):
    with pytest.raises(ValueError, match=r"input_type='int16'.*int8 or float32.*scheme='int16x8'"):
        export_tflite(qat_cnn, input_type="int16")
    with pytest.raises(ValueError, match=r"output_type must be one of.*uint8"):
        export_tflite(qat_cnn, output_type="uint8")
    with pytest.raises(ValueError, match="representative_data"):
        export_tflite(float_cnn, input_type="int8")


def test_converter_failure_names_op_and_layer():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(4)(inputs)
    outputs = keras.layers.Lambda(lambda t: keras.ops.erfinv(keras.ops.tanh(t)), name="odd_layer")(hidden)
    with pytest.raises(ExportError, match=r"The op Erfinv \(in layer 'odd_layer'\) is not a TFLite builtin op") as info:
        export_tflite(keras.Model(inputs, outputs))
    message = str(info.value)
    assert len(message.splitlines()) < 6
    assert info.value.__cause__ is not None


def test_ptq_warns_when_ops_stay_float():
    inputs = keras.Input((4,))
    outputs = keras.layers.Lambda(keras.ops.sin, name="sine")(keras.layers.Dense(4)(inputs))
    data = np.random.default_rng(0).random((20, 4)).astype("float32")
    with pytest.warns(UserWarning, match="not fully integer: SIN run in float"):
        content = export_tflite(keras.Model(inputs, outputs), representative_data=data)
    assert not TFLiteModel(content).is_fully_integer


def test_int8_conversion_error_suggests_leaving_the_layer_in_float():
    from kerasq.export.errors import conversion_error

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(keras.layers.Dense(3, name="my_layer")(inputs)))
    message = (
        'loc(fused["Foo:", "functional_1/my_layer_1/Foo@__inference_serve_12"]): '
        "error: Quantization not yet supported for op: 'tfl.foo'"
    )
    error = conversion_error(model, "ptq", RuntimeError(message), log="")
    assert isinstance(error, ExportError)
    text = str(error)
    assert "op foo (in layer 'my_layer') has no int8 support" in text
    assert "quantize_model(model, skip=['my_layer'])" in text and "without representative_data" in text
    assert text.endswith("Converter said: Quantization not yet supported for op: 'tfl.foo'")
    # A QAT export used no calibration data: its advice does not mention any.
    qat_text = str(conversion_error(model, "qat", RuntimeError(message), log=""))
    assert "skip=['my_layer']" in qat_text and "representative_data" not in qat_text


def test_conversion_error_of_a_qat_model_names_the_float_models_layer():
    """The advice is for `quantize_model(float_model, skip=...)`: it names the float model's layer,
    not the wrapper the QAT model holds ('quant_my_layer')."""
    from kerasq.export.errors import conversion_error

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(keras.layers.Dense(3, name="my_layer")(inputs)))
    qat = kerasq.quantize_model(model, quantized_layer_name_prefix="q_")
    message = 'loc(fused["Foo:", "functional_1/q_my_layer_1/Foo@__inference_serve_12"]): error: failed'
    text = str(conversion_error(qat, "qat", RuntimeError(message), log=""))
    assert "layer 'my_layer' has no int8 support" in text and "skip=['my_layer']" in text, text


def test_qat_flatten_and_reshape_export_as_single_reshapes():
    """Not SHAPE/STRIDED_SLICE/PACK computing the batch size at run time, as Keras's own layers do."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(4, 3),
            keras.layers.Reshape((4, -1)),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )
    qat = kerasq.quantize_model(model)
    x = np.random.default_rng(0).uniform(-1, 1, size=(20, 6, 6, 2)).astype("float32")
    qat(x, training=True)
    tflite = TFLiteModel(export_tflite(qat))
    assert set(tflite.ops) == {"CONV_2D", "RESHAPE", "FULLY_CONNECTED"}
    whole = tflite.predict_raw(x, batch_size=len(x))
    np.testing.assert_array_equal(tflite.predict_raw(x, batch_size=7), whole)
    np.testing.assert_allclose(tflite.predict(x), qat.predict(x, verbose=0), atol=1.01 * tflite.output_step(0))


def test_qat_dense_on_sequences_exports_reshape_and_fully_connected():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5, 4))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    qat = kerasq.quantize_model(model)
    x = np.random.default_rng(0).uniform(-1, 1, size=(20, 5, 4)).astype("float32")
    qat(x, training=True)
    tflite = TFLiteModel(export_tflite(qat))
    assert set(tflite.ops) == {"RESHAPE", "FULLY_CONNECTED"}
    np.testing.assert_allclose(tflite.predict(x), qat.predict(x, verbose=0), atol=1.01 * tflite.output_step(0))


@pytest.mark.parametrize("activation, ops", [("hard_sigmoid", {"ADD", "MUL"}), ("swish", {"LOGISTIC", "MUL"})])
def test_qat_composite_activations_export_fully_integer(activation, ops):
    """Activations TFLite runs as several int8 ops, with the rounding between them simulated."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    hidden = keras.layers.Activation(activation)(keras.layers.Dense(8)(inputs))
    qat = kerasq.quantize_model(keras.Model(inputs, keras.layers.Dense(3)(hidden)))
    x = np.random.default_rng(0).uniform(-4, 4, size=(128, 4)).astype("float32")
    qat(x, training=True)
    tflite = TFLiteModel(export_tflite(qat))
    assert tflite.is_fully_integer and set(tflite.ops) == {"FULLY_CONNECTED"} | ops
    report = verify_tflite(qat, tflite, x)
    assert report.passed and report.outputs[0].max_diff <= 1 + 1e-3, str(report)


# ---- explicit modes: float16, dynamic range, and combinations that cannot work --------------------------
def test_float16_mode_matches_keras_within_half_precision_weights(float_cnn, digits):
    _, (x_test, _) = digits
    content = export_tflite(float_cnn, mode="float16")
    tflite = TFLiteModel(content)
    kernels = [w for w in tflite.weights().values() if w.ndim > 1]
    assert kernels and all(w.dtype == np.float16 for w in kernels)
    assert "DEQUANTIZE" in tflite.ops and tflite.input_specs[0].dtype == "float32"
    float32_kernels = [w for w in TFLiteModel(export_tflite(float_cnn, mode="float32")).weights().values() if w.ndim > 1]
    assert sum(w.nbytes for w in kernels) * 2 == sum(w.nbytes for w in float32_kernels)
    ref = float_cnn.predict(x_test, verbose=0)
    out = tflite.predict(x_test)
    # float16 stores each weight with a relative error of at most 2**-11 (about 5e-4) and computes in
    # float32: an output is off by at most 5e-4 times the sum of |weight * input| over its terms, a few
    # times the size of the largest logit in this two-layer net. 1% of the largest logit leaves a
    # margin of several times that bound.
    assert np.abs(out - ref).max() <= 0.01 * np.abs(ref).max()
    assert np.mean(out.argmax(-1) == ref.argmax(-1)) >= 0.99


def test_dynamic_mode_has_int8_weights_and_stays_close_to_keras(float_cnn, digits):
    _, (x_test, _) = digits
    content = export_tflite(float_cnn, mode="dynamic")
    tflite = TFLiteModel(content)
    dense = [w for w in tflite.weights().values() if w.shape == (10, 288)]
    assert [w.dtype for w in dense] == [np.int8]  # the converter keeps tensors under 1,024 values in float
    assert not tflite.is_fully_integer and tflite.input_specs[0].dtype == "float32"
    assert len(content) < 0.5 * len(export_tflite(float_cnn, mode="float32"))
    ref = float_cnn.predict(x_test, verbose=0)
    out = tflite.predict(x_test)
    # Dynamic range: weights rounded to 255 levels per channel (an error up to half a step, 0.4% of the
    # channel's largest weight) and the Dense input quantized to int8 at run time (another 0.4% of
    # its range), each term's error adding up over 288 terms: a few percent of the logit range, so 5%;
    # predictions near a decision boundary may flip, so agreement 97% rather than 99%.
    assert np.abs(out - ref).max() <= 0.05 * np.abs(ref).max()
    assert np.mean(out.argmax(-1) == ref.argmax(-1)) >= 0.97


def test_int8_and_float32_modes_match_the_automatic_choice(float_cnn, qat_cnn, ptq_bytes, digits):
    (x_train, _), _ = digits
    assert export_tflite(float_cnn, mode="int8", representative_data=x_train) == ptq_bytes
    assert export_tflite(qat_cnn, mode="int8") == export_tflite(qat_cnn)
    assert export_tflite(float_cnn, mode="float32") == export_tflite(float_cnn)


@pytest.mark.parametrize(
    "which, kwargs, message",
    [
        ("float", {"mode": "int8"}, "mode='int8' for a float model needs calibration inputs: pass representative_data="),
        ("qat", {"mode": "float32"}, "use mode='int8' (or None), or export the float model"),
        ("qat", {"mode": "float16"}, "this model simulates int8"),
        ("qat", {"mode": "dynamic"}, "this model simulates int8"),
        ("float", {"mode": "dynamic", "representative_data": True}, "takes no representative_data"),
        ("float", {"mode": "float16", "input_type": "int8"}, "takes and returns float32"),
        ("float", {"mode": "fp16"}, "mode must be one of [None, 'int8', 'int16x8', 'float32', 'float16', 'dynamic']"),
    ],
)
def test_mode_errors_name_the_fix(which, kwargs, message, float_cnn, qat_cnn, digits, tmp_path):
    (x_train, _), _ = digits
    if kwargs.get("representative_data") is True:
        kwargs = {**kwargs, "representative_data": x_train[:10]}
    path = tmp_path / "model.tflite"
    with pytest.raises(ValueError) as error:
        export_tflite(float_cnn if which == "float" else qat_cnn, str(path), **kwargs)
    assert message in str(error.value)
    assert not path.exists()
