"""Cluster-preserving QAT: `quantize_preserving_clusters` and the `ClusterConstraint` it puts on kernels.

`kerasq.quantize_model` alone would let a clustered kernel's values drift apart during QAT. Here each
clustered kernel gets a `ClusterConstraint` (a Keras constraint: the optimizer applies it after every
update, in `fit` and custom loops alike): the kernel's entries keep their cluster (the assignment is
fixed), and each cluster moves to the mean of its entries' updated values, so the kernel trains with
exactly its clusters' values; a cluster at zero (pruning's zeros) stays at zero. The symmetric weight
fake-quant then maps the k values of a kernel to at most k int8 values: per kernel where TFLite
quantizes per tensor (Dense), per output channel where it quantizes per channel (Conv, Depthwise;
BatchNorm folding scales each channel, so codes agree only within a channel), and per channel for
kernels clustered per channel.
"""

import base64

import keras
import numpy as np
from keras import ops

from kerasq.graph import Rewrite, all_layers, layer_facts, wrappers
from kerasq.clustering.wrapper import ClusterWeights, ClusterableLayer, channel_ids_of, clusterable_weights


@keras.saving.register_keras_serializable(package="kerasq")
class ClusterConstraint(keras.constraints.Constraint):
    """Keeps a weight on its clusters: every cluster takes the mean of its entries after each update.

    Args:
        clusters: an int array of the weight's shape: the cluster of each entry.
        pinned: cluster ids held at exactly zero (e.g. pruned zeros).

    Example:
    >>> import numpy as np
    >>> from kerasq.clustering import ClusterConstraint
    >>> constraint = ClusterConstraint(np.array([0, 0, 1, 1]))
    >>> np.asarray(constraint(np.array([1.0, 3.0, -1.0, 0.0], "float32"))).tolist()
    [2.0, 2.0, -0.5, -0.5]
    """

    def __init__(self, clusters, pinned=(), shape=None):
        if isinstance(clusters, str):
            clusters = np.frombuffer(base64.b64decode(clusters), np.int32).reshape(shape)
        clusters = np.asarray(clusters, np.int32)
        _, self.clusters = np.unique(clusters, return_inverse=True)
        old_ids = np.unique(clusters)
        self.clusters = self.clusters.reshape(clusters.shape).astype(np.int32)
        self.shape = tuple(clusters.shape)
        self.num_clusters = len(old_ids)
        self.pinned = tuple(int(i) for i in pinned)
        self.counts = np.bincount(self.clusters.ravel(), minlength=self.num_clusters).astype(np.float32)
        keep = np.ones(self.num_clusters, np.float32)
        for old in self.pinned:
            where = np.nonzero(old_ids == old)[0]
            keep[where] = 0.0
        self.keep = keep

    def __call__(self, w):
        flat = ops.reshape(ops.convert_to_tensor(w), (-1,))
        ids = ops.convert_to_tensor(self.clusters.reshape(-1))
        sums = ops.segment_sum(flat, ids, num_segments=self.num_clusters)
        means = sums / ops.convert_to_tensor(np.maximum(self.counts, 1.0)) * ops.convert_to_tensor(self.keep)
        return ops.reshape(ops.take(means, ids), self.shape)

    def get_config(self):
        packed = base64.b64encode(np.ascontiguousarray(self.clusters, np.int32).tobytes()).decode()
        pinned = [int(i) for i in np.nonzero(self.keep == 0)[0]]
        return {"clusters": packed, "pinned": pinned, "shape": list(self.shape)}


