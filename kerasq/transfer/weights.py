"""`transfer_weights`: carry weights from one architecture to another, and say what happened.

Layers are matched by name, by order, by their weights' shapes, or by a mapping you give. Each target
weight is then copied (same shape), adapted on request (`adapt=True`: a narrower layer keeps the most
important channels, by the same L1 filter norms channel pruning uses, consistently for the layers
that share them; a wider one is filled in and keeps its own initial values for the rest; a first
convolution goes between 1 and 3 input channels by summing or repeating), or skipped with the reason.
The report lists every target weight, including those that kept their initial values. Nothing is
ever written into a weight of another shape, and the source model is never changed.

Example:
>>> import keras, kerasq
>>> old = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(8, 3, name="conv"),
...                         keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10, name="head")])
>>> new = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(16, 3, name="conv"),
...                         keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10, name="head")])
>>> report = kerasq.transfer_weights(old, new, adapt=True)
>>> [(row.layer, row.weight, row.status) for row in report.rows][:2]
[('conv', 'kernel', 'adapted'), ('conv', 'bias', 'adapted')]
"""

import dataclasses

import keras
import numpy as np

from kerasq.graph import LayerGraph, channel_groups, facts
from kerasq.graph.weights import WeightShapeError
from kerasq.pruning.channels import channel_scores

MATCHES = ("name", "order", "shape")
COPIED, ADAPTED, SKIPPED, UNTOUCHED = "copied", "adapted", "skipped", "untouched"


@dataclasses.dataclass
class TransferRow:
    """What happened to one target weight."""

    layer: str
    weight: str
    status: str  # copied, adapted, skipped or untouched
    source: str = ""  # 'layer/weight' it came from
    detail: str = ""  # how it was adapted, or why it was skipped


class TransferReport:
    """The result of `transfer_weights`: one `TransferRow` per target weight; prints as a table."""

    def __init__(self, rows, target_layers):
        self.rows = rows
        self._target_layers = target_layers

    def _with(self, status):
        return [row for row in self.rows if row.status == status]

    copied = property(lambda self: self._with(COPIED))
    adapted = property(lambda self: self._with(ADAPTED))
    skipped = property(lambda self: self._with(SKIPPED))
    untouched = property(lambda self: self._with(UNTOUCHED))

    def freeze(self):
        """Makes every target layer whose weights were all copied untrainable, for fine-tuning the
        rest with ordinary `fit` (compile after freezing)."""
        done = {}
        for row in self.rows:
            done.setdefault(row.layer, True)
            done[row.layer] &= row.status == COPIED
        for name, all_copied in done.items():
            if all_copied:
                self._target_layers[name].trainable = False

    def __str__(self):
        header = f"{'target layer':<28} {'weight':<18} {'status':<10} {'from':<32} detail"
        lines = [header, "-" * len(header)]
        for row in self.rows:
            lines.append(f"{row.layer:<28} {row.weight:<18} {row.status:<10} {row.source:<32} {row.detail}")
        counts = ", ".join(f"{len(self._with(s))} {s}" for s in (COPIED, ADAPTED, SKIPPED, UNTOUCHED))
        return "\n".join(lines + [counts])

    __repr__ = __str__


def transfer_weights(source, target, match="name", *, adapt=False, strict=False):
    """Copies weights from `source` into `target` (in place) layer by layer; returns a `TransferReport`.

    Args:
        source: the model to copy from (Sequential or Functional, nested models included); unchanged.
        target: the model to copy into.
        match: "name" (same layer names), "order" (the i-th layer with weights of each), "shape" (the
            one source layer whose weight shapes are the target layer's, where that is unique), a dict
            {target layer name: source layer name}, or a function `fn(target_layer) -> source layer
            name or None`.
        adapt: adapt weights whose shapes differ (narrower, wider, 1 <-> 3 input channels) instead of
            skipping them.
        strict: raise, before writing anything, if any target weight is skipped or left untouched.
    """
    source_layers = _weighted_layers(source)
    target_layers = _weighted_layers(target)
    pairs = _match(source_layers, target_layers, match)
    keep = _channels_to_keep(source, source_layers, target_layers, pairs) if adapt else {}
    rows, writes = [], []
    for target_name, target_layer in target_layers.items():
        source_name = pairs.get(target_name)
        source_layer = source_layers.get(source_name)
        for name, variable in _named_weights(target_layer).items():
            if source_layer is None:
                rows.append(TransferRow(target_name, name, UNTOUCHED, detail="no matching source layer"))
                continue
            source_value = _named_weights(source_layer).get(name)
            if source_value is None:
                rows.append(TransferRow(target_name, name, UNTOUCHED, detail=f"'{source_name}' has no weight '{name}'"))
                continue
            value, row = _transfer_one(np.asarray(source_value), variable, name, source_layer, target_layer,
                                       adapt, keep)
            row.layer, row.source = target_name, f"{source_name}/{name}"
            rows.append(row)
            if value is not None:
                writes.append((variable, value))
    report = TransferReport(rows, target_layers)
    if strict and (report.skipped or report.untouched):
        raise ValueError(f"transfer_weights(strict=True): not every target weight was transferred.\n{report}")
    for variable, value in writes:
        if tuple(value.shape) != tuple(variable.shape):  # never reached: a last guard before writing
            raise WeightShapeError(f"{variable.path}: {value.shape} vs {tuple(variable.shape)}")
        variable.assign(value)
    return report


