"""Where each weight of a rebuilt model comes from: copied, sliced, padded, reshaped or computed.

A `WeightMap` collects assignments while a new model is being built and applies them once it is:
each target weight gets a source (a variable, an array, or a function of nothing) passed through
zero or more transforms. Nothing is written into a weight of another shape: the error names the
layer, the weight and both shapes.

Example:
>>> import keras, numpy as np
>>> from kerasq.graph.weights import WeightMap, take
>>> wide, narrow = keras.layers.Dense(4), keras.layers.Dense(2)
>>> wide.build((None, 3)); narrow.build((None, 3))
>>> weights = WeightMap()
>>> weights.assign(narrow, "kernel", wide.kernel, take(axis=-1, indices=[0, 2]))
>>> weights.assign(narrow, "bias", wide.bias, take(axis=0, indices=[0, 2]))
>>> weights.apply()
>>> np.array_equal(np.asarray(narrow.kernel), np.asarray(wide.kernel)[:, [0, 2]])
True
"""

import dataclasses
from typing import Any, Callable, Tuple

import keras
import numpy as np


class WeightShapeError(ValueError):
    """A weight would have been written into a variable of another shape."""


@dataclasses.dataclass(frozen=True)
class Transform:
    """One step from a source weight to a target weight: `fn(array) -> array`, described by `how`."""

    fn: Callable[[np.ndarray], np.ndarray]
    how: str

    def __call__(self, value):
        return self.fn(value)

    def __str__(self):
        return self.how


def take(axis, indices):
    """Keeps the entries `indices` along `axis` (removing channels, in any order)."""
    indices = np.asarray(indices, dtype=int)
    return Transform(lambda value: np.take(value, indices, axis=axis),
                     f"take {len(indices)} along axis {axis}")


def pad(axis, size, fill=0.0):
    """Grows `axis` to `size` entries: new entries are `fill` (a number), or `fill(shape)` (an array
    of the missing part's shape, e.g. a Keras initializer)."""

    def grow(value):
        missing = size - value.shape[axis]
        if missing < 0:
            raise WeightShapeError(f"cannot pad axis {axis} of a weight of shape {value.shape} to {size}: it is larger.")
        shape = list(value.shape)
        shape[axis] = missing
        extra = np.full(shape, fill, value.dtype) if np.isscalar(fill) else np.asarray(fill(tuple(shape)), value.dtype)
        return np.concatenate([value, extra], axis=axis)

    return Transform(grow, f"pad axis {axis} to {size}")


def repeat(axis, times):
    """Repeats the whole weight `times` times along `axis` (e.g. a 1-channel filter for 3 channels)."""
    return Transform(lambda value: np.concatenate([value] * times, axis=axis), f"repeat x{times} along axis {axis}")


def reduce_sum(axis, keepdims=True):
    """Sums over `axis` (e.g. a 3-channel filter for 1 channel: the sum sees the grey image as RGB)."""
    return Transform(lambda value: np.sum(value, axis=axis, keepdims=keepdims), f"sum over axis {axis}")


def reshape(shape):
    """Reshapes the weight (same number of entries)."""
    shape = tuple(shape)
    return Transform(lambda value: np.reshape(value, shape), f"reshape to {shape}")


def apply_fn(fn, how=None):
    """Any function of the array, e.g. a Net2Net split."""
    return Transform(fn, how or getattr(fn, "__name__", "function"))


@dataclasses.dataclass
class Assignment:
    layer: Any
    name: str
    source: Any
    transforms: Tuple[Transform, ...]

    @property
    def how(self):
        return ", ".join(str(t) for t in self.transforms) or "copy"


class WeightMap:
    """Weight assignments for a model being built, applied all at once by `apply()`."""

    def __init__(self):
        self.assignments = []

    def assign(self, layer, name, source, *transforms):
        """Sets weight `name` of `layer` from `source` (a variable, an array, or a function returning
        one), passed through `transforms` in order."""
        self.assignments.append(Assignment(layer, name, source, tuple(transforms)))

    def copy_layer(self, target, source):
        """Copies every weight of `source` into `target`, one to one, in `layer.weights` order."""
        self.assignments.append(Assignment(target, None, source, ()))

    def apply(self):
        """Writes every assignment; raises `WeightShapeError` before writing anything if one misfits."""
        writes = []
        for assignment in self.assignments:
            writes.extend(_resolve(assignment))
        for variable, value in writes:
            variable.assign(value)


def weight(layer, name):
    """The variable `name` of `layer`: an attribute such as `kernel`, else the weight whose path ends
    in `/name`."""
    candidate = getattr(layer, name, None)
    if isinstance(candidate, keras.Variable):
        return candidate
    matches = [v for v in layer.weights if v.path == name or v.path.endswith("/" + name)]
    if len(matches) == 1:
        return matches[0]
    names = [v.path for v in layer.weights]
    raise KeyError(f"Layer '{layer.name}' has no single weight named '{name}'; its weights are {names}.")


def _resolve(assignment):
    layer = assignment.layer
    if assignment.name is None:
        return _resolve_layer_copy(layer, assignment.source)
    variable = weight(layer, assignment.name)
    value = assignment.source
    if callable(value) and not isinstance(value, keras.Variable):
        value = value()
    value = np.asarray(keras.ops.convert_to_numpy(value) if not isinstance(value, np.ndarray) else value)
    for transform in assignment.transforms:
        value = transform(value)
    _check_shape(layer, assignment.name, value.shape, variable.shape, assignment.how)
    return [(variable, value)]


def _resolve_layer_copy(target, source):
    if not isinstance(source, keras.layers.Layer):  # bare operations hold no weights
        return []
    values = source.get_weights()
    variables = target.weights
    if len(values) != len(variables):
        raise WeightShapeError(
            f"Cannot copy the weights of '{source.name}' ({type(source).__name__}, {len(values)} weights) "
            f"into '{target.name}' ({type(target).__name__}, {len(variables)} weights)."
        )
    for variable, value in zip(variables, values):
        _check_shape(target, variable.path, value.shape, variable.shape, f"copy from '{source.name}'")
    return list(zip(variables, values))


def _check_shape(layer, name, got, want, how):
    if tuple(got) != tuple(want):
        raise WeightShapeError(
            f"Cannot put a weight of shape {tuple(got)} into '{layer.name}' weight '{name}' of shape "
            f"{tuple(want)} ({how}). Give a transform that makes the shapes agree (take, pad, reshape, "
            "...), or leave that weight out of the mapping."
        )
