"""tfmot's client API for custom quantization: `QuantizeConfig` and its quantizers, on kerasq's own.

Code written for `tfmot.quantization.keras` subclasses `QuantizeConfig` to say which weights and
activations of a layer are quantized, and with which quantizer. kerasq reads such a config when
`quantize_apply` meets a layer annotated with it, and turns it into the layer's `QuantizationScheme`:

- `LastValueQuantizer` on weights: a `WeightQuantizer` (range: the weights' absolute maximum) with
  its bits, `per_axis` (per output channel) and `narrow_range`;
- `MovingAverageQuantizer` / `AllValuesQuantizer` / `LastValueQuantizer` on activations or outputs: an
  `ActivationQuantizer` estimating the range as tfmot does (moving average with decay 0.999, running
  extremes, or the last batch);
- no weights, activations or outputs returned: the layer stays in float;
- activations and outputs not quantized: the layer's output is quantized where a quantized layer reads
  it (TFLite's int8 kernels write int8 outputs).

kerasq applies the quantizers itself, so `set_quantize_weights` and `set_quantize_activations` are not
called. What TFLite's int8 kernels cannot run (asymmetric weights, a quantized kernel beside a float
one, a custom `Quantizer`'s own math) raises a ValueError that names the problem and the fix.

Example:
>>> import keras, kerasq
>>> class DenseConfig(kerasq.QuantizeConfig):
...     def get_weights_and_quantizers(self, layer):
...         return [(layer.kernel, kerasq.quantizers.LastValueQuantizer(
...             num_bits=4, symmetric=True, narrow_range=False, per_axis=False))]
...     def get_activations_and_quantizers(self, layer):
...         return [(layer.activation, kerasq.quantizers.MovingAverageQuantizer(
...             num_bits=8, symmetric=False, narrow_range=False, per_axis=False))]
...     def set_quantize_weights(self, layer, quantize_weights):
...         layer.kernel = quantize_weights[0]
...     def set_quantize_activations(self, layer, quantize_activations):
...         layer.activation = quantize_activations[0]
...     def get_output_quantizers(self, layer):
...         return []
...     def get_config(self):
...         return {}
>>> inputs = keras.Input((4,))
>>> dense = kerasq.quantize_annotate_layer(keras.layers.Dense(3), quantize_config=DenseConfig())
>>> qat = kerasq.quantize_apply(keras.Model(inputs, dense(inputs)))
>>> qat.layers[-1].scheme.weights.bits
4
"""

import abc

import keras

from kerasq.quantization.quantizers import ActivationQuantizer, WeightQuantizer
from kerasq.quantization.scheme import QuantizationScheme

_PACKAGE = "kerasq"
# tfmot's MovingAverageQuantizer averages batch ranges with this decay.
_TFMOT_EMA_DECAY = 0.999


class QuantizeConfig(abc.ABC):
    """How to quantize one layer: which weights and activations, with which quantizers (tfmot's API).

    Subclass it, implement every method, and pass an instance to
    `kerasq.quantize_annotate_layer(layer, quantize_config=...)`. Register the subclass with
    `keras.saving.register_keras_serializable()` (or load inside `kerasq.quantize_scope({...})`) to
    save annotated models. See the module docstring for an example.
    """

    @abc.abstractmethod
    def get_weights_and_quantizers(self, layer):
        """`[(weight variable, quantizer)]`: the weights of `layer` to quantize."""

    @abc.abstractmethod
    def get_activations_and_quantizers(self, layer):
        """`[(activation function, quantizer)]`: quantize the layer's output after its activation."""

    @abc.abstractmethod
    def set_quantize_weights(self, layer, quantize_weights):
        """Part of tfmot's API; kerasq quantizes the weights itself and does not call it."""

    @abc.abstractmethod
    def set_quantize_activations(self, layer, quantize_activations):
        """Part of tfmot's API; kerasq quantizes the activations itself and does not call it."""

    @abc.abstractmethod
    def get_output_quantizers(self, layer):
        """`[quantizer]` for the layer's outputs (layers without an activation: Add, Concatenate)."""

    @abc.abstractmethod
    def get_config(self):
        """The constructor arguments, for saving."""

    @classmethod
    def from_config(cls, config):
        return cls(**config)


