"""Tests of transfer_weights, widen and deepen (kerasq.transfer)."""

import keras
import numpy as np
import pytest

import kerasq

RNG = np.random.default_rng(3)


def _random(*shape):
    return RNG.normal(size=shape).astype("float32")


def _randomize(model):
    for layer in model.layers:
        weights = layer.get_weights()
        layer.set_weights([RNG.uniform(0.5, 1.5, w.shape).astype(w.dtype) * (RNG.choice([-1, 1], w.shape) if w.ndim > 1 else 1)
                           for w in weights])
    return model


def _weights(model):
    return [np.array(w) for w in model.get_weights()]


def _cnn(channels=1, width=8, size=8, head_input="gap", name="cnn"):
    layers = [
        keras.Input((size, size, channels)),
        keras.layers.Conv2D(width, 3, padding="same", name="conv"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.ReLU(name="relu"),
        keras.layers.Conv2D(6, 3, padding="same", name="conv2"),
        keras.layers.GlobalAveragePooling2D(name="gap") if head_input == "gap" else keras.layers.Flatten(name="flat"),
        keras.layers.Dense(10, name="head"),
    ]
    return keras.Sequential(layers, name=name)


# ---- transfer_weights ---------------------------------------------------------------------------------


def test_same_architecture_copies_everything_and_leaves_the_source_alone():
    source, target = _randomize(_cnn()), _cnn()
    before = _weights(source)
    report = kerasq.transfer_weights(source, target)
    assert len(report.copied) == len(target.weights) and not (report.adapted or report.skipped or report.untouched)
    x = _random(2, 8, 8, 1)
    np.testing.assert_allclose(np.asarray(target(x)), np.asarray(source(x)), rtol=1e-6)
    for old, new in zip(before, _weights(source)):
        np.testing.assert_array_equal(old, new)
    assert "10 copied, 0 adapted, 0 skipped, 0 untouched" in str(report)


def test_match_by_order_shape_dict_and_function():
    source = _randomize(_cnn(name="a"))
    renamed = keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Conv2D(8, 3, padding="same", name="c1"),
         keras.layers.BatchNormalization(name="n1"), keras.layers.ReLU(), keras.layers.Conv2D(6, 3, padding="same", name="c2"),
         keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10, name="d")]
    )
    assert len(kerasq.transfer_weights(source, renamed, match="order").copied) == 10
    shape_report = kerasq.transfer_weights(source, renamed, match="shape")
    assert {row.layer for row in shape_report.copied} == {"c1", "n1", "c2", "d"}
    mapping = {"c1": "conv", "d": "head"}
    report = kerasq.transfer_weights(source, renamed, match=mapping)
    assert {row.layer for row in report.copied} == {"c1", "d"}
    assert {row.layer for row in report.untouched} == {"n1", "c2"}
    by_function = kerasq.transfer_weights(source, renamed, match=lambda layer: mapping.get(layer.name))
    assert [row.status for row in by_function.rows] == [row.status for row in report.rows]
    np.testing.assert_array_equal(np.asarray(renamed.get_layer("d").kernel), np.asarray(source.get_layer("head").kernel))


def test_nested_models_are_matched_inside():
    backbone = _randomize(keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, name="conv")], name="backbone"))
    inputs = keras.Input((8, 8, 1))
    source = keras.Model(inputs, keras.layers.Dense(2, name="head")(keras.layers.Flatten()(backbone(inputs))))
    target = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, name="conv")])
    report = kerasq.transfer_weights(source, target)
    assert {row.layer for row in report.copied} == {"conv"}
    np.testing.assert_array_equal(np.asarray(target.layers[0].kernel), np.asarray(backbone.layers[0].kernel))


def test_mismatched_shapes_are_skipped_with_the_reason_unless_adapted():
    source, target = _randomize(_cnn(width=8)), _cnn(width=4)
    before = _weights(target)
    report = kerasq.transfer_weights(source, target)
    conv = {row.weight: row for row in report.rows if row.layer == "conv"}
    assert conv["kernel"].status == "skipped" and "(3, 3, 1, 8) vs (3, 3, 1, 4)" in conv["kernel"].detail
    np.testing.assert_array_equal(np.asarray(target.get_layer("conv").kernel), before[0])  # never half-written
    with pytest.raises(ValueError, match="strict=True"):
        kerasq.transfer_weights(source, _cnn(width=4), strict=True)


def test_narrower_target_keeps_the_most_important_channels_consistently():
    source = _randomize(_cnn(width=8))
    kernel = np.asarray(source.get_layer("conv").kernel)
    bn = source.get_layer("bn")
    # Importance is each filter's L1 norm as deployed: with the BatchNorm after it folded in.
    folded = np.abs(np.asarray(bn.gamma)) / np.sqrt(np.asarray(bn.moving_variance) + bn.epsilon)
    importance = np.abs(kernel).reshape(-1, 8).sum(axis=0) * folded
    expected = np.sort(np.argsort(-importance)[:4])
    target = _cnn(width=4)
    report = kerasq.transfer_weights(source, target, adapt=True)
    assert not report.skipped and not report.untouched
    np.testing.assert_array_equal(np.asarray(target.get_layer("conv").kernel), kernel[..., expected])
    np.testing.assert_array_equal(np.asarray(target.get_layer("bn").gamma), np.asarray(source.get_layer("bn").gamma)[expected])
    np.testing.assert_array_equal(np.asarray(target.get_layer("conv2").kernel),
                                  np.asarray(source.get_layer("conv2").kernel)[:, :, expected, :])


