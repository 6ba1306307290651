"""kerasq: quantization-aware training and verified int8 TFLite export for Keras 3.

Usage:
  kerasq demo [--output_dir=kerasq_demo] [--epochs=N] [--qat_epochs=N] [--seed=0]
      Train a small CNN on the bundled digits, export float32, post-training int8 and
      quantization-aware int8 .tflite files, and compare accuracy, size, latency and parity.
  kerasq convert MODEL.keras OUT.tflite [--calibration=INPUTS.npy]
      Export a saved Keras model: a QAT model (kerasq.quantize_model) to a fully int8 file; a float
      model to a float32 file, or with --calibration to a post-training int8 file.
  kerasq inspect FILE.tflite
      Print the file's inputs, outputs, ops, tensors and quantization.
  kerasq bench FILE.tflite [--runs=200] [--kernels=default]
      Single-sample latency with LiteRT (random inputs).
  kerasq eval FILE.tflite [--kernels=default]
      Accuracy on the digits test split (for files that take digit images).
  kerasq migrate OLD.h5 NEW.keras
      Rebuild a model saved by tf_keras (Keras 2; a .h5 file, a SavedModel directory or a tf_keras
      .keras file), plain or wrapped by tfmot's quantize_model/prune_low_magnitude, as a Keras 3
      kerasq model and save it as NEW.keras.

Flags may come before or after the command; `kerasq --helpfull` lists them all.
"""

import os
import sys

from absl import app, flags

from kerasq import demo as demo_lib

COMMANDS = ("demo", "convert", "inspect", "bench", "eval", "migrate")
USAGE_ERROR = 2

flags.DEFINE_string("output_dir", "kerasq_demo", "demo: folder for the .tflite and .keras files.")
flags.DEFINE_integer("epochs", demo_lib.DEFAULT_EPOCHS, "demo: float training epochs.", lower_bound=1)
flags.DEFINE_integer(
    "qat_epochs", demo_lib.DEFAULT_QAT_EPOCHS, "demo: quantization-aware fine-tuning epochs.", lower_bound=1
)
flags.DEFINE_integer("seed", 0, "demo: random seed (keras.utils.set_random_seed).")
flags.DEFINE_string(
    "calibration", None, "convert: .npy file of float model inputs for post-training int8 quantization."
)
flags.DEFINE_integer("runs", 200, "bench: timed single-sample runs.", lower_bound=1)
flags.DEFINE_integer("warmup", 10, "bench: untimed runs first.", lower_bound=0)
flags.DEFINE_enum(
    "kernels",
    "default",
    ["default", "reference", "builtin"],
    "bench/eval: LiteRT kernels: default (XNNPACK), reference, or builtin (optimized, no XNNPACK).",
)

FLAGS = flags.FLAGS
_FLAG_NAMES = ("output_dir", "epochs", "qat_epochs", "seed", "calibration", "runs", "warmup", "kernels")


def main(argv):
    """Runs the command in `argv` (`["kerasq", command, operands...]`, flags already parsed by absl)
    and returns the exit code: 0, 1 for an error in the command, 2 for a usage error.

    Example:
    >>> from kerasq import cli
    >>> cli.main(["kerasq", "frobnicate"])  # prints the error and the usage to stderr
    2
    """
    args = list(argv[1:])
    if not args:
        return _usage_error("no command given.")
    command, operands = args[0], args[1:]
    if command not in COMMANDS:
        return _usage_error(f"unknown command '{command}'.")
    if command == "demo":
        if operands:
            return _usage_error(f"demo takes no arguments; got {' '.join(operands)}.")
        demo_lib.run_demo(FLAGS.output_dir, FLAGS.epochs, FLAGS.qat_epochs, FLAGS.seed)
        return 0
    if command == "convert":
        if len(operands) != 2:
            return _usage_error(f"convert takes MODEL.keras and OUT.tflite; got {len(operands)} arguments.")
        return _run(command, _convert, *operands)
    if command == "migrate":
        if len(operands) != 2:
            return _usage_error(f"migrate takes OLD.h5 and NEW.keras; got {len(operands)} arguments.")
        if not operands[1].endswith(".keras"):
            return _usage_error(f"migrate writes a .keras file; got {operands[1]}.")
        return _run(command, _migrate, *operands)
    if len(operands) != 1:
        return _usage_error(f"{command} takes one .tflite file; got {len(operands)} arguments.")
    return _run(command, {"inspect": _inspect, "bench": _bench, "eval": _eval}[command], operands[0])


def _run(command, function, *operands):
    from kerasq.export import ExportError

    try:
        return function(*operands)
    except (FileNotFoundError, ValueError, ExportError) as error:
        print(f"kerasq {command}: error: {error}", file=sys.stderr)
        return 1