class Quantizer(abc.ABC):
    """tfmot's base class for custom quantizers. kerasq exports only what TFLite's int8 kernels run,
    so a config that uses a subclass of its own fails at `quantize_apply`, saying so: use
    `LastValueQuantizer`, `MovingAverageQuantizer` or `AllValuesQuantizer`."""

    def build(self, tensor_shape, name, layer):
        return {}

    @abc.abstractmethod
    def __call__(self, inputs, training, weights, **kwargs):
        """The quantized `inputs`."""

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


class _RangeQuantizer(Quantizer):
    """tfmot's built-in quantizers: a range estimator and the grid (bits, symmetry, narrow range)."""

    def __init__(self, num_bits, per_axis, symmetric, narrow_range):
        self.num_bits = int(num_bits)
        self.per_axis = bool(per_axis)
        self.symmetric = bool(symmetric)
        self.narrow_range = bool(narrow_range)

    def __call__(self, inputs, training, weights, **kwargs):
        raise TypeError(
            f"{type(self).__name__} is applied by kerasq's QuantizeWrapper (kerasq.quantize_apply), not called."
        )

    def get_config(self):
        return {"num_bits": self.num_bits, "per_axis": self.per_axis, "symmetric": self.symmetric,
                "narrow_range": self.narrow_range}

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash((type(self).__name__, *self.get_config().values()))

    def __repr__(self):
        arguments = ", ".join(f"{key}={value}" for key, value in self.get_config().items())
        return f"{type(self).__name__}({arguments})"

    def weight_quantizer(self):
        return WeightQuantizer(bits=self.num_bits, per_channel=self.per_axis, narrow_range=self.narrow_range)

    def activation_quantizer(self):
        return ActivationQuantizer(bits=self.num_bits, symmetric=self.symmetric, **self._estimator)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LastValueQuantizer(_RangeQuantizer):
    """Range from the last batch (for weights: their current absolute maximum), as tfmot's.

    Example:
    >>> import kerasq
    >>> q = kerasq.quantizers.LastValueQuantizer(num_bits=8, per_axis=True, symmetric=True, narrow_range=True)
    >>> q.weight_quantizer()
    WeightQuantizer(bits=8, per_channel=True, estimator='max')
    """

    _estimator = {"estimator": "ema_minmax", "ema_decay": 0.0}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MovingAverageQuantizer(_RangeQuantizer):
    """Range from a moving average (decay 0.999) of each batch's minimum and maximum, as tfmot's.

    Example:
    >>> import kerasq
    >>> q = kerasq.quantizers.MovingAverageQuantizer(num_bits=8, per_axis=False, symmetric=False, narrow_range=False)
    >>> q.activation_quantizer()
    ActivationQuantizer(bits=8, estimator='ema_minmax', ema_decay=0.999)
    """

    _estimator = {"estimator": "ema_minmax", "ema_decay": _TFMOT_EMA_DECAY}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class AllValuesQuantizer(_RangeQuantizer):
    """Range from the extremes of every batch seen, as tfmot's.

    Example:
    >>> import kerasq
    >>> q = kerasq.quantizers.AllValuesQuantizer(num_bits=8, per_axis=False, symmetric=False, narrow_range=False)
    >>> q.activation_quantizer().estimator
    'minmax'
    """

    _estimator = {"estimator": "minmax"}


