"""`ClusterWeights`: a layer whose kernels take only `number_of_clusters` shared values.

Each clustered weight gets trainable centroids and a non-trainable assignment (which centroid each
entry uses). The forward pass gathers the centroids by assignment. During training the gradient
reaches the centroids through the gather and the original weights through a straight-through
estimator (as tfmot does), and the assignment is recomputed at every training step (in `call`, with
`training=True`) from the moved weights and centroids: each entry takes its nearest centroid. In
inference the stored assignment is used, so `strip_clustering` bakes exactly what inference computes.

A `Codebook` holds centroids shared by several wrappers (`cluster_weights(..., share_across=...)`).

Example:
>>> import keras, numpy as np
>>> from kerasq.clustering import ClusterWeights
>>> layer = ClusterWeights(keras.layers.Dense(8), number_of_clusters=4)
>>> _ = layer(np.ones((1, 16), "float32"))
>>> len(np.unique(np.asarray(layer.clustered_values()["kernel"])))
4
"""

import uuid

import keras
import numpy as np
from keras import ops

from kerasq import _keras_private
from kerasq.graph import layer_facts, wrappers
from kerasq.graph.variables import replaced_variables
from kerasq.clustering import centroids as centroids_lib

_FAR = 1e30  # distance added to the pinned zero centroid, so non-zero weights never pick it


class ClusterableLayer:
    """Mixin for a custom layer that says which of its weights to cluster (tfmot's name).

    `get_clusterable_weights()` returns `[(name, variable)]` (or bare variables); per-channel
    clustering takes the last axis as the channel axis.

    Example:
    >>> import keras
    >>> from kerasq.clustering import ClusterableLayer
    >>> class MyDense(keras.layers.Dense, ClusterableLayer):
    ...     def get_clusterable_weights(self):
    ...         return [("kernel", self.kernel)]
    >>> layer = MyDense(4)
    >>> layer.build((None, 3))
    >>> [name for name, _ in layer.get_clusterable_weights()]
    ['kernel']
    """

    def get_clusterable_weights(self):
        """The weights of this layer to cluster; called once the layer is built."""
        raise NotImplementedError(f"{type(self).__name__} must define get_clusterable_weights().")


def is_clusterable(layer):
    """True for a `ClusterableLayer`, or a layer whose facts name kernels (Dense, Conv*, Embedding...)."""
    if isinstance(layer, ClusterableLayer):
        return True
    facts = layer_facts(layer)
    return facts is not None and bool(facts.kernels)


def clusterable_weights(layer):
    """`[(name, variable, output-channel axis)]` of the weights of `layer` that clustering shares."""
    if isinstance(layer, ClusterableLayer):
        entries = []
        for entry in layer.get_clusterable_weights():
            name, variable = entry if isinstance(entry, (tuple, list)) else (_attribute_name(layer, entry), entry)
            entries.append((name, variable, -1))
        return entries
    return [(name, getattr(layer, name), kernel.out_axis) for name, kernel in layer_facts(layer).kernels.items()]


def check_clusterable(layer):
    if not is_clusterable(layer):
        raise ValueError(
            f"Layer '{layer.name}' ({type(layer).__name__}) has no weight to cluster: kerasq clusters "
            "kernels (Dense, Conv*, DepthwiseConv*, SeparableConv*, Embedding). Leave it unclustered "
            "(cluster the model, which picks layers with kernels, or pass only such layers), describe its "
            "kernels with kerasq.graph.register_layer_facts, or make it a kerasq.ClusterableLayer."
        )


def check_number_of_clusters(number_of_clusters):
    if isinstance(number_of_clusters, bool) or not isinstance(number_of_clusters, (int, np.integer)):
        raise ValueError(f"number_of_clusters must be an int >= 2, e.g. 16; got {number_of_clusters!r}.")
    if number_of_clusters < 2:
        raise ValueError(
            f"number_of_clusters={number_of_clusters} leaves nothing to learn: use at least 2 (8 or 16 "
            "are typical)."
        )
    return int(number_of_clusters)


