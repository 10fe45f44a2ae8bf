"""Tests for dgst_tf.data: tiny fake datasets in tmp_path, plus two checks on real data."""
import gzip
import os
import pathlib
import struct
import tarfile

import numpy as np
import pytest

from dgst_tf import data
from dgst_tf.data import _cifar10, _fashion_mnist
from dgst_tf.core.keras_compat import keras, tf

CLASSES = data.CIFAR10_CLASSES
SHARED_ARCHIVE = pathlib.Path("/work/shared/datasets/cifar10-jpeg.tar.gz")
DEBIAN_FMNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------- helpers
def _image(uid: int, label: int, size=(32, 32)) -> np.ndarray:
    """Red = 10 + 4 * uid (flat, survives JPEG), green = a left-to-right ramp (so flips
    and crops show), blue = 25 * label."""
    h, w = size
    img = np.empty((h, w, 3), np.uint8)
    img[..., 0] = 10 + 4 * uid
    img[..., 1] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    img[..., 2] = 25 * label
    return img


def _uid(image) -> int:
    return int(round((float(np.mean(image[..., 0])) - 10) / 4))


def _write(path: pathlib.Path, img: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        encoded = tf.io.encode_png(img)
    else:
        encoded = tf.io.encode_jpeg(img, quality=100)
    path.write_bytes(encoded.numpy())


def _make_cifar_tree(root: pathlib.Path, per_class=(4, 2)) -> dict:
    """``root/{train,test}/<class>/NNNN.jpg``; returns {uid: label} per split."""
    truth, uid = {}, 0
    for split, n in zip(("train", "test"), per_class):
        truth[split] = {}
        for label, name in enumerate(CLASSES):
            for i in range(n):
                _write(root / split / name / f"{i:04d}.jpg", _image(uid, label))
                truth[split][uid] = label
                uid += 1
    return truth


def _make_archive(tree_parent: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    with tarfile.open(out, "w:gz") as tar:
        tar.add(tree_parent / "cifar10", arcname="cifar10")
    return out


def _collect(split):
    images, labels = [], []
    for x, y in split.dataset:
        images.append(x.numpy())
        labels.append(y.numpy())
    return np.concatenate(images), np.concatenate(labels)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("DGST_CACHE_DIR", str(path))
    return path


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    base = tmp_path_factory.mktemp("cifar")
    truth = _make_cifar_tree(base / "cifar10")
    return base / "cifar10", truth


@pytest.fixture(scope="module")
def archive(tmp_path_factory, tree):
    root, _ = tree
    return _make_archive(root.parent, tmp_path_factory.mktemp("arc") / "cifar10-jpeg.tar.gz")


# --------------------------------------------------------------------------- CIFAR-10 folders
def test_folder_labels_follow_class_folder_order(tree):
    root, truth = tree
    split = data.cifar10("train", path=root, preprocessing=None, shuffle=False)
    assert (split.num_examples, split.num_classes, split.class_names) == (40, 10, CLASSES)
    assert split.class_counts == (4,) * 10 and split.source == "folder"
    images, labels = _collect(split)
    assert labels.dtype == np.int32 and len(labels) == 40
    for image, label in zip(images, labels):
        assert truth["train"][_uid(image)] == label
        assert abs(float(image[..., 2].mean()) - 25 * label) < 3
    # Same files, order and labels as keras.utils.image_dataset_from_directory.
    ref = keras.utils.image_dataset_from_directory(root / "train", shuffle=False, batch_size=None,
                                                   image_size=(32, 32))
    assert tuple(ref.class_names) == CLASSES
    assert list(split.file_paths) == list(ref.file_paths)
    assert [int(y) for _, y in ref] == labels.tolist()


def test_image_folder_any_tree_mixed_sizes_and_formats(tmp_path):
    names = ["b_cat", "a_dog", "Zebra"]  # sorted: Zebra, a_dog, b_cat
    for label, name in enumerate(sorted(names)):
        _write(tmp_path / name / "x1.jpg", _image(label, label, (20, 30)))
        _write(tmp_path / name / "sub" / "x2.png", _image(label, label, (50, 10)))
        (tmp_path / name / "notes.txt").write_text("not an image")
    split = data.image_folder(tmp_path, image_size=16, batch_size=2, shuffle=False,
                              preprocessing=None)
    assert split.class_names == ("Zebra", "a_dog", "b_cat") and split.num_examples == 6
    images, labels = _collect(split)
    assert images.shape == (6, 16, 16, 3) and labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert [_uid(im) for im in images] == labels.tolist()
    ref = keras.utils.image_dataset_from_directory(tmp_path, shuffle=False, batch_size=None)
    assert list(split.file_paths) == list(ref.file_paths)
    assert split.class_names == tuple(ref.class_names)
    ordered = data.image_folder(tmp_path, class_names=["b_cat", "a_dog", "Zebra"],
                                shuffle=False, image_size=8, preprocessing=None)
    assert [_uid(x[0]) for x, _ in ordered.dataset] == [2, 2, 1, 1, 0, 0]
    with pytest.raises(data.DatasetNotFoundError, match="nope"):
        data.image_folder(tmp_path / "nope")


def test_wrong_class_folders_are_rejected(tmp_path):
    for split in ("train", "test"):
        _write(tmp_path / split / "cats" / "0.jpg", _image(0, 0))
    with pytest.raises(data.DatasetFormatError, match="CIFAR-10 classes"):
        data.cifar10("train", path=tmp_path)


# --------------------------------------------------------------------------- archive + search
def test_archive_is_unpacked_once_into_the_cache(archive, cache_dir, monkeypatch):
    calls = []
    real_extract = _cifar10._extract_archive
    monkeypatch.setattr(_cifar10, "_extract_archive",
                        lambda *a: (calls.append(a), real_extract(*a)))
    root = data.find_cifar10(archive)
    assert root == cache_dir / "datasets" / "cifar10-jpeg" and len(calls) == 1
    assert sorted(p.name for p in (root / "test").iterdir()) == list(CLASSES)
    split = data.cifar10("test", path=archive, shuffle=False, batch_size=5)
    assert len(calls) == 1 and split.source == "archive" and split.num_examples == 20
    assert [y.numpy().tolist() for _, y in split.dataset][0] == [0, 0, 1, 1, 2]
    assert data.find_cifar10(archive, unpack=False) == archive
    leftovers = [p.name for p in root.parent.iterdir() if ".unpack-" in p.name]
    assert leftovers == []
    os.utime(archive, ns=(1, 1))  # same content, new mtime: the sha256 still matches
    data.find_cifar10(archive)
    assert len(calls) == 1


def test_archive_without_top_folder(tree, tmp_path, cache_dir):
    flat = tmp_path / "flat.tgz"
    with tarfile.open(flat, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(tree[0] / split, arcname=split)
    root = data.find_cifar10(flat)
    assert sorted(p.name for p in root.iterdir()) == [".dgst-source.json", "test", "train"]
    assert data.cifar10("test", path=flat).num_examples == 20


def test_interrupted_unpack_leaves_nothing_behind(archive, cache_dir, monkeypatch):
    def broken(archive_path, into):
        _cifar10.tarfile.open(archive_path).extractall(into, filter="data")
        raise KeyboardInterrupt  # e.g. Ctrl-C after part of the work

    monkeypatch.setattr(_cifar10, "_extract_archive", broken)
    with pytest.raises(KeyboardInterrupt):
        data.find_cifar10(archive)
    datasets = cache_dir / "datasets"
    assert [p.name for p in datasets.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.undo()
    monkeypatch.setenv("DGST_CACHE_DIR", str(cache_dir))
    assert (data.find_cifar10(archive) / "train" / "cat").is_dir()


def test_bad_archive_is_rejected_and_not_cached(tmp_path, cache_dir):
    _write(tmp_path / "cifar10" / "train" / "cat" / "0.jpg", _image(0, 3))
    bad = _make_archive(tmp_path, tmp_path / "bad.tar.gz")
    with pytest.raises(data.DatasetFormatError, match="class folders"):
        data.find_cifar10(bad)
    assert not (cache_dir / "datasets" / "cifar10-jpeg").exists()


def test_default_search_order_and_not_found_message(tmp_path, cache_dir, tree, archive,
                                                    monkeypatch):
    missing_env = tmp_path / "no-such-cifar"
    missing_shared = tmp_path / "shared" / "cifar10-jpeg.tar.gz"
    monkeypatch.setenv("DGST_CIFAR10", str(missing_env))
    monkeypatch.setattr(_cifar10, "SHARED_ARCHIVE", missing_shared)
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.cifar10("test")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for expected in (str(missing_env), str(missing_shared),
                     str(cache_dir / "datasets" / "cifar10-jpeg"), "DGST_CIFAR10",
                     'source="keras"', "path="):
        assert expected in message
    monkeypatch.setenv("DGST_CIFAR10", str(tree[0]))  # 1. the environment variable
    assert data.find_cifar10() == tree[0]
    monkeypatch.delenv("DGST_CIFAR10")
    monkeypatch.setattr(_cifar10, "SHARED_ARCHIVE", archive)  # 2. the shared archive
    assert data.find_cifar10(unpack=False) == archive
    with pytest.warns(UserWarning, match="sha256"):  # not the documented archive
        unpacked = data.find_cifar10()
    assert unpacked == cache_dir / "datasets" / "cifar10-jpeg"
    monkeypatch.setattr(_cifar10, "SHARED_ARCHIVE", missing_shared)  # 3. the cache
    assert data.find_cifar10() == unpacked


def test_missing_explicit_path_is_named(tmp_path):
    with pytest.raises(data.DatasetNotFoundError, match="somewhere/cifar"):
        data.cifar10("train", path=tmp_path / "somewhere" / "cifar")


# --------------------------------------------------------------------------- selection
def test_validation_split_is_disjoint_stratified_and_seeded(tree):
    root, truth = tree

    def subset(name, seed=3):
        return data.cifar10("train", path=root, validation_split=0.25, subset=name, seed=seed,
                            preprocessing=None)

    train, val = subset("training"), subset("validation")
    assert train.num_examples + val.num_examples == 40
    assert val.class_counts == (1,) * 10 and train.class_counts == (3,) * 10
    assert not set(train.file_paths) & set(val.file_paths)
    assert not val.dataset.element_spec[0].shape[0]  # batch dim unknown, fine
    train_ids = {_uid(x) for x in _collect(train)[0]}
    val_ids = {_uid(x) for x in _collect(val)[0]}
    assert not train_ids & val_ids and len(train_ids | val_ids) == 40
    assert subset("validation").file_paths == val.file_paths
    assert subset("validation", seed=4).file_paths != val.file_paths
    with pytest.raises(ValueError, match="never|cannot"):
        data.cifar10("test", path=root, validation_split=0.2, subset="validation")
    with pytest.raises(ValueError, match="subset"):
        data.cifar10("train", path=root, validation_split=0.2)


def test_limit_is_class_balanced_and_seeded(tree):
    root, _ = tree
    first = data.cifar10("train", path=root, limit=10, seed=5)
    assert first.num_examples == 10 and first.class_counts == (1,) * 10
    assert data.cifar10("train", path=root, limit=10, seed=5).file_paths == first.file_paths
    assert data.cifar10("train", path=root, limit=10, seed=6).file_paths != first.file_paths
    assert sorted(data.cifar10("train", path=root, limit=15).class_counts) == [1] * 5 + [2] * 5


# --------------------------------------------------------------------------- pipeline
def test_batch_size_one_shapes_and_image_size(tree):
    root, _ = tree
    split = data.cifar10("test", path=root, batch_size=1)
    x, y = next(iter(split))
    assert x.shape == (1, 32, 32, 3) and x.dtype == tf.float32
    assert y.shape == (1,) and y.dtype == tf.int32
    assert split.dataset.element_spec[0].shape.as_list() == [None, 32, 32, 3]
    assert split.steps_per_epoch == 20
    model = keras.Sequential([keras.Input((48, 40, 3)), keras.layers.GlobalAveragePooling2D()])
    resized = data.cifar10("test", path=root, image_size=model, batch_size=3,
                           drop_remainder=True, augment=False)
    shapes = [tuple(x.shape) for x, _ in resized.dataset]
    assert shapes == [(3, 48, 40, 3)] * 6 and resized.steps_per_epoch == 6
    x, y = next(iter(data.cifar10("test", path=root, batch_size=None).dataset))
    assert x.shape == (32, 32, 3) and y.shape == ()


def test_preprocessing_modes(tree):
    root, _ = tree

    def first(preprocessing):
        split = data.cifar10("test", path=root, preprocessing=preprocessing, shuffle=False,
                             batch_size=4)
        return next(iter(split))[0].numpy()

    raw = first(None)
    file = root / "test" / "airplane" / "0000.jpg"
    decoded = tf.io.decode_jpeg(tf.io.read_file(str(file)), channels=3).numpy()
    np.testing.assert_array_equal(raw[0], decoded.astype(np.float32))  # no resize blur
    big = data.cifar10("test", path=root, preprocessing=None, shuffle=False, image_size=(64, 48))
    expected = tf.image.resize(decoded, (64, 48), method="bilinear").numpy()
    np.testing.assert_allclose(next(iter(big))[0][0].numpy(), expected, atol=1e-4)
    assert abs(raw[0, ..., 0].mean() - (10 + 4 * 40)) < 2  # uid 40 = first test image
    np.testing.assert_allclose(first("tf"), raw / 127.5 - 1, atol=1e-5)
    torch = (raw / 255 - np.array(data.TORCH_MEAN)) / np.array(data.TORCH_STD)
    np.testing.assert_allclose(first("torch"), torch, atol=1e-5)
    np.testing.assert_allclose(first(lambda x: x * 2 + 1), raw * 2 + 1, atol=1e-4)
    with pytest.raises(ValueError, match="preprocessing"):
        data.cifar10("test", path=root, preprocessing="caffe")


def test_shuffle_is_seeded_and_default_only_for_training(tree):
    root, _ = tree

    def order(split="train", **kw):
        s = data.cifar10(split, path=root, preprocessing=None, batch_size=40, **kw)
        return [[_uid(x) for x in batch] for batch, _ in list(s.dataset) + list(s.dataset)]

    a = order(seed=1)
    assert a == order(seed=1) and a != order(seed=2)
    assert a[0] != a[1] and sorted(a[0]) == sorted(a[1])  # reshuffled each epoch
    assert order(shuffle=False)[0] == sorted(a[0])
    assert order("test")[0] == sorted(order("test")[0])
    assert order(cache=False, seed=1) == a  # cache on/off: the same stream


@pytest.mark.parametrize("mode", [True, "resized_crop"])
def test_augmentation_is_deterministic_per_seed(tree, mode):
    root, _ = tree

    def epochs(seed):
        s = data.cifar10("train", path=root, augment=mode, seed=seed, batch_size=8,
                         shuffle=False, preprocessing=None)
        return [_collect(s)[0] for _ in range(2)]

    first, again, other = epochs(0), epochs(0), epochs(1)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], first[1])  # new draws each epoch
    assert not np.array_equal(first[0], other[0])
    assert first[0].shape == (40, 32, 32, 3)
    plain = _collect(data.cifar10("train", path=root, shuffle=False, preprocessing=None))[0]
    changed = np.abs(first[0] - plain).reshape(40, -1).max(axis=1) > 1
    assert changed.mean() > 0.5
    with pytest.raises(ValueError, match="training data only"):
        data.cifar10("test", path=root, augment=mode)


# --------------------------------------------------------------------------- Keras source
def test_cifar10_keras_source_uses_load_data(monkeypatch):
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    y_train = (np.arange(30) % 10).astype(np.uint8)[:, None]  # Keras gives (N, 1)
    x_test, y_test = x_train[:10], y_train[:10]
    monkeypatch.setattr(keras.datasets.cifar10, "load_data",
                        lambda: ((x_train, y_train), (x_test, y_test)))
    split = data.cifar10("train", source="keras", preprocessing=None, shuffle=False,
                         batch_size=None)
    assert (split.num_examples, split.source, split.location) == (30, "keras", None)
    assert split.class_names == CLASSES
    images, labels = zip(*[(x.numpy(), int(y)) for x, y in split.dataset])
    np.testing.assert_array_equal(np.stack(images), x_train.astype(np.float32))
    assert list(labels) == y_train[:, 0].tolist()
    val = data.cifar10("train", source="keras", validation_split=0.2, subset="validation",
                       batch_size=2)
    assert val.num_examples == 6 and next(iter(val))[1].dtype == tf.int32
    test = data.cifar10("test", source="keras", image_size=64, batch_size=5)
    assert next(iter(test))[0].shape == (5, 64, 64, 3)
    with pytest.raises(ValueError, match="path"):
        data.cifar10("train", source="keras", path="x")


# --------------------------------------------------------------------------- Fashion-MNIST
def _idx_bytes(array: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + \
        struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def _make_idx_dir(folder: pathlib.Path, n_train=20, n_test=10):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images)))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(labels)))
        arrays[prefix] = (images, labels)
    return arrays


