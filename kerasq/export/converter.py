"""`export_tflite`: a Keras 3 model (TensorFlow backend) to a .tflite flatbuffer.

Three modes, picked from the model and the arguments:
- a model with fake-quant ops (a QAT model): full int8 conversion, no calibration data needed;
- a float model with `representative_data`: post-training full-integer quantization;
- a float model alone: a float32 file.

Example:
>>> import keras, numpy as np
>>> from kerasq.export import export_tflite
>>> model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])
>>> data = np.random.rand(100, 8, 8, 1).astype("float32")
>>> content = export_tflite(model, "digits_int8.tflite", representative_data=data)
"""

import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings

import numpy as np

from kerasq.export.tflite_model import read_graph, reorder_io
from kerasq.validation import check_input_data, expected_text, input_specs, pack_inputs

MAX_CALIBRATION_SAMPLES = 300
_TYPES = {"int8": "int8", "int16": "int16", "float32": "float32"}


class ExportError(RuntimeError):
    """The TFLite converter could not convert the model; the message names the op/layer and a fix."""


def export_tflite(model, path=None, *, representative_data=None, input_type=None, output_type=None):
    """Converts a Keras model to .tflite, writes it to `path` (if given) and returns the bytes.

    Args:
        model: a built Keras 3 model (Functional, Sequential, or subclassed with `inputs`).
        path: where to write the file; parent folders are created and an existing file is replaced
            atomically (never left half-written).
        representative_data: calibration inputs for post-training int8 quantization of a float model:
            an array, a list/tuple of arrays (multi-input, in `model.inputs` order), or an iterable of
            such batches (a generator, a `tf.data.Dataset`; `(x, y)` batches are fine). Up to
            `MAX_CALIBRATION_SAMPLES` samples are fed one at a time.
        input_type, output_type: dtype of the file's inputs/outputs: `"int8"` (the default for
            quantized files), `"float32"` (the default for float files; a quantized file then
            quantizes/dequantizes at its edges). Numpy/TF dtypes are accepted too.

    Returns:
        The .tflite flatbuffer as `bytes`. Its inputs and outputs are in the order of
        `model.inputs`/`model.outputs`, with a dynamic batch dimension.

    Example:
    >>> qat_model = kerasq.quantize_model(model)  # ... then qat_model.fit(...)
    >>> export_tflite(qat_model, "model_int8.tflite")  # fully int8, no calibration data needed
    """
    from kerasq.quantization.layers import tracing_for_export

    _check_model(model)
    specs = input_specs(model)
    tf_names = _input_names(model, specs)
    out_names = _output_names(model)
    fn = _serving_function(model, specs, tf_names, out_names)
    with tracing_for_export():
        quantized = _is_quantized(model, fn)
        mode = "qat" if quantized else ("ptq" if representative_data is not None else "float")
        default = "float32" if mode == "float" else "int8"
        in_type = _resolve_type(input_type, default, "input_type", mode)
        out_type = _resolve_type(output_type, default, "output_type", mode)
        calibration = None
        if representative_data is not None:
            calibration = _calibration_samples(representative_data, specs)
        content = _convert(model, fn, mode, calibration, tf_names, in_type, out_type)
    content = _restore_io_order(content, tf_names, out_names)
    if mode != "float":
        _warn_if_float_ops(content)
    if path is not None:
        write_atomic(path, content)
    return content


# ---- conversion ---------------------------------------------------------------------------------------

def _convert(model, fn, mode, calibration, tf_names, in_type, out_type):
    import keras
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="kerasq-export-") as tmp, _quiet() as log:
        try:
            archive = keras.export.ExportArchive()
            archive.track(model)
            archive.add_endpoint("serving_default", fn)
            archive.write_out(tmp, verbose=False)
            converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=["serving_default"])
            if mode != "float":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
                converter.inference_input_type = tf.as_dtype(in_type)
                converter.inference_output_type = tf.as_dtype(out_type)
            if mode == "ptq":
                converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            if calibration is not None:
                converter.representative_dataset = _feeder(calibration, tf_names)
            return converter.convert()
        except Exception as error:
            raise _export_error(model, mode, error, log.text()) from error


