"""How LiteRT's 16x8 kernels scale an accumulator to the output, for the QAT model to do the same.

CONV_2D, DEPTHWISE_CONV_2D and TRANSPOSE_CONV with int16 inputs multiply their int64 accumulator by
`input scale x weight scale / output scale` held as a 15-bit fixed-point number: the 31-bit multiplier
of the int8 kernels rounded to its top 15 bits (FULLY_CONNECTED does otherwise:
`fully_connected_int16`). That multiplier is off
by up to one part in 2^15, which at 16 bits moved 4-7% of a layer's outputs by one step on random
data (int8 outputs have 256 times fewer steps and do not notice); mirrored, under 1.2% stay apart,
from float32 rounding. The QAT model multiplies its float accumulator by the same error,
`multiplier_error`, per output channel.

Example:
>>> import numpy as np
>>> from kerasq.quantization.requantization import multiplier_error
>>> exact = np.float32(0.75)  # 3/4 has 2 significant bits: 15 hold it exactly
>>> float(multiplier_error(exact))
1.0
>>> inexact = np.float32(1 / 3)
>>> abs(float(multiplier_error(inexact)) - 1) < 2.0**-15
True
"""

from keras import ops

from kerasq.quantization import fixed_point

_MULTIPLIER_BITS = 15


def multiplier_error(multiplier):
    """(the multiplier LiteRT's 16x8 kernels use) / `multiplier`, elementwise.

    LiteRT writes `multiplier = mantissa x 2^exponent` with the mantissa in [0.5, 1) as 31 bits, then
    keeps `(mantissa_31 + 2^15) >> 16`, capped at 2^15 - 1: the mantissa rounded half up to 15 bits.
    """
    multiplier = ops.convert_to_tensor(multiplier, "float32")
    exponent = ops.floor(ops.log2(multiplier)) + 1.0
    mantissa = multiplier / ops.power(2.0, exponent)
    # log2 of a float32 can land on the wrong side of a power of two: bring the mantissa into [0.5, 1).
    exponent = ops.where(mantissa >= 1.0, exponent + 1.0, ops.where(mantissa < 0.5, exponent - 1.0, exponent))
    mantissa = multiplier / ops.power(2.0, exponent)
    top = 2.0**_MULTIPLIER_BITS
    reduced = ops.minimum(ops.floor(mantissa * top + 0.5), top - 1.0)
    return reduced / (mantissa * top)


def file_scale(step):
    """A scale as the file holds it (float32), as a float64 tensor for exact integer arithmetic."""
    return ops.cast(ops.cast(step, "float32"), "float64")


def file_levels(x, step):
    """The integer levels (float64) of `x`, a tensor on the grid of the file scale `step`."""
    return ops.round(ops.cast(x, "float64") / file_scale(step))


def activation_step(quantizer, state, dtype=None):
    """The scale of an activation range, as TensorFlow's fake-quant (and so the file) has it; in
    `dtype` if given (the converter's float64 for bias scales), else the range's."""
    low, high = quantizer.range(state)
    if dtype is not None:
        low, high = ops.cast(low, dtype), ops.cast(high, dtype)
    quant_min = 1.0 if quantizer.symmetric else 0.0
    return (high - low) / (2.0**quantizer.bits - 1.0 - quant_min)


def kernel_steps(weights_quantizer, quantized_kernel, axis):
    """The scale of each output channel of an already fake-quantized kernel (one for `axis=None`).

    `axis` is the handler's kernel axis: an int, "depthwise" (the last two axes, flattened as the
    output channels are), or None. The largest magnitude of a narrow-range kernel channel is
    (2^(bits-1) - 1) steps; an all-zero channel has the step the weight quantizer gives it (max 1).
    """
    kernel = ops.abs(ops.convert_to_tensor(quantized_kernel))
    rank = len(kernel.shape)
    if axis is None:
        max_abs = ops.max(kernel)
    elif axis == "depthwise":
        max_abs = ops.reshape(ops.max(kernel, axis=tuple(range(rank - 2))), (-1,))
    else:
        axis = axis % rank
        max_abs = ops.max(kernel, axis=tuple(i for i in range(rank) if i != axis))
    max_abs = ops.where(ops.equal(max_abs, 0.0), ops.ones_like(max_abs), max_abs)
    return max_abs / (2.0 ** (weights_quantizer.bits - 1) - 1.0)


