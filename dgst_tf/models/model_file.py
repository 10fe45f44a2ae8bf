"""Saving a tf-keras model file atomically: readers never see half of a model.

    from dgst_tf.models.model_file import save_model_atomically
    save_model_atomically(model, "out/model.keras")     # or .h5
    model = keras.models.load_model("out/model.keras", compile=False)
"""
from __future__ import annotations

import pathlib
import tempfile

from dgst_tf.core.files import write_atomically

MODEL_SUFFIXES = (".keras", ".h5")


def save_model_atomically(model, path) -> pathlib.Path:
    """Save a tf-keras model to ``path`` (.keras or .h5; parent folders are made).

    Keras writes into a private temporary folder; the finished file is then moved into place
    by `dgst_tf.core.files.write_atomically`, so an interrupted save leaves nothing behind.
    """
    path = pathlib.Path(path)
    if path.suffix not in MODEL_SUFFIXES:
        raise ValueError(f"{str(path)!r}: use a .keras or .h5 file name for a tf-keras model")
    with tempfile.TemporaryDirectory(prefix="dgst-model-") as tmp:
        staged = pathlib.Path(tmp) / f"model{path.suffix}"
        model.save(staged, save_format="h5" if path.suffix == ".h5" else None)
        return write_atomically(path, staged.read_bytes(), make_parents=True)


__all__ = ["MODEL_SUFFIXES", "save_model_atomically"]
