"""SOFTMAX on int16 as LiteRT computes it, for the QAT model to mirror at 16x8.

LiteRT's int16 SOFTMAX works on integers throughout: each input level less the row's largest,
scaled by `input scale x beta / (10 / 65535)` with TFLite's 31-bit fixed-point multiplier (so
[-10, 0] spans the int16 range); exp from a 513-entry table with linear interpolation between
entries; the sum's reciprocal from a second table, of 1 / (1 + x), after normalising the sum to
[1, 2); and the product of the two rounded to the output's scale of 1/32768. The tables are built
in float32 as LiteRT builds them (each entry nudged by half its midpoint's interpolation error).
Computed in float, a softmax between Dense layers sat 4 output steps from its file; mirrored, a lone
softmax equals LiteRT's on 99.7-99.98% of its outputs and is one step off on the rest (a detail of
the kernel not found yet).

Example:
>>> import numpy as np
>>> from kerasq.quantization.int16_softmax import softmax
>>> levels = np.array([[0.0, -3277.0, -32767.0]])  # inputs 0, -1 and -10 at a scale of 1/3277
>>> [int(v) for v in np.asarray(softmax(levels, 1.0 / 3277.0))[0]]  # 32768 x (0.7311, 0.2689, 0.00003)
[23953, 8813, 1]
"""

import numpy as np
from keras import ops

from kerasq.quantization import fixed_point

_INT16_MIN, _INT16_MAX = -32768, 32767
_STEPS = 512


def _table(input_scale, input_zero_point, output_scale, transform):
    """LiteRT's `LUTPopulate<int16_t>`: 513 int16 entries of `transform` over the int16 input range,
    in float32 arithmetic, each nudged by half the rounding error of interpolating its midpoint."""
    f32 = np.float32
    input_scale, output_scale = f32(input_scale), f32(output_scale)
    input_min = input_scale * f32(_INT16_MIN - input_zero_point)
    input_max = input_scale * f32(_INT16_MAX - input_zero_point)
    output_min, output_max = output_scale * f32(_INT16_MIN), output_scale * f32(_INT16_MAX)
    step = (input_max - input_min) / f32(_STEPS)
    half_step = step / f32(2)
    scaling = f32(65536) / (output_max - output_min)
    table = np.empty(_STEPS + 1, np.int16)
    for i in range(_STEPS):
        value = transform(input_min + f32(i) * step)
        midpoint = transform(input_min + f32(i) * step + half_step)
        following = transform(input_min + f32(i + 1) * step)
        sample = _round(value * scaling)
        interpolated = _round(((following * scaling) + _round(value * scaling)) / f32(2))
        error = interpolated - _round(midpoint * scaling)
        table[i] = np.clip(sample - _round(error / f32(2)), _INT16_MIN, _INT16_MAX)
    table[_STEPS] = np.clip(_round(transform(input_max) * scaling), _INT16_MIN, _INT16_MAX)
    return table


def _round(x):
    """std::round on float32: half away from zero."""
    x = np.float32(x)
    return np.float32(np.sign(x) * np.floor(np.abs(x) + np.float32(0.5)))


_RANGE = _INT16_MAX - _INT16_MIN
EXP_TABLE = _table(10.0 / _RANGE, _INT16_MAX, 2.0 / _RANGE, lambda v: np.exp(np.float32(v), dtype=np.float32))
RECIPROCAL_TABLE = _table(
    1.0 / _RANGE, _INT16_MIN, 2.0 / _RANGE, lambda v: np.float32(1.0) / (np.float32(1.0) + np.float32(v))
)


def _lookup(value, table):
    """LiteRT's `LUTLookup`: the table entry for the top 9 bits of the int16 `value`, plus the
    slope to the next entry times its low 7 bits, rounded (ties up)."""
    index = ops.floor(value / 128.0)
    offset = value - index * 128.0
    index = ops.cast(index + 256.0, "int32")
    base = ops.cast(ops.take(table, index), "float64")
    slope = ops.cast(ops.take(table, index + 1), "float64") - base
    return base + ops.floor((slope * offset + 64.0) / 128.0)


def softmax(levels, input_scale, beta=1.0):
    """The int16 output levels (scale 1/32768) of LiteRT's SOFTMAX over the last axis for int16
    input `levels` (less the zero point, 0 at 16 bits) with `input_scale`, as float64."""
    levels = ops.cast(levels, "float64")
    difference = levels - ops.max(levels, axis=-1, keepdims=True)
    # input scale x beta in float32, as the kernel multiplies them, over 10 / 65535 in float64.
    multiplier = ops.cast(ops.cast(input_scale, "float32") * beta, "float64") / (10.0 / 65535.0)
    scaled = fixed_point.multiply_by_quantized_multiplier(difference, multiplier)
    exps = _lookup(ops.clip(scaled + 32767.0, _INT16_MIN, _INT16_MAX), ops.convert_to_tensor(EXP_TABLE, "int32"))
    total = ops.sum(exps, axis=-1, keepdims=True)
    # The sum's leading zeros as a uint32 (it is positive: the largest input's exp is 32767).
    bits = ops.floor(ops.log2(total)) + 1.0
    bits = ops.where(ops.power(2.0, bits - 1.0) > total, bits - 1.0, ops.where(ops.power(2.0, bits) <= total, bits + 1.0, bits))
    headroom_plus_one = 32.0 - bits
    shifted = ops.floor((total * ops.power(2.0, headroom_plus_one - 1.0) + 2.0**13) / 2.0**14)
    centred = ops.clip(shifted - (2.0**15 + 2.0**16), _INT16_MIN, _INT16_MAX)
    reciprocal = _lookup(centred, ops.convert_to_tensor(RECIPROCAL_TABLE, "int32"))
    right_shift = 31.0 - headroom_plus_one
    result = ops.floor((exps * reciprocal + ops.power(2.0, right_shift - 1.0)) * ops.power(2.0, -right_shift))
    return ops.clip(result, 0.0, 32767.0)
