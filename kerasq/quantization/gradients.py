"""Gradient quantization: an optimizer wrapper that rounds each gradient to a few bits before it is used.

`QuantizedGradients(optimizer, bits=8)` quantizes every gradient tensor symmetrically, with one scale
per tensor (its largest magnitude maps to the largest level), then hands the result to the optimizer
it wraps. Stochastic rounding (the default) keeps the quantized gradient unbiased, E[q(g)] = g, which
is what lets SGD-type training converge at low bit widths; round-to-nearest is the alternative.

This measures what low-precision gradients (as a compressed all-reduce would send them) do to
accuracy. The gradients stay float tensors: nothing is sent in fewer bytes.
"""

import copy

import keras
from keras import ops

MIN_BITS = 2
MAX_BITS = 16
_NARROW_FLOATS = ("float16", "bfloat16")  # too few mantissa bits for 16-bit levels: quantize in float32


def check_bits(bits):
    """Returns `bits` if it is an integer from 2 to 16, else raises a ValueError that says so."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"bits must be an integer from {MIN_BITS} to {MAX_BITS}; got {bits!r}. "
            "For float gradients, use the wrapped optimizer on its own."
        )
    return bits


def quantize_gradient(gradient, bits, noise=None):
    """`gradient` rounded to `2**bits - 1` symmetric levels, one scale per tensor.

    scale = max|gradient| / (2**(bits - 1) - 1); each value becomes an integer number of scales. With
    `noise` (uniform in [0, 1), the gradient's shape) the rounding is stochastic: x = gradient / scale
    goes up to ceil(x) with probability x - floor(x), so the result is unbiased; without it, to the
    nearest level. An all-zero gradient stays zero.

    Example:
    >>> import numpy as np
    >>> from kerasq.quantization.gradients import quantize_gradient
    >>> np.asarray(quantize_gradient(np.array([0.1, -0.6, 1.0], "float32"), bits=2))  # levels -1, 0, 1
    array([ 0., -1.,  1.], dtype=float32)
    """
    check_bits(bits)
    gradient = ops.convert_to_tensor(gradient)
    dtype = keras.backend.standardize_dtype(gradient.dtype)
    compute_dtype = "float32" if dtype in _NARROW_FLOATS else dtype
    values = ops.cast(gradient, compute_dtype)
    largest_level = float(2 ** (bits - 1) - 1)
    scale = ops.max(ops.abs(values)) / largest_level
    scale = ops.where(scale > 0, scale, ops.ones_like(scale))  # a zero gradient: 0 / 1 = 0
    scaled = values / scale
    if noise is None:
        levels = ops.round(scaled)
    else:
        lower = ops.floor(scaled)
        # Comparing with the fractional part, rather than flooring scaled + noise, is exact at 16 bits
        # too, where adding noise to values near 32767 would round in float32.
        levels = ops.where(ops.cast(noise, compute_dtype) < scaled - lower, lower + 1, lower)
    levels = ops.clip(levels, -largest_level, largest_level)  # float error at the largest value
    return ops.cast(levels * scale, dtype)


def _replica_id():
    """This replica's index under a tf.distribute strategy; 0 outside one and on other backends."""
    if keras.backend.backend() != "tensorflow":
        return 0
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    return 0 if context is None else context.replica_id_in_sync_group


class _PerReplicaSeedGenerator(keras.random.SeedGenerator):
    """A SeedGenerator whose seeds differ across the replicas of a tf.distribute strategy.

    The state is mirrored, so every replica would otherwise draw the same noise and round alike: still
    unbiased, but the replicas' rounding errors would be correlated, and their sum noisier.
    """

    def next(self, ordered=True):
        seed = super().next(ordered)
        replica = _replica_id()
        if isinstance(replica, int) and replica == 0:
            return seed
        return seed + ops.cast(ops.stack([ops.convert_to_tensor(replica), ops.convert_to_tensor(0)]), seed.dtype)


@keras.saving.register_keras_serializable(package="kerasq")
class QuantizedGradients(keras.optimizers.Optimizer):
    """Wraps an optimizer so that it receives its gradients quantized to `bits` bits.

    Each gradient tensor is quantized on its own (symmetric, one scale per tensor, `2**bits - 1`
    levels; see `quantize_gradient`), with stochastic rounding by default, then the wrapped optimizer
    applies it as usual. Under a `tf.distribute` strategy each replica quantizes its own gradients
    before they are summed across replicas, with its own random stream.

    The learning rate (and its schedule), `iterations` and the optimizer state (e.g. Adam's moments)
    are the wrapped optimizer's; `.keras` files save and restore them, and the rounding seed's state.

    Args:
        optimizer: the `keras.optimizers.Optimizer` to wrap (or a name such as `"adam"`).
        bits: 2 to 16.
        stochastic_rounding: True rounds up or down at random, with probability the fractional part
            (unbiased); False rounds to the nearest level.
        seed: an int for reproducible rounding; None draws one.

    Example:
    >>> import keras, numpy as np, kerasq
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> optimizer = kerasq.QuantizedGradients(keras.optimizers.Adam(1e-2), bits=8, seed=0)
    >>> model.compile(optimizer, "mse")
    >>> history = model.fit(np.ones((32, 4)), np.zeros((32, 3)), epochs=2, verbose=0)
    >>> int(optimizer.iterations), optimizer.inner_optimizer.__class__.__name__
    (2, 'Adam')
    """

    def __init__(self, optimizer, bits=8, stochastic_rounding=True, seed=None, name=None, **kwargs):
        if kwargs:
            names = ", ".join(sorted(kwargs))
            raise ValueError(
                f"QuantizedGradients takes no {names}: set it on the optimizer it wraps, e.g. "
                f"QuantizedGradients(keras.optimizers.Adam(1e-3, {sorted(kwargs)[0]}=...), bits=8)."
            )
        if isinstance(optimizer, str):
            optimizer = keras.optimizers.get(optimizer)
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise TypeError(
                "QuantizedGradients wraps a keras.optimizers.Optimizer, e.g. "
                f"QuantizedGradients(keras.optimizers.Adam(1e-3)); got {optimizer!r}."
            )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None; got {seed!r}.")
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = optimizer
        self.bits = check_bits(bits)
        self.stochastic_rounding = bool(stochastic_rounding)
        self.seed = seed

    def build(self, var_list):
        with keras.name_scope(self.name, caller=self):
            self._rounding_seeds = _PerReplicaSeedGenerator(self.seed, name="rounding_seeds")
        # An attribute holding the seed state makes it one of this optimizer's variables: saved in
        # .keras files, and threaded through JAX's stateless training step.
        self._rounding_seed_state = self._rounding_seeds.state
        self.inner_optimizer.build(var_list)
        super().build(var_list)

    @property
    def variables(self):
        return super().variables + self.inner_optimizer.variables

    def _quantize_all(self, grads, trainable_variables):
        def quantize(gradient):
            noise = None
            if self.stochastic_rounding:
                noise = keras.random.uniform(ops.shape(gradient), dtype="float32", seed=self._rounding_seeds)
            return quantize_gradient(gradient, self.bits, noise)

        quantized = []
        for gradient, variable in zip(grads, trainable_variables):
            if gradient is None or getattr(variable, "overwrite_with_gradient", False):
                quantized.append(gradient)  # no gradient, or a value to assign (float8 scales), not a gradient
            elif _is_indexed_slices(gradient):
                import tensorflow as tf

                quantized.append(tf.IndexedSlices(quantize(gradient.values), gradient.indices, gradient.dense_shape))
            else:
                quantized.append(quantize(gradient))
        return quantized

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            if trainable_variables is None:
                raise ValueError(
                    "QuantizedGradients is not built yet: pass trainable_variables to apply(), or call "
                    "optimizer.build(model.trainable_variables) first."
                )
            trainable_variables = list(trainable_variables)
            self.build(trainable_variables)
        variables = self._trainable_variables if trainable_variables is None else list(trainable_variables)
        # Why quantizing here is quantizing each replica's gradient before the cross-replica sum: Keras's
        # TensorFlow trainer calls apply_gradients inside strategy.run, so under a tf.distribute strategy
        # this runs once per replica with that replica's own gradients. They are summed across replicas
        # only inside the wrapped optimizer's apply (TFOptimizer._backend_update_step all-reduces them,
        # then updates the mirrored variables in a merge call), after this line.
        _check_replica_context()
        self.inner_optimizer.apply(self._quantize_all(grads, variables), trainable_variables)

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        if not self.built:
            raise ValueError(
                "QuantizedGradients is not built yet: call optimizer.build(model.trainable_variables) "
                "before stateless_apply."
            )
        own_variables = super().variables
        own_values = list(optimizer_variables[: len(own_variables)])
        inner_values = list(optimizer_variables[len(own_variables) :])
        with keras.StatelessScope(state_mapping=list(zip(own_variables, own_values))) as scope:
            quantized = self._quantize_all(grads, self._trainable_variables)
        own_values = [scope.get_current_value(variable) for variable in own_variables]
        trainable_values, inner_values = self.inner_optimizer.stateless_apply(
            inner_values, quantized, trainable_variables
        )
        return trainable_values, own_values + inner_values

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self):
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "bits": self.bits,
            "stochastic_rounding": self.stochastic_rounding,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = copy.deepcopy(config)  # deserializing the wrapped optimizer edits its config in place
        config["optimizer"] = keras.saving.deserialize_keras_object(
            config["optimizer"], custom_objects=custom_objects
        )
        return cls(**config)


def _is_indexed_slices(gradient):
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return isinstance(gradient, tf.IndexedSlices)


def _check_replica_context():
    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    if tf.distribute.in_cross_replica_context():
        raise ValueError(
            "QuantizedGradients.apply() needs each replica's own gradients: call it inside "
            "strategy.run(...) (as model.fit does), not in the strategy's cross-replica context."
        )
