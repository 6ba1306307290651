"""Tests of magnitude pruning (kerasq.pruning): schedules, masks, the wrapper, callbacks, strip, saving,
export of the zeros, and composition with quantization."""

import gzip

import keras
import numpy as np
import pytest

import kerasq
from kerasq.pruning import masks

RNG = np.random.default_rng(11)


def _random(*shape):
    return RNG.normal(size=shape).astype("float32")


def _weights(model):
    return [np.array(w) for w in model.get_weights()]


def _zero_fraction(value):
    return float(np.mean(np.asarray(value) == 0))


# ---- schedules -----------------------------------------------------------------------------------


def test_constant_sparsity_prunes_every_frequency_steps_in_range():
    schedule = kerasq.ConstantSparsity(0.6, begin_step=10, end_step=30, frequency=10)
    assert [schedule(step)[0] for step in (0, 9, 10, 15, 20, 30, 40)] == [False, False, True, False, True, True, False]
    assert schedule(25)[1] == 0.6
    forever = kerasq.ConstantSparsity(0.6, begin_step=0, frequency=3)
    assert forever(3_000_000)[0]


def test_polynomial_decay_follows_tfmots_formula():
    schedule = kerasq.PolynomialDecay(0.2, 0.8, begin_step=100, end_step=300, power=3, frequency=50)
    for step in (0, 100, 150, 200, 250, 300, 400):
        done = min(1.0, max(0.0, (step - 100) / 200))
        expected = 0.8 + (0.2 - 0.8) * (1 - done) ** 3
        should_prune, sparsity = schedule(step)
        assert sparsity == pytest.approx(expected, abs=1e-6)
        assert should_prune == (100 <= step <= 300)


def test_schedules_serialize():
    for schedule in (kerasq.ConstantSparsity(0.5, 3, 90, 7), kerasq.PolynomialDecay(0.1, 0.9, 0, 50, power=2, frequency=5)):
        restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
        assert type(restored) is type(schedule) and restored.get_config() == schedule.get_config()
        assert [restored(s) for s in range(0, 60, 5)] == [schedule(s) for s in range(0, 60, 5)]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: kerasq.ConstantSparsity(1.0, 0), r"target_sparsity must be in \[0, 1\).*1\.0"),
        (lambda: kerasq.ConstantSparsity(-0.1, 0), r"target_sparsity.*-0\.1"),
        (lambda: kerasq.PolynomialDecay(0.0, 1.2, 0, 10), r"final_sparsity.*1\.2"),
        (lambda: kerasq.PolynomialDecay(0.0, 0.5, 100, 50), r"end_step \(50\) is before begin_step \(100\)"),
        (lambda: kerasq.ConstantSparsity(0.5, 10, end_step=5), r"end_step \(5\).*or -1"),
        (lambda: kerasq.ConstantSparsity(0.5, 0, frequency=0), r"frequency must be a positive.*0"),
        (lambda: kerasq.PolynomialDecay(0.0, 0.5, 0, 10, frequency=-3), r"frequency.*-3"),
        (lambda: kerasq.ConstantSparsity(0.5, -1), r"begin_step must be >= 0.*-1"),
    ],
)
def test_bad_schedules_are_refused_with_the_value(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ---- masks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 32), (3, 3, 16, 32), (5, 7, 9)])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.8, 0.95])
def test_magnitude_mask_hits_the_sparsity_and_keeps_the_largest(shape, sparsity):
    weights = _random(*shape)
    mask = masks.magnitude_mask(weights, sparsity)
    assert abs(masks.sparsity(mask) - sparsity) <= 0.005
    kept, pruned = np.abs(weights)[mask == 1], np.abs(weights)[mask == 0]
    if pruned.size and kept.size:
        assert pruned.max() <= kept.min()


