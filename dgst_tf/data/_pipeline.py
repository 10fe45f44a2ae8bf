"""The machinery every dataset of :mod:`dgst_tf.data` shares.

A source (image folder, archive, IDX files, Keras arrays) only lists its examples: file
paths or a uint8 array, plus int labels. This module then selects examples (seeded
validation split, class-balanced ``limit``), streams and decodes them, caches, shuffles,
augments, resizes, preprocesses, batches and prefetches, and wraps the result in a
:class:`DatasetSplit`.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Sequence, Union

import numpy as np

from dgst_tf.core.keras_compat import tf

AUTOTUNE = tf.data.AUTOTUNE
#: torchvision's ImageNet statistics (our pretrained MobileNetV2 expects them).
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)
#: "crop" pads by this fraction of the image side (4 px at 32x32, the usual CIFAR recipe).
CROP_PADDING_FRACTION = 1 / 8
#: "resized_crop": fraction of the area and aspect-ratio range of the random crop.
RESIZED_CROP_AREA = (0.25, 1.0)
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)

Preprocessing = Union[str, None, Callable]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not where we looked; the message lists the paths and how to fix it."""


class DatasetFormatError(ValueError):
    """A dataset exists but is malformed (corrupt file, wrong folder layout, bad header)."""


@dataclasses.dataclass(frozen=True, repr=False)
class DatasetSplit:
    """A ready ``tf.data.Dataset`` plus what a training or evaluation loop needs to know.

    ``dataset`` yields ``(images, labels)``: float32 ``[batch, H, W, C]`` and int32
    ``[batch]`` (no batch dimension when ``batch_size`` is None). Iterating a
    ``DatasetSplit`` iterates its dataset; pass ``split.dataset`` to ``model.fit``.

        train = dgst_tf.data.cifar10("train", batch_size=32, augment=True)
        model.fit(train.dataset, epochs=1, steps_per_epoch=train.steps_per_epoch)
        print(train.num_examples, train.num_classes, train.class_names[:2])
    """

    dataset: tf.data.Dataset
    num_examples: int
    class_names: tuple
    class_counts: tuple  # examples per class, in ``class_names`` order
    image_size: tuple  # (height, width)
    batch_size: int | None
    name: str  # "cifar10", "fashion_mnist" or the folder's name
    split: str | None  # "train", "test" or None (a plain image folder)
    subset: str | None  # "training" / "validation" when validation_split was given
    source: str  # "folder", "archive", "idx" or "keras"
    location: str | None  # the folder or file read (None for source="keras")
    file_paths: tuple | None = None  # selected files in their un-shuffled order
    drop_remainder: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def steps_per_epoch(self) -> int:
        """Batches in one pass over the data."""
        if self.batch_size is None:
            return self.num_examples
        rounding = math.floor if self.drop_remainder else math.ceil
        return int(rounding(self.num_examples / self.batch_size))

    def __iter__(self):
        return iter(self.dataset)

    def __repr__(self) -> str:
        part = "/".join(p for p in (self.split, self.subset) if p) or "all"
        return (f"DatasetSplit({self.name} {part}: {self.num_examples} examples, "
                f"{self.num_classes} classes, image_size={self.image_size}, "
                f"batch_size={self.batch_size}, source={self.source!r}, "
                f"location={self.location!r})")


