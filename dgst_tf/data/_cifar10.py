"""CIFAR-10: a local image-folder tree or ``cifar10-jpeg.tar.gz`` (unpacked once), or Keras."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pathlib
import shutil
import tarfile
import tempfile
import warnings

from dgst_tf.core import runtime
from dgst_tf.data import _folder, _pipeline
from dgst_tf.data._pipeline import DatasetFormatError, DatasetNotFoundError, DatasetSplit
from dgst_tf.core.keras_compat import keras

log = logging.getLogger(__name__)

#: Label order of keras.datasets.cifar10, which is also the alphabetical folder order.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
ENV_VAR = "DGST_CIFAR10"
ARCHIVE_NAME = "cifar10-jpeg.tar.gz"
ARCHIVE_SHA256 = "a4777a9fb8ed66f37090c468c375b7cb09fd19d06da61a14e8b9d890ec84577b"
#: ``<repo>/../shared/datasets/cifar10-jpeg.tar.gz`` (repo = parent of the dgst_tf package).
SHARED_ARCHIVE = (pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "datasets"
                  / ARCHIVE_NAME)
CACHE_NAME = "cifar10-jpeg"
_STAMP = ".dgst-source.json"
_SPLITS = ("train", "test")


def _unpacked_cache() -> pathlib.Path:
    return runtime.cache_dir("datasets") / CACHE_NAME


def _how_to_provide() -> str:
    return ("Provide CIFAR-10 with one of:\n"
            "  - cifar10(path=...) (or find_cifar10(path=...)): an image-folder tree "
            "<root>/train/<class>/*.jpg + <root>/test/<class>/*.jpg, or cifar10-jpeg.tar.gz;\n"
            f"  - the environment variable {ENV_VAR} set to such a folder or archive;\n"
            "  - cifar10(source=\"keras\") to download it with "
            "keras.datasets.cifar10.load_data() (needs internet).")


# --------------------------------------------------------------------------- locating
def _is_archive(path: pathlib.Path) -> bool:
    return path.is_file() and tarfile.is_tarfile(path)


def _tree_root(folder: pathlib.Path) -> pathlib.Path | None:
    """``folder`` if it holds train/ or test/, or its only subfolder if that does."""
    def holds_splits(p):
        return any((p / s).is_dir() for s in _SPLITS)

    if holds_splits(folder):
        return folder
    subdirs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if len(subdirs) == 1 and holds_splits(subdirs[0]):
        return subdirs[0]
    return None


def _check_tree(root: pathlib.Path, where) -> None:
    """Both splits have exactly the ten CIFAR-10 class folders, none of them empty."""
    for split in _SPLITS:
        folder = root / split
        found = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() \
            else []
        if tuple(found) != CIFAR10_CLASSES:
            raise DatasetFormatError(f"{where}: {folder} should hold the class folders "
                                     f"{list(CIFAR10_CLASSES)}, found {found}")
        for name in found:
            if not any(f.name.lower().endswith(_folder.IMAGE_EXTENSIONS)
                       for f in os.scandir(folder / name)):
                raise DatasetFormatError(f"{where}: no images in {folder / name}")


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cache_matches(dest: pathlib.Path, archive: pathlib.Path) -> bool:
    """``dest`` was unpacked from ``archive`` (same size and mtime, or same sha256)."""
    try:
        stamp = json.loads((dest / _STAMP).read_text())
    except (OSError, ValueError):
        return False
    st = archive.stat()
    if stamp.get("size") != st.st_size:
        return False
    if stamp.get("mtime_ns") != st.st_mtime_ns and stamp.get("sha256") != _sha256(archive):
        return False
    return all((dest / s / c).is_dir() for s in _SPLITS for c in CIFAR10_CLASSES)


@contextlib.contextmanager
def _lock(path: pathlib.Path):
    """An exclusive advisory lock (no-op where fcntl is missing), so that parallel
    processes (pytest-xdist, several trainings) unpack once instead of racing."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _extract_archive(archive: pathlib.Path, into: pathlib.Path) -> None:
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
            tar.extractall(into, filter="data")
        else:
            for member in tar.getmembers():
                if member.name.startswith(("/", "\\")) or ".." in member.name.split("/"):
                    raise DatasetFormatError(f"{archive}: unsafe member path {member.name}")
            tar.extractall(into)


