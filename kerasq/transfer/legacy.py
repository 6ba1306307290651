"""`migrate_legacy`: tf_keras (Keras 2) models, tfmot-wrapped ones included, as Keras 3 kerasq models.

`.h5` files are read without tf_keras: the `model_config` JSON is rebuilt as a Keras 3 model
(`kerasq.transfer.keras2_config`) and the weights are copied layer by layer from the file's h5py
groups, by name, with their shapes checked. SavedModel directories and `.keras` files written by
tf_keras have their config read the same way (from `keras_metadata.pb` and `config.json`), so
unmappable layers are reported without tf_keras; their weights are read by loading the model with
tf_keras in a separate process (`TF_USE_LEGACY_KERAS=1`) that saves it as `.h5` in a temporary
folder, which needs the `legacy` extra (`pip install "kerasq[legacy]"`). The source is only read.

tfmot's wrappers become kerasq's:

- `quantize_model` (QuantizeWrapperV2, QuantizeLayer): the float layers are rebuilt and quantized
  with `kerasq.quantize_model`; tfmot's learned activation ranges (the `..._min`/`..._max` of its
  moving-average quantizers: a layer's `output` or `post_activation`, the input's
  `quantize_layer`) become the ranges of kerasq's quantizers for the same tensors, and each kernel is
  put on tfmot's weight grid (its `kernel_min`/`kernel_max`, with the largest weight of each channel
  on the range's edge, since kerasq's weight range is the kernel's current absolute maximum). The
  result is a kerasq QAT model ready for `kerasq.export_tflite` or more training.
- `prune_low_magnitude` (PruneLowMagnitude): layers with a mask become kerasq `PruneLowMagnitude`
  wrappers with the same schedule, masks and pruning step (wrappers around layers without weights
  are dropped).
"""

import json
import os
import subprocess
import sys
import tempfile
import warnings
import zipfile

import numpy as np

from kerasq.transfer import keras2_config
from kerasq.transfer.keras2_config import UnmappableLayersError

_QUANTIZE_WRAPPERS = ("QuantizeWrapperV2", "QuantizeWrapper", "QuantizeAnnotate")
_IDENTITY_LAYERS = ("QuantizeLayer",)
_PRUNE_WRAPPERS = ("PruneLowMagnitude",)
_LEGACY_EXTRA = 'pip install "kerasq[legacy]"'


class LegacyMigrationError(ValueError):
    """A legacy model file that `migrate_legacy` cannot read; the message names the file and the fix."""


