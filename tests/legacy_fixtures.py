"""Makes the tf_keras (Keras 2) and tfmot files that tests/test_legacy.py migrates.

Run it as a script in its own process with TF_USE_LEGACY_KERAS=1 (tfmot works only then):

    TF_USE_LEGACY_KERAS=1 python tests/legacy_fixtures.py OUT_DIR

OUT_DIR must hold the digits the files are trained and evaluated on (`x_train.npy`, `y_train.npy`,
`x_test.npy`, written by the test from `kerasq.data.load_digits()`; this process does not import
kerasq, which needs Keras 3). It writes, into OUT_DIR:

- float.h5, float.keras, float_savedmodel/: a Functional Conv-BN-ReLU / DepthwiseConv-BN-ReLU model with
  a nested Sequential head, trained briefly; float_outputs.npy: its outputs on x_test.
- sequential.h5 (Sequential, `input_shape` on its first layer), sequential_outputs.npy.
- qat.h5: tfmot's `quantize_model` of a Conv-BN-ReLU / Dense model, fine-tuned; qat_tfmot.tflite:
  the file tfmot's converter path gives (float input and output); qat_outputs.npy: the QAT model's
  outputs.
- pruned.h5: tfmot's `prune_low_magnitude` of a small model trained with UpdatePruningStep;
  pruned_outputs.npy.
- weights_only.h5 (`save_weights`), not_keras_savedmodel/ (a `tf.saved_model.save` of a tf.Module),
  custom.h5 (two custom layers and a Lambda, which kerasq cannot map).
"""

import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def conv_bn_relu(x, filters, depthwise=False):
    if depthwise:
        x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    else:
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
    x = keras.layers.BatchNormalization(momentum=0.9)(x)
    return keras.layers.ReLU()(x)


def float_model():
    inputs = keras.Input((8, 8, 1), name="image")
    x = conv_bn_relu(inputs, 8)
    x = conv_bn_relu(x, 8, depthwise=True)
    x = keras.layers.MaxPooling2D()(x)
    head = keras.Sequential(
        [keras.layers.Flatten(), keras.layers.Dense(16, activation="relu"), keras.layers.Dropout(0.1),
         keras.layers.Dense(10)],
        name="head",
    )
    return keras.Model(inputs, head(x), name="legacy_float")


def qat_base_model():
    inputs = keras.Input((8, 8, 1))
    x = conv_bn_relu(inputs, 8)
    x = conv_bn_relu(x, 16)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x), name="legacy_qat")


def sequential_model():
    return keras.Sequential(
        [keras.layers.Conv2D(4, 3, activation="relu", input_shape=(8, 8, 1)), keras.layers.Flatten(),
         keras.layers.Dense(10, activation="softmax")],
        name="legacy_sequential",
    )


@keras.utils.register_keras_serializable(package="fixtures")
class TimesTwo(keras.layers.Layer):
    def call(self, x):
        return 2.0 * x


@keras.utils.register_keras_serializable(package="fixtures")
class PlusOne(keras.layers.Layer):
    def call(self, x):
        return x + 1.0


def custom_model():
    inputs = keras.Input((4,))
    x = TimesTwo(name="times_two")(inputs)
    x = keras.layers.Lambda(lambda t: t * 3.0, name="times_three")(x)
    x = PlusOne(name="plus_one")(x)
    return keras.Model(inputs, keras.layers.Dense(2)(x))


def main(out_dir):
    tf.random.set_seed(0)
    np.random.seed(0)
    x_train = np.load(os.path.join(out_dir, "x_train.npy"))
    y_train = np.load(os.path.join(out_dir, "y_train.npy"))
    x_test = np.load(os.path.join(out_dir, "x_test.npy"))
    path = lambda name: os.path.join(out_dir, name)  # noqa: E731

    model = float_model()
    model.compile("adam", LOSS)
    model.fit(x_train, y_train, epochs=2, batch_size=64, verbose=0)
    model.save(path("float.h5"))
    model.save(path("float.keras"))
    model.save(path("float_savedmodel"), save_format="tf")
    np.save(path("float_outputs.npy"), model.predict(x_test, verbose=0))

    sequential = sequential_model()
    sequential.compile("adam", "sparse_categorical_crossentropy")
    sequential.fit(x_train, y_train, epochs=1, batch_size=64, verbose=0)
    sequential.save(path("sequential.h5"))
    np.save(path("sequential_outputs.npy"), sequential.predict(x_test, verbose=0))

    base = qat_base_model()
    base.compile("adam", LOSS)
    base.fit(x_train, y_train, epochs=6, batch_size=32, verbose=0)
    q_aware = tfmot.quantization.keras.quantize_model(base)
    q_aware.compile(keras.optimizers.Adam(1e-4), LOSS)
    q_aware.fit(x_train, y_train, epochs=2, batch_size=32, verbose=0)
    q_aware.save(path("qat.h5"))
    np.save(path("qat_outputs.npy"), q_aware.predict(x_test, verbose=0))
    converter = tf.lite.TFLiteConverter.from_keras_model(q_aware)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    with open(path("qat_tfmot.tflite"), "wb") as file:
        file.write(converter.convert())

    to_prune = sequential_model()
    schedule = tfmot.sparsity.keras.ConstantSparsity(0.5, begin_step=0, frequency=5)
    pruned = tfmot.sparsity.keras.prune_low_magnitude(to_prune, pruning_schedule=schedule)
    pruned.compile("adam", "sparse_categorical_crossentropy")
    pruned.fit(x_train[:256], y_train[:256], epochs=1, batch_size=32, verbose=0,
               callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    pruned.save(path("pruned.h5"))
    np.save(path("pruned_outputs.npy"), pruned.predict(x_test, verbose=0))

    model.save_weights(path("weights_only.h5"))
    module = tf.Module()
    module.scale = tf.Variable(2.0)
    module.double = tf.function(lambda x: module.scale * x, input_signature=[tf.TensorSpec([None], tf.float32)])
    tf.saved_model.save(module, path("not_keras_savedmodel"))
    custom_model().save(path("custom.h5"))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: TF_USE_LEGACY_KERAS=1 {sys.argv[0]} OUT_DIR")
    main(sys.argv[1])
