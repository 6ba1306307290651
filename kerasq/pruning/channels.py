"""Channel pruning: remove whole filters and units, and get a genuinely narrower model.

Unstructured zeros make a file smaller once compressed; removed channels make every op smaller and
faster. `prune_channels` ranks each channel group (`kerasq.graph.channel_groups`: the channels a Conv
produces together with everything that must lose them too: its BatchNorm, a depthwise conv, both
sides of a residual Add, the next layer's input) and rebuilds the model without the least important
channels, their weights carried over. Fine-tune it with `fit`, then quantize and export it.

Example:
>>> import keras, kerasq
>>> model = keras.Sequential([keras.Input((8, 8, 1)),
...     keras.layers.Conv2D(16, 3, name="conv"), keras.layers.BatchNormalization(), keras.layers.ReLU(),
...     keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10, name="logits")])
>>> slim = kerasq.prune_channels(model, ratio=0.5)
>>> slim.get_layer("conv").filters
8
"""

import math

import keras
import numpy as np

from kerasq.graph import LayerGraph, channel_groups, estimate_macs, facts, reindex_channels, rules, weight
from kerasq.graph.wrappers import unwrap

CRITERIA = ("l1", "l2", "bn_scale", "taylor")


def prune_channels(model, ratio=0.5, *, criterion="l1", ratios=None, min_channels=1, round_to=1, data=None,
                   loss=None, keep_params=None, keep_macs=None):
    """Returns a narrower copy of `model` without the least important channels; `model` is unchanged.

    Args:
        model: a built Sequential or Functional model (nested models are inlined).
        ratio: the fraction of each removable channel group's channels to remove, in [0, 1).
        criterion: how channels are ranked: "l1" or "l2" (norm of the filters that produce each
            channel, with a following BatchNorm folded in, each producer's norms scaled to mean 1 so
            producers of a residual group count alike) or "bn_scale" (|gamma| of the BatchNorms on
            the channels: network slimming; train with `kerasq.penalize_batchnorm_scales` first) or
            "taylor" (|activation x gradient of the loss| summed over each producer's output channel
            on `data`: the first-order estimate of the loss change when the channel is removed,
            Molchanov et al. 2017; TensorFlow backend).
        ratios: {layer name: ratio} overriding `ratio` for the group of channels that layer produces.
        min_channels: never keep fewer channels than this in a group.
        round_to: keep a multiple of this many channels (e.g. 4 or 8, which int8 kernels favour).
        data: `(x, y)` for the "taylor" criterion: a batch or a few (up to 256 samples are used).
        loss: the loss for "taylor" (a Keras loss or its name); by default the model's compiled loss.
        keep_params: instead of one ratio for every group, a global target: the fraction of the
            model's parameters to keep, in (0, 1]. Channels are removed across all groups, least
            important first (scores scaled to mean 1 within each group), until the channels'
            weights removed reach the target.
        keep_macs: the same target for the multiply-accumulates per inference
            (`kerasq.estimate_macs`), the measure closer to latency: the fraction to keep, in (0, 1].

    Channel groups that reach a model input or output, a Flatten that mixes positions, or a layer
    kerasq has no facts for keep all their channels.
    """
    _check_arguments(ratio, criterion, ratios, min_channels, round_to)
    graph = LayerGraph(model)
    groups = channel_groups(graph)
    taylor = _taylor_scores(model, graph, groups, data, loss) if criterion == "taylor" else None
    if keep_params is not None and keep_macs is not None:
        raise ValueError("Give keep_params or keep_macs, not both: one global target at a time.")
    for name, fraction, cost in (("keep_params", keep_params, _count_params), ("keep_macs", keep_macs, estimate_macs)):
        if fraction is None:
            continue
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"{name} is the fraction to keep, in (0, 1]; got {fraction}.")
        ratios = _ratios_for_target(model, graph, groups, criterion, taylor, cost, fraction, min_channels)
        ratio = 0.0
    keep = _choose_channels(graph, groups, ratio, criterion, ratios or {}, min_channels, round_to, taylor)
    return reindex_channels(graph, groups, keep)


