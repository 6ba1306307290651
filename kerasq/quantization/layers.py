"""The layers a quantized model is made of: `Quantize` and `QuantizeWrapper`."""

import keras
import numpy as np
from keras import ops

from kerasq import _keras_private
from kerasq.graph import all_layers
from kerasq.quantization import handlers as handlers_lib
from kerasq.quantization import fixed_point, requantization, xnnpack
from kerasq.quantization.quantizers import ActivationQuantizer, is_calibrating, is_tracing_for_export
from kerasq.quantization.scheme import QuantizationScheme, get_scheme


@keras.saving.register_keras_serializable(package="kerasq")
class Quantize(keras.layers.Layer):
    """Fake-quantizes a float tensor with a range learned from the data.

    kerasq puts one after each model input, so the exported file takes int8 input, and after each
    layer left in float whose output feeds a quantized layer. With `requantizes=True` it quantizes
    again, at its own bit width, a tensor a layer of another bit width quantized (an int8 layer's
    output that an int16 layer reads, or the other way round): the file's QUANTIZE between int8
    and int16, whose fixed-point arithmetic it mirrors at inference.

    Example:
    >>> import numpy as np
    >>> from kerasq import Quantize
    >>> layer = Quantize()
    >>> y = layer(np.linspace(-1, 1, 5, dtype="float32")[None], training=True)
    >>> [round(float(v), 3) for v in np.asarray(y)[0]]
    [-0.996, -0.502, 0.0, 0.502, 1.004]
    """

    def __init__(self, quantizer=None, requantizes=False, **kwargs):
        super().__init__(**kwargs)
        if isinstance(quantizer, dict):
            quantizer = keras.saving.deserialize_keras_object(quantizer)
        self.quantizer = quantizer or ActivationQuantizer()
        self.requantizes = requantizes
        self.quantization_enabled = True  # False while kerasq.DelayQuantization holds it in float
        object.__setattr__(self, "_source_range", None)

    def __call__(self, inputs, *args, **kwargs):
        if self.requantizes:
            source = _input_range_of(inputs)
            if source is not None:  # (none when called on values)
                object.__setattr__(self, "_source_range", source)
        return super().__call__(inputs, *args, **kwargs)

    def build(self, input_shape):
        self._range = self.quantizer.build(self)

    def call(self, inputs, training=None):
        if self.requantizes and is_tracing_for_export():
            # Two fake-quant ops in a row are one to the converter, and it folds a QUANTIZE into
            # the conv or fully connected op before it, even from int8 to int16 (which LiteRT
            # cannot run): a reshape in between, which export then removes, keeps it a QUANTIZE.
            shape = tuple(inputs.shape[1:])
            inputs = ops.minimum(inputs, np.float32(np.finfo("float32").max))
            inputs = ops.reshape(ops.reshape(inputs, (-1, int(np.prod(shape)), 1)), (-1,) + shape)
        outputs = self.quantizer(inputs, self._range, training=bool(training), enabled=self.quantization_enabled)
        if self._mirrors_requantize(training):
            return self._requantized(inputs)
        if self._mirrors_int16_quantize(training):
            return self._quantized_like_int16_quantize(inputs)
        return outputs

    def _mirrors_int16_quantize(self, training):
        return (
            not self.requantizes and self.quantizer.bits == 16 and self.quantizer.fixed_range is None
            and not training and self.quantization_enabled
            and not (is_calibrating() or is_tracing_for_export())
        )

    def _quantized_like_int16_quantize(self, inputs):
        """`inputs` as LiteRT's default QUANTIZE from float to int16 computes them: times the
        float32 reciprocal of the scale, in float32, rounded half to even (its vector path; the
        reference kernel divides and rounds half away, a level apart on a few inputs in ten
        thousand). The fake-quant op adds the range's bottom first, which at 16 bits leaves the
        quotient up to 0.004 of a step off: 0.4-0.6% of inputs rounded to the other level."""
        step = handlers_lib.file_step(self.quantizer, self._range)
        reciprocal = ops.cast(1.0 / ops.cast(step, "float64"), "float32")
        levels = ops.clip(ops.round(ops.cast(inputs, "float32") * reciprocal), -(2.0**15), 2.0**15 - 1.0)
        return ops.cast(ops.cast(levels, "float64") * ops.cast(step, "float64"), inputs.dtype)

    def _mirrors_requantize(self, training):
        return (
            self.requantizes and not training and self.quantization_enabled and self._source_range is not None
            and not (is_calibrating() or is_tracing_for_export())
        )

    def _requantized(self, inputs):
        """`inputs` (on the source's grid) as LiteRT's QUANTIZE computes them between int8 and int16:
        the input level times `input scale / output scale` with TFLite's 31-bit fixed-point
        multiplier, plus the zero point, clamped to the output type."""
        source_step = handlers_lib.file_step(*self._source_range)
        step = handlers_lib.file_step(self.quantizer, self._range)
        _, zero_point = self.quantizer.grid(self._range)
        moved = fixed_point.multiply_by_quantized_multiplier(
            ops.round(inputs / source_step), ops.cast(source_step, "float64") / ops.cast(step, "float64")
        )
        level = ops.clip(moved + ops.cast(zero_point, "float64"), 0.0, 2.0**self.quantizer.bits - 1.0)
        return ops.cast((level - ops.cast(zero_point, "float64")) * ops.cast(step, "float64"), inputs.dtype)

    def quantization_ranges(self):
        """{"output": (min, max)}: the range this layer quantizes with."""
        return ranges_of(self.range_states())

    def range_states(self):
        """`[(name, quantizer, range variables)]` of this layer's activation ranges."""
        return [("output", self.quantizer, self._range)]

    def weight_step_states(self):
        """No weights, no learned steps (see `QuantizeWrapper.weight_step_states`)."""
        return []

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = {**super().get_config(), "quantizer": keras.saving.serialize_keras_object(self.quantizer)}
        if self.requantizes:
            config["requantizes"] = True
        return config


