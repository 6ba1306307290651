"""Callbacks that steer quantization-aware training from `model.fit`.

- `DelayQuantization(steps)`: train in float for the first optimizer steps (ranges still tracked),
  then quantized: tfmot's `quant_delay`.
- `FreezeBatchNorm(at_epoch)`: from that epoch, folded BatchNorms normalize with their moving
  statistics and stop updating them, so the last epochs train the network that is deployed.
- `FreezeRanges(at_epoch)`: from that epoch, activation ranges stop moving (learned ones too), and
  so do learned weight steps.
- `QuantizationSummaries(log_dir)`: each range, the share of activations it clips and each kernel's
  quantization error, to TensorBoard.

They decide from the epoch or optimizer step they are at, so `fit(..., initial_epoch=...)` resuming
from a checkpoint puts each in the right phase.

Example:
>>> import keras, numpy as np, kerasq
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.BatchNormalization(),
...                           keras.layers.ReLU(), keras.layers.Dense(2)])
>>> qat = kerasq.quantize_model(model, kerasq.QuantizationScheme(freeze_batchnorm=False))
>>> qat.compile("adam", "mse")
>>> x, y = np.random.default_rng(0).normal(size=(64, 4)), np.zeros((64, 2))
>>> _ = qat.fit(x, y, epochs=3, verbose=0, callbacks=[
...     kerasq.DelayQuantization(steps=2), kerasq.FreezeBatchNorm(at_epoch=1), kerasq.FreezeRanges(at_epoch=2)])
>>> all(layer.batchnorm_frozen for layer in qat.layers if getattr(layer, "batchnorm", None) is not None)
True
"""

import os
import warnings

import keras
import numpy as np

from kerasq.quantization.layers import QuantizeWrapper, quantized_layers
from kerasq.quantization.quantizers import clipping_recorded
from kerasq.summaries import scalar_writer, write_scalar
from kerasq.training_state import retrace, sync_state_from_training


