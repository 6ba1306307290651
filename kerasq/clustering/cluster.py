"""`cluster_weights`, `strip_clustering` and `cluster_scope`: tfmot's clustering API for Keras 3."""

import keras
import numpy as np

from kerasq import _keras_private
from kerasq.graph import Rewrite, all_layers, wrappers
from kerasq.graph.selection import layer_predicate
from kerasq.clustering import centroids as centroids_lib
from kerasq.clustering.wrapper import (
    ClusterWeights,
    ClusterableLayer,
    Codebook,
    check_clusterable,
    check_number_of_clusters,
    clusterable_weights,
    is_clusterable,
)


def cluster_weights(
    to_cluster,
    number_of_clusters,
    cluster_centroids_init=centroids_lib.CentroidInitialization.KMEANS_PLUS_PLUS,
    cluster_per_channel=False,
    preserve_sparsity=False,
    share_across=None,
    skip=(),
):
    """Wraps layers so their kernels share `number_of_clusters` trainable values (tfmot's name).

    Args:
        to_cluster: a layer (returns its `ClusterWeights` wrapper), a list of layers (returns a
            list), or a Sequential/Functional model, nested ones included (returns a new model in
            which every layer with kernels is wrapped; `to_cluster` is not changed). The clusters
            start from the layer's current weights.
        number_of_clusters: shared values per kernel (per output channel with
            `cluster_per_channel`); at least 2.
        cluster_centroids_init: a `CentroidInitialization` or 'linear', 'random', 'density',
            'kmeans++'.
        cluster_per_channel: one codebook per output channel.
        preserve_sparsity: keep the zeros of a pruned model at zero (one of the clusters is a pinned
            zero). Layers still wrapped in `PruneLowMagnitude` are stripped first (their zeros baked).
        share_across: for a model, groups of layer names whose kernels share one codebook, e.g.
            `[["conv1", "conv2"]]` (per-tensor clustering only).
        skip: for a model, layers to leave unclustered: names, classes, or `fn(layer) -> bool`.

    Train the result with `fit` as usual (no callback is needed: the assignment follows the
    weights at every training step), then `strip_clustering` it.

    Example:
    >>> import keras, kerasq
    >>> model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(8, 3, name="conv"),
    ...                           keras.layers.Flatten(), keras.layers.Dense(10, name="head")])
    >>> clustered = kerasq.cluster_weights(model, number_of_clusters=4, skip=["head"])
    >>> [type(layer).__name__ for layer in clustered.layers]
    ['InputLayer', 'ClusterWeights', 'Flatten', 'Dense']
    """
    options = dict(
        number_of_clusters=check_number_of_clusters(number_of_clusters),
        cluster_centroids_init=centroids_lib.get_initialization(cluster_centroids_init),
        cluster_per_channel=bool(cluster_per_channel),
        preserve_sparsity=bool(preserve_sparsity),
    )
    if isinstance(to_cluster, keras.Model):
        return _cluster_model(to_cluster, options, _groups(share_across, cluster_per_channel), layer_predicate(skip))
    if share_across:
        raise ValueError("share_across names layers of a model: pass the model to cluster_weights, not layers.")
    if isinstance(to_cluster, (list, tuple)):
        return [_cluster_layer(layer, options) for layer in to_cluster]
    if isinstance(to_cluster, keras.layers.Layer):
        return _cluster_layer(to_cluster, options)
    raise TypeError(
        "cluster_weights takes a keras layer, a list of layers, or a Sequential/Functional model; "
        f"got {type(to_cluster).__name__}."
    )


