"""`export_tflite`: a Keras 3 model (TensorFlow backend) to a .tflite flatbuffer.

With `mode=None` the kind of file is picked from the model and the arguments:
- a model that simulates int8 (a QAT model, or any model with fake-quant ops): full int8 conversion,
  no calibration data needed; one that simulates 16-bit activations (scheme "int16x8"): a 16x8 file
  (int16 activations, int8 weights), no calibration data needed either;
- a float model with `representative_data`: post-training full-integer quantization;
- a float model alone: a float32 file.
`mode="int8"`, `"int16x8"`, `"float32"`, `"float16"` or `"dynamic"` asks for one kind and fails with the fix when
the model cannot give it (see `kerasq.export.modes`).

Example:
>>> import os, tempfile
>>> import keras, numpy as np
>>> from kerasq.export import export_tflite
>>> model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])
>>> data = np.random.rand(100, 8, 8, 1).astype("float32")
>>> with tempfile.TemporaryDirectory() as folder:
...     content = export_tflite(model, os.path.join(folder, "digits_int8.tflite"), representative_data=data)
>>> content[4:8]
b'TFL3'
"""

import contextlib
import re
import tempfile
import warnings

import numpy as np

from kerasq.export import hooks
from kerasq.export.calibration import calibration_samples, representative_dataset
from kerasq.export.errors import ExportError, conversion_error, type_text
from kerasq.export.files import write_atomic
from kerasq.export.float_islands import run_in_float
from kerasq.export.flatbuffer import read_graph, reorder_io_by_name
from kerasq.export.int16x8 import make_runnable
from kerasq.export.modes import INT16X8_MODES, MODES, check_io_types, configure, default_io_type, mode_text, resolve_mode
from kerasq.export.quiet import quiet
from kerasq.export.signature import input_names, output_names
from kerasq.export.tensor_names import layer_scopes, short_names
from kerasq.validation import input_specs, pack_inputs

_TYPES = {"int8": "int8", "int16": "int16", "float32": "float32"}


