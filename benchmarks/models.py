"""Architectures the benchmarks share."""

import keras


def mobilenet_v2(input_shape, alpha=0.35):
    """keras.applications.MobileNetV2 with random initial weights and 10 logits, its BatchNorm
    momentum 0.9: on the digits' few hundred steps the default 0.999 barely moves the moving
    statistics."""
    model = keras.applications.MobileNetV2(input_shape=input_shape, alpha=alpha, weights=None, classes=10,
                                           classifier_activation=None)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    return model
