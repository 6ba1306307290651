"""Accuracy of the demo's digits CNN pruned to 50/80/90% unstructured sparsity and to 2:4, against float.

For each seed: train `kerasq.demo.build_model()` in float (the demo's 12 epochs), then from those
weights fine-tune (a) the float model itself and (b) `kerasq.prune_low_magnitude(model, ...)` for the
same number of epochs, strip the pruning and measure test accuracy. Unstructured runs ramp the sparsity
with `PolynomialDecay` over the first half of the fine-tune (every kernel alike, or, as tfmot advises,
with the first conv and the head left dense); 2:4 prunes once at the start. Writes a
markdown table (mean and spread over the seeds) and an accuracy-vs-sparsity plot.

    python benchmarks/pruning_accuracy.py [--seeds 0 1 2] [--epochs 12] [--finetune-epochs 16]

The plot needs matplotlib (`pip install -e ".[benchmarks]"`); without it only the table is written.
"""

import argparse
import math
import os
import statistics
import time

import keras
import numpy as np

import kerasq
from kerasq.data import load_digits
from kerasq.demo import BATCH_SIZE, LEARNING_RATE, build_model

from plotting import pyplot  # benchmarks/plotting.py

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FINETUNE_LEARNING_RATE = LEARNING_RATE
UNSTRUCTURED = (0.5, 0.8, 0.9)
FIRST_AND_LAST = ("block1_conv", "logits")


