"""`quantize_model` and its tfmot-style relatives: turn a float Keras model into a QAT model."""

import keras
import numpy as np

from kerasq import _keras_private
from kerasq.constraints import KeepZeros
from kerasq.graph import LayerGraph, Rewrite, all_layers, rules, tracing, wrappers
from kerasq.graph.reader import layer_config
from kerasq.graph.selection import layer_predicate
from kerasq.quantization import handlers as handlers_lib
from kerasq.quantization.affine import affine_as_batchnorm, is_affine_preprocessing
from kerasq.quantization.calibrate import calibrate_ranges
from kerasq.quantization.layers import Quantize, QuantizeWrapper, batchnorm_fold, quantized_layers
from kerasq.quantization.quantizers import ActivationQuantizer, WeightQuantizer
from kerasq.quantization import combine, tfmot_compat
from kerasq.quantization.scheme import QuantizationScheme, get_scheme
from kerasq.quantization.tfmot_compat import QuantizeConfig


def quantize_model(model, scheme="int8", skip=(), preserve_sparsity=False, preserve_clusters=False,
                   calibration_data=None, layer_schemes=None, quantized_layer_name_prefix="quant_"):
    """Returns a new model that trains as its int8 TFLite export will run; `model` is not changed.

    Every supported layer is wrapped in a `QuantizeWrapper` (fake-quantized weights and outputs), each
    float model input gets a `Quantize` layer, BatchNormalization is folded into the Conv/Dense before
    it, and ReLU/ReLU6 are fused where TFLite fuses them. Nested Sequential/Functional models are
    inlined. The result is a Functional model with the original weights, ready for `compile`/`fit`
    and `kerasq.export_tflite`.

    Args:
        model: a built Sequential or Functional Keras model.
        scheme: "int8" or a `kerasq.QuantizationScheme`.
        skip: layers to leave in float: names, layer classes, or a predicate `fn(layer) -> bool`.
            Their outputs are quantized again before the next quantized layer.
        preserve_sparsity: keep every kernel weight that is zero now (a pruned model's, stripped or
            still wrapped) at zero through training, so the exported file keeps the zeros: each such
            kernel gets a `kerasq.constraints.KeepZeros` constraint, which saves with the model.
        preserve_clusters: keep a clustered model's kernels on their clusters (and zeros) through
            training, so each holds at most its number of clusters of int8 values per channel in
            the file (`kerasq.clustering.quantize_preserving_clusters`).
        calibration_data: inputs (as for `predict`) to set every activation range from before
            training, with the scheme's estimator (`kerasq.calibrate_ranges`), so QAT starts where
            post-training quantization ends. Without it ranges start from the first training batch.
        layer_schemes: `{layer name: scheme}` for layers that take another scheme than `scheme`,
            e.g. `{"conv2": QuantizationScheme(weights=WeightQuantizer(bits=4))}` for 4-bit
            weights in one layer (`quantize_annotate_layer(layer, scheme=...)` does the same).
        quantized_layer_name_prefix: the prefix of each quantized layer's name (tfmot's argument):
            layer "conv" becomes "quant_conv".

    Example:
    >>> import keras, kerasq
    >>> model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3),
    ...                           keras.layers.ReLU(), keras.layers.Flatten(), keras.layers.Dense(10)])
    >>> qat = kerasq.quantize_model(model)
    >>> [type(layer).__name__ for layer in qat.layers]
    ['InputLayer', 'Quantize', 'QuantizeWrapper', 'QuantizeWrapper', 'QuantizeWrapper', 'QuantizeWrapper']
    """
    if preserve_clusters and layer_schemes:
        raise ValueError("layer_schemes cannot be combined with preserve_clusters yet: give one scheme.")
    if preserve_clusters:
        from kerasq.clustering import quantize_preserving_clusters  # clustering builds on this module

        if quantized_layer_name_prefix != "quant_":
            raise ValueError("quantized_layer_name_prefix cannot be combined with preserve_clusters yet.")
        quantized = quantize_preserving_clusters(model, scheme=scheme, skip=skip)
    else:
        quantized = _quantize(model, get_scheme(scheme), layer_predicate(skip), annotated_only=False,
                              layer_schemes=layer_schemes, name_prefix=quantized_layer_name_prefix)
    if preserve_sparsity and not preserve_clusters:
        _keep_zeros(quantized)
    if calibration_data is not None:
        calibrate_ranges(quantized, calibration_data)
    return quantized


