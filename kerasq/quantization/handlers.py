"""How each layer type runs under quantization-aware training: a registry users can extend.

A handler says which of a layer's weights are fake-quantized (and along which axis), how the layer's
math runs with those quantized weights, and what happens to its output:

- `QUANTIZE`: the output gets its own moving-average range (Conv, Dense, Add, GlobalAveragePooling...).
- `PASS_THROUGH`: the output keeps its input's quantization, as TFLite does for ops that only move or
  select values (MaxPooling, Reshape, Flatten, Dropout, ZeroPadding...).
- `SAME_SCALE`: TFLite computes new values but keeps the input's scale and zero point (average
  pooling, bilinear resizing), so the output is rounded to the input's grid.
- `FIXED`: TFLite fixes the output range (Softmax and logistic: [0, 255/256]; tanh: [-1, 127/128];
  at 16 bits all three: +-32767/32768, see `fixed_range_for_bits`).

Register a handler for your own layer with `register_handler(MyLayer, handler)`.
"""

import math

import keras
from keras import layers, ops

from kerasq.graph import facts as facts_lib
from kerasq.graph import rules
from kerasq.graph.registry import ClassRegistry
from kerasq.graph.variables import replaced_variables
from kerasq.quantization import fixed_point, int16_softmax, requantization, xnnpack
from kerasq.quantization.quantizers import is_calibrating, is_tracing_for_export

QUANTIZE = "quantize"
PASS_THROUGH = "pass_through"
SAME_SCALE = "same_scale"
FIXED = "fixed"
_POLICIES = (QUANTIZE, PASS_THROUGH, SAME_SCALE, FIXED)

# TFLite's int8 kernels fix these output ranges (scale 1/256, zero point -128; scale 1/128, zero point 0).
UNIT_RANGE = (0.0, 255.0 / 256.0)
TANH_RANGE = (-1.0, 127.0 / 128.0)
LOG_SOFTMAX_RANGE = (-255.0 * 16.0 / 256.0, 0.0)  # scale 16/256, zero point 127
_FIXED_RANGE_ACTIVATIONS = {
    "softmax": UNIT_RANGE, "sigmoid": UNIT_RANGE, "tanh": TANH_RANGE, "log_softmax": LOG_SOFTMAX_RANGE,
}
# TFLite's int16 kernels fix the outputs of SOFTMAX, LOGISTIC and TANH to scale 1/32768, zero point 0:
# with the symmetric 16-bit quantizer's 65535 levels (ends included), that is this range.
INT16_UNIT_RANGE = (-32767.0 / 32768.0, 32767.0 / 32768.0)
_INT16_FIXED_RANGES = {UNIT_RANGE: INT16_UNIT_RANGE, TANH_RANGE: INT16_UNIT_RANGE}
# Activations TFLite fuses into the op before them: no quantization in between.
FUSABLE_ACTIVATIONS = ("linear", "relu", "relu6")


def fixed_range_for_bits(fixed_range, bits):
    """The output range TFLite fixes for `bits`-bit activations, given the int8 one a handler names.

    Example:
    >>> from kerasq.quantization.handlers import UNIT_RANGE, fixed_range_for_bits
    >>> low, high = fixed_range_for_bits(UNIT_RANGE, 16)
    >>> 2 * high / 65534 == 1 / 32768  # the scale of a symmetric 16-bit range
    True
    """
    if bits == 16:
        return _INT16_FIXED_RANGES.get(tuple(fixed_range), fixed_range)
    return fixed_range


def activation_name(activation):
    """The registered name of an activation function ('relu', 'softmax', ...) or None if unnamed."""
    if activation is None:
        return "linear"
    name = keras.activations.serialize(activation)
    if isinstance(name, dict):
        name = name.get("config", name.get("class_name"))
    return name if isinstance(name, str) else None


class LayerHandler:
    """Quantizes a layer's output only; the layer runs as it is.

    Args:
        output: `QUANTIZE`, `PASS_THROUGH`, `SAME_SCALE` or `FIXED`.
        fixed_range: the output range when `output` is `FIXED`.
        fuses_activation: TFLite fuses a ReLU/ReLU6 that follows this op into it, so the output is left
            unquantized when one does.
        producers_take_output_scale: TFLite's converter writes this op's inputs directly at its output
            scale (as for concatenation), so an op whose output only feeds this one rounds once, to
            this op's range, rather than to its own range first.
    """

    has_kernels = False
    # True: the layer always runs with `run_simulated`, which reads its input's scale
    # (`Simulation.input_step`) as the file's kernel does.
    simulated = False
    # True: a layer of several inputs whose `run_simulated` reads each one's scale
    # (`Simulation.operand_steps`).
    reads_operand_ranges = False

    def __init__(
        self, output=QUANTIZE, fixed_range=None, fuses_activation=False, producers_take_output_scale=False
    ):
        if output not in _POLICIES:
            raise ValueError(f"output must be one of {_POLICIES}; got {output!r}.")
        if (output == FIXED) != (fixed_range is not None):
            raise ValueError("fixed_range is given exactly when output is FIXED.")
        self.output = output
        self.fixed_range = fixed_range
        self.fuses_activation = fuses_activation
        self.producers_take_output_scale = producers_take_output_scale

    def output_policy(self, layer):
        """`(output, fixed_range)` for this layer instance."""
        return self.output, self.fixed_range

    def run(self, layer, inputs, *args, **kwargs):
        return layer(inputs, *args, **kwargs)

    def unsupported_reason(self, layer):
        """Why this handler cannot quantize this instance of its class (a few words), or None."""
        return None

    def operands(self, inputs, *args, **kwargs):
        """The input tensors whose ranges `Simulation.operand_steps` gives, for a handler that
        `reads_operand_ranges` of a layer called with them as separate arguments; None otherwise."""
        return None

    def intermediate_ranges(self, layer):
        """Names of the int8 tensors the file holds between the ops this layer becomes (a layer
        TFLite runs as several ops: attention, layer normalization); each gets a learned range and
        the layer runs with `run_simulated`. None by default."""
        return ()

    def run_simulated(self, layer, simulation, inputs, *args, **kwargs):
        """The layer's output as the file's ops compute it, rounding each intermediate tensor with
        `simulation` (a `Simulation`). Called instead of `run` when `intermediate_ranges` names any."""
        return self.run(layer, inputs, *args, **kwargs)

    def round_to_input_grid(self, layer, outputs, quantizer, state):
        """A `SAME_SCALE` output rounded onto its input's grid (`quantizer`'s range `state`) as the
        file's kernel rounds: ties away from zero, as TFLite's int8 kernels do."""
        return quantizer.round_like_tflite(outputs, state)


