"""Lower weight bit widths: post-training quantization against QAT at 8, 4, 3 and 2-bit weights.

For each seed: train a model in float (`--model`: the demo's digits CNN, `kerasq.demo.build_model()`,
or keras.applications.MobileNetV2 at alpha 0.35 with random initial weights, on the digits upsampled
to 32x32), then for each weight bit width b and each weight range ("max", "mse": estimated from the
weights at every step; "lsq": a learned step per channel, `WeightQuantizer(learn_scale=True)`,
started from "mse"):
- post-training: `quantize_model(model, scheme, calibration_data=x)` with no training step, exported;
- QAT: the same model trained `--qat-epochs` epochs (Adam, cosine decay from `--qat-lr`), exported;
and report the int8 file's test accuracy (mean and spread over the seeds), its parity with the
Keras model (max output-step difference) and its size. Activations stay 8-bit.

    python benchmarks/low_bit_weights.py [--seeds 0 1 2] [--epochs 12] [--qat-epochs 4]
    python benchmarks/low_bit_weights.py --model mobilenet_v2

Writes benchmarks/results/low_bit_weights.md and low_bit_weights.png (with matplotlib), or
low_bit_weights_mobilenet_v2.md/.png.
"""

import argparse
import os
import platform
import statistics
import time

import keras
import numpy as np

import kerasq
from kerasq.data import load_digits
from kerasq.demo import BATCH_SIZE, LEARNING_RATE, build_model

from models import mobilenet_v2  # benchmarks/models.py
from plotting import pyplot  # benchmarks/plotting.py

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# WeightQuantizer arguments of each row: "lsq" learns its steps (LSQ), starting from the MSE clipping.
QUANTIZERS = {"max": {"estimator": "max"}, "mse": {"estimator": "mse"},
              "lsq": {"estimator": "mse", "learn_scale": True}}
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


# Per model: its builder, the digits' image size, and the defaults of the options.
MODELS = {
    "digits_cnn": dict(title="The demo's digits CNN", build=build_model, image_size=8, epochs=12,
                       lr=LEARNING_RATE, qat_epochs=4, qat_lr=1e-3, bits=(8, 4, 3, 2),
                       estimators=("max", "mse", "lsq"), parity_samples=None),
    "mobilenet_v2": dict(title="keras.applications.MobileNetV2 (alpha 0.35, weights=None) on the digits at 32x32",
                         build=lambda: mobilenet_v2((32, 32, 1)), image_size=32, epochs=15, lr=3e-3, qat_epochs=3, qat_lr=1e-3,
                         bits=(8, 4, 2), estimators=("max",),
                         parity_samples=150),  # the reference kernels take seconds per MobileNetV2 image batch
}


def _fit(model, x, y, epochs, learning_rate):
    steps = epochs * int(np.ceil(len(x) / BATCH_SIZE))
    model.compile(keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(learning_rate, steps)), LOSS)
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=epochs, verbose=0)
    return model


def _file_figures(qat, x_test, y_test, parity_samples=None):
    content = kerasq.export_tflite(qat)
    tflite = kerasq.TFLiteModel(content)
    report = kerasq.verify_tflite(qat, tflite, x_test[:parity_samples])
    return {"accuracy": tflite.evaluate(x_test, y_test), "max_steps": report.outputs[0].max_diff,
            "passed": report.passed, "size_kb": len(content) / 1024}


def run(args):
    spec = MODELS[args.model]
    (x, y), (x_test, y_test) = load_digits(image_size=spec["image_size"])
    rows = {}  # (bits, estimator, "ptq"/"qat") -> [figures per seed]
    floats = []
    for seed in args.seeds:
        keras.utils.set_random_seed(seed)
        model = _fit(spec["build"](), x, y, args.epochs, spec["lr"])
        floats.append(float(np.mean(np.argmax(model.predict(x_test, verbose=0), -1) == y_test)))
        for bits in args.bits:
            for estimator in args.estimators:
                scheme = kerasq.QuantizationScheme(weights=kerasq.WeightQuantizer(bits=bits, **QUANTIZERS[estimator]))
                qat = kerasq.quantize_model(model, scheme, calibration_data=x)
                rows.setdefault((bits, estimator, "ptq"), []).append(_file_figures(qat, x_test, y_test, spec["parity_samples"]))
                keras.utils.set_random_seed(seed)
                _fit(qat, x, y, args.qat_epochs, args.qat_lr)
                rows.setdefault((bits, estimator, "qat"), []).append(_file_figures(qat, x_test, y_test, spec["parity_samples"]))
                if bits <= 4:  # the same trained weights, stored as packed INT4
                    packed = kerasq.quantize_model(model, kerasq.QuantizationScheme(
                        weights=kerasq.WeightQuantizer(bits=bits, **QUANTIZERS[estimator], packed_int4=True)))
                    packed.set_weights(qat.get_weights())
                    rows.setdefault((bits, estimator, "int4"), []).append(_file_figures(packed, x_test, y_test, spec["parity_samples"]))
                print(bits, estimator, rows[(bits, estimator, "ptq")][-1]["accuracy"],
                      rows[(bits, estimator, "qat")][-1]["accuracy"], flush=True)
    return floats, rows


def _mean_spread(values):
    return statistics.mean(values), (max(values) - min(values)) / 2