@keras.saving.register_keras_serializable(package="kerasq")
class Codebook(keras.layers.Layer):
    """Centroids shared by the clustered weights of several layers (one per group of `share_across`).

    Inside `.keras` files the wrappers of a group keep sharing one codebook (Keras' object sharing).
    """

    def __init__(self, number_of_clusters, key=None, **kwargs):
        super().__init__(**kwargs)
        self.number_of_clusters = check_number_of_clusters(number_of_clusters)
        self.key = key or uuid.uuid4().hex

    @classmethod
    def from_config(cls, config):
        # Keras marks only the second and later copies of a shared object in a saved config, so the
        # wrappers of a group find their one codebook by its key, while a model is being loaded (Keras'
        # object-sharing scope). Outside loading (a clone), each copy gets its own codebook.
        shared = _loading_objects()
        if shared is None:
            return cls(**config)
        key = ("kerasq.Codebook", config.get("key"))
        if key not in shared:
            shared[key] = cls(**config)
        return shared[key]

    def build(self, input_shape=None):
        self.centroids = self.add_weight(name="centroids", shape=(self.number_of_clusters,), initializer="zeros")
        self.built = True

    def call(self, inputs):
        return inputs

    def get_config(self):
        return {**super().get_config(), "number_of_clusters": self.number_of_clusters, "key": self.key}


def _loading_objects():
    """The object map of the Keras object-sharing scope a `.keras` load runs in, or None."""
    try:
        from keras.src.backend.common import global_state
    except ImportError:  # a Keras release that moved it: groups then load unshared
        return None
    return global_state.get_global_attribute("shared_objects/id_to_obj_map")