def test_fashion_mnist_from_idx_files(tmp_path):
    arrays = _make_idx_dir(tmp_path)
    assert data.fashion_mnist_available(tmp_path)
    assert not data.fashion_mnist_available(tmp_path / "empty")
    split = data.fashion_mnist("test", path=tmp_path, preprocessing=None, batch_size=None)
    assert (split.num_examples, split.source, split.class_names[0]) == (10, "idx", "T-shirt/top")
    images, labels = zip(*[(x.numpy(), int(y)) for x, y in split.dataset])
    images = np.stack(images)
    assert images.shape == (10, 28, 28, 3)
    for c in range(3):  # gray repeated into RGB
        np.testing.assert_array_equal(images[..., c], arrays["t10k"][0].astype(np.float32))
    assert list(labels) == arrays["t10k"][1].tolist()
    gray = data.fashion_mnist("train", path=tmp_path, channels=1, image_size=32, batch_size=4,
                              augment=True)
    x, y = next(iter(gray))
    assert x.shape == (4, 32, 32, 1) and y.dtype == tf.int32 and gray.num_examples == 20


def test_fashion_mnist_keras_source(monkeypatch):
    x = np.zeros((12, 28, 28), np.uint8)
    y = (np.arange(12) % 10).astype(np.uint8)
    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", lambda: ((x, y), (x, y)))
    split = data.fashion_mnist("train", source="keras", batch_size=1, preprocessing="tf")
    images, labels = next(iter(split))
    assert images.shape == (1, 28, 28, 3) and float(images.numpy().max()) == -1.0
    assert split.num_examples == 12 and split.source == "keras"


