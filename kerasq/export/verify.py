"""`verify_tflite`: how closely a .tflite file reproduces its Keras model, judged against the floor.

TFLite's CPU kernel paths (the default XNNPACK kernels, the reference kernels and the optimized builtin
kernels) do not agree to the bit on quantized models: each rounds in its own way, and a deep model
amplifies a one-step rounding difference in an early layer. How far the other paths are from the
default one is the floor no simulation can beat, so an output passes when its distance to Keras is
within that floor (or one output step, whichever is larger).

Example:
>>> import keras
>>> from kerasq.data import load_digits
>>> from kerasq.export import export_tflite, verify_tflite
>>> _, (x_test, _) = load_digits()
>>> model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])
>>> report = verify_tflite(model, export_tflite(model), x_test)  # a float32 file: differences in "abs"
>>> print(report)
TFLite parity on 450 samples (TFLite default kernels vs Keras; floor: default vs reference and builtin kernels)
...
Result: PASSED
>>> report.passed
True
"""

import dataclasses
import re
import warnings

import numpy as np

from kerasq.export import hooks
from kerasq.export.tflite_model import TFLiteModel, dequantize
from kerasq.validation import check_input_data, input_specs, pack_inputs

MIN_AGREEMENT = 0.995  # argmax agreement an output needs (or the floor's, if the floor is lower)
# The floor's agreement is itself measured on the given samples, and which samples the kernel paths
# flip depends on the CPU (oneDNN and XNNPACK pick kernels by instruction set): an agreement this many
# samples below the floor's is sampling noise, not a parity gap.
SAMPLING_SLACK = 2
FRAGILE_DISAGREEMENT = 0.005  # kernel paths disagreeing on more argmaxes than this: numerically fragile
FRAGILE_CONFIDENCE_Z = 1.96  # ... with 97.5% confidence given the number of samples (Wilson bound)
FLOOR_KERNELS = ("reference", "builtin")  # the kernel paths measured against the default one
FLOAT_RTOL = 1e-4  # float outputs: tolerance relative to the output's magnitude
STEP_SLACK = 1e-3  # outputs lie on a grid: differences in steps are whole numbers up to float error
# ... and that float error grows with the output's magnitude in steps: a few float32 roundings (Keras's
# fake-quant computes q x scale + min; dequantizing rounds once more), each up to half an ulp. At 16
# bits an output spans 32767 steps a side, where float32 ulps are 0.002-0.004 steps.
FLOAT32_ROUNDINGS = 8


@dataclasses.dataclass
class OutputParity:
    """Parity figures of one output. `unit` is "steps" (multiples of the output's quantization step)
    or "abs" (absolute differences, for float computations). Agreements are None without a class axis."""

    name: str
    shape: tuple
    unit: str
    step: float
    agreement: float
    max_diff: float
    mean_diff: float
    floor_agreement: float
    floor_max_diff: float
    floor_mean_diff: float
    passed: bool


@dataclasses.dataclass
class ParityReport:
    """The result of `verify_tflite`: one `OutputParity` per model output."""

    outputs: list
    num_samples: int
    size_bytes: int
    float_reference: bool = False  # a quantized file against a float model (one that does not simulate int8)
    floor_kernels: tuple = FLOOR_KERNELS  # the kernel paths that could run the file, for the floor
    # (op name, output tensor) of each op that computes in float in a quantized file; None for a
    # float file, where every op does.
    float_ops: tuple = ()
    # Names of the layers the quantized model leaves in float on purpose (`skip=`, layers
    # `quantize_apply` found unannotated, recurrent float islands): their ops are expected in float.
    float_layers: tuple = ()

    @property
    def fully_integer(self):
        """True when no op between the file's inputs and outputs computes in float."""
        return self.float_ops is not None and not self.float_ops

    @property
    def unexpected_float_ops(self):
        """The float ops that belong to no layer left in float on purpose: ops TFLite has no integer
        kernel for (or constants the converter could not quantize)."""
        if self.float_ops is None:
            return None
        return tuple(op for op in self.float_ops if _layer_of(op[1], self.float_layers) is None)

    @property
    def passed(self):
        return all(o.passed for o in self.outputs)

    @property
    def fragile(self):
        """True when TFLite's kernel paths disagree on more than 0.5% of the argmaxes of some output,
        beyond doubt for this many samples: the lower 97.5% confidence bound of their disagreement
        rate is above 0.5%. (On 450 samples that takes about 7 disagreements; one or two flips are
        what any model near a decision boundary shows.)"""
        return any(
            o.floor_agreement is not None
            and _wilson_lower_bound(1.0 - o.floor_agreement, self.num_samples) > FRAGILE_DISAGREEMENT
            for o in self.outputs
        )

    def as_dict(self):
        return {
            "passed": self.passed,
            "fragile": self.fragile,
            "num_samples": self.num_samples,
            "size_bytes": self.size_bytes,
            "float_reference": self.float_reference,
            "floor_kernels": list(self.floor_kernels),
            "fully_integer": self.fully_integer,
            "float_ops": None if self.float_ops is None else [list(op) for op in self.float_ops],
            "float_layers": list(self.float_layers),
            "outputs": [dataclasses.asdict(o) for o in self.outputs],
        }

    def __str__(self):
        header = (f"{'output':<20} {'unit':<6} {'agree':>7} {'max':>9} {'mean':>9} │ "
                  f"{'floor agree':>11} {'floor max':>9} {'floor mean':>10}  result")
        if self.floor_kernels:
            floor = f"default vs {' and '.join(self.floor_kernels)} kernels"
        else:
            floor = "none: no other kernel path can run this file"
        lines = [f"TFLite parity on {self.num_samples} samples (TFLite default kernels vs Keras; floor: {floor})",
                 header, "─" * len(header)]
        for o in self.outputs:
            lines.append(
                f"{o.name[:20]:<20} {o.unit:<6} {_pct(o.agreement):>7} {_num(o.max_diff):>9} {_num(o.mean_diff):>9} │ "
                f"{_pct(o.floor_agreement):>11} {_num(o.floor_max_diff):>9} {_num(o.floor_mean_diff):>10}  "
                f"{'PASS' if o.passed else 'FAIL'}"
            )
        if any(o.unit == "abs" for o in self.outputs):
            lines.append("abs: float output, differences in absolute units (steps: multiples of the output's scale)")
        lines.append(f"Result: {'PASSED' if self.passed else 'FAILED'}")
        if self.float_ops is not None:
            lines.append(_integer_text(self.float_ops, self.float_layers))
        if self.float_reference:
            lines.append(_FLOAT_REFERENCE_TEXT)
        if self.fragile:
            lines.append(_FRAGILE_TEXT)
        return "\n".join(lines)


