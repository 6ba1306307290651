"""Transformers in a QAT model, fully int8 at the kernel-path floor: Embedding with sinusoidal position
encodings, MultiHeadAttention, LayerNormalization, GELU and residual Adds, in a hand-written encoder
layer (quantized through its sublayers) and in a Functional one."""

import keras
import numpy as np
import pytest

import kerasq

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
WIDTH = 32


class EncoderBlock(keras.layers.Layer):
    """A post-norm transformer encoder layer written by hand."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.attention = keras.layers.MultiHeadAttention(num_heads=2, key_dim=16)
        self.norm1 = keras.layers.LayerNormalization()
        self.hidden = keras.layers.Dense(2 * WIDTH, activation="gelu")
        self.out = keras.layers.Dense(WIDTH)
        self.norm2 = keras.layers.LayerNormalization()

    def call(self, x):
        x = self.norm1(x + self.attention(x, x))
        return self.norm2(x + self.out(self.hidden(x)))


def encoder_block(x):
    attended = keras.layers.MultiHeadAttention(num_heads=2, key_dim=16)(x, x)
    x = keras.layers.LayerNormalization()(keras.layers.Add()([x, attended]))
    hidden = keras.layers.Dense(WIDTH, name="mlp_out")(keras.layers.Dense(2 * WIDTH, activation="gelu")(x))
    return keras.layers.LayerNormalization()(keras.layers.Add()([x, hidden]))


def sinusoids(length):
    """Fixed sinusoidal position encodings, as in "Attention is all you need"."""
    angles = np.arange(length)[:, None] / 10000.0 ** (np.arange(0, WIDTH, 2) / WIDTH)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)[None].astype("float32")


def text_classifier():
    """Each digit as a sentence of 64 tokens: its pixel intensities 0..16."""
    inputs = keras.Input((64,), dtype="int32")
    x = keras.layers.Add()([keras.layers.Embedding(17, WIDTH)(inputs), sinusoids(64)])
    x = EncoderBlock(name="encoder")(x)
    return keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(x)))


def vision_transformer():
    """2x2 patches of the 8x8 image as 16 tokens."""
    inputs = keras.Input((8, 8, 1))
    patches = keras.layers.Reshape((16, WIDTH))(keras.layers.Conv2D(WIDTH, 2, strides=2)(inputs))
    x = encoder_block(keras.layers.Add()([patches, sinusoids(16)]))
    return keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(x)))


def as_tokens(images):
    return np.round(images.reshape(len(images), 64) * 16).astype("int32")


@pytest.mark.parametrize("kind", ["text", "vit"])
def test_transformer_is_fully_int8_at_the_floor_and_keeps_its_accuracy(kind, digits, tmp_path):
    (x, y), (x_test, y_test) = digits
    if kind == "text":
        build, x, x_test = text_classifier, as_tokens(x), as_tokens(x_test)
    else:
        build = vision_transformer
    keras.utils.set_random_seed(0)
    model = build()
    model.compile(keras.optimizers.Adam(1e-3), LOSS, metrics=["accuracy"])
    model.fit(x, y, epochs=12, batch_size=32, verbose=0)
    float_accuracy = model.evaluate(x_test, y_test, verbose=0)[1]
    post_training = kerasq.TFLiteModel(kerasq.export_tflite(model, representative_data=x[:300]))

    qat = kerasq.quantize_model(model, calibration_data=x)
    wrapped = {type(layer.layer).__name__ for layer in qat.layers if isinstance(layer, kerasq.QuantizeWrapper)}
    assert {"MultiHeadAttention", "LayerNormalization", "Dense", "Add"} <= wrapped
    assert kind == "vit" or "Embedding" in wrapped
    qat.compile(keras.optimizers.Adam(1e-4), LOSS)
    qat.fit(x, y, epochs=2, batch_size=32, verbose=0)
    tflite = kerasq.TFLiteModel(kerasq.export_tflite(qat))

    report = kerasq.verify_tflite(qat, tflite, x_test)
    assert report.passed, str(report)
    assert report.fully_integer, report.float_ops
    # TFLite's own post-training int8 leaves LayerNormalization's NEG in float.
    assert len(tflite.float_tensors) <= len(post_training.float_tensors)
    assert {"BATCH_MATMUL", "SOFTMAX", "RSQRT", "GELU"} <= set(tflite.ops)
    # Within 1 point of float on the 450 test digits (4 samples); the QAT files measured 0 and +1 sample.
    assert tflite.evaluate(x_test, y_test) >= float_accuracy - 0.01

    qat.save(tmp_path / "qat.keras")
    loaded = keras.models.load_model(tmp_path / "qat.keras")
    np.testing.assert_allclose(loaded.predict(x_test[:64], verbose=0), qat.predict(x_test[:64], verbose=0), atol=1e-6)


def test_quantization_off_computes_what_keras_computes():
    """The int8 forms of attention (self and cross, different lengths) and LayerNormalization are the
    float layers' math: with quantization switched off they agree with Keras."""
    keras.utils.set_random_seed(1)
    query, source = keras.Input((5, 8)), keras.Input((7, 6))
    attended = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3, value_dim=4)(query, source)
    normalized = keras.layers.LayerNormalization(beta_initializer="uniform", gamma_initializer="uniform")(attended)
    model = keras.Model([query, source], [attended, normalized])
    qat = kerasq.quantize_model(model)
    for layer in qat.layers:
        if isinstance(layer, (kerasq.Quantize, kerasq.QuantizeWrapper)):
            layer.quantization_enabled = False
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(3, 5, 8)).astype("float32"), rng.normal(size=(3, 7, 6)).astype("float32")]
    for ours, theirs in zip(qat(inputs), model(inputs)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-5)


