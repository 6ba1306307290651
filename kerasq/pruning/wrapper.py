"""`PruneLowMagnitude`: a layer whose kernels are multiplied by 0/1 masks that follow a schedule.

The wrapper keeps one mask variable per pruned weight and a `pruning_step` variable, all part of the
model's state (checkpoints and `.keras` files carry them). `UpdatePruningStep` (or
`kerasq.pruning.step` in a custom loop) advances the step before each batch and, when the schedule
says so, recomputes the masks. Which weights are pruned comes from the layer's facts
(`kerasq.graph.layer_facts`: its kernels), or from `get_prunable_weights()` for a `PrunableLayer`.

Example:
>>> import keras, numpy as np
>>> from kerasq.pruning import ConstantSparsity, PruneLowMagnitude
>>> layer = PruneLowMagnitude(keras.layers.Dense(8), ConstantSparsity(0.75, begin_step=0))
>>> _ = layer(np.ones((1, 16), "float32"))
>>> layer.advance_step()  # step 0: the schedule prunes
>>> float(np.mean(np.asarray(layer.layer.kernel) == 0))
0.75
"""

import keras
import numpy as np

from kerasq import _keras_private
from kerasq.graph import layer_facts, wrappers
from kerasq.graph.variables import replaced_variables
from kerasq.pruning import masks as masks_lib
from kerasq.pruning.schedules import ConstantSparsity, PruningSchedule

POOLING_TYPES = ("AVG", "MAX")

NOT_ADVANCED = (
    "PruneLowMagnitude layer '{name}' was called in training mode, but its pruning step was never "
    "advanced, so it would train without pruning. Pass kerasq.UpdatePruningStep() in fit's callbacks "
    "(model.fit(..., callbacks=[kerasq.UpdatePruningStep()])), or call kerasq.pruning.step(model) "
    "before each batch of a custom training loop."
)


class PrunableLayer:
    """Mixin for a custom layer that says which of its weights to prune.

    Example:
    >>> import keras
    >>> from kerasq.pruning import PrunableLayer
    >>> class Scaled(keras.layers.Dense, PrunableLayer):
    ...     def get_prunable_weights(self):
    ...         return [self.kernel]
    >>> layer = Scaled(4)
    >>> layer.build((None, 3))
    >>> [w.name for w in layer.get_prunable_weights()]
    ['kernel']
    """

    def get_prunable_weights(self):
        """The variables of this layer to prune (a list); called once the layer is built."""
        raise NotImplementedError(f"{type(self).__name__} must define get_prunable_weights().")


def is_prunable(layer):
    """True if `layer` is a `PrunableLayer` or its facts name kernels (Dense, Conv, Embedding...)."""
    if isinstance(layer, PrunableLayer):
        return True
    facts = layer_facts(layer)
    return facts is not None and bool(facts.kernels)


