"""Knowledge distillation on Keras' `keras.distillation`: `Distiller` (teacher, student, temperature,
alpha, feature pairs of different widths), for float, QAT (int8) and pruned students."""

from kerasq.distillation.distiller import Distiller
from kerasq.distillation.features import ProjectedFeatureDistillation
