"""The device's training in Keras and in TFLM, side by side: batch-1 int8 QAS DGSU.

`Int8Dgsu` is the Keras int8 simulation of the on-device step (`int8_training_graph`:
the converter's int8 parameters and TFLM's integer arithmetic; `SparseUpdateModel` with
DGSU's `DynamicChannelSelection(traversal=True)`; `QuantizationAwareScalingSGD` with
stochastic rounding; the device's loss). At batch 1 its int8 weights, int32 biases and
chosen channels equal those of the exported training step (`export_training(...,
policy="traversal", rounding="stochastic")`) step for step. `tflite_params` reads the
simulation's parameters in the exported graph's layout, `with_initial_params` writes them
into a training `.tflite` as its starting state (so TFLM continues from where Keras
stopped), and `compare_steps` runs a few steps on both sides and lists what differs::

    sim = Int8Dgsu.build(folded_model, calibration, scheme, learning_rate=0.001, seed=0)
    history, steps = sim.fit(batch1_dataset(x, y, seed=0), epochs=1, backup_dir="backup")
    params = tflite_params(sim.graph.model, manifest)       # "layer/param" -> int array
    with_initial_params("train.tflite", params, "continue.tflite")
"""
from __future__ import annotations

import dataclasses
import io
import json
import pathlib
import shutil

import numpy as np

from dgst_tf.core.files import write_atomically, write_json_atomically
from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.core.layer_kinds import kernel_of, tflite_kernel_layout
from dgst_tf.export.tflite_editor import ModelEditor
from dgst_tf.export.tflite_file import read_tflite
from dgst_tf.export.training import (initial_params, load_manifest, manifest_path_for,
                                     train_tflm)
from dgst_tf.export.training.manifest import file_sha256
from dgst_tf.training.int8_graph import int8_training_graph
from dgst_tf.training.qas import QuantizationAwareScalingSGD
from dgst_tf.training.selection import DynamicChannelSelection
from dgst_tf.training.sparse_model import SparseUpdateModel

__all__ = ["Int8Dgsu", "StepRecorder", "batch1_dataset", "compare_steps", "load_weights",
           "save_weights", "tflite_params", "with_initial_params"]


class StepRecorder(keras.callbacks.Callback):
    """Per training step: loss, fraction of conv weights updated, coverage; per epoch: the
    fit's logs. With ``path`` the records are written (atomically) after every epoch and a
    resumed fit (`keras.callbacks.BackupAndRestore`) continues them: at its first epoch the
    records of that epoch and later ones are dropped, so they match the restored state."""

    KEYS = ("loss", "updated_fraction", "coverage")

    def __init__(self, path=None):
        super().__init__()
        self.path = None if path is None else pathlib.Path(path)
        self.epochs = []  # per epoch: {"logs": {...}, "steps": {key: [per step]}}
        self._current = None
        self.first_epoch = None  # the first epoch this fit ran (> 0: resumed)

    @property
    def steps(self) -> dict:
        """{key: [value per step]} over every recorded epoch, then the running one."""
        epochs = self.epochs + ([{"steps": self._current}] if self._current else [])
        return {key: [v for e in epochs for v in e["steps"][key]] for key in self.KEYS}

    @property
    def history(self) -> dict:
        """{metric: [value per finished epoch]}, as `keras.callbacks.History` has it."""
        keys = dict.fromkeys(k for e in self.epochs for k in e["logs"])
        return {k: [e["logs"][k] for e in self.epochs if k in e["logs"]] for k in keys}

    def on_train_begin(self, logs=None):
        self._resumed = False

    def on_epoch_begin(self, epoch, logs=None):
        if not self._resumed and self.path is not None and self.path.is_file():
            self.epochs = json.loads(self.path.read_text())["epochs"][:epoch]
        if not self._resumed:
            self.first_epoch = epoch
        self._resumed = True
        self._current = {key: [] for key in self.KEYS}

    def on_train_batch_end(self, batch, logs=None):
        for key, values in self._current.items():
            values.append(float((logs or {}).get(key, float("nan"))))

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append({"logs": {k: float(v) for k, v in (logs or {}).items()},
                            "steps": self._current})
        self._current = None
        if self.path is not None:
            write_json_atomically(self.path, {"epochs": self.epochs})


def batch1_dataset(x, y, seed: int):
    """Images and labels as the batch-1 training stream, a new seeded order every epoch."""
    return (tf.data.Dataset.from_tensor_slices((x, y))
            .shuffle(len(x), seed=seed, reshuffle_each_iteration=True).batch(1))


