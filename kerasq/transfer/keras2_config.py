"""Keras 2 (tf_keras) model configs rebuilt as Keras 3 models, without importing tf_keras.

A Keras 2 config differs from a Keras 3 one in a few places: `InputLayer` has `batch_input_shape`
(Keras 3: `batch_shape`) and `ragged`; other layers may carry `input_shape`/`batch_input_shape`
(Sequential's first layer); `inbound_nodes` are `[[["layer", node, tensor, {kwargs}], ...], ...]`
lists rather than `{"args": [...], "kwargs": {...}}` with `__keras_tensor__` entries; a few arguments
are gone (BatchNormalization's `fused`, `virtual_batch_size`, `adjustment`); tuples saved by
SavedModel metadata are `{"class_name": "__tuple__", "items": [...]}`. Rather than rewrite the
config into Keras 3's format and hope `from_config` agrees, `build_model` makes each layer from its
translated config and calls it on the tensors its inbound nodes name, as Keras 2's own `from_config`
did, nested Sequential/Functional models included.

Layers are made through `unwrap`, a function `(class_name, config) -> (class_name, config) or None`
that lets the caller see through wrappers (tfmot's QuantizeWrapperV2 and PruneLowMagnitude) and drop
identity layers (tfmot's QuantizeLayer). Every layer that cannot be made is collected, and one
`UnmappableLayersError` lists them all.

Example:
>>> import numpy as np
>>> from kerasq.transfer.keras2_config import build_model
>>> config = {"class_name": "Sequential", "config": {"name": "old", "layers": [
...     {"class_name": "Dense", "config": {"name": "dense", "units": 3, "activation": "relu",
...                                        "batch_input_shape": [None, 4], "dtype": "float32"}}]}}
>>> model, layers = build_model(config)
>>> model.name, tuple(model(np.ones((1, 4), "float32")).shape), sorted(layers)
('old', (1, 3), ['dense'])
"""

import inspect

import keras

# Keras 2 arguments that Keras 3 dropped, with the value that means "what Keras 3 does anyway".
_OBSOLETE_ARGUMENTS = {
    "fused": None,  # BatchNormalization: an implementation choice, any value
    "virtual_batch_size": (None,),
    "adjustment": (None,),
    "ragged": (False, None),
    "optional": (False, None),
    "groups": (1,),  # DepthwiseConv: Keras 2's Conv base class had it
}
_SHAPE_ARGUMENTS = ("batch_input_shape", "input_shape", "batch_size", "input_dim")
_MODEL_CLASSES = ("Functional", "Model", "Sequential")
# Keras 2 weight names Keras 3 spells differently, per layer class.
WEIGHT_RENAMES = {
    "DepthwiseConv1D": {"depthwise_kernel": "kernel"},
    "DepthwiseConv2D": {"depthwise_kernel": "kernel"},
}


class UnmappableLayersError(ValueError):
    """Layers of a Keras 2 model that have no Keras 3 counterpart; `.layers` is `[(name, class, why)]`."""

    def __init__(self, layers, source=None):
        self.layers = list(layers)
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - '{name}' ({class_name}): {why}" for name, class_name, why in self.layers)
        super().__init__(
            f"{len(self.layers)} layer(s){where} cannot be rebuilt in Keras 3:\n{lines}\n"
            "Fix: for a custom layer, write its Keras 3 version and register it under the same name "
            "(keras.saving.register_keras_serializable(package=..., name=...)) or pass it in "
            "custom_objects={'ClassName': cls}; replace Lambda/TF-op layers by a registered custom "
            "layer in the tf_keras model and save it again."
        )


def plain(value):
    """SavedModel metadata's `{"class_name": "__tuple__", "items": [...]}` tuples as lists."""
    if isinstance(value, dict):
        if value.get("class_name") == "__tuple__" and "items" in value:
            return [plain(item) for item in value["items"]]
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def build_model(model_config, unwrap=None, custom_objects=None, source=None):
    """Builds the Keras 3 model a Keras 2 `{"class_name", "config"}` model config describes.

    Returns `(model, layers)`: `layers` maps each Keras 2 layer name (wrappers' names too, and the
    layers of nested models) to the Keras 3 layer made for it (None for a dropped identity layer).
    Raises `UnmappableLayersError` listing every layer that could not be made.
    """
    builder = _Builder(unwrap or (lambda class_name, config: (class_name, config)), custom_objects or {})
    model_config = plain(model_config)
    builder.check(model_config)
    if builder.errors:
        raise UnmappableLayersError(builder.errors, source)
    model = builder.model(model_config)
    return model, builder.layers


