"""Short tensor names for exported files: the user's layer names instead of the converter's.

The converter names a tensor after every TensorFlow op fused into it, with the scopes of the model,
of kerasq's wrappers and of each call ("digits_cnn_1/quant_block1_relu_1/block1_relu_1/Relu;
digits_cnn_1/quant_block1_conv_1/BiasAdd;..."): up to a few KiB of strings a microcontroller stores
for nothing. `short_names` renames each tensor to the layer that produced it ("block1_relu"),
constants to their layer and role ("block1_conv/kernel", "block1_conv/bias"), and the main subgraph's
inputs and outputs to their signature names; signature names themselves are unchanged. Operator codes
and buffers nothing uses are dropped.

Example:
>>> import keras
>>> from kerasq.export import export_tflite
>>> from kerasq.export.flatbuffer import read_graph
>>> model = keras.Sequential([keras.Input((4,), name="features"), keras.layers.Dense(2, name="head")])
>>> sorted(t.name for t in read_graph(export_tflite(model)).tensors)
['features', 'head', 'head/kernel']
"""

import functools
import re

import numpy as np

from kerasq.export.flatbuffer import litert_schema

# The role of an op's constant inputs, by position.
_WEIGHTS = {
    "CONV_2D": {1: "kernel", 2: "bias"},
    "DEPTHWISE_CONV_2D": {1: "kernel", 2: "bias"},
    "FULLY_CONNECTED": {1: "kernel", 2: "bias"},
    "CONV_3D": {1: "kernel", 2: "bias"},
    "TRANSPOSE_CONV": {1: "kernel", 3: "bias"},
    "CONV_3D_TRANSPOSE": {1: "kernel", 3: "bias"},
}
_ROLES = {
    "RESHAPE": {1: "shape"},
    "MEAN": {1: "axis"},
    "SUM": {1: "axis"},
    "REDUCE_MAX": {1: "axis"},
    "REDUCE_MIN": {1: "axis"},
    "EXPAND_DIMS": {1: "axis"},
    "PAD": {1: "paddings"},
    "PADV2": {1: "paddings", 2: "pad_value"},
    "MIRROR_PAD": {1: "paddings"},
    "TRANSPOSE": {1: "perm"},
    "PRELU": {1: "alpha"},
    "GATHER": {0: "embeddings"},
    "TILE": {1: "multiples"},
    "RESIZE_BILINEAR": {1: "size"},
    "RESIZE_NEAREST_NEIGHBOR": {1: "size"},
    "STRIDED_SLICE": {1: "begin", 2: "end", 3: "strides"},
}


def layer_scopes(model):
    """{name scope: layer name to show} for `model`'s layers, nested models included; a wrapper's
    scope shows the layer it wraps."""
    import keras

    scopes = {}

    def visit(layer):
        inner = layer
        while isinstance(inner, keras.layers.Wrapper):
            inner = inner.layer
        scopes.setdefault(layer.name, inner.name)
        scopes.setdefault(inner.name, inner.name)
        if isinstance(inner, keras.Model):
            for child in inner.layers:
                visit(child)

    visit(model)
    return scopes


