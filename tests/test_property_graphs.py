"""Property test: random small Functional graphs quantize, train, export fully int8 and match their file.

Each example is a Keras Functional model drawn from layers kerasq supports: Conv2D, DepthwiseConv2D
and SeparableConv2D (with and without bias, linear/relu/relu6 activations, strides 1 or 2, "same" or
"valid" padding), BatchNormalization after them (and after additions, concatenations and nested
models), ReLU/ReLU6 layers, max and average pooling, additions of two branches of equal shape
(residual, two convolutions, or a skip from an earlier tensor), concatenations of two branches, a
layer (or a small Sequential model) shared between two calls, a nested Sequential or Functional
model, and one or two heads (GlobalAveragePooling2D or Flatten, an optional hidden Dense with or
without BatchNormalization, a Dense output). It is quantized with
`kerasq.quantize_model`, trained for one step on a batch of digits, exported with
`kerasq.export_tflite`, and the file must be fully integer and pass `kerasq.verify_tflite` on the
digits test set (every output within max(1 step, the kernel-path floor) of the Keras model).

A failing example is printed as the Python code that builds its model (the `graph=` argument of the
falsifying example; assertion messages repeat it under the parity report or the file's summary),
ready to paste.

The default run draws 10 graphs from a fixed seed (about a minute on 2 cores), so a failure
reproduces. More:

    KERASQ_PROPERTY_EXAMPLES=200 .venv/bin/python -m pytest tests/test_property_graphs.py

`KERASQ_PROPERTY_SEED=<int>` draws them from another seed, and `KERASQ_PROPERTY_KNOWN_BUGS=1` also
draws the graphs that meet the known bugs listed below, which the default run leaves out.
"""

# KNOWN BUGS. The default run leaves out the graphs that meet these kerasq bugs (each exclusion in
# the generator names its bug); KERASQ_PROPERTY_KNOWN_BUGS=1 draws them too. A bug fixed becomes a
# regression test of its smallest graph (at the end of this file) and its exclusion goes.
#
# Fixed: SHARED_BATCHNORM (a BatchNormalization called more than once stayed float in the file),
# CONCAT_MIXED_SCALES (a concatenation of an input with a range of its own and one it alone rounds
# was written at the former's scale, clipping the latter), CONCAT_FOLDED_BATCHNORM (a convolution
# with a folded BatchNorm feeding a concatenation was rounded twice), RELU_REQUANTIZE (a ReLU
# written at a concatenation's scale rounded once in the QAT model, twice in the file).
#
# SOFTMAX_STEPS (the parity criterion rather than the simulation): a softmax head's logits may be
#   one step apart in Keras and in the file, as any output may, and the softmax turns that into
#   up to 3 steps of its output, past max(1 step, the floor) when the kernel paths agree on the
#   logits (measured: 1 graph in 60 drawn with a softmax head half the time). The default run's
#   heads have no softmax.

import functools
import math
import os

import hypothesis
import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keras import layers

import kerasq
from kerasq.data import load_digits

EXAMPLES = int(os.environ.get("KERASQ_PROPERTY_EXAMPLES", "10"))
SEED = os.environ.get("KERASQ_PROPERTY_SEED")
IMAGE_SIZE = 8
TRAIN_BATCH = 64  # one optimizer step
HEAD_UNITS = (10, 2)  # the digit, and its parity
ACTIVATIONS = ("linear", "relu", "relu6")
# Graphs that meet a known kerasq bug (see KNOWN BUGS above) are drawn, and checked, only with
# KERASQ_PROPERTY_KNOWN_BUGS=1; the default run leaves them out.
KNOWN_BUGS = os.environ.get("KERASQ_PROPERTY_KNOWN_BUGS", "") not in ("", "0")
FILTERS = (4, 2, 8)
BATCHNORM = "layers.BatchNormalization(momentum=0.9)"


