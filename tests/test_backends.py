"""Training on the JAX (or PyTorch) backend, exporting through the TensorFlow one: kerasq QAT and
pruning models train under KERAS_BACKEND=jax or torch, save as .keras, and load here (TensorFlow backend) to export
a .tflite file that matches them."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import kerasq
from kerasq.data import load_digits

TRAIN_ON_JAX = textwrap.dedent(
    """
    import json, os, sys
    import keras, numpy as np
    import kerasq
    from kerasq.data import load_digits

    folder = sys.argv[1]
    assert keras.backend.backend() == os.environ["KERAS_BACKEND"]
    keras.utils.set_random_seed(0)
    (x, y), (x_test, _) = load_digits()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(16, 3, padding="same", use_bias=False),
        keras.layers.BatchNormalization(momentum=0.9),
        keras.layers.ReLU(),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ])
    model.compile(keras.optimizers.Adam(3e-3), loss)
    model.fit(x, y, epochs=10, verbose=0)
    float_accuracy = float(np.mean(np.argmax(model.predict(load_digits()[1][0], verbose=0), -1) == load_digits()[1][1]))

    qat = kerasq.quantize_model(model)
    qat.compile(keras.optimizers.Adam(3e-4), loss, metrics=["accuracy"])
    qat.fit(x, y, epochs=1, verbose=0)
    qat.save(os.path.join(folder, "qat.keras"))
    np.save(os.path.join(folder, "qat_predictions.npy"), np.asarray(keras.ops.convert_to_numpy(qat.predict(x_test, verbose=0))))

    lsq_scheme = kerasq.QuantizationScheme(
        weights=kerasq.WeightQuantizer(bits=4, learn_scale=True), activations=kerasq.ActivationQuantizer(learn_range="lsq")
    )
    lsq = kerasq.quantize_model(model, scheme=lsq_scheme, calibration_data=x[:256])
    lsq.compile(keras.optimizers.Adam(1e-3), loss)
    lsq.fit(x, y, epochs=1, verbose=0)
    lsq.save(os.path.join(folder, "lsq.keras"))
    np.save(os.path.join(folder, "lsq_predictions.npy"), np.asarray(keras.ops.convert_to_numpy(lsq.predict(x_test, verbose=0))))

    pruned = kerasq.prune_low_magnitude(model, kerasq.PolynomialDecay(0.0, 0.6, 0, end_step=60, frequency=5))
    pruned.compile(keras.optimizers.Adam(1e-3), loss)
    pruned.fit(x, y, epochs=2, verbose=0, callbacks=[kerasq.UpdatePruningStep()])
    pruned.save(os.path.join(folder, "pruned.keras"))
    sparse_qat = kerasq.quantize_model(kerasq.strip_pruning(pruned), preserve_sparsity=True)
    sparse_qat.compile(keras.optimizers.Adam(1e-3), loss)
    sparse_qat.fit(x, y, epochs=1, verbose=0)
    sparse_qat.save(os.path.join(folder, "sparse_qat.keras"))
    with open(os.path.join(folder, "backend.json"), "w") as f:
        json.dump({"backend": keras.backend.backend(), "float_accuracy": float_accuracy,
                   "qat_accuracy": float(qat.evaluate(*load_digits()[1], verbose=0)[1])}, f)
    """
)


def _installed(module):
    return importlib.util.find_spec(module) is not None


@pytest.fixture(
    scope="module",
    params=[
        "jax",
        # PyTorch is optional (a large download; the test extra brings JAX only). Where it is installed
        # the same checks run on it.
        pytest.param("torch", marks=pytest.mark.skipif(not _installed("torch"), reason="pip install torch to test it")),
    ],
)
def trained(request, tmp_path_factory):
    backend = request.param
    folder = tmp_path_factory.mktemp(backend)
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, "-c", TRAIN_ON_JAX, str(folder)], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return folder


def test_qat_model_trained_exports_and_matches_its_file(trained):
    import keras

    info = json.loads((trained / "backend.json").read_text())
    assert info["backend"] == trained.name.rstrip("0123456789") and info["float_accuracy"] > 0.8
    # QAT on JAX or PyTorch learns as on TensorFlow: within the demo's 1 point of float (4 or 5 test images,
    # more than the CPU-to-CPU noise of a sample or two).
    assert info["qat_accuracy"] >= info["float_accuracy"] - 0.01
    qat = _load(trained / "qat.keras")
    (_, _), (x_test, _) = load_digits()
    # Same weights and ranges on the other backend: the fake-quantized logits agree to float rounding
    # (a value on a rounding edge may land one output step apart).
    here = np.asarray(qat.predict(x_test, verbose=0))
    there = np.load(trained / "qat_predictions.npy")
    assert np.mean(np.argmax(here, -1) == np.argmax(there, -1)) >= 0.99
    tflite = kerasq.TFLiteModel(kerasq.export_tflite(qat))
    assert tflite.is_fully_integer
    report = kerasq.verify_tflite(qat, tflite, x_test)
    assert report.passed, str(report)


def test_learned_steps_trained_export_at_the_floor(trained):
    """LSQ's 4-bit learned weight steps and activation ranges train on the other backend too."""
    lsq = _load(trained / "lsq.keras")
    (_, _), (x_test, y_test) = load_digits()
    here = np.asarray(lsq.predict(x_test, verbose=0))
    assert np.mean(np.argmax(here, -1) == np.argmax(np.load(trained / "lsq_predictions.npy"), -1)) >= 0.99
    assert np.mean(np.argmax(here, -1) == y_test) > 0.8
    tflite = kerasq.TFLiteModel(kerasq.export_tflite(lsq))
    assert tflite.is_fully_integer
    report = kerasq.verify_tflite(lsq, tflite, x_test)
    assert report.passed, str(report)


