"""16x8 parity with depth: how far a 16x8 file lands from its QAT model, over seeds.

For each seed and each depth (conv blocks of Conv-BN-ReLU, 16 filters), train a digits CNN in float
(`--epochs`), quantize it with `scheme="int16x8"`, train one QAT epoch and report the largest
output difference from its file in output steps, the mean difference, and
whether `verify_tflite` passes (16x8 kernel paths agree to the bit, so its bound is one step). With
`--head dense` the model ends in GlobalAveragePooling and a Dense layer (int16 MEAN and
FULLY_CONNECTED); with `--head conv` in a 1x1 conv to 10 channels and a Flatten (convolutions only).
The same for a model with a 16x8 middle block in an int8 model (`--mixed`).

    python benchmarks/int16x8_parity.py [--seeds 0 1 2 3] [--depths 2 4 6] [--head dense]

Writes benchmarks/results/int16x8_parity.md.
"""

import argparse
import os

import keras
import numpy as np

import kerasq
from kerasq.data import load_digits

from machine import describe  # benchmarks/machine.py

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
L = keras.layers


def build(depth, head):
    layers = [keras.Input((8, 8, 1))]
    for _ in range(depth):
        layers += [L.Conv2D(16, 3, padding="same", use_bias=False), L.BatchNormalization(), L.ReLU()]
    if head == "dense":
        layers += [L.GlobalAveragePooling2D(), L.Dense(10)]
    else:
        layers += [L.Conv2D(10, 8), L.Flatten()]
    return keras.Sequential(layers)


def measure(seed, depth, head, mixed, x, y, x_test):
    keras.utils.set_random_seed(seed)
    model = build(depth, head)
    model.compile("adam", LOSS)
    model.fit(x, y, epochs=3, verbose=0)
    if mixed:  # the middle block at 16x8, the rest int8
        middle = [layer.name for layer in model.layers][3 * (depth // 2): 3 * (depth // 2) + 3]
        qat = kerasq.quantize_model(model, layer_schemes={name: "int16x8" for name in middle})
    else:
        qat = kerasq.quantize_model(model, scheme="int16x8")
    qat.compile(keras.optimizers.Adam(1e-4), LOSS)
    qat.fit(x, y, epochs=1, verbose=0)
    report = kerasq.verify_tflite(qat, kerasq.export_tflite(qat), x_test)
    (output,) = report.outputs
    return output.max_diff, output.mean_diff, output.floor_max_diff, report.passed, output.unit


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 6])
    parser.add_argument("--head", choices=["dense", "conv"], default="dense")
    parser.add_argument("--mixed", action="store_true")
    args = parser.parse_args()
    (x, y), (x_test, _) = load_digits()
    lines = [
        "# 16x8 parity with depth",
        "",
        f"`python benchmarks/int16x8_parity.py --seeds {' '.join(map(str, args.seeds))} --depths "
        f"{' '.join(map(str, args.depths))} --head {args.head}{' --mixed' if args.mixed else ''}`",
        "",
        describe(),
        "",
        "| blocks | seed | max difference | mean difference | floor | verify |",
        "|---|---|---|---|---|---|",
    ]
    for depth in args.depths:
        for seed in args.seeds:
            max_diff, mean_diff, floor, passed, unit = measure(seed, depth, args.head, args.mixed, x, y, x_test)
            row = f"| {depth} | {seed} | {max_diff:.2f} {unit} | {mean_diff:.3f} | {floor:.0f} | {'PASS' if passed else 'FAIL'} |"
            print(row, flush=True)
            lines.append(row)
    suffix = ("_mixed" if args.mixed else "") + ("" if args.head == "dense" else f"_{args.head}")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"int16x8_parity{suffix}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
