"""Fashion-MNIST from IDX files (Debian's ``dataset-fashion-mnist``) or from Keras."""
from __future__ import annotations

import functools
import gzip
import os
import pathlib
import zlib

import numpy as np

from dgst_tf.data import _pipeline
from dgst_tf.data._pipeline import DatasetFormatError, DatasetNotFoundError, DatasetSplit
from dgst_tf.core.keras_compat import keras

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
ENV_VAR = "DGST_FASHION_MNIST"
DEBIAN_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_DIR = DEBIAN_DIR  # the default location (find_fashion_mnist() says where it is)
#: Where keras.datasets.fashion_mnist.load_data() keeps its download (the same IDX files).
KERAS_DIRS = (pathlib.Path("~/.keras/datasets/fashion-mnist").expanduser(),
              pathlib.Path("/tmp/.keras/datasets/fashion-mnist"))
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4",
              0x0E: ">f8"}


# --------------------------------------------------------------------------- IDX format
def _open(path: pathlib.Path):
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def read_idx_header(path) -> tuple[int, tuple[int, ...]]:
    """``(magic, dims)`` of an IDX file (gzipped or not), reading only its header."""
    path = pathlib.Path(path)
    try:
        with _open(path) as f:
            head = f.read(4)
            if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in _IDX_TYPES or \
                    head[3] == 0:
                raise DatasetFormatError(f"{path}: not an IDX file (magic bytes "
                                         f"{head.hex() or 'missing'})")
            ndim = head[3]
            raw = f.read(4 * ndim)
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetFormatError(f"{path}: unreadable or corrupt ({e})") from e
    if len(raw) < 4 * ndim:
        raise DatasetFormatError(f"{path}: truncated IDX header")
    return int.from_bytes(head, "big"), tuple(int(d) for d in np.frombuffer(raw, ">u4"))


def read_idx(path) -> np.ndarray:
    """An IDX file (the MNIST format, gzipped or not) as a NumPy array.

    The magic number (two zero bytes, a type code, the number of dimensions), the
    dimensions and the data size are checked; a bad file raises
    :class:`DatasetFormatError` naming it.
    """
    path = pathlib.Path(path)
    magic, dims = read_idx_header(path)
    dtype = np.dtype(_IDX_TYPES[(magic >> 8) & 0xFF])
    try:
        with _open(path) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetFormatError(f"{path}: unreadable or corrupt ({e})") from e
    expected = int(np.prod(dims)) * dtype.itemsize
    body = memoryview(data)[4 + 4 * len(dims):]
    if len(body) != expected:
        raise DatasetFormatError(f"{path}: header says {dims} ({expected} bytes of data) "
                                 f"but the file has {len(body)}: truncated or corrupt")
    return np.frombuffer(body, dtype).reshape(dims).astype(dtype.newbyteorder("="))


def _file(folder: pathlib.Path, name: str) -> pathlib.Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _has_files(folder: pathlib.Path) -> bool:
    return all(_file(folder, n) for names in FILES.values() for n in names)


