"""Weight clustering: tfmot's API on Keras 3 models, shared codebooks, pinned zeros, and
cluster-preserving QAT checked in the int8 file with the LiteRT interpreter."""

import os

import keras
import numpy as np
import pytest

import kerasq
from kerasq.clustering import (
    CentroidInitialization,
    ClusterWeights,
    clustered_kernels,
    distinct_values,
    quantize_preserving_clusters,
    tflite_weights,
)
from kerasq.demo import build_model


def _weights(model):
    return [np.array(w) for w in model.get_weights()]


def _all_kinds_model():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv")(inputs)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="depthwise")(x)
    x = keras.layers.SeparableConv2D(8, 3, padding="same", name="separable")(x)
    x = keras.layers.Conv2DTranspose(4, 3, name="transpose")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10, name="dense")(x)
    return keras.Model(inputs, outputs)


def _stripped_kernels(plain):
    from kerasq.graph import layer_facts

    for layer in plain.layers:
        facts = layer_facts(layer)
        if facts is not None and facts.kernels:
            for name, kernel in facts.kernels.items():
                yield layer.name, name, np.asarray(getattr(layer, name)), kernel.out_axis


def _per_channel_distinct(value, axis):
    from kerasq.clustering.wrapper import channel_ids_of

    ids = channel_ids_of(value.shape, axis)
    return max(len(np.unique(value[ids == c])) for c in range(int(ids.max()) + 1))


@pytest.mark.parametrize("per_channel", [False, True])
def test_every_kernel_kind_is_clustered_and_the_user_model_is_unchanged(per_channel):
    model = _all_kinds_model()
    before = _weights(model)
    clustered = kerasq.cluster_weights(model, 4, cluster_per_channel=per_channel)
    assert all(np.array_equal(a, b) for a, b in zip(before, _weights(model)))
    wrapped = [l.layer.name for l in clustered.layers if isinstance(l, ClusterWeights)]
    assert wrapped == ["conv", "depthwise", "separable", "transpose", "dense"]
    x = np.random.rand(4, 8, 8, 3).astype("float32")
    plain = kerasq.strip_clustering(clustered)
    # Stripping bakes exactly what the clustered model computes in inference.
    np.testing.assert_allclose(plain.predict(x, verbose=0), clustered.predict(x, verbose=0), atol=1e-5)
    for layer_name, name, value, axis in _stripped_kernels(plain):
        count = _per_channel_distinct(value, axis) if per_channel else len(np.unique(value))
        assert count <= 4, (layer_name, name, count)


def test_fit_trains_centroids_and_the_assignment_follows():
    from kerasq.clustering.wrapper import nearest_numpy

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, name="d"), keras.layers.Dense(1, name="h")])
    clustered = kerasq.cluster_weights(model, 3)
    entry = [l for l in clustered.layers if isinstance(l, ClusterWeights)][0]._clustered[0]
    centroids = np.array(entry.centroids)
    weights = np.array(entry.variable)
    clustered.compile(keras.optimizers.Adam(0.01), "mse")
    x = np.random.rand(64, 6).astype("float32")
    y = (x.sum(axis=1, keepdims=True) * 3.0).astype("float32")
    loss = clustered.fit(x, y, epochs=5, verbose=0).history["loss"]
    assert loss[-1] < loss[0]
    assert not np.allclose(np.array(entry.centroids), centroids), "the centroids get gradients"
    assert not np.allclose(np.array(entry.variable), weights), "the weights get straight-through gradients"
    # Every training call recomputes the assignment: each weight takes its nearest centroid.
    clustered(x, training=True)
    expected = nearest_numpy(np.array(entry.variable), np.array(entry.centroids))
    np.testing.assert_array_equal(np.array(entry.assignment), expected)


@pytest.mark.parametrize("init", list(CentroidInitialization) + ["linear", "random", "density", "kmeans++"])
def test_every_initialization_gives_at_most_k_values(init):
    layer = kerasq.cluster_weights(keras.layers.Dense(12), 5, cluster_centroids_init=init)
    layer.build((None, 20))
    assert len(np.unique(layer.clustered_values()["kernel"])) <= 5


def test_kmeans_beats_linear_on_a_bimodal_kernel():
    # k-means places centroids where the weights are; linear spacing wastes them on the empty middle.
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(-1, 0.05, 500), rng.normal(1, 0.05, 500)]).reshape(50, 20)
    errors = {}
    for init in ("linear", "kmeans++"):
        dense = keras.layers.Dense(20)
        dense.build((None, 50))
        dense.kernel.assign(values)
        wrapper = kerasq.cluster_weights(dense, 4, cluster_centroids_init=init)
        wrapper.build((None, 50))
        errors[init] = np.mean((wrapper.clustered_values()["kernel"] - values) ** 2)
    assert errors["kmeans++"] < errors["linear"]


