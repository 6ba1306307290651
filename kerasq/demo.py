"""`kerasq demo`: float training, post-training int8 and quantization-aware int8 side by side.

On the handwritten digits that ship with scikit-learn (nothing is downloaded), the demo
1. trains a small Conv-BatchNorm-ReLU network in float,
2. exports it as a float32 .tflite file and as a post-training int8 file (PTQ, calibrated on x_train),
3. fine-tunes `kerasq.quantize_model(model)` for a few epochs (quantization-aware training, QAT) and
   exports it as a fully int8 file,
4. runs every file with LiteRT: accuracy, single-sample latency, size, and parity with its Keras model
   (`kerasq.verify_tflite`),
and prints one table with the figures, and draws it as a figure (kerasq_demo.png, when matplotlib is
installed).

Example (one epoch each; the defaults, 12 and 3, take about 15 seconds on two CPU cores):
>>> import tempfile
>>> from kerasq.demo import run_demo
>>> with tempfile.TemporaryDirectory() as folder:
...     figures = run_demo(folder, epochs=1, qat_epochs=1, seed=0, log=lambda line: None)  # log=print shows it
>>> sorted(figures["qat"])[:4]
['agreement', 'floor_agreement', 'floor_max_steps', 'fragile']
>>> print(figures["comparison"])  # measured, not promised: yours differ with the CPU and the seed
QAT int8 accuracy ...% vs PTQ ...% vs float ...%: QAT - PTQ ... points, QAT - float ... points (...)
"""

import os
import time
import warnings

import numpy as np

DEFAULT_EPOCHS = 12
DEFAULT_QAT_EPOCHS = 3
LEARNING_RATE = 3e-3
QAT_LEARNING_RATE = 3e-4
BATCH_SIZE = 32
BENCHMARK_RUNS = 200

FILES = {
    "float": "model_float32.tflite",
    "ptq": "model_ptq_int8.tflite",
    "qat": "model_qat_int8.tflite",
}
QAT_KERAS_FILE = "model_qat.keras"
FIGURE_FILE = "kerasq_demo.png"
ROW_NAMES = {"float": "float32", "ptq": "PTQ int8", "qat": "QAT int8"}
STEPS = 5


def build_model(input_shape=(8, 8, 1), num_classes=10):
    """The demo's network: three Conv-BatchNorm-ReLU blocks, global average pooling and a Dense head."""
    import keras
    from keras import layers

    def block(x, filters, name):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
        # Momentum 0.9 (Keras' default is 0.99): on 1,347 images, the moving statistics then follow
        # the weights closely, so the float model, its PTQ file and its QAT fine-tune share them.
        x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
        return layers.ReLU(name=f"{name}_relu")(x)

    inputs = keras.Input(input_shape, name="image")
    x = block(inputs, 16, "block1")
    x = block(x, 32, "block2")
    x = layers.MaxPooling2D(name="pool")(x)
    x = block(x, 32, "block3")
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(0.2, name="dropout")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


