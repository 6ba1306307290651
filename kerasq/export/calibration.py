"""Calibration data for post-training int8 quantization: checked against the model's inputs, cut to
`MAX_CALIBRATION_SAMPLES`, and fed to the converter one sample at a time.

Example:
>>> import keras, numpy as np
>>> from kerasq.export.calibration import calibration_samples
>>> from kerasq.validation import input_specs
>>> specs = input_specs(keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Dense(2)]))
>>> [x] = calibration_samples(np.zeros((1000, 8, 8, 1)), specs)  # evenly spread over the data
>>> x.shape
(300, 8, 8, 1)
"""

import numpy as np

from kerasq.export.errors import type_text
from kerasq.validation import check_input_data, expected_text

MAX_CALIBRATION_SAMPLES = 300


def calibration_samples(data, specs, what="representative_data", max_samples=MAX_CALIBRATION_SAMPLES):
    """Validates calibration data and returns up to `max_samples` samples per input.

    `data` is an array, a list/tuple of arrays (multi-input, in `specs` order), a dict keyed by input
    name, or an iterable of such batches (a generator, a `tf.data.Dataset`; `(x, y)` batches are fine).
    `what` names the argument in error messages.
    """
    if isinstance(data, dict) or _is_array_data(data, specs):
        arrays = check_input_data(data, specs, what)
        n = arrays[0].shape[0]
        if n > max_samples:  # evenly spread, so sorted data still covers every class
            keep = np.linspace(0, n - 1, max_samples).round().astype(int)
            arrays = [a[keep] for a in arrays]
        return arrays
    if isinstance(data, (str, bytes)):
        raise ValueError(f"{what}: expected {expected_text(specs)}, or an iterable of such batches; got a string.")
    try:
        iterator = iter(data)
    except TypeError:
        raise ValueError(
            f"{what}: expected {expected_text(specs)}, or an iterable of such batches; got {type_text(data)}."
        ) from None
    batches, count = [], 0
    for k, batch in enumerate(iterator):
        arrays = check_input_data(_strip_targets(batch, specs), specs, f"{what} (batch {k})")
        batches.append(arrays)
        count += arrays[0].shape[0]
        if count >= max_samples:
            break
    if not batches:
        raise ValueError(f"{what} is empty; expected {expected_text(specs)}.")
    return [np.concatenate(parts)[:max_samples] for parts in zip(*batches)]


def representative_dataset(samples, input_names):
    """The converter's `representative_dataset`: one `{input name: sample}` dict at a time."""

    def feed():
        for i in range(samples[0].shape[0]):
            yield {name: a[i : i + 1] for name, a in zip(input_names, samples)}

    return feed


def _is_array_data(data, specs):
    if hasattr(data, "shape") and hasattr(data, "dtype"):
        return True
    if isinstance(data, (list, tuple)) and data:
        if len(specs) > 1:
            return len(data) == len(specs) and all(np.ndim(d) == len(s.shape) for d, s in zip(data, specs))
        return np.ndim(data[0]) < len(specs[0].shape)  # a (nested) list of samples, not a list of batches
    return False


def _strip_targets(batch, specs):
    """`(x, y)` or `(x, y, sample_weight)` batches, as Keras datasets yield them, give `x`."""
    if isinstance(batch, tuple) and len(batch) in (2, 3):
        first = batch[0]
        if len(specs) == 1 and not isinstance(first, (list, tuple, dict)) and np.ndim(first) == len(specs[0].shape):
            return first
        if len(specs) > 1 and isinstance(first, (list, tuple, dict)) and len(first) == len(specs):
            return first
    return batch