def export_tflite(
    model, path=None, *, mode=None, representative_data=None, input_type=None, output_type=None, tensor_names="layers"
):
    """Converts a Keras model to .tflite, writes it to `path` (if given) and returns the bytes.

    Args:
        model: a built Keras 3 model (Functional, Sequential, or subclassed with `inputs`).
        path: where to write the file; parent folders are created and an existing file is replaced
            atomically (never left half-written).
        mode: the kind of file. `None` (the default) picks it: fully int8 for a model that simulates
            int8 (`kerasq.quantize_model`), 16x8 for one that simulates 16-bit activations
            (`kerasq.quantize_model(model, scheme="int16x8")`), post-training int8 for a float model
            with `representative_data`, float32 for a float model alone. `"int8"`: a fully int8 file (a
            float model then needs `representative_data`). `"int16x8"`: int16 activations, int8
            weights and int64 biases, TFLite's 16x8 op set (a float model then needs
            `representative_data`). `"float32"`: a float model as it is.
            `"float16"`: float16 weights, float32 inputs, outputs and CPU compute (half the size;
            GPU delegates compute in half precision). `"dynamic"`: dynamic-range quantization, int8
            weights and float activations, no calibration data (a quarter of the size; the
            converter keeps weights under 1,024 values in float). `"float32"`, `"float16"` and
            `"dynamic"` are for float models: a QAT model exports to int8 (or 16x8) only.
        representative_data: calibration inputs for post-training int8 quantization of a float model:
            an array, a list/tuple of arrays (multi-input, in `model.inputs` order), or an iterable of
            such batches (a generator, a `tf.data.Dataset`; `(x, y)` batches are fine). Up to
            `MAX_CALIBRATION_SAMPLES` (300) samples are fed one at a time.
        input_type, output_type: dtype of the file's inputs/outputs: `"int8"` (the default for int8
            files), `"int16"` (the default for 16x8 files), `"float32"` (the default for float files;
            a quantized file then quantizes/dequantizes at its edges). Numpy/TF dtypes are accepted
            too.
        tensor_names: `"layers"` (the default) names each tensor after its Keras layer ("conv",
            "conv/kernel"; inputs and outputs after their signature names); `"converter"` keeps the
            TFLite converter's names, which list every TensorFlow op fused into a tensor (larger).

    Returns:
        The .tflite flatbuffer as `bytes`. Its inputs and outputs are in the order of
        `model.inputs`/`model.outputs`, with a dynamic batch dimension.

    Example:
    >>> import os, tempfile
    >>> import keras, kerasq, numpy as np
    >>> model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3), keras.layers.Flatten(),
    ...                           keras.layers.Dense(10)])
    >>> qat_model = kerasq.quantize_model(model)
    >>> _ = qat_model(np.random.rand(32, 8, 8, 1).astype("float32"), training=True)  # or qat_model.fit(...)
    >>> with tempfile.TemporaryDirectory() as folder:  # fully int8, no calibration data needed
    ...     content = kerasq.export_tflite(qat_model, os.path.join(folder, "model_int8.tflite"))
    >>> kerasq.TFLiteModel(content).is_fully_integer
    True
    >>> half = kerasq.TFLiteModel(kerasq.export_tflite(model, mode="float16"))  # the float model
    >>> sorted({w.dtype.name for w in half.weights().values() if w.ndim > 1})  # the kernels
    ['float16']
    """
    _check_model(model)
    if mode not in MODES:
        resolve_mode(mode, quantized=False, has_data=False)  # raises the ValueError before any tracing
    if tensor_names not in ("layers", "converter"):
        raise ValueError(f"tensor_names must be 'layers' or 'converter'; got {tensor_names!r}.")
    model = hooks.prepare(model)
    specs = input_specs(model)
    tf_names = input_names(model, specs)
    out_names = output_names(model)
    fn = _serving_function(model, specs, tf_names, out_names)
    with hooks.tracing():
        fake_quants = _fake_quant_nodes(fn)
        quantized = hooks.is_quantized(model) or bool(fake_quants)
        bits = _activation_bits(model, fake_quants)
        in_bits, out_bits = _io_bits(model, bits)
        has_data = representative_data is not None
        mode = resolve_mode(mode, quantized=quantized, has_data=has_data, activation_bits=in_bits)
        # A file with int8 and int16 layers takes and returns the types of its inputs and outputs.
        out_mode = mode if bits != "mixed" else resolve_mode(None, quantized=True, has_data=False, activation_bits=out_bits)
        in_type = _resolve_type(input_type, default_io_type(mode), "input_type", mode)
        out_type = _resolve_type(output_type, default_io_type(out_mode), "output_type", out_mode)
        check_io_types(mode, in_type, default_io_type(mode))
        check_io_types(out_mode, default_io_type(out_mode), out_type)
        calibration = None
        if representative_data is not None:
            calibration = calibration_samples(representative_data, specs)
        content = _convert(model, fn, mode, calibration, tf_names, in_type, out_type, mixed=bits == "mixed")
    if mode == "qat16x8" or bits == "mixed":
        content = make_runnable(content)
    try:
        content = reorder_io_by_name(content, tf_names, out_names)
    except KeyError as missing:
        raise ExportError(f"The converted file has no signature entry {missing}; cannot order its inputs/outputs.")
    scopes = layer_scopes(model)
    if tensor_names == "layers":
        content = short_names(content, scopes)
    if mode in ("qat", "qat16x8"):
        # Layers with weights stay float through the converter itself (see _convert).
        float_layers = [layer.name for layer in hooks.float_layers(model) if not layer.weights]
        content = run_in_float(content, float_layers, set(scopes) | set(scopes.values()))
    if mode in ("qat", "ptq", *INT16X8_MODES):
        _warn_if_float_ops(content)
    if path is not None:
        write_atomic(path, content)
    return content