@keras.saving.register_keras_serializable(package="kerasq")
class ClusterWeights(keras.layers.Wrapper):
    """Clusters the kernels of `layer` to `number_of_clusters` shared values (tfmot's class name).

    Args:
        layer: a layer with kernels (Dense, Conv*, Conv*Transpose, DepthwiseConv*, SeparableConv*
            (both kernels), Embedding, or any layer described by `kerasq.graph.register_layer_facts`),
            or a `ClusterableLayer`.
        number_of_clusters: the number of shared values per weight (per output channel with
            `cluster_per_channel`), at least 2 and at most the weight's size.
        cluster_centroids_init: a `CentroidInitialization` or its string.
        cluster_per_channel: one set of centroids per output channel (the layer facts' output axis).
        preserve_sparsity: zeros stay zero: centroid 0 is pinned at 0, the zero entries keep it (a
            mask), and non-zero entries never take it. The zero counts as one of the clusters.
        codebook: a `Codebook` whose centroids this wrapper shares with others (per-tensor only).
    """

    def __init__(
        self,
        layer,
        number_of_clusters,
        cluster_centroids_init=centroids_lib.CentroidInitialization.KMEANS_PLUS_PLUS,
        cluster_per_channel=False,
        preserve_sparsity=False,
        codebook=None,
        **kwargs,
    ):
        super().__init__(layer, **kwargs)
        check_clusterable(layer)
        self.number_of_clusters = check_number_of_clusters(number_of_clusters)
        self.cluster_centroids_init = centroids_lib.get_initialization(cluster_centroids_init)
        self.cluster_per_channel = bool(cluster_per_channel)
        self.preserve_sparsity = bool(preserve_sparsity)
        if isinstance(codebook, dict):
            codebook = keras.saving.deserialize_keras_object(codebook)
        if codebook is not None and self.cluster_per_channel:
            raise ValueError(
                f"Layer '{layer.name}': a shared codebook holds one set of centroids for several layers, "
                "so it cannot be per channel. Use cluster_per_channel=False with share_across."
            )
        if codebook is not None and codebook.number_of_clusters != self.number_of_clusters:
            raise ValueError(
                f"Layer '{layer.name}' asks for {self.number_of_clusters} clusters but its shared codebook "
                f"holds {codebook.number_of_clusters}."
            )
        self.codebook = codebook
        object.__setattr__(self, "_clustered", ())
        self.supports_masking = getattr(layer, "supports_masking", False)

    # ---- building ----------------------------------------------------------------------------------
    def clusterable_weights(self):
        """`[(name, variable, channel axis)]` of the weights this wrapper clusters."""
        return clusterable_weights(self.layer)

    def build(self, input_shape=None):
        super().build(input_shape)
        k = self.number_of_clusters
        if self.codebook is not None and not self.codebook.built:
            self.codebook.build()
        clustered = []
        for name, variable, axis in self.clusterable_weights():
            safe = name.replace("/", "_")
            shape = tuple(variable.shape)
            channel_ids = channel_ids_of(shape, axis) if self.cluster_per_channel else None
            limit = int(np.prod(shape)) // (int(channel_ids.max()) + 1 if channel_ids is not None else 1)
            if k > limit:
                what = "each output channel of" if self.cluster_per_channel else ""
                raise ValueError(
                    f"number_of_clusters={k} is larger than {what} '{self.layer.name}' weight '{name}' "
                    f"({limit} values): use at most {limit} clusters, "
                    + ("cluster per tensor (cluster_per_channel=False), " if self.cluster_per_channel else "")
                    + f"or leave '{self.layer.name}' unclustered."
                )
            if self.codebook is not None:
                centroids = self.codebook.centroids
            else:
                centroid_shape = (int(channel_ids.max()) + 1, k) if channel_ids is not None else (k,)
                centroids = self.add_weight(name=f"{safe}_centroids", shape=centroid_shape, initializer="zeros")
            assignment = self.add_weight(
                name=f"{safe}_assignment", shape=shape, dtype="int32", initializer="zeros", trainable=False,
                aggregation="only_first_replica",
            )
            mask = None
            if self.preserve_sparsity:
                mask = self.add_weight(name=f"{safe}_mask", shape=shape, initializer="ones", trainable=False,
                                       aggregation="only_first_replica")
            clustered.append(_Clustered(name, variable, centroids, assignment, mask, channel_ids))
        object.__setattr__(self, "_clustered", tuple(clustered))
        self.initialize_clusters()
        # After initializing: a restore deferred until this build (tf.train.Checkpoint.restore before
        # the first call) then overwrites the initial clusters. A shared codebook tracks its own.
        shared = self.codebook.centroids if self.codebook is not None else None
        owned = [v for e in clustered for v in (e.centroids, e.assignment, e.mask) if v is not None and v is not shared]
        _keras_private.track_for_tf_checkpoints(self, owned)

    # ---- clusters (NumPy, outside training) ---------------------------------------------------------
    def initialize_clusters(self, values=None, shared_centroids=None):
        """Sets centroids, assignments (and masks) from `values` ({name: array}; by default the
        current weights). `shared_centroids` are used as they are (a shared codebook's)."""
        for entry in self._clustered:
            value = np.asarray(keras.ops.convert_to_numpy(entry.variable)) if values is None else np.asarray(values[entry.name])
            centroids, assignment, mask = self.compute_clusters(value, entry.channel_ids, shared_centroids)
            entry.centroids.assign(centroids)
            entry.assignment.assign(assignment)
            if entry.mask is not None:
                entry.mask.assign(mask)

    def compute_clusters(self, value, channel_ids=None, shared_centroids=None):
        """`(centroids, assignment, mask)` for one weight's values (NumPy)."""
        k, init = self.number_of_clusters, self.cluster_centroids_init
        mask = (value != 0).astype(np.float32) if self.preserve_sparsity else None
        learned = k - 1 if self.preserve_sparsity else k

        def fit(sample):
            sample = sample[sample != 0] if self.preserve_sparsity else sample
            found = centroids_lib.init_centroids(sample, learned, init)
            return np.concatenate([[0.0], found]).astype(np.float32) if self.preserve_sparsity else found

        if shared_centroids is not None:
            centroids = np.asarray(shared_centroids, np.float32)
        elif channel_ids is None:
            centroids = fit(value.ravel())
        else:
            centroids = np.stack([fit(value[channel_ids == c]) for c in range(int(channel_ids.max()) + 1)])
        assignment = nearest_numpy(value, centroids, channel_ids, self.preserve_sparsity)
        return centroids, assignment, mask

    def clustered_values(self):
        """`{name: array}`: each clustered weight as the forward pass uses it (centroids gathered by
        assignment, masked): what `strip_clustering` bakes into the plain layer."""
        result = {}
        for entry in self._clustered:
            centroids = np.asarray(keras.ops.convert_to_numpy(entry.centroids))
            if self.preserve_sparsity:
                centroids = centroids * self._pin(centroids.shape)
            assignment = np.asarray(keras.ops.convert_to_numpy(entry.assignment))
            if entry.channel_ids is None:
                value = centroids[assignment]
            else:
                value = centroids.reshape(-1)[entry.channel_ids * self.number_of_clusters + assignment]
            if entry.mask is not None:
                value = value * np.asarray(keras.ops.convert_to_numpy(entry.mask))
            result[entry.name] = value.astype(np.float32)
        return result

    def cluster_info(self):
        """`{name: (assignment, per_channel, pinned_zero)}` for cluster-preserving QAT."""
        info = {}
        for entry in self._clustered:
            assignment = np.asarray(keras.ops.convert_to_numpy(entry.assignment))
            if entry.mask is not None:  # masked zeros form their own (pinned) cluster 0
                assignment = np.where(np.asarray(keras.ops.convert_to_numpy(entry.mask)) == 0, 0, assignment)
            info[entry.name] = (assignment, entry.channel_ids, self.preserve_sparsity)
        return info

    def _pin(self, shape):
        pin = np.ones(shape, np.float32)
        pin[..., 0] = 0.0
        return pin

    # ---- the forward pass ---------------------------------------------------------------------------
    def call(self, inputs, *args, training=None, **kwargs):
        mapping = [(entry.variable, self._clustered_value(entry, bool(training))) for entry in self._clustered]
        with replaced_variables(self.layer, mapping):
            return self.layer(inputs, *args, training=training, **kwargs)

    def _clustered_value(self, entry, training):
        weight = ops.convert_to_tensor(entry.variable)
        centroids = ops.convert_to_tensor(entry.centroids)
        if self.preserve_sparsity:
            centroids = centroids * ops.convert_to_tensor(self._pin(tuple(entry.centroids.shape)))
        k = self.number_of_clusters
        if training:
            assignment = self._nearest(ops.stop_gradient(weight), ops.stop_gradient(centroids), entry.channel_ids)
            entry.assignment.assign(assignment)
        else:
            assignment = ops.convert_to_tensor(entry.assignment)
        if entry.channel_ids is None:
            gathered = ops.take(centroids, assignment)
        else:
            gathered = ops.take(ops.reshape(centroids, (-1,)), ops.convert_to_tensor(entry.channel_ids * k) + assignment)
        value = gathered + weight - ops.stop_gradient(weight)  # straight-through to the original weight
        if entry.mask is not None:
            value = value * ops.convert_to_tensor(entry.mask)
        return value

    def _nearest(self, weight, centroids, channel_ids):
        if channel_ids is not None:
            centroids = ops.take(centroids, ops.convert_to_tensor(channel_ids), axis=0)
        distance = ops.abs(ops.expand_dims(weight, -1) - centroids)
        if self.preserve_sparsity:
            penalty = np.zeros(self.number_of_clusters, np.float32)
            penalty[0] = _FAR
            distance = distance + penalty
        return ops.cast(ops.argmin(distance, axis=-1), "int32")

    def compute_output_shape(self, input_shape, *args, **kwargs):
        return self.layer.compute_output_shape(input_shape, *args, **kwargs)

    def compute_output_spec(self, *args, **kwargs):
        return self.layer.compute_output_spec(*args, **kwargs)

    def get_config(self):
        return {
            **super().get_config(),
            "number_of_clusters": self.number_of_clusters,
            "cluster_centroids_init": self.cluster_centroids_init.value,
            "cluster_per_channel": self.cluster_per_channel,
            "preserve_sparsity": self.preserve_sparsity,
            "codebook": keras.saving.serialize_keras_object(self.codebook) if self.codebook is not None else None,
        }