class _Builder:
    def __init__(self, unwrap, custom_objects):
        self.unwrap = unwrap
        self.custom_objects = custom_objects
        self.errors = []
        self.layers = {}

    # ---- checking every layer first, so all problems are reported at once ----------------------------
    def check(self, model_config):
        for entry in _layer_entries(model_config):
            class_name = entry["class_name"]
            name = entry.get("name") or entry["config"].get("name")
            if class_name in _MODEL_CLASSES:
                self.check(entry)
                continue
            if class_name == "InputLayer":
                input_config = entry["config"]
                if not (input_config.get("batch_input_shape") or input_config.get("batch_shape")):
                    self.errors.append((name, class_name, "it has no input shape"))
                elif input_config.get("ragged"):
                    self.errors.append((name, class_name, "ragged inputs have no Keras 3 counterpart"))
                continue
            unwrapped = self.unwrap(class_name, entry["config"])
            if unwrapped is None:
                continue
            try:
                self.make_layer(*unwrapped, name=name)
            except Exception as error:  # any reason Keras 3 refuses the layer goes in the list
                self.errors.append((name, class_name, _first_line(error)))

    # ---- making layers ---------------------------------------------------------------------------
    def make_layer(self, class_name, config, name=None):
        if class_name in ("Lambda", "TFOpLambda", "SlicingOpLambda"):
            raise ValueError(
                "it holds Python code or a TensorFlow op (saved as bytecode or an op name), which "
                "Keras 3 cannot rebuild from a Keras 2 file"
            )
        cls = _layer_class(class_name, self.custom_objects)
        if cls is None:
            raise ValueError(
                "Keras 3 has no layer of this class and none is registered under this name"
            )
        return cls.from_config(translate_layer_config(cls, config, name))

    def model(self, model_config):
        if model_config["class_name"] == "Sequential":
            return self.sequential(model_config["config"])
        return self.functional(model_config["config"])

    def sequential(self, config):
        entries = config["layers"] if isinstance(config, dict) else config
        name = config.get("name") if isinstance(config, dict) else None
        model = keras.Sequential(name=name)
        batch_shape = _sequential_input_shape(config, entries)
        layers = []
        for entry in entries:
            if entry["class_name"] == "InputLayer":
                batch_shape = entry["config"].get("batch_input_shape") or entry["config"].get("batch_shape")
                continue
            layers.append(self.layer(entry, entry["config"].get("name")))
        if batch_shape is not None:
            model.add(keras.Input(batch_shape=tuple(batch_shape)))
        for layer in layers:
            if layer is not None:
                model.add(layer)
        return model

    def layer(self, entry, name):
        class_name = entry["class_name"]
        if class_name in _MODEL_CLASSES:
            layer = self.model(entry)
        else:
            unwrapped = self.unwrap(class_name, entry["config"])
            layer = None if unwrapped is None else self.make_layer(*unwrapped, name=name)
        self.layers[name] = layer
        if layer is not None and layer.name != name:
            self.layers.setdefault(layer.name, layer)
        return layer

    def functional(self, config):
        # Keras 2's from_config: layers in order, each call once the tensors it takes exist.
        outputs = {}  # layer name -> [outputs of each call, in call order]
        inputs = {}
        pending = []
        for entry in config["layers"]:
            name = entry["name"]
            if entry["class_name"] == "InputLayer":
                input_config = entry["config"]
                tensor = keras.Input(
                    batch_shape=tuple(input_config.get("batch_input_shape") or input_config["batch_shape"]),
                    dtype=_dtype_name(input_config.get("dtype")),
                    sparse=bool(input_config.get("sparse", False)),
                    name=name,
                )
                outputs[name] = [tensor]
                inputs[name] = tensor
                self.layers[name] = None
                continue
            layer = self.layer(entry, name)
            if _has_own_input(entry):
                # Keras 2 counts a nested model's own graph as its node 0: calls start at node 1.
                outputs[name] = [None]
            pending.append([name, layer, list(entry.get("inbound_nodes") or [])])
        while any(nodes for _, _, nodes in pending):
            progressed = False
            for item in pending:
                name, layer, nodes = item
                while nodes and _ready(nodes[0], outputs):
                    args, kwargs = _node_inputs(nodes.pop(0), outputs)
                    result = args if layer is None else layer(args, **kwargs)
                    outputs.setdefault(name, []).append(result)
                    progressed = True
            if not progressed:
                stuck = [name for name, _, nodes in pending if nodes]
                raise ValueError(f"the model config's graph cannot be followed: layers {stuck} never get their inputs")
        model_inputs = [outputs[ref[0]][ref[1]] for ref in _refs(config["input_layers"])]
        model_outputs = [_tensor(outputs, ref) for ref in _refs(config["output_layers"])]
        return keras.Model(
            model_inputs[0] if len(model_inputs) == 1 else model_inputs,
            model_outputs[0] if len(model_outputs) == 1 else model_outputs,
            name=config.get("name"),
        )


