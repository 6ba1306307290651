"""16x8 quantization-aware training: 16-bit activations, 8-bit weights, TFLite's 16x8 files."""

import keras
import numpy as np
import pytest

import kerasq
from kerasq.export import ExportError, TFLiteModel, export_tflite, verify_tflite
from kerasq.export.flatbuffer import read_graph
from kerasq.quantization import QuantizationScheme, get_scheme
from kerasq.quantization.quantizers import ActivationQuantizer
from kerasq.quantization.requantization import multiplier_error

L = keras.layers
RNG = np.random.default_rng(16)
BIAS_INPUT = {"CONV_2D": 2, "FULLY_CONNECTED": 2}


def compile_fit(model, data, epochs):
    (x_train, y_train), _ = data
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=epochs, batch_size=32, verbose=0)
    return model


def accuracy(predictions, labels):
    return float(np.mean(np.asarray(predictions).argmax(-1) == labels))


@pytest.fixture(scope="module")
def float_cnn(digits):
    keras.utils.set_random_seed(5)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            L.Conv2D(8, 3, use_bias=False), L.BatchNormalization(), L.ReLU(),
            L.Conv2D(16, 3, use_bias=False), L.BatchNormalization(), L.ReLU(),
            L.Flatten(),
            L.Dense(10),
        ],
        name="float_cnn",
    )
    return compile_fit(model, digits, epochs=8)


@pytest.fixture(scope="module")
def qat_cnn(float_cnn, digits):
    keras.utils.set_random_seed(4)
    return compile_fit(kerasq.quantize_model(float_cnn, scheme="int16x8"), digits, epochs=1)


@pytest.fixture(scope="module")
def qat_file(qat_cnn):
    return export_tflite(qat_cnn)


# ---- the scheme ---------------------------------------------------------------------------------------

def test_named_scheme_has_16_bit_symmetric_activations_and_8_bit_weights():
    scheme = get_scheme("int16x8")
    assert (scheme.activations.bits, scheme.activations.symmetric) == (16, True)
    assert (scheme.weights.bits, scheme.weights.narrow_range) == (8, True)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(scheme))
    assert restored == scheme and restored != get_scheme("int8")


def test_a_dict_of_schemes_is_pointed_to_layer_schemes():
    with pytest.raises(ValueError, match="layer_schemes="):
        get_scheme({"head": "int16x8"})
    with pytest.raises(ValueError, match="Unknown quantization scheme 'int4'") as raised:
        get_scheme("int4")
    assert "layer_schemes" not in str(raised.value)


def test_schemes_tflite_cannot_run_are_refused():
    with pytest.raises(ValueError, match="16-bit symmetric"):
        QuantizationScheme(activations=ActivationQuantizer(bits=16))  # asymmetric: TFLite's int16 has zero point 0
    with pytest.raises(ValueError, match="scheme='int16x8'"):
        QuantizationScheme(activations=ActivationQuantizer(bits=12, symmetric=True))


def test_keras_file_round_trip_computes_the_same(qat_cnn, digits, tmp_path):
    _, (x_test, _) = digits
    path = tmp_path / "qat_16x8.keras"
    qat_cnn.save(path)
    loaded = keras.saving.load_model(path)
    wrappers = [layer for layer in loaded.layers if isinstance(layer, kerasq.QuantizeWrapper)]
    assert all(w.scheme.activations == get_scheme("int16x8").activations for w in wrappers)
    # Bit-exact, so the loaded model also mirrors the 16x8 kernels' requantization (which needs each
    # Conv to find the ReLU that quantizes its output, found again while the graph is rebuilt).
    np.testing.assert_array_equal(loaded.predict(x_test, verbose=0), qat_cnn.predict(x_test, verbose=0))


# ---- the file -------------------------------------------------------------------------------------------