def quantize_annotate_layer(to_annotate, quantize_config=None, scheme=None):
    """Marks one layer for `quantize_apply` (tfmot's name); the layer still runs in float until then.

    Args:
        to_annotate: a Keras layer.
        quantize_config: a `kerasq.QuantizeConfig` (tfmot's API) saying which of its weights and
            activations are quantized, and how; None for kerasq's defaults.
        scheme: a `kerasq.QuantizationScheme` (or its name) for this layer instead of
            `quantize_apply`'s.

    Example:
    >>> import keras, kerasq
    >>> dense = kerasq.quantize_annotate_layer(keras.layers.Dense(3))
    >>> type(dense).__name__
    'QuantizeAnnotate'
    """
    if not isinstance(to_annotate, keras.layers.Layer) or isinstance(to_annotate, keras.Model):
        raise TypeError(
            "quantize_annotate_layer takes a keras layer (not a model: use quantize_annotate_model); "
            f"got {type(to_annotate).__name__}."
        )
    if isinstance(quantize_config, (str, QuantizationScheme)):  # kerasq's earlier second argument
        quantize_config, scheme = None, quantize_config
    if quantize_config is not None and not isinstance(quantize_config, QuantizeConfig):
        raise TypeError(
            f"quantize_config must be a kerasq.QuantizeConfig; got {type(quantize_config).__name__}. "
            "(A tfmot QuantizeConfig subclass becomes one when it subclasses kerasq.QuantizeConfig.)"
        )
    if quantize_config is not None and scheme is not None:
        raise ValueError("Give quantize_annotate_layer a quantize_config or a scheme, not both.")
    return QuantizeAnnotate(to_annotate, scheme=scheme, quantize_config=quantize_config)


def quantize_annotate_model(to_annotate):
    """Marks every layer of a model for `quantize_apply` (tfmot's name). Returns a new model."""

    def annotate(layer, rewrite):
        if isinstance(layer, QuantizeAnnotate):
            # Cloned by their classes, not through a saved config: a custom layer or QuantizeConfig
            # need not be registered (or in a quantize_scope) until the model is saved.
            inner = rewrite.clone(layer.layer, unique_name=False)
            return QuantizeAnnotate(inner, scheme=layer.scheme, quantize_config=layer.quantize_config,
                                    name=rewrite.names.take(layer.name))
        clone = rewrite.clone(layer)
        if not isinstance(layer, keras.layers.Layer) or isinstance(layer, QuantizeAnnotate):
            return clone  # bare operations are quantized by quantize_apply's neighbours
        return QuantizeAnnotate(clone, name=rewrite.names.take(f"quantize_annotate_{layer.name}"))

    return Rewrite(to_annotate, annotate).run()


def quantize_apply(model, scheme="int8", quantized_layer_name_prefix="quant_", calibration_data=None):
    """Quantizes the layers marked with `quantize_annotate_layer`; the rest stays float (tfmot's name).

    Example:
    >>> import keras, kerasq
    >>> inputs = keras.Input((4,))
    >>> hidden = kerasq.quantize_annotate_layer(keras.layers.Dense(3))(inputs)
    >>> model = keras.Model(inputs, keras.layers.Dense(2)(hidden))
    >>> [type(layer).__name__ for layer in kerasq.quantize_apply(model).layers]
    ['InputLayer', 'Quantize', 'QuantizeWrapper', 'Dense']
    """
    if isinstance(scheme, combine.Default8BitQuantizeScheme):
        if scheme.preserve_clusters:
            from kerasq.clustering import quantize_preserving_clusters  # clustering builds on this module

            if quantized_layer_name_prefix != "quant_":
                raise ValueError("quantized_layer_name_prefix cannot be combined with preserve_clusters yet.")
            annotated = {wrappers.unwrap(layer).name for layer in all_layers(model) if isinstance(layer, QuantizeAnnotate)}
            plain = Rewrite(
                model, lambda layer, rewrite: wrappers.strip(layer, rewrite) if isinstance(layer, QuantizeAnnotate) else None,
                inline=False,
            ).run()
            quantized = quantize_preserving_clusters(plain, skip=lambda layer: wrappers.unwrap(layer).name not in annotated)
        else:
            quantized = quantize_apply(model, "int8", quantized_layer_name_prefix)
            if scheme.preserve_sparsity:
                _keep_zeros(quantized)
    else:
        quantized = _quantize(model, get_scheme(scheme), lambda layer: False, annotated_only=True,
                              name_prefix=quantized_layer_name_prefix)
    if calibration_data is not None:
        calibrate_ranges(quantized, calibration_data)
    return quantized


def quantize_scope(*custom_objects):
    """Context manager for loading QAT models saved by tfmot-style code.

    kerasq's layers are registered with Keras on import, so `.keras` files load without it; it
    exists so code written for tfmot runs unchanged, and accepts extra custom objects (dicts).
    """
    objects = {
        "QuantizeWrapper": QuantizeWrapper,
        "Quantize": Quantize,
        "QuantizeAnnotate": QuantizeAnnotate,
        "QuantizationScheme": QuantizationScheme,
        "WeightQuantizer": WeightQuantizer,
        "ActivationQuantizer": ActivationQuantizer,
        "QuantizeConfig": QuantizeConfig,
        "LastValueQuantizer": tfmot_compat.LastValueQuantizer,
        "MovingAverageQuantizer": tfmot_compat.MovingAverageQuantizer,
        "AllValuesQuantizer": tfmot_compat.AllValuesQuantizer,
    }
    for extra in custom_objects:
        objects.update(extra)
    return keras.saving.custom_object_scope(objects)