def test_sparse_qat_model_trained_keeps_its_zeros_in_the_file(trained):
    import keras

    sparse_qat = _load(trained / "sparse_qat.keras")
    kernels = [np.asarray(layer.layer.kernel) for layer in sparse_qat.layers if hasattr(getattr(layer, "layer", None), "kernel")]
    # ConstantSparsity(0.6): every kernel of 100+ weights is 60% zeros, and stays so on JAX.
    assert kernels and all(np.mean(kernel == 0) >= 0.595 for kernel in kernels if kernel.size >= 100)
    tflite = kerasq.TFLiteModel(kerasq.export_tflite(sparse_qat))
    weights = [w for w in tflite.weights().values() if w.dtype == np.int8 and w.size >= 100]
    assert weights and all(np.mean(w == 0) >= 0.595 for w in weights)


def test_pruning_with_fit_on_another_backend_reaches_its_schedule_and_continues_here(trained):
    import keras

    pruned = _load(trained / "pruned.keras")
    layers = kerasq.pruning.pruning_layers(pruned)
    # PolynomialDecay(0 -> 0.6 by step 60) and 2 epochs of 43 batches: the final sparsity, exactly.
    assert layers and all(abs(layer.sparsity() - 0.6) <= 0.005 for layer in layers)
    assert all(int(np.asarray(layer.pruning_step)) >= 60 for layer in layers)
    for layer in layers:
        for name, mask in layer.masks.items():
            np.testing.assert_array_equal(np.asarray(getattr(layer.layer, name)) * (1 - np.asarray(mask)), 0)
    (x, y), _ = load_digits()
    pruned.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    pruned.fit(x[:64], y[:64], verbose=0, callbacks=[kerasq.UpdatePruningStep()])
    assert all(abs(layer.sparsity() - 0.6) <= 0.005 for layer in layers)


def _load(path):
    import keras

    # The training backend's optimizer class is in the compile config (PyTorch's cannot load here):
    # the model itself is all the export needs.
    return keras.models.load_model(path, compile=False)
