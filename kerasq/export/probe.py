"""Checks, in a child process, that a LiteRT kernel path can load and run a file.

Some of LiteRT's kernel paths abort the whole process (a C++ check, SIGABRT) on files they cannot
handle instead of raising: the reference kernels do on an int8 MobileNetV2, while preparing its
tensors. A Python program cannot catch that, so before kerasq opens a file with the reference or
builtin kernels in its own process, a short-lived child process tries first.

Example:
>>> import keras
>>> from kerasq.export import export_tflite
>>> from kerasq.export.probe import kernel_path_failure
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
>>> kernel_path_failure(export_tflite(model), "reference") is None
True
"""

import hashlib
import os
import subprocess
import sys
import tempfile

_PROBE = """
import sys
import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType
resolver = {"reference": OpResolverType.BUILTIN_REF,
            "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}[sys.argv[2]]
interpreter = Interpreter(model_path=sys.argv[1], experimental_op_resolver_type=resolver)
for detail in interpreter.get_input_details():
    shape = [max(1, int(size)) for size in detail["shape_signature"]]
    interpreter.resize_tensor_input(detail["index"], shape)
interpreter.allocate_tensors()
for detail in interpreter.get_input_details():
    interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
interpreter.invoke()
"""
PROBE_TIMEOUT_S = 120


def kernel_path_failure(content, kernels):
    """None when the `kernels` path ("reference" or "builtin") loads and runs `content` in a child
    process; otherwise a short description of how it failed. Each file is tried once per process."""
    key = (hashlib.sha256(content).hexdigest(), kernels)
    if key not in _FAILURES:
        _FAILURES[key] = _try_in_child(content, kernels)
    return _FAILURES[key]


_FAILURES = {}  # (sha256 of the file, kernels) -> the probe's answer, for this process


def _try_in_child(content, kernels):
    with tempfile.TemporaryDirectory(prefix="kerasq-probe-") as folder:
        path = os.path.join(folder, "model.tflite")
        with open(path, "wb") as f:
            f.write(content)
        try:
            result = subprocess.run(
                [sys.executable, "-c", _PROBE, path, kernels],
                capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            return f"LiteRT's {kernels} kernels did not finish one inference in {PROBE_TIMEOUT_S} s"
    if result.returncode == 0:
        return None
    if result.returncode < 0 or result.returncode == 134:
        return f"LiteRT's {kernels} kernels abort the process on this file (signal {abs(result.returncode) if result.returncode < 0 else 6})"
    last = (result.stderr.strip().splitlines() or ["no message"])[-1]
    return f"LiteRT's {kernels} kernels cannot run this file: {last[:200]}"
