"""kerasq.migrate_legacy and `kerasq migrate`: tf_keras (Keras 2) and tfmot models as Keras 3 kerasq models.

The legacy files, and the legacy models' outputs, are made once per test process by
tests/legacy_fixtures.py in its own process with TF_USE_LEGACY_KERAS=1 (tfmot works only then);
this process never imports tf_keras. The legacy extra (tf_keras, tensorflow-model-optimization) is
part of the test extra, so these tests run, never skip.
"""

import hashlib
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

import kerasq
from kerasq.transfer import LegacyMigrationError, UnmappableLayersError

FIXTURES_SCRIPT = pathlib.Path(__file__).with_name("legacy_fixtures.py")


def _hashes(folder):
    """sha256 of every file under `folder`, by relative path."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def legacy(tmp_path_factory, digits):
    (x_train, y_train), (x_test, _) = digits
    folder = tmp_path_factory.mktemp("legacy")
    np.save(folder / "x_train.npy", x_train)
    np.save(folder / "y_train.npy", y_train)
    np.save(folder / "x_test.npy", x_test)
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, str(FIXTURES_SCRIPT), str(folder)], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, f"legacy fixtures failed:\n{result.stderr[-3000:]}"
    hashes = _hashes(folder)
    yield folder
    assert _hashes(folder) == hashes, "migrating changed the legacy files"


def _outputs(legacy, name):
    return np.load(legacy / f"{name}_outputs.npy")


@pytest.mark.parametrize("source", ["float.h5", "float_savedmodel", "float.keras"])
def test_float_model_matches_the_legacy_outputs(legacy, digits, source):
    _, (x_test, _) = digits
    model = kerasq.migrate_legacy(legacy / source)
    assert isinstance(model, keras.Model)
    assert [type(layer).__name__ for layer in model.layers] == [
        "InputLayer", "Conv2D", "BatchNormalization", "ReLU", "DepthwiseConv2D", "BatchNormalization", "ReLU",
        "MaxPooling2D", "Sequential",
    ]
    assert model.get_layer("head").get_layer("dense").units == 16
    outputs = model.predict(x_test, verbose=0)
    np.testing.assert_allclose(outputs, _outputs(legacy, "float"), rtol=0, atol=1e-5)


def test_sequential_with_input_shape_on_its_first_layer(legacy, digits):
    _, (x_test, _) = digits
    model = kerasq.migrate_legacy(str(legacy / "sequential.h5"))
    assert isinstance(model, keras.Sequential) and model.name == "legacy_sequential"
    assert model.layers[-1].activation.__name__ == "softmax"
    np.testing.assert_allclose(model.predict(x_test, verbose=0), _outputs(legacy, "sequential"), atol=1e-5)


def test_tfmot_qat_model_becomes_a_kerasq_qat_model_with_tfmot_ranges(legacy, digits):
    _, (x_test, _) = digits
    model = kerasq.migrate_legacy(legacy / "qat.h5")
    assert kerasq.is_quantized(model)
    ranges = {layer.name: layer.quantization_ranges() for layer in model.layers if isinstance(layer, kerasq.QuantizeWrapper)}
    # The learned ranges came across: none is kerasq's untrained initial range (-6, 6).
    learned = [r for layer_ranges in ranges.values() for r in layer_ranges.values()]
    assert learned and all(r != (-6.0, 6.0) for r in learned)
    # The Keras simulation agrees with tfmot's own Keras model to one output step.
    step = kerasq.TFLiteModel(kerasq.export_tflite(model)).output_step(0)
    differences = np.abs(model.predict(x_test, verbose=0) - _outputs(legacy, "qat")).max(axis=1) / step
    assert np.mean(differences <= 1.0 + 1e-3) >= 0.99


@pytest.mark.parametrize("io", ["float32", "int8"])
def test_tfmot_qat_model_exports_the_file_tfmot_gives(legacy, digits, io):
    """kerasq's int8 file of the migrated model against tf.lite.TFLiteConverter on tfmot's model."""
    _, (x_test, _) = digits
    model = kerasq.migrate_legacy(legacy / "qat.h5")
    types = dict(input_type="float32", output_type="float32") if io == "float32" else {}
    ours = kerasq.TFLiteModel(kerasq.export_tflite(model, **types))
    theirs = kerasq.TFLiteModel(str(legacy / "qat_tfmot.tflite"))
    assert ours.is_fully_integer and theirs.is_fully_integer
    step = kerasq.TFLiteModel(kerasq.export_tflite(model)).output_step(0)
    differences = np.abs(ours.predict(x_test) - theirs.predict(x_test)).max(axis=1) / step
    within_one_step = np.mean(differences <= 1.0 + 1e-3)
    print(f"{io} I/O: {100 * within_one_step:.2f}% of {len(x_test)} samples within one output step, max {differences.max():.2f} steps")
    assert within_one_step >= 0.99


def test_tfmot_pruned_model_keeps_masks_and_step(legacy, digits):
    _, (x_test, _) = digits
    import h5py

    with h5py.File(legacy / "pruned.h5", "r") as file:  # what tfmot saved: masks and steps per wrapper
        group = file["model_weights"]
        saved = {
            name[len("prune_low_magnitude_"):]: (np.asarray(group[name][name]["mask:0"]), int(np.asarray(group[name][name]["pruning_step:0"])))
            for name in group if "mask:0" in group[name].get(name, {})
        }
    model = kerasq.migrate_legacy(legacy / "pruned.h5")
    wrappers = kerasq.pruning.pruning_layers(model)
    assert sorted(wrapper.layer.name for wrapper in wrappers) == sorted(saved) and len(saved) == 2
    for wrapper in wrappers:
        mask, step = saved[wrapper.layer.name]
        assert isinstance(wrapper.pruning_schedule, kerasq.ConstantSparsity)
        assert wrapper.pruning_schedule.frequency == 5
        np.testing.assert_array_equal(np.asarray(wrapper.masks["kernel"]), mask)
        assert abs(wrapper.sparsity() - 0.5) < 0.02
        assert int(np.asarray(wrapper.pruning_step)) == step > 0
    np.testing.assert_allclose(model.predict(x_test, verbose=0), _outputs(legacy, "pruned"), atol=1e-5)
    plain = kerasq.strip_pruning(model)
    np.testing.assert_allclose(plain.predict(x_test, verbose=0), _outputs(legacy, "pruned"), atol=1e-5)


def test_weights_only_h5_names_the_file_and_the_fix(legacy):
    with pytest.raises(LegacyMigrationError, match=r"weights_only\.h5 holds only weights.*model\.save"):
        kerasq.migrate_legacy(legacy / "weights_only.h5")


def test_saved_model_without_keras_metadata(legacy):
    with pytest.raises(LegacyMigrationError, match=r"not_keras_savedmodel is a SavedModel without Keras metadata"):
        kerasq.migrate_legacy(legacy / "not_keras_savedmodel")


def test_a_file_that_is_not_a_model(legacy, tmp_path):
    with pytest.raises(LegacyMigrationError, match=r"x_test\.npy is not a Keras model file"):
        kerasq.migrate_legacy(legacy / "x_test.npy")
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        kerasq.migrate_legacy(tmp_path / "missing.h5")
    with pytest.raises(LegacyMigrationError, match="not a SavedModel"):
        kerasq.migrate_legacy(tmp_path)


def test_unmappable_layers_are_listed_all_at_once(legacy):
    with pytest.raises(UnmappableLayersError) as raised:
        kerasq.migrate_legacy(legacy / "custom.h5")
    assert [(name, cls) for name, cls, _ in raised.value.layers] == [
        ("times_two", "fixtures>TimesTwo"), ("times_three", "Lambda"), ("plus_one", "fixtures>PlusOne"),
    ]
    message = str(raised.value)
    assert "custom.h5" in message and "register_keras_serializable" in message


def test_custom_layers_given_in_keras_3_are_used(legacy):
    class TimesTwo(keras.layers.Layer):
        def call(self, x):
            return 2.0 * x

    class PlusOne(keras.layers.Layer):
        def call(self, x):
            return x + 1.0

    objects = {"fixtures>TimesTwo": TimesTwo, "fixtures>PlusOne": PlusOne}
    with pytest.raises(UnmappableLayersError) as raised:
        kerasq.migrate_legacy(legacy / "custom.h5", custom_objects=objects)
    assert [name for name, _, _ in raised.value.layers] == ["times_three"]


def test_cli_migrate_writes_a_keras_file_that_loads_with_only_kerasq(legacy, digits, tmp_path):
    _, (x_test, _) = digits
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("TF_USE_LEGACY_KERAS", None)
    target = tmp_path / "qat.keras"
    result = subprocess.run(
        [sys.executable, "-m", "kerasq", "migrate", str(legacy / "qat.h5"), str(target)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "kerasq QAT model" in result.stdout
    np.save(tmp_path / "x.npy", x_test)
    check = (
        "import sys, numpy as np, kerasq, keras\n"
        "assert 'tf_keras' not in sys.modules\n"
        f"model = keras.saving.load_model({str(target)!r})\n"
        "assert kerasq.is_quantized(model)\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, model.predict(np.load({str(tmp_path / 'x.npy')!r}), verbose=0))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    in_process = kerasq.migrate_legacy(legacy / "qat.h5").predict(x_test, verbose=0)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), in_process, atol=1e-6)


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["migrate", "only_one.h5"], 2, "migrate takes OLD.h5 and NEW.keras"),
        (["migrate", "old.h5", "new.h5"], 2, "migrate writes a .keras file"),
        (["migrate", "missing.h5", "new.keras"], 1, "kerasq migrate: error: OLD.h5 missing.h5: no such file or directory"),
    ],
)
def test_cli_migrate_errors(args, code, message, tmp_path, capsys):
    from kerasq import cli

    assert cli.main(["kerasq", *args]) == code
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_cli_migrate_unmappable_layers_is_one_line(legacy, tmp_path, capsys):
    from kerasq import cli

    assert cli.main(["kerasq", "migrate", str(legacy / "custom.h5"), str(tmp_path / "new.keras")]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "times_two" in error and "plus_one" in error
    assert not (tmp_path / "new.keras").exists()


def test_core_kerasq_does_not_import_tf_keras():
    check = "import sys, kerasq, kerasq.transfer.legacy; assert 'tf_keras' not in sys.modules and 'tensorflow_model_optimization' not in sys.modules"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("TF_USE_LEGACY_KERAS", None)
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
