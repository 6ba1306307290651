"""What export needs to know about quantized models, registered with export when kerasq is imported.

A model with kerasq's quantization layers converts to full int8 without calibration data, is traced
the way the converter expects (`tracing_for_export`), and its file's outputs keep the names of the
float model's layers, so its QAT and post-training files name their outputs alike.

Example:
>>> import keras, kerasq
>>> float_model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="head")])
>>> qat_model = kerasq.quantize_model(float_model)
>>> kerasq.TFLiteModel(kerasq.export_tflite(qat_model)).output_names
['head']
"""

import keras

from kerasq import _keras_private
from kerasq.export.hooks import ExportHook, register_export_hook
from kerasq.quantization.layers import Quantize, QuantizeWrapper
from kerasq.quantization.quantizers import tracing_for_export
from kerasq.quantization.quantize import is_quantized


_DEPTHWISE_SUFFIX = "_depthwise"  # see quantize._identity_depthwise


class QuantizationExportHook(ExportHook):
    """kerasq's quantized models, as export sees them."""

    def is_quantized(self, model):
        return is_quantized(model)

    def tracing(self):
        return tracing_for_export()

    def output_name(self, tensor):
        """The float model's layer name for a quantized model's output."""
        layer = _keras_private.producer(tensor)
        if isinstance(layer, QuantizeWrapper):
            return layer.layer.name
        if isinstance(layer, Quantize):  # the float layer before it was left unquantized
            source = _keras_private.producer(layer.input)
            if source is not None and not isinstance(source, keras.layers.InputLayer):
                return source.name
        return None

    def activation_bits(self, tensor):
        """The bits of the range a model output is quantized with, or of the input `Quantize` layer
        that reads a model input."""
        layer = _keras_private.producer(tensor)
        if isinstance(layer, keras.layers.InputLayer):
            readers = [r for r in _keras_private.consumers(tensor) if isinstance(r, Quantize)]
            return readers[0].quantizer.bits if readers else None
        if isinstance(layer, keras.layers.Identity):  # an output keeping its name
            return self.activation_bits(layer.input)
        if isinstance(layer, Quantize):
            return layer.quantizer.bits
        if isinstance(layer, QuantizeWrapper):
            output_range = layer.output_range
            return output_range[0].bits if output_range is not None else layer.scheme.activations.bits
        return None

    def source_name(self, layer):
        """The float model's name for a `QuantizeWrapper` (its wrapped layer's; for a BatchNorm or
        Rescaling/Normalization running as a 1x1 depthwise convolution, that layer's)."""
        if not isinstance(layer, QuantizeWrapper):
            return None
        name = layer.layer.name
        if layer.batchnorm is not None and not layer.layer.trainable and name.endswith(_DEPTHWISE_SUFFIX):
            return name[: -len(_DEPTHWISE_SUFFIX)]
        return name

    def float_layers(self, model):
        """The layers of a quantized model that compute in float: those `skip=` named, those
        `quantize_apply` found unannotated, and float islands (recurrent layers)."""
        if not is_quantized(model):
            return []
        found = []
        for layer in model.layers:
            if isinstance(layer, keras.Model):
                found.extend(self.float_layers(layer) if is_quantized(layer) else _float_leaves(layer))
            elif not isinstance(layer, (Quantize, QuantizeWrapper, keras.layers.InputLayer, keras.layers.Identity)):
                found.append(layer)
        return found


def _float_leaves(model):
    """The layers of a nested model that holds no quantization layers."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.extend(_float_leaves(layer))
        elif not isinstance(layer, keras.layers.InputLayer):
            found.append(layer)
    return found


registration = register_export_hook(QuantizationExportHook())
