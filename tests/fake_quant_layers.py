"""Hand-written fake-quant layers: QAT-like models built without kerasq's own quantization, so the
export tests do not depend on it."""

import keras


class FakeQuant(keras.layers.Layer):
    """Per-tensor fake-quant of activations on a fixed range."""

    def __init__(self, low, high, **kwargs):
        super().__init__(**kwargs)
        self.low, self.high = low, high

    def call(self, x):
        return keras.quantizers.fake_quant_with_min_max_vars(x, self.low, self.high, num_bits=8)


class QConv(keras.layers.Layer):
    """3x3 conv + ReLU with per-channel, narrow-range, symmetric fake-quant of the kernel."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(3, 3, input_shape[-1], self.filters), initializer="glorot_uniform")
        self.bias = self.add_weight(shape=(self.filters,), initializer="zeros")

    def call(self, x):
        r = keras.ops.max(keras.ops.abs(self.kernel), axis=(0, 1, 2))
        kernel = keras.quantizers.fake_quant_with_min_max_vars(self.kernel, -r, r, num_bits=8, narrow_range=True, axis=-1)
        return keras.ops.relu(keras.ops.conv(x, kernel) + self.bias)


class QDense(keras.layers.Layer):
    """Dense with per-tensor, narrow-range, symmetric fake-quant of the kernel (as TFLite requires)."""

    def __init__(self, units, bias_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.bias_initializer = bias_initializer

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), initializer="glorot_uniform")
        self.bias = self.add_weight(shape=(self.units,), initializer=self.bias_initializer)

    def call(self, x):
        r = keras.ops.max(keras.ops.abs(self.kernel))
        kernel = keras.quantizers.fake_quant_with_min_max_vars(self.kernel, -r, r, num_bits=8, narrow_range=True)
        return keras.ops.matmul(x, kernel) + self.bias
