"""How features compose: every feature's wrapper layer exposes the layer it wraps and a strip.

A feature (quantization, pruning, clustering) registers its wrapper class with a `strip` function
that returns a plain layer with the feature's effect baked in (pruning's zeros, clustering's shared
values). Every transform reads a wrapped layer through `unwrap`, and `strip_model` removes them all,
so one feature's model can be handed to another.

Example:
>>> import keras
>>> from kerasq.graph import wrappers
>>> class Marker(keras.layers.Wrapper):
...     def call(self, x):
...         return self.layer(x)
>>> with wrappers.register_wrapper(Marker):
...     wrappers.unwrap(Marker(keras.layers.Dense(2, name="inner"))).name
'inner'
"""

import keras

from kerasq.graph.registry import ClassRegistry

_WRAPPERS = ClassRegistry("feature wrappers")


def register_wrapper(wrapper_class, strip_fn=None):
    """Registers a feature's wrapper layer class.

    `strip_fn(wrapper, rewrite, **clone_options)` returns the plain layer to use in its place (made
    with `rewrite.clone`, so its weights are carried over); by default a clone of the stripped inner
    layer. Returns a `Registration` (`undo()`, or use it as a context manager).
    """
    if not (isinstance(wrapper_class, type) and issubclass(wrapper_class, keras.layers.Wrapper)):
        raise TypeError(f"wrapper_class must be a keras.layers.Wrapper subclass; got {wrapper_class!r}.")
    return _WRAPPERS.register(wrapper_class, strip_fn or _strip_inner)


def is_wrapper(layer):
    """True for a registered feature wrapper."""
    return _WRAPPERS.lookup(layer) is not None


def unwrap(layer):
    """The layer inside any feature wrappers around `layer` (or `layer` itself)."""
    while is_wrapper(layer):
        layer = layer.layer
    return layer


def strip(layer, rewrite, **clone_options):
    """A plain copy of `layer` with every feature wrapper's effect baked in, made by `rewrite`."""
    strip_fn = _WRAPPERS.lookup(layer)
    if strip_fn is None:
        return rewrite.clone(layer, **clone_options)
    return strip_fn(layer, rewrite, **clone_options)


def strip_model(model, only=None):
    """A new model with every feature wrapper stripped (or only wrappers of the classes `only`);
    `model` is not changed. Nested models are kept whole; their wrappers are stripped too.
    """
    from kerasq.graph.rewrite import Rewrite

    def wanted(layer):
        return is_wrapper(layer) and (only is None or isinstance(layer, only))

    return Rewrite(model, lambda layer, rewrite: strip(layer, rewrite) if wanted(layer) else None,
                   inline=False).run()


def _strip_inner(wrapper, rewrite, **clone_options):
    return strip(wrapper.layer, rewrite, **clone_options)
