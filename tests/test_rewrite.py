"""Tests of the rewrite engine: layer facts, weight maps, Rewrite, output specs, channel groups and
feature-wrapper composition (kerasq.graph)."""

import keras
import numpy as np
import pytest

import kerasq
from kerasq.graph import (
    LayerGraph,
    Rewrite,
    WeightMap,
    WeightShapeError,
    channel_groups,
    facts,
    pad,
    reduce_sum,
    repeat,
    reshape,
    take,
    wrappers,
)

RNG = np.random.default_rng(5)


def _random(*shape):
    return RNG.normal(size=shape).astype("float32")


def _weights(model):
    return [np.array(w) for w in model.get_weights()]


def _randomize(model):
    """Non-trivial weights everywhere, BatchNorm statistics included, so a wrong copy shows."""
    for layer in model.layers:
        layer.set_weights([RNG.uniform(0.5, 1.5, w.shape).astype(w.dtype) for w in layer.get_weights()])
    return model


# ---- the registry -------------------------------------------------------------------------------


class _Scale(keras.layers.Layer):
    """A custom layer with one weight per channel."""

    def build(self, input_shape):
        self.factor = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="factor")

    def call(self, x):
        return x * self.factor


def test_facts_registration_is_scoped_and_undoable():
    assert facts.layer_facts(_Scale()) is None
    registration = facts.register_layer_facts(_Scale, facts.LayerFacts(facts.PRESERVES, per_channel={"factor": 0}))
    try:
        assert facts.layer_facts(_Scale()).per_channel == {"factor": 0}
    finally:
        registration.undo()
    assert facts.layer_facts(_Scale()) is None
    with facts.register_layer_facts(_Scale, facts.LayerFacts(facts.MIXES)):
        assert facts.layer_facts(_Scale()).channels == facts.MIXES
    assert facts.layer_facts(_Scale()) is None


def test_reregistering_then_undoing_restores_the_builtin_facts():
    builtin = facts.layer_facts(keras.layers.Dense(3))
    with facts.register_layer_facts(keras.layers.Dense, facts.LayerFacts(facts.MIXES)):
        assert facts.layer_facts(keras.layers.Dense(3)).channels == facts.MIXES
    assert facts.layer_facts(keras.layers.Dense(3)) == builtin


def test_handler_registration_is_scoped():
    with kerasq.register_handler(_Scale, kerasq.quantization.LayerHandler()):
        assert kerasq.quantization.get_handler(_Scale()) is not None
    assert kerasq.quantization.get_handler(_Scale()) is None


def test_subclass_overriding_call_shares_no_facts():
    class Plain(keras.layers.Dense):
        pass

    class Different(keras.layers.Dense):
        def call(self, x):
            return super().call(x) * 2.0

    assert facts.layer_facts(Plain(2)).channels == facts.PRODUCES
    assert facts.layer_facts(Different(2)) is None


@pytest.mark.parametrize(
    "layer, input_shape, kernel, out_axis, in_axis",
    [
        (keras.layers.Dense(5), (None, 3), "kernel", -1, 0),
        (keras.layers.Conv2D(5, 3), (None, 8, 8, 3), "kernel", -1, -2),
        (keras.layers.Conv2DTranspose(5, 3), (None, 8, 8, 3), "kernel", -2, -1),
        (keras.layers.DepthwiseConv2D(3), (None, 8, 8, 3), "kernel", (-2, -1), -2),
        (keras.layers.SeparableConv2D(5, 3), (None, 8, 8, 3), "pointwise_kernel", -1, -2),
    ],
)
def test_builtin_kernel_facts_match_the_weights(layer, input_shape, kernel, out_axis, in_axis):
    layer.build(input_shape)
    layer_facts = facts.layer_facts(layer)
    assert layer_facts.output_kernel == kernel
    assert layer_facts.kernels[kernel] == facts.Kernel(out_axis, in_axis)
    out_size = kerasq.graph.rules.output_channels(layer)
    assert out_size == layer.compute_output_shape(input_shape)[-1]
    assert np.asarray(getattr(layer, kernel)).shape[in_axis] == (input_shape[-1] if kernel != "pointwise_kernel" else 3)


