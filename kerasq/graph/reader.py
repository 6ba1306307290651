"""Reads a Keras model's layer graph: one node per layer call, in topological order.

`LayerGraph` reads a Sequential or Functional model through its public config, the format `.keras`
files are loaded from. Nested Sequential/Functional models are inlined by default, so patterns such as
Conv -> BatchNorm -> ReLU are visible across model boundaries; `inline=False` (or a predicate) keeps
them whole, as one node each. Each node knows its output shapes and dtypes (`output_specs`). `rebuild`
calls a function per layer call and returns a new Functional model; the original model is never
called, changed or rebuilt. `kerasq.graph.Rewrite` builds on it to substitute layers and carry their
weights over.

Example:
>>> import keras
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.ReLU()])
>>> from kerasq.graph import LayerGraph
>>> graph = LayerGraph(model)
>>> [type(node.layer).__name__ for node in graph.nodes]
['InputLayer', 'Dense', 'ReLU']
>>> clone = graph.rebuild(lambda node, args, kwargs: node.layer(*args, **kwargs))
>>> clone.output_shape
(None, 3)
"""

import dataclasses
from typing import Any, NamedTuple

import keras

from kerasq import _keras_private
from kerasq.graph.tracing import HOW_TO_FIX, as_functional


class TensorRef(NamedTuple):
    """The `index`-th (flattened) output of graph node `node`."""

    node: int
    index: int


@dataclasses.dataclass
class Node:
    """One call of one layer, or of a bare Keras operation (`a - b`, `keras.ops.mean(x)`, `x[:, 0]`).

    `args`/`kwargs` hold `TensorRef`s where the call took tensors.
    """

    id: int
    layer: Any
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)
    input_spec: Any = None  # (batch_shape, dtype, name) for a model input, else None
    scope: tuple = ()  # names of the nested models this call sits in

    @property
    def is_input(self):
        return self.input_spec is not None

    @property
    def input_refs(self):
        return [leaf for leaf in _leaves((self.args, self.kwargs)) if isinstance(leaf, TensorRef)]

    @property
    def path(self):
        """The layer's name with the nested models around it, e.g. 'backbone/conv1'."""
        return "/".join(self.scope + (self.layer.name,))


