"""Pruning schedules: at which training steps masks are recomputed, and to what sparsity.

The names and formulas are tensorflow-model-optimization's. A schedule is called with the pruning
step (an int, 0 at the first batch) and returns `(should_prune, sparsity)`; the pruning callback
evaluates it in Python, once per batch.

Example:
>>> from kerasq.pruning import PolynomialDecay
>>> schedule = PolynomialDecay(0.0, 0.8, begin_step=0, end_step=100, frequency=50)
>>> [schedule(step) for step in (0, 25, 50, 100, 150)]
[(True, 0.0), (False, 0.4625), (True, 0.7), (True, 0.8), (False, 0.8)]
"""

import keras


class PruningSchedule:
    """Base class of pruning schedules: subclass it and define `__call__` and `get_config`.

    `__call__(step) -> (should_prune, sparsity)`: whether masks are recomputed at `step`, and the
    fraction of each pruned weight to set to zero then. Register a subclass with
    `keras.saving.register_keras_serializable` so models that use it save and load.

    Example:
    >>> from kerasq.pruning import PruningSchedule
    >>> class EveryTenSteps(PruningSchedule):
    ...     def __init__(self, sparsity):
    ...         self.sparsity = sparsity
    ...     def __call__(self, step):
    ...         return step % 10 == 0, self.sparsity
    ...     def get_config(self):
    ...         return {"sparsity": self.sparsity}
    >>> EveryTenSteps(0.5)(20)
    (True, 0.5)
    """

    def __call__(self, step):
        raise NotImplementedError(f"{type(self).__name__} must define __call__(step) -> (should_prune, sparsity).")

    def get_config(self):
        raise NotImplementedError(f"{type(self).__name__} must define get_config() to be saved.")

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        settings = ", ".join(f"{key}={value!r}" for key, value in self.get_config().items())
        return f"{type(self).__name__}({settings})"


@keras.saving.register_keras_serializable(package="kerasq")
class ConstantSparsity(PruningSchedule):
    """Prunes to `target_sparsity` every `frequency` steps from `begin_step` to `end_step`.

    Args:
        target_sparsity: fraction of each weight to zero, in [0, 1).
        begin_step: the first step that prunes.
        end_step: the last step that may prune; -1 prunes until training ends.
        frequency: steps between mask updates.

    Example:
    >>> from kerasq.pruning import ConstantSparsity
    >>> schedule = ConstantSparsity(0.5, begin_step=10, frequency=5)
    >>> schedule(5), schedule(10), schedule(12), schedule(15)
    ((False, 0.5), (True, 0.5), (False, 0.5), (True, 0.5))
    """

    def __init__(self, target_sparsity, begin_step, end_step=-1, frequency=100):
        _check_sparsity("target_sparsity", target_sparsity)
        _check_steps(begin_step, end_step, frequency, end_may_be_open=True)
        self.target_sparsity = float(target_sparsity)
        self.begin_step, self.end_step, self.frequency = int(begin_step), int(end_step), int(frequency)

    def __call__(self, step):
        return _should_prune(step, self.begin_step, self.end_step, self.frequency), self.target_sparsity

    def get_config(self):
        return {
            "target_sparsity": self.target_sparsity,
            "begin_step": self.begin_step,
            "end_step": self.end_step,
            "frequency": self.frequency,
        }


@keras.saving.register_keras_serializable(package="kerasq")
class PolynomialDecay(PruningSchedule):
    """Sparsity rising from `initial_sparsity` to `final_sparsity` along a polynomial (Zhu & Gupta, 2017).

    `sparsity(step) = final + (initial - final) * (1 - p) ** power`, with `p` the fraction of
    `[begin_step, end_step]` done (clipped to [0, 1]): fast at first, gently at the end. Masks are
    recomputed every `frequency` steps from `begin_step` to `end_step`; make `end_step - begin_step`
    a multiple of `frequency` so the last update reaches `final_sparsity`.

    Example:
    >>> from kerasq.pruning import PolynomialDecay
    >>> schedule = PolynomialDecay(0.5, 0.9, begin_step=0, end_step=100, power=1, frequency=10)
    >>> schedule(50)
    (True, 0.7)
    """

    def __init__(self, initial_sparsity, final_sparsity, begin_step, end_step, power=3, frequency=100):
        _check_sparsity("initial_sparsity", initial_sparsity)
        _check_sparsity("final_sparsity", final_sparsity)
        _check_steps(begin_step, end_step, frequency, end_may_be_open=False)
        self.initial_sparsity, self.final_sparsity = float(initial_sparsity), float(final_sparsity)
        self.begin_step, self.end_step, self.frequency = int(begin_step), int(end_step), int(frequency)
        self.power = power

    def __call__(self, step):
        done = (step - self.begin_step) / (self.end_step - self.begin_step) if self.end_step > self.begin_step else 1.0
        done = min(1.0, max(0.0, float(done)))
        sparsity = self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - done) ** self.power
        return _should_prune(step, self.begin_step, self.end_step, self.frequency), round(sparsity, 7)

    def get_config(self):
        return {
            "initial_sparsity": self.initial_sparsity,
            "final_sparsity": self.final_sparsity,
            "begin_step": self.begin_step,
            "end_step": self.end_step,
            "power": self.power,
            "frequency": self.frequency,
        }


def _should_prune(step, begin_step, end_step, frequency):
    in_range = step >= begin_step and (end_step < 0 or step <= end_step)
    return bool(in_range and (step - begin_step) % frequency == 0)


def _check_sparsity(name, value):
    if not 0.0 <= value < 1.0:
        raise ValueError(
            f"{name} must be in [0, 1) (the fraction of weights set to zero); got {value!r}. "
            "Use e.g. 0.8 for 80% zeros."
        )


def _check_steps(begin_step, end_step, frequency, end_may_be_open):
    if begin_step < 0:
        raise ValueError(f"begin_step must be >= 0 (0 prunes from the first batch); got {begin_step!r}.")
    if end_may_be_open and end_step == -1:
        pass
    elif end_step < begin_step:
        open_end = " or -1 to prune until training ends" if end_may_be_open else ""
        raise ValueError(
            f"end_step ({end_step!r}) is before begin_step ({begin_step!r}): pass an end_step >= "
            f"begin_step{open_end}."
        )
    if frequency <= 0:
        raise ValueError(f"frequency must be a positive number of steps between mask updates; got {frequency!r}.")