def test_nested_models_are_clustered_and_kept_whole():
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="inner_dense")], name="inner")
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(3, name="head")(inner(inputs))
    model = keras.Model(inputs, outputs)
    clustered = kerasq.cluster_weights(model, 2)
    nested = [l for l in clustered.layers if isinstance(l, keras.Model)][0]
    assert isinstance(nested.layers[-1], ClusterWeights)
    plain = kerasq.strip_clustering(clustered)
    kernel = np.asarray([l for l in plain.layers if isinstance(l, keras.Model)][0].layers[-1].kernel)
    assert len(np.unique(kernel)) <= 2


def test_share_across_uses_one_codebook_for_a_group():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, name="conv1")(inputs)
    x = keras.layers.Conv2D(8, 3, name="conv2")(x)
    x = keras.layers.Flatten()(x)
    model = keras.Model(inputs, keras.layers.Dense(4, name="head")(x))
    clustered = kerasq.cluster_weights(model, 6, share_across=[["conv1", "conv2"]])
    wrappers = {l.layer.name: l for l in clustered.layers if isinstance(l, ClusterWeights)}
    assert wrappers["conv1"].codebook is wrappers["conv2"].codebook
    assert wrappers["head"].codebook is None
    shared = wrappers["conv1"].codebook.centroids
    assert sum(v is shared for v in clustered.trainable_variables) == 1
    clustered.compile("adam", "mse")
    clustered.fit(np.random.rand(16, 8, 8, 1), np.random.rand(16, 4), epochs=2, verbose=0)
    plain = kerasq.strip_clustering(clustered)
    union = np.concatenate([np.asarray(plain.get_layer(n).kernel).ravel() for n in ("conv1", "conv2")])
    assert len(np.unique(union)) <= 6


def test_share_across_survives_keras_files(tmp_path):
    inputs = keras.Input((6,))
    x = keras.layers.Dense(6, name="a")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(6, name="b")(x))
    clustered = kerasq.cluster_weights(model, 3, share_across=[["a", "b"]])
    path = os.path.join(tmp_path, "clustered.keras")
    clustered.save(path)
    loaded = keras.saving.load_model(path)
    a, b = [l for l in loaded.layers if isinstance(l, ClusterWeights)]
    assert a.codebook is b.codebook
    x = np.random.rand(3, 6).astype("float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), clustered.predict(x, verbose=0), atol=1e-6)


def test_preserve_sparsity_keeps_pruned_zeros_through_training():
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(16, name="d"), keras.layers.Dense(2, name="h")])
    pruned = kerasq.prune_low_magnitude(model, kerasq.ConstantSparsity(0.6, 0))
    kerasq.pruning.step(pruned)
    # Clustering the pruned (unstripped) model bakes the zeros first.
    clustered = kerasq.cluster_weights(pruned, 4, preserve_sparsity=True)
    zeros = np.asarray(kerasq.strip_pruning(pruned).get_layer("d").kernel) == 0
    clustered.compile(keras.optimizers.SGD(0.3), "mse")
    clustered.fit(np.random.rand(64, 20), np.random.rand(64, 2), epochs=3, verbose=0)
    kernel = np.asarray(kerasq.strip_clustering(clustered).get_layer("d").kernel)
    assert np.all(kernel[zeros] == 0)
    assert len(np.unique(kernel)) <= 4  # the zero counts as one of the 4 clusters
    assert np.all(kernel[~zeros] != 0)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: kerasq.cluster_weights(keras.layers.Dense(2), 1), "number_of_clusters=1"),
        (lambda: kerasq.cluster_weights(keras.layers.Dense(2), "8"), "number_of_clusters must be an int"),
        (lambda: kerasq.cluster_weights(keras.layers.Dense(2), 4, cluster_centroids_init="kmeans+"), "Unknown cluster_centroids_init 'kmeans\\+'"),
        (lambda: kerasq.cluster_weights(keras.layers.ReLU(name="relu"), 4), "'relu' \\(ReLU\\) has no weight to cluster"),
        (lambda: kerasq.cluster_weights(keras.layers.Dense(2), 4, cluster_per_channel=True, share_across=[["a", "b"]]), "names layers of a model"),
    ],
)
def test_bad_input_is_refused_with_the_value_and_the_fix(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_more_clusters_than_weights_is_refused():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, name="tiny")])
    with pytest.raises(ValueError, match="number_of_clusters=8 is larger than .*'tiny' weight 'kernel' \\(4 values\\): use at most 4"):
        kerasq.cluster_weights(model, 8)
    with pytest.raises(ValueError, match="each output channel"):
        kerasq.cluster_weights(keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)]), 4, cluster_per_channel=True)


