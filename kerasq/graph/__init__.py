"""The one rewrite engine: read a Keras model's layer graph, substitute layers, map weights.

It knows no feature: quantization, pruning, clustering, channel removal and weight transfer each say
only what to substitute. `LayerGraph` reads a model (nested models inlined or kept whole, shapes
known), `Rewrite` rebuilds it with substitutes and a `WeightMap`, `layer_facts` says where a layer's
kernels and channels are, `channel_groups` which channels must be removed together, and `rules`
holds the graph patterns transforms share (BatchNorm folding, activation fusion).
"""

from kerasq.graph import rules
from kerasq.graph.channels import ChannelGroup, channel_groups
from kerasq.graph.cost import estimate_macs, layer_macs
from kerasq.graph.facts import (
    CONCATENATES,
    JOINS,
    MIXES,
    PRESERVES,
    PRODUCES,
    RESHAPES,
    Kernel,
    LayerFacts,
    layer_facts,
    register_layer_facts,
)
from kerasq.graph.reader import LayerGraph, Node, TensorRef, all_layers
from kerasq.graph.registry import ClassRegistry, Registration
from kerasq.graph.reindex import reindex_channels
from kerasq.graph.rewrite import Rewrite, UniqueNames
from kerasq.graph.variables import replaced_variables
from kerasq.graph.weights import (
    Transform,
    WeightMap,
    WeightShapeError,
    apply_fn,
    pad,
    reduce_sum,
    repeat,
    reshape,
    take,
    weight,
)
from kerasq.graph.wrappers import register_wrapper, strip, strip_model, unwrap
