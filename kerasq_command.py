"""The `kerasq` console script's entry point, kept outside the `kerasq` package on purpose.

Importing `kerasq` imports TensorFlow, which writes its start-up messages (oneDNN, CUDA, CPU
features) while it loads. The command's output is its own, so those are silenced before anything
imports TensorFlow, which only a module outside the package can do. `--verbose` keeps them.
"""

import os
import sys


def silence_tensorflow():
    """TensorFlow's C++ and Python logging off, for this process only, and its import (with that of
    anything importing it) run with file descriptor 2 sent to a log shown only if the import fails."""
    import logging
    import tempfile
    import warnings

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    warnings.filterwarnings("ignore")
    for name in ("tensorflow", "absl", "keras"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "tensorflow" in sys.modules:
        return
    log = tempfile.TemporaryFile()
    saved = None
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
    except (OSError, ValueError, AttributeError):
        saved = None
    try:
        import tensorflow  # noqa: F401

        import kerasq  # noqa: F401  (and everything kerasq imports)
    except BaseException:
        if saved is not None:
            os.dup2(saved, 2)
            saved = os.close(saved)
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace"))
        raise
    finally:
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)
        log.close()


def wants_logging(argv):
    return any(a in ("--verbose", "--verbose=true", "--verbose=1") for a in argv[1:])


def run():
    """Silences TensorFlow unless `--verbose`, then runs `kerasq.cli.run`."""
    if not wants_logging(sys.argv):
        silence_tensorflow()
    from kerasq.cli import run as run_command

    run_command()


if __name__ == "__main__":
    run()
