"""Weight constraints kerasq sets so that training keeps a structure another feature made.

`KeepZeros` keeps the zeros of a pruned kernel at zero: the optimizer applies it after every update,
so quantization-aware training (or any fine-tuning) cannot grow the pruned weights back.

Example:
>>> import numpy as np
>>> from kerasq.constraints import KeepZeros
>>> kernel = np.array([[0.0, 1.5], [2.0, 0.0]], "float32")
>>> keep = KeepZeros(kernel != 0)
>>> np.asarray(keep(kernel + 0.25)).tolist()
[[0.0, 1.75], [2.25, 0.0]]
"""

import base64

import keras
import numpy as np


@keras.saving.register_keras_serializable(package="kerasq")
class KeepZeros(keras.constraints.Constraint):
    """Multiplies a weight by a fixed 0/1 mask after each update (then applies `inner`, if any)."""

    def __init__(self, mask, inner=None):
        if isinstance(mask, dict):  # from get_config: bits packed as base64
            bits = np.frombuffer(base64.b64decode(mask["bits"]), dtype=np.uint8)
            mask = np.unpackbits(bits)[: int(np.prod(mask["shape"]))].reshape(mask["shape"])
        self.mask = np.asarray(mask, dtype=bool)
        self.inner = keras.constraints.get(inner) if isinstance(inner, (dict, str)) else inner

    def __call__(self, weight):
        kept = weight * keras.ops.cast(self.mask, weight.dtype)
        return self.inner(kept) if self.inner is not None else kept

    @property
    def sparsity(self):
        return 1.0 - float(self.mask.mean())

    def get_config(self):
        packed = base64.b64encode(np.packbits(self.mask.reshape(-1)).tobytes()).decode("ascii")
        inner = keras.constraints.serialize(self.inner) if self.inner is not None else None
        return {"mask": {"shape": list(self.mask.shape), "bits": packed}, "inner": inner}