def run_demo(
    output_dir="kerasq_demo",
    epochs=DEFAULT_EPOCHS,
    qat_epochs=DEFAULT_QAT_EPOCHS,
    seed=0,
    log=print,
    progress=None,
):
    """Runs the demo, writes its files to `output_dir`, prints progress and a table with `log`.

    Args:
        output_dir: folder for model_float32.tflite, model_ptq_int8.tflite, model_qat_int8.tflite and
            model_qat.keras (created if missing; existing files are replaced).
        epochs: float training epochs.
        qat_epochs: quantization-aware fine-tuning epochs.
        seed: seeds Python, NumPy and the backend (`keras.utils.set_random_seed`).
        log: called with each line of output (`print` by default).
        progress: None, or a progress bar class called as `progress(label, total)`, whose instances
            have `update(done)` and `close()` (the command line passes `kerasq.cli.common.Progress`):
            one bar per training and for the LiteRT runs.

    Returns:
        A dict: for each of "float", "ptq" and "qat", a dict with `keras_accuracy` (None for PTQ, which
        has no Keras model of its own), `tflite_accuracy`, `size_bytes`, `size_kb`, `latency_ms`,
        `agreement`, `max_steps`, `floor_max_steps`, `floor_agreement`, `parity_passed`,
        `fully_integer` and `path`; plus `table` and `comparison` (the printed text), `qat_minus_ptq` and
        `qat_minus_float` (differences of the files' accuracies, as fractions), `output_dir`, `seconds`,
        and `figure` (the path of the PNG figure, or None without matplotlib).
    """
    import keras

    import kerasq
    from kerasq.data import load_digits

    if epochs < 1 or qat_epochs < 1:
        raise ValueError(f"epochs and qat_epochs must be at least 1; got {epochs} and {qat_epochs}.")
    start = time.perf_counter()
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    paths = {key: os.path.join(output_dir, name) for key, name in FILES.items()}
    keras.utils.set_random_seed(seed)

    (x_train, y_train), (x_test, y_test) = load_digits()  # the same test split for every seed
    log(
        f"kerasq demo: {len(x_train)} training and {len(x_test)} test images of handwritten digits "
        f"(8x8, scikit-learn), seed {seed}, output in {output_dir}/"
    )

    log(f"[1/{STEPS}] training the float model ({epochs} epochs, Adam {LEARNING_RATE:g} with cosine decay) ...")
    float_model = build_model(x_train.shape[1:])
    _train(float_model, x_train, y_train, epochs, LEARNING_RATE, log, progress, "training")
    float_keras = _keras_accuracy(float_model, x_test, y_test)
    log(f"      float accuracy (Keras): {_pct(float_keras)}")

    log(f"[2/{STEPS}] exporting float32 and post-training int8 (PTQ) files ...")
    kerasq.export_tflite(float_model, paths["float"])
    kerasq.export_tflite(float_model, paths["ptq"], representative_data=x_train)

    log(
        f"[3/{STEPS}] quantization-aware fine-tuning of kerasq.quantize_model(float_model) "
        f"({qat_epochs} epochs, Adam {QAT_LEARNING_RATE:g} with cosine decay) ..."
    )
    qat_model = kerasq.quantize_model(float_model)
    _train(qat_model, x_train, y_train, qat_epochs, QAT_LEARNING_RATE, log, progress, "QAT fine-tuning")
    qat_keras = _keras_accuracy(qat_model, x_test, y_test)
    log(f"      QAT accuracy (Keras, int8 simulation): {_pct(qat_keras)}")
    qat_model.save(os.path.join(output_dir, QAT_KERAS_FILE))

    log(f"[4/{STEPS}] exporting the QAT model to int8 ...")
    kerasq.export_tflite(qat_model, paths["qat"])

    log(f"[5/{STEPS}] running the files with LiteRT: accuracy, latency, parity ...")
    keras_models = {"float": float_model, "ptq": float_model, "qat": qat_model}
    keras_accuracy = {"float": float_keras, "ptq": None, "qat": qat_keras}
    figures = {}
    bar = progress("running the files", len(FILES)) if progress else None
    for done, key in enumerate(FILES, 1):
        tflite = kerasq.TFLiteModel(paths[key])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # fragility is shown in the table instead
            report = kerasq.verify_tflite(keras_models[key], tflite, x_test)
        parity = report.outputs[0]
        latency = tflite.benchmark(x_test, runs=BENCHMARK_RUNS, warmup=10)
        figures[key] = {
            "path": paths[key],
            "keras_accuracy": keras_accuracy[key],
            "tflite_accuracy": tflite.evaluate(x_test, y_test),
            "size_bytes": tflite.size_bytes,
            "size_kb": tflite.size_bytes / 1024,
            "latency_ms": latency["median_ms"],
            "agreement": parity.agreement,
            "unit": parity.unit,
            "max_steps": parity.max_diff,
            "floor_max_steps": parity.floor_max_diff,
            "floor_agreement": parity.floor_agreement,
            "parity_passed": report.passed,
            "fragile": report.fragile,
            "fully_integer": tflite.is_fully_integer,
        }
        if bar:
            bar.update(done)
    if bar:
        bar.close()

    table = format_table(figures)
    qat_minus_ptq = figures["qat"]["tflite_accuracy"] - figures["ptq"]["tflite_accuracy"]
    qat_minus_float = figures["qat"]["tflite_accuracy"] - figures["float"]["tflite_accuracy"]
    comparison = format_comparison(figures, len(x_test))
    figure = save_figure(figures, os.path.join(output_dir, FIGURE_FILE))
    seconds = time.perf_counter() - start
    log("")
    log(table)
    log("")
    log(comparison)
    if figure is None:
        log("Skipped the figure: matplotlib is not installed (pip install matplotlib draws the table as a PNG).")
    else:
        log(f"Figure of the table: {figure}")
    log(f"Files in {output_dir}/ ({seconds:.0f} s). Inspect one with: kerasq inspect {paths['qat']}")
    figures.update(
        figure=figure,
        table=table,
        comparison=comparison,
        qat_minus_ptq=qat_minus_ptq,
        qat_minus_float=qat_minus_float,
        seconds=seconds,
        output_dir=output_dir,
    )
    return figures


