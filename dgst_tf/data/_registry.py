"""Dataset name -> loader: the one table every command and job reads a dataset through.

    from dgst_tf import data

    train = data.load("cifar10", "train", image_size=(96, 96), batch_size=1, limit=500)
    test = data.load("folder", "test", path="~/flowers", image_size=(96, 96))
    x, y = data.load_arrays("fashion_mnist", "test", image_size=(32, 32), limit=100)
"""
from __future__ import annotations

import numpy as np

from dgst_tf.data._cifar10 import cifar10
from dgst_tf.data._fashion_mnist import fashion_mnist
from dgst_tf.data._folder import image_folder
from dgst_tf.data._pipeline import DatasetSplit


def _folder(split: str, *, path=None, **options) -> DatasetSplit:
    if not path:
        raise ValueError("dataset 'folder' needs a path: an image-folder tree "
                         "<path>/{train,test}/<class>/*.jpg")
    return image_folder(path, split=split, **options)


LOADERS = {
    "fashion_mnist": fashion_mnist,  # Debian's dataset-fashion-mnist IDX files
    "cifar10": cifar10,              # a local image-folder tree or cifar10-jpeg.tar.gz
    "folder": _folder,               # any <path>/{train,test}/<class>/*.jpg tree
}
DATASETS = tuple(LOADERS)


def load(name: str, split: str, *, path=None, **options) -> DatasetSplit:
    """Split ``split`` ("train" or "test") of dataset ``name`` (one of `DATASETS`).

    ``path``: the dataset's location (None: the offline defaults; required for "folder").
    Other keywords are the loaders' shared ones (``image_size``, ``batch_size``, ``limit``,
    ``preprocessing``, ``validation_split`` + ``subset``, ...; see `dgst_tf.data.cifar10`).

        train = load("fashion_mnist", "train", image_size=(32, 32), limit=200)
    """
    if name not in LOADERS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    return LOADERS[name](split, path=path, **options)


def load_arrays(name: str, split: str, *, path=None, image_size, limit: int, seed: int = 0,
                subset: str | None = None, preprocessing="torch"):
    """``limit`` class-balanced images and labels of a split as NumPy arrays (float32
    images, torch preprocessing by default, as the pretrained MobileNetV2 expects).
    ``subset`` ("training" / "validation") takes a 10% validation split of "train".

        x, y = load_arrays("cifar10", "test", image_size=(128, 128), limit=200)
    """
    options = dict(path=path, image_size=tuple(image_size), batch_size=limit,
                   preprocessing=preprocessing, seed=seed, limit=limit, shuffle=True)
    if subset:
        options.update(validation_split=0.1, subset=subset)
    xs, ys = [], []
    for x, y in load(name, split, **options).dataset:
        xs.append(np.asarray(x))
        ys.append(np.asarray(y))
    return np.concatenate(xs)[:limit].astype(np.float32), np.concatenate(ys)[:limit]
