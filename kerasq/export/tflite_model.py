"""`TFLiteModel`: a .tflite file run by the LiteRT interpreter, behind a Keras-like face.

Example:
>>> import keras, numpy as np
>>> from kerasq.export import export_tflite, TFLiteModel
>>> model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])
>>> tflite = TFLiteModel(export_tflite(model))
>>> tflite.predict(np.zeros((3, 8, 8, 1), "float32")).shape
(3, 10)
>>> tflite.summary(show_tensors=False)  # ops, quantization, and whether the file is fully integer
TFLiteModel "<bytes>"  ... bytes (... KB), ... ops
Inputs:
  input (None, 8, 8, 1) float32 -
Outputs:
  ... (None, 10) float32 -
Ops (execution order of first use):
...
Fully integer: NO (...)
"""

import collections
import os
import time

import numpy as np

from kerasq.export.flatbuffer import TensorInfo, constant_values, read_graph
from kerasq.export.probe import kernel_path_failure
from kerasq.validation import InputSpec, check_input_data, format_shape

KERNELS = ("default", "reference", "builtin")


class TFLiteModel:
    """A .tflite model run with LiteRT, with Keras-like `predict`, `evaluate` and `summary`.

    Args:
        path_or_bytes: path to a .tflite file, or its bytes (e.g. the return value of `export_tflite`).
        kernels: `"default"` runs LiteRT's default CPU kernels (XNNPACK delegate), as on most phones;
            `"reference"` runs TFLite's reference kernels (`OpResolverType.BUILTIN_REF`), slow but
            simple, as on microcontrollers; `"builtin"` runs TFLite's optimized builtin kernels without
            XNNPACK, as on runtimes that disable it. They do not always agree to the bit:
            `verify_tflite` measures by how much.
        num_threads: interpreter threads; `None` lets LiteRT choose.

    Float inputs are quantized for int8/int16 input tensors as `clip(floor(x / scale + 0.5) + zero_point)`
    (round half up, as TensorFlow's fake-quant ops do); arrays that already have the input tensor's
    integer dtype are passed through untouched. Outputs are dequantized `(q - zero_point) * scale`.

    Example:
    >>> import keras
    >>> from kerasq.data import load_digits
    >>> from kerasq.export import TFLiteModel, export_tflite
    >>> (x_train, y_train), (x_test, y_test) = load_digits()
    >>> model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])
    >>> tflite = TFLiteModel(export_tflite(model, representative_data=x_train))  # or a .tflite file's path
    >>> tflite.predict(x_test).shape  # float in, float out: quantized and dequantized at the edges
    (450, 10)
    >>> accuracy = tflite.evaluate(x_test, y_test)  # top-1, here of an untrained model
    """

    def __init__(self, path_or_bytes, *, kernels="default", num_threads=None):
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}; got {kernels!r}.")
        self.kernels = kernels
        self.num_threads = num_threads
        self.path, self._content = _load_content(path_or_bytes)
        what = f"'{self.path}'" if self.path else "The given bytes"
        if len(self._content) < 8 or self._content[4:8] != b"TFL3":
            raise ValueError(f"{what} is not a valid .tflite file (no TFL3 flatbuffer identifier).")
        if kernels != "default":
            # Some kernel paths abort the process on files they cannot handle: try in a child first.
            failure = kernel_path_failure(self._content, kernels)
            if failure is not None:
                raise ValueError(f"{what}: {failure}. Use kernels='default'.")
        try:
            self._graph = read_graph(self._content)
            self._interpreter = self._make_interpreter()
            self._interpreter.allocate_tensors()
        except Exception as error:
            raise ValueError(f"{what} is not a valid .tflite file or LiteRT cannot load it: {error}") from error
        self._input_details = self._interpreter.get_input_details()
        self._output_details = self._interpreter.get_output_details()
        self._shapes = [tuple(d["shape"]) for d in self._input_details]

    def _make_interpreter(self):
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        resolver = {
            "default": OpResolverType.AUTO,
            "reference": OpResolverType.BUILTIN_REF,
            "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        }[self.kernels]
        return Interpreter(
            model_content=self._content, num_threads=self.num_threads, experimental_op_resolver_type=resolver
        )

    # ---- description -------------------------------------------------------------------------------
    @property
    def content(self):
        """The flatbuffer bytes."""
        return self._content

    @property
    def size_bytes(self):
        return len(self._content)

    @property
    def input_details(self):
        """LiteRT's input details (a list of dicts), in the file's input order."""
        return list(self._input_details)

    @property
    def output_details(self):
        """LiteRT's output details (a list of dicts), in the file's output order."""
        return list(self._output_details)

    @property
    def input_names(self):
        """Signature names of the inputs where the file has a signature, else tensor names."""
        return [self._graph.signature["inputs"].get(d["index"], d["name"]) for d in self._input_details]

    @property
    def output_names(self):
        return [self._graph.signature["outputs"].get(d["index"], d["name"]) for d in self._output_details]

    @property
    def input_quantization(self):
        """`(scale, zero_point)` per input, or `None` for a float (unquantized) input."""
        return [_quant(d) for d in self._input_details]

    @property
    def output_quantization(self):
        """`(scale, zero_point)` per output, or `None` for a float (unquantized) output."""
        return [_quant(d) for d in self._output_details]

    @property
    def input_specs(self):
        """One `InputSpec` per input: the shape with a free batch and the dtype `predict` expects."""
        specs = []
        for name, detail, q in zip(self.input_names, self._input_details, self.input_quantization):
            shape = tuple(None if d < 0 else int(d) for d in detail["shape_signature"])
            shape = (None,) + shape[1:] if shape else shape
            dtype = "float32" if q is not None else np.dtype(detail["dtype"]).name
            specs.append(InputSpec(name, shape, dtype))
        return specs

    @property
    def ops(self):
        """Op names of the main subgraph, in execution order."""
        return [op.name for op in self._graph.ops]

    @property
    def tensors(self):
        """Every tensor of the main subgraph as a `TensorInfo`."""
        return list(self._graph.tensors)

    def weights(self):
        """{tensor name: numpy array} of the file's constant tensors (weights, biases), as stored:
        int8 weights stay int8 (multiply by the tensor's scales to get real values)."""
        names = {t.index: t.name for t in self._graph.tensors}
        return {names[index]: value for index, value in constant_values(self._content).items()}

    @property
    def float_tensors(self):
        """Names of the floating-point tensors strictly between the inputs and the outputs."""
        io = set(self._graph.inputs) | set(self._graph.outputs)
        used = {i for op in self._graph.ops for i in op.inputs + op.outputs}
        return [t.name for t in self._graph.tensors if t.index in used - io and _is_float(t.dtype)]

    @property
    def float_ops(self):
        """`[(op name, output tensor name)]` of the ops that compute in float between the inputs and
        the outputs (QUANTIZE and DEQUANTIZE at the file's edges are not counted)."""
        io = set(self._graph.inputs) | set(self._graph.outputs)
        tensors = {t.index: t for t in self._graph.tensors}
        found = []
        for op in self._graph.ops:
            outputs = [tensors[i] for i in op.outputs if i >= 0]
            inputs = [tensors[i] for i in op.inputs if i >= 0]
            computes_in_float = any(_is_float(t.dtype) for t in outputs + inputs if t.index not in io)
            at_an_edge = op.name in ("QUANTIZE", "DEQUANTIZE") and any(t.index in io for t in outputs + inputs)
            if computes_in_float and not at_an_edge and op.name not in ("QUANTIZE", "DEQUANTIZE"):
                found.append((op.name, outputs[0].name if outputs else ""))
        return found

    @property
    def is_float_file(self):
        """True for a file with no quantized activations at all (float32, float16 or dynamic-range)."""
        produced = {i for op in self._graph.ops for i in op.outputs}
        quantized = ("int8", "uint8", "int16")
        return not any(t.index in produced and t.dtype in quantized for t in self._graph.tensors)

    @property
    def is_fully_integer(self):
        """True when every tensor between the inputs and the outputs is integer (int8/int16/int32...)."""
        return not self.float_tensors and self._graph.num_subgraphs == 1

    def output_step(self, i):
        """The quantization step of output `i`: its own scale, or for a float output computed by a
        DEQUANTIZE op, the scale of the integer tensor it dequantizes; `None` for a float computation."""
        q = self.output_quantization[i]
        if q is not None:
            return q[0]
        index = self._output_details[i]["index"]
        for op in self._graph.ops:
            if index in op.outputs and op.name == "DEQUANTIZE":
                scales = self._graph.tensors[op.inputs[0]].scales
                return float(scales[0]) if len(scales) == 1 else None
        return None

    def describe(self):
        """Everything `summary()` prints, as a dict."""
        counts = collections.Counter(self.ops)
        return {
            "path": self.path,
            "size_bytes": self.size_bytes,
            "kernels": self.kernels,
            "inputs": [_io_dict(n, d) for n, d in zip(self.input_names, self._input_details)],
            "outputs": [_io_dict(n, d) for n, d in zip(self.output_names, self._output_details)],
            "ops": self.ops,
            "op_counts": {name: counts[name] for name in dict.fromkeys(self.ops)},
            "tensors": [_tensor_dict(t) for t in self._graph.tensors],
            "is_fully_integer": self.is_fully_integer,
            "float_tensors": self.float_tensors,
            "num_subgraphs": self._graph.num_subgraphs,
        }

    def summary(self, print_fn=None, show_tensors=True):
        """Prints the ops, tensors, quantization and integer-ness of the file (like `keras.Model.summary`)."""
        print_fn = print_fn or print
        d = self.describe()
        lines = [f'TFLiteModel "{os.path.basename(self.path) if self.path else "<bytes>"}"  '
                 f"{d['size_bytes']:,} bytes ({d['size_bytes'] / 1024:.1f} KB), {len(d['ops'])} ops"]
        for title, rows in (("Inputs", d["inputs"]), ("Outputs", d["outputs"])):
            lines.append(f"{title}:")
            for r in rows:
                lines.append(f"  {r['name']:<24} {format_shape(r['shape']):<20} {r['dtype']:<8} {_qtext(r)}")
        lines.append("Ops (execution order of first use):")
        for name, count in d["op_counts"].items():
            lines.append(f"  {name:<32} x{count}")
        if show_tensors:
            lines.append("Tensors:")
            lines.append(f"  {'#':>4}  {'name':<48} {'shape':<20} {'dtype':<8} quantization")
            for t in d["tensors"]:
                name = t["name"] if len(t["name"]) <= 48 else "..." + t["name"][-45:]
                kind = " const" if t["is_constant"] else ""
                lines.append(f"  {t['index']:>4}  {name:<48} {format_shape(t['shape']):<20} {t['dtype']:<8} {_qtext(t)}{kind}")
        if d["is_fully_integer"]:
            io = sorted({r["dtype"] for r in d["inputs"] + d["outputs"]})
            lines.append(f"Fully integer: yes (every tensor between inputs and outputs is integer; I/O {'/'.join(io)})")
        else:
            bad = d["float_tensors"]
            shown = ", ".join(bad[:5]) + (f", ... ({len(bad)} in all)" if len(bad) > 5 else "")
            reason = f"{len(bad)} float tensors: {shown}" if bad else f"{d['num_subgraphs']} subgraphs"
            lines.append(f"Fully integer: NO ({reason})")
        print_fn("\n".join(lines))

    def __repr__(self):
        where = self.path or f"<{self.size_bytes} bytes>"
        return f"TFLiteModel({where!r}, kernels={self.kernels!r})"

    # ---- running -----------------------------------------------------------------------------------
    def predict(self, x, batch_size=256, *, raw=False):
        """Runs the model on `x` (an array, or a list of arrays in input order) in batches.

        Returns float outputs (dequantized), or with `raw=True` the outputs exactly as the interpreter
        produced them (e.g. int8). A list for multi-output models, a single array otherwise.
        """
        arrays = self._prepare(x)
        outputs = self._run(arrays, batch_size)
        if not raw:
            outputs = [dequantize(o, q) for o, q in zip(outputs, self.output_quantization)]
        return outputs if len(outputs) > 1 else outputs[0]

    def predict_raw(self, x, batch_size=256):
        """`predict(x, raw=True)`: the interpreter's outputs, not dequantized."""
        return self.predict(x, batch_size, raw=True)

    def evaluate(self, x, y, batch_size=256, output_index=0):
        """Top-1 accuracy of output `output_index` against `y` (int labels or one-hot)."""
        predictions = self.predict(x, batch_size)
        if isinstance(predictions, list):
            predictions = predictions[output_index]
        y = np.asarray(y)
        if y.ndim == predictions.ndim and y.shape[-1] == predictions.shape[-1] and y.shape[-1] > 1:
            y = y.argmax(-1)
        y = y.reshape(predictions.shape[:-1])
        return float(np.mean(predictions.argmax(-1) == y))

    def benchmark(self, x=None, runs=50, warmup=5):
        """Latency of single-sample invocations: `{"median_ms", "p90_ms", "mean_ms", ...}`.

        Uses the samples of `x` in turn, or random inputs if `x` is None.
        """
        if runs < 1:
            raise ValueError(f"runs must be at least 1; got {runs}.")
        if x is None:
            rng = np.random.default_rng(0)
            arrays = [_random_input(d, rng) for d in self._input_details]
        else:
            arrays = self._prepare(x)
        n, batch = arrays[0].shape[0], self._fixed_batch() or 1
        arrays = [np.concatenate([a] * -(-batch // n)) if n < batch else a for a in arrays]
        n = arrays[0].shape[0]
        self._resize([(batch,) + a.shape[1:] for a in arrays])
        times = []
        for i in range(warmup + runs):
            offset = (i * batch) % (n - batch + 1)
            for d, a in zip(self._input_details, arrays):
                self._interpreter.set_tensor(d["index"], np.ascontiguousarray(a[offset : offset + batch]))
            start = time.perf_counter()
            self._interpreter.invoke()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000.0)
        times = np.asarray(times)
        return {
            "median_ms": float(np.median(times)),
            "p90_ms": float(np.percentile(times, 90)),
            "mean_ms": float(times.mean()),
            "runs": runs,
            "warmup": warmup,
            "kernels": self.kernels,
            "num_threads": self.num_threads,
        }

    def _prepare(self, x):
        arrays = check_input_data(x, self.input_specs, "x", cast=False)
        prepared = []
        for a, d, q in zip(arrays, self._input_details, self.input_quantization):
            dtype = np.dtype(d["dtype"])
            if q is not None and a.dtype == dtype:
                prepared.append(a)  # already quantized
            elif q is not None:
                prepared.append(quantize(a, q[0], q[1], dtype))
            else:
                prepared.append(a.astype(dtype, copy=False))
        return prepared

    def _run(self, arrays, batch_size):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {batch_size}.")
        n = arrays[0].shape[0]
        fixed_batch = self._fixed_batch()
        step = fixed_batch or batch_size
        results = [[] for _ in self._output_details]
        for start in range(0, n, step):
            chunk = [a[start : start + step] for a in arrays]
            count = chunk[0].shape[0]
            if fixed_batch and count < fixed_batch:  # pad the last batch of a fixed-batch file
                chunk = [np.concatenate([c, np.zeros((fixed_batch - count,) + c.shape[1:], c.dtype)]) for c in chunk]
            self._resize([c.shape for c in chunk])
            for d, c in zip(self._input_details, chunk):
                self._interpreter.set_tensor(d["index"], np.ascontiguousarray(c))
            self._interpreter.invoke()
            for j, d in enumerate(self._output_details):
                results[j].append(self._interpreter.get_tensor(d["index"])[:count])
        return [np.concatenate(r) for r in results]

    def _fixed_batch(self):
        """The batch size of a file whose batch dimension is not dynamic (None for dynamic)."""
        signature = self._input_details[0]["shape_signature"] if self._input_details else []
        return int(signature[0]) if len(signature) and signature[0] > 0 else None

    def _resize(self, shapes):
        shapes = [tuple(int(s) for s in shape) for shape in shapes]
        if shapes == self._shapes:
            return
        for d, shape in zip(self._input_details, shapes):
            self._interpreter.resize_tensor_input(d["index"], list(shape), strict=True)
        self._interpreter.allocate_tensors()
        self._shapes = shapes


def quantize(x, scale, zero_point, dtype):
    """`clip(floor(x / scale + 0.5) + zero_point, qmin, qmax)` in float32, as an array of `dtype`.

    int16 is quantized as LiteRT's default QUANTIZE does it: `x` times the float32 reciprocal of the
    scale, in float32, rounded half to even (in float32, `x / scale + 0.5` is up to 0.004 of a
    16-bit step off)."""
    info = np.iinfo(dtype)
    if info.bits == 16:
        reciprocal = np.float32(1.0 / np.float64(np.float32(scale)))
        q = np.round(np.asarray(x, np.float32) * reciprocal).astype(np.float64) + zero_point
    else:
        q = np.floor(np.asarray(x, np.float32) / np.float32(scale) + np.float32(0.5)) + np.float32(zero_point)
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(q, quant):
    """`(q - zero_point) * scale` in float32 for `quant = (scale, zero_point)`; `q` itself for None."""
    if quant is None:
        return q
    scale, zero_point = quant
    return (q.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)


def _load_content(path_or_bytes):
    if isinstance(path_or_bytes, TFLiteModel):
        return path_or_bytes.path, path_or_bytes.content
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return None, bytes(path_or_bytes)
    if isinstance(path_or_bytes, (str, os.PathLike)):
        path = os.fspath(path_or_bytes)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No .tflite file at '{path}'" + (" (it is a directory)." if os.path.isdir(path) else "."))
        with open(path, "rb") as f:
            return path, f.read()
    raise TypeError(f"TFLiteModel expects a path to a .tflite file or its bytes; got a {type(path_or_bytes).__name__}.")


def _quant(detail):
    scale, zero_point = detail["quantization"]
    return (float(scale), int(zero_point)) if scale else None


def _is_float(dtype):
    return dtype.startswith(("float", "bfloat", "complex"))


def _io_dict(name, detail):
    params = detail["quantization_parameters"]
    return {
        "name": name,
        "index": int(detail["index"]),
        "shape": tuple(None if d < 0 else int(d) for d in detail["shape_signature"]),
        "dtype": np.dtype(detail["dtype"]).name,
        "scales": np.asarray(params["scales"]),
        "zero_points": np.asarray(params["zero_points"]),
        "quantized_dimension": int(params["quantized_dimension"]),
    }


def _tensor_dict(t):
    return {k: getattr(t, k) for k in TensorInfo._fields}


def _qtext(t):
    scales, zero_points = t["scales"], t["zero_points"]
    if len(scales) == 0:
        return "-"
    if len(scales) == 1:
        return f"scale={float(scales[0]):.6g} zp={int(zero_points[0])}"
    return f"per-channel: {len(scales)} scales on axis {t['quantized_dimension']}"


def _random_input(detail, rng):
    shape = (1,) + tuple(int(d) for d in detail["shape"][1:])
    dtype = np.dtype(detail["dtype"])
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        low, high = (max(info.min, -128), min(info.max, 127)) if detail["quantization"][0] else (0, 2)
        return rng.integers(low, high, size=shape, endpoint=True).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 1, size=shape, endpoint=True).astype(bool)
    return rng.random(shape).astype(dtype)
