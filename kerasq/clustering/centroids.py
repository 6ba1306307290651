"""Where the clusters start: `CentroidInitialization` and the 1-D algorithms behind it (NumPy).

Example:
>>> import numpy as np
>>> from kerasq.clustering import CentroidInitialization
>>> from kerasq.clustering.centroids import init_centroids
>>> init_centroids(np.array([0.0, 1.0, 2.0, 3.0, 4.0]), 3, CentroidInitialization.LINEAR).tolist()
[0.0, 2.0, 4.0]
"""

import enum

import numpy as np


class CentroidInitialization(str, enum.Enum):
    """How the centroids of each clustered weight start (tfmot's names).

    - `LINEAR`: evenly spaced between the weight's minimum and maximum.
    - `RANDOM`: uniformly random between the minimum and maximum (NumPy's global generator, which
      `keras.utils.set_random_seed` seeds).
    - `DENSITY_BASED`: at evenly spaced quantiles, so dense regions of the weight distribution get
      more centroids.
    - `KMEANS_PLUS_PLUS`: k-means++ seeding followed by a few Lloyd iterations (1-D k-means).

    Strings are accepted too: 'linear', 'random', 'density' (or 'density_based'), 'kmeans++'.
    """

    LINEAR = "linear"
    RANDOM = "random"
    DENSITY_BASED = "density"
    KMEANS_PLUS_PLUS = "kmeans++"


_ALIASES = {"density_based": "density", "kmeans_plus_plus": "kmeans++", "kmeans": "kmeans++"}


def get_initialization(value):
    """The `CentroidInitialization` for `value` (a member or its string); a clear error otherwise."""
    if isinstance(value, CentroidInitialization):
        return value
    if isinstance(value, str):
        key = value.strip().lower()
        key = _ALIASES.get(key, key)
        for member in CentroidInitialization:
            if key in (member.value, member.name.lower()):
                return member
    names = ", ".join(f"CentroidInitialization.{m.name} ('{m.value}')" for m in CentroidInitialization)
    raise ValueError(f"Unknown cluster_centroids_init {value!r}: use one of {names}.")


def init_centroids(values, number_of_clusters, method, lloyd_iterations=10):
    """`number_of_clusters` centroids (sorted, float32) for the 1-D sample `values`."""
    values = np.asarray(values, np.float64).ravel()
    k = int(number_of_clusters)
    if values.size == 0:
        return np.zeros(k, np.float32)
    low, high = float(values.min()), float(values.max())
    method = get_initialization(method)
    if method is CentroidInitialization.LINEAR:
        centroids = np.linspace(low, high, k)
    elif method is CentroidInitialization.RANDOM:
        centroids = np.random.uniform(low, high, k)
    elif method is CentroidInitialization.DENSITY_BASED:
        centroids = np.quantile(values, (np.arange(k) + 0.5) / k)
    else:
        centroids = _kmeans_plus_plus(values, k)
        centroids = lloyd(values, centroids, lloyd_iterations)
    return np.sort(centroids).astype(np.float32)


def nearest(values, centroids):
    """The index of the nearest centroid for each value (ties go to the lower index)."""
    values = np.asarray(values)
    return np.argmin(np.abs(values[..., None] - np.asarray(centroids)), axis=-1).astype(np.int32)


def lloyd(values, centroids, iterations):
    """Refines 1-D centroids by k-means (Lloyd) iterations; an empty cluster keeps its centroid."""
    centroids = np.array(centroids, np.float64)
    sample = _sample(values)
    for _ in range(iterations):
        assignment = nearest(sample, centroids)
        sums = np.bincount(assignment, weights=sample, minlength=len(centroids))
        counts = np.bincount(assignment, minlength=len(centroids))
        updated = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        if np.allclose(updated, centroids):
            break
        centroids = updated
    return centroids


def _kmeans_plus_plus(values, k):
    sample = _sample(values)
    rng = np.random.default_rng(np.random.randint(2**31))
    centroids = [float(rng.choice(sample))]
    for _ in range(1, k):
        distance = np.min(np.abs(sample[:, None] - np.asarray(centroids)[None]), axis=1) ** 2
        total = distance.sum()
        if total <= 0:  # fewer distinct values than clusters: repeat the last centroid
            centroids.append(centroids[-1])
            continue
        centroids.append(float(rng.choice(sample, p=distance / total)))
    return np.asarray(centroids)


def _sample(values, limit=20000):
    """At most `limit` evenly strided values: k-means on a large kernel needs no more than that."""
    values = np.asarray(values, np.float64).ravel()
    if values.size <= limit:
        return values
    return np.sort(values)[:: int(np.ceil(values.size / limit))]
