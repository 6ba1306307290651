"""verify_tflite: figures checked against models whose distance to the file is known."""

import warnings

import keras
import numpy as np
import pytest

import kerasq
from kerasq.data import load_digits
from kerasq.export import ParityReport, TFLiteModel, export_tflite, verify_tflite
from kerasq.export.verify import OutputParity

from fake_quant_layers import FakeQuant, QDense


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def qat_mlp():
    keras.utils.set_random_seed(7)
    inputs = keras.Input((8, 8, 1))
    x = FakeQuant(0.0, 1.0)(keras.layers.Flatten()(inputs))
    x = FakeQuant(0.0, 4.0)(keras.layers.ReLU()(QDense(16, bias_initializer="random_normal")(x)))
    outputs = FakeQuant(-4.0, 4.0, name="logits")(QDense(10, bias_initializer="random_normal")(x))
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def qat_file(qat_mlp):
    return TFLiteModel(export_tflite(qat_mlp))


def shifted(model, shift):
    """`model` with `shift` (an array over the classes) added to its output."""
    inputs = keras.Input(model.inputs[0].shape[1:])
    return keras.Model(inputs, model(inputs) + np.asarray(shift, "float32"))


def test_fake_quant_file_passes_with_floor(qat_mlp, qat_file, digits):
    _, (x_test, _) = digits
    report = verify_tflite(qat_mlp, qat_file, x_test)
    assert isinstance(report, ParityReport) and report.passed and not report.fragile
    [out] = report.outputs
    assert out.unit == "steps" and out.step == pytest.approx(8 / 255)
    assert out.max_diff <= 1.0 and out.agreement >= 0.995
    assert out.floor_agreement is not None and 0.98 <= out.floor_agreement <= 1.0
    assert np.isfinite(out.floor_max_diff) and out.floor_mean_diff <= out.floor_max_diff
    assert report.num_samples == len(x_test)


def test_known_shift_is_measured_in_steps(qat_mlp, qat_file, digits):
    _, (x_test, _) = digits
    step = qat_file.output_quantization[0][0]
    report = verify_tflite(shifted(qat_mlp, np.full(10, 3 * step)), qat_file.content, x_test)
    [out] = report.outputs
    assert out.agreement == 1.0  # a constant shift moves no argmax
    assert out.mean_diff == pytest.approx(3.0, abs=0.02)
    assert 2.0 <= out.max_diff <= 4.0
    assert not out.passed and not report.passed
    assert "FAIL" in str(report)


def test_argmax_agreement_is_the_fraction_of_matching_samples(qat_mlp, qat_file, digits):
    _, (x_test, _) = digits
    perturbed = shifted(qat_mlp, [100.0] + [0.0] * 9)  # Keras now always predicts class 0
    expected = float(np.mean(qat_file.predict(x_test).argmax(-1) == 0))
    assert 0 < expected < 0.5
    [out] = verify_tflite(perturbed, qat_file, x_test).outputs
    assert out.agreement == pytest.approx(expected)
    assert not out.passed


def test_float_file_reports_absolute_differences(digits):
    _, (x_test, _) = digits
    keras.utils.set_random_seed(8)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])
    content = export_tflite(model)
    report = verify_tflite(model, content, x_test, batch_size=100)
    [out] = report.outputs
    assert out.unit == "abs" and out.step is None
    assert out.max_diff < 1e-4 and out.floor_max_diff < 1e-4
    assert report.passed
    assert "abs: float output" in str(report)
    [bad] = verify_tflite(shifted(model, np.full(10, 0.01)), content, x_test).outputs
    assert bad.max_diff == pytest.approx(0.01, rel=1e-2) and not bad.passed


