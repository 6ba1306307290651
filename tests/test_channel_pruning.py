"""Tests of kerasq.prune_channels: narrower models that compute what the original computes without
the removed channels, on residual, depthwise, concatenating and real architectures."""

import keras
import numpy as np
import pytest

import kerasq
from kerasq.graph import LayerGraph, channel_groups, facts
from kerasq.pruning.channels import prune_channels

RNG = np.random.default_rng(11)


def _random(*shape):
    return RNG.normal(size=shape).astype("float32")


def _randomize(model):
    for layer in model.layers:
        layer.set_weights([RNG.uniform(0.5, 1.5, w.shape).astype(w.dtype) * RNG.choice([-1, 1], w.shape)
                           if w.ndim > 1 else RNG.uniform(0.5, 1.5, w.shape).astype(w.dtype)
                           for w in layer.get_weights()])
    return model


def _resnet_style():
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    for block in range(2):
        y = keras.layers.Conv2D(6, 3, padding="same", name=f"b{block}_conv1")(x)
        y = keras.layers.BatchNormalization(name=f"b{block}_bn1")(y)
        y = keras.layers.ReLU(name=f"b{block}_relu")(y)
        y = keras.layers.DepthwiseConv2D(3, padding="same", name=f"b{block}_dw")(y)
        y = keras.layers.Conv2D(8, 1, name=f"b{block}_conv2")(y)
        y = keras.layers.BatchNormalization(name=f"b{block}_bn2")(y)
        x = keras.layers.Add(name=f"b{block}_add")([x, y])
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(12, activation="relu", name="hidden")(x)
    return keras.Model(inputs, keras.layers.Dense(4, name="logits")(x), name="resnet_style")


def _unet_style():
    inputs = keras.Input((16, 16, 1))
    down = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="down")(inputs)
    pooled = keras.layers.MaxPooling2D(name="pool")(down)
    middle = keras.layers.Conv2D(10, 3, padding="same", activation="relu", name="middle")(pooled)
    up = keras.layers.Conv2DTranspose(6, 2, strides=2, name="up")(middle)
    up2 = keras.layers.UpSampling2D(name="upsample")(
        keras.layers.SeparableConv2D(4, 3, padding="same", name="sep")(middle))
    merged = keras.layers.Concatenate(name="skip")([down, up, up2])
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="fuse")(merged)
    return keras.Model(inputs, keras.layers.Conv2D(2, 1, name="mask")(x), name="unet_style")


def _make_removal_known(model, ratio):
    """Shrinks the filters of half the channels of every removable group so that the L1 criterion
    removes exactly those; returns {group id: removed indices} and the groups."""
    graph = LayerGraph(model)
    groups = channel_groups(graph)
    removed = {}
    for group in groups:
        if not group.removable or not group.producers:
            continue
        count = int(np.floor(group.size * ratio))
        drop = np.sort(RNG.choice(group.size, count, replace=False))
        removed[group.id] = drop
        for node in group.producers:
            layer = node.layer
            layer_facts = facts.layer_facts(layer)
            name = layer_facts.output_kernel
            kernel = np.asarray(getattr(layer, name)).copy()
            axis = layer_facts.kernels[name].out_axis % kernel.ndim
            index = [slice(None)] * kernel.ndim
            index[axis] = drop
            kernel[tuple(index)] *= 1e-3
            getattr(layer, name).assign(kernel)
    return removed, groups


def _zero_removed_inputs(model, groups, removed):
    """The original, with the input rows that read removed channels zeroed in every consumer."""
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    dropped = dict(removed)
    for group in groups:  # a concatenation drops its parts' channels at their offsets
        parts = [offset + dropped[part.id] for part, offset in group.parts if part.id in dropped]
        if parts:
            dropped[group.id] = np.concatenate(parts)
    for group in groups:
        if group.id not in dropped:
            continue
        for node in group.consumers:
            layer = reference.get_layer(node.layer.name)
            for name, kernel_facts in facts.layer_facts(layer).kernels.items():
                if kernel_facts.in_axis is None:
                    continue
                kernel = np.asarray(getattr(layer, name)).copy()
                factor = kernel.shape[kernel_facts.in_axis] // group.size
                rows = (dropped[group.id][:, None] * factor + np.arange(factor)).reshape(-1)
                index = [slice(None)] * kernel.ndim
                index[kernel_facts.in_axis] = rows
                kernel[tuple(index)] = 0.0
                getattr(layer, name).assign(kernel)
    return reference