class Graph:
    """A random model as the Python code that builds it: `code` is what `build()` runs, and what a
    failing example prints."""

    def __init__(self, seed, channels):
        self.seed = seed
        self.channels = channels
        self.lines = []
        self.outputs = []  # (variable name, units, softmax)
        self._count = 0

    def fresh(self, prefix):
        self._count += 1
        return f"{prefix}{self._count}"

    @property
    def code(self):
        outputs = self.outputs[0][0] if len(self.outputs) == 1 else "[" + ", ".join(o[0] for o in self.outputs) + "]"
        header = [
            f"keras.utils.set_random_seed({self.seed})",
            f"inputs = keras.Input(({IMAGE_SIZE}, {IMAGE_SIZE}, {self.channels}))",
        ]
        return "\n".join(header + self.lines + [f"model = keras.Model(inputs, {outputs})"])

    def build(self):
        namespace = {"keras": keras, "layers": layers}
        exec(self.code, namespace)  # noqa: S102 - the code this module generated
        return namespace["model"]

    def __repr__(self):
        return "\n" + self.code + "\n"


class Scope:
    """The tensors of one Functional graph (the model's, or a nested model's) as it is drawn."""

    def __init__(self, graph, prefix, input_name, shape):
        self.graph = graph
        self.prefix = prefix
        self.tensors = [(input_name, shape)]  # (variable name, (size, channels)): square feature maps

    @property
    def last(self):
        return self.tensors[-1]

    def call(self, layer_code, inputs, shape):
        name = self.graph.fresh(self.prefix)
        args = inputs[0] if len(inputs) == 1 else "[" + ", ".join(inputs) + "]"
        self.graph.lines.append(f"{name} = {layer_code}({args})")
        self.tensors.append((name, shape))
        return name, shape

    def chain(self, layer_codes, source, shape):
        name = source
        for code in layer_codes:
            name, _ = self.call(code, [name], shape)
        return name, shape

    def earlier(self, predicate, exclude=None):
        """Tensors other than `exclude` whose shape satisfies `predicate`."""
        return [t for t in self.tensors if t[0] != exclude and predicate(t[1])]

    def concatenate(self, inputs, shape):
        return self.call("layers.Concatenate()", inputs, shape)


def _output_size(size, kernel, strides, padding):
    return math.ceil(size / strides) if padding == "same" else (size - kernel) // strides + 1


