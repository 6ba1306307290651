"""Quantization schemes: which quantizers a model's weights and activations get."""

import keras

from kerasq.quantization.quantizers import ActivationQuantizer, WeightQuantizer


@keras.saving.register_keras_serializable(package="kerasq")
class QuantizationScheme:
    """The quantizers and BatchNorm handling for quantization-aware training.

    The default is TFLite's int8 scheme: 8-bit symmetric per-channel weights (per-tensor for Dense,
    as TFLite's fully connected kernels require) and 8-bit asymmetric activations. "int16x8" keeps the
    weights and makes activations 16-bit and symmetric (zero point 0), as TFLite's 16x8 kernels take them.

    Args:
        weights: a `WeightQuantizer`.
        activations: an `ActivationQuantizer` (its settings apply to every activation whose range
            TFLite does not fix).
        fold_batchnorm: fold a BatchNormalization into the Conv/Dense before it, so the weights that
            train are the weights deployed.
        freeze_batchnorm: "auto" (the default): True for a BatchNorm whose moving statistics were
            trained, False for one whose statistics still hold their initial values (QAT from
            scratch), decided by `quantize_model`. True: training normalizes with the BatchNorm's moving
            statistics and leaves them as they are, so the network that trains is the one deployed.
            False: training normalizes with each batch's statistics and updates the moving ones, as
            float training does. An int N: batch statistics for the first N training steps, then
            frozen. Fine-tuning a trained
            model with batch statistics cost a converged MobileNetV2 on the digits 1.2 points (mean
            of 3 seeds) that frozen statistics keep.

    Example:
    >>> from kerasq import ActivationQuantizer, QuantizationScheme
    >>> scheme = QuantizationScheme(activations=ActivationQuantizer(ema_decay=0.999))
    >>> scheme.weights.bits, scheme.activations.ema_decay
    (8, 0.999)
    """

    def __init__(
        self,
        weights=None,
        activations=None,
        fold_batchnorm=True,
        freeze_batchnorm="auto",
    ):
        self.weights = weights if weights is not None else WeightQuantizer()
        self.activations = activations if activations is not None else ActivationQuantizer()
        if not isinstance(self.weights, WeightQuantizer):
            raise TypeError(f"weights must be a kerasq WeightQuantizer; got {self.weights!r}.")
        if not isinstance(self.activations, ActivationQuantizer):
            raise TypeError(
                f"activations must be a kerasq ActivationQuantizer; got {self.activations!r}."
            )
        _check_tflite_bits(self.weights, self.activations)
        self.fold_batchnorm = bool(fold_batchnorm)
        if freeze_batchnorm != "auto" and not isinstance(freeze_batchnorm, bool):
            if isinstance(freeze_batchnorm, float) and freeze_batchnorm.is_integer():
                freeze_batchnorm = int(freeze_batchnorm)
            if not isinstance(freeze_batchnorm, int) or freeze_batchnorm < 0:
                raise ValueError(
                    "freeze_batchnorm must be 'auto', True, False or a number of training steps (an int >= 0); "
                    f"got {freeze_batchnorm!r}."
                )
        self.freeze_batchnorm = freeze_batchnorm

    def get_config(self):
        return {
            "weights": keras.saving.serialize_keras_object(self.weights),
            "activations": keras.saving.serialize_keras_object(self.activations),
            "fold_batchnorm": self.fold_batchnorm,
            "freeze_batchnorm": self.freeze_batchnorm,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["weights"] = keras.saving.deserialize_keras_object(config["weights"])
        config["activations"] = keras.saving.deserialize_keras_object(config["activations"])
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __repr__(self):
        return f"QuantizationScheme(weights={self.weights!r}, activations={self.activations!r})"


def _check_tflite_bits(weights, activations):
    """Activations wider than 8 bits exist in TFLite only as its 16x8 scheme: 16-bit symmetric
    activations (zero point 0) with weights of at most 8 bits."""
    if activations.bits <= 8:
        return
    if activations.bits != 16 or not activations.symmetric or weights.bits > 8:
        raise ValueError(
            "TFLite runs activations wider than 8 bits only as 16-bit symmetric ones with weights of at "
            f"most 8 bits (its 16x8 kernels); got {activations!r} (symmetric={activations.symmetric}) "
            f"with {weights!r}. Use scheme='int16x8', i.e. ActivationQuantizer(bits=16, symmetric=True) "
            "with 8-bit weights."
        )


def int16x8_scheme():
    """TFLite's 16x8 scheme: 16-bit symmetric activations, the int8 scheme's 8-bit weights."""
    return QuantizationScheme(activations=ActivationQuantizer(bits=16, symmetric=True))


_NAMED_SCHEMES = {"int8": QuantizationScheme, "int16x8": int16x8_scheme}


def get_scheme(scheme):
    """Returns a `QuantizationScheme` from a scheme or a name ("int8", "int16x8")."""
    if isinstance(scheme, QuantizationScheme):
        return scheme
    if isinstance(scheme, str) and scheme in _NAMED_SCHEMES:
        return _NAMED_SCHEMES[scheme]()
    per_layer = (
        " Schemes per layer go in layer_schemes= ({layer name: scheme}), with scheme= for the rest."
        if isinstance(scheme, dict) else ""
    )
    raise ValueError(
        f"Unknown quantization scheme {scheme!r}. Pass one of {sorted(_NAMED_SCHEMES)} or a "
        f"kerasq.QuantizationScheme.{per_layer}"
    )
