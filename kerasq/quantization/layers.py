"""The layers a quantized model is made of: `Quantize` and `QuantizeWrapper`."""

import contextlib
import contextvars

import keras
from keras import ops

from kerasq import _keras_private
from kerasq.quantization import handlers as handlers_lib
from kerasq.quantization.quantizers import ActivationQuantizer
from kerasq.quantization.scheme import QuantizationScheme, get_scheme


_TRACING_FOR_EXPORT = contextvars.ContextVar("kerasq_tracing_for_export", default=False)


@contextlib.contextmanager
def tracing_for_export():
    """While active, layers trace the graph the TFLite converter expects rather than simulate it.

    The only difference: same-scale ops (average pooling, bilinear resizing) skip the rounding that
    mirrors TFLite's integer kernels, since in the exported file those kernels do it themselves.
    """
    token = _TRACING_FOR_EXPORT.set(True)
    try:
        yield
    finally:
        _TRACING_FOR_EXPORT.reset(token)


@keras.saving.register_keras_serializable(package="kerasq")
class Quantize(keras.layers.Layer):
    """Fake-quantizes a float tensor with a range learned from the data.

    kerasq puts one after each model input, so the exported file takes int8 input, and after each
    layer left in float whose output feeds a quantized layer.

    Example:
    >>> import numpy as np
    >>> layer = Quantize()
    >>> y = layer(np.linspace(-1, 1, 5, dtype="float32")[None], training=True)
    >>> [round(float(v), 3) for v in np.asarray(y)[0]]
    [-0.996, -0.502, 0.0, 0.502, 1.004]
    """

    def __init__(self, quantizer=None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(quantizer, dict):
            quantizer = keras.saving.deserialize_keras_object(quantizer)
        self.quantizer = quantizer or ActivationQuantizer()

    def build(self, input_shape):
        self._range = self.quantizer.build(self)

    def call(self, inputs, training=None):
        return self.quantizer(inputs, self._range, training=bool(training))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "quantizer": keras.saving.serialize_keras_object(self.quantizer),
        }


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
        quantize_output: False when a fused ReLU/ReLU6 follows and quantizes instead.

    Example:
    >>> import keras
    >>> wrapper = QuantizeWrapper(keras.layers.Dense(4))
    >>> tuple(wrapper(keras.ops.ones((2, 3))).shape)
    (2, 4)
    """

    def __init__(self, layer, scheme="int8", batchnorm=None, quantize_output=True, **kwargs):
        super().__init__(layer, **kwargs)
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
        self.quantize_output = bool(quantize_output)
        self.supports_masking = getattr(layer, "supports_masking", False)
        self._policy = self.handler.output_policy(layer)[0]
        self._input_range = None

    def __call__(self, inputs, *args, **kwargs):
        if self._policy in (handlers_lib.PASS_THROUGH, handlers_lib.SAME_SCALE):
            # Pass-through and same-scale ops keep their input's quantization: find whose it is. This
            # runs whenever the model graph is built, by quantize_model and by .keras loading alike.
            source = _input_range_of(inputs)
            if source is not None:
                # Not `self._input_range = ...`: Keras would track the other layer's variables as ours.
                object.__setattr__(self, "_input_range", source)
        return super().__call__(inputs, *args, **kwargs)

    # ---- building -------------------------------------------------------------------------------
    def build(self, input_shape):
        super().build(input_shape)
        if self.batchnorm is not None and not self.batchnorm.built:
            self.batchnorm.build(self.layer.compute_output_shape(input_shape))
        activations = self.scheme.activations
        self._ranges = {}
        if self.handler.has_kernels:
            if isinstance(self.handler, handlers_lib.SeparableConvHandler):
                self._ranges["depthwise"] = activations.build(self, "depthwise")
            if not self._activation_fuses:
                self._ranges["pre_activation"] = activations.build(self, "pre_activation")
        self._output_quantizer = self._make_output_quantizer()
        if self._output_quantizer is not None:
            self._ranges["output"] = self._output_quantizer.build(self, "output")

    @property
    def _activation_fuses(self):
        name = handlers_lib.activation_name(self.layer.activation)
        return name in handlers_lib.FUSABLE_ACTIVATIONS

    def _make_output_quantizer(self):
        policy, fixed_range = self.handler.output_policy(self.layer)
        if policy in (handlers_lib.PASS_THROUGH, handlers_lib.SAME_SCALE) or not self.quantize_output:
            return None
        if policy == handlers_lib.FIXED:
            return self.scheme.activations.with_fixed_range(fixed_range)
        return self.scheme.activations

    # ---- the forward pass -----------------------------------------------------------------------
    def call(self, inputs, *args, training=None, **kwargs):
        training = bool(training)
        if self.handler.has_kernels:
            outputs = self._call_kernels(inputs, training)
        else:
            outputs = self.handler.run(self.layer, inputs, *args, **kwargs)
        rounds = self._policy == handlers_lib.SAME_SCALE and self._input_range is not None
        if rounds and not _TRACING_FOR_EXPORT.get():
            quantizer, state = self._input_range
            outputs = quantizer.round_like_tflite(outputs, state)
        if self._output_quantizer is not None:
            outputs = self._output_quantizer(outputs, self._ranges["output"], training=training)
        return outputs

    def _call_kernels(self, inputs, training):
        layer, handler = self.layer, self.handler
        kernels = {name: getattr(layer, name) for name in handler.kernel_axes(layer)}
        bias = layer.bias if layer.use_bias else None
        if self.batchnorm is None:
            outputs = self._linear(inputs, self._quantize_kernels(kernels), bias, training)
        else:
            outputs = self._linear_with_batchnorm(inputs, kernels, bias, training)
        if not self._activation_fuses:
            outputs = self.scheme.activations(outputs, self._ranges["pre_activation"], training)
        if layer.activation is not None:
            outputs = layer.activation(outputs)
        return outputs

    def _quantize_kernels(self, kernels):
        handler, layer = self.handler, self.layer
        axes = handler.kernel_axes(layer)
        return {
            name: _quantize_kernel(
                self.scheme.weights, handler.kernel_view(layer, name, kernel), axes[name]
            )
            for name, kernel in kernels.items()
        }

    def _linear(self, inputs, kernels, bias, training):
        handler = self.handler
        if isinstance(handler, handlers_lib.SeparableConvHandler):
            middle = handler.depthwise(self.layer, inputs, kernels)
            middle = self.scheme.activations(middle, self._ranges["depthwise"], training)
            return handler.pointwise(self.layer, middle, kernels, bias)
        return handler.linear(self.layer, inputs, kernels, bias)

    def _linear_with_batchnorm(self, inputs, kernels, bias, training):
        """Conv/Dense with BatchNorm folded in, as in Jacob et al. (2018) and PyTorch's ConvBn.

        The kernel is always folded with the moving variance, so it is quantized exactly as it will be
        deployed. In training the folded output is scaled back and normalized with the batch's
        statistics (which also update the moving ones), as float BatchNorm training does.
        """
        bn = self.batchnorm
        gamma = bn.gamma if bn.scale else ops.ones_like(bn.moving_variance)
        beta = bn.beta if bn.center else ops.zeros_like(bn.moving_mean)
        bias = bias if bias is not None else ops.zeros_like(bn.moving_mean)
        scale = gamma * ops.rsqrt(bn.moving_variance + bn.epsilon)
        folded = self._quantize_kernels(self.handler.fold_scale(self.layer, kernels, scale))
        use_batch_statistics = (
            training and bn.trainable and not self.scheme.freeze_batchnorm
        )
        if not use_batch_statistics:
            folded_bias = beta + (bias - bn.moving_mean) * scale
            return self._linear(inputs, folded, folded_bias, training)
        outputs = self._linear(inputs, folded, None, training) / scale + bias
        reduce_axes = tuple(range(len(outputs.shape) - 1))
        mean, variance = ops.moments(outputs, axes=reduce_axes)
        momentum = bn.momentum
        bn.moving_mean.assign(bn.moving_mean * momentum + ops.stop_gradient(mean) * (1 - momentum))
        bn.moving_variance.assign(
            bn.moving_variance * momentum + ops.stop_gradient(variance) * (1 - momentum)
        )
        return (outputs - mean) * (gamma * ops.rsqrt(variance + bn.epsilon)) + beta

    def compute_output_shape(self, input_shape, *args, **kwargs):
        return self.layer.compute_output_shape(input_shape, *args, **kwargs)

    # ---- introspection and serialization --------------------------------------------------------
    def quantization_ranges(self):
        """{name: (min, max)} of every activation range this layer quantizes with."""
        result = {}
        for name, state in self._ranges.items():
            quantizer = self._output_quantizer if name == "output" else self.scheme.activations
            low, high = quantizer.range(state)
            result[name] = (float(low), float(high))
        return result

    @property
    def output_range(self):
        """`(quantizer, range variables)` this layer's output is quantized with, or None."""
        if self._output_quantizer is not None:
            return self._output_quantizer, self._ranges["output"]
        if self._policy in (handlers_lib.PASS_THROUGH, handlers_lib.SAME_SCALE):
            return self._input_range
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


def _input_range_of(inputs):
    layer = _keras_private.producer(inputs)
    if isinstance(layer, Quantize):
        return layer.quantizer, layer._range
    if isinstance(layer, QuantizeWrapper):
        return layer.output_range
    return None


def _quantize_kernel(quantizer, kernel, axis):
    if axis != "depthwise":
        return quantizer(kernel, channel_axis=axis)
    # A depthwise kernel [..., in_channels, multiplier] feeds output channel c * multiplier + m from
    # kernel[..., c, m]: TFLite keeps one scale per output channel, so quantize over both axes at once.
    shape = ops.shape(kernel)
    flat = ops.reshape(kernel, tuple(shape[:-2]) + (shape[-2] * shape[-1],))
    return ops.reshape(quantizer(flat, channel_axis=-1), shape)


__all__ = ["Quantize", "QuantizeWrapper", "QuantizationScheme"]