def test_file_has_int16_activations_int8_weights_int64_biases(qat_file):
    graph = read_graph(qat_file)
    assert {op.name for op in graph.ops} >= {"CONV_2D", "FULLY_CONNECTED"}
    written = [graph.tensors[index] for op in graph.ops for index in op.outputs]
    assert {t.dtype for t in written} == {"int16"}
    assert all(t.zero_points.tolist() == [0] for t in written)  # symmetric: TFLite's int16 spec
    for op in graph.ops:
        if op.name in BIAS_INPUT:
            kernel, bias = graph.tensors[op.inputs[1]], graph.tensors[op.inputs[BIAS_INPUT[op.name]]]
            assert (kernel.dtype, bias.dtype) == ("int8", "int64"), op
    tflite = TFLiteModel(qat_file)
    assert (tflite.input_details[0]["dtype"], tflite.output_details[0]["dtype"]) == (np.int16, np.int16)


def test_file_matches_the_qat_model_at_the_floor(qat_cnn, qat_file, digits):
    _, (x_test, _) = digits
    report = verify_tflite(qat_cnn, qat_file, x_test)
    assert report.passed, str(report)
    assert set(report.floor_kernels) == {"reference", "builtin"}  # every kernel path runs 16x8
    (output,) = report.outputs
    # TFLite's int16 kernels agree to the bit (floor 0), so the bound is verify's one output step (plus
    # float32's rounding of outputs 32767 steps wide, a few thousandths of a step).
    assert output.floor_max_diff == 0
    assert output.max_diff <= 1.01 and output.agreement >= 0.995


def test_file_accuracy_within_a_point_of_float(float_cnn, qat_file, digits):
    _, (x_test, y_test) = digits
    float_accuracy = accuracy(float_cnn.predict(x_test, verbose=0), y_test)
    assert float_accuracy > 0.85
    # 16-bit activations round to 1/32767 of each range, 256 times finer than int8: quantization costs
    # nothing measurable, so what is left is the QAT epoch's training noise, which one point (4.5
    # of 450 test digits) bounds with room to spare.
    assert TFLiteModel(qat_file).evaluate(x_test, y_test) >= float_accuracy - 0.01


def test_float32_io_computes_what_int16_io_does(qat_cnn, qat_file, digits):
    _, (x_test, _) = digits
    float_io = TFLiteModel(export_tflite(qat_cnn, input_type="float32", output_type=np.float32))
    assert (float_io.input_details[0]["dtype"], float_io.output_details[0]["dtype"]) == (np.float32, np.float32)
    int16_io = TFLiteModel(qat_file)
    # The same integer graph; only who quantizes the input differs (the file's QUANTIZE op, or
    # TFLiteModel), which can round an input that falls on a tie apart: one output step at most.
    difference = np.abs(float_io.predict(x_test) - int16_io.predict(x_test)).max()
    assert difference <= int16_io.output_step(0) * 1.01


def test_io_types_that_do_not_fit_the_scheme_are_refused(qat_cnn):
    with pytest.raises(ValueError, match=r"input_type='int8'.*int16 or float32.*scheme='int8'"):
        export_tflite(qat_cnn, input_type="int8")
    with pytest.raises(ValueError, match=r"mode='int8'.*16-bit activations.*mode='int16x8'"):
        export_tflite(qat_cnn, mode="int8")
    int8_model = kerasq.quantize_model(keras.Sequential([keras.Input((4,)), L.Dense(2)]))
    with pytest.raises(ValueError, match=r"output_type='int16'.*int8 or float32.*scheme='int16x8'"):
        export_tflite(int8_model, output_type="int16")


# ---- fixed ranges, mixing, and what the converter gets wrong ---------------------------------------------

