"""Subcommands that read a .tflite file: `inspect`, `bench` and `eval`.

Example:
>>> import numpy as np
>>> from kerasq.cli.files import weight_rows
>>> [row] = weight_rows({"kernel": np.array([[0, 3], [0, -3]], np.int8)}, {})
>>> row["sparsity"], row["distinct"]
(0.5, 3)
"""

import os

import numpy as np
from absl import flags

from kerasq.cli.common import FLAGS, CommandError, Progress, command, load_arrays, load_tflite

flags.DEFINE_integer("runs", 200, "bench: timed single-sample runs.", lower_bound=1)
flags.DEFINE_integer("warmup", 10, "bench: untimed runs first.", lower_bound=0)
flags.DEFINE_integer("threads", None, "bench/eval: LiteRT interpreter threads (default: LiteRT chooses).", lower_bound=1)
flags.DEFINE_enum(
    "kernels",
    "default",
    ["default", "reference", "builtin"],
    "bench/eval: LiteRT kernels: default (XNNPACK), reference, or builtin (optimized, no XNNPACK).",
)

_ONE_FILE = "{name} takes one .tflite file; got {n} arguments."


@command(
    "inspect",
    ["FILE.tflite"],
    "print a .tflite file's ops, tensors, quantization, weight sparsity and size",
    """Prints the file's inputs and outputs (shape, dtype, scale and zero point), its ops, every tensor
with its dtype and quantization, whether it is fully integer, and for each constant tensor (weights,
biases) its sparsity (the share of values that are zero) and its number of distinct values (a
clustered layer has as many as it has clusters).""",
    "kerasq inspect model_int8.tflite",
    usage="",
    wrong_count=_ONE_FILE,
)
def inspect(path):
    tflite = load_tflite(path)
    tflite.summary()
    weights = tflite.weights()
    rows = weight_rows(weights, {t.name: t for t in tflite.tensors})
    print(f"Weights (constant tensors): {len(rows)}, {sum(r['size'] for r in rows):,} values")
    print(f"  {'name':<48} {'dtype':<8} {'shape':<18} {'sparsity':>8} {'distinct':>8}")
    for r in rows:
        name = r["name"] if len(r["name"]) <= 48 else "..." + r["name"][-45:]
        shape = "(" + ", ".join(str(d) for d in r["shape"]) + ")"
        print(f"  {name:<48} {r['dtype']:<8} {shape:<18} {100 * r['sparsity']:>7.1f}% {r['distinct']:>8,}")
    print(f"Size: {tflite.size_bytes:,} bytes ({tflite.size_bytes / 1024:.1f} KB)")
    return 0


def weight_rows(weights, tensors):
    """One dict per constant tensor: name, dtype, shape, size, sparsity (share of values that are
    zero: for a quantized tensor, stored values equal to the zero point) and distinct values."""
    rows = []
    for name, value in weights.items():
        zero = np.zeros((), value.dtype)
        info = tensors.get(name)
        if info is not None and len(info.zero_points) and value.ndim:
            zero_points = np.asarray(info.zero_points, value.dtype)
            if zero_points.size == 1:
                zero = zero_points.reshape(())
            elif zero_points.size == value.shape[info.quantized_dimension]:
                shape = [1] * value.ndim
                shape[info.quantized_dimension] = -1
                zero = zero_points.reshape(shape)
        size = int(value.size)
        rows.append({
            "name": name,
            "dtype": value.dtype.name,
            "shape": tuple(value.shape),
            "size": size,
            "sparsity": float(np.mean(value == zero)) if size else 0.0,
            "distinct": int(np.unique(value).size),
        })
    return rows