def _feeder(calibration, tf_names):
    def representative_dataset():
        for i in range(calibration[0].shape[0]):
            yield {name: a[i : i + 1] for name, a in zip(tf_names, calibration)}

    return representative_dataset


def _serving_function(model, specs, tf_names, out_names):
    """A `tf.function` of `model(inputs, training=False)` with a free batch dimension and named outputs."""
    import keras
    import tensorflow as tf

    signature = [tf.TensorSpec(s.shape, s.dtype, name=n) for s, n in zip(specs, tf_names)]

    @tf.function(input_signature=signature)
    def serve(*inputs):
        outputs = keras.tree.flatten(model(pack_inputs(model, list(inputs)), training=False))
        return {name: out for name, out in zip(out_names, outputs)}

    return serve


def _restore_io_order(content, tf_names, out_names):
    """Lists the file's inputs/outputs in the order of `model.inputs`/`model.outputs`.

    The converter orders them its own way (outputs are often permuted); the signature it writes maps
    each name to its tensor, so the order is restored by name.
    """
    graph = read_graph(content)
    by_name_in = {name: index for index, name in graph.signature["inputs"].items()}
    by_name_out = {name: index for index, name in graph.signature["outputs"].items()}
    try:
        inputs = [by_name_in[n] for n in tf_names]
        outputs = [by_name_out[n] for n in out_names]
    except KeyError as missing:
        raise ExportError(f"The converted file has no signature entry {missing}; cannot order its inputs/outputs.")
    if inputs == graph.inputs and outputs == graph.outputs:
        return content
    return reorder_io(content, inputs, outputs)


def _warn_if_float_ops(content):
    """The converter silently leaves ops without int8 kernels in float; say which."""
    graph = read_graph(content)
    io = set(graph.inputs) | set(graph.outputs)
    is_float = {t.index for t in graph.tensors if t.index not in io and t.dtype.startswith(("float", "bfloat"))}
    ops = [op.name for op in graph.ops if is_float & set(op.inputs + op.outputs) and op.name not in ("QUANTIZE", "DEQUANTIZE")]
    if ops:
        warnings.warn(
            f"The exported file is not fully integer: {', '.join(dict.fromkeys(ops))} run in float (layers left "
            "in float with skip=, or ops the converter has no int8 kernel for). Devices without float support "
            "(int8-only NPUs, microcontrollers) cannot run it; TFLiteModel(...).summary() lists the float tensors.",
            stacklevel=3,
        )


def _is_quantized(model, fn):
    """True for models with fake-quant ops: kerasq QAT models, or any model emitting FakeQuant* ops."""
    from kerasq.quantization import is_quantized

    if is_quantized(model):
        return True
    graph_def = fn.get_concrete_function().graph.as_graph_def()
    nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
    return any(node.op.startswith("FakeQuantWithMinMax") for node in nodes)


# ---- arguments ----------------------------------------------------------------------------------------

def _check_model(model):
    import keras

    if not isinstance(model, keras.Model):
        hint = ""
        if "tf_keras" in type(model).__module__ or "tensorflow.python.keras" in type(model).__module__:
            hint = " This is a legacy tf_keras (Keras 2) model: rebuild it with Keras 3."
        raise TypeError(f"export_tflite expects a Keras 3 model (keras.Model); got {_typename(model)}.{hint}")
    if keras.backend.backend() != "tensorflow":
        raise ExportError(
            f"export_tflite needs the TensorFlow backend; Keras runs on '{keras.backend.backend()}'. "
            "Set KERAS_BACKEND=tensorflow before importing keras."
        )


def _resolve_type(value, default, what, mode):
    if value is None:
        return default
    name = getattr(value, "name", None) if not isinstance(value, str) else value
    if name is None:
        try:
            name = np.dtype(value).name
        except TypeError:
            name = str(value)
    name = str(name).lower()
    if name not in _TYPES:
        raise ValueError(f"{what} must be one of {sorted(_TYPES)}; got {value!r}.")
    if name == "int16":
        raise NotImplementedError(
            f"{what}='int16' (16x8 quantization: int16 activations, int8 weights) is not supported yet; "
            "use 'int8' or 'float32'."
        )
    if mode == "float" and name != "float32":
        raise ValueError(
            f"{what}={name!r} needs an integer model: pass representative_data to calibrate this float "
            "model, or export a quantization-aware model (kerasq.quantize_model)."
        )
    return name