def test_softmax_and_sigmoid_outputs_take_tflites_int16_scale():
    inputs = keras.Input((6,))
    hidden = L.Dense(8, activation="relu")(inputs)
    model = keras.Model(inputs, [L.Dense(4, activation="softmax")(hidden), L.Dense(3, activation="sigmoid")(hidden)])
    qat = kerasq.quantize_model(model, scheme="int16x8")
    x = RNG.normal(size=(64, 6)).astype("float32")
    qat(x, training=True)
    heads = [layer for layer in qat.layers if isinstance(layer, kerasq.QuantizeWrapper) and layer.layer.units < 8]
    assert len(heads) == 2
    for wrapper in heads:
        assert wrapper.quantization_ranges()["output"] == pytest.approx((-32767 / 32768, 32767 / 32768))
    content = export_tflite(qat)
    graph = read_graph(content)
    for op in graph.ops:
        if op.name in ("SOFTMAX", "LOGISTIC"):
            output = graph.tensors[op.outputs[0]]
            assert (output.scales.tolist(), output.zero_points.tolist()) == ([1 / 32768], [0]), op.name
    assert verify_tflite(qat, content, x).passed  # LiteRT loads the LOGISTIC and computes as Keras does


def _mixed_cnn():
    """An int8 CNN whose middle conv is annotated 16x8 (quantize_apply's path)."""
    inputs = keras.Input((8, 8, 1))
    hidden = kerasq.quantize_annotate_layer(L.Conv2D(8, 3, activation="relu"))(inputs)
    hidden = kerasq.quantize_annotate_layer(L.Conv2D(8, 3, activation="relu", name="wide"), scheme="int16x8")(hidden)
    outputs = kerasq.quantize_annotate_layer(L.Dense(10))(kerasq.quantize_annotate_layer(L.Flatten())(hidden))
    return kerasq.quantize_apply(keras.Model(inputs, outputs))


def _tensor_types(content):
    graph = read_graph(content)
    return [(op.name, [graph.tensors[i].dtype for i in op.inputs if i >= 0][:1], graph.tensors[op.outputs[0]].dtype)
            for op in graph.ops]


def test_int8_and_16x8_layers_in_one_file(digits, tmp_path):
    """A 16x8 layer in an int8 model reads its input through a QUANTIZE to int16 and hands its output
    back through a QUANTIZE to int8: LiteRT runs the file on every kernel path, fully integer, with
    int8 inputs and outputs, at the floor. The QAT model quantizes again where the file does, with
    the QUANTIZE kernel's fixed-point arithmetic."""
    (x, y), (x_test, _) = digits
    keras.utils.set_random_seed(0)
    qat = _mixed_cnn()
    qat.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(x[:640], y[:640], epochs=2, verbose=0)
    content = export_tflite(qat)
    types = _tensor_types(content)
    assert ("QUANTIZE", ["int8"], "int16") in types and ("QUANTIZE", ["int16"], "int8") in types, types
    assert ("CONV_2D", ["int16"], "int16") in types and ("CONV_2D", ["int8"], "int8") in types, types
    assert "MINIMUM" not in [name for name, _, _ in types]  # the guard is gone
    tflite = TFLiteModel(content)
    assert tflite.is_fully_integer and tflite.input_details[0]["dtype"] == np.int8
    assert tflite.output_details[0]["dtype"] == np.int8
    report = verify_tflite(qat, tflite, x_test)
    assert report.passed, str(report)
    qat.save(tmp_path / "mixed.keras")  # the requantizing Quantize layers save and load
    loaded = keras.saving.load_model(tmp_path / "mixed.keras")
    np.testing.assert_array_equal(loaded.predict(x_test, verbose=0), qat.predict(x_test, verbose=0))


