"""kerasq side by side with TFLite post-training quantization and with tfmot's quantization-aware training.

For each model of a small zoo on the scikit-learn digits (nothing is downloaded), over several seeds:

1. train the float Keras 3 model (Adam with cosine decay, batch 32) and export it as a float32 file and
   as a post-training int8 file (PTQ: TFLite's converter with a representative dataset of 200
   training images, through `kerasq.export_tflite(model, representative_data=...)`);
2. kerasq QAT: `kerasq.quantize_model` with the same 200 images as `calibration_data` (so its QAT
   starts where PTQ ends, as the README recommends), a fine-tune (Adam with cosine decay from the
   recipe's QAT learning rate), `kerasq.export_tflite`; parity with the file by `kerasq.verify_tflite`;
3. tfmot QAT, in its own process under legacy Keras 2 (`TF_USE_LEGACY_KERAS=1`, `tf_keras`): the same
   architecture built with `tf_keras`, given the same float weights, then
   `tfmot.quantization.keras.quantize_model` (tfmot has no calibration), the same fine-tune, and `tf.lite.TFLiteConverter` with
   `Optimize.DEFAULT`; its parity is measured with the same definitions as `verify_tflite`.

Every int8 file takes int8 input and gives int8 output. Accuracies are of the files run by LiteRT
(float: the Keras model). Step times: each toolkit's QAT fine-tune runs one epoch at a time, each
epoch beside an epoch of a copy of the float model trained the same way, the two taking turns to go
first (so a change in a shared machine's load falls on both); the ratio is the median QAT step over
the median float step (first steps of each `fit` excluded); export time is one `export_tflite` / converter call; latency is LiteRT's single-sample
median with 1 and 2 threads (the lowest of 5 rounds), measured in this process for every file of the
first seed.

The zoo: `digits_cnn` (the demo's network, 8x8), `mobilenet_v2` (keras.applications, alpha 0.35,
weights=None, 32x32, BatchNorm momentum 0.9), `resnet` (Conv-BN blocks with Add shortcuts, 16x16),
`conv1d` (each image's 8 rows as a sequence of 8 features), `transformer` (self-attention and
LayerNormalization over the rows; it enters the table only once kerasq exports it fully int8, and is
otherwise listed below the table with the ops still in float).

    python benchmarks/compare.py [--seeds 0,1,2] [--models digits_cnn,mobilenet_v2,...]
        [--epochs N] [--qat-epochs N] [--quick] [--output-dir benchmarks/results]

Writes compare.md, compare.png and compare_cost.png to the output folder. `--quick`: one seed, one
float and one QAT epoch, fewer latency runs (a check that everything runs, not a measurement).
"""

import argparse
import dataclasses
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/, when loaded by path
import machine  # noqa: E402  (benchmarks/machine.py)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BATCH_SIZE = 32
CALIBRATION_SAMPLES = 200
SKIP_STEPS = 3  # the first steps of each fit trace and compile
LATENCY_SAMPLES = 100
STEP_RATIO_TARGET = 1.2
LATENCY_SLACK = 1.05  # timing noise on a shared machine: within 5% counts as no slower
WORKER_TIMEOUT_S = 1800
KINDS = ("float32", "ptq", "kerasq", "tfmot")
KIND_NAMES = {"float32": "float32", "ptq": "PTQ int8", "kerasq": "kerasq QAT int8", "tfmot": "tfmot QAT int8"}


# ---- the zoo, written once for Keras 3 and for tf_keras (`k` is the keras module) -------------------
def digits_cnn(k):
    """The demo's network (`kerasq.demo.build_model`): three Conv-BN-ReLU blocks, pooling, a Dense head."""
    layers = k.layers

    def block(x, filters, name):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
        return layers.ReLU(name=f"{name}_relu")(x)

    inputs = k.Input((8, 8, 1), name="image")
    x = block(inputs, 16, "block1")
    x = block(x, 32, "block2")
    x = layers.MaxPooling2D(name="pool")(x)
    x = block(x, 32, "block3")
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(0.2, name="dropout")(x)
    return k.Model(inputs, layers.Dense(10, name="logits")(x), name="digits_cnn")


def mobilenet_v2(k):
    """keras.applications.MobileNetV2, alpha 0.35, random weights, 32x32x1, BatchNorm momentum 0.9."""
    model = k.applications.MobileNetV2(
        input_shape=(32, 32, 1), alpha=0.35, weights=None, classes=10, classifier_activation=None
    )
    for layer in model.layers:  # 0.999 barely moves the moving statistics in a few hundred steps
        if isinstance(layer, k.layers.BatchNormalization):
            layer.momentum = 0.9
    return model


