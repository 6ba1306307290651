"""`export_tflite`: a Keras 3 model (TensorFlow backend) to a .tflite flatbuffer.

Three modes, picked from the model and the arguments:
- a model that simulates int8 (a QAT model, or any model with fake-quant ops): full int8 conversion,
  no calibration data needed;
- a float model with `representative_data`: post-training full-integer quantization;
- a float model alone: a float32 file.

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

import tempfile
import warnings

import numpy as np

from kerasq.export import hooks
from kerasq.export.calibration import calibration_samples, representative_dataset
from kerasq.export.errors import ExportError, conversion_error, type_text
from kerasq.export.files import write_atomic
from kerasq.export.flatbuffer import read_graph, reorder_io_by_name
from kerasq.export.quiet import quiet
from kerasq.export.signature import input_names, output_names
from kerasq.validation import input_specs, pack_inputs

_TYPES = {"int8": "int8", "int16": "int16", "float32": "float32"}


def export_tflite(model, path=None, *, representative_data=None, input_type=None, output_type=None):
    """Converts a Keras model to .tflite, writes it to `path` (if given) and returns the bytes.

    Args:
        model: a built Keras 3 model (Functional, Sequential, or subclassed with `inputs`).
        path: where to write the file; parent folders are created and an existing file is replaced
            atomically (never left half-written).
        representative_data: calibration inputs for post-training int8 quantization of a float model:
            an array, a list/tuple of arrays (multi-input, in `model.inputs` order), or an iterable of
            such batches (a generator, a `tf.data.Dataset`; `(x, y)` batches are fine). Up to
            `MAX_CALIBRATION_SAMPLES` (300) samples are fed one at a time.
        input_type, output_type: dtype of the file's inputs/outputs: `"int8"` (the default for
            quantized files), `"float32"` (the default for float files; a quantized file then
            quantizes/dequantizes at its edges). Numpy/TF dtypes are accepted too.

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
    """
    _check_model(model)
    model = hooks.prepare(model)
    specs = input_specs(model)
    tf_names = input_names(model, specs)
    out_names = output_names(model)
    fn = _serving_function(model, specs, tf_names, out_names)
    with hooks.tracing():
        quantized = _is_quantized(model, fn)
        mode = "qat" if quantized else ("ptq" if representative_data is not None else "float")
        default = "float32" if mode == "float" else "int8"
        in_type = _resolve_type(input_type, default, "input_type", mode)
        out_type = _resolve_type(output_type, default, "output_type", mode)
        calibration = None
        if representative_data is not None:
            calibration = calibration_samples(representative_data, specs)
        content = _convert(model, fn, mode, calibration, tf_names, in_type, out_type)
    try:
        content = reorder_io_by_name(content, tf_names, out_names)
    except KeyError as missing:
        raise ExportError(f"The converted file has no signature entry {missing}; cannot order its inputs/outputs.")
    if mode != "float":
        _warn_if_float_ops(content)
    if path is not None:
        write_atomic(path, content)
    return content


def _convert(model, fn, mode, calibration, tf_names, in_type, out_type):
    import keras
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="kerasq-export-") as tmp, quiet() as log:
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
                converter.representative_dataset = representative_dataset(calibration, tf_names)
            return converter.convert()
        except Exception as error:
            raise conversion_error(model, mode, error, log.text()) from error


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


def _is_quantized(model, fn):
    """True for models that simulate int8: a registered export hook says so, or the traced graph has
    FakeQuant* ops."""
    if hooks.is_quantized(model):
        return True
    graph_def = fn.get_concrete_function().graph.as_graph_def()
    nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
    return any(node.op.startswith("FakeQuantWithMinMax") for node in nodes)


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