def is_quantized(model):
    """True if `model` holds kerasq fake-quantization layers (so it exports to an int8 file)."""
    return bool(quantized_layers(model))


@keras.saving.register_keras_serializable(package="kerasq")
class QuantizeAnnotate(keras.layers.Wrapper):
    """A layer marked for quantization by `quantize_apply`; until then it runs its layer unchanged."""

    def __init__(self, layer, scheme=None, quantize_config=None, **kwargs):
        super().__init__(layer, **kwargs)
        if isinstance(quantize_config, dict):
            quantize_config = keras.saving.deserialize_keras_object(quantize_config)
        self.quantize_config = quantize_config
        # keras.Sequential takes its input shape from its first layer's `input_shape=`: keep it visible.
        self._input_shape_arg = getattr(layer, "_input_shape_arg", None)
        if isinstance(scheme, dict):
            scheme = keras.saving.deserialize_keras_object(scheme)
        self.scheme = None if scheme is None else get_scheme(scheme)

    def call(self, inputs, *args, **kwargs):
        return self.layer(inputs, *args, **kwargs)

    def compute_output_shape(self, input_shape, *args, **kwargs):
        return self.layer.compute_output_shape(input_shape, *args, **kwargs)

    def compute_output_spec(self, *args, **kwargs):
        # The wrapped layer's answer: traced from its `call` when it has no `compute_output_shape`.
        return self.layer.compute_output_spec(*args, **kwargs)

    def get_config(self):
        scheme = keras.saving.serialize_keras_object(self.scheme) if self.scheme else None
        config = {**super().get_config(), "scheme": scheme}
        if self.quantize_config is not None:
            config["quantize_config"] = keras.saving.serialize_keras_object(self.quantize_config)
        return config


# ---- the rewrite -----------------------------------------------------------------------------------
_FLOAT, _WRAP, _FOLDED = "float", "wrap", "folded"
# Every layer of a QAT model computes in float32, whatever the float model's dtype policy. The int8
# file it simulates holds no half-precision tensor, and half precision is off its integer grid: the
# fake-quant op's float32 grid values move by up to 0.12 of a step in float16 (11-bit mantissa) and
# 0.9 in bfloat16 (8 bits), 1% of them onto another level, and Conv/Dense in half precision put 3-6%
# of a digits CNN's outputs a step or more away from the file's. Keras's loss scaling (mixed_float16)
# works on these float32 gradients as on any others.
_COMPUTE_DTYPE = "float32"


def _quantize(model, scheme, skip, annotated_only, layer_schemes=None, name_prefix="quant_"):
    if isinstance(model, keras.Model) and is_quantized(model):
        raise ValueError(
            f"Model '{model.name}' is already quantized: it holds kerasq Quantize/QuantizeWrapper "
            "layers. Train it as it is and export it with kerasq.export_tflite, or quantize the float "
            "model it came from."
        )
    graph = LayerGraph(_custom_layers_traced(model, skip))
    layer_schemes = _check_layer_schemes(graph, layer_schemes)
    plan = _plan(graph, scheme, skip, annotated_only, layer_schemes)
    for step in plan.values():
        step.name_prefix = name_prefix
    rewrite = Rewrite(
        graph, lambda layer, rewrite: _substitute([plan[n.id] for n in graph.nodes_of(layer)], layer, rewrite)
    )
    substitute, names = rewrite.substitute, rewrite.names
    boundaries = _PrecisionBoundaries(names)

    def call_layer(node, args, kwargs):
        step = plan[node.id]
        if step.action == _FOLDED:
            return args[0]
        if step.action == _WRAP:
            args, kwargs = boundaries.requantize((args, kwargs), step.scheme, f"{_unannotated(node.layer).name}_input")
        if not isinstance(node.layer, keras.layers.Layer):
            args, kwargs = keras.tree.map_structure(_as_float32_constant, (args, kwargs))
        if step.action == _WRAP and step.scheme.activations.bits == 8:
            args, kwargs = keras.tree.map_structure(_on_int8_grid, (args, kwargs))
        if step.action == _WRAP and graph.calls_of(node.layer) > 1:
            kwargs = {**kwargs, "call_index": graph.call_index(node)}
        if step.depthwise_rank == 2:
            # A BatchNorm on (batch, channels) runs as a depthwise conv over a length-1 sequence.
            (features, *rest) = args
            outputs = substitute(node)(keras.ops.expand_dims(features, 1), *rest, **kwargs)
            outputs = keras.ops.squeeze(outputs, 1)
        else:
            outputs = substitute(node)(*args, **kwargs)
        requantized = step.requantize and (step.action == _FLOAT or not step.quantize_config_output)
        if requantized:
            float_scheme = _consumers_scheme(graph, node, plan, scheme)
            outputs = keras.tree.map_structure(
                lambda tensor: _quantize_float(tensor, float_scheme, names.take(f"{_unannotated(node.layer).name}_quantize")),
                outputs,
            )
            boundaries.record(outputs, float_scheme)
        elif step.action == _WRAP and step.quantize_output:
            boundaries.record(outputs, step.scheme)
        return outputs

    def on_input(node, tensor):
        if annotated_only and not any(plan[c.id].action == _WRAP for c in graph.consumers(node)):
            return tensor
        # At the model's scheme, whatever its first layers': the file's inputs have its type.
        quantized = _quantize_float(tensor, scheme, names.take(f"quantize_{node.layer.name}"))
        boundaries.record(quantized, scheme)
        return quantized

    output_names = list(getattr(model, "output_names", None) or [])
    keep_names = len(output_names) > 1 and len(set(output_names)) == len(output_names)
    if keep_names:
        # Dict losses and metrics are keyed by the model's output names: the QAT model keeps them.
        names.taken.update(output_names)

    def on_output(index, tensor):
        return keras.layers.Identity(name=output_names[index], dtype=_COMPUTE_DTYPE)(tensor)

    return rewrite.run(call_layer, on_input=on_input, on_output=on_output if keep_names else None)


