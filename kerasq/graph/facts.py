"""Facts about layer kinds that every transform shares: kernels, channel axes, how channels flow.

Quantization needs to know which weights are kernels and where their output channels lie; pruning
and clustering which weights to sparsify or share; channel removal and weight transfer which axes to
slice and which layers' channels must be removed together. One registry says it once per layer kind.

A layer's channels flow in one of six ways:

- `PRODUCES`: it computes new output channels from all of its input channels (Conv, Dense,
  Embedding). Its kernels have an input-channel axis and an output-channel axis.
- `PRESERVES`: output channel c depends on input channel c only (BatchNorm, activations, pooling,
  padding, a depthwise convolution with multiplier 1). Its per-channel weights are sliced with them.
- `JOINS`: an elementwise op on several inputs whose channels line up (Add, Multiply, Maximum...).
- `CONCATENATES`: its output channels are its inputs' channels, one input after another.
- `RESHAPES`: values move between positions (Flatten, Reshape): channels are kept where the last
  axis is unchanged ((C,) -> (1, 1, C) in squeeze-excitation), and mixed otherwise.
- `MIXES`: channels are combined (softmax over channels, LayerNormalization, attention): channel
  removal stops here.

Describe a custom layer once and every transform uses it:

>>> import keras
>>> from kerasq.graph import facts
>>> class Scale(keras.layers.Layer):  # multiplies each channel by a learned factor
...     def build(self, input_shape):
...         self.factor = self.add_weight(shape=(input_shape[-1],), initializer="ones")
...     def call(self, x):
...         return x * self.factor
>>> with facts.register_layer_facts(Scale, facts.LayerFacts(facts.PRESERVES, per_channel={"factor": 0})):
...     facts.layer_facts(Scale()).channels
'preserves'
>>> facts.layer_facts(Scale()) is None
True
"""

import dataclasses
from typing import Callable, Mapping, Optional, Tuple, Union

import keras
import numpy as np
from keras import layers

from kerasq.graph.registry import ClassRegistry

PRODUCES = "produces"
PRESERVES = "preserves"
JOINS = "joins"
CONCATENATES = "concatenates"
RESHAPES = "reshapes"
MIXES = "mixes"
CHANNEL_FLOWS = (PRODUCES, PRESERVES, JOINS, CONCATENATES, RESHAPES, MIXES)

