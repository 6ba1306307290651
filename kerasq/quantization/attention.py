"""MultiHeadAttention as TFLite's int8 kernels run it.

The file holds, per attention layer: three FULLY_CONNECTED projections (query, key, value), a
BATCH_MATMUL for the scores, a SOFTMAX (output scale 1/256, zero point -128), a BATCH_MATMUL for
the context and a FULLY_CONNECTED output projection, with int8 tensors between them. The QAT model
computes the same ops with the layer's own weights and rounds every one of those tensors to its own
learned range; at inference the BATCH_MATMULs scale their integer sums to the output as LiteRT's
kernel does (`fixed_point.multiply_by_quantized_multiplier`), rounding twice. The 1/sqrt(key_dim)
scaling is folded into the query projection (weights and bias), so no separate op rounds in between:
in float it is the same product.

A mask (`attention_mask`, `use_causal_mask`, the Keras masks of the inputs, a sliding window) is a
SELECT_V2 between the scores and the SOFTMAX, as in TFLite's post-training int8 file: a masked score
becomes the lowest value of the scores' int8 range (-128), so it keeps the small weight
exp(lowest - row maximum) that the int8 SOFTMAX gives it, which the QAT model trains with. Attention
over other axes (`attention_axes`, inputs of rank 4 or more) transposes and reshapes the projected query,
key and value so that the attended axes form one sequence and the others join the batch: the same
BATCH_MATMULs and one SOFTMAX over all attended positions, with int8 TRANSPOSE and RESHAPE ops
around them. `return_attention_scores=True` returns the SOFTMAX's int8 output (scale 1/256) as well.
A mask over other axes is broadcast as Keras broadcasts it to the scores (batch, <other axes>,
heads, <attended target axes>, <attended source axes>) and flattened as the scores are; one that
differs along the other axes but not the batch selects from the scores with the other axes apart
(an int8 RESHAPE on either side of the SELECT_V2). A gate (`use_gate=True`) is a FULLY_CONNECTED,
a LOGISTIC and a MUL on the context.

Example:
>>> import keras, kerasq
>>> inputs = keras.Input((6, 8))
>>> attended = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)(inputs, inputs)
>>> qat = kerasq.quantize_model(keras.Model(inputs, attended))
>>> sorted(qat.layers[-1].quantization_ranges())
['context', 'key', 'output', 'query', 'scores', 'value']
"""

import keras
from keras import layers, ops

from kerasq.quantization import attention_int16, int16_softmax, requantization
from kerasq.quantization.fixed_point import multiply_by_quantized_multiplier
from kerasq.quantization.handlers import (
    QUANTIZE,
    UNIT_RANGE,
    LayerHandler,
    activation_name,
    file_step,
    register_handler,
)
from kerasq.quantization.quantizers import is_calibrating, is_tracing_for_export

_RANGES = ("query", "key", "value", "scores", "context")