def migrate_legacy(path, custom_objects=None):
    """Reads a model saved by tf_keras (Keras 2), plain or wrapped by tfmot, as a Keras 3 model.

    Args:
        path: a `.h5` file saved with `model.save`, a SavedModel directory saved by tf_keras's
            `model.save(dir)`, or a `.keras` file saved by tf_keras.
        custom_objects: `{class name: Keras 3 layer class}` for custom layers of the old model
            (Keras 3 versions registered with `keras.saving.register_keras_serializable` under the
            same name are found without it).

    Returns:
        A new Keras 3 model: a float model; for tfmot's `quantize_model`, a kerasq QAT model with
        tfmot's ranges; for tfmot's `prune_low_magnitude`, a model with kerasq `PruneLowMagnitude`
        wrappers carrying the masks and pruning step.

    Raises:
        LegacyMigrationError: the path is not a tf_keras model (weights only, a SavedModel without
            Keras metadata, a Keras 3 file, a file of another kind).
        UnmappableLayersError: layers with no Keras 3 counterpart, all of them listed with their classes.

    Example:
    >>> import tempfile, h5py, json, numpy as np, kerasq
    >>> config = {"class_name": "Sequential", "config": {"name": "old", "layers": [
    ...     {"class_name": "Dense", "config": {"name": "dense", "units": 2,
    ...                                        "batch_input_shape": [None, 3]}}]}}
    >>> with tempfile.TemporaryDirectory() as folder:  # a tf_keras .h5 file, written by hand
    ...     path = folder + "/old.h5"
    ...     with h5py.File(path, "w") as file:
    ...         file.attrs["model_config"] = json.dumps(config)
    ...         weights = file.create_group("model_weights")
    ...         weights.attrs["layer_names"] = [b"dense"]
    ...         dense = weights.create_group("dense")
    ...         dense.attrs["weight_names"] = [b"dense/kernel:0", b"dense/bias:0"]
    ...         dense["dense/kernel:0"] = np.ones((3, 2), "float32")
    ...         dense["dense/bias:0"] = np.array([0.5, -0.5], "float32")
    ...     model = kerasq.migrate_legacy(path)
    >>> model(np.ones((1, 3), "float32")).numpy().tolist()
    [[3.5, 2.5]]
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file or directory: {path}")
    if os.path.isdir(path):
        return _migrate_saved_model(path, custom_objects)
    import h5py

    if h5py.is_hdf5(path):
        return _migrate_h5(path, custom_objects)
    if zipfile.is_zipfile(path):
        return _migrate_keras_zip(path, custom_objects)
    raise LegacyMigrationError(
        f"{path} is not a Keras model file: migrate_legacy reads .h5 files and SavedModel directories "
        "saved by tf_keras's model.save(), and .keras files saved by tf_keras."
    )


# ---- reading the formats -------------------------------------------------------------------------
def _migrate_h5(path, custom_objects):
    import h5py

    with h5py.File(path, "r") as file:
        if "model_config" not in file.attrs:
            if "layer_names" in file.attrs or "model_weights" in file:
                raise LegacyMigrationError(
                    f"{path} holds only weights (saved with save_weights), no model config. Fix: in "
                    "tf_keras, build the model, load_weights() this file and model.save('model.h5'), then "
                    "migrate that; or build the model in Keras 3 and call model.load_weights() on it."
                )
            raise LegacyMigrationError(f"{path} is an HDF5 file without a Keras model in it (no model_config).")
        config = json.loads(_text(file.attrs["model_config"]))
        group = file["model_weights"] if "model_weights" in file else file
        weights = {
            _text(name): [
                (_text(weight), np.asarray(group[_text(name)][_text(weight)]))
                for weight in group[_text(name)].attrs.get("weight_names", [])
            ]
            for name in group.attrs.get("layer_names", [])
        }
    return _migrate(config, weights, path, custom_objects)


def _migrate_saved_model(path, custom_objects):
    if not any(os.path.exists(os.path.join(path, name)) for name in ("saved_model.pb", "saved_model.pbtxt")):
        raise LegacyMigrationError(
            f"{path} is a directory but not a SavedModel (no saved_model.pb): migrate_legacy reads "
            ".h5 files, SavedModel directories and .keras files saved by tf_keras."
        )
    metadata = os.path.join(path, "keras_metadata.pb")
    config = _saved_model_config(metadata) if os.path.isfile(metadata) else None
    if config is None:
        raise LegacyMigrationError(
            f"{path} is a SavedModel without Keras metadata (keras_metadata.pb): it was written by "
            "tf.saved_model.save or an exporter, not by a tf_keras model.save(), so it holds no layers "
            "to rebuild. Fix: save the tf_keras model with model.save('model.h5') and migrate that, or "
            "run the SavedModel as it is with tf.saved_model.load."
        )
    _check_layers(config, path, custom_objects)
    return _migrate_through_tf_keras(path, custom_objects)


def _migrate_keras_zip(path, custom_objects):
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        if "config.json" not in names:
            raise LegacyMigrationError(f"{path} is a zip file but not a .keras model (no config.json).")
        metadata = json.loads(archive.read("metadata.json")) if "metadata.json" in names else {}
        config = json.loads(archive.read("config.json"))
    if str(metadata.get("keras_version", "")).startswith("3."):
        raise LegacyMigrationError(
            f"{path} was saved by Keras {metadata['keras_version']}, not tf_keras: load it with "
            "keras.saving.load_model() (import kerasq first for kerasq layers)."
        )
    _check_layers(config, path, custom_objects)
    return _migrate_through_tf_keras(path, custom_objects)


def _check_layers(config, path, custom_objects):
    """Builds the model from the config alone, so unmappable layers are listed before tf_keras runs."""
    _Wrappers(config).build(path, custom_objects)


_CONVERT_SCRIPT = """
import sys
import tf_keras
source, target = sys.argv[1], sys.argv[2]
try:
    import tensorflow_model_optimization as tfmot