def _convert(model, fn, mode, calibration, tf_names, in_type, out_type, mixed=False):
    import keras
    import tensorflow as tf

    # Given ranges for a float op's inputs and output, the converter infers ranges for its constant
    # weights and quantizes it: a layer left in float would silently run int8 (and off its Keras
    # model). Without inference, only what the model fake-quantizes is quantized. (With int8 and
    # int16 layers, inferred ranges also make it write no QUANTIZE between them.)
    keep_float = mode in ("qat", "qat16x8") and any(layer.weights for layer in hooks.float_layers(model))
    inference = _constant_ranges_not_inferred() if keep_float or mixed else contextlib.nullcontext()
    with tempfile.TemporaryDirectory(prefix="kerasq-export-") as tmp, quiet() as log, inference:
        try:
            archive = keras.export.ExportArchive()
            archive.track(model)
            archive.add_endpoint("serving_default", fn)
            archive.write_out(tmp, verbose=False)
            converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=["serving_default"])
            configure(converter, mode, in_type, out_type)
            if calibration is not None:
                converter.representative_dataset = _with_progress(representative_dataset(calibration, tf_names))
            return converter.convert()
        except Exception as error:
            if mode in ("float16", "dynamic"):  # the advice for float files; the mode in the message
                text = str(conversion_error(model, "float", error, log.text()))
                raise ExportError(text.replace("(float32)", f"({mode_text(mode)})", 1)) from error
            if mode in INT16X8_MODES:  # the advice of the int8 path, about 16x8
                int8_mode = mode.replace("16x8", "")
                text = str(conversion_error(model, int8_mode, error, log.text()))
                text = text.replace(f"({mode_text(int8_mode)})", f"({mode_text(mode)})", 1)
                raise ExportError(text.replace("has no int8 support", "has no 16x8 support", 1)) from error
            raise conversion_error(model, mode, error, log.text()) from error


@contextlib.contextmanager
def _constant_ranges_not_inferred():
    """While active, TFLite conversions of fake-quantized models quantize only the tensors that
    fake-quant ops give ranges to (the converter's `disable_infer_tensor_range`, which its Python API
    sets only for low-bit QAT, with other changes)."""
    from tensorflow.lite.python import lite

    flags = lite.QuantizationMode.converter_flags

    def without_inference(self, *args, **kwargs):
        result = flags(self, *args, **kwargs)
        if "disable_infer_tensor_range" in result:  # the flags of integer (QAT) conversions
            result["disable_infer_tensor_range"] = True
        return result

    lite.QuantizationMode.converter_flags = without_inference
    try:
        yield
    finally:
        lite.QuantizationMode.converter_flags = flags


_calibration_progress = None  # see calibration_progress()


@contextlib.contextmanager
def calibration_progress(callback):
    """Calls `callback(done, total)` as the converter consumes each calibration sample during the
    `export_tflite` calls in the block (the command line draws a progress bar with it)."""
    global _calibration_progress
    previous, _calibration_progress = _calibration_progress, callback
    try:
        yield
    finally:
        _calibration_progress = previous


def _with_progress(feed):
    callback = _calibration_progress
    if callback is None:
        return feed

    def fed():
        samples = list(feed())
        for i, sample in enumerate(samples):
            yield sample
            callback(i + 1, len(samples))

    return fed


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


def _fake_quant_nodes(fn):
    """The FakeQuant* ops of the traced model: a model with any simulates integer quantization."""
    graph_def = fn.get_concrete_function().graph.as_graph_def()
    nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
    return [node for node in nodes if node.op.startswith("FakeQuantWithMinMax")]


def _activation_bits(model, fake_quants):
    """16 when the model's activations are fake-quantized to 16 bits (the 16x8 scheme), 8 when to 8
    bits, "mixed" for both (layers of each, with a requantizing `Quantize` between them).

    Weights are fake-quantized to at most 8 bits with a narrow range (per channel, or per tensor);
    8-bit activations have the full range. Both widths inside one layer (the 8-bit intermediate of
    SiLU or hard sigmoid in a 16x8 layer) have no 16x8 form: `ExportError`.
    """
    wide = [node for node in fake_quants if _num_bits(node) > 8]
    if not wide:
        return 8
    narrow = [node for node in fake_quants if _is_8_bit_activation(node)]
    if not narrow:
        return 16
    inside_wide = [name for name in _layer_names(model, narrow) if name in _layer_names(model, wide)]
    if inside_wide:
        raise ExportError(_mixed_bits_message(model, inside_wide))
    return "mixed"