# ---- matching -----------------------------------------------------------------------------------------

def _weighted_layers(model):
    """{name: layer} of the layers with weights, in graph order (nested models inlined)."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"transfer_weights takes Keras models; got {type(model).__name__}.")
    layers = {}
    for node in LayerGraph(model).nodes:
        layer = node.layer
        if node.is_input or not isinstance(layer, keras.layers.Layer) or not layer.weights:
            continue
        name = layer.name if layer.name not in layers or layers[layer.name] is layer else node.path
        layers.setdefault(name, layer)
    return layers


def _match(source_layers, target_layers, match):
    if isinstance(match, dict):
        unknown = [s for s in match.values() if s not in source_layers]
        if unknown:
            raise ValueError(f"match names source layers {unknown} that have no weights or do not exist.")
        return dict(match)
    if callable(match):
        return {t: match(layer) for t, layer in target_layers.items() if match(layer) in source_layers}
    if match == "name":
        return {name: name for name in target_layers if name in source_layers}
    if match == "order":
        return dict(zip(target_layers, source_layers))
    if match == "shape":
        def signature(layer):
            return tuple(tuple(w.shape) for w in layer.weights)

        by_shape = {}
        for name, layer in source_layers.items():
            by_shape.setdefault(signature(layer), []).append(name)
        target_shapes = [signature(layer) for layer in target_layers.values()]
        return {
            t: by_shape[signature(layer)][0]
            for t, layer in target_layers.items()
            if len(by_shape.get(signature(layer), [])) == 1 and target_shapes.count(signature(layer)) == 1
        }
    raise ValueError(f"match must be one of {MATCHES}, a dict or a function; got {match!r}.")


def _named_weights(layer):
    """{weight name: variable}: the name after the layer's own path ('kernel', 'gamma'...)."""
    prefix = layer.path + "/" if hasattr(layer, "path") else ""
    return {(v.path[len(prefix):] if v.path.startswith(prefix) else v.name): v for v in layer.weights}


# ---- adapting -----------------------------------------------------------------------------------------

def _channels_to_keep(source, source_layers, target_layers, pairs):
    """{id(source layer): {role: indices}}: for every source channel group that a narrower target
    layer needs fewer channels of, the most important ones, used alike by every layer on them."""
    graph = LayerGraph(source)
    reverse = {s: t for t, s in pairs.items()}
    keep = {}
    for group in channel_groups(graph):
        if any("mixes channels" in reason for reason in group.fixed_by):
            for node in group.consumers:  # e.g. a Dense after Flatten: its rows are positions too
                keep.setdefault(id(node.layer), {})["mixed_inputs"] = True
        size = None
        for node in group.producers:
            target = target_layers.get(reverse.get(node.layer.name))
            layer_facts = facts.layer_facts(node.layer)
            if target is not None and layer_facts is not None:
                kernel = layer_facts.kernels[layer_facts.output_kernel]
                shape = tuple(getattr(target, layer_facts.output_kernel, np.zeros(0)).shape)
                if shape and not isinstance(kernel.out_axis, tuple) and shape[kernel.out_axis] < group.size:
                    size = shape[kernel.out_axis]
                    break
        if size is None:
            continue
        indices = np.sort(np.argsort(-channel_scores(graph, group), kind="stable")[:size])
        for role, nodes in (("out", group.producers), ("member", group.members), ("in", group.consumers)):
            for node in nodes:
                keep.setdefault(id(node.layer), {})[role] = (group.size, indices)
    return keep