@pytest.mark.parametrize("pooling", ["AVG", "MAX"])
def test_block_mask_prunes_whole_blocks_scored_by_pooling(pooling):
    weights = _random(3, 16, 24)
    mask = masks.magnitude_mask(weights, 0.75, block_size=(2, 4), pooling=pooling)
    blocks = mask.reshape(3, 8, 2, 6, 4)
    per_block = blocks.min(axis=(2, 4))
    assert np.array_equal(per_block, blocks.max(axis=(2, 4)))  # all zero or all kept
    assert masks.sparsity(mask) == pytest.approx(0.75, abs=0.005)
    pool = np.mean if pooling == "AVG" else np.max
    scores = pool(np.abs(weights).reshape(3, 8, 2, 6, 4), axis=(2, 4))
    assert scores[per_block == 0].max() <= scores[per_block == 1].min()


def test_block_mask_with_edge_blocks():
    mask = masks.magnitude_mask(_random(10, 10), 0.5, block_size=(4, 4))
    assert mask.shape == (10, 10)
    assert 0.3 < masks.sparsity(mask) < 0.7  # edge blocks are smaller than 16 weights


@pytest.mark.parametrize("shape, axis", [((32, 8), 0), ((3, 3, 16, 8), -2), ((10, 5), 0)])
def test_m_by_n_mask_keeps_m_largest_of_each_group(shape, axis):
    weights = _random(*shape)
    mask = masks.m_by_n_mask(weights, 2, 4, axis=axis)
    moved, moved_weights = np.moveaxis(mask, axis, -1), np.moveaxis(np.abs(weights), axis, -1)
    length = moved.shape[-1]
    for start in range(0, length, 4):
        group, values = moved[..., start:start + 4], moved_weights[..., start:start + 4]
        assert (group.sum(axis=-1) <= 2).all()
        if group.shape[-1] == 4:
            assert (group.sum(axis=-1) == 2).all()
            kept_min = np.where(group == 1, values, np.inf).min(axis=-1)
            pruned_max = np.where(group == 0, values, -np.inf).max(axis=-1)
            assert (pruned_max <= kept_min).all()


# ---- the wrapper on every prunable layer kind ----------------------------------------------------


def _all_kinds_model():
    image = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(16, 3, padding="same", name="conv2d")(image)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="depthwise")(x)
    x = keras.layers.SeparableConv2D(16, 3, padding="same", name="separable")(x)
    x = keras.layers.Conv2DTranspose(8, 3, padding="same", name="transpose")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    tokens = keras.Input((6,), dtype="int32", name="tokens")
    y = keras.layers.Embedding(50, 8, name="embedding")(tokens)
    y = keras.layers.Conv1D(8, 3, padding="same", name="conv1d")(y)
    y = keras.layers.GlobalAveragePooling1D()(y)
    z = keras.layers.Concatenate()([x, y])
    outputs = keras.layers.Dense(10, name="dense")(keras.layers.Dense(32, name="hidden")(z))
    return keras.Model([image, tokens], outputs)


def _all_kinds_inputs(n=4):
    return [_random(n, 8, 8, 3), RNG.integers(0, 50, size=(n, 6)).astype("int32")]