def translate_layer_config(cls, config, name=None):
    """A Keras 2 layer config as the Keras 3 class `cls` takes it (see the module docstring)."""
    config = dict(config)
    if name is not None:
        config.setdefault("name", name)
    for key in _SHAPE_ARGUMENTS:
        config.pop(key, None)
    if isinstance(config.get("dtype"), dict):
        config["dtype"] = _dtype_name(config["dtype"])
    accepted = _accepted_arguments(cls)
    for key, neutral in _OBSOLETE_ARGUMENTS.items():
        if key in config and key not in accepted:
            value = config.pop(key)
            if neutral is not None and value not in neutral:
                raise ValueError(f"argument {key}={value!r} has no Keras 3 counterpart")
    if cls is keras.layers.BatchNormalization and isinstance(config.get("axis"), list):
        if len(config["axis"]) != 1:
            raise ValueError(f"BatchNormalization over several axes {config['axis']} has no Keras 3 counterpart")
        config["axis"] = config["axis"][0]
    return config


def _accepted_arguments(cls):
    names = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            names.update(inspect.signature(init).parameters)
    return names


def _layer_class(class_name, custom_objects):
    if class_name in custom_objects:
        return custom_objects[class_name]
    registered = keras.saving.get_registered_object(class_name)
    if registered is not None:
        return registered
    if ">" not in class_name:
        cls = getattr(keras.layers, class_name, None)
        if isinstance(cls, type) and issubclass(cls, keras.layers.Layer):
            return cls
    return None


def _dtype_name(dtype):
    if isinstance(dtype, dict):  # Keras 2 policy: {"class_name": "Policy", "config": {"name": ...}}
        return dtype.get("config", {}).get("name", "float32")
    return dtype


def _layer_entries(model_config):
    config = model_config["config"]
    return config["layers"] if isinstance(config, dict) else config


def _sequential_input_shape(config, entries):
    for entry in entries[:1]:
        layer_config = entry["config"]
        if layer_config.get("batch_input_shape"):
            return layer_config["batch_input_shape"]
        if layer_config.get("input_shape"):
            return [None, *layer_config["input_shape"]]
    if isinstance(config, dict) and config.get("build_input_shape"):
        return config["build_input_shape"]
    return None


def _has_own_input(entry):
    if entry["class_name"] in ("Functional", "Model"):
        return True
    if entry["class_name"] != "Sequential":
        return False
    layers = _layer_entries(entry)
    return bool(layers) and (
        layers[0]["class_name"] == "InputLayer" or _sequential_input_shape(entry["config"], layers) is not None
    )


def _refs(refs):
    """`input_layers`/`output_layers`: `[name, node, tensor]` or a list of them."""
    return [refs] if refs and isinstance(refs[0], str) else refs


def _tensor(outputs, ref):
    name, node, index = ref[0], ref[1], ref[2]
    result = outputs[name][node]
    if isinstance(result, (list, tuple)):
        return result[index]
    return result


def _node_entries(node):
    # Keras 2: a node is a list of [layer, node, tensor, kwargs]; older files nest one more level.
    if isinstance(node, dict):
        raise ValueError("this config already has Keras 3 style inbound nodes: load it with keras.saving.load_model")
    return node


def _ready(node, outputs):
    return all(
        entry[0] in outputs and len(outputs[entry[0]]) > entry[1] for entry in _node_entries(node)
    )


def _node_inputs(node, outputs):
    entries = _node_entries(node)
    tensors = [_tensor(outputs, entry) for entry in entries]
    kwargs = dict(entries[0][3]) if entries and len(entries[0]) > 3 and entries[0][3] else {}
    if any(isinstance(value, list) for value in kwargs.values()):
        raise ValueError(f"call arguments {sorted(kwargs)} that hold tensors are not supported")
    return (tensors[0] if len(tensors) == 1 else tensors), kwargs


def _first_line(error):
    text = str(error).split("Exception encountered:")[-1].strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]
