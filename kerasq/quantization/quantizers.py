"""Fake-quantizers for weights and activations, as the TFLite quantization spec defines them.

Both quantize with `keras.quantizers.fake_quant_with_min_max_vars`, which on the TensorFlow backend emits
the `FakeQuant*` ops that the TFLite converter folds into real integer tensors: the ranges a model trains
with are the ranges the exported file holds.

- Weights are symmetric (zero point 0) with the narrow range [-(2^(b-1) - 1), 2^(b-1) - 1], per output
  channel or per tensor, and their range is the current absolute maximum ("last value").
- Activations are asymmetric (or symmetric for 16-bit activations), with a range tracked by an
  exponential moving average of the batch minimum and maximum during training, started from the first
  batch seen.
"""

import keras
from keras import ops

_SERIALIZATION_PACKAGE = "kerasq"


class _Configurable:
    """`from_config` and value equality for objects fully described by their `get_config()`."""

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash(type(self).__name__)


@keras.saving.register_keras_serializable(package=_SERIALIZATION_PACKAGE)
class WeightQuantizer(_Configurable):
    """Symmetric fake-quantizer for weights.

    Args:
        bits: bit width of the stored integers (2 to 8 for TFLite's int8 kernels).
        per_channel: one scale per output channel where the layer type allows it (Conv, DepthwiseConv);
            TFLite's fully connected kernels take one scale per tensor whatever this says.
        narrow_range: use [-(2^(b-1) - 1), 2^(b-1) - 1], as TFLite's int8 spec requires of weights.

    Example:
    >>> import numpy as np
    >>> from kerasq import WeightQuantizer
    >>> q = WeightQuantizer(bits=8)
    >>> w = np.array([[0.5, -1.0], [0.25, 0.1]], "float32")
    >>> np.round(np.asarray(q(w, channel_axis=-1)) * 127).astype(int).tolist()
    [[64, -127], [32, 13]]
    """

    def __init__(self, bits=8, per_channel=True, narrow_range=True):
        _check_bits(bits, "WeightQuantizer")
        self.bits = int(bits)
        self.per_channel = bool(per_channel)
        self.narrow_range = bool(narrow_range)

    def __call__(self, weights, channel_axis=None):
        """Fake-quantizes `weights`; `channel_axis=None` (or `per_channel=False`) means one scale."""
        weights = ops.convert_to_tensor(weights)
        if channel_axis is None or not self.per_channel:
            max_abs = ops.max(ops.abs(weights))
            axis = None
        else:
            axis = channel_axis % len(weights.shape)
            reduce_axes = tuple(i for i in range(len(weights.shape)) if i != axis)
            max_abs = ops.max(ops.abs(weights), axis=reduce_axes)
        # An all-zero channel (a dead or pruned filter) gets scale 1/127 rather than 0: a zero scale
        # would divide by zero here and overflow the int32 bias in the exported file.
        max_abs = ops.where(ops.equal(max_abs, 0.0), ops.ones_like(max_abs), max_abs)
        return keras.quantizers.fake_quant_with_min_max_vars(
            weights, -max_abs, max_abs, num_bits=self.bits, narrow_range=self.narrow_range, axis=axis
        )

    def get_config(self):
        return {"bits": self.bits, "per_channel": self.per_channel, "narrow_range": self.narrow_range}

    def __repr__(self):
        return f"WeightQuantizer(bits={self.bits}, per_channel={self.per_channel})"