def _layer_alone(kind):
    """One attention or LayerNormalization layer as the whole model, on (8, 16) inputs, or (4, 2, 16)
    for attention over two axes."""
    if kind == "attention_axes":
        inputs = keras.Input((4, 2, 16))
        return inputs, keras.layers.MultiHeadAttention(num_heads=2, key_dim=8, attention_axes=(1, 2))(inputs, inputs)
    if kind == "causal_attention_axes":  # causal along axis 1, the same for each position on axis 2
        inputs = keras.Input((4, 2, 16))
        attention = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8, attention_axes=(1,))
        return inputs, attention(inputs, inputs, use_causal_mask=True)
    if kind == "masked_attention_axes":  # a different mask for each position on axis 2
        inputs = keras.Input((4, 2, 16))
        mask = np.stack([np.tril(np.ones((4, 4), bool)), np.eye(4, dtype=bool) | ~np.tril(np.ones((4, 4), bool))])
        attention = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8, attention_axes=(1,))
        return inputs, attention(inputs, inputs, attention_mask=mask[None])
    inputs = keras.Input((8, 16))
    if kind == "attention":
        return inputs, keras.layers.MultiHeadAttention(num_heads=2, key_dim=8)(inputs, inputs)
    if kind == "gated_attention":
        return inputs, keras.layers.MultiHeadAttention(num_heads=2, key_dim=8, use_gate=True)(inputs, inputs)
    if kind == "causal_attention":
        return inputs, keras.layers.MultiHeadAttention(num_heads=2, key_dim=8)(inputs, inputs, use_causal_mask=True)
    uniform = dict(beta_initializer="uniform", gamma_initializer="uniform")
    if kind == "layer_norm":
        return inputs, keras.layers.LayerNormalization(**uniform)(inputs)
    if kind == "layer_norm_axes":
        return inputs, keras.layers.LayerNormalization(axis=[1, 2], **uniform)(inputs)
    if kind == "rms_norm":
        return inputs, keras.layers.LayerNormalization(rms_scaling=True, gamma_initializer="uniform")(inputs)
    rms = keras.layers.RMSNormalization(axis=[1, 2] if kind == "rms_normalization_axes" else -1)
    outputs = rms(inputs)
    rms.scale.assign(np.random.default_rng(1).uniform(0.5, 1.5, rms.scale.shape))
    return inputs, outputs


_KEY_OPS = {"attention": "BATCH_MATMUL", "causal_attention": "SELECT_V2", "attention_axes": "TRANSPOSE",
            "causal_attention_axes": "SELECT_V2", "masked_attention_axes": "SELECT_V2", "gated_attention": "LOGISTIC",
            "layer_norm": "RSQRT", "layer_norm_axes": "RSQRT", "rms_norm": "RSQRT", "rms_normalization": "RSQRT",
            "rms_normalization_axes": "RSQRT"}