@functools.lru_cache(maxsize=2)  # train + test, ~55 MB
def _load(folder: str, split: str, _stamp) -> tuple[np.ndarray, np.ndarray]:
    image_file, label_file = (_file(pathlib.Path(folder), n) for n in FILES[split])
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DatasetFormatError(f"{image_file}: expected uint8 images of 28x28 (IDX magic "
                                 f"0x00000803), found {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DatasetFormatError(f"{label_file}: expected uint8 labels (IDX magic "
                                 f"0x00000801), found {labels.dtype} {labels.shape}")
    if len(labels) != len(images):
        raise DatasetFormatError(f"{image_file} has {len(images)} images but {label_file} "
                                 f"has {len(labels)} labels")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DatasetFormatError(f"{label_file}: label {labels.max()} out of range 0..9")
    return images, labels


# --------------------------------------------------------------------------- public API
def find_fashion_mnist(path=None) -> pathlib.Path:
    """The folder holding the four Fashion-MNIST IDX files (``.gz`` or not).

    Search order: ``path``, ``$DGST_FASHION_MNIST``, ``/usr/share/datasets/fashion-mnist``
    (Debian's ``dataset-fashion-mnist``), then Keras' download folder. Raises
    :class:`DatasetNotFoundError` naming every folder tried.
    """
    if path is not None:
        candidates = [(pathlib.Path(path).expanduser(), "the path argument")]
    else:
        candidates = []
        if os.environ.get(ENV_VAR):
            candidates.append((pathlib.Path(os.environ[ENV_VAR]).expanduser(), f"${ENV_VAR}"))
        candidates.append((DEBIAN_DIR, "Debian package dataset-fashion-mnist"))
        candidates += [(d, "Keras download folder") for d in KERAS_DIRS]
    for folder, _ in candidates:
        if _has_files(folder):
            return folder
    names = ", ".join(f"{n}.gz" for names in FILES.values() for n in names)
    raise DatasetNotFoundError(
        "Fashion-MNIST not found. Tried (each needs " + names + "):\n"
        + "".join(f"  - {folder} ({why})\n" for folder, why in candidates)
        + "Provide it with one of:\n"
        "  - sudo apt-get install dataset-fashion-mnist (Debian/Ubuntu, offline-friendly);\n"
        f"  - fashion_mnist(path=...) or ${ENV_VAR} pointing at a folder with those files;\n"
        "  - fashion_mnist(source=\"keras\") to download it with "
        "keras.datasets.fashion_mnist.load_data() (needs internet).")


def fashion_mnist_available(path=None) -> bool:
    """True if :func:`find_fashion_mnist` finds the IDX files (checks existence only)."""
    try:
        find_fashion_mnist(path)
    except DatasetNotFoundError:
        return False
    return True


def fashion_mnist(split: str = "train", *, path=None, source: str = "auto",
                  image_size=(28, 28), channels: int = 3, batch_size: int | None = 1,
                  preprocessing="torch", augment=False, shuffle: bool | None = None,
                  seed: int = 0, limit: int | None = None,
                  validation_split: float | None = None, subset: str | None = None,
                  cache=True, drop_remainder: bool = False) -> DatasetSplit:
    """Fashion-MNIST (60,000 train / 10,000 test 28x28 grayscale images, 10 classes).

    ``source="auto"``/``"idx"`` parse the IDX files found by :func:`find_fashion_mnist`
    with NumPy (no download); ``"keras"`` uses ``keras.datasets.fashion_mnist.load_data()``.
    ``channels=3`` (default) repeats the gray channel for RGB models; ``channels=1`` keeps
    it (then "torch" preprocessing uses the averaged ImageNet mean and std). The images
    live in memory, so ``cache`` has nothing to do. Other keywords as in
    :func:`dgst_tf.data.cifar10`.

        from dgst_tf import data
        train = data.fashion_mnist("train", image_size=(32, 32), batch_size=64)
        train.class_names[0]   # 'T-shirt/top'
    """
    opts = _pipeline.Options(
        split=split, image_size=_pipeline.image_size_of(image_size), batch_size=batch_size,
        preprocessing=preprocessing, augment=augment, shuffle=shuffle, seed=seed,
        limit=limit, validation_split=validation_split, subset=subset, cache=cache,
        drop_remainder=drop_remainder, channels=channels)
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if source == "keras":
        if path is not None:
            raise ValueError("path is for local copies; source='keras' downloads its own")
        (x_train, y_train), (x_test, y_test) = keras.datasets.fashion_mnist.load_data()
        images, labels = (x_train, y_train) if split == "train" else (x_test, y_test)
        location = None
    elif source in ("auto", "idx"):
        location = find_fashion_mnist(path)
        files = [_file(location, n) for n in FILES[split]]
        stamp = tuple((f.stat().st_size, f.stat().st_mtime_ns) for f in files)
        images, labels = _load(os.fspath(location), split, stamp)
    else:
        raise ValueError(f"source must be 'auto', 'idx' or 'keras', got {source!r}")
    return _pipeline.make_split(labels=labels, class_names=FASHION_MNIST_CLASSES, opts=opts,
                                name="fashion_mnist", source="keras" if location is None
                                else "idx", location=location, images=images)
