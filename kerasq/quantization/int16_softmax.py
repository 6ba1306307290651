"""SOFTMAX on int16 as LiteRT computes it, for the QAT model to mirror at 16x8.

LiteRT's int16 SOFTMAX works on integers throughout: each input level less the row's largest,
scaled by `input scale x beta / (10 / 65535)` with TFLite's 31-bit fixed-point multiplier (so
[-10, 0] spans the int16 range); exp from a 513-entry table with linear interpolation between
entries; the sum's reciprocal from a second table, of 1 / (1 + x), after normalising the sum to
[1, 2); and the product of the two rounded to the output's scale of 1/32768. The tables are built
as LiteRT builds them (in float64, each entry nudged by half its midpoint's interpolation error).
Computed in float, a softmax between Dense layers sat 4 output steps from its file; mirrored, a lone
softmax equals LiteRT's on every output tried (8,000-128,000 values, rows of 3 to 64).

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


def _table(function, input_min, input_max):
    """LiteRT's `gen_lut` for int16 SOFTMAX: 513 entries of `function` over [input_min, input_max],
    in float64, scaled by 32768 (an output range of [-1, 1]), each nudged by half the rounding
    error of interpolating its midpoint."""
    scaling = 65536.0 / 2.0
    step = (input_max - input_min) / _STEPS
    table = np.empty(_STEPS + 1, np.int16)
    for i in range(_STEPS):
        value = function(input_min + i * step)
        midpoint = function(input_min + i * step + step / 2)
        following = function(input_min + (i + 1) * step)
        interpolated = _round((following * scaling + _round(value * scaling)) / 2)
        error = interpolated - _round(midpoint * scaling)
        table[i] = np.clip(_round(value * scaling) - _round(error / 2), _INT16_MIN, _INT16_MAX)
    table[_STEPS] = np.clip(_round(function(input_max) * scaling), _INT16_MIN, _INT16_MAX)
    return table


def _round(x):
    """TfLiteRound: half away from zero."""
    return float(np.sign(x) * np.floor(abs(x) + 0.5))


EXP_TABLE = _table(np.exp, -10.0, 0.0)
RECIPROCAL_TABLE = _table(lambda v: 1.0 / (1.0 + v), 0.0, 1.0)


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
