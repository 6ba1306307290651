"""The `demo` subcommand: `kerasq.demo.run_demo` with progress bars.

Example:
>>> from kerasq.cli.common import COMMANDS
>>> COMMANDS["demo"].flags
('output_dir', 'epochs', 'qat_epochs', 'seed')
"""

from absl import flags

from kerasq import demo as demo_lib
from kerasq.cli.common import FLAGS, Progress, command

flags.DEFINE_string("output_dir", "kerasq_demo", "demo: folder for the .tflite, .keras and .png files.")
flags.DEFINE_integer("epochs", demo_lib.DEFAULT_EPOCHS, "demo: float training epochs.", lower_bound=1)
flags.DEFINE_integer(
    "qat_epochs", demo_lib.DEFAULT_QAT_EPOCHS, "demo: quantization-aware fine-tuning epochs.", lower_bound=1
)
flags.DEFINE_integer("seed", 0, "demo: random seed (keras.utils.set_random_seed).")


@command(
    "demo",
    [],
    "train a small CNN on the bundled digits; compare float32, PTQ int8 and QAT int8 files",
    """Trains a small Conv-BatchNorm-ReLU network on the handwritten digits that ship with scikit-learn
(nothing is downloaded), exports float32, post-training int8 and quantization-aware int8 .tflite
files, runs each with LiteRT and prints one table: accuracy, size, latency and parity. Writes the
files, the QAT model (model_qat.keras) and a figure of the table (kerasq_demo.png, when matplotlib
is installed) to --output_dir.""",
    "kerasq demo --output_dir=/tmp/kerasq_demo --epochs=12 --qat_epochs=3",
    ["output_dir", "epochs", "qat_epochs", "seed"],
    usage="[--output_dir=kerasq_demo] [--epochs=12] [--qat_epochs=3] [--seed=0]",
    wrong_count="demo takes no arguments; got {n}.",
)
def demo():
    demo_lib.run_demo(FLAGS.output_dir, FLAGS.epochs, FLAGS.qat_epochs, FLAGS.seed, progress=Progress)
    return 0