def _compile(model, learning_rate):
    model.compile(
        keras.optimizers.Adam(learning_rate),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def _accuracy(model, x, y):
    return float(np.mean(np.argmax(model.predict(x, batch_size=256, verbose=0), -1) == y))


def _kernel_sparsity(model):
    """The fraction of zeros over every Conv/Dense kernel of a plain model."""
    kernels = [np.asarray(layer.kernel) for layer in model.layers if hasattr(layer, "kernel")]
    return float(sum(np.sum(k == 0) for k in kernels) / sum(k.size for k in kernels))


def _finetune(float_model, data, epochs, prune_options):
    (x, y), (x_test, y_test) = data
    if prune_options is None:
        model = keras.models.clone_model(float_model)
        model.set_weights(float_model.get_weights())
        _compile(model, FINETUNE_LEARNING_RATE).fit(x, y, batch_size=BATCH_SIZE, epochs=epochs, verbose=0)
        return _accuracy(model, x_test, y_test), _kernel_sparsity(model)
    pruned = _compile(kerasq.prune_low_magnitude(float_model, **prune_options), FINETUNE_LEARNING_RATE)
    pruned.fit(x, y, batch_size=BATCH_SIZE, epochs=epochs, verbose=0, callbacks=[kerasq.UpdatePruningStep()])
    stripped = kerasq.strip_pruning(pruned)
    return _accuracy(stripped, x_test, y_test), _kernel_sparsity(stripped)


def configurations(float_model, finetune_steps):
    ramp_end = int(0.5 * finetune_steps) // 10 * 10  # a multiple of the frequency: the last update hits the target

    def ramp(sparsity):
        return kerasq.PolynomialDecay(0.0, sparsity, begin_step=0, end_step=ramp_end, frequency=10)

    configs = {"float (fine-tuned alike)": None}
    for sparsity in UNSTRUCTURED:
        configs[f"{sparsity:.0%} unstructured"] = {"pruning_schedule": ramp(sparsity)}
    # tfmot's advice: leave the first and last layers dense. The middle convs then take more zeros so
    # that 80% of all kernel weights are zero, as in the row above.
    sizes = {layer.name: int(np.prod(layer.kernel.shape)) for layer in float_model.layers if hasattr(layer, "kernel")}
    kept_dense = [FIRST_AND_LAST[0], FIRST_AND_LAST[1]]
    middle = sum(size for name, size in sizes.items() if name not in kept_dense)
    configs["80% unstructured, first conv and head dense"] = {
        "pruning_schedule": ramp(0.8 * sum(sizes.values()) / middle),
        "skip": kept_dense,
    }
    configs["2:4"] = {"pruning_schedule": kerasq.ConstantSparsity(0.5, begin_step=0, end_step=0), "sparsity_m_by_n": (2, 4)}
    return configs


def run(seeds, epochs, finetune_epochs, log=print):
    data = load_digits()
    (x, y), (x_test, y_test) = data
    finetune_steps = finetune_epochs * math.ceil(len(x) / BATCH_SIZE)
    results = {}  # name -> list of (accuracy, sparsity)
    for seed in seeds:
        start = time.perf_counter()
        keras.utils.set_random_seed(seed)
        float_model = _compile(build_model(), LEARNING_RATE)
        float_model.fit(x, y, batch_size=BATCH_SIZE, epochs=epochs, verbose=0)
        results.setdefault("float", []).append((_accuracy(float_model, x_test, y_test), 0.0))
        for name, options in configurations(float_model, finetune_steps).items():
            keras.utils.set_random_seed(seed)
            results.setdefault(name, []).append(_finetune(float_model, data, finetune_epochs, options))
        log(f"seed {seed}: " + ", ".join(f"{name} {runs[-1][0]:.2%}" for name, runs in results.items())
            + f" ({time.perf_counter() - start:.0f} s)")
    return results


def table(results, seeds, epochs, finetune_epochs):
    float_mean = statistics.mean(acc for acc, _ in results["float"])
    lines = [
        f"Digits CNN (`kerasq.demo.build_model`), {len(seeds)} seeds ({', '.join(map(str, seeds))}), float "
        f"{epochs} epochs, then {finetune_epochs} fine-tune epochs; test accuracy of the stripped model on 450 "
        "test images (one image = 0.22 points). Spread = max - min over the seeds.",
        "",
        "| model | kernel sparsity | accuracy (mean) | spread | vs float (points) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, runs in results.items():
        accuracies = [acc for acc, _ in runs]
        mean = statistics.mean(accuracies)
        sparsity = statistics.mean(s for _, s in runs)
        lines.append(
            f"| {name} | {sparsity:.1%} | {mean:.2%} | {max(accuracies) - min(accuracies):.2%} | "
            f"{100 * (mean - float_mean):+.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results, path):
    plt = pyplot()
    if plt is None:
        return False
    figure, axes = plt.subplots(figsize=(6, 4))
    float_mean = statistics.mean(acc for acc, _ in results["float"])
    names = ["float (fine-tuned alike)"] + [f"{s:.0%} unstructured" for s in UNSTRUCTURED]
    sparsities = [statistics.mean(s for _, s in results[n]) for n in names]
    means = [statistics.mean(a for a, _ in results[n]) for n in names]
    lows = [m - min(a for a, _ in results[n]) for m, n in zip(means, names)]
    highs = [max(a for a, _ in results[n]) - m for m, n in zip(means, names)]
    axes.errorbar(sparsities, means, yerr=[lows, highs], marker="o", capsize=3, label="unstructured (magnitude)")
    for name, marker in (("80% unstructured, first conv and head dense", "^"), ("2:4", "s")):
        runs = results[name]
        mean = statistics.mean(a for a, _ in runs)
        axes.errorbar([statistics.mean(s for _, s in runs)], [mean],
                      yerr=[[mean - min(a for a, _ in runs)], [max(a for a, _ in runs) - mean]],
                      marker=marker, capsize=3, linestyle="none", label=name)
    axes.axhline(float_mean, color="grey", linestyle="--", label="float")
    axes.axhline(float_mean - 0.01, color="grey", linestyle=":", label="float - 1 point")
    axes.set_xlabel("fraction of Conv/Dense kernel weights that are zero")
    axes.set_ylabel("test accuracy (mean, min-max over seeds)")
    axes.set_title("Digits CNN: accuracy vs sparsity")
    axes.legend(loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--finetune-epochs", type=int, default=16)
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args()
    results = run(args.seeds, args.epochs, args.finetune_epochs)
    os.makedirs(args.output, exist_ok=True)
    markdown = table(results, args.seeds, args.epochs, args.finetune_epochs)
    with open(os.path.join(args.output, "pruning_accuracy.md"), "w") as f:
        f.write("# Pruning accuracy\n\n" + markdown)
    print(markdown)
    png = os.path.join(args.output, "pruning_accuracy.png")
    print(f"plot: {png}" if plot(results, png) else "matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
