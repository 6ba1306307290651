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

from kerasq.export.flatbuffer import constant_values, read_graph

def tflite_weights(content, min_rank=2):
    """`{tensor name: array}` of the constant tensors of rank >= `min_rank` in a .tflite file (its
    kernels), with the stored dtype (int8 for a quantized file, float32 for a float one)."""
    if isinstance(content, str):
        with open(content, "rb") as f:
            content = f.read()
    content = bytes(content)
    names = {info.index: info.name for info in read_graph(content).tensors}
    return {names[index]: value for index, value in constant_values(content).items() if value.ndim >= min_rank}


def distinct_values(array, axis=None):
    """The number of distinct values of `array`, or the largest number within one slice along
    `axis` (e.g. per output channel)."""
    array = np.asarray(array)
    if axis is None:
        return int(len(np.unique(array)))
    moved = np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1)
    return int(max(len(np.unique(row)) for row in moved))
