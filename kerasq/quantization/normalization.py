"""LayerNormalization as int8 TFLite ops.

Over the last axis, the layer runs as MEAN, SUB, MUL (the square), MEAN, ADD (epsilon), RSQRT, MUL,
MUL (gamma) and ADD (beta), each an int8 op whose output the QAT model rounds to its own learned
range. (Keras's own formula, `x * (rsqrt(var + eps) * gamma) + (beta - mean * rsqrt(...) * gamma)`,
makes the converter leave a NEG in float and puts gamma into a per-token tensor with a wide range.)
gamma and beta are int8 constants with one symmetric scale each.

Other axes, and RMS scaling, run in float between the quantized layers around them.

Example:
>>> import keras, kerasq
>>> inputs = keras.Input((6, 8))
>>> qat = kerasq.quantize_model(keras.Model(inputs, keras.layers.LayerNormalization()(inputs)))
>>> sorted(qat.layers[-1].quantization_ranges())
['centered', 'inverse_deviation', 'mean', 'normalized', 'output', 'scaled', 'squares', 'variance', 'variance_epsilon']
"""

from keras import layers, ops

from kerasq.quantization.fixed_point import RSQRT_TABLE, multiply_by_quantized_multiplier
from kerasq.quantization.handlers import QUANTIZE, LayerHandler, register_handler

_RANGES = ("mean", "centered", "squares", "variance", "variance_epsilon", "inverse_deviation", "normalized", "scaled")


class LayerNormalizationHandler(LayerHandler):
    """LayerNormalization over the last axis, fully int8."""

    def __init__(self):
        super().__init__(output=QUANTIZE)

    def intermediate_ranges(self, layer):
        if not _simulated(layer):
            return ()
        return _RANGES if layer.scale else tuple(name for name in _RANGES if name != "scaled")

    def run_simulated(self, layer, simulation, inputs, *args, **kwargs):
        mean = simulation.activation("mean", ops.mean(inputs, axis=-1, keepdims=True))
        centered = simulation.activation("centered", inputs - mean)
        squares = simulation.activation("squares", centered * centered)
        variance = simulation.activation("variance", ops.mean(squares, axis=-1, keepdims=True))
        variance = simulation.activation("variance_epsilon", variance + layer.epsilon)
        inverse = simulation.activation("inverse_deviation", _rsqrt(variance, simulation))
        outputs = simulation.activation("normalized", centered * inverse)
        if layer.scale:
            outputs = simulation.activation("scaled", outputs * simulation.weight(layer.gamma))
        if layer.center:
            outputs = outputs + simulation.weight(layer.beta)
        return outputs


def _rsqrt(variance, simulation):
    """rsqrt of the int8 `variance` as LiteRT's RSQRT computes it (`fixed_point.RSQRT_TABLE`), with
    the float rsqrt's gradient. The export trace keeps the plain op the converter turns into RSQRT."""
    if simulation.training:
        # Rounded to 0, the variance has an infinite rsqrt (the range clips it, as RSQRT returns
        # its largest value) whose gradient would be NaN.
        variance = ops.maximum(variance, 1e-12)
    plain = ops.rsqrt(variance)
    if not simulation.mirrors_int8_kernels:
        return plain
    step, out_step = simulation.step("variance_epsilon"), simulation.step("inverse_deviation")
    value = ops.cast(ops.clip(ops.round(variance / step), 0, 255), "int32")
    # 2^20 / sqrt(value) as an integer, scaled to the output by 2^-20 / (sqrt(step) x out_step),
    # whose denominator the kernel computes in float32.
    multiplier = 2.0**-20 / ops.cast(ops.sqrt(step) * out_step, "float64")
    levels = multiply_by_quantized_multiplier(ops.take(RSQRT_TABLE, value) * 2.0**20, multiplier)
    mirrored = ops.cast(levels, "float32") * out_step
    return plain + ops.stop_gradient(mirrored - plain) if simulation.training else mirrored


def _simulated(layer):
    """True for a layer normalizing over the last axis of its input, without RMS scaling."""
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    shape = (layer.get_build_config() or {}).get("input_shape") if layer.built else None
    rank = len(shape) if shape is not None else None
    last = len(axes) == 1 and (axes[0] == -1 or axes[0] == (rank or 0) - 1)
    return last and not layer.rms_scaling


register_handler(layers.LayerNormalization, LayerNormalizationHandler())