def _convert(model_path, out_path):
    import numpy as np

    from kerasq.export import TFLiteModel, export_tflite
    from kerasq.quantization import is_quantized

    model = _load_keras_model(model_path)
    quantized = is_quantized(model)
    calibration = None
    if FLAGS.calibration:
        if quantized:
            raise ValueError("--calibration is for float models; a QAT model exports to int8 without it.")
        if not os.path.isfile(FLAGS.calibration):
            raise FileNotFoundError(f"--calibration: no such file: {FLAGS.calibration}")
        calibration = np.load(FLAGS.calibration, allow_pickle=False)
    export_tflite(model, out_path, representative_data=calibration)
    tflite = TFLiteModel(out_path)
    kind = "QAT int8" if quantized else ("post-training int8" if calibration is not None else "float32")
    integer = "fully integer" if tflite.is_fully_integer else "not fully integer"
    print(f"{out_path}: {kind}, {tflite.size_bytes:,} bytes, {len(tflite.ops)} ops, {integer}")
    return 0


def _migrate(old_path, new_path):
    from kerasq.pruning import pruning_layers
    from kerasq.quantization import is_quantized
    from kerasq.transfer import migrate_legacy

    if os.path.abspath(old_path) == os.path.abspath(new_path):
        raise ValueError(f"NEW.keras must be another file than {old_path}: migrate never overwrites its source.")
    try:
        model = migrate_legacy(old_path)
    except ValueError as error:  # the unmappable-layers list spans lines: one line here
        raise ValueError(" ".join(line.strip() for line in str(error).splitlines())) from error
    model.save(new_path)
    if is_quantized(model):
        kind = "kerasq QAT model (export it with kerasq convert)"
    elif pruning_layers(model):
        kind = "model with kerasq pruning wrappers"
    else:
        kind = "float model"
    print(f"{new_path}: {kind} migrated from {old_path}, {len(model.layers)} layers")
    return 0


def _load_keras_model(path):
    import keras

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return keras.saving.load_model(path)
    except Exception as error:  # Keras raises many types for a file it cannot read
        raise ValueError(
            f"could not load {path} as a Keras model ({type(error).__name__}: {str(error)[:300]}). "
            "convert takes a .keras file saved with model.save()."
        ) from error


def _inspect(path):
    from kerasq.export import TFLiteModel

    TFLiteModel(path).summary()
    return 0


def _bench(path):
    from kerasq.export import TFLiteModel

    model = TFLiteModel(path, kernels=FLAGS.kernels)
    result = model.benchmark(runs=FLAGS.runs, warmup=FLAGS.warmup)
    print(
        f"{path}: single-sample latency with LiteRT ({FLAGS.kernels} kernels, {FLAGS.runs} runs, random inputs): "
        f"median {result['median_ms']:.4f} ms, p90 {result['p90_ms']:.4f} ms, mean {result['mean_ms']:.4f} ms"
    )
    return 0


def _eval(path):
    from kerasq.data import load_digits
    from kerasq.export import TFLiteModel

    model = TFLiteModel(path, kernels=FLAGS.kernels)
    specs = model.input_specs
    shape = specs[0].shape if len(specs) == 1 else None
    if not (shape and len(shape) == 4 and shape[1] == shape[2] and shape[3] == 1 and shape[1] and shape[1] % 8 == 0):
        raise ValueError(
            f"eval runs the digits test split, which needs a model with one input of shape (batch, N, N, 1), "
            f"N a multiple of 8; this file's inputs are {[s.shape for s in specs]}."
        )
    _, (x_test, y_test) = load_digits(image_size=shape[1])
    accuracy = model.evaluate(x_test, y_test)
    print(f"{path}: accuracy {100 * accuracy:.2f}% on the {len(x_test)} digits test images ({FLAGS.kernels} kernels)")
    return 0


def _usage_error(message):
    print(f"kerasq: {message}\n\n{__doc__}", file=sys.stderr)
    return USAGE_ERROR


def run(argv=None):
    """The `kerasq` console script (also `python -m kerasq`)."""
    # absl's --help prints the __main__ module's docstring and the flags of the program file (argv[0]).
    main_module = sys.modules.get("__main__")
    if main_module is not None and getattr(main_module, "__doc__", None) != __doc__:
        main_module.__doc__ = __doc__
    for name in _FLAG_NAMES:
        FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])
    arguments = sys.argv if argv is None else argv
    try:
        app.run(main, argv=argv)
    except SystemExit as exit:
        # absl exits with 1 after printing help; asking for help is not an error.
        if exit.code == 1 and _HELP_FLAGS & set(arguments[1:]):
            raise SystemExit(0) from None
        raise


_HELP_FLAGS = {"-h", "-?", "--help", "--helpshort", "--helpfull", "--helpxml"}


if __name__ == "__main__":
    run()
