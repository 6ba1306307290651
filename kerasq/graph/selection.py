"""Which layers a transform applies to: names, layer classes, or a predicate, said the same way by
every feature (`skip=` of quantize_model, prune_low_magnitude, cluster_weights).

Example:
>>> import keras
>>> from kerasq.graph.selection import layer_predicate
>>> skip = layer_predicate(["head", keras.layers.Conv2D])
>>> skip(keras.layers.Dense(2, name="head")), skip(keras.layers.Conv2D(2, 3)), skip(keras.layers.ReLU())
(True, True, False)
"""


def layer_predicate(selection, what="skip"):
    """`fn(layer) -> bool` for a selection: a layer name, a layer class, a list of them, or a
    predicate (returned as it is)."""
    if callable(selection) and not isinstance(selection, type):
        return selection
    if isinstance(selection, (str, type)):
        selection = [selection]
    names, classes = set(), []
    for entry in selection:
        if isinstance(entry, str):
            names.add(entry)
        elif isinstance(entry, type):
            classes.append(entry)
        else:
            raise TypeError(f"{what} takes layer names, layer classes or a predicate; got {entry!r}.")
    classes = tuple(classes)
    return lambda layer: layer.name in names or (bool(classes) and isinstance(layer, classes))
