"""Rebuilds a model with layers substituted, names kept unique and weights carried over.

`Rewrite` is what every transform runs on. It asks a `substitute(layer, rewrite)` function once per
layer object (so a layer the model calls several times stays shared) for the layer to call in its
place, rebuilds the graph with those, and then applies its `WeightMap`: clones get their original's
weights, changed layers get theirs copied, sliced, padded or computed.

Example: halve a Conv's filters, slicing its weights and the next Conv's input channels.
>>> import keras, numpy as np
>>> from kerasq.graph import Rewrite, take
>>> model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(8, 3, name="a"),
...                           keras.layers.Conv2D(4, 3, name="b")])
>>> keep = [0, 1, 2, 3]
>>> def substitute(layer, rewrite):
...     if layer.name == "a":
...         new = rewrite.clone(layer, filters=4, copy_weights=False)
...         rewrite.weights.assign(new, "kernel", layer.kernel, take(-1, keep))
...         rewrite.weights.assign(new, "bias", layer.bias, take(0, keep))
...         return new
...     if layer.name == "b":
...         new = rewrite.clone(layer, copy_weights=False)
...         rewrite.weights.assign(new, "kernel", layer.kernel, take(-2, keep))
...         rewrite.weights.assign(new, "bias", layer.bias)
...         return new
>>> narrow = Rewrite(model, substitute).run()
>>> tuple(narrow.get_layer("a").kernel.shape)
(3, 3, 3, 4)
"""

import keras

from kerasq.graph.reader import LayerGraph, layer_config
from kerasq.graph.weights import WeightMap


class UniqueNames:
    """Hands out layer names, adding `_2`, `_3`... to names already taken."""

    def __init__(self, taken=()):
        self.taken = set(taken)

    def take(self, name):
        candidate, suffix = name, 1
        while candidate in self.taken:
            suffix += 1
            candidate = f"{name}_{suffix}"
        self.taken.add(candidate)
        return candidate


class Rewrite:
    """One rebuild of a model's graph.

    Args:
        model: a Sequential or Functional model, or a `LayerGraph` already read from one.
        substitute: `fn(layer, rewrite) -> layer or None`, asked once per layer object (and bare
            operation) for what to call in its place; None (or no function) means a renamed clone
            with the same weights. A nested model kept whole (`inline=False`) is rewritten with the
            same function unless `substitute` returns something for it.
        inline: which nested models to inline (see `LayerGraph`); ignored when `model` is a graph.
        weights: a `WeightMap` to add to (nested rewrites share their parent's).
    """

    def __init__(self, model, substitute=None, *, inline=True, weights=None):
        self.graph = model if isinstance(model, LayerGraph) else LayerGraph(model, inline=inline)
        self.weights = weights if weights is not None else WeightMap()
        self.names = UniqueNames(node.input_spec[2] for node in self.graph.nodes if node.is_input)
        self._substitute = substitute
        self._inline = inline
        self._substitutes = {}

    def clone(self, layer, *, name=None, unique_name=True, copy_weights=True, **config_changes):
        """A fresh layer of `layer`'s class and config (with `config_changes`) that shares no variable
        with `layer`, named `name` (by default `layer`'s), made unique in the new model unless
        `unique_name=False` (for a layer that lives inside a wrapper). With `copy_weights`, it gets
        `layer`'s weights once built; otherwise assign them with `self.weights.assign`."""
        config = layer_config(layer)
        config.update(config_changes)
        name = name or layer.name
        config["name"] = self.names.take(name) if unique_name else name
        clone = type(layer).from_config(config)
        if copy_weights:
            self.weights.copy_layer(clone, layer)
        return clone

    def substitute(self, node):
        """The layer that replaces `node.layer`, the same object for every call of it."""
        key = id(node.layer)
        if key not in self._substitutes:
            layer = node.layer
            replacement = self._substitute(layer, self) if self._substitute else None
            if replacement is None:
                replacement = self._default_substitute(layer)
            self._substitutes[key] = replacement
        return self._substitutes[key]

    def _default_substitute(self, layer):
        if isinstance(layer, keras.Model) and not _is_opaque(layer):
            nested = Rewrite(layer, self._substitute, inline=self._inline, weights=self.weights)
            return nested.run(name=self.names.take(layer.name), apply_weights=False)
        return self.clone(layer)

    def run(self, call=None, on_input=None, name=None, apply_weights=True, on_output=None):
        """Rebuilds the model and returns it.

        Args:
            call: `fn(node, args, kwargs) -> outputs` for each layer call; by default
                `self.substitute(node)(*args, **kwargs)`.
            on_input: `fn(node, tensor) -> tensor` applied to each new model input.
            on_output: `fn(index, tensor) -> tensor` applied to each model output.
            name: the new model's name (by default the original's).
            apply_weights: write the weight map into the new model (nested rewrites leave it to
                their parent).
        """
        call = call or (lambda node, args, kwargs: self.substitute(node)(*args, **kwargs))
        model = self.graph.rebuild(call, on_input=on_input, name=name, on_output=on_output)
        if apply_weights:
            self.weights.apply()
        return model


def _is_opaque(model):
    """A nested model whose graph cannot be read (subclassed): it is cloned whole, as a layer."""
    from kerasq import _keras_private

    return not (isinstance(model, keras.Sequential) or _keras_private.is_functional(model))