def _transfer_one(value, variable, name, source_layer, target_layer, adapt, keep):
    want = tuple(variable.shape)
    if value.shape == want:
        return value, TransferRow("", name, COPIED)
    if not adapt:
        return None, TransferRow("", name, SKIPPED, detail=f"shape {value.shape} vs {want} (adapt=True adapts it)")
    adapted, how = _adapt(value, want, name, source_layer, keep.get(id(source_layer), {}), np.asarray(variable))
    if adapted is None:
        return None, TransferRow("", name, SKIPPED, detail=how)
    return adapted, TransferRow("", name, ADAPTED, detail=how)


def _adapt(value, want, name, layer, kept, initial):
    if value.ndim != len(want):
        return None, f"rank {value.ndim} vs {len(want)}: cannot adapt"
    layer_facts = facts.layer_facts(layer)
    kernel = layer_facts.kernels.get(name) if layer_facts else None
    steps = []
    if kernel is not None and kernel.in_axis is not None and value.ndim >= 3:
        axis = kernel.in_axis % value.ndim
        if (value.shape[axis], want[axis]) == (3, 1):  # a grey image seen as RGB gives the same sums
            value = value.sum(axis=axis, keepdims=True)
            steps.append("summed 3 input channels into 1")
        elif (value.shape[axis], want[axis]) == (1, 3):  # an RGB copy of a grey image gives the same output
            value = np.repeat(value, 3, axis=axis) / 3.0
            steps.append("repeated 1 input channel over 3 (/3)")
    axes = _channel_axes(layer_facts, name, value.ndim)
    for axis in range(value.ndim):
        have, need = value.shape[axis], want[axis]
        if have == need:
            continue
        role = axes.get(axis)
        if role == "in" and kept.get("mixed_inputs"):
            return None, _unadaptable(value.shape, want)
        if have > need:
            size, indices = kept.get(role, (None, None))
            if size == have and len(indices) == need:
                value = np.take(value, indices, axis=axis)
                steps.append(f"kept the {need} most important of {have} along axis {axis}")
            elif role is None and axis != value.ndim - 1 and value.ndim >= 3:
                return None, f"shape {value.shape} vs {want}: a kernel's spatial size differs"
            elif role is None:
                return None, _unadaptable(value.shape, want)
            else:
                value = np.take(value, np.arange(need), axis=axis)
                steps.append(f"kept the first {need} of {have} along axis {axis}")
        else:
            if role is None:
                return None, _unadaptable(value.shape, want)
            index = [slice(None)] * value.ndim
            index[axis] = slice(have, need)
            filler = initial[tuple(_fit(index, value.shape, want, axis))]
            value = np.concatenate([value, filler], axis=axis)
            steps.append(f"filled {have} of {need} along axis {axis}, the rest keep their initial values")
    return value.astype(initial.dtype), "; ".join(steps)


def _fit(index, have_shape, want, axis):
    """Index into the target's initial value for the part `value` lacks along `axis`."""
    fitted = list(index)
    for i, (have, need) in enumerate(zip(have_shape, want)):
        if i != axis:
            fitted[i] = slice(0, have)
    return fitted


def _channel_axes(layer_facts, name, ndim):
    """{axis: "out" | "in" | "member"} for the channel axes of weight `name`."""
    if layer_facts is None:
        return {}
    axes = {}
    kernel = layer_facts.kernels.get(name)
    if kernel is not None:
        if not isinstance(kernel.out_axis, tuple) and layer_facts.channels == facts.PRODUCES:
            axes[kernel.out_axis % ndim] = "out"
        if kernel.in_axis is not None:
            axes.setdefault(kernel.in_axis % ndim, "in" if layer_facts.channels == facts.PRODUCES else "member")
    if name in layer_facts.per_channel:
        role = "out" if layer_facts.channels == facts.PRODUCES else "member"
        axes.setdefault(layer_facts.per_channel[name] % ndim, role)
    return axes


def _unadaptable(have, want):
    return (
        f"shape {tuple(have)} vs {tuple(want)}: not a channel axis, so it cannot be adapted (e.g. a Dense "
        "after Flatten whose input size changed with the image size); it keeps its initial values"
    )
