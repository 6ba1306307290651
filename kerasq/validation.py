"""Checks on user-supplied input data, with errors that say what was expected and how to fix it.

Shared by export (calibration data), `TFLiteModel.predict` and `verify_tflite`.

Example:
>>> import keras, numpy as np
>>> from kerasq.validation import check_input_data, input_specs
>>> model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])
>>> [x] = check_input_data(np.zeros((4, 8, 8, 1)), input_specs(model))
>>> x.shape, x.dtype
((4, 8, 8, 1), dtype('float32'))
"""

import collections
import collections.abc

import numpy as np

InputSpec = collections.namedtuple("InputSpec", ["name", "shape", "dtype"])
InputSpec.__doc__ = """One model input: `name`, `shape` (a tuple, `None` for free dimensions) and `dtype` (a string)."""


def input_specs(model):
    """Returns one `InputSpec` per entry of `model.inputs`, in that order, with a free batch dimension.

    Raises `TypeError` for objects without `inputs` (subclassed models that were never built on
    `keras.Input`): wrap those in a Functional model first.
    """
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise TypeError(
            f"{type(model).__name__} '{getattr(model, 'name', '?')}' has no `inputs`, so its input shapes "
            "are unknown. Wrap it in a Functional model: `inputs = keras.Input(shape); "
            "model = keras.Model(inputs, model(inputs))`."
        )
    specs = []
    for i, tensor in enumerate(inputs):
        shape = (None,) + tuple(tensor.shape[1:])
        dtype = np.dtype(_dtype_name(tensor.dtype)).name
        name = str(getattr(tensor, "name", None) or "")
        if not name or name.startswith("keras_tensor"):  # an unnamed keras.Input
            name = "input" if len(inputs) == 1 else f"input_{i}"
        specs.append(InputSpec(name, shape, dtype))
    return specs


def pack_inputs(model, arrays):
    """Arranges a list of input arrays (in `model.inputs` order) the way `model(...)` expects them:
    one array, a list, or the model's own structure (e.g. a dict) for Functional models built on one."""
    import keras

    try:
        structure = model.input
    except (AttributeError, ValueError):
        structure = None
    if structure is not None and not isinstance(structure, (list, tuple)):
        if len(keras.tree.flatten(structure)) == len(arrays) and len(arrays) > 1:
            return keras.tree.pack_sequence_as(structure, list(arrays))
    return arrays[0] if len(arrays) == 1 else list(arrays)