@dataclasses.dataclass
class Int8Dgsu:
    """The Keras int8 simulation of the on-device DGSU step (see the module doc)."""

    graph: object  # Int8TrainingGraph
    sparse: SparseUpdateModel
    selection: DynamicChannelSelection
    resumed_at_epoch: int = 0  # the first epoch the last `fit` ran (> 0: from a backup)

    @classmethod
    def build(cls, folded_model, calibration, scheme, *, learning_rate, seed: int,
              layers_per_step: int | None = None) -> "Int8Dgsu":
        """``learning_rate``: a float (the device's constant step size) or a Keras
        ``LearningRateSchedule`` of the optimizer's step (restored with it by `fit`'s backup)."""
        graph = int8_training_graph(folded_model, calibration)
        sparse = SparseUpdateModel(graph.model, scheme, fold_bn=False)
        sparse.compile(optimizer=QuantizationAwareScalingSGD(
            learning_rate, graph.qas_scales, rounding="stochastic", seed=seed),
            loss=graph.loss, metrics=["accuracy"])  # the device's softmax cross-entropy
        selection = DynamicChannelSelection("weight_l2", traversal=True,
                                            layers_per_step=layers_per_step, seed=seed)
        return cls(graph, sparse, selection)

    def fit(self, dataset, *, epochs: int, validation=None, verbose: int = 0,
            backup_dir=None, callbacks=()):
        """Train on the batch-1 ``dataset`` (`batch1_dataset` or a `dgst_tf.data` split);
        (history, per-step records). With ``backup_dir``, Keras' ``BackupAndRestore``
        (as ``dgst train --backup-dir``) keeps the int8 weights, the optimizer's step (its
        learning-rate schedule and stochastic rounding) and the channel selection's state
        after every epoch, and a later call with the same ``backup_dir`` continues from the
        last finished epoch (its data order restarts); the folder is removed at the end."""
        recorder = StepRecorder(None if backup_dir is None
                                else pathlib.Path(backup_dir, "records.json"))
        run = [self.selection, recorder, *callbacks]
        if backup_dir is not None:  # after the recorder: its records are never behind
            run.append(keras.callbacks.BackupAndRestore(str(backup_dir)))
        self.sparse.fit(dataset, epochs=epochs, verbose=verbose, callbacks=run,
                        validation_data=validation, validation_batch_size=32)
        if backup_dir is not None:  # Keras removes only its own files
            shutil.rmtree(backup_dir, ignore_errors=True)
        self.resumed_at_epoch = int(recorder.first_epoch or 0)
        return recorder.history, recorder.steps

    def start_steps(self) -> None:
        """Install the per-step channel selection for `train_on_batch` (fit does it)."""
        self.selection.set_model(self.sparse)
        self.selection.on_train_begin()

    def int8_logits(self, x, manifest: dict) -> np.ndarray:
        """The simulation's int8 logit codes for ``x`` (the device's output tensor)."""
        real = self.graph.model.predict(x, batch_size=32, verbose=0)
        codes = np.round(real / np.float32(manifest["logits"]["scale"]))
        return np.clip(codes + manifest["logits"]["zero_point"], -128, 127).astype(np.int8)


def tflite_params(model, manifest: dict) -> dict:
    """The int8 graph ``model``'s trainable tensors as the training graph ``manifest``
    names and lays them out ("layer/param" -> int8 weights or int32 biases)."""
    params = {}
    for entry in manifest["params"]:
        layer = model.get_layer(entry["layer"])
        if entry["param"] == "weights":
            value = tflite_kernel_layout(kernel_of(layer).numpy())
        else:
            value = layer.bias.numpy()
        params[f"{entry['layer']}/{entry['param']}"] = np.round(value).astype(entry["dtype"])
    return params


def with_initial_params(path, params: dict, out_path):
    """Write the training graph ``path`` with ``params`` as its starting trainable tensors
    (and the manifest beside ``out_path``, its SHA-256 updated); returns ``out_path``."""
    content = load_manifest(path)
    _, model = read_tflite(path)
    editor = ModelEditor(model)
    for entry in content["params"]:
        value = np.asarray(params[f"{entry['layer']}/{entry['param']}"])
        if "flash" in entry:  # a static RAM copy of the kept channels
            editor.set_data(entry["flash"], value)
            value = value[..., entry["kept"]]
        editor.set_data(entry["initial"], value)
    data = editor.pack()
    read_tflite(data, what=f"training graph for {out_path}")
    written = write_atomically(out_path, data)
    content = content | {"sha256": file_sha256(data), "size_bytes": len(data),
                         "tflite": written.name}
    write_atomically(manifest_path_for(written), json.dumps(content, indent=1) + "\n")
    return written


def compare_steps(sim: Int8Dgsu, path, x, y) -> dict:
    """``len(x)`` steps of the training graph ``path`` in TFLM and of ``sim`` in Keras from
    the same state; per step the chosen channels, at the end every trainable tensor.
    Returns {"steps", "channel_mismatches", "param_mismatches": {key: differing elements},
    "params_moved" (elements TFLM changed), "loss_max_abs_diff", "arena_bytes"}."""
    start = initial_params(path)
    run = train_tflm(path, x, y)
    sim.start_steps()
    kept_keras, losses = {name: [] for name in sim.sparse.selection.specs}, []
    for s in range(len(x)):
        logs = sim.sparse.train_on_batch(x[s:s + 1], y[s:s + 1], return_dict=True)
        losses.append(float(logs["loss"]))
        for name in kept_keras:
            kept_keras[name].append(np.sort(sim.sparse.selection.numpy(name)["indices"]))
    channel_mismatches = [
        f"{name} step {s}" for name, steps in kept_keras.items() for s, kept in enumerate(steps)
        if not np.array_equal(np.sort(run.kept[f"{name}/kept"][s]), kept)]
    keras_params = tflite_params(sim.graph.model, run.manifest)
    param_mismatches = {key: int((np.asarray(run.params[key]) != value).sum())
                        for key, value in keras_params.items()}
    return {"steps": len(x), "channel_mismatches": channel_mismatches,
            "param_mismatches": {k: v for k, v in param_mismatches.items() if v},
            "params_compared": len(keras_params),
            "params_moved": int(sum((np.asarray(run.params[k]) != v).sum()
                                    for k, v in start.items())),
            "loss_max_abs_diff": float(np.abs(run.losses - np.array(losses)).max()),
            "arena_bytes": int(run.arena_bytes)}


def save_weights(model, path):
    """All of ``model``'s weights, in order, as one ``.npz`` (written atomically)."""
    buffer = io.BytesIO()
    np.savez(buffer, *model.get_weights())
    return write_atomically(path, buffer.getvalue())


def load_weights(model, path) -> None:
    """Restore weights written by `save_weights` into the same architecture."""
    with np.load(path) as stored:
        model.set_weights([stored[f"arr_{i}"] for i in range(len(stored.files))])