class MultiHeadAttentionHandler(LayerHandler):
    """Self- and cross-attention, masked or not, over any attention axes, fully int8."""

    reads_operand_ranges = True

    def __init__(self):
        super().__init__(output=QUANTIZE)

    def operands(self, query, value=None, key=None, **kwargs):
        return (query, value, key)

    def intermediate_ranges(self, layer):
        if not _simulated(layer):
            return ()
        return _RANGES + (("gate", "gated") if layer._use_gate else ())

    def run_simulated(self, layer, simulation, query, value, key=None, **kwargs):
        training = kwargs.pop("training", simulation.training)
        return_scores = bool(kwargs.pop("return_attention_scores", False))
        arguments = dict(attention_mask=kwargs.pop("attention_mask", None),
                         use_causal_mask=bool(kwargs.pop("use_causal_mask", False)))
        # Keras fills each `<input>_mask` from its input's Keras mask; key's only when key is given.
        for name, tensor in (("query", query), ("value", value), ("key", key)):
            arguments[name + "_mask"] = kwargs.pop(name + "_mask", None)
            if arguments[name + "_mask"] is None and tensor is not None:
                arguments[name + "_mask"] = getattr(tensor, "_keras_mask", None)
        masked = any(v is not None and v is not False for v in arguments.values())
        masked = masked or getattr(layer, "_sliding_window", None) is not None
        if kwargs:
            return layer(query, value, key, training=training, return_attention_scores=return_scores,
                         **arguments, **kwargs)  # runs in float
        mask = None
        if masked:
            mask = layer._compute_attention_mask(
                query, value, query_mask=arguments["query_mask"], value_mask=arguments["value_mask"],
                key_mask=arguments["key_mask"], attention_mask=arguments["attention_mask"],
                use_causal_mask=arguments["use_causal_mask"],
            )
        if simulation.mirrors_int16_kernels:
            outputs = _attend_like_int16_kernels(layer, simulation, query, value, key, mask, return_scores)
            if outputs is not None:
                return outputs
        key = value if key is None else key
        q = simulation.activation("query", _projection(layer._query_dense, query, simulation, 1,
                                                       layer._inverse_sqrt_key_dim))
        k = simulation.activation("key", _projection(layer._key_dense, key, simulation, 1))
        v = simulation.activation("value", _projection(layer._value_dense, value, simulation, 1))
        layout, source = _Layout(layer._attention_axes, q.shape), _Layout(layer._attention_axes, k.shape)
        q = layout.to_sequence(q)  # (batch x other axes, target, heads, key_dim)
        k, v = source.to_sequence(k), source.to_sequence(v)  # (batch x other axes, source, heads, size)
        scores = _batch_matmul(simulation, _SCORES, q, "query", k, "key", "scores")
        if mask is not None:
            mask, groups = layout.mask(mask, source)
            scores = _masked(simulation, scores, mask, groups)
        probabilities = simulation.fixed(ops.softmax(scores, axis=-1), UNIT_RANGE)
        if mask is not None and (return_scores or layer._dropout > 0.0 or not layout.plain):
            # Keras's masked softmax, which it runs here rather than its fused attention (always over
            # other axes), zeroes the masked weights (a query masked throughout attends to nothing):
            # one SELECT_V2 more.
            probabilities = simulation.fixed(_grouped(ops.where, groups, mask, probabilities, 0.0), UNIT_RANGE)
        dropped = layer._dropout_layer(probabilities, training=training)
        context = _batch_matmul(simulation, _CONTEXT, dropped, UNIT_RANGE, v, "value", "context")
        context = layout.from_sequence(context)
        if layer._use_gate:
            # FULLY_CONNECTED, LOGISTIC (its int8 output fixed at scale 1/256) and MUL.
            gate = simulation.activation("gate", _projection(layer._gate_dense, query, simulation, 1))
            gate = simulation.fixed(ops.sigmoid(gate), UNIT_RANGE)
            context = simulation.activation("gated", context * gate)
        outputs = _projection(layer._output_dense, context, simulation, 2)
        if return_scores:
            return outputs, layout.scores(probabilities, source)
        return outputs


def _attend_like_int16_kernels(layer, simulation, query, value, key, mask, return_scores):
    """Attention as LiteRT's 16x8 kernels compute it (`attention_int16`), at inference; None where
    an input's or the output's range is not known here. A masked score is the lowest level of the
    scores' range, as `_masked` makes it."""
    ranges = simulation.operand_ranges or (simulation.input_range,)
    query_range = ranges[0]
    value_range = ranges[1] if len(ranges) > 1 and value is not None else query_range
    key_range = ranges[2] if len(ranges) > 2 and key is not None else value_range
    key = value if key is None else key
    if None in (query_range, value_range, key_range, simulation.output_step):
        return None
    quantizer = simulation.weight_quantizer

    def project(tensor, source, name, scale=None):
        step = file_step(*source)
        steps = (step, simulation.bias_step_of(source), simulation.step(name))
        dense = getattr(layer, f"_{name}_dense")
        return attention_int16.projection(requantization.file_levels(tensor, step), steps, dense, quantizer, 1, scale)

    q = project(query, query_range, "query", layer._inverse_sqrt_key_dim)
    k, v = project(key, key_range, "key"), project(value, value_range, "value")
    layout, source = _Layout(layer._attention_axes, q.shape), _Layout(layer._attention_axes, k.shape)
    q, k, v = layout.to_sequence(q), source.to_sequence(k), source.to_sequence(v)
    scores_step = simulation.step("scores")
    scores = attention_int16.batch_matmul(_SCORES, q, simulation.step("query"), k, simulation.step("key"), scores_step)
    if mask is not None:
        mask, groups = layout.mask(mask, source)
        lowest = ops.round(simulation.bounds("scores")[0] / scores_step)
        scores = _grouped(ops.where, groups, mask, scores, ops.cast(lowest, scores.dtype))
    probabilities = int16_softmax.softmax(scores, scores_step)
    if mask is not None and (return_scores or not layout.plain):
        probabilities = _grouped(ops.where, groups, mask, probabilities, 0.0)  # Keras's masked softmax
    context = attention_int16.batch_matmul(
        _CONTEXT, probabilities, attention_int16.PROBABILITY_STEP, v, simulation.step("value"), simulation.step("context")
    )
    context, context_range = layout.from_sequence(context), "context"
    if layer._use_gate:
        # LOGISTIC's int16 table is LiteRT's own (not sigmoid(i / 24) rounded, to the step): the
        # sigmoid here is exact, rounded to its 1/32768 output, within a step of it.
        gate = project(query, query_range, "gate") * requantization.file_scale(simulation.step("gate"))
        gate = ops.clip(ops.round(ops.sigmoid(gate) / attention_int16.PROBABILITY_STEP), 0.0, 32767.0)
        context = requantization.multiply_int16(
            context, simulation.step("context"), gate, attention_int16.PROBABILITY_STEP, simulation.step("gated")
        )
        context_range = "gated"
    steps = (simulation.step(context_range), simulation.bias_step_of(context_range), simulation.output_step)
    outputs = attention_int16.projection(context, steps, layer._output_dense, quantizer, 2)
    outputs = ops.cast(outputs * requantization.file_scale(simulation.output_step), query.dtype)
    if return_scores:
        return outputs, layout.scores(ops.cast(probabilities * attention_int16.PROBABILITY_STEP, query.dtype), source)
    return outputs


