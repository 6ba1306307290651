"""How much slower and larger QAT training is than float training of the same model.

For the demo CNN and MobileNetV2 (alpha 0.35, 32x32), in one process, with float and QAT epochs
interleaved so that a busy machine slows both alike: the median time of a training epoch over 640
digits (batch 32) and of a `predict` pass, float and QAT, and their ratio. QAT starts from a float
model trained for one epoch (BatchNorm statistics trained, so `quantize_model` folds them frozen, as
in the usual float-then-QAT flow) and, as a second row, from the untrained model (BatchNorm folded
with batch statistics). `--jit` adds XLA-compiled (`jit_compile=True`) rows. `--memory` measures
peak resident memory of 3 training epochs, each configuration in a fresh process (Linux): the
process's peak during `fit`, and how far it rose above the resident size before `fit`. Ratios,
not times, are the figures to compare across machines.

    python benchmarks/qat_overhead.py [--repeats 7] [--jit] [--memory]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import keras

import kerasq
from kerasq.demo import build_model as demo_cnn

import machine  # benchmarks/machine.py

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "qat_overhead.md")
SPEED_TARGET = 1.2
MEMORY_TARGET = 1.3


def mobilenet_v2():
    model = keras.applications.MobileNetV2(
        input_shape=(32, 32, 1), alpha=0.35, weights=None, classes=10, classifier_activation=None
    )
    for layer in model.layers:  # small data: the default 0.999 would leave the statistics untrained
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    return model


MODELS = {"demo CNN": (lambda: demo_cnn(), 8), "MobileNetV2 0.35": (mobilenet_v2, 32)}


def _compile(model, jit):
    model.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
    )
    return model


def _data(size, count=640):
    (x, y), _ = kerasq.data.load_digits(image_size=size)
    return x[:count], y[:count]


def _pair(name, pretrained, jit):
    """(float model, QAT model), compiled, each warmed up (traced) by one epoch."""
    build, size = MODELS[name]
    x, y = _data(size)
    keras.utils.set_random_seed(0)
    model = _compile(build(), jit)
    if pretrained:
        model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    qat = _compile(kerasq.quantize_model(model), jit)
    for each in (model, qat):
        each.fit(x, y, batch_size=32, epochs=1, verbose=0)
        each.predict(x, batch_size=256, verbose=0)
    return model, qat, x, y


def _interleaved_medians(model, qat, x, y, repeats):
    """{(kind, "float"|"qat"): median seconds} of a fit epoch and a predict pass, runs interleaved."""
    runs = {
        "fit": lambda m: m.fit(x, y, batch_size=32, epochs=1, verbose=0),
        "predict": lambda m: m.predict(x, batch_size=256, verbose=0),
    }
    times = {(kind, which): [] for kind in runs for which in ("float", "qat")}
    for _ in range(repeats):
        for kind, run in runs.items():
            for which, each in (("float", model), ("qat", qat)):
                start = time.perf_counter()
                run(each)
                times[kind, which].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def speed_rows(repeats, jit_options):
    rows = []
    for name in MODELS:
        for jit in jit_options:
            for pretrained in (True, False):
                model, qat, x, y = _pair(name, pretrained, jit)
                medians = _interleaved_medians(model, qat, x, y, repeats)
                rows.append({
                    "model": name,
                    "start": "float-trained" if pretrained else "untrained",
                    "jit": jit,
                    "fit_ratio": medians["fit", "qat"] / medians["fit", "float"],
                    "predict_ratio": medians["predict", "qat"] / medians["predict", "float"],
                    **{f"{kind}_{which}_s": value for (kind, which), value in medians.items()},
                })
                print(_speed_line(rows[-1]), flush=True)
    return rows


def _status_mib(field):
    """A memory figure of this process from /proc/self/status (Linux), in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(name, which):
    """Runs in its own process: resident memory over 3 epochs of `fit`, after the data, the model
    and TensorFlow's runtime are loaded (the peak is reset first, so it is the training's own)."""
    build, size = MODELS[name]
    x, y = _data(size)
    model = build()
    if which == "qat":
        model = kerasq.quantize_model(model)
    _compile(model, False)
    model.predict(x[:32], verbose=0)  # loads the kernels both need
    before = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets the peak (VmHWM) to the current resident size
    model.fit(x, y, batch_size=32, epochs=3, verbose=0)
    peak = _status_mib("VmHWM")
    print(json.dumps({"peak_mib": peak, "growth_mib": peak - before}))