class Simulation:
    """What `LayerHandler.run_simulated` rounds with: the ranges and weight quantizer of the
    `QuantizeWrapper` that runs it, for one call, in training or inference.

    `activation(name, x)` rounds `x` to the learned range `name` (training updates it);
    `fixed(x, fixed_range)` to a range TFLite fixes (at inference only, as for softmax outputs);
    `weight(w)` fake-quantizes a constant operand with one symmetric scale.
    """

    def __init__(self, wrapper, ranges, training, input_range=None, rounding_range=None, operand_ranges=None):
        self._wrapper = wrapper
        self._ranges = ranges
        self.training = training
        self._input_range = input_range
        self._rounding_range = rounding_range
        self._operand_ranges = operand_ranges

    @property
    def enabled(self):
        return self._wrapper.quantization_enabled

    def activation(self, name, x):
        return self._wrapper._quantize_activation(x, self._ranges[name], self.training)

    @property
    def bits(self):
        return self._wrapper.scheme.activations.bits

    @property
    def mirrors_int8_kernels(self):
        """True where the handler computes an op's int8 arithmetic from its ranges' steps: int8
        and quantizing, neither calibrating (the ranges are not known yet) nor tracing for export
        (the file's kernel does it)."""
        return self.enabled and self.bits == 8 and not (is_calibrating() or is_tracing_for_export())

    @property
    def mirrors_int16_kernels(self):
        """True at inference with 16-bit activations, quantizing, neither calibrating nor tracing."""
        return _mirrors_int16_kernels(self)

    def bounds(self, name):
        """`(min, max)` of the learned range `name`."""
        return self._wrapper.scheme.activations.range(self._ranges[name])

    def step(self, name):
        """The scale of the learned range `name`, as the file holds it: the converter divides in
        float64, which is 1 ulp off TensorFlow's float32 scale for one range in ten or so."""
        return file_step(self._wrapper.scheme.activations, self._ranges[name])

    @property
    def rounding_step(self):
        """The scale of the int8 tensor the file writes the layer's output to, as the file holds it:
        its own learned range's, or where it has none, the range of the op that rounds it in the
        QAT model (a concatenation, which the file writes it at). None when neither is known."""
        if "output" in self._ranges:
            return self.step("output")
        return None if self._rounding_range is None else file_step(*self._rounding_range)

    @property
    def input_file_step(self):
        """`input_step` as the file holds it (see `step`)."""
        return None if self._input_range is None else file_step(*self._input_range)

    @property
    def input_range(self):
        """`(quantizer, range variables)` of the layer's input; None when no quantized layer
        produces it."""
        return self._input_range

    @property
    def weight_quantizer(self):
        return self._wrapper.scheme.weights

    def bias_step_of(self, name_or_range):
        """The scale in float64 that the converter multiplies by the weight scale for the bias of an
        op reading the learned range `name_or_range` (a name, or `(quantizer, range variables)`)."""
        if isinstance(name_or_range, str):
            name_or_range = (self._wrapper.scheme.activations, self._ranges[name_or_range])
        return requantization.activation_step(*name_or_range, dtype="float64")

    @property
    def operand_ranges(self):
        """`(quantizer, range variables)` of each input of a layer of several (None for one no
        quantized layer produces); None where the handler does not read them."""
        return self._operand_ranges

    @property
    def operand_steps(self):
        """The file's scale of each input of a layer of several (see `step`); None for an input no
        quantized layer produces, and None for all where the handler does not read them
        (`LayerHandler.reads_operand_ranges`)."""
        if not self._operand_ranges:
            return None
        return tuple(None if source is None else file_step(*source) for source in self._operand_ranges)

    @property
    def input_step(self):
        """The scale of the layer's int8 input as the file holds it; None when no quantized layer
        produces it (for handlers that set `simulated`)."""
        return None if self._input_range is None else requantization.activation_step(*self._input_range)

    @property
    def output_step(self):
        """The scale of the layer's learned output range; None when another layer quantizes it."""
        return self.step("output") if "output" in self._ranges else None

    def fixed(self, x, fixed_range):
        activations = self._wrapper.scheme.activations
        low, high = fixed_range_for_bits(fixed_range, activations.bits)
        state = {"min": low, "max": high, "seen": 0.0}
        return activations.with_fixed_range((low, high))(x, state, training=self.training, enabled=self.enabled)

    def weight(self, w):
        return self._wrapper.scheme.weights(w) if self.enabled else w