def resnet(k):
    """A small ResNet: Conv-BN-ReLU stem, three residual blocks (Add after BN), pooling, Dense."""
    layers = k.layers

    def conv_bn(x, filters, stride, name, relu=True):
        x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
        return layers.ReLU(name=f"{name}_relu")(x) if relu else x

    def block(x, filters, stride, name):
        shortcut = x
        y = conv_bn(conv_bn(x, filters, stride, f"{name}_a"), filters, 1, f"{name}_b", relu=False)
        if stride != 1 or x.shape[-1] != filters:
            shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{name}_proj")(x)
            shortcut = layers.BatchNormalization(momentum=0.9, name=f"{name}_proj_bn")(shortcut)
        return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([y, shortcut]))

    inputs = k.Input((16, 16, 1), name="image")
    x = conv_bn(inputs, 16, 1, "stem")
    x = block(x, 16, 1, "block1")
    x = block(x, 32, 2, "block2")
    x = block(x, 32, 1, "block3")
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    return k.Model(inputs, layers.Dense(10, name="logits")(x), name="small_resnet")


def conv1d(k):
    """Conv1D-BN-ReLU blocks over the 8 rows of a digit (8 features each), pooling, Dense."""
    layers = k.layers

    def block(x, filters, name):
        x = layers.Conv1D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
        return layers.ReLU(name=f"{name}_relu")(x)

    inputs = k.Input((8, 8), name="rows")
    x = block(inputs, 32, "block1")
    x = block(x, 32, "block2")
    x = layers.MaxPooling1D(name="pool")(x)
    x = block(x, 64, "block3")
    x = layers.GlobalAveragePooling1D(name="gap")(x)
    return k.Model(inputs, layers.Dense(10, name="logits")(x), name="conv1d")


def transformer(k):
    """One post-norm encoder block (2-head self-attention, feed-forward) over the 8 rows, Dense head."""
    layers = k.layers
    inputs = k.Input((8, 8), name="rows")
    x = layers.Dense(32, name="embed")(inputs)
    attention = layers.MultiHeadAttention(2, 16, name="attention")(x, x)
    x = layers.LayerNormalization(name="norm1")(layers.Add(name="add1")([x, attention]))
    y = layers.Dense(64, activation="relu", name="ffn1")(x)
    y = layers.Dense(32, name="ffn2")(y)
    x = layers.LayerNormalization(name="norm2")(layers.Add(name="add2")([x, y]))
    x = layers.Flatten(name="flatten")(x)
    return k.Model(inputs, layers.Dense(10, name="logits")(x), name="transformer")


@dataclasses.dataclass(frozen=True)
class Recipe:
    build: object
    image_size: int  # digits upsampled to this size; 0: the 8x8 image as a sequence of rows
    epochs: int  # float epochs, Adam with cosine decay from `lr`
    lr: float
    qat_epochs: int  # QAT epochs, Adam with cosine decay from `qat_lr`, the same for both toolkits
    qat_lr: float


RECIPES = {
    "digits_cnn": Recipe(digits_cnn, 8, 12, 3e-3, 3, 3e-4),
    "mobilenet_v2": Recipe(mobilenet_v2, 32, 25, 3e-3, 3, 1e-4),
    "resnet": Recipe(resnet, 16, 12, 1e-3, 3, 1e-4),
    "conv1d": Recipe(conv1d, 0, 15, 3e-3, 3, 3e-4),
    "transformer": Recipe(transformer, 0, 15, 1e-3, 3, 1e-4),
}


