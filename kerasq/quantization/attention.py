"""MultiHeadAttention as TFLite's int8 kernels run it.

The file holds, per attention layer: three FULLY_CONNECTED projections (query, key, value), a
BATCH_MATMUL for the scores, a SOFTMAX (output scale 1/256, zero point -128), a BATCH_MATMUL for
the context and a FULLY_CONNECTED output projection, with int8 tensors between them. The QAT model
computes the same ops with the layer's own weights and rounds every one of those tensors to its own
learned range; at inference the BATCH_MATMULs scale their integer sums to the output as LiteRT's
kernel does (`fixed_point.multiply_by_quantized_multiplier`), rounding twice. The 1/sqrt(key_dim) scaling is folded into the query projection (weights and bias),
so no separate op rounds in between: in float it is the same product.

Attention with masks (`attention_mask`, `use_causal_mask`, Keras masks), scores returned, custom
`attention_axes` or inputs of another rank than (batch, sequence, features) runs in float between
the quantized layers around it.

Example:
>>> import keras, kerasq
>>> inputs = keras.Input((6, 8))
>>> attended = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)(inputs, inputs)
>>> qat = kerasq.quantize_model(keras.Model(inputs, attended))
>>> sorted(qat.layers[-1].quantization_ranges())
['context', 'key', 'output', 'query', 'scores', 'value']
"""

from keras import layers, ops

from kerasq.quantization.fixed_point import multiply_by_quantized_multiplier
from kerasq.quantization.handlers import QUANTIZE, UNIT_RANGE, LayerHandler, register_handler
from kerasq.quantization.quantizers import is_tracing_for_export

_RANGES = ("query", "key", "value", "scores", "context")


class MultiHeadAttentionHandler(LayerHandler):
    """Self- and cross-attention on (batch, sequence, features) inputs, fully int8."""

    def __init__(self):
        super().__init__(output=QUANTIZE)

    def intermediate_ranges(self, layer):
        return _RANGES if _simulated(layer) else ()

    def run_simulated(self, layer, simulation, query, value, key=None, **kwargs):
        training = kwargs.pop("training", simulation.training)
        masked = any(getattr(x, "_keras_mask", None) is not None for x in (query, value, key))
        if masked or any(v is not None and v is not False for v in kwargs.values()):
            return layer(query, value, key, training=training, **kwargs)  # runs in float
        key = value if key is None else key
        scale = layer._inverse_sqrt_key_dim
        q = _projection(layer._query_dense, query, simulation, scale)
        k = _projection(layer._key_dense, key, simulation)
        v = _projection(layer._value_dense, value, simulation)
        q = simulation.activation("query", q)  # (batch, target, heads, key_dim)
        k = simulation.activation("key", k)  # (batch, source, heads, key_dim)
        v = simulation.activation("value", v)  # (batch, source, heads, value_dim)
        scores = _batch_matmul(simulation, _SCORES, q, "query", k, "key", "scores")
        probabilities = simulation.fixed(ops.softmax(scores, axis=-1), UNIT_RANGE)
        probabilities = layer._dropout_layer(probabilities, training=training)
        context = _batch_matmul(simulation, _CONTEXT, probabilities, UNIT_RANGE, v, "value", "context")
        context = ops.reshape(context, (-1, context.shape[1], context.shape[2] * context.shape[3]))
        return _projection(layer._output_dense, context, simulation)


def _simulated(layer):
    """True for attention over the sequence axis of rank-3 inputs, the output back in the query's
    features: what `run_simulated` reproduces."""
    built = getattr(layer, "_query_dense", None) is not None and layer._query_dense.built
    axes = getattr(layer, "_attention_axes", None)
    return built and tuple(axes or (1,)) == (1,) and layer._query_dense.equation == "abc,cde->abde" and (
        layer._output_dense.equation == "abcd,cde->abe"
    )


_SCORES = "abhd,achd->ahbc"  # (batch, heads, target, source)
_CONTEXT = "ahbc,achd->abhd"  # (batch, target, heads, value_dim)


def _batch_matmul(simulation, equation, a, a_range, b, b_range, out_range):
    """`einsum(equation, a, b)` rounded to `out_range`, as int8 BATCH_MATMUL computes it at
    inference: the integer sum of the int8 operands (exact in float32 below 2^24), scaled to the
    output's step by LiteRT's fixed-point multiplier. Ranges are names of learned ones or a fixed
    range. Training, where the softmax output is not rounded (see `ActivationQuantizer`), keeps the
    float product. One einsum costs less than the transposes the export trace puts around a matmul
    for the converter."""
    if is_tracing_for_export():
        if equation == _SCORES:
            product = ops.matmul(ops.transpose(a, (0, 2, 1, 3)), ops.transpose(b, (0, 2, 3, 1)))
            return simulation.activation(out_range, product)
        product = simulation.activation(out_range, ops.matmul(a, ops.transpose(b, (0, 2, 1, 3))))
        return ops.transpose(product, (0, 2, 1, 3))
    product = ops.einsum(equation, a, b)
    if not simulation.training and simulation.mirrors_int8_kernels:
        a_step, b_step, out_step = (_step(simulation, r) for r in (a_range, b_range, out_range))
        integers = ops.einsum(equation, ops.round(a / a_step), ops.round(b / b_step))
        # As TFLite computes it: the input scales' product in float32, divided in float64.
        multiplier = ops.cast(a_step * b_step, "float64") / ops.cast(out_step, "float64")
        product = ops.cast(multiply_by_quantized_multiplier(integers, multiplier), "float32") * out_step
    return simulation.activation(out_range, product)


def _step(simulation, named_or_fixed):
    if isinstance(named_or_fixed, str):
        return simulation.step(named_or_fixed)
    low, high = named_or_fixed
    return ops.convert_to_tensor((high - low) / 255.0, "float32")


def _projection(dense, x, simulation, scale=None):
    """An EinsumDense of attention as one FULLY_CONNECTED: its kernel flattened to 2D (one weight
    scale, as for Dense), times `scale` when given, applied to the flattened sequence."""
    kernel, bias = dense.kernel, dense.bias
    out_shape = tuple(kernel.shape[kernel.ndim - (2 if dense.equation.startswith("abc,") else 1):])
    kernel = ops.reshape(kernel, (-1, _size(out_shape)))
    if scale is not None:
        kernel = kernel * scale
    outputs = ops.matmul(ops.reshape(x, (-1, kernel.shape[0])), simulation.weight(kernel))
    if bias is not None:
        bias = ops.reshape(bias, (-1,))
        outputs = outputs + (bias * scale if scale is not None else bias)
    return ops.reshape(outputs, (-1, x.shape[1]) + out_shape)


def _size(shape):
    size = 1
    for dim in shape:
        size *= dim
    return size


register_handler(layers.MultiHeadAttention, MultiHeadAttentionHandler())
