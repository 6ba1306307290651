"""The .tflite flatbuffer, read without running it: ops, tensors, quantization and signature names,
and the one edit export makes (the order of the main subgraph's inputs and outputs).

Example:
>>> import keras
>>> from kerasq.export import export_tflite
>>> from kerasq.export.flatbuffer import read_graph
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="head")])
>>> graph = read_graph(export_tflite(model))
>>> [op.name for op in graph.ops], list(graph.signature["outputs"].values())
(['FULLY_CONNECTED'], ['head'])
"""

import collections

import numpy as np

TensorInfo = collections.namedtuple(
    "TensorInfo", ["index", "name", "shape", "dtype", "scales", "zero_points", "quantized_dimension", "is_constant"]
)
TensorInfo.__doc__ = "One tensor of the file: `shape` uses None for dynamic dimensions; `scales` is empty if float."

OpInfo = collections.namedtuple("OpInfo", ["name", "inputs", "outputs"])
OpInfo.__doc__ = "One operator, in execution order: builtin (or custom) op name, input and output tensor indices."

Graph = collections.namedtuple("Graph", ["ops", "tensors", "inputs", "outputs", "signature", "num_subgraphs"])


# Everything in this module relies on parts of ai_edge_litert that are not its documented API: the flatbuffer
# bindings generated from TFLite's schema.fbs (`ai_edge_litert.schema_py_generated`). No other code
# in kerasq touches them. tests/test_tflite_model.py::test_litert_internals_are_available fails loudly
# if a LiteRT release moves or renames them.

def litert_schema():
    """The generated flatbuffer bindings of the .tflite format shipped inside ai_edge_litert."""
    from ai_edge_litert import schema_py_generated  # undocumented module: see the comment above

    return schema_py_generated


def read_graph(content):
    """Parses a .tflite flatbuffer into a `Graph` of the main subgraph (ops in execution order)."""
    schema = litert_schema()
    model = schema.Model.GetRootAs(content, 0)
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    type_names = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    subgraph = model.Subgraphs(0)

    def op_name(opcode):
        code = max(opcode.BuiltinCode(), opcode.DeprecatedBuiltinCode())
        if code == schema.BuiltinOperator.CUSTOM:
            return (opcode.CustomCode() or b"CUSTOM").decode()
        return op_names.get(code, f"OP_{code}")

    ops = []
    for i in range(subgraph.OperatorsLength()):
        op = subgraph.Operators(i)
        ops.append(OpInfo(op_name(model.OperatorCodes(op.OpcodeIndex())), _ints(op, "Inputs"), _ints(op, "Outputs")))

    tensors = []
    for i in range(subgraph.TensorsLength()):
        tensor = subgraph.Tensors(i)
        shape = _ints(tensor, "ShapeSignature") if tensor.ShapeSignatureLength() else _ints(tensor, "Shape")
        quant = tensor.Quantization()
        scales = quant.ScaleAsNumpy() if quant is not None and quant.ScaleLength() else np.zeros(0, np.float32)
        zero_points = (
            quant.ZeroPointAsNumpy() if quant is not None and quant.ZeroPointLength() else np.zeros(0, np.int64)
        )
        buffer = model.Buffers(tensor.Buffer()) if tensor.Buffer() < model.BuffersLength() else None
        is_constant = buffer is not None and (buffer.DataLength() > 0 or buffer.Size() > 0)
        tensors.append(
            TensorInfo(
                index=i,
                name=(tensor.Name() or b"").decode(errors="replace"),
                shape=tuple(None if d < 0 else int(d) for d in shape),
                dtype=type_names.get(tensor.Type(), f"type_{tensor.Type()}"),
                scales=np.array(scales, np.float32),
                zero_points=np.array(zero_points, np.int64),
                quantized_dimension=quant.QuantizedDimension() if quant is not None else 0,
                is_constant=bool(is_constant),
            )
        )

    signature = {"inputs": {}, "outputs": {}}
    for s in range(model.SignatureDefsLength()):
        sig = model.SignatureDefs(s)
        if sig.SubgraphIndex() == 0:
            for j in range(sig.InputsLength()):
                signature["inputs"][sig.Inputs(j).TensorIndex()] = sig.Inputs(j).Name().decode()
            for j in range(sig.OutputsLength()):
                signature["outputs"][sig.Outputs(j).TensorIndex()] = sig.Outputs(j).Name().decode()
            break
    return Graph(ops, tensors, _ints(subgraph, "Inputs"), _ints(subgraph, "Outputs"), signature, model.SubgraphsLength())


