"""Never less integer than post-training quantization: for a zoo of small float models covering the
supported layers, the QAT file has no more float tensors than TFLite's post-training int8 file of the
same float model, and it passes verify_tflite at the kernel-path floor."""

import keras
import numpy as np
import pytest

import kerasq

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
layers = keras.layers


def _image_model(body):
    inputs = keras.Input((8, 8, 1))
    return keras.Model(inputs, layers.Dense(10)(body(inputs)))


def cnn(x):
    x = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(8, 3, padding="same")(x)))
    return layers.Flatten()(layers.MaxPooling2D()(x))


def separable(x):
    x = layers.ReLU(6.0)(layers.DepthwiseConv2D(3, padding="same")(layers.Conv2D(8, 1)(x)))
    return layers.GlobalAveragePooling2D()(layers.SeparableConv2D(12, 3, activation="relu")(x))


def residual(x):
    x = layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    y = layers.BatchNormalization()(layers.Conv2D(8, 3, padding="same")(x))
    return layers.GlobalAveragePooling2D()(layers.ReLU()(layers.Add()([x, y])))


def concatenate(x):
    a = layers.Conv2D(4, 1, activation="relu")(x)
    b = layers.Conv2D(6, 3, padding="same", activation="relu")(x)
    return layers.Flatten()(layers.MaxPooling2D()(layers.Concatenate()([a, b])))


def dilated(x):
    x = layers.Conv2D(8, 3, dilation_rate=2, padding="same", activation="relu")(x)
    x = layers.Conv1D(8, 3, dilation_rate=2, activation="relu")(layers.Reshape((64, 8))(x))
    return layers.GlobalAveragePooling1D()(x)


def upsampling(x):
    x = layers.Conv2D(4, 3, strides=2, padding="same", activation="relu")(x)
    a = layers.UpSampling2D(2)(x)
    b = layers.UpSampling2D(2, interpolation="bilinear")(x)
    return layers.Flatten()(layers.Conv2D(4, 3, strides=2)(layers.Concatenate()([a, b])))


def preprocessing(x):
    x = layers.Rescaling(2.0, offset=-1.0)(x)
    x = layers.Normalization(mean=0.1, variance=0.5)(x)
    return layers.Flatten()(layers.Conv2D(8, 3, strides=2, activation="relu")(x))


def activations(x):
    x = layers.LeakyReLU(0.1)(layers.Conv2D(8, 3, padding="same")(x))
    x = layers.PReLU(shared_axes=[1, 2])(layers.Conv2D(8, 3, padding="same")(x))
    x = layers.ELU()(layers.Conv2D(8, 3, padding="same")(x))
    x = layers.Activation("hard_swish")(layers.Conv2D(8, 3, strides=2)(x))
    return layers.Flatten()(x)


def rms_normalization(x):
    x = layers.Conv2D(8, 3, strides=2)(x)
    return layers.Flatten()(layers.RMSNormalization()(x))


def pooling(x):
    x = layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D(padding="same")(layers.AveragePooling2D(pool_size=2, strides=1)(x))
    return layers.Concatenate()([layers.GlobalMaxPooling2D()(x), layers.GlobalAveragePooling2D()(x)])


def dense_head(x):
    x = layers.Dropout(0.1)(layers.Dense(32, activation="relu")(layers.Flatten()(x)))
    return layers.Dense(16, activation="relu")(x)


def conv1d(x):
    x = layers.Conv1D(8, 3, activation="relu")(layers.Reshape((8, 8))(x))
    return layers.GlobalMaxPooling1D()(layers.MaxPooling1D()(x))


def einsum_dense(x):
    heads = layers.EinsumDense("abc,cde->abde", output_shape=(8, 2, 8), bias_axes="de", activation="relu")(
        layers.Reshape((8, 8))(x)
    )
    return layers.Flatten()(layers.EinsumDense("abcd,cde->abe", output_shape=(8, 8), bias_axes="e")(heads))


def conv_transpose(x):
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.Conv2DTranspose(4, 3, strides=2, padding="same", activation="relu")(x)
    return layers.Flatten()(x)


