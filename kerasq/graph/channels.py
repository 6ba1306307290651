"""Which channels must be removed together: the channel groups of a model's graph.

Removing output channel k of a Conv means removing channel k from everything that carries those
channels on (its BatchNorm, activations, pooling, a depthwise conv), from every tensor joined with
them elementwise (both sides of a residual Add), and from the input axis of every layer that reads
them. A `ChannelGroup` is one such set of tensors with the same channel indexing. Concatenations make
a group of their own whose channels are their inputs' groups side by side (`parts`).

Example:
>>> import keras
>>> from kerasq.graph import LayerGraph, channel_groups
>>> inputs = keras.Input((8, 8, 3))
>>> a = keras.layers.Conv2D(4, 3, padding="same", name="a")(inputs)
>>> b = keras.layers.Conv2D(4, 3, padding="same", name="b")(a)
>>> outputs = keras.layers.Dense(2, name="head")(keras.layers.Add(name="add")([a, b]))
>>> groups = channel_groups(LayerGraph(keras.Model(inputs, outputs)))
>>> [sorted(node.layer.name for node in g.producers) for g in groups if g.removable]
[['a', 'b']]
"""

import dataclasses
from typing import List

import keras

from kerasq.graph import facts as facts_lib
from kerasq.graph.reader import TensorRef, _leaves
from kerasq.graph.wrappers import unwrap


@dataclasses.dataclass
class ChannelGroup:
    """Tensors whose channels are removed together.

    Attributes:
        id: the group's index in `channel_groups`' list.
        size: the number of channels.
        tensors: the `TensorRef`s that carry these channels, all indexed alike.
        producers: nodes whose kernels create the channels (slice their output axis).
        members: nodes that carry them through (slice their per-channel weights, if any).
        consumers: nodes that read them on their kernels' input axis (slice that axis).
        parts: for a concatenation's output, `(group, offset)` of each input's channels.
        concatenated_into: `(group, offset)` of each concatenation these channels go into.
        fixed_by: why the channels cannot be removed (model inputs/outputs, layers that mix
            channels); empty when they can.
    """

    id: int
    size: int
    tensors: List = dataclasses.field(default_factory=list)
    producers: List = dataclasses.field(default_factory=list)
    members: List = dataclasses.field(default_factory=list)
    consumers: List = dataclasses.field(default_factory=list)
    parts: List = dataclasses.field(default_factory=list)
    concatenated_into: List = dataclasses.field(default_factory=list)
    fixed_by: List[str] = dataclasses.field(default_factory=list)

    @property
    def removable(self):
        return not self.fixed_by and bool(self.producers or self.parts)

    def __repr__(self):
        names = [node.path for node in self.producers]
        state = "removable" if self.removable else f"fixed ({self.fixed_by[0]})" if self.fixed_by else "fixed"
        return f"ChannelGroup({self.id}, size={self.size}, producers={names}, {state})"


def channel_groups(graph):
    """The channel groups of a `LayerGraph`, in the order their tensors first appear."""
    return _GroupBuilder(graph).build()