def memory_rows():
    rows = []
    for name in MODELS:
        figures = {}
        for which in ("float", "qat"):
            out = subprocess.run(
                [sys.executable, __file__, "--memory-child", name, which],
                check=True, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
            ).stdout
            figures[which] = json.loads(out.strip().splitlines()[-1])
        rows.append({
            "model": name,
            **{f"{key}_{which}": figures[which][key] for which in figures for key in figures[which]},
            "peak_ratio": figures["qat"]["peak_mib"] / figures["float"]["peak_mib"],
            "growth_ratio": figures["qat"]["growth_mib"] / max(figures["float"]["growth_mib"], 1.0),
        })
        print(rows[-1], flush=True)
    return rows


def _speed_line(row):
    return (
        f"{row['model']:<18}{row['start']:<15}{'XLA' if row['jit'] else 'graph':<7}"
        f"{row['fit_float_s']:>9.3f}{row['fit_qat_s']:>9.3f}{row['fit_ratio']:>7.2f}"
        f"{row['predict_float_s']:>9.3f}{row['predict_qat_s']:>9.3f}{row['predict_ratio']:>7.2f}"
    )


def _verdict(ratio, target):
    return f"{ratio:.2f}" if ratio <= target else f"**{ratio:.2f} (misses ≤ {target})**"


def report(speed, memory, args):
    lines = [
        "# QAT training overhead",
        "",
        f"`python benchmarks/qat_overhead.py --repeats {args.repeats}{' --jit' if args.jit else ''}"
        f"{' --memory' if args.memory else ''}`; {machine.describe()}.",
        "",
        f"Targets: QAT epoch ≤ {SPEED_TARGET}x float, QAT predict ≤ 1.0x float (within noise), "
        f"peak memory ≤ {MEMORY_TARGET}x float.",
        "",
        "| model | QAT from | compiled | float epoch s | QAT epoch s | QAT/float epoch | float predict s | QAT predict s | QAT/float predict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in speed:
        lines.append(
            f"| {row['model']} | {row['start']} | {'XLA' if row['jit'] else 'graph'} | {row['fit_float_s']:.3f} | "
            f"{row['fit_qat_s']:.3f} | {_verdict(row['fit_ratio'], SPEED_TARGET)} | {row['predict_float_s']:.3f} | "
            f"{row['predict_qat_s']:.3f} | {row['predict_ratio']:.2f} |"
        )
    if memory:
        lines += [
            "",
            "Resident memory over 3 training epochs, each in a fresh process: the peak during `fit`, "
            "and how far it rose above the resident size before `fit` (model built, TensorFlow loaded):",
            "",
            "| model | float peak MiB | QAT peak MiB | QAT/float peak | float growth MiB | QAT growth MiB | QAT/float growth |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in memory:
            lines.append(
                f"| {row['model']} | {row['peak_mib_float']:.0f} | {row['peak_mib_qat']:.0f} | "
                f"{_verdict(row['peak_ratio'], MEMORY_TARGET)} | {row['growth_mib_float']:.0f} | "
                f"{row['growth_mib_qat']:.0f} | {row['growth_ratio']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--jit", action="store_true", help="also time XLA-compiled training")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory (fresh processes)")
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL", "WHICH"), help=argparse.SUPPRESS)
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    print(f"{'model':<18}{'QAT from':<15}{'':<7}{'float s':>9}{'QAT s':>9}{'ratio':>7}{'pred f':>9}{'pred q':>9}{'ratio':>7}")
    speed = speed_rows(args.repeats, (False, True) if args.jit else (False,))
    memory = memory_rows() if args.memory else []
    text = report(speed, memory, args)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as out:
        out.write(text)
    print(text)


if __name__ == "__main__":
    main()
