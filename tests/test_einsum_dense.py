"""EinsumDense as one FULLY_CONNECTED, at int8 and 16x8, against the real LiteRT interpreter."""

import keras
import numpy as np
import pytest

import kerasq
from kerasq.export.flatbuffer import read_graph

L = keras.layers
RNG = np.random.default_rng(3)

EQUATIONS = {
    # equation, output shape, bias axes, input shape
    "last axis": ("abc,cd->abd", (6, 24), "d", (6, 16)),
    "into heads": ("abc,cde->abde", (6, 2, 8), "de", (6, 16)),
    "from heads": ("abcd,cde->abe", (6, 12), "e", (6, 2, 8)),
    "bias on one axis": ("abc,cde->abde", (6, 2, 8), "e", (6, 16)),
    "no bias, relu": ("abc,cd->abd", (6, 24), None, (6, 16)),
}


def _model(equation, output_shape, bias_axes, input_shape, **kwargs):
    keras.utils.set_random_seed(0)
    inputs = keras.Input(input_shape)
    x = L.EinsumDense(equation, output_shape=output_shape, bias_axes=bias_axes, name="einsum",
                      bias_initializer="random_normal", **kwargs)(inputs)
    return keras.Model(inputs, L.Dense(4)(L.Flatten()(x)))


@pytest.mark.parametrize("scheme", ["int8", "int16x8"])
@pytest.mark.parametrize("name", list(EQUATIONS))
def test_einsum_dense_is_one_fully_connected_at_the_floor(name, scheme):
    equation, output_shape, bias_axes, input_shape = EQUATIONS[name]
    activation = "relu" if name == "no bias, relu" else None
    model = _model(equation, output_shape, bias_axes, input_shape, activation=activation)
    x = RNG.normal(size=(128,) + input_shape).astype("float32")
    qat = kerasq.quantize_model(model, scheme=scheme, calibration_data=x)
    content = kerasq.export_tflite(qat)
    tflite = kerasq.TFLiteModel(content)
    assert tflite.is_fully_integer
    assert [op.name for op in read_graph(content).ops].count("FULLY_CONNECTED") == 2  # the einsum and the head
    report = kerasq.verify_tflite(qat, tflite, x)
    (output,) = report.outputs
    # At 16x8 both ops' integer arithmetic is mirrored: 0 steps (1e-3 for the float32 dequantization),
    # where LiteRT's kernel paths differ by a step. At int8, within those paths' own disagreement.
    limit = 1e-3 if scheme == "int16x8" else output.floor_max_diff + 1e-3
    assert report.passed and output.max_diff < limit, str(report)


def test_einsum_dense_trains_and_round_trips(tmp_path):
    model = _model("abc,cde->abde", (6, 2, 8), "de", (6, 16))
    x = RNG.normal(size=(64, 6, 16)).astype("float32")
    y = RNG.integers(0, 4, size=64)
    qat = kerasq.quantize_model(model, calibration_data=x)
    qat.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = qat.get_layer("quant_einsum").layer.kernel.numpy().copy()
    qat.fit(x, y, epochs=1, verbose=0)
    assert not np.allclose(before, qat.get_layer("quant_einsum").layer.kernel.numpy())
    qat.save(tmp_path / "qat.keras")
    loaded = keras.models.load_model(tmp_path / "qat.keras")
    np.testing.assert_array_equal(loaded(x, training=False), qat(x, training=False))


def test_an_equation_that_is_no_fully_connected_is_refused_with_the_fix():
    inputs = keras.Input((6, 16))
    x = L.EinsumDense("abc,bd->acd", output_shape=(16, 8), name="mixer")(inputs)
    model = keras.Model(inputs, L.Dense(4)(L.Flatten()(x)))
    with pytest.raises(ValueError, match=r"(?s)'mixer' \(EinsumDense\): its equation 'abc,bd->acd'.*skip=\['mixer'\]"):
        kerasq.quantize_model(model)
    assert kerasq.quantize_model(model, skip=["mixer"]) is not None