class LayerGraph:
    """The layer calls of a Sequential or Functional model.

    Args:
        model: a built Sequential or Functional model.
        inline: True to inline every nested Sequential/Functional model (the default), False to keep
            each one whole as a single node, or a predicate `fn(nested_model) -> bool` that says which
            ones to inline.
    """

    def __init__(self, model, inline=True):
        model = as_functional(model) if isinstance(model, keras.Model) else model
        _check_walkable(model, "model")
        self.model = model
        self.nodes = []
        self._inline = inline if callable(inline) else (lambda nested: bool(inline))
        self._layer_calls = {}
        self._call_index = {}
        self._nodes_by_layer = {}
        self._operations = {}
        self._specs = None
        inputs, self.outputs = self._read(model, bound_inputs=None, scope=())
        self.inputs = inputs
        self._consumers = {node.id: [] for node in self.nodes}
        for node in self.nodes:
            for ref in node.input_refs:
                if node not in self._consumers[ref.node]:
                    self._consumers[ref.node].append(node)
        self._output_nodes = {ref.node for ref in _leaves(self.outputs)}

    # ---- queries --------------------------------------------------------------------------------
    def consumers(self, node):
        """The nodes that take any output of `node` as input."""
        return list(self._consumers[node.id])

    def is_model_output(self, node):
        return node.id in self._output_nodes

    def calls_of(self, layer):
        """How many times `layer` is called in the (inlined) graph: more than once means shared."""
        return self._layer_calls.get(id(layer), 0)

    def nodes_of(self, layer):
        """The nodes that call `layer`, in call order."""
        return [node for node in self._nodes_by_layer.get(id(layer), [])]

    def call_index(self, node):
        """Which call of its layer `node` is: 0 for the first, 1 for the second, and so on."""
        return self._call_index[node.id]

    def producer(self, ref):
        """The node that produces tensor `ref`."""
        return self.nodes[ref.node]

    def output_specs(self, node):
        """The shapes and dtypes of `node`'s outputs, as a list of `keras.KerasTensor`s.

        Computed once for the whole graph, symbolically (no layer is called or changed)."""
        if self._specs is None:
            self._specs = self._compute_specs()
        return self._specs[node.id]

    def spec(self, ref):
        """The shape and dtype of tensor `ref`, as a `keras.KerasTensor`."""
        return self.output_specs(self.nodes[ref.node])[ref.index]

    def _compute_specs(self):
        specs = {}
        for node in self.nodes:
            if node.is_input:
                batch_shape, dtype, _ = node.input_spec
                specs[node.id] = [keras.KerasTensor(batch_shape, dtype=dtype)]
                continue
            args, kwargs = _resolve((node.args, node.kwargs), specs)
            try:
                outputs = node.layer.compute_output_spec(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 (the layer's own error, re-raised with its name)
                raise ValueError(
                    f"Cannot work out the output shape of '{node.path}' ({type(node.layer).__name__}): "
                    f"{error}"
                ) from error
            specs[node.id] = keras.tree.flatten(outputs)
        return specs

    # ---- rebuilding -----------------------------------------------------------------------------
    def rebuild(self, call_layer, on_input=None, name=None, on_output=None):
        """A new Functional model with `call_layer(node, args, kwargs)` in place of each layer call.

        `on_input(node, tensor)` may transform each new model input before the layers see it, and
        `on_output(index, tensor)` each model output (in flattened order) before the model is made.
        """
        produced, model_inputs = {}, {}
        for node in self.nodes:
            if node.is_input:
                batch_shape, dtype, input_name = node.input_spec
                tensor = keras.Input(batch_shape=batch_shape, dtype=dtype, name=input_name)
                model_inputs[node.id] = tensor
                outputs = on_input(node, tensor) if on_input else tensor
            else:
                args, kwargs = _resolve((node.args, node.kwargs), produced)
                outputs = call_layer(node, args, kwargs)
            produced[node.id] = keras.tree.flatten(outputs)
        inputs = _resolve(self.inputs, {key: [tensor] for key, tensor in model_inputs.items()})
        outputs = _resolve(self.outputs, produced)
        if on_output is not None:
            flat = [on_output(index, tensor) for index, tensor in enumerate(keras.tree.flatten(outputs))]
            outputs = keras.tree.pack_sequence_as(outputs, flat)
        return keras.Model(inputs, outputs, name=name or self.model.name)

    # ---- reading --------------------------------------------------------------------------------
    def _add(self, layer, args=(), kwargs=None, input_spec=None, scope=()):
        node = Node(len(self.nodes), layer, args, kwargs or {}, input_spec, scope)
        self.nodes.append(node)
        if input_spec is None:
            self._nodes_by_layer.setdefault(id(layer), []).append(node)
            self._call_index[node.id] = self._layer_calls.get(id(layer), 0)
            self._layer_calls[id(layer)] = self._call_index[node.id] + 1
        else:
            self._call_index[node.id] = 0
        return node

    def _read(self, model, bound_inputs, scope):
        """Adds `model`'s calls to the graph; returns (input structure, output structure) of refs."""
        if isinstance(model, keras.Sequential):
            return self._read_sequential(model, bound_inputs, scope)
        return self._read_functional(model, bound_inputs, scope)

    def _read_sequential(self, model, bound_inputs, scope):
        try:
            (spec,) = model.inputs
        except (AttributeError, ValueError) as error:
            raise ValueError(
                f"Sequential model '{model.name}' has no input shape yet. Start it with "
                "keras.Input(shape) or call model.build(input_shape) before quantizing it."
            ) from error
        if bound_inputs is None:
            name = f"{model.name}_input"
            layer = keras.layers.InputLayer(batch_shape=spec.shape, dtype=spec.dtype, name=name)
            ref = TensorRef(self._add(layer, input_spec=(spec.shape, spec.dtype, name)).id, 0)
            inputs = ref
        else:
            (ref,) = bound_inputs
            inputs = None
        inner_scope = scope + (model.name,) if bound_inputs is not None else scope
        for layer in model.layers:
            if isinstance(layer, keras.Model) and self._inline(layer):
                nested = as_functional(layer)
                _check_walkable(nested, f"layer '{layer.name}' of '{model.name}'")
                _, outputs = self._read(nested, [ref], inner_scope)
                (ref,) = _leaves(outputs)
            else:
                ref = TensorRef(self._add(layer, (ref,), {}, scope=inner_scope).id, 0)
        return inputs, ref

    def _read_functional(self, model, bound_inputs, scope):
        config = _graph_config(model)
        produced = {}  # layer name -> [outputs of its 1st call, of its 2nd call, ...]
        input_leaves = _leaves(config["input_layers"], is_leaf=_is_history)
        input_names = {layer_name for layer_name, _, _ in input_leaves}
        if bound_inputs is not None and len(bound_inputs) != len(input_leaves):
            raise ValueError(
                f"Nested model '{model.name}' takes {len(input_leaves)} inputs but is called with "
                f"{len(bound_inputs)}."
            )
        for position, (layer_name, _, _) in enumerate(input_leaves):
            if bound_inputs is None:
                layer = model.get_layer(layer_name)
                node = self._add(
                    layer, input_spec=(layer.batch_shape, layer.dtype, layer.name), scope=scope
                )
                produced[layer_name] = [_NodeOutputs(node.id)]
            else:
                produced[layer_name] = [[bound_inputs[position]]]
        pending = [
            (layer_config["name"], list(layer_config["inbound_nodes"]))
            for layer_config in config["layers"]
            if layer_config["name"] not in produced and layer_config["inbound_nodes"]
        ]
        inner_scope = scope + (model.name,) if bound_inputs is not None else scope
        while pending:
            progressed = False
            for layer_name, calls in pending:
                while calls and _ready(calls[0], produced):
                    self._read_call(model, layer_name, calls.pop(0), produced, inner_scope)
                    progressed = True
            pending = [(name, calls) for name, calls in pending if calls]
            if pending and not progressed:
                raise ValueError(
                    f"The graph of model '{model.name}' has a cycle or a disconnected layer: "
                    f"{[name for name, _ in pending]}."
                )

        def lookup(history):
            layer_name, call_index, tensor_index = history
            # Unlike call arguments, input/output entries keep Keras's own node numbering, in which a
            # nested Functional model's node 0 is its own input-to-output node.
            if layer_name not in input_names and _keras_private.is_functional(self._operation(model, layer_name)):
                call_index -= 1
            return produced[layer_name][call_index][tensor_index]

        inputs = _map_leaves(lookup, config["input_layers"], _is_history)
        outputs = _map_leaves(lookup, config["output_layers"], _is_history)
        return inputs, outputs

    def _operation(self, model, name):
        """The layer, or bare operation such as `keras.ops.add` or `x[:, 0]`, that `model` calls `name`."""
        if id(model) not in self._operations:
            self._operations[id(model)] = {operation.name: operation for operation in model.operations}
        try:
            return self._operations[id(model)][name]
        except KeyError:
            raise ValueError(f"Model '{model.name}' has no layer or operation named '{name}'.") from None

    def _read_call(self, model, layer_name, call_data, produced, scope):
        layer = self._operation(model, layer_name)
        args, kwargs = _deserialize_call(call_data, produced)
        if isinstance(layer, keras.Model) and self._inline(layer):
            nested = as_functional(layer)
            _check_walkable(nested, f"layer '{layer.name}' of '{model.name}'")
            bound = [leaf for leaf in _leaves(args[0]) if isinstance(leaf, TensorRef)]
            _, outputs = self._read(nested, bound, scope)
            produced.setdefault(layer_name, []).append(_leaves(outputs))
        else:
            node = self._add(layer, tuple(args), kwargs, scope=scope)
            produced.setdefault(layer_name, []).append(_NodeOutputs(node.id))


class _NodeOutputs:
    """The outputs of a node, indexable before their number is known."""

    def __init__(self, node_id):
        self.node_id = node_id

    def __getitem__(self, index):
        return TensorRef(self.node_id, index)


def all_layers(model):
    """Every layer of `model` once, in order: the layers of nested models and the layers inside
    wrappers included (the model itself not)."""
    found, seen = [], {id(model)}

    def visit(layer):
        if id(layer) in seen:
            return
        seen.add(id(layer))
        found.append(layer)
        for child in getattr(layer, "layers", None) or ():
            visit(child)
        if isinstance(layer, keras.layers.Wrapper):
            visit(layer.layer)

    for layer in getattr(model, "layers", None) or ():
        visit(layer)
    return found


def _graph_config(model):
    """`model.get_config()`, with a clear error when a custom layer in it cannot be serialized."""
    try:
        return model.get_config()
    except (NotImplementedError, TypeError) as error:
        for layer in model.layers:
            layer_config(layer, f"of model '{model.name}' ")
        raise error


def layer_config(layer, where=""):
    """`layer.get_config()`, or a TypeError that names the layer and says to implement it."""
    try:
        return layer.get_config()
    except (NotImplementedError, TypeError) as error:
        raise TypeError(
            f"Layer '{layer.name}' ({type(layer).__name__}) {where}cannot be serialized, so kerasq "
            "cannot read or copy it: give its class a `get_config()` that returns its constructor "
            "arguments (see keras.layers.Layer.get_config)."
        ) from error


def _check_walkable(model, what):
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"kerasq expects a keras.Model (Sequential or Functional); {what} is a "
            f"{type(model).__module__}.{type(model).__name__}."
        )
    if not (isinstance(model, keras.Sequential) or _keras_private.is_functional(model)):
        raise TypeError(
            f"{what} ('{model.name}', class {type(model).__name__}) is a subclassed model: its "
            f"layer graph is hidden inside its call(), so kerasq cannot rewrite it. {HOW_TO_FIX}"
        )


def _is_history(value):
    return (
        isinstance(value, (list, tuple))
        and len(value) == 3
        and isinstance(value[0], str)
        and all(isinstance(i, int) for i in value[1:])
    )


def _is_tensor_config(value):
    return isinstance(value, dict) and value.get("class_name") == "__keras_tensor__"


def _ready(call_data, produced):
    for leaf in _leaves(call_data, is_leaf=_is_tensor_config):
        if _is_tensor_config(leaf):
            layer_name, call_index, _ = leaf["config"]["keras_history"]
            if len(produced.get(layer_name, [])) <= call_index:
                return False
    return True


def _deserialize_call(call_data, produced):
    def convert(value):
        if _is_tensor_config(value):
            layer_name, call_index, tensor_index = value["config"]["keras_history"]
            return produced[layer_name][call_index][tensor_index]
        if isinstance(value, dict) and value.get("class_name") == "__tuple__":
            return tuple(convert(item) for item in value["config"]["value"])
        if isinstance(value, dict) and "class_name" in value:
            return keras.saving.deserialize_keras_object(value)
        if isinstance(value, dict):
            return {key: convert(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(convert(item) for item in value)
        return value

    args = convert(call_data.get("args", []))
    kwargs = convert(call_data.get("kwargs", {}))
    # Keras records `mask=None` on calls of nested models; it carries nothing.
    kwargs = {key: value for key, value in kwargs.items() if not (key == "mask" and value is None)}
    return args, kwargs


def _leaves(structure, is_leaf=None):
    if is_leaf is not None and is_leaf(structure):
        return [structure]
    if isinstance(structure, TensorRef):
        return [structure]
    if isinstance(structure, dict):
        return [leaf for key in sorted(structure) for leaf in _leaves(structure[key], is_leaf)]
    if isinstance(structure, (list, tuple)):
        return [leaf for item in structure for leaf in _leaves(item, is_leaf)]
    return [structure]


def _map_leaves(fn, structure, is_leaf):
    if is_leaf(structure):
        return fn(structure)
    if isinstance(structure, dict):
        return {key: _map_leaves(fn, value, is_leaf) for key, value in structure.items()}
    if isinstance(structure, (list, tuple)):
        return type(structure)(_map_leaves(fn, item, is_leaf) for item in structure)
    return structure


def _resolve(structure, produced):
    if isinstance(structure, TensorRef):
        return produced[structure.node][structure.index]
    if isinstance(structure, dict):
        return {key: _resolve(value, produced) for key, value in structure.items()}
    if isinstance(structure, (list, tuple)):
        return type(structure)(_resolve(item, produced) for item in structure)
    return structure
