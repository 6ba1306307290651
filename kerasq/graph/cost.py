"""How much arithmetic a model does: multiply-accumulates (MACs) per inference, from its layer facts.

A kernel of `k` weights applied at `p` positions costs `p * k` MACs: a Conv at every output pixel
(`k` = kh * kw * in / groups * out, so `p * k` = pixels * out * kh * kw * in / groups), a Dense at
every leading position, a depthwise kernel at every output pixel, a transposed Conv at every *input*
pixel (it scatters each input over its window). Embedding lookups, BatchNorm (folded on export),
activations, pooling and additions are not counted: they are small beside the kernels and differ by
runtime. The estimate is per sample (batch size 1) and needs a model with known spatial sizes.

Example:
>>> import keras
>>> from kerasq.graph import estimate_macs
>>> model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(16, 3, padding="same"),
...                           keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)])
>>> estimate_macs(model)  # 8*8 pixels x (3*3*3*16) + 16*10
27808
"""

import math

import keras

from kerasq.graph.facts import layer_facts
from kerasq.graph.reader import LayerGraph
from kerasq.graph.weights import weight
from kerasq.graph.wrappers import unwrap

_INPUT_POSITIONED = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)


def estimate_macs(model_or_graph):
    """Multiply-accumulates per sample of a Sequential/Functional model (or a `LayerGraph`)."""
    return sum(layer_macs(model_or_graph).values())


def layer_macs(model_or_graph):
    """`{node path: MACs per sample}` for every call of a layer with kernels."""
    graph = model_or_graph if isinstance(model_or_graph, LayerGraph) else LayerGraph(model_or_graph)
    costs = {}
    for node in graph.nodes:
        if node.is_input:
            continue
        layer = unwrap(node.layer)
        facts = layer_facts(layer)
        if facts is None or not facts.kernels or isinstance(layer, keras.layers.Embedding):
            continue
        if isinstance(layer, _INPUT_POSITIONED):
            shape = graph.spec(node.input_refs[0]).shape
        else:
            shape = graph.output_specs(node)[0].shape
        positions = _positions(shape, facts.channel_axis, node.path)
        kernel_size = sum(math.prod(weight(layer, name).shape) for name in facts.kernels)
        costs[node.path] = costs.get(node.path, 0) + positions * kernel_size
    return costs


def _positions(shape, channel_axis, where):
    """The number of positions (all but batch and channel axes) of a tensor of `shape`."""
    dims = list(shape[1:])
    del dims[channel_axis if channel_axis < 0 else channel_axis - 1]
    if any(d is None for d in dims):
        raise ValueError(
            f"Cannot count the MACs of '{where}': its input size is not fixed ({tuple(shape)}). Count them "
            "on a copy of the model built with a fixed input shape, e.g. keras.Input((224, 224, 3))."
        )
    return math.prod(dims)
