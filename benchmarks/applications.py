"""keras.applications models with their built-in preprocessing, QAT on the digits, to int8 files.

For each model (built with `weights=None` at 32x32x3 and its own Rescaling/Normalization layers):
train in float on the digits (grey images repeated to RGB, pixel values 0-255), export post-training
int8, quantize with `kerasq.quantize_model`, fine-tune, export, and report for each file whether it is
fully integer, its float-tensor count beside the post-training file's, its parity with the Keras
model against the kernel-path floor, and its accuracy.

    python benchmarks/applications.py [--models MobileNetV3Small MobileNetV3Large EfficientNetB0]
        [--epochs 12] [--qat-epochs 2] [--seed 0]

Writes benchmarks/results/applications.md; rows of models not run this time are kept from the file
there, with the commands that measured them.
"""

import argparse
import os
import platform
import re
import time

import keras
import numpy as np

import kerasq
from kerasq.data import load_digits

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BUILDERS = {
    "MobileNetV3Small": lambda: keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), weights=None, classes=10, include_preprocessing=True, classifier_activation=None),
    "MobileNetV3Large": lambda: keras.applications.MobileNetV3Large(
        input_shape=(32, 32, 3), weights=None, classes=10, include_preprocessing=True, classifier_activation=None),
    "EfficientNetB0": lambda: keras.applications.EfficientNetB0(
        input_shape=(32, 32, 3), weights=None, classes=10, classifier_activation=None),
}
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _fit(model, x, y, epochs, learning_rate):
    steps = epochs * int(np.ceil(len(x) / 32))
    model.compile(keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(learning_rate, steps)), LOSS,
                  metrics=["accuracy"])
    model.fit(x, y, batch_size=32, epochs=epochs, verbose=0)
    return model


def run(name, args, data):
    (x, y), (x_test, y_test) = data
    keras.utils.set_random_seed(args.seed)
    model = BUILDERS[name]()
    for layer in model.layers:  # small data: the default 0.99/0.999 barely moves in a few hundred steps
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    _fit(model, x, y, args.epochs, 3e-3)
    float_accuracy = float(np.mean(np.argmax(model.predict(x_test, verbose=0), -1) == y_test))
    post_training = kerasq.TFLiteModel(kerasq.export_tflite(model, representative_data=x[:200]))
    qat = _fit(kerasq.quantize_model(model, calibration_data=x[:512]), x, y, args.qat_epochs, 1e-4)
    tflite = kerasq.TFLiteModel(kerasq.export_tflite(qat))
    report = kerasq.verify_tflite(qat, tflite, x_test)
    output = report.outputs[0]
    return {
        "float": float_accuracy,
        "ptq": post_training.evaluate(x_test, y_test),
        "qat": tflite.evaluate(x_test, y_test),
        "integer": tflite.is_fully_integer,
        "float_tensors": len(tflite.float_tensors),
        "ptq_float_tensors": len(post_training.float_tensors),
        "steps": output.max_diff,
        "floor": output.floor_max_diff,
        "passed": report.passed,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--qat-epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=RESULTS)
    args = parser.parse_args(argv)
    (x, y), (x_test, y_test) = load_digits(image_size=32)
    data = ((np.repeat(x, 3, -1) * 255.0, y), (np.repeat(x_test, 3, -1) * 255.0, y_test))
    import tensorflow as tf

    start = time.time()
    rows = {}
    for name in args.models:
        rows[name] = run(name, args, data)
        print(name, rows[name], flush=True)
    path = os.path.join(args.output_dir, "applications.md")
    commands, kept = _earlier_rows(path, args.models)
    commands.append(
        f"`python benchmarks/applications.py --models {' '.join(args.models)} --epochs {args.epochs} "
        f"--qat-epochs {args.qat_epochs} --seed {args.seed}`; {platform.machine()}, {os.cpu_count()} cores; "
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}; {(time.time() - start) / 60:.0f} min."
    )
    lines = [
        "# keras.applications with built-in preprocessing: QAT to int8 files",
        "",
        *(line for command in commands for line in (command, "")),
        "Digits at 32x32, grey repeated to RGB, pixel values 0-255 (the models' own Rescaling/Normalization "
        "layers scale them). Float tensors: between the file's inputs and outputs. Steps: the largest output "
        "difference between the QAT model and its file; floor: between LiteRT's kernel paths.",
        "",
        "| model | float | post-training int8 | QAT int8 | fully integer | float tensors (PTQ) | steps (floor) | parity |",
        "|---|---:|---:|---:|---|---:|---:|---|",
    ]
    measured = {}
    for name, r in rows.items():
        measured[name] = (
            f"| {name} | {r['float']:.2%} | {r['ptq']:.2%} | {r['qat']:.2%} | {'yes' if r['integer'] else 'no'} | "
            f"{r['float_tensors']} ({r['ptq_float_tensors']}) | {r['steps']:.0f} ({r['floor']:.0f}) | "
            f"{'PASS' if r['passed'] else 'FAIL'} |"
        )
    lines += [measured.get(name) or kept[name] for name in BUILDERS if name in measured or name in kept]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _earlier_rows(path, models):
    """The command lines and table rows already in `path` for models other than `models`: a run of
    some models adds or replaces their rows and keeps the others'."""
    if not os.path.exists(path):
        return [], {}
    with open(path) as f:
        lines = f.read().splitlines()
    rows = {}
    for line in lines:
        match = re.match(r"\| (\w+) \|", line)
        if match and match.group(1) in BUILDERS and match.group(1) not in models:
            rows[match.group(1)] = line
    commands = []
    for line in lines:
        match = re.match(r"`python benchmarks/applications.py --models ([\w ]+?) --", line)
        if match and set(match.group(1).split()) & set(rows):
            commands.append(line)
    return commands, rows


if __name__ == "__main__":
    main()
