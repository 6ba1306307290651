"""Export to .tflite and check the file against the Keras model.

Example:
>>> import keras
>>> from kerasq.data import load_digits
>>> from kerasq.export import export_tflite, TFLiteModel, verify_tflite
>>> (x_train, _), (x_test, _) = load_digits()
>>> model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])
>>> content = export_tflite(model, representative_data=x_train)  # post-training int8, as bytes
>>> TFLiteModel(content).summary(show_tensors=False)
TFLiteModel "<bytes>" ...
Fully integer: yes (every tensor between inputs and outputs is integer; I/O int8)
>>> report = verify_tflite(model, content, x_test)  # a float model vs its int8 file: read the agreement
>>> report.float_reference, report.outputs[0].agreement > 0.9
(True, True)
"""

from kerasq.export.converter import export_tflite
from kerasq.export.errors import ExportError
from kerasq.export.hooks import ExportHook, register_export_hook
from kerasq.export.tflite_model import TFLiteModel
from kerasq.export.verify import OutputParity, ParityReport, verify_tflite

__all__ = [
    "ExportError",
    "ExportHook",
    "OutputParity",
    "ParityReport",
    "TFLiteModel",
    "export_tflite",
    "register_export_hook",
    "verify_tflite",
]