def _custom_layers_traced(model, skip):
    """`model` with each custom layer kerasq has no handler for (a hand-written encoder block, say)
    in the form of the Functional model its `call` makes of its sublayers and operations
    (`tracing.layer_as_functional`), so those are quantized; `model` itself where there is none."""
    traced = {}
    for node in LayerGraph(model).nodes:
        layer = node.layer
        custom = isinstance(layer, keras.layers.Layer) and not isinstance(layer, keras.Model)
        if custom and not type(layer).__module__.startswith("keras.") and not wrappers.is_wrapper(layer):
            if handlers_lib.get_handler(layer) is None and not skip(layer) and layer.__dict__.get("_layers"):
                functional = tracing.layer_as_functional(layer)
                if functional is not None:
                    traced[id(layer)] = functional
    if not traced:
        return model
    return Rewrite(model, lambda layer, rewrite: traced.get(id(layer))).run()


def _substitute(steps, layer, rewrite):
    """The layer that replaces `layer`: a renamed float copy, or a QuantizeWrapper of a copy.

    `steps` holds the plan for each call of `layer`; a shared layer's calls share one plan, but
    each call decides for itself whether its output is quantized or left to a fused activation.
    Other features' wrappers are stripped: their effect is baked into the copy.
    """
    step = steps[0]
    if step.action == _FLOAT:
        if isinstance(layer, keras.layers.Bidirectional):
            return _unrolled_bidirectional(layer, rewrite)
        return wrappers.strip(layer, rewrite, **_in_float32(layer), **_unrolled(layer))
    name = rewrite.names.take(f"{step.name_prefix}{wrappers.unwrap(layer).name}")
    inner = {"unique_name": False}  # names inside a wrapper need not be unique in the model
    scheme = step.scheme
    if scheme.freeze_batchnorm == "auto":
        # Frozen statistics keep a trained network as it was trained; statistics never trained would
        # normalize nothing, so QAT from scratch trains them with batch statistics, as float does.
        folded = step.batchnorm if step.depthwise_rank is None else layer  # a standalone BN folds into itself
        is_batchnorm = isinstance(wrappers.unwrap(folded), keras.layers.BatchNormalization)
        frozen = folded is None or not is_batchnorm or not _untrained(folded)
        scheme = QuantizationScheme.from_config({**scheme.get_config(), "freeze_batchnorm": frozen})
    batchnorm = (
        wrappers.strip(step.batchnorm, rewrite, **inner, **_in_float32(step.batchnorm))
        if step.batchnorm is not None else None
    )
    if step.depthwise_rank is not None:
        unwrapped = wrappers.unwrap(layer)
        if isinstance(unwrapped, keras.layers.BatchNormalization):
            batchnorm = wrappers.strip(layer, rewrite, **inner, **_in_float32(layer))
        else:
            batchnorm = affine_as_batchnorm(unwrapped)
        layer = _identity_depthwise(unwrapped, step.depthwise_rank)
    else:
        distributed = _time_distributed_inner(wrappers.unwrap(layer))
        if distributed is not None:
            layer = distributed  # on (batch, time, features) it computes what TimeDistributed does
        original, layer = layer, wrappers.strip(layer, rewrite, **inner, **_in_float32(layer))
        _build_like(layer, wrappers.unwrap(original))
    quantize_output = [each.quantize_output for each in steps]
    return QuantizeWrapper(
        layer,
        scheme=scheme,
        batchnorm=batchnorm,
        quantize_output=quantize_output if len(steps) > 1 else quantize_output[0],
        name=name,
        dtype=_COMPUTE_DTYPE,
    )


