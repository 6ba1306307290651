"""Fake-quantizers for weights and activations, as the TFLite quantization spec defines them.

Both quantize with `keras.quantizers.fake_quant_with_min_max_vars`, which on the TensorFlow backend emits
the `FakeQuant*` ops that the TFLite converter folds into real integer tensors: the ranges a model trains
with are the ranges the exported file holds.

- Weights are symmetric (zero point 0) with the narrow range [-(2^(b-1) - 1), 2^(b-1) - 1], per output
  channel or per tensor, and their range is the current absolute maximum ("last value").
- Activations are asymmetric (or symmetric for 16-bit activations), with a range estimated from the
  data (`estimator`): by default an exponential moving average of each batch's minimum and maximum,
  started from the first batch seen; or the running extremes, percentiles, or the clipping that
  minimises the squared quantization error. Ranges can also be learned by gradient descent.
- Learned step sizes (LSQ, Esser et al. 2020) for low bit widths: `WeightQuantizer(learn_scale=True)`
  gives each kernel a trainable step per output channel (per tensor for Dense) and
  `ActivationQuantizer(learn_range="lsq")` learns the range with LSQ+'s gradient for the scale and
  zero point. The values are still those of TensorFlow's fake-quant op, bit for bit, so the file's
  scales and zero points are the ones training rounded with; only the gradients change.

`calibrating()` switches every activation quantizer to calibration: it records statistics of the float
activations it sees (a running mean of each batch's estimate; running extremes for "minmax") and
passes them through unquantized, as post-training calibration does.
"""

import contextlib
import contextvars

import keras
import numpy as np
from keras import ops

from kerasq import _keras_private

_SERIALIZATION_PACKAGE = "kerasq"

ESTIMATORS = ("ema_minmax", "minmax", "percentile", "mse")
WEIGHT_ESTIMATORS = ("max", "mse")
# Clipping candidates of the MSE estimators, as fractions of the full range: at 8 bits the best is
# close to 1, at 2-4 bits often 0.4-0.8.
_MSE_FRACTIONS = tuple(0.3 + 0.05 * i for i in range(15))

LEARN_RANGE_CHOICES = (False, True, "lsq")

# XNNPACK rejects a convolution whose input scale x weight scale / output scale is 256 or more; for a
# dead ReLU after a convolution with weights up to 50 and an input range up to 6, this keeps it
# below. Only activations whose whole range is under 0.01 are coarsened by it.
_MIN_RANGE_WIDTH = 1e-2

_CALIBRATING = contextvars.ContextVar("kerasq_calibrating", default=False)
_CLIPPING = contextvars.ContextVar("kerasq_clipping", default=None)
_TRACING_FOR_EXPORT = contextvars.ContextVar("kerasq_tracing_for_export", default=False)


@contextlib.contextmanager
def tracing_for_export():
    """While active, layers trace the graph the TFLite converter expects rather than simulate it:
    same-scale ops (average pooling, bilinear resizing) skip the rounding that mirrors TFLite's
    integer kernels, which do it themselves in the file, and ops with an exporting form (dilated
    convolutions, rank-5 kernels) take it."""
    token = _TRACING_FOR_EXPORT.set(True)
    try:
        yield
    finally:
        _TRACING_FOR_EXPORT.reset(token)


def is_tracing_for_export():
    """True inside `tracing_for_export()`."""
    return _TRACING_FOR_EXPORT.get()


def is_calibrating():
    """True inside `calibrating()`."""
    return _CALIBRATING.get()


@contextlib.contextmanager
def clipping_recorded():
    """While active, eager inference calls record the fraction of values each range clips, in the
    dict yielded: {id of the range's `min` variable: fraction}."""
    recorded = {}
    token = _CLIPPING.set(recorded)
    try:
        yield recorded
    finally:
        _CLIPPING.reset(token)