def attention(x):
    tokens = layers.Dense(16)(layers.Reshape((8, 8))(x))
    attended = layers.MultiHeadAttention(num_heads=2, key_dim=8)(tokens, tokens)
    return layers.Flatten()(layers.LayerNormalization()(layers.Add()([tokens, attended])))


def masked_attention(x):
    """A causal mask, the scores returned, LayerNormalization over the sequence axis."""
    tokens = layers.Dense(16)(layers.Reshape((8, 8))(x))
    attention = layers.MultiHeadAttention(num_heads=2, key_dim=8)
    attended, scores = attention(tokens, tokens, use_causal_mask=True, return_attention_scores=True)
    normalized = layers.LayerNormalization(axis=1)(layers.Add()([tokens, attended]))
    return layers.Concatenate()([layers.Flatten()(normalized), layers.Flatten()(scores)])


def attention_axes(x):
    """Attention over a (4, 2) grid of tokens, LayerNormalization over all three axes."""
    tokens = layers.Dense(8)(layers.Reshape((4, 2, 8))(x))
    attended = layers.MultiHeadAttention(num_heads=2, key_dim=4, attention_axes=(1, 2))(tokens, tokens)
    return layers.Flatten()(layers.LayerNormalization(axis=[1, 2, 3])(layers.Add()([tokens, attended])))


def masked_attention_axes(x):
    """Attention along the first axis of a (4, 2) grid of tokens, causal, and one along both axes
    with a fixed mask: each token sees the tokens of its row and of the rows before."""
    tokens = layers.Dense(8)(layers.Reshape((4, 2, 8))(x))
    causal = layers.MultiHeadAttention(num_heads=2, key_dim=4, attention_axes=(1,))
    x = layers.Add()([tokens, causal(tokens, tokens, use_causal_mask=True)])
    rows = np.repeat(np.repeat(np.tril(np.ones((4, 4), bool)), 2, axis=0), 2, axis=1).reshape(1, 4, 2, 4, 2)
    over_both = layers.MultiHeadAttention(num_heads=2, key_dim=4, attention_axes=(1, 2))
    return layers.Flatten()(layers.Add()([x, over_both(x, x, attention_mask=rows)]))


def embedding_model():
    inputs = keras.Input((64,), dtype="int32")
    x = layers.GlobalAveragePooling1D()(layers.Embedding(17, 8)(inputs))
    return keras.Model(inputs, layers.Dense(10)(x))


ZOO = {
    body.__name__: (lambda body=body: _image_model(body))
    for body in (cnn, separable, residual, concatenate, dilated, upsampling, preprocessing, activations,
                 rms_normalization, pooling, dense_head, einsum_dense, conv1d, conv_transpose, attention, masked_attention, attention_axes,
                 masked_attention_axes)
}
ZOO["embedding"] = embedding_model


@pytest.mark.parametrize("name", list(ZOO))
def test_qat_file_is_no_less_integer_than_post_training_int8(name, digits):
    (x, y), (x_test, _) = digits
    if name == "embedding":  # each digit as 64 tokens: its pixel intensities 0..16
        x, x_test = (np.round(a.reshape(len(a), 64) * 16).astype("int32") for a in (x, x_test))
    x, y, x_test = x[:640], y[:640], x_test[:200]
    keras.utils.set_random_seed(0)
    model = ZOO[name]()
    post_training = kerasq.TFLiteModel(kerasq.export_tflite(model, representative_data=x[:100]))

    qat = kerasq.quantize_model(model, calibration_data=x[:256])
    qat.compile(keras.optimizers.Adam(1e-3), LOSS)
    qat.fit(x, y, epochs=1, batch_size=32, verbose=0)
    tflite = kerasq.TFLiteModel(kerasq.export_tflite(qat))

    assert len(tflite.float_tensors) <= len(post_training.float_tensors), (
        f"QAT: {tflite.float_tensors}; post-training: {post_training.float_tensors}"
    )
    print(f"{name}: float tensors QAT {len(tflite.float_tensors)}, post-training {len(post_training.float_tensors)}")
    if post_training.is_fully_integer:
        assert tflite.is_fully_integer, tflite.float_tensors
    report = kerasq.verify_tflite(qat, tflite, x_test)
    assert report.passed, str(report)
