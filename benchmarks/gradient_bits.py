"""Test accuracy of the demo's digits CNN trained with gradients quantized to 8, 6, 4 and 2 bits, against float.

For each seed and each gradient width: train `kerasq.demo.build_model()` (Conv-BatchNorm-ReLU blocks)
from the same initial weights with Adam at the demo's learning rate, its gradients passed through
`kerasq.QuantizedGradients(adam, bits=...)` (stochastic rounding; 32 means the plain optimizer), then
measure test accuracy. `--nearest-bits` adds rows that round to the nearest level instead (at 4 and 2
bits by default: 2 bits is where the rounding starts to matter on this task). Writes a
markdown table (mean and spread over the seeds) and an accuracy-vs-bits plot.

    python benchmarks/gradient_bits.py [--seeds 0 1 2] [--bits 32 8 6 4 2] [--nearest-bits 4 2] [--epochs 8]

The plot needs matplotlib (`pip install -e ".[benchmarks]"`); without it only the table is written.
"""

import argparse
import os
import statistics
import sys
import time

import keras
import numpy as np

import kerasq
from kerasq.data import load_digits
from kerasq.demo import BATCH_SIZE, LEARNING_RATE, build_model

import machine  # benchmarks/machine.py
from plotting import pyplot  # benchmarks/plotting.py

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FLOAT_BITS = 32


def train(seed, bits, stochastic_rounding, epochs, data):
    """Test accuracy and seconds per epoch of one run."""
    (x, y), (x_test, y_test) = data
    keras.utils.set_random_seed(seed)  # the same initial weights and batches at every width
    model = build_model()
    optimizer = keras.optimizers.Adam(LEARNING_RATE)
    if bits != FLOAT_BITS:
        optimizer = kerasq.QuantizedGradients(optimizer, bits=bits, stochastic_rounding=stochastic_rounding, seed=seed)
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    start = time.perf_counter()
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=epochs, verbose=0)
    seconds_per_epoch = (time.perf_counter() - start) / epochs
    predictions = model.predict(x_test, batch_size=256, verbose=0)
    return float(np.mean(np.argmax(predictions, -1) == y_test)), seconds_per_epoch


def row_name(bits, stochastic_rounding):
    if bits == FLOAT_BITS:
        return "float32 (plain Adam)"
    return f"{bits} bits, " + ("stochastic rounding" if stochastic_rounding else "round-to-nearest")


def run(seeds, bits_list, nearest_bits, epochs, log=print):
    data = load_digits()
    configs = [(bits, True) for bits in bits_list] + [(bits, False) for bits in nearest_bits]
    results = {row_name(*config): [] for config in configs}  # name -> [(accuracy, seconds per epoch)]
    for seed in seeds:
        for config in configs:
            results[row_name(*config)].append(train(seed, *config, epochs, data))
        log(f"seed {seed}: " + ", ".join(f"{name} {runs[-1][0]:.2%}" for name, runs in results.items()))
    return results


def table(results, seeds, epochs, command):
    float_name = row_name(FLOAT_BITS, True)
    float_mean = statistics.mean(acc for acc, _ in results[float_name]) if float_name in results else None
    lines = [
        "# Gradient quantization: accuracy against gradient bits",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine.describe()}",
        "",
        f"Digits CNN (`kerasq.demo.build_model`), Adam {LEARNING_RATE}, batch {BATCH_SIZE}, {epochs} epochs from "
        f"the same initial weights at every width; {len(seeds)} seeds ({', '.join(map(str, seeds))}). Gradients "
        "quantized per tensor, symmetric, by `kerasq.QuantizedGradients`. Test accuracy on 450 images (one "
        "image = 0.22 points). Spread = max - min over the seeds; s/epoch: wall time of `fit` over the epochs, "
        "tracing included.",
        "",
        "| gradients | accuracy (mean) | spread | vs float (points) | per seed | s/epoch |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, runs in results.items():
        accuracies = [acc for acc, _ in runs]
        mean = statistics.mean(accuracies)
        versus = "" if float_mean is None else f"{100 * (mean - float_mean):+.2f}"
        per_seed = ", ".join(f"{acc:.2%}" for acc in accuracies)
        seconds = statistics.mean(s for _, s in runs)
        lines.append(
            f"| {name} | {mean:.2%} | {max(accuracies) - min(accuracies):.2%} | {versus} | {per_seed} | {seconds:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results, bits_list, nearest_bits, path):
    plt = pyplot()
    if plt is None:
        return False
    figure, axes = plt.subplots(figsize=(6, 4))
    for stochastic_rounding, widths, marker in ((True, bits_list, "o"), (False, nearest_bits, "s")):
        widths = sorted(bits for bits in widths if bits != FLOAT_BITS)
        if not widths:
            continue
        runs = [[acc for acc, _ in results[row_name(bits, stochastic_rounding)]] for bits in widths]
        means = [statistics.mean(accs) for accs in runs]
        spread = [[m - min(a) for m, a in zip(means, runs)], [max(a) - m for m, a in zip(means, runs)]]
        label = "stochastic rounding" if stochastic_rounding else "round-to-nearest"
        axes.errorbar(widths, means, yerr=spread, marker=marker, capsize=3, label=label)
    float_name = row_name(FLOAT_BITS, True)
    if float_name in results:
        float_mean = statistics.mean(acc for acc, _ in results[float_name])
        axes.axhline(float_mean, color="grey", linestyle="--", label="float32 gradients")
        axes.axhline(float_mean - 0.01, color="grey", linestyle=":", label="float - 1 point")
    axes.set_xticks(sorted(set(bits_list + nearest_bits) - {FLOAT_BITS}))
    axes.set_xlabel("gradient bits (per tensor, symmetric)")
    axes.set_ylabel("test accuracy (mean, min-max over seeds)")
    axes.set_title("Digits CNN: accuracy vs gradient bits")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--bits", type=int, nargs="+", default=[32, 8, 6, 4, 2], help="32: float gradients")
    parser.add_argument("--nearest-bits", type=int, nargs="*", default=[4, 2], help="widths also run round-to-nearest")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args()
    for bits in args.bits + args.nearest_bits:
        if bits != FLOAT_BITS:
            kerasq.quantization.gradients.check_bits(bits)
    results = run(args.seeds, args.bits, args.nearest_bits, args.epochs)
    os.makedirs(args.output, exist_ok=True)
    command = " ".join(["python benchmarks/gradient_bits.py", *sys.argv[1:]])
    markdown = table(results, args.seeds, args.epochs, command)
    with open(os.path.join(args.output, "gradient_bits.md"), "w") as f:
        f.write(markdown)
    print(markdown)
    png = os.path.join(args.output, "gradient_bits.png")
    print(f"plot: {png}" if plot(results, args.bits, args.nearest_bits, png) else "matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
