"""Writing files so that readers never see half of one: a temp file in the same folder, then
`os.replace`. Every file the project writes (models, schemes, results, caches) goes through here.

    from dgst_tf.core.files import write_atomically, write_json_atomically

    write_atomically("model.tflite", data)                # bytes or str
    write_json_atomically("out/result.json", {"acc": 0.9}, make_parents=True)

This module imports only the standard library (the TFLM child process and the firmware tools
use it without TensorFlow).
"""
from __future__ import annotations

import json
import os
import pathlib
import tempfile

__all__ = ["write_atomically", "write_json_atomically"]


def write_atomically(path, data: bytes | str, make_parents: bool = False) -> pathlib.Path:
    """Write ``data`` (bytes, or str as UTF-8) to ``path`` through a temp file and `os.replace`.

    Nothing is left behind if writing fails. The folder must exist unless ``make_parents``.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"write_atomically: {path} is a directory, expected a file path")
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.parent.is_dir():
        raise FileNotFoundError(f"write_atomically: folder {path.parent} of {path} does not exist")
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp creates 0600; our outputs are not secret
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def write_json_atomically(path, payload, make_parents: bool = True) -> pathlib.Path:
    """Write ``payload`` as indented JSON, atomically (parent folders made by default)."""
    return write_atomically(path, json.dumps(payload, indent=2) + "\n", make_parents)