def file_step(quantizer, state):
    """The scale of `quantizer`'s range `state` as the file holds it: the converter divides in
    float64, which is 1 ulp off TensorFlow's float32 scale for one range in ten or so."""
    low, high = (ops.cast(bound, "float64") for bound in quantizer.range(state))
    steps = 2.0**quantizer.bits - 1.0 - (1.0 if quantizer.symmetric else 0.0)
    # divide_no_nan: Grappler would multiply by the constant's reciprocal, which rounds differently.
    return ops.cast(ops.divide_no_nan(high - low, ops.cast(steps, "float64")), "float32")


class ActivationHandler(LayerHandler):
    """Activation layers: ranges fixed by TFLite where it fixes them, learned otherwise.

    A ReLU or ReLU6 that does not fuse into the op before it is an int8 RELU/RELU6 op of its own,
    which requantizes its input to its output's scale with TFLite's fixed-point multiplier
    (`fixed_point.multiply_by_quantized_multiplier`): where the output's scale is more than twice
    the input's (a ReLU written at a concatenation's scale), that rounds twice, and puts values a
    little under half a step past a grid point on the step above. The QAT model does the same at
    inference."""

    simulated = True

    def output_policy(self, layer):
        name = _layer_activation_name(layer)
        if name == "linear":
            return PASS_THROUGH, None
        return _activation_output_policy(name)

    def run_simulated(self, layer, simulation, inputs, *args, **kwargs):
        name = _layer_activation_name(layer)
        plain = not (args or kwargs or simulation.training)
        if plain and name in ("relu", "relu6") and simulation.mirrors_int8_kernels:
            input_step, output_step = simulation.input_file_step, simulation.rounding_step
            if input_step is not None and output_step is not None:
                return requantized_relu(inputs, input_step, output_step, 6.0 if name == "relu6" else None)
        if plain and name == "softmax" and _softmax_over_last_axis(layer) and _mirrors_int16_kernels(simulation):
            input_step = simulation.input_file_step
            if input_step is not None:
                levels = ops.round(ops.cast(inputs, "float64") / ops.cast(input_step, "float64"))
                return ops.cast(int16_softmax.softmax(levels, input_step) / 32768.0, inputs.dtype)
        return self.run(layer, inputs, *args, **kwargs)

    def run(self, layer, inputs, *args, **kwargs):
        if isinstance(layer, layers.Activation) and not args and not kwargs:
            return run_activation(layer.activation, inputs)
        return layer(inputs, *args, **kwargs)


def _softmax_over_last_axis(layer):
    axis = getattr(layer, "axis", -1)
    return axis in (-1, [-1], (-1,))


def _mirrors_int16_kernels(simulation):
    """True at inference with 16-bit activations, quantizing, neither calibrating nor tracing."""
    return (
        simulation.enabled and simulation.bits == 16 and not simulation.training
        and not (is_calibrating() or is_tracing_for_export())
    )


def run_activation(activation, x):
    """`activation(x)` as TFLite's int8 kernels compute it.

    SiLU (swish) becomes LOGISTIC then MUL in the file, with the logistic's int8 output in its fixed
    range in between; hard sigmoid becomes ADD (ReLU6 fused) then MUL, with [0, 6] in between. That
    rounding is simulated too. Other activations run as they are.
    """
    name = activation_name(activation)
    if name == "silu":
        return x * _int8_in_range(ops.sigmoid(x), UNIT_RANGE)
    if name == "hard_sigmoid":
        # relu6(x + 3) / 6, as Keras computes it: an int8 ADD with ReLU6 fused, then a MUL.
        return _int8_in_range(ops.relu6(x + 3.0), (0.0, 6.0)) / 6.0
    return activation(x)


def requantized_relu(x, input_step, output_step, max_value=None):
    """`relu(x)` (`relu6` with `max_value=6`) for `x` on the int8 grid of `input_step`, on the grid
    of `output_step`, as TFLite's int8 RELU and RELU6 kernels compute it: the input's integer less its
    zero point times `input scale / output scale` with `MultiplyByQuantizedMultiplier`, clamped at
    the output's zero point (and at 6 on the output's grid, rounded)."""
    levels = ops.round(x / input_step)
    # As TFLite computes it: the file's float32 scales divided in float64.
    multiplier = ops.cast(input_step, "float64") / ops.cast(output_step, "float64")
    requantized = ops.maximum(fixed_point.multiply_by_quantized_multiplier(levels, multiplier), 0.0)
    if max_value is not None:
        top = ops.round(ops.cast(max_value, "float64") / ops.cast(output_step, "float64"))
        requantized = ops.minimum(requantized, top)
    return ops.cast(requantized, "float32") * output_step


def _int8_in_range(x, fixed_range):
    """`x` rounded to the int8 grid of `fixed_range`, as an intermediate int8 tensor holds it."""
    low, high = fixed_range
    return keras.quantizers.fake_quant_with_min_max_vars(x, low, high, num_bits=8)


def _activation_output_policy(name):
    """TFLite's fixed output range for activation `name` where it has one, else a learned range."""
    if name in _FIXED_RANGE_ACTIVATIONS:
        return FIXED, _FIXED_RANGE_ACTIVATIONS[name]
    return QUANTIZE, None


