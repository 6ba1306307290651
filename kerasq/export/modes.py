"""The export modes of `export_tflite`: which kind of file a model and the arguments give, and the
converter settings for each.

`mode` is what the user asks for; the converter runs one of seven internal modes:
- "qat": a model that simulates int8 (QAT, fake-quant ops) to a fully int8 file, no calibration;
- "qat16x8": a model that simulates 16-bit activations (scheme "int16x8") to a 16x8 file: int16
  activations, int8 weights, int64 biases, no calibration;
- "ptq": a float model with representative data to a post-training fully int8 file;
- "ptq16x8": a float model with representative data to a post-training 16x8 file;
- "float": a float model to a float32 file;
- "float16": a float model to a file with float16 weights (float32 compute; GPU delegates run it in
  half precision), about half the size of the float32 file;
- "dynamic": a float model to a dynamic-range quantized file: int8 weights, float activations
  (the kernels quantize activations on the fly), about a quarter of the size, no calibration.

Example:
>>> from kerasq.export.modes import resolve_mode
>>> resolve_mode(None, quantized=False, has_data=True), resolve_mode("float16", quantized=False, has_data=False)
('ptq', 'float16')
>>> resolve_mode("int8", quantized=False, has_data=False)
Traceback (most recent call last):
...
ValueError: mode='int8' for a float model needs calibration inputs: pass representative_data= ... or export a quantization-aware model (kerasq.quantize_model(model)), which needs none.
"""

MODES = (None, "int8", "int16x8", "float32", "float16", "dynamic")
FLOAT_OUTPUT_MODES = ("float", "float16", "dynamic")  # files that take and return float32 only
INT16X8_MODES = ("qat16x8", "ptq16x8")  # files with int16 activations

_TEXT = {
    "qat": "quantization-aware int8",
    "qat16x8": "quantization-aware 16x8",
    "ptq": "post-training int8",
    "ptq16x8": "post-training 16x8",
    "float": "float32",
    "float16": "float16 weights",
    "dynamic": "dynamic-range int8 weights",
}


def mode_text(mode):
    """A few words for an internal mode, as messages and the command line print it."""
    return _TEXT[mode]


def resolve_mode(mode, *, quantized, has_data, activation_bits=8):
    """The internal mode for the `mode` argument of `export_tflite`, a model that simulates integer
    quantization or not (`quantized`, with activations of `activation_bits`: 8, or 16 for the 16x8
    scheme), and whether `representative_data` was given; a `ValueError` naming the fix for a
    combination that cannot work."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}; got {mode!r}.")
    sixteen = quantized and activation_bits == 16
    if sixteen and has_data:
        raise ValueError(
            "representative_data is for float models: this model simulates 16-bit activations (scheme "
            "'int16x8') and its file takes the ranges it trained with. Drop representative_data."
        )
    if mode is None:
        if quantized:
            return "qat16x8" if sixteen else "qat"
        return "ptq" if has_data else "float"
    if mode == "int16x8":
        return _resolve_int16x8(quantized, sixteen, has_data)
    if sixteen:
        other = "quantize the float model with scheme='int8'" if mode == "int8" else (
            f"export the float model it was made from with mode={mode!r}"
        )
        raise ValueError(
            f"mode={mode!r}: this model simulates 16-bit activations (scheme 'int16x8') and exports only "
            f"to a 16x8 file: use mode='int16x8' (or None), or {other}."
        )
    if mode == "int8":
        if quantized:
            return "qat"
        if not has_data:
            raise ValueError(
                "mode='int8' for a float model needs calibration inputs: pass representative_data= (a few "
                "hundred typical model inputs, e.g. x_train) for post-training int8, or export a "
                "quantization-aware model (kerasq.quantize_model(model)), which needs none."
            )
        return "ptq"
    internal = "float" if mode == "float32" else mode
    if quantized:
        raise ValueError(
            f"mode={mode!r} is for float models; this model simulates int8 (kerasq.quantize_model or "
            "fake-quant ops) and exports only to int8: use mode='int8' (or None), or export the float "
            f"model it was made from with mode={mode!r}."
        )
    if has_data:
        raise ValueError(
            f"mode={mode!r} takes no representative_data (calibration is for full int8): drop it, or use "
            "mode='int8' for a fully integer file."
        )
    return internal


def _resolve_int16x8(quantized, sixteen, has_data):
    if sixteen:
        return "qat16x8"
    if quantized:
        raise ValueError(
            "mode='int16x8': this model simulates int8 activations, so its file is int8: use mode='int8' "
            "(or None), or quantize the float model with kerasq.quantize_model(model, scheme='int16x8')."
        )
    if not has_data:
        raise ValueError(
            "mode='int16x8' for a float model needs calibration inputs: pass representative_data= (a few "
            "hundred typical model inputs) for post-training 16x8, or export a model quantized with "
            "kerasq.quantize_model(model, scheme='int16x8'), which needs none."
        )
    return "ptq16x8"


def default_io_type(mode):
    """The input/output type of a file of internal `mode` when the caller names none."""
    if mode in INT16X8_MODES:
        return "int16"
    return "int8" if mode in ("qat", "ptq") else "float32"


def check_io_types(mode, in_type, out_type):
    """Float files (float32, float16, dynamic-range) take and return float32 only; int8 files take
    int8 or float32, 16x8 files int16 or float32."""
    if mode in ("qat", "ptq", "qat16x8", "ptq16x8"):
        _check_integer_io(mode, in_type, out_type)
        return
    if mode not in FLOAT_OUTPUT_MODES or mode == "float":
        return  # float32 files are checked with their own advice
    for what, name in (("input_type", in_type), ("output_type", out_type)):
        if name != "float32":
            raise ValueError(
                f"{what}={name!r}: a file with {mode_text(mode)} takes and returns float32; integer inputs "
                "and outputs need a fully int8 file (mode='int8')."
            )


def _check_integer_io(mode, in_type, out_type):
    integer = "int16" if mode in INT16X8_MODES else "int8"
    for what, name in (("input_type", in_type), ("output_type", out_type)):
        if name in (integer, "float32"):
            continue
        if integer == "int16":
            fix = "use 'int16' or 'float32', or quantize the float model with scheme='int8' for int8 ones"
        else:
            fix = "use 'int8' or 'float32', or quantize the float model with scheme='int16x8' for int16 ones"
        raise ValueError(
            f"{what}={name!r}: a {mode_text(mode)} file has {integer} activations and takes and returns "
            f"{integer} or float32; {fix}."
        )


def configure(converter, mode, in_type, out_type):
    """Sets the `tf.lite.TFLiteConverter` options of `mode` (calibration data is set by the caller)."""
    import tensorflow as tf

    if mode == "float":
        return
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
        return
    if mode == "dynamic":
        return  # Optimize.DEFAULT without a representative dataset: dynamic-range quantization
    converter.inference_input_type = tf.as_dtype(in_type)
    converter.inference_output_type = tf.as_dtype(out_type)
    if mode == "ptq":
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if mode in INT16X8_MODES:
        # The QAT path takes its types from the fake-quant ops' bit widths whatever this says; the
        # post-training path needs it to calibrate to int16 activations with int64 biases.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
