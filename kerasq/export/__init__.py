"""Export to .tflite and check the file against the Keras model.

Example:
>>> from kerasq.export import export_tflite, TFLiteModel, verify_tflite
>>> content = export_tflite(model, "model.tflite", representative_data=x_train)
>>> TFLiteModel(content).summary()
>>> print(verify_tflite(model, content, x_test))
"""

from kerasq.export.converter import ExportError, export_tflite
from kerasq.export.tflite_model import TFLiteModel
from kerasq.export.verify import OutputParity, ParityReport, verify_tflite

__all__ = ["ExportError", "OutputParity", "ParityReport", "TFLiteModel", "export_tflite", "verify_tflite"]