def batch_timer(k):
    """A callback (for Keras 3 or tf_keras) that records each training step's seconds in `.times`,
    leaving out the first steps of its first `fit` (tracing) and the first step of each later one."""

    class BatchTimer(k.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []
            self._skip = SKIP_STEPS

        def on_train_begin(self, logs=None):
            self._to_skip = self._skip
            self._skip = 1

        def on_train_batch_begin(self, batch, logs=None):
            self._start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            if self._to_skip:
                self._to_skip -= 1
            else:
                self.times.append(time.perf_counter() - self._start)

        def step_seconds(self):
            return statistics.median(self.times)

    return BatchTimer()


def compile_for_fit(k, model, x, epochs, lr):
    """Adam with cosine decay from `lr` over `epochs`, and the digits' loss."""
    steps = epochs * -(-len(x) // BATCH_SIZE)
    model.compile(
        optimizer=k.optimizers.Adam(k.optimizers.schedules.CosineDecay(lr, steps)),
        loss=k.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def fit(k, model, x, y, epochs, lr):
    """Compiles and fits `model`."""
    compile_for_fit(k, model, x, epochs, lr)
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=epochs, shuffle=True, verbose=0)


def fine_tune(k, qat, float_model, x, y, epochs, lr):
    """Fine-tunes `qat` (Adam with cosine decay from `lr`) one epoch at a time, each epoch beside one
    epoch of a copy of `float_model` trained the same way (and then thrown away), the two taking turns
    to go first, so that a change in a shared machine's load falls on both alike. Returns the median
    seconds of a QAT step and of a float step."""
    twin = k.models.clone_model(float_model)
    twin.set_weights(float_model.get_weights())
    timers = {}
    for model in (qat, twin):
        compile_for_fit(k, model, x, epochs, lr)
        timers[id(model)] = batch_timer(k)
    for epoch in range(epochs):
        for model in ((twin, qat) if epoch % 2 == 0 else (qat, twin)):
            model.fit(x, y, batch_size=BATCH_SIZE, initial_epoch=epoch, epochs=epoch + 1, shuffle=True,
                      verbose=0, callbacks=[timers[id(model)]])
    return timers[id(qat)].step_seconds(), timers[id(twin)].step_seconds()


def accuracy(outputs, y):
    return float(np.mean(np.asarray(outputs).argmax(-1) == y))


# ---- tfmot, in its own process under legacy Keras 2 ------------------------------------------------
def tfmot_worker(spec_path):
    """Runs tfmot QAT for every seed in the spec (JSON) and prints the figures as one JSON line.

    Runs under TF_USE_LEGACY_KERAS=1 and imports neither Keras 3 nor kerasq."""
    import tensorflow as tf
    import tf_keras as k
    import tensorflow_model_optimization as tfmot

    with open(spec_path) as f:
        spec = json.load(f)
    recipe = RECIPES[spec["model"]]
    folder = os.path.dirname(spec_path)
    x, y, x_test, y_test = (np.load(os.path.join(folder, f"{n}.npy")) for n in ("x_train", "y_train", "x_test", "y_test"))
    results = {}
    for seed in spec["seeds"]:
        k.utils.set_random_seed(seed)
        with np.load(os.path.join(folder, f"float_weights_{seed}.npz")) as saved:
            weights = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        model = recipe.build(k)
        model.set_weights(weights)
        float_accuracy = accuracy(model.predict(x_test, batch_size=256, verbose=0), y_test)
        try:
            qat = tfmot.quantization.keras.quantize_model(model)
        except Exception as error:  # tfmot names the layer it does not support
            results[seed] = {"refused": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
            continue
        qat_step, float_step = fine_tune(k, qat, model, x, y, spec["qat_epochs"], recipe.qat_lr)
        np.save(os.path.join(folder, f"tfmot_outputs_{seed}.npy"), qat.predict(x_test, batch_size=256, verbose=0))
        start = time.perf_counter()
        converter = tf.lite.TFLiteConverter.from_keras_model(qat)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
        content = converter.convert()
        convert_seconds = time.perf_counter() - start
        path = os.path.join(folder, f"tfmot_{seed}.tflite")
        with open(path, "wb") as f:
            f.write(content)
        results[seed] = {
            "float_accuracy": float_accuracy,
            "float_step": float_step,
            "qat_step": qat_step,
            "export_seconds": convert_seconds,
            "path": path,
        }
    print(json.dumps(results))


def tfmot_available():
    from importlib.util import find_spec

    return find_spec("tensorflow_model_optimization") is not None and find_spec("tf_keras") is not None


def run_tfmot(name, seeds, qat_epochs, folder):
    """{seed: figures} from a tfmot worker process, or a string saying why there are none."""
    if not tfmot_available():
        return "not installed"
    spec_path = os.path.join(folder, "tfmot_spec.json")
    with open(spec_path, "w") as f:
        json.dump({"model": name, "seeds": seeds, "qat_epochs": qat_epochs}, f)
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3")
    try:
        done = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--tfmot-worker", spec_path],
            env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return f"failed: no answer in {WORKER_TIMEOUT_S} s"
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        return "not installed" if "No module named" in last else f"failed: {last[:300]}"
    return {int(seed): figures for seed, figures in json.loads(lines[-1]).items()}


# ---- measuring files -------------------------------------------------------------------------------
def parity(reference, tflite, x):
    """`verify_tflite`'s figures for a file whose model is not a Keras 3 model: its outputs on `x`
    (`reference`) against the file's default kernels, and the default kernels against the reference
    and builtin kernel paths (the floor). Returns agreement, max_diff (steps), floor_agreement and
    floor_max_diff."""
    from kerasq import TFLiteModel
    from kerasq.export.tflite_model import dequantize

    default = TFLiteModel(tflite)
    quant, step = default.output_quantization[0], default.output_step(0) or 1.0
    ours = dequantize(default.predict(x, raw=True), quant)
    others = []
    for kernels in ("reference", "builtin"):
        try:
            others.append(dequantize(TFLiteModel(tflite, kernels=kernels).predict(x, raw=True), quant))
        except ValueError:  # that kernel path cannot run the file
            pass
    others = others or [ours]
    return {
        "agreement": float(np.mean(ours.argmax(-1) == reference.argmax(-1))),
        "max_diff": float(np.abs(ours - reference).max() / step),
        "floor_agreement": min(float(np.mean(ours.argmax(-1) == o.argmax(-1))) for o in others),
        "floor_max_diff": max(float(np.abs(ours - o).max() / step) for o in others),
    }


def file_figures(contents, x_latency, runs, rounds=5):
    """{kind: figures} for {kind: file}: size (raw and gzip), single-sample LiteRT latency at 1 and 2
    threads (the lowest median of `rounds` rounds that take the files in turn, so a burst of load
    elsewhere does not fall on one file only), op counts, constant and tensor-name bytes, float ops."""
    from kerasq import TFLiteModel

    figures = {}
    for kind, content in contents.items():
        model = TFLiteModel(content)
        counts = {}
        for op in model.ops:
            counts[op] = counts.get(op, 0) + 1
        figures[kind] = {
            "size": len(content),
            "gzip": len(gzip.compress(content, 9)),
            "ops": counts,
            "weight_bytes": int(sum(w.nbytes for w in model.weights().values())),
            "name_bytes": sum(len(t.name) for t in model.tensors),
            "float_ops": None if model.is_float_file else sorted({name for name, _ in model.float_ops}),
        }
    for threads in (1, 2):
        models = {kind: TFLiteModel(content, num_threads=threads) for kind, content in contents.items()}
        medians = {kind: [] for kind in contents}
        for _ in range(rounds):
            for kind, model in models.items():
                timing = model.benchmark(x_latency, runs=runs, warmup=max(5, runs // 10))
                medians[kind].append(timing["median_ms"])
        for kind, values in medians.items():
            figures[kind][f"latency_{threads}"] = min(values)
    return figures


def load_data(recipe):
    from kerasq.data import load_digits

    (x, y), (x_test, y_test) = load_digits(image_size=recipe.image_size or 8)
    if not recipe.image_size:  # rows as a sequence
        x, x_test = x[..., 0], x_test[..., 0]
    return x, y, x_test, y_test


def run_kerasq(name, recipe, seed, epochs, qat_epochs, data, folder):
    """Float, PTQ and kerasq QAT for one seed; writes the float weights for the tfmot worker."""
    import keras

    import kerasq

    x, y, x_test, y_test = data
    keras.utils.set_random_seed(seed)
    model = recipe.build(keras)
    fit(keras, model, x, y, epochs, recipe.lr)
    np.savez(os.path.join(folder, f"float_weights_{seed}.npz"), *model.get_weights())
    result = {"accuracy": {}, "files": {}}
    result["accuracy"]["float32"] = accuracy(model.predict(x_test, batch_size=256, verbose=0), y_test)
    result["files"]["float32"] = kerasq.export_tflite(model)
    start = time.perf_counter()
    result["files"]["ptq"] = kerasq.export_tflite(model, representative_data=x[:CALIBRATION_SAMPLES])
    result["ptq_seconds"] = time.perf_counter() - start
    result["accuracy"]["ptq"] = kerasq.TFLiteModel(result["files"]["ptq"]).evaluate(x_test, y_test)

    qat = kerasq.quantize_model(model, calibration_data=x[:CALIBRATION_SAMPLES])
    result["qat_step"], result["float_step"] = fine_tune(keras, qat, model, x, y, qat_epochs, recipe.qat_lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a float island or fragility is reported, not warned about
        start = time.perf_counter()
        content = kerasq.export_tflite(qat)
        result["export_seconds"] = time.perf_counter() - start
        file = kerasq.TFLiteModel(content)
        result["float_ops"] = sorted({op for op, _ in file.float_ops})
        output = kerasq.verify_tflite(qat, file, x_test).outputs[0]
    result["files"]["kerasq"] = content
    result["accuracy"]["kerasq"] = file.evaluate(x_test, y_test)
    result["parity"] = {key: getattr(output, key) for key in ("agreement", "max_diff", "floor_agreement", "floor_max_diff")}
    result["parity"]["passed"] = output.passed
    return result


def run_model(name, seeds, epochs, qat_epochs, latency_runs, log):
    """Every figure of one model over the seeds: a dict, or {"not_yet": ...} when kerasq's file is
    not fully int8 (the model is then not compared)."""
    recipe = RECIPES[name]
    epochs, qat_epochs = epochs or recipe.epochs, qat_epochs or recipe.qat_epochs
    data = load_data(recipe)
    x, y, x_test, y_test = data
    runs = {}
    with tempfile.TemporaryDirectory(prefix="kerasq-compare-") as folder:
        for array, stem in ((x, "x_train"), (y, "y_train"), (x_test, "x_test"), (y_test, "y_test")):
            np.save(os.path.join(folder, f"{stem}.npy"), array)
        for seed in seeds:
            start = time.perf_counter()
            runs[seed] = run_kerasq(name, recipe, seed, epochs, qat_epochs, data, folder)
            acc = runs[seed]["accuracy"]
            log(f"{name} seed {seed}: float {acc['float32']:.2%}, PTQ {acc['ptq']:.2%}, kerasq QAT "
                f"{acc['kerasq']:.2%}; training step float {1000 * runs[seed]['float_step']:.1f} ms, QAT "
                f"{1000 * runs[seed]['qat_step']:.1f} ms ({time.perf_counter() - start:.0f} s)")
            if runs[seed]["float_ops"]:
                log(f"{name}: kerasq's file computes {', '.join(runs[seed]['float_ops'])} in float; not compared")
                return {"not_yet": runs[seed]["float_ops"], "epochs": epochs, "qat_epochs": qat_epochs}
        start = time.perf_counter()
        tfmot = run_tfmot(name, seeds, qat_epochs, folder)
        if isinstance(tfmot, dict):
            for seed, figures in tfmot.items():
                if "path" in figures:
                    with open(figures.pop("path"), "rb") as f:
                        runs[seed]["files"]["tfmot"] = f.read()
                    outputs = np.load(os.path.join(folder, f"tfmot_outputs_{seed}.npy"))
                    figures["parity"] = parity(outputs, runs[seed]["files"]["tfmot"], x_test)
                    runs[seed]["accuracy"]["tfmot"] = kerasq_accuracy(runs[seed]["files"]["tfmot"], x_test, y_test)
                runs[seed]["tfmot"] = figures
            refused = {f.get("refused") for f in tfmot.values()} - {None}
            tfmot = f"refused ({refused.pop()})" if refused else None
        log(f"{name}: tfmot {tfmot or 'done'} ({time.perf_counter() - start:.0f} s)")
    first = runs[seeds[0]]
    files = file_figures(first["files"], x_test[:LATENCY_SAMPLES], latency_runs)
    return {"runs": runs, "tfmot_status": tfmot, "files": files, "epochs": epochs, "qat_epochs": qat_epochs}


def kerasq_accuracy(content, x, y):
    from kerasq import TFLiteModel

    return TFLiteModel(content).evaluate(x, y)


# ---- the report ------------------------------------------------------------------------------------
def mean_spread(values):
    """(mean, half the spread max - min)."""
    return statistics.mean(values), (max(values) - min(values)) / 2


def pct(values):
    mean, half = mean_spread(values)
    return f"{100 * mean:.2f} ± {100 * half:.2f}"


def summarize(name, result):
    """The per-model figures the tables and plots read: a flat dict (None where a toolkit has none)."""
    runs = list(result["runs"].values())
    s = {"model": name, "tfmot_status": result["tfmot_status"], "files": result["files"]}
    s["accuracy"] = {kind: [r["accuracy"][kind] for r in runs] if all(kind in r["accuracy"] for r in runs) else None
                     for kind in KINDS}
    tfmot_runs = [r["tfmot"] for r in runs if "tfmot" in r and "qat_step" in r["tfmot"]]
    s["step_ratio"] = {"kerasq": [r["qat_step"] / r["float_step"] for r in runs],
                       "tfmot": [t["qat_step"] / t["float_step"] for t in tfmot_runs] or None}
    s["export_seconds"] = {"kerasq": [r["export_seconds"] for r in runs], "ptq": [r["ptq_seconds"] for r in runs],
                           "tfmot": [t["export_seconds"] for t in tfmot_runs] or None}
    s["parity"] = {"kerasq": [r["parity"] for r in runs], "tfmot": [t["parity"] for t in tfmot_runs] or None}
    s["tfmot_float"] = [t["float_accuracy"] for t in tfmot_runs] or None
    return s


def missing(s):
    """What stands in a tfmot cell without figures: "refused", "failed", "not installed" or "-"."""
    return (s["tfmot_status"] or "-").split(":")[0].split(" (")[0]


def parity_cell(items):
    if not items:
        return None
    agreement = statistics.mean(p["agreement"] for p in items)
    steps = max(p["max_diff"] for p in items)
    floor = max(p["floor_max_diff"] for p in items)
    floor_agreement = statistics.mean(p["floor_agreement"] for p in items)
    return f"{100 * agreement:.2f}% / {steps:.0f} (floor {100 * floor_agreement:.2f}% / {floor:.0f})"


def ratio_cell(values):
    if not values:
        return None
    mean, half = mean_spread(values)
    return f"{mean:.2f} ± {half:.2f}"


def seconds_cell(values):
    return f"{statistics.mean(values):.2f}" if values else None


def op_difference(ours, theirs):
    """The op counts that differ between two files, as "+1 QUANTIZE, -2 ADD" (ours minus theirs)."""
    names = sorted(set(ours) | set(theirs))
    parts = [f"{ours.get(n, 0) - theirs.get(n, 0):+d} {n}" for n in names if ours.get(n, 0) != theirs.get(n, 0)]
    return ", ".join(parts) or "the same ops"


def targets(s):
    """One line per target kerasq misses on this model."""
    misses = []
    ratio = statistics.mean(s["step_ratio"]["kerasq"])
    if ratio > STEP_RATIO_TARGET:
        misses.append(f"{s['model']}: kerasq QAT step is {ratio:.2f}x float (target ≤ {STEP_RATIO_TARGET}).")
    if s["step_ratio"]["tfmot"] and ratio > statistics.mean(s["step_ratio"]["tfmot"]):
        misses.append(f"{s['model']}: kerasq QAT/float step ratio {ratio:.2f} > tfmot's "
                      f"{statistics.mean(s['step_ratio']['tfmot']):.2f}.")
    if s["export_seconds"]["tfmot"]:
        ours, theirs = statistics.mean(s["export_seconds"]["kerasq"]), statistics.mean(s["export_seconds"]["tfmot"])
        if ours > theirs:
            misses.append(f"{s['model']}: kerasq export {ours:.2f} s > tfmot's conversion {theirs:.2f} s.")
    ours, ptq = s["files"]["kerasq"], s["files"]["ptq"]
    why = (f"(ops, kerasq minus PTQ: {op_difference(ours['ops'], ptq['ops'])}; constant tensors "
           f"{ours['weight_bytes']:,} vs {ptq['weight_bytes']:,} bytes; tensor names {ours['name_bytes']:,} vs "
           f"{ptq['name_bytes']:,} bytes)")
    if ours["size"] > ptq["size"]:
        misses.append(f"{s['model']}: kerasq int8 file {ours['size']:,} bytes > PTQ's {ptq['size']:,} {why}.")
    for threads in (1, 2):
        key = f"latency_{threads}"
        if ours[key] > ptq[key] * LATENCY_SLACK:
            misses.append(f"{s['model']}: kerasq int8 file {1000 * ours[key]:.1f} µs > PTQ's {1000 * ptq[key]:.1f} µs at "
                          f"{threads} thread{'s' if threads > 1 else ''} {why}.")
    return misses


def report(summaries, not_yet, command, seeds, minutes):
    """The markdown text and the list of missed targets."""
    kb = lambda n: f"{n / 1024:.1f}"  # noqa: E731
    lines = [
        "# kerasq vs TFLite post-training int8 vs tfmot QAT",
        "",
        f"Command: `{command}` ({minutes:.0f} min)  ",
        f"Machine: {machine.describe(('tensorflow-model-optimization', 'tf_keras'))}  ",
        f"Seeds: {', '.join(map(str, seeds))}",
        "",
        "Digits test set (450 images). Float: the Keras 3 model; PTQ int8: that model through TFLite's converter "
        f"with {CALIBRATION_SAMPLES} calibration images; kerasq and tfmot QAT int8: each toolkit's QAT fine-tune "
        "of the same float weights (the same epochs, Adam with cosine decay; kerasq's ranges calibrated on "
        "the PTQ images first), exported by its own path. Accuracy: mean ± half the spread over the seeds.",
        "",
        "## Accuracy (%)",
        "",
        "| model | epochs (float + QAT) | float | PTQ int8 | kerasq QAT int8 | tfmot QAT int8 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for s in summaries:
        acc = s["accuracy"]
        lines.append(f"| {s['model']} | {s['epochs']} + {s['qat_epochs']} | {pct(acc['float32'])} | {pct(acc['ptq'])} "
                     f"| {pct(acc['kerasq'])} | {pct(acc['tfmot']) if acc['tfmot'] else missing(s)} |")
    lines += [
        "",
        "## Parity and training cost",
        "",
        "Parity: each QAT model against its own file, argmax agreement / largest output difference in output "
        "steps, beside the floor (LiteRT's default kernels against its reference and builtin kernels on that "
        "file). Step ratio: median QAT training step / median float training step of the same toolkit, "
        "their epochs interleaved (kerasq in this process, tfmot in its own). Export: one `kerasq.export_tflite` call / one "
        "`TFLiteConverter` conversion of the QAT model (PTQ: `export_tflite` with calibration).",
        "",
        "| model | kerasq parity | tfmot parity | kerasq step ratio | tfmot step ratio | kerasq export s | tfmot export s | PTQ export s |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        na = missing(s)
        lines.append(
            f"| {s['model']} | {parity_cell(s['parity']['kerasq'])} | {parity_cell(s['parity']['tfmot']) or na} "
            f"| {ratio_cell(s['step_ratio']['kerasq'])} | {ratio_cell(s['step_ratio']['tfmot']) or na} "
            f"| {seconds_cell(s['export_seconds']['kerasq'])} | {seconds_cell(s['export_seconds']['tfmot']) or na} "
            f"| {seconds_cell(s['export_seconds']['ptq'])} |"
        )
    lines += [
        "",
        "## Files (first seed)",
        "",
        "Size in KiB, raw / gzip -9; LiteRT single-sample median latency in µs at 1 / 2 threads (default "
        "XNNPACK kernels; the lowest median of 5 rounds, on a machine shared with other work).",
        "",
        "| model | " + " | ".join(f"{KIND_NAMES[k]} KiB" for k in KINDS) + " | "
        + " | ".join(f"{KIND_NAMES[k]} µs" for k in KINDS) + " |",
        "|---|" + "---:|" * (2 * len(KINDS)),
    ]
    for s in summaries:
        files, na = s["files"], missing(s)
        sizes = [f"{kb(files[k]['size'])} / {kb(files[k]['gzip'])}" if k in files else na for k in KINDS]
        times = [f"{1000 * files[k]['latency_1']:.1f} / {1000 * files[k]['latency_2']:.1f}" if k in files else na
                 for k in KINDS]
        lines.append(f"| {s['model']} | " + " | ".join(sizes + times) + " |")

    misses = [m for s in summaries for m in targets(s)]
    lines += [
        "",
        "## Targets",
        "",
        f"kerasq QAT/float step ratio ≤ {STEP_RATIO_TARGET} and ≤ tfmot's; kerasq export time ≤ tfmot's "
        "conversion; kerasq's int8 file no larger than the PTQ file of the same model, and no slower at 1 or 2 "
        f"threads (within {100 * (LATENCY_SLACK - 1):.0f}%, the timing noise of a shared machine).",
        "",
        *([f"- Missed: {m}" for m in misses] or ["- Every target holds."]),
    ]
    notes = [f"- {s['model']}: tfmot {s['tfmot_status']}." for s in summaries
             if s["tfmot_status"] and s["tfmot_status"] != missing(s)]
    notes += [f"- {s['model']}: tfmot's tf_keras copy of the float weights scores {pct(s['tfmot_float'])} "
             f"(Keras 3: {pct(s['accuracy']['float32'])})." for s in summaries
             if s["tfmot_float"] and abs(statistics.mean(s["tfmot_float"]) - statistics.mean(s["accuracy"]["float32"])) > 1e-9]
    for s in summaries:
        failed = [seed for seed, p in zip(s["seeds"], s["parity"]["kerasq"]) if not p["passed"]]
        if failed:
            notes.append(f"- {s['model']}: `verify_tflite` FAILED for kerasq's file on seed(s) "
                         f"{', '.join(map(str, failed))} (beyond the floor or one step).")
        for kind, files in s["files"].items():
            if files["float_ops"]:
                notes.append(f"- {s['model']}: the {KIND_NAMES[kind]} file computes {', '.join(files['float_ops'])} "
                             "in float (not fully int8).")
    if notes:
        lines += ["", "Notes:", "", *notes]
    if not_yet:
        lines += ["", "## Not yet in the table", ""]
        lines += [f"- {name}: kerasq's QAT file still computes {', '.join(ops)} in float (not fully int8), so it "
                  "is not compared." for name, ops in not_yet.items()]
    return "\n".join(lines) + "\n", misses


def plot(summaries, output_dir):
    """compare.png (accuracy) and compare_cost.png (step ratio, export time, size, latency); the paths."""
    from plotting import pyplot  # benchmarks/plotting.py

    plt = pyplot()
    if plt is None or not summaries:
        return []
    names = [s["model"] for s in summaries]
    positions = np.arange(len(names))
    width = 0.2
    figure, axis = plt.subplots(figsize=(2 + 1.8 * len(names), 4))
    for i, kind in enumerate(KINDS):
        values = [mean_spread(s["accuracy"][kind]) if s["accuracy"][kind] else (np.nan, 0) for s in summaries]
        axis.bar(positions + (i - 1.5) * width, [100 * v[0] for v in values], width,
                 yerr=[100 * v[1] for v in values], label=KIND_NAMES[kind], capsize=2)
    low = max(0, min(100 * min(s["accuracy"][k]) for s in summaries for k in KINDS if s["accuracy"][k]) - 5)
    for position, s in zip(positions, summaries):
        if not s["accuracy"]["tfmot"]:
            axis.text(position + 1.5 * width, low + 0.5, f"tfmot: {missing(s)}", rotation=90, ha="center",
                      va="bottom", fontsize=7)
    axis.set_ylim(low, 100)
    axis.set_xticks(positions, names)
    axis.set_ylabel("test accuracy (%)")
    axis.set_title("Digits: float, post-training int8, kerasq and tfmot QAT int8 (LiteRT)")
    axis.legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    paths = [os.path.join(output_dir, "compare.png")]
    figure.savefig(paths[0], dpi=120)
    plt.close(figure)

    figure, axes = plt.subplots(2, 2, figsize=(4 + 2.2 * len(names), 7))
    panels = [
        (axes[0, 0], "QAT / float training step", {k: [statistics.mean(s["step_ratio"][k]) if s["step_ratio"][k] else np.nan for s in summaries] for k in ("kerasq", "tfmot")}),
        (axes[0, 1], "export / conversion (s)", {k: [statistics.mean(s["export_seconds"][k]) if s["export_seconds"][k] else np.nan for s in summaries] for k in ("ptq", "kerasq", "tfmot")}),
        (axes[1, 0], "file size (KiB)", {k: [s["files"][k]["size"] / 1024 if k in s["files"] else np.nan for s in summaries] for k in KINDS}),
        (axes[1, 1], "LiteRT latency, 1 thread (µs)", {k: [1000 * s["files"][k]["latency_1"] if k in s["files"] else np.nan for s in summaries] for k in KINDS}),
    ]
    for axis, title, series in panels:
        step = 0.8 / len(series)
        for i, (kind, values) in enumerate(series.items()):
            axis.bar(positions + (i - (len(series) - 1) / 2) * step, values, step, label=KIND_NAMES.get(kind, kind))
        axis.set_xticks(positions, names, fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.legend(fontsize=7)
    axes[0, 0].axhline(STEP_RATIO_TARGET, color="grey", linestyle="--", linewidth=1)
    figure.tight_layout()
    paths.append(os.path.join(output_dir, "compare_cost.png"))
    figure.savefig(paths[1], dpi=120)
    plt.close(figure)
    return paths


def main(argv=None):
    """Runs the comparison; returns {"summaries", "not_yet", "misses", "markdown", "plots"}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--models", default=",".join(RECIPES), help="comma-separated: " + ", ".join(RECIPES))
    parser.add_argument("--epochs", type=int, default=None, help="float epochs (default: each model's recipe)")
    parser.add_argument("--qat-epochs", type=int, default=None, help="QAT epochs (default: each model's recipe)")
    parser.add_argument("--quick", action="store_true", help="one seed, 1 + 1 epochs, few latency runs")
    parser.add_argument("--output-dir", default=RESULTS)
    parser.add_argument("--tfmot-worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tfmot_worker:
        tfmot_worker(args.tfmot_worker)
        return None
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(RECIPES))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(RECIPES)}")
    epochs, qat_epochs, latency_runs = args.epochs, args.qat_epochs, 200
    if args.quick:
        seeds, epochs, qat_epochs, latency_runs = seeds[:1], epochs or 1, qat_epochs or 1, 20

    def log(line):
        print(line, flush=True)

    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # retracing notes from predict on differently sized inputs

    start = time.perf_counter()
    summaries, not_yet = [], {}
    for name in models:
        result = run_model(name, seeds, epochs, qat_epochs, latency_runs, log)
        if "not_yet" in result:
            not_yet[name] = result["not_yet"]
            continue
        summary = summarize(name, result)
        summary.update(epochs=result["epochs"], qat_epochs=result["qat_epochs"], seeds=seeds)
        summaries.append(summary)
    command = "python benchmarks/compare.py " + " ".join(argv if argv is not None else sys.argv[1:])
    markdown, misses = report(summaries, not_yet, command.strip(), seeds, (time.perf_counter() - start) / 60)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "compare.md"), "w") as f:
        f.write(markdown)
    plots = plot(summaries, args.output_dir)
    print(markdown)
    return {"summaries": summaries, "not_yet": not_yet, "misses": misses, "markdown": markdown, "plots": plots}


if __name__ == "__main__":
    main()
