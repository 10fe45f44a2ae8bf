"""Federated sparse fine-tuning on Flower (`dgst_tf.federated`), at tiny settings.

Oracles: a device's weights before and after its local round (the payload must carry exactly
that change and nothing else), a NumPy FedAvg written here loop by loop, and a real
`flwr.simulation.run_simulation` on Ray through `dgst federate` in a child process with a
timeout (so a hang fails the test instead of blocking CI).
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from dgst_tf.federated import payload
from dgst_tf.federated.aggregation import aggregate
from dgst_tf.federated.config import FederatedConfig
from dgst_tf.federated.partition import dirichlet_partition, iid_partition, partition

TINY = dict(clients=3, rounds=2, train_examples=24, test_examples=12, width=0.35,
            image_size=32, weights=None, classes=10, method="dgsu", sram_budget="512KB")


# --------------------------------------------------------------------------- the device
@pytest.fixture(scope="module")
def round_one():
    """One real local round of device 1: global weights in, sparse fp32 payload out, and
    the device's own weights after training (the oracle)."""
    from dgst_tf.federated.client import device_for, device_update

    config = FederatedConfig(**TINY, encoding="fp32")
    device = device_for(config)
    before = device.weights()
    blob, metrics, state = device_update(config, before, partition_id=1, server_round=1)
    return config, before, device.weights(), blob, metrics, state


def _changed_channels(before, after):
    """Per array, the set of channels (input channels of kernels, entries of biases) whose
    values differ, computed slice by slice."""
    changed = {}
    for i, (old, new) in enumerate(zip(before, after)):
        axis = 2 if old.ndim == 4 else 0
        channels = {c for c in range(old.shape[axis])
                    if not np.array_equal(np.take(old, c, axis), np.take(new, c, axis))}
        if channels:
            changed[i] = channels
    return changed


def test_the_payload_decodes_to_exactly_the_devices_change(round_one):
    _, before, after, blob, metrics, _ = round_one
    shapes = [w.shape for w in before]
    entries = payload.decode(blob, shapes)
    assert {e.array: set(e.channels.tolist()) for e in entries} == \
        _changed_channels(before, after)
    for delta, old, new in zip(payload.dense_deltas(entries, shapes), before, after):
        np.testing.assert_array_equal(delta, new - old)
    assert metrics["uplink-bytes"] == len(blob)
    assert metrics["num-examples"] == 8  # 24 images over 3 IID devices
    assert metrics["channels-sent"] == sum(len(e.channels) for e in entries)


def test_dgsu_sends_only_a_few_channels_of_its_weight_layers(round_one):
    config, before, after, _, _, _ = round_one
    from dgst_tf.federated.client import device_for

    sparse = device_for(config).sparse
    changed = _changed_channels(before, after)
    names = [w.name for w in sparse.base.trainable_weights]
    for layer in sparse.weight_layers[:-1]:  # the classifier is always updated whole
        index = names.index(layer.kernel.name)
        channels = layer.kernel.shape[2]
        assert 0 < len(changed.get(index, ())) < channels, layer.name
    assert sum(len(c) for c in changed.values()) < sum(
        (w.shape[2] if w.ndim == 4 else w.shape[0]) for w in before) / 2


def test_a_device_keeps_its_selection_state_between_rounds(round_one):
    config, before, _, _, _, state = round_one
    from dgst_tf.federated.client import device_for

    device = device_for(config)
    device.set_selection_state(None)  # a device that never trained
    fresh = device.selection_state()
    assert [a for a in fresh if a.dtype == np.int64 and a.ndim == 0] == [0]
    assert [a for a in state if a.dtype == np.int64 and a.ndim == 0] == [8]  # 8 steps
    visited = [a for a in state if a.dtype == bool and a.any()]
    assert visited, "the round left no channel marked visited"
    device.set_selection_state(state)
    assert all(np.array_equal(a, b) for a, b in zip(device.selection_state(), state))


@pytest.mark.parametrize("encoding", ["fp16", "int8"])
def test_lossy_encodings_stay_within_their_rounding(round_one, encoding):
    _, before, after, _, _, _ = round_one
    entries = payload.sparse_update(before, after)
    blob = payload.encode(entries, encoding)
    decoded = payload.decode(blob, [w.shape for w in before])
    assert [e.array for e in decoded] == [e.array for e in entries]
    for sent, got in zip(entries, decoded):
        np.testing.assert_array_equal(sent.channels, got.channels)
        if encoding == "fp16":
            np.testing.assert_array_equal(got.values, sent.values.astype(np.float16))
        else:
            scale = np.abs(sent.values).max() / 127
            assert np.abs(got.values - sent.values).max() <= scale / 2 * (1 + 1e-5)
            assert np.abs(got.values).max() == pytest.approx(np.abs(sent.values).max(),
                                                             rel=1e-6)


