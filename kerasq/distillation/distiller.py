"""`Distiller`: knowledge distillation from a float teacher into any student (float, QAT, pruned).

Built on Keras' own `keras.distillation.Distiller`: it is that Distiller with one
`keras.distillation.LogitsDistillation` (soft targets: KL divergence between the temperature-scaled
softmaxes, scaled by T^2 as in Hinton et al., 2015) and, for `features`, one
`ProjectedFeatureDistillation` per layer pair. What it adds: the familiar `temperature`/`alpha`
arguments, checks that name the bad value and the fix, feature pairs between layers of different
widths (a learned projection), layer names seen through kerasq's wrappers (a QAT student's layers are
named as in its float model), and `.keras` files that restore all of it.

The loss is `alpha * hard + (1 - alpha) * (soft + feature_weight * sum(features))`, where `hard` is
the loss given to `compile` against the labels. `alpha=1` trains on the labels only (the teacher is
not even run), `alpha=0` on the teacher only. The teacher always runs in inference mode
(`training=False`): its BatchNorm uses and keeps its moving statistics, and its weights are not
trained. The Distiller holds a frozen copy of a Sequential or Functional teacher (Keras' Distiller
sets `teacher.trainable = False`, which would otherwise freeze your own model); a subclassed teacher
is used as it is, and is left untrainable.
"""

import keras

from kerasq.distillation.features import ProjectedFeatureDistillation, feature_shape, make_projection, resolve_layer_name


def _frozen_copy(teacher):
    """A copy of the teacher (same weights, nothing shared) for Keras' Distiller to freeze."""
    from kerasq import _keras_private
    from kerasq.graph import Rewrite

    if not (isinstance(teacher, keras.Sequential) or _keras_private.is_functional(teacher)):
        return teacher
    return Rewrite(teacher, inline=False).run()


