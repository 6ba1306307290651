"""tfmot's client code for custom quantization runs on kerasq with `tf_keras` -> `keras` and
`tfmot.quantization.keras.X` -> `kerasq.X`: the QuantizeConfig examples of tfmot's QAT comprehensive
guide train on the digits, export, and pass verify_tflite."""

import keras
import numpy as np
import pytest

import kerasq

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

# ---- tfmot's guide, translated mechanically --------------------------------------------------------
LastValueQuantizer = kerasq.quantizers.LastValueQuantizer
MovingAverageQuantizer = kerasq.quantizers.MovingAverageQuantizer


@keras.saving.register_keras_serializable(package="tfmot_guide")
class DefaultDenseQuantizeConfig(kerasq.QuantizeConfig):
    # Configure how to quantize weights.
    def get_weights_and_quantizers(self, layer):
        return [(layer.kernel, LastValueQuantizer(num_bits=8, symmetric=True, narrow_range=False, per_axis=False))]

    # Configure how to quantize activations.
    def get_activations_and_quantizers(self, layer):
        return [(layer.activation, MovingAverageQuantizer(num_bits=8, symmetric=False, narrow_range=False, per_axis=False))]

    def set_quantize_weights(self, layer, quantize_weights):
        # Add this line for each item returned in `get_weights_and_quantizers`
        # , in the same order
        layer.kernel = quantize_weights[0]

    def set_quantize_activations(self, layer, quantize_activations):
        # Add this line for each item returned in `get_activations_and_quantizers`
        # , in the same order.
        layer.activation = quantize_activations[0]

    # Configure how to quantize outputs (may be equivalent to activations).
    def get_output_quantizers(self, layer):
        return []

    def get_config(self):
        return {}


class FourBitDenseQuantizeConfig(DefaultDenseQuantizeConfig):
    # Configure weights to quantize with 4-bit instead of 8-bits.
    def get_weights_and_quantizers(self, layer):
        return [(layer.kernel, LastValueQuantizer(num_bits=4, symmetric=True, narrow_range=False, per_axis=False))]


class NoActivationDenseQuantizeConfig(DefaultDenseQuantizeConfig):
    def get_activations_and_quantizers(self, layer):
        # Skip quantizing activations.
        return []

    def set_quantize_activations(self, layer, quantize_activations):
        # Empty since `get_activaations_and_quantizers` returns
        # an empty list.
        return


class CustomLayer(keras.layers.Dense):
    pass


class FixedRangeQuantizer(kerasq.quantizers.Quantizer):
    """Quantizer which forces outputs to be between -1 and 1."""

    def build(self, tensor_shape, name, layer):
        # Not needed. No new TensorFlow variables needed.
        return {}

    def __call__(self, inputs, training, weights, **kwargs):
        return keras.ops.clip(inputs, -1.0, 1.0)

    def get_config(self):
        # Not needed. No __init__ parameters to serialize.
        return {}


class FixedRangeDenseQuantizeConfig(DefaultDenseQuantizeConfig):
    def get_weights_and_quantizers(self, layer):
        # Use custom algorithm defined in `FixedRangeQuantizer` instead of default Quantizer.
        return [(layer.kernel, FixedRangeQuantizer())]


def annotated_digits_model(config, layer_class=keras.layers.Dense):
    quantize_annotate_layer = kerasq.quantize_annotate_layer
    quantize_annotate_model = kerasq.quantize_annotate_model
    return quantize_annotate_model(keras.Sequential([
        keras.layers.Flatten(input_shape=(8, 8, 1)),
        quantize_annotate_layer(layer_class(20, activation="relu", name="custom"), config),
        keras.layers.Dense(10, name="logits"),
    ]))


def train_export_verify(qat, digits):
    (x, y), (x_test, _) = digits
    keras.utils.set_random_seed(0)
    qat.compile(keras.optimizers.Adam(1e-3), LOSS, metrics=["accuracy"])
    qat.fit(x, y, epochs=1, batch_size=32, verbose=0)
    content = kerasq.export_tflite(qat)
    return kerasq.TFLiteModel(content), kerasq.verify_tflite(qat, content, x_test)


