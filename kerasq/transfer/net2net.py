"""Function-preserving growth (Net2Net): a wider layer or one more layer, same outputs before training.

`widen` repeats existing channels of a layer (and of everything that shares them: its BatchNorm, a
residual Add's other branch) and divides the next layers' input rows among the copies, so the wider
model computes exactly what the original does; training then lets the copies drift apart. `deepen`
inserts an identity-initialised layer after a given one.

Example:
>>> import keras, numpy as np, kerasq
>>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu", name="dense_1"),
...                           keras.layers.Dense(3, name="out")])
>>> wider = kerasq.widen(model, "dense_1", 32)
>>> deeper = kerasq.deepen(wider, after="dense_1", activation="relu")
>>> x = np.random.default_rng(0).normal(size=(4, 8)).astype("float32")
>>> bool(np.allclose(deeper(x), model(x), atol=1e-5)), wider.get_layer("dense_1").units
(True, 32)
"""

import keras
import numpy as np

from kerasq.graph import LayerGraph, Rewrite, channel_groups, reindex_channels

_NON_NEGATIVE = ("relu", "relu6", "sigmoid", "softmax", "hard_sigmoid", "exponential", "softplus")


def widen(model, layer, size, *, seed=0):
    """A new model in which `layer` produces `size` channels instead of its own count, computing the
    same outputs as `model` (Net2WiderNet). `model` is not changed.

    The new channels repeat randomly chosen existing ones (`seed`); every layer that carries or
    joins them (BatchNorm, depthwise convs, both sides of a residual Add) repeats the same ones, and
    the layers that read them divide their input weights among the copies.
    """
    graph = LayerGraph(model)
    node = _node_named(graph, layer)
    group = _produced_group(graph, node)
    if size < group.size:
        raise ValueError(
            f"widen makes layers wider: '{layer}' has {group.size} channels and size={size} is fewer. "
            "Remove channels with kerasq.prune_channels instead."
        )
    rng = np.random.default_rng(seed)
    indices = np.concatenate([np.arange(group.size), rng.integers(0, group.size, size - group.size)])
    return reindex_channels(graph, channel_groups(graph), {group.id: indices}, split_repeats=True)


def deepen(model, after, *, kernel_size=3, activation=None, batchnorm=False):
    """A new model with one more layer, initialised to the identity, right after layer `after`.

    The new layer is a Dense on (batch, features) outputs and a Conv1D/2D/3D ("same" padding,
    `kernel_size`) on sequences, images and volumes, with as many channels as `after` has.
    `activation="relu"` (or "relu6") keeps the function only where `after`'s output is already
    non-negative, so it is refused elsewhere. With `batchnorm=True` an identity BatchNormalization
    follows it. `model` is not changed.
    """
    graph = LayerGraph(model)
    node = _node_named(graph, after)
    (spec,) = graph.output_specs(node)[:1]
    rank, channels = len(spec.shape), spec.shape[-1]
    if activation not in (None, "linear") and not _non_negative(node.layer):
        raise ValueError(
            f"deepen(after='{after}', activation={activation!r}) would change the model's function: the "
            f"output of '{after}' can be negative. Leave activation=None, or deepen after an activation layer."
        )
    rewrite = Rewrite(graph)
    name = rewrite.names.take(f"{after}_deepen")
    new_layers = [_identity_layer(rank, channels, kernel_size, activation, name)]
    if batchnorm:
        new_layers.append(keras.layers.BatchNormalization(name=rewrite.names.take(f"{name}_bn")))

    def call(current, args, kwargs):
        outputs = rewrite.substitute(current)(*args, **kwargs)
        if current is node:
            for new in new_layers:
                outputs = new(outputs)
        return outputs

    deeper = rewrite.run(call)
    _set_identity(new_layers)
    return deeper


def _identity_layer(rank, channels, kernel_size, activation, name):
    if rank == 2:
        return keras.layers.Dense(channels, activation=activation, name=name)
    conv = {3: keras.layers.Conv1D, 4: keras.layers.Conv2D, 5: keras.layers.Conv3D}.get(rank)
    if conv is None:
        raise ValueError(f"deepen takes layers with outputs of rank 2 to 5; '{name}' would get rank {rank}.")
    return conv(channels, kernel_size, padding="same", activation=activation, name=name)


def _set_identity(new_layers):
    main = new_layers[0]
    kernel = np.zeros(main.kernel.shape, "float32")
    center = tuple(size // 2 for size in kernel.shape[:-2])
    for channel in range(kernel.shape[-1]):
        kernel[center + (channel, channel)] = 1.0
    main.kernel.assign(kernel)
    main.bias.assign(np.zeros(main.bias.shape, "float32"))
    for batchnorm in new_layers[1:]:
        # gamma (x - mean) / sqrt(variance + epsilon) + beta is x with variance = 1 - epsilon.
        batchnorm.moving_variance.assign(np.full(batchnorm.moving_variance.shape, 1.0 - batchnorm.epsilon, "float32"))


def _non_negative(layer):
    if isinstance(layer, keras.layers.ReLU):
        return not layer.negative_slope
    name = getattr(getattr(layer, "activation", None), "__name__", None)
    return name in _NON_NEGATIVE


def _node_named(graph, name):
    nodes = [node for node in graph.nodes if not node.is_input and name in (node.layer.name, node.path)]
    if not nodes:
        names = [node.path for node in graph.nodes if not node.is_input]
        raise ValueError(f"The model has no layer named '{name}'; its layers are {names}.")
    if len(nodes) > 1:
        raise ValueError(f"Layer '{name}' is called {len(nodes)} times; widen and deepen take a layer called once.")
    return nodes[0]


def _produced_group(graph, node):
    for group in channel_groups(graph):
        if node in group.producers:
            if not group.removable:
                raise ValueError(
                    f"Cannot widen '{node.path}': its channels are {group.fixed_by[0]}, so their number is fixed."
                )
            return group
    raise ValueError(
        f"Cannot widen '{node.path}' ({type(node.layer).__name__}): it does not produce channels of its own "
        "(widen a Dense, Conv or Embedding layer)."
    )