@keras.saving.register_keras_serializable(package="kerasq")
class QuantizeWrapper(keras.layers.Wrapper):
    """Runs a layer as its int8 TFLite counterpart will: quantized weights, quantized output.

    Kernels are fake-quantized per output channel (per tensor for Dense); a BatchNormalization that
    followed the layer in the float model is folded into it (`batchnorm`), so the kernel that trains is
    the kernel deployed; the output gets a learned range, TFLite's fixed range (softmax), or none when
    TFLite fuses the activation that follows (`quantize_output=False`) or keeps the input's (reshapes,
    max pooling). What each layer type does is its handler's business (`kerasq.register_handler`).

    Args:
        layer: the float layer, with its weights (the wrapper trains it in place).
        scheme: a `QuantizationScheme` or its name; defaults to "int8".
        batchnorm: a BatchNormalization layer to fold into `layer`, or None.
        quantize_output: False when a fused ReLU/ReLU6 follows and quantizes instead. For a layer the
            model calls more than once, one bool per call: each call then has its own ranges, as each
            becomes its own op in the exported file, and the model passes `call_index=i` to call `i`.

    Example:
    >>> import keras
    >>> from kerasq import QuantizeWrapper
    >>> wrapper = QuantizeWrapper(keras.layers.Dense(4))
    >>> tuple(wrapper(keras.ops.ones((2, 3))).shape)
    (2, 4)
    """

    def __init__(self, layer, scheme="int8", batchnorm=None, quantize_output=True, **kwargs):
        super().__init__(layer, **kwargs)
        # So that a call may mix tensors and flags in its keyword arguments, as the layer's may.
        _keras_private.take_keywords_apart(self, layer)
        if isinstance(scheme, dict):
            scheme = keras.saving.deserialize_keras_object(scheme)
        if isinstance(batchnorm, dict):
            batchnorm = keras.saving.deserialize_keras_object(batchnorm)
        self.scheme = get_scheme(scheme)
        self.handler = handlers_lib.get_handler(layer)
        if self.handler is None:
            raise ValueError(
                f"kerasq has no quantization handler for layer '{layer.name}' of class "
                f"{type(layer).__name__}. Leave it in float with "
                f"kerasq.quantize_model(model, skip=['{layer.name}']), or register one with "
                "kerasq.register_handler."
            )
        if batchnorm is not None and not (self.handler.has_kernels and self.handler.can_fold(layer)):
            raise ValueError(
                f"BatchNormalization cannot be folded into layer '{layer.name}' "
                f"({type(layer).__name__}): only a Conv/Dense with a linear activation takes one."
            )
        self.batchnorm = batchnorm
        # Switched by callbacks between training phases (kerasq.DelayQuantization, FreezeBatchNorm).
        self.quantization_enabled = True
        self.batchnorm_frozen = False
        if isinstance(quantize_output, (list, tuple)):
            if not quantize_output:
                raise ValueError("quantize_output needs one bool per call of the layer; got none.")
            self.quantize_output = tuple(bool(flag) for flag in quantize_output)
            per_call = self.quantize_output
        else:
            self.quantize_output = bool(quantize_output)
            per_call = (self.quantize_output,)
        self.supports_masking = getattr(layer, "supports_masking", False)
        self._policy, self._fixed_range = self.handler.output_policy(layer)
        # Not plain attribute assignment: Keras would track these as this layer's own state.
        object.__setattr__(self, "_output_quantizers", tuple(map(self._make_output_quantizer, per_call)))
        object.__setattr__(self, "_input_ranges", (None,) * len(per_call))
        # The (wrapper, call index) that quantizes a call's output for it (a fused ReLU), if any.
        object.__setattr__(self, "_output_quantized_by", (None,) * len(per_call))
        # A concatenation's inputs' own ranges, per call: None for an input it alone rounds.
        object.__setattr__(self, "_operand_ranges", (None,) * len(per_call))
        # Per call: whether a concatenation reads the output (of a pass-through or same-scale op).
        object.__setattr__(self, "_read_by_concatenation", (False,) * len(per_call))

    @property
    def calls(self):
        """How many calls of the layer this wrapper quantizes, each with its own ranges."""
        return len(self._output_quantizers)

    def __call__(self, inputs, *args, **kwargs):
        index = self._check_call_index(kwargs.get("call_index", 0))
        self._tell_producer_it_is_quantized_here(inputs, index)
        reads_operands = self.handler.producers_take_output_scale or self.handler.reads_operand_ranges
        if reads_operands and not isinstance(inputs, (list, tuple)):
            operands = self.handler.operands(inputs, *args, **kwargs)
        else:
            operands = inputs if reads_operands else None
        if operands is not None:
            sources = tuple(None if tensor is None else _input_range_of(tensor) for tensor in operands)
            if any(source is not None for source in sources):  # (none when called on values)
                operand_ranges = list(self._operand_ranges)
                operand_ranges[index] = sources
                object.__setattr__(self, "_operand_ranges", tuple(operand_ranges))
        reads_input = self.handler.has_kernels or self.handler.simulated or self.handler.intermediate_ranges(self.layer)
        if self._policy in (handlers_lib.PASS_THROUGH, handlers_lib.SAME_SCALE) or reads_input:
            # Pass-through and same-scale ops keep their input's quantization (and 16x8 kernels scale
            # by it): find whose it is. This runs whenever the model graph is built, by quantize_model
            # and by .keras loading alike.
            source = _input_range_of(inputs)
            if source is not None:
                ranges = list(self._input_ranges)
                ranges[index] = source
                object.__setattr__(self, "_input_ranges", tuple(ranges))
        return super().__call__(inputs, *args, **kwargs)

    def _tell_producer_it_is_quantized_here(self, inputs, index):
        # A concatenation quantizes each of its inputs that has no range of its own.
        several = self.handler.producers_take_output_scale and isinstance(inputs, (list, tuple))
        for tensor in inputs if several else (inputs,):
            producer, call_kwargs = _keras_private.producing_call(tensor)
            if isinstance(producer, QuantizeWrapper):
                producer_index = call_kwargs.get("call_index", 0)
                if several and producer._policy in (handlers_lib.PASS_THROUGH, handlers_lib.SAME_SCALE):
                    read = list(producer._read_by_concatenation)
                    read[producer_index] = True
                    object.__setattr__(producer, "_read_by_concatenation", tuple(read))
                if producer._output_quantizers[producer_index] is None:
                    quantized_by = list(producer._output_quantized_by)
                    quantized_by[producer_index] = (self, index)
                    object.__setattr__(producer, "_output_quantized_by", tuple(quantized_by))

    def _check_call_index(self, index):
        if not isinstance(index, int) or not 0 <= index < self.calls:
            raise ValueError(
                f"QuantizeWrapper '{self.name}' quantizes {self.calls} call(s) of its layer; "
                f"call_index must be an int from 0 to {self.calls - 1}, got {index!r}."
            )
        return index

    # ---- building -------------------------------------------------------------------------------
    def build(self, input_shape):
        super().build(input_shape)
        if self.batchnorm is not None and not self.batchnorm.built:
            self.batchnorm.build(self.layer.compute_output_shape(input_shape))
        if self.batchnorm is not None and _freezes_after_steps(self.scheme.freeze_batchnorm):
            # How many training steps have run with batch statistics; only a step count needs it.
            self._batchnorm_steps = self.add_weight(
                name="batchnorm_steps", shape=(), initializer="zeros", trainable=False
            )
        self._ranges = [self._build_ranges(index) for index in range(self.calls)]
        self._weight_steps = self._build_weight_steps()

    def _build_weight_steps(self):
        """{kernel name: learned step state} for a `WeightQuantizer(learn_scale=True)`, else {}.
        One step per output channel of the kernel as it is quantized (after `kernel_view`, folded
        with a BatchNorm's scale: the deployed kernel), or one per tensor."""
        handler, layer = self.handler, self.layer
        learns = self.scheme.weights.learn_scale and handler.has_kernels and handler.learns_weight_steps
        if not learns or self._kernels_requantized:
            return {}
        axes = handler.kernel_axes(layer) if self.calls == 1 else handler.shared_kernel_axes(layer)
        steps = {}
        for name, axis in axes.items():
            shape = tuple(handler.kernel_view(layer, name, getattr(layer, name)).shape)
            if axis is None:
                channels = None
            elif axis == "depthwise":
                channels = shape[-2] * shape[-1]
            else:
                channels = shape[axis]
            steps[name] = self.scheme.weights.build(self, name, channels)
        return steps

    def _build_ranges(self, index):
        """The range variables of call `index`; the first call's names carry no suffix."""
        suffix = _call_suffix(index)
        activations, ranges = self.scheme.activations, {}
        if self.handler.has_kernels:
            if isinstance(self.handler, handlers_lib.SeparableConvHandler):
                ranges["depthwise"] = activations.build(self, "depthwise" + suffix)
            if not self._activation_fuses:
                ranges["pre_activation"] = activations.build(self, "pre_activation" + suffix)
        for name in self.handler.intermediate_ranges(self.layer):
            ranges[name] = activations.build(self, name + suffix)
        if self._output_quantizers[index] is not None:
            ranges["output"] = self._output_quantizers[index].build(self, "output" + suffix)
        return ranges

    @property
    def _activation_fuses(self):
        name = handlers_lib.activation_name(getattr(self.layer, "activation", None))
        return name in self.handler.fused_activations

    def _make_output_quantizer(self, quantize_output):
        if self._policy in (handlers_lib.PASS_THROUGH, handlers_lib.SAME_SCALE) or not quantize_output:
            return None
        if self._policy == handlers_lib.FIXED:
            bits = self.scheme.activations.bits
            return self.scheme.activations.with_fixed_range(handlers_lib.fixed_range_for_bits(self._fixed_range, bits))
        return self.scheme.activations

    # ---- the forward pass -----------------------------------------------------------------------
    def call(self, inputs, *args, training=None, call_index=0, **kwargs):
        training = bool(training)
        ranges = self._ranges[call_index]
        concatenates = self.handler.producers_take_output_scale and self._operand_ranges[call_index]
        if concatenates and not training and self._mirrors_int8_kernels:
            inputs = self._requantize_operands(inputs, call_index)
        if self.handler.has_kernels:
            outputs = self._call_kernels(inputs, ranges, training)
        elif self.handler.intermediate_ranges(self.layer) or self.handler.simulated:
            simulation = handlers_lib.Simulation(
                self, ranges, training, self._input_ranges[call_index], self._concatenation_range(call_index),
                self._operand_ranges[call_index],
            )
            outputs = self.handler.run_simulated(self.layer, simulation, inputs, *args, **kwargs)
        else:
            outputs = self.handler.run(self.layer, inputs, *args, **kwargs)
        input_range = self._input_ranges[call_index]
        rounds = self._policy == handlers_lib.SAME_SCALE and input_range is not None
        if rounds and not is_tracing_for_export():
            quantizer, state = input_range
            outputs = self.handler.round_to_input_grid(self.layer, outputs, quantizer, state)
        output_quantizer = self._output_quantizers[call_index]
        if output_quantizer is not None and isinstance(outputs, (tuple, list)):
            # The layer's output and what else it returns, which its handler rounds (attention's scores).
            first = output_quantizer(outputs[0], ranges["output"], training=training, enabled=self.quantization_enabled)
            outputs = type(outputs)((first, *outputs[1:]))
        elif output_quantizer is not None:
            outputs = output_quantizer(outputs, ranges["output"], training=training, enabled=self.quantization_enabled)
        elif is_tracing_for_export():
            outputs = self._quantize_at_concatenation_range(outputs, call_index)
        return outputs

    @property
    def _mirrors_int8_kernels(self):
        """True where int8 kernels' arithmetic is simulated (see `Simulation.mirrors_int8_kernels`)."""
        return self.quantization_enabled and self.scheme.activations.bits == 8 and not (
            is_calibrating() or is_tracing_for_export()
        )

    def _requantize_operands(self, inputs, call_index):
        """A concatenation's inputs that have a scale of their own moved onto its output's grid as the
        file's QUANTIZE op before it does (`xnnpack.requantize`), at inference; the output's rounding
        then leaves them as they are."""
        output = self.output_range_of(call_index)
        if output is None:
            return inputs
        output_step = handlers_lib.file_step(*output)
        return type(inputs)(
            tensor if source is None else xnnpack.requantize(tensor, handlers_lib.file_step(*source), output_step)
            for tensor, source in zip(inputs, self._operand_ranges[call_index])
        )

    def _quantize_at_concatenation_range(self, outputs, call_index):
        """For the export trace: `outputs` fake-quantized with the range of the concatenation that
        rounds them in the QAT model (the one op they feed, through pass-through ops), if any.

        The converter writes a concatenation and its inputs at one scale. Which one it picks depends
        on the fake-quant ops around it: with an input that has a range of its own (the model input, a
        tensor other layers read too) and one that has none, it takes the former's scale for the
        concatenation and this input, clips this input's values to that range and requantizes the
        concatenation after it. With every input quantized it takes the concatenation's own scale,
        writes this input directly at that scale and requantizes the others to it (QUANTIZE ops): the
        QAT model's arithmetic, where this input is rounded once, to the concatenation's range. The
        fake-quant added here is that range, so it changes no value.
        """
        if not self.quantization_enabled:
            return outputs
        if self._policy in (handlers_lib.PASS_THROUGH, handlers_lib.SAME_SCALE):
            # Read by a concatenation, the output of a pass-through op (a max pooling) is quantized with
            # its own range (its input's), which changes no value: without it the converter would
            # requantize that op's output to the concatenation's scale for all its readers, and a
            # convolution beside the concatenation would read the coarser values.
            source = self.output_range_of(call_index)
            if source is None or not self._read_by_concatenation[call_index]:
                return outputs
            return source[0](outputs, source[1], training=False)
        source = self._concatenation_range(call_index)
        return outputs if source is None else source[0](outputs, source[1], training=False)

    def _concatenation_range(self, call_index):
        """`(quantizer, range variables)` of the concatenation that rounds call `call_index`'s output
        in the QAT model, where the output has no range of its own and feeds the concatenation alone
        (through pass-through ops); else None."""
        if self._policy in (handlers_lib.PASS_THROUGH, handlers_lib.SAME_SCALE):
            return None
        wrapper, index = self, call_index
        while True:
            quantized_by = wrapper._output_quantized_by[index]
            if quantized_by is None:
                return None
            wrapper, index = quantized_by
            if wrapper._output_quantizers[index] is not None:
                break
            if wrapper._policy != handlers_lib.PASS_THROUGH:
                return None
        if not (wrapper.handler.producers_take_output_scale and wrapper.quantization_enabled):
            return None
        return wrapper.output_range_of(index)

    def _quantize_activation(self, x, state, training):
        return self.scheme.activations(x, state, training=training, enabled=self.quantization_enabled)

    def _call_kernels(self, inputs, ranges, training):
        layer, handler = self.layer, self.handler
        kernels = {name: getattr(layer, name) for name in handler.kernel_axes(layer)}
        bias = layer.bias if getattr(layer, "use_bias", False) else None
        if self.batchnorm is None:
            outputs = self._linear(inputs, self._quantize_kernels(kernels, training=training), bias, ranges, training)
        else:
            outputs = self._linear_with_batchnorm(inputs, kernels, bias, ranges, training)
        if not self._activation_fuses:
            outputs = self._quantize_activation(outputs, ranges["pre_activation"], training)
        activation = getattr(layer, "activation", None)
        if activation is not None:
            outputs = handlers_lib.run_activation(activation, outputs)
        return outputs

    def _quantize_kernels(self, kernels, force=False, training=False):
        handler, layer = self.handler, self.layer
        views = {name: handler.kernel_view(layer, name, kernel) for name, kernel in kernels.items()}
        if not (self.quantization_enabled or force):
            return views
        axes = handler.kernel_axes(layer) if self.calls == 1 else handler.shared_kernel_axes(layer)
        steps = getattr(self, "_weight_steps", {})
        return {
            name: _quantize_kernel(self.scheme.weights, view, axes[name], steps.get(name), training)
            for name, view in views.items()
        }

    @property
    def _kernels_requantized(self):
        """True when the converter requantizes this layer's kernels from their values rather than
        keep the fake-quant op's scales: a Dense kernel that feeds several FULLY_CONNECTED ops gets
        8-bit scales per channel, the largest magnitude / 127, whatever its bit width."""
        handler = self.handler
        return self.calls > 1 and handler.has_kernels and handler.shared_kernel_axes(self.layer) != handler.kernel_axes(self.layer)

    def _kernel_steps(self, kernels, name, axis, dtype="float32"):
        """The file's scale of each output channel of the quantized kernel `kernels[name]`: a learned
        step where there is one (a channel need not reach the end of its range)."""
        steps = requantization.kernel_steps(self.scheme.weights, ops.cast(kernels[name], dtype), axis)
        if self._kernels_requantized:
            return steps * (self.scheme.weights.levels / 127.0)
        state = getattr(self, "_weight_steps", {}).get(name)
        if state is None:
            return steps
        return ops.cast(self.scheme.weights.learned_step(state, ops.cast(steps, "float32")), dtype)

    def weight_step_states(self):
        """`[(kernel name, weight quantizer, learned step state)]` of this layer's learned steps."""
        return [(name, self.scheme.weights, state) for name, state in getattr(self, "_weight_steps", {}).items()]

    def weight_quantization_error(self):
        """{kernel name: RMS of the rounding error / RMS of the kernel}, for each kernel as it is
        deployed (a folded BatchNorm's scale included)."""
        if not self.handler.has_kernels:
            return {}
        handler, layer = self.handler, self.layer
        kernels = {name: getattr(layer, name) for name in handler.kernel_axes(layer)}
        if self.batchnorm is not None:
            scale, _ = batchnorm_fold(self.batchnorm, ops.zeros(self.batchnorm.moving_mean.shape))
            kernels = handler.fold_scale(layer, kernels, scale)
        quantized = self._quantize_kernels(kernels, force=True)
        errors = {}
        for name, kernel in kernels.items():
            view = ops.convert_to_numpy(handler.kernel_view(layer, name, kernel))
            rounding = ops.convert_to_numpy(quantized[name]) - view
            errors[name] = float(np.sqrt(np.mean(rounding**2)) / max(np.sqrt(np.mean(view**2)), 1e-12))
        return errors

    def _linear(self, inputs, kernels, bias, ranges, training):
        handler = self.handler
        index = next(i for i, each in enumerate(self._ranges) if each is ranges)
        if isinstance(handler, handlers_lib.SeparableConvHandler):
            middle = handler.depthwise(self.layer, inputs, kernels)
            middle_range = (self.scheme.activations, ranges["depthwise"])
            middle = self._requantize_like_int16_kernels(
                middle, kernels, "depthwise_kernel", self._input_ranges[index], middle_range
            )
            middle = self._quantize_activation(middle, ranges["depthwise"], training)
            bias = self._bias_on_int32_grid(bias, kernels, "pointwise_kernel", middle_range)
            outputs = handler.pointwise(self.layer, middle, kernels, bias)
            return self._requantize_like_int16_kernels(
                outputs, kernels, "pointwise_kernel", middle_range, self._kernel_output_range(index, ranges)
            )
        name, input_range, output_range = next(iter(kernels)), self._input_ranges[index], self._kernel_output_range(index, ranges)
        if not training and self._computes_like_int16_kernels(input_range, output_range) and _exact_in_float64():
            return self._int16_kernel_outputs(inputs, kernels, bias, name, input_range, output_range)
        bias = self._bias_on_int32_grid(bias, kernels, name, input_range)
        outputs = handler.linear(self.layer, inputs, kernels, bias)
        return self._requantize_like_int16_kernels(outputs, kernels, name, input_range, output_range)

    def _computes_like_int16_kernels(self, input_range, output_range):
        """`_requantizes_like_int16_kernels`, for Dense too (whose 16x8 kernel keeps the 31-bit
        multiplier)."""
        if isinstance(self.handler, handlers_lib.DenseHandler):
            return self._requantizes_like_int16_kernels(input_range, output_range, every_multiplier=True)
        return self._requantizes_like_int16_kernels(input_range, output_range)

    def _int16_kernel_outputs(self, inputs, kernels, bias, name, input_range, output_range):
        """At inference, a 16x8 conv's or Dense's outputs as LiteRT computes them: the int64 sum of
        int16 inputs times int8 weights plus the int64 bias, exact in float64, scaled to the output
        as the kernel scales it: with the 15-bit multiplier for convolutions
        (`fixed_point.multiply_wide_accumulator`), as `requantization.fully_connected_int16` says
        for FULLY_CONNECTED. Summed in float32, hundreds of products of 16-bit values round by
        enough to put 0.05-0.2% of a layer's outputs a step off the file's, 2-3 steps after six
        layers."""
        axis = self._kernel_axis(name)
        input_step = requantization.file_scale(handlers_lib.file_step(*input_range))
        kernel_steps = requantization.file_scale(self._kernel_steps(kernels, name, axis, dtype="float64"))
        levels = requantization.file_levels(inputs, input_step)
        kernel = ops.cast(kernels[name], "float64")
        kernel_levels = ops.round(kernel / _along_output_channels(kernel_steps, axis, kernel.shape))
        bias_levels = None if bias is None else _bias_levels(bias, self._bias_step(kernels, name, input_range))
        accumulator = self.handler.linear(self.layer, levels, {name: kernel_levels}, bias_levels)
        output_step = requantization.file_scale(handlers_lib.file_step(*output_range))
        if self.handler.reduced_int16_multiplier:
            multiplier = input_step * kernel_steps / output_step
            output_levels = fixed_point.multiply_wide_accumulator(
                accumulator, requantization.along_channels(multiplier, self.layer, len(accumulator.shape))
            )
        else:
            output_levels = requantization.fully_connected_int16(accumulator, input_step, kernel_steps, output_step, bias)
        output_levels = ops.clip(output_levels, -32768.0, 32767.0)
        return ops.cast(output_levels * output_step, inputs.dtype)

    def _kernel_axis(self, name):
        axes = self.handler.kernel_axes(self.layer) if self.calls == 1 else self.handler.shared_kernel_axes(self.layer)
        return axes[name]

    def _bias_step(self, kernels, name, input_range):
        """The file's bias scale per output channel, input scale x weight scale, in float64 as the
        converter computes it."""
        return ops.stop_gradient(
            requantization.activation_step(*input_range, dtype="float64")
            * self._kernel_steps(kernels, name, self._kernel_axis(name), dtype="float64")
        )

    def _bias_on_int32_grid(self, bias, kernels, name, input_range):
        """`bias` rounded as the file stores it: integers in steps of input scale x weight scale (per
        output channel), which the converter computes in float64 and rounds half away from zero.
        Negligible with 8-bit weights, but for ties: an affine map that is exact on the input's grid
        (Rescaling(2, offset=-1) on [0, 1]) puts its bias, and so every output, on a half step, and
        the file rounds them all one way. With 4 bits and fewer a weight step is 9-127 times coarser,
        and so is the bias's, by enough to move 1 output in 10 by a step. The gradient passes
        straight through; the export trace leaves the rounding to the converter."""
        if bias is None or input_range is None or not self.quantization_enabled or is_tracing_for_export():
            return bias
        step = self._bias_step(kernels, name, input_range)
        rounded = ops.stop_gradient(ops.cast(_bias_levels(bias, step) * step, bias.dtype))
        return rounded + (bias - ops.stop_gradient(bias))  # exactly `rounded`, gradient as for `bias`

    def _requantizes_like_int16_kernels(self, input_range, output_range, every_multiplier=False):
        """True where the file's op scales its int64 accumulator with LiteRT's 15-bit multiplier (any
        multiplier with `every_multiplier`) and the QAT model mirrors it: 16-bit, quantizing,
        neither calibrating nor tracing for export."""
        return (
            self.scheme.activations.bits == 16
            and (self.handler.reduced_int16_multiplier or every_multiplier)
            and self.quantization_enabled
            and input_range is not None
            and output_range is not None
            and not is_tracing_for_export()
            and not is_calibrating()
        )

    def _requantize_like_int16_kernels(self, outputs, kernels, name, input_range, output_range):
        """`outputs` scaled by the error of the 15-bit multiplier LiteRT's 16x8 kernels requantize with
        (`kerasq.quantization.requantization`); unchanged for int8, and when tracing for export."""
        if not self._requantizes_like_int16_kernels(input_range, output_range):
            return outputs
        multiplier = (
            requantization.activation_step(*input_range)
            * self._kernel_steps(kernels, name, self._kernel_axis(name))
            / requantization.activation_step(*output_range)
        )
        return requantization.scale_channels(outputs, requantization.multiplier_error(multiplier), self.layer)

    def _kernel_output_range(self, index, ranges):
        """`(quantizer, range variables)` the file's Conv/Dense op of call `index` writes its output with."""
        if "pre_activation" in ranges:
            return self.scheme.activations, ranges["pre_activation"]
        if self._output_quantizers[index] is not None:
            return self._output_quantizers[index], ranges["output"]
        quantized_by = self._output_quantized_by[index]
        if quantized_by is None or not quantized_by[0].built:
            return None
        consumer, consumer_index = quantized_by
        return consumer.output_range_of(consumer_index)

    def _linear_with_batchnorm(self, inputs, kernels, bias, ranges, training):
        """Conv/Dense with BatchNorm folded in, as in Jacob et al. (2018) and PyTorch's ConvBn.

        The kernel is always folded with the moving variance, so it is quantized exactly as it will be
        deployed. With `freeze_batchnorm=True` (what `quantize_model` makes of the default "auto" for a
        trained BatchNorm) training normalizes with the moving statistics too, so the network that
        trains is the network deployed. With `freeze_batchnorm=False` (or for
        the first `freeze_batchnorm` steps when it is a step count) the folded output is scaled back and
        normalized with the batch's statistics, which also update the moving ones, as float BatchNorm
        training does.
        """
        bn = self.batchnorm
        gamma, beta = batchnorm_affine(bn)
        layer_bias = bias
        bias = bias if bias is not None else ops.zeros(bn.moving_mean.shape)
        scale, folded_bias = batchnorm_fold(bn, bias)
        folded = self._quantize_kernels(self.handler.fold_scale(self.layer, kernels, scale), training=training)
        freeze = self.scheme.freeze_batchnorm
        if not training or not bn.trainable or freeze is True or freeze == "auto" or self.batchnorm_frozen:
            return self._linear(inputs, folded, folded_bias, ranges, training)
        linear = self._linear(inputs, folded, None, ranges, training)
        unfolded = linear * (1.0 / scale)
        if layer_bias is not None:  # (a constant per channel: it only moves the mean)
            unfolded = unfolded + layer_bias
        reduce_axes = tuple(range(len(unfolded.shape) - 1))
        # As float BatchNormalization(synchronized=True) does: statistics of the global batch, so the
        # moving statistics agree across replicas (otherwise each replica's copy follows its own).
        mean, variance = ops.moments(unfolded, axes=reduce_axes, synchronized=getattr(bn, "synchronized", False))
        normalized = (unfolded - mean) * (gamma * ops.rsqrt(variance + bn.epsilon)) + beta
        momentum = bn.momentum
        moving_mean = bn.moving_mean * momentum + ops.stop_gradient(mean) * (1 - momentum)
        moving_variance = bn.moving_variance * momentum + ops.stop_gradient(variance) * (1 - momentum)
        if not _freezes_after_steps(freeze):
            bn.moving_mean.assign(moving_mean)
            bn.moving_variance.assign(moving_variance)
            return normalized
        # Batch statistics for the first `freeze` steps, then the moving ones, frozen from then on.
        warming_up = ops.less(self._batchnorm_steps, float(freeze))
        bn.moving_mean.assign(ops.where(warming_up, moving_mean, ops.convert_to_tensor(bn.moving_mean)))
        bn.moving_variance.assign(ops.where(warming_up, moving_variance, ops.convert_to_tensor(bn.moving_variance)))
        self._batchnorm_steps.assign(ops.minimum(self._batchnorm_steps + 1.0, float(freeze)))
        return ops.where(warming_up, normalized, linear + folded_bias)

    def compute_output_shape(self, input_shape, *args, call_index=0, **kwargs):
        return self.layer.compute_output_shape(input_shape, *args, **kwargs)

    def compute_mask(self, inputs, previous_mask=None):
        # The layer's own Keras mask (an Embedding's with mask_zero), which Keras's Wrapper drops.
        return self.layer.compute_mask(inputs, previous_mask)

    def compute_output_spec(self, inputs, *args, training=None, call_index=0, **kwargs):
        # The wrapped layer's answer: traced from its `call` when it has no `compute_output_shape`.
        return self.layer.compute_output_spec(inputs, *args, **kwargs)

    # ---- introspection and serialization --------------------------------------------------------
    def quantization_ranges(self):
        """{name: (min, max)} of every activation range this layer quantizes with.

        A shared layer's later calls have their own, named with a `_call<i>` suffix.
        """
        return ranges_of(self.range_states())

    def range_states(self):
        """`[(name, quantizer, range variables)]` of every activation range this layer owns."""
        states = []
        for index, ranges in enumerate(self._ranges):
            for name, state in ranges.items():
                quantizer = self._output_quantizers[index] if name == "output" else self.scheme.activations
                states.append((name + _call_suffix(index), quantizer, state))
        return states

    @property
    def output_range(self):
        """`(quantizer, range variables)` this layer's output is quantized with, or None."""
        return self.output_range_of(0)

    def output_range_of(self, call_index):
        """`(quantizer, range variables)` of call `call_index`'s output, or None."""
        quantizer = self._output_quantizers[call_index]
        if quantizer is not None:
            return quantizer, self._ranges[call_index]["output"]
        if self._policy in (handlers_lib.PASS_THROUGH, handlers_lib.SAME_SCALE):
            return self._input_ranges[call_index]
        return None

    def get_config(self):
        config = super().get_config()
        config.update(
            scheme=keras.saving.serialize_keras_object(self.scheme),
            batchnorm=(
                keras.saving.serialize_keras_object(self.batchnorm) if self.batchnorm else None
            ),
            quantize_output=self.quantize_output,
        )
        return config


