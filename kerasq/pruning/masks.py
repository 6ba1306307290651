"""Pruning masks by magnitude: unstructured, by blocks, and m:n.

Masks are computed in NumPy, a few times per training run, so they are exact: a mask for sparsity
`s` zeroes `round(s * size)` entries (ties broken by position), never "about" that many.

Example:
>>> import numpy as np
>>> from kerasq.pruning import masks
>>> weights = np.array([[0.1, -3.0, 0.2, 4.0], [-0.5, 0.05, 2.0, -1.0]])
>>> masks.magnitude_mask(weights, 0.5)
array([[0., 1., 0., 1.],
       [0., 0., 1., 1.]], dtype=float32)
>>> masks.m_by_n_mask(weights, 2, 4, axis=-1)  # at most 2 of every 4 along the last axis
array([[0., 1., 0., 1.],
       [0., 0., 1., 1.]], dtype=float32)
"""

import numpy as np

POOLING = {"AVG": np.nanmean, "MAX": np.nanmax}


def magnitude_mask(weights, sparsity, block_size=(1, 1), pooling="AVG"):
    """A 0/1 mask that zeroes the `sparsity` fraction of `weights` smallest in magnitude.

    With `block_size=(rows, cols)` the last two axes are cut into blocks (edge blocks may be
    smaller), each block is scored by the AVG or MAX of its |w|, and whole blocks are zeroed;
    leading axes (a conv kernel's spatial ones) are blocked independently.
    """
    weights = np.asarray(weights, dtype=np.float32)
    block_size = tuple(block_size)
    if block_size == (1, 1) or weights.ndim < 2:
        return _smallest_zeroed(np.abs(weights), sparsity)
    scores = _block_scores(np.abs(weights), block_size, POOLING[pooling])
    block_mask = _smallest_zeroed(scores, sparsity)
    expanded = np.repeat(np.repeat(block_mask, block_size[0], axis=-2), block_size[1], axis=-1)
    return np.ascontiguousarray(expanded[..., : weights.shape[-2], : weights.shape[-1]])


def m_by_n_mask(weights, m, n, axis):
    """A 0/1 mask keeping the `m` largest |w| of every `n` consecutive entries along `axis`.

    A last, shorter group (when the axis length is not a multiple of `n`) keeps up to `m` entries.
    """
    weights = np.moveaxis(np.abs(np.asarray(weights, dtype=np.float32)), axis, -1)
    length = weights.shape[-1]
    padded_length = -(-length // n) * n
    padding = [(0, 0)] * (weights.ndim - 1) + [(0, padded_length - length)]
    scores = np.pad(weights, padding, constant_values=-np.inf)
    groups = scores.reshape(scores.shape[:-1] + (padded_length // n, n))
    # Stable sort of the negated scores: the m largest of each group, earlier entries first on ties.
    ranks = np.argsort(np.argsort(-groups, axis=-1, kind="stable"), axis=-1, kind="stable")
    mask = (ranks < m).reshape(scores.shape)[..., :length]
    return np.ascontiguousarray(np.moveaxis(mask.astype(np.float32), -1, axis))


def sparsity(mask):
    """The fraction of zeros in `mask` (or in any weight)."""
    mask = np.asarray(mask)
    return float(np.mean(mask == 0)) if mask.size else 0.0


def _smallest_zeroed(scores, sparsity):
    flat = scores.reshape(-1)
    count = int(round(sparsity * flat.size))
    mask = np.ones(flat.size, dtype=np.float32)
    mask[np.argsort(flat, kind="stable")[:count]] = 0.0
    return mask.reshape(scores.shape)


def _block_scores(magnitudes, block_size, pool):
    rows, cols = magnitudes.shape[-2:]
    block_rows, block_cols = block_size
    out_rows, out_cols = -(-rows // block_rows), -(-cols // block_cols)
    # Edge blocks are padded with NaN, which the NaN-aware pooling ignores.
    padding = [(0, 0)] * (magnitudes.ndim - 2) + [(0, out_rows * block_rows - rows), (0, out_cols * block_cols - cols)]
    padded = np.pad(magnitudes, padding, constant_values=np.nan)
    blocks = padded.reshape(magnitudes.shape[:-2] + (out_rows, block_rows, out_cols, block_cols))
    return pool(blocks, axis=(-3, -1))