class UpSamplingHandler(LayerHandler):
    """UpSampling: nearest-neighbour copies values; other interpolations compute new ones.

    A 2D upsampling with known spatial sizes runs as one resize to a constant size, which the
    converter writes as a single RESIZE_NEAREST_NEIGHBOR or RESIZE_BILINEAR op (Keras's own call
    repeats rows and columns, or computes the size at run time: SHAPE, TILE, PACK... in the file).
    """

    def output_policy(self, layer):
        nearest = getattr(layer, "interpolation", "nearest") == "nearest"
        return (PASS_THROUGH if nearest else SAME_SCALE), None

    def run(self, layer, inputs, *args, **kwargs):
        size = None if args or kwargs or len(inputs.shape) != 4 else self.resized_size(layer, inputs)
        if size is None or layer.interpolation not in ("nearest", "bilinear"):
            return layer(inputs, *args, **kwargs)
        return ops.image.resize(inputs, size, interpolation=layer.interpolation, data_format="channels_last")

    def resized_size(self, layer, inputs):
        """The constant (height, width) the layer resizes rank-4 `inputs` to, or None to run the
        layer as Keras writes it."""
        height, width = tuple(inputs.shape)[1:3]
        static = isinstance(layer, layers.UpSampling2D) and layer.data_format == "channels_last"
        if not static or height is None or width is None:
            return None
        return (height * layer.size[0], width * layer.size[1])

    def round_to_input_grid(self, layer, outputs, quantizer, state):
        # LiteRT runs int8 RESIZE_BILINEAR with XNNPACK by default, which rounds ties up.
        if getattr(layer, "interpolation", None) == "bilinear" and quantizer.bits == 8:
            return xnnpack.round_half_up(outputs, quantizer, state)
        return super().round_to_input_grid(layer, outputs, quantizer, state)


class ResizingHandler(UpSamplingHandler):
    """Resizing to a fixed size with nearest or bilinear interpolation: one RESIZE_NEAREST_NEIGHBOR or
    RESIZE_BILINEAR op, simulated as UpSampling's. Resizing that crops or pads to the aspect ratio,
    or other interpolations, run as Keras writes them."""

    def resized_size(self, layer, inputs):
        plain = layer.data_format == "channels_last" and not (
            layer.crop_to_aspect_ratio or layer.pad_to_aspect_ratio or layer.antialias
        )
        return (layer.height, layer.width) if plain else None


class CenterCropHandler(LayerHandler):
    """CenterCrop of an input at least the crop's size: a slice with constant bounds (one int8
    STRIDED_SLICE, no shape arithmetic in the file). An input smaller than the crop is resized by
    Keras's own call."""

    def __init__(self):
        super().__init__(output=PASS_THROUGH)

    def run(self, layer, inputs, *args, **kwargs):
        height, width = tuple(inputs.shape)[1:3] if len(inputs.shape) == 4 else (None, None)
        fits = height is not None and width is not None and height >= layer.height and width >= layer.width
        if args or kwargs or layer.data_format != "channels_last" or not fits:
            return layer(inputs, *args, **kwargs)
        top, left = (height - layer.height) // 2, (width - layer.width) // 2
        return inputs[:, top:top + layer.height, left:left + layer.width, :]


class GlobalAveragePoolingHandler(LayerHandler):
    """GlobalAveragePooling: an int8 or int16 MEAN. At inference with 16-bit activations the QAT
    model computes it as LiteRT's int16 MEAN does: the sum of the input levels times the 31-bit
    fixed-point multiplier of `input scale / output scale` divided by the count in integers
    (`fixed_point.mean_multiplier`), rounded twice; in float32, 3% of a digits CNN's pooled outputs
    had landed a step off, and dividing the real multiplier by a count not a power of two 7%."""

    simulated = True

    def __init__(self):
        super().__init__(output=QUANTIZE)

    def run_simulated(self, layer, simulation, inputs, *args, **kwargs):
        input_step, output_step = simulation.input_file_step, simulation.output_step
        mirrors = _mirrors_int16_kernels(simulation) and not (args or kwargs.get("mask") is not None)
        if not mirrors or input_step is None or output_step is None:
            return layer(inputs, *args, **kwargs)
        rank = len(inputs.shape)
        axes = tuple(range(1, rank - 1)) if layer.data_format == "channels_last" else tuple(range(2, rank))
        count = float(math.prod(inputs.shape[axis] for axis in axes))
        scale = requantization.file_scale
        total = ops.sum(requantization.file_levels(inputs, input_step), axis=axes, keepdims=layer.keepdims)
        mantissa, exponent = fixed_point.mean_multiplier(scale(input_step) / scale(output_step), count)
        levels = ops.clip(fixed_point.multiply_wide_by_mantissa(total, mantissa, exponent), -32768.0, 32767.0)
        return ops.cast(levels * scale(output_step), inputs.dtype)


class _Int16BinaryHandler(LayerHandler):
    """A layer of two inputs that is one int16 op at 16x8: at inference the QAT model computes it
    from the two inputs' levels with `int16_levels(first, first step, second, second step, output
    step)`, where it has a range of its own."""

    simulated = True
    reads_operand_ranges = True
    int16_levels = None  # a function of requantization

    def run_simulated(self, layer, simulation, inputs, *args, **kwargs):
        steps, output_step = simulation.operand_steps, simulation.output_step
        mirrors = _mirrors_int16_kernels(simulation) and len(inputs) == 2 and not args and not kwargs
        if not mirrors or steps is None or None in steps or output_step is None:
            return layer(inputs, *args, **kwargs)
        first, second = (requantization.file_levels(x, step) for x, step in zip(inputs, steps))
        levels = type(self).int16_levels(first, steps[0], second, steps[1], output_step)
        return ops.cast(levels * requantization.file_scale(output_step), inputs[0].dtype)


class MultiplyHandler(_Int16BinaryHandler):
    """Multiply: an int8 or int16 MUL, the latter as LiteRT computes it at inference
    (`requantization.multiply_int16`); in float32, about 0.1% of the outputs had landed a step off."""

    int16_levels = staticmethod(requantization.multiply_int16)

    def __init__(self):
        super().__init__(output=QUANTIZE)


