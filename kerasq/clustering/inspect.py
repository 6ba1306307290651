"""What a clustered .tflite file holds: its constant weight tensors and their distinct values.

Example:
>>> import keras, numpy as np, kerasq
>>> from kerasq.clustering.inspect import distinct_values, tflite_weights
>>> model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8, name="dense")])
>>> plain = kerasq.strip_clustering(kerasq.cluster_weights(model, number_of_clusters=3))
>>> weights = tflite_weights(kerasq.export_tflite(plain))
>>> max(distinct_values(w) for w in weights.values() if w.ndim == 2)
3
"""

import numpy as np

from kerasq.export.flatbuffer import litert_schema, read_graph

_DTYPES = {"int8": np.int8, "uint8": np.uint8, "int16": np.int16, "int32": np.int32, "float32": np.float32,
           "float16": np.float16, "int64": np.int64}


def tflite_weights(content, min_rank=2):
    """`{tensor name: array}` of the constant tensors of rank >= `min_rank` in a .tflite file (its
    kernels), with the stored dtype (int8 for a quantized file, float32 for a float one)."""
    if isinstance(content, str):
        with open(content, "rb") as f:
            content = f.read()
    content = bytes(content)
    schema = litert_schema()
    model = schema.Model.GetRootAs(content, 0)
    subgraph = model.Subgraphs(0)
    graph = read_graph(content)
    result = {}
    for info in graph.tensors:
        if not info.is_constant or info.dtype not in _DTYPES or len(info.shape) < min_rank:
            continue
        buffer = model.Buffers(subgraph.Tensors(info.index).Buffer())
        if buffer.DataLength():
            raw = buffer.DataAsNumpy().tobytes()
        else:  # stored after the flatbuffer (large models)
            raw = content[buffer.Offset(): buffer.Offset() + buffer.Size()]
        array = np.frombuffer(raw, _DTYPES[info.dtype])
        if array.size == int(np.prod(info.shape)):
            result[info.name] = array.reshape(info.shape)
    return result


def distinct_values(array, axis=None):
    """The number of distinct values of `array`, or the largest number within one slice along
    `axis` (e.g. per output channel)."""
    array = np.asarray(array)
    if axis is None:
        return int(len(np.unique(array)))
    moved = np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1)
    return int(max(len(np.unique(row)) for row in moved))
