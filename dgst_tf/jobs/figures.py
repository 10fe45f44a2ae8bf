"""The pictures of a run: which channels DGSU updated, what one training step holds against
its SRAM budget, and accuracy per epoch for every method (matplotlib; PNGs written
atomically).

    from dgst_tf.jobs import figures

    fig = figures.selection_heatmap(counter.counts, counter.coverage)  # ChannelUpdateCounter
    figures.save_png(fig, "selection.png")
    figures.save_png(figures.memory_bars(report, budget_bytes=256 * 1024), "memory.png")
    figures.save_png(figures.accuracy_curves({"dgsu": history.history}), "accuracy.png")
    figures.write_train_figures("OUT")     # the PNGs of `dgst train --output-dir OUT`

Figures are `matplotlib.figure.Figure` objects built without pyplot's global state:
`save_png` renders them with Agg, and Jupyter or Colab show one returned by a cell once
``matplotlib.pyplot`` is imported (its inline backend). The ``draw_*`` functions draw one
panel on given axes (`dgst_tf.jobs.device_report` composes its figure from them).
"""
from __future__ import annotations

import io
import json
import pathlib

import numpy as np

from dgst_tf.core.files import write_atomically

__all__ = ["MEMORY_PARTS", "TRAIN_FIGURES", "accuracy_curves", "draw_accuracy",
           "draw_coverage", "draw_heatmap", "heatmap_matrix", "memory_bars", "new_figure",
           "save_png", "selection_heatmap", "write_train_figures"]

KB = 1024
# What a layer of the training step holds (`dgst_tf.planning.memory_report.LayerMemory`), in
# the stacking order of `memory_bars`: attribute, legend label, colour.
MEMORY_PARTS = (("saved_input_bytes", "saved input activations (int8)", "#4c72b0"),
                ("mask_bytes", "1-bit ReLU masks", "#dd8452"),
                ("weight_bytes", "weights in SRAM (int8)", "#55a868"),
                ("bias_bytes", "biases (int32)", "#c44e52"),
                ("optimizer_bytes", "optimizer and selection state", "#8172b3"),
                ("weight_gradient_bytes", "weight + bias gradients (int32, transient)",
                 "#937860"))
# file names `write_train_figures` writes into a `dgst train --output-dir` folder
TRAIN_FIGURES = {"selection": "selection.png", "accuracy": "accuracy.png"}


def new_figure(rows: int = 1, columns: int = 1, size=(12, 4.5), **grid):
    """(figure, axes) without pyplot; ``grid`` goes to ``Figure.subplots`` (e.g. sharex).

        fig, (left, right) = new_figure(1, 2)
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("dgst-tf's figures need matplotlib: pip install 'dgst-tf[plots]'"
                          ) from err
    fig = Figure(figsize=size)
    return fig, fig.subplots(rows, columns, squeeze=False, **grid).ravel()


def save_png(fig, path, dpi: int = 100) -> pathlib.Path:
    """Render ``fig`` with Agg and write it to ``path`` atomically (folders made)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return write_atomically(path, buffer.getvalue(), make_parents=True)


# -- DGSU channel selection ---------------------------------------------------------------
def heatmap_matrix(counts: dict) -> tuple[list, np.ma.MaskedArray]:
    """(layer names, layers x channels masked array of update counts): row i is layer i's
    counts, masked beyond its number of channels."""
    if not counts:
        raise ValueError("no channel counts: the run had no weight-updated layer")
    names = list(counts)
    rows = [np.asarray(counts[n], np.int64).ravel() for n in names]
    width = max(len(r) for r in rows)
    matrix = np.ma.masked_all((len(rows), width), np.int64)
    for i, row in enumerate(rows):
        matrix[i, :len(row)] = row
    return names, matrix


def draw_heatmap(ax, counts: dict) -> None:
    """Layers x input channels, coloured by how many steps updated each channel."""
    names, matrix = heatmap_matrix(counts)
    image = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap="viridis",
                      vmin=0)
    ax.figure.colorbar(image, ax=ax, label="steps that updated the channel")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=7)
    ax.set_xlabel("input channel")
    never = int((matrix == 0).sum())
    ax.set_title(f"channel updates per layer ({never} of {matrix.count()} channels never)")


def draw_coverage(ax, coverage) -> None:
    """Coverage (% of the weight-updated layers' weights updated at least once) per step."""
    ax.plot(range(1, len(coverage) + 1), [100 * c for c in coverage])
    ax.set_ylim(0, 102)
    ax.set_xlabel("training step (batch 1)")
    ax.set_ylabel("% of updated layers' weights visited")
    ax.set_title("channel coverage")


def selection_heatmap(counts: dict, coverage=None):
    """The channel-selection heat map of a run, with its coverage over the steps beside it
    (if ``coverage`` is given: one value per step, as `SparseUpdateModel` logs it).

        fig = selection_heatmap(counter.counts, counter.coverage)
    """
    fig, axes = new_figure(1, 2 if coverage else 1, size=(14 if coverage else 9, 5),
                           gridspec_kw={"width_ratios": [3, 1.3]} if coverage else None)
    draw_heatmap(axes[0], counts)
    if coverage:
        draw_coverage(axes[1], coverage)
    fig.tight_layout()
    return fig