@keras.saving.register_keras_serializable(package="kerasq")
class PruneLowMagnitude(keras.layers.Wrapper):
    """Prunes the kernels of `layer` to the sparsity its schedule asks for, by magnitude.

    Args:
        layer: a layer with kernels (Dense, Conv*, Conv*Transpose, DepthwiseConv*, SeparableConv*
            (both kernels), Embedding, or any layer described by `kerasq.graph.register_layer_facts`),
            or a `PrunableLayer`.
        pruning_schedule: a `PruningSchedule`; by default `ConstantSparsity(0.5, 0)`.
        block_size: `(rows, cols)` blocks over each kernel's last two axes, pruned whole.
        block_pooling_type: how a block is scored from its |w|: "AVG" or "MAX".
        sparsity_m_by_n: `(m, n)` to keep at most `m` non-zero weights in every `n` consecutive ones
            along the input-channel axis (2:4 for sparse tensor cores); the schedule then says only
            when masks are recomputed, not to what sparsity.
        regrow: recompute each mask from the dense weights at every pruning step, so a pruned weight
            can come back. The dense weights keep training: the masked kernel's gradient reaches
            them unmasked (a straight-through estimator, as in Lin et al., 2020). Without it a
            pruned weight is zero and stays zero.
    """

    def __init__(
        self,
        layer,
        pruning_schedule=None,
        block_size=(1, 1),
        block_pooling_type="AVG",
        sparsity_m_by_n=None,
        regrow=False,
        **kwargs,
    ):
        super().__init__(layer, **kwargs)
        if isinstance(pruning_schedule, dict):
            pruning_schedule = keras.saving.deserialize_keras_object(pruning_schedule)
        self.pruning_schedule = _check_schedule(pruning_schedule if pruning_schedule is not None else ConstantSparsity(0.5, 0))
        self.block_size = _check_block_size(block_size)
        self.block_pooling_type = _check_pooling(block_pooling_type)
        self.sparsity_m_by_n = _check_m_by_n(sparsity_m_by_n, self.block_size)
        self.regrow = bool(regrow)
        if not is_prunable(layer):
            raise ValueError(
                f"Layer '{layer.name}' ({type(layer).__name__}) has no weight to prune: kerasq prunes "
                "kernels (Dense, Conv*, DepthwiseConv*, SeparableConv*, Embedding). Leave it unwrapped "
                "(prune_low_magnitude(model, skip=[...]) leaves layers out), describe its kernels with "
                "kerasq.graph.register_layer_facts, or make it a kerasq.pruning.PrunableLayer."
            )
        # Not a plain attribute: Keras would track the layer's variables as the wrapper's own too.
        object.__setattr__(self, "_pruned", ())
        if self.sparsity_m_by_n is not None:
            self._m_by_n_axes()  # fails now, not at the first pruning step, on a layer without one
        self.supports_masking = getattr(layer, "supports_masking", False)

    # ---- building --------------------------------------------------------------------------------
    def build(self, input_shape=None):
        super().build(input_shape)
        pruned = []
        for name, variable in self.prunable_weights():
            mask = self.add_weight(
                name=f"{name.replace('/', '_')}_mask",
                shape=variable.shape,
                initializer="ones",
                trainable=False,
                aggregation="only_first_replica",
            )
            pruned.append((name, variable, mask))
        object.__setattr__(self, "_pruned", tuple(pruned))
        _keras_private.track_for_tf_checkpoints(self, [mask for _, _, mask in pruned])
        self.pruning_step = self.add_weight(
            name="pruning_step",
            shape=(),
            dtype="int32",
            initializer=keras.initializers.Constant(-1),
            trainable=False,
            aggregation="only_first_replica",
        )

    def prunable_weights(self):
        """`[(name, variable)]` of the weights this wrapper prunes; `name` is how the layer calls it."""
        layer = self.layer
        if isinstance(layer, PrunableLayer):
            return [(_attribute_name(layer, v), v) for v in layer.get_prunable_weights()]
        return [(name, getattr(layer, name)) for name in layer_facts(layer).kernels]

    @property
    def masks(self):
        """`{weight name: mask variable}` (empty until the wrapper is built)."""
        return {name: mask for name, _, mask in self._pruned}

    # ---- the forward pass ------------------------------------------------------------------------
    def call(self, inputs, *args, training=None, **kwargs):
        if training:
            # A graph assertion, not a Python check: it fails at the first batch, and `fit` can be
            # run again (with the callback) afterwards.
            _assert_advanced(self.pruning_step, NOT_ADVANCED.format(name=self.name))
        mapping = [(variable, self._masked(variable, mask)) for _, variable, mask in self._pruned]
        with replaced_variables(self.layer, mapping):
            return self.layer(inputs, *args, training=training, **kwargs)

    def _masked(self, variable, mask):
        value = keras.ops.convert_to_tensor(variable)
        mask = keras.ops.cast(mask, value.dtype)
        if self.regrow:
            return value + keras.ops.stop_gradient(value * mask - value)
        return value * mask

    def compute_output_shape(self, input_shape, *args, **kwargs):
        return self.layer.compute_output_shape(input_shape, *args, **kwargs)

    def compute_output_spec(self, *args, **kwargs):
        return self.layer.compute_output_spec(*args, **kwargs)

    # ---- the schedule (eager: called by the callback between batches) -----------------------------
    def advance_step(self):
        """Advances `pruning_step` by one; recomputes the masks when the schedule says to prune."""
        step = int(keras.ops.convert_to_numpy(self.pruning_step)) + 1
        self.pruning_step.assign(step)
        should_prune, target = self.pruning_schedule(step)
        if bool(should_prune):
            self.update_masks(float(target))

    def update_masks(self, sparsity):
        """Recomputes every mask for `sparsity` (ignored for m:n) and zeroes the pruned weights."""
        for (name, variable, mask), axis in zip(self._pruned, self._m_by_n_axes()):
            values = keras.ops.convert_to_numpy(variable)
            if not self.regrow:
                values = values * keras.ops.convert_to_numpy(mask)
            if self.sparsity_m_by_n is not None:
                new_mask = masks_lib.m_by_n_mask(values, *self.sparsity_m_by_n, axis=axis)
            else:
                new_mask = masks_lib.magnitude_mask(values, sparsity, self.block_size, self.block_pooling_type)
            mask.assign(new_mask)
            if not self.regrow:
                variable.assign(values * new_mask)

    def apply_masks(self):
        """Writes the zeros into the weights (the optimizer's momentum may have moved pruned ones;
        they never reach the output, but `get_weights` then shows them). No-op with `regrow`."""
        if self.regrow:
            return
        for _, variable, mask in self._pruned:
            variable.assign(keras.ops.convert_to_numpy(variable) * keras.ops.convert_to_numpy(mask))

    def sparsity(self):
        """The fraction of zeros over the masks of all pruned weights."""
        sizes = [int(np.prod(mask.shape)) for _, _, mask in self._pruned]
        zeros = [masks_lib.sparsity(keras.ops.convert_to_numpy(mask)) * size for (_, _, mask), size in zip(self._pruned, sizes)]
        return float(sum(zeros) / sum(sizes)) if sizes and sum(sizes) else 0.0

    def _m_by_n_axes(self):
        """The input-channel axis of each pruned weight (where m:n groups run), None without m:n."""
        names = [name for name, _, _ in self._pruned] if self._pruned else None
        if self.sparsity_m_by_n is None:
            return [None] * len(self._pruned)
        layer = self.layer
        if isinstance(layer, PrunableLayer):
            # Custom weights: rank-2 weights are (in, out) like Dense, others (..., in, out) like Conv.
            return [0 if len(v.shape) == 2 else -2 for _, v, _ in self._pruned]
        kernels = layer_facts(layer).kernels
        missing = [name for name, kernel in kernels.items() if kernel.in_axis is None]
        if missing:
            raise ValueError(
                f"sparsity_m_by_n needs an input-channel axis, and '{layer.name}' "
                f"({type(layer).__name__}) weight {missing[0]!r} has none. Prune it without "
                "sparsity_m_by_n (unstructured or block sparsity), or skip it."
            )
        return [kernels[name].in_axis for name in names] if names is not None else []

    # ---- saving ----------------------------------------------------------------------------------
    def get_config(self):
        return {
            **super().get_config(),
            "pruning_schedule": keras.saving.serialize_keras_object(self.pruning_schedule),
            "block_size": list(self.block_size),
            "block_pooling_type": self.block_pooling_type,
            "sparsity_m_by_n": list(self.sparsity_m_by_n) if self.sparsity_m_by_n else None,
            "regrow": self.regrow,
        }


