"""Does distillation help a small int8 student? Digits, the same student trained alone vs distilled.

For each seed: train the teacher (the demo's digits CNN, float, 12 epochs). Build a small student
(Conv 4 filters, max pooling, Dense: about 1/20 of the teacher's weights) with the seed's initial
weights twice:
- alone: `epochs` float epochs on the labels, then `quantize_model` and `qat_epochs` QAT epochs on the labels;
- distilled: the same epochs through `kerasq.Distiller(teacher, student, temperature, alpha)`, then the
  QAT student through a second Distiller for the same QAT epochs.
Both int8 files are exported and scored by LiteRT on the digits test set (450 images).

    python benchmarks/distillation.py [--seeds 0 1 2 3 4] [--temperature 4] [--alpha 0.1]
"""

import argparse
import os
import statistics
import time

import keras
import numpy as np

import kerasq
from kerasq.data import load_digits
from kerasq.demo import BATCH_SIZE, LEARNING_RATE, QAT_LEARNING_RATE, build_model

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def student():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, padding="same", name="s_conv")(inputs)
    x = keras.layers.ReLU(name="s_relu")(x)
    x = keras.layers.MaxPooling2D(name="s_pool")(x)
    x = keras.layers.Flatten(name="s_flatten")(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="s_logits")(x), name="student")


def _train(model, x, y, epochs, lr, teacher=None, args=None):
    if teacher is None:
        model.compile(keras.optimizers.Adam(lr), LOSS)
        model.fit(x, y, batch_size=BATCH_SIZE, epochs=epochs, verbose=0)
        return model
    distiller = kerasq.Distiller(teacher, model, temperature=args.temperature, alpha=args.alpha)
    distiller.compile(keras.optimizers.Adam(lr), loss=LOSS)
    distiller.fit(x, y, batch_size=BATCH_SIZE, epochs=epochs, verbose=0)
    return distiller.student


def _int8_accuracy(qat, x_test, y_test):
    tflite = kerasq.TFLiteModel(kerasq.export_tflite(qat))
    assert tflite.is_fully_integer
    return float(np.mean(np.argmax(tflite.predict(x_test), -1) == y_test))


def run_seed(seed, args):
    (x, y), (x_test, y_test) = load_digits()
    keras.utils.set_random_seed(seed)
    teacher = build_model()
    teacher.compile(keras.optimizers.Adam(LEARNING_RATE), LOSS)
    teacher.fit(x, y, batch_size=BATCH_SIZE, epochs=12, verbose=0)
    teacher_accuracy = float(np.mean(np.argmax(teacher.predict(x_test, verbose=0), -1) == y_test))
    keras.utils.set_random_seed(1000 + seed)
    initial = student().get_weights()
    result = {"teacher": teacher_accuracy, "teacher_params": teacher.count_params()}
    for mode, source in (("alone", None), ("distilled", teacher)):
        keras.utils.set_random_seed(2000 + seed)  # the same batches for both
        model = student()
        model.set_weights(initial)
        result["student_params"] = model.count_params()
        model = _train(model, x, y, args.epochs, LEARNING_RATE, source, args)
        result[f"{mode}_float"] = float(np.mean(np.argmax(model.predict(x_test, verbose=0), -1) == y_test))
        qat = _train(kerasq.quantize_model(model), x, y, args.qat_epochs, QAT_LEARNING_RATE, source, args)
        result[f"{mode}_int8"] = _int8_accuracy(qat, x_test, y_test)
    return result


def _stats(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(results, args):
    lines = [
        "# Distillation: a small int8 student, alone vs distilled",
        "",
        f"`python benchmarks/distillation.py --seeds {' '.join(map(str, args.seeds))} --temperature {args.temperature} "
        f"--alpha {args.alpha} --epochs {args.epochs} --qat_epochs {args.qat_epochs}` (Keras {keras.__version__}, CPU).",
        "",
        f"Teacher: the demo's digits CNN ({results[0]['teacher_params']:,} weights, float, 12 epochs). Student: "
        f"Conv(4) + max pooling + Dense ({results[0]['student_params']:,} weights), the same initial weights and "
        f"batches in both runs: {args.epochs} float epochs then {args.qat_epochs} QAT epochs, on the labels alone or "
        f"through `kerasq.Distiller` (temperature {args.temperature}, alpha {args.alpha} on the labels). Accuracy on "
        f"the digits test set (450 images): the teacher in Keras, the students' int8 files in LiteRT; mean ± standard "
        f"deviation over {len(results)} seeds.",
        "",
        "| model | accuracy (mean ± std) | per seed |",
        "|---|---|---|",
    ]
    rows = [("teacher (float)", "teacher"), ("student alone, float", "alone_float"),
            ("student distilled, float", "distilled_float"), ("student alone, int8 file", "alone_int8"),
            ("student distilled, int8 file", "distilled_int8")]
    for title, key in rows:
        values = [r[key] for r in results]
        mean, std = _stats(values)
        lines.append(f"| {title} | {mean:.2%} ± {std:.2%} | {', '.join(f'{v:.1%}' for v in values)} |")
    gains = [r["distilled_int8"] - r["alone_int8"] for r in results]
    mean, std = _stats(gains)
    wins = sum(g > 0 for g in gains)
    ties = sum(g == 0 for g in gains)
    lines += [
        "",
        f"Distilled minus alone (int8 files): {mean:+.2%} ± {std:.2%} (per seed: "
        f"{', '.join(f'{g:+.1%}' for g in gains)}; better in {wins} of {len(gains)} seeds, equal in {ties}).",
        "",
        _verdict(mean, std, len(gains)),
        "",
    ]
    return "\n".join(lines)


def _verdict(mean, std, n):
    # One test image is 0.22%; a difference within two standard errors of the per-seed gains is noise.
    standard_error = std / max(n, 1) ** 0.5
    if mean > 2 * standard_error and mean > 0.0022:
        return (f"Distillation helped here: the mean gain is more than twice its standard error "
                f"({standard_error:.2%}).")
    if mean < -2 * standard_error and mean < -0.0022:
        return f"Distillation hurt here: the mean loss is more than twice its standard error ({standard_error:.2%})."
    return (f"No clear effect: the mean difference is within two standard errors ({standard_error:.2%}) or under "
            "one test image, so these runs do not show that distillation helped this student.")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--qat_epochs", type=int, default=3)
    parser.add_argument("--output", default=os.path.join(RESULTS, "distillation.md"))
    args = parser.parse_args()
    results, start = [], time.time()
    for seed in args.seeds:
        results.append(run_seed(seed, args))
        print(f"seed {seed}: {results[-1]} ({time.time() - start:.0f} s)", flush=True)
    text = table(results, args)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
