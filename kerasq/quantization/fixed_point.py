"""The fixed-point arithmetic of LiteRT's integer kernels, for the QAT model to mirror.

`multiply_by_quantized_multiplier` is how BATCH_MATMUL and RSQRT (which XNNPACK does not run) scale
their integer results to the output: the real multiplier held as 31 bits and a shift, the product
rounded to an integer, then rounded again by the shift. Rounding twice puts a value within
2^-shift of a step of a tie on the other side of it: 0.2-0.6% of a small transformer's attention
scores, context and inverse deviations, one step each, where a float multiplication rounds once.

RSQRT on int8 computes, for the integer `v = q - zero_point` of each input, `d(v) = 2^20 / sqrt(v)`
with gemmlowp's Newton-Raphson iteration in 32-bit fixed point (`GetInvSqrtQuantizedMultiplierExp`),
then scales `d(v)` to the output. `d(v)` is off the exact value by up to 7 parts in a million, enough
to round a near-tie the other way: on a trained LayerNormalization 2.5% of the outputs came out one
step from the float computation. `RSQRT_TABLE[v]` holds `d(v) / 2^20` for v in 0..255 (v = 0, which
the kernel maps to its largest output, holds 1e30: above any range); `d(v)` is then scaled to the
output with `multiply_by_quantized_multiplier`.

Example:
>>> from kerasq.quantization.fixed_point import RSQRT_TABLE
>>> float(RSQRT_TABLE[4])
0.5
>>> abs(float(RSQRT_TABLE[2]) * 2**0.5 - 1) < 1e-5
True
>>> from kerasq.quantization.fixed_point import multiply_by_quantized_multiplier
>>> import numpy as np
>>> # 8 x 0.3 = 2.4 rounds to 2; TFLite (0.3 = 0.6 x 2^-1) rounds 4.8 to 5, then 5 / 2 to 3.
>>> [float(v) for v in multiply_by_quantized_multiplier(np.array([8.0, -8.0]), 0.3)]
[3.0, -3.0]
"""

import numpy as np
from keras import ops

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _doubling_high_mul(a, b):
    """gemmlowp's SaturatingRoundingDoublingHighMul."""
    if a == b == _INT32_MIN:
        return _INT32_MAX
    product = a * b
    nudged = product + ((1 << 30) if product >= 0 else 1 - (1 << 30))
    return abs(nudged) // (1 << 31) * (1 if nudged >= 0 else -1)  # C++ division truncates


def _rounding_divide_by_pot(x, exponent):
    mask = (1 << exponent) - 1
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if (x & mask) > threshold else 0)


def _saturating_shift_left(x, exponent):
    threshold = (1 << (31 - exponent)) - 1
    return _INT32_MAX if x > threshold else _INT32_MIN if x < -threshold else x << exponent


def _wrap(x):
    return (x + 2**31) % 2**32 - 2**31


def _inverse_sqrt_multiplier(value):
    """`(multiplier, left shift)` with multiplier x 2^shift / 2^31 = 1 / sqrt(value)."""
    if value <= 1:
        return _INT32_MAX, 0
    shift = 11
    while value >= 1 << 29:
        value //= 4
        shift += 1
    pairs = (32 - value.bit_length() - 1) // 2 - 1
    shift -= pairs
    value <<= 2 * pairs
    half_input = _rounding_divide_by_pot(value >> 1, 1)
    half_three, x = (1 << 28) + (1 << 27), 1 << 28  # 1.5 and 1.0 with 3 integer bits
    for _ in range(5):
        cube = _saturating_shift_left(_doubling_high_mul(_doubling_high_mul(x, x), x), 6)
        x = _saturating_shift_left(_wrap(_doubling_high_mul(half_three, x) - _doubling_high_mul(half_input, cube)), 3)
    x = _doubling_high_mul(x, 1518500250)  # sqrt(2) / 2
    if shift < 0:
        x, shift = x << -shift, 0
    return x, -shift


def _multiply_by_quantized_multiplier(x, multiplier, shift):
    left, right = max(shift, 0), max(-shift, 0)
    return _rounding_divide_by_pot(_doubling_high_mul(x * (1 << left), multiplier), right)


def _rsqrt_table():
    table = [1e30]
    for value in range(1, 256):
        multiplier, shift = _inverse_sqrt_multiplier(value)
        table.append(_multiply_by_quantized_multiplier(1, multiplier, shift + 20) / 2.0**20)
    return np.asarray(table, np.float32)


RSQRT_TABLE = _rsqrt_table()


def multiply_by_quantized_multiplier(x, multiplier):
    """`x x multiplier` rounded as TFLite's `MultiplyByQuantizedMultiplier` rounds it, for integers
    `x` (|x| < 2^22) and a positive `multiplier`, elementwise in float64 (where every step is exact).

    TFLite holds the multiplier as `m x 2^e` with `m` in [0.5, 1) rounded to 31 bits; it rounds
    `x x m x 2^31 x 2^max(e, 0)` / 2^31 to an integer (ties up), then divides that by 2^max(-e, 0),
    rounding ties away from zero."""
    x = ops.cast(x, "float64")
    mantissa, exponent = quantized_multiplier(multiplier)
    high = ops.floor(x * mantissa * ops.power(2.0, ops.maximum(exponent, 0.0) - 31.0) + 0.5)
    shifted = high * ops.power(2.0, ops.minimum(exponent, 0.0))
    return ops.sign(shifted) * ops.floor(ops.abs(shifted) + 0.5)


