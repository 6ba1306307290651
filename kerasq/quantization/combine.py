"""tfmot's collaborative-optimization schemes, for `quantize_apply`: QAT that keeps what pruning and
clustering made of the weights.

`tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme()` reads
`kerasq.experimental.combine.Default8BitPrunePreserveQuantizeScheme()` (also `kerasq.X`); each is
int8 QAT with `quantize_model`'s `preserve_sparsity` / `preserve_clusters`.

Example:
>>> import keras, numpy as np, kerasq
>>> model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8, name="dense")])
>>> _ = model.get_layer("dense").kernel.assign(np.where(np.arange(128).reshape(16, 8) % 2, 0.5, 0.0))
>>> qat = kerasq.quantize_apply(kerasq.quantize_annotate_model(model),
...                             kerasq.Default8BitPrunePreserveQuantizeScheme())
>>> qat.compile("adam", "mse")
>>> _ = qat.fit(np.random.rand(32, 16), np.random.rand(32, 8), epochs=2, verbose=0)
>>> int(np.sum(np.asarray(qat.get_layer("quant_dense").layer.kernel) == 0))
64
"""


class Default8BitQuantizeScheme:
    """tfmot's default 8-bit scheme: kerasq's "int8"."""

    preserve_sparsity = False
    preserve_clusters = False

    def __repr__(self):
        return f"{type(self).__name__}()"


class Default8BitPrunePreserveQuantizeScheme(Default8BitQuantizeScheme):
    """int8 QAT that keeps every zero of the (pruned) kernels: `quantize_model(preserve_sparsity=True)`."""

    preserve_sparsity = True


class Default8BitClusterPreserveQuantizeScheme(Default8BitQuantizeScheme):
    """int8 QAT that keeps clustered kernels on their clusters (`quantize_model(preserve_clusters=True)`);
    with `preserve_sparsity` (tfmot's argument) their zeros stay zero too, as kerasq always keeps them."""

    preserve_clusters = True

    def __init__(self, preserve_sparsity=True):
        self.preserve_sparsity = bool(preserve_sparsity)

    def __repr__(self):
        return f"{type(self).__name__}(preserve_sparsity={self.preserve_sparsity})"