@contextlib.contextmanager
def calibrating():
    """While active, activation quantizers record range statistics and return their input as is."""
    token = _CALIBRATING.set(True)
    try:
        yield
    finally:
        _CALIBRATING.reset(token)


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
        estimator: "max" (the range is the largest |w|) or "mse" (the clipping of each channel's range
            that minimises the squared quantization error of its weights: at 4 bits and below, a few
            clipped outliers cost less than coarse steps for all the others).
        packed_int4: store 2- to 4-bit weights in the file as TFLite's packed INT4 tensors (half the
            bytes of int8). LiteRT's convolution kernels for INT4 weights do not compute the exact
            integer convolution: measured on the digits CNN, their outputs land 1-4 steps from the
            QAT model, where the same weights stored as int8 (the default) match it to the floor.
        learn_scale: learn each kernel's step size (its scale) by gradient descent, as LSQ does
            (Esser et al., "Learned Step Size Quantization", 2020): one trainable step per output
            channel (per tensor for Dense), started from `estimator`'s range on the first training
            batch (or at calibration), with LSQ's gradient scaled by 1/sqrt(weights per step x
            (2^(b-1) - 1)); clipped weights get no gradient. The variable holds the step's logarithm
            (as TQT's thresholds, Jain et al. 2019): optimizers that normalize their updates (Adam)
            then change a step by a fraction of itself, where a learning rate of 1e-3 moved 8-bit
            steps of 1e-4 through zero; its gradient is LSQ's times the step. With a folded BatchNorm
            the step is the folded kernel's, the one the file stores. Kernels of attention,
            LayerNormalization and PReLU keep `estimator`'s step. Needs `narrow_range=True`.

    Example:
    >>> import numpy as np
    >>> from kerasq import WeightQuantizer
    >>> q = WeightQuantizer(bits=8)
    >>> w = np.array([[0.5, -1.0], [0.25, 0.1]], "float32")
    >>> np.round(np.asarray(q(w, channel_axis=-1)) * 127).astype(int).tolist()
    [[64, -127], [32, 13]]
    """

    def __init__(self, bits=8, per_channel=True, narrow_range=True, estimator="max", packed_int4=False,
                 learn_scale=False):
        _check_bits(bits, "WeightQuantizer")
        _check_choice(estimator, WEIGHT_ESTIMATORS, "WeightQuantizer estimator")
        if not isinstance(learn_scale, (bool, np.bool_)):
            raise ValueError(f"WeightQuantizer: learn_scale must be True or False; got {learn_scale!r}.")
        if learn_scale and not narrow_range:
            raise ValueError(
                "WeightQuantizer(learn_scale=True) learns the step of TFLite's symmetric narrow-range weights "
                "(zero point 0, integers |k| <= 2^(b-1) - 1); use narrow_range=True with it."
            )
        if packed_int4 and not (bits <= 4 and narrow_range):
            raise ValueError(
                f"packed_int4 stores narrow-range weights of 2 to 4 bits; got bits={bits}, "
                f"narrow_range={narrow_range}. Use packed_int4=False for these."
            )
        self.bits = int(bits)
        self.per_channel = bool(per_channel)
        self.narrow_range = bool(narrow_range)
        self.estimator = estimator
        self.packed_int4 = bool(packed_int4)
        self.learn_scale = bool(learn_scale)

    @property
    def levels(self):
        """2^(b-1) - 1: the largest integer a weight is stored as (LSQ's Qp)."""
        return 2.0 ** (self.bits - 1) - 1.0

    def build(self, layer, name, channels=None):
        """Adds the learned step of kernel `name` to `layer` (for `learn_scale=True`) and returns
        its state: `log_step` (the logarithm of the step: one per output channel, `channels` of
        them, or one for None) and `seen`
        (0: not started yet, the estimator's step is used and the first training batch or
        calibration sets it; 1: learned; -1: frozen by `kerasq.FreezeRanges`; -0.5: frozen before
        it started, it stays at the step it starts from)."""
        shape = () if channels is None or not self.per_channel else (int(channels),)
        state = {
            # aggregation "mean": under a tf.distribute strategy, the step set on the first batch
            # is the same on every replica (see ActivationQuantizer.build).
            "log_step": layer.add_weight(name=f"{name}_log_step", shape=shape, initializer="zeros",
                                         trainable=True, aggregation="mean"),
            "seen": layer.add_weight(name=f"{name}_step_seen", shape=(), initializer="zeros", trainable=False),
        }
        _keras_private.track_for_tf_checkpoints(layer, state.values())
        return state

    def __call__(self, weights, channel_axis=None, state=None, training=False):
        """Fake-quantizes `weights`; `channel_axis=None` (or `per_channel=False`) means one scale.

        `state`: the learned step (`build`) for `learn_scale=True`; without it the step comes from
        `estimator`. `training`: a learned step not yet started is set from the weights."""
        weights = ops.convert_to_tensor(weights)
        if channel_axis is not None and self.per_channel and len(weights.shape) > 4 and not is_tracing_for_export():
            # TensorFlow's per-channel fake-quant gradient takes at most rank 4: train a Conv3D
            # kernel's (positions, channels) view, the same per-channel quantization. (The export
            # trace keeps the kernel whole: the converter reads a fake-quant op on the constant.)
            moved = ops.moveaxis(weights, channel_axis, -1)
            flat = self(ops.reshape(moved, (-1, moved.shape[-1])), channel_axis=-1, state=state, training=training)
            return ops.moveaxis(ops.reshape(flat, moved.shape), -1, channel_axis)
        axis = None if channel_axis is None or not self.per_channel else channel_axis % len(weights.shape)
        if state is not None:
            return self._with_learned_step(weights, axis, state, training)
        max_abs = self._estimated_max(weights, axis)
        if self.estimator != "mse" and not is_tracing_for_export():
            # Nothing lies outside the range, so the gradient passes straight through to every weight
            # (as the fake-quant op's gradient does, via the range, for the largest one).
            quantized = ops.stop_gradient(self._fake_quant(weights, -max_abs, max_abs, axis, fast=True))
            return quantized + (weights - ops.stop_gradient(weights))  # exactly `quantized`
        return self._fake_quant(weights, -max_abs, max_abs, axis)

    def _estimated_max(self, weights, axis):
        """The range's end, per channel on `axis` (or for the tensor), as `estimator` chooses it."""
        if axis is None:
            max_abs = ops.max(ops.abs(weights))
        else:
            reduce_axes = tuple(i for i in range(len(weights.shape)) if i != axis)
            max_abs = ops.max(ops.abs(weights), axis=reduce_axes)
        # An all-zero channel (a dead or pruned filter) gets scale 1/127 rather than 0: a zero scale
        # would divide by zero here and overflow the int32 bias in the exported file.
        max_abs = ops.where(ops.equal(max_abs, 0.0), ops.ones_like(max_abs), max_abs)
        if self.estimator == "mse":
            max_abs = max_abs * ops.stop_gradient(self._best_fraction(weights, max_abs, axis))
        return max_abs

    def learned_step(self, state, fallback):
        """The step a learned-step kernel is quantized with, per channel: `fallback` (the
        estimator's step) until the first training batch or calibration sets it (None: it has)."""
        seen = ops.convert_to_tensor(state["seen"])
        learned = ops.exp(ops.convert_to_tensor(state["log_step"]))
        learned = ops.where(ops.less(seen, 0.0), ops.stop_gradient(learned), learned)  # frozen
        if fallback is None:  # known to have started
            return learned
        return ops.where(ops.less(ops.abs(seen), 1.0), ops.stop_gradient(fallback), learned)

    def _with_learned_step(self, weights, axis, state, training):
        """LSQ: the values of the fake-quant op with range +-step x (2^(b-1) - 1), bit for bit;
        the gradient of LSQ for the step, straight through for the weights inside the range."""
        levels = self.levels

        def estimate():
            return ops.stop_gradient(self._estimated_max(weights, axis)) / levels

        if is_tracing_for_export():
            step = self.learned_step(state, estimate())  # selection ops the converter folds
        else:
            # The estimator runs only until the step starts ("mse" tries 15 clippings).
            unstarted = ops.less(ops.abs(ops.convert_to_tensor(state["seen"])), 1.0)
            learned = self.learned_step(state, None)  # (variables read outside the branches)
            step = ops.cond(unstarted, estimate, lambda: learned)
        if (training or is_calibrating()) and not is_tracing_for_export():
            # Starts the step: a started one is written back as it was read.
            seen = ops.convert_to_tensor(state["seen"])
            unstarted = ops.less(ops.abs(seen), 1.0)
            log_step = ops.convert_to_tensor(state["log_step"])
            state["log_step"].assign(ops.where(unstarted, ops.log(ops.stop_gradient(step)), log_step))
            state["seen"].assign(ops.where(unstarted, ops.where(ops.less(seen, 0.0), -1.0, 1.0), seen))
        high = step * levels
        if is_tracing_for_export():
            return self._fake_quant(weights, -high, high, axis)
        values = ops.stop_gradient(self._fake_quant(weights, -high, high, axis, fast=True))
        surrogate = lsq_weights(weights, step, levels, axis)
        return values + (surrogate - ops.stop_gradient(surrogate))  # exactly `values`

    def _fake_quant(self, weights, low, high, axis, fast=False):
        if self.bits < 8 and self.narrow_range:
            return self._on_a_wider_grid(weights, low, high, axis, fast)
        if fast and axis is not None:
            return _fake_quant_per_channel_values(weights, low, high, self.bits, self.narrow_range, axis)
        return keras.quantizers.fake_quant_with_min_max_vars(
            weights, low, high, num_bits=self.bits, narrow_range=self.narrow_range, axis=axis
        )

    def _on_a_wider_grid(self, weights, low, high, axis, fast=False):
        """b-bit weights (b < 8) as the fake-quant of the clipped weights over a range S/L times wider,
        for L = 2^(b-1) - 1 levels a side and S those of the storage type (127 for int8, 7 for
        INT4): the same values, k * high / L for |k| <= L, which the converter stores as integers
        k with scale high / L. (Given a b-bit fake-quant op it writes INT4 for b <= 4, and for 2
        and 3 bits with a scale that does not match the values: 22 output steps off.)"""
        storage_levels = 7.0 if self.packed_int4 else 127.0
        widen = storage_levels / (2.0 ** (self.bits - 1) - 1.0)
        shape = [1] * len(weights.shape)
        if axis is not None:
            shape[axis] = -1
        clipped = ops.clip(weights, ops.reshape(low, shape), ops.reshape(high, shape)) if axis is not None else ops.clip(weights, low, high)
        storage_bits = 4 if self.packed_int4 else 8
        if fast and axis is not None:
            return _fake_quant_per_channel_values(clipped, low * widen, high * widen, storage_bits, True, axis)
        return keras.quantizers.fake_quant_with_min_max_vars(
            clipped, low * widen, high * widen, num_bits=storage_bits, narrow_range=True, axis=axis
        )

    def _best_fraction(self, weights, max_abs, axis):
        """Per channel (or for the tensor), the fraction of `max_abs` with the least squared error.

        Written with rounding and selection ops only (no fake-quant op, no argmin), so that on a
        constant kernel the converter folds the whole search into the constant range it chose."""
        reduce_axes = None if axis is None else tuple(i for i in range(len(weights.shape)) if i != axis)
        shape = [1] * len(weights.shape)
        if axis is not None:
            shape[axis] = -1
        levels = 2.0 ** (self.bits - 1) - 1.0
        errors = []
        for fraction in _MSE_FRACTIONS:
            step = ops.reshape(max_abs * fraction / levels, shape)
            rounded = ops.clip(ops.round(weights / step), -levels, levels) * step
            errors.append(ops.sum(ops.square(rounded - weights), axis=reduce_axes))
        errors = ops.stack(errors)
        # The fractions as a constant of the errors' shape: the converter folds no op whose result
        # is over 2^16 bits and twice its operands', and a broadcasting select from (fractions, 1)
        # is that from 137 channels on (the fake-quant op was then left in the file, unconverted).
        fractions = np.broadcast_to(np.reshape(_MSE_FRACTIONS, (-1,) + (1,) * (errors.ndim - 1)), errors.shape)
        is_best = ops.less_equal(errors, ops.min(errors, axis=0, keepdims=True))
        chosen = ops.where(is_best, ops.convert_to_tensor(fractions, dtype=weights.dtype), ops.zeros_like(errors))
        return ops.max(chosen, axis=0)

    def get_config(self):
        return {"bits": self.bits, "per_channel": self.per_channel, "narrow_range": self.narrow_range,
                "estimator": self.estimator, "packed_int4": self.packed_int4, "learn_scale": self.learn_scale}

    def __repr__(self):
        learned = ", learn_scale=True" if self.learn_scale else ""
        return f"WeightQuantizer(bits={self.bits}, per_channel={self.per_channel}, estimator={self.estimator!r}{learned})"


@keras.saving.register_keras_serializable(package=_SERIALIZATION_PACKAGE)
class ActivationQuantizer(_Configurable):
    """Fake-quantizer for activations with a range estimated from the data, or learned.

    During training each batch gives an estimate of the range (`estimator`), folded into the stored
    range by an exponential moving average (`ema_decay`) started from the first batch; "minmax"
    keeps the running extremes instead. At inference the range is fixed. The range always contains
    0, so 0 is exactly representable (the TFLite zero point). A `fixed_range=(min, max)` is used as
    it is, for ops whose output range TFLite fixes (softmax, logistic).

    Its state (the range variables) belongs to the layer that calls it: `build(layer)` adds them.

    Args:
        bits: 8 for int8 activations, 16 for TFLite's 16x8 scheme.
        symmetric: zero point 0 and a range symmetric around it (TFLite's int16 activations).
        ema_decay: weight of the old range in the moving average, in [0, 1).
        init_min, init_max: the range before any batch is seen.
        fixed_range: `(min, max)` that never changes, or None.
        estimator: how a batch's range is estimated: "ema_minmax" (its minimum and maximum, averaged
            over batches), "minmax" (the extremes over all batches: nothing is ever clipped),
            "percentile" (the `percentile`-th and (100 - `percentile`)-th percentiles: a few outliers
            are clipped), or "mse" (the clipping of the batch's range that minimises the squared
            quantization error of its values).
        percentile: for "percentile", in (0, 100].
        learn_range: the range is a trainable weight, learned by gradient descent; the estimator only
            initializes it: from `calibration_data` at `quantize_model`, else from the first batch.
            True: through the fake-quant op's gradient (PACT-like: only clipped values pull on the
            range's ends). "lsq": with LSQ+'s gradient (Esser et al. 2020; Bhalgat et al. 2020) for
            the scale and the zero point, in which values inside the range pull too, by their
            rounding error, scaled by 1/sqrt(values per sample x levels). The zero point stays the
            integer TFLite stores: the range is the nudged min/max the file holds, bit for bit.

    Example:
    >>> from kerasq import ActivationQuantizer
    >>> q = ActivationQuantizer(bits=8, estimator="percentile", percentile=99.9)
    >>> q.get_config()["estimator"], q.get_config()["percentile"]
    ('percentile', 99.9)
    """

    def __init__(
        self,
        bits=8,
        symmetric=False,
        ema_decay=0.99,
        init_min=-6.0,
        init_max=6.0,
        fixed_range=None,
        estimator="ema_minmax",
        percentile=99.99,
        learn_range=False,
    ):
        _check_bits(bits, "ActivationQuantizer")
        _check_choice(estimator, ESTIMATORS, "ActivationQuantizer estimator")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1); got {ema_decay}.")
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], e.g. 99.99; got {percentile}.")
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
        self.estimator = estimator
        self.percentile = float(percentile)
        if not (isinstance(learn_range, str) and learn_range == "lsq") and learn_range not in (False, True):
            raise ValueError(
                f"ActivationQuantizer: learn_range must be False, True (the fake-quant op's gradient) or "
                f"'lsq' (LSQ+'s gradient); got {learn_range!r}."
            )
        self.learn_range = "lsq" if isinstance(learn_range, str) else bool(learn_range)

    def with_fixed_range(self, fixed_range):
        """A copy of this quantizer whose range is pinned to `fixed_range`."""
        return ActivationQuantizer(**{**self.get_config(), "fixed_range": fixed_range, "learn_range": False})

    def build(self, layer, prefix="output"):
        """Adds the range variables to `layer` and returns them as a dict.

        `seen` counts the batches the range was estimated from (0: none yet); a negative value
        means the range is frozen (`kerasq.FreezeRanges`)."""
        low, high = self.fixed_range or (self.init_min, self.init_max)
        trainable = self.learn_range and self.fixed_range is None
        # Under a tf.distribute strategy each replica assigns the range from its own share of the
        # batch. Keras's default aggregation ("none") writes only that replica's copy, so replicas
        # (and workers) drift apart; "mean" all-reduces each write: every copy holds the moving
        # average of the replicas' mean estimate. Reads stay local (ON_READ would all-reduce on
        # every read, and a chief exporting alone would wait on its peers). `seen` is the same
        # everywhere without it. Other backends ignore the setting.
        state = {
            "min": layer.add_weight(
                name=f"{prefix}_min", shape=(), initializer=keras.initializers.Constant(low),
                trainable=trainable, aggregation="mean",
            ),
            "max": layer.add_weight(
                name=f"{prefix}_max", shape=(), initializer=keras.initializers.Constant(high),
                trainable=trainable, aggregation="mean",
            ),
            "seen": layer.add_weight(
                name=f"{prefix}_seen", shape=(), initializer="zeros", trainable=False
            ),
        }
        _keras_private.track_for_tf_checkpoints(layer, state.values())
        return state

    def __call__(self, x, state, training=False, enabled=True):
        """Fake-quantizes `x` with the range in `state`, updating the range when `training`.

        `enabled=False` (`kerasq.DelayQuantization`) still tracks the range but returns `x` as is.
        """
        if self.fixed_range is not None:
            if training or not enabled or _CALIBRATING.get():
                # A fixed range (softmax, sigmoid, tanh) has nothing to learn, and rounding it in
                # training makes the loss flat: a probability above 255/256 is clipped (zero gradient)
                # and the others round to 0, so every confidently classified sample stops
                # contributing (over 80% of a converged MobileNetV2's digits batches gave exactly
                # zero gradient). Training sees the unrounded output, at most half a step (1/512)
                # away; inference rounds as TFLite does.
                return x
        elif _CALIBRATING.get():
            self._calibrate(ops.stop_gradient(x), state)
            return x
        observed = None
        if training:
            observed = self._observe(ops.stop_gradient(x), state)
        if not enabled:
            return x
        low, high = self.range(state, observed)
        recorded = _CLIPPING.get()
        if recorded is not None and not training:
            outside = ops.logical_or(ops.less(x, low), ops.greater(x, high))
            recorded[id(state["min"])] = float(ops.mean(ops.cast(outside, "float32")))
        quantized = keras.quantizers.fake_quant_with_min_max_vars(
            x, low, high, num_bits=self.bits, narrow_range=self.symmetric
        )
        if training and self.learn_range == "lsq" and self.fixed_range is None and not is_tracing_for_export():
            # The op's values (its nudged range is the file's scale and zero point), LSQ+'s gradient.
            surrogate = lsq_activations(x, low, high, self.bits, self.symmetric)
            quantized = ops.stop_gradient(quantized) + (surrogate - ops.stop_gradient(surrogate))
        if self.symmetric and not training and not is_tracing_for_export():
            # The file's kernels clamp a symmetric tensor to its type's minimum, -2^(bits-1): one
            # step below the narrow range, where the fake-quant op stops.
            step = (high - low) / (2.0**self.bits - 2.0)
            quantized = ops.where(x < low - 0.5 * step, low - step, quantized)
        return quantized

    def round_like_tflite(self, x, state):
        """Rounds `x` onto this quantizer's grid as TFLite's same-scale kernels (average pooling,
        bilinear resizing) do: to the nearest integer value, ties away from zero in the signed integer
        domain. `fake_quant` rounds ties up instead, which differs on every negative tie, and an average
        of 4 integers is a tie one time in four. The gradient passes straight through."""
        scale, zero_point = self.grid(state)
        offset = float(2 ** (self.bits - 1))  # unsigned to signed
        signed = (x / scale + zero_point) - offset
        # Values here are averages of grid points, so a tie can come out a hair below .5.
        magnitude = ops.floor(ops.abs(signed) + 0.5 + 1e-4)
        rounded = ops.clip(ops.sign(signed) * magnitude, -offset, offset - 1.0)
        snapped = (rounded + offset - zero_point) * scale
        return x + ops.stop_gradient(snapped - x)

    def grid(self, state):
        """`(step, zero point)` of the range `state` as TensorFlow's fake-quant nudges it (and the
        converter writes it to the file), the zero point in unsigned levels 0 to 2^bits - 1. The
        file's kernels clamp their outputs to those levels, the type's whole range: a symmetric
        range's fake-quant stops one level above the bottom one."""
        low, high = self.range(state)
        levels = 2.0**self.bits - 1.0
        quant_min = 1.0 if self.symmetric else 0.0
        step = (high - low) / (levels - quant_min)
        return step, ops.clip(ops.round(quant_min - low / step), quant_min, levels)

    def range(self, state, observed=None):
        """The (min, max) the next inference call quantizes with, 0 included. `observed`: the
        `(min, max)` a training call just assigned to `state`, so as not to read them again."""
        if observed is None or self.learn_range:  # a learned range takes its gradient from the variables
            observed = (state["min"], state["max"])
        low = ops.minimum(ops.convert_to_tensor(observed[0]), 0.0)
        high = ops.maximum(ops.convert_to_tensor(observed[1]), 0.0)
        # A range at least _MIN_RANGE_WIDTH wide: an all-zero activation (a dead ReLU) would give a
        # scale so small that LiteRT cannot requantize into it and refuses to load the file.
        if self.symmetric:
            high = ops.maximum(ops.maximum(-low, high), _MIN_RANGE_WIDTH / 2)
            low = -high
        else:
            high = ops.maximum(high, low + _MIN_RANGE_WIDTH)
        if self.learn_range and self.fixed_range is None:
            frozen = ops.less(ops.convert_to_tensor(state["seen"]), 0.0)
            low = ops.where(frozen, ops.stop_gradient(low), low)
            high = ops.where(frozen, ops.stop_gradient(high), high)
        return low, high

    # ---- estimating the range -------------------------------------------------------------------
    def batch_range(self, x):
        """This estimator's `(min, max)` for one batch of values, 0 included."""
        x = ops.cast(x, "float32")
        if self.estimator in ("percentile", "mse"):
            x = ops.reshape(x, (-1,))
        if self.estimator == "percentile":
            fraction = self.percentile / 100.0
            low, high = ops.quantile(x, 1.0 - fraction), ops.quantile(x, fraction)
        else:
            low, high = ops.min(x), ops.max(x)
        low, high = ops.minimum(low, 0.0), ops.maximum(high, 0.0)
        if self.estimator == "mse":
            low, high = self._least_error_clipping(x, low, high)
        return low, high

    def _least_error_clipping(self, x, low, high):
        """Clips each end of the range separately (an outlier is often on one side only): first the
        maximum with the minimum kept, then the minimum with the chosen maximum."""
        high = self._least_error(x, lambda fraction: (low, ops.maximum(high * fraction, 1e-6)))[1]
        return self._least_error(x, lambda fraction: (low * fraction, high))

    def _least_error(self, x, candidate):
        """The `candidate(fraction)` range, over `_MSE_FRACTIONS`, with the least squared error on `x`."""
        errors, ranges = [], []
        for fraction in _MSE_FRACTIONS:
            low, high = candidate(fraction)
            high = ops.maximum(high, low + 1e-6)
            quantized = keras.quantizers.fake_quant_with_min_max_vars(
                x, low, high, num_bits=self.bits, narrow_range=self.symmetric
            )
            errors.append(ops.mean(ops.square(quantized - x)))
            ranges.append(ops.stack([low, high]))
        best = ops.take(ops.stack(ranges), ops.argmin(ops.stack(errors)), axis=0)
        return best[0], best[1]

    def _observe(self, x, state):
        """One training batch: the moving average (or running extremes) of the batch estimates.
        A frozen range (`seen` < 0) stays; a learned one is only initialized. Returns the new
        `(min, max)`."""
        batch_min, batch_max = self.batch_range(x)
        # Tensors, not the variables (JAX's ops take no Variable objects), each read once: every op
        # given a TensorFlow variable reads it again.
        old_min, old_max, seen = (ops.copy(state[key]) for key in ("min", "max", "seen"))
        first = ops.equal(seen, 0.0)
        keep = frozen = ops.less(seen, 0.0)
        if self.learn_range:
            new_min, new_max = batch_min, batch_max
            keep = ops.logical_not(first)
        elif self.estimator == "minmax":
            new_min = ops.where(first, batch_min, ops.minimum(old_min, batch_min))
            new_max = ops.where(first, batch_max, ops.maximum(old_max, batch_max))
        else:
            decay = self.ema_decay
            new_min = ops.where(first, batch_min, decay * old_min + (1.0 - decay) * batch_min)
            new_max = ops.where(first, batch_max, decay * old_max + (1.0 - decay) * batch_max)
        new_min, new_max = ops.where(keep, old_min, new_min), ops.where(keep, old_max, new_max)
        state["min"].assign(new_min)
        state["max"].assign(new_max)
        state["seen"].assign(ops.where(frozen, seen, ops.minimum(seen + 1.0, 1e9)))
        return new_min, new_max

    def _calibrate(self, x, state):
        """One calibration batch: the running mean of the batch estimates (extremes for "minmax")."""
        batch_min, batch_max = self.batch_range(x)
        old_min, old_max = ops.convert_to_tensor(state["min"]), ops.convert_to_tensor(state["max"])
        seen = ops.maximum(ops.convert_to_tensor(state["seen"]), 0.0)
        first = ops.equal(seen, 0.0)
        if self.estimator == "minmax":
            new_min, new_max = ops.minimum(old_min, batch_min), ops.maximum(old_max, batch_max)
        else:
            new_min = old_min + (batch_min - old_min) / (seen + 1.0)
            new_max = old_max + (batch_max - old_max) / (seen + 1.0)
        state["min"].assign(ops.where(first, batch_min, new_min))
        state["max"].assign(ops.where(first, batch_max, new_max))
        state["seen"].assign(seen + 1.0)

    def get_config(self):
        return {
            "bits": self.bits,
            "symmetric": self.symmetric,
            "ema_decay": self.ema_decay,
            "init_min": self.init_min,
            "init_max": self.init_max,
            "fixed_range": list(self.fixed_range) if self.fixed_range else None,
            "estimator": self.estimator,
            "percentile": self.percentile,
            "learn_range": self.learn_range,
        }

    def __repr__(self):
        return f"ActivationQuantizer(bits={self.bits}, estimator={self.estimator!r}, ema_decay={self.ema_decay})"


