"""The float64 mirrors of LiteRT's integer arithmetic against the same arithmetic on Python integers."""

import math

import numpy as np
import pytest

from kerasq.quantization import fixed_point, requantization

RNG = np.random.default_rng(7)


def _quantized_multiplier(real):
    """TFLite's QuantizeMultiplier on Python numbers: (31-bit mantissa, exponent)."""
    fraction, exponent = math.frexp(real)
    mantissa = math.floor(fraction * 2**31 + 0.5)  # std::round; no tie can occur at 53 bits -> 31
    if mantissa == 2**31:
        mantissa, exponent = mantissa // 2, exponent + 1
    return mantissa, exponent


def _high_mul_away(a, b):
    """gemmlowp's SaturatingRoundingDoublingHighMul (no saturation case here)."""
    product = a * b
    nudged = product + (2**30 if product >= 0 else 1 - 2**30)
    return abs(nudged) // 2**31 * (1 if nudged >= 0 else -1)


def _ruy_multiply(x, real):
    """ruy's MultiplyByQuantizedMultiplier: the high multiply, then a right shift rounding ties up."""
    mantissa, exponent = _quantized_multiplier(real)
    high = _high_mul_away(x * 2 ** max(exponent, 0), mantissa)
    right = max(-exponent, 0)
    return (high + (1 << (right - 1))) >> right if right else high


def _wide_accumulator_multiply(x, real):
    """LiteRT's int64 MultiplyByQuantizedMultiplier: the mantissa cut to 15 bits, one shift, ties up."""
    mantissa, exponent = _quantized_multiplier(real)
    reduced = (mantissa + (1 << 15)) >> 16 if mantissa < 0x7FFF0000 else 0x7FFF
    shift = 15 - exponent
    return (x * reduced + (1 << (shift - 1))) >> shift


def _integers(count, bound):
    values = RNG.integers(-bound, bound, size=count)
    return np.concatenate([values, [0, 1, -1, bound - 1, -bound]]).astype(np.int64)


@pytest.mark.parametrize("real", [0.0027768027, 0.3, 0.999999, 1.7, 3.1e-5])
def test_the_wide_multiply_rounds_as_ruy_does(real):
    x = _integers(5000, 2**31 - 1 if real < 1 else 2**29)
    mirrored = np.asarray(fixed_point.multiply_wide_by_quantized_multiplier(x.astype("float64"), real, ties="up"))
    expected = np.array([_ruy_multiply(int(v), real) for v in x], dtype=np.float64)
    np.testing.assert_array_equal(mirrored, expected)


@pytest.mark.parametrize("real", [0.0027768027, 0.3, 0.999999, 3.1e-5])
def test_the_15_bit_multiply_rounds_as_the_int64_kernels_do(real):
    x = _integers(5000, 2**37)
    mirrored = np.asarray(fixed_point.multiply_wide_accumulator(x.astype("float64"), real))
    expected = np.array([_wide_accumulator_multiply(int(v), real) for v in x], dtype=np.float64)
    np.testing.assert_array_equal(mirrored, expected)


def test_round_half_away_is_cs_round_even_just_below_a_half():
    below_half = np.nextafter(0.5, 0.0)  # floor(x + 0.5) makes 1 of it
    values = np.array([below_half, -below_half, 0.5, -0.5, 1.5, -2.5, 2.4999999, 1e15 + 0.5, 3.0])
    np.testing.assert_array_equal(
        np.asarray(fixed_point.round_half_away(values)), [0.0, -0.0, 1.0, -1.0, 2.0, -3.0, 2.0, 1e15 + 1, 3.0]
    )


def test_wrap_int32_wraps_as_a_32_bit_sum_does():
    x = _integers(2000, 2**40)
    expected = (x + 2**31) % 2**32 - 2**31
    np.testing.assert_array_equal(np.asarray(fixed_point.wrap_int32(x.astype("float64"))), expected)


def test_a_fully_connected_without_a_bias_rounds_by_ruy_and_with_one_in_float64():
    """Without a bias tensor ruy rounds twice; with one, LiteRT rounds once in float64. Both agree
    away from ties, and a large enough sample has near-ties where they part."""
    accumulator = _integers(20000, 2**24).astype("float64")
    scales = [np.float64(np.float32(s)) for s in (9.53e-05, 2.78e-03, 9.55e-05)]
    without = np.asarray(requantization.fully_connected_int16(accumulator, *scales, None))
    with_bias = np.asarray(requantization.fully_connected_int16(accumulator, *scales, np.ones(1)))
    real = np.float64(np.float32(np.float32(scales[0]) * np.float32(scales[1]))) / scales[2]
    np.testing.assert_array_equal(without, [_ruy_multiply(int(v), real) for v in accumulator])
    in_float64 = accumulator * (scales[0] * scales[1] / scales[2])
    np.testing.assert_array_equal(with_bias, np.sign(in_float64) * np.floor(np.abs(in_float64) + 0.5))
    assert 0 < np.mean(without != with_bias) < 0.01


def _rounding_divide_by_pot(x, exponent):
    mask = (1 << exponent) - 1
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if (x & mask) > threshold else 0)


@pytest.mark.parametrize("real, count", [(1.49, 12), (0.7, 36), (1.0, 64), (2.3, 7), (0.01, 1000)])
def test_the_mean_multiplier_divides_the_mantissa_as_litert_does(real, count):
    mantissa, exponent = _quantized_multiplier(real)
    shift = min(int(math.floor(math.log2(count))), 32, 31 + exponent)
    reduced, reduced_exponent = (mantissa << shift) // count, exponent - shift
    x = _integers(3000, 32767 * count)
    expected = [_rounding_divide_by_pot(_high_mul_away(int(v) * 2 ** max(reduced_exponent, 0), reduced),
                                        max(-reduced_exponent, 0)) for v in x]
    m, e = fixed_point.mean_multiplier(np.float64(real), count)
    assert (float(m), float(e)) == (reduced, reduced_exponent)
    mirrored = np.asarray(fixed_point.multiply_wide_by_mantissa(x.astype("float64"), m, e))
    np.testing.assert_array_equal(mirrored, np.array(expected, dtype=np.float64))
