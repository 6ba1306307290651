"""Unit tests of kerasq.graph.LayerGraph: reading Sequential/Functional graphs and rebuilding them."""

import keras
import numpy as np
import pytest

from kerasq.graph import LayerGraph, TensorRef

RNG = np.random.default_rng(0)


def _random(*shape):
    return RNG.normal(size=shape).astype("float32")


def _same_layers(graph):
    """Rebuilds the graph calling the original layers: the result must compute exactly the same."""
    return graph.rebuild(lambda node, args, kwargs: node.layer(*args, **kwargs))


def _cloned_layers(graph):
    """Rebuilds the graph with one fresh clone per original layer (shared layers stay shared)."""
    clones = {}

    def call_layer(node, args, kwargs):
        key = id(node.layer)
        if key not in clones:
            clones[key] = (node.layer, type(node.layer).from_config(node.layer.get_config()))
        return clones[key][1](*args, **kwargs)

    model = graph.rebuild(call_layer)
    for original, clone in clones.values():
        clone.set_weights(original.get_weights())
    return model, {key: clone for key, (_, clone) in clones.items()}


def _assert_same_predictions(original, rebuilt, data):
    expected = keras.tree.flatten(original(data, training=False))
    actual = keras.tree.flatten(rebuilt(data, training=False))
    assert len(expected) == len(actual)
    for want, got in zip(expected, actual):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _by_path(graph):
    return {node.path: node for node in graph.nodes}


# ---- reading -------------------------------------------------------------------------------------


def test_sequential_nodes_in_order_with_one_input():
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(5, name="d1"),
            keras.layers.ReLU(name="r1"),
            keras.layers.Dense(2, name="d2"),
        ],
        name="seq",
    )
    graph = LayerGraph(model)
    assert [type(node.layer).__name__ for node in graph.nodes] == [
        "InputLayer", "Dense", "ReLU", "Dense",
    ]
    assert [node.layer for node in graph.nodes[1:]] == model.layers
    (input_node,) = [node for node in graph.nodes if node.is_input]
    batch_shape, dtype, _ = input_node.input_spec
    assert tuple(batch_shape) == (None, 6) and dtype == "float32"
    # Each layer reads the previous node's only output.
    for previous, node in zip(graph.nodes, graph.nodes[1:]):
        assert node.input_refs == [TensorRef(previous.id, 0)]
        assert graph.consumers(previous) == [node]
    assert graph.outputs == TensorRef(graph.nodes[-1].id, 0)
    assert [graph.is_model_output(node) for node in graph.nodes] == [False, False, False, True]


def test_sequential_rebuild_reproduces_predictions():
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(2)]
    )
    data = _random(7, 6)
    graph = LayerGraph(model)
    _assert_same_predictions(model, _same_layers(graph), data)
    clone, _ = _cloned_layers(graph)
    assert not set(map(id, clone.weights)) & set(map(id, model.weights))
    _assert_same_predictions(model, clone, data)


def test_functional_branches_consumers_and_outputs():
    inputs = keras.Input((4,), name="x")
    trunk = keras.layers.Dense(8, name="trunk")(inputs)
    left = keras.layers.Dense(3, name="left")(trunk)
    right = keras.layers.Dense(3, name="right")(trunk)
    merged = keras.layers.Add(name="add")([left, right])
    head = keras.layers.Dense(2, name="head")(merged)
    model = keras.Model(inputs, [head, left])
    graph = LayerGraph(model)
    nodes = _by_path(graph)

    assert {node.path for node in graph.consumers(nodes["trunk"])} == {"left", "right"}
    assert {node.path for node in graph.consumers(nodes["left"])} == {"add"}
    assert [node.path for node in graph.consumers(nodes["x"])] == ["trunk"]
    assert graph.consumers(nodes["head"]) == []
    outputs = {path for path, node in nodes.items() if graph.is_model_output(node)}
    assert outputs == {"head", "left"}
    assert graph.outputs == [TensorRef(nodes["head"].id, 0), TensorRef(nodes["left"].id, 0)]
    # Topological order: every input of a node comes from an earlier node.
    for node in graph.nodes:
        assert all(ref.node < node.id for ref in node.input_refs)

    _assert_same_predictions(model, _same_layers(graph), _random(5, 4))
    _assert_same_predictions(model, _cloned_layers(graph)[0], _random(5, 4))


