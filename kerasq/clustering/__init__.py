"""Weight clustering (weight sharing): tensorflow-model-optimization's clustering API for Keras 3.

`cluster_weights` wraps layers (or every layer of a model) in `ClusterWeights`, whose kernels take
`number_of_clusters` trainable values; `fit` trains it as it is; `strip_clustering` returns plain
layers holding the clustered values, ready for `kerasq.export_tflite`, and
`quantize_preserving_clusters` runs QAT that keeps them clustered in the int8 file. Layers can share
one codebook (`share_across`), and pruned zeros can stay zero (`preserve_sparsity`).
"""

from kerasq.clustering.centroids import CentroidInitialization
from kerasq.clustering.cluster import cluster_scope, cluster_weights, clustering_layers, strip_clustering
from kerasq.clustering.inspect import distinct_values, tflite_weights
from kerasq.clustering.preserve import ClusterConstraint, clustered_kernels, quantize_preserving_clusters
from kerasq.clustering.wrapper import ClusterableLayer, ClusterWeights, Codebook, is_clusterable