def test_custom_layer_described_once_is_quantized_and_grouped():
    """A layer kerasq only knows from its facts trains quantized and exports fully int8."""

    @keras.saving.register_keras_serializable(package="kerasq_tests")
    class MatMul(keras.layers.Layer):
        def __init__(self, units, **kwargs):
            super().__init__(**kwargs)
            self.units = units

        def build(self, input_shape):
            self.kernel = self.add_weight(shape=(input_shape[-1], self.units), name="kernel")

        def call(self, x):
            return keras.ops.matmul(x, self.kernel)

        def compute_output_shape(self, input_shape):
            return input_shape[:-1] + (self.units,)

        def get_config(self):
            return {**super().get_config(), "units": self.units}

    model = keras.Sequential([keras.Input((6,)), MatMul(4, name="custom"), keras.layers.ReLU(), keras.layers.Dense(2)])
    described = facts.LayerFacts(facts.PRODUCES, {"kernel": facts.Kernel(out_axis=-1, in_axis=0)})
    with facts.register_layer_facts(MatMul, described):
        qat = kerasq.quantize_model(model)
        wrapper = qat.get_layer("quant_custom")
        x = _random(64, 6)
        qat(x, training=True)  # learn ranges
        kernel = np.asarray(model.get_layer("custom").kernel)
        step = np.abs(kernel).max() / 127
        quantized = np.asarray(wrapper(keras.ops.convert_to_tensor(np.eye(6, dtype="float32"))))
        # The wrapper's output grid is coarse, but the kernel it multiplies is the int8 one: its rows
        # stay within one weight step plus one output step of the float kernel.
        output_step = np.diff(wrapper.quantization_ranges()["output"])[0] / 255
        np.testing.assert_allclose(quantized, kernel, atol=step + output_step + 1e-6)
        tflite = kerasq.TFLiteModel(kerasq.export_tflite(qat))
        assert tflite.is_fully_integer
        groups = channel_groups(LayerGraph(model))
        (group,) = [g for g in groups if g.removable]
        assert [node.layer.name for node in group.producers] == ["custom"]
    assert facts.layer_facts(model.get_layer("custom")) is None


# ---- weight maps --------------------------------------------------------------------------------


def test_weight_transforms():
    value = np.arange(6, dtype="float32").reshape(2, 3)
    assert take(-1, [2, 0])(value).tolist() == [[2, 0], [5, 3]]
    assert pad(0, 3)(value)[2].tolist() == [0, 0, 0]
    assert pad(1, 4, fill=lambda shape: np.ones(shape))(value)[:, 3].tolist() == [1, 1]
    assert repeat(1, 2)(value).shape == (2, 6)
    assert reduce_sum(0)(value).tolist() == [[3, 5, 7]]
    assert reshape((3, 2))(value).shape == (3, 2)


def test_weight_map_refuses_a_wrong_shape_naming_layer_and_shapes():
    source, target = keras.layers.Dense(4, name="src"), keras.layers.Dense(3, name="dst")
    source.build((None, 2))
    target.build((None, 2))
    before = _weights(target)
    weights = WeightMap()
    weights.assign(target, "bias", np.ones(3))  # fine on its own
    weights.assign(target, "kernel", source.kernel)
    with pytest.raises(WeightShapeError, match=r"\(2, 4\).*'dst'.*kernel.*\(2, 3\)"):
        weights.apply()
    # Nothing was written: the check runs before any assignment.
    for old, new in zip(before, _weights(target)):
        np.testing.assert_array_equal(old, new)


