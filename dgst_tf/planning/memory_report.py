"""Memory reports for people: a PNG chart per layer, dense vs sparse, and a check against TFLM.

    from dgst_tf.planning.memory import training_memory
    from dgst_tf.planning.memory_report import plot_memory, compare_with_tflm

    report = training_memory(model, scheme, (128, 128, 3))
    print(report.table())                       # the text table lives on MemoryReport
    plot_memory(report, "memory.png")            # per-layer bars + dense vs sparse
    compare_with_tflm(report, arena_bytes)       # once the exporter gives a TFLM arena size
"""
from __future__ import annotations

import os

from dgst_tf.planning.memory import KB, MemoryReport

_PARTS = (("saved_input_bytes", "saved input (kept channels)", "#4c72b0"),
          ("mask_bytes", "1-bit masks", "#dd8452"),
          ("weight_bytes", "updated weights (int8)", "#55a868"),
          ("bias_bytes", "updated biases (int32)", "#c44e52"),
          ("optimizer_bytes", "optimizer state", "#8172b3"))
_WHAT = {"forward_peak": "forward_peak_bytes", "training_peak": "training_peak_bytes"}


def plot_memory(report: MemoryReport, path, title: str | None = None) -> str:
    """Write a PNG: per layer, what it holds (stacked) and all SRAM live while it runs
    forward / backward; beside it, the scheme's peaks against dense training.

        plot_memory(report, "benchmarks/results/memory_49kb.png")
    """
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("plot_memory needs matplotlib: pip install 'dgst-tf[plots]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.layers
    x = range(len(rows))
    fig, (ax, side) = plt.subplots(1, 2, figsize=(15, 5.5),
                                   gridspec_kw={"width_ratios": [4, 1]})
    bottom = [0.0] * len(rows)
    for attr, label, color in _PARTS:
        values = [getattr(r, attr) / KB for r in rows]
        if any(values):
            ax.bar(x, values, bottom=bottom, label=label, color=color, width=0.8)
            bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("held through the step (KB)")
    ax.set_xticks(list(x))
    ax.set_xticklabels([r.name for r in rows], rotation=90, fontsize=6)
    live = ax.twinx()
    live.plot(list(x), [r.forward_live_bytes / KB for r in rows], color="black", lw=1,
              label="SRAM live, forward")
    live.plot(list(x), [r.backward_live_bytes / KB if r.backward_live_bytes else None
                        for r in rows], color="grey", lw=1, ls="--",
              label="SRAM live, backward")
    live.axhline(report.training_peak_bytes / KB, color="red", lw=0.8, ls=":",
                 label=f"training peak {report.training_peak_bytes / KB:.0f} KB")
    live.set_ylabel("SRAM in use while the layer runs (KB)")
    live.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()
    more = live.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=7, loc="upper left")
    ax.set_title(title or f"{report.model_name}, scheme {report.scheme_name!r}, "
                 f"input {'x'.join(map(str, report.input_shape))}, batch 1, int8")

    labels = ["Lin extra\nmemory", "inference\npeak", "training\npeak"]
    values = [report.extra_memory_bytes, report.forward_peak_bytes, report.training_peak_bytes]
    colors = ["#4c72b0", "#999999", "#c44e52"]
    if report.dense_training_bytes is not None:
        labels.append("dense\ntraining")
        values.append(report.dense_training_bytes)
        colors.append("#333333")
    side.bar(range(len(values)), [v / KB for v in values], color=colors)
    for i, v in enumerate(values):
        side.text(i, v / KB, f"{v / KB:.0f}", ha="center", va="bottom", fontsize=8)
    side.set_xticks(range(len(values)))
    side.set_xticklabels(labels, fontsize=8)
    side.set_ylabel("KB")
    side.set_title("sparse vs dense")
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare_with_tflm(report: MemoryReport, tflm_arena_bytes: int,
                      what: str = "forward_peak", verbose: bool = True) -> dict:
    """Predicted vs TFLM's arena (``print_allocations`` of the exported model).

    ``what``: "forward_peak" for an inference graph, "training_peak" for the exported
    training step. Returns ``{"predicted_bytes", "tflm_arena_bytes", "difference_bytes"
    (TFLM - predicted), "ratio" (TFLM / predicted)}`` and prints one line if ``verbose``.

        compare_with_tflm(report, 245_760)   # TFLM 240.0 KB vs predicted 240.0 KB: +0.0 KB
    """
    if what not in _WHAT:
        raise ValueError(f"what must be one of {sorted(_WHAT)}, got {what!r}")
    arena = int(tflm_arena_bytes)
    if arena <= 0:
        raise ValueError(f"tflm_arena_bytes must be positive, got {tflm_arena_bytes!r}")
    predicted = int(getattr(report, _WHAT[what]))
    result = {"what": what, "predicted_bytes": predicted, "tflm_arena_bytes": arena,
              "difference_bytes": arena - predicted, "ratio": arena / predicted}
    if verbose:
        print(f"{what}: TFLM arena {arena / KB:.1f} KB vs predicted {predicted / KB:.1f} KB: "
              f"{(arena - predicted) / KB:+.1f} KB ({100 * (arena / predicted - 1):+.1f}%)")
    return result


__all__ = ["compare_with_tflm", "plot_memory"]
