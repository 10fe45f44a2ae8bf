"""A user's own saved tf-keras model (``dgst ... --model path.keras|.h5``), checked before any
command writes anything: the file, the Keras that saved it, every layer against the training
support table (`dgst_tf.core.training_support`), the classifier (`dgst_tf.core.classifier`),
the input size and the number of classes.

    from dgst_tf.models.own_model import load_own_model

    model = load_own_model("my_cnn.keras", image_size=96, classes=10)
    # OwnModelError naming the file and the layer / value at fault otherwise

A refusal names what is wrong: a missing file or a wrong suffix; a model saved by Keras 3
(``keras`` / ``tf.keras`` in TensorFlow >= 2.16) with the fix; a layer the int8 training
step has no row for (``SeparableConv2D``, ``LayerNormalization``, a nested model...); no
classifier dgst-tf can train; an input that is not ``image_size x image_size x 3``; a
classifier whose width is not the dataset's number of classes.
"""
from __future__ import annotations

import json
import pathlib
import zipfile

from dgst_tf.core.graph import UnsupportedModelError, check_functional, nodes_in_order
from dgst_tf.core.keras_compat import KERAS3_FIX, keras
from dgst_tf.models.model_file import MODEL_SUFFIXES

__all__ = ["BUILT_IN", "OwnModelError", "load_own_model", "check_own_model", "is_model_file"]

BUILT_IN = "mobilenet_v2"  # the --model value that means "build it here"


class OwnModelError(UnsupportedModelError):
    """A model file dgst-tf cannot use (names the file and the layer or value at fault)."""


def is_model_file(name: str | None) -> bool:
    """True when ``--model`` names a file rather than the built-in MobileNetV2."""
    return name not in (None, "", BUILT_IN)


def _saved_by(path: pathlib.Path) -> str | None:
    """The ``keras_version`` the file records (None if it records none)."""
    try:
        if path.suffix == ".keras":
            with zipfile.ZipFile(path) as archive:
                return json.loads(archive.read("metadata.json")).get("keras_version")
        import h5py

        with h5py.File(path, "r") as f:
            version = f.attrs.get("keras_version")
        return version.decode() if isinstance(version, bytes) else version
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
        raise OwnModelError(f"--model {str(path)!r}: not a readable {path.suffix} model file "
                            f"({type(error).__name__}: {error})") from None


def _read(path: pathlib.Path) -> keras.Model:
    if not path.is_file():
        raise OwnModelError(f"--model {str(path)!r}: no such file (give {BUILT_IN} or a "
                            "saved tf-keras model, .keras or .h5)")
    if path.suffix not in MODEL_SUFFIXES:
        raise OwnModelError(f"--model {str(path)!r}: a saved tf-keras model must end in "
                            f"{' or '.join(MODEL_SUFFIXES)}")
    version = _saved_by(path)
    if version is not None and str(version).split(".")[0] not in ("2", ""):
        raise OwnModelError(f"--model {str(path)!r} was saved by Keras {version} (Keras 3). "
                            + KERAS3_FIX + " Then save the model again.")
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as error:  # Keras raises anything from TypeError to KeyError here
        raise OwnModelError(f"--model {str(path)!r}: tf-keras cannot load it: "
                            f"{type(error).__name__}: {str(error).splitlines()[0]}") from None


def _check_layers(model: keras.Model, where: str) -> None:
    """Every layer must be one the training support table has a row for."""
    from dgst_tf.core.training_support import SUPPORT, supported_summary, unsupported_reason

    frozen_only = ", ".join(row.label for row in SUPPORT if not row.trains)

    for node in nodes_in_order(model):
        layer = node.layer
        if isinstance(layer, keras.Model):
            raise OwnModelError(f"{where}: layer {layer.name!r} is a nested model "
                                f"({type(layer).__name__}); dgst-tf reads one flat functional "
                                "graph: call the inner model's layers on the outer input "
                                "instead (e.g. build the head on base.output)")
        reason = unsupported_reason(layer)
        if reason is not None and "is not a layer" in reason:
            raise OwnModelError(f"{where}: layer {layer.name!r} ({type(layer).__name__}) is "
                                f"not supported: the int8 training step has no op for "
                                f"{type(layer).__name__}. Supported layers: "
                                f"{supported_summary()}; in front of the trained layers "
                                f"also {frozen_only}")


def check_own_model(model: keras.Model, where: str, image_size: int | None = None,
                    classes: int | None = None) -> keras.Model:
    """Raise `OwnModelError` (``where`` names the file) unless ``model`` is a functional
    tf-keras CNN on ``image_size`` x ``image_size`` x 3 images whose layers are all in the
    training support table and whose classifier has ``classes`` outputs (None: any).
    Returns the model. Example::

        check_own_model(model, "--model cnn.keras", image_size=32, classes=10)
    """
    from dgst_tf.core.classifier import find_classifier

    try:
        check_functional(model, where)
    except UnsupportedModelError as error:
        raise OwnModelError(str(error)) from None
    if len(model.inputs) != 1:
        raise OwnModelError(f"{where}: the model has {len(model.inputs)} inputs; an image "
                            "classifier has one")
    shape = tuple(model.inputs[0].shape[1:])
    if len(shape) != 3 or shape[-1] != 3 or None in shape:
        raise OwnModelError(f"{where}: input shape {shape}: dgst-tf needs a fixed "
                            "height x width x 3 (RGB) input; save the model with e.g. "
                            "keras.Input((96, 96, 3))")
    if image_size is not None and shape[:2] != (image_size, image_size):
        raise OwnModelError(f"{where}: the model's input is {shape[0]}x{shape[1]}x3 but "
                            f"--image-size is {image_size}: pass --image-size {shape[0]}"
                            if shape[0] == shape[1] else
                            f"{where}: the model's input is {shape[0]}x{shape[1]}x3 but "
                            f"--image-size {image_size} means {image_size}x{image_size}x3 "
                            "(square images)")
    _check_layers(model, where)
    try:
        head = find_classifier(model)
    except UnsupportedModelError as error:
        raise OwnModelError(f"{where}: {error}") from None
    width = int(model.outputs[0].shape[-1])
    if classes is not None and width != int(classes):
        raise OwnModelError(f"{where}: classifier {head.name!r} has {width} outputs but the "
                            f"dataset has {classes} classes: save the model with a "
                            f"{classes}-way classifier")
    return model


def load_own_model(path, image_size: int | None = None,
                   classes: int | None = None) -> keras.Model:
    """The tf-keras model saved at ``path`` (.keras or .h5), checked by `check_own_model`;
    raises `OwnModelError` naming the file and the layer or value at fault.

        model = load_own_model("cnn.h5", image_size=32, classes=10)
    """
    path = pathlib.Path(path)
    model = _read(path)
    return check_own_model(model, f"--model {str(path)!r}", image_size, classes)