def quantized_layers(model):
    """The `Quantize` and `QuantizeWrapper` layers of `model` (nested models and wrappers included):
    the layers that own activation ranges and quantization switches."""
    return [layer for layer in all_layers(model) if isinstance(layer, (Quantize, QuantizeWrapper))]


def ranges_of(range_states):
    """{name: (min, max)} of `[(name, quantizer, range variables)]`."""
    result = {}
    for name, quantizer, state in range_states:
        low, high = quantizer.range(state)
        result[name] = (float(low), float(high))
    return result


def _freezes_after_steps(freeze_batchnorm):
    """True when `freeze_batchnorm` is a step count rather than always (True, "auto" as quantize_model
    did not resolve it) or never (False)."""
    return not isinstance(freeze_batchnorm, (bool, str))


def batchnorm_affine(bn):
    """`(gamma, beta)` of a BatchNormalization, ones and zeros where it has none."""
    gamma = bn.gamma if bn.scale else ops.ones(bn.moving_variance.shape)
    beta = bn.beta if bn.center else ops.zeros(bn.moving_mean.shape)
    return gamma, beta


def batchnorm_fold(bn, bias):
    """`(scale, folded_bias)` that fold `bn`, with its moving statistics, into the layer before it:
    that layer's kernel times `scale` per output channel, and `folded_bias` in place of `bias`."""
    gamma, beta = batchnorm_affine(bn)
    scale = gamma * ops.rsqrt(bn.moving_variance + bn.epsilon)
    return scale, beta + (bias - bn.moving_mean) * scale