def custom_kernel(tflite):
    [kernel] = [t for t in tflite.tensors if t.is_constant and "custom" in t.name and len(t.shape) == 2]
    return kernel


@pytest.mark.parametrize("config, kernel_dtype", [
    (DefaultDenseQuantizeConfig(), "int8"),
    (FourBitDenseQuantizeConfig(), "int4"),
    (NoActivationDenseQuantizeConfig(), "int8"),
])
def test_guide_configs_train_export_and_verify(config, kernel_dtype, digits):
    model = annotated_digits_model(config)
    with kerasq.quantize_scope({"DefaultDenseQuantizeConfig": DefaultDenseQuantizeConfig}):
        qat = kerasq.quantize_apply(model)
    tflite, report = train_export_verify(qat, digits)
    assert report.passed and report.fully_integer, report
    assert custom_kernel(tflite).dtype == kernel_dtype


def test_default_config_is_the_configs_scheme():
    qat = kerasq.quantize_apply(annotated_digits_model(DefaultDenseQuantizeConfig()))
    scheme = qat.get_layer("quant_custom").scheme
    assert (scheme.weights.bits, scheme.weights.per_channel, scheme.weights.narrow_range) == (8, False, False)
    assert (scheme.activations.estimator, scheme.activations.ema_decay) == ("ema_minmax", 0.999)
    # Activations left alone: a Quantize after the layer gives the next one its int8 input.
    skipped = kerasq.quantize_apply(annotated_digits_model(NoActivationDenseQuantizeConfig()))
    assert "output" not in skipped.get_layer("quant_custom").quantization_ranges()
    assert isinstance(skipped.get_layer("custom_quantize"), kerasq.Quantize)


def test_guide_custom_layer_in_quantize_scope(digits):
    model = annotated_digits_model(DefaultDenseQuantizeConfig(), layer_class=CustomLayer)
    with kerasq.quantize_scope({"DefaultDenseQuantizeConfig": DefaultDenseQuantizeConfig, "CustomLayer": CustomLayer}):
        qat = kerasq.quantize_apply(model)
    assert isinstance(qat.get_layer("quant_custom").layer, CustomLayer)


def test_a_custom_quantizer_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="FixedRangeQuantizer.*LastValueQuantizer"):
        kerasq.quantize_apply(annotated_digits_model(FixedRangeDenseQuantizeConfig()))


def test_what_tflite_cannot_run_is_refused_with_the_fix():
    class AsymmetricWeights(DefaultDenseQuantizeConfig):
        def get_weights_and_quantizers(self, layer):
            return [(layer.kernel, LastValueQuantizer(num_bits=8, symmetric=False, narrow_range=False, per_axis=False))]

    class OutputOnly(DefaultDenseQuantizeConfig):
        def get_weights_and_quantizers(self, layer):
            return []

    class BiasToo(DefaultDenseQuantizeConfig):
        def get_weights_and_quantizers(self, layer):
            quantizer = LastValueQuantizer(num_bits=8, symmetric=True, narrow_range=True, per_axis=False)
            return [(layer.kernel, quantizer), (layer.bias, quantizer)]

    for config, message in ((AsymmetricWeights(), "symmetric=True"), (OutputOnly(), "every kernel in int8"),
                            (BiasToo(), "return only the kernels")):
        with pytest.raises(ValueError, match=message):
            kerasq.quantize_apply(annotated_digits_model(config))


def test_a_config_quantizing_nothing_leaves_the_layer_float():
    class Nothing(DefaultDenseQuantizeConfig):
        def get_weights_and_quantizers(self, layer):
            return []

        def get_activations_and_quantizers(self, layer):
            return []

    qat = kerasq.quantize_apply(annotated_digits_model(Nothing()))
    assert type(qat.get_layer("custom")) is keras.layers.Dense