@pytest.mark.parametrize("damage", ["magic", "truncated", "not-gzip", "count-mismatch"])
def test_corrupt_idx_is_reported_with_file_name(tmp_path, damage):
    _make_idx_dir(tmp_path)
    target = tmp_path / "t10k-labels-idx1-ubyte.gz"
    raw = gzip.decompress(target.read_bytes())
    if damage == "magic":
        raw = b"\x00\x00\x08\x03" + raw[4:]  # labels file claiming to be 3-D images
    elif damage == "truncated":
        raw = raw[:-3]
    elif damage == "count-mismatch":
        raw = _idx_bytes(np.zeros(7, np.uint8))
    target.write_bytes(b"garbage, not gzip" if damage == "not-gzip" else gzip.compress(raw))
    with pytest.raises(data.DatasetFormatError) as info:
        data.fashion_mnist("test", path=tmp_path)
    assert "t10k-labels-idx1-ubyte.gz" in str(info.value)


def test_fashion_mnist_missing_names_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(_fashion_mnist, "DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.setattr(_fashion_mnist, "KERAS_DIRS", (tmp_path / "keras",))
    monkeypatch.setenv("DGST_FASHION_MNIST", str(tmp_path / "env"))
    assert not data.fashion_mnist_available()
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.fashion_mnist("train")
    for expected in ("debian", "keras", "env", "apt-get install dataset-fashion-mnist",
                     'source="keras"'):
        assert expected in str(info.value)


# --------------------------------------------------------------------------- real data
@pytest.mark.slow
def test_real_cifar10_archive():
    """The shared archive (or $DGST_CIFAR10), unpacked once into the user cache."""
    assert SHARED_ARCHIVE.exists() or os.environ.get("DGST_CIFAR10"), \
        "the shared CIFAR-10 archive is missing"
    test = data.cifar10("test", limit=20, batch_size=10, shuffle=False)
    assert test.class_names == CLASSES and test.class_counts == (2,) * 10
    batches = list(test.dataset)
    assert [tuple(x.shape) for x, _ in batches] == [(10, 32, 32, 3)] * 2
    assert np.concatenate([y.numpy() for _, y in batches]).tolist() == \
        [c for c in range(10) for _ in range(2)]
    pixels = np.concatenate([x.numpy() for x, _ in batches])
    assert -2.2 < pixels.min() < 0 < pixels.max() < 2.7 and pixels.std() > 0.3
    assert data.cifar10("train").num_examples == 50000
    assert data.cifar10("test").num_examples == 10000


@pytest.mark.slow
def test_real_fashion_mnist_debian_files():
    assert data.fashion_mnist_available(DEBIAN_FMNIST), "apt-get install dataset-fashion-mnist"
    headers = {name: data.read_idx_header(DEBIAN_FMNIST / f"{name}.gz")
               for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                            "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    assert headers["train-images-idx3-ubyte"] == (0x803, (60000, 28, 28))
    assert headers["train-labels-idx1-ubyte"] == (0x801, (60000,))
    assert headers["t10k-images-idx3-ubyte"] == (0x803, (10000, 28, 28))
    assert headers["t10k-labels-idx1-ubyte"] == (0x801, (10000,))
    test = data.fashion_mnist("test", path=DEBIAN_FMNIST, limit=30, batch_size=10)
    assert test.num_examples == 30 and test.class_counts == (3,) * 10
    labels = np.concatenate([y.numpy() for _, y in test.dataset])
    assert labels.min() >= 0 and labels.max() <= 9 and len(labels) == 30
    assert data.fashion_mnist("train", path=DEBIAN_FMNIST).num_examples == 60000