def test_consumer_reading_one_tensor_twice_is_listed_once():
    inputs = keras.Input((3,))
    dense = keras.layers.Dense(3, name="dense")(inputs)
    doubled = keras.layers.Add(name="add")([dense, dense])
    model = keras.Model(inputs, doubled)
    graph = LayerGraph(model)
    nodes = _by_path(graph)
    assert [node.path for node in graph.consumers(nodes["dense"])] == ["add"]
    assert nodes["add"].input_refs == [TensorRef(nodes["dense"].id, 0)] * 2
    _assert_same_predictions(model, _same_layers(graph), _random(4, 3))


def test_multi_input_list_and_multi_output():
    first = keras.Input((4,), name="first")
    second = keras.Input((2,), name="second")
    joined = keras.layers.Concatenate(name="concat")([first, second])
    hidden = keras.layers.Dense(5, activation="relu", name="hidden")(joined)
    out_a = keras.layers.Dense(1, name="out_a")(hidden)
    out_b = keras.layers.Dense(3, name="out_b")(hidden)
    model = keras.Model([first, second], [out_a, out_b])
    graph = LayerGraph(model)
    nodes = _by_path(graph)

    assert [node.path for node in graph.nodes if node.is_input] == ["first", "second"]
    assert graph.inputs == [TensorRef(nodes["first"].id, 0), TensorRef(nodes["second"].id, 0)]
    assert nodes["concat"].input_refs == graph.inputs
    assert graph.outputs == [TensorRef(nodes["out_a"].id, 0), TensorRef(nodes["out_b"].id, 0)]

    rebuilt = _same_layers(graph)
    assert [tuple(t.shape) for t in rebuilt.inputs] == [(None, 4), (None, 2)]
    data = [_random(6, 4), _random(6, 2)]
    _assert_same_predictions(model, rebuilt, data)
    _assert_same_predictions(model, _cloned_layers(graph)[0], data)


def test_multi_input_dict():
    image = keras.Input((4,), name="image")
    meta = keras.Input((2,), name="meta")
    joined = keras.layers.Concatenate(name="concat")(
        [keras.layers.Dense(3, name="from_image")(image), meta]
    )
    outputs = keras.layers.Dense(2, name="head")(joined)
    model = keras.Model({"image": image, "meta": meta}, outputs)
    graph = LayerGraph(model)
    nodes = _by_path(graph)

    assert isinstance(graph.inputs, dict)
    assert graph.inputs == {
        "image": TensorRef(nodes["image"].id, 0),
        "meta": TensorRef(nodes["meta"].id, 0),
    }
    rebuilt = _same_layers(graph)
    data = {"image": _random(3, 4), "meta": _random(3, 2)}
    _assert_same_predictions(model, rebuilt, data)
    _assert_same_predictions(model, _cloned_layers(graph)[0], data)


def test_dict_outputs():
    inputs = keras.Input((4,))
    model = keras.Model(
        inputs,
        {"score": keras.layers.Dense(1, name="score")(inputs),
         "logits": keras.layers.Dense(3, name="logits")(inputs)},
    )
    graph = LayerGraph(model)
    assert isinstance(graph.outputs, dict) and set(graph.outputs) == {"score", "logits"}
    rebuilt = _same_layers(graph)
    data = _random(3, 4)
    expected, actual = model(data), rebuilt(data)
    for key in ("score", "logits"):
        np.testing.assert_array_equal(np.asarray(actual[key]), np.asarray(expected[key]))


