"""EinsumDense as one FULLY_CONNECTED: the layers that contract the last axes of their input with the
first axes of their kernel and keep the other axes in order (`"abc,cd->abd"`, `"abc,cde->abde"`,
`"abcd,cde->abe"`), which is what the converter makes of them.

The kernel is quantized flattened to 2D (contracted axes x output axes) with one scale, as Dense's
is, and the layer runs as a matmul of its input flattened to the contracted axes; bias and
activation as Keras applies them. Other equations (an inner axis contracted, axes reordered)
are refused with the layer named.

Example:
>>> import keras, kerasq
>>> inputs = keras.Input((6, 16))
>>> heads = keras.layers.EinsumDense("abc,cde->abde", output_shape=(None, 2, 8), bias_axes="de")(inputs)
>>> qat = kerasq.quantize_model(keras.Model(inputs, heads))
>>> tuple(qat.layers[-1].layer.kernel.shape)
(16, 2, 8)
"""

import math

from keras import layers, ops

from kerasq.quantization.handlers import DenseHandler, register_handler


def contracted_axes(layer):
    """How many trailing input axes `layer` (an EinsumDense) contracts with its kernel's leading
    ones, or None when its equation is not of that form."""
    inputs, rest = layer.equation.split(",")
    kernel, outputs = rest.split("->")
    bound = len([axis for axis in inputs if axis not in outputs])
    if bound == 0 or "." in layer.equation:
        return None
    free, contracted = inputs[:-bound], inputs[-bound:]
    if kernel.startswith(contracted) and outputs == free + kernel[bound:] and not set(free) & set(kernel):
        return bound
    return None


class EinsumDenseHandler(DenseHandler):
    """EinsumDense of the form one FULLY_CONNECTED computes (see the module)."""

    def unsupported_reason(self, layer):
        if contracted_axes(layer) is None:
            return (
                f"its equation {layer.equation!r} is not one FULLY_CONNECTED (kerasq quantizes EinsumDense "
                "layers that contract the last axes of their input with the first of their kernel and keep "
                "the others in order, e.g. 'abc,cd->abd' or 'abc,cde->abde')"
            )
        return None

    # Dense's kernel axes apply to the 2D view: one scale, or one per output channel (its last
    # axis) where several FULLY_CONNECTED ops read the kernel.

    def kernel_view(self, layer, name, kernel):
        return ops.reshape(kernel, (math.prod(kernel.shape[:_bound(layer)]), -1))

    def linear(self, layer, inputs, kernels, bias):
        bound = _bound(layer)
        kernel = kernels["kernel"]
        out_shape = tuple(layer.kernel.shape[bound:])
        flat = ops.matmul(ops.reshape(inputs, (-1, kernel.shape[0])), kernel)
        outputs = ops.reshape(flat, (-1,) + tuple(inputs.shape[1:len(inputs.shape) - bound]) + out_shape)
        return outputs if bias is None else ops.add(outputs, bias)


def _bound(layer):
    bound = contracted_axes(layer)
    if bound is None:  # quantize_model refuses these (`unsupported_reason`)
        raise ValueError(f"EinsumDense '{layer.name}': {EinsumDenseHandler().unsupported_reason(layer)}.")
    return bound


register_handler(layers.EinsumDense, EinsumDenseHandler())
