"""Channel pruning that really shrinks the model: int8 size and LiteRT latency against accuracy.

For each model, in one run:
- train the float model on the digits (32x32), export it to post-training int8;
- `kerasq.prune_channels(model, ratio)`, fine-tune the narrow model on the labels, and again by
  distillation from the unpruned model (`kerasq.Distiller`), export each to int8 the same way;
- network slimming: train the float model with an L1 penalty on its BatchNorm scales, prune by
  those scales, fine-tune by distillation;
- for MobileNetV2 (alpha 0.35), also train the same architecture built at half width (alpha 0.175)
  from scratch for the same number of epochs in all;
- time every int8 file with LiteRT at a phone-sized input (128x128, the same weights: the models are
  fully convolutional up to global pooling), 1 thread, all in the same process;
- report int8 size, latency, their ratios to the unpruned file, and test accuracy.

Run: .venv/bin/python benchmarks/channel_pruning.py [--epochs 12 --finetune_epochs 12 --seeds 0 1 2]
    [--models "MobileNetV2 0.35"] [--no-distill]
Writes benchmarks/results/channel_pruning.md (and channel_pruning.png with matplotlib installed:
pip install -e ".[benchmarks]").
"""

import argparse
import os
import platform
import sys
import tempfile

import numpy as np

from plotting import pyplot  # benchmarks/plotting.py

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
LATENCY_SIZE = 128


def resnet_style(input_shape, width=32):
    """Conv-BN-ReLU blocks with Add shortcuts, three stages."""
    import keras
    from keras import layers

    def conv_bn(x, filters, stride, name, relu=True):
        x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
        return layers.ReLU(name=f"{name}_relu")(x) if relu else x

    inputs = keras.Input(input_shape)
    x = conv_bn(inputs, width, 1, "stem")
    for stage, filters in enumerate((width, 2 * width, 4 * width)):
        stride = 1 if stage == 0 else 2
        shortcut = x if stage == 0 else conv_bn(x, filters, stride, f"s{stage}_proj", relu=False)
        y = conv_bn(x, filters, stride, f"s{stage}_a")
        y = conv_bn(y, filters, 1, f"s{stage}_b", relu=False)
        x = layers.ReLU(name=f"s{stage}_out")(layers.Add(name=f"s{stage}_add")([shortcut, y]))
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(10, name="logits")(x), name="resnet_style")


def mobilenet_v2(input_shape, alpha):
    import keras

    model = keras.applications.MobileNetV2(input_shape=input_shape, alpha=alpha, weights=None, classes=10,
                                           classifier_activation=None)
    for layer in model.layers:  # small data: the default 0.999 barely moves in a few hundred steps
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    return model


def at_input_size(model, size):
    """The same architecture and weights at a `size` x `size` input."""
    import keras

    config = model.get_config()
    for layer in config["layers"]:
        if layer["class_name"] == "InputLayer":
            batch_shape = list(layer["config"]["batch_shape"])
            layer["config"]["batch_shape"] = [batch_shape[0], size, size, batch_shape[-1]]
    resized = keras.Model.from_config(config)
    resized.set_weights(model.get_weights())
    return resized


def train(model, data, epochs, learning_rate, weights_from=None):
    import keras

    if weights_from is not None:
        model.set_weights(weights_from.get_weights())
    (x_train, y_train), _ = data
    steps = epochs * int(np.ceil(len(x_train) / 32))
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, steps)
    model.compile(keras.optimizers.Adam(schedule),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=epochs, batch_size=32, verbose=0)
    return model


