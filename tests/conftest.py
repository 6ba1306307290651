"""Shared fixtures: the real handwritten digits, loaded once per test process."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # test process only: keep TensorFlow's log short

import pytest  # noqa: E402

from kerasq.data import load_digits  # noqa: E402


@pytest.fixture(scope="session")
def digits():
    """((x_train, y_train), (x_test, y_test)) with 8x8x1 images in [0, 1]."""
    return load_digits()


@pytest.fixture(scope="session")
def digits_32():
    """The digits upsampled to 32x32x1, the smallest input MobileNetV2 takes."""
    return load_digits(image_size=32)