def _spatial_layer(draw, kind, size, channels, *, filters=None, preserve=False):
    """A Conv2D, DepthwiseConv2D or SeparableConv2D for (size, size, channels) inputs, as code, and its
    output shape. `filters` fixes the output channels; `preserve` keeps the spatial size."""
    kernel = draw(st.sampled_from([3, 1]))
    padding = "same" if preserve or kernel > size else draw(st.sampled_from(["same", "valid"]))
    strides = 1 if preserve or size < 2 else draw(st.sampled_from([1, 2]))
    use_bias = draw(st.booleans())
    activation = draw(st.sampled_from(ACTIVATIONS))
    if kind == "depthwise":
        multiplier = (filters // channels) if filters else 1 if channels > 8 else draw(st.sampled_from([1, 2]))
        args = [str(kernel)] + ([f"depth_multiplier={multiplier}"] if multiplier != 1 else [])
        out_channels = channels * multiplier
        name = "DepthwiseConv2D"
    else:
        out_channels = filters or draw(st.sampled_from(FILTERS))
        args = [str(out_channels), str(kernel)]
        name = "Conv2D" if kind == "conv" else "SeparableConv2D"
    if strides != 1:
        args.append(f"strides={strides}")
    args.append(f'padding="{padding}"')
    if not use_bias:
        args.append("use_bias=False")
    if activation != "linear":
        args.append(f'activation="{activation}"')
    return f"layers.{name}({', '.join(args)})", (_output_size(size, kernel, strides, padding), out_channels)


def _kinds(channels, filters):
    """The convolutions that can give `filters` output channels from `channels` (any if None)."""
    depthwise = filters is None or filters in (channels, 2 * channels)
    return ["conv", "depthwise", "separable"] if depthwise else ["conv", "separable"]


def _post_layers(draw, batchnorm=True):
    """Optional BatchNormalization, then an optional ReLU or ReLU6 layer."""
    codes = []
    if batchnorm and draw(st.booleans()):
        codes.append(BATCHNORM)
    activation = draw(st.sampled_from([None, "relu", "relu6"]))
    if activation:
        codes.append("layers.ReLU()" if activation == "relu" else "layers.ReLU(6.0)")
    return codes


def _unit_layers(draw, size, channels, *, filters=None, preserve=False):
    """A convolution with its optional BatchNormalization and ReLU/ReLU6 layer after it."""
    kind = draw(st.sampled_from(_kinds(channels, filters)))
    conv, shape = _spatial_layer(draw, kind, size, channels, filters=filters, preserve=preserve)
    codes = [conv] + _post_layers(draw)
    return codes, shape


def _unit(draw, scope, source, shape, **kwargs):
    codes, out_shape = _unit_layers(draw, *shape, **kwargs)
    return scope.chain(codes, source, out_shape)


def _block(draw, scope, nested_allowed):
    """Adds one block to `scope`, reading its last tensor."""
    x, (size, channels) = scope.last
    kinds = ["conv", "add", "concat", "shared"] + (["pool"] if size >= 2 else [])
    kinds += ["nested"] if nested_allowed else []
    kind = draw(st.sampled_from(kinds))

    if kind == "conv":
        _unit(draw, scope, x, (size, channels))

    elif kind == "pool":
        pool = draw(st.sampled_from(["MaxPooling2D", "AveragePooling2D"]))
        padding = draw(st.sampled_from(["valid", "same"]))
        scope.call(f'layers.{pool}(2, padding="{padding}")', [x], (_output_size(size, 2, 2, padding), channels))

    elif kind == "add":
        skips = scope.earlier(lambda shape: shape == (size, channels), exclude=x)
        variant = draw(st.sampled_from(["residual", "branches"] + (["skip"] if skips else [])))
        if variant == "residual":  # x + conv(x)
            branch, _ = _unit(draw, scope, x, (size, channels), filters=channels, preserve=True)
            pair = [x, branch]
        elif variant == "branches":  # conv_a(x) + conv_b(x)
            filters = draw(st.sampled_from(FILTERS))
            a, _ = _unit(draw, scope, x, (size, channels), filters=filters, preserve=True)
            b, _ = _unit(draw, scope, x, (size, channels), filters=filters, preserve=True)
            pair, channels = [a, b], filters
        else:  # a skip connection from an earlier tensor of the same shape
            pair = [draw(st.sampled_from(skips))[0], x]
        y, shape = scope.call("layers.Add()", pair, (size, channels))
        scope.chain(_post_layers(draw), y, shape)

    elif kind == "concat":
        skips = scope.earlier(lambda shape: shape[0] == size, exclude=x)
        # x read elsewhere too (or the model input), or an earlier tensor read elsewhere too: the
        # concatenation then has inputs with ranges of their own beside inputs it alone rounds.
        variant = draw(st.sampled_from(["branches", "branch"] + (["skip"] if skips else [])))
        if variant == "branches":  # [conv_a(x), conv_b(x)]
            a, (_, filters_a) = _unit(draw, scope, x, (size, channels), preserve=True)
            b, (_, filters_b) = _unit(draw, scope, x, (size, channels), preserve=True)
            pair = [(a, filters_a), (b, filters_b)]
        elif variant == "branch":  # [x, conv(x)]
            branch, (_, filters) = _unit(draw, scope, x, (size, channels), preserve=True)
            pair = [(x, channels), (branch, filters)]
        else:  # with an earlier tensor of the same spatial size
            earlier, (_, filters) = draw(st.sampled_from(skips))
            pair = [(earlier, filters), (x, channels)]
        if draw(st.booleans()):
            pair.reverse()
        y, shape = scope.concatenate([p[0] for p in pair], (size, sum(p[1] for p in pair)))
        scope.chain(_post_layers(draw), y, shape)

    elif kind == "shared":
        variant = draw(st.sampled_from(["branches", "twice"]))
        model = draw(st.booleans())  # a small Sequential model shared, rather than one layer
        if variant == "twice":  # shared(shared(x)): the layer keeps the shape
            codes, out_shape = _unit_layers(draw, size, channels, filters=channels, preserve=True)
        else:  # shared(x) and shared(x'), x' a tensor of x's shape, then merged
            codes, out_shape = _unit_layers(draw, size, channels)
        if not model:
            codes = codes[:1]
        merge = draw(st.sampled_from(["Add", "Concatenate"])) if variant == "branches" else None
        shared = scope.graph.fresh("shared")
        if model:
            body = ", ".join([f"keras.Input(({size}, {size}, {channels}))"] + codes)
            scope.graph.lines.append(f'{shared} = keras.Sequential([{body}], name="{shared}")')
        else:
            scope.graph.lines.append(f"{shared} = {codes[0]}")
        if variant == "twice":
            y, _ = scope.call(shared, [x], out_shape)
            y, _ = scope.chain(_post_layers(draw, batchnorm=False), y, out_shape)
            y, _ = scope.call(shared, [y], out_shape)
            scope.chain(_post_layers(draw), y, out_shape)
        else:
            same = scope.earlier(lambda shape: shape == (size, channels), exclude=x)
            source = draw(st.sampled_from(["conv", "maxpool"] + (["earlier"] if same else [])))
            if source == "conv":
                other, _ = _unit(draw, scope, x, (size, channels), filters=channels, preserve=True)
            elif source == "maxpool":
                other, _ = scope.call('layers.MaxPooling2D(3, strides=1, padding="same")', [x], (size, channels))
            else:
                other = draw(st.sampled_from(same))[0]
            calls = []
            for source_tensor in (x, other):
                y, _ = scope.call(shared, [source_tensor], out_shape)
                post = _post_layers(draw)
                calls.append(scope.chain(post, y, out_shape)[0])
            if merge == "Add":
                merged_shape = out_shape
                y, _ = scope.call("layers.Add()", calls, merged_shape)
            else:
                merged_shape = (out_shape[0], 2 * out_shape[1])
                y, _ = scope.concatenate(calls, merged_shape)
            scope.chain(_post_layers(draw), y, merged_shape)

    else:  # nested: a Sequential or Functional model used as a layer
        sub = scope.graph.fresh("sub")
        if draw(st.sampled_from(["sequential", "functional"])) == "sequential":
            codes, shape = [], (size, channels)
            for _ in range(draw(st.integers(1, 2))):
                more, shape = _unit_layers(draw, *shape)
                codes += more
            body = ", ".join([f"keras.Input(({size}, {size}, {channels}))"] + codes)
            scope.graph.lines.append(f'{sub} = keras.Sequential([{body}], name="{sub}")')
            out_shape = shape
        else:
            sub_input = f"{sub}_in"
            scope.graph.lines.append(f"{sub_input} = keras.Input(({size}, {size}, {channels}))")
            inner = Scope(scope.graph, f"{sub}_t", sub_input, (size, channels))
            for _ in range(draw(st.integers(1, 2))):
                _block(draw, inner, nested_allowed=False)
            inner_output, out_shape = inner.last
            scope.graph.lines.append(f'{sub} = keras.Model({sub_input}, {inner_output}, name="{sub}")')
        y, _ = scope.call(sub, [x], out_shape)
        scope.chain(_post_layers(draw), y, out_shape)  # folding and fusion across the model boundary


def _head(draw, scope, index, source):
    name, (size, channels) = source
    flatten = size * size * channels <= 256 and draw(st.booleans())
    codes = ["layers.Flatten()" if flatten else "layers.GlobalAveragePooling2D()"]
    if draw(st.booleans()):
        activation = draw(st.sampled_from(ACTIVATIONS))
        codes.append("layers.Dense(8)" if activation == "linear" else f'layers.Dense(8, activation="{activation}")')
        if draw(st.booleans()):
            codes.append(BATCHNORM)
    for code in codes:
        name, _ = scope.call(code, [name], None)
    units = HEAD_UNITS[index]
    softmax = KNOWN_BUGS and draw(st.booleans())  # SOFTMAX_STEPS
    extra = ', activation="softmax"' if softmax else ""
    scope.graph.lines.append(f'head{index} = layers.Dense({units}{extra}, name="head{index}")({name})')
    scope.graph.outputs.append((f"head{index}", units, softmax))


@st.composite
def graphs(draw):
    """A random small Functional model (as a `Graph`): 1 to 3 blocks, then 1 or 2 heads."""
    graph = Graph(seed=draw(st.integers(0, 1000)), channels=draw(st.integers(1, 3)))
    scope = Scope(graph, "t", "inputs", (IMAGE_SIZE, graph.channels))
    for _ in range(draw(st.integers(1, 3))):
        _block(draw, scope, nested_allowed=True)
    feature_maps = [scope.last] + scope.earlier(lambda shape: True, exclude=scope.last[0])[::-1]
    _head(draw, scope, 0, feature_maps[0])
    if draw(st.booleans()):  # a second head, from the last or an earlier feature map
        _head(draw, scope, 1, draw(st.sampled_from(feature_maps)))
    return graph


@functools.cache
def _digits():
    # Not the `digits` fixture: Hypothesis would print the arrays with every failing example.
    return load_digits()


def _images(x, channels):
    """The digits with `channels` channels: the image, its transpose, its upside-down copy."""
    return np.concatenate([x, x.transpose(0, 2, 1, 3), x[:, ::-1]], axis=-1)[..., :channels]


def _targets(graph, y):
    targets = [y if units == 10 else y % 2 for _, units, _ in graph.outputs]
    return targets[0] if len(targets) == 1 else targets


def _losses(graph):
    losses = [keras.losses.SparseCategoricalCrossentropy(from_logits=not softmax) for *_, softmax in graph.outputs]
    return losses[0] if len(losses) == 1 else losses


def _settings(test):
    test = settings(
        max_examples=EXAMPLES,
        deadline=None,  # building, training and converting a model takes seconds
        derandomize=SEED is None,
        database=None,  # nothing written into the working tree
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )(test)
    return test if SEED is None else hypothesis.seed(int(SEED))(test)


def check_graph(graph):
    """Quantizes, trains one step, exports and verifies `graph`'s model; raises on any failure.
    Returns the file, as a `kerasq.TFLiteModel`."""
    (x_train, y_train), (x_test, _) = _digits()
    keras.backend.clear_session()
    model = graph.build()
    qat = kerasq.quantize_model(model)
    keras.utils.set_random_seed(graph.seed)
    qat.compile(keras.optimizers.Adam(1e-3), loss=_losses(graph))
    x = _images(x_train[:TRAIN_BATCH], graph.channels)
    qat.fit(x, _targets(graph, y_train[:TRAIN_BATCH]), batch_size=TRAIN_BATCH, epochs=1, verbose=0)

    content = kerasq.export_tflite(qat)
    tflite = kerasq.TFLiteModel(content)
    lines = []
    tflite.summary(print_fn=lines.append, show_tensors=False)
    summary = "\n".join(lines)
    assert tflite.is_fully_integer, f"float tensors in the file: {tflite.float_tensors}\n{summary}\n{graph.code}"
    assert all(q is not None for q in tflite.output_quantization), f"int8 outputs expected\n{summary}\n{graph.code}"
    report = kerasq.verify_tflite(qat, kerasq.TFLiteModel(content), _images(x_test, graph.channels))
    assert report.passed, f"{report}\n{graph.code}"
    return tflite


@pytest.mark.filterwarnings("ignore:Warning. the model is numerically fragile")  # one step of training
@_settings
@given(graph=graphs())
def test_random_graph_exports_fully_integer_at_the_parity_floor(graph):
    check_graph(graph)  # a failing graph is printed as its code: `graph=` in the falsifying example


def test_a_dead_activation_exports_a_file_litert_loads():
    """A ReLU that is 0 on every training sample has an empty range; kerasq keeps every range at
    least 0.01 wide, as a scale much smaller makes a file XNNPACK refuses to load."""
    graph = Graph(seed=0, channels=1)
    graph.lines = [
        "negative = keras.initializers.Constant(-1.0)",
        't1 = layers.Conv2D(4, 3, padding="same", activation="relu", kernel_initializer=negative)(inputs)',
        "t5 = layers.Flatten()(t1)",
        'head0 = layers.Dense(10, name="head0")(t5)',
    ]
    graph.outputs = [("head0", HEAD_UNITS[0], False)]
    check_graph(graph)


def _check_lines(lines):
    """`check_graph` for the model of `lines` (ending in a tensor `t5`) with a digits head, on 8x8x1
    digits."""
    graph = Graph(seed=0, channels=1)
    graph.lines = lines + ['head0 = layers.Dense(10, name="head0")(t5)']
    graph.outputs = [("head0", HEAD_UNITS[0], False)]
    return check_graph(graph)


def test_a_concatenation_of_the_model_input_and_a_convolution_matches_its_file():
    """The convolution's output, which only the concatenation reads, is rounded once, to the
    concatenation's range; the model input keeps its own range and is requantized to it. The file
    once wrote the concatenation at the input's [0, 1] range, clipping the convolution's negative
    outputs (up to 150 output steps off)."""
    _check_lines([
        't1 = layers.Conv2D(2, 3, padding="same", kernel_initializer=keras.initializers.Constant(-1.0))(inputs)',
        "t2 = layers.Concatenate()([t1, inputs])",
        "t5 = layers.Flatten()(t2)",
    ])


def test_a_concatenation_beside_a_convolution_of_a_pooled_tensor_matches_its_file():
    """A max pooling's output read by a convolution and by a concatenation: the converter requantizes
    it to the concatenation's scale for the concatenation alone; the convolution reads it at its own
    scale, as in the QAT model. Without a fake-quant of the pooled output in the export trace, the
    converter requantized it for both readers (1 to 3 output steps off)."""
    _check_lines([
        't1 = layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)',
        "t2 = layers.MaxPooling2D(2)(t1)",
        't3 = layers.Conv2D(4, 3, padding="same", kernel_initializer=keras.initializers.Constant(-1.0))(t2)',
        "t4 = layers.Concatenate()([t2, t3])",
        "t5 = layers.Flatten()(t4)",
    ])


def test_a_convolution_with_a_folded_batchnorm_takes_the_concatenation_range():
    """A convolution whose folded BatchNorm's output only a concatenation reads is rounded once, to
    the concatenation's range, as the file writes it; it was rounded to its own range first (80 to
    110 output steps off)."""
    _check_lines([
        "t1 = layers.Conv2D(2, 1)(inputs)",
        "t2 = layers.BatchNormalization(momentum=0.9)(t1)",
        "t3 = layers.Conv2D(2, 1, kernel_initializer=keras.initializers.Constant(5.0))(inputs)",
        "t4 = layers.Concatenate()([t2, t3])",
        "t5 = layers.Flatten()(t4)",
    ])


def test_a_batchnorm_called_twice_runs_int8():
    """A BatchNormalization with nothing to fold into, called twice, runs as an int8 depthwise
    convolution for each call (each with its own output range); it stayed float in the file
    (DEQUANTIZE, MUL, ADD, QUANTIZE)."""
    _check_lines([
        't1 = layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)',
        't2 = layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)',
        "shared3 = layers.BatchNormalization(momentum=0.9)",
        "t4 = layers.Add()([shared3(t1), shared3(t2)])",
        "t5 = layers.GlobalAveragePooling2D()(t4)",
    ])


def test_a_shared_convolution_and_batchnorm_fold():
    """A Sequential model of a convolution and a BatchNormalization, called twice: the BatchNorm
    folds into the convolution, whose two calls deploy the same folded kernel; no separate op for
    the BatchNorm."""
    tflite = _check_lines([
        "shared1 = keras.Sequential([keras.Input((8, 8, 1)), layers.Conv2D(4, 3, padding=\"same\"), "
        "layers.BatchNormalization(momentum=0.9), layers.ReLU()], name=\"shared1\")",
        't2 = layers.MaxPooling2D(3, strides=1, padding="same")(inputs)',
        "t3 = layers.Add()([shared1(inputs), shared1(t2)])",
        "t5 = layers.GlobalAveragePooling2D()(t3)",
    ])
    assert tflite.ops.count("CONV_2D") == 2 and "DEPTHWISE_CONV_2D" not in tflite.ops, tflite.ops


@pytest.mark.parametrize("max_value", [None, 6.0])
def test_a_relu_written_at_a_concatenation_scale_rounds_as_the_file_does(max_value):
    """A ReLU (ReLU6) that does not fuse into the op before it, read only by a concatenation, is an
    int8 RELU (RELU6) op requantizing to the concatenation's scale, here about 8 times its input's:
    TFLite's fixed-point multiplier rounds twice there, and the QAT model does the same at inference,
    to the bit. It rounded once (one step apart on 5-20% of those values)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 4, 2))
    relu = layers.ReLU(max_value)(inputs)
    wide = layers.Conv2D(2, 1, kernel_initializer=keras.initializers.Constant(4.0))(inputs)
    model = keras.Model(inputs, layers.Concatenate()([relu, wide]))
    rng = np.random.default_rng(0)
    qat = kerasq.quantize_model(model, calibration_data=rng.uniform(-3.0, 8.0, (64, 4, 4, 2)).astype("float32"))
    tflite = kerasq.TFLiteModel(kerasq.export_tflite(qat))
    assert ("RELU6" if max_value else "RELU") in tflite.ops, tflite.ops
    (in_scale, in_zero), (out_scale, out_zero) = tflite.input_quantization[0], tflite.output_quantization[0]
    assert out_scale > 4 * in_scale
    levels = rng.permuted(np.tile(np.arange(-128, 128), 32)).reshape(256, 4, 4, 2).astype("int8")  # each level 32 times
    x = ((levels.astype("float32") - in_zero) * in_scale).astype("float32")
    simulated = np.round(np.asarray(qat(x, training=False)) / out_scale) + out_zero
    np.testing.assert_array_equal(simulated[..., :2], tflite.predict(levels, raw=True)[..., :2].astype("float32"))


def test_an_input_requantized_for_a_concatenation_rounds_as_the_file_does():
    """An input of a concatenation with a scale of its own (here the model input) is requantized to
    the concatenation's scale by a QUANTIZE op, which XNNPACK computes with the scale ratio held with
    8 fractional bits. The QAT model does the same at inference, to the bit; it rounded once (one
    step apart on 10% of those values here)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 4, 2))
    wide = layers.Conv2D(2, 1, kernel_initializer=keras.initializers.Constant(1.3))(inputs)
    model = keras.Model(inputs, layers.Concatenate()([inputs, wide]))
    rng = np.random.default_rng(0)
    qat = kerasq.quantize_model(model, calibration_data=rng.uniform(-3.0, 8.0, (64, 4, 4, 2)).astype("float32"))
    tflite = kerasq.TFLiteModel(kerasq.export_tflite(qat))
    assert "QUANTIZE" in tflite.ops, tflite.ops
    (in_scale, in_zero), (out_scale, out_zero) = tflite.input_quantization[0], tflite.output_quantization[0]
    levels = rng.permuted(np.tile(np.arange(-128, 128), 32)).reshape(256, 4, 4, 2).astype("int8")  # each level 32 times
    x = ((levels.astype("float32") - in_zero) * in_scale).astype("float32")
    simulated = np.round(np.asarray(qat(x, training=False)) / out_scale) + out_zero
    np.testing.assert_array_equal(simulated[..., :2], tflite.predict(levels, raw=True)[..., :2].astype("float32"))