class _Clustered:
    def __init__(self, name, variable, centroids, assignment, mask, channel_ids):
        self.name, self.variable, self.centroids = name, variable, centroids
        self.assignment, self.mask, self.channel_ids = assignment, mask, channel_ids


def channel_ids_of(shape, axis):
    """For each entry of a weight of `shape`, the index of its output channel (`axis`: an int, or a
    tuple of axes flattened, as for depthwise kernels)."""
    axes = tuple(a % len(shape) for a in (axis if isinstance(axis, tuple) else (axis,)))
    grids = np.indices(shape, dtype=np.int32)
    return np.ravel_multi_index([grids[a] for a in axes], [shape[a] for a in axes]).astype(np.int32)


def nearest_numpy(value, centroids, channel_ids=None, pinned_zero=False):
    """The nearest centroid of each entry (NumPy); with `pinned_zero`, non-zero entries skip centroid 0."""
    centroids = np.asarray(centroids, np.float32)
    per_entry = centroids[channel_ids] if channel_ids is not None else centroids
    distance = np.abs(value[..., None] - per_entry)
    if pinned_zero:
        distance[..., 0] = np.where(value == 0, -1.0, distance[..., 0] + _FAR)
    return np.argmin(distance, axis=-1).astype(np.int32)


def strip_cluster_weights(wrapper, rewrite, **clone_options):
    """The engine's strip for `ClusterWeights`: a plain copy of the layer holding the clustered values."""
    clone = wrappers.strip(wrapper.layer, rewrite, **clone_options)
    for name, value in wrapper.clustered_values().items():
        rewrite.weights.assign(clone, name, value)
    return clone


wrappers.register_wrapper(ClusterWeights, strip_cluster_weights)


def _attribute_name(layer, variable):
    for attribute, value in vars(layer).items():
        if value is variable:
            return attribute
    return variable.path.split("/")[-1]