def test_wider_target_is_filled_and_keeps_its_initial_values_for_the_rest():
    source, target = _randomize(_cnn(width=4)), _cnn(width=8)
    initial = np.asarray(target.get_layer("conv").kernel).copy()
    report = kerasq.transfer_weights(source, target, adapt=True)
    kernel = np.asarray(target.get_layer("conv").kernel)
    np.testing.assert_array_equal(kernel[..., :4], np.asarray(source.get_layer("conv").kernel))
    np.testing.assert_array_equal(kernel[..., 4:], initial[..., 4:])
    row = next(row for row in report.adapted if row.layer == "conv" and row.weight == "kernel")
    assert "initial values" in row.detail


@pytest.mark.parametrize("source_channels, target_channels", [(1, 3), (3, 1)])
def test_first_convolution_between_grey_and_rgb_keeps_its_output(source_channels, target_channels):
    source, target = _randomize(_cnn(channels=source_channels)), _cnn(channels=target_channels)
    report = kerasq.transfer_weights(source, target, adapt=True)
    assert not report.skipped
    grey = RNG.uniform(size=(2, 8, 8, 1)).astype("float32")
    as_source = np.repeat(grey, source_channels, axis=-1)
    as_target = np.repeat(grey, target_channels, axis=-1)
    np.testing.assert_allclose(np.asarray(target(as_target)), np.asarray(source(as_source)), rtol=1e-4, atol=1e-5)


def test_dense_after_flatten_with_another_image_size_is_skipped():
    source, target = _randomize(_cnn(head_input="flat", size=8)), _cnn(head_input="flat", size=12)
    report = kerasq.transfer_weights(source, target, adapt=True)
    head = {row.weight: row for row in report.rows if row.layer == "head"}
    assert head["kernel"].status == "skipped" and "Flatten" in head["kernel"].detail
    assert head["bias"].status == "copied"


def test_freeze_makes_fully_copied_layers_untrainable():
    source, target = _randomize(_cnn(width=8)), _cnn(width=4)
    report = kerasq.transfer_weights(source, target, adapt=True)
    report.freeze()
    assert target.get_layer("head").trainable is False
    assert target.get_layer("conv").trainable is True  # adapted, so it still needs to train


def test_bad_match_is_named():
    with pytest.raises(ValueError, match="match must be one of"):
        kerasq.transfer_weights(_cnn(), _cnn(), match="closest")
    with pytest.raises(ValueError, match="no weights or do not exist"):
        kerasq.transfer_weights(_cnn(), _cnn(), match={"conv": "missing"})


# ---- widen and deepen ---------------------------------------------------------------------------------


def _residual():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", name="stem")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU()(x)
    y = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="inner")(x)
    y = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(y)
    y = keras.layers.Conv2D(6, 1, name="project")(y)
    y = keras.layers.BatchNormalization(name="project_bn")(y)
    x = keras.layers.Add()([x, y])
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(x))


@pytest.mark.parametrize("layer, size", [("stem", 11), ("inner", 9)])
def test_widen_keeps_the_function(layer, size):
    model = _randomize(_residual())
    before = _weights(model)
    wider = kerasq.widen(model, layer, size)
    assert wider.get_layer(layer).filters == size
    if layer == "stem":  # the residual Add makes the project conv widen with it
        assert wider.get_layer("project").filters == size
    x = _random(4, 8, 8, 3)
    np.testing.assert_allclose(np.asarray(wider(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-5)
    for old, new in zip(before, _weights(model)):
        np.testing.assert_array_equal(old, new)


def test_widened_model_trains():
    model = _randomize(_residual())
    wider = kerasq.widen(model, "inner", 8)
    wider.compile("adam", "mse")
    x, y = _random(32, 8, 8, 3), _random(32, 3)
    history = wider.fit(x, y, epochs=3, verbose=0)
    assert np.isfinite(history.history["loss"][-1])


@pytest.mark.parametrize(
    "after, options",
    [("stem_bn", {}), ("inner", {"activation": "relu"}), ("project", {"batchnorm": True}), ("out", {})],
)
def test_deepen_keeps_the_function(after, options):
    model = _randomize(_residual())
    deeper = kerasq.deepen(model, after=after, **options)
    assert len(deeper.layers) == len(model.layers) + 1 + int(bool(options.get("batchnorm")))
    x = _random(4, 8, 8, 3)
    np.testing.assert_allclose(np.asarray(deeper(x, training=False)), np.asarray(model(x, training=False)),
                               rtol=1e-5, atol=1e-5)


def test_deepened_model_trains_and_exports_int8():
    model = _randomize(_residual())
    deeper = kerasq.deepen(model, after="inner", activation="relu")
    deeper.compile("adam", "mse")
    deeper.fit(_random(16, 8, 8, 3), _random(16, 3), epochs=1, verbose=0)
    qat = kerasq.quantize_model(deeper)
    qat(_random(8, 8, 8, 3), training=True)
    assert kerasq.TFLiteModel(kerasq.export_tflite(qat)).is_fully_integer


def test_widen_and_deepen_refuse_what_would_change_the_model():
    model = _residual()
    with pytest.raises(ValueError, match="prune_channels"):
        kerasq.widen(model, "inner", 2)
    with pytest.raises(ValueError, match="fixed"):
        kerasq.widen(model, "out", 5)
    with pytest.raises(ValueError, match="no layer named 'nope'"):
        kerasq.widen(model, "nope", 5)
    with pytest.raises(ValueError, match="can be negative"):
        kerasq.deepen(model, after="project", activation="relu")