def penalize_batchnorm_scales(model, l1=1e-4):
    """A copy of `model` whose BatchNorms' scales (gamma) carry an L1 penalty: train it, and the
    scales of channels the model can do without shrink towards zero, which
    `prune_channels(..., criterion="bn_scale")` then removes (network slimming, Liu et al. 2017).
    `model` is not changed.

    Example:
    >>> import keras, kerasq
    >>> model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(8, 3),
    ...                           keras.layers.BatchNormalization(name="bn"), keras.layers.ReLU()])
    >>> penalized = kerasq.penalize_batchnorm_scales(model, l1=1e-3)
    >>> type(penalized.get_layer("bn").gamma_regularizer).__name__
    'L1'
    """
    from kerasq.graph import Rewrite

    if not l1 > 0:
        raise ValueError(f"l1 must be a positive penalty strength (e.g. 1e-4); got {l1!r}.")

    def penalize(layer, rewrite):
        if isinstance(layer, keras.layers.BatchNormalization) and layer.scale:
            return rewrite.clone(layer, gamma_regularizer=keras.regularizers.L1(l1))
        return None

    return Rewrite(model, penalize, inline=False).run()


# ---- which channels stay ---------------------------------------------------------------------------

def _choose_channels(graph, groups, ratio, criterion, ratios, min_channels, round_to, taylor=None):
    """{group id: sorted channel indices to keep} for every group that loses channels."""
    keep = {}
    prunable = _prunable_groups(graph, groups)
    for group in groups:
        if group not in prunable:
            continue
        named = [ratios[n.layer.name] for n in group.producers if n.layer.name in ratios]
        group_ratio = max(named) if named else ratio
        count = max(min_channels, group.size - int(math.floor(group.size * group_ratio)))
        count = min(group.size, int(math.ceil(count / round_to) * round_to))
        if count >= group.size:
            continue
        scores = (taylor or {}).get(group.id)
        if scores is None:
            scores = channel_scores(graph, group, criterion if criterion != "taylor" else "l1")
        keep[group.id] = np.sort(np.argsort(-scores, kind="stable")[:count])
    return keep


def _ratios_for_target(model, graph, groups, criterion, taylor, cost, keep_fraction, min_channels):
    """Per-group ratios ({producer name: ratio}) that remove the least important channels across
    the model, as few as bring `cost(model)` (parameters, MACs) down to `keep_fraction` of the
    original. Found by bisection on how many of the globally ranked channels go, costing each
    candidate model."""
    candidates = []  # (score scaled within its group, group)
    for group in _prunable_groups(graph, groups):
        scores = (taylor or {}).get(group.id)
        if scores is None:
            scores = channel_scores(graph, group, criterion if criterion != "taylor" else "l1")
        scaled = np.sort(scores / max(float(np.mean(scores)), 1e-12))
        candidates.extend((float(value), group) for value in scaled[: max(0, group.size - min_channels)])
    candidates.sort(key=lambda item: item[0])
    target = keep_fraction * cost(model)

    def ratios_for(count):
        removed = {}
        for _, group in candidates[:count]:
            removed[group.id] = removed.get(group.id, 0) + 1
        # A ratio just above the count's fraction, so floor(size * ratio) is the count.
        return {node.layer.name: (removed[g.id] + 0.5) / g.size
                for g in groups if g.id in removed for node in g.producers}

    def cost_after(count):
        keep = _choose_channels(graph, groups, 0.0, criterion, ratios_for(count), min_channels, 1, taylor)
        return cost(reindex_channels(graph, groups, keep))

    low, high = 0, len(candidates)
    while low < high:  # the fewest removals that reach the target
        middle = (low + high) // 2
        if cost_after(middle) <= target:
            high = middle
        else:
            low = middle + 1
    return ratios_for(low)


def _count_params(model):
    return model.count_params()


def _prunable_groups(graph, groups):
    return [g for g in groups if g.removable and g.producers and not _is_shared(graph, g) and not _multiplies_channels(g)]


def _is_shared(graph, group):
    nodes = group.producers + group.members + group.consumers
    return any(graph.calls_of(node.layer) > 1 for node in nodes)


def _multiplies_channels(group):
    """A depthwise conv with depth_multiplier > 1 makes m channels per input channel: its output
    channels cannot be chosen one by one."""
    for node in group.producers:
        layer_facts = facts.layer_facts(unwrap(node.layer))
        if isinstance(layer_facts.kernels[layer_facts.output_kernel].out_axis, tuple):
            return True
    return False