class AddHandler(_Int16BinaryHandler):
    """Add: an int8 or int16 ADD, a ReLU after it fused; the int16 one as LiteRT's default kernel
    computes it at inference (`requantization.add_int16`) where the Add has a range of its own; in
    float32, 0.2% of the outputs had landed a step off."""

    int16_levels = staticmethod(requantization.add_int16)

    def __init__(self):
        super().__init__(output=QUANTIZE, fuses_activation=True)


class LeakyReLUHandler(LayerHandler):
    """LeakyReLU as LiteRT's default int8 kernel (XNNPACK) computes it, with its 8-bit-fraction
    slopes (`kerasq.quantization.xnnpack.leaky_relu`)."""

    simulated = True

    def run_simulated(self, layer, simulation, inputs, *args, **kwargs):
        input_step, output_step = simulation.input_step, simulation.output_step
        mirrors = simulation.enabled and simulation.bits == 8 and not (args or kwargs or is_tracing_for_export())
        if not mirrors or input_step is None or output_step is None or not hasattr(layer, "negative_slope"):
            return layer(inputs, *args, **kwargs)
        return xnnpack.leaky_relu(inputs, layer.negative_slope, input_step, output_step)


class ReshapeHandler(LayerHandler):
    """Flatten/Reshape: a reshape to a constant shape, so the file holds a single RESHAPE op rather
    than ops that compute the batch size at run time."""

    def __init__(self):
        super().__init__(output=PASS_THROUGH)

    def run(self, layer, inputs, *args, **kwargs):
        shape = tuple(layer.compute_output_shape(tuple(inputs.shape)))[1:]
        channels_first = getattr(layer, "data_format", "channels_last") == "channels_first"
        if channels_first or any(size is None for size in shape):
            return layer(inputs, *args, **kwargs)
        return ops.reshape(inputs, (-1,) + shape)


def fused_activation_name(layer):
    """'relu' or 'relu6' if `layer` is an activation layer TFLite can fuse into the op before it."""
    name = _layer_activation_name(layer)
    return name if name in ("relu", "relu6") else None


def fused_operation_name(operation):
    """'relu' or 'relu6' for a bare `keras.ops.relu`/`relu6` operation in a Functional graph."""
    names = {"Relu": "relu", "Relu6": "relu6"}
    if type(operation).__module__.startswith("keras.") and type(operation).__name__ in names:
        return names[type(operation).__name__]
    return None


def _layer_activation_name(layer):
    if isinstance(layer, layers.ReLU):
        if layer.negative_slope or layer.threshold:
            return "leaky_relu"
        if layer.max_value is None:
            return "relu"
        return "relu6" if float(layer.max_value) == 6.0 else "clipped_relu"
    if isinstance(layer, layers.Softmax):
        return "softmax"
    if isinstance(layer, layers.Activation):
        return activation_name(layer.activation)
    return None


class KernelHandler(LayerHandler):
    """Base for layers with weights that are fake-quantized (Dense, Conv, DepthwiseConv...).

    Which weights are kernels and where their output channels lie comes from the layer's facts
    (`kerasq.graph.register_layer_facts`); a handler adds the quantization policy (one scale per
    tensor or per channel) and runs the layer's linear math (no activation) with quantized kernels.
    """

    has_kernels = True
    # The op this handler becomes (CONV_2D, DEPTHWISE_CONV_2D, TRANSPOSE_CONV) scales its 16x8
    # accumulator with a 15-bit multiplier, which the QAT model then mirrors (see
    # `kerasq.quantization.requantization`). False for other ops; FULLY_CONNECTED's multiplier has
    # the full 31 bits at 16x8 as at int8.
    reduced_int16_multiplier = False
    # Kernels take a learned step (`WeightQuantizer(learn_scale=True)`) when the file quantizes them
    # with the fake-quant range the model trains with.
    learns_weight_steps = True

    def __init__(self, fuses_activation=True):
        super().__init__(output=QUANTIZE, fuses_activation=fuses_activation)

    @property
    def fused_activations(self):
        """The `activation=` values TFLite runs inside this op, with no quantization before them."""
        return FUSABLE_ACTIVATIONS if self.fuses_activation else ("linear",)

    def output_policy(self, layer):
        # A fused activation ends in a learned range; any other runs as its own TFLite op after a
        # quantized pre-activation, with that op's output range.
        name = activation_name(getattr(layer, "activation", None))
        if name in self.fused_activations:
            return QUANTIZE, None
        return _activation_output_policy(name)

    def kernel_axes(self, layer):
        """{weight attribute: output-channel axis, "depthwise" for a depthwise kernel's two axes, or
        None for one scale per tensor}. By default one scale per output channel, as the facts say."""
        return {
            name: "depthwise" if isinstance(kernel.out_axis, tuple) else kernel.out_axis
            for name, kernel in facts_lib.layer_facts(layer).kernels.items()
        }

    def shared_kernel_axes(self, layer):
        """`kernel_axes` for a layer the model calls more than once (by default, the same)."""
        return self.kernel_axes(layer)

    def output_channels(self, layer):
        return rules.output_channels(layer)

    def kernel_view(self, layer, name, kernel):
        """The form of a kernel that is quantized and passed to `linear` (by default, itself)."""
        return kernel

    def linear(self, layer, inputs, kernels, bias):
        """The layer's output before its activation, with `kernels` in place of its own."""
        raise NotImplementedError

    def fold_scale(self, layer, kernels, scale):
        """Kernels with each output channel multiplied by `scale` (BatchNorm folding)."""
        name = self.folded_kernel(layer)
        kernel = kernels[name]
        return {**kernels, name: kernel * ops.reshape(scale, self.scale_shape(layer, kernel))}

    def folded_kernel(self, layer):
        """The kernel whose output channels a following BatchNorm scales."""
        return facts_lib.layer_facts(layer).output_kernel

    def scale_shape(self, layer, kernel):
        """The shape a per-output-channel vector takes to multiply `kernel`."""
        layer_facts = facts_lib.layer_facts(layer)
        out_axis = layer_facts.kernels[self.folded_kernel(layer)].out_axis
        rank = len(kernel.shape)
        axes = {axis % rank for axis in (out_axis if isinstance(out_axis, tuple) else (out_axis,))}
        return tuple(kernel.shape[i] if i in axes else 1 for i in range(rank))

    def can_fold(self, layer):
        return activation_name(getattr(layer, "activation", None)) == "linear" and _channels_last(layer)