except ImportError:
    model = tf_keras.models.load_model(source, compile=False)
else:
    with tfmot.quantization.keras.quantize_scope(), tfmot.sparsity.keras.prune_scope():
        model = tf_keras.models.load_model(source, compile=False)
model.save(target)
"""


def _migrate_through_tf_keras(path, custom_objects):
    import importlib.util

    if importlib.util.find_spec("tf_keras") is None:
        raise LegacyMigrationError(
            f"reading the weights of {path} needs tf_keras (SavedModel and tf_keras .keras files are "
            f"loaded by tf_keras in a separate process): {_LEGACY_EXTRA}. Or save the model as .h5 "
            "with tf_keras (model.save('model.h5')), which migrate_legacy reads without it."
        )
    with tempfile.TemporaryDirectory(prefix="kerasq_migrate_") as folder:
        target = os.path.join(folder, "model.h5")
        env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
        result = subprocess.run(
            [sys.executable, "-c", _CONVERT_SCRIPT, path, target], capture_output=True, text=True, env=env
        )
        if result.returncode != 0 or not os.path.isfile(target):
            lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
            raise LegacyMigrationError(
                f"tf_keras could not load {path} to read its weights: {lines[-1] if lines else 'no message'}"
            )
        return _migrate_h5(target, custom_objects)


def _saved_model_config(metadata_path):
    """The root model's config in a SavedModel's keras_metadata.pb, read without tf_keras's protos."""
    with open(metadata_path, "rb") as file:
        data = file.read()
    try:
        for field, value in _proto_fields(data):
            if field != 1:  # SavedMetadata.nodes
                continue
            node = {number: item for number, item in _proto_fields(value)}
            if node.get(3) == b"root" and 5 in node:  # SavedObject.node_path, .metadata
                metadata = json.loads(node[5].decode("utf-8"))
                config = metadata.get("model_config") or (
                    {"class_name": metadata["class_name"], "config": metadata["config"]}
                    if "config" in metadata and "class_name" in metadata else None
                )
                return keras2_config.plain(config) if config else None
    except (ValueError, IndexError, UnicodeDecodeError):
        return None
    return None


def _proto_fields(data):
    """(field number, value) of a protobuf message's fields; length-delimited values as bytes."""
    index = 0
    while index < len(data):
        key, index = _varint(data, index)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, index = _varint(data, index)
        elif wire == 2:
            size, index = _varint(data, index)
            value, index = data[index:index + size], index + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, index = data[index:index + size], index + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, value


def _varint(data, index):
    result = shift = 0
    while True:
        byte = data[index]
        index += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, index


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# ---- tfmot's wrappers ------------------------------------------------------------------------------
class _Wrappers:
    """What tfmot wrapped in a Keras 2 config: quantize and prune wrappers, identity quantize layers."""

    def __init__(self, config):
        self.config = config
        self.quantized = {}  # wrapper name -> (inner class, inner config, quantize_config)
        self.pruned = {}  # wrapper name -> (inner class, inner config, wrapper config)
        self.input_quantizers = {}  # QuantizeLayer name -> the layer name it takes its input from

    def unwrap(self, class_name, config):
        if class_name in _IDENTITY_LAYERS:
            return None
        if class_name in _QUANTIZE_WRAPPERS or class_name in _PRUNE_WRAPPERS:
            inner = config["layer"]
            inner_config = _without_quantize_activations(inner["config"])
            if class_name in _QUANTIZE_WRAPPERS:
                self.quantized[config["name"]] = (inner["class_name"], inner_config, config.get("quantize_config"))
            else:
                self.pruned[config["name"]] = (inner["class_name"], inner_config, config)
            return self.unwrap(inner["class_name"], inner_config)
        return class_name, config

    def build(self, source, custom_objects):
        config = keras2_config.plain(self.config)
        for entry in keras2_config._layer_entries(config):
            if entry["class_name"] in _IDENTITY_LAYERS:
                nodes = entry.get("inbound_nodes") or [[[None]]]
                self.input_quantizers[entry["name"]] = nodes[0][0][0]
        model, layers = keras2_config.build_model(config, self.unwrap, custom_objects, source)
        if self.quantized and self.pruned:
            raise LegacyMigrationError(
                f"{source} has both tfmot quantization and pruning wrappers; migrate_legacy maps one or "
                "the other. Fix: strip_pruning the tfmot model, save it, and migrate that."
            )
        return model, layers


