"""`write_atomic`: a file is replaced whole or not at all, never left half-written.

Example:
>>> import os, tempfile
>>> from kerasq.export.files import write_atomic
>>> with tempfile.TemporaryDirectory() as folder:
...     write_atomic(os.path.join(folder, "sub", "model.tflite"), b"bytes")
...     os.listdir(os.path.join(folder, "sub"))
['model.tflite']
"""

import contextlib
import os
import tempfile


def write_atomic(path, content):
    """Writes `content` to `path` through a temporary file in the same folder and an atomic rename.

    Parent folders are created; an existing file keeps its permissions.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"'{path}' is a directory; give a file name such as '{os.path.join(path, 'model.tflite')}'.")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
