"""Where LiteRT's default kernels (XNNPACK) compute int8 ops differently from its reference kernels.

The QAT model simulates the kernels a phone runs by default, so where XNNPACK's arithmetic differs
from the TFLite reference kernels by a step, the simulation follows XNNPACK:

- LEAKY_RELU: XNNPACK multiplies the int8 input (less its zero point) by `input scale / output scale`
  (or that times the slope, for negative inputs) held with only 8 fractional bits, adds 128 and
  shifts right by 8: the slopes are off by up to 1/512 of a step per input step, 1-2 output steps
  over the int8 range. The reference kernels use a 31-bit multiplier. XNNPACK takes the op when both
  scale ratios lie in [2^-8, 2^7] in magnitude; otherwise LiteRT's builtin kernel runs it, and the
  simulation rounds the exact value.
- QUANTIZE from int8 to int8 (the requantization the converter puts before a concatenation for an
  input with a scale of its own): XNNPACK multiplies the int8 input (less its zero point) by
  `input scale / output scale` held with 8 fractional bits, adds 128 and shifts right by 8, as for
  LEAKY_RELU, where that ratio lies in [2^-8, 2^7]; otherwise LiteRT's builtin kernel runs it with
  TFLite's 31-bit fixed-point multiplier (`fixed_point.multiply_by_quantized_multiplier`). A ratio
  of 0.55, say, is held as 141/256 rather than 0.5508: the QAT model's single rounding put 2.5% of
  such an input's values a step from the file's.
- RESIZE_BILINEAR: XNNPACK rounds the interpolated int8 value half up; the reference and builtin
  kernels round ties away from zero, so every negative tie (one output in four or so when upsampling
  by 2) is a step apart.

Example:
>>> import numpy as np
>>> from kerasq.quantization.xnnpack import leaky_relu
>>> x = np.array([-100.0, -3.0, 5.0, 100.0], "float32") * 0.05  # int8 steps of an input scale 0.05
>>> [round(float(v) / 0.04) for v in leaky_relu(x, 0.1, 0.05, 0.04)]  # output steps, scale 0.04
[-12, 0, 6, 125]
"""

from keras import ops

from kerasq.quantization import fixed_point

_FRACTION = 256.0  # XNNPACK's LEAKY_RELU multipliers have 8 fractional bits
# The scale ratios XNNPACK's qs8 LEAKY_RELU operator accepts.
_LOWEST_RATIO, _HIGHEST_RATIO, _LOWEST_NEGATIVE = 2.0**-8, 2.0**7, -(2.0**7 - 2.0**-8)
# Bilinear values are sums of int8 values times multiples of 1/16 (upsampling by 2) or so, computed
# here in float32: a tie can land a hair below .5.
_TIE_TOLERANCE = 1e-4


def leaky_relu(x, negative_slope, input_step, output_step):
    """`leaky_relu(x)` on the output grid as XNNPACK's int8 LEAKY_RELU computes it, for `x` on the
    input grid. Steps are the scales of the int8 input and output; the gradient is leaky ReLU's."""
    positive = ops.cast(input_step / output_step, "float32")
    negative = positive * ops.cast(negative_slope, "float32")
    delegated = (
        (positive >= _LOWEST_RATIO) & (positive <= _HIGHEST_RATIO)
        & (negative >= _LOWEST_NEGATIVE) & (negative <= _HIGHEST_RATIO) & (ops.abs(negative) >= _LOWEST_RATIO)
    )
    levels = ops.round(x / input_step)  # the int8 input less its zero point
    multiplier = ops.where(levels >= 0, ops.round(_FRACTION * positive), ops.round(_FRACTION * negative))
    # Exact in float32: |levels x multiplier| < 2^24, and dividing by 256 only moves the exponent.
    mirrored = ops.floor((levels * multiplier + _FRACTION / 2) / _FRACTION) * output_step
    exact = ops.leaky_relu(x, negative_slope)
    return exact + ops.stop_gradient(ops.where(delegated, mirrored, exact) - exact)


def requantize(x, input_step, output_step):
    """`x`, on the int8 grid of `input_step`, on the grid of `output_step` as LiteRT's int8 QUANTIZE
    computes it by default (see the module's docstring). Steps are the file's scales; the gradient
    passes straight through."""
    ratio = ops.cast(input_step, "float32") / ops.cast(output_step, "float32")
    levels = ops.round(x / input_step)  # the int8 input less its zero point
    # Exact in float32: |levels x multiplier| < 2^24, and dividing by 256 only moves the exponent.
    delegated = ops.floor((levels * ops.round(_FRACTION * ratio) + _FRACTION / 2) / _FRACTION)
    multiplier = ops.cast(input_step, "float64") / ops.cast(output_step, "float64")
    builtin = ops.cast(fixed_point.multiply_by_quantized_multiplier(levels, multiplier), "float32")
    xnnpack_runs = (ratio >= _LOWEST_RATIO) & (ratio <= _HIGHEST_RATIO)
    moved = ops.where(xnnpack_runs, delegated, builtin) * output_step
    return x + ops.stop_gradient(moved - x)


def round_half_up(x, quantizer, state):
    """`x` rounded onto the grid of `quantizer`'s range `state` as XNNPACK's int8 RESIZE_BILINEAR
    rounds: to the nearest level, ties up. The gradient passes straight through."""
    step, zero_point = quantizer.grid(state)
    level = ops.clip(ops.floor(x / step + zero_point + 0.5 + _TIE_TOLERANCE), 0.0, 2.0**quantizer.bits - 1.0)
    return x + ops.stop_gradient((level - zero_point) * step - x)
