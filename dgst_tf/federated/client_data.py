"""The images each simulated device holds and the server's test set, read once per process.

    from dgst_tf.federated.client_data import client_data, test_data, with_classes
    images, labels = client_data(config, partition_id=3)   # that device's share
    x_test, y_test = test_data(config)

A pool of ``config.train_examples`` class-balanced training images (`dgst_tf.data.load_arrays`,
seeded) is split over ``config.clients`` devices by `partition` with the config's scheme,
alpha and seed; every process computes the same split from the same settings, so a device
needs only its id.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from dgst_tf import data
from dgst_tf.federated.partition import partition


def _size(config) -> tuple:
    return (config.image_size, config.image_size)


@functools.lru_cache(maxsize=4)
def _arrays(dataset, data_path, split, limit, image_size, seed):
    return data.load_arrays(dataset, split, path=data_path, image_size=image_size,
                            limit=limit, seed=seed)


def train_pool(config) -> tuple[np.ndarray, np.ndarray]:
    """All training images the federation holds (images, labels)."""
    return _arrays(config.dataset, config.data_path, "train", config.train_examples,
                   _size(config), config.seed)


def partitions(config) -> list[np.ndarray]:
    """Index arrays into `train_pool`, one per client."""
    return partition(train_pool(config)[1], config.clients, config.partition, config.alpha,
                     config.seed)


def client_data(config, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of device ``partition_id`` (0 .. clients - 1)."""
    if not 0 <= int(partition_id) < config.clients:
        raise ValueError(f"partition id {partition_id} is outside 0..{config.clients - 1}")
    images, labels = train_pool(config)
    indices = partitions(config)[int(partition_id)]
    return images[indices], labels[indices]


def calibration_images(config, count: int = 64) -> np.ndarray:
    """The int8 calibration images every device and the server share: the first ``count``
    of the (seeded, class-balanced) training pool, fixed when the model is deployed."""
    return train_pool(config)[0][:count]


def test_data(config) -> tuple[np.ndarray, np.ndarray]:
    """The server's test images and labels (class-balanced, seeded)."""
    return _arrays(config.dataset, config.data_path, "test", config.test_examples,
                   _size(config), config.seed)


def with_classes(config):
    """``config`` with ``classes`` read from the dataset when it is 0: the width of a built
    model, and what a model file's classifier is checked against (`device.build_model`)."""
    if config.classes:
        return config
    classes = data.load(config.dataset, "test", path=config.data_path, limit=1,
                        image_size=_size(config)).num_classes
    return dataclasses.replace(config, classes=classes)
