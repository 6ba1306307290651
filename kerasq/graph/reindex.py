"""Rebuilds a model with the channels of some channel groups taken, dropped or repeated.

Removing channels (channel pruning, transfer into a narrower model) and repeating them (Net2Net
widening) are one operation: give each changed channel group the list of its old channel indices the
new model keeps, in order, with repeats allowed. Producers keep those output channels, members those
per-channel weights, consumers those input rows (divided by how often each channel is repeated when
`split_repeats`, which keeps the function the same). Everything else is copied.

Example:
>>> import keras, numpy as np
>>> from kerasq.graph import LayerGraph, channel_groups, reindex_channels
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="hidden"),
...                           keras.layers.Dense(2, name="out")])
>>> graph = LayerGraph(model)
>>> (hidden,) = [g for g in channel_groups(graph) if g.removable]
>>> wider = reindex_channels(graph, [hidden], {hidden.id: [0, 1, 2, 2]}, split_repeats=True)
>>> wider.get_layer("hidden").units
4
>>> x = np.ones((1, 4), "float32")
>>> bool(np.allclose(wider(x), model(x), atol=1e-6))
True
"""

import keras
import numpy as np

from kerasq.graph import facts as facts_lib
from kerasq.graph.rewrite import Rewrite
from kerasq.graph.weights import Transform, take, weight
from kerasq.graph.wrappers import unwrap

_WIDTH_KEYS = ("filters", "units", "output_dim")


def reindex_channels(graph, groups, indices, split_repeats=False):
    """A new model in which channel group `g` holds channels `indices[g.id]` of the old one.

    Args:
        graph: the `LayerGraph` of the model.
        groups: its `channel_groups(graph)`.
        indices: {group id: old channel indices, in the new order}; groups not listed are unchanged.
            A concatenation's group follows its parts, which must be listed instead.
        split_repeats: divide each consumer's input rows by how often their channel is repeated, so
            repeated channels add up to the original (Net2Net widening).
    """
    indices = {key: np.asarray(value, dtype=int) for key, value in indices.items()}
    for group in groups:
        if group.parts and any(part.id in indices for part, _ in group.parts):
            kept = [offset + indices.get(part.id, np.arange(part.size)) for part, offset in group.parts]
            indices[group.id] = np.concatenate(kept)
    plans = _plan(groups, indices)
    if not plans:
        return Rewrite(graph).run()
    return Rewrite(graph, lambda layer, rewrite: _reindex(layer, plans.get(id(layer)), rewrite, split_repeats)).run()


class _LayerPlan:
    """The channel indices one layer keeps: of its outputs (`out`, a producer), of the channels it
    carries (`member`), of its inputs (`inputs`, a consumer); each `(indices, old size)`."""

    def __init__(self):
        self.out = None
        self.inputs = None
        self.member = None


def _plan(groups, keep):
    plans = {}

    def plan_of(node):
        return plans.setdefault(id(node.layer), _LayerPlan())

    for group in groups:
        if group.id not in keep:
            continue
        indices = keep[group.id]
        for node in group.producers:
            plan_of(node).out = (indices, group.size)
        for node in group.members:
            plan_of(node).member = (indices, group.size)
        for node in group.consumers:
            plan_of(node).inputs = (indices, group.size)
    return plans


def _reindex(layer, plan, rewrite, split_repeats):
    if plan is None:
        return None
    inner = unwrap(layer)
    layer_facts = facts_lib.layer_facts(inner)
    changes = {}
    transforms = {}  # weight name -> [Transform]
    if plan.out is not None:
        indices, size = plan.out
        changes[_width_key(inner, size)] = len(indices)
        for name, kernel in layer_facts.kernels.items():
            if name == layer_facts.output_kernel:
                transforms.setdefault(name, []).append(take(kernel.out_axis, indices))
        for name, axis in layer_facts.per_channel.items():
            transforms.setdefault(name, []).append(take(axis, indices))
    if plan.member is not None:
        indices, size = plan.member
        for name, axis in layer_facts.per_channel.items():
            transforms.setdefault(name, []).append(take(axis, indices))
        if isinstance(inner, keras.layers.Reshape):
            changes["target_shape"] = tuple(inner.target_shape[:-1]) + (len(indices),)
    if plan.inputs is not None:
        indices, size = plan.inputs
        for name, kernel in layer_facts.kernels.items():
            if kernel.in_axis is None:
                continue
            in_size = weight(inner, name).shape[kernel.in_axis]
            factor = in_size // size  # a separable conv's pointwise rows: depth_multiplier per channel
            expanded = (indices[:, None] * factor + np.arange(factor)[None, :]).reshape(-1)
            transforms.setdefault(name, []).append(take(kernel.in_axis, expanded))
            if split_repeats:
                transforms[name].append(_divide_repeats(kernel.in_axis, expanded))
    new = rewrite.clone(inner, copy_weights=False, **changes)
    for variable in inner.weights:
        name = _weight_name(inner, variable)
        rewrite.weights.assign(new, name, variable, *transforms.get(name, []))
    return new


def _width_key(layer, size):
    config = layer.get_config()
    for key in _WIDTH_KEYS:
        if config.get(key) == size:
            return key
    raise ValueError(
        f"Cannot change the width of layer '{layer.name}' ({type(layer).__name__}): none of its settings "
        f"{_WIDTH_KEYS} is its channel count {size}. Leave it out with ratios={{'{layer.name}': 0.0}}."
    )


def _weight_name(layer, variable):
    """The attribute a weight is reached by (`kernel`, `gamma`...), else its path within the layer."""
    for name in ("kernel", "bias", "depthwise_kernel", "pointwise_kernel", "embeddings", "gamma", "beta",
                 "moving_mean", "moving_variance", "alpha", "mean", "variance", "count"):
        if getattr(layer, name, None) is variable:
            return name
    return variable.path




def _divide_repeats(axis, rows):
    """Divides each row along `axis` by how many times its source row appears in `rows`."""
    counts = np.bincount(rows)[rows].astype("float32")

    def divide(value):
        shape = [1] * value.ndim
        shape[axis] = len(rows)
        return value / counts.reshape(shape)

    return Transform(divide, f"divide repeated rows along axis {axis}")