class _GroupBuilder:
    def __init__(self, graph):
        self.graph = graph
        self.parent = {}
        self.producers, self.members, self.consumers = {}, {}, {}
        self.fixed = {}
        self.parts = {}  # a concatenation's output ref -> [(input ref, offset)]

    # ---- union-find over tensors ----------------------------------------------------------------
    def find(self, ref):
        self.parent.setdefault(ref, ref)
        while self.parent[ref] != ref:
            self.parent[ref] = self.parent[self.parent[ref]]
            ref = self.parent[ref]
        return ref

    def union(self, a, b):
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            self.parent[root_b] = root_a

    def fix(self, ref, reason):
        self.fixed.setdefault(ref, []).append(reason)

    def channels(self, ref):
        shape = self.graph.spec(ref).shape
        return shape[-1] if len(shape) >= 2 else None

    # ---- reading the graph ----------------------------------------------------------------------
    def build(self):

        graph = self.graph
        for node in graph.nodes:
            outputs = [TensorRef(node.id, i) for i in range(len(graph.output_specs(node)))]
            inputs = [ref for ref in node.input_refs if self.channels(ref) is not None]
            outputs = [ref for ref in outputs if self.channels(ref) is not None]
            for ref in inputs + outputs:
                self.find(ref)
            if node.is_input:
                for ref in outputs:
                    self.fix(ref, f"model input '{node.input_spec[2]}'")
                continue
            self._read_node(node, inputs, outputs)
        for ref in _leaves(graph.outputs):
            if isinstance(ref, TensorRef) and ref in self.parent:
                self.fix(ref, f"model output of '{graph.producer(ref).path}'")
        return self._groups()

    def _read_node(self, node, inputs, outputs):
        layer = unwrap(node.layer)
        layer_facts = facts_lib.layer_facts(layer) if isinstance(layer, keras.layers.Layer) else None
        flow = layer_facts.channels if layer_facts else None
        if flow is not None and layer_facts.channel_axis not in (-1,) and not _is_last(node, layer_facts, self):
            flow = None  # channels_first layouts are left alone
        if flow == facts_lib.RESHAPES:
            same = len(inputs) == 1 and len(outputs) == 1 and self.channels(inputs[0]) == self.channels(outputs[0])
            flow = facts_lib.PRESERVES if same else None
        if flow == facts_lib.CONCATENATES:
            rank = len(self.graph.spec(outputs[0]).shape)
            if layer_facts.concat_axis % rank != rank - 1:
                flow = facts_lib.JOINS
        if flow == facts_lib.PRODUCES:
            reads_channels = any(kernel.in_axis is not None for kernel in layer_facts.kernels.values())
            for ref in inputs:
                if reads_channels:
                    self.consumers.setdefault(self.find(ref), []).append((ref, node))
            for ref in outputs:
                self.producers.setdefault(ref, []).append(node)
        elif flow in (facts_lib.PRESERVES, facts_lib.JOINS) and outputs:
            (out,) = outputs[:1]
            for ref in inputs:
                if self.channels(ref) == self.channels(out):
                    self.union(out, ref)
                else:  # broadcast along channels: the channels do not line up
                    self.fix(ref, f"broadcast by '{node.path}'")
            self.members.setdefault(out, []).append(node)
        elif flow == facts_lib.CONCATENATES and outputs:
            offset, parts = 0, []
            for ref in node.input_refs:
                parts.append((ref, offset))
                offset += self.channels(ref)
            self.parts[outputs[0]] = parts
        else:
            kind = "a bare operation" if not isinstance(layer, keras.layers.Layer) else type(layer).__name__
            reason = f"'{node.path}' ({kind}) mixes channels or is not known to kerasq"
            for ref in inputs + outputs:
                self.fix(ref, reason)

    # ---- the result -----------------------------------------------------------------------------
    def _groups(self):
        order, groups = [], {}
        for ref in self.parent:
            root = self.find(ref)
            if root not in groups:
                groups[root] = ChannelGroup(id=len(order), size=self.channels(ref))
                order.append(root)
            group = groups[root]
            group.tensors.append(ref)
            group.producers.extend(self.producers.get(ref, []))
            group.members.extend(self.members.get(ref, []))
            group.fixed_by.extend(self.fixed.get(ref, []))
        for root, entries in self.consumers.items():
            group = groups[self.find(root)]
            group.consumers.extend(node for _, node in entries if node not in group.consumers)
        for out, parts in self.parts.items():
            whole = groups[self.find(out)]
            for ref, offset in parts:
                part = groups[self.find(ref)]
                whole.parts.append((part, offset))
                part.concatenated_into.append((whole, offset))
        changed = True
        while changed:  # a concatenation whose channels are fixed fixes the channels it is made of
            changed = False
            for group in groups.values():
                for part, _ in group.parts:
                    if group.fixed_by and not part.fixed_by:
                        part.fixed_by.append(f"concatenated into fixed group {group.id}")
                        changed = True
        for group in groups.values():
            group.fixed_by = list(dict.fromkeys(group.fixed_by))
        return [groups[root] for root in order]


def _is_last(node, layer_facts, builder):
    refs = node.input_refs
    if not refs:
        return True
    rank = len(builder.graph.spec(refs[0]).shape)
    return layer_facts.channel_axis % rank == rank - 1
