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

A file with int8 and int16 layers has a QUANTIZE between them (see `kerasq.Quantize`'s
`requantizes`), next to a MINIMUM with the highest value of its type and a RESHAPE to the same
shape that only kept the converter from merging the two fake-quant ops; both are removed.
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
    for subgraph in model.subgraphs:
        _drop_requantize_guards(model, subgraph, names)
    return _pack(model)


_HIGHEST = {"INT8": 127, "INT16": 32767}


def _drop_requantize_guards(model, subgraph, names):
    """Removes the identities a requantizing `Quantize` leaves: each MINIMUM of a tensor with the
    highest value of its type, and each RESHAPE to the same shape, that keeps its input's
    quantization. Their readers read their input instead."""
    schema = litert_schema()
    type_names = {code: name for name, code in vars(schema.TensorType).items() if not name.startswith("_")}
    kept, renamed = [], {}
    for op in subgraph.operators:
        op.inputs = [renamed.get(index, index) for index in op.inputs]
        name = _op_name(model, op, names)
        guard = (name == "MINIMUM" and _is_guard(model, subgraph, op, type_names)) or (
            name == "RESHAPE" and _is_identity_reshape(subgraph, op)
        )
        if guard and op.outputs[0] not in subgraph.outputs:
            renamed[op.outputs[0]] = op.inputs[0]
            continue
        kept.append(op)
    subgraph.operators = kept


def _is_guard(model, subgraph, op, type_names):
    if len(op.inputs) != 2:
        return False
    tensor, bound = (subgraph.tensors[index] for index in op.inputs)
    highest = _HIGHEST.get(type_names.get(bound.type))
    data = model.buffers[bound.buffer].data if bound.buffer else None
    output = subgraph.tensors[op.outputs[0]]
    if highest is None or data is None or bound.type != tensor.type or not _same_quantization(tensor, output):
        return False
    values = np.frombuffer(bytes(bytearray(data)), "<i1" if highest == 127 else "<i2")
    return values.size == 1 and int(values[0]) == highest


def _is_identity_reshape(subgraph, op):
    tensor, output = subgraph.tensors[op.inputs[0]], subgraph.tensors[op.outputs[0]]
    shapes = [list(t.shapeSignature if t.shapeSignature is not None else t.shape) for t in (tensor, output)]
    return shapes[0] == shapes[1] and _same_quantization(tensor, output)


def _same_quantization(a, b):
    qa, qb = a.quantization, b.quantization
    if qa is None or qb is None or qa.scale is None or qb.scale is None:
        return False
    return list(qa.scale) == list(qb.scale) and list(qa.zeroPoint) == list(qb.zeroPoint) and a.type == b.type


def _op_name(model, op, names):
    code = model.operatorCodes[op.opcodeIndex]
    return names.get(max(code.builtinCode, code.deprecatedBuiltinCode))


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