_FLOAT_ISLANDS = (keras.layers.RNN, keras.layers.Bidirectional)


def _build_like(clone, layer):
    """Builds `clone` as `layer` was built when it took several inputs (attention's query and
    value): the wrapper around it sees its first input only."""
    config = layer.get_build_config() if layer.built else None
    if config and len(config.get("shapes_dict", {})) > 1 and not clone.built:
        clone.build_from_config(config)


def _unrolled(layer):
    """Clone options that unroll a recurrent layer over a sequence of known length: its loop then
    converts to plain TFLite ops, where Keras 3's while loop needs TensorFlow ops TFLite lacks
    (TensorListReserve). Nothing for other layers, or when the length is unknown."""
    return {"unroll": True} if isinstance(layer, keras.layers.RNN) and _known_length(layer) else {}


def _unrolled_bidirectional(layer, rewrite):
    """A copy of a Bidirectional layer whose two recurrent layers are unrolled (see `_unrolled`)."""
    config = layer_config(layer)
    if _known_length(layer):
        for key in ("layer", "backward_layer"):
            if config.get(key):
                config[key] = {**config[key], "config": {**config[key]["config"], "unroll": True}}
    config["name"] = rewrite.names.take(layer.name)
    clone = type(layer).from_config(config)
    rewrite.weights.copy_layer(clone, layer)
    return clone


def _check_layer_schemes(graph, layer_schemes):
    """`{layer name: QuantizationScheme}`, every name a layer of the model."""
    if not layer_schemes:
        return {}
    if not isinstance(layer_schemes, dict):
        raise TypeError(f"layer_schemes must be a dict of layer names to schemes; got {type(layer_schemes).__name__}.")
    names = {_unannotated(node.layer).name for node in graph.nodes}
    unknown = sorted(set(layer_schemes) - names)
    if unknown:
        raise ValueError(
            f"layer_schemes names layers the model does not have: {unknown}. Its layers: {sorted(names)}."
        )
    return {name: get_scheme(value) for name, value in layer_schemes.items()}


def _time_distributed_inner(layer):
    """The layer inside a TimeDistributed when it computes the same on the whole sequence at once
    (a Dense, or an activation, acts on the last axis whatever the leading ones), else None."""
    if not isinstance(layer, keras.layers.TimeDistributed):
        return None
    inner = layer.layer
    acts_on_last_axis = (keras.layers.Dense, keras.layers.Activation, keras.layers.ReLU, keras.layers.Softmax,
                         keras.layers.Dropout)
    return inner if type(inner) in acts_on_last_axis else None


def _known_length(layer):
    shape = _keras_private.build_input_shapes(layer)
    return shape is not None and len(shape) >= 3 and shape[1] is not None


def _identity_depthwise(batchnorm, rank):
    """A frozen 1x1 depthwise convolution with kernel 1, for `batchnorm` to be folded into.

    Rank 2 inputs get a 1D one: `_quantize` runs them as length-1 sequences.
    """
    layer_class = keras.layers.DepthwiseConv2D if rank == 4 else keras.layers.DepthwiseConv1D
    return layer_class(
        1, use_bias=False, depthwise_initializer="ones", trainable=False, name=f"{batchnorm.name}_depthwise",
        dtype=_COMPUTE_DTYPE,
    )


def _quantize_float(tensor, scheme, name, requantizes=False):
    if not keras.backend.is_float_dtype(tensor.dtype):
        return tensor
    return Quantize(scheme.activations, requantizes=requantizes, name=name, dtype=_COMPUTE_DTYPE)(tensor)


class _PrecisionBoundaries:
    """Where a layer quantized at one activation bit width (int8) reads a tensor another wrote at
    another (int16), the tensor is quantized again at the reader's, with a range of its own: one
    QUANTIZE op between the int8 and int16 ops in the file, which LiteRT runs. A tensor read by
    several such layers is quantized again once."""

    def __init__(self, names):
        self._names = names
        self._bits = {}  # id(tensor) -> the activation bits it was quantized to
        self._again = {}  # (id(tensor), bits) -> the tensor quantized again

    def record(self, outputs, scheme):
        for tensor in keras.tree.flatten(outputs):
            self._bits[id(tensor)] = scheme.activations.bits

    def requantize(self, structure, scheme, name):
        """`structure` with each tensor quantized at other bits than `scheme`'s quantized again (a
        `Quantize` layer named `name` and the bit width)."""
        bits = scheme.activations.bits

        def at_bits(value):
            written = self._bits.get(id(value))
            if written is None or written == bits:
                return value
            key = (id(value), bits)
            if key not in self._again:
                again = _quantize_float(value, scheme, self._names.take(f"{name}_int{bits}"), requantizes=True)
                self.record(again, scheme)
                self._again[key] = again
            return self._again[key]

        return keras.tree.map_structure(at_bits, structure)