def _without_quantize_activations(config):
    config = dict(config)
    for key in ("activation", "recurrent_activation"):
        value = config.get(key)
        if isinstance(value, dict) and value.get("class_name") == "QuantizeAwareActivation":
            value = value["config"]["activation"]
        if isinstance(value, dict) and value.get("class_name") == "NoOpActivation":
            value = "linear"
        if key in config:
            config[key] = value
    return config


# ---- weights -----------------------------------------------------------------------------------
def _migrate(config, weights, source, custom_objects):
    wrappers = _Wrappers(config)
    model, layers = wrappers.build(source, custom_objects)
    extras = _load_weights(model, layers, weights, source)
    if wrappers.quantized:
        return _to_qat(model, layers, wrappers, extras, source)
    if wrappers.pruned:
        return _to_pruned(model, layers, wrappers, extras, source)
    return model


def _load_weights(model, layers, weights, source):
    """Copies each h5 layer group's weights into the Keras 3 layers made for it; returns the weights
    that belong to no Keras 3 layer (tfmot's ranges, masks, steps) as {owner name: {name: array}}."""
    import keras

    extras = {}
    for group_name, entries in weights.items():
        target = layers.get(group_name, None)
        if target is None:
            for weight_name, value in entries:
                owner, short = _split(weight_name)
                extras.setdefault(owner[-1] if owner else group_name, {})[short] = value
            continue
        leaves = [layer for layer in _leaf_layers(target) if layer.weights]
        claimed = set()
        for leaf in leaves:
            mine = [(name, value) for name, value in entries if leaf.name in _split(name)[0]]
            if not mine and len(leaves) == 1:
                mine = [(name, value) for name, value in entries if group_name not in _split(name)[0]]
            _assign(leaf, mine, source)
            claimed.update(name for name, _ in mine)
        for weight_name, value in entries:
            if weight_name not in claimed:
                owner, short = _split(weight_name)
                extras.setdefault(owner[-1] if owner else group_name, {})[short] = value
    unloaded = [
        layer.name for layer in _leaf_layers(model)
        if layer.weights and not getattr(layer, "_kerasq_migrated", False)
    ]
    if unloaded:
        raise LegacyMigrationError(f"{source} has no weights for layer(s) {unloaded} of its model config.")
    del keras
    return extras


def _leaf_layers(layer):
    import keras

    if isinstance(layer, keras.Model):
        return [leaf for inner in layer.layers for leaf in _leaf_layers(inner)]
    return [layer]


def _split(weight_name):
    parts = weight_name.split(":")[0].split("/")
    return parts[:-1], parts[-1]


def _assign(layer, entries, source):
    renames = keras2_config.WEIGHT_RENAMES.get(type(layer).__name__, {})
    names = [renames.get(_split(name)[1], _split(name)[1]) for name, _ in entries]
    variables = list(layer.weights)
    if len(entries) != len(variables):
        raise LegacyMigrationError(
            f"layer '{layer.name}' ({type(layer).__name__}) has {len(variables)} weights in Keras 3 "
            f"({[v.name for v in variables]}) but {source} holds {len(entries)} for it ({names})."
        )
    by_name = dict(zip(names, (value for _, value in entries)))
    if len(by_name) == len(entries) and all(v.name in by_name for v in variables):
        values = [by_name[v.name] for v in variables]
    else:
        values = [value for _, value in entries]
    for variable, value in zip(variables, values):
        if tuple(variable.shape) != tuple(value.shape):
            raise LegacyMigrationError(
                f"layer '{layer.name}' weight '{variable.name}' has shape {tuple(variable.shape)} in Keras 3 "
                f"but {tuple(value.shape)} in {source}."
            )
        variable.assign(value)
    layer._kerasq_migrated = True