def test_weight_map_names_unknown_weights():
    layer = keras.layers.Dense(2, name="d")
    layer.build((None, 2))
    weights = WeightMap()
    weights.assign(layer, "gamma", np.ones(2))
    with pytest.raises(KeyError, match="'d' has no single weight named 'gamma'"):
        weights.apply()


# ---- rewriting ----------------------------------------------------------------------------------


def _conv_bn_conv(filters):
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(filters, 3, padding="same", name="conv1"),
            keras.layers.BatchNormalization(name="bn1"),
            keras.layers.ReLU(name="relu1"),
            keras.layers.Conv2D(5, 3, name="conv2"),
        ]
    )


def test_substitution_that_changes_shapes_matches_a_hand_built_model():
    """Halve conv1's filters: slice its kernel and bias, its BatchNorm and conv2's input channels."""
    model = _randomize(_conv_bn_conv(8))
    keep = [1, 3, 4, 6]

    def narrow(layer, rewrite):
        layer_facts = facts.layer_facts(layer)
        if layer.name == "conv1":
            new = rewrite.clone(layer, filters=len(keep), copy_weights=False)
            for name, kernel in layer_facts.kernels.items():
                rewrite.weights.assign(new, name, getattr(layer, name), take(kernel.out_axis, keep))
        elif layer.name == "bn1":
            new = rewrite.clone(layer, copy_weights=False)
        elif layer.name == "conv2":
            new = rewrite.clone(layer, copy_weights=False)
            for name, kernel in layer_facts.kernels.items():
                rewrite.weights.assign(new, name, getattr(layer, name), take(kernel.in_axis, keep))
            rewrite.weights.assign(new, "bias", layer.bias)
            return new
        else:
            return None
        for name, axis in layer_facts.per_channel.items():
            rewrite.weights.assign(new, name, getattr(layer, name), take(axis, keep))
        return new

    rebuilt = Rewrite(model, narrow).run()

    expected = _conv_bn_conv(len(keep))
    conv1, bn1, conv2 = (model.get_layer(n) for n in ("conv1", "bn1", "conv2"))
    expected.get_layer("conv1").set_weights([np.asarray(conv1.kernel)[..., keep], np.asarray(conv1.bias)[keep]])
    expected.get_layer("bn1").set_weights([w[keep] for w in bn1.get_weights()])
    expected.get_layer("conv2").set_weights([np.asarray(conv2.kernel)[:, :, keep, :], np.asarray(conv2.bias)])
    x = _random(4, 8, 8, 3)
    np.testing.assert_array_equal(np.asarray(rebuilt(x)), np.asarray(expected(x)))
    assert rebuilt.get_layer("conv1").kernel.shape == (3, 3, 3, 4)


def test_substitution_with_wrong_weights_names_the_layer_and_shapes():
    model = _conv_bn_conv(8)

    def narrow(layer, rewrite):
        if layer.name == "conv1":
            return rewrite.clone(layer, filters=4)  # copies the 8-filter kernel: must be refused

    with pytest.raises(WeightShapeError, match=r"\(3, 3, 3, 8\).*'conv1'.*\(3, 3, 3, 4\)"):
        Rewrite(model, narrow).run()


def test_rewrite_keeps_shared_layers_shared_and_names_unique():
    inputs = keras.Input((4,))
    shared = keras.layers.Dense(4, name="shared")
    outputs = keras.layers.Add(name="add")([shared(inputs), shared(shared(inputs))])
    model = keras.Model(inputs, outputs)
    rewrite = Rewrite(model)
    rebuilt = rewrite.run()
    dense = [layer for layer in rebuilt.layers if isinstance(layer, keras.layers.Dense)]
    assert len(dense) == 1 and dense[0] is not shared
    assert rewrite.names.take("shared") == "shared_2"
    x = _random(3, 4)
    np.testing.assert_allclose(np.asarray(rebuilt(x)), np.asarray(model(x)), rtol=1e-6)