@command(
    "bench",
    ["FILE.tflite"],
    "single-sample latency with LiteRT: percentiles over many runs",
    """Times single-sample invocations of the file with LiteRT on random inputs and prints the latency
percentiles (median, p90, p99), the minimum, maximum and mean, in milliseconds.""",
    "kerasq bench model_int8.tflite --runs=500 --threads=1 --kernels=reference",
    ["runs", "warmup", "threads", "kernels"],
    usage="[--runs=200] [--warmup=10] [--threads=N] [--kernels=default|reference|builtin]",
    wrong_count=_ONE_FILE,
)
def bench(path):
    tflite = load_tflite(path, kernels=FLAGS.kernels, num_threads=FLAGS.threads)
    tflite.benchmark(runs=1, warmup=FLAGS.warmup)
    bar = Progress("benchmarking", FLAGS.runs)
    times = []
    try:
        for i in range(FLAGS.runs):  # one timed run per call: every run's own time, for the percentiles
            times.append(tflite.benchmark(runs=1, warmup=0)["median_ms"])
            bar.update(i + 1)
    finally:
        bar.close()
    t = np.asarray(times)
    threads = f"{FLAGS.threads} threads" if FLAGS.threads else "LiteRT's default threads"
    print(
        f"{path}: single-sample latency with LiteRT ({FLAGS.kernels} kernels, {threads}, {FLAGS.runs} runs, random "
        f"inputs): median {np.median(t):.4f} ms, p90 {np.percentile(t, 90):.4f} ms, p99 {np.percentile(t, 99):.4f} ms, "
        f"min {t.min():.4f} ms, max {t.max():.4f} ms, mean {t.mean():.4f} ms"
    )
    return 0


@command(
    "eval",
    ["FILE.tflite"],
    "top-1 accuracy of a .tflite file on a .npz of inputs and labels (or the digits test split)",
    """Runs the file with LiteRT on the inputs x of DATA.npz and prints its top-1 accuracy against the
labels y (integer classes or one-hot). Without --data it uses the digits test split that ships with
scikit-learn, for files that take (N, N, 1) digit images (N a multiple of 8), like the demo's.""",
    "kerasq eval model_int8.tflite --data=test.npz   # np.savez('test.npz', x=x_test, y=y_test)",
    ["data", "kernels", "threads"],
    usage="[--data=DATA.npz] [--kernels=default|reference|builtin] [--threads=N]",
    wrong_count=_ONE_FILE,
)
def evaluate(path):
    if FLAGS.data:
        x, y = load_arrays(FLAGS.data, "--data", need_labels=True)
        source = f"the {len(x)} samples of {os.path.basename(FLAGS.data)}"
    tflite = load_tflite(path, kernels=FLAGS.kernels, num_threads=FLAGS.threads)
    if not FLAGS.data:
        x, y = _digits_for(tflite)
        source = f"the {len(x)} digits test images"
    bar = Progress("evaluating", len(x))
    predictions, batch = [], 256
    try:
        for start in range(0, len(x), batch):
            predictions.append(np.asarray(_first(tflite.predict(x[start : start + batch], batch))))
            bar.update(min(start + batch, len(x)))
    except ValueError as error:
        raise CommandError(f"cannot run {path} on {source}: {' '.join(str(error).split())}") from error
    finally:
        bar.close()
    logits = np.concatenate(predictions)
    y = np.asarray(y)
    if y.ndim == logits.ndim and y.shape[-1] == logits.shape[-1] and y.shape[-1] > 1:
        y = y.argmax(-1)
    if y.size != logits[..., 0].size:
        raise CommandError(f"--data {FLAGS.data}: y has {y.size} labels for {logits[..., 0].size} predictions.")
    accuracy = float(np.mean(logits.argmax(-1) == y.reshape(logits.shape[:-1])))
    print(f"{path}: accuracy {100 * accuracy:.2f}% on {source} ({FLAGS.kernels} kernels)")
    return 0


def _digits_for(tflite):
    from kerasq.data import load_digits

    specs = tflite.input_specs
    shape = specs[0].shape if len(specs) == 1 else None
    if not (shape and len(shape) == 4 and shape[1] == shape[2] and shape[3] == 1 and shape[1] and shape[1] % 8 == 0):
        raise CommandError(
            f"without --data, eval runs the digits test split, which needs a model with one input of shape "
            f"(batch, N, N, 1), N a multiple of 8; this file's inputs are {[s.shape for s in specs]}: "
            "pass --data=DATA.npz with your inputs x and labels y."
        )
    _, (x_test, y_test) = load_digits(image_size=shape[1])
    return x_test, y_test


def _first(outputs):
    return outputs[0] if isinstance(outputs, list) else outputs
