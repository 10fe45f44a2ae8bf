"""``tf.data`` pipelines for training and evaluation: CIFAR-10, Fashion-MNIST, image folders.

Every loader takes the split plus keyword arguments and returns a :class:`DatasetSplit`
whose ``.dataset`` yields ``(float32 [batch, H, W, 3], int32 [batch])`` and which also
knows ``num_examples``, ``class_names``, ``num_classes`` and ``steps_per_epoch``::

    from dgst_tf import data

    train = data.cifar10("train", image_size=(224, 224), batch_size=32, augment=True,
                         validation_split=0.1, subset="training")
    val = data.cifar10("train", image_size=(224, 224), batch_size=64,
                       validation_split=0.1, subset="validation")
    test = data.cifar10("test", image_size=(224, 224), batch_size=64, limit=500)
    model.fit(train.dataset, validation_data=val.dataset, epochs=1)

    fmnist = data.fashion_mnist("test", batch_size=1)        # Debian's IDX files
    flowers = data.image_folder("~/flowers", image_size=model)  # <root>/<class>/*.jpg
    split = data.load("cifar10", "test", limit=100)          # by name: data.DATASETS

Offline by default: CIFAR-10 comes from a local image-folder tree or
``cifar10-jpeg.tar.gz`` (see :func:`find_cifar10`), Fashion-MNIST from
``/usr/share/datasets/fashion-mnist``; ``source="keras"`` downloads through
``keras.datasets`` instead. Shared keywords: ``image_size``, ``batch_size``,
``preprocessing`` ("torch", "tf", None or a callable), ``augment``, ``shuffle``, ``seed``,
``limit``, ``validation_split`` + ``subset``, ``cache``, ``drop_remainder``.
"""
from dgst_tf.data._cifar10 import CIFAR10_CLASSES, cifar10, find_cifar10
from dgst_tf.data._fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    fashion_mnist,
    fashion_mnist_available,
    find_fashion_mnist,
    read_idx,
    read_idx_header,
)
from dgst_tf.data._folder import IMAGE_EXTENSIONS, image_folder, list_image_folder
from dgst_tf.data._pipeline import (
    TORCH_MEAN,
    TORCH_STD,
    DatasetFormatError,
    DatasetNotFoundError,
    DatasetSplit,
    preprocess,
)
from dgst_tf.data._registry import DATASETS, LOADERS, load, load_arrays

__all__ = [
    "DATASETS", "LOADERS", "load", "load_arrays",
    "CIFAR10_CLASSES", "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "IMAGE_EXTENSIONS",
    "TORCH_MEAN", "TORCH_STD",
    "DatasetFormatError", "DatasetNotFoundError", "DatasetSplit", "cifar10",
    "fashion_mnist", "fashion_mnist_available", "find_cifar10", "find_fashion_mnist",
    "image_folder", "list_image_folder", "preprocess", "read_idx", "read_idx_header",
]