# -- memory of one training step ----------------------------------------------------------
def memory_bars(report, budget_bytes: int, accounting: str = "arena"):
    """Per layer of the training step (a `MemoryReport`): above, all SRAM in use while it
    runs forward and backward, against the budget; below, what it holds (stacked
    `MEMORY_PARTS`). ``accounting``: the figure the budget limits ("arena",
    "training_peak" or "extra_memory"), drawn as a line.

        fig = memory_bars(training_memory(model, scheme, (128, 128, 3)), 256 * 1024)
    """
    used = {"arena": report.arena_bytes, "training_peak": report.training_peak_bytes,
            "extra_memory": report.extra_memory_bytes}
    if accounting not in used or used[accounting] is None:
        raise ValueError(f"accounting must be one of {sorted(used)} with a figure in the "
                         f"report, got {accounting!r}")
    rows = report.layers
    x = np.arange(len(rows))
    fig, (live, held) = new_figure(2, 1, size=(max(10, 0.09 * len(rows) + 4), 8), sharex=True,
                                   gridspec_kw={"height_ratios": [1.2, 1]})
    live.plot(x, [r.forward_live_bytes / KB for r in rows], color="black", lw=1,
              label="SRAM in use, forward")
    live.plot(x, [r.backward_live_bytes / KB if r.backward_live_bytes else np.nan
                  for r in rows], color="tab:orange", lw=1, label="SRAM in use, backward")
    live.axhline(budget_bytes / KB, color="red", ls="--",
                 label=f"budget {budget_bytes / KB:.1f} KB")
    label = accounting.replace("_", " ")
    live.axhline(used[accounting] / KB, color="tab:blue", ls=":",
                 label=f"{label} {used[accounting] / KB:.1f} KB")
    if accounting == "arena":  # the tensors' peak; the arena adds TFLM's own structs
        live.axhline(report.training_peak_bytes / KB, color="grey", ls=":",
                     label=f"training peak (tensors) {report.training_peak_bytes / KB:.1f} KB")
    live.set_ylabel("KB")
    live.set_ylim(bottom=0)
    verdict = "fits" if used[accounting] <= budget_bytes else "does NOT fit"
    live.set_title(f"{report.model_name}, scheme {report.scheme_name!r}: {label} "
                   f"{used[accounting] / KB:.1f} KB {verdict} the budget of "
                   f"{budget_bytes / KB:.1f} KB")
    live.legend(fontsize=7, loc="upper left")
    bottom = np.zeros(len(rows))
    for attr, name, color in MEMORY_PARTS:
        values = np.array([getattr(r, attr) / KB for r in rows])
        held.bar(x, values, bottom=bottom, color=color, width=0.8, label=name)
        bottom += values
    held.set_ylabel("KB the layer holds\n(+ its transient gradients)")
    held.set_xticks(x)
    held.set_xticklabels([r.name for r in rows], rotation=90, fontsize=5)
    held.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


# -- accuracy -----------------------------------------------------------------------------
def draw_accuracy(ax, curves: dict, styles: dict | None = None) -> None:
    """One line per entry of ``curves`` ({label: [accuracy per epoch, 0..1]}), in %."""
    for label, values in curves.items():
        ax.plot(range(1, len(values) + 1), [100 * v for v in values],
                (styles or {}).get(label, "o-"), label=label)
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("top-1 %")
    ax.set_title("accuracy per epoch")
    ax.legend(fontsize=7)


def accuracy_curves(histories: dict, test_accuracy: dict | None = None):
    """Accuracy per epoch of every method: ``histories`` {method: Keras ``History.history``
    (or a dict with "accuracy" and optionally "val_accuracy" lists)}; ``test_accuracy``
    {method: accuracy after training}, drawn as a horizontal line.

        fig = accuracy_curves({m: h.history for m, h in histories.items()})
    """
    curves, styles = {}, {}
    for method, history in histories.items():
        for key, what, style in (("accuracy", "training", "o-"),
                                 ("val_accuracy", "validation", "s--")):
            if history.get(key):
                curves[f"{method} ({what})"] = history[key]
                styles[f"{method} ({what})"] = style
    if not curves:
        raise ValueError("no 'accuracy' or 'val_accuracy' per epoch in the histories of "
                         f"{sorted(histories)}")
    fig, (ax,) = new_figure(1, 1, size=(7, 4.5))
    draw_accuracy(ax, curves, styles)
    for method, value in (test_accuracy or {}).items():
        ax.axhline(100 * value, ls=":", color="k", lw=0.8)
        ax.annotate(f"{method} test {100 * value:.1f}%", (1, 100 * value), fontsize=7,
                    va="bottom")
    fig.tight_layout()
    return fig


# -- the outputs of `dgst train --output-dir` ---------------------------------------------
def _read_json(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found; expected the --output-dir of a finished "
                                f"`dgst train`") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def write_train_figures(folder) -> list[pathlib.Path]:
    """Write `TRAIN_FIGURES` into a `dgst train --output-dir` ``folder`` from its
    ``selection.json`` (per-channel update counts, coverage per step) and ``result.json``
    (accuracy per epoch); returns the paths (no heat map when no layer's weights trained
    apart from the classifier's).

        write_train_figures("OUT")   # OUT/selection.png, OUT/accuracy.png
    """
    folder = pathlib.Path(folder)
    selection = _read_json(folder / "selection.json")
    result = _read_json(folder / "result.json")
    if "history" not in result or not all("updates" in layer
                                          for layer in selection["layers"].values()):
        raise ValueError(f"{folder}: result.json has no 'history' or selection.json no "
                         f"per-channel 'updates'; rerun `dgst train` with this version")
    counts = {name: layer["updates"] for name, layer in selection["layers"].items()}
    config = result["config"]
    method = pathlib.Path(config["scheme_path"]).name if config.get("scheme_path") else (
        config["method"])
    written = [save_png(accuracy_curves({method: result["history"]},
                                        {method: result["test_accuracy"]}),
                        folder / TRAIN_FIGURES["accuracy"])]
    if counts:  # a run that trains only biases and the classifier selects no channels
        written.insert(0, save_png(selection_heatmap(counts,
                                                     selection.get("coverage_per_step")),
                                   folder / TRAIN_FIGURES["selection"]))
    return written
