"""Per-channel affine preprocessing (Rescaling, Normalization) as a frozen BatchNormalization.

`y = x * scale + offset` is what a BatchNormalization computes with gamma = scale, beta = offset,
moving mean 0, moving variance 1 and epsilon 0. kerasq runs such a BatchNorm folded into a 1x1
depthwise convolution, one int8 DEPTHWISE_CONV_2D in the file, where the layer itself would be a float
MUL and ADD between the quantized input and the rest of the model.

Example:
>>> import keras, numpy as np
>>> from kerasq.quantization.affine import affine_as_batchnorm
>>> rescaling = keras.layers.Rescaling(1 / 127.5, offset=-1.0)
>>> batchnorm = affine_as_batchnorm(rescaling)
>>> x = np.array([[[[0.0, 127.5, 255.0]]]], "float32")
>>> np.asarray(batchnorm(x)).round(6).tolist()
[[[[-1.0, 0.0, 1.0]]]]
"""

import keras
import numpy as np


def is_affine_preprocessing(layer):
    """True for a Rescaling or Normalization layer whose map is per channel (or one for all)."""
    return _per_channel_scale_and_offset(layer) is not None


def affine_as_batchnorm(layer):
    """A frozen, built-on-first-call BatchNormalization computing what `layer` computes on
    channels-last inputs, or None if `layer` is not a per-channel affine map kerasq knows."""
    scale_offset = _per_channel_scale_and_offset(layer)
    if scale_offset is None:
        return None
    scale, offset = scale_offset
    return keras.layers.BatchNormalization(
        epsilon=0.0,
        trainable=False,
        gamma_initializer=keras.initializers.Constant(scale if scale.ndim else float(scale)),
        beta_initializer=keras.initializers.Constant(offset if offset.ndim else float(offset)),
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        name=f"{layer.name}_affine",
    )


def _per_channel_scale_and_offset(layer):
    """`_scale_and_offset` where both are per last-axis channel or scalars, else None."""
    scale_offset = _scale_and_offset(layer)
    if scale_offset is None or any(part.ndim > 1 for part in scale_offset):
        return None
    return scale_offset


def _scale_and_offset(layer):
    """`(scale, offset)` as arrays of rank 0 or 1 (per last-axis channel), or None."""
    if isinstance(layer, keras.layers.Rescaling):
        return _per_channel(layer.scale), _per_channel(layer.offset)
    if isinstance(layer, keras.layers.Normalization) and not layer.invert and getattr(layer, "mean", None) is not None:
        axis = layer.axis if isinstance(layer.axis, (list, tuple)) else (layer.axis,)
        if tuple(axis) not in ((-1,), (len(layer.mean.shape) - 1,)):
            return None
        mean = _per_channel(keras.ops.convert_to_numpy(layer.mean))
        std = np.maximum(np.sqrt(_per_channel(keras.ops.convert_to_numpy(layer.variance))), keras.backend.epsilon())
        return 1.0 / std, -mean / std
    return None


def _per_channel(value):
    """`value` as a float32 array of rank 0 or 1, squeezing leading broadcast axes; rank > 1 stays."""
    array = np.asarray(keras.ops.convert_to_numpy(value) if not isinstance(value, (int, float)) else value, "float32")
    while array.ndim > 1 and array.shape[0] == 1:
        array = array[0]
    return array