@keras.saving.register_keras_serializable(package=_SERIALIZATION_PACKAGE)
class ActivationQuantizer(_Configurable):
    """Fake-quantizer for activations with a range learned from the data.

    During training the range follows an exponential moving average of each batch's minimum and
    maximum (`ema_decay`), starting from the first batch; at inference it is fixed. The range always
    contains 0, so 0 is exactly representable (the TFLite zero point). A `fixed_range=(min, max)` is
    used as it is, for ops whose output range TFLite fixes (softmax, logistic).

    Its state (the range variables) belongs to the layer that calls it: `build(layer)` adds them.

    Args:
        bits: 8 for int8 activations, 16 for TFLite's 16x8 scheme.
        symmetric: zero point 0 and a range symmetric around it (TFLite's int16 activations).
        ema_decay: weight of the old range in the moving average, in [0, 1).
        init_min, init_max: the range before any batch is seen.
        fixed_range: `(min, max)` that never changes, or None.

    Example:
    >>> from kerasq import ActivationQuantizer
    >>> q = ActivationQuantizer(bits=8, ema_decay=0.9)
    >>> q.get_config()["ema_decay"]
    0.9
    """

    def __init__(
        self,
        bits=8,
        symmetric=False,
        ema_decay=0.99,
        init_min=-6.0,
        init_max=6.0,
        fixed_range=None,
    ):
        _check_bits(bits, "ActivationQuantizer")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1); got {ema_decay}.")
        if not init_min <= 0.0 <= init_max or init_min == init_max:
            raise ValueError(
                f"init_min <= 0 <= init_max with init_min < init_max is required; got "
                f"init_min={init_min}, init_max={init_max}."
            )
        if fixed_range is not None:
            fixed_range = (float(fixed_range[0]), float(fixed_range[1]))
            if not fixed_range[0] <= 0.0 <= fixed_range[1] or fixed_range[0] == fixed_range[1]:
                raise ValueError(f"fixed_range must contain 0 and be non-empty; got {fixed_range}.")
        self.bits = int(bits)
        self.symmetric = bool(symmetric)
        self.ema_decay = float(ema_decay)
        self.init_min = float(init_min)
        self.init_max = float(init_max)
        self.fixed_range = fixed_range

    def with_fixed_range(self, fixed_range):
        """A copy of this quantizer whose range is pinned to `fixed_range`."""
        return ActivationQuantizer(**{**self.get_config(), "fixed_range": fixed_range})

    def build(self, layer, prefix="output"):
        """Adds the range variables to `layer` and returns them as a dict."""
        low, high = self.fixed_range or (self.init_min, self.init_max)
        return {
            "min": layer.add_weight(
                name=f"{prefix}_min", shape=(), initializer=keras.initializers.Constant(low),
                trainable=False,
            ),
            "max": layer.add_weight(
                name=f"{prefix}_max", shape=(), initializer=keras.initializers.Constant(high),
                trainable=False,
            ),
            "seen": layer.add_weight(
                name=f"{prefix}_seen", shape=(), initializer="zeros", trainable=False
            ),
        }

    def __call__(self, x, state, training=False):
        if training and self.fixed_range is not None:
            # A fixed range (softmax, sigmoid, tanh) has nothing to learn, and rounding it in training
            # makes the loss flat: a probability above 255/256 is clipped (zero gradient) and the
            # others round to 0, so every confidently classified sample stops contributing (over 80%
            # of a converged MobileNetV2's digits batches gave exactly zero gradient). Training sees
            # the unrounded output, at most half a step (1/512) away; inference rounds as TFLite does.
            return x
        if training:
            self._observe(ops.stop_gradient(x), state)
        low, high = self.range(state)
        return keras.quantizers.fake_quant_with_min_max_vars(
            x, low, high, num_bits=self.bits, narrow_range=self.symmetric
        )

    def round_like_tflite(self, x, state):
        """Rounds `x` onto this quantizer's grid as TFLite's same-scale kernels (average pooling,
        bilinear resizing) do: to the nearest integer value, ties away from zero in the signed integer
        domain. `fake_quant` rounds ties up instead, which differs on every negative tie, and an average
        of 4 integers is a tie one time in four. The gradient passes straight through."""
        low, high = self.range(state)
        levels = 2**self.bits - 1
        quant_min = 1.0 if self.symmetric else 0.0
        # The same nudging TensorFlow's fake-quant (and so the TFLite converter) applies to the range.
        scale = (high - low) / (levels - quant_min)
        zero_point = ops.clip(ops.round(quant_min - low / scale), quant_min, float(levels))
        offset = float(2 ** (self.bits - 1))  # unsigned to signed
        signed = (x / scale + zero_point) - offset
        # Values here are averages of grid points, so a tie can come out a hair below .5.
        magnitude = ops.floor(ops.abs(signed) + 0.5 + 1e-4)
        rounded = ops.clip(ops.sign(signed) * magnitude, quant_min - offset, levels - offset)
        snapped = (rounded + offset - zero_point) * scale
        return x + ops.stop_gradient(snapped - x)

    def range(self, state):
        """The (min, max) the next inference call quantizes with, 0 included."""
        low = ops.minimum(ops.convert_to_tensor(state["min"]), 0.0)
        high = ops.maximum(ops.convert_to_tensor(state["max"]), 0.0)
        if self.symmetric:
            high = ops.maximum(-low, high)
            low = -high
        # An all-zero tensor would give an empty range and a zero scale.
        high = ops.maximum(high, low + 1e-6)
        return low, high

    def _observe(self, x, state):
        x = ops.cast(x, "float32")
        # 0 joins each batch's range before averaging, as in TensorFlow's moving-average quantizers.
        batch_min, batch_max = ops.minimum(ops.min(x), 0.0), ops.maximum(ops.max(x), 0.0)
        first = ops.equal(state["seen"], 0.0)
        decay = self.ema_decay
        state["min"].assign(
            ops.where(first, batch_min, decay * state["min"] + (1.0 - decay) * batch_min)
        )
        state["max"].assign(
            ops.where(first, batch_max, decay * state["max"] + (1.0 - decay) * batch_max)
        )
        state["seen"].assign(1.0)

    def get_config(self):
        return {
            "bits": self.bits,
            "symmetric": self.symmetric,
            "ema_decay": self.ema_decay,
            "init_min": self.init_min,
            "init_max": self.init_max,
            "fixed_range": list(self.fixed_range) if self.fixed_range else None,
        }

    def __repr__(self):
        return f"ActivationQuantizer(bits={self.bits}, ema_decay={self.ema_decay})"


def _check_bits(bits, owner):
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"{owner}: bits must be an integer from 2 to 16; got {bits!r}.")
