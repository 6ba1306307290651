"""Layers left in float that the converter ran in int8 anyway, put back in float.

A layer without weights (a ReLU, an Add, a pooling) left unannotated between quantized layers
reads int8 tensors and writes one the next quantized layer reads: the converter gives it their
scales and writes an int8 op. The user asked for float, so its ops are rewritten to compute in
float between a DEQUANTIZE of each int8 input and a QUANTIZE to the int8 tensor the op wrote
(the same values up to rounding ties, as the QAT model computes the layer in float and rounds
where the next quantized layer reads it).
"""

import re

import numpy as np

from kerasq.export.flatbuffer import litert_schema
from kerasq.export.int16x8 import _inline_buffers, _pack, _text

_QUANTIZED_TYPES = ("INT8", "UINT8", "INT16")
_BOUNDARY_OPS = ("QUANTIZE", "DEQUANTIZE")
_OP_VERSION = 2  # DEQUANTIZE and QUANTIZE of int8 tensors


def run_in_float(content, float_layers, all_layers):
    """`content` with every op made by a layer named in `float_layers` (found by its output tensor's
    name, among the names of `all_layers`) that reads or writes quantized tensors computing in
    float32. Returns `content` itself when there is no such op."""
    float_layers, all_layers = set(float_layers), set(all_layers)
    if not float_layers:
        return content
    schema = litert_schema()
    model = schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    _inline_buffers(model, content)
    quantized = {getattr(schema.TensorType, name) for name in _QUANTIZED_TYPES}
    boundaries = {getattr(schema.BuiltinOperator, name) for name in _BOUNDARY_OPS}
    codes = {}
    changed = False
    for subgraph in model.subgraphs:
        operators = []
        names = {_text(tensor.name) for tensor in subgraph.tensors}
        for op in subgraph.operators:
            outputs = [subgraph.tensors[i] for i in op.outputs if i >= 0]
            owner = _layer_of(_text(outputs[0].name), all_layers) if outputs else None
            code = model.operatorCodes[op.opcodeIndex]
            boundary = max(code.builtinCode, code.deprecatedBuiltinCode) in boundaries
            if owner not in float_layers or boundary or not _touches(subgraph, op, quantized):
                operators.append(op)
                continue
            changed = True
            for position, index in enumerate(op.inputs):
                if index < 0 or subgraph.tensors[index].type not in quantized:
                    continue
                float_index = _float_twin(schema, model, subgraph, index, _unique(f"{owner}/input", names))
                operators.append(_op(schema, model, codes, "DEQUANTIZE", [index], [float_index]))
                op.inputs[position] = float_index
            operators.append(op)
            for position, index in enumerate(op.outputs):
                if index < 0 or subgraph.tensors[index].type not in quantized:
                    continue
                float_index = _float_twin(
                    schema, model, subgraph, index, _unique(f"{_text(subgraph.tensors[index].name)}/float", names)
                )
                op.outputs[position] = float_index
                operators.append(_op(schema, model, codes, "QUANTIZE", [float_index], [index]))
        subgraph.operators = operators
    return _pack(model) if changed else content


def _layer_of(tensor_name, layer_names):
    """The layer in `layer_names` whose op wrote `tensor_name` ("conv", "conv/kernel", "conv_2" for
    a second tensor of that name; TensorFlow scopes "model/conv_1/Relu" with `tensor_names=
    "converter"`): an exact name first, so that "re_lu_1" is not taken for "re_lu"."""
    parts = re.split(r"[;/]", tensor_name)
    for part in parts:
        if part in layer_names:
            return part
    for part in parts:
        base = re.sub(r"_\d+$", "", part)
        if base in layer_names:
            return base
    return None


def _unique(name, names):
    """`name`, or `name_<n>` for the first n that no tensor has; recorded in `names`."""
    candidate, n = name, 0
    while candidate in names:
        n += 1
        candidate = f"{name}_{n}"
    names.add(candidate)
    return candidate


def _touches(subgraph, op, quantized):
    return any(i >= 0 and subgraph.tensors[i].type in quantized for i in list(op.inputs) + list(op.outputs))


def _float_twin(schema, model, subgraph, index, name):
    """A new float32 activation tensor `name` shaped as tensor `index`; its index."""
    source = subgraph.tensors[index]
    tensor = schema.TensorT()
    tensor.shape = None if source.shape is None else np.array(source.shape, dtype=np.int32)
    tensor.shapeSignature = None if source.shapeSignature is None else np.array(source.shapeSignature, dtype=np.int32)
    tensor.type = schema.TensorType.FLOAT32
    tensor.name = name.encode()
    model.buffers.append(schema.BufferT())
    tensor.buffer = len(model.buffers) - 1
    subgraph.tensors.append(tensor)
    return len(subgraph.tensors) - 1


def _op(schema, model, codes, name, inputs, outputs):
    if name not in codes:
        builtin = getattr(schema.BuiltinOperator, name)
        for i, code in enumerate(model.operatorCodes):
            if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
                codes[name] = i
                code.version = max(code.version, _OP_VERSION)
                break
        else:
            code = schema.OperatorCodeT()
            code.builtinCode = builtin
            code.deprecatedBuiltinCode = min(builtin, 127)
            code.version = _OP_VERSION
            model.operatorCodes.append(code)
            codes[name] = len(model.operatorCodes) - 1
    op = schema.OperatorT()
    op.opcodeIndex = codes[name]
    op.inputs = np.array(inputs, dtype=np.int32)
    op.outputs = np.array(outputs, dtype=np.int32)
    return op
