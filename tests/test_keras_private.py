"""The private Keras names kerasq depends on: a Keras release that moves one fails here, loudly."""

import importlib

import keras
import numpy as np


def test_module_imports():
    module = importlib.import_module("kerasq._keras_private")
    assert isinstance(module.Functional, type)
    assert issubclass(module.Functional, keras.Model)


def _functional():
    inputs = keras.Input((3,))
    return keras.Model(inputs, keras.layers.Dense(2)(inputs))


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(2)

    def call(self, inputs):
        return self.dense(inputs)


def test_is_functional_true_for_functional_models():
    from kerasq import _keras_private

    assert _keras_private.is_functional(_functional()) is True
    application = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, include_top=False
    )
    assert _keras_private.is_functional(application) is True


def test_is_functional_false_for_sequential_and_subclassed_models():
    from kerasq import _keras_private

    sequential = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    assert _keras_private.is_functional(sequential) is False
    subclassed = _Subclassed()
    subclassed(np.zeros((1, 3), "float32"))
    assert _keras_private.is_functional(subclassed) is False
    assert _keras_private.is_functional(keras.layers.Dense(2)) is False


def test_functional_config_counts_its_own_node_first():
    """The Keras config quirk the graph reader relies on: a nested Functional model's first call is
    node 1 in `output_layers` (node 0 is its own input-to-output node), a Sequential's is node 0."""
    inner_in = keras.Input((3,))
    inner = keras.Model(inner_in, keras.layers.Dense(2)(inner_in), name="inner")
    sequential = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)], name="seq")
    inputs = keras.Input((3,))
    model = keras.Model(inputs, [inner(inputs), sequential(inputs)])
    assert model.get_config()["output_layers"] == [["inner", 1, 0], ["seq", 0, 0]]


def test_producer_of_symbolic_tensors():
    """`producer` reads the private `_keras_history` of a KerasTensor."""
    from kerasq import _keras_private

    inputs = keras.Input((3,))
    dense = keras.layers.Dense(2)
    outputs = dense(inputs)
    assert _keras_private.producer(outputs) is dense
    assert _keras_private.producer(np.zeros(3)) is None
    assert _keras_private.producer(keras.ops.zeros(3)) is None


def test_producing_call_tells_the_calls_of_a_shared_layer_apart():
    """`producing_call` reads `_keras_history` and the layer's private `_inbound_nodes`."""
    from kerasq import _keras_private

    class Scale(keras.layers.Layer):
        def call(self, inputs, factor=1.0):
            return inputs * factor

    inputs = keras.Input((3,))
    scale = Scale()
    first, second = scale(inputs), scale(inputs, factor=2.0)
    assert _keras_private.producing_call(first) == (scale, {})
    assert _keras_private.producing_call(second) == (scale, {"factor": 2.0})
    assert _keras_private.producing_call(np.zeros(3)) == (None, {})


def test_build_input_shapes_of_a_built_subclassed_model():
    from kerasq import _keras_private

    class Small(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    model = Small()
    assert _keras_private.build_input_shapes(model) is None
    model(np.ones((3, 4), "float32"))
    assert tuple(_keras_private.build_input_shapes(model)) == (3, 4)


def test_take_keywords_apart_lets_a_wrapper_mix_tensors_and_flags():
    """Keras takes a call's `**kwargs` as one nested argument that may not mix tensors and flags;
    the wrapped layer's parameters recorded in the wrapper's signature are bound one by one."""
    from kerasq import _keras_private

    class Passing(keras.layers.Wrapper):
        def __init__(self, layer, apart, **kwargs):
            super().__init__(layer, **kwargs)
            if apart:
                _keras_private.take_keywords_apart(self, layer)

        def call(self, inputs, *args, **kwargs):
            return self.layer(inputs, *args, **kwargs)

    x, m = keras.Input((4, 8)), keras.Input((4, 4), dtype="bool")
    for apart in (False, True):
        attention = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
        attention(x, x)  # built
        wrapper = Passing(attention, apart)
        try:
            wrapper(x, x, attention_mask=m, use_causal_mask=True)
            mixed = True
        except ValueError as error:
            assert "cannot mix tensors and non-tensors" in str(error)
            mixed = False
        assert mixed is apart