def short_names(content, scopes):
    """`content` with each tensor named after its layer (see the module docstring).

    `scopes` maps TensorFlow name scopes to layer names (`layer_scopes`). Names are unique within
    each subgraph; a counter is appended where two would collide.
    """
    schema = litert_schema()
    model = schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    op_names = {code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    io_names = {}
    for signature in model.signatureDefs or []:
        if signature.subgraphIndex == 0:
            io_names = {m.tensorIndex: _text(m.name) for m in (signature.inputs or []) + (signature.outputs or [])}
    for index, subgraph in enumerate(model.subgraphs):
        ops = [(op_names.get(_code(model.operatorCodes[op.opcodeIndex]), "custom"), op) for op in subgraph.operators or []]
        names = _subgraph_names(model, subgraph, ops, scopes, io_names if index == 0 else {})
        for tensor, name in zip(subgraph.tensors, names):
            tensor.name = name
    _drop_unused(model)
    return _pack(model, content)


def _subgraph_names(model, subgraph, ops, scopes, io_names):
    tensors = subgraph.tensors or []
    old = [_text(t.name) for t in tensors]
    constant = [_is_constant(model, t) for t in tensors]
    names = [None] * len(tensors)
    for index, name in io_names.items():
        if 0 <= index < len(tensors):
            names[index] = name

    def layer(index, last=False):
        return _layer(old[index], scopes, last) if 0 <= index < len(tensors) else None

    # Constants: the layer that owns the op they feed (a weight's own name tells it best), and their role.
    for name, op in ops:
        inputs = list(op.inputs if op.inputs is not None else [])
        roles = _WEIGHTS.get(name) or _ROLES.get(name, {})
        outputs = list(op.outputs if op.outputs is not None else [])
        owner = None
        if name in _WEIGHTS:
            kernel = inputs[1] if len(inputs) > 1 else -1
            owner = layer(kernel) or (layer(outputs[0], last=True) if outputs else None)
        for position, index in enumerate(inputs):
            if index < 0 or not constant[index] or names[index] is not None:
                continue
            base = owner or layer(index) or (layer(outputs[0]) if outputs else None)
            role = roles.get(position, "const")
            names[index] = f"{base}/{role}" if base else role

    # Computed tensors: their layer; the last one a layer computes keeps its bare name, others say their op.
    by_layer = {}
    for name, op in ops:
        for index in op.outputs if op.outputs is not None else []:
            if 0 <= index < len(tensors) and names[index] is None:
                base = layer(index) or _near_layer(op, layer)
                by_layer.setdefault(base or name.lower(), []).append((index, name))
    for base, produced in by_layer.items():
        for i, (index, name) in enumerate(produced):
            names[index] = base if i == len(produced) - 1 or base == name.lower() else f"{base}/{name.lower()}"

    for index, name in enumerate(names):
        if name is None:
            names[index] = layer(index) or "tensor"
    return _unique(names)


def _drop_unused(model):
    """Drops the operator codes no op uses and the buffers no tensor or metadata uses (the converter
    leaves some behind, such as those of the float input's QUANTIZE op it removed)."""
    operators = [op for subgraph in model.subgraphs for op in subgraph.operators or []]
    codes = sorted({op.opcodeIndex for op in operators})
    model.operatorCodes = [model.operatorCodes[i] for i in codes]
    for op in operators:
        op.opcodeIndex = codes.index(op.opcodeIndex)
    tensors = [tensor for subgraph in model.subgraphs for tensor in subgraph.tensors or []]
    used = sorted({0} | {t.buffer for t in tensors} | {m.buffer for m in model.metadata or []})
    new_index = {old: new for new, old in enumerate(used)}
    model.buffers = [model.buffers[i] for i in used]
    for item in tensors + list(model.metadata or []):
        item.buffer = new_index[item.buffer]


def _layer(converter_name, scopes, last=False):
    """The layer of the first (or last) fused op in a converter's tensor name that has one."""
    entries = [e for e in converter_name.split(";") if "/" in e]
    for entry in reversed(entries) if last else entries:
        for scope in reversed(entry.split("/")[:-1]):  # innermost first; the last part is the op
            bare = re.sub(r"_\d+$", "", scope)  # the suffix TensorFlow gives each further use of a scope
            found = scopes.get(bare) or scopes.get(scope)
            if found:
                return found
    return None


def _near_layer(op, layer):
    """The layer of an op's first input: for ops the converter inserts (a requantize)."""
    for index in op.inputs if op.inputs is not None else []:
        found = layer(index)
        if found:
            return found
    return None


def _unique(names):
    seen = set(names)
    taken = set()
    result = []
    for name in names:
        if name in taken:
            count = 1
            while f"{name}_{count}" in taken or f"{name}_{count}" in seen:
                count += 1
            name = f"{name}_{count}"
        taken.add(name)
        result.append(name)
    return result


def _is_constant(model, tensor):
    if tensor.buffer is None or not 0 < tensor.buffer < len(model.buffers):
        return False
    buffer = model.buffers[tensor.buffer]
    return (buffer.data is not None and len(buffer.data) > 0) or (buffer.offset or 0) > 1


def _code(opcode):
    return max(opcode.builtinCode, opcode.deprecatedBuiltinCode)


def _text(name):
    return name.decode(errors="replace") if isinstance(name, bytes) else str(name or "")


_ITEM_SIZES = {"INT16": 2, "FLOAT16": 2, "INT32": 4, "UINT32": 4, "FLOAT32": 4, "INT64": 8, "UINT64": 8,
               "FLOAT64": 8, "COMPLEX64": 8, "COMPLEX128": 16}


def _pack(model, content):
    """Packs `model` with each buffer aligned for its tensors' type. Files whose buffers follow the
    flatbuffer (over 2 GB) keep those bytes, moved to follow the new, shorter flatbuffer."""
    import flatbuffers

    schema = litert_schema()
    types = {code: name for name, code in vars(schema.TensorType).items() if not name.startswith("_")}
    alignment = {}
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors or []:
            size = _ITEM_SIZES.get(types.get(tensor.type), 1)
            alignment[tensor.buffer] = max(alignment.get(tensor.buffer, 1), size)
    for index, buffer in enumerate(model.buffers):
        if buffer.data is not None and len(buffer.data):
            buffer.__class__ = _aligned_buffer()
            buffer.alignment = alignment.get(index, 1)

    def finish():
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())

    outside = [b for b in model.buffers if (b.offset or 0) > 1]
    packed = finish()
    if not outside:
        return packed
    start = min(b.offset for b in outside)
    new_start = len(packed) + (start - len(packed)) % 64  # keeps each buffer's alignment
    for buffer in outside:
        buffer.offset += new_start - start
    repacked = finish()
    if len(repacked) != len(packed):  # offsets are fixed-width fields: the flatbuffer cannot grow
        raise RuntimeError("Could not move the buffers that follow the .tflite flatbuffer.")
    return repacked + bytes(new_start - len(repacked)) + bytes(content[start:])


@functools.cache
def _aligned_buffer():
    schema = litert_schema()

    class AlignedBuffer(schema.BufferT):
        """A buffer whose bytes start at a multiple of `alignment` (the object API aligns them to 1)."""

        alignment = 1

        def Pack(self, builder):
            data = np.asarray(self.data, np.uint8).tobytes()
            builder.StartVector(1, len(data), self.alignment)
            builder.head -= len(data)
            builder.Bytes[builder.head : builder.head + len(data)] = data
            vector = builder.EndVector(len(data))
            schema.BufferStart(builder)
            schema.BufferAddData(builder, vector)
            schema.BufferAddOffset(builder, self.offset)
            schema.BufferAddSize(builder, self.size)
            return schema.BufferEnd(builder)

    return AlignedBuffer
