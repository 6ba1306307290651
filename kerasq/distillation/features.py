"""`ProjectedFeatureDistillation`: Keras' `FeatureDistillation` between layers of different widths.

Keras' `FeatureDistillation` compares a teacher layer's output with a student layer's output of the
same shape. A small student's layers are narrower than the teacher's: here the student's features
pass through a learned linear projection (a bias-free `Dense` on the channel axis, the 1x1 "regressor"
of FitNets, Romero et al., 2015) to the teacher's width first. The projection trains with the student
and is thrown away afterwards: `distiller.student` does not hold it.

Example:
>>> import keras, numpy as np
>>> from kerasq.distillation import ProjectedFeatureDistillation
>>> loss = ProjectedFeatureDistillation("t", "s", projection=keras.layers.Dense(8, use_bias=False))
>>> float(loss.compute_loss(np.zeros((2, 8), "float32"), np.zeros((2, 4), "float32")))
0.0
"""

import keras
from keras.distillation import FeatureDistillation

from kerasq.graph import wrappers


class ProjectedFeatureDistillation(FeatureDistillation):
    """Mean squared error between teacher features and projected student features.

    Args:
        teacher_layer_name, student_layer_name: the layers whose outputs are compared.
        projection: a layer mapping student features to the teacher's width, or None when the
            widths agree.
        loss: as for `keras.distillation.FeatureDistillation` (default "mse").
    """

    def __init__(self, teacher_layer_name, student_layer_name, projection=None, loss="mse"):
        super().__init__(loss=loss, teacher_layer_name=teacher_layer_name, student_layer_name=student_layer_name)
        self.projection = projection

    def validate_outputs(self, teacher_outputs, student_outputs):
        if self.projection is not None:
            student_outputs = self.projection.compute_output_spec(student_outputs)
        super().validate_outputs(teacher_outputs, student_outputs)

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        if self.projection is not None:
            student_outputs = self.projection(student_outputs)
        return super().compute_loss(teacher_outputs, student_outputs, **kwargs)


def resolve_layer_name(model, name, role):
    """The name of `model`'s layer `name`, seen through feature wrappers: a quantized or pruned
    student's layers can be named as in the float model they came from."""
    names = [layer.name for layer in model.layers]
    if name in names:
        return name
    for layer in model.layers:
        if wrappers.unwrap(layer).name == name:
            return layer.name
    raise ValueError(
        f"The {role} model '{model.name}' has no layer named '{name}'. Its layers are {names}; name one of "
        "them in `features` (a quantized or pruned student's layers may also be named as in its float model)."
    )


def feature_shape(model, name):
    output = model.get_layer(name).output
    return tuple(output.shape)


def make_projection(teacher_shape, student_shape, teacher_name, student_name, name):
    """A bias-free Dense from the student's channels to the teacher's, or None when they agree."""
    if len(teacher_shape) != len(student_shape) or any(
        t is not None and s is not None and t != s for t, s in zip(teacher_shape[1:-1], student_shape[1:-1])
    ):
        raise ValueError(
            f"Teacher layer '{teacher_name}' outputs {teacher_shape} and student layer '{student_name}' outputs "
            f"{student_shape}: feature distillation projects the channels (last axis) only, so the other "
            "dimensions must agree. Pick layers at the same spatial resolution."
        )
    if teacher_shape[-1] == student_shape[-1]:
        return None
    projection = keras.layers.Dense(teacher_shape[-1], use_bias=False, name=name)
    projection.build(student_shape)
    return projection