def _scaled_gradient(x, factor):
    """`x` (up to rounding) with its gradient multiplied by `factor`."""
    return x * factor + ops.stop_gradient(x - x * factor)


def _round_straight_through(x):
    """`round(x)` with the gradient of `x`."""
    return x + ops.stop_gradient(ops.round(x) - x)


def lsq_weights(weights, step, levels, axis=None):
    """LSQ's differentiable form of symmetric quantization, `clip(round(w / s), -Qp, Qp) x s` with
    Qp = `levels`, one step per channel on `axis` (or one): its gradient is 1 for a weight inside
    the range and 0 for a clipped one; for the step, `round(w / s) - w / s` inside and `+-Qp` at the
    clipped ends, times g = 1 / sqrt(N x Qp), N the weights per step (Esser et al. 2020, eq. 3-4).
    Its values are TensorFlow's fake-quant's up to ties; kerasq takes the values from the op."""
    count = 1
    for size in weights.shape:
        count *= int(size)
    per_step = count if axis is None else count // int(weights.shape[axis])
    step = _scaled_gradient(step, 1.0 / np.sqrt(per_step * levels))
    if axis is not None:
        shape = [1] * len(weights.shape)
        shape[axis] = -1
        step = ops.reshape(step, shape)
    return _round_straight_through(ops.clip(weights / step, -levels, levels)) * step


