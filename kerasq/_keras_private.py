"""Every private Keras name kerasq depends on, in one place.

`tests/test_keras_private.py` fails loudly when a Keras release changes any of them.
"""

import inspect

from keras.src.models.functional import Functional  # noqa: F401  (no public alias exists)
from keras import KerasTensor


def is_functional(model):
    """True for Functional models and their subclasses (e.g. `keras.applications` models).

    Keras's config format counts a nested Functional model's own input-to-output node as node 0, so the
    graph reader has to know; `keras.Model` subclasses that are not Functional have no such node.
    """
    return isinstance(model, Functional)


def producer(tensor):
    """The layer whose call produced a symbolic `KerasTensor`, or None for any other value."""
    return producing_call(tensor)[0]


def consumers(tensor):
    """The layers (or operations) that take the symbolic `tensor` as an input, in call order."""
    layer = producer(tensor)
    if layer is None:
        return []
    return [node.operation for node in layer._outbound_nodes if any(t is tensor for t in node.arguments.keras_tensors)]


def producing_call(tensor):
    """`(layer, call keyword arguments)` of the call that produced a symbolic `KerasTensor`.

    `(None, {})` for any other value. A shared layer has one such call per use.
    """
    if not isinstance(tensor, KerasTensor):
        return None, {}
    history = getattr(tensor, "_keras_history", None)
    if not history:
        return None, {}
    layer, node_index, _ = history
    node = layer._inbound_nodes[node_index]
    return layer, dict(node.arguments.kwargs)


def build_input_shapes(model):
    """The input shape(s) a built subclassed model recorded when it was built, or None.

    `Model.build`, and the first call when `call` can be run on symbolic tensors, record them; a
    model whose `call` branches on tensor values records none.
    """
    shapes = getattr(model, "_build_shapes_dict", None) or {}
    return next(iter(shapes.values())) if len(shapes) == 1 else None


def track_for_tf_checkpoints(layer, variables):
    """Makes each variable a dependency of `layer`, by its name, for `tf.train.Checkpoint`.

    TensorFlow's object-based checkpoints reach a Keras layer's variables only through attributes
    bound to them: Keras hides its own variable lists from TensorFlow, and containers kerasq keeps
    variables in (lists, dicts, tuples set with `object.__setattr__`) are not TensorFlow data
    structures. `.keras` and `.weights.h5` files do not use these dependencies. A no-op on the other
    backends, which have no such checkpoints.
    """
    track = getattr(layer, "_track_trackable", None)
    if track is None:
        return
    for variable in variables:
        track(variable, name=variable.name)


def take_keywords_apart(wrapper, layer):
    """Makes `wrapper.call(inputs, *args, **kwargs)` take the keyword arguments of `layer.call` one
    by one, as `layer` does.

    Keras binds a layer's call arguments to the signature it recorded for `call` and takes `**kwargs`
    as one nested argument, which may not mix tensors and non-tensors (MultiHeadAttention's
    `attention_mask=m, use_causal_mask=True`). The wrapped layer's parameters, recorded as keyword
    parameters of the wrapper's signature, are bound one by one. `mask` is left out: Keras would fill
    it from the inputs' Keras masks.
    """
    signature = wrapper._call_signature
    own = list(signature.parameters.values())
    taken = {parameter.name for parameter in own} | {"mask"}
    keywords = [
        parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY,
                          default=None if parameter.default is parameter.empty else parameter.default)
        for parameter in list(inspect.signature(layer.call).parameters.values())[1:]
        if parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and parameter.name not in taken
    ]
    if not keywords:
        return
    last = len(own) - (own[-1].kind == inspect.Parameter.VAR_KEYWORD)
    wrapper._call_signature = signature.replace(parameters=own[:last] + keywords + own[last:])
