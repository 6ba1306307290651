"""`quiet()`: silences the TFLite converter for a block, keeping what it printed for error messages.

Example:
>>> import os
>>> from kerasq.export.quiet import quiet
>>> with quiet() as log:
...     _ = os.write(2, b"converter noise\\n")  # C++ code writes to file descriptor 2, not sys.stderr
...     captured = log.text()
>>> captured
'converter noise\\n'
"""

import contextlib
import logging
import os
import sys
import tempfile
import warnings


class CapturedLog:
    """What the C++ side wrote to stderr while `quiet()` was active; `text()` reads it back."""

    def __init__(self):
        self.file = tempfile.TemporaryFile()

    def text(self):
        try:
            self.file.seek(0)
            return self.file.read().decode(errors="replace")
        except (OSError, ValueError):
            return ""


@contextlib.contextmanager
def quiet():
    """Silences Python warnings, TensorFlow and absl logging, and C++ output on stderr for the block
    only; yields a `CapturedLog` of that C++ output."""
    log = CapturedLog()
    tf_logger = logging.getLogger("tensorflow")
    absl_logger = logging.getLogger("absl")
    levels = tf_logger.level, absl_logger.level
    saved_fd = None
    try:
        sys.stderr.flush()
        saved_fd = os.dup(2)
        os.dup2(log.file.fileno(), 2)
    except (OSError, ValueError, AttributeError):
        saved_fd = None
    tf_logger.setLevel(logging.ERROR)
    absl_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield log
    finally:
        tf_logger.setLevel(levels[0])
        absl_logger.setLevel(levels[1])
        if saved_fd is not None:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
        log.file.close()