def test_every_kernel_layer_is_pruned_to_the_scheduled_sparsity_and_the_user_model_is_unchanged():
    model = _all_kinds_model()
    before = _weights(model)
    pruned = kerasq.prune_low_magnitude(model, kerasq.ConstantSparsity(0.8, 0))
    layers = {layer.layer.name: layer for layer in kerasq.pruning.pruning_layers(pruned)}
    assert set(layers) == {"conv2d", "depthwise", "separable", "transpose", "embedding", "conv1d", "hidden", "dense"}
    assert set(layers["separable"].masks) == {"depthwise_kernel", "pointwise_kernel"}
    x = _all_kinds_inputs()
    np.testing.assert_allclose(np.asarray(pruned(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-5)  # masks start at 1
    kerasq.pruning.step(pruned)
    for layer in layers.values():
        for name, mask in layer.masks.items():
            kernel = np.asarray(getattr(layer.layer, name))
            if kernel.size >= 100:  # smaller kernels cannot be within half a point
                assert abs(_zero_fraction(mask) - 0.8) <= 0.005, (layer.name, name)
            np.testing.assert_array_equal(kernel[np.asarray(mask) == 0], 0)
    for old, new in zip(before, _weights(model)):
        np.testing.assert_array_equal(old, new)
    stripped = kerasq.strip_pruning(pruned)
    assert not kerasq.pruning.pruning_layers(stripped)
    assert {layer.name for layer in stripped.layers} >= set(layers)
    np.testing.assert_allclose(np.asarray(stripped(x)), np.asarray(pruned(x)), rtol=1e-5, atol=1e-5)
    assert _zero_fraction(stripped.get_layer("hidden").kernel) == pytest.approx(0.8, abs=0.005)


def test_nested_models_are_pruned_and_kept_whole():
    backbone = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(8, 3, name="conv"),
                                 keras.layers.GlobalAveragePooling2D()], name="backbone")
    inputs = keras.Input((8, 8, 1))
    model = keras.Model(inputs, keras.layers.Dense(10, name="head")(backbone(inputs)))
    pruned = kerasq.prune_low_magnitude(model)
    (nested,) = [layer for layer in pruned.layers if isinstance(layer, keras.Model)]
    assert nested is not backbone and isinstance(nested.layers[1], kerasq.PruneLowMagnitude)
    assert not any(isinstance(layer, kerasq.PruneLowMagnitude) for layer in backbone.layers)
    assert len(kerasq.pruning.pruning_layers(pruned)) == 2
    stripped = kerasq.strip_pruning(pruned)
    assert not kerasq.pruning.pruning_layers(stripped)


class _Head(keras.layers.Dense):
    pass


@pytest.mark.parametrize("skip", [["head"], [_Head], lambda layer: layer.name == "head"])
def test_skip_leaves_layers_unpruned(skip):
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, name="body"), _Head(2, name="head")])
    pruned = kerasq.prune_low_magnitude(model, skip=skip)
    assert type(pruned.get_layer("head")) is _Head
    assert [layer.layer.name for layer in kerasq.pruning.pruning_layers(pruned)] == ["body"]


def test_layers_wrapped_by_hand_and_lists():
    dense, conv = kerasq.prune_low_magnitude([keras.layers.Dense(4), keras.layers.Conv2D(4, 3)])
    assert isinstance(dense, kerasq.PruneLowMagnitude) and isinstance(conv.layer, keras.layers.Conv2D)
    inputs = keras.Input((6,))
    hidden = kerasq.prune_low_magnitude(keras.layers.Dense(32, name="pruned"), kerasq.ConstantSparsity(0.5, 0))(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, name="plain")(hidden))
    # Only the wrapped layer is pruned, and a model holding wrappers keeps them through a rewrite.
    again = kerasq.prune_low_magnitude(model, kerasq.ConstantSparsity(0.9, 0), skip=["plain"])
    (layer,) = kerasq.pruning.pruning_layers(again)
    assert layer.pruning_schedule.target_sparsity == 0.5


@keras.saving.register_keras_serializable(package="kerasq_tests")
class _ScaledMatMul(keras.layers.Layer, kerasq.PrunableLayer):
    def build(self, input_shape):
        self.weight_matrix = self.add_weight(shape=(input_shape[-1], 16), name="weight_matrix")
        self.scale = self.add_weight(shape=(16,), initializer="ones", name="scale")

    def call(self, x):
        return keras.ops.matmul(x, self.weight_matrix) * self.scale

    def get_prunable_weights(self):
        return [self.weight_matrix]


def test_prunable_layer_mixin():
    inputs = keras.Input((12,))
    model = keras.Model(inputs, _ScaledMatMul(name="custom")(inputs))
    pruned = kerasq.prune_low_magnitude(model, kerasq.ConstantSparsity(0.75, 0))
    kerasq.pruning.step(pruned)
    (layer,) = kerasq.pruning.pruning_layers(pruned)
    assert list(layer.masks) == ["weight_matrix"]
    stripped = kerasq.strip_pruning(pruned)
    assert _zero_fraction(stripped.get_layer("custom").weight_matrix) == 0.75
    assert _zero_fraction(stripped.get_layer("custom").scale) == 0.0


