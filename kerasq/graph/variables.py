"""Running a layer's own `call` with some of its variables replaced by computed values.

Features that change weights on the fly (pruning's masks, clustering's shared values, quantized
kernels of a layer known only by its facts) run the wrapped layer unchanged, with its variables read
as other tensors. `keras.StatelessScope` does that, but a scope opened inside Keras's own stateless
training step (the JAX backend) hides that step's values of every variable it does not list: so
every variable of the layer is listed, each read as it currently is unless replaced.

Example:
>>> import keras, numpy as np
>>> from kerasq.graph.variables import replaced_variables
>>> dense = keras.layers.Dense(2, use_bias=False, kernel_initializer="ones")
>>> dense.build((None, 3))
>>> with replaced_variables(dense, [(dense.kernel, 2 * keras.ops.convert_to_tensor(dense.kernel))]):
...     outputs = dense.call(np.ones((1, 3), "float32"))
>>> np.asarray(outputs).tolist()
[[6.0, 6.0]]
"""

import keras


def replaced_variables(layer, replacements):
    """A `keras.StatelessScope` in which `layer`'s variables read as `replacements` (a list of
    `(variable, tensor)` pairs) where given, and as their current values otherwise."""
    by_id = {id(variable): value for variable, value in replacements}
    mapping = [
        (variable, by_id[id(variable)] if id(variable) in by_id else keras.ops.convert_to_tensor(variable))
        for variable in layer.variables
    ]
    return keras.StatelessScope(state_mapping=mapping, initialize_variables=False)