def lsq_activations(x, low, high, bits, symmetric=False):
    """LSQ+'s differentiable form of asymmetric quantization (Bhalgat et al. 2020) with TFLite's
    integer zero point, from the range `(low, high)`: scale s = (high - low) / (qmax - qmin) and zero
    point z = round(qmin - low / s), the nudging of TensorFlow's fake-quant op (and the converter's);
    values `(round(clip(x / s + z, qmin, qmax)) - z) x s`, rounding straight through. The gradient is
    1 for x inside the (nudged) range and 0 outside, as the op's; for s, `round(x / s) - x / s` inside and `qmin - z` /
    `qmax - z` at the ends; for z, 0 inside and -s at the ends; reaching `low` and `high` through s and
    z, times g = 1 / sqrt(N x (qmax - qmin)), N the values per sample."""
    quant_min = 1.0 if symmetric else 0.0
    quant_max = 2.0**bits - 1.0
    levels = quant_max - quant_min
    if len(x.shape) == 0:
        per_sample = 1.0
    elif all(size is not None for size in x.shape[1:]):
        per_sample = float(np.prod([int(size) for size in x.shape[1:]]))
    else:
        per_sample = ops.cast(ops.size(x), "float32") / ops.cast(ops.shape(x)[0], "float32")
    factor = ops.rsqrt(ops.convert_to_tensor(per_sample * levels, "float32"))
    low, high = _scaled_gradient(low, factor), _scaled_gradient(high, factor)
    scale = (high - low) / levels
    zero_point = ops.clip(_round_straight_through(quant_min - low / scale), quant_min, quant_max)
    quantized = _round_straight_through(ops.clip(x / scale + zero_point, quant_min, quant_max))
    return (quantized - zero_point) * scale