def _with_backbone():
    backbone = keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, name="conv"), keras.layers.ReLU()], name="backbone"
    )
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.GlobalAveragePooling2D()(backbone(inputs))
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x)), backbone


def test_nested_model_kept_whole_on_request():
    model, backbone = _with_backbone()
    before = _weights(model)
    rebuilt = Rewrite(model, inline=False).run()
    nested = [layer for layer in rebuilt.layers if isinstance(layer, keras.Model)]
    assert len(nested) == 1 and nested[0] is not backbone and nested[0].name == "backbone"
    x = _random(2, 8, 8, 1)
    np.testing.assert_allclose(np.asarray(rebuilt(x)), np.asarray(model(x)), rtol=1e-6)
    inlined = Rewrite(model).run()
    assert not any(isinstance(layer, keras.Model) for layer in inlined.layers)
    for old, new in zip(before, _weights(model)):  # the user's model is untouched
        np.testing.assert_array_equal(old, new)


def test_nested_model_kept_whole_is_rewritten_with_the_same_substitute():
    model, _ = _with_backbone()

    def wider_conv(layer, rewrite):
        if layer.name == "conv":
            new = rewrite.clone(layer, filters=6, copy_weights=False)
            rewrite.weights.assign(new, "kernel", layer.kernel, pad(-1, 6))
            rewrite.weights.assign(new, "bias", layer.bias, pad(0, 6))
            return new
        if layer.name == "head":  # outside the nested model: its input rows grow with the conv
            new = rewrite.clone(layer, copy_weights=False)
            rewrite.weights.assign(new, "kernel", layer.kernel, pad(0, 6))
            rewrite.weights.assign(new, "bias", layer.bias)
            return new

    rebuilt = Rewrite(model, wider_conv, inline=False).run()
    (nested,) = [layer for layer in rebuilt.layers if isinstance(layer, keras.Model)]
    assert nested.get_layer("conv").kernel.shape == (3, 3, 1, 6)
    x = _random(2, 8, 8, 1)  # zero filters and zero rows: the same function
    np.testing.assert_allclose(np.asarray(rebuilt(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-6)


def test_output_specs_know_shapes_and_dtypes():
    inputs = keras.Input((8, 8, 1), name="image")
    tokens = keras.Input((5,), dtype="int32", name="tokens")
    x = keras.layers.Conv2D(4, 3, strides=2, name="conv")(inputs)
    y = keras.layers.Embedding(10, 3, name="embed")(tokens)
    model = keras.Model([inputs, tokens], [x, y])
    graph = LayerGraph(model)
    by_name = {node.layer.name: node for node in graph.nodes}
    (conv_spec,) = graph.output_specs(by_name["conv"])
    assert tuple(conv_spec.shape) == (None, 3, 3, 4) and conv_spec.dtype == "float32"
    (token_spec,) = graph.output_specs(by_name["tokens"])
    assert token_spec.dtype == "int32"
    assert tuple(graph.output_specs(by_name["embed"])[0].shape) == (None, 5, 3)


def test_unserializable_custom_layer_gets_a_clear_error():
    class Settings:  # not serializable, so Keras cannot record it as a config entry by itself
        factor = 2.0

    class NoConfig(keras.layers.Layer):
        def __init__(self, factor):
            super().__init__()
            self.factor = factor

        def call(self, x):
            return x * self.factor.factor

    inputs = keras.Input((3,))
    model = keras.Model(inputs, NoConfig(Settings())(keras.layers.Dense(3)(inputs)))
    with pytest.raises(TypeError, match=r"NoConfig.*get_config"):
        LayerGraph(model)


def test_reading_a_long_graph_looks_up_each_models_operations_once(monkeypatch):
    """Reading stays linear in the graph's size: no scan of every layer for each call."""
    inputs = keras.Input((4,))
    x = inputs
    for i in range(300):
        x = keras.layers.ReLU(name=f"relu_{i}")(x)
    model = keras.Model(inputs, x)
    reads = []
    original = type(model).operations

    def counting(self):
        reads.append(self.name)
        return original.fget(self)

    monkeypatch.setattr(type(model), "operations", property(counting))
    graph = LayerGraph(model)
    assert len(graph.nodes) == 301
    # Keras's own get_config reads it a few times; a scan per layer call would read it 300 times.
    assert len(reads) <= 5


# ---- channel groups on real architectures -------------------------------------------------------


def _groups_by_producer(model):
    graph = LayerGraph(model)
    groups = channel_groups(graph)
    by_producer = {node.layer.name: group for group in groups for node in group.producers}
    by_member = {node.layer.name: group for group in groups for node in group.members}
    return groups, by_producer, by_member


def _only_inputs_and_outputs_fixed(groups):
    fixed = [g for g in groups if not g.removable]
    reasons = " ".join(reason for g in fixed for reason in g.fixed_by)
    return len(fixed) == 2 and "model input" in reasons and "model output" in reasons


@pytest.mark.slow
def test_channel_groups_resnet50():
    model = keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=10)
    groups, by_producer, by_member = _groups_by_producer(model)
    # A stage's residual stream: the shortcut conv and each block's last conv, joined by the Adds.
    stream = by_producer["conv2_block1_0_conv"]
    assert {n.layer.name for n in stream.producers} == {f"conv2_block{i}_{j}_conv" for i, j in ((1, 0), (1, 3), (2, 3), (3, 3))}
    assert stream.size == 256 and stream.removable
    assert {"conv2_block1_add", "conv2_block2_add", "conv2_block1_3_bn", "conv2_block2_out"} <= {n.layer.name for n in stream.members}
    assert {"conv2_block2_1_conv", "conv3_block1_0_conv", "conv3_block1_1_conv"} <= {n.layer.name for n in stream.consumers}
    # A block's inner channels belong to its own conv, carried by its BatchNorm and ReLU only.
    inner = by_producer["conv3_block2_1_conv"]
    assert [n.layer.name for n in inner.producers] == ["conv3_block2_1_conv"]
    assert {n.layer.name for n in inner.members} == {"conv3_block2_1_bn", "conv3_block2_1_relu"}
    assert [n.layer.name for n in inner.consumers] == ["conv3_block2_2_conv"]
    assert by_member["avg_pool"] is by_producer["conv5_block1_0_conv"]
    assert _only_inputs_and_outputs_fixed(groups)


@pytest.mark.slow
def test_channel_groups_mobilenet_v2():
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=10)
    groups, by_producer, by_member = _groups_by_producer(model)
    # Depthwise convs carry the expanded channels from the expand conv to the project conv.
    expanded = by_producer["block_2_expand"]
    assert "block_2_depthwise" in {n.layer.name for n in expanded.members}
    assert [n.layer.name for n in expanded.consumers] == ["block_2_project"]
    # The residual Add joins block 1's and block 2's project convs.
    stream = by_producer["block_2_project"]
    assert {n.layer.name for n in stream.producers} == {"block_1_project", "block_2_project"}
    assert "block_2_add" in {n.layer.name for n in stream.members}
    assert _only_inputs_and_outputs_fixed(groups)