def test_shared_layer_is_counted_and_stays_shared():
    shared = keras.layers.Dense(3, name="shared")
    left_in, right_in = keras.Input((3,), name="left"), keras.Input((3,), name="right")
    once = shared(left_in)
    twice = shared(shared(right_in))  # also called on its own output
    outputs = keras.layers.Add(name="add")([once, twice])
    model = keras.Model([left_in, right_in], outputs)
    graph = LayerGraph(model)

    calls = [node for node in graph.nodes if node.layer is shared]
    assert len(calls) == 3
    assert graph.calls_of(shared) == 3
    assert graph.calls_of(model.get_layer("add")) == 1
    assert graph.calls_of(keras.layers.Dense(1)) == 0
    assert [graph.call_index(node) for node in calls] == [0, 1, 2]
    assert graph.call_index(_by_path(graph)["add"]) == 0
    # One call reads another call's output.
    by_id = {node.id: node for node in graph.nodes}
    producers = [by_id[ref.node] for call in calls for ref in call.input_refs]
    assert sum(producer.layer is shared for producer in producers) == 1

    rebuilt, clones = _cloned_layers(graph)
    new_dense = [layer for layer in rebuilt.layers if isinstance(layer, keras.layers.Dense)]
    assert len(new_dense) == 1 and new_dense[0] is clones[id(shared)]
    assert len(new_dense[0].weights) == 2  # one kernel and one bias for all three calls
    data = [_random(4, 3), _random(4, 3)]
    _assert_same_predictions(model, rebuilt, data)


def test_layer_called_twice_counts_two():
    dense = keras.layers.Dense(4, name="dense")
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Add()([dense(inputs), dense(keras.layers.ReLU()(inputs))]))
    graph = LayerGraph(model)
    assert graph.calls_of(dense) == 2
    assert sum(node.layer is dense for node in graph.nodes) == 2
    rebuilt, clones = _cloned_layers(graph)
    assert sum(isinstance(layer, keras.layers.Dense) for layer in rebuilt.layers) == 1
    _assert_same_predictions(model, rebuilt, _random(3, 4))


# ---- nested models -------------------------------------------------------------------------------


def _inner_functional(name="inner"):
    inputs = keras.Input((4,), name=f"{name}_in")
    hidden = keras.layers.Dense(6, activation="relu", name="dense")(inputs)
    outputs = keras.layers.Dense(3, name="proj")(hidden)
    return keras.Model(inputs, outputs, name=name)


def test_nested_functional_is_inlined_with_paths():
    inner = _inner_functional()
    inputs = keras.Input((4,), name="x")
    hidden = inner(inputs)
    outputs = keras.layers.Dense(2, name="head")(hidden)
    model = keras.Model(inputs, outputs)
    graph = LayerGraph(model)

    assert [node.path for node in graph.nodes] == ["x", "inner/dense", "inner/proj", "head"]
    assert not any(isinstance(node.layer, keras.Model) for node in graph.nodes)
    nodes = _by_path(graph)
    assert nodes["inner/dense"].layer is inner.get_layer("dense")
    assert nodes["inner/dense"].scope == ("inner",)
    assert nodes["inner/dense"].input_refs == [TensorRef(nodes["x"].id, 0)]
    assert graph.consumers(nodes["inner/proj"]) == [nodes["head"]]

    rebuilt = _same_layers(graph)
    assert not any(isinstance(layer, keras.Model) for layer in rebuilt.layers)
    _assert_same_predictions(model, rebuilt, _random(5, 4))
    _assert_same_predictions(model, _cloned_layers(graph)[0], _random(5, 4))


def test_nested_sequential_is_inlined_with_paths():
    inner = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(5, name="dense"), keras.layers.ReLU(name="relu")],
        name="inner_seq",
    )
    inputs = keras.Input((4,), name="x")
    outputs = keras.layers.Dense(2, name="head")(inner(inputs))
    model = keras.Model(inputs, outputs)
    graph = LayerGraph(model)
    assert [node.path for node in graph.nodes] == ["x", "inner_seq/dense", "inner_seq/relu", "head"]
    _assert_same_predictions(model, _same_layers(graph), _random(5, 4))
    _assert_same_predictions(model, _cloned_layers(graph)[0], _random(5, 4))