def format_shape(shape):
    """`(None, 8, 8, 1)` style text for a shape tuple."""
    return "(" + ", ".join("None" if d is None else str(int(d)) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def check_input_data(x, specs, what="representative_data", *, cast=True):
    """Validates `x` against `specs` (a list of `InputSpec`) and returns a list of numpy arrays.

    `x` is an array-like for a single-input model, or a list/tuple of array-likes (or a dict keyed by
    input name) for a multi-input model, in the order of `model.inputs`. The batch dimension is free but
    must be the same for every input and at least 1; the other dimensions must match; values must be
    numeric and finite. With `cast=True` each array is converted to its spec's dtype.

    Raises `ValueError` naming `what`, the expected shape and dtype, what was received, and the fix.
    """
    specs = list(specs)
    arrays = _split_inputs(x, specs, what)
    out = []
    for array, spec in zip(arrays, specs):
        out.append(_check_one(array, spec, what, cast, many=len(specs) > 1))
    batch_sizes = {a.shape[0] for a in out}
    if len(batch_sizes) > 1:
        got = ", ".join(f"{s.name}: {a.shape[0]}" for s, a in zip(specs, out))
        raise ValueError(f"{what}: every input needs the same number of samples; got {got}.")
    return out


def expected_text(specs):
    """Human-readable description of what a model expects, e.g. `shape (None, 8, 8, 1) and dtype float32`."""
    parts = [f"'{s.name}' with shape {format_shape(s.shape)} and dtype {s.dtype}" for s in specs]
    if len(parts) == 1:
        return "an array " + parts[0]
    return f"a list of {len(parts)} arrays in the order of model.inputs: " + "; ".join(parts)


def _split_inputs(x, specs, what):
    if x is None:
        raise ValueError(f"{what} is None; expected {expected_text(specs)}.")
    if len(specs) == 1:
        if isinstance(x, dict):
            if len(x) != 1:
                raise ValueError(f"{what}: got a dict with keys {sorted(x)}; expected {expected_text(specs)}.")
            return [next(iter(x.values()))]
        if isinstance(x, (list, tuple)) and len(x) == 1 and np.ndim(x[0]) == len(specs[0].shape):
            return [x[0]]
        return [x]
    if isinstance(x, dict):
        missing = [s.name for s in specs if s.name not in x]
        if missing:
            raise ValueError(
                f"{what}: the dict has keys {sorted(map(str, x))} but the model's inputs are "
                f"{[s.name for s in specs]} (missing {missing}); expected {expected_text(specs)}."
            )
        return [x[s.name] for s in specs]
    if not isinstance(x, (list, tuple)) or len(x) != len(specs):
        got = f"a {type(x).__name__} of length {len(x)}" if isinstance(x, (list, tuple)) else _describe(x)
        raise ValueError(f"{what}: the model has {len(specs)} inputs; expected {expected_text(specs)}, got {got}.")
    return list(x)


def _check_one(x, spec, what, cast, many):
    label = f"{what} (input '{spec.name}')" if many else what
    expected = f"shape {format_shape(spec.shape)} and dtype {spec.dtype}"
    try:
        array = np.asarray(x)
    except Exception as error:  # ragged lists and other non-array objects
        raise ValueError(f"{label}: expected {expected}, got {_describe(x)} that is not an array ({error}).") from None
    if array.dtype.kind not in "biuf":
        raise ValueError(
            f"{label}: expected {expected}, got an array of dtype {array.dtype}; pass numeric data, e.g. "
            "`np.asarray(x, dtype='float32')`."
        )
    rank = len(spec.shape)
    if array.ndim != rank:
        hint = ""
        if array.ndim == rank - 1 and _dims_match(array.shape, spec.shape[1:]):
            hint = " This looks like a single sample: add a batch axis: x[None]."
        elif array.ndim == rank + 1 and array.shape[-1] == 1:
            hint = " Drop the extra last axis: x[..., 0]."
        elif array.ndim == rank - 1 and spec.shape[-1] == 1 and _dims_match(array.shape[1:], spec.shape[1:-1]):
            hint = " Add a channel axis: x[..., None]."
        raise ValueError(f"{label}: expected {expected}, got shape {format_shape(array.shape)}.{hint}")
    if not _dims_match(array.shape[1:], spec.shape[1:]):
        raise ValueError(
            f"{label}: expected {expected}, got shape {format_shape(array.shape)} (the dimensions after the "
            "batch axis must match the model's input)."
        )
    if array.shape[0] == 0:
        raise ValueError(f"{label}: got 0 samples; expected {expected} with at least one sample.")
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            bad = np.argwhere(~finite)[0]
            n_nan, n_inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
            raise ValueError(
                f"{label}: found {n_nan} NaN and {n_inf} inf values (first at index {tuple(int(i) for i in bad)}); "
                f"expected finite values with {expected}. Clean the data, e.g. `np.nan_to_num(x)`."
            )
    spec_kind = np.dtype(spec.dtype).kind
    if spec_kind in "iu" and array.dtype.kind == "f":
        if not np.array_equal(array, np.round(array)):
            raise ValueError(f"{label}: expected integer values with {expected}, got non-integer floats.")
    if cast and array.dtype != np.dtype(spec.dtype):
        array = array.astype(spec.dtype)
    return array


def _dims_match(got, expected):
    return len(got) == len(expected) and all(e is None or int(e) == int(g) for g, e in zip(got, expected))


def _describe(x):
    if isinstance(x, collections.abc.Sized) and not isinstance(x, (str, bytes)):
        return f"a {type(x).__name__} of length {len(x)}"
    return f"a {type(x).__name__}"


def _dtype_name(dtype):
    name = getattr(dtype, "name", dtype)
    return str(name)