def _consumers_scheme(graph, node, plan, default):
    """The scheme the quantized consumers of `node` share (so a float tensor is quantized once, at
    their bit width), else `default`."""
    schemes = [plan[c.id].scheme for c in graph.consumers(node) if plan[c.id].action == _WRAP]
    if schemes and len({each.activations.bits for each in schemes}) == 1:
        return schemes[0]
    return default


def _in_float32(layer):
    """Clone options that make a copy of `layer` compute in `_COMPUTE_DTYPE` where it computes in half
    precision (a `mixed_float16` or `mixed_bfloat16` policy); none otherwise."""
    inner = wrappers.unwrap(layer)
    if isinstance(inner, keras.Model) or not isinstance(inner, keras.layers.Layer):
        return {}  # a model kept whole, or a bare operation: it computes in its inputs' dtype
    return {"dtype": _COMPUTE_DTYPE} if inner.dtype_policy.compute_dtype in ("float16", "bfloat16") else {}


class _Step:
    def __init__(self, action, scheme=None, handler=None):
        self.action = action
        self.scheme = scheme
        self.handler = handler  # for wrapped layers
        self.batchnorm = None
        self.quantize_output = True
        self.requantize = True
        self.depthwise_rank = None  # a standalone BatchNorm running as a depthwise conv of this rank
        self.quantized_operation = False
        self.name_prefix = "quant_"
        # False when the layer's QuantizeConfig quantizes no activation or output: its output is
        # then quantized where a quantized layer reads it, as a float layer's is.
        self.quantize_config_output = True


def _gathering_scheme(scheme):
    """An Embedding's scheme: `scheme`, but with 8-bit activations in place of 16-bit ones. Its
    GATHER returns table rows in the table's type, int8 (TFLite has no 16x8 form of it), and a
    QUANTIZE to int16 after it (`_PrecisionBoundaries`) holds those values exactly."""
    if scheme.activations.bits != 16:
        return scheme
    return QuantizationScheme(weights=scheme.weights, fold_batchnorm=scheme.fold_batchnorm,
                              freeze_batchnorm=scheme.freeze_batchnorm)


def _plan(graph, scheme, skip, annotated_only, layer_schemes=None):
    """Decides, per layer call, whether it is wrapped, left in float, or folded into its producer."""
    steps, unsupported, inexact = {}, [], []
    for node in graph.nodes:
        if node.is_input:
            continue
        layer = _unannotated(node.layer)
        if not isinstance(layer, keras.layers.Layer):
            # A bare operation (`a - b`, `keras.ops.mean(x)`) runs as it is and its output is
            # quantized: the converter turns it into the int8 op that the ranges around it call for.
            steps[node.id] = _Step(_FLOAT)
            steps[node.id].quantized_operation = not annotated_only and not skip(layer)
            inexact.extend(_float64_constants_that_change(node))
            continue
        if annotated_only:
            wanted = isinstance(node.layer, QuantizeAnnotate)
        else:
            wanted = not skip(layer)
        if not wanted or isinstance(layer, _FLOAT_ISLANDS):
            # A recurrent layer is a float island: TFLite has no int8 kernels for an unrolled
            # loop's gates, so it runs in float and its output is quantized again for the layers
            # after it.
            steps[node.id] = _Step(_FLOAT)
            continue
        inner = _time_distributed_inner(layer) or layer
        handler = handlers_lib.get_handler(inner)
        reason = None if handler is None else handler.unsupported_reason(inner)
        if handler is None or reason:
            unsupported.append((node, reason))
        layer_scheme = getattr(node.layer, "scheme", None) or (layer_schemes or {}).get(layer.name)
        if layer_scheme is None:
            layer_scheme = _gathering_scheme(scheme) if isinstance(layer, keras.layers.Embedding) else scheme
        config = getattr(node.layer, "quantize_config", None) if annotated_only else None
        if config is not None and handler is not None:
            kernels = list(handler.kernel_axes(layer)) if handler.has_kernels else []
            chosen = tfmot_compat.scheme_from_config(config, layer, kernels, layer_scheme)
            if chosen is None:
                steps[node.id] = _Step(_FLOAT)
                continue
            layer_scheme, quantizes_output = chosen
            steps[node.id] = _Step(_WRAP, layer_scheme, handler)
            steps[node.id].quantize_config_output = quantizes_output
            continue
        steps[node.id] = _Step(_WRAP, layer_scheme, handler)
    if unsupported:
        raise ValueError(_unsupported_message(unsupported))
    if inexact:
        raise ValueError(
            "TFLite's int8 ops take float32 constants, and these float64 constants change when made "
            "float32:\n" + "\n".join(inexact) + "\nWrite them as float32 in the model "
            "(e.g. `x * np.float32(1 / np.sqrt(d))`, or a Python float instead of a NumPy float64)."
        )

    for node in graph.nodes:
        step = steps.get(node.id)
        if step is None or step.action != _WRAP:
            continue
        handler = step.handler
        output_node = node
        batchnorm_node = _foldable_batchnorm(graph, node, handler, steps)
        if batchnorm_node is not None:
            steps[batchnorm_node.id] = _Step(_FOLDED)
            step.batchnorm = batchnorm_node.layer
            output_node = batchnorm_node
        step.depthwise_rank = _standalone_batchnorm_rank(graph, node, step)
        fuses = handler.fuses_activation or step.depthwise_rank is not None
        if fuses and _fused_activation_follows(graph, node, output_node, steps):
            step.quantize_output = False
        if not step.quantize_config_output:
            step.quantize_output = False

    for node in graph.nodes:
        step = steps.get(node.id)
        if step is None or step.action != _WRAP:
            continue
        if step.handler.producers_take_output_scale:
            for ref in node.input_refs:
                producer = _producer_taking_scale(graph, graph.nodes[ref.node], steps)
                if producer is not None and steps[producer.id].scheme.activations.bits == step.scheme.activations.bits:
                    steps[producer.id].quantize_output = False

    for node in graph.nodes:
        step = steps.get(node.id)
        if step is not None and (step.action == _FLOAT or not step.quantize_config_output):
            # A float layer's output is quantized again only where a quantized layer reads it.
            step.requantize = (
                step.quantized_operation
                or any(steps[c.id].action == _WRAP for c in graph.consumers(node))
                or (not annotated_only and graph.is_model_output(node))
            )
    return steps


