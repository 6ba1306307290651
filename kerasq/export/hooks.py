"""What features tell export about the models they make, without export knowing any feature.

A feature (quantization, pruning, ...) subclasses `ExportHook`, overrides what applies to its models,
and registers an instance with `register_export_hook`. Export asks every registered hook.

Example:
>>> import keras
>>> from kerasq.export import ExportHook, export_tflite, register_export_hook, TFLiteModel
>>> class RenameOutputs(ExportHook):
...     def output_name(self, tensor):
...         return "scores"
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
>>> with register_export_hook(RenameOutputs()):  # registered for the block only
...     TFLiteModel(export_tflite(model)).output_names
['scores']
"""

import contextlib


class ExportHook:
    """What a feature tells export about the models it makes. Subclass, override what applies, and
    register an instance with `register_export_hook`."""

    def prepare(self, model):
        """The model to convert in place of `model` (e.g. with training-only wrappers stripped)."""
        return model

    def is_quantized(self, model):
        """True if `model` simulates int8: export converts it to full int8 without calibration data."""
        return False

    def tracing(self):
        """A context manager, active while the model is traced for conversion."""
        return contextlib.nullcontext()

    def output_name(self, tensor):
        """The name the file gives the model output `tensor` (e.g. the float model's), or None."""
        return None

    def source_name(self, layer):
        """The name of the layer of the user's own model that `layer` (of a model this feature made)
        stands for, or None: error advice names that one."""
        return None

    def activation_bits(self, tensor):
        """The bit width (8 or 16) a model input or output `tensor` is quantized to, or None."""
        return None

    def float_layers(self, model):
        """The layers of a quantized `model` left in float on purpose (skipped or not annotated):
        export keeps their ops in float, and `verify_tflite` expects them there."""
        return []


class HookRegistration:
    """What `register_export_hook` returns: `undo()` unregisters the hook; as a context manager, the
    hook is registered for the `with` block only."""

    def __init__(self, hook):
        self.hook = hook
        self._undone = False

    def undo(self):
        if self._undone:
            return
        self._undone = True
        _HOOKS.remove(self.hook)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.undo()


def register_export_hook(hook):
    """Registers `hook` (an `ExportHook`) with export and returns its `HookRegistration`."""
    if not isinstance(hook, ExportHook):
        raise TypeError(f"register_export_hook expects an ExportHook instance; got {hook!r}. Subclass ExportHook.")
    _HOOKS.append(hook)
    return HookRegistration(hook)


_HOOKS = []


# ---- what export asks every registered hook ------------------------------------------------------------

def prepare(model):
    """`model` passed through every hook's `prepare`, in registration order."""
    for hook in list(_HOOKS):
        model = hook.prepare(model)
    return model


def is_quantized(model):
    """True if any hook says `model` simulates int8."""
    return any(hook.is_quantized(model) for hook in list(_HOOKS))


@contextlib.contextmanager
def tracing():
    """Every hook's `tracing()` context, for the block."""
    with contextlib.ExitStack() as stack:
        for hook in list(_HOOKS):
            stack.enter_context(hook.tracing())
        yield


def float_layers(model):
    """The layers any hook says `model` leaves in float on purpose."""
    found = []
    for hook in list(_HOOKS):
        found.extend(layer for layer in hook.float_layers(model) if all(layer is not f for f in found))
    return found


def source_name(layer):
    """The name of the user's layer that `layer` stands for, as a hook knows it; else its own name."""
    name = _first_answer("source_name", layer)
    return layer.name if name is None else name


def activation_bits(tensor):
    """The bit width a hook says `tensor` is quantized to, or None."""
    return _first_answer("activation_bits", tensor)


def output_name(tensor):
    """The name the most recently registered hook that knows `tensor` gives it, or None."""
    return _first_answer("output_name", tensor)


def _first_answer(question, value):
    """What the most recently registered hook that answers `question` (not None) about `value` says."""
    for hook in reversed(_HOOKS):
        answer = getattr(hook, question)(value)
        if answer is not None:
            return answer
    return None