def test_functional_nested_in_sequential_and_two_levels_deep():
    innermost = _inner_functional("innermost")
    middle_in = keras.Input((4,), name="middle_in")
    middle = keras.Model(
        middle_in, keras.layers.ReLU(name="relu")(innermost(middle_in)), name="middle"
    )
    model = keras.Sequential(
        [keras.Input((4,)), middle, keras.layers.Dense(2, name="head")], name="outer"
    )
    graph = LayerGraph(model)
    paths = [node.path for node in graph.nodes if not node.is_input]
    assert paths == ["middle/innermost/dense", "middle/innermost/proj", "middle/relu", "head"]
    _assert_same_predictions(model, _same_layers(graph), _random(5, 4))
    _assert_same_predictions(model, _cloned_layers(graph)[0], _random(5, 4))


def test_nested_model_whose_output_is_its_input():
    passthrough_in = keras.Input((4,), name="p_in")
    passthrough = keras.Model(passthrough_in, passthrough_in, name="passthrough")
    inputs = keras.Input((4,), name="x")
    outputs = keras.layers.Dense(2, name="head")(passthrough(inputs))
    model = keras.Model(inputs, outputs)
    graph = LayerGraph(model)
    nodes = _by_path(graph)
    assert set(nodes) == {"x", "head"}
    assert nodes["head"].input_refs == [TensorRef(nodes["x"].id, 0)]
    _assert_same_predictions(model, _same_layers(graph), _random(3, 4))


def test_nested_multi_input_multi_output_model():
    a, b = keras.Input((3,), name="a"), keras.Input((3,), name="b")
    total = keras.layers.Add(name="sum")([a, b])
    inner = keras.Model(
        [a, b], [keras.layers.Dense(2, name="p")(total), keras.layers.Dense(4, name="q")(total)],
        name="inner",
    )
    x, y = keras.Input((3,), name="x"), keras.Input((3,), name="y")
    p, q = inner([x, y])
    outputs = keras.layers.Concatenate(name="cat")([q, p])
    model = keras.Model([x, y], outputs)
    graph = LayerGraph(model)
    nodes = _by_path(graph)
    assert nodes["inner/sum"].input_refs == [TensorRef(nodes["x"].id, 0), TensorRef(nodes["y"].id, 0)]
    assert nodes["cat"].input_refs == [TensorRef(nodes["inner/q"].id, 0), TensorRef(nodes["inner/p"].id, 0)]
    _assert_same_predictions(model, _same_layers(graph), [_random(3, 3), _random(3, 3)])


def test_nested_model_called_twice_shares_its_layers():
    inner = _inner_functional()
    x, y = keras.Input((4,), name="x"), keras.Input((4,), name="y")
    merged = keras.layers.Add(name="add")([inner(x), inner(y)])
    model = keras.Model([x, y], keras.layers.Dense(2, name="head")(merged))
    graph = LayerGraph(model)
    assert graph.calls_of(inner.get_layer("dense")) == 2
    assert graph.calls_of(inner.get_layer("proj")) == 2
    rebuilt, _ = _cloned_layers(graph)
    assert sum(isinstance(layer, keras.layers.Dense) for layer in rebuilt.layers) == 3
    _assert_same_predictions(model, rebuilt, [_random(3, 4), _random(3, 4)])


def test_nested_functional_output_is_the_model_output():
    inner = _inner_functional()
    inputs = keras.Input((4,), name="x")
    model = keras.Model(inputs, inner(inputs))
    graph = LayerGraph(model)
    assert graph.outputs == TensorRef(_by_path(graph)["inner/proj"].id, 0)
    _assert_same_predictions(model, _same_layers(graph), _random(3, 4))