def test_a_16x8_softmax_between_int8_layers():
    """layer_schemes= puts a Dense and its softmax at 16x8 in an int8 model; a 16x8 output layer makes
    the file's output int16."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 8))
    hidden = L.Softmax(name="weights")(L.Dense(8, name="scores")(L.Dense(8)(inputs)))
    model = keras.Model(inputs, L.Dense(4, name="head")(L.Flatten()(hidden)))
    x = RNG.normal(size=(256, 6, 8)).astype("float32")
    qat = kerasq.quantize_model(model, calibration_data=x, layer_schemes={"scores": "int16x8", "weights": "int16x8"})
    types = _tensor_types(export_tflite(qat))
    assert ("SOFTMAX", ["int16"], "int16") in types and ("FULLY_CONNECTED", ["int8"], "int8") in types, types
    assert verify_tflite(qat, export_tflite(qat), x).passed
    wide_head = kerasq.quantize_model(model, calibration_data=x, layer_schemes={"head": "int16x8"})
    tflite = TFLiteModel(export_tflite(wide_head))
    assert tflite.input_details[0]["dtype"] == np.int8 and tflite.output_details[0]["dtype"] == np.int16


def test_an_int8_layer_in_a_16x8_model(digits):
    """The other way round: a 16x8 model with one int8 conv takes and returns int16, fully integer,
    at the floor."""
    (x, _), (x_test, _) = digits
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(8, 3, activation="relu"),
                              L.Conv2D(8, 3, activation="relu", name="narrow"), L.Flatten(), L.Dense(10)])
    qat = kerasq.quantize_model(model, scheme="int16x8", layer_schemes={"narrow": "int8"}, calibration_data=x[:256])
    content = export_tflite(qat)
    types = _tensor_types(content)
    assert ("CONV_2D", ["int8"], "int8") in types and ("CONV_2D", ["int16"], "int16") in types, types
    tflite = TFLiteModel(content)
    assert tflite.is_fully_integer and tflite.input_details[0]["dtype"] == tflite.output_details[0]["dtype"] == np.int16
    assert verify_tflite(qat, tflite, x_test).passed


def test_silu_inside_a_16x8_layer_is_refused_with_the_fix():
    model = keras.Sequential([keras.Input((6,)), L.Dense(8, activation="silu", name="gated"), L.Dense(3)])
    qat = kerasq.quantize_model(model, scheme="int16x8")
    qat(RNG.normal(size=(16, 6)).astype("float32"), training=True)
    with pytest.raises(ExportError, match=r"both 16 and 8 bits inside \['gated'\].*SiLU"):
        export_tflite(qat)


def test_a_bias_the_converter_clips_is_named():
    dense = L.Dense(2, name="tiny_weights")
    model = keras.Sequential([keras.Input((4,)), dense])
    # Inputs in [0, 1) and weights of 1e-4 make a bias step of 1/32767 x 1e-4/127: a bias of 5 is 2e11
    # steps, past int32's 2^31.
    dense.kernel.assign(np.full((4, 2), 1e-4, "float32"))
    dense.bias.assign(np.array([0.01, 5.0], "float32"))
    qat = kerasq.quantize_model(model, scheme="int16x8")
    qat(RNG.uniform(size=(16, 4)).astype("float32"), training=True)
    with pytest.raises(ExportError, match=r"clipped the bias of '.*tiny_weights.*' to int32"):
        export_tflite(qat)


def test_post_training_16x8_from_a_float_model(float_cnn, digits):
    (x_train, _), (x_test, y_test) = digits
    content = export_tflite(float_cnn, mode="int16x8", representative_data=x_train)
    graph = read_graph(content)
    assert {graph.tensors[i].dtype for op in graph.ops for i in op.outputs if op.name == "CONV_2D"} == {"int16"}
    # Calibrated on 300 training digits, the same 16-bit rounding as above: within a point of float.
    float_accuracy = accuracy(float_cnn.predict(x_test, verbose=0), y_test)
    assert TFLiteModel(content).evaluate(x_test, y_test) >= float_accuracy - 0.01


# ---- the requantization the QAT model mirrors ---------------------------------------------------------------

def litert_16x8_multiplier(multiplier):
    """LiteRT's QuantizeMultiplier then its 16x8 kernels' reduction to 15 bits, in integers."""
    mantissa, exponent = np.frexp(np.asarray(multiplier, np.float64))
    q31 = np.floor(mantissa * 2.0**31 + 0.5).astype(np.int64)
    exponent, q31 = np.where(q31 == 2**31, exponent + 1, exponent), np.where(q31 == 2**31, 2**30, q31)
    reduced = np.where(q31 < 0x7FFF0000, (q31 + 2**15) >> 16, 0x7FFF)
    return reduced * 2.0 ** (exponent.astype(np.float64) - 15)


def test_multiplier_error_is_litert_s_15_bit_rounding():
    multipliers = np.exp(RNG.uniform(np.log(1e-6), np.log(0.99), size=20000)).astype(np.float32)
    cap = np.float32(1 - 2.0**-17)  # rounds up to 2^15 unless capped at 2^15 - 1, as LiteRT caps it
    multipliers = np.concatenate([multipliers, [cap, np.float32(0.5), np.float32(0.75)]])
    ours = np.asarray(multiplier_error(multipliers), np.float64) * multipliers
    # A float32 mantissa has 24 bits, so LiteRT's first rounding (to 31 bits) is exact and both round once.
    np.testing.assert_allclose(ours, litert_16x8_multiplier(multipliers), rtol=1e-6, atol=0)
    assert np.abs(ours / multipliers - 1).max() <= 2.0**-15


def _steps_from_file(qat, x):
    """|QAT model - its default-kernel file| in output steps, both run on `x` as the file's int16
    input levels (-32768 to 32767: the narrow symmetric range and the step below it, which int16
    kernels write when they saturate)."""
    tflite = TFLiteModel(export_tflite(qat))
    (in_scale, in_zero), (out_scale, out_zero) = tflite.input_quantization[0], tflite.output_quantization[0]
    levels = np.clip(np.round(x / in_scale) + in_zero, -32768, 32767).astype("int16")
    on_grid = (levels.astype("float32") - in_zero) * np.float32(in_scale)
    simulated = np.round(np.asarray(qat(on_grid, training=False)) / out_scale) + out_zero
    return np.abs(simulated - tflite.predict(levels, raw=True))


@pytest.mark.parametrize("kind", ["conv", "depthwise", "pooled_dense"])
def test_a_deep_conv_chain_equals_the_file_to_the_step(kind, digits):
    """At inference a 16x8 conv's or Dense's output comes from its exact int64 accumulator (summed
    in float64) scaled as LiteRT's default kernels scale it (the 15-bit multiplier for
    convolutions, the 31-bit one rounded twice, ties up, for FULLY_CONNECTED), and an int16 MEAN
    from the exact sum with the 31-bit multiplier rounded twice. Summed in float32, hundreds of
    products of 16-bit values had rounded 0.05-0.2% of each layer's outputs a step away, 2-3 steps
    after six layers; now every output of the conv chains equals the file's."""
    _, (x_test, _) = digits
    keras.utils.set_random_seed(3)
    layers = [keras.Input((8, 8, 1)), L.Conv2D(16, 3, padding="same", activation="relu")]
    for _ in range(5):
        layers.append(L.DepthwiseConv2D(3, padding="same") if kind == "depthwise" else L.Conv2D(16, 3, padding="same"))
        layers += [L.BatchNormalization(), L.ReLU()]
    layers += [L.GlobalAveragePooling2D(), L.Dense(10)] if kind == "pooled_dense" else [L.Flatten()]
    qat = kerasq.quantize_model(keras.Sequential(layers), scheme="int16x8", calibration_data=x_test[:256])
    difference = _steps_from_file(qat, x_test)
    assert difference.max() == 0, (difference.max(), np.mean(difference > 0))