class FactsKernelHandler(KernelHandler):
    """Quantizes a layer kerasq knows only from its facts: its own `call` runs with the quantized
    kernels in place of its variables, and its output gets a learned range.

    Used for custom layers described once with `kerasq.graph.register_layer_facts`; their math stays
    theirs, so no activation is fused and no BatchNorm folded.
    """

    def __init__(self):
        super().__init__(fuses_activation=False)

    def kernel_axes(self, layer):
        return {name: None for name in facts_lib.layer_facts(layer).kernels}

    def linear(self, layer, inputs, kernels, bias):
        mapping = [(getattr(layer, name), value) for name, value in kernels.items()]
        with replaced_variables(layer, mapping):
            return layer.call(inputs)

    def can_fold(self, layer):
        return False


class DenseHandler(KernelHandler):
    """Dense: one weight scale per tensor, as TFLite's int8 spec has it for FULLY_CONNECTED."""

    def kernel_axes(self, layer):
        return {"kernel": None}

    def shared_kernel_axes(self, layer):
        # When one kernel feeds several FULLY_CONNECTED ops, the converter requantizes it with one
        # scale per output channel whatever its fake-quantization said: train it that way.
        return {"kernel": -1}

    def linear(self, layer, inputs, kernels, bias):
        kernel = kernels["kernel"]
        middle = tuple(inputs.shape[1:-1])
        if middle and None not in middle:
            # A constant-shape reshape around a 2D matmul: one FULLY_CONNECTED in the file, not the
            # ops that compute a dynamic shape for a batched matmul.
            flat = ops.matmul(ops.reshape(inputs, (-1, inputs.shape[-1])), kernel)
            outputs = ops.reshape(flat, (-1,) + middle + (kernel.shape[-1],))
        else:
            outputs = ops.matmul(inputs, kernel)
        return outputs if bias is None else ops.add(outputs, bias)


class ConvHandler(KernelHandler):
    """Conv1D/2D/3D: one weight scale per output channel."""

    reduced_int16_multiplier = True

    def kernel_view(self, layer, name, kernel):
        return _as_2d_kernel(layer, kernel)

    def linear(self, layer, inputs, kernels, bias):
        def conv(x, strides, padding, dilation_rate):
            if _dilated_on_tensorflow(layer, strides, dilation_rate):
                return _tf_dilated("Conv2D", x, kernels["kernel"], strides, padding, dilation_rate)
            return ops.conv(x, kernels["kernel"], strides, padding, layer.data_format, dilation_rate)

        return _add_bias(layer, _spatial_op(layer, inputs, conv), bias)


class ConvTransposeHandler(KernelHandler):
    """Conv1D/2D/3DTranspose: one weight scale per tensor. TFLite's TRANSPOSE_CONV could take one per
    output channel, but the converter transposes the kernel into its layout first and cannot carry a
    per-channel fake-quantization through that transpose ("mismatched quantized axes"). Nor does
    the converter fuse a ReLU into TRANSPOSE_CONV: it runs as an op of its own."""

    reduced_int16_multiplier = True

    def __init__(self):
        super().__init__(fuses_activation=False)

    def kernel_axes(self, layer):
        return {"kernel": None}

    def linear(self, layer, inputs, kernels, bias):
        outputs = ops.conv_transpose(
            inputs,
            kernels["kernel"],
            strides=list(layer.strides),
            padding=layer.padding,
            output_padding=layer.output_padding,
            dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )
        return _add_bias(layer, outputs, bias)


class EmbeddingHandler(KernelHandler):
    """Embedding: an int8 table with one scale, which TFLite's GATHER keeps for its output, so the
    output needs no range of its own."""

    def __init__(self):
        super().__init__(fuses_activation=False)

    def output_policy(self, layer):
        return PASS_THROUGH, None

    def kernel_axes(self, layer):
        return {"embeddings": None}

    def linear(self, layer, inputs, kernels, bias):
        return ops.take(kernels["embeddings"], ops.cast(inputs, "int32"), axis=0)

    def can_fold(self, layer):
        return False


class PReLUHandler(KernelHandler):
    """PReLU with its slopes fake-quantized as the file stores them: one symmetric int8 scale for
    the whole alpha tensor."""

    learns_weight_steps = False  # the converter quantizes the float alpha with its own scale

    def __init__(self):
        super().__init__(fuses_activation=False)

    def kernel_axes(self, layer):
        return {"alpha": None}

    def linear(self, layer, inputs, kernels, bias):
        # The converter quantizes the float alpha to the same int8 grid itself (a fake-quantized one
        # would stay float), from the form Keras writes, which it turns into one PRELU op.
        alpha = layer.alpha if is_tracing_for_export() else kernels["alpha"]
        return ops.relu(inputs) + -alpha * ops.relu(-inputs)

    def can_fold(self, layer):
        return False