def test_shared_nested_functional_output_resolves_to_the_right_call():
    inner = _inner_functional()
    x, y = keras.Input((4,), name="x"), keras.Input((4,), name="y")
    first, second = inner(x), inner(y)
    model = keras.Model([x, y], [keras.layers.Add(name="add")([first, second]), first])
    graph = LayerGraph(model)
    _assert_same_predictions(model, _same_layers(graph), [_random(3, 4), _random(3, 4)])


def test_keras_application_backbone_is_inlined():
    backbone = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, include_top=False
    )
    inputs = keras.Input((32, 32, 3))
    pooled = keras.layers.GlobalAveragePooling2D(name="gap")(backbone(inputs))
    model = keras.Model(inputs, keras.layers.Dense(4, name="head")(pooled))
    graph = LayerGraph(model)
    inner = [node for node in graph.nodes if node.scope == (backbone.name,)]
    # Every layer of the backbone except its input is called once, inside the backbone's scope.
    assert len(inner) == len(backbone.layers) - 1
    assert all(graph.calls_of(layer) == 1 for layer in backbone.layers[1:])
    _assert_same_predictions(model, _same_layers(graph), _random(2, 32, 32, 3))


# ---- what it refuses -----------------------------------------------------------------------------


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(2)

    def call(self, inputs):
        return self.dense(inputs)


def test_subclassed_model_is_read_through_its_call():
    model = _Subclassed()
    model(np.zeros((1, 3), "float32"))
    graph = LayerGraph(model)
    assert [type(node.layer).__name__ for node in graph.nodes][1:] == ["Dense"]
    assert graph.nodes[1].layer is model.dense  # the model's own layer, weights and all


def test_subclassed_model_nested_in_functional_is_inlined():
    inner = _Subclassed()
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inner(inputs)))
    graph = LayerGraph(model)
    assert any(node.layer is inner.dense for node in graph.nodes)


def test_unbuilt_sequential_is_refused_with_advice():
    model = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match=r"keras\.Input"):
        LayerGraph(model)


@pytest.mark.parametrize("thing", [keras.layers.Dense(2), "model", None])
def test_non_model_is_refused(thing):
    with pytest.raises(TypeError, match="keras.Model"):
        LayerGraph(thing)


def test_reading_does_not_change_the_model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    before_layers = list(model.layers)
    before_weights = [w.copy() for w in model.get_weights()]
    before_config = model.get_config()
    graph = LayerGraph(model)
    graph.rebuild(lambda node, args, kwargs: node.layer(*args, **kwargs))
    assert model.layers == before_layers
    assert model.get_config() == before_config
    for before, after in zip(before_weights, model.get_weights()):
        np.testing.assert_array_equal(before, after)


# ---- bare operations -----------------------------------------------------------------------------


def test_bare_operations_are_nodes():
    """`a - b`, `keras.ops.*` and slicing on symbolic tensors are Keras operations, not layers."""
    a, b = keras.Input((4,), name="a"), keras.Input((4,), name="b")
    x = keras.ops.mean(keras.ops.reshape(a - b * 2.0, (-1, 2, 2)), axis=1)[:, :1]
    model = keras.Model([a, b], keras.layers.Dense(3, name="head")(x))
    graph = LayerGraph(model)
    kinds = [type(node.layer).__name__ for node in graph.nodes if not node.is_input]
    assert kinds == ["Multiply", "Subtract", "Reshape", "Mean", "GetItem", "Dense"]
    data = [_random(5, 4), _random(5, 4)]
    _assert_same_predictions(model, _same_layers(graph), data)
    _assert_same_predictions(model, _cloned_layers_or_operations(graph), data)


def _cloned_layers_or_operations(graph):
    def call_layer(node, args, kwargs):
        clone = type(node.layer).from_config(node.layer.get_config())
        if isinstance(node.layer, keras.layers.Layer):
            clone.build_from_config(node.layer.get_build_config())
            clone.set_weights(node.layer.get_weights())
        return clone(*args, **kwargs)

    return graph.rebuild(call_layer)
