"""How much slower a QAT model trains and predicts than its float model, in the same process.

Prints, per model, the median time of a training epoch and of a `predict` pass over the digits, for
the float model and for `kerasq.quantize_model(model)`, and their ratio (QAT / float). Ratios, not
times, are the figures to compare across machines.

    python benchmarks/qat_overhead.py [--repeats 5]
"""

import argparse
import statistics
import time

import keras

import kerasq


def small_cnn():
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, padding="same", use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Conv2D(32, 3, padding="same"),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ],
        name="small_cnn",
    )


def mobilenet_v2():
    return keras.applications.MobileNetV2(
        input_shape=(32, 32, 1), alpha=0.35, weights=None, classes=10, classifier_activation=None
    )


def _median_seconds(fn, repeats):
    fn()  # the first call traces and compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _timings(model, x, y, repeats):
    model.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    fit = _median_seconds(lambda: model.fit(x, y, batch_size=32, epochs=1, verbose=0), repeats)
    predict = _median_seconds(lambda: model.predict(x, batch_size=256, verbose=0), repeats)
    return fit, predict


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{'model':<20}{'float fit s':>12}{'QAT fit s':>11}{'ratio':>7}{'float pred s':>14}{'QAT pred s':>12}{'ratio':>7}")
    for build, size in ((small_cnn, 8), (mobilenet_v2, 32)):
        keras.utils.set_random_seed(0)
        (x, y), _ = kerasq.data.load_digits(image_size=size)
        model = build()
        float_fit, float_predict = _timings(model, x, y, args.repeats)
        qat_fit, qat_predict = _timings(kerasq.quantize_model(model), x, y, args.repeats)
        print(
            f"{model.name:<20}{float_fit:>12.3f}{qat_fit:>11.3f}{qat_fit / float_fit:>7.2f}"
            f"{float_predict:>14.3f}{qat_predict:>12.3f}{qat_predict / float_predict:>7.2f}"
        )


if __name__ == "__main__":
    main()
