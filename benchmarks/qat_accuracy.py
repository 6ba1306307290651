"""Does quantization-aware training end more accurate than post-training quantization?

For three models on the scikit-learn digits (nothing is downloaded), over several seeds:

- mobilenet_v2: `keras.applications.MobileNetV2(alpha=0.35, weights=None)` with its softmax head and
  BatchNorm momentum 0.99, digits upsampled (nearest) to 32x32x3, stratified 70/30 split; float: 30
  epochs of Adam with cosine decay from 1e-3, batch 32; QAT: `kerasq.quantize_model`, 5 epochs of
  Adam 1e-4; PTQ: `kerasq.export_tflite(float_model, representative_data=<first 100 training images>)`.
- digits_cnn: the demo's network (`kerasq.demo.build_model`) on 8x8 digits with the demo's recipe.
- resnet: a small ResNet (Conv-BN-ReLU blocks with Add shortcuts) on 16x16 digits.

Float accuracy is the Keras model's; PTQ and QAT accuracies are the int8 files run by LiteRT. The
table gives the mean and spread (max - min) over the seeds, QAT - float and QAT - PTQ, whether the
targets hold (QAT >= PTQ and QAT within 0.5 point of float, means over the seeds), and the fragility
of each file: the argmax agreement between LiteRT's kernel paths (`verify_tflite`'s floor_agreement).

    python benchmarks/qat_accuracy.py [--seeds 0,1,2] [--models mobilenet_v2,digits_cnn,resnet]
        [--epochs N] [--qat-epochs N] [--output benchmarks/results/qat_accuracy.md]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

import machine  # noqa: E402  (benchmarks/machine.py)

TARGET_POINTS = 0.5  # QAT int8 within this many points of float (mean over seeds)
UNSTABLE_POINTS = 1.0  # float accuracy spread over seeds above this: float itself is unstable
CALIBRATION_SAMPLES = 100


# ---- the models and their recipes -----------------------------------------------------------------
def _digits(image_size, channels, test_size, stratified_30=False):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype("float32")[..., None]
    repeat = image_size // 8
    images = images.repeat(repeat, axis=1).repeat(repeat, axis=2).repeat(channels, axis=3)
    labels = digits.target.astype("int32")
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_size, random_state=0, stratify=labels
    )
    return x_train, y_train, x_test, y_test


def mobilenet_v2():
    import keras

    model = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10
    )
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.99
    return model


def digits_cnn():
    from kerasq.demo import build_model

    return build_model((8, 8, 1))


def resnet():
    import keras
    from keras import layers

    def conv_bn(x, filters, stride, name, relu=True):
        x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
        return layers.ReLU(name=f"{name}_relu")(x) if relu else x

    def block(x, filters, stride, name):
        shortcut = x
        y = conv_bn(x, filters, stride, f"{name}_a")
        y = conv_bn(y, filters, 1, f"{name}_b", relu=False)
        if stride != 1 or x.shape[-1] != filters:
            shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{name}_proj")(x)
            shortcut = layers.BatchNormalization(momentum=0.9, name=f"{name}_proj_bn")(shortcut)
        return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([y, shortcut]))

    inputs = keras.Input((16, 16, 1), name="image")
    x = conv_bn(inputs, 16, 1, "stem")
    x = block(x, 16, 1, "block1")
    x = block(x, 32, 2, "block2")
    x = block(x, 32, 1, "block3")
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(10, name="logits")(x)
    return keras.Model(inputs, outputs, name="small_resnet")


# name: (builder, data, float epochs, float lr (cosine), QAT epochs, QAT lr, QAT lr cosine, logits)
RECIPES = {
    "mobilenet_v2": (mobilenet_v2, lambda: _digits(32, 3, 0.3), 30, 1e-3, 5, 1e-4, False, False),
    "digits_cnn": (digits_cnn, lambda: _digits(8, 1, 0.25), 12, 3e-3, 3, 3e-4, True, True),
    "resnet": (resnet, lambda: _digits(16, 1, 0.3), 20, 1e-3, 5, 1e-4, False, True),
}


def _fit(model, x, y, epochs, learning_rate, cosine, logits, batch_size=32):
    import keras

    steps = epochs * -(-len(x) // batch_size)
    lr = keras.optimizers.schedules.CosineDecay(learning_rate, steps) if cosine else learning_rate
    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=logits),
        metrics=["accuracy"],
    )
    model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0)


def _keras_accuracy(model, x, y):
    return float(np.mean(np.asarray(model.predict(x, batch_size=256, verbose=0)).argmax(-1) == y))


def run_one(name, seed, workdir, epochs=None, qat_epochs=None):
    """Float, PTQ int8 and QAT int8 accuracies (and fragility) of one model and seed."""
    import keras

    import kerasq

    build, data, f_epochs, f_lr, q_epochs, q_lr, q_cosine, logits = RECIPES[name]
    f_epochs = epochs or f_epochs
    q_epochs = qat_epochs or q_epochs
    x_train, y_train, x_test, y_test = data()
    keras.utils.set_random_seed(seed)
    start = time.perf_counter()
    float_model = build()
    _fit(float_model, x_train, y_train, f_epochs, f_lr, True, logits)
    float_acc = _keras_accuracy(float_model, x_test, y_test)

    ptq_path = os.path.join(workdir, f"{name}_{seed}_ptq.tflite")
    kerasq.export_tflite(float_model, ptq_path, representative_data=x_train[:CALIBRATION_SAMPLES])
    ptq_acc = kerasq.TFLiteModel(ptq_path).evaluate(x_test, y_test)

    qat_model = kerasq.quantize_model(float_model)
    _fit(qat_model, x_train, y_train, q_epochs, q_lr, q_cosine, logits)
    qat_path = os.path.join(workdir, f"{name}_{seed}_qat.tflite")
    kerasq.export_tflite(qat_model, qat_path)
    qat_acc = kerasq.TFLiteModel(qat_path).evaluate(x_test, y_test)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fragility is what we measure here
        ptq_floor = kerasq.verify_tflite(float_model, ptq_path, x_test).outputs[0].floor_agreement
        qat_floor = kerasq.verify_tflite(qat_model, qat_path, x_test).outputs[0].floor_agreement
    return {
        "float": float_acc,
        "ptq": ptq_acc,
        "qat": qat_acc,
        "ptq_floor": ptq_floor,
        "qat_floor": qat_floor,
        "seconds": time.perf_counter() - start,
    }


# ---- the report -------------------------------------------------------------------------------------
def _stats(values):
    points = [100 * v for v in values]
    return statistics.mean(points), max(points) - min(points)


def _cell(values):
    mean, spread = _stats(values)
    return f"{mean:.2f} ± {spread / 2:.2f}"


def summarize(name, runs):
    """Markdown rows and verdict lines for one model's runs (a list of run_one results)."""
    column = {key: [r[key] for r in runs] for key in ("float", "ptq", "qat", "ptq_floor", "qat_floor")}
    mean = {key: _stats(values)[0] for key, values in column.items()}
    qat_float, qat_ptq = mean["qat"] - mean["float"], mean["qat"] - mean["ptq"]
    per_seed = " / ".join(
        f"{100 * r['float']:.1f}, {100 * r['ptq']:.1f}, {100 * r['qat']:.1f}" for r in runs
    )
    row = (
        f"| {name} | {_cell(column['float'])} | {_cell(column['ptq'])} | {_cell(column['qat'])} "
        f"| {qat_float:+.2f} | {qat_ptq:+.2f} | {_cell(column['ptq_floor'])} | {_cell(column['qat_floor'])} "
        f"| {per_seed} |"
    )
    ge_ptq = mean["qat"] >= mean["ptq"] - 1e-9
    near_float = qat_float >= -TARGET_POINTS - 1e-9
    fragility_ok = mean["qat_floor"] >= mean["ptq_floor"] - 1e-9
    float_spread = _stats(column["float"])[1]
    lines = [
        f"- {name}: QAT >= PTQ: {'yes' if ge_ptq else 'NO'} ({qat_ptq:+.2f} points); QAT at most "
        f"{TARGET_POINTS} point below float: {'yes' if near_float else 'NO'} ({qat_float:+.2f}); QAT file no "
        f"more fragile than PTQ's: {'yes' if fragility_ok else 'NO'} (kernel paths agree on "
        f"{mean['qat_floor']:.2f}% vs {mean['ptq_floor']:.2f}%)."
    ]
    if float_spread > UNSTABLE_POINTS:
        lines.append(
            f"  Float itself is unstable across seeds on {name} (spread {float_spread:.1f} points > "
            f"{UNSTABLE_POINTS}): differences below that are within seed-to-seed noise."
        )
    return row, lines, ge_ptq and near_float and fragility_ok


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--models", default=",".join(RECIPES), help="comma-separated: " + ", ".join(RECIPES))
    parser.add_argument("--epochs", type=int, default=None, help="float epochs (default: each recipe's)")
    parser.add_argument("--qat-epochs", type=int, default=None, help="QAT epochs (default: each recipe's)")
    parser.add_argument("--output", default=os.path.join("benchmarks", "results", "qat_accuracy.md"))
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(RECIPES))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(RECIPES)}")

    rows, verdicts, all_hold = [], [], True
    with tempfile.TemporaryDirectory() as workdir:
        for name in models:
            runs = []
            for seed in seeds:
                result = run_one(name, seed, workdir, args.epochs, args.qat_epochs)
                runs.append(result)
                print(
                    f"{name} seed {seed}: float {100 * result['float']:.2f}%, PTQ {100 * result['ptq']:.2f}%, "
                    f"QAT {100 * result['qat']:.2f}%; kernel-path agreement PTQ "
                    f"{100 * result['ptq_floor']:.2f}%, QAT {100 * result['qat_floor']:.2f}% "
                    f"({result['seconds']:.0f} s)",
                    flush=True,
                )
            row, lines, holds = summarize(name, runs)
            rows.append(row)
            verdicts += lines
            all_hold = all_hold and holds

    command = "python benchmarks/qat_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = "\n".join(
        [
            "# QAT vs PTQ accuracy (int8 files run by LiteRT)",
            "",
            f"Command: `{command.strip()}`  ",
            f"Seeds: {', '.join(map(str, seeds))}  ",
            f"Machine: {machine.describe()}",
            "",
            "Accuracy in % on the held-out digits: mean ± half the spread (max - min) over the seeds. "
            "Float: the Keras model; PTQ, QAT: the int8 file run by LiteRT. Kernel-path agreement: the "
            "argmax agreement between LiteRT's kernel paths on the file (`verify_tflite`'s "
            "floor_agreement); lower means numerically more fragile.",
            "",
            "| model | float | PTQ int8 | QAT int8 | QAT - float | QAT - PTQ | kernel paths agree, PTQ "
            "| kernel paths agree, QAT | per seed (float, PTQ, QAT) |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"Targets (means over seeds): QAT int8 >= PTQ int8, QAT int8 at most {TARGET_POINTS} point below "
            "float, and the QAT file's kernel paths agree at least as often as the PTQ file's.",
            "",
            *verdicts,
            "",
            f"All targets hold: {'yes' if all_hold else 'NO'}",
            "",
        ]
    )
    print()
    print(report)
    if args.output:
        os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
        with open(args.output, "w") as f:
            f.write(report)
    return 0 if all_hold else 1


if __name__ == "__main__":
    sys.exit(main())