# --------------------------------------------------------------------------- options
@dataclasses.dataclass
class Options:
    """The keyword arguments all dataset functions share, validated once."""

    split: str | None
    image_size: tuple
    batch_size: int | None = 1
    preprocessing: Preprocessing = "torch"
    augment: bool | str = False
    shuffle: bool | None = None
    seed: int = 0
    limit: int | None = None
    validation_split: float | None = None
    subset: str | None = None
    cache: bool | str = True
    drop_remainder: bool = False
    channels: int = 3

    def __post_init__(self):
        if self.split not in ("train", "test", None):
            raise ValueError(f"split must be 'train' or 'test', got {self.split!r}")
        if self.validation_split is not None or self.subset is not None:
            if self.split == "test":
                raise ValueError("validation_split carves a validation set out of the "
                                 "training data; it cannot be used with split='test'")
            if not (isinstance(self.validation_split, (int, float))
                    and 0 < self.validation_split < 1):
                raise ValueError("validation_split must be a fraction in (0, 1) when subset "
                                 f"is given, got {self.validation_split!r}")
            if self.subset not in ("training", "validation"):
                raise ValueError("validation_split needs subset='training' or "
                                 f"'validation', got {self.subset!r}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int)
                                            or self.batch_size < 1):
            raise ValueError(f"batch_size must be a positive int or None, got "
                             f"{self.batch_size!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f"limit must be a positive int or None, got {self.limit!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if self.augment is True:
            self.augment = "crop"
        if self.augment not in (False, None, "crop", "resized_crop"):
            raise ValueError("augment must be False, True/'crop' (pad-and-crop + flip) or "
                             f"'resized_crop' (random resized crop + flip), got "
                             f"{self.augment!r}")
        if self.augment and not self.training:
            raise ValueError("augment is for training data only (split='train', not the "
                             "test split or the validation subset)")
        if self.shuffle is None:
            self.shuffle = self.training
        if not (self.preprocessing in ("torch", "tf", None) or callable(self.preprocessing)):
            raise ValueError("preprocessing must be 'torch', 'tf', None or a callable, got "
                             f"{self.preprocessing!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels!r}")

    @property
    def training(self) -> bool:
        return self.split != "test" and self.subset != "validation"


def image_size_of(image_size, default=None) -> tuple:
    """``(height, width)`` from an int, a pair, a tf-keras model (its input) or None."""
    if image_size is None:
        image_size = default
    shape = getattr(image_size, "input_shape", None)
    if shape is not None:  # a Keras model or layer: use its input size
        if isinstance(shape, list) or len(shape) != 4 or None in shape[1:3]:
            raise ValueError(f"cannot take an image size from a model with input shape "
                             f"{shape}; pass image_size=(height, width)")
        image_size = shape[1:3]
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    try:
        height, width = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be an int, (height, width) or a model, got "
                         f"{image_size!r}") from None
    if height < 1 or width < 1:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return height, width


def preprocess(images, mode: Preprocessing = "torch"):
    """Map float pixel values in 0..255 the way a model expects (any leading dims).

    ``"torch"``: ``(x / 255 - mean) / std`` with torchvision's ImageNet statistics (the
    channel averages for 1-channel images); ``"tf"``: ``x / 127.5 - 1``; None: unchanged;
    a callable: ``mode(images)``. Always returns float32.
    """
    images = tf.cast(images, tf.float32)
    if mode is None:
        return images
    if mode == "torch":
        mean, std = np.array(TORCH_MEAN, np.float32), np.array(TORCH_STD, np.float32)
        if images.shape[-1] == 1:
            mean, std = mean.mean(keepdims=True), std.mean(keepdims=True)
        return (images / 255.0 - mean) / std
    if mode == "tf":
        return images / 127.5 - 1.0
    if callable(mode):
        return tf.cast(mode(images), tf.float32)
    raise ValueError(f"unknown preprocessing {mode!r}: use 'torch', 'tf', None or a callable")


# --------------------------------------------------------------------------- selection
def select(labels: np.ndarray, num_classes: int, opts: Options) -> np.ndarray:
    """Indices of the examples to use, in their original order (pure NumPy, seeded).

    The validation split holds ``round(N * fraction)`` examples, stratified (each class
    gives its share, rounded by largest remainder), chosen by ``seed`` alone. ``limit``
    then keeps the first N of a seeded round-robin over the classes, so it is
    class-balanced as far as the classes allow.
    """
    index = np.arange(len(labels))
    if opts.validation_split is not None:
        rng = np.random.default_rng([opts.seed, 1])
        counts = np.bincount(labels, minlength=num_classes)
        quota = counts * opts.validation_split
        take = np.floor(quota).astype(np.int64)
        # Hand the rest of round(N * fraction) to the largest remainders (seeded ties).
        extra = int(round(len(labels) * opts.validation_split)) - int(take.sum())
        order = np.lexsort((rng.random(num_classes), -(quota - take)))
        take[order[:max(extra, 0)]] += 1
        in_validation = np.zeros(len(labels), bool)
        for c in range(num_classes):
            in_validation[rng.permutation(np.flatnonzero(labels == c))[:take[c]]] = True
        index = index[in_validation if opts.subset == "validation" else ~in_validation]
    if opts.limit is not None and opts.limit < len(index):
        rng = np.random.default_rng([opts.seed, 2])
        chosen_labels = labels[index]
        rank = np.empty(len(index), np.int64)  # position of each example within its class
        for c in range(num_classes):
            members = np.flatnonzero(chosen_labels == c)
            rank[members[rng.permutation(len(members))]] = np.arange(len(members))
        order = np.lexsort((chosen_labels, rank))  # round-robin: rank first, then class
        index = np.sort(index[order[:opts.limit]])
    return index


# --------------------------------------------------------------------------- pipelines
def _decode_file(path, label):
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    return image, label


def _resize(image, size):
    return tf.image.resize(image, size, method="bilinear")


def _augment(image, size, mode, seed):
    """Seeded (stateless) augmentation: same seed, same result, whatever the threading."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    channels = image.shape[-1]
    if mode == "resized_crop":
        begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(image), tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=crop_seed,
            min_object_covered=0.0, aspect_ratio_range=RESIZED_CROP_RATIO,
            area_range=RESIZED_CROP_AREA, max_attempts=10,
            use_image_if_no_bounding_boxes=True)
        image = _resize(tf.slice(image, begin, crop), size)
    else:  # "crop": zero-pad, then a random crop back to the target size
        image = _resize(image, size)
        pad = max(1, int(round(min(size) * CROP_PADDING_FRACTION)))
        image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
        image = tf.image.stateless_random_crop(image, [size[0], size[1], channels], crop_seed)
    return tf.image.stateless_random_flip_left_right(image, flip_seed)


def _finish(ds, n: int, opts: Options, *, shuffled: bool, resized: bool):
    """Cache, shuffle, augment/resize, preprocess, batch and prefetch decoded examples."""
    size = opts.image_size
    if opts.cache:
        ds = ds.cache("" if opts.cache is True else os.fspath(opts.cache))
    if opts.shuffle and not shuffled:
        ds = ds.shuffle(n, seed=opts.seed, reshuffle_each_iteration=True)

    def transform(image, label, seed=None):
        image = tf.cast(image, tf.float32)
        if image.shape[-1] != opts.channels:  # grayscale sources feeding RGB models
            image = tf.image.grayscale_to_rgb(image)
        if seed is not None:
            image = _augment(image, size, opts.augment, seed)
        elif not resized:
            image = _resize(image, size)
        image = preprocess(image, opts.preprocessing)
        image.set_shape((size[0], size[1], opts.channels))
        return image, label

    if opts.augment:
        # One seed pair per element, different each epoch, reproducible from opts.seed.
        seeds = tf.data.Dataset.random(seed=opts.seed + 7919,
                                       rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda example, seed: transform(*example, seed), num_parallel_calls=AUTOTUNE)
    else:
        ds = ds.map(transform, num_parallel_calls=AUTOTUNE)
    if opts.batch_size is not None:
        ds = ds.batch(opts.batch_size, drop_remainder=opts.drop_remainder)
    return ds.prefetch(AUTOTUNE)


def from_files(paths: Sequence[str], labels: np.ndarray, opts: Options, *,
               resize_on_load: bool = False) -> tf.data.Dataset:
    """Stream image files: paths -> read + decode (parallel) -> :func:`_finish`.

    Without a cache the (cheap) path list is shuffled before decoding. With one, decoded
    images are cached at their stored size (or at ``image_size`` when ``resize_on_load``,
    for folders of mixed-size photos) and shuffled from the cache.
    """
    n = len(paths)
    ds = tf.data.Dataset.from_tensor_slices((np.asarray(paths, dtype=str),
                                             np.asarray(labels, np.int32)))
    shuffled = bool(opts.shuffle and not opts.cache)
    if shuffled:
        ds = ds.shuffle(n, seed=opts.seed, reshuffle_each_iteration=True)
    if resize_on_load:
        size = opts.image_size
        ds = ds.map(lambda p, y: (_resize(_decode_file(p, y)[0], size), y),
                    num_parallel_calls=AUTOTUNE)
    else:
        ds = ds.map(_decode_file, num_parallel_calls=AUTOTUNE)
    return _finish(ds, n, opts, shuffled=shuffled, resized=resize_on_load)


def from_arrays(images: np.ndarray, labels: np.ndarray, opts: Options) -> tf.data.Dataset:
    """In-memory uint8 images ``[N, H, W]`` or ``[N, H, W, C]``: shuffle indices, gather."""
    if images.ndim == 3:
        images = images[..., None]
    n = len(images)
    images_t = tf.constant(images)
    labels_t = tf.constant(np.asarray(labels, np.int32))
    ds = tf.data.Dataset.range(n)
    if opts.shuffle:
        ds = ds.shuffle(n, seed=opts.seed, reshuffle_each_iteration=True)
    ds = ds.map(lambda i: (tf.gather(images_t, i), tf.gather(labels_t, i)))
    return _finish(ds, n, dataclasses.replace(opts, cache=False), shuffled=True,
                   resized=False)


def make_split(*, labels: np.ndarray, class_names, opts: Options, name: str, source: str,
               location, paths=None, images=None, resize_on_load=False) -> DatasetSplit:
    """Select the examples (``opts``) from a file list or an array and build the split."""
    labels = np.asarray(labels).reshape(-1).astype(np.int32)
    index = select(labels, len(class_names), opts)
    if len(index) == 0:
        raise DatasetFormatError(f"no examples selected from {location or name}")
    chosen = labels[index]
    if paths is not None:
        files = [paths[i] for i in index]
        dataset = from_files(files, chosen, opts, resize_on_load=resize_on_load)
    else:
        files = None
        dataset = from_arrays(images[index], chosen, opts)
    return DatasetSplit(
        dataset=dataset, num_examples=int(len(index)), class_names=tuple(class_names),
        class_counts=tuple(int(v) for v in np.bincount(chosen, minlength=len(class_names))),
        image_size=opts.image_size, batch_size=opts.batch_size, name=name, split=opts.split,
        subset=opts.subset, source=source,
        location=None if location is None else os.fspath(location),
        file_paths=None if files is None else tuple(files),
        drop_remainder=opts.drop_remainder)
