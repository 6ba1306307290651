"""Weight pruning by magnitude during training: tensorflow-model-optimization's pruning API for Keras 3.

`prune_low_magnitude` wraps layers (or every layer of a model) in `PruneLowMagnitude`, the
`UpdatePruningStep` callback drives the schedule in `fit`, and `strip_pruning` returns plain layers
with the zeros in their kernels, ready for `kerasq.export_tflite` or `kerasq.quantize_model`.
"""

from kerasq.pruning import masks
from kerasq.pruning.callbacks import PruningSummaries, UpdatePruningStep, apply_masks, pruning_layers, step
from kerasq.pruning.prune import prune_low_magnitude, prune_scope, strip_pruning
from kerasq.pruning.schedules import ConstantSparsity, PolynomialDecay, PruningSchedule
from kerasq.pruning.wrapper import PrunableLayer, PruneLowMagnitude, is_prunable