class DepthwiseConvHandler(KernelHandler):
    """DepthwiseConv1D/2D: one weight scale per output channel (in_channels x depth_multiplier)."""

    reduced_int16_multiplier = True

    def kernel_view(self, layer, name, kernel):
        return _as_2d_kernel(layer, kernel)

    def linear(self, layer, inputs, kernels, bias):
        return _add_bias(layer, _depthwise(layer, inputs, kernels["kernel"]), bias)


class SeparableConvHandler(KernelHandler):
    """SeparableConv1D/2D: TFLite runs them as a depthwise then a 1x1 conv, with an int8 tensor
    between them, so the intermediate output is quantized too (see `QuantizeWrapper`)."""

    reduced_int16_multiplier = True

    def kernel_view(self, layer, name, kernel):
        return _as_2d_kernel(layer, kernel)

    def depthwise(self, layer, inputs, kernels):
        return _depthwise(layer, inputs, kernels["depthwise_kernel"])

    def pointwise(self, layer, inputs, kernels, bias):
        def conv(x, strides, padding, dilation_rate):
            ones = (1,) * len(strides)
            return ops.conv(x, kernels["pointwise_kernel"], ones, "valid", layer.data_format, ones)

        return _add_bias(layer, _spatial_op(layer, inputs, conv, pad=False), bias)

    def linear(self, layer, inputs, kernels, bias):
        return self.pointwise(layer, self.depthwise(layer, inputs, kernels), kernels, bias)


def _depthwise(layer, inputs, kernel):
    def depthwise(x, strides, padding, dilation_rate):
        if _dilated_on_tensorflow(layer, strides, dilation_rate):
            return _tf_dilated("DepthwiseConv2dNative", x, kernel, strides, padding, dilation_rate)
        return ops.depthwise_conv(x, kernel, strides, padding, layer.data_format, dilation_rate)

    return _spatial_op(layer, inputs, depthwise)


def _as_2d_kernel(layer, kernel):
    # TFLite has no 1D convolutions: the converter runs them as 2D ones and loses the per-channel
    # axis of a fake-quantized 1D kernel on the way, so 1D kernels are quantized in their 2D shape.
    return ops.expand_dims(kernel, 0) if layer.rank == 1 else kernel


def _spatial_op(layer, inputs, op, pad=True):
    """Runs `op(inputs, strides, padding, dilation_rate)` for `layer`, 1D layers as 2D ones."""
    padding = layer.padding
    if padding == "causal" and pad:
        left = layer.dilation_rate[0] * (layer.kernel_size[0] - 1)
        time_axis = 1 if layer.data_format == "channels_last" else 2
        paddings = [[0, 0], [0, 0], [0, 0]]
        paddings[time_axis] = [left, 0]
        inputs = ops.pad(inputs, paddings)
        padding = "valid"
    if layer.rank != 1:
        return op(inputs, tuple(layer.strides), padding, tuple(layer.dilation_rate))
    height_axis = 1 if layer.data_format == "channels_last" else 2
    outputs = op(
        ops.expand_dims(inputs, height_axis),
        (1,) + tuple(layer.strides),
        padding,
        (1,) + tuple(layer.dilation_rate),
    )
    return ops.squeeze(outputs, axis=height_axis)


def _dilated_on_tensorflow(layer, strides, dilation_rate):
    """A dilated 2D convolution traced for export on the TensorFlow backend, channels last, stride
    1. (Training keeps `keras.ops`: oneDNN has no gradient for a dilated depthwise op.)"""
    return (
        is_tracing_for_export()
        and keras.backend.backend() == "tensorflow"
        and any(rate > 1 for rate in dilation_rate)
        and len(dilation_rate) == 2
        and _channels_last(layer)
        and all(stride == 1 for stride in strides)
    )


def _tf_dilated(op_name, x, kernel, strides, padding, dilation_rate):
    """TensorFlow's own dilated Conv2D/DepthwiseConv2dNative op. `tf.nn.convolution` (what
    `keras.ops.conv` calls) dilates by SPACE_TO_BATCH_ND around an undilated conv, which the
    converter leaves in float between the fake-quant ops; this op becomes one int8 CONV_2D (or
    DEPTHWISE_CONV_2D) with its dilation factors."""
    import tensorflow as tf

    op = getattr(tf.raw_ops, op_name)
    return op(
        input=x, filter=kernel, strides=[1, *strides, 1], padding=padding.upper(),
        dilations=[1, *dilation_rate, 1],
    )


def _add_bias(layer, outputs, bias):
    if bias is None:
        return outputs
    if layer.data_format == "channels_first":
        bias = ops.reshape(bias, (1, -1) + (1,) * (len(outputs.shape) - 2))
    return ops.add(outputs, bias)


def _channels_last(layer):
    return getattr(layer, "data_format", "channels_last") == "channels_last"


def _call_is_inherited(cls, base):
    # The handler re-implements the registered class's `call` with quantized weights.
    return cls.call is base.call


_REGISTRY = ClassRegistry("quantization handlers", inherits=_call_is_inherited)
_FACTS_KERNEL_HANDLER = FactsKernelHandler()