def multiply_wide_by_quantized_multiplier(x, multiplier, ties="away"):
    """`multiply_by_quantized_multiplier` exact for integers |x| < 2^31 (the int32 sums of 16-bit
    values, as MEAN's), the 62-bit product taken in halves. `ties="up"` rounds the final shift's
    ties up, as the builtin 16x8 FULLY_CONNECTED (ruy) does."""
    mantissa, exponent = quantized_multiplier(multiplier)
    return multiply_wide_by_mantissa(x, mantissa, exponent, ties)


def multiply_wide_by_mantissa(x, mantissa, exponent, ties="away"):
    """`multiply_wide_by_quantized_multiplier` for a multiplier already held as a 31-bit integer
    `mantissa` (any below 2^31) and `exponent`: `mantissa x 2^(exponent - 31)`."""
    x = ops.cast(x, "float64") * ops.power(2.0, ops.maximum(exponent, 0.0))
    # gemmlowp's SaturatingRoundingDoublingHighMul: (x m + nudge) / 2^31, truncated toward zero.
    high = _floor_of_scaled(ops.abs(x), mantissa, 31.0, 2.0**30 - ops.cast(x < 0.0, "float64"))
    shifted = ops.sign(x) * high * ops.power(2.0, ops.minimum(exponent, 0.0))
    if ties == "up":
        return ops.floor(shifted + 0.5)
    return ops.sign(shifted) * ops.floor(ops.abs(shifted) + 0.5)


def _floor_of_scaled(magnitude, mantissa, shift, add):
    """floor((magnitude x mantissa + add) / 2^shift), exact in float64 for integers magnitude and
    mantissa below 2^31, 0 <= add < 2^shift and 16 <= shift <= 51: the mantissa is split into its
    high and low 16 bits so each partial product has at most 47 bits."""
    shift = ops.cast(shift, "float64")
    high = ops.floor(mantissa / 2.0**16)
    low = mantissa - high * 2.0**16
    upper, lower = magnitude * high, magnitude * low
    below = ops.power(2.0, shift - 16.0)
    upper_high = ops.floor(upper / below)
    return upper_high + ops.floor(((upper - upper_high * below) * 2.0**16 + lower + add) * ops.power(2.0, -shift))


def round_half_away(x):
    """C's `round` of float64 values: to the nearest integer, ties away from zero. Exact where
    `floor(|x| + 0.5)` is not: just below one half, that sum rounds up to 1."""
    magnitude = ops.abs(x)
    whole = ops.floor(magnitude)
    return ops.sign(x) * (whole + ops.cast(magnitude - whole >= 0.5, whole.dtype))


def wrap_int32(x):
    """Integers `x` (float64) wrapped to int32 as a 32-bit accumulator wraps them."""
    return x - ops.floor((x + 2.0**31) / 2.0**32) * 2.0**32


def multiply_wide_accumulator(x, multiplier):
    """`x x multiplier` rounded as the int64 `MultiplyByQuantizedMultiplier` of LiteRT's 16x8
    CONV_2D, DEPTHWISE_CONV_2D and TRANSPOSE_CONV rounds it, for integers `x` (|x| < 2^37), in
    float64: the 31-bit mantissa rounded to its top 15 bits (capped at 2^15 - 1), the product
    shifted right by 15 - e with ties rounded up."""
    x = ops.cast(x, "float64")
    mantissa, exponent = quantized_multiplier(multiplier)
    reduced = ops.where(mantissa < 2147418112.0, ops.floor((mantissa + 2.0**15) / 2.0**16), 2.0**15 - 1.0)
    shift = 15.0 - exponent
    return ops.floor((x * reduced + ops.power(2.0, shift - 1.0)) * ops.power(2.0, -shift))


def mean_multiplier(multiplier, count):
    """`(mantissa, exponent)` with which LiteRT's quantized MEAN scales a sum of `count` values:
    `quantized_multiplier(multiplier)` with the mantissa shifted left by floor(log2(count)) (at most
    32, and at most 31 + exponent) and divided by `count` in integers, truncating, and the exponent
    lowered by the same shift. Exact for counts below 2^21."""
    mantissa, exponent = quantized_multiplier(multiplier)
    shift = ops.minimum(ops.minimum(float(np.floor(np.log2(count))), 32.0), 31.0 + exponent)
    return ops.floor(mantissa * ops.power(2.0, shift) / float(count)), exponent - shift


def quantized_multiplier(multiplier):
    """TFLite's `QuantizeMultiplier`: `(mantissa, exponent)` as float64 arrays with `multiplier =
    mantissa x 2^(exponent - 31)` and the mantissa a 31-bit integer in [2^30, 2^31)."""
    if isinstance(multiplier, (float, np.floating, np.ndarray)):
        multiplier = np.asarray(multiplier, np.float64)  # a Python float would become a float32 tensor
    multiplier = ops.cast(multiplier, "float64")
    exponent = ops.floor(ops.log2(multiplier)) + 1.0
    fraction = multiplier * ops.power(2.0, -exponent)
    # log2 can land on the wrong side of a power of two: bring the fraction into [0.5, 1).
    exponent = ops.where(fraction >= 1.0, exponent + 1.0, ops.where(fraction < 0.5, exponent - 1.0, exponent))
    mantissa = ops.floor(multiplier * ops.power(2.0, 31.0 - exponent) + 0.5)
    carried = mantissa >= 2.0**31
    return ops.where(carried, mantissa / 2.0, mantissa), ops.where(carried, exponent + 1.0, exponent)