_FLOAT_REFERENCE_TEXT = (
    "Note: the file is quantized but the Keras model holds no kerasq quantization layers. For a float "
    "model and its post-training int8 file the differences are quantization error, which no step bound "
    "applies to: read the agreement. A QAT model (kerasq.quantize_model) simulates its file to a step."
)

_FRAGILE_TEXT = (
    "Warning: the model is numerically fragile on device: TFLite's own kernel paths disagree on clearly more "
    "than 0.5% of its predictions, so results will differ between phones and runtimes. What helps: train "
    "longer (briefly trained models keep many predictions near a decision boundary), check the accuracy "
    "of the file on the runtime you deploy to, and look for layers whose outputs have a tiny range "
    "(TFLiteModel(...).summary() shows each tensor's scale)."
)


def _wilson_lower_bound(rate, n, z=FRAGILE_CONFIDENCE_Z):
    """The lower end of the Wilson score interval of a rate observed on `n` samples."""
    if n <= 0:
        return 0.0
    center = rate + z * z / (2 * n)
    margin = z * np.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return max(0.0, (center - margin) / (1 + z * z / n))


def verify_tflite(model, tflite, x, *, batch_size=256):
    """Compares `model` and its .tflite file on inputs `x`, with the kernel-path floor for scale.

    Args:
        model: the Keras model the file was exported from.
        tflite: the file: a path, its bytes, or a `TFLiteModel`.
        x: inputs (an array, or a list of arrays in `model.inputs` order).
        batch_size: batch size for both models.

    Returns:
        A `ParityReport`: per output, argmax agreement, max/mean |TFLite - Keras| (in output steps for
        quantized outputs), the same figures between the default and the other kernel paths (the floor),
        and pass/fail.
        Warns once when the file is numerically fragile (`report.fragile`).

    The one-step criterion is for files whose Keras model simulates them (fake-quant/QAT models, or
    float files). A float model against its post-training int8 file is typically a few steps apart:
    there the argmax agreement is the figure to read.
    """
    arrays = check_input_data(x, input_specs(model), "x")
    default = tflite if isinstance(tflite, TFLiteModel) and tflite.kernels == "default" else None
    default = default or TFLiteModel(tflite, kernels="default")
    alternatives = {}
    for kernels in FLOOR_KERNELS:
        try:
            alternatives[kernels] = TFLiteModel(default.content, kernels=kernels)
        except ValueError:  # that path lacks a kernel for one of the file's ops: no floor from it
            pass
    if len(default.output_details) != len(model.outputs):
        raise ValueError(
            f"The model has {len(model.outputs)} outputs but the .tflite file has {len(default.output_details)}; "
            "was it exported from this model?"
        )

    keras_out = _keras_predict(model, arrays, batch_size)
    feed = arrays if len(arrays) > 1 else arrays[0]
    raw_default = _as_list(default.predict(feed, batch_size, raw=True))
    raw_alternatives = [_as_list(other.predict(feed, batch_size, raw=True)) for other in alternatives.values()]

    outputs = []
    for i, (ref, q_default) in enumerate(zip(keras_out, raw_default)):
        quant = default.output_quantization[i]
        deq_default = _dequantize(q_default, quant)
        deq_others = [_dequantize(raw[i], quant) for raw in raw_alternatives] or [deq_default]
        if ref.shape != deq_default.shape:
            raise ValueError(
                f"Output {i}: the Keras model gives shape {ref.shape} but the .tflite file {deq_default.shape}."
            )
        step = default.output_step(i)
        scale = step if step else 1.0
        diff = np.abs(deq_default.astype(np.float64) - ref.astype(np.float64)) / scale
        floor = np.max(
            [np.abs(deq_default.astype(np.float64) - other.astype(np.float64)) / scale for other in deq_others],
            axis=0,
        )
        agreement = floor_agreement = None
        if ref.ndim >= 2 and ref.shape[-1] > 1:
            agreement = float(np.mean(ref.argmax(-1) == deq_default.argmax(-1)))
            floor_agreement = min(
                float(np.mean(other.argmax(-1) == deq_default.argmax(-1))) for other in deq_others
            )
        max_diff, floor_max = float(diff.max()), float(floor.max())
        if step:
            tolerance = max(1.0, floor_max)
        else:
            tolerance = max(floor_max, FLOAT_RTOL * max(1.0, float(np.abs(ref).max())))
        passed = max_diff <= tolerance + (_step_slack(ref, step) if step else 1e-12)
        if agreement is not None:
            slack = SAMPLING_SLACK / len(ref)
            passed = passed and agreement >= min(MIN_AGREEMENT, floor_agreement) - slack
        outputs.append(
            OutputParity(
                name=default.output_names[i],
                shape=tuple(ref.shape[1:]),
                unit="steps" if step else "abs",
                step=float(step) if step else None,
                agreement=agreement,
                max_diff=max_diff,
                mean_diff=float(diff.mean()),
                floor_agreement=floor_agreement,
                floor_max_diff=floor_max,
                floor_mean_diff=float(floor.mean()),
                passed=bool(passed),
            )
        )
    report = ParityReport(
        outputs=outputs,
        num_samples=int(arrays[0].shape[0]),
        size_bytes=default.size_bytes,
        float_reference=not hooks.is_quantized(model) and any(o.unit == "steps" for o in outputs),
        floor_kernels=tuple(alternatives),
        float_ops=None if default.is_float_file else tuple(default.float_ops),
        float_layers=tuple(layer.name for layer in hooks.float_layers(model)),
    )
    if report.fragile:
        warnings.warn(_FRAGILE_TEXT, RuntimeWarning, stacklevel=2)
    return report