def scheme_from_config(config, layer, kernel_names, base):
    """`(scheme, quantize_output)` for `layer` as `config` (a `QuantizeConfig`) asks, or `None` when it
    leaves the layer in float. `kernel_names` are the layer's kernels that kerasq quantizes; `base`
    is the scheme whose other settings (BatchNorm folding) the layer keeps."""
    where = f"{type(config).__name__} on layer '{layer.name}' ({type(layer).__name__})"
    weights = list(config.get_weights_and_quantizers(layer) or [])
    activations = list(config.get_activations_and_quantizers(layer) or [])
    outputs = list(config.get_output_quantizers(layer) or [])
    if not (weights or activations or outputs):
        return None
    for quantizer in [q for _, q in weights] + [q for _, q in activations] + outputs:
        _check_known(quantizer, where)

    kernels = {id(getattr(layer, name)): name for name in kernel_names}
    quantized, weight_quantizers = [], []
    for variable, quantizer in weights:
        name = kernels.get(id(variable))
        if name is None:
            raise ValueError(
                f"{where}: get_weights_and_quantizers returns '{getattr(variable, 'path', variable)}', which is not "
                f"one of the layer's kernels {sorted(kernel_names)}. TFLite quantizes biases to int32 from the "
                "input and weight scales and keeps no other weights: return only the kernels."
            )
        quantized.append(name)
        weight_quantizers.append(quantizer)
    if kernel_names and sorted(quantized) != sorted(kernel_names):
        raise ValueError(
            f"{where}: quantizes kernels {sorted(quantized)} of {sorted(kernel_names)}. TFLite's int8 "
            f"{type(layer).__name__} takes every kernel in int8: return all of them from "
            "get_weights_and_quantizers, or leave the layer in float (return [] from every get_* method, "
            "or do not annotate it)."
        )
    weight_quantizer = base.weights
    if weight_quantizers:
        if len(set(weight_quantizers)) > 1:
            raise ValueError(f"{where}: give every kernel the same quantizer; got {weight_quantizers}.")
        chosen = weight_quantizers[0]
        if not isinstance(chosen, LastValueQuantizer) or not chosen.symmetric:
            raise ValueError(
                f"{where}: weights quantized with {chosen!r}. TFLite stores weights symmetric (zero point 0) "
                "with the range of their current values: use LastValueQuantizer(num_bits=..., per_axis=..., "
                "symmetric=True, narrow_range=...)."
            )
        if chosen.num_bits > 8:
            raise ValueError(f"{where}: TFLite's kernels take weights of at most 8 bits; got {chosen!r}.")
        weight_quantizer = chosen.weight_quantizer()

    activation = [q for _, q in activations] + outputs
    if len(set(activation)) > 1:
        raise ValueError(
            f"{where}: the layer's output is one int8 tensor in the file, with one range; got the quantizers "
            f"{activation}. Return one from get_activations_and_quantizers or get_output_quantizers."
        )
    activation_quantizer = base.activations
    if activation:
        chosen = activation[0]
        if chosen.per_axis:
            raise ValueError(
                f"{where}: activations quantized with {chosen!r}. TFLite quantizes activations per tensor: "
                "set per_axis=False."
            )
        if chosen.narrow_range != chosen.symmetric:
            raise ValueError(
                f"{where}: activations quantized with {chosen!r}. TFLite's activations use the full integer "
                "range when asymmetric (int8) and the narrow one when symmetric (int16): set "
                f"narrow_range={chosen.symmetric}."
            )
        activation_quantizer = chosen.activation_quantizer()
    scheme = QuantizationScheme(
        weights=weight_quantizer,
        activations=activation_quantizer,
        fold_batchnorm=base.fold_batchnorm,
        freeze_batchnorm=base.freeze_batchnorm,
    )
    return scheme, bool(activation)


def _check_known(quantizer, where):
    if not isinstance(quantizer, _RangeQuantizer):
        raise ValueError(
            f"{where}: uses {type(quantizer).__name__}, whose own quantization math no TFLite kernel runs. "
            "Use kerasq.quantizers.LastValueQuantizer (weights), MovingAverageQuantizer or "
            "AllValuesQuantizer (activations), or a kerasq.QuantizationScheme "
            "(kerasq.quantize_annotate_layer(layer, scheme=...))."
        )


__all__ = ["QuantizeConfig", "Quantizer", "LastValueQuantizer", "MovingAverageQuantizer", "AllValuesQuantizer"]