def _io_bits(model, bits):
    """`(input bits, output bits)`: `bits` for a model of one width; for one with int8 and int16
    layers, the widths of its quantized inputs and outputs, each the same for all (`ExportError`)."""
    if bits != "mixed":
        return bits, bits
    found = []
    for what, tensors in (("inputs", model.inputs), ("outputs", model.outputs)):
        widths = {hooks.activation_bits(tensor) for tensor in tensors} - {None}
        if len(widths) > 1:
            raise ExportError(
                f"Model '{model.name}' has {what} quantized to both 8 and 16 bits; a file's {what} have one "
                "type. Give the layers that produce them the same scheme (layer_schemes=)."
            )
        found.append(widths.pop() if widths else 8)
    return tuple(found)


def _num_bits(node):
    return node.attr["num_bits"].i if "num_bits" in node.attr else 8


def _is_8_bit_activation(node):
    per_tensor = not node.op.endswith("PerChannel")
    narrow_range = "narrow_range" in node.attr and node.attr["narrow_range"].b
    return per_tensor and _num_bits(node) <= 8 and not narrow_range


def _mixed_bits_message(model, names):
    by_name = {layer.name: layer for layer in model.layers}
    layers = [hooks.source_name(by_name[name]) if name in by_name else name for name in names]
    return (
        f"Model '{model.name}' quantizes activations to both 16 and 8 bits inside {layers[:3]}: SiLU and "
        "hard sigmoid are simulated with an 8-bit intermediate and have no 16x8 form. Use another "
        "activation there, or give that layer scheme='int8' (layer_schemes={name: 'int8'})."
    )


def _layer_names(model, nodes):
    """The names of `model`'s layers that hold `nodes`, from the nodes' name scopes."""
    names = {layer.name for layer in model.layers}
    found = []
    for node in nodes:
        for part in node.name.split("/"):
            base = part if part in names else re.sub(r"_\d+$", "", part)
            if base in names:
                found.append(base)
                break
    return list(dict.fromkeys(found)) or ["?"]


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


def _check_model(model):
    import keras

    if not isinstance(model, keras.Model):
        hint = ""
        if "tf_keras" in type(model).__module__ or "tensorflow.python.keras" in type(model).__module__:
            hint = " This is a legacy tf_keras (Keras 2) model: rebuild it with Keras 3."
        raise TypeError(f"export_tflite expects a Keras 3 model (keras.Model); got {type_text(model)}.{hint}")
    if keras.backend.backend() != "tensorflow":
        raise ExportError(
            f"export_tflite needs the TensorFlow backend; Keras runs on '{keras.backend.backend()}'. "
            "Set KERAS_BACKEND=tensorflow before importing keras."
        )
    _check_finite(model)


def _check_finite(model):
    """A NaN or infinite weight (or learned range) makes a file LiteRT refuses, or NaN outputs: say
    which layer holds it before converting."""
    import numpy as np

    bad = []
    for variable in model.variables:
        value = np.asarray(variable)
        if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
            bad.append(variable.path)
    if bad:
        shown = ", ".join(f"'{path}'" for path in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ExportError(
            f"Model '{model.name}' holds NaN or infinite values in {shown}: its training diverged. "
            "Lower the learning rate (or clip gradients) and train again from the last good weights."
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
    if mode == "float" and name != "float32":
        raise ValueError(
            f"{what}={name!r} needs an integer model: pass representative_data to calibrate this float "
            "model, or export a quantization-aware model (kerasq.quantize_model)."
        )
    return name