def save_figure(figures, path):
    """Draws the table's accuracy, size and latency of the three files as bars in a PNG at `path`;
    returns `path`, or None (and writes nothing) when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    names = list(ROW_NAMES.values())
    colors = ["#8c8c8c", "#e69f00", "#0072b2"]
    panels = [
        ("TFLite accuracy (%)", [100 * figures[k]["tflite_accuracy"] for k in ROW_NAMES], "{:.2f}"),
        ("size (KB)", [figures[k]["size_kb"] for k in ROW_NAMES], "{:.1f}"),
        ("latency (ms, median)", [figures[k]["latency_ms"] for k in ROW_NAMES], "{:.3f}"),
    ]
    figure = Figure(figsize=(10, 3.4), layout="constrained")  # no pyplot: no global state, no display
    FigureCanvasAgg(figure)
    for axes, (title, values, fmt) in zip(figure.subplots(1, 3), panels):
        bars = axes.bar(names, values, color=colors)
        axes.set_title(title)
        axes.bar_label(bars, labels=[fmt.format(v) for v in values], fontsize=8)
        axes.margins(y=0.15)
        if title.startswith("TFLite accuracy"):
            low = min(values)
            axes.set_ylim(max(0.0, low - 5), 100.5)
    figure.suptitle("kerasq demo: float32 vs post-training int8 vs quantization-aware int8 (digits, LiteRT)")
    figure.savefig(path, dpi=110)
    return path


def format_comparison(figures, num_test):
    """The measured accuracies of the three files and their differences, in points, with how much one
    test image weighs (a run on another CPU or seed can move each figure by an image or two)."""
    float_acc, ptq_acc, qat_acc = (figures[key]["tflite_accuracy"] for key in ("float", "ptq", "qat"))
    return (
        f"QAT int8 accuracy {_pct(qat_acc)} vs PTQ {_pct(ptq_acc)} vs float {_pct(float_acc)}: "
        f"QAT - PTQ {100 * (qat_acc - ptq_acc):+.2f} points, QAT - float {100 * (qat_acc - float_acc):+.2f} points "
        f"(one of the {num_test} test images is {100 / num_test:.2f} points)"
    )


def format_table(figures):
    """The demo's results table: one row per file (float32, PTQ int8, QAT int8)."""
    header = (
        f"{'model':<9} {'Keras acc':>9} {'TFLite acc':>10} {'size KB':>8} {'latency ms':>10} "
        f"{'agreement':>9} {'max diff':>13} {'floor':>13} {'fully int8':>10}"
    )
    lines = [header, "-" * len(header)]
    for key, name in ROW_NAMES.items():
        f = figures[key]
        lines.append(
            f"{name:<9} {_pct(f['keras_accuracy']):>9} {_pct(f['tflite_accuracy']):>10} "
            f"{f['size_kb']:>8.1f} {f['latency_ms']:>10.3f} {_pct(f['agreement']):>9} "
            f"{_diff(f['max_steps'], f['unit']):>13} {_diff(f['floor_max_steps'], f['unit']):>13} "
            f"{'yes' if f['fully_integer'] else 'no':>10}"
        )
    lines += [
        "Keras acc: the Keras model (PTQ int8 has none; QAT: its int8 simulation). TFLite acc: the file run",
        f"by LiteRT. latency: median of {BENCHMARK_RUNS} single-image runs (LiteRT default kernels). agreement,",
        "max diff: the file vs its Keras model (PTQ: vs the float model): argmax agreement and largest output",
        "difference in output steps (float32: absolute); floor: the largest difference between TFLite's own",
        "kernel paths (default, reference, builtin) on the same file.",
    ]
    return "\n".join(lines)


def _train(model, x, y, epochs, learning_rate, log, progress=None, label="training"):
    """Compiles `model` (Adam, cosine-decayed learning rate) and fits it, one log line per epoch (and a
    progress bar over the batches with `progress`)."""
    import keras

    steps = epochs * -(-len(x) // BATCH_SIZE)
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(1, steps))
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )

    batches = -(-len(x) // BATCH_SIZE)

    class _EpochLog(keras.callbacks.Callback):
        bar = None

        def on_epoch_begin(self, epoch, logs=None):
            if progress:
                self.bar = progress(f"{label} epoch {epoch + 1}/{epochs}", batches)

        def on_train_batch_end(self, batch, logs=None):
            if self.bar:
                self.bar.update(batch + 1)

        def on_epoch_end(self, epoch, logs=None):
            if self.bar:
                self.bar.close()
            logs = logs or {}
            log(f"      epoch {epoch + 1}/{epochs}: loss {logs.get('loss', float('nan')):.4f}, "
                f"train accuracy {_pct(logs.get('accuracy'))}")

    model.fit(x, y, batch_size=BATCH_SIZE, epochs=epochs, shuffle=True, verbose=0, callbacks=[_EpochLog()])


def _keras_accuracy(model, x, y):
    logits = np.asarray(model.predict(x, batch_size=256, verbose=0))
    return float(np.mean(logits.argmax(-1) == y))


def _pct(value):
    return "-" if value is None else f"{100 * value:.2f}%"


def _diff(value, unit):
    if value is None:
        return "-"
    if unit != "steps":
        return f"{value:.2g} abs"
    return f"{value:.3g} step" + ("" if f"{value:.3g}" == "1" else "s")