def channel_scores(graph, group, criterion="l1"):
    """One importance score per channel of `group` (higher is more important), by `criterion`.

    "l1"/"l2": the norm of each producer's filter for the channel, as deployed: a BatchNorm folded
    into the producer scales it by gamma / sqrt(variance + epsilon). Each producer's norms are scaled
    to mean 1, so the producers of a residual stream count alike. "bn_scale": |gamma| of the
    BatchNorms on the channels.
    """
    scores = np.zeros(group.size)
    if criterion == "bn_scale":
        for node in group.members:
            layer = unwrap(node.layer)
            if isinstance(layer, keras.layers.BatchNormalization) and layer.scale:
                scores += np.abs(np.asarray(layer.gamma))
        if scores.any():
            return scores
    for node in group.producers:
        layer = unwrap(node.layer)
        layer_facts = facts.layer_facts(layer)
        name = layer_facts.output_kernel
        kernel = np.asarray(weight(layer, name))
        out_axis = layer_facts.kernels[name].out_axis % kernel.ndim
        flat = np.moveaxis(kernel, out_axis, 0).reshape(kernel.shape[out_axis], -1)
        norms = np.abs(flat).sum(axis=1) if criterion != "l2" else np.sqrt((flat**2).sum(axis=1))
        norms = norms * _folded_batchnorm_scale(graph, node, group.size)
        scores += norms / max(norms.mean(), 1e-12)
    return scores


def _folded_batchnorm_scale(graph, node, size):
    batchnorm_node = rules.foldable_batchnorm(graph, node)
    if batchnorm_node is None:
        return np.ones(size)
    batchnorm = unwrap(batchnorm_node.layer)
    gamma = np.asarray(batchnorm.gamma) if batchnorm.scale else np.ones(size)
    return np.abs(gamma) / np.sqrt(np.asarray(batchnorm.moving_variance) + batchnorm.epsilon)


def _taylor_scores(model, graph, groups, data, loss):
    """{group id: per-channel |sum over positions of activation x gradient|, averaged over samples and
    summed over the group's producers}, on a copy of the model (the user's is never called)."""
    import tensorflow as tf

    from kerasq.graph import Rewrite

    if keras.backend.backend() != "tensorflow":
        raise ValueError("criterion='taylor' needs the TensorFlow backend; use 'l1' or 'bn_scale' on others.")
    if data is None or not isinstance(data, (tuple, list)) or len(data) != 2:
        raise ValueError("criterion='taylor' needs data=(x, y): a batch of inputs and labels to take gradients on.")
    loss_fn = keras.losses.get(loss) if loss is not None else getattr(model, "loss", None)
    if loss_fn is None:
        raise ValueError("criterion='taylor' needs a loss: pass loss=..., or compile the model first.")
    if isinstance(loss_fn, str):
        loss_fn = keras.losses.get(loss_fn)
    x, y = (np.asarray(part)[:256] for part in data)
    wanted = {id(node): node for group in groups for node in group.producers}
    rewrite = Rewrite(graph)
    captured = {}

    def call(node, args, kwargs):
        outputs = rewrite.substitute(node)(*args, **kwargs)
        if id(node) in wanted:
            captured[node.id] = outputs
        return outputs

    copy = rewrite.run(call)
    order = sorted(captured)
    outputs = keras.tree.flatten(copy.outputs)
    if len(outputs) != 1:
        raise ValueError("criterion='taylor' takes a model with one output; use 'l1' or 'bn_scale' for this one.")
    probe = keras.Model(copy.input, outputs + [captured[i] for i in order])
    with tf.GradientTape() as tape:
        results = probe(x, training=False)
        predictions, activations = results[0], results[1:]
        value = loss_fn(y, predictions)
    gradients = tape.gradient(value, activations)
    per_node = {}
    for node_id, activation, gradient in zip(order, activations, gradients):
        product = (activation * gradient).numpy()
        spatial = tuple(range(1, product.ndim - 1))
        per_node[node_id] = np.abs(product.sum(axis=spatial) if spatial else product).mean(axis=0)
    return {
        group.id: sum(per_node[node.id] for node in group.producers)
        for group in groups
        if group.producers and all(node.id in per_node for node in group.producers)
    }


def _check_arguments(ratio, criterion, ratios, min_channels, round_to):
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1): the fraction of channels to remove; got {ratio}.")
    for name, value in (ratios or {}).items():
        if not 0.0 <= value < 1.0:
            raise ValueError(f"ratios['{name}'] must be in [0, 1); got {value}.")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}; got {criterion!r}.")
    if not isinstance(min_channels, int) or min_channels < 1:
        raise ValueError(f"min_channels must be an integer >= 1; got {min_channels!r}.")
    if not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be an integer >= 1; got {round_to!r}.")
