"""What a callback needs to change a model in the middle of `fit`, on every backend.

- `sync_state_from_training(model)` before reading or writing variables: JAX's `fit` carries the
  model's state from batch to batch outside the variables; after a sync it reads them again, so what
  a callback writes reaches the next step.
- `retrace(model)` after changing a Python-level switch of a layer (a training phase): TensorFlow and
  JAX compiled the training step with the old value, so the step functions are rebuilt.
"""

import keras


def sync_state_from_training(model):
    """Brings the state JAX's `fit` carries between batches back into the model's variables. A no-op
    on the other backends, whose variables are the training state."""
    if keras.backend.backend() == "jax" and hasattr(model, "jax_state_sync"):
        model.jax_state_sync()


def retrace(model):
    """Rebuilds the model's compiled train, test and predict steps, so Python-level layer switches
    changed since they were traced take effect (costs one new trace)."""
    if getattr(model, "train_function", None) is not None:
        model.make_train_function(force=True)
    # Rebuilt on their next use.
    model.test_function = None
    model.predict_function = None