@pytest.mark.parametrize("kind", list(_KEY_OPS))
def test_the_layer_alone_matches_the_default_kernels_bit_for_bit(kind):
    """BATCH_MATMUL and RSQRT scale their integer results with a fixed-point multiplier, rounding
    twice; the simulation did once, and put 2-4% of these outputs 1-5 steps off. Tokens spread 50
    times apart give LayerNormalization small variances, where RSQRT's double rounding shows. A
    causal mask is a SELECT_V2 of the lowest int8 score, attention over two axes a SOFTMAX over
    both, a mask over other axes broadcast and flattened as the scores are, a gate a LOGISTIC and a MUL, and a normalization over two axes MEANs over both
    (RMSNormalization's square an int8 MUL, where post-training int8 leaves a float SQUARE), each
    int8 and each to the bit."""
    keras.utils.set_random_seed(0)
    inputs, outputs = _layer_alone(kind)
    shape = tuple(inputs.shape[1:])
    rng = np.random.default_rng(0)
    spread = rng.uniform(0.02, 1.0, (256, 8, 1)).reshape((256,) + shape[:-1] + (1,))
    x = (rng.normal(size=(256,) + shape) * spread).astype("float32")
    qat = kerasq.quantize_model(keras.Model(inputs, outputs), calibration_data=x)
    tflite = kerasq.TFLiteModel(kerasq.export_tflite(qat))
    assert _KEY_OPS[kind] in tflite.ops
    assert tflite.is_fully_integer, tflite.float_tensors
    (in_scale, in_zero), (out_scale, out_zero) = tflite.input_quantization[0], tflite.output_quantization[0]
    levels = np.clip(np.round(x / in_scale) + in_zero, -128, 127).astype("int8")
    x = (levels.astype("float32") - in_zero) * np.float32(in_scale)
    simulated = np.round(np.asarray(qat(x, training=False)) / out_scale) + out_zero
    np.testing.assert_array_equal(simulated, tflite.predict(levels, raw=True).astype("float32"))


def test_variants_with_quantization_off_compute_what_keras_computes():
    """Masks (causal, given, and the inputs' Keras masks), returned scores, attention over other axes
    with a gate, normalization over other axes, RMS scaling and RMSNormalization: with quantization switched off,
    Keras's values."""
    keras.utils.set_random_seed(2)
    tokens, given = keras.Input((6,), dtype="int32"), keras.Input((6, 6), dtype="bool")
    x = keras.layers.Embedding(9, 8, mask_zero=True)(tokens)
    given_mask = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)(x, x, attention_mask=given)
    attention = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
    attended, scores = attention(given_mask, x, use_causal_mask=True, return_attention_scores=True)
    grid = keras.layers.Reshape((3, 2, 8))(keras.layers.Dense(48)(keras.layers.Flatten()(attended)))
    gated = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, attention_axes=(1, 2), use_gate=True)
    over_axes = gated(grid, grid)
    uniform = dict(beta_initializer="uniform", gamma_initializer="uniform")
    normalized = keras.layers.LayerNormalization(axis=[1, 3], **uniform)(over_axes)
    rms = keras.layers.LayerNormalization(axis=1, rms_scaling=True, gamma_initializer="uniform")(over_axes)
    rms_layer = keras.layers.RMSNormalization()
    rms_normalized = rms_layer(over_axes)
    rms_layer.scale.assign(np.linspace(0.5, 1.5, 8))
    model = keras.Model([tokens, given], [given_mask, attended, scores, over_axes, normalized, rms, rms_normalized])
    qat = kerasq.quantize_model(model)
    for layer in qat.layers:
        if isinstance(layer, (kerasq.Quantize, kerasq.QuantizeWrapper)):
            layer.quantization_enabled = False
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 9, (4, 6))
    ids[:, 4:] = 0  # padding: the Keras masks hide these tokens
    mask = rng.uniform(size=(4, 6, 6)) < 0.8
    mask[:, :, 0] = True  # every unpadded query sees some key: no row masked throughout
    for ours, theirs in zip(qat([ids, mask]), model([ids, mask])):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-5)