def int8_figures(model, data, folder, name):
    import kerasq

    (x_train, _), (x_test, y_test) = data
    path = os.path.join(folder, f"{name}.tflite")
    kerasq.export_tflite(model, path, representative_data=x_train[:200])
    accuracy = kerasq.TFLiteModel(path).evaluate(x_test, y_test)
    large = at_input_size(model, LATENCY_SIZE)
    large_path = os.path.join(folder, f"{name}_{LATENCY_SIZE}.tflite")
    calibration = np.repeat(np.repeat(x_train[:50], LATENCY_SIZE // x_train.shape[1], 1), LATENCY_SIZE // x_train.shape[2], 2)
    kerasq.export_tflite(large, large_path, representative_data=calibration)
    latency = kerasq.TFLiteModel(large_path, num_threads=1).benchmark(runs=50, warmup=5)["median_ms"]
    return {"accuracy": accuracy, "size_kb": os.path.getsize(path) / 1024, "latency_ms": latency,
            "params": model.count_params(), "macs": kerasq.estimate_macs(model)}


def run(args):
    """{(model title, variant): [figures per seed]} and, per title, the unpruned figures per seed."""
    import keras

    import kerasq
    from kerasq.data import load_digits

    digits = load_digits(image_size=32)
    grey = digits
    rgb = tuple((np.repeat(x, 3, axis=-1), y) for x, y in digits)
    models = {
        "ResNet-style": (lambda: resnet_style((32, 32, 1)), grey),
        "MobileNetV2 0.35": (lambda: mobilenet_v2((32, 32, 3), 0.35), rgb),
    }
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for seed in args.seeds:
            for title in args.models:
                build, data = models[title]
                keras.utils.set_random_seed(seed)
                model = train(build(), data, args.epochs, 3e-3)
                rows.setdefault((title, "unpruned"), []).append(int8_figures(model, data, folder, "base"))
                # MobileNetV2 keeps its widths multiples of 8 (and at least 8) at every alpha; so does its pruning.
                round_to = 8 if title.startswith("MobileNetV2") else 1
                slim = kerasq.prune_channels(model, ratio=args.ratio, round_to=round_to)
                # Removing half of every group's channels leaves MobileNetV2 at chance until it is trained
                # again: fine-tune as long and at the rate of the float training.
                keras.utils.set_random_seed(seed)
                tuned = train(keras.models.clone_model(slim), data, args.finetune_epochs, 3e-3, weights_from=slim)
                rows.setdefault((title, f"prune_channels {args.ratio:.0%} + {args.finetune_epochs} epochs"), []).append(
                    int8_figures(tuned, data, folder, "slim"))
                if args.distill:
                    keras.utils.set_random_seed(seed)
                    distilled = distill(model, slim, data, args.finetune_epochs, 3e-3)
                    rows.setdefault((title, f"prune_channels {args.ratio:.0%} + {args.finetune_epochs} epochs distilled"),
                                    []).append(int8_figures(distilled, data, folder, "distilled"))
                if args.slimming:
                    # Network slimming: the float training carries an L1 penalty on the BatchNorm scales,
                    # so the channels it can do without fade before they are removed by their scale.
                    keras.utils.set_random_seed(seed)
                    slimmed = train(kerasq.penalize_batchnorm_scales(build(), l1=args.slimming), data, args.epochs, 3e-3)
                    thin = kerasq.prune_channels(slimmed, ratio=args.ratio, round_to=round_to, criterion="bn_scale")
                    keras.utils.set_random_seed(seed)
                    thin = distill(slimmed, thin, data, args.finetune_epochs, 3e-3)
                    rows.setdefault((title, f"slimming (L1 {args.slimming:g}), bn_scale {args.ratio:.0%} + "
                                     f"{args.finetune_epochs} epochs distilled"), []).append(
                        int8_figures(thin, data, folder, "slimmed"))
                if title.startswith("MobileNetV2"):
                    keras.utils.set_random_seed(seed)
                    half = train(mobilenet_v2((32, 32, 3), 0.175), data, args.epochs + args.finetune_epochs, 3e-3)
                    rows.setdefault((title, f"built at alpha 0.175, {args.epochs + args.finetune_epochs} epochs"),
                                    []).append(int8_figures(half, data, folder, "half"))
                print(seed, title, {k[1]: round(v[-1]["accuracy"], 4) for k, v in rows.items() if k[0] == title},
                      flush=True)
    return rows


def distill(teacher, student, data, epochs, learning_rate):
    """Fine-tunes `student` on the labels and on `teacher`'s logits (kerasq.Distiller); returns it."""
    import keras

    import kerasq

    (x_train, y_train), _ = data
    steps = epochs * int(np.ceil(len(x_train) / 32))
    distiller = kerasq.Distiller(teacher, student, temperature=4.0, alpha=0.1)
    distiller.compile(keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(learning_rate, steps)),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    distiller.fit(x_train, y_train, epochs=epochs, batch_size=32, verbose=0)
    return distiller.student


def _mean_spread(values):
    return float(np.mean(values)), (max(values) - min(values)) / 2


def table(rows, args):
    import keras
    import tensorflow as tf

    lines = [
        "# Channel pruning: int8 size, latency and accuracy",
        "",
        f"`python benchmarks/channel_pruning.py --epochs {args.epochs} --finetune_epochs {args.finetune_epochs} "
        f"--ratio {args.ratio} --seeds {' '.join(map(str, args.seeds))} --models {' '.join(repr(m) for m in args.models)}"
        f"{'' if args.distill else ' --no-distill'} --slimming {args.slimming:g}`; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; TensorFlow {tf.__version__}, "
        f"Keras {keras.__version__}.",
        "",
        f"Latency: median of 50 single-image LiteRT runs at {LATENCY_SIZE}x{LATENCY_SIZE}, 1 thread (the median over "
        "seeds). Size: the int8 file at 32x32. MACs: multiply-accumulates per image at 32x32 (`kerasq.estimate_macs`). "
        "Accuracy: the int8 file on the 450 digits test images (32x32), mean ± half the range over "
        f"{len(args.seeds)} seed(s). Ratios are to the unpruned int8 file of the same model, measured in the same run. "
        "Distilled: fine-tuned with `kerasq.Distiller` (the unpruned model as teacher, temperature 4, alpha 0.1). "
        "Slimming: the float model trained with `kerasq.penalize_batchnorm_scales` (an L1 penalty on the BatchNorm "
        "scales), pruned by `criterion=\"bn_scale\"` and distilled from itself unpruned.",
        "",
        "| model | variant | params | MACs | int8 KB | smaller | latency ms | faster | int8 accuracy |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (title, variant), runs in rows.items():
        base = rows[(title, "unpruned")]
        size, base_size = np.median([r["size_kb"] for r in runs]), np.median([r["size_kb"] for r in base])
        latency, base_latency = np.median([r["latency_ms"] for r in runs]), np.median([r["latency_ms"] for r in base])
        accuracy, spread = _mean_spread([r["accuracy"] for r in runs])
        lines.append(
            f"| {title} | {variant} | {runs[0]['params']:,} | {runs[0]['macs'] / 1e6:.2f}M | {size:.1f} | "
            f"{base_size / size:.2f}x | {latency:.2f} | {base_latency / latency:.2f}x | {accuracy:.2%} ± {spread:.2%} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows, path):
    plt = pyplot()
    if plt is None:
        return False
    labels = [f"{title}\n{variant.replace(' epochs', ' ep')}" for title, variant in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, unit in zip(axes, ("size_kb", "latency_ms", "accuracy"), ("int8 KB", f"ms at {LATENCY_SIZE}px", "int8 accuracy")):
        ax.barh(range(len(rows)), [float(np.mean([r[key] for r in runs])) for runs in rows.values()], color="tab:blue")
        ax.set_yticks(range(len(rows)), labels if ax is axes[0] else [""] * len(rows), fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(unit)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--finetune_epochs", type=int, default=12)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=["ResNet-style", "MobileNetV2 0.35"],
                        choices=["ResNet-style", "MobileNetV2 0.35"])
    parser.add_argument("--no-distill", dest="distill", action="store_false",
                        help="skip the fine-tuning by distillation from the unpruned model")
    parser.add_argument("--slimming", type=float, default=1e-4,
                        help="L1 penalty on BatchNorm scales for the network-slimming variant (0: skip it)")
    parser.add_argument("--output_dir", default=RESULTS)
    args = parser.parse_args(argv)
    rows = run(args)
    text = table(rows, args)
    print(text)
    os.makedirs(args.output_dir, exist_ok=True)
    name = "channel_pruning" if len(args.models) == 2 else "channel_pruning_" + args.models[0].split()[0].lower()
    with open(os.path.join(args.output_dir, f"{name}.md"), "w") as f:
        f.write(text)
    plot(rows, os.path.join(args.output_dir, f"{name}.png"))


if __name__ == "__main__":
    sys.exit(main())