class _QuantizationCallback(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self._layers = quantized_layers(self.model)
        if not self._layers:
            raise ValueError(
                f"{type(self).__name__} steers quantization-aware training, and model '{self.model.name}' "
                "has no kerasq quantization layers: train kerasq.quantize_model(model) instead."
            )


def _check_epoch(at_epoch, owner):
    if not isinstance(at_epoch, (int, np.integer)) or at_epoch < 0:
        raise ValueError(f"{owner}: at_epoch must be an epoch index >= 0; got {at_epoch!r}.")
    return int(at_epoch)


class DelayQuantization(_QuantizationCallback):
    """Trains a QAT model in float for its first `steps` optimizer steps, then quantized.

    During the delay weights and activations pass unquantized while activation ranges keep
    following the data, so quantization starts from ranges that fit. Steps are counted by the
    optimizer (`optimizer.iterations`), so resumed training continues the count.

    Args:
        steps: optimizer steps to train in float, > 0.
    """

    def __init__(self, steps):
        super().__init__()
        if not isinstance(steps, (int, np.integer)) or steps <= 0:
            raise ValueError(f"DelayQuantization: steps must be a positive int; got {steps!r}.")
        self.steps = int(steps)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        sync_state_from_training(self.model)
        self._step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        self._set(self._step >= self.steps)

    def on_train_batch_begin(self, batch, logs=None):
        if self._step >= self.steps and not self._enabled:
            self._set(True)

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1

    def on_train_end(self, logs=None):
        self._set(True)  # evaluate/predict/export after fit see the quantized model

    def _set(self, enabled):
        if getattr(self, "_enabled", None) == enabled:
            return
        self._enabled = enabled
        for layer in self._layers:
            layer.quantization_enabled = enabled
        retrace(self.model)


class FreezeBatchNorm(_QuantizationCallback):
    """From epoch `at_epoch` on, folded BatchNorms use and keep their moving statistics.

    For QAT with `freeze_batchnorm=False` (batch statistics, as from scratch): freezing them for
    the last epochs trains the network that will be deployed. BatchNorms kerasq could not fold (no
    Conv/Dense before them) are ordinary Keras layers and keep training their statistics.

    Args:
        at_epoch: the first epoch (0-based) with frozen statistics.
    """

    def __init__(self, at_epoch):
        super().__init__()
        self.at_epoch = _check_epoch(at_epoch, "FreezeBatchNorm")

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._wrappers = [layer for layer in self._layers if getattr(layer, "batchnorm", None) is not None]
        if not self._wrappers:
            warnings.warn(
                f"FreezeBatchNorm: model '{self.model.name}' has no folded BatchNormalization; "
                "the callback does nothing.",
                stacklevel=2,
            )

    def on_epoch_begin(self, epoch, logs=None):
        if epoch >= self.at_epoch and not all(layer.batchnorm_frozen for layer in self._wrappers):
            for layer in self._wrappers:
                layer.batchnorm_frozen = True
            retrace(self.model)


class FreezeRanges(_QuantizationCallback):
    """From epoch `at_epoch` on, activation ranges stay where they are (learned ones too), and so
    do learned weight steps (`WeightQuantizer(learn_scale=True)`).

    The freeze is part of the model's state (each range's or step's `seen` counter turns negative),
    so it survives saving; `kerasq.calibrate_ranges` starts the ranges again. A frozen learned range
    or step gets no gradient; while this callback runs it also undoes what an optimizer's momentum
    would still move it by.

    Args:
        at_epoch: the first epoch (0-based) with fixed ranges.
    """

    def __init__(self, at_epoch):
        super().__init__()
        self.at_epoch = _check_epoch(at_epoch, "FreezeRanges")

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._learned = []  # (variable, frozen value) of learned ranges, pinned after every batch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch < self.at_epoch:
            return
        sync_state_from_training(self.model)
        for layer in self._layers:
            for _, quantizer, state in layer.range_states():
                seen = float(keras.ops.convert_to_numpy(state["seen"]))
                if quantizer.fixed_range is None and seen >= 0:
                    state["seen"].assign(-max(seen, 1.0))
                if quantizer.learn_range and not self._learned_includes(state["min"]):
                    self._learned += [(state[end], keras.ops.convert_to_numpy(state[end])) for end in ("min", "max")]
            for _, _, state in layer.weight_step_states():
                seen = float(keras.ops.convert_to_numpy(state["seen"]))
                if seen >= 0:  # one not started yet (0) starts frozen (-0.5), where it is first used
                    state["seen"].assign(-seen if seen > 0 else -0.5)
                if abs(seen) >= 1 and not self._learned_includes(state["log_step"]):  # started: pin it
                    self._learned.append((state["log_step"], keras.ops.convert_to_numpy(state["log_step"])))

    def on_train_batch_end(self, batch, logs=None):
        if self._learned:
            sync_state_from_training(self.model)
            for variable, value in self._learned:
                variable.assign(value)

    def _learned_includes(self, variable):
        return any(known is variable for known, _ in self._learned)


class QuantizationSummaries(_QuantizationCallback):
    """Writes each activation range, the share of activations it clips and each kernel's
    quantization error to TensorBoard (`log_dir/quantization`), at every epoch's end.

    Scalars, indexed by the optimizer step: `<layer>/<range>/min` and `/max`; `<layer>/<range>/clipped`
    (the fraction of values outside the range on `data`, when given); `<layer>/<kernel>/quantization_error`
    (the RMS of the weight rounding error relative to the RMS of the weights, as deployed: a folded
    BatchNorm's scale included).

    Args:
        log_dir: the TensorBoard log folder.
        data: a few inputs (as for `predict`, e.g. 256 samples) to measure clipping on, or None.
    """

    def __init__(self, log_dir, data=None):
        super().__init__()
        self.log_dir = os.fspath(log_dir)
        self.data = data
        self._writer = None

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self._writer is None:
            self._writer = scalar_writer(os.path.join(self.log_dir, "quantization"))

    def on_epoch_end(self, epoch, logs=None):
        sync_state_from_training(self.model)
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        clipped = self._clipping() if self.data is not None else {}
        with self._writer.as_default():
            for layer in self._layers:
                for name, quantizer, state in layer.range_states():
                    low, high = quantizer.range(state)
                    write_scalar(f"{layer.name}/{name}/min", float(low), step)
                    write_scalar(f"{layer.name}/{name}/max", float(high), step)
                    if id(state["min"]) in clipped:
                        write_scalar(f"{layer.name}/{name}/clipped", clipped[id(state["min"])], step)
                if isinstance(layer, QuantizeWrapper):
                    for kernel, error in layer.weight_quantization_error().items():
                        write_scalar(f"{layer.name}/{kernel}/quantization_error", error, step)
        self._writer.flush()

    def _clipping(self):
        # An eager call: the quantizers record as they run (a compiled predict would record once,
        # while tracing).
        with clipping_recorded() as clipped:
            self.model(self.data, training=False)
        return clipped
