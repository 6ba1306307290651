"""Real data that ships offline, for demos, tests and tutorials.

The handwritten digits bundled with scikit-learn: 1,797 real 8x8 grey-scale scans of the digits 0-9,
read from the installed package, so nothing is downloaded.
"""

import numpy as np


def load_digits(test_fraction=0.25, seed=0, image_size=8):
    """Returns `(x_train, y_train), (x_test, y_test)` of the scikit-learn digits.

    Images are float32 in [0, 1] with shape `(n, image_size, image_size, 1)`; labels are int32 class ids.
    The split is stratified and fixed by `seed`, so every run sees the same test set.
    `image_size` above 8 upsamples by pixel repetition (for architectures that need larger inputs, such
    as `keras.applications.MobileNetV2`, which wants at least 32x32).

    Example:
    >>> from kerasq.data import load_digits
    >>> (x_train, y_train), (x_test, y_test) = load_digits()
    >>> x_train.shape, x_test.shape
    ((1347, 8, 8, 1), (450, 8, 8, 1))
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    if image_size < 8 or image_size % 8:
        raise ValueError(f"image_size must be a multiple of 8 (8, 16, 32, ...); got {image_size}.")
    digits = sklearn_digits()
    images = (digits.images / 16.0).astype("float32")[..., None]
    repeat = image_size // 8
    if repeat > 1:
        images = images.repeat(repeat, axis=1).repeat(repeat, axis=2)
    labels = digits.target.astype("int32")
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    return (x_train, y_train), (x_test, y_test)
