"""The `kerasq` command: `demo`, `inspect FILE`, `bench FILE`, `eval FILE`.

Example:
    kerasq demo --output_dir=kerasq_demo
    kerasq inspect kerasq_demo/model_qat_int8.tflite
"""

import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", "kerasq_demo", "Where `demo` writes its .tflite and .keras files.")
flags.DEFINE_integer("epochs", None, "Float training epochs for `demo` (default: the demo's own).")
flags.DEFINE_integer("qat_epochs", None, "Quantization-aware fine-tuning epochs for `demo`.")
flags.DEFINE_integer("seed", 0, "Random seed for `demo`.")
flags.DEFINE_integer("runs", 50, "Timed invocations for `bench`.")

USAGE = """usage: kerasq COMMAND [ARGS] [--flags]
commands:
  demo           train a CNN on the digits; float, PTQ int8 and QAT int8 side by side
  inspect FILE   list a .tflite file's ops, tensors and quantization parameters
  bench FILE     LiteRT latency of one single-sample invocation
  eval FILE      accuracy of a digits classifier file on the digits test split"""


def main(argv):
    command, args = (argv[1], argv[2:]) if len(argv) > 1 else (None, [])
    if command == "demo" and not args:
        from kerasq.demo import run_demo

        options = {"output_dir": FLAGS.output_dir, "seed": FLAGS.seed}
        if FLAGS.epochs is not None:
            options["epochs"] = FLAGS.epochs
        if FLAGS.qat_epochs is not None:
            options["qat_epochs"] = FLAGS.qat_epochs
        run_demo(**options)
        return 0
    if command in ("inspect", "bench", "eval") and len(args) == 1:
        return _file_command(command, args[0])
    print(USAGE, file=sys.stderr)
    return 2


def _file_command(command, path):
    from kerasq.export import TFLiteModel

    try:
        model = TFLiteModel(path)
    except (FileNotFoundError, ValueError) as error:
        print(f"kerasq {command}: {error}", file=sys.stderr)
        return 1
    if command == "inspect":
        model.summary()
    elif command == "bench":
        timing = model.benchmark(runs=FLAGS.runs)
        print(f"{path}: median {timing['median_ms']:.3f} ms, p90 {timing['p90_ms']:.3f} ms per sample")
    else:
        from kerasq.data import load_digits

        (_, _), (x_test, y_test) = load_digits()
        print(f"{path}: accuracy {100 * model.evaluate(x_test, y_test):.2f}% on {len(y_test)} test digits")
    return 0


def run():
    """Console-script entry point."""
    app.run(main)
