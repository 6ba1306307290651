"""QAT, pruned and clustered models keep every variable through `tf.train.Checkpoint` (and
`CheckpointManager`) and through `save_weights`/`load_weights`: ranges, range counters, BatchNorm
step counts, masks, pruning steps, centroids and assignments included."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasq

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow checkpoints")

RNG = np.random.default_rng(0)
X = RNG.uniform(0, 1, size=(16, 6, 6, 1)).astype("float32")
Y = RNG.integers(0, 3, size=16)


def _float_net(shared_dense):
    """Conv-BN-ReLU, then a Dense called twice when `shared_dense`, then the logits."""
    inputs = keras.Input((6, 6, 1))
    x = keras.layers.Conv2D(4, 3, use_bias=False, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    if shared_dense:
        shared = keras.layers.Dense(4, name="shared")
        x = shared(keras.layers.ReLU(name="between")(shared(x)))
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(x), name="net")


def _qat(seed):
    keras.utils.set_random_seed(seed)
    # A step count makes the folded BatchNorm keep one more variable: its step counter.
    return kerasq.quantize_model(_float_net(shared_dense=True), kerasq.QuantizationScheme(freeze_batchnorm=5))


def _pruned(seed):
    keras.utils.set_random_seed(seed)
    return kerasq.prune_low_magnitude(_float_net(shared_dense=False), kerasq.ConstantSparsity(0.5, begin_step=0))


def _clustered(seed):
    keras.utils.set_random_seed(seed)
    return kerasq.cluster_weights(_float_net(shared_dense=False), number_of_clusters=4, preserve_sparsity=True)


MAKERS = {"qat": _qat, "pruned": _pruned, "clustered": _clustered}


def _compiled(model):
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.optimizer.build(model.trainable_variables)
    return model


def _state(model):
    """The model's variables and its optimizer's."""
    return model.variables + model.optimizer.variables


def _trained(kind):
    model = _compiled(MAKERS[kind](seed=1))
    callbacks = [kerasq.UpdatePruningStep()] if kind == "pruned" else []
    model.fit(X, Y, batch_size=len(X), epochs=1, verbose=0, callbacks=callbacks)
    return model


def _values(variables):
    """`[(name, value)]` in creation order (paths differ between models: Keras numbers their names)."""
    return [(v.name, np.array(v)) for v in variables]


def _fresh_and_scrambled(kind):
    """A compiled model of the same kind whose every variable (its optimizer's too) differs from
    the trained one's: +1 everywhere, so a variable left unrestored shows."""
    model = _compiled(MAKERS[kind](seed=2))
    for variable in _state(model):
        variable.assign(np.array(variable) + 1)
    return model


def _assert_same_values(restored, expected):
    assert [name for name, _ in restored] == [name for name, _ in expected] and expected
    unequal = [name for (name, value), (_, want) in zip(restored, expected) if not np.array_equal(value, want)]
    assert not unequal, f"not restored: {unequal}"


@pytest.fixture(scope="module", params=sorted(MAKERS))
def trained(request):
    return request.param, _trained(request.param)


def test_checkpoint_holds_every_variable_once(trained, tmp_path):
    _, model = trained
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    stored = [name for name, _ in tf.train.list_variables(path) if name.startswith("model/")]
    # A variable reachable along several paths (a kernel from its layer and from the optimizer)
    # is written once.
    assert len(stored) == len({id(v) for v in _state(model)})


def test_checkpoint_manager_restores_every_variable(trained, tmp_path):
    kind, model = trained
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), str(tmp_path), max_to_keep=1)
    manager.save()
    fresh = _fresh_and_scrambled(kind)
    status = tf.train.Checkpoint(model=fresh).restore(manager.latest_checkpoint)
    status.assert_consumed()
    status.assert_existing_objects_matched()
    _assert_same_values(_values(_state(fresh)), _values(_state(model)))


def test_restored_model_predicts_as_the_trained_one(trained, tmp_path):
    kind, model = trained
    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    fresh = _fresh_and_scrambled(kind)
    tf.train.Checkpoint(model=fresh).read(path).assert_consumed()
    np.testing.assert_array_equal(np.asarray(fresh(X[:4])), np.asarray(model(X[:4])))


def test_weights_file_restores_every_variable(trained, tmp_path):
    kind, model = trained
    path = str(tmp_path / "model.weights.h5")
    model.save_weights(path)
    fresh = _fresh_and_scrambled(kind)
    fresh.load_weights(path)
    _assert_same_values(_values(_state(fresh)), _values(_state(model)))


def _moved(value):
    """A different value of the same kind: floats +0.5, integers (a step, cluster indices) shifted."""
    if value.dtype.kind == "f":
        return value + 0.5
    return value + 1 if value.ndim == 0 else np.roll(value, 1)


@pytest.mark.parametrize("wrap", [
    lambda: kerasq.QuantizeWrapper(keras.layers.Dense(3, name="dense")),
    lambda: kerasq.PruneLowMagnitude(keras.layers.Dense(3, name="dense"), kerasq.ConstantSparsity(0.5, 0)),
    lambda: kerasq.ClusterWeights(keras.layers.Dense(3, name="dense"), number_of_clusters=2),
], ids=["quantize", "prune", "cluster"])
def test_restore_before_the_first_call_reaches_the_variables_it_creates(wrap, tmp_path):
    keras.utils.set_random_seed(3)
    saved = wrap()
    saved(X[:4, 0, :, 0])
    for variable in saved.variables:  # away from their initial values
        variable.assign(_moved(np.array(variable)))
    path = tf.train.Checkpoint(layer=saved).write(str(tmp_path / "ckpt"))
    keras.utils.set_random_seed(4)
    fresh = wrap()
    status = tf.train.Checkpoint(layer=fresh).read(path)
    fresh(X[:4, 0, :, 0])  # builds the layer: its variables are created and restored now
    status.assert_consumed()
    _assert_same_values(_values(fresh.variables), _values(saved.variables))
