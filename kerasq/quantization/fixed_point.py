"""The fixed-point inverse square root of LiteRT's int8 RSQRT kernel, for the QAT model to mirror.

RSQRT on int8 computes, for the integer `v = q - zero_point` of each input, `d(v) = 2^20 / sqrt(v)`
with gemmlowp's Newton-Raphson iteration in 32-bit fixed point (`GetInvSqrtQuantizedMultiplierExp`),
then scales `d(v)` to the output. `d(v)` is off the exact value by up to 7 parts in a million, enough
to round a near-tie the other way: on a trained LayerNormalization 2.5% of the outputs came out one
step from the float computation. `RSQRT_TABLE[v]` holds `d(v) / 2^20` for v in 0..255 (v = 0, which
the kernel maps to its largest output, holds 1e30: above any range).

Example:
>>> from kerasq.quantization.fixed_point import RSQRT_TABLE
>>> float(RSQRT_TABLE[4])
0.5
>>> abs(float(RSQRT_TABLE[2]) * 2**0.5 - 1) < 1e-5
True
"""

import numpy as np

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
