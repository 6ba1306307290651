"""Subclassed models as Functional ones: their `call` followed on symbolic inputs.

A subclassed `keras.Model` hides its layer graph inside `call()`. Calling `call` on `keras.Input`
tensors runs each sublayer on symbolic tensors, which records the graph: the result is a Functional
model over the very same layer objects (and so the same weights). This works whenever `call` uses
only layers and `keras.ops` on its inputs, as most models do; Python control flow on tensor values
cannot be followed, and the error then says how to make the model Functional.

Example:
>>> import keras
>>> from kerasq.graph.tracing import as_functional
>>> class TwoLayers(keras.Model):
...     def __init__(self):
...         super().__init__()
...         self.hidden = keras.layers.Dense(8, activation="relu")
...         self.head = keras.layers.Dense(2)
...     def call(self, x):
...         return self.head(self.hidden(x))
>>> model = TwoLayers()
>>> _ = model(keras.ops.ones((1, 4)))
>>> functional = as_functional(model)
>>> [type(layer).__name__ for layer in functional.layers]
['InputLayer', 'Dense', 'Dense']
>>> functional.layers[1] is model.hidden
True
"""

import keras

from kerasq import _keras_private

HOW_TO_FIX = (
    "Build it with the Sequential or Functional API, or give kerasq a Functional model over the same "
    "layers: inputs = keras.Input(shape); model = keras.Model(inputs, outputs computed from inputs)."
)


def is_subclassed(model):
    """True for a `keras.Model` that is neither Sequential nor Functional."""
    return (
        isinstance(model, keras.Model)
        and not isinstance(model, keras.Sequential)
        and not _keras_private.is_functional(model)
    )


def as_functional(model):
    """`model` itself if it is Sequential or Functional; for a built subclassed model, a Functional
    model whose graph is its `call` followed on symbolic inputs (the same layers, the same weights).
    """
    if not is_subclassed(model):
        return model
    shapes = _input_shapes(model)
    inputs = [keras.Input(batch_shape=(None,) + tuple(shape[1:])) for shape in shapes]
    inputs = inputs[0] if len(inputs) == 1 else inputs
    try:
        traced = keras.Model(inputs, model.call(inputs), name=model.name)
    except Exception as error:  # noqa: BLE001 (any failure of the user's call() means: cannot follow it)
        raise TypeError(
            f"'{model.name}' (class {type(model).__name__}) is a subclassed model, and kerasq could not "
            f"follow its call() on symbolic inputs ({type(error).__name__}: {error}). {HOW_TO_FIX}"
        ) from error
    return traced


def layer_as_functional(layer):
    """A Functional model whose graph is a built custom layer's `call` followed on a symbolic input
    (the layer's own sublayers, the same weights), or None when its call cannot be followed (it
    takes several inputs, branches on tensor values, or computes with its own variables).

    Example:
    >>> import keras
    >>> from kerasq.graph.tracing import layer_as_functional
    >>> class Block(keras.layers.Layer):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.dense = keras.layers.Dense(4)
    ...     def call(self, x):
    ...         return x + self.dense(x)
    >>> block = Block()
    >>> _ = block(keras.ops.ones((1, 4)))
    >>> [type(op).__name__ for op in layer_as_functional(block).operations]
    ['InputLayer', 'Dense', 'Add']
    """
    shape = _keras_private.build_input_shapes(layer) if layer.built else None
    if shape is None or not shape or isinstance(shape[0], (list, tuple)) or _own_weights(layer):
        return None
    inputs = keras.Input(batch_shape=(None,) + tuple(shape[1:]), dtype=layer.input_dtype)
    try:
        return keras.Model(inputs, layer.call(inputs), name=layer.name)
    except Exception:  # noqa: BLE001 (any failure of the user's call() means: cannot follow it)
        return None


def _own_weights(layer):
    """True when `layer` holds variables of its own, beside its sublayers'."""
    inner = {id(weight) for sublayer in layer._layers for weight in sublayer.weights}
    return any(id(weight) not in inner for weight in layer.weights)


def _input_shapes(model):
    shape = _keras_private.build_input_shapes(model) if model.built else None
    if shape is None:
        raise TypeError(
            f"'{model.name}' (class {type(model).__name__}) is a subclassed model whose input shape kerasq "
            "cannot learn: it was never built, or its call() takes several arguments or branches on tensor "
            f"values. Call model.build(input_shape) if it can be built; otherwise: {HOW_TO_FIX}"
        )
    nested = isinstance(shape, (list, tuple)) and shape and isinstance(shape[0], (list, tuple))
    return [tuple(s) for s in shape] if nested else [tuple(shape)]