def _integer_text(float_ops, float_layers=()):
    """What computes in float, so a PASS never hides a float island: the ops of layers left in
    float on purpose, then any other."""
    if not float_ops:
        return "Integer: every op between the inputs and the outputs computes in integers."
    chosen = {}
    for _, tensor in float_ops:
        layer = _layer_of(tensor, float_layers)
        if layer is not None:
            chosen.setdefault(layer, None)
    others = [op for op in float_ops if _layer_of(op[1], float_layers) is None]
    lines = []
    if chosen:
        lines.append(
            f"Float ops in the file: {_op_counts([op for op in float_ops if op not in others])} of the layers "
            f"left in float ({', '.join(chosen)}), between quantize and dequantize ops, as asked."
        )
    if others:
        lines.append(
            f"{'Other float' if chosen else 'Float'} ops in the file: {_op_counts(others)} (between quantize and "
            "dequantize ops). They run in float because TFLite has no integer kernel for them "
            "(TFLiteModel(...).summary() names their tensors)."
        )
    return "\n".join(lines)


def _op_counts(ops):
    counts = {}
    for name, _ in ops:
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{name} x{count}" if count > 1 else name for name, count in counts.items())


def _layer_of(tensor_name, layer_names):
    """The name in `layer_names` of the layer whose ops made the file's tensor `tensor_name`, or None.

    Export names tensors after their layers ("dense", "dense/kernel", "dense_1" for a second tensor
    of the same name); with `tensor_names="converter"`, after the TensorFlow ops fused into them
    ("model/dense_1/MatMul;..."), whose scopes are the layers' names with a `_<n>` suffix."""
    names = set(layer_names)
    for part in re.split(r"[;/]", tensor_name):
        if part in names:
            return part
        base = re.sub(r"_\d+$", "", part)
        if base in names:
            return base
    return None


def _step_slack(ref, step):
    """How far from a whole number of steps float32 arithmetic can put a difference of outputs."""
    magnitude = float(np.abs(ref).max()) / step
    return STEP_SLACK + FLOAT32_ROUNDINGS * float(np.finfo(np.float32).eps) * magnitude


def _keras_predict(model, arrays, batch_size):
    import keras

    parts = []
    for start in range(0, arrays[0].shape[0], batch_size):
        chunk = [a[start : start + batch_size] for a in arrays]
        out = model(pack_inputs(model, chunk), training=False)
        parts.append([np.asarray(keras.ops.convert_to_numpy(o)) for o in keras.tree.flatten(out)])
    return [np.concatenate(p) for p in zip(*parts)]


def _dequantize(q, quant):
    return np.asarray(dequantize(q, quant), np.float32)


def _as_list(x):
    return x if isinstance(x, list) else [x]


def _pct(v):
    return "-" if v is None else f"{100 * v:.2f}%"


def _num(v):
    return f"{v:.3g}"
