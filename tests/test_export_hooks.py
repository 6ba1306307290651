"""Export hooks: features tell export about their models; export itself knows no feature.

Every hook here is registered in a `with` block, so it cannot leak into other tests.
"""

import ast
import pathlib

import keras
import numpy as np
import pytest

from kerasq.export import ExportHook, TFLiteModel, export_tflite, register_export_hook, verify_tflite
from kerasq.export import hooks

from fake_quant_layers import FakeQuant, QDense

EXPORT = pathlib.Path(__file__).resolve().parent.parent / "kerasq" / "export"


class Doubled(keras.layers.Wrapper):
    """A stand-in for a feature's training-time wrapper: its layer's output, doubled."""

    def call(self, x):
        return 2.0 * self.layer(x)


class StripDoubled(ExportHook):
    """The feature's hook: the file gets the wrapped layers themselves, its outputs named `output_name`."""

    def __init__(self, output_name):
        self.name = output_name
        self.stripped_outputs = set()
        self.tracings = 0

    def prepare(self, model):
        if not any(isinstance(layer, Doubled) for layer in model.layers):
            return model
        layers = [layer.layer if isinstance(layer, Doubled) else layer for layer in model.layers]
        stripped = keras.Sequential([keras.Input(model.inputs[0].shape[1:])] + layers, name=model.name)
        self.stripped_outputs = {id(tensor) for tensor in stripped.outputs}
        return stripped

    def output_name(self, tensor):
        return self.name if id(tensor) in self.stripped_outputs else None

    def tracing(self):
        self.tracings += 1
        return super().tracing()


def doubled_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="relu"), Doubled(keras.layers.Dense(3, name="head"))])


def test_a_hook_strips_its_wrapper_and_names_the_outputs(tmp_path):
    model = doubled_model()
    x = np.random.default_rng(0).normal(size=(16, 6)).astype("float32")
    hook = StripDoubled(output_name="scores")
    with register_export_hook(hook):
        export_tflite(model, tmp_path / "model.tflite")
    tflite = TFLiteModel(tmp_path / "model.tflite")
    assert tflite.output_names == ["scores"]
    stripped = np.asarray(model(x)) / 2.0  # the file computes the wrapped Dense, not its doubled output
    np.testing.assert_allclose(tflite.predict(x), stripped, rtol=1e-5, atol=1e-5)
    assert hook.tracings == 1


def test_a_registration_lasts_for_its_with_block_only():
    model = doubled_model()
    hook = StripDoubled(output_name="scores")
    before = list(hooks._HOOKS)
    with register_export_hook(hook) as registration:
        assert hooks._HOOKS[-1] is hook
    assert hooks._HOOKS == before
    registration.undo()  # undoing twice is harmless
    assert hooks._HOOKS == before
    tflite = TFLiteModel(export_tflite(model))
    assert tflite.output_names != ["scores"]
    np.testing.assert_allclose(tflite.predict(np.ones((2, 6), "float32")), model(np.ones((2, 6))), rtol=1e-5)


def test_undo_unregisters():
    hook = ExportHook()
    registration = register_export_hook(hook)
    assert hook in hooks._HOOKS
    registration.undo()
    assert hook not in hooks._HOOKS


def test_a_hook_that_says_quantized_makes_verify_judge_by_steps():
    """A model of hand-written fake-quant layers is no feature's: verify reads it as a float reference
    unless a hook says it simulates int8."""

    class FakeQuantFeature(ExportHook):
        def is_quantized(self, model):
            return any(isinstance(layer, FakeQuant) for layer in model.layers)

    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    outputs = FakeQuant(-4.0, 4.0)(QDense(3)(FakeQuant(-3.0, 3.0)(inputs)))
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(0).normal(size=(32, 6)).astype("float32")
    content = export_tflite(model)
    assert verify_tflite(model, content, x).float_reference
    with register_export_hook(FakeQuantFeature()):
        assert not verify_tflite(model, content, x).float_reference


def test_register_rejects_what_is_not_a_hook():
    with pytest.raises(TypeError, match="ExportHook"):
        register_export_hook(lambda model: model)


def test_export_imports_no_feature():
    """Features register hooks with export; export imports only itself and kerasq's input checks."""
    allowed = ("kerasq.export", "kerasq.validation")
    for path in sorted(EXPORT.glob("*.py")):
        for name in _imported_modules(ast.parse(path.read_text(encoding="utf-8"))):
            if name.startswith("kerasq"):
                assert name.startswith(allowed), f"kerasq/export/{path.name} imports {name}"


def _imported_modules(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield from (f"{node.module}.{alias.name}" for alias in node.names)
