"""Every kind of kerasq model saved as `.keras` loads in a fresh process with only `import kerasq`
and continues training from exactly where it stopped: weights, masks, pruning step, learned ranges,
cluster assignments and the optimizer's state all come back."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import kerasq
from kerasq.data import load_digits

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

CONTINUE_IN_FRESH_PROCESS = textwrap.dedent(
    """
    import sys
    import keras, numpy as np
    import kerasq

    folder, callbacks = sys.argv[1], sys.argv[2] == "prune"
    model = keras.saving.load_model(folder + "/model.keras")
    np.savez(folder + "/loaded.npz", *[np.asarray(v) for v in model.variables])
    x, y = np.load(folder + "/x.npy"), np.load(folder + "/y.npy")
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0,
              callbacks=[kerasq.UpdatePruningStep()] if callbacks else [])
    np.savez(folder + "/continued.npz", *[np.asarray(v) for v in model.variables])
    """
)


def _cnn():
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.ReLU(),
        keras.layers.DepthwiseConv2D(3, padding="same", activation="relu", name="depthwise"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10, name="logits"),
    ])


def _qat(model):
    return kerasq.quantize_model(model)


def _pruned(model):
    return kerasq.prune_low_magnitude(model, kerasq.PolynomialDecay(0.0, 0.7, begin_step=0, end_step=80, frequency=4))


def _clustered(model):
    return kerasq.cluster_weights(model, number_of_clusters=8)


def _sparse_qat(model):
    pruned = kerasq.prune_low_magnitude(model, kerasq.ConstantSparsity(0.5, begin_step=0))
    kerasq.pruning.step(pruned)
    return kerasq.quantize_model(kerasq.strip_pruning(pruned), preserve_sparsity=True)


def _clustered_qat(model):
    clustered = kerasq.strip_clustering(kerasq.cluster_weights(model, number_of_clusters=8))
    return kerasq.quantize_model(clustered, preserve_clusters=True)


KINDS = {"qat": _qat, "pruned": _pruned, "clustered": _clustered, "sparse_qat": _sparse_qat, "clustered_qat": _clustered_qat}


@pytest.mark.parametrize("kind", KINDS)
def test_keras_file_continues_training_in_a_fresh_process(kind, tmp_path):
    keras.utils.set_random_seed(0)
    (x, y), _ = load_digits()
    x, y = x[:320], y[:320]
    float_model = _cnn()
    float_model.compile(keras.optimizers.Adam(3e-3), LOSS)
    float_model.fit(x, y, epochs=2, verbose=0)

    model = KINDS[kind](float_model)
    callbacks = lambda: [kerasq.UpdatePruningStep()] if kind == "pruned" else []  # noqa: E731
    model.compile(keras.optimizers.Adam(1e-3), LOSS)
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0, callbacks=callbacks())
    model.save(tmp_path / "model.keras")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    saved = [np.asarray(v) for v in model.variables]
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0, callbacks=callbacks())
    continued_here = [np.asarray(v) for v in model.variables]

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-c", CONTINUE_IN_FRESH_PROCESS, str(tmp_path), "prune" if kind == "pruned" else "-"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    loaded = np.load(tmp_path / "loaded.npz")
    loaded = [loaded[f"arr_{i}"] for i in range(len(loaded.files))]
    assert len(loaded) == len(saved)
    for before, after in zip(saved, loaded):
        np.testing.assert_array_equal(after, before)  # every variable, bit for bit

    continued = np.load(tmp_path / "continued.npz")
    continued = [continued[f"arr_{i}"] for i in range(len(continued.files))]
    changed = [not np.array_equal(a, b) for a, b in zip(saved, continued_here)]
    assert sum(changed) > len(saved) // 3  # the epoch after loading really trained
    # The same epoch from the same state on the same machine: equal up to float summation order
    # (TensorFlow may reduce in another order in another process), far below one Adam step (1e-3).
    for there, here in zip(continued, continued_here):
        np.testing.assert_allclose(there, here, rtol=1e-4, atol=1e-5)