def _foldable_batchnorm(graph, node, handler, steps):
    if not (handler.has_kernels and handler.can_fold(_unannotated(node.layer))):
        return None
    if not steps[node.id].scheme.fold_batchnorm:
        return None
    candidate = rules.foldable_batchnorm(graph, node)
    if candidate is None or steps[candidate.id].action != _WRAP:
        return None
    return candidate


def _standalone_batchnorm_rank(graph, node, step):
    """The input rank of a BatchNormalization with no Conv/Dense to fold into, or of an affine
    preprocessing layer (Rescaling, Normalization), when it can run as a 1x1 depthwise convolution
    with itself folded in (int8 in the file; else MUL/ADD stay float). Rank 2 inputs run as
    length-1 sequences. A layer called several times runs as one depthwise convolution called as
    often, each call with its own ranges."""
    layer = _unannotated(node.layer)
    if not step.scheme.fold_batchnorm:
        return None
    if isinstance(layer, keras.layers.BatchNormalization):
        rank = _channels_last_rank(layer)
    elif node.input_refs and is_affine_preprocessing(layer):
        rank = len(graph.spec(node.input_refs[0]).shape)
    else:
        return None
    return rank if rank in (2, 3, 4) else None


def _channels_last_rank(batchnorm):
    """The input rank of a BatchNormalization over the last axis, else None."""
    rank = batchnorm.input_spec.ndim if batchnorm.input_spec is not None else None
    axis = batchnorm.axis[0] if isinstance(batchnorm.axis, (list, tuple)) else batchnorm.axis
    return rank if rank is not None and axis % rank == rank - 1 else None


def _producer_taking_scale(graph, node, steps):
    """The op that TFLite will have write its output at its consumer's scale (see
    `LayerHandler.producers_take_output_scale`), found through ops that keep their input's scale.

    Only an op with a learned output range whose output feeds nothing else qualifies: elsewhere the
    converter keeps the op's own scale and requantizes, as the Keras model then also does.
    """
    while True:
        step = steps.get(node.id)
        if step is None or graph.is_model_output(node) or len(graph.consumers(node)) != 1:
            return None
        if step.action == _FOLDED:  # a BatchNorm folded into the op before it: that op writes its output
            node = graph.nodes[node.input_refs[0].node]
            continue
        if step.action != _WRAP:
            return None
        policy = step.handler.output_policy(_unannotated(node.layer))[0]
        if policy == handlers_lib.QUANTIZE:
            return node
        if policy != handlers_lib.PASS_THROUGH or len(node.input_refs) != 1:
            return None
        node = graph.nodes[node.input_refs[0].node]


def _fused_activation_follows(graph, node, output_node, steps):
    layer = _unannotated(node.layer)
    if getattr(layer, "activation", None) is not None:
        if handlers_lib.activation_name(layer.activation) != "linear":
            return False
    if graph.is_model_output(output_node):
        return False
    consumers = graph.consumers(output_node)
    if len(consumers) != 1:
        return False
    step = steps[consumers[0].id]
    if step.action == _FLOAT and step.quantized_operation:
        # `keras.ops.relu(x)` written in the model: the converter fuses it as it fuses a ReLU layer.
        return handlers_lib.fused_operation_name(consumers[0].layer) is not None
    if step.action != _WRAP or step.scheme.activations.bits != steps[node.id].scheme.activations.bits:
        return False
    return handlers_lib.fused_activation_name(_unannotated(consumers[0].layer)) is not None