def test_block_and_m_by_n_in_the_wrapper():
    inputs = keras.Input((8, 8, 16))
    conv = keras.layers.Conv2D(8, 1, name="conv")
    model = keras.Model(inputs, keras.layers.Dense(12, name="dense")(conv(inputs)))
    m_by_n = kerasq.prune_low_magnitude(model, sparsity_m_by_n=(2, 4))
    kerasq.pruning.step(m_by_n)
    kernel = np.asarray(m_by_n.get_layer("prune_low_magnitude_conv").layer.kernel)  # (1, 1, 16, 8)
    assert ((kernel.reshape(4, 4, 8) != 0).sum(axis=1) <= 2).all()  # along the input channels
    dense = np.asarray(m_by_n.get_layer("prune_low_magnitude_dense").layer.kernel)  # (8, 12)
    assert ((dense.reshape(2, 4, 12) != 0).sum(axis=1) <= 2).all()
    blocks = kerasq.prune_low_magnitude(model, kerasq.ConstantSparsity(0.5, 0), block_size=(1, 4), block_pooling_type="MAX")
    kerasq.pruning.step(blocks)
    dense = np.asarray(blocks.get_layer("prune_low_magnitude_dense").layer.kernel).reshape(8, 3, 4)
    nonzero = (dense != 0).sum(axis=-1)
    assert set(np.unique(nonzero)) <= {0, 4} and _zero_fraction(dense) == 0.5


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: kerasq.prune_low_magnitude(keras.layers.ReLU(name="act")), ValueError, r"'act' \(ReLU\) has no weight to prune"),
        (lambda: kerasq.prune_low_magnitude(keras.layers.Dense(2), sparsity_m_by_n=(4, 4)), ValueError, r"\(4, 4\).*smaller than n"),
        (lambda: kerasq.prune_low_magnitude(keras.layers.Dense(2), sparsity_m_by_n=(3, 2)), ValueError, r"\(3, 2\)"),
        (lambda: kerasq.prune_low_magnitude(keras.layers.Embedding(5, 2, name="emb"), sparsity_m_by_n=(2, 4)), ValueError, r"input-channel axis.*'emb'"),
        (lambda: kerasq.prune_low_magnitude(keras.layers.Dense(2), block_size=(0, 4)), ValueError, r"block_size.*\(0, 4\)"),
        (lambda: kerasq.prune_low_magnitude(keras.layers.Dense(2), block_pooling_type="MEAN"), ValueError, r"'MEAN'"),
        (lambda: kerasq.prune_low_magnitude(keras.layers.Dense(2), pruning_schedule=0.5), TypeError, r"PruningSchedule.*0\.5"),
        (lambda: kerasq.prune_low_magnitude(keras.Sequential([keras.Input((3,)), keras.layers.ReLU()], name="acts")),
         ValueError, r"'acts' has no layer to prune"),
        (lambda: kerasq.prune_low_magnitude("dense"), TypeError, r"got str"),
    ],
)
def test_bad_pruning_requests_say_what_to_do(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_strip_of_a_model_without_pruning_says_so():
    pruned = kerasq.prune_low_magnitude(keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]))
    stripped = kerasq.strip_pruning(pruned)
    with pytest.raises(ValueError, match=r"no PruneLowMagnitude layers: it was already stripped"):
        kerasq.strip_pruning(stripped)


# ---- training ------------------------------------------------------------------------------------


def _digits_mlp():
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(64, activation="relu", name="hidden"),
                             keras.layers.Dense(10, name="logits")])


