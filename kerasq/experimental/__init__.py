"""tfmot's `experimental` names: `kerasq.experimental.combine` holds its collaborative-optimization schemes."""

from kerasq.quantization import combine

__all__ = ["combine"]