# ---- tfmot QAT -> kerasq QAT ---------------------------------------------------------------------------
def _to_qat(model, layers, wrappers, extras, source):
    from kerasq.quantization import QuantizeWrapper, Quantize, quantize_model

    wrapped_inner = {}
    for wrapper_name, (class_name, inner_config, quantize_config) in wrappers.quantized.items():
        layer = layers[wrapper_name]
        wrapped_inner[layer.name] = wrapper_name
        ranges = extras.get(wrapper_name, {})
        attributes = ((quantize_config or {}).get("config") or {}).get("weight_attrs") or []
        for attribute in attributes:
            if f"{attribute}_max" in ranges:
                name = keras2_config.WEIGHT_RENAMES.get(class_name, {}).get(attribute, attribute)
                _snap_kernel(getattr(layer, name), ranges[f"{attribute}_min"], ranges[f"{attribute}_max"])
    skip = [layer.name for layer in _leaf_layers(model) if layer.name not in wrapped_inner
            and type(layer).__name__ != "InputLayer"]
    qat = quantize_model(model, skip=skip) if skip else quantize_model(model)
    unmatched = []
    for layer in qat.layers:
        if isinstance(layer, Quantize):
            producer = _producer_name(layer)
            owner = next((name for name, taken in wrappers.input_quantizers.items() if taken == producer), None)
            ranges = extras.get(owner, {})
            if not _set_range(layer, "output", ranges.get(f"{owner}_min"), ranges.get(f"{owner}_max")):
                unmatched.append(f"{layer.name} (input {producer})")
        elif isinstance(layer, QuantizeWrapper):
            tensor_owner = layer.batchnorm.name if layer.batchnorm is not None else layer.layer.name
            ranges = extras.get(wrapped_inner.get(tensor_owner), {})
            for key in ("output", "pre_activation", "depthwise"):
                if not any(w.name == f"{key}_min" for w in layer.weights):
                    continue
                names = ("output", "post_activation") if key == "output" else (key,)
                found = next((n for n in names if f"{n}_min" in ranges), None)
                low, high = (ranges[f"{found}_min"], ranges[f"{found}_max"]) if found else (None, None)
                if not _set_range(layer, key, low, high):
                    unmatched.append(f"{layer.name}/{key}")
    if unmatched:
        warnings.warn(
            f"{source}: tfmot has no range for {len(unmatched)} tensor(s) kerasq quantizes ({unmatched}); "
            "they start from kerasq's initial range and learn it at the first training batch: fine-tune "
            "the migrated model briefly before exporting it.",
            stacklevel=3,
        )
    return qat


def _set_range(layer, key, low, high):
    if low is None or high is None:
        return False
    variables = {w.name: w for w in layer.weights}
    variables[f"{key}_min"].assign(float(np.asarray(low)))
    variables[f"{key}_max"].assign(float(np.asarray(high)))
    variables[f"{key}_seen"].assign(1.0)
    return True


def _producer_name(layer):
    node = layer._inbound_nodes[0]
    return node.input_tensors[0]._keras_history[0].name


def _snap_kernel(variable, low, high, levels=127):
    """Puts a kernel on tfmot's symmetric narrow-range weight grid ([-levels, levels] steps of
    max(|low|, |high|) / levels, per channel when the range is), with each channel's largest weight on
    the range's edge, so kerasq's last-value range (the kernel's absolute maximum) is tfmot's range."""
    kernel = np.asarray(variable.numpy(), dtype=np.float64)
    limit = np.maximum(np.abs(np.asarray(low, np.float64)), np.abs(np.asarray(high, np.float64)))
    if limit.ndim == 0:
        flat = kernel.reshape(-1, 1)
        limit = limit.reshape(1)
    elif limit.shape == (kernel.shape[-1],):
        flat = kernel.reshape(-1, kernel.shape[-1])
    else:
        return
    scale = np.where(limit > 0, limit / levels, 1.0)
    steps = np.clip(np.round(flat / scale), -levels, levels)
    for channel in range(flat.shape[1]):
        if limit[channel] > 0:
            top = int(np.argmax(np.abs(steps[:, channel])))
            steps[top, channel] = levels if flat[top, channel] >= 0 else -levels
    variable.assign((steps * scale).reshape(kernel.shape).astype(np.float32))


