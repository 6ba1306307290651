"""3D convolutions train with per-channel fake-quant weights and export; TFLite has no int8 CONV_3D,
so they run in float in the file between quantize/dequantize ops, and the README says so."""

import keras
import numpy as np
import pytest

import kerasq

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.mark.parametrize("layer", [keras.layers.Conv3D, keras.layers.Conv3DTranspose], ids=lambda c: c.__name__)
def test_conv3d_trains_and_exports_with_its_float_island(layer):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (64, 6, 6, 6, 1)).astype("float32")
    y = (x[:, :3].mean(axis=(1, 2, 3, 4)) > x[:, 3:].mean(axis=(1, 2, 3, 4))).astype("int32")
    model = keras.Sequential([
        keras.Input((6, 6, 6, 1)), layer(4, 3, padding="same", activation="relu"),
        keras.layers.Flatten(), keras.layers.Dense(2),
    ])
    qat = kerasq.quantize_model(model)
    qat.compile(keras.optimizers.Adam(1e-3), LOSS)
    kernel = qat.layers[2].layer.kernel
    before = np.array(kernel)
    qat.fit(x, y, epochs=1, verbose=0)  # a rank-5 kernel's per-channel fake-quant gradient
    assert not np.array_equal(np.array(kernel), before)
    tflite = kerasq.TFLiteModel(kerasq.export_tflite(qat))
    assert not tflite.is_fully_integer  # TFLite's CONV_3D kernels are float only
    report = kerasq.verify_tflite(qat, tflite, x)
    assert report.passed
    # A PASS never hides the float island: the report names it.
    assert not report.fully_integer and report.float_ops[0][0] in ("CONV_3D", "CONV_3D_TRANSPOSE")
    assert "Float ops in the file: CONV_3D" in str(report)
