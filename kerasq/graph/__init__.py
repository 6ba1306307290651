"""The one rewrite engine: read a Keras model's layer graph, substitute layers, map weights.

It knows no feature: quantization, pruning, clustering, channel removal and weight transfer all say
only what to substitute.
"""

from kerasq.graph.reader import LayerGraph, Node, TensorRef
from kerasq.graph.registry import ClassRegistry, Registration