def table(floats, rows, args, seconds):
    import tensorflow as tf

    mean, spread = _mean_spread(floats)
    lines = [
        "# Lower weight bit widths: post-training quantization against QAT",
        "",
        f"`python benchmarks/low_bit_weights.py --model {args.model} --seeds {' '.join(map(str, args.seeds))} "
        f"--epochs {args.epochs} --bits {' '.join(map(str, args.bits))} --estimators {' '.join(args.estimators)} "
        f"--qat-epochs {args.qat_epochs} --qat-lr {args.qat_lr}`; {platform.machine()}, {os.cpu_count()} cores; "
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}; {seconds / 60:.0f} min.",
        "",
        f"{MODELS[args.model]['title']}, float accuracy {mean:.2%} (± {spread:.2%}). Each cell: the exported file's test "
        "accuracy on the 450 digits test images, mean ± half the range over the seeds. Post-training: the QAT "
        "model with its ranges calibrated on the training data and no training step. QAT: the same, trained "
        f"{args.qat_epochs} epochs. Parity: the largest output-step difference between each Keras model and its "
        f"file, over all seeds, on {MODELS[args.model]['parity_samples'] or 'all'} test images (the kernel-path "
        "floor is 1 step); all files passed verify_tflite unless marked. "
        "Weights are stored as int8 (2^b - 1 levels); the INT4 columns store the QAT model's weights as packed "
        "INT4 (`WeightQuantizer(packed_int4=True)`) instead, whose kernels LiteRT does not compute exactly. "
        "Range: max and mse estimate each step from the weights (`WeightQuantizer(estimator=...)`); lsq learns it "
        "(`WeightQuantizer(estimator=\"mse\", learn_scale=True)`: LSQ, its steps started from the MSE clipping, "
        "so its post-training model is mse's).",
        "",
        "| weight bits | range | file KB | post-training | QAT | QAT gain | max steps | INT4 file KB | INT4 accuracy | INT4 max steps |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for bits in args.bits:
        for estimator in args.estimators:
            ptq, qat = rows[(bits, estimator, "ptq")], rows[(bits, estimator, "qat")]
            ptq_mean, ptq_spread = _mean_spread([r["accuracy"] for r in ptq])
            qat_mean, qat_spread = _mean_spread([r["accuracy"] for r in qat])
            steps = max(r["max_steps"] for r in ptq + qat)
            failed = sum(not r["passed"] for r in ptq + qat)
            packed = rows.get((bits, estimator, "int4"))
            if packed:
                packed_mean, packed_spread = _mean_spread([r["accuracy"] for r in packed])
                packed_failed = sum(not r["passed"] for r in packed)
                packed_cells = (
                    f"{packed[0]['size_kb']:.1f} | {packed_mean:.2%} ± {packed_spread:.2%} | "
                    f"{max(r['max_steps'] for r in packed):.0f}{f' ({packed_failed} failed)' if packed_failed else ''}"
                )
            else:
                packed_cells = "– | – | –"
            lines.append(
                f"| {bits} | {estimator} | {qat[0]['size_kb']:.1f} | {ptq_mean:.2%} ± {ptq_spread:.2%} | "
                f"{qat_mean:.2%} ± {qat_spread:.2%} | {qat_mean - ptq_mean:+.2%} | {steps:.0f}"
                f"{f' ({failed} failed)' if failed else ''} | {packed_cells} |"
            )
    return "\n".join(lines) + "\n"


def plot(rows, args, path):
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for estimator, style in zip(args.estimators, ("-", "--", ":")):
        for kind, color in (("ptq", "tab:gray"), ("qat", "tab:blue")):
            if kind == "ptq" and estimator == "lsq":
                continue  # mse's: the learned steps start there
            means = [statistics.mean(r["accuracy"] for r in rows[(b, estimator, kind)]) for b in args.bits]
            ax.plot(args.bits, means, style, marker="o", color=color, label=f"{'post-training' if kind == 'ptq' else 'QAT'}, {estimator}")
    ax.set_xlabel("weight bits")
    ax.set_ylabel("int8 file test accuracy")
    ax.invert_xaxis()
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="digits_cnn")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, help="float training epochs (default: the model's)")
    parser.add_argument("--qat-epochs", type=int, help="QAT epochs (default: the model's)")
    parser.add_argument("--qat-lr", type=float, help="QAT learning rate (default: the model's)")
    parser.add_argument("--bits", type=int, nargs="+", help="weight bit widths (default: the model's)")
    parser.add_argument("--estimators", nargs="+", choices=sorted(QUANTIZERS), help="weight ranges (default: the model's)")
    parser.add_argument("--output-dir", default=RESULTS)
    args = parser.parse_args(argv)
    spec = MODELS[args.model]
    for option in ("epochs", "qat_epochs", "qat_lr", "bits", "estimators"):
        if getattr(args, option) is None:
            setattr(args, option, spec[option])
    start = time.time()
    floats, rows = run(args)
    text = table(floats, rows, args, time.time() - start)
    print(text)
    os.makedirs(args.output_dir, exist_ok=True)
    stem = "low_bit_weights" if args.model == "digits_cnn" else f"low_bit_weights_{args.model}"
    with open(os.path.join(args.output_dir, f"{stem}.md"), "w") as f:
        f.write(text)
    plot(rows, args, os.path.join(args.output_dir, f"{stem}.png"))


if __name__ == "__main__":
    main()