def test_bytes_counted_equal_the_encoded_size_computed_by_hand(round_one):
    _, before, after, _, _, _ = round_one
    entries = payload.sparse_update(before, after)
    for encoding, itemsize in (("int8", 1), ("fp16", 2), ("fp32", 4)):
        by_hand = 8  # magic, version, encoding, number of entries
        for e in entries:
            channels = before[e.array].shape[2 if before[e.array].ndim == 4 else 0]
            sent_indices = len(e.channels) < channels
            by_hand += 5 + 2 * len(e.channels) * sent_indices + 4 * (encoding == "int8")
            by_hand += e.values.size * itemsize
        assert len(payload.encode(entries, encoding)) == by_hand
        assert payload.payload_bytes(entries, encoding) == by_hand
    dense = sum(w.size for w in before)
    assert len(payload.encode(entries, "int8")) < dense / 4  # far below a dense int8 update


def test_a_damaged_payload_is_a_clear_error(round_one):
    _, before, _, blob, _, _ = round_one
    shapes = [w.shape for w in before]
    with pytest.raises(payload.PayloadError, match="truncated"):
        payload.decode(blob[:-3], shapes)
    with pytest.raises(payload.PayloadError, match="not a DGSU"):
        payload.decode(b"XXXX" + blob[4:], shapes)
    with pytest.raises(payload.PayloadError, match="model has 2"):
        payload.decode(blob, shapes[:2])


def test_an_int8_device_sends_integer_code_changes_and_the_server_keeps_them_int8():
    """The int8 QAS step (`int8_training_graph`): the exchanged weights are int8 / int32
    codes; the payload is exactly the change in codes; averaging rounds back to codes."""
    from dgst_tf.federated.client import device_for, device_update

    config = FederatedConfig(**TINY, int8=True, encoding="fp32")
    device = device_for(config)
    before = device.weights()
    ranges = device.integer_ranges()
    assert ranges and all(np.array_equal(before[i], np.rint(before[i])) for i in ranges)
    blob_a, metrics_a, _ = device_update(config, before, partition_id=0, server_round=1)
    after = device.weights()
    shapes = [w.shape for w in before]
    entries = payload.decode(blob_a, shapes)
    assert {e.array: set(e.channels.tolist()) for e in entries} == \
        _changed_channels(before, after)
    assert all(e.array in ranges and np.array_equal(e.values, np.rint(e.values))
               for e in entries), "an int8 device changed something other than its codes"
    blob_b, metrics_b, _ = device_update(config, before, partition_id=2, server_round=1)
    updates = [(metrics_a["num-examples"], entries),
               (metrics_b["num-examples"], payload.decode(blob_b, shapes))]
    new, _ = aggregate(before, updates, integer_ranges=ranges)
    exact = _numpy_fedavg(before, updates, per_channel=True)
    for index, (got, want) in enumerate(zip(new, exact)):
        if index in ranges:
            low, high = ranges[index]
            np.testing.assert_array_equal(got, np.clip(np.rint(want), low, high))
    assert max(np.abs(new[i]).max() for i in ranges if new[i].ndim > 1) <= 127


def test_a_device_refuses_a_scheme_over_its_sram_budget():
    from dgst_tf.federated.device import SimulatedDevice
    from dgst_tf.planning.budget import MemoryBudgetError

    with pytest.raises(MemoryBudgetError, match=r"scheme 'dgsu'.*budget is 64\.0 KB"):
        SimulatedDevice(FederatedConfig(**{**TINY, "sram_budget": "64KB"}))