@pytest.mark.parametrize("depth, spread", [(3, 0.2), (10, 5.0)])
def test_int16_softmax_mirrors_the_kernel(depth, spread):
    """The QAT model computes a 16x8 SOFTMAX with LiteRT's tables and fixed-point steps, to the
    bit (the kernel is integer arithmetic on every path)."""
    inputs = keras.Input((depth,))
    model = keras.Model(inputs, L.Softmax()(inputs))
    x = (RNG.normal(size=(2000, depth)) * spread).astype("float32")
    qat = kerasq.quantize_model(model, scheme="int16x8", calibration_data=x)
    assert _steps_from_file(qat, x).max() == 0


@pytest.mark.parametrize("bias", ["zeros", "random_normal", "shared"])
def test_a_16x8_dense_equals_the_file_to_the_step(bias):
    """LiteRT's 16x8 FULLY_CONNECTED has two kernels: with a bias tensor it requantizes in float64
    (on every path); without one (the converter drops a bias of zeros) the default path runs ruy's
    31-bit fixed-point multiplier, rounded twice, which differs by a step on about 0.2% of outputs.
    "shared": one Dense called twice, which the file holds with a scale per output channel. Inputs
    beyond the calibrated range saturate the int16 outputs at -32768, a step below the narrow range
    the fake-quant op stops at."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((24,))
    if bias == "shared":
        square = L.Dense(24, bias_initializer="random_normal")
        outputs = L.Dense(10)(square(square(inputs)))
    else:
        first = L.Dense(24, bias_initializer=bias)(inputs)
        outputs = L.Dense(10, bias_initializer=bias)(first)
    model = keras.Model(inputs, outputs)
    x = RNG.normal(size=(512, 24)).astype("float32")
    qat = kerasq.quantize_model(model, scheme="int16x8", calibration_data=x)
    difference = _steps_from_file(qat, 1.5 * x)
    assert difference.max() == 0, (difference.max(), np.mean(difference > 0))


def test_float_inputs_are_quantized_as_the_files_quantize_op_does():
    """A 16x8 file with float inputs starts with QUANTIZE (x times the scale's float32 reciprocal,
    rounded half to even, on the default path); the fake-quant op's float32 arithmetic is up to
    0.004 of a step off that, which had put 0.4-0.6% of a conv's outputs a step from the file's. At
    inference the QAT model quantizes as the file does, and TFLiteModel quantizes int16 inputs the
    same way."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((8, 8, 3))
    outputs = L.Flatten()(L.MaxPooling2D(2)(L.Conv2D(8, 3, padding="same")(inputs)))
    x = RNG.normal(size=(256, 8, 8, 3)).astype("float32")
    qat = kerasq.quantize_model(keras.Model(inputs, outputs), scheme="int16x8", calibration_data=x)
    for input_type in ("float32", "int16"):
        tflite = TFLiteModel(export_tflite(qat, input_type=input_type, output_type="int16"))
        steps = np.abs(np.round(np.asarray(qat(x, training=False)) / tflite.output_quantization[0][0])
                       - tflite.predict(x, raw=True))
        assert steps.max() == 0, (input_type, steps.max(), np.mean(steps > 0))


