"""LayerNormalization as int8 TFLite ops.

Over the last axis, the layer runs as MEAN, SUB, MUL (the square), MEAN, ADD (epsilon), RSQRT, MUL,
MUL (gamma) and ADD (beta), each an int8 op whose output the QAT model rounds to its own learned
range. (Keras's own formula, `x * (rsqrt(var + eps) * gamma) + (beta - mean * rsqrt(...) * gamma)`,
makes the converter leave a NEG in float and puts gamma into a per-token tensor with a wide range.)
gamma and beta are int8 constants with one symmetric scale each.

Over other axes, or several (a (batch, height, width, channels) tensor normalized over all three),
the MEANs reduce over those axes and gamma and beta are broadcast along them: the same int8 ops, where
TFLite's post-training int8 file leaves a NEG in float. With `rms_scaling` (which Keras computes from
the variance, not the mean square), the input itself is multiplied by the inverse deviation and by
gamma, with no beta.

keras.layers.RMSNormalization (the mean square of the input itself, not its variance) runs as MUL
(the square), MEAN, ADD (epsilon), RSQRT, MUL and MUL (its scale), each int8 likewise.

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
    """LayerNormalization over any axes but the batch's, with or without RMS scaling, fully int8."""

    def __init__(self):
        super().__init__(output=QUANTIZE)

    def intermediate_ranges(self, layer):
        if not _simulated(layer):
            return ()
        # gamma's product has a range of its own where beta is added after it.
        scaled = layer.scale and not layer.rms_scaling
        return _RANGES if scaled else tuple(name for name in _RANGES if name != "scaled")

    def run_simulated(self, layer, simulation, inputs, *args, **kwargs):
        rank = len(inputs.shape)
        axes = sorted(axis % rank for axis in layer.axis)
        mean = simulation.activation("mean", ops.mean(inputs, axis=axes, keepdims=True))
        centered = simulation.activation("centered", inputs - mean)
        squares = simulation.activation("squares", centered * centered)
        variance = simulation.activation("variance", ops.mean(squares, axis=axes, keepdims=True))
        variance = simulation.activation("variance_epsilon", variance + layer.epsilon)
        inverse = _rsqrt(variance, layer.epsilon, simulation, "variance_epsilon", "inverse_deviation")
        inverse = simulation.activation("inverse_deviation", inverse)
        if layer.rms_scaling:
            outputs = simulation.activation("normalized", inputs * inverse)
            if layer.gamma is not None:
                outputs = outputs * _broadcast(simulation.weight(layer.gamma), axes, inputs.shape)
            return outputs
        outputs = simulation.activation("normalized", centered * inverse)
        if layer.scale:
            gamma = _broadcast(simulation.weight(layer.gamma), axes, inputs.shape)
            outputs = simulation.activation("scaled", outputs * gamma)
        if layer.center:
            outputs = outputs + _broadcast(simulation.weight(layer.beta), axes, inputs.shape)
        return outputs


def _broadcast(weight, axes, shape):
    """gamma or beta (the sizes of the normalized axes) shaped to multiply an input of `shape`."""
    if axes == [len(shape) - 1]:
        return weight
    return ops.reshape(weight, tuple(shape[a] if a in axes else 1 for a in range(len(shape))))


def _rsqrt(variance, epsilon, simulation, input_name, output_name):
    """rsqrt of the int8 `variance` (range `input_name`) onto the range `output_name`, as LiteRT's
    RSQRT computes it (`fixed_point.RSQRT_TABLE`), with the float rsqrt's gradient. The export trace
    keeps the plain op the converter turns into RSQRT."""
    if simulation.training:
        # Rounded to 0, the variance has an infinite rsqrt (the file's RSQRT returns the top of its
        # range) with a NaN gradient; the float layer's rsqrt(epsilon) keeps the range it learns sane.
        variance = ops.maximum(variance, max(epsilon, 1e-12))
    plain = ops.rsqrt(variance)
    if not simulation.mirrors_int8_kernels:
        return plain
    step, out_step = simulation.step(input_name), simulation.step(output_name)
    value = ops.cast(ops.clip(ops.round(variance / step), 0, 255), "int32")
    # 2^20 / sqrt(value) as an integer, scaled to the output by 2^-20 / (sqrt(step) x out_step),
    # whose denominator the kernel computes in float32.
    multiplier = 2.0**-20 / ops.cast(ops.sqrt(step) * out_step, "float64")
    levels = multiply_by_quantized_multiplier(ops.take(RSQRT_TABLE, value) * 2.0**20, multiplier)
    low, high = simulation.bounds(output_name)
    # A variance rounded to 0 has the kernel's largest value, saturated at the top of the range.
    mirrored = ops.clip(ops.cast(levels, "float32") * out_step, low, high)
    return plain + ops.stop_gradient(mirrored - plain) if simulation.training else mirrored


def _simulated(layer):
    """True for a built layer that does not normalize over the batch axis."""
    if not layer.built:
        return False
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    shape = (layer.get_build_config() or {}).get("input_shape")
    return shape is not None and all(axis % len(shape) != 0 for axis in axes)


class RMSNormalizationHandler(LayerHandler):
    """RMSNormalization over any axes but the batch's, fully int8."""

    def __init__(self):
        super().__init__(output=QUANTIZE)

    def intermediate_ranges(self, layer):
        return _RMS_RANGES if _simulated(layer) else ()

    def run_simulated(self, layer, simulation, inputs, *args, **kwargs):
        rank = len(inputs.shape)
        axes = sorted(axis % rank for axis in layer.axis)
        squares = simulation.activation("squares", inputs * inputs)
        mean_square = simulation.activation("mean_square", ops.mean(squares, axis=axes, keepdims=True))
        mean_square = simulation.activation("mean_square_epsilon", mean_square + layer.epsilon)
        inverse = _rsqrt(mean_square, layer.epsilon, simulation, "mean_square_epsilon", "inverse_rms")
        outputs = simulation.activation("normalized", inputs * simulation.activation("inverse_rms", inverse))
        return outputs * simulation.weight(layer.scale)  # broadcast as Keras broadcasts it


_RMS_RANGES = ("squares", "mean_square", "mean_square_epsilon", "inverse_rms", "normalized")

register_handler(layers.LayerNormalization, LayerNormalizationHandler())
if hasattr(layers, "RMSNormalization"):  # Keras 3.9 and later
    register_handler(layers.RMSNormalization, RMSNormalizationHandler())