@pytest.mark.parametrize("build, shape", [(_resnet_style, (16, 16, 3)), (_unet_style, (16, 16, 1))])
def test_narrow_model_computes_the_original_without_the_removed_channels(build, shape):
    model = _randomize(build())
    removed, groups = _make_removal_known(model, 0.5)
    assert removed, "the model must have channels to remove"
    before = [np.array(w) for w in model.get_weights()]
    slim = prune_channels(model, ratio=0.5)
    reference = _zero_removed_inputs(model, groups, removed)
    x = _random(3, *shape)
    np.testing.assert_allclose(np.asarray(slim(x)), np.asarray(reference(x)), rtol=1e-4, atol=1e-4)
    assert slim.count_params() < 0.6 * model.count_params()
    for old, new in zip(before, model.get_weights()):  # the user's model is untouched
        np.testing.assert_array_equal(old, new)


def test_residual_groups_lose_the_same_channels_everywhere():
    slim = prune_channels(_randomize(_resnet_style()), ratio=0.5)
    assert slim.get_layer("stem").filters == 4
    assert slim.get_layer("b0_conv2").filters == 4 and slim.get_layer("b1_conv2").filters == 4
    assert slim.get_layer("b0_bn2").moving_mean.shape == (4,)
    assert slim.get_layer("b0_dw").kernel.shape == (3, 3, 3, 1)
    assert slim.get_layer("hidden").kernel.shape == (4, 6)
    assert slim.get_layer("logits").units == 4  # a model output keeps its width


def test_per_layer_ratios_min_channels_and_rounding():
    model = _randomize(_resnet_style())
    slim = prune_channels(model, ratio=0.0, ratios={"b0_conv1": 0.5})
    assert slim.get_layer("b0_conv1").filters == 3 and slim.get_layer("b1_conv1").filters == 6
    assert prune_channels(model, ratio=0.9, min_channels=2).get_layer("stem").filters == 2
    assert prune_channels(model, ratio=0.6, round_to=4).get_layer("stem").filters == 4


def test_bn_scale_criterion_keeps_the_largest_scales():
    model = _randomize(_resnet_style())
    gamma = np.asarray(model.get_layer("b0_bn1").gamma)
    slim = prune_channels(model, ratio=0.5, criterion="bn_scale")
    kept = np.asarray(slim.get_layer("b0_bn1").gamma)
    np.testing.assert_allclose(np.sort(kept), np.sort(gamma)[-3:])


def test_real_architectures_shrink_and_still_run():
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=10)
    slim = prune_channels(model, ratio=0.5)
    assert slim.count_params() < 0.4 * model.count_params()
    assert slim(_random(1, 32, 32, 3)).shape == (1, 10)


def test_narrow_model_quantizes_and_exports_int8():
    slim = prune_channels(_randomize(_resnet_style()), ratio=0.5)
    qat = kerasq.quantize_model(slim)
    x = _random(16, 16, 16, 3)
    qat(x, training=True)
    tflite = kerasq.TFLiteModel(kerasq.export_tflite(qat))
    assert tflite.is_fully_integer
    report = kerasq.verify_tflite(qat, tflite, x)
    assert report.passed, str(report)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ratio": 1.0}, "ratio must be in"),
        ({"ratio": -0.1}, "ratio must be in"),
        ({"criterion": "taylor-ish"}, "criterion must be one of"),
        ({"ratios": {"stem": 1.5}}, r"ratios\['stem'\]"),
        ({"min_channels": 0}, "min_channels"),
        ({"round_to": 0}, "round_to"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        prune_channels(_resnet_style(), **kwargs)


def _head_ignores_two_channels():
    """Conv(4) -> GAP -> Dense whose rows for channels 0 and 1 are zero: those two channels are
    useless to the loss although their filters are the largest."""
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3, name="head")])
    kernel = np.asarray(model.get_layer("conv").kernel)
    kernel[..., :2] *= 10.0  # the largest filters
    model.get_layer("conv").kernel.assign(kernel)
    # Channels 2 and 3 stay active on every input (a positive bias before the ReLU), so their
    # activation x gradient cannot be zero by chance of the initialization.
    model.get_layer("conv").bias.assign(np.array([0.0, 0.0, 1.0, 1.0], "float32"))
    head = np.asarray(model.get_layer("head").kernel)
    head[:2] = 0.0
    model.get_layer("head").kernel.assign(head)
    return model


