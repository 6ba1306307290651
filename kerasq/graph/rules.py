"""Graph patterns that several transforms look for: BatchNorm folding, single consumers.

Quantization folds a BatchNormalization into the Conv/Dense before it; channel removal slices the
same BatchNorm with the Conv's filters. Both ask `foldable_batchnorm`.

Example:
>>> import keras
>>> from kerasq.graph import LayerGraph, rules
>>> model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, name="conv"),
...                           keras.layers.BatchNormalization(name="bn"), keras.layers.ReLU()])
>>> graph = LayerGraph(model)
>>> conv = graph.nodes[1]
>>> rules.foldable_batchnorm(graph, conv).layer.name
'bn'
"""

import keras

from kerasq.graph import facts as facts_lib
from kerasq.graph.wrappers import unwrap


def sole_consumer(graph, node):
    """The one node that reads `node`'s outputs, or None (several readers, none, or a model output)."""
    if graph.is_model_output(node):
        return None
    consumers = graph.consumers(node)
    return consumers[0] if len(consumers) == 1 else None


def output_channels(layer, layer_facts=None):
    """How many channels a layer that `PRODUCES` them makes (from its output kernel's shape)."""
    from kerasq.graph.weights import weight

    layer_facts = layer_facts or facts_lib.layer_facts(layer)
    kernel = layer_facts.kernels[layer_facts.output_kernel]
    shape = tuple(weight(layer, layer_facts.output_kernel).shape)
    axes = kernel.out_axis if isinstance(kernel.out_axis, tuple) else (kernel.out_axis,)
    count = 1
    for axis in axes:
        count *= shape[axis]
    return count


def foldable_batchnorm(graph, node):
    """The BatchNormalization node that can be folded into `node`'s kernel, or None.

    It must be `node`'s only consumer, normalize `node`'s channel axis with one entry per channel
    `node` produces, and both must be called once, or equally often with each call of `node`'s layer
    read by a call of the BatchNorm alone (a shared Conv-BN pair, e.g. a Sequential model called
    twice: every call deploys the same folded kernel); `node` must produce its channels with kernels
    and no activation (a BatchNorm after a ReLU does not fold into the Conv before it).
    """
    layer = unwrap(node.layer)
    layer_facts = facts_lib.layer_facts(layer) if isinstance(layer, keras.layers.Layer) else None
    if layer_facts is None or not layer_facts.kernels:
        return None
    if _activation_name(layer) not in ("linear", None):
        return None
    candidate = sole_consumer(graph, node)
    if candidate is None or not _called_together(graph, node, candidate):
        return None
    batchnorm = unwrap(candidate.layer)
    if not isinstance(batchnorm, keras.layers.BatchNormalization):
        return None
    rank = len(graph.spec(candidate.input_refs[0]).shape)
    bn_axis = batchnorm.axis[0] if isinstance(batchnorm.axis, (list, tuple)) else batchnorm.axis
    if bn_axis % rank != layer_facts.channel_axis % rank:
        return None
    if batchnorm.moving_mean.shape[0] != output_channels(layer, layer_facts):
        return None
    return candidate


def _called_together(graph, node, consumer):
    """True when `node`'s layer and `consumer`'s are called once each, or equally often with every
    call of `node`'s layer read by a call of `consumer`'s alone."""
    calls = graph.calls_of(node.layer)
    if graph.calls_of(consumer.layer) != calls:
        return False
    return all(
        getattr(sole_consumer(graph, each), "layer", None) is consumer.layer for each in graph.nodes_of(node.layer)
    )


def _activation_name(layer):
    activation = getattr(layer, "activation", None)
    if activation is None:
        return None
    return getattr(activation, "__name__", None)