def test_multi_output_report(tmp_path):
    keras.utils.set_random_seed(9)
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    model = keras.Model(inputs, [keras.layers.Dense(3, name="cls")(hidden), keras.layers.Dense(1, name="reg")(hidden)])
    path = tmp_path / "two_heads.tflite"
    x = np.random.default_rng(0).normal(size=(40, 5)).astype("float32")
    export_tflite(model, path, representative_data=x)
    report = verify_tflite(model, str(path), x)
    names = [o.name for o in report.outputs]
    assert names == ["cls", "reg"]
    cls, reg = report.outputs
    assert cls.agreement is not None and reg.agreement is None  # one unit: no class axis
    assert cls.unit == reg.unit == "steps"
    data = report.as_dict()
    assert data["passed"] == report.passed and [o["name"] for o in data["outputs"]] == names
    assert set(data["outputs"][0]) >= {"agreement", "max_diff", "mean_diff", "floor_agreement", "floor_max_diff"}
    text = str(report)
    assert "cls" in text and "reg" in text and "floor" in text


def test_fragile_file_warns_once(qat_mlp, qat_file, digits, monkeypatch):
    _, (x_test, _) = digits
    original = TFLiteModel.predict

    def disagreeing_reference(self, x, batch_size=256, *, raw=False):
        out = original(self, x, batch_size, raw=raw)
        if self.kernels == "reference":
            out = out.copy()
            out[::10] = np.roll(out[::10], 1, axis=-1)  # the reference path changes 10% of the argmaxes
        return out

    monkeypatch.setattr(TFLiteModel, "predict", disagreeing_reference)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = verify_tflite(qat_mlp, qat_file, x_test)
    fragile = [w for w in caught if "numerically fragile" in str(w.message)]
    assert len(fragile) == 1
    assert report.fragile and "numerically fragile on device" in str(report)
    [out] = report.outputs
    assert out.floor_agreement < 0.95 and out.floor_max_diff > 1
    assert out.passed  # judged against the (now lower) floor


def test_report_flags():
    def output(floor_agreement, passed=True):
        return OutputParity("o", (10,), "steps", 0.1, 1.0, 0.0, 0.0, floor_agreement, 0.0, 0.0, passed)

    assert not ParityReport([output(0.996)], 10000, 100).fragile
    assert ParityReport([output(0.99)], 10000, 100).fragile  # 100 of 10,000: clearly above 0.5%
    # The same 1% on 450 samples is 4 or 5 flips: within sampling noise of 0.5%, so not flagged;
    # 2% (9 flips) is.
    assert not ParityReport([output(0.99)], 450, 100).fragile
    assert ParityReport([output(0.98)], 450, 100).fragile
    assert not ParityReport([output(None)], 10, 100).fragile
    assert not ParityReport([output(1.0), output(1.0, passed=False)], 10, 100).passed


def test_mismatched_model_and_bad_inputs(qat_mlp, qat_file, digits):
    _, (x_test, _) = digits
    other = keras.Model(qat_mlp.inputs, [qat_mlp.outputs[0], qat_mlp.outputs[0]])
    with pytest.raises(ValueError, match="2 outputs but the .tflite file has 1"):
        verify_tflite(other, qat_file, x_test)
    with pytest.raises(ValueError, match=r"\(None, 8, 8, 1\)"):
        verify_tflite(qat_mlp, qat_file, x_test[:, :, :, 0])


def test_float_model_against_its_ptq_file_says_what_to_read(digits):
    (x_train, _), (x_test, _) = digits
    keras.utils.set_random_seed(9)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])
    report = verify_tflite(model, export_tflite(model, representative_data=x_train[:200]), x_test)
    assert report.float_reference and "read the agreement" in str(report)
    assert report.as_dict()["float_reference"] is True
    assert report.outputs[0].agreement > 0.9
    qat = kerasq.quantize_model(model)
    qat(x_train[:200], training=True)
    assert not verify_tflite(qat, export_tflite(qat), x_test).float_reference


def test_floor_skips_a_kernel_path_that_cannot_run_the_file(digits):
    """LiteRT's reference kernels have no ELU: the floor comes from the paths that can run the file."""
    _, (x_test, _) = digits
    keras.utils.set_random_seed(10)
    model = keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(8, activation="elu"), keras.layers.Dense(3)]
    )
    content = export_tflite(model)
    with pytest.raises(ValueError):
        TFLiteModel(content, kernels="reference")
    report = verify_tflite(model, content, x_test)
    assert report.passed and report.floor_kernels == ("builtin",)
    assert "floor: default vs builtin kernels" in str(report)