@keras.saving.register_keras_serializable(package="kerasq")
class Distiller(keras.distillation.Distiller):
    """Trains `student` on labels and on `teacher`'s outputs (and chosen intermediate features).

    Args:
        teacher: a trained Keras model; it outputs logits (no softmax).
        student: the model to train: float, `kerasq.quantize_model(...)`, pruned, or both. Its output
            shape must match the teacher's. After `fit`, use `distiller.student`.
        temperature: softmax temperature of the soft targets, > 0 (typically 2 to 10).
        alpha: weight of the hard (label) loss, in [0, 1]; the distillation losses get `1 - alpha`.
        features: None, or `(teacher_layer, student_layer)` pairs (names) whose outputs are matched
            by mean squared error, through a learned projection when their widths differ.
        feature_weight: weight of each feature loss next to the soft loss.

    Example:
    >>> import keras, numpy as np, kerasq
    >>> teacher = keras.Sequential([keras.Input((8,)), keras.layers.Dense(32, activation="relu", name="t_hidden"),
    ...                             keras.layers.Dense(3)])
    >>> student = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, activation="relu", name="s_hidden"),
    ...                             keras.layers.Dense(3)])
    >>> distiller = kerasq.Distiller(teacher, student, temperature=4.0, alpha=0.3,
    ...                              features=[("t_hidden", "s_hidden")])
    >>> distiller.compile("adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    >>> _ = distiller.fit(np.random.rand(16, 8), np.random.randint(0, 3, 16), epochs=1, verbose=0)
    >>> distiller.student is student
    True
    """

    def __init__(self, teacher, student, temperature=3.0, alpha=0.1, features=None, feature_weight=1.0,
                 name="distiller", **kwargs):
        kwargs.pop("distillation_losses", None)
        kwargs.pop("distillation_loss_weights", None)
        kwargs.pop("student_loss_weight", None)
        _check_models(teacher, student)
        teacher = _frozen_copy(teacher)
        self.temperature = _check_temperature(temperature)
        self.alpha = _check_alpha(alpha)
        self.feature_weight = _check_feature_weight(feature_weight)
        self.features = _check_features(features)
        # A KLDivergence instance, not Keras' default "kl_divergence": keras.losses.get turns that string
        # into the bare function, which LogitsDistillation then applies to the scaled logits themselves
        # (no softmax, no T^2) -- checked on Keras 3.15.
        losses = [keras.distillation.LogitsDistillation(temperature=self.temperature, loss=keras.losses.KLDivergence())]
        projections = []
        for index, (teacher_name, student_name) in enumerate(self.features):
            teacher_layer = resolve_layer_name(teacher, teacher_name, "teacher")
            student_layer = resolve_layer_name(student, student_name, "student")
            projection = make_projection(
                feature_shape(teacher, teacher_layer), feature_shape(student, student_layer),
                teacher_layer, student_layer, name=f"projection_{index}_{student_name}",
            )
            projections.append(projection)
            losses.append(ProjectedFeatureDistillation(teacher_layer, student_layer, projection))
        super().__init__(
            teacher, student, distillation_losses=losses,
            distillation_loss_weights=[1.0] + [self.feature_weight] * len(self.features),
            student_loss_weight=self.alpha, name=name, **kwargs,
        )
        # Tracked here, so the optimizer trains them and .keras files save them.
        self.projections = [p for p in projections if p is not None]

    def get_compile_config(self):
        config = super().get_compile_config()
        if config is not None and getattr(self, "_student_loss_for_serialization", None) is not None:
            config = dict(config, loss=keras.saving.serialize_keras_object(self._student_loss_for_serialization))
        return config

    def compile_from_config(self, config):
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built and hasattr(self, "optimizer") and self.optimizer is not None:
            self.optimizer.build(self.trainable_variables)

    def get_config(self):
        return {
            "name": self.name,
            "teacher": keras.saving.serialize_keras_object(self.teacher),
            "student": keras.saving.serialize_keras_object(self.student),
            "temperature": self.temperature,
            "alpha": self.alpha,
            "features": [list(pair) for pair in self.features],
            "feature_weight": self.feature_weight,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["teacher"] = keras.saving.deserialize_keras_object(config["teacher"])
        config["student"] = keras.saving.deserialize_keras_object(config["student"])
        return cls(**config)


def _check_models(teacher, student):
    for role, model in (("teacher", teacher), ("student", student)):
        if not isinstance(model, keras.Model):
            raise TypeError(f"The {role} must be a keras.Model; got {type(model).__name__}.")
    t_out, s_out = getattr(teacher, "outputs", None), getattr(student, "outputs", None)
    if not t_out or not s_out:
        return
    t_shapes = [tuple(t.shape) for t in t_out]
    s_shapes = [tuple(s.shape) for s in s_out]
    compatible = len(t_shapes) == len(s_shapes) and all(
        len(t) == len(s) and all(a is None or b is None or a == b for a, b in zip(t, s))
        for t, s in zip(t_shapes, s_shapes)
    )
    if not compatible:
        raise ValueError(
            f"Teacher '{teacher.name}' outputs {_shapes(t_shapes)} but student '{student.name}' outputs "
            f"{_shapes(s_shapes)}: distillation compares them entry by entry (class by class), so they must "
            f"have the same shape. Give the student a head with the teacher's outputs (e.g. "
            f"keras.layers.Dense({t_shapes[0][-1]}) for logits), or distill another teacher."
        )


def _shapes(shapes):
    return shapes[0] if len(shapes) == 1 else shapes


def _check_temperature(temperature):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(
            f"temperature must be a number > 0 (1 keeps the teacher's softmax, 2 to 10 soften it); got "
            f"{temperature!r}."
        )
    return float(temperature)


def _check_alpha(alpha):
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(
            f"alpha is the weight of the label loss and must be in [0, 1] (0: teacher only, 1: labels only, "
            f"e.g. 0.1); got {alpha!r}."
        )
    return float(alpha)


def _check_feature_weight(weight):
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        raise ValueError(f"feature_weight must be a number >= 0; got {weight!r}.")
    return float(weight)


def _check_features(features):
    if features is None:
        return []
    if isinstance(features, dict):
        features = list(features.items())
    if isinstance(features, (list, tuple)) and len(features) == 2 and all(isinstance(n, str) for n in features):
        features = [features]
    pairs = []
    for pair in features:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(n, str) for n in pair)):
            raise ValueError(
                "features takes (teacher_layer_name, student_layer_name) pairs, e.g. "
                f"[('block2_relu', 'block2_relu')]; got {pair!r}."
            )
        pairs.append(tuple(pair))
    return pairs