def _simulated(layer):
    """True where `run_simulated` reproduces the layer: built, with the projections Keras builds
    (each input's last axis to heads x size, heads x size back to the output) and a sigmoid gate
    if any."""
    built = getattr(layer, "_query_dense", None) is not None and layer._query_dense.built
    if not built:
        return False
    projections = [layer._query_dense, layer._key_dense, layer._value_dense]
    if getattr(layer, "_use_gate", False):
        if activation_name(layer._gate_dense.activation) != "sigmoid":
            return False
        projections.append(layer._gate_dense)
    return all(_projects(dense, 1) for dense in projections) and _projects(layer._output_dense, 2)


def _projects(dense, bound):
    """True for an EinsumDense that contracts the last `bound` axes of its input with the first
    `bound` of its kernel, and keeps the other input axes in front of the kernel's others."""
    inputs, rest = dense.equation.split(",")
    kernel, outputs = rest.split("->")
    free, contracted = inputs[:-bound], inputs[-bound:]
    return kernel.startswith(contracted) and outputs == free + kernel[bound:] and not set(free) & set(kernel)


class _Layout:
    """Where the attended axes of a projected (batch, <index axes>, heads, size) tensor are: the
    other index axes join the batch, the attended ones form one sequence."""

    def __init__(self, attention_axes, shape):
        rank = len(shape)
        self.axes = tuple(attention_axes)
        self.others = tuple(a for a in range(1, rank - 2) if a not in self.axes)
        self.order = (0, *self.others, *self.axes, rank - 2, rank - 1)
        self.shape = tuple(shape)
        self.plain = rank == 4  # (batch, sequence, heads, size)

    def to_sequence(self, x):
        if self.plain:
            return x
        if self.order != tuple(range(len(self.order))):
            x = ops.transpose(x, self.order)
        return ops.reshape(x, (-1, _size(self.shape[a] for a in self.axes)) + tuple(x.shape[-2:]))

    def from_sequence(self, x):
        """(batch x others, sequence, heads, size) back to this layout, with x's last axis."""
        if self.plain:
            return x
        ordered = tuple(self.shape[a] for a in self.order[1:-2])
        x = ops.reshape(x, (-1,) + ordered + tuple(x.shape[-2:]))
        if self.order != tuple(range(len(self.order))):
            inverse = tuple(self.order.index(a) for a in range(len(self.order)))
            x = ops.transpose(x, inverse)
        return x

    def mask(self, mask, source):
        """Keras's attention mask over the flattened scores (batch x other axes, heads, target,
        source), and None; or, for a mask the same for every batch that differs along the other
        axes, over (1, other axes, heads, target, source) and the number of other positions. Keras
        inserts axes before the attended ones until the mask has the scores' rank (batch, <other
        axes>, heads, <target axes>, <source axes>); its attended axes are broadcast and flattened,
        its other axes joined to its batch."""
        mask = ops.cast(mask, "bool")
        rank = 2 + len(self.others) + 2 * len(self.axes)
        for _ in range(rank - len(mask.shape)):
            mask = ops.expand_dims(mask, -2 * len(self.axes) - 1)
        if self.plain:
            return mask, None
        others = tuple(self.shape[a] for a in self.others)
        target = tuple(self.shape[a] for a in self.axes)
        attended = target + tuple(source.shape[a] for a in source.axes)
        if tuple(mask.shape[len(others) + 2:]) != attended:
            mask = ops.logical_and(mask, ops.ones((1,) * (len(others) + 2) + attended, "bool"))
        shared, kept = mask.shape[0] == 1, tuple(mask.shape[1:len(others) + 1])  # shared: by every batch
        if kept != others and not (shared and _size(kept) == 1):
            mask = ops.logical_and(mask, ops.ones((1,) + others + (1,) * (rank - 1 - len(others)), "bool"))
            kept = others
        heads, flat = mask.shape[len(others) + 1], (_size(target), _size(attended) // _size(target))
        if shared and _size(kept) > 1:
            return ops.reshape(mask, (1, _size(others), heads) + flat), _size(others)
        return ops.reshape(mask, (-1, heads) + flat), None

    def scores(self, probabilities, source):
        """(batch x others, heads, target, source) as Keras returns attention scores: (batch,
        <other axes>, heads, <attended target axes>, <attended source axes>)."""
        if self.plain:
            return probabilities
        shape = tuple(self.shape[a] for a in self.others) + (probabilities.shape[1],)
        shape += tuple(self.shape[a] for a in self.axes) + tuple(source.shape[a] for a in source.axes)
        return ops.reshape(probabilities, (-1,) + shape)


def _masked(simulation, scores, mask, groups=None):
    """The int8 scores where `mask` (see `_Layout.mask`) holds, else the lowest value of their range:
    SELECT_V2 with a constant that quantizes to -128, as the converter makes of Keras's
    `where(mask, scores, -1e9)`. With quantization off, -1e9 as in Keras."""
    if not simulation.enabled:
        return _grouped(ops.where, groups, mask, scores, -1e9)
    if is_calibrating():
        return _grouped(ops.where, groups, mask, scores, ops.min(scores))
    quantizer, state = simulation._wrapper.scheme.activations, simulation._ranges["scores"]
    low, high = quantizer.range(state)
    lowest = keras.quantizers.fake_quant_with_min_max_vars(
        low - (high - low), low, high, num_bits=quantizer.bits, narrow_range=quantizer.symmetric
    )

    def select(mask, scores, lowest):
        masked = ops.where(mask, scores, ops.stop_gradient(lowest))
        # The export trace rounds it to the scores' range again (no update): the converter quantizes
        # SELECT_V2's output with it (the constant becomes -128), and leaves it in float without.
        return quantizer(masked, state, training=False) if is_tracing_for_export() else masked

    return _grouped(select, groups, mask, scores, lowest)


def _grouped(select, groups, mask, x, other):
    """`select(mask, x, other)`, with x's (batch x other axes) split into (batch, other axes) for a
    mask grouped by `_Layout.mask`."""
    if groups is None:
        return select(mask, x, other)
    shape = tuple(x.shape[1:])
    return ops.reshape(select(mask, ops.reshape(x, (-1, groups) + shape), other), (-1,) + shape)


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


def _projection(dense, x, simulation, bound, scale=None):
    """An EinsumDense of attention as one FULLY_CONNECTED: its kernel flattened to 2D (one weight
    scale, as for Dense), times `scale` when given, applied to `x` flattened to its last `bound`
    axes."""
    kernel, bias = dense.kernel, dense.bias
    contracted, out_shape = tuple(kernel.shape[:bound]), tuple(kernel.shape[bound:])
    kernel = ops.reshape(kernel, (_size(contracted), _size(out_shape)))
    if scale is not None:
        kernel = kernel * scale
    outputs = ops.matmul(ops.reshape(x, (-1, kernel.shape[0])), simulation.weight(kernel))
    if bias is not None:
        bias = ops.reshape(bias, (-1,))
        outputs = outputs + (bias * scale if scale is not None else bias)
    return ops.reshape(outputs, (-1,) + tuple(x.shape[1:len(x.shape) - bound]) + out_shape)


def _size(shape):
    size = 1
    for dim in shape:
        size *= dim
    return size


register_handler(layers.MultiHeadAttention, MultiHeadAttentionHandler())