# ---- tfmot pruning -> kerasq pruning ---------------------------------------------------------------------
def _to_pruned(model, layers, wrappers, extras, source):
    masked = {}
    for wrapper_name, (class_name, _, wrapper_config) in wrappers.pruned.items():
        state = extras.get(wrapper_name, {})
        masks = [state[name] for name in sorted(state, key=_mask_order) if name.startswith("mask")]
        if masks:
            masked[layers[wrapper_name].name] = (wrapper_config, masks, int(np.asarray(state.get("pruning_step", -1))))
    if not masked:
        return model
    try:
        from kerasq import pruning
    except ImportError:  # without kerasq's pruning the masks are written into the kernels
        return _bake_masks(model, masked, source)
    schedules = {name: _schedule(pruning, config, name, source) for name, (config, _, _) in masked.items()}
    first = next(iter(masked.values()))[0]
    pruned = pruning.prune_low_magnitude(
        model,
        pruning_schedule=next(iter(schedules.values())),
        block_size=tuple(first.get("block_size", (1, 1))),
        block_pooling_type=first.get("block_pooling_type", "AVG"),
        skip=lambda layer: layer.name not in masked,
    )
    for wrapper in _leaf_layers(pruned):
        if not isinstance(wrapper, pruning.PruneLowMagnitude):
            continue
        config, masks, step = masked[wrapper.layer.name]
        wrapper.pruning_schedule = schedules[wrapper.layer.name]
        wrapper.block_size = tuple(config.get("block_size", (1, 1)))
        wrapper.block_pooling_type = config.get("block_pooling_type", "AVG")
        targets = list(wrapper.masks.values())
        if len(targets) != len(masks) or any(tuple(t.shape) != m.shape for t, m in zip(targets, masks)):
            raise LegacyMigrationError(
                f"layer '{wrapper.layer.name}': {source} has masks of shapes {[m.shape for m in masks]}, "
                f"kerasq prunes weights of shapes {[tuple(t.shape) for t in targets]}."
            )
        for target, mask in zip(targets, masks):
            target.assign(mask.astype(np.float32))
        wrapper.pruning_step.assign(step)
    return pruned


def _mask_order(name):
    suffix = name[len("mask"):].lstrip("_")
    return int(suffix) if suffix.isdigit() else 0


def _schedule(pruning, wrapper_config, layer_name, source):
    schedule = wrapper_config.get("pruning_schedule") or {}
    kinds = {"ConstantSparsity": pruning.ConstantSparsity, "PolynomialDecay": pruning.PolynomialDecay}
    kind = kinds.get(schedule.get("class_name"))
    if kind is None:
        raise LegacyMigrationError(
            f"layer '{layer_name}' in {source} is pruned with schedule {schedule.get('class_name')!r}; kerasq "
            "maps ConstantSparsity and PolynomialDecay. Fix: strip_pruning the tfmot model and migrate that."
        )
    return kind(**schedule["config"])


def _bake_masks(model, masked, source):
    for layer in _leaf_layers(model):
        if layer.name in masked:
            _, masks, _ = masked[layer.name]
            kernels = [w for w in layer.weights if w.name in ("kernel", "depthwise_kernel", "pointwise_kernel")]
            for variable, mask in zip(kernels, masks):
                variable.assign(variable.numpy() * mask)
    warnings.warn(
        f"{source}: kerasq.pruning is not available, so the pruning masks were written into the kernels "
        "(the model is a plain, already-pruned model; its schedule and step are dropped).",
        stacklevel=3,
    )
    return model


__all__ = ["LegacyMigrationError", "UnmappableLayersError", "migrate_legacy"]