_NUMPY_TYPES = {"int8": np.int8, "uint8": np.uint8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
                "float32": np.float32, "float16": np.float16}


def constant_values(content):
    """{tensor index: numpy array} of the main subgraph's constant tensors (weights, biases)."""
    schema = litert_schema()
    model = schema.Model.GetRootAs(content, 0)
    subgraph = model.Subgraphs(0)
    type_names = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    values = {}
    for i in range(subgraph.TensorsLength()):
        tensor = subgraph.Tensors(i)
        dtype = _NUMPY_TYPES.get(type_names.get(tensor.Type(), ""))
        if dtype is None or tensor.Buffer() >= model.BuffersLength():
            continue
        buffer = model.Buffers(tensor.Buffer())
        if buffer.DataLength():
            raw = buffer.DataAsNumpy().tobytes()
        elif buffer.Offset() > 1:  # large models keep their buffers after the flatbuffer itself
            raw = bytes(content[buffer.Offset(): buffer.Offset() + buffer.Size()])
        else:
            continue
        shape = tuple(int(d) for d in _ints(tensor, "Shape"))
        data = np.frombuffer(raw, dtype=dtype)
        if data.size == int(np.prod(shape)):
            values[i] = data.reshape(shape)
    return values


def reorder_io(content, input_order, output_order):
    """Returns a copy of `content` whose main subgraph lists its input/output tensors in the given order.

    `input_order`/`output_order` are tensor indices, a permutation of the subgraph's current ones. This
    rewrites the two int32 vectors in place (same length, so nothing else in the file moves).
    """
    schema = litert_schema()
    data = bytearray(content)
    subgraph = schema.Model.GetRootAs(data, 0).Subgraphs(0)
    for field, slot, order in (("Inputs", 6, input_order), ("Outputs", 8, output_order)):
        current = _ints(subgraph, field)
        if sorted(current) != sorted(order):
            raise ValueError(f"{field}: {list(order)} is not a permutation of {current}.")
        start = subgraph._tab.Vector(subgraph._tab.Offset(slot))  # flatbuffers table layout: slot = 4 + 2 * field id
        data[start : start + 4 * len(order)] = np.asarray(order, "<i4").tobytes()
        if _ints(schema.Model.GetRootAs(data, 0).Subgraphs(0), field) != list(order):
            raise RuntimeError(f"Could not reorder the subgraph {field.lower()} of the .tflite file.")
    return bytes(data)


def _ints(table, field):
    n = getattr(table, field + "Length")()
    return [int(v) for v in getattr(table, field + "AsNumpy")()] if n else []


def reorder_io_by_name(content, input_names, output_names):
    """Lists the main subgraph's inputs/outputs in the order of the given signature names.

    The converter orders them its own way (outputs are often permuted); the signature it writes maps
    each name to its tensor, so the order is restored by name. Raises `KeyError` for a name the
    signature lacks.
    """
    graph = read_graph(content)
    by_name_in = {name: index for index, name in graph.signature["inputs"].items()}
    by_name_out = {name: index for index, name in graph.signature["outputs"].items()}
    inputs = [by_name_in[n] for n in input_names]
    outputs = [by_name_out[n] for n in output_names]
    if inputs == graph.inputs and outputs == graph.outputs:
        return content
    return reorder_io(content, inputs, outputs)