def register_handler(layer_class, handler):
    """Tells kerasq how to quantize `layer_class` (and subclasses that keep its `call`).

    Returns a `Registration`: `undo()` it, or use it as a context manager to register for a block.

    Example:
    >>> import keras, kerasq
    >>> class Scale(keras.layers.Layer):
    ...     def call(self, x):
    ...         return 2.0 * x
    >>> with kerasq.register_handler(Scale, kerasq.quantization.LayerHandler()):
    ...     kerasq.quantization.get_handler(Scale()).output
    'quantize'
    """
    if not (isinstance(layer_class, type) and issubclass(layer_class, keras.layers.Layer)):
        raise TypeError(f"layer_class must be a keras Layer class; got {layer_class!r}.")
    if not isinstance(handler, LayerHandler):
        raise TypeError(f"handler must be a kerasq LayerHandler; got {handler!r}.")
    return _REGISTRY.register(layer_class, handler)


def get_handler(layer):
    """The handler for `layer`, or None when kerasq does not know how to quantize it.

    A subclass of a registered class shares its handler only if it does not override `call`, since
    the handler re-implements that `call` with quantized weights. A layer with no handler whose
    facts name its kernels (`kerasq.graph.register_layer_facts`) runs its own `call` with quantized
    kernels, provided it has no activation of its own to keep apart.
    """
    handler = _REGISTRY.lookup(layer)
    if handler is not None:
        return handler
    layer_facts = facts_lib.layer_facts(layer)
    if layer_facts is not None and layer_facts.kernels and activation_name(getattr(layer, "activation", None)) == "linear":
        return _FACTS_KERNEL_HANDLER
    return None


_AUGMENTATION_LAYERS = (
    "RandomFlip", "RandomRotation", "RandomTranslation", "RandomZoom", "RandomShear", "RandomContrast",
    "RandomBrightness", "RandomErasing", "RandomGaussianBlur", "RandomSharpness", "RandomPerspective",
    "RandomElasticTransform", "RandomHue", "RandomSaturation", "RandomColorJitter",
    "RandomColorDegeneration", "RandomPosterization", "RandomInvert", "RandomGrayscale",
)


def _register_builtin_handlers():
    pass_through = LayerHandler(output=PASS_THROUGH)
    for layer_class in (
        layers.MaxPooling1D, layers.MaxPooling2D, layers.MaxPooling3D,
        layers.Permute,
        layers.Dropout, layers.SpatialDropout1D, layers.SpatialDropout2D, layers.SpatialDropout3D,
        layers.GaussianNoise, layers.GaussianDropout, layers.AlphaDropout, layers.ActivityRegularization,
        layers.ZeroPadding1D, layers.ZeroPadding2D, layers.ZeroPadding3D,
        layers.Cropping1D, layers.Cropping2D, layers.Cropping3D,
        layers.Identity,
    ):
        register_handler(layer_class, pass_through)
    reshape = ReshapeHandler()
    for layer_class in (layers.Flatten, layers.Reshape):
        register_handler(layer_class, reshape)
    same_scale = LayerHandler(output=SAME_SCALE)
    for layer_class in (layers.AveragePooling1D, layers.AveragePooling2D, layers.AveragePooling3D):
        register_handler(layer_class, same_scale)
    upsampling = UpSamplingHandler()
    for layer_class in (layers.UpSampling1D, layers.UpSampling2D, layers.UpSampling3D):
        register_handler(layer_class, upsampling)
    register_handler(layers.Resizing, ResizingHandler())
    average = GlobalAveragePoolingHandler()
    for layer_class in (layers.GlobalAveragePooling1D, layers.GlobalAveragePooling2D, layers.GlobalAveragePooling3D):
        register_handler(layer_class, average)
    register_handler(layers.CenterCrop, CenterCropHandler())
    quantize = LayerHandler(output=QUANTIZE)
    for layer_class in (
        layers.GlobalMaxPooling1D, layers.GlobalMaxPooling2D, layers.GlobalMaxPooling3D,
        layers.Maximum, layers.Minimum, layers.Average,
        layers.ELU,
        layers.BatchNormalization, layers.Normalization,
        layers.Rescaling,
    ):
        register_handler(layer_class, quantize)
    # Data augmentation: the input itself at inference (so nothing in the file); while training, values
    # moved or mixed within the input's range, which the input's quantization keeps covering.
    for name in _AUGMENTATION_LAYERS:
        if hasattr(layers, name):
            register_handler(getattr(layers, name), pass_through)
    register_handler(layers.Multiply, MultiplyHandler())
    register_handler(layers.Concatenate, LayerHandler(output=QUANTIZE, producers_take_output_scale=True))
    register_handler(layers.Add, AddHandler())
    register_handler(layers.Subtract, LayerHandler(output=QUANTIZE, fuses_activation=True))
    activation = ActivationHandler()
    for layer_class in (layers.Activation, layers.ReLU, layers.Softmax):
        register_handler(layer_class, activation)
    register_handler(layers.LeakyReLU, LeakyReLUHandler())
    register_handler(layers.PReLU, PReLUHandler())
    register_handler(layers.Dense, DenseHandler())
    register_handler(layers.Embedding, EmbeddingHandler())
    conv = ConvHandler()
    for layer_class in (layers.Conv1D, layers.Conv2D, layers.Conv3D):
        register_handler(layer_class, conv)
    transpose = ConvTransposeHandler()
    for layer_class in (layers.Conv1DTranspose, layers.Conv2DTranspose, layers.Conv3DTranspose):
        register_handler(layer_class, transpose)
    depthwise = DepthwiseConvHandler()
    for layer_class in (layers.DepthwiseConv1D, layers.DepthwiseConv2D):
        register_handler(layer_class, depthwise)
    separable = SeparableConvHandler()
    for layer_class in (layers.SeparableConv1D, layers.SeparableConv2D):
        register_handler(layer_class, separable)


_register_builtin_handlers()
