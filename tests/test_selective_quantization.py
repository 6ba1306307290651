"""Selective quantization: layers left unannotated by `quantize_apply`, or named by `skip=`, compute in
float in the exported file (dequantized before them, quantized after them), the rest int8, and
`verify_tflite` passes with their ops listed as expected float ops."""

import keras
import pytest

import kerasq
from kerasq.export.flatbuffer import read_graph

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def three_layer_model(annotate=kerasq.quantize_annotate_layer):
    """Conv, Dense, Dense; the Conv and the head annotated for quantization, the middle Dense not."""
    inputs = keras.Input((8, 8, 1))
    x = annotate(keras.layers.Conv2D(4, 3, activation="relu", name="conv"))(inputs)
    x = annotate(keras.layers.Flatten(name="flat"))(x)
    x = keras.layers.Dense(16, activation="relu", name="mid")(x)
    return keras.Model(inputs, annotate(keras.layers.Dense(10, name="head"))(x))


def conv_model():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="middle_conv")(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="head")(x))


def op_types(content):
    """[(op name, input dtypes, output dtypes)] of the file's ops, constants included."""
    graph = read_graph(content)
    dtype = {t.index: t.dtype for t in graph.tensors}
    return [
        (op.name, {dtype[i] for i in op.inputs if i >= 0}, {dtype[i] for i in op.outputs}) for op in graph.ops
    ]


def train_export_verify(qat, digits):
    (x, y), (x_test, _) = digits
    keras.utils.set_random_seed(0)
    qat.compile(keras.optimizers.Adam(1e-3), LOSS)
    qat.fit(x, y, epochs=1, batch_size=32, verbose=0)
    with pytest.warns(UserWarning, match="not fully integer"):
        content = kerasq.export_tflite(qat)
    return content, kerasq.verify_tflite(qat, content, x_test)


@pytest.mark.parametrize("how", ["annotate", "skip"])
def test_a_dense_left_in_float_is_float_in_the_file_and_verify_passes(how, digits):
    if how == "annotate":
        qat = kerasq.quantize_apply(three_layer_model())
    else:
        qat = kerasq.quantize_model(three_layer_model(annotate=lambda layer: layer), skip=["mid"])
    content, report = train_export_verify(qat, digits)
    assert [name for name, _, _ in op_types(content)] == [
        "CONV_2D", "RESHAPE", "DEQUANTIZE", "FULLY_CONNECTED", "QUANTIZE", "FULLY_CONNECTED",
    ]
    conv, reshape, _, mid, _, head = op_types(content)
    assert mid == ("FULLY_CONNECTED", {"float32"}, {"float32"})  # float weights and activations
    for op in (conv, reshape, head):
        assert op[2] == {"int8"} and "float32" not in op[1]
    assert report.passed, report
    assert [name for name, _ in report.float_ops] == ["FULLY_CONNECTED"]
    assert report.float_layers == ("mid",) and report.unexpected_float_ops == ()
    assert "left in float (mid)" in str(report)


def test_a_skipped_conv_in_the_middle_is_float_in_the_file_and_verify_passes(digits):
    qat = kerasq.quantize_model(conv_model(), skip=["middle_conv"])
    content, report = train_export_verify(qat, digits)
    convs = [op for op in op_types(content) if op[0] == "CONV_2D"]
    assert convs[0][2] == {"int8"}
    assert convs[1] == ("CONV_2D", {"float32"}, {"float32"})
    assert report.passed, report
    assert report.unexpected_float_ops == () and "middle_conv" in report.float_layers


def test_a_fully_quantized_model_has_no_float_layers(digits):
    qat = kerasq.quantize_model(conv_model())
    (x, _), (x_test, _) = digits
    qat(x[:64], training=True)
    report = kerasq.verify_tflite(qat, kerasq.export_tflite(qat), x_test[:100])
    assert report.passed and report.fully_integer and report.float_layers == ()


def test_unannotated_layers_without_weights_between_quantized_ones_are_float_in_the_file(digits):
    """An unannotated ReLU and Add between annotated layers: the converter gives them their neighbours'
    int8 scales, and export puts them back in float, between DEQUANTIZE and QUANTIZE ops."""
    annotate = kerasq.quantize_annotate_layer
    inputs = keras.Input((8, 8, 1))
    first = annotate(keras.layers.Conv2D(4, 3, padding="same", name="first"))(inputs)
    relu = keras.layers.ReLU(name="re_lu")(first)
    second = annotate(keras.layers.Conv2D(4, 3, padding="same", name="second"))(relu)
    second = annotate(keras.layers.ReLU(name="re_lu_1"))(second)  # quantized, its name one suffix away
    added = keras.layers.Add(name="unannotated_add")([first, second])
    flat = annotate(keras.layers.Flatten(name="flat"))(added)
    qat = kerasq.quantize_apply(keras.Model(inputs, annotate(keras.layers.Dense(10, name="head"))(flat)))
    content, report = train_export_verify(qat, digits)
    assert [name for name, _, _ in op_types(content)] == [
        "CONV_2D", "DEQUANTIZE", "RELU", "QUANTIZE", "CONV_2D",
        "DEQUANTIZE", "DEQUANTIZE", "ADD", "QUANTIZE", "RESHAPE", "FULLY_CONNECTED",
    ]
    ops = op_types(content)
    assert ops[2] == ("RELU", {"float32"}, {"float32"}) and ops[7] == ("ADD", {"float32"}, {"float32"})
    assert ops[4][2] == {"int8"}  # the second conv with its fused (annotated) ReLU stays int8
    assert report.passed, report
    assert sorted(report.float_layers) == ["re_lu", "unannotated_add"] and report.unexpected_float_ops == ()