Axis = Union[int, Tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class Kernel:
    """Where a kernel's channels lie.

    `out_axis` is the output-channel axis; a tuple of axes means the output channels are those axes
    flattened (a depthwise kernel [..., in_channels, multiplier] feeds output channel c * m + k from
    kernel[..., c, k]). `in_axis` is the input-channel axis, or None when the layer takes no channels
    (an Embedding takes token ids).
    """

    out_axis: Axis
    in_axis: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class LayerFacts:
    """What every transform needs to know about one layer.

    Args:
        channels: how channels flow through the layer: `PRODUCES`, `PRESERVES`, `JOINS`,
            `CONCATENATES`, `RESHAPES` or `MIXES`.
        kernels: {weight attribute: `Kernel`} for the weights that compute new channels (quantized,
            pruned, clustered).
        bias: the attribute of the bias added per output channel, if any.
        per_channel: {weight attribute: axis} of weights that hold one entry per channel along that
            axis (BatchNorm's gamma, beta and statistics; a bias), sliced when channels are removed.
        channel_axis: the channel axis of the layer's inputs and outputs.
        concat_axis: for `CONCATENATES`, the axis the inputs are joined along.
    """

    channels: str
    kernels: Mapping[str, Kernel] = dataclasses.field(default_factory=dict)
    bias: Optional[str] = None
    per_channel: Mapping[str, int] = dataclasses.field(default_factory=dict)
    channel_axis: int = -1
    concat_axis: Optional[int] = None

    def __post_init__(self):
        if self.channels not in CHANNEL_FLOWS:
            raise ValueError(f"channels must be one of {CHANNEL_FLOWS}; got {self.channels!r}.")
        if self.channels == PRODUCES and not self.kernels:
            raise ValueError("A layer that PRODUCES channels needs at least one kernel in `kernels`.")

    @property
    def output_kernel(self):
        """The kernel whose output channels are the layer's: the one a following BatchNorm scales."""
        names = [name for name in self.kernels if name != "depthwise_kernel"] or list(self.kernels)
        return names[-1] if names else None


def _call_is_inherited(cls, base):
    # A subclass that overrides `call` computes something else: it shares no facts with its base.
    return cls.call is base.call


_REGISTRY = ClassRegistry("layer facts", inherits=_call_is_inherited)


def register_layer_facts(layer_class, facts):
    """Says how `layer_class` (and subclasses that keep its `call`) holds and moves channels.

    `facts` is a `LayerFacts`, or a function `fn(layer) -> LayerFacts` for facts that depend on the
    layer's settings. Returns a `Registration`: `undo()` it, or use it as a context manager.
    """
    if not (isinstance(layer_class, type) and issubclass(layer_class, keras.layers.Layer)):
        raise TypeError(f"layer_class must be a keras Layer class; got {layer_class!r}.")
    if not (isinstance(facts, LayerFacts) or callable(facts)):
        raise TypeError(f"facts must be a LayerFacts or a function of the layer; got {facts!r}.")
    return _REGISTRY.register(layer_class, facts)


def layer_facts(layer) -> Optional[LayerFacts]:
    """The `LayerFacts` of `layer`, or None when no transform knows its kind."""
    entry = _REGISTRY.lookup(layer)
    if entry is None or isinstance(entry, LayerFacts):
        return entry
    return entry(layer)


def channel_axis(layer):
    """-1 for channels_last layers (and layers without a data format), 1 for channels_first."""
    return 1 if getattr(layer, "data_format", "channels_last") == "channels_first" else -1


# ---- the built-in layer kinds ----------------------------------------------------------------------

def _dense(layer):
    return LayerFacts(PRODUCES, {"kernel": Kernel(out_axis=-1, in_axis=0)}, bias=_bias(layer),
                      per_channel=_bias_axis(layer))


def _conv(layer):
    return LayerFacts(PRODUCES, {"kernel": Kernel(out_axis=-1, in_axis=-2)}, bias=_bias(layer),
                      per_channel=_bias_axis(layer), channel_axis=channel_axis(layer))


def _conv_transpose(layer):
    # Keras stores transposed kernels as [..., filters, in_channels].
    return LayerFacts(PRODUCES, {"kernel": Kernel(out_axis=-2, in_axis=-1)}, bias=_bias(layer),
                      per_channel=_bias_axis(layer), channel_axis=channel_axis(layer))


def _separable(layer):
    kernels = {
        "depthwise_kernel": Kernel(out_axis=(-2, -1), in_axis=-2),
        "pointwise_kernel": Kernel(out_axis=-1, in_axis=-2),
    }
    return LayerFacts(PRODUCES, kernels, bias=_bias(layer), per_channel=_bias_axis(layer),
                      channel_axis=channel_axis(layer))


def _depthwise(layer):
    kernel = {"kernel": Kernel(out_axis=(-2, -1), in_axis=-2)}
    if layer.depth_multiplier != 1:
        # Output channel c * m + k comes from input channel c: channels multiply, so they are new ones.
        return LayerFacts(PRODUCES, kernel, bias=_bias(layer), per_channel=_bias_axis(layer),
                          channel_axis=channel_axis(layer))
    return LayerFacts(PRESERVES, kernel, bias=_bias(layer),
                      per_channel={"kernel": -2, **_bias_axis(layer)}, channel_axis=channel_axis(layer))


def _embedding(layer):
    return LayerFacts(PRODUCES, {"embeddings": Kernel(out_axis=-1, in_axis=None)})


def _batchnorm(layer):
    axis = layer.axis[0] if isinstance(layer.axis, (list, tuple)) else layer.axis
    names = ["moving_mean", "moving_variance"]
    names += ["gamma"] if layer.scale else []
    names += ["beta"] if layer.center else []
    return LayerFacts(PRESERVES, per_channel={name: 0 for name in names}, channel_axis=axis)


def _normalization(layer):
    axis = layer.axis[-1] if isinstance(layer.axis, (list, tuple)) and layer.axis else -1
    per_channel = {"mean": -1, "variance": -1} if getattr(layer, "mean", None) is not None else {}
    return LayerFacts(PRESERVES, per_channel=per_channel, channel_axis=axis)


def _prelu(layer):
    return LayerFacts(PRESERVES, per_channel={"alpha": -1})


def _concatenate(layer):
    return LayerFacts(CONCATENATES, concat_axis=layer.axis)


def _bias(layer):
    return "bias" if getattr(layer, "use_bias", False) else None


def _bias_axis(layer):
    return {"bias": 0} if getattr(layer, "use_bias", False) else {}


def _channel_preserving(layer):
    return LayerFacts(PRESERVES, channel_axis=channel_axis(layer))


def _activation(layer):
    # Softmax normalizes across the channel axis: every output channel depends on every input one.
    name = getattr(getattr(layer, "activation", None), "__name__", "")
    softmax = isinstance(layer, layers.Softmax) or name in ("softmax", "log_softmax")
    return LayerFacts(MIXES) if softmax else LayerFacts(PRESERVES)


def _rescaling(layer):
    scalar = np.ndim(layer.scale) == 0 and np.ndim(layer.offset) == 0
    return LayerFacts(PRESERVES) if scalar else LayerFacts(MIXES)


def _register_builtin_facts():
    for layer_class in (layers.Dense,):
        register_layer_facts(layer_class, _dense)
    for layer_class in (layers.Conv1D, layers.Conv2D, layers.Conv3D):
        register_layer_facts(layer_class, _conv)
    for layer_class in (layers.Conv1DTranspose, layers.Conv2DTranspose, layers.Conv3DTranspose):
        register_layer_facts(layer_class, _conv_transpose)
    for layer_class in (layers.SeparableConv1D, layers.SeparableConv2D):
        register_layer_facts(layer_class, _separable)
    for layer_class in (layers.DepthwiseConv1D, layers.DepthwiseConv2D):
        register_layer_facts(layer_class, _depthwise)
    register_layer_facts(layers.Embedding, _embedding)
    register_layer_facts(layers.BatchNormalization, _batchnorm)
    register_layer_facts(layers.Normalization, _normalization)
    register_layer_facts(layers.PReLU, _prelu)
    register_layer_facts(layers.Concatenate, _concatenate)
    register_layer_facts(layers.Rescaling, _rescaling)
    for layer_class in (layers.Activation, layers.Softmax):
        register_layer_facts(layer_class, _activation)
    reshapes = LayerFacts(RESHAPES)
    for layer_class in (layers.Flatten, layers.Reshape):
        register_layer_facts(layer_class, reshapes)
    for layer_class in (
        layers.ReLU, layers.LeakyReLU, layers.ELU,
        layers.MaxPooling1D, layers.MaxPooling2D, layers.MaxPooling3D,
        layers.AveragePooling1D, layers.AveragePooling2D, layers.AveragePooling3D,
        layers.GlobalAveragePooling1D, layers.GlobalAveragePooling2D, layers.GlobalAveragePooling3D,
        layers.GlobalMaxPooling1D, layers.GlobalMaxPooling2D, layers.GlobalMaxPooling3D,
        layers.ZeroPadding1D, layers.ZeroPadding2D, layers.ZeroPadding3D,
        layers.Cropping1D, layers.Cropping2D, layers.Cropping3D,
        layers.UpSampling1D, layers.UpSampling2D, layers.UpSampling3D,
        layers.Resizing, layers.CenterCrop,
        layers.Dropout, layers.SpatialDropout1D, layers.SpatialDropout2D, layers.SpatialDropout3D,
        layers.GaussianNoise, layers.GaussianDropout, layers.AlphaDropout, layers.ActivityRegularization,
        layers.Identity,
    ):
        register_layer_facts(layer_class, _channel_preserving)
    # Augmentation: geometric and per-channel changes keep channels apart; colour changes mix them.
    for name in ("RandomFlip", "RandomRotation", "RandomTranslation", "RandomZoom", "RandomShear",
                 "RandomContrast", "RandomBrightness", "RandomErasing", "RandomGaussianBlur",
                 "RandomSharpness", "RandomPerspective", "RandomElasticTransform", "RandomPosterization",
                 "RandomInvert"):
        if hasattr(layers, name):
            register_layer_facts(getattr(layers, name), _channel_preserving)
    for name in ("RandomHue", "RandomSaturation", "RandomColorJitter", "RandomColorDegeneration",
                 "RandomGrayscale"):
        if hasattr(layers, name):
            register_layer_facts(getattr(layers, name), LayerFacts(MIXES))
    joins = LayerFacts(JOINS)
    for layer_class in (layers.Add, layers.Subtract, layers.Multiply, layers.Maximum, layers.Minimum,
                        layers.Average):
        register_layer_facts(layer_class, joins)
    mixes = LayerFacts(MIXES)
    for layer_class in (layers.Permute, layers.LayerNormalization, layers.MultiHeadAttention):
        register_layer_facts(layer_class, mixes)


_register_builtin_facts()