def scale_channels(outputs, factors, layer):
    """`outputs` with each output channel of `layer` multiplied by `factors` (one, or one per channel)."""
    return outputs * along_channels(ops.stop_gradient(factors), layer, len(outputs.shape))


def along_channels(values, layer, rank):
    """`values` (one, or one per output channel of `layer`) shaped to broadcast against its outputs
    of `rank`."""
    if len(values.shape) == 0 or getattr(layer, "data_format", "channels_last") != "channels_first":
        return values
    return ops.reshape(values, (1, -1) + (1,) * (rank - 2))


def fully_connected_int16(accumulator, input_scale, weight_scales, output_scale, bias):
    """The int16 output levels of LiteRT's 16x8 FULLY_CONNECTED for its exact integer `accumulator`
    (float64, bias included), the scales as float64 copies of the file's float32 ones.

    The op has two kernels, and which one runs depends on the bias. With a bias tensor (int64) every
    path requantizes in float64: `round(accumulator x (input scale x weight scale / output scale))`,
    half away from zero. The converter drops a bias that is all zeros (an untrained Dense's, or
    `use_bias=False`), and without one the default path runs ruy: an int32 sum, the per-tensor
    multiplier taken from the scales' float32 product, held in 31 bits and rounded twice, the second
    time ties up. The two differ by a step on about 0.2% of outputs.
    """
    in_float64 = fixed_point.round_half_away(accumulator * (input_scale * weight_scales / output_scale))
    per_tensor = len(weight_scales.shape) == 0 or int(weight_scales.shape[-1]) == 1
    if per_tensor:  # GetQuantizedConvolutionMultipler multiplies the two float32 scales in float32
        product = ops.cast(ops.cast(input_scale, "float32") * ops.cast(weight_scales, "float32"), "float64")
    else:
        product = input_scale * weight_scales
    by_ruy = fixed_point.multiply_wide_by_quantized_multiplier(
        fixed_point.wrap_int32(accumulator), product / output_scale, ties="up"
    )
    if bias is None:
        return by_ruy
    return ops.where(ops.any(ops.not_equal(bias, 0.0)), in_float64, by_ruy)


def multiply_int16(first, first_step, second, second_step, output_step):
    """The int16 output levels of LiteRT's 16x8 MUL of the int16 levels `first` and `second`
    (float64): their product times `first_step x second_step / output_step`, which its Prepare
    computes in float32, with the 31-bit fixed-point multiplier, rounded twice, clamped to int16.
    The steps are the file's float32 scales."""
    as_float32 = lambda step: ops.cast(step, "float32")  # noqa: E731
    multiplier = ops.cast(as_float32(first_step) * as_float32(second_step) / as_float32(output_step), "float64")
    levels = fixed_point.multiply_wide_by_quantized_multiplier(first * second, multiplier)
    return ops.clip(levels, -32768.0, 32767.0)


def add_int16(first, first_step, second, second_step, output_step):
    """The int16 output levels of LiteRT's 16x8 ADD (its default kernel) of the int16 levels
    `first` and `second` (float64): each input shifted left by 15 plus the exponent of its multiplier
    (`scale / (2 x the larger scale)`) and multiplied by that multiplier's 31-bit mantissa, rounded
    once; the sum scaled by `2 x the larger scale / (2^15 x output scale)` with the 31-bit
    multiplier, rounded twice. The reference kernel shifts by 15 and by the exponent separately,
    a step apart on a few outputs in a hundred thousand."""
    as_float32 = lambda step: ops.cast(step, "float32")  # noqa: E731
    twice_larger = 2.0 * ops.maximum(as_float32(first_step), as_float32(second_step))
    total = 0.0
    for levels, step in ((first, first_step), (second, second_step)):
        mantissa, exponent = fixed_point.quantized_multiplier(
            ops.cast(as_float32(step), "float64") / ops.cast(twice_larger, "float64")
        )
        shifted = levels * ops.power(2.0, 15.0 + exponent)
        total = total + fixed_point.multiply_wide_by_mantissa(shifted, mantissa, ops.zeros_like(exponent))
    output_multiplier = ops.cast(twice_larger, "float64") / ops.cast(32768.0 * as_float32(output_step), "float64")
    return ops.clip(fixed_point.multiply_wide_by_quantized_multiplier(total, output_multiplier), -32768.0, 32767.0)
