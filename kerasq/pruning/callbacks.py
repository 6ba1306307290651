"""Callbacks that drive pruning in `fit`, and the same steps for a custom training loop.

`UpdatePruningStep` advances every `PruneLowMagnitude` layer's step before each batch (recomputing
masks when its schedule says so); `PruningSummaries` writes each layer's sparsity and its schedule's
target to TensorBoard.

A custom training loop does what the callback does: `kerasq.pruning.step(model)` before each batch,
and `kerasq.pruning.apply_masks(model)` at the end so the weights hold their zeros.

Example:
>>> import keras, numpy as np
>>> import kerasq
>>> model = kerasq.prune_low_magnitude(
...     keras.Sequential([keras.Input((16,)), keras.layers.Dense(32), keras.layers.Dense(4)]),
...     pruning_schedule=kerasq.ConstantSparsity(0.5, begin_step=0, frequency=1))
>>> model.compile("sgd", "mse")
>>> x, y = np.ones((8, 16), "float32"), np.zeros((8, 4), "float32")
>>> _ = model.fit(x, y, epochs=1, verbose=0, callbacks=[kerasq.UpdatePruningStep()])
>>> [round(layer.sparsity(), 2) for layer in kerasq.pruning.pruning_layers(model)]
[0.5, 0.5]
>>> optimizer = keras.optimizers.SGD()
>>> for batch in range(3):  # a custom loop: one step(model) per batch
...     kerasq.pruning.step(model)
...     with __import__("tensorflow").GradientTape() as tape:
...         loss = keras.ops.mean((model(x, training=True) - y) ** 2)
...     grads = tape.gradient(loss, model.trainable_variables)
...     optimizer.apply(grads, model.trainable_variables)
>>> kerasq.pruning.apply_masks(model)
"""

import os

import keras

from kerasq.graph import all_layers
from kerasq.pruning.wrapper import PruneLowMagnitude
from kerasq.summaries import scalar_writer, write_scalar
from kerasq.training_state import sync_state_from_training


def pruning_layers(model):
    """The `PruneLowMagnitude` layers of `model`, nested models included, each once."""
    return [layer for layer in all_layers(model) if isinstance(layer, PruneLowMagnitude)]


def step(model):
    """Advances the pruning step of every `PruneLowMagnitude` layer of `model`, recomputing masks
    where a schedule says so. Call it before each training batch of a custom loop (eagerly, outside
    any `tf.function`), as `UpdatePruningStep` does in `fit`."""
    for layer in pruning_layers(model):
        if layer.built:
            layer.advance_step()


def apply_masks(model):
    """Writes every mask's zeros into its weights (what `UpdatePruningStep` does after each epoch)."""
    for layer in pruning_layers(model):
        if layer.built:
            layer.apply_masks()


class UpdatePruningStep(keras.callbacks.Callback):
    """Advances the pruning step before each batch and applies the masks after each epoch.

    Required by `fit` for a model with `PruneLowMagnitude` layers: without it their training-mode
    call raises an error instead of silently training without pruning.
    """

    def on_train_begin(self, logs=None):
        self._layers = pruning_layers(self.model)

    def on_train_batch_begin(self, batch, logs=None):
        sync_state_from_training(self.model)
        for layer in self._layers:
            if layer.built:
                layer.advance_step()

    def on_epoch_end(self, epoch, logs=None):
        for layer in self._layers:
            if layer.built:
                layer.apply_masks()


class PruningSummaries(keras.callbacks.Callback):
    """Writes each pruned layer's sparsity and its schedule's target sparsity to TensorBoard.

    Scalars `<layer>/sparsity` and `<layer>/target_sparsity` go to `log_dir/pruning`, at each
    epoch's end (or every `update_freq` batches), indexed by the layer's pruning step. Use it with
    `UpdatePruningStep` (and `keras.callbacks.TensorBoard(log_dir)` for the losses). Writing needs
    only TensorFlow; viewing needs `pip install tensorboard`.

    Args:
        log_dir: the TensorBoard log folder.
        update_freq: "epoch", or a number of batches between writes.
    """

    def __init__(self, log_dir, update_freq="epoch"):
        super().__init__()
        if update_freq != "epoch" and not (isinstance(update_freq, int) and update_freq > 0):
            raise ValueError(f"update_freq must be 'epoch' or a positive number of batches; got {update_freq!r}.")
        self.log_dir = os.fspath(log_dir)
        self.update_freq = update_freq
        self._writer = None

    def on_train_begin(self, logs=None):
        self._layers = pruning_layers(self.model)
        if self._writer is None:
            self._writer = scalar_writer(os.path.join(self.log_dir, "pruning"))

    def on_train_batch_end(self, batch, logs=None):
        if self.update_freq != "epoch" and (batch + 1) % self.update_freq == 0:
            self._write()

    def on_epoch_end(self, epoch, logs=None):
        if self.update_freq == "epoch":
            self._write()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()

    def _write(self):
        sync_state_from_training(self.model)
        with self._writer.as_default():
            for layer in self._layers:
                if not layer.built:
                    continue
                step_value = int(keras.ops.convert_to_numpy(layer.pruning_step))
                _, target = layer.pruning_schedule(max(step_value, 0))
                if layer.sparsity_m_by_n is not None:
                    m, n = layer.sparsity_m_by_n
                    target = 1.0 - m / n
                write_scalar(f"{layer.name}/sparsity", layer.sparsity(), step_value)
                write_scalar(f"{layer.name}/target_sparsity", float(target), step_value)
        self._writer.flush()