def _small_file(folder, name, size=8, classes=10, extra=None):
    """A tiny tf-keras CNN with a pointwise expansion (what DGSU updates), saved."""
    from dgst_tf.core.keras_compat import keras

    image = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(image)
    x = keras.layers.Conv2D(8, 1, activation="relu", name="expand")(x)
    x = keras.layers.Conv2D(4, 1, name="project")(x)
    if extra is not None:
        x = extra(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    keras.Model(image, keras.layers.Dense(classes, name="fc")(x)).save(folder / name)
    return folder / name


def _keras3_file(folder):
    import keras as keras3  # TensorFlow 2.21's tf.keras

    keras3.Sequential([keras3.Input((8, 8, 3)), keras3.layers.Conv2D(4, 3, name="conv"),
                       keras3.layers.GlobalAveragePooling2D(),
                       keras3.layers.Dense(10, name="fc")]).save(folder / "keras3.keras")
    return folder / "keras3.keras"


def _separable(x):
    from dgst_tf.core.keras_compat import keras

    return keras.layers.SeparableConv2D(4, 3, padding="same", name="sep")(x)


BAD_MODEL_FILES = {
    "missing": (lambda folder: folder / "nowhere.keras", [r"nowhere\.keras", "no such file"]),
    "keras3": (_keras3_file, [r"keras3\.keras", "Keras 3", "TF_USE_LEGACY_KERAS=1"]),
    "unsupported_layer": (lambda folder: _small_file(folder, "sep.h5", extra=_separable),
                          [r"sep\.h5", "layer 'sep'", "SeparableConv2D"]),
    "input_size": (lambda folder: _small_file(folder, "big.keras", size=16),
                   [r"big\.keras", "16x16x3", "--image-size is 8"]),
    "classes": (lambda folder: _small_file(folder, "five.keras", classes=5),
                [r"five\.keras", "'fc' has 5 outputs", "10 classes"]),
}


@pytest.mark.parametrize("bad", sorted(BAD_MODEL_FILES))
def test_run_federated_refuses_a_bad_model_file_before_anything_is_written(bad, tmp_path):
    """The Python API checks a model file as ``dgst --model`` does (`load_own_model`),
    with the dataset's class count, before Ray starts or the output folder exists."""
    from dgst_tf.federated.simulation import run_federated
    from dgst_tf.models.own_model import OwnModelError

    make, expected = BAD_MODEL_FILES[bad]
    path = make(tmp_path)
    out = tmp_path / "out"
    config = FederatedConfig(dataset="fashion_mnist", model=str(path), image_size=8,
                             clients=2, rounds=1, train_examples=8, test_examples=8,
                             method="dgsu", sram_budget=None)
    with pytest.raises(OwnModelError) as refusal:
        run_federated(config, output_dir=str(out))
    for part in expected:
        assert re.search(part, str(refusal.value)), (part, str(refusal.value))
    assert not out.exists()


def test_a_good_model_file_builds_the_federations_device(tmp_path):
    from dgst_tf.federated.device import SimulatedDevice

    path = _small_file(tmp_path, "good.keras")
    device = SimulatedDevice(FederatedConfig(dataset="fashion_mnist", model=str(path),
                                             image_size=8, classes=10, method="dgsu",
                                             sram_budget=None))
    assert [w.shape for w in device.weights()][-1] == (10,)


# ----------------------------------------------------------------------- aggregation
def _numpy_fedavg(weights, updates, per_channel):
    """Reference written independently: loops over arrays, channels and clients."""
    out = []
    for i, w in enumerate(weights):
        axis = 2 if w.ndim == 4 else 0
        new = w.astype(np.float64).copy()
        total = sum(n for n, _ in updates)
        for c in range(w.shape[axis]):
            num, den = 0.0, 0.0
            for n, entries in updates:
                for e in entries:
                    if e.array == i and c in e.channels.tolist():
                        num = num + n * e.values[e.channels.tolist().index(c)]
                        den += n
            if den:
                index = [slice(None)] * w.ndim
                index[axis] = c
                new[tuple(index)] += num / (den if per_channel else total)
        out.append(new)
    return out


def _entry(array, channels, shape_after_channel, seed):
    values = np.random.default_rng(seed).normal(size=(len(channels), *shape_after_channel))
    return payload.Entry(array, np.array(channels), values.astype(np.float32))


@pytest.fixture
def sparse_updates():
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=s).astype(np.float32) for s in [(1, 1, 4, 3), (3,), (5, 2)]]
    updates = [  # conv channels {0, 1} / {1, 3}: channel 1 is shared, 0 and 3 are not
        (30, [_entry(0, [0, 1], (1, 1, 3), 1), _entry(1, [0, 1, 2], (), 2),
              _entry(2, [4], (2,), 3)]),
        (10, [_entry(0, [1, 3], (1, 1, 3), 4), _entry(1, [0, 1, 2], (), 5)]),
        (20, [_entry(2, [0, 4], (2,), 6)]),
    ]
    for _, entries in updates:  # kernels [1, 1, in, out]: channel-major -> axis 2
        for e in entries:
            if e.array == 0:
                e.values = e.values.reshape(len(e.channels), 1, 1, 3)
    return weights, updates


