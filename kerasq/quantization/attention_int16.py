"""MultiHeadAttention as LiteRT's 16x8 kernels compute it, for the QAT model at inference.

The file holds the int8 scheme's ops (`kerasq.quantization.attention`) with int16 tensors between
them, and their integer arithmetic lands up to a few steps from float arithmetic rounded to the
same ranges:
- each projection is a 16x8 FULLY_CONNECTED (`requantization.fully_connected_int16`), its bias the
  int64 one the converter rounds (input scale x weight scale, in float64, half away from zero);
- each BATCH_MATMUL sums int16 products in int64 and scales the sum with the 15-bit multiplier of
  the 16x8 kernels (`fixed_point.multiply_wide_accumulator`), the operands' float32 scales
  multiplied in float32;
- SOFTMAX is `int16_softmax.softmax`, its output at scale 1/32768.
`attention.MultiHeadAttentionHandler` uses these, and for a gate's int16 LOGISTIC (a table of
LiteRT's own) the exact sigmoid rounded to its output, within a step.
"""

from keras import ops

from kerasq.quantization import fixed_point, requantization

PROBABILITY_STEP = 1.0 / 32768.0
_INT16_MIN, _INT16_MAX = -32768.0, 32767.0


def projection(levels, steps, dense, weight_quantizer, bound, scale=None):
    """The int16 output levels of the EinsumDense `dense` run as one 16x8 FULLY_CONNECTED.

    `levels`: its input's int16 levels; `steps`: `(input file scale, input scale in float64 as the
    converter takes it for the bias, output file scale)`; the kernel is flattened over its first
    `bound` axes, multiplied by `scale` and fake-quantized with one scale, as the export trace
    does."""
    input_step, input_bias_step, output_step = steps
    out_shape = tuple(dense.kernel.shape[bound:])
    kernel = ops.reshape(dense.kernel, (-1, _size(out_shape)))
    bias = None if dense.bias is None else ops.reshape(dense.bias, (-1,))
    if scale is not None:
        kernel = kernel * scale
        bias = None if bias is None else bias * scale
    quantized = weight_quantizer(kernel)
    weight_step = requantization.kernel_steps(weight_quantizer, quantized, None)
    accumulator = ops.matmul(
        ops.reshape(levels, (-1, kernel.shape[0])), requantization.file_levels(quantized, weight_step)
    )
    if bias is not None:
        bias_step = input_bias_step * ops.cast(weight_step, "float64")
        accumulator = accumulator + fixed_point.round_half_away(ops.cast(bias, "float64") / bias_step)
    out = requantization.fully_connected_int16(
        accumulator, *(requantization.file_scale(step) for step in (input_step, weight_step, output_step)), bias
    )
    out = ops.clip(out, _INT16_MIN, _INT16_MAX)
    return ops.reshape(out, (-1,) + tuple(levels.shape[1:len(levels.shape) - bound]) + out_shape)


def batch_matmul(equation, a, a_step, b, b_step, out_step):
    """int16 BATCH_MATMUL of the levels `a` and `b`: the exact sum, times `a_step x b_step /
    out_step` (the first product in float32) with the 15-bit multiplier, clamped to int16."""
    integers = ops.einsum(equation, a, b)
    product = ops.cast(ops.cast(a_step, "float32") * ops.cast(b_step, "float32"), "float64")
    multiplier = product / requantization.file_scale(out_step)
    return ops.clip(fixed_point.multiply_wide_accumulator(integers, multiplier), _INT16_MIN, _INT16_MAX)


def _size(shape):
    size = 1
    for dim in shape:
        size *= dim
    return size