def test_share_across_with_an_unknown_layer_names_it():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="a"), keras.layers.Dense(2, name="b")])
    with pytest.raises(ValueError, match="\\['nope'\\]"):
        kerasq.cluster_weights(model, 2, share_across=[["a", "nope"]])


def test_clusterable_layer_mixin_and_cluster_scope(tmp_path):
    @keras.saving.register_keras_serializable(package="test_clustering")
    class Scaled(keras.layers.Layer, kerasq.ClusterableLayer):
        def build(self, input_shape):
            self.w = self.add_weight(shape=(input_shape[-1], 5), name="w")

        def call(self, x):
            return x @ self.w

        def get_clusterable_weights(self):
            return [("w", self.w)]

    model = keras.Sequential([keras.Input((6,)), Scaled(name="scaled")])
    plain = kerasq.strip_clustering(kerasq.cluster_weights(model, 3))
    assert len(np.unique(np.asarray(plain.get_layer("scaled").w))) <= 3
    path = os.path.join(tmp_path, "m.keras")
    kerasq.cluster_weights(model, 3).save(path)
    with kerasq.cluster_scope():
        assert isinstance(keras.saving.load_model(path).layers[-1], ClusterWeights)


def _digits_subset(digits, n=400):
    (x_train, y_train), (x_test, y_test) = digits
    return (x_train[:n], y_train[:n]), (x_test, y_test)


@pytest.mark.parametrize("per_channel", [False, True])
def test_prune_cluster_qat_int8_keeps_clusters_and_zeros_in_the_file(digits, per_channel):
    keras.utils.set_random_seed(0)
    (x, y), (x_test, y_test) = _digits_subset(digits)
    model = build_model()
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=2, batch_size=64, verbose=0)
    pruned = kerasq.prune_low_magnitude(model, kerasq.ConstantSparsity(0.5, 0))
    kerasq.pruning.step(pruned)
    k = 8
    clustered = kerasq.cluster_weights(pruned, k, preserve_sparsity=True, cluster_per_channel=per_channel)
    clustered.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    clustered.fit(x, y, epochs=1, batch_size=64, verbose=0)
    qat = quantize_preserving_clusters(kerasq.strip_clustering(clustered))
    assert set(clustered_kernels(qat)) == {"block1_conv", "block2_conv", "block3_conv", "logits"}
    qat.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    qat.fit(x, y, epochs=1, batch_size=64, verbose=0)
    tflite = kerasq.TFLiteModel(kerasq.export_tflite(qat))
    assert tflite.is_fully_integer
    kernels = {n: w for n, w in tflite_weights(tflite.content).items() if w.dtype == np.int8}
    assert len(kernels) == 4, sorted(kernels)
    for name, value in kernels.items():
        # TFLite stores conv kernels as (out, h, w, in) and Dense kernels as (out, in), output axis 0.
        # Conv kernels are quantized per output channel (BatchNorm folded in scales each channel), so
        # the k shared values give at most k int8 codes per channel; the Dense head is quantized per
        # tensor, so it holds at most k codes in all when clustered per tensor.
        per_tensor = value.ndim == 2 and not per_channel
        count = distinct_values(value) if per_tensor else distinct_values(value, axis=0)
        assert count <= k, (name, count)
        # Pruning's zeros are still there: half of each kernel (the magnitude mask's target), give or
        # take the few weights whose int8 code rounds to zero anyway.
        assert np.mean(value == 0) >= 0.45, name
    # The file computes what the QAT model computes, to within the measured kernel floor.
    report = kerasq.verify_tflite(qat, tflite.content, x_test[:100])
    assert report.passed, report


def test_quantize_preserving_clusters_takes_an_unstripped_clustered_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8, name="dense"), keras.layers.Dense(3, name="head")])
    clustered = kerasq.cluster_weights(model, 4, skip=["head"])
    qat = quantize_preserving_clusters(clustered)
    assert clustered_kernels(qat) == {"dense": ["kernel"]}
    qat.compile("adam", "mse")
    qat.fit(np.random.rand(64, 16), np.random.rand(64, 3), epochs=2, verbose=0)
    values = [w for w in tflite_weights(kerasq.export_tflite(qat)).values() if w.dtype == np.int8]
    assert sorted(distinct_values(w) for w in values)[0] <= 4
