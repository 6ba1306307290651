"""Every private Keras name kerasq depends on, in one place.

`tests/test_keras_private.py` fails loudly when a Keras release changes any of them.
"""

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