def _calibration_samples(data, specs):
    """Validates calibration data and returns up to MAX_CALIBRATION_SAMPLES samples per input."""
    what = "representative_data"
    if isinstance(data, dict) or _is_array_data(data, specs):
        arrays = check_input_data(data, specs, what)
        n = arrays[0].shape[0]
        if n > MAX_CALIBRATION_SAMPLES:  # evenly spread, so sorted data still covers every class
            keep = np.linspace(0, n - 1, MAX_CALIBRATION_SAMPLES).round().astype(int)
            arrays = [a[keep] for a in arrays]
        return arrays
    if isinstance(data, (str, bytes)):
        raise ValueError(f"{what}: expected {expected_text(specs)}, or an iterable of such batches; got a string.")
    try:
        iterator = iter(data)
    except TypeError:
        raise ValueError(
            f"{what}: expected {expected_text(specs)}, or an iterable of such batches; got {_typename(data)}."
        ) from None
    batches, count = [], 0
    for k, batch in enumerate(iterator):
        arrays = check_input_data(_strip_targets(batch, specs), specs, f"{what} (batch {k})")
        batches.append(arrays)
        count += arrays[0].shape[0]
        if count >= MAX_CALIBRATION_SAMPLES:
            break
    if not batches:
        raise ValueError(f"{what} is empty; expected {expected_text(specs)}.")
    return [np.concatenate(parts)[:MAX_CALIBRATION_SAMPLES] for parts in zip(*batches)]


def _is_array_data(data, specs):
    if hasattr(data, "shape") and hasattr(data, "dtype"):
        return True
    if isinstance(data, (list, tuple)) and data:
        if len(specs) > 1:
            return len(data) == len(specs) and all(np.ndim(d) == len(s.shape) for d, s in zip(data, specs))
        return np.ndim(data[0]) < len(specs[0].shape)  # a (nested) list of samples, not a list of batches
    return False


def _strip_targets(batch, specs):
    """`(x, y)` or `(x, y, sample_weight)` batches, as Keras datasets yield them, give `x`."""
    if isinstance(batch, tuple) and len(batch) in (2, 3):
        first = batch[0]
        if len(specs) == 1 and not isinstance(first, (list, tuple, dict)) and np.ndim(first) == len(specs[0].shape):
            return first
        if len(specs) > 1 and isinstance(first, (list, tuple, dict)) and len(first) == len(specs):
            return first
    return batch


def _input_names(model, specs):
    """Names for the file's signature inputs: Keras input names where usable, else `input_<i>`."""
    try:
        structure = model.input
    except (AttributeError, ValueError):
        structure = None
    keys = sorted(structure) if isinstance(structure, dict) and len(structure) == len(specs) else None
    names = []
    for i, spec in enumerate(specs):
        name = str(keys[i]) if keys else spec.name
        names.append(name)
    return _sanitized(names, "input")


def _output_names(model):
    count = len(model.outputs)
    names = list(getattr(model, "output_names", None) or [])
    if len(names) != count and count == 1 and model.layers:
        names = [model.layers[-1].name]
    if len(names) != count:
        names = [f"output_{i}" for i in range(count)]
    float_names = [_float_model_name(tensor, name) for tensor, name in zip(model.outputs, names)]
    if len(set(float_names)) == len(float_names):
        names = float_names
    return _sanitized(names, "output")


def _float_model_name(tensor, name):
    """A QAT model's output under the name of the float model's layer, so QAT and PTQ files agree."""
    import keras

    from kerasq import _keras_private
    from kerasq.quantization.layers import Quantize, QuantizeWrapper

    layer = _keras_private.producer(tensor)
    if isinstance(layer, QuantizeWrapper):
        return layer.layer.name
    if isinstance(layer, Quantize):  # the float layer before it was left unquantized
        source = _keras_private.producer(layer.input)
        if source is not None and not isinstance(source, keras.layers.InputLayer):
            return source.name
    return name


def _sanitized(names, prefix):
    names = [re.sub(r"[^A-Za-z0-9_.\-/]", "_", n).lstrip("_-/") for n in names]
    if len(set(names)) != len(names) or not all(names):
        names = [f"{prefix}_{i}" for i in range(len(names))]
    return names