def _compile(model, learning_rate=3e-3):
    model.compile(keras.optimizers.Adam(learning_rate), keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


class _RecordKernels(keras.callbacks.Callback):
    def __init__(self, layer):
        super().__init__()
        self.layer, self.kernels = layer, []

    def on_epoch_end(self, epoch, logs=None):
        self.kernels.append(np.array(self.layer.layer.kernel))


def test_fit_follows_the_schedule_and_pruned_weights_stay_zero(digits):
    (x, y), _ = digits
    x, y = x[:512], y[:512]
    schedule = kerasq.PolynomialDecay(0.0, 0.8, begin_step=0, end_step=48, frequency=8)  # 16 batches an epoch
    model = _compile(kerasq.prune_low_magnitude(_digits_mlp(), schedule))
    hidden = model.get_layer("prune_low_magnitude_hidden")
    record = _RecordKernels(hidden)
    model.fit(x, y, batch_size=32, epochs=4, verbose=0, callbacks=[kerasq.UpdatePruningStep(), record])
    assert int(hidden.pruning_step.numpy()) == 4 * 16 - 1
    sparsities = [_zero_fraction(kernel) for kernel in record.kernels]
    assert sparsities == sorted(sparsities) and abs(sparsities[-1] - 0.8) <= 0.005
    for earlier, later in zip(record.kernels, record.kernels[1:]):
        assert (later[earlier == 0] == 0).all()  # once pruned, zero for good


def test_fit_without_the_callback_is_an_error_and_can_be_rerun_with_it(digits):
    (x, y), _ = digits
    model = _compile(kerasq.prune_low_magnitude(_digits_mlp()))
    with pytest.raises(Exception, match=r"pruning step was never advanced.*kerasq.UpdatePruningStep\(\)"):
        model.fit(x[:64], y[:64], epochs=1, verbose=0)
    model.fit(x[:64], y[:64], epochs=1, verbose=0, callbacks=[kerasq.UpdatePruningStep()])


def test_custom_training_loop_with_the_step_helper(digits):
    import tensorflow as tf

    (x, y), _ = digits
    model = kerasq.prune_low_magnitude(_digits_mlp(), kerasq.ConstantSparsity(0.7, begin_step=2, frequency=2))
    optimizer = keras.optimizers.Adam(1e-3)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    for batch in range(6):
        kerasq.pruning.step(model)
        train_step(x[batch * 32:(batch + 1) * 32], y[batch * 32:(batch + 1) * 32])
    kerasq.pruning.apply_masks(model)
    kernel = model.get_layer("prune_low_magnitude_hidden").layer.kernel
    assert _zero_fraction(kernel) == pytest.approx(0.7, abs=0.005)


def _one_dense(regrow):
    layer = kerasq.prune_low_magnitude(keras.layers.Dense(1, use_bias=False), kerasq.ConstantSparsity(0.5, 0, frequency=1), regrow=regrow)
    layer.build((None, 4))
    layer.layer.kernel.assign(np.array([[4.0], [3.0], [0.2], [0.1]], "float32"))
    return layer


@pytest.mark.parametrize("regrow", [False, True])
def test_regrow_lets_a_pruned_weight_come_back(regrow):
    import tensorflow as tf

    layer = _one_dense(regrow)
    layer.advance_step()
    assert np.asarray(layer.masks["kernel"]).ravel().tolist() == [1, 1, 0, 0]
    x = tf.ones((1, 4))
    with tf.GradientTape() as tape:
        output = layer(x, training=True)
    gradient = np.asarray(tape.gradient(output, layer.layer.kernel)).ravel()
    # The dense (shadow) weights train with regrow; without it, pruned weights get no gradient.
    assert gradient.tolist() == ([1, 1, 1, 1] if regrow else [1, 1, 0, 0])
    kernel = np.asarray(layer.layer.kernel).copy()
    kernel[3] = 9.0  # the pruned weight grew past the others
    layer.layer.kernel.assign(kernel)
    layer.advance_step()
    mask = np.asarray(layer.masks["kernel"]).ravel().tolist()
    assert mask == ([1, 0, 0, 1] if regrow else [1, 1, 0, 0])
    assert np.asarray(layer(x)).item() == pytest.approx(13.0 if regrow else 7.0)


def test_pruning_summaries_write_sparsity_and_target(digits, tmp_path):
    import tensorflow as tf

    (x, y), _ = digits
    schedule = kerasq.ConstantSparsity(0.6, begin_step=0, frequency=4)
    model = _compile(kerasq.prune_low_magnitude(_digits_mlp(), schedule))
    callbacks = [kerasq.UpdatePruningStep(), kerasq.PruningSummaries(tmp_path)]
    model.fit(x[:256], y[:256], batch_size=32, epochs=2, verbose=0, callbacks=callbacks)
    scalars = {}
    for path in (tmp_path / "pruning").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, float(tf.make_ndarray(value.tensor))))
    assert {"prune_low_magnitude_hidden/sparsity", "prune_low_magnitude_logits/target_sparsity"} <= set(scalars)
    steps, values = zip(*scalars["prune_low_magnitude_hidden/sparsity"])
    assert steps == (7, 15) and values[-1] == pytest.approx(0.6, abs=0.005)
    assert all(value == pytest.approx(0.6) for _, value in scalars["prune_low_magnitude_logits/target_sparsity"])


