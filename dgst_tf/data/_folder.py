"""Image-folder trees (``<root>/<class>/*.jpg``): listing and :func:`image_folder`."""
from __future__ import annotations

import os
import pathlib

import numpy as np

from dgst_tf.data import _pipeline
from dgst_tf.data._pipeline import DatasetFormatError, DatasetNotFoundError, DatasetSplit

#: What keras.utils.image_dataset_from_directory reads (and tf.io.decode_image decodes).
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")


def list_image_folder(root, *, class_names=None, follow_links: bool = False):
    """List ``<root>/<class>/**/<image>`` as ``(paths, labels, class_names)``.

    Same rules as ``keras.utils.image_dataset_from_directory(labels="inferred",
    shuffle=False)``: classes are the non-hidden subfolders in alphabetical order (or
    ``class_names``, which must name exactly those folders, in the order you want);
    each class folder is walked recursively in sorted order and files with an image
    extension are kept. Only paths are listed, nothing is decoded.
    """
    root = pathlib.Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"image folder not found: {root}")
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if class_names is None:
        class_names = found
    elif set(class_names) != set(found) or len(set(class_names)) != len(class_names):
        raise DatasetFormatError(f"class_names {list(class_names)} do not match the class "
                                 f"folders of {root}: {found}")
    paths, labels = [], []
    for label, name in enumerate(class_names):
        walk = sorted(os.walk(root / name, followlinks=follow_links), key=lambda t: t[0])
        for folder, _, files in walk:
            for fname in sorted(files):
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(folder, fname))
                    labels.append(label)
    if not paths:
        raise DatasetFormatError(
            f"no images in {root}: expected {root}/<class>/<image> with extensions "
            f"{', '.join(IMAGE_EXTENSIONS)} (class folders found: {found or 'none'})")
    return paths, np.asarray(labels, np.int32), tuple(class_names)


def image_folder(path, *, split: str | None = None, image_size=(224, 224),
                 class_names=None, batch_size: int | None = 1, preprocessing="torch",
                 augment=False, shuffle: bool | None = None, seed: int = 0,
                 limit: int | None = None, validation_split: float | None = None,
                 subset: str | None = None, cache=False, drop_remainder: bool = False,
                 follow_links: bool = False) -> DatasetSplit:
    """Any image-folder tree ``<path>/<class>/*.{jpg,png,...}`` as a :class:`DatasetSplit`.

    Labels follow the alphabetical class-folder order, like
    ``keras.utils.image_dataset_from_directory``. Images of any size are decoded to RGB
    and bilinearly resized to ``image_size`` (an int, ``(height, width)`` or a tf-keras
    model whose input size is used). With ``split="train"`` / ``"test"`` the classes are
    read from ``<path>/<split>/``. See :func:`dgst_tf.data.cifar10` for the other keywords;
    ``cache`` defaults to False here because photo folders can be large (True caches the
    resized float32 images in memory, a string caches them in that file).

        from dgst_tf import data
        train = data.image_folder("flowers", image_size=model, batch_size=16,
                                  validation_split=0.1, subset="training", augment=True)
        val = data.image_folder("flowers", image_size=model, batch_size=16,
                                validation_split=0.1, subset="validation")
    """
    opts = _pipeline.Options(
        split=split, image_size=_pipeline.image_size_of(image_size), batch_size=batch_size,
        preprocessing=preprocessing, augment=augment, shuffle=shuffle, seed=seed,
        limit=limit, validation_split=validation_split, subset=subset, cache=cache,
        drop_remainder=drop_remainder)
    root = pathlib.Path(path).expanduser()
    if not root.exists():
        raise DatasetNotFoundError(f"image folder not found: {root}")
    folder = root / split if split else root
    if not folder.is_dir():
        raise DatasetNotFoundError(f"{folder} not found: split={split!r} reads the classes "
                                   f"from <path>/{split}/<class>/")
    paths, labels, names = list_image_folder(folder, class_names=class_names,
                                             follow_links=follow_links)
    return _pipeline.make_split(labels=labels, class_names=names, opts=opts,
                                name=root.name, source="folder", location=folder,
                                paths=paths, resize_on_load=True)
