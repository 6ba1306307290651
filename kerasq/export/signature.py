"""The names of an exported file's signature inputs and outputs.

Inputs keep the Keras input names where usable; outputs the names registered export hooks give them
(a quantized model's outputs keep its float model's names), else the model's output names. Names are
made safe for a TFLite signature, or numbered when they would clash.

Example:
>>> import keras
>>> from kerasq.export.signature import input_names, output_names
>>> from kerasq.validation import input_specs
>>> model = keras.Sequential([keras.Input((4,), name="features"), keras.layers.Dense(2, name="head")])
>>> input_names(model, input_specs(model)), output_names(model)
(['features'], ['head'])
"""

import re

from kerasq.export import hooks


def input_names(model, specs):
    """Names for the file's signature inputs: Keras input names where usable, else `input_<i>`."""
    try:
        structure = model.input
    except (AttributeError, ValueError):
        structure = None
    keys = sorted(structure) if isinstance(structure, dict) and len(structure) == len(specs) else None
    names = [str(keys[i]) if keys else spec.name for i, spec in enumerate(specs)]
    return _sanitized(names, "input")


def output_names(model):
    """Names for the file's signature outputs, in `model.outputs` order."""
    count = len(model.outputs)
    names = list(getattr(model, "output_names", None) or [])
    if len(names) != count and count == 1 and model.layers:
        names = [model.layers[-1].name]
    if len(names) != count:
        names = [f"output_{i}" for i in range(count)]
    hooked = [hooks.output_name(tensor) or name for tensor, name in zip(model.outputs, names)]
    if len(set(hooked)) == len(hooked):
        names = hooked
    return _sanitized(names, "output")


def _sanitized(names, prefix):
    names = [re.sub(r"[^A-Za-z0-9_.\-/]", "_", n).lstrip("_-/") for n in names]
    if len(set(names)) != len(names) or not all(names):
        names = [f"{prefix}_{i}" for i in range(len(names))]
    return names
