"""The files `dgst train --output-dir OUT` writes, which `dgst export --from-train OUT` reads.

    OUT/model.keras      the adapted model: BatchNorm folded, trained weights (tf-keras)
    OUT/scheme.json      the `UpdateScheme` it was trained with (`UpdateScheme.load`)
    OUT/selection.json   the channel selection of every weight-updated layer, as the
                         selection callbacks left it (the training step's fixed channels)
    OUT/result.json      accuracy, memory and settings; written last, so its presence
                         means the other three are complete

Every file is written atomically (`dgst_tf.core.files`). Example::

    from dgst_tf.jobs.train_outputs import TrainOutputs, load_kept_channels
    outputs = TrainOutputs("OUT")
    kept = load_kept_channels(outputs.selection)   # {layer: [input channel indices]}

``selection.json`` holds ``{"selection": "dynamic" | "static" | "none", "step": N,
"layers": {layer: {"channels": C, "kept": [...], "active": bool, "visited": V}}}``; with
dynamic selection (DGSU) ``kept`` are the channels of the last step. When the run counted
its channel updates (`dgst_tf.training.update_counts.ChannelUpdateCounter` among the
callbacks), every layer also has ``"updates"`` (steps that updated each channel) and the
file ``"counted_steps"`` and ``"coverage_per_step"`` (what `dgst_tf.jobs.figures` plots).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib

from dgst_tf.core.files import write_json_atomically
from dgst_tf.models.model_file import save_model_atomically
from dgst_tf.training.selection import DynamicChannelSelection, StaticChannelSelection
from dgst_tf.training.update_counts import ChannelUpdateCounter


@dataclasses.dataclass(frozen=True)
class TrainOutputs:
    """The paths of one training run's outputs in ``folder``."""

    folder: pathlib.Path

    def __post_init__(self):
        object.__setattr__(self, "folder", pathlib.Path(self.folder))

    @property
    def model(self) -> pathlib.Path:
        return self.folder / "model.keras"

    @property
    def scheme(self) -> pathlib.Path:
        return self.folder / "scheme.json"

    @property
    def selection(self) -> pathlib.Path:
        return self.folder / "selection.json"

    @property
    def result(self) -> pathlib.Path:
        return self.folder / "result.json"

    def check(self) -> "TrainOutputs":
        """Raise FileNotFoundError naming what is missing (e.g. a run without --output-dir)."""
        missing = [p.name for p in (self.model, self.scheme, self.selection) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{self.folder}: no {', '.join(missing)}; expected the "
                                    f"--output-dir of a finished `dgst train`")
        return self


def selection_mode(callbacks) -> str:
    """"dynamic" (new channels every step), "static" (fixed before training) or "none"."""
    if any(isinstance(c, DynamicChannelSelection) for c in callbacks):
        return "dynamic"
    if any(isinstance(c, StaticChannelSelection) for c in callbacks):
        return "static"
    return "none"


def selection_state(sparse, callbacks) -> dict:
    """The `SparseUpdateModel`'s selection state as the JSON of ``selection.json``."""
    layers = {}
    for name, (channels, _) in sparse.selection.specs.items():
        state = sparse.selection.numpy(name)
        layers[name] = {"channels": int(channels),
                        "kept": [int(c) for c in state["indices"]],
                        "active": bool(state["active"]),
                        "visited": int(state["visited"].sum())}
    state = {"selection": selection_mode(callbacks),
             "step": int(sparse.selection.step.numpy()), "layers": layers}
    counter = next((c for c in callbacks if isinstance(c, ChannelUpdateCounter)), None)
    if counter is not None:
        for name, counts in counter.counts.items():
            layers[name]["updates"] = counts.tolist()
        state |= {"counted_steps": counter.steps, "coverage_per_step": counter.coverage}
    dynamic = [c for c in callbacks if hasattr(c, "device_policy")]
    if dynamic:  # the rule `dgst export --from-train` runs on device
        policy = dynamic[0]
        state |= {"policy": _device_policy(policy),
                  "layers_per_step": getattr(policy, "layers_per_step", None)}
    return state


def _device_policy(callback):
    try:
        return callback.device_policy
    except ValueError:  # an importance without an on-device twin: export it statically
        return None


def save_train_outputs(folder, sparse, callbacks, result: dict) -> TrainOutputs:
    """Write model, scheme, selection state and (last) ``result`` into ``folder``."""
    outputs = TrainOutputs(folder)
    save_model_atomically(sparse.base, outputs.model)
    write_json_atomically(outputs.scheme, sparse.scheme.get_config())
    write_json_atomically(outputs.selection, selection_state(sparse, callbacks))
    write_json_atomically(outputs.result, result)
    return outputs


def load_kept_channels(path) -> dict[str, list[int]]:
    """``{layer: kept input channel indices}`` from a ``selection.json``."""
    where = os.fspath(path)
    try:
        with open(path) as f:
            state = json.load(f)
        return {name: [int(c) for c in layer["kept"]]
                for name, layer in state["layers"].items()}
    except json.JSONDecodeError as err:
        raise ValueError(f"selection state {where!r} is not valid JSON: {err}") from err
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"selection state {where!r}: expected {{'layers': {{layer: "
                         f"{{'kept': [channels]}}}}}} as `dgst train` writes it") from err


__all__ = ["TrainOutputs", "load_kept_channels", "save_train_outputs", "selection_mode",
           "selection_state"]