def strip_clustering(model):
    """A new model of plain Keras layers whose kernels hold the clustered values (tfmot's name).

    Only `ClusterWeights` wrappers are removed (through the engine's `strip_model` machinery);
    `model` is not changed.

    Example:
    >>> import keras, numpy as np, kerasq
    >>> model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8, name="dense")])
    >>> plain = kerasq.strip_clustering(kerasq.cluster_weights(model, number_of_clusters=3))
    >>> dense = plain.get_layer("dense")
    >>> type(dense).__name__, len(np.unique(np.asarray(dense.kernel)))
    ('Dense', 3)
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"strip_clustering takes a Keras model; got {type(model).__name__}.")
    if not clustering_layers(model):
        raise ValueError(
            f"Model '{model.name}' has no ClusterWeights layers: it was already stripped, or never "
            "clustered. Export or train it as it is, or cluster it first with kerasq.cluster_weights."
        )

    return wrappers.strip_model(model, only=ClusterWeights)


def cluster_scope(*custom_objects):
    """Context manager for loading clustered models saved by tfmot-style code (tfmot's name).

    kerasq's clustering classes are registered with Keras on import, so `.keras` files load without
    it; it exists so tfmot-style code runs unchanged, and takes extra custom objects (dicts).

    Example:
    >>> import kerasq
    >>> with kerasq.cluster_scope():
    ...     pass
    """
    objects = {"ClusterWeights": ClusterWeights, "Codebook": Codebook}
    for extra in custom_objects:
        objects.update(extra)
    return keras.saving.custom_object_scope(objects)


def clustering_layers(model):
    """The `ClusterWeights` layers of `model`, nested models included, each once."""
    return [layer for layer in all_layers(model) if isinstance(layer, ClusterWeights)]


def _cluster_layer(layer, options, **extra):
    if isinstance(layer, keras.Model):
        raise TypeError(
            f"'{layer.name}' is a model: pass it to cluster_weights on its own (not in a list) to get a "
            "clustered copy."
        )
    if isinstance(layer, ClusterWeights):
        raise ValueError(f"Layer '{layer.name}' is already wrapped in ClusterWeights; wrap the plain layer once.")
    check_clusterable(layer)
    return ClusterWeights(layer, **options, **extra)


def _cluster_model(model, options, groups, skip):
    if not (isinstance(model, keras.Sequential) or _keras_private.is_functional(model)):
        raise TypeError(
            f"cluster_weights cannot read subclassed model '{model.name}' ({type(model).__name__}): wrap "
            "the layers inside it with kerasq.cluster_weights(layer) where you build them, or pass a "
            "Sequential/Functional model."
        )
    group_of = {name: index for index, group in enumerate(groups) for name in group}
    codebooks = [Codebook(options["number_of_clusters"], name=f"codebook_{i}") for i in range(len(groups))]
    members = [[] for _ in groups]  # (wrapper, source layer) per group
    wrapped, seen_names = [], set()
    pending = []  # (wrapper, source values, group): their clusters are assigned once they are built

    def substitute(layer, rewrite):
        if isinstance(layer, keras.Model) or not isinstance(layer, keras.layers.Layer):
            return None
        if isinstance(layer, ClusterWeights):
            wrapped.append(layer)
            return None  # a renamed copy with its centroids and assignments
        plain = wrappers.unwrap(layer)
        seen_names.add(plain.name)
        if not is_clusterable(plain) or skip(plain):
            return None
        if wrappers.is_wrapper(layer) and type(layer).__name__ not in ("PruneLowMagnitude",):
            raise ValueError(
                f"Layer '{layer.name}' is wrapped in {type(layer).__name__}: cluster the float model (or a "
                "pruned one) before quantizing it, then use kerasq.clustering.quantize_preserving_clusters."
            )
        group = group_of.get(plain.name)
        inner = wrappers.strip(layer, rewrite, unique_name=False)  # a pruned layer's zeros baked in
        codebook = codebooks[group] if group is not None else None
        wrapper = ClusterWeights(inner, codebook=codebook, name=rewrite.names.take(f"cluster_{plain.name}"), **options)
        wrapped.append(layer)
        pending.append((wrapper, _source_values(layer), group))
        return wrapper

    rewrite = Rewrite(model, substitute, inline=False)
    clustered = rewrite.run(apply_weights=False)
    unknown = sorted(set(group_of) - seen_names)
    if unknown:
        raise ValueError(
            f"share_across names layers {unknown} that model '{model.name}' does not have; its layers "
            f"are {sorted(seen_names)}."
        )
    for wrapper, source, group in pending:
        if group is not None:
            members[group].append((wrapper, source))
        else:
            _assign_clusters(rewrite, wrapper, source)
    for group, (codebook, entries) in enumerate(zip(codebooks, members)):
        if not entries:
            raise ValueError(f"share_across group {groups[group]} holds no clusterable layer (all skipped?).")
        _assign_shared(rewrite, codebook, entries)
    rewrite.weights.apply()
    if not wrapped:
        raise ValueError(
            f"Model '{model.name}' has no layer to cluster: kerasq clusters kernels (Dense, Conv*, "
            "DepthwiseConv*, SeparableConv*, Embedding, kerasq.ClusterableLayer) and every such layer was "
            "skipped or none is there. Check `skip`, or register your layer's kernels with "
            "kerasq.graph.register_layer_facts."
        )
    return clustered


def _source_values(layer):
    """`fn() -> {name: array}`: the values the clusters of `layer`'s copy start from (pruned zeros baked)."""
    def values():
        plain = wrappers.unwrap(layer)
        masks = getattr(layer, "masks", {}) if wrappers.is_wrapper(layer) else {}
        result = {}
        for name, variable, _ in clusterable_weights(plain):
            value = np.asarray(keras.ops.convert_to_numpy(variable))
            if name in masks:
                value = value * np.asarray(keras.ops.convert_to_numpy(masks[name]))
            result[name] = value
        return result

    return values


def _assign_clusters(rewrite, wrapper, source, shared=None):
    cache = {}

    def clusters():
        if not cache:
            values = source()
            for entry in wrapper._clustered:
                cache[entry.name] = wrapper.compute_clusters(values[entry.name], entry.channel_ids, shared() if shared else None)
        return cache

    for entry in wrapper._clustered:
        prefix = entry.name.replace("/", "_")
        if wrapper.codebook is None:
            rewrite.weights.assign(wrapper, f"{prefix}_centroids", lambda n=entry.name: clusters()[n][0])
        rewrite.weights.assign(wrapper, f"{prefix}_assignment", lambda n=entry.name: clusters()[n][1])
        if entry.mask is not None:
            rewrite.weights.assign(wrapper, f"{prefix}_mask", lambda n=entry.name: clusters()[n][2])


def _assign_shared(rewrite, codebook, entries):
    cache = {}

    def shared():
        if "centroids" not in cache:
            wrapper = entries[0][0]
            samples = [v.ravel() for _, source in entries for v in source().values()]
            sample = np.concatenate(samples)
            cache["centroids"] = wrapper.compute_clusters(sample, None)[0]
        return cache["centroids"]

    rewrite.weights.assign(codebook, "centroids", shared)
    for wrapper, source in entries:
        _assign_clusters(rewrite, wrapper, source, shared)


def _groups(share_across, per_channel):
    if not share_across:
        return []
    if isinstance(share_across, (list, tuple)) and share_across and all(isinstance(n, str) for n in share_across):
        share_across = [share_across]  # one group given flat
    groups, seen = [], set()
    for group in share_across:
        if isinstance(group, str) or not all(isinstance(n, str) for n in group) or len(group) < 2:
            raise ValueError(
                f"share_across takes groups of at least two layer names, e.g. [['conv1', 'conv2']]; got {group!r}."
            )
        twice = seen.intersection(group)
        if twice:
            raise ValueError(f"Layers {sorted(twice)} appear in more than one share_across group; put each in one.")
        seen.update(group)
        groups.append(list(group))
    if per_channel and groups:
        raise ValueError(
            "share_across shares one codebook between layers, which cannot be per channel: use "
            "cluster_per_channel=False with share_across."
        )
    return groups