def _unsupported_message(unsupported):
    """For `[(node, reason or None)]`: the layers, why, and the fix."""
    lines = [
        f"  - '{node.path}' ({type(_unannotated(node.layer)).__name__})" + (f": {reason}" if reason else "")
        for node, reason in unsupported
    ]
    names = sorted({_unannotated(node.layer).name for node, _ in unsupported})
    return (
        "kerasq cannot quantize these layers:\n" + "\n".join(lines) + "\n"
        f"Leave them in float with kerasq.quantize_model(model, skip={names}), or tell kerasq how "
        "to quantize their class with kerasq.register_handler(LayerClass, handler)."
    )


_CONSTRAINT_ATTRIBUTES = {
    "kernel": ("kernel_constraint", "depthwise_constraint"),
    "depthwise_kernel": ("depthwise_constraint",),
    "pointwise_kernel": ("pointwise_constraint",),
    "embeddings": ("embeddings_constraint",),
}


def _keep_zeros(model):
    """Gives each quantized kernel that holds zeros a KeepZeros constraint (in its layer's config
    too, so it survives saving)."""
    for wrapper in model.layers:
        if not (isinstance(wrapper, QuantizeWrapper) and wrapper.handler.has_kernels):
            continue
        layer = wrapper.layer
        for name in wrapper.handler.kernel_axes(layer):
            variable = getattr(layer, name)
            mask = keras.ops.convert_to_numpy(variable) != 0
            if mask.all():
                continue
            attribute = next((a for a in _CONSTRAINT_ATTRIBUTES.get(name, ()) if hasattr(layer, a)), None)
            constraint = KeepZeros(mask, inner=getattr(layer, attribute, None) if attribute else None)
            variable.constraint = constraint
            if attribute is not None:
                setattr(layer, attribute, constraint)


def _float64_constants_that_change(node):
    """Lines naming the float64 NumPy constants of a bare operation that float32 cannot hold exactly."""
    found = []
    for leaf in keras.tree.flatten((node.args, node.kwargs)):
        if isinstance(leaf, (np.ndarray, np.generic)) and leaf.dtype == np.float64:
            if not np.array_equal(np.asarray(leaf, np.float32).astype(np.float64), leaf):
                found.append(f"  - '{node.path}' ({type(node.layer).__name__}): {np.asarray(leaf).ravel()[:4].tolist()}")
    return found


def _on_int8_grid(value):
    """A float constant operand of a quantized layer (fixed position encodings added to a sequence)
    rounded to the int8 grid of its own range, as the converter stores it; anything else as it is.
    Rounded once, the constant keeps its extremes, so the converter's grid is the same."""
    if not isinstance(value, np.ndarray) or value.dtype.kind != "f" or value.ndim == 0:
        return value
    low, high = min(float(value.min()), 0.0), max(float(value.max()), 0.0)
    rounded = keras.quantizers.fake_quant_with_min_max_vars(value.astype("float32"), low, high, num_bits=8)
    return keras.ops.convert_to_numpy(rounded)


def _as_float32_constant(value):
    """A float64 NumPy constant as float32 (the planning checked that nothing changes)."""
    if isinstance(value, (np.ndarray, np.generic)) and value.dtype == np.float64:
        return np.asarray(value, np.float32) if isinstance(value, np.ndarray) else np.float32(value)
    return value


def _untrained(batchnorm):
    """True for a BatchNormalization whose moving statistics still hold their initial values."""
    layer = wrappers.unwrap(batchnorm)
    mean = keras.ops.convert_to_numpy(layer.moving_mean)
    variance = keras.ops.convert_to_numpy(layer.moving_variance)
    return bool((mean == 0).all() and (variance == 1).all())


def _unannotated(layer):
    """The layer inside a `QuantizeAnnotate` and any other feature's wrapper."""
    return wrappers.unwrap(layer)


def _strip_quantize_wrapper(wrapper, rewrite, **clone_options):
    """A float copy of the wrapped layer with its folded BatchNorm (if any) folded into its weights,
    with the moving statistics, as the exported file holds them."""
    layer = wrapper.layer
    if wrapper.batchnorm is None:
        return wrappers.strip(layer, rewrite, **clone_options)
    handler, bn = wrapper.handler, wrapper.batchnorm
    clone = rewrite.clone(layer, copy_weights=False, use_bias=True, **clone_options)
    bias = layer.bias if getattr(layer, "use_bias", False) else keras.ops.zeros(bn.moving_mean.shape)
    scale, folded_bias = batchnorm_fold(bn, bias)
    kernels = {name: getattr(layer, name) for name in handler.kernel_axes(layer)}
    for name, value in handler.fold_scale(layer, kernels, scale).items():
        rewrite.weights.assign(clone, name, lambda value=value: value)
    rewrite.weights.assign(clone, "bias", lambda: folded_bias)
    return clone


wrappers.register_wrapper(QuantizeAnnotate)
wrappers.register_wrapper(QuantizeWrapper, _strip_quantize_wrapper)