def _fake_quant_per_channel_values(x, low, high, bits, narrow_range, axis):
    """The values of TensorFlow's per-channel fake-quant op, bit for bit, in elementwise ops (no
    gradient of its own: callers pass gradients straight through).

    TensorFlow's CPU kernel quantizes one channel at a time, each a separate parallel loop: for a
    small kernel with many channels that costs more than the convolution it feeds. The export trace
    still uses the op, which the converter reads."""
    quant_min = 1.0 if narrow_range else 0.0
    quant_max = 2.0**bits - 1.0
    shape = [1] * len(x.shape)
    shape[axis] = -1
    low, high = ops.reshape(low, shape), ops.reshape(high, shape)
    # As the kernel's Nudge(): the zero point rounded half away from zero, then the range moved so
    # that it falls on an integer.
    # divide_no_nan: Grappler rewrites a division by a constant into a multiplication by its
    # reciprocal, which rounds differently from the kernel's division.
    scale = ops.divide_no_nan(high - low, quant_max - quant_min)
    inverse_scale = (quant_max - quant_min) / (high - low)
    zero_point = ops.clip(quant_min - low / scale, quant_min, quant_max)
    zero_point = ops.floor(zero_point + 0.5)
    nudged_min = (quant_min - zero_point) * scale
    nudged_max = (quant_max - zero_point) * scale
    quant_zero = ops.floor(-nudged_min * inverse_scale + 0.5)
    shifted = ops.clip(x, nudged_min, nudged_max) - nudged_min
    return ops.floor(shifted * inverse_scale - quant_zero + 0.5) * scale


def _check_choice(value, choices, what):
    if value not in choices:
        raise ValueError(f"Unknown {what} {value!r}; choose one of {', '.join(map(repr, choices))}.")


def _check_bits(bits, owner):
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"{owner}: bits must be an integer from 2 to 16; got {bits!r}.")
