"""Resumable stages of a job in one output folder: a stage whose outputs exist and whose
recorded settings match is skipped, and a stage that cannot meet its budget refuses.

Every stage leaves a marker ``<folder>/<stage>.stage.json`` ({"stage", "settings",
"outputs", "result"}), written atomically after its outputs (`dgst_tf.core.files`), so a
marker means the stage finished. A stage that runs again (new settings, missing output)
first removes its own and every later stage's marker and outputs, so a refusal leaves no
stale or half-written files behind. Example::

    from dgst_tf.jobs.stages import StageFolder

    folder = StageFolder("out", order=("prune", "plan"))
    result = folder.done("prune", settings)          # the recorded result, or None
    if result is None:
        folder.start("prune")                        # clears prune and what follows
        ...                                          # write outputs atomically
        result = folder.finish("prune", settings, ["pruned.keras"], {"bytes": 1234})
"""
from __future__ import annotations

import hashlib
import json
import pathlib
import shutil

from dgst_tf.core.files import write_json_atomically

__all__ = ["StageBudgetError", "StageFolder", "settings_digest"]


class StageBudgetError(ValueError):
    """A stage cannot meet its budget; the message names the stage and the numbers."""

    def __init__(self, stage: str, message: str):
        super().__init__(f"stage {stage!r}: {message}")
        self.stage = stage


def _plain(value):
    """``value`` as JSON would give it back (tuples -> lists, ...), to compare settings."""
    return json.loads(json.dumps(value, sort_keys=True))


def settings_digest(value) -> str:
    """A short SHA-256 of a JSON value: what a later stage records about an earlier one."""
    return hashlib.sha256(json.dumps(_plain(value), sort_keys=True).encode()).hexdigest()[:16]


class StageFolder:
    """The output folder of a staged job; ``order``: the stage names, first to last."""

    def __init__(self, folder, order):
        self.folder = pathlib.Path(folder)
        self.order = tuple(order)

    def path(self, name: str) -> pathlib.Path:
        return self.folder / name

    def marker(self, stage: str) -> pathlib.Path:
        return self.folder / f"{stage}.stage.json"

    def _read(self, stage: str) -> dict | None:
        try:
            return json.loads(self.marker(stage).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def done(self, stage: str, settings: dict) -> dict | None:
        """The recorded result if ``stage`` finished with ``settings`` and its outputs are
        all there, else None."""
        record = self._read(stage)
        if record is None or record.get("settings") != _plain(settings):
            return None
        if not all(self.path(name).is_file() for name in record.get("outputs", [])):
            return None
        return record["result"]

    def start(self, stage: str) -> None:
        """Clear ``stage`` and every later stage (markers first, then their outputs)."""
        later = self.order[self.order.index(stage):]
        records = [self._read(s) for s in later]
        for s in later:
            self.marker(s).unlink(missing_ok=True)
        for record in records:
            for name in (record or {}).get("outputs", []):
                self.path(name).unlink(missing_ok=True)
        self.folder.mkdir(parents=True, exist_ok=True)

    def finish(self, stage: str, settings: dict, outputs, result: dict) -> dict:
        """Record ``stage`` as finished (its outputs must exist); returns ``result``."""
        missing = [name for name in outputs if not self.path(name).is_file()]
        if missing:
            raise FileNotFoundError(f"stage {stage!r} did not write {', '.join(missing)} "
                                    f"in {self.folder}")
        result = _plain(result)
        write_json_atomically(self.marker(stage), {"stage": stage, "settings": _plain(settings),
                                                   "outputs": list(outputs), "result": result})
        return result

    def copy_finished(self, stage: str, source) -> bool:
        """Copy ``stage``'s outputs and marker from the folder of another run of the same job
        (e.g. a sibling that differs only in later settings), unless this folder has a marker
        for it; True if copied. The copy is a cache only: `done` still compares the recorded
        settings with this run's, so a stage of other settings runs again."""
        record = StageFolder(source, self.order)._read(stage)
        if self.marker(stage).exists() or record is None:
            return False
        self.start(stage)
        for name in record.get("outputs", []):
            shutil.copy2(pathlib.Path(source, name), self.path(name))
        shutil.copy2(pathlib.Path(source, self.marker(stage).name), self.marker(stage))
        return True
