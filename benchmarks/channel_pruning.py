"""Channel pruning that really shrinks the model: int8 size and LiteRT latency against accuracy.

For each model, in one run:
- train the float model on the digits (32x32), export it to post-training int8;
- `kerasq.prune_channels(model, ratio)`, fine-tune the narrow model, export it to int8 the same way;
- for MobileNetV2 (alpha 0.35), also train the same architecture built at half width (alpha 0.175)
  from scratch for the same number of epochs in all;
- time every int8 file with LiteRT at a phone-sized input (128x128, the same weights: the models are
  fully convolutional up to global pooling), 1 thread, all in the same process;
- report int8 size, latency, their ratios to the unpruned file, and test accuracy.

Run: .venv/bin/python benchmarks/channel_pruning.py [--epochs 12 --finetune_epochs 12 --seed 0]
Writes benchmarks/results/channel_pruning.md (and channel_pruning.png with matplotlib installed:
pip install -e ".[benchmarks]").
"""

import argparse
import os
import platform
import sys
import tempfile

import numpy as np

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


def train(model, data, epochs, learning_rate):
    import keras

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
            "params": model.count_params()}


def run(args):
    import keras

    import kerasq
    from kerasq.data import load_digits

    digits = load_digits(image_size=32)
    grey = digits
    rgb = tuple((np.repeat(x, 3, axis=-1), y) for x, y in digits)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for title, build, data in (
            ("ResNet-style", lambda: resnet_style((32, 32, 1)), grey),
            ("MobileNetV2 0.35", lambda: mobilenet_v2((32, 32, 3), 0.35), rgb),
        ):
            keras.utils.set_random_seed(args.seed)
            model = train(build(), data, args.epochs, 3e-3)
            base = int8_figures(model, data, folder, "base")
            rows.append((title, "unpruned", base, base))
            # MobileNetV2 keeps its widths multiples of 8 (and at least 8) at every alpha; so does its pruning.
            round_to = 8 if title.startswith("MobileNetV2") else 1
            slim = kerasq.prune_channels(model, ratio=args.ratio, round_to=round_to)
            # Removing half of every group's channels leaves MobileNetV2 at chance until it is trained
            # again: fine-tune as long and at the rate of the float training.
            slim = train(slim, data, args.finetune_epochs, 3e-3)
            rows.append((title, f"prune_channels {args.ratio:.0%} (round_to={round_to}) + {args.finetune_epochs} epochs",
                         int8_figures(slim, data, folder, "slim"), base))
            if title.startswith("MobileNetV2"):
                keras.utils.set_random_seed(args.seed)
                half = train(mobilenet_v2((32, 32, 3), 0.175), data, args.epochs + args.finetune_epochs, 3e-3)
                rows.append((title, f"built at alpha 0.175, {args.epochs + args.finetune_epochs} epochs",
                             int8_figures(half, data, folder, "half"), base))
    return rows


def table(rows, args):
    import keras
    import tensorflow as tf

    lines = [
        "# Channel pruning: int8 size, latency and accuracy",
        "",
        f"`python benchmarks/channel_pruning.py --epochs {args.epochs} --finetune_epochs {args.finetune_epochs} "
        f"--ratio {args.ratio} --seed {args.seed}`; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; TensorFlow {tf.__version__}, Keras {keras.__version__}.",
        "",
        f"Latency: median of 50 single-image LiteRT runs at {LATENCY_SIZE}x{LATENCY_SIZE}, 1 thread. Size: the "
        "int8 file at 32x32. Accuracy: the int8 file on the 450 digits test images (32x32). Ratios are to the "
        "unpruned int8 file of the same model, measured in the same run.",
        "",
        "| model | variant | params | int8 KB | smaller | latency ms | faster | int8 accuracy |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for title, variant, figures, base in rows:
        lines.append(
            f"| {title} | {variant} | {figures['params']:,} | {figures['size_kb']:.1f} | "
            f"{base['size_kb'] / figures['size_kb']:.2f}x | {figures['latency_ms']:.2f} | "
            f"{base['latency_ms'] / figures['latency_ms']:.2f}x | {figures['accuracy']:.2%} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = [f"{title}\n{variant.split(' +')[0].split(',')[0]}" for title, variant, _, _ in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, unit in zip(axes, ("size_kb", "latency_ms", "accuracy"), ("int8 KB", f"ms at {LATENCY_SIZE}px", "int8 accuracy")):
        ax.barh(range(len(rows)), [figures[key] for _, _, figures, _ in rows], color="tab:blue")
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=RESULTS)
    args = parser.parse_args(argv)
    rows = run(args)
    text = table(rows, args)
    print(text)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "channel_pruning.md"), "w") as f:
        f.write(text)
    plot(rows, os.path.join(args.output_dir, "channel_pruning.png"))


if __name__ == "__main__":
    sys.exit(main())
