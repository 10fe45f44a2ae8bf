"""How often every input channel of every weight-updated layer was updated over a run.

`ChannelUpdateCounter` is a Keras callback for `SparseUpdateModel.fit`: after every step it
reads the model's selection state (the channels the step just updated, and whether the
layer was active in the layer schedule) and adds one to each of them; it also keeps the
``coverage`` the model logs after every step. The counts are what DGSU's channel-selection
heat map shows (`dgst_tf.jobs.figures.selection_heatmap`)::

    from dgst_tf.training.update_counts import ChannelUpdateCounter

    counter = ChannelUpdateCounter()
    sparse.fit(ds, callbacks=[DynamicChannelSelection(seed=0), counter])
    counter.counts["block_16_expand"]    # int64 [input channels]: updates per channel
    counter.coverage[-1]                 # the model's coverage after the last step
    counter.to_dict()                    # JSON-ready: {"steps", "counts", "coverage"}
    resumable = ChannelUpdateCounter("backup/channel_updates.json")  # before BackupAndRestore

With ``path`` it writes its counts after every epoch (atomically) and a fit resumed by
``keras.callbacks.BackupAndRestore`` continues them: at its first epoch the counts of that
epoch and later ones are dropped, so they match the restored state (list the counter before
``BackupAndRestore``). Without ``path`` it counts the steps of its own ``fit`` calls. It
needs ``steps_per_execution=1`` (Keras' default): it reads the selection between steps.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np

from dgst_tf.core.files import write_json_atomically
from dgst_tf.core.keras_compat import keras

__all__ = ["ChannelUpdateCounter"]


class ChannelUpdateCounter(keras.callbacks.Callback):
    """Per weight-updated layer, the number of steps that updated each input channel."""

    def __init__(self, path=None):
        super().__init__()
        self.path = None if path is None else pathlib.Path(path)
        self.counts: dict[str, np.ndarray] = {}
        self.coverage: list[float] = []
        self.steps = 0
        self._epochs = []  # with path, per finished epoch: the counts so far, its coverage
        self._resumed = False
        self._epoch_start = 0

    def on_train_begin(self, logs=None):
        model = self.model
        if not hasattr(model, "selection"):
            raise TypeError(f"ChannelUpdateCounter needs a dgst_tf.SparseUpdateModel, got "
                            f"{type(model).__name__}")
        per_call = getattr(model, "_steps_per_execution", None)
        if per_call is not None and int(per_call.numpy()) != 1:
            raise ValueError(f"ChannelUpdateCounter reads the channel selection after every "
                             f"step: compile with steps_per_execution=1, not "
                             f"{int(per_call.numpy())}")
        for name, (channels, _) in model.selection.specs.items():
            self.counts.setdefault(name, np.zeros(int(channels), np.int64))
        self._resumed = False

    def on_epoch_begin(self, epoch, logs=None):
        if not self._resumed and self.path is not None and self.path.is_file():
            self._restore(epoch)
        self._resumed = True
        self._epoch_start = len(self.coverage)

    def _restore(self, epoch: int) -> None:
        """The counts as they were after ``epoch`` epochs (what BackupAndRestore restored)."""
        self._epochs = json.loads(self.path.read_text())["epochs"][:epoch]
        if len(self._epochs) != epoch:
            raise ValueError(f"{self.path}: counts of {len(self._epochs)} epochs, but the fit "
                             f"resumes after epoch {epoch}")
        last = self._epochs[-1] if self._epochs else {"steps": 0, "counts": {}}
        for name, counts in self.counts.items():
            counts[:] = last["counts"].get(name, 0)
        self.steps = int(last["steps"])
        self.coverage = [c for e in self._epochs for c in e["coverage"]]

    def on_train_batch_end(self, batch, logs=None):
        selection = self.model.selection
        for name, counts in self.counts.items():
            state = selection.vars[name]
            if bool(state["active"].numpy()):
                counts[state["indices"].numpy()] += 1  # kept channels are distinct
        if logs and "coverage" in logs:
            self.coverage.append(float(logs["coverage"]))
        self.steps += 1

    def on_epoch_end(self, epoch, logs=None):
        if self.path is not None:  # the totals so far, the coverage of this epoch
            self._epochs.append(self.to_dict() | {
                "coverage": self.coverage[self._epoch_start:]})
            write_json_atomically(self.path, {"epochs": self._epochs})

    @property
    def updates(self) -> int:
        """Channel updates counted over all layers and steps."""
        return int(sum(int(c.sum()) for c in self.counts.values()))

    def to_dict(self) -> dict:
        """``{"steps": N, "counts": {layer: [per channel]}, "coverage": [per step]}``."""
        return {"steps": self.steps,
                "counts": {name: c.tolist() for name, c in self.counts.items()},
                "coverage": list(self.coverage)}