@pytest.mark.slow
def test_channel_groups_densenet121_concatenations():
    model = keras.applications.DenseNet121(weights=None, input_shape=(32, 32, 3), classes=10)
    groups, by_producer, _ = _groups_by_producer(model)
    new_features = by_producer["conv2_block1_2_conv"]  # 32 channels appended by the first dense layer
    (whole, offset), = new_features.concatenated_into
    assert offset == 64 and whole.size == 96
    assert [part.id for part, _ in whole.parts] == [by_producer["conv1_conv"].id, new_features.id]
    assert all(size_offset[1] + size_offset[0].size <= whole.size for size_offset in whole.parts)
    assert _only_inputs_and_outputs_fixed(groups)


@pytest.mark.slow
def test_channel_groups_efficientnet_b0_squeeze_excitation():
    model = keras.applications.EfficientNetB0(weights=None, input_shape=(32, 32, 3), classes=10)
    groups, by_producer, _ = _groups_by_producer(model)
    # Squeeze-excitation: the Multiply joins the block's channels with the excitation conv's.
    block = by_producer["block2a_expand_conv"]
    assert "block2a_se_expand" in {n.layer.name for n in block.producers}
    assert "block2a_se_excite" in {n.layer.name for n in block.members}
    squeezed = by_producer["block2a_se_reduce"]
    assert [n.layer.name for n in squeezed.consumers] == ["block2a_se_expand"]
    # The input preprocessing (Rescaling, Normalization) carries the fixed input channels.
    fixed = [g for g in groups if not g.removable]
    assert any("model input" in " ".join(g.fixed_by) for g in fixed)


