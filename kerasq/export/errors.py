"""`ExportError`, and the TFLite converter's failures turned into messages that name the op, the
layer and the fix.

Example:
>>> import keras
>>> from kerasq.export.errors import conversion_error
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="head")])
>>> error = conversion_error(model, "float", RuntimeError("error: 'tf.Foo' op is neither a custom op nor a flex op"), log="")
>>> print(error)  # doctest: +ELLIPSIS
Could not convert model '...' to TFLite (float32). The op Foo is not a TFLite builtin op: replace it ...
"""

import re

from kerasq.export import hooks


class ExportError(RuntimeError):
    """The TFLite converter could not convert the model; the message names the op/layer and a fix."""


def conversion_error(model, mode, error, log):
    """An `ExportError` for `error`, raised by the converter in `mode` ("qat", "ptq" or "float"), with
    the ops and layers named in the error and the converter's `log`."""
    message = str(error) + "\n" + log
    ops = []
    for pattern in (r"'tfl?\.(\w+)' op", r"(?m)^Custom ops: ([\w, ]+)$", r"not (?:yet )?supported for op:? '?(?:tfl?\.)?(\w+)"):
        for match in re.findall(pattern, message):
            ops.extend(o.strip() for o in match.split(",") if o.strip())
    ops = list(dict.fromkeys(ops))
    layers = _layers_in(model, message)
    lines = [line for line in message.splitlines() if "error" in line] or str(error).strip().splitlines() or [""]
    first = re.sub(r"^.*\bloc\(.*\)\s*:\s*", "", lines[0]).rsplit("error:", 1)[-1].strip()[:300]
    not_builtin = "neither a custom op nor a flex op" in message or "Custom ops:" in message
    subject = ""
    if ops:
        subject = f"op {', '.join(ops[:3])}"
        subject += f" (in layer {', '.join(repr(n) for n in layers[:3])})" if layers else ""
    elif layers:
        subject = f"layer {', '.join(repr(n) for n in layers[:3])}"
    if not subject:
        advice = ""
    elif not_builtin or mode == "float":
        advice = (
            f" The {subject} is not a TFLite builtin op: replace it with supported ops "
            "(https://ai.google.dev/edge/litert/models/ops_compatibility)."
        )
    else:
        skip = f"skip={layers[:3]!r}" if layers else "skip=[<layer name>]"
        # Advice names only options of the path the user took: QAT models have no calibration data.
        if mode == "qat":
            advice = (
                f" The {subject} has no int8 support: leave that layer in float with "
                f"kerasq.quantize_model(float_model, {skip})."
            )
        else:
            advice = (
                f" The {subject} has no int8 support: export without representative_data for a float "
                f"file, or train with kerasq.quantize_model(model, {skip}) to leave that layer in float."
            )
    return ExportError(
        f"Could not convert model '{model.name}' to TFLite ({_mode_text(mode)}).{advice}\nConverter said: {first}"
    )


def type_text(obj):
    """`an object of type 'module.Class'` (builtins without their module), for error messages."""
    t = type(obj)
    return f"an object of type '{t.__qualname__ if t.__module__ == 'builtins' else t.__module__ + '.' + t.__qualname__}'"


def _mode_text(mode):
    return {"qat": "quantization-aware int8", "ptq": "post-training int8", "float": "float32"}[mode]


def _layers_in(model, message):
    """Layer names of `model` (nested models included) that appear in the converter's op locations."""
    names = {}

    def collect(m):
        for layer in getattr(m, "layers", []):
            names.setdefault(layer.name, layer)
            collect(layer)

    collect(model)
    found = []
    for path in re.findall(r'"([\w./\-]+)@', message) + re.findall(r'"([\w.\-]+/[\w./\-]+)"', message):
        for part in path.split("/"):
            base = part if part in names else re.sub(r"_\d+$", "", part)
            if base in names and not hasattr(names[base], "layers"):
                name = hooks.source_name(names[base])
                if name not in found:
                    found.append(name)
                break
    return found
