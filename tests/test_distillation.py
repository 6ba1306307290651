"""Knowledge distillation: kerasq.Distiller on Keras' keras.distillation, into float, int8 (QAT) and
pruned students; the teacher never changes."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import kerasq
from kerasq.demo import build_model

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _teacher(with_batchnorm=True):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(16, 3, padding="same", name="t_conv")(inputs)
    if with_batchnorm:
        x = keras.layers.BatchNormalization(momentum=0.5, name="t_bn")(x)
    x = keras.layers.ReLU(name="t_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="t_gap")(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="t_logits")(x), name="teacher")


def _student(width=4):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(width, 3, padding="same", name="s_conv")(inputs)
    x = keras.layers.ReLU(name="s_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="s_gap")(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="s_logits")(x), name="student")


def _weights(model):
    return [np.array(w) for w in model.weights]


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 8, 8, 1), dtype=np.float32), rng.integers(0, 10, n)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_loss_is_alpha_hard_plus_one_minus_alpha_soft_scaled_by_t_squared(alpha):
    keras.utils.set_random_seed(0)
    teacher, student = _teacher(False), _student()
    x, y = _data(16)
    temperature = 2.5
    distiller = kerasq.Distiller(teacher, student, temperature=temperature, alpha=alpha)
    distiller.compile("adam", loss=LOSS)
    y_pred = student(x)
    got = float(distiller.compute_loss(x, y, y_pred, training=False))

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    t, s = np.asarray(teacher(x)), np.asarray(y_pred)
    hard = float(np.mean(-np.log(softmax(s)[np.arange(len(y)), y])))
    p, q = softmax(t / temperature), softmax(s / temperature)
    soft = float(np.mean(np.sum(p * np.log(p / q), -1))) * temperature**2
    expected = alpha * hard + (1 - alpha) * soft
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_teacher_weights_and_batchnorm_statistics_never_change_while_the_student_trains():
    keras.utils.set_random_seed(0)
    teacher, student = _teacher(), _student()
    x, y = _data()
    # Give the teacher's moving statistics values a batch in training mode would move (momentum 0.5).
    teacher.get_layer("t_bn").moving_mean.assign(np.full(16, 3.0, "float32"))
    teacher_before, student_before = _weights(teacher), _weights(student)
    distiller = kerasq.Distiller(teacher, student, temperature=4.0, alpha=0.2, features=[("t_relu", "s_relu")])
    distiller.compile("adam", loss=LOSS)
    distiller.fit(x, y, epochs=2, batch_size=16, verbose=0)
    for before, after in zip(teacher_before, _weights(teacher)):
        np.testing.assert_array_equal(before, after)  # exact: the teacher is never written
    for before, after in zip(teacher_before, _weights(distiller.teacher)):
        np.testing.assert_array_equal(before, after)  # nor the copy the distiller runs
    assert teacher.trainable and all(layer.trainable for layer in teacher.layers)  # yours stays trainable
    assert any(not np.allclose(b, a) for b, a in zip(student_before, _weights(student)))


def test_feature_distillation_between_different_widths_trains_a_projection():
    keras.utils.set_random_seed(0)
    teacher, student = _teacher(), _student(width=4)
    distiller = kerasq.Distiller(teacher, student, alpha=0.0, features=[("t_relu", "s_relu")], feature_weight=5.0)
    (projection,) = distiller.projections
    assert tuple(projection.kernel.shape) == (4, 16)  # student channels -> teacher channels
    assert any(v is projection.kernel for v in distiller.trainable_variables)
    before = np.array(projection.kernel)
    distiller.compile("adam", loss=LOSS)
    history = distiller.fit(*_data(), epochs=3, batch_size=16, verbose=0).history
    assert not np.allclose(np.array(projection.kernel), before)
    assert history["distillation_loss"][-1] < history["distillation_loss"][0]
    # The student keeps no trace of the projection.
    assert [l.name for l in student.layers] == ["input_layer", "s_conv", "s_relu", "s_gap", "s_logits"] or \
        all("projection" not in l.name for l in student.layers)


def test_keras_files_restore_the_distiller_and_its_projection(tmp_path):
    keras.utils.set_random_seed(0)
    distiller = kerasq.Distiller(_teacher(), _student(), temperature=5.0, alpha=0.4, features=[("t_relu", "s_relu")])
    distiller.compile("adam", loss=LOSS)
    x, y = _data()
    distiller.fit(x, y, epochs=1, batch_size=16, verbose=0)
    path = os.path.join(tmp_path, "distiller.keras")
    distiller.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, kerasq.Distiller)
    assert (loaded.temperature, loaded.alpha, loaded.features) == (5.0, 0.4, [("t_relu", "s_relu")])
    np.testing.assert_allclose(loaded.student.predict(x, verbose=0), distiller.student.predict(x, verbose=0), atol=1e-6)
    np.testing.assert_allclose(np.array(loaded.projections[0].kernel), np.array(distiller.projections[0].kernel))
    loaded.fit(x, y, epochs=1, batch_size=16, verbose=0)  # compiled from the file, as saved


def test_callbacks_and_evaluate_work_as_for_any_model():
    distiller = kerasq.Distiller(_teacher(), _student())
    distiller.compile("adam", loss=LOSS, metrics=["accuracy"])
    x, y = _data()
    stop = keras.callbacks.EarlyStopping(monitor="loss", patience=0)
    history = distiller.fit(x, y, epochs=3, batch_size=16, verbose=0, validation_data=(x, y), callbacks=[stop])
    assert "val_accuracy" in history.history
    results = distiller.evaluate(x, y, verbose=0, return_dict=True)
    assert 0.0 <= results["accuracy"] <= 1.0


def test_distilling_into_a_qat_student_exports_fully_int8(digits):
    keras.utils.set_random_seed(0)
    (x, y), (x_test, y_test) = digits
    x, y = x[:600], y[:600]
    teacher = build_model()
    teacher.compile(keras.optimizers.Adam(3e-3), LOSS)
    teacher.fit(x, y, epochs=4, batch_size=32, verbose=0)
    inputs = keras.Input((8, 8, 1))
    hidden = keras.layers.ReLU(name="s_relu")(keras.layers.Conv2D(8, 3, padding="same", name="s_conv")(inputs))
    hidden = keras.layers.Flatten()(keras.layers.MaxPooling2D()(hidden))
    small = keras.Model(inputs, keras.layers.Dense(10, name="s_logits")(hidden), name="small")
    small.compile(keras.optimizers.Adam(3e-3), LOSS)
    small.fit(x, y, epochs=2, batch_size=32, verbose=0)
    qat = kerasq.quantize_model(small)
    # Feature names as in the float student: seen through the QuantizeWrapper.
    distiller = kerasq.Distiller(teacher, qat, temperature=4.0, alpha=0.2, features=[("block1_relu", "s_relu")])
    distiller.compile(keras.optimizers.Adam(1e-3), loss=LOSS)
    distiller.fit(x, y, epochs=2, batch_size=32, verbose=0)
    tflite = kerasq.TFLiteModel(kerasq.export_tflite(distiller.student))
    assert tflite.is_fully_integer
    report = kerasq.verify_tflite(distiller.student, tflite.content, x_test[:100])
    assert report.passed, report
    # Far above chance (10%): a few epochs on 600 digits reach well over 50% even for this 8-filter
    # student; the margin absorbs CPU-dependent training noise.
    assert np.mean(np.argmax(tflite.predict(x_test), -1) == y_test) > 0.5


def test_distilling_into_a_pruned_student_then_int8():
    keras.utils.set_random_seed(0)
    x, y = _data(64)
    pruned = kerasq.prune_low_magnitude(_student(16), kerasq.ConstantSparsity(0.5, 0))
    distiller = kerasq.Distiller(_teacher(), pruned, alpha=0.5)
    distiller.compile("adam", loss=LOSS)
    # UpdatePruningStep finds the student's pruning wrappers through the distiller.
    distiller.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[kerasq.UpdatePruningStep()])
    plain = kerasq.strip_pruning(distiller.student)
    assert np.mean(np.asarray(plain.get_layer("s_conv").kernel) == 0) == pytest.approx(0.5, abs=0.02)
    qat = kerasq.quantize_model(plain)
    qat_distiller = kerasq.Distiller(_teacher(), qat, alpha=0.5)
    qat_distiller.compile("adam", loss=LOSS)
    qat_distiller.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert kerasq.TFLiteModel(kerasq.export_tflite(qat_distiller.student)).is_fully_integer


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=0), "temperature must be a number > 0 .*got 0"),
        (dict(temperature=-1.5), "got -1.5"),
        (dict(alpha=1.5), "alpha .* must be in \\[0, 1\\].*got 1.5"),
        (dict(alpha=-0.1), "got -0.1"),
        (dict(features=[("t_relu", "missing")]), "student model 'student' has no layer named 'missing'"),
        (dict(features=[("t_relu",)]), "features takes \\(teacher_layer_name, student_layer_name\\) pairs"),
        (dict(features=[("t_gap", "s_relu")]), "the other dimensions must agree"),
    ],
)
def test_bad_arguments_name_the_value_and_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kerasq.Distiller(_teacher(), _student(), **kwargs)


def test_incompatible_outputs_name_both_shapes_and_the_fix():
    student = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(5)], name="student")
    with pytest.raises(ValueError, match="outputs \\(None, 10\\) but student 'student' outputs \\(None, 5\\).*Dense\\(10\\)"):
        kerasq.Distiller(_teacher(), student)


SCRIPT = textwrap.dedent(
    """
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, kerasq
    keras.utils.set_random_seed(0)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        ti = keras.Input((6,))
        teacher = keras.Model(ti, keras.layers.Dense(3)(keras.layers.Dense(12, activation="relu", name="th")(ti)))
        si = keras.Input((6,))
        student = keras.Model(si, keras.layers.Dense(3)(keras.layers.Dense(4, activation="relu", name="sh")(si)))
        distiller = kerasq.Distiller(teacher, student, temperature=3.0, alpha=0.3, features=[("th", "sh")])
        distiller.compile("adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [np.array(w) for w in teacher.weights]
    x = np.random.rand(64, 6).astype("float32"); y = np.random.randint(0, 3, 64)
    history = distiller.fit(x, y, epochs=2, batch_size=16, verbose=0).history
    assert all(np.array_equal(b, np.array(a)) for b, a in zip(before, teacher.weights))
    assert np.isfinite(history["loss"]).all()
    print("REPLICAS", strategy.num_replicas_in_sync)
    """
)


def test_distiller_trains_under_mirrored_strategy_with_two_devices():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REPLICAS 2" in result.stdout