def test_masks_over_other_axes_with_quantization_off_compute_what_keras_computes():
    """Masks with other attention_axes: given for each sample over two axes (with the scores
    returned), causal along one axis, and the same for every sample but different along the axis
    not attended: Keras's values with quantization switched off."""
    keras.utils.set_random_seed(3)
    grid, given = keras.Input((3, 2, 8)), keras.Input((3, 2, 3, 2), dtype="bool")
    over_both = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, attention_axes=(1, 2))
    attended, scores = over_both(grid, grid, attention_mask=given, return_attention_scores=True)
    causal = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, attention_axes=(1,))(
        attended, grid, use_causal_mask=True)
    per_column = np.stack([np.tril(np.ones((3, 3), bool)), np.triu(np.ones((3, 3), bool))])[None]
    columns = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, attention_axes=(1,))(
        causal, causal, attention_mask=per_column)
    model = keras.Model([grid, given], [attended, scores, causal, columns])
    qat = kerasq.quantize_model(model)
    for layer in qat.layers:
        if isinstance(layer, (kerasq.Quantize, kerasq.QuantizeWrapper)):
            layer.quantization_enabled = False
    rng = np.random.default_rng(0)
    mask = rng.uniform(size=(4, 3, 2, 3, 2)) < 0.7
    mask[..., 0, 0] = True  # every query sees some key
    inputs = [rng.normal(size=(4, 3, 2, 8)).astype("float32"), mask]
    for ours, theirs in zip(qat(inputs), model(inputs)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-5)
    tflite = kerasq.TFLiteModel(kerasq.export_tflite(kerasq.quantize_model(model, calibration_data=inputs)))
    assert tflite.is_fully_integer, tflite.float_tensors


def test_a_mask_tensor_and_flags_in_one_call():
    """`attention_mask=m, use_causal_mask=True, return_attention_scores=True`: a tensor and flags
    in one call's keyword arguments, which Keras binds apart only where the signature names them.
    Keras's values with quantization off, fully int8 at the floor with it on."""
    keras.utils.set_random_seed(4)
    tokens, given = keras.Input((6, 8)), keras.Input((6, 6), dtype="bool")
    attention = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
    attended, scores = attention(tokens, tokens, attention_mask=given, use_causal_mask=True,
                                 return_attention_scores=True)
    model = keras.Model([tokens, given], [attended, scores])
    rng = np.random.default_rng(0)
    mask = rng.uniform(size=(64, 6, 6)) < 0.7
    mask[:, :, 0] = True  # every query sees some key
    inputs = [rng.normal(size=(64, 6, 8)).astype("float32"), mask]
    off = kerasq.quantize_model(model)
    for layer in off.layers:
        if isinstance(layer, (kerasq.Quantize, kerasq.QuantizeWrapper)):
            layer.quantization_enabled = False
    for ours, theirs in zip(off(inputs), model(inputs)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-5)
    qat = kerasq.quantize_model(model, calibration_data=inputs)
    tflite = kerasq.TFLiteModel(kerasq.export_tflite(qat))
    assert tflite.is_fully_integer, tflite.float_tensors
    report = kerasq.verify_tflite(qat, tflite, inputs)
    assert report.passed, str(report)


def test_masked_attention_is_int8_at_the_floor(digits):
    """Each digit as a sentence of 64 tokens with the background (0) masked out of attention
    (Embedding(mask_zero=True)) and a causal mask: SELECT_V2 in int8, as in post-training int8."""
    (x, y), (x_test, _) = digits
    x, y, x_test = as_tokens(x)[:640], y[:640], as_tokens(x_test)[:200]
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,), dtype="int32")
    embedded = keras.layers.Embedding(17, 16, mask_zero=True)(inputs)
    attended = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8)(embedded, embedded, use_causal_mask=True)
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(attended)))
    post_training = kerasq.TFLiteModel(kerasq.export_tflite(model, representative_data=x[:100]))
    qat = kerasq.quantize_model(model, calibration_data=x[:256])
    qat.compile(keras.optimizers.Adam(1e-3), LOSS)
    qat.fit(x, y, epochs=1, batch_size=32, verbose=0)
    tflite = kerasq.TFLiteModel(kerasq.export_tflite(qat))
    assert "SELECT_V2" in tflite.ops
    assert len(tflite.float_tensors) <= len(post_training.float_tensors), tflite.float_tensors
    assert tflite.is_fully_integer, tflite.float_tensors
    report = kerasq.verify_tflite(qat, tflite, x_test)
    assert report.passed, str(report)
