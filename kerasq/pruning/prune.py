"""`prune_low_magnitude`, `strip_pruning` and `prune_scope`: tfmot's pruning API for Keras 3 models."""

import keras

from kerasq import _keras_private
from kerasq.graph import Rewrite, wrappers
from kerasq.graph.selection import layer_predicate
from kerasq.pruning.callbacks import pruning_layers
from kerasq.pruning.schedules import ConstantSparsity, PolynomialDecay, PruningSchedule
from kerasq.pruning.wrapper import PruneLowMagnitude, is_prunable


def prune_low_magnitude(
    to_prune,
    pruning_schedule=None,
    block_size=(1, 1),
    block_pooling_type="AVG",
    sparsity_m_by_n=None,
    regrow=False,
    skip=(),
):
    """Wraps layers so their kernels are pruned by magnitude during training (tfmot's name).

    Args:
        to_prune: a layer (returns its `PruneLowMagnitude` wrapper), a list of layers (returns a
            list), or a Sequential/Functional model, nested ones included (returns a new model in
            which every layer with kernels is wrapped; `to_prune` is not changed).
        pruning_schedule: a `PruningSchedule`; by default `ConstantSparsity(0.5, begin_step=0)`.
        block_size, block_pooling_type, sparsity_m_by_n, regrow: see `PruneLowMagnitude`.
        skip: for a model, layers to leave unpruned: names, layer classes, or a predicate
            `fn(layer) -> bool`. Layers already wrapped in `PruneLowMagnitude` keep their settings.

    Train the result with `callbacks=[kerasq.UpdatePruningStep()]`, then `strip_pruning` it.

    Example:
    >>> import keras, kerasq
    >>> model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3),
    ...                           keras.layers.Flatten(), keras.layers.Dense(10, name="head")])
    >>> pruned = kerasq.prune_low_magnitude(model, kerasq.ConstantSparsity(0.8, 0), skip=["head"])
    >>> [type(layer).__name__ for layer in pruned.layers]
    ['InputLayer', 'PruneLowMagnitude', 'Flatten', 'Dense']
    """
    options = dict(
        pruning_schedule=pruning_schedule if pruning_schedule is not None else ConstantSparsity(0.5, 0),
        block_size=block_size,
        block_pooling_type=block_pooling_type,
        sparsity_m_by_n=sparsity_m_by_n,
        regrow=regrow,
    )
    if isinstance(to_prune, keras.Model):
        return _prune_model(to_prune, options, layer_predicate(skip))
    if isinstance(to_prune, (list, tuple)):
        return [_prune_layer(layer, options) for layer in to_prune]
    if isinstance(to_prune, keras.layers.Layer):
        return _prune_layer(to_prune, options)
    raise TypeError(
        "prune_low_magnitude takes a keras layer, a list of layers, or a Sequential/Functional "
        f"model; got {type(to_prune).__name__}."
    )


def strip_pruning(model):
    """A new model of plain Keras layers with the pruned zeros baked into the kernels (tfmot's name).

    Only `PruneLowMagnitude` wrappers are removed; `model` is not changed.

    Example:
    >>> import keras, numpy as np, kerasq
    >>> model = kerasq.prune_low_magnitude(
    ...     keras.Sequential([keras.Input((16,)), keras.layers.Dense(8, name="dense")]),
    ...     kerasq.ConstantSparsity(0.5, 0))
    >>> kerasq.pruning.step(model)  # what UpdatePruningStep does before the first batch
    >>> plain = kerasq.strip_pruning(model)
    >>> dense = plain.get_layer("dense")
    >>> type(dense).__name__, float(np.mean(np.asarray(dense.kernel) == 0))
    ('Dense', 0.5)
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"strip_pruning takes a Keras model; got {type(model).__name__}.")
    if not pruning_layers(model):
        raise ValueError(
            f"Model '{model.name}' has no PruneLowMagnitude layers: it was already stripped, or never "
            "pruned, so there is nothing to strip. Export or train it as it is, or prune it first "
            "with kerasq.prune_low_magnitude."
        )

    return wrappers.strip_model(model, only=PruneLowMagnitude)


def prune_scope(*custom_objects):
    """Context manager for loading pruned models saved by tfmot-style code (tfmot's name).

    kerasq's pruning classes are registered with Keras on import, so `.keras` files load without
    it; it exists so tfmot-style code runs unchanged, and takes extra custom objects (dicts).
    """
    objects = {
        "PruneLowMagnitude": PruneLowMagnitude,
        "PruningSchedule": PruningSchedule,
        "ConstantSparsity": ConstantSparsity,
        "PolynomialDecay": PolynomialDecay,
    }
    for extra in custom_objects:
        objects.update(extra)
    return keras.saving.custom_object_scope(objects)


def _prune_layer(layer, options):
    if isinstance(layer, keras.Model):
        raise TypeError(
            f"'{layer.name}' is a model: pass it to prune_low_magnitude on its own (not in a list) to "
            "get a pruned copy."
        )
    if isinstance(layer, PruneLowMagnitude):
        raise ValueError(f"Layer '{layer.name}' is already wrapped in PruneLowMagnitude; wrap the plain layer once.")
    return PruneLowMagnitude(layer, **options)


def _prune_model(model, options, skip):
    if not (isinstance(model, keras.Sequential) or _keras_private.is_functional(model)):
        raise TypeError(
            f"prune_low_magnitude cannot read subclassed model '{model.name}' ({type(model).__name__}): "
            "wrap the layers inside it with kerasq.prune_low_magnitude(layer) where you build them, or "
            "pass a Sequential/Functional model."
        )
    wrapped = []

    def substitute(layer, rewrite):
        if isinstance(layer, PruneLowMagnitude):
            wrapped.append(layer)
            return None  # a renamed copy with its masks and step
        if isinstance(layer, keras.Model) or not isinstance(layer, keras.layers.Layer):
            return None
        if wrappers.is_wrapper(layer) or not is_prunable(layer) or skip(layer):
            return None
        wrapped.append(layer)
        inner = rewrite.clone(layer, unique_name=False)
        return PruneLowMagnitude(inner, name=rewrite.names.take(f"prune_low_magnitude_{layer.name}"), **options)

    pruned = Rewrite(model, substitute, inline=False).run()
    if not wrapped:
        raise ValueError(
            f"Model '{model.name}' has no layer to prune: kerasq prunes kernels (Dense, Conv*, "
            "DepthwiseConv*, SeparableConv*, Embedding, kerasq.pruning.PrunableLayer) and every such "
            "layer was skipped or none is there. Check `skip`, or register your layer's kernels with "
            "kerasq.graph.register_layer_facts."
        )
    return pruned