def clusters_of(value, channel_ids=None, max_clusters=256):
    """`(cluster ids, pinned ids)` of a stripped kernel's values, or None when it does not look clustered.

    A kernel counts as clustered per tensor when it holds at most `min(max_clusters, size // 2)`
    distinct values, else per channel when each output channel holds at most that many of its own.
    """
    value = np.asarray(value, np.float32)
    distinct, inverse = np.unique(value, return_inverse=True)
    if len(distinct) <= min(max_clusters, value.size // 2):
        return inverse.reshape(value.shape).astype(np.int32), np.nonzero(distinct == 0)[0].tolist()
    if channel_ids is None:
        return None
    channels = int(channel_ids.max()) + 1
    per_channel = value.size // channels
    pairs = np.stack([channel_ids.ravel().astype(np.float64), value.ravel().astype(np.float64)], axis=1)
    keys, inverse = np.unique(pairs, axis=0, return_inverse=True)
    if len(keys) > channels * min(max_clusters, per_channel // 2):
        return None
    counts = np.bincount(keys[:, 0].astype(int), minlength=channels)
    if counts.max() > min(max_clusters, per_channel // 2):
        return None
    return inverse.reshape(value.shape).astype(np.int32), np.nonzero(keys[:, 1] == 0)[0].tolist()


def quantize_preserving_clusters(model, scheme="int8", skip=(), max_clusters=256):
    """`kerasq.quantize_model` for a clustered model: QAT that keeps every kernel on its clusters.

    Args:
        model: a model with `ClusterWeights` layers (their clusters are used as they are), or a
            stripped clustered model (a kernel with few distinct values, per tensor or per output
            channel, counts as clustered: see `clusters_of`). Pruning's zeros stay zero.
        scheme, skip: as for `kerasq.quantize_model`.
        max_clusters: the most clusters a stripped kernel may hold to count as clustered.

    Returns the QAT model (train it with `fit`, export it with `kerasq.export_tflite`); `model` is
    not changed. `kerasq.clustering.clustered_kernels(qat)` lists the kernels it keeps clustered.

    Example:
    >>> import keras, numpy as np, kerasq
    >>> from kerasq.clustering import quantize_preserving_clusters
    >>> model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8, name="dense")])
    >>> qat = quantize_preserving_clusters(kerasq.cluster_weights(model, number_of_clusters=4))
    >>> qat.compile("adam", "mse")
    >>> _ = qat.fit(np.random.rand(32, 16), np.random.rand(32, 8), epochs=1, verbose=0)
    >>> kernel = np.asarray(qat.get_layer("quant_dense").layer.kernel)
    >>> len(np.unique(kernel)) <= 4
    True
    """
    constraints = {}  # original plain layer name -> {weight name: ClusterConstraint}

    def substitute(layer, rewrite):
        if isinstance(layer, keras.Model) or not isinstance(layer, keras.layers.Layer):
            return None
        plain = wrappers.unwrap(layer)
        found = _cluster_constraints(layer, plain, max_clusters)
        if not found:
            return wrappers.strip(layer, rewrite) if isinstance(layer, ClusterWeights) else None
        constraints[plain.name] = found
        changes = {}
        config = plain.get_config()
        for name, constraint in found.items():
            key = _constraint_key(plain, name, config)
            if key is not None:
                changes[key] = constraint
        return wrappers.strip(layer, rewrite, **changes)

    prepared = Rewrite(model, substitute, inline=False).run()
    from kerasq.quantization.quantize import quantize_model

    qat = quantize_model(prepared, scheme=scheme, skip=skip)
    for layer in all_layers(qat):
        plain = wrappers.unwrap(layer)
        for name, constraint in constraints.get(plain.name, {}).items():
            variable = getattr(plain, name, None)
            if isinstance(variable, keras.Variable) and variable.constraint is None:
                variable.constraint = constraint  # a weight without a `*_constraint` argument
    return qat


def clustered_kernels(model):
    """`{layer name: [weight names]}` of the kernels held on clusters by `ClusterConstraint`."""
    found, seen = {}, set()
    for layer in all_layers(model):
        plain = wrappers.unwrap(layer)
        if id(plain) in seen:
            continue
        seen.add(id(plain))
        for variable in getattr(plain, "trainable_weights", []):
            if isinstance(getattr(variable, "constraint", None), ClusterConstraint):
                found.setdefault(plain.name, []).append(variable.path.split("/")[-1])
    return found


def _cluster_constraints(layer, plain, max_clusters):
    """{weight name: ClusterConstraint} for the clustered kernels of `layer` (a wrapper or plain)."""
    if isinstance(layer, ClusterWeights):
        result = {}
        for name, (assignment, channel_ids, pinned_zero) in layer.cluster_info().items():
            k = layer.number_of_clusters
            ids = assignment if channel_ids is None else channel_ids * k + assignment
            pinned = []
            if pinned_zero:
                channels = 1 if channel_ids is None else int(channel_ids.max()) + 1
                pinned = [c * k for c in range(channels)]
            result[name] = ClusterConstraint(ids, pinned)
        return result
    if wrappers.is_wrapper(layer) or not (isinstance(plain, ClusterableLayer) or _has_kernels(plain)):
        return {}
    result = {}
    for name, variable, axis in clusterable_weights(plain):
        value = np.asarray(keras.ops.convert_to_numpy(variable))
        found = clusters_of(value, channel_ids_of(value.shape, axis), max_clusters)
        if found is not None:
            result[name] = ClusterConstraint(*found)
    return result


def _has_kernels(layer):
    facts = layer_facts(layer)
    return facts is not None and bool(facts.kernels)


def _constraint_key(layer, name, config):
    for key in (f"{name}_constraint", "depthwise_constraint" if name == "kernel" else None):
        if key and key in config:
            return key
    return None