# ---- errors and noise ---------------------------------------------------------------------------------

def _export_error(model, mode, error, log):
    message = str(error) + "\n" + log
    ops = []
    for pattern in (r"'tfl?\.(\w+)' op", r"(?m)^Custom ops: ([\w, ]+)$", r"not (?:yet )?supported for op:? '?(?:tfl?\.)?(\w+)"):
        for match in re.findall(pattern, message):
            ops.extend(o.strip() for o in match.split(",") if o.strip())
    ops = list(dict.fromkeys(ops))
    layers = _layers_in(model, message)
    lines = [line for line in message.splitlines() if "error" in line] or str(error).strip().splitlines() or [""]
    first = re.sub(r"^.*\bloc\(.*\)\s*:\s*", "", lines[0]).rsplit("error:", 1)[-1].strip()[:300]
    not_builtin = "neither a custom op nor a flex op" in message or "Custom ops:" in message
    subject = ""
    if ops:
        subject = f"op {', '.join(ops[:3])}"
        subject += f" (in layer {', '.join(repr(n) for n in layers[:3])})" if layers else ""
    elif layers:
        subject = f"layer {', '.join(repr(n) for n in layers[:3])}"
    if not subject:
        advice = ""
    elif not_builtin or mode == "float":
        advice = (
            f" The {subject} is not a TFLite builtin op: replace it with supported ops "
            "(https://ai.google.dev/edge/litert/models/ops_compatibility)."
        )
    else:
        skip = f"skip={layers[:3]!r}" if layers else "skip=[<layer name>]"
        advice = (
            f" The {subject} has no int8 support: leave that layer in float with "
            f"kerasq.quantize_model(model, {skip}), or export without representative_data for a float file."
        )
    return ExportError(
        f"Could not convert model '{model.name}' to TFLite ({_mode_text(mode)}).{advice}\nConverter said: {first}"
    )


def _mode_text(mode):
    return {"qat": "quantization-aware int8", "ptq": "post-training int8", "float": "float32"}[mode]


def _layers_in(model, message):
    """Layer names of `model` (nested models included) that appear in the converter's op locations."""
    names = {}

    def collect(m):
        for layer in getattr(m, "layers", []):
            names.setdefault(layer.name, layer)
            collect(layer)

    collect(model)
    found = []
    for path in re.findall(r'"([\w./\-]+)@', message) + re.findall(r'"([\w.\-]+/[\w./\-]+)"', message):
        for part in path.split("/"):
            base = part if part in names else re.sub(r"_\d+$", "", part)
            if base in names and base not in found and not hasattr(names[base], "layers"):
                found.append(base)
                break
    return found


class _Log:
    def __init__(self):
        self.file = tempfile.TemporaryFile()

    def text(self):
        try:
            self.file.seek(0)
            return self.file.read().decode(errors="replace")
        except (OSError, ValueError):
            return ""


@contextlib.contextmanager
def _quiet():
    """Silences the converter (Python warnings, TF logging, and C++ output on stderr) for the block only;
    what the C++ side printed is kept for error messages."""
    log = _Log()
    tf_logger = logging.getLogger("tensorflow")
    absl_logger = logging.getLogger("absl")
    levels = tf_logger.level, absl_logger.level
    saved_fd = None
    try:
        sys.stderr.flush()
        saved_fd = os.dup(2)
        os.dup2(log.file.fileno(), 2)
    except (OSError, ValueError, AttributeError):
        saved_fd = None
    tf_logger.setLevel(logging.ERROR)
    absl_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield log
    finally:
        tf_logger.setLevel(levels[0])
        absl_logger.setLevel(levels[1])
        if saved_fd is not None:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
        log.file.close()


# ---- files --------------------------------------------------------------------------------------------

def write_atomic(path, content):
    """Writes `content` to `path` through a temporary file in the same folder and an atomic rename."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"'{path}' is a directory; give a file name such as '{os.path.join(path, 'model.tflite')}'.")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _typename(obj):
    t = type(obj)
    return f"an object of type '{t.__qualname__ if t.__module__ == 'builtins' else t.__module__ + '.' + t.__qualname__}'"