@pytest.mark.parametrize("per_channel", [True, False])
def test_aggregation_equals_a_numpy_fedavg_reference(sparse_updates, per_channel):
    weights, updates = sparse_updates
    new, updaters = aggregate(weights, updates, per_channel=per_channel)
    for got, want in zip(new, _numpy_fedavg(weights, updates, per_channel)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert updaters[0].tolist() == [1, 2, 0, 1]
    assert updaters[2].tolist() == [1, 0, 0, 0, 2]


def test_a_channel_one_device_updated_takes_its_whole_update(sparse_updates):
    weights, updates = sparse_updates
    new, _ = aggregate(weights, updates, per_channel=True)
    kernel, first, second = weights[0], updates[0][1][0], updates[1][1][0]
    np.testing.assert_allclose(new[0][:, :, 0, :], kernel[:, :, 0, :] + first.values[0, 0, 0],
                               rtol=1e-6)  # only device 1 updated channel 0
    np.testing.assert_allclose(new[0][:, :, 3, :], kernel[:, :, 3, :] + second.values[1, 0, 0],
                               rtol=1e-6)  # only device 2 updated channel 3
    shared = (30 * first.values[1] + 10 * second.values[0]) / 40  # channel 1: both
    np.testing.assert_allclose(new[0][:, :, 1, :], kernel[:, :, 1, :] + shared[0, 0],
                               rtol=1e-6)
    np.testing.assert_array_equal(new[0][:, :, 2, :], kernel[:, :, 2, :])  # nobody
    plain, _ = aggregate(weights, updates, per_channel=False)  # FedAvg: 30 / 60 of it
    np.testing.assert_allclose(plain[0][0, 0, 0] - kernel[0, 0, 0],
                               first.values[0, 0, 0] * 30 / 60, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ partitions
def _labels(per_class=60, classes=10):
    return np.repeat(np.arange(classes), per_class)


def test_partitions_are_disjoint_covering_and_seeded():
    labels = _labels()
    for parts in (iid_partition(len(labels), 7, seed=3),
                  dirichlet_partition(labels, 7, alpha=0.5, seed=3)):
        joined = np.concatenate(parts)
        assert sorted(joined.tolist()) == list(range(len(labels)))
    again = dirichlet_partition(labels, 7, alpha=0.5, seed=3)
    other = dirichlet_partition(labels, 7, alpha=0.5, seed=4)
    assert all(np.array_equal(a, b) for a, b in
               zip(again, dirichlet_partition(labels, 7, alpha=0.5, seed=3)))
    assert not all(len(a) == len(b) and np.array_equal(a, b) for a, b in zip(again, other))
    assert [len(p) for p in iid_partition(len(labels), 7, seed=3)] == [86] * 5 + [85] * 2


def _dominant_share(labels, parts):
    """Mean over clients of the fraction of their images in their most common class."""
    return float(np.mean([np.bincount(labels[p]).max() / len(p) for p in parts]))


def test_a_small_dirichlet_alpha_is_non_iid_and_a_large_one_is_not():
    labels = _labels()
    skewed = partition(labels, 10, "dirichlet", alpha=0.1, seed=0)
    mild = partition(labels, 10, "dirichlet", alpha=100.0, seed=0)
    iid = partition(labels, 10, "iid", seed=0)
    assert _dominant_share(labels, skewed) > 0.5
    assert _dominant_share(labels, mild) < 0.3
    assert _dominant_share(labels, iid) < 0.3
    assert min(len(p) for p in skewed) >= 1


def test_bad_partition_settings_are_clear_errors():
    with pytest.raises(ValueError, match="alpha must be > 0"):
        dirichlet_partition(_labels(), 3, alpha=0.0)
    with pytest.raises(ValueError, match="cannot give 10 clients"):
        iid_partition(5, 10)
    with pytest.raises(ValueError, match="partition scheme must be one of"):
        partition(_labels(), 3, "shards")


def test_the_config_round_trips_through_a_flower_run_config():
    config = FederatedConfig(**{**TINY, "sram_budget": None, "partition": "dirichlet"})
    assert FederatedConfig.from_run_config(config.to_run_config()) == config
    with pytest.raises(ValueError, match="unknown federated setting 'colour'"):
        FederatedConfig.from_run_config({"colour": "red"})
    with pytest.raises(ValueError, match="encoding must be one of"):
        FederatedConfig(encoding="int4")


# ------------------------------------------------------------ Flower on Ray, end to end
def test_dgst_federate_runs_flower_on_ray_end_to_end(tmp_path):
    out = tmp_path / "fed"
    command = [sys.executable, "-m", "dgst_tf.cli.main", "federate", "--clients", "3",
               "--rounds", "2", "--train-examples", "24", "--test-examples", "12",
               "--partition", "dirichlet", "--alpha", "0.5", "--num-cpus", "1",
               "--round-timeout", "300", "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1",
           "TF_NUM_INTEROP_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rounds)
    for r in rounds[1:]:
        assert len(r["uplink_bytes"]) == 3 and len(r["clients"]) == 3
        assert [c["partition_id"] for c in r["clients"]] == [0, 1, 2]
        assert sum(c["num_examples"] for c in r["clients"]) == 24
        assert all(0 < b < results["dense_fp32_update_bytes"] / 4 for b in r["uplink_bytes"])
        assert 0 < r["updated_channel_fraction"] < 1
    assert "round   2  test accuracy" in proc.stdout