def test_channel_groups_stop_at_flatten_and_model_outputs():
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, name="conv"),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(6, name="hidden"),
            keras.layers.Dense(2, name="out"),
        ]
    )
    groups, by_producer, _ = _groups_by_producer(model)
    assert not by_producer["conv"].removable and "flat" in by_producer["conv"].fixed_by[0]
    assert by_producer["hidden"].removable
    assert not by_producer["out"].removable


# ---- composition: features see through each other's wrappers ------------------------------------


@keras.saving.register_keras_serializable(package="kerasq_tests")
class _HalfKernel(keras.layers.Wrapper):
    """A stand-in feature: runs its Dense/Conv with the kernel halved."""

    def call(self, x):
        kernel = self.layer.kernel
        with keras.StatelessScope(state_mapping=[(kernel, kernel * 0.5)], initialize_variables=False):
            return self.layer.call(x)


def _strip_half_kernel(wrapper, rewrite, **clone_options):
    clone = rewrite.clone(wrapper.layer, copy_weights=False, **clone_options)
    rewrite.weights.assign(clone, "kernel", wrapper.layer.kernel, kerasq.graph.apply_fn(lambda k: k * 0.5, "halve"))
    rewrite.weights.assign(clone, "bias", wrapper.layer.bias)
    return clone


def test_quantize_sees_through_another_features_wrapper():
    inputs = keras.Input((6,))
    x = _HalfKernel(keras.layers.Dense(8, name="dense"))(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(keras.layers.ReLU()(x)))
    x_data = _random(32, 6)
    with wrappers.register_wrapper(_HalfKernel, _strip_half_kernel):
        stripped = wrappers.strip_model(model)
        assert not any(isinstance(layer, _HalfKernel) for layer in stripped.layers)
        np.testing.assert_allclose(np.asarray(stripped(x_data)), np.asarray(model(x_data)), rtol=1e-5, atol=1e-6)
        qat = kerasq.quantize_model(model)
        wrapper = qat.get_layer("quant_dense")
        assert isinstance(wrapper.layer, keras.layers.Dense)
        np.testing.assert_allclose(np.asarray(wrapper.layer.kernel), np.asarray(model.layers[1].layer.kernel) * 0.5)


def test_strip_of_a_qat_model_folds_batchnorm_into_float_layers():
    model = _randomize(_conv_bn_conv(8))
    qat = kerasq.quantize_model(model)
    plain = wrappers.strip_model(qat)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in plain.layers)
    assert not any(isinstance(layer, kerasq.QuantizeWrapper) for layer in plain.layers)
    x = _random(4, 8, 8, 3)
    # The folded float model computes what the original does in inference (Quantize layers aside).
    float_path = keras.Sequential([keras.Input((8, 8, 3))] + [
        layer for layer in plain.layers if not isinstance(layer, (keras.layers.InputLayer, kerasq.Quantize))
    ])
    np.testing.assert_allclose(np.asarray(float_path(x)), np.asarray(model(x, training=False)), rtol=1e-4, atol=1e-4)
