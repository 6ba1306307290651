"""Weight clustering: gzip size and accuracy of 16- and 8-cluster .tflite files next to the dense one.

For each model and seed: train in float, then
- dense: export the float model (float32 file) and a QAT fine-tune of it (`kerasq.quantize_model`, int8 file);
- k clusters (16, 8): `kerasq.cluster_weights(model, k)` (k-means++, per tensor, every Conv/Depthwise/Dense
  kernel), fine-tuned, `strip_clustering` -> float32 file; then
  `kerasq.clustering.quantize_preserving_clusters` fine-tuned the same way as the dense QAT -> int8 file.
Accuracy is measured on the files with the LiteRT interpreter (digits test set, 450 images); sizes are
`gzip -9` of the whole file. The int8 files are also read back to count the distinct int8 codes per
output channel of every kernel (at most k when the clusters survived QAT).

Models: the demo's digits CNN (8x8) and MobileNetV2 (alpha 0.35, weights=None) on the digits upsampled
to 32x32 with the channel repeated to 3, BatchNorm momentum 0.9.

    python benchmarks/clustering.py [--seeds 0 1 2] [--models cnn mobilenet]
"""

import argparse
import gzip
import os
import statistics
import time

import keras
import numpy as np

import kerasq
from kerasq.clustering import distinct_values, quantize_preserving_clusters, tflite_weights
from kerasq.export.flatbuffer import read_graph
from kerasq.data import load_digits
from kerasq.demo import BATCH_SIZE, build_model

from models import mobilenet_v2  # benchmarks/models.py

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CLUSTERS = (16, 8)
SETTINGS = {
    # model: (build, data, float epochs, float lr, cluster epochs, cluster lr, qat epochs, qat lr)
    "cnn": dict(title="digits CNN (8x8)", epochs=12, lr=3e-3, cluster_epochs=3, cluster_lr=5e-4, qat_epochs=2, qat_lr=3e-4),
    "mobilenet": dict(title="MobileNetV2 0.35 (32x32x3)", epochs=15, lr=3e-3, cluster_epochs=3, cluster_lr=5e-4,
                      qat_epochs=2, qat_lr=3e-4),
}


def data_for(name):
    if name == "cnn":
        return load_digits(), build_model
    (x, y), (x_test, y_test) = load_digits(image_size=32)
    return ((np.repeat(x, 3, -1), y), (np.repeat(x_test, 3, -1), y_test)), lambda: mobilenet_v2((32, 32, 3))


def _compile(model, lr):
    model.compile(keras.optimizers.Adam(lr), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def _fit(model, data, epochs, lr):
    (x, y), _ = data
    _compile(model, lr).fit(x, y, batch_size=BATCH_SIZE, epochs=epochs, verbose=0)
    return model


def _measure(content, data):
    _, (x_test, y_test) = data
    tflite = kerasq.TFLiteModel(content)
    accuracy = float(np.mean(np.argmax(tflite.predict(x_test), -1) == y_test))
    codes = None
    kernels = tflite_weights(content)
    infos = {info.name: info for info in read_graph(bytes(content)).tensors}
    counts = [
        # Per output channel: the axis the file quantizes per channel (3 for depthwise kernels).
        distinct_values(w, axis=infos[name].quantized_dimension if len(infos[name].scales) > 1 else None)
        for name, w in kernels.items() if w.dtype == np.int8
    ]
    if counts:
        codes = max(counts)
    return dict(gzip=len(gzip.compress(bytes(content), 9)), size=len(content), accuracy=accuracy, codes=codes)


def run_seed(name, seed, log=print):
    s = SETTINGS[name]
    data, build = data_for(name)
    keras.utils.set_random_seed(seed)
    model = _fit(build(), data, s["epochs"], s["lr"])
    rows = {}
    rows[("dense", "float32")] = _measure(kerasq.export_tflite(model), data)
    qat = _fit(kerasq.quantize_model(model), data, s["qat_epochs"], s["qat_lr"])
    rows[("dense", "int8")] = _measure(kerasq.export_tflite(qat), data)
    for k in CLUSTERS:
        clustered = _fit(kerasq.cluster_weights(model, k), data, s["cluster_epochs"], s["cluster_lr"])
        plain = kerasq.strip_clustering(clustered)
        rows[(f"{k} clusters", "float32")] = _measure(kerasq.export_tflite(plain), data)
        cqat = _fit(quantize_preserving_clusters(plain), data, s["qat_epochs"], s["qat_lr"])
        rows[(f"{k} clusters", "int8")] = _measure(kerasq.export_tflite(cqat), data)
        log(f"  {name} seed {seed} {k} clusters: {rows[(f'{k} clusters', 'int8')]}")
    return rows


def table(results, seeds):
    lines = [
        "# Weight clustering: file size and accuracy",
        "",
        f"`python benchmarks/clustering.py --seeds {' '.join(map(str, seeds))}` "
        f"(Keras {keras.__version__}, CPU). Accuracy: digits test set (450 images) run by LiteRT, mean of "
        f"{len(seeds)} seeds (min-max). gzip: `gzip -9` of the .tflite file (the same for every seed up to a "
        "few hundred bytes; mean shown). int8 codes: the most distinct int8 values in one output channel of any "
        "kernel of the file.",
        "",
    ]
    for name, per_seed in results.items():
        s = SETTINGS[name]
        lines += [
            f"## {s['title']}",
            "",
            f"Float training {s['epochs']} epochs (Adam {s['lr']}); clustering fine-tune {s['cluster_epochs']} epochs "
            f"(Adam {s['cluster_lr']}); QAT and cluster-preserving QAT {s['qat_epochs']} epochs (Adam {s['qat_lr']}).",
            "",
            "| model | file | size (bytes) | gzip (bytes) | gzip vs dense | accuracy | int8 codes per channel |",
            "|---|---|---:|---:|---:|---|---:|",
        ]
        keys = list(per_seed[0].keys())
        for key in keys:
            runs = [r[key] for r in per_seed]
            dense = statistics.mean(r[("dense", key[1])]["gzip"] for r in per_seed)
            gz = statistics.mean(r["gzip"] for r in runs)
            accs = [r["accuracy"] for r in runs]
            codes = max(r["codes"] for r in runs) if runs[0]["codes"] is not None else "-"
            lines.append(
                f"| {key[0]} | {key[1]} | {statistics.mean(r['size'] for r in runs):,.0f} | {gz:,.0f} | "
                f"{gz / dense:.2f}x | {statistics.mean(accs):.2%} ({min(accs):.2%}-{max(accs):.2%}) | {codes} |"
            )
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=["cnn", "mobilenet"], choices=sorted(SETTINGS))
    parser.add_argument("--output", default=os.path.join(RESULTS, "clustering.md"))
    args = parser.parse_args()
    results, start = {}, time.time()
    for name in args.models:
        results[name] = []
        for seed in args.seeds:
            results[name].append(run_seed(name, seed))
            print(f"{name} seed {seed} done after {time.time() - start:.0f} s", flush=True)
        text = table(results, args.seeds)  # written after each model, so a long run keeps what it has
        os.makedirs(os.path.dirname(args.output), exist_ok=True)
        with open(args.output, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
