"""16x8 files (int16 activations, int8 weights) as the converter's quantization-aware path writes
them, made to run on LiteRT.

From a model with 16-bit fake-quant activations the TFLite converter (TF 2.21) writes a 16x8 file
from the trained ranges alone, with two things LiteRT's int16 kernels do not run:
- biases stored as int32 where the kernels read int64: every kernel path then computes garbage (a
  digits CNN scored 10%). They are widened, value for value. A bias the converter had to clip to
  int32 (bias / (input scale x weight scale) beyond 2^31, as for a channel whose weights are tiny
  next to its bias) cannot be recovered, and `ExportError` names it.
- LOGISTIC outputs with scale 1/65536 and zero point -32768, which LiteRT refuses to load: its int16
  kernel writes scale 1/32768 and zero point 0 whatever the file says, so the file says that.

The converter's post-training 16x8 path writes int64 biases and correct LOGISTIC outputs itself.
"""

import numpy as np

from kerasq.export.errors import ExportError
from kerasq.export.flatbuffer import litert_schema

# The bias input of each op that has one, by its position among the op's inputs.
_BIAS_INPUT = {"CONV_2D": 2, "DEPTHWISE_CONV_2D": 2, "FULLY_CONNECTED": 2, "TRANSPOSE_CONV": 3}
_INT32_LIMITS = (-(2**31), 2**31 - 1)
_INT16_UNIT_SCALE = 1.0 / 32768.0


def make_runnable(content):
    """The 16x8 file `content` with int64 biases and LiteRT's LOGISTIC output quantization."""
    schema = litert_schema()
    model = schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    _inline_buffers(model, content)
    names = {code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    clipped, widened = [], {}
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            code = model.operatorCodes[op.opcodeIndex]
            name = names.get(max(code.builtinCode, code.deprecatedBuiltinCode))
            if not _reads_int16(subgraph, op, schema):
                continue
            if name in _BIAS_INPUT:
                clipped += _widen_bias(model, subgraph, op, _BIAS_INPUT[name], widened, schema)
            elif name == "LOGISTIC":
                _set_unit_scale(subgraph.tensors[op.outputs[0]])
    if clipped:
        raise ExportError(_clipped_bias_message(clipped))
    return _pack(model)


def _reads_int16(subgraph, op, schema):
    return len(op.inputs) > 0 and op.inputs[0] >= 0 and subgraph.tensors[op.inputs[0]].type == schema.TensorType.INT16


def _widen_bias(model, subgraph, op, position, widened, schema):
    """Points the op's int32 bias at an int64 copy of its values; returns its name if it was clipped.
    A buffer several biases share is copied once; the int32 one stays for any other reader."""
    if len(op.inputs) <= position or op.inputs[position] < 0:
        return []
    tensor = subgraph.tensors[op.inputs[position]]
    if tensor.type != schema.TensorType.INT32:
        return []
    values = np.frombuffer(bytes(bytearray(model.buffers[tensor.buffer].data)), "<i4")
    if tensor.buffer not in widened:
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(values.astype("<i8").tobytes(), np.uint8)
        model.buffers.append(buffer)
        widened[tensor.buffer] = len(model.buffers) - 1
    tensor.buffer = widened[tensor.buffer]
    tensor.type = schema.TensorType.INT64
    at_limit = np.isin(values, _INT32_LIMITS).any()
    return [_text(tensor.name)] if at_limit else []


def _set_unit_scale(tensor):
    quantization = tensor.quantization
    if quantization is None or quantization.scale is None or len(quantization.scale) != 1:
        return
    quantization.scale = [_INT16_UNIT_SCALE]
    quantization.zeroPoint = [0]


def _inline_buffers(model, content):
    """Buffers stored after the flatbuffer (files over 2 GB) moved into it, so packing keeps them."""
    for buffer in model.buffers:
        if buffer.offset and buffer.offset > 1:
            buffer.data = np.frombuffer(content[buffer.offset : buffer.offset + buffer.size], np.uint8)
            buffer.offset, buffer.size = 0, 0


def _pack(model):
    import flatbuffers

    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _text(name):
    return name.decode(errors="replace") if isinstance(name, bytes) else str(name)


def _clipped_bias_message(names):
    shown = ", ".join(f"'{name}'" for name in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return (
        f"The converter clipped the bias of {shown} to int32: at 16x8 scales some channel's bias is over "
        "2^31 steps of input scale x weight scale, which happens when a channel's weights are tiny next to "
        "its bias (a nearly dead channel). The file would compute wrong outputs. Remove such channels "
        "(kerasq.prune_channels), or quantize with scheme='int8', whose int32 biases have 256 times "
        "the headroom."
    )
