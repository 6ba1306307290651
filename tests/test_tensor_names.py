"""Exported files name tensors after the user's layers: short, unique, signature names unchanged,
outputs bit-identical to the converter's file, and no larger than TFLite's post-training int8 file."""

import keras
import numpy as np
import pytest

import kerasq
from kerasq.demo import build_model
from kerasq.export.flatbuffer import litert_schema, read_graph
from kerasq.export.tensor_names import layer_scopes, short_names

KERNELS = ("default", "builtin", "reference")  # XNNPACK, BUILTIN_WITHOUT_DEFAULT_DELEGATES, BUILTIN_REF


@pytest.fixture(scope="module")
def files(digits):
    (x, _), _ = digits
    keras.utils.set_random_seed(0)
    model = build_model()
    qat = kerasq.quantize_model(model)
    qat(x[:256], training=True)  # calibrates the ranges
    return {
        "qat": kerasq.export_tflite(qat),
        "qat_converter": kerasq.export_tflite(qat, tensor_names="converter"),
        "ptq_converter": kerasq.export_tflite(model, representative_data=x[:100], tensor_names="converter"),
        "scopes": layer_scopes(qat),
    }


def test_tensors_are_named_after_their_layers(files):
    names = [t.name for t in read_graph(files["qat"]).tensors]
    assert len(set(names)) == len(names)
    assert max(len(n) for n in names) <= len("block1_conv/kernel")
    assert {"image", "block1_relu", "block1_conv/kernel", "block1_conv/bias", "pool", "gap", "logits/kernel",
            "logits"} <= set(names)
    assert not any(part in n for n in names for part in (";", "quant_", "_1", "digits_cnn"))
    assert ";" in "".join(t.name for t in read_graph(files["qat_converter"]).tensors)


def test_signature_names_and_io_order_are_unchanged(files):
    short, converter = read_graph(files["qat"]), read_graph(files["qat_converter"])
    assert short.signature == converter.signature == {"inputs": {4: "image"}, "outputs": {14: "logits"}}
    assert (short.inputs, short.outputs) == (converter.inputs, converter.outputs)
    tflite = kerasq.TFLiteModel(files["qat"])
    assert (tflite.input_names, tflite.output_names) == (["image"], ["logits"])
    assert [d["name"] for d in tflite.input_details + tflite.output_details] == ["image", "logits"]


@pytest.mark.parametrize("kernels", KERNELS)
def test_outputs_are_bit_identical_to_the_converters_file(files, kernels, digits):
    _, (x_test, _) = digits
    short = kerasq.TFLiteModel(files["qat"], kernels=kernels).predict(x_test, raw=True)
    converter = kerasq.TFLiteModel(files["qat_converter"], kernels=kernels).predict(x_test, raw=True)
    assert short.dtype == np.int8 and np.array_equal(short, converter)


def test_the_int8_file_is_no_larger_than_tflites_post_training_file(files):
    assert len(files["qat"]) <= len(files["ptq_converter"]) < len(files["qat_converter"])


def test_colliding_names_get_a_counter():
    inputs = keras.Input((4,), name="x")
    shared = keras.layers.Dense(3, name="shared", bias_initializer="ones")
    model = keras.Model(inputs, keras.layers.Add(name="add")([shared(inputs), shared(inputs * 2.0)]))
    names = [t.name for t in read_graph(kerasq.export_tflite(model)).tensors]
    assert len(set(names)) == len(names) and {"x", "add", "shared", "shared/kernel", "shared/bias"} <= set(names)
    # The converter folds `* 2.0` into a second kernel; the layer's first output names its op.
    assert {"shared/kernel_1", "shared/fully_connected"} <= set(names)


def test_buffers_after_the_flatbuffer_are_kept(files, digits):
    """Files over 2 GB keep their buffers after the flatbuffer (buffer.offset/size): renaming moves
    them behind the shorter flatbuffer. Built here from a small file with the same layout."""
    _, (x_test, _) = digits
    outside = _buffers_outside(files["qat_converter"])
    assert len(outside) > len(files["qat_converter"])
    renamed = short_names(outside, files["scopes"])
    assert len(renamed) < len(outside)
    graph = read_graph(renamed)
    assert "block1_conv/kernel" in [t.name for t in graph.tensors]
    schema = litert_schema()
    model = schema.Model.GetRootAs(renamed, 0)
    assert any(model.Buffers(i).Offset() > 1 for i in range(model.BuffersLength()))
    expected = kerasq.TFLiteModel(files["qat_converter"], kernels="reference").predict(x_test[:64], raw=True)
    for content in (outside, renamed):
        assert np.array_equal(kerasq.TFLiteModel(content, kernels="reference").predict(x_test[:64], raw=True), expected)


def _buffers_outside(content):
    """`content` with every constant's bytes moved after the flatbuffer, as the converter writes large models."""
    import flatbuffers

    model = litert_schema().ModelT.InitFromPackedBuf(bytearray(content), 0)
    moved = [(b, np.asarray(b.data, np.uint8).tobytes()) for b in model.buffers if b.data is not None and len(b.data)]
    for buffer, data in moved:
        buffer.data, buffer.offset, buffer.size = None, 2, len(data)  # placeholders: same packed size

    def pack():
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())

    position, tail = -(-len(pack()) // 64) * 64, b""
    for buffer, data in moved:
        buffer.offset = position + len(tail)
        tail += data + bytes(-len(data) % 16)
    head = pack()
    return head + bytes(position - len(head)) + tail