def _bias_levels(bias, step):
    """`bias / step` in float64, rounded half away from zero (as the converter rounds biases)."""
    return fixed_point.round_half_away(ops.cast(bias, "float64") / step)


def _exact_in_float64():
    """True on backends that compute in float64 when asked (JAX does only with x64 enabled)."""
    if keras.backend.backend() != "jax":
        return True
    import jax

    return bool(jax.config.jax_enable_x64)


def _along_output_channels(steps, axis, shape):
    """Per-output-channel `steps` shaped to divide a kernel of `shape` whose output channels lie on
    `axis` (an int, "depthwise" for the last two axes flattened, or None for one step)."""
    rank = len(shape)
    if axis is None or len(steps.shape) == 0:
        return steps
    if axis == "depthwise":
        return ops.reshape(steps, (1,) * (rank - 2) + tuple(shape[-2:]))
    broadcast = [1] * rank
    broadcast[axis % rank] = -1
    return ops.reshape(steps, broadcast)


def _call_suffix(index):
    return "" if index == 0 else f"_call{index}"


def _input_range_of(inputs):
    layer, call_kwargs = _keras_private.producing_call(inputs)
    if getattr(inputs, "_keras_history", (None, 0, 0))[2]:
        return None  # a layer's second output (attention's scores) has no range of its own here
    if isinstance(layer, Quantize):
        return layer.quantizer, layer._range
    if isinstance(layer, QuantizeWrapper):
        return layer.output_range_of(call_kwargs.get("call_index", 0))
    return None


def _quantize_kernel(quantizer, kernel, axis, state=None, training=False):
    if axis != "depthwise":
        return quantizer(kernel, channel_axis=axis, state=state, training=training)
    # A depthwise kernel [..., in_channels, multiplier] feeds output channel c * multiplier + m from
    # kernel[..., c, m]: TFLite keeps one scale per output channel, so quantize over both axes at once.
    shape = ops.shape(kernel)
    flat = ops.reshape(kernel, tuple(shape[:-2]) + (shape[-2] * shape[-1],))
    return ops.reshape(quantizer(flat, channel_axis=-1, state=state, training=training), shape)


__all__ = ["Quantize", "QuantizeWrapper", "QuantizationScheme"]
