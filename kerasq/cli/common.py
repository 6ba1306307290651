"""What the `kerasq` subcommands share: the command table, errors, the input files they read (.keras
models, .npy/.npz arrays), the terminal stream for messages and progress bars.

Nothing here imports TensorFlow at import time: the entry point (`kerasq.cli.run`) silences its
logging first.

Example:
>>> from kerasq.cli.common import Progress
>>> bar = Progress("calibrating", enabled=False)  # enabled only on a terminal, without --quiet
>>> bar.update(3, 10); bar.close()
"""

import dataclasses
import os
import sys
import time
import zipfile

from absl import flags

FLAGS = flags.FLAGS

flags.DEFINE_boolean("quiet", False, "all commands: no progress bars (they are off anyway when output is not a terminal).")
flags.DEFINE_boolean("verbose", False, "all commands: show TensorFlow's and LiteRT's own logging, and tracebacks.")
flags.DEFINE_boolean("version", False, "print kerasq's version (and TensorFlow's, Keras's, LiteRT's) and exit.")

COMMANDS = {}  # name -> Command, in the order the usage lists them


@dataclasses.dataclass
class Command:
    """One subcommand: `kerasq NAME OPERANDS [flags]`."""

    name: str
    operands: tuple  # operand names, e.g. ("MODEL.keras", "OUT.tflite")
    summary: str  # one line for the command list
    description: str  # the paragraphs of `kerasq help NAME`
    example: str  # one or more example command lines
    flags: tuple  # the flags it takes (besides --quiet and --verbose)
    function: object  # function(*operands) -> exit code
    usage: str = ""  # the usage line after the operands, e.g. "[--runs=200]"
    wrong_count: str = ""  # the message for a wrong number of operands ({n}: how many were given)

    def usage_line(self):
        return " ".join(["kerasq", self.name, *self.operands] + ([self.usage] if self.usage else []))


def command(name, operands, summary, description, example, flag_names=(), usage="", wrong_count=""):
    """Registers the decorated function as subcommand `name`."""

    def register(function):
        COMMANDS[name] = Command(name, tuple(operands), summary, description, example, tuple(flag_names), function,
                                 usage, wrong_count)
        return function

    return register


class CommandError(Exception):
    """A failed command: printed as one line `kerasq COMMAND: error: MESSAGE`, exit code 1."""


class UsageError(Exception):
    """Wrong operands or flags: printed with the command's usage, exit code 2."""


# ---- the terminal ---------------------------------------------------------------------------------
_terminal = None


def terminal():
    """The stream of the command's own messages on stderr: while a command runs, file descriptor 2 goes
    to a log (TensorFlow's and LiteRT's C++ code writes there), so this is a copy of the original."""
    return _terminal or sys.stderr


def set_terminal(stream):
    global _terminal
    _terminal = stream


def say(message):
    """Prints a message (a warning, a note) on the command's stderr."""
    print(message, file=terminal(), flush=True)


def progress_enabled():
    stream = terminal()
    try:
        return not FLAGS.quiet and sys.stdout.isatty() and stream.isatty()
    except (AttributeError, ValueError, flags.UnparsedFlagAccessError):
        return False


class Progress:
    """A one-line textual progress bar on the terminal: `label [#######.......] 120/300 0:03`.

    Drawn only when `enabled` (by default: stdout and stderr are terminals and --quiet is off), at most
    ten times a second; `close()` erases it.
    """

    WIDTH = 28

    def __init__(self, label, total=None, enabled=None):
        self.label, self.total = label, total
        self.enabled = progress_enabled() if enabled is None else enabled
        self.start = self.last = time.perf_counter()
        self.shown = False

    def update(self, done, total=None):
        if total is not None:
            self.total = total
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.1 and done != self.total):
            return
        self.last = now
        total = self.total or done or 1
        filled = int(self.WIDTH * min(done, total) / total)
        seconds = int(now - self.start)
        line = f"{self.label} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{total} {seconds // 60}:{seconds % 60:02d}"
        terminal().write("\r" + line + "\033[K")
        terminal().flush()
        self.shown = True

    def close(self):
        if self.shown:
            terminal().write("\r\033[K")
            terminal().flush()
            self.shown = False


# ---- input files ------------------------------------------------------------------------------------
def check_file(path, what):
    """A `CommandError` unless `path` is an existing file; `what` names it in the message."""
    if os.path.isdir(path):
        raise CommandError(f"{what} {path} is a directory, not a file.")
    if not os.path.isfile(path):
        raise CommandError(f"{what} {path}: no such file.")


def load_keras_model(path):
    """The Keras model saved at `path` (a .keras archive, or a Keras 3 .h5 file)."""
    import keras

    if os.path.isdir(path):
        raise CommandError(
            f"{path} is a directory, not a Keras file (a SavedModel? kerasq migrate rebuilds tf_keras models "
            "as .keras files)."
        )
    check_file(path, "MODEL.keras")
    is_h5 = path.lower().endswith((".h5", ".hdf5"))
    if not is_h5 and not zipfile.is_zipfile(path):
        raise CommandError(
            f"{path} is not a Keras file: a .keras file is a zip archive written by model.save('model.keras'), "
            "and this one is not a zip archive (truncated or another format?)."
        )
    if not is_h5:
        with zipfile.ZipFile(path) as archive:
            if "config.json" not in archive.namelist():
                raise CommandError(f"{path} is not a Keras file: the zip archive has no config.json.")
    try:
        return keras.saving.load_model(path)
    except Exception as error:  # Keras raises many types for a file it cannot read
        text = " ".join(str(error).split())[:300]
        raise CommandError(
            f"could not load {path} as a Keras model ({type(error).__name__}: {text}). A model with custom "
            "layers loads only where they are registered (keras.saving.register_keras_serializable)."
        ) from error


def load_arrays(path, what, *, need_labels=False):
    """`(x, y)` from a .npz file with arrays `x` and (optionally) `y`, or `(x, None)` from a .npy file."""
    import numpy as np

    check_file(path, what)
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as error:
        raise CommandError(
            f"{what} {path} is not a NumPy .npy/.npz file ({type(error).__name__}: {' '.join(str(error).split())[:200]})."
        ) from error
    if isinstance(loaded, np.ndarray):
        if need_labels:
            raise CommandError(
                f"{what} {path} holds one array; it needs inputs and labels: np.savez('{os.path.basename(path)}', "
                "x=inputs, y=labels)."
            )
        return loaded, None
    with loaded:
        names = list(loaded.files)
        if "x" not in names:
            raise CommandError(
                f"{what} {path} has no array 'x' (it holds {', '.join(names) or 'nothing'}); save the model inputs "
                "as x (and the labels as y): np.savez(path, x=inputs, y=labels)."
            )
        if need_labels and "y" not in names:
            raise CommandError(
                f"{what} {path} has no array 'y' (it holds {', '.join(names)}); accuracy needs the labels: "
                "np.savez(path, x=inputs, y=labels)."
            )
        return loaded["x"], (loaded["y"] if "y" in names else None)


def load_tflite(path, **kwargs):
    """A `TFLiteModel` for `path`, with the file named in the error of a missing or broken file."""
    from kerasq.export import TFLiteModel

    check_file(path, "FILE.tflite")
    try:
        return TFLiteModel(path, **kwargs)
    except ValueError as error:
        raise CommandError(" ".join(str(error).split())) from error
