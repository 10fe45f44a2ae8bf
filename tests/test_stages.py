"""Resumable stages (`dgst_tf.jobs.stages`): markers, clearing, and copying a finished stage."""
import json

import pytest

from dgst_tf.jobs.stages import StageFolder

ORDER = ("prune", "plan")


def _finish(folder: StageFolder, stage: str, settings: dict, text: str) -> None:
    folder.start(stage)
    folder.path(f"{stage}.out").write_text(text)
    folder.finish(stage, settings, [f"{stage}.out"], {"text": text})


def test_a_stage_is_done_only_with_its_settings_and_outputs(tmp_path):
    folder = StageFolder(tmp_path, ORDER)
    _finish(folder, "prune", {"ratio": 0.5}, "a")
    assert folder.done("prune", {"ratio": 0.5}) == {"text": "a"}
    assert folder.done("prune", {"ratio": 0.6}) is None
    folder.path("prune.out").unlink()
    assert folder.done("prune", {"ratio": 0.5}) is None


def test_starting_a_stage_clears_it_and_every_later_stage(tmp_path):
    folder = StageFolder(tmp_path, ORDER)
    _finish(folder, "prune", {}, "a")
    _finish(folder, "plan", {}, "b")
    folder.start("prune")
    assert not any(tmp_path.iterdir())


def test_a_finished_stage_is_copied_from_a_sibling_and_still_checked(tmp_path):
    source, mine = StageFolder(tmp_path / "a", ORDER), StageFolder(tmp_path / "b", ORDER)
    _finish(source, "prune", {"ratio": 0.5}, "pruned")
    _finish(source, "plan", {"lr": 1}, "planned")
    assert mine.copy_finished("prune", source.folder)
    assert mine.done("prune", {"ratio": 0.5}) == {"text": "pruned"}
    assert mine.path("prune.out").read_text() == "pruned"
    assert not mine.marker("plan").exists()  # only the asked stage
    assert mine.done("prune", {"ratio": 0.7}) is None  # other settings: runs again
    assert not mine.copy_finished("prune", source.folder)  # has its own marker


def test_nothing_is_copied_from_a_folder_that_has_not_finished_the_stage(tmp_path):
    mine = StageFolder(tmp_path / "b", ORDER)
    assert not mine.copy_finished("prune", tmp_path / "a")
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


def test_finishing_without_the_outputs_is_refused(tmp_path):
    folder = StageFolder(tmp_path, ORDER)
    folder.start("prune")
    with pytest.raises(FileNotFoundError, match="prune.out"):
        folder.finish("prune", {}, ["prune.out"], {})
    assert json.loads(json.dumps(list(tmp_path.iterdir()), default=str)) == []