def test_keras_file_round_trip_resumes_the_schedule(digits, tmp_path):
    (x, y), _ = digits
    schedule = kerasq.PolynomialDecay(0.2, 0.8, begin_step=0, end_step=20, frequency=10)
    model = _compile(kerasq.prune_low_magnitude(_digits_mlp(), schedule, block_size=(1, 2)))
    model.fit(x[:320], y[:320], batch_size=32, epochs=1, verbose=0, callbacks=[kerasq.UpdatePruningStep()])
    path = tmp_path / "pruned.keras"
    model.save(path)
    with kerasq.prune_scope():
        loaded = keras.saving.load_model(path)
    layer = loaded.get_layer("prune_low_magnitude_hidden")
    assert int(layer.pruning_step.numpy()) == 9 and layer.block_size == (1, 2)
    assert layer.pruning_schedule.get_config() == schedule.get_config()
    for old, new in zip(_weights(model), _weights(loaded)):
        np.testing.assert_array_equal(old, new)
    loaded.fit(x[:352], y[:352], batch_size=32, epochs=1, verbose=0, callbacks=[kerasq.UpdatePruningStep()])
    assert int(layer.pruning_step.numpy()) == 20  # steps 10 and 20 pruned: the final sparsity
    assert _zero_fraction(layer.layer.kernel) == pytest.approx(0.8, abs=0.005)


# ---- export and composition ----------------------------------------------------------------------


def test_stripped_sparse_model_exports_smaller_after_gzip(digits):
    (x, _), _ = digits
    dense = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(256, activation="relu"),
                              keras.layers.Dense(256, activation="relu"), keras.layers.Dense(10)])
    pruned = kerasq.prune_low_magnitude(dense, kerasq.ConstantSparsity(0.8, 0))
    kerasq.pruning.step(pruned)
    sparse = kerasq.strip_pruning(pruned)
    for options in ({}, {"representative_data": x[:64]}):
        dense_size = len(gzip.compress(kerasq.export_tflite(dense, **options)))
        sparse_bytes = kerasq.export_tflite(sparse, **options)
        sparse_size = len(gzip.compress(sparse_bytes))
        assert sparse_size <= 0.4 * dense_size, (options.keys(), sparse_size, dense_size)
    tflite = kerasq.TFLiteModel(sparse_bytes)  # the int8 file runs and computes the sparse model
    agreement = np.mean(np.argmax(tflite.predict(x[:64]), -1) == np.argmax(np.asarray(sparse(x[:64])), -1))
    assert agreement >= 0.9  # int8 rounding may flip a near-tie of an untrained model


def test_quantize_model_sees_through_the_pruning_wrapper():
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(8, 3, name="conv"), keras.layers.ReLU(),
                              keras.layers.Flatten(), keras.layers.Dense(10, name="dense")])
    pruned = kerasq.prune_low_magnitude(model, kerasq.ConstantSparsity(0.5, 0))
    kerasq.pruning.step(pruned)
    qat = kerasq.quantize_model(pruned)
    assert not kerasq.pruning.pruning_layers(qat)
    inner = qat.get_layer("quant_dense").layer
    np.testing.assert_array_equal(np.asarray(inner.kernel), np.asarray(pruned.get_layer("prune_low_magnitude_dense").layer.kernel))
    assert _zero_fraction(inner.kernel) == 0.5
    assert kerasq.TFLiteModel(kerasq.export_tflite(qat)).is_fully_integer