def strip_prune_low_magnitude(wrapper, rewrite, **clone_options):
    """The engine's strip for `PruneLowMagnitude`: a plain copy of the layer with the masks baked in."""
    clone = wrappers.strip(wrapper.layer, rewrite, **clone_options)
    for name, variable, mask in wrapper._pruned:
        rewrite.weights.assign(
            clone, name, lambda variable=variable, mask=mask: keras.ops.convert_to_numpy(variable) * keras.ops.convert_to_numpy(mask)
        )
    return clone


wrappers.register_wrapper(PruneLowMagnitude, strip_prune_low_magnitude)


def _assert_advanced(step, message):
    """Fails the running step when `step` is still negative, on whichever backend runs it."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tf.debugging.assert_greater_equal(step, tf.constant(0, step.dtype), message=message)
    elif backend == "jax":
        import jax

        def check(value):
            if value < 0:
                raise RuntimeError(message)

        jax.debug.callback(check, keras.ops.convert_to_tensor(step))
    elif int(keras.ops.convert_to_numpy(step)) < 0:  # eager backends (PyTorch)
        raise RuntimeError(message)


def _attribute_name(layer, variable):
    """The attribute holding `variable` (e.g. 'kernel'), else its path inside the layer."""
    for attribute, value in vars(layer).items():
        if value is variable:
            return attribute
    return variable.path.split("/")[-1]


def _check_schedule(schedule):
    if not isinstance(schedule, PruningSchedule):
        raise TypeError(
            f"pruning_schedule must be a kerasq.pruning.PruningSchedule (ConstantSparsity, "
            f"PolynomialDecay or your subclass); got {schedule!r}."
        )
    return schedule


def _check_block_size(block_size):
    block = tuple(block_size) if isinstance(block_size, (list, tuple)) else None
    if block is None or len(block) != 2 or not all(isinstance(v, (int, np.integer)) and v >= 1 for v in block):
        raise ValueError(f"block_size must be two positive ints (rows, cols), e.g. (1, 4); got {block_size!r}.")
    return tuple(int(v) for v in block)


def _check_pooling(pooling):
    if pooling not in POOLING_TYPES:
        raise ValueError(f"block_pooling_type must be 'AVG' or 'MAX'; got {pooling!r}.")
    return pooling


def _check_m_by_n(m_by_n, block_size):
    if m_by_n is None:
        return None
    pair = tuple(m_by_n) if isinstance(m_by_n, (list, tuple)) else None
    if pair is None or len(pair) != 2 or not all(isinstance(v, (int, np.integer)) for v in pair):
        raise ValueError(f"sparsity_m_by_n must be a pair of ints (m, n), e.g. (2, 4); got {m_by_n!r}.")
    m, n = (int(v) for v in pair)
    if not 0 < m < n:
        raise ValueError(
            f"sparsity_m_by_n=({m}, {n}) keeps {m} of every {n} weights: m must be at least 1 and smaller "
            "than n, e.g. (2, 4) for 2:4 sparsity."
        )
    if block_size != (1, 1):
        raise ValueError(
            f"sparsity_m_by_n and block_size={block_size} cannot be combined: use one or the other."
        )
    return (m, n)