def _unpack_once(archive: pathlib.Path) -> pathlib.Path:
    """Unpack ``archive`` into the cache unless that was done already; return the tree.

    Extraction goes to a temporary folder beside the cache entry, is verified, and is
    then renamed into place, so an interrupted unpack never leaves a half-written tree.
    """
    dest = _unpacked_cache()
    if _cache_matches(dest, archive):
        return dest
    with _lock(dest.parent / f".{CACHE_NAME}.lock"):
        if _cache_matches(dest, archive):  # another process finished it meanwhile
            return dest
        for stale in dest.parent.glob(f".{CACHE_NAME}.unpack-*"):  # from killed runs
            shutil.rmtree(stale, ignore_errors=True)
        log.info("unpacking %s into %s (once)", archive, dest)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}.unpack-", dir=dest.parent))
        try:
            _extract_archive(archive, tmp / "x")
            root = _tree_root(tmp / "x")
            if root is None:
                raise DatasetFormatError(f"{archive} holds no train/ and test/ folders")
            _check_tree(root, archive)
            st = archive.stat()
            sha = _sha256(archive)
            if archive.resolve() == SHARED_ARCHIVE.resolve() and sha != ARCHIVE_SHA256:
                warnings.warn(f"{archive} has sha256 {sha}, not the documented "
                              f"{ARCHIVE_SHA256}; using it anyway", stacklevel=3)
            (root / _STAMP).write_text(json.dumps({
                "archive": os.fspath(archive), "size": st.st_size,
                "mtime_ns": st.st_mtime_ns, "sha256": sha}))
            if dest.exists():  # outdated (another archive) or damaged: swap it out
                os.rename(dest, tmp / "old")
            os.rename(root, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _materialize(path: pathlib.Path, unpack: bool) -> pathlib.Path:
    """The tree root of a folder, or an archive unpacked into the cache."""
    if path.is_dir():
        root = _tree_root(path)
        if root is None:
            raise DatasetFormatError(
                f"{path} is not a CIFAR-10 image-folder tree: expected "
                f"{path}/train/<class>/*.jpg and {path}/test/<class>/*.jpg")
        return root
    if not _is_archive(path):
        raise DatasetFormatError(f"{path} is neither a folder nor a tar archive")
    return _unpack_once(path) if unpack else path


def find_cifar10(path=None, *, unpack: bool = True) -> pathlib.Path:
    """Where CIFAR-10 is: the image-folder root holding ``train/`` and ``test/``.

    ``path`` (a folder or ``cifar10-jpeg.tar.gz``) is used if given. Otherwise the search
    order is ``$DGST_CIFAR10`` (folder or archive), ``<repo>/../shared/datasets/
    cifar10-jpeg.tar.gz``, then the unpacked cache ``runtime.cache_dir("datasets")/
    cifar10-jpeg``. An archive is unpacked into that cache once (later calls reuse it);
    with ``unpack=False`` the archive path itself is returned and nothing is written.
    Raises :class:`DatasetNotFoundError` naming every path tried.

        >>> find_cifar10()
        PosixPath('/home/me/.cache/dgst-tf/datasets/cifar10-jpeg')
    """
    if path is not None:
        path = pathlib.Path(path).expanduser()
        if not path.exists():
            raise DatasetNotFoundError(f"CIFAR-10 not found at {path} (the path argument).\n"
                                       + _how_to_provide())
        return _materialize(path, unpack)
    tried = []
    env = os.environ.get(ENV_VAR)
    if env:
        candidate = pathlib.Path(env).expanduser()
        if candidate.exists():
            return _materialize(candidate, unpack)
        tried.append(f"{candidate} (${ENV_VAR})")
        log.warning("$%s=%s does not exist; looking elsewhere", ENV_VAR, env)
    if SHARED_ARCHIVE.exists():
        return _materialize(SHARED_ARCHIVE, unpack)
    tried.append(f"{SHARED_ARCHIVE} (the shared archive beside the repository)")
    cache = _unpacked_cache()
    if cache.is_dir():
        _check_tree(cache, "the unpacked cache")
        return cache
    tried.append(f"{cache} (the unpacked cache)")
    raise DatasetNotFoundError("CIFAR-10 not found. Tried:\n"
                               + "".join(f"  - {t}\n" for t in tried) + _how_to_provide())


def cifar10(split: str = "train", *, path=None, source: str = "auto", image_size=(32, 32),
            batch_size: int | None = 1, preprocessing="torch", augment=False,
            shuffle: bool | None = None, seed: int = 0, limit: int | None = None,
            validation_split: float | None = None, subset: str | None = None,
            cache=True, drop_remainder: bool = False) -> DatasetSplit:
    """CIFAR-10 as a :class:`DatasetSplit` of ``(float32 [B, H, W, 3], int32 [B])`` batches.

    Args:
      split: "train" (50,000 images) or "test" (10,000).
      path: a folder ``<root>/{train,test}/<class>/*.jpg`` or ``cifar10-jpeg.tar.gz``;
        None searches as :func:`find_cifar10` does.
      source: "auto"/"folder" read the local copy (never downloads); "keras" uses
        ``keras.datasets.cifar10.load_data()`` (downloads once; needs internet).
      image_size: output size, bilinear resize: int, ``(height, width)``, or a tf-keras
        model (its input size).
      batch_size: batch size (1 works), or None for unbatched examples.
      preprocessing: "torch" (x/255, then ImageNet mean/std: our pretrained MobileNetV2),
        "tf" (x/127.5 - 1), None (raw 0..255 floats) or a callable on float images.
      augment: training only. True/"crop": zero-pad 1/8 of the side (4 px at 32x32) and
        crop back, plus a horizontal flip; "resized_crop": random crop of 25-100 % of
        the area, resized, plus a flip. Reproducible from ``seed``, new draws each epoch.
      shuffle: default True for training data, False for test/validation. Seeded.
      seed: drives shuffling, augmentation, ``limit`` and ``validation_split``.
      limit: keep N examples, picked class-balanced by ``seed`` (quick runs and tests).
      validation_split, subset: carve a stratified, seeded validation set (fraction of
        each class) out of the train split; subset="training" or "validation". The two
        subsets are disjoint for the same seed. Never taken from the test split.
      cache: True caches the decoded 32x32 images in memory (about 150 MB for the train
        split) after the first epoch; a string caches to that file; False re-reads.
      drop_remainder: drop the last partial batch.

    Labels are the Keras ones (0 = airplane ... 9 = truck), which is also the alphabetical
    class-folder order, so "folder" and "keras" agree.

        from dgst_tf import data
        train = data.cifar10("train", image_size=model, batch_size=32, augment=True,
                             validation_split=0.1, subset="training")
        val = data.cifar10("train", image_size=model, batch_size=64,
                           validation_split=0.1, subset="validation")
        test = data.cifar10("test", image_size=model, batch_size=64)
        model.fit(train.dataset, validation_data=val.dataset, epochs=5)
    """
    opts = _pipeline.Options(
        split=split, image_size=_pipeline.image_size_of(image_size), batch_size=batch_size,
        preprocessing=preprocessing, augment=augment, shuffle=shuffle, seed=seed,
        limit=limit, validation_split=validation_split, subset=subset, cache=cache,
        drop_remainder=drop_remainder)
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if source == "keras":
        if path is not None:
            raise ValueError("path is for local copies; source='keras' downloads its own")
        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
        images, labels = (x_train, y_train) if split == "train" else (x_test, y_test)
        return _pipeline.make_split(labels=labels, class_names=CIFAR10_CLASSES, opts=opts,
                                    name="cifar10", source="keras", location=None,
                                    images=images)
    if source not in ("auto", "folder"):
        raise ValueError(f"source must be 'auto', 'folder' or 'keras', got {source!r}")
    root = find_cifar10(path)
    paths, labels, names = _folder.list_image_folder(root / split)
    if names != CIFAR10_CLASSES:
        raise DatasetFormatError(f"{root / split}: class folders {list(names)} are not the "
                                 f"CIFAR-10 classes {list(CIFAR10_CLASSES)}")
    unpacked = (root / _STAMP).exists()  # only trees we unpacked carry the stamp
    return _pipeline.make_split(labels=labels, class_names=names, opts=opts, name="cifar10",
                                source="archive" if unpacked else "folder",
                                location=root / split, paths=paths)