def test_taylor_criterion_removes_the_channels_the_loss_does_not_use():
    model = _head_ignores_two_channels()
    x = RNG.uniform(size=(32, 8, 8, 1)).astype("float32")
    y = RNG.integers(0, 3, 32)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    by_taylor = prune_channels(model, ratio=0.5, criterion="taylor", data=(x, y), loss=loss)
    np.testing.assert_array_equal(np.asarray(by_taylor.get_layer("head").kernel), np.asarray(model.get_layer("head").kernel)[2:])
    by_norm = prune_channels(model, ratio=0.5, criterion="l1")  # keeps the two big, useless filters
    assert np.all(np.asarray(by_norm.get_layer("head").kernel) == 0)
    with pytest.raises(ValueError, match=r"data=\(x, y\)"):
        prune_channels(model, ratio=0.5, criterion="taylor")


def test_batchnorm_scale_penalty_shrinks_the_scales_network_slimming_prunes():
    model = _resnet_style()
    penalized = kerasq.penalize_batchnorm_scales(model, l1=1e-2)
    assert isinstance(penalized.get_layer("b0_bn1").gamma_regularizer, keras.regularizers.L1)
    assert model.get_layer("b0_bn1").gamma_regularizer is None  # the user's model is not changed
    penalized.compile(keras.optimizers.Adam(1e-2), "mse")
    before = np.abs(np.asarray(penalized.get_layer("b0_bn1").gamma)).sum()
    penalized.fit(_random(32, 16, 16, 3), np.zeros((32, 4), "float32"), epochs=3, verbose=0)
    assert np.abs(np.asarray(penalized.get_layer("b0_bn1").gamma)).sum() < before
    slim = prune_channels(penalized, ratio=0.5, criterion="bn_scale")
    assert slim.count_params() < model.count_params()
    with pytest.raises(ValueError, match="l1 must be a positive"):
        kerasq.penalize_batchnorm_scales(model, l1=0)


@pytest.mark.parametrize("keep_params", [0.7, 0.4])
def test_global_parameter_target(keep_params):
    model = _randomize(_resnet_style())
    slim = prune_channels(model, keep_params=keep_params)
    kept = slim.count_params() / model.count_params()
    # One channel's weights are a few percent of this small model: the target is met within one channel.
    assert keep_params - 0.08 <= kept <= keep_params + 0.01, kept
    assert slim(_random(1, 16, 16, 3)).shape == (1, 4)
    with pytest.raises(ValueError, match="keep_params"):
        prune_channels(model, keep_params=0.0)


@pytest.mark.parametrize("keep_macs", [0.6, 0.3])
def test_global_macs_target(keep_macs):
    model = _randomize(_resnet_style())
    slim = prune_channels(model, keep_macs=keep_macs)
    kept = kerasq.estimate_macs(slim) / kerasq.estimate_macs(model)
    # The fewest channel removals that reach the target: below it by at most one removal, and one
    # channel of a residual stream goes from every block on it (here up to about a tenth of the
    # MACs), so the margin is 0.15.
    assert keep_macs - 0.15 <= kept <= keep_macs, kept
    with pytest.raises(ValueError, match="keep_macs"):
        prune_channels(model, keep_macs=1.5)
    with pytest.raises(ValueError, match="not both"):
        prune_channels(model, keep_macs=0.5, keep_params=0.5)


def test_estimate_macs_counts_each_kernel_at_its_positions():
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="conv")(inputs)  # 8x8 out
    x = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="depthwise")(x)  # 8x8x16
    x = keras.layers.SeparableConv2D(12, 3, padding="valid", name="separable")(x)  # 6x6x12
    x = keras.layers.Conv2DTranspose(4, 2, strides=2, name="transpose")(x)  # 6x6 in, 12x12 out
    x = keras.layers.Reshape((144, 4))(x)
    outputs = keras.layers.Dense(5, name="dense")(x)  # at 144 positions
    model = keras.Model(inputs, outputs)
    expected = {
        "conv": 8 * 8 * (3 * 3 * 3 * 8),
        "depthwise": 8 * 8 * (3 * 3 * 8 * 2),
        "separable": 6 * 6 * (3 * 3 * 16 * 1 + 16 * 12),
        "transpose": 6 * 6 * (2 * 2 * 4 * 12),
        "dense": 144 * (4 * 5),
    }
    assert kerasq.graph.layer_macs(model) == expected
    assert kerasq.estimate_macs(model) == sum(expected.values())
    with pytest.raises(ValueError, match="input size is not fixed"):
        kerasq.estimate_macs(keras.Sequential([keras.Input((None, None, 3)), keras.layers.Conv2D(4, 3)]))