@pytest.mark.parametrize("join", ["Multiply", "Add"])
def test_a_16x8_multiply_or_add_equals_the_file_to_the_step(join):
    """int16 MUL: the product of the two input levels scaled by LiteRT's 31-bit multiplier (its
    scales multiplied and divided in float32), rounded twice. int16 ADD on the default path: each
    input shifted left by 15 plus its multiplier's exponent and scaled once, the sum scaled and
    rounded twice (the reference kernel shifts in two steps, a step apart on a few outputs in a
    hundred thousand: the floor). In float32, 0.1-0.2% of the outputs had landed a step off."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((8, 8, 3))
    first, second = L.Conv2D(8, 3, padding="same")(inputs), L.Conv2D(8, 1)(inputs)
    model = keras.Model(inputs, L.Flatten()(getattr(L, join)()([first, second])))
    x = RNG.normal(size=(256, 8, 8, 3)).astype("float32")
    qat = kerasq.quantize_model(model, scheme="int16x8", calibration_data=x)
    difference = _steps_from_file(qat, x)
    assert difference.max() == 0, (difference.max(), np.mean(difference > 0))


@pytest.mark.parametrize("kind", ["plain", "causal", "attention_axes_masked", "cross"])
def test_16x8_attention_equals_the_file_to_the_step(kind):
    """MultiHeadAttention at 16x8: projections as 16x8 FULLY_CONNECTED, int16 BATCH_MATMULs (exact
    sums, the 15-bit multiplier), the int16 SOFTMAX, a masked score at the scores' lowest level; in
    float the file was 4 steps away on random inputs (its kernel paths 2 from each other)."""
    keras.utils.set_random_seed(1)
    if kind == "attention_axes_masked":
        inputs = keras.Input((4, 5, 8))
        mask = np.tril(np.ones((5, 5), bool))
        attended = L.MultiHeadAttention(2, 4, attention_axes=(2,))(inputs, inputs, attention_mask=mask)
        x = RNG.normal(size=(256, 4, 5, 8)).astype("float32")
    elif kind == "cross":  # the context is a second input, with a range of its own
        query, context = keras.Input((6, 16)), keras.Input((5, 16))
        flat = L.Flatten()(L.MultiHeadAttention(2, 8)(query, L.Dense(16)(context)))
        x = RNG.normal(size=(256, 6, 16)).astype("float32")
        context_x = 3.0 * RNG.normal(size=(256, 5, 16)).astype("float32")
        qat = kerasq.quantize_model(keras.Model([query, context], flat), scheme="int16x8",
                                    calibration_data=[x, context_x])
        report = verify_tflite(qat, export_tflite(qat), [x, context_x])
        assert report.outputs[0].max_diff == 0, str(report)
        return
    else:
        inputs = keras.Input((6, 16))
        attended = L.MultiHeadAttention(2, 8)(inputs, inputs, use_causal_mask=kind == "causal")
        x = RNG.normal(size=(256, 6, 16)).astype("float32")
    model = keras.Model(inputs, L.Flatten()(attended))
    qat = kerasq.quantize_model(model, scheme="int16x8", calibration_data=x)
    difference = _steps_from_file(qat, x)
    assert difference.max() == 0, (difference.max(), np.mean(difference > 0))


def test_an_embedding_in_a_16x8_model_gathers_int8_rows():
    """TFLite has no 16x8 GATHER from an 8-bit table: the embedding keeps 8-bit activations and a
    QUANTIZE takes its rows to int16, which holds them exactly."""
    keras.utils.set_random_seed(0)
    tokens = RNG.integers(0, 17, size=(256, 12)).astype("int32")
    inputs = keras.Input((12,), dtype="int32")
    pooled = L.GlobalAveragePooling1D()(L.Embedding(17, 8)(inputs))
    qat = kerasq.quantize_model(keras.Model(inputs, L.Dense(4)(pooled)), scheme="int16x8", calibration_data=tokens)
    content = export_tflite(qat)
    types = [(name, output) for name, _, output in _tensor_types(content)]
    assert ("GATHER", "int8") in types and ("QUANTIZE", "int16") in types and ("MEAN", "int16") in types, types
    report = verify_tflite(qat, TFLiteModel(content), tokens)
    assert report.passed and report.outputs[0].max_diff == 0, str(report)


def test_a_16x8_mean_over_a_count_not_a_power_of_two_equals_the_file():
    """int16 MEAN divides its 31-bit multiplier by the count in integers; dividing the real
    multiplier instead put 7% of a 12-value mean a step off (a power-of-two count hides it)."""
    keras.utils.set_random_seed(2)
    inputs = keras.Input((3, 4, 3))
    pooled = L.GlobalAveragePooling2D()(L.Conv2D(8, 3, padding="same")(inputs))
    x = RNG.normal(size=(256, 3, 4, 3)).astype("float32")
    qat = kerasq.quantize_model(keras.Model(inputs, pooled), scheme="int16x8", calibration_data=x)
    difference = _steps_from_file(qat, x)
    assert difference.max() == 0, (difference.max(), np.mean(difference > 0))


def test_16x8_gated_attention_is_at_the_floor():
    """A gate is FULLY_CONNECTED, LOGISTIC and MUL; LiteRT's int16 LOGISTIC interpolates in a table of
    its own, which the QAT model does not reproduce (it rounds the exact sigmoid), so the bound is
    the kernel paths' own disagreement: in float the whole layer had been a step beyond it."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((6, 16))
    model = keras.Model(inputs, L.Flatten()(L.MultiHeadAttention(2, 8, use_gate=True)(inputs, inputs)))
    x = RNG.normal(size=(256, 6, 16)).astype("float32")
    qat = kerasq.quantize_model(model, scheme="int16x8", calibration_data=x)
    report = verify_tflite(qat, export_tflite(qat), x)
    (output,) = report.outputs
    assert report.passed and output.max_diff <= output.floor_max_diff + 1e-3, str(report)

