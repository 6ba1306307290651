"""Activation ranges from calibration data: QAT that starts where post-training quantization ends.

`calibrate_ranges(qat_model, x)` runs the model on `x` with every activation quantizer in calibration
mode (the float activations pass through, each quantizer's estimator records their range) and leaves
each range at the mean of its batch estimates (the extremes, for "minmax"). Training then moves the
ranges on from there. `quantize_model(model, calibration_data=x)` does it for you.

Example:
>>> import keras, numpy as np, kerasq
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2)])
>>> qat = kerasq.quantize_model(model)
>>> kerasq.calibrate_ranges(qat, np.random.default_rng(0).uniform(0, 1, (64, 4)).astype("float32"))
>>> low, high = qat.layers[1].quantization_ranges()["output"]  # the Quantize layer on the input
>>> 0.0 == low and 0.9 < high <= 1.0
True
"""

import numpy as np

from kerasq.export.calibration import calibration_samples
from kerasq.quantization.layers import quantized_layers
from kerasq.quantization.quantizers import calibrating
from kerasq.validation import input_specs

MAX_SAMPLES = 1024


def calibrate_ranges(model, data, batch_size=32):
    """Sets every learned activation range of a kerasq QAT `model` from `data`, in place.

    Args:
        model: a model made by `kerasq.quantize_model` (or `quantize_apply`).
        data: inputs as for `model.predict`: an array, a list or dict of arrays for several inputs,
            or an iterable of batches (`(x, y)` batches are fine). Up to 1024 samples are used,
            spread evenly over arrays.
        batch_size: samples per calibration batch: each batch gives one estimate per range, and
            the estimates are averaged.

    Fixed ranges (softmax, sigmoid) are left as they are. Learned weight steps
    (`WeightQuantizer(learn_scale=True)`) start again from their estimator's step on the kernels as
    they are now (a folded BatchNorm's scale included).
    """
    owners = quantized_layers(model)
    if not owners:
        raise ValueError(
            f"Model '{model.name}' has no kerasq activation ranges to calibrate: make it with "
            "kerasq.quantize_model(model, calibration_data=...) first."
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}.")
    samples = calibration_samples(data, input_specs(model), what="calibration_data", max_samples=MAX_SAMPLES)
    for layer in owners:
        for _, quantizer, state in layer.range_states():
            if quantizer.fixed_range is None:
                state["seen"].assign(0.0)
        for _, _, state in layer.weight_step_states():
            state["seen"].assign(0.0)
    count = samples[0].shape[0]
    with calibrating():
        for start in range(0, count, batch_size):
            batch = [np.asarray(a[start : start + batch_size]) for a in samples]
            model(batch if len(batch) > 1 else batch[0], training=False)