def test_quantized_layer_name_prefix():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d")])
    assert "q8_d" in [layer.name for layer in kerasq.quantize_model(model, quantized_layer_name_prefix="q8_").layers]
    annotated = kerasq.quantize_annotate_model(model)
    assert "q8_d" in [layer.name for layer in kerasq.quantize_apply(annotated, quantized_layer_name_prefix="q8_").layers]


def test_keras_file_round_trip_with_a_custom_config(digits, tmp_path):
    (x, _), _ = digits
    model = annotated_digits_model(FourBitDenseQuantizeConfig())
    model.save(tmp_path / "annotated.keras")
    with kerasq.quantize_scope({"FourBitDenseQuantizeConfig": FourBitDenseQuantizeConfig}):
        loaded = keras.saving.load_model(tmp_path / "annotated.keras")
    [custom] = [layer for layer in loaded.layers if getattr(layer, "layer", None) and layer.layer.name == "custom"]
    assert isinstance(custom.quantize_config, FourBitDenseQuantizeConfig)

    qat = kerasq.quantize_apply(loaded)
    qat(x[:64], training=True)
    qat.save(tmp_path / "qat.keras")
    reloaded = keras.saving.load_model(tmp_path / "qat.keras")
    assert reloaded.get_layer("quant_custom").scheme.weights.bits == 4
    np.testing.assert_array_equal(reloaded.predict(x[:50], verbose=0), qat.predict(x[:50], verbose=0))


def _small_cnn():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(8, 3, activation="relu", name="conv"),
        keras.layers.Flatten(),
        keras.layers.Dense(10, name="logits"),
    ])


def test_prune_preserve_scheme_keeps_the_zeros(digits):
    (x, y), (x_test, _) = digits
    model = _small_cnn()
    for layer in (model.get_layer("conv"), model.get_layer("logits")):  # a stripped pruned model
        kernel = keras.ops.convert_to_numpy(layer.kernel)
        layer.kernel.assign(np.where(np.abs(kernel) < np.median(np.abs(kernel)), 0.0, kernel))
    annotated = kerasq.quantize_annotate_model(model)
    qat = kerasq.quantize_apply(annotated, kerasq.experimental.combine.Default8BitPrunePreserveQuantizeScheme())
    qat.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(x, y, epochs=1, verbose=0)
    for name in ("conv", "logits"):
        before = keras.ops.convert_to_numpy(model.get_layer(name).kernel) == 0
        after = keras.ops.convert_to_numpy(qat.get_layer(f"quant_{name}").layer.kernel) == 0
        assert after[before].all() and before.mean() >= 0.45
    tflite = kerasq.TFLiteModel(kerasq.export_tflite(qat))
    assert kerasq.verify_tflite(qat, tflite, x_test).passed


def test_cluster_preserve_scheme_keeps_the_clusters(digits):
    (x, y), (x_test, _) = digits
    model = _small_cnn()
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    clustered = kerasq.cluster_weights(model, number_of_clusters=4)
    clustered.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    clustered.fit(x, y, epochs=1, verbose=0)
    stripped = kerasq.strip_clustering(clustered)
    scheme = kerasq.experimental.combine.Default8BitClusterPreserveQuantizeScheme(preserve_sparsity=True)
    qat = kerasq.quantize_apply(kerasq.quantize_annotate_model(stripped), scheme)
    qat.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(x, y, epochs=1, verbose=0)
    for name in ("conv", "logits"):
        assert len(np.unique(keras.ops.convert_to_numpy(qat.get_layer(f"quant_{name}").layer.kernel))) <= 4
    tflite = kerasq.TFLiteModel(kerasq.export_tflite(qat))
    assert kerasq.verify_tflite(qat, tflite, x_test).passed


def test_default_scheme_is_int8():
    model = _small_cnn()
    qat = kerasq.quantize_apply(kerasq.quantize_annotate_model(model), kerasq.Default8BitQuantizeScheme())
    assert qat.get_layer("quant_conv").scheme == kerasq.quantize_model(model).get_layer("quant_conv").scheme
