"""The device pipeline's figure: memory per stage against the budgets, accuracy per epoch,
channel coverage over the training steps and, when the train stage counted them
(``report["train"]["channel_updates"]``: `ChannelUpdateCounter.to_dict`), the channel-
selection heat map (panels from `dgst_tf.jobs.figures`; written atomically)::

    from dgst_tf.jobs.device_report import plot_report
    plot_report(json.load(open("out/report.json")), "out/report.png")
"""
from __future__ import annotations

from dgst_tf.jobs.figures import (draw_accuracy, draw_coverage, draw_heatmap, new_figure,
                                  save_png)

__all__ = ["plot_report"]

KB = 1024


def _memory(ax, report: dict) -> None:
    prune, plan = report["prune"], report["plan"]
    flash = plan["flash_budget_bytes"] / KB
    sram = plan["sram_budget_bytes"] / KB
    allowance = plan["allowance_bytes"] / KB
    bars = [("flash: unpruned\nfile + allowance",
             prune["unpruned_deployable_bytes"] / KB + allowance, flash),
            ("flash: deployed\nfile + allowance", plan["file_bytes"] / KB + allowance, flash),
            ("SRAM: analytic\nstep", plan["analytic_bytes"] / KB, sram),
            ("SRAM: TFLM\narena", plan["arena_bytes"] / KB, sram)]
    labels = [b[0] for b in bars]
    ax.bar(labels, [b[1] for b in bars],
           color=["tab:red" if b[1] > b[2] else "tab:blue" for b in bars])
    for i, (_, _, budget) in enumerate(bars):
        ax.hlines(budget, i - 0.4, i + 0.4, colors="k", linestyles="--")
    ax.set_ylabel("KB (dashed: budget)")
    ax.set_title("memory per stage")
    ax.tick_params(axis="x", labelsize=7)


def _accuracy(ax, report: dict) -> None:
    train = report["train"]
    draw_accuracy(ax, {"validation (Keras int8)": train["val_accuracy_per_epoch"],
                       "training (Keras int8)": train["train_accuracy_per_epoch"]},
                  {"training (Keras int8)": "s--"})
    evaluate = report.get("evaluate", {})
    if "accuracy" in evaluate:
        ax.axhline(100 * evaluate["accuracy"], color="k", linestyle=":",
                   label=f"{evaluate['evaluated_on']}, adapted int8 (TFLM)")
        ax.legend(fontsize=7)


def plot_report(report: dict, path):
    """Write the panels of ``report`` (as `run_device_pipeline` returns it) to ``path`` as
    PNG: three, or four with the heat map of ``report["train"]["channel_updates"]``;
    returns the figure."""
    updates = report["train"].get("channel_updates")
    fig, axes = new_figure(1, 4 if updates else 3, size=(21 if updates else 15, 4.2))
    _memory(axes[0], report)
    _accuracy(axes[1], report)
    draw_coverage(axes[2], report["train"]["steps"]["coverage"])
    if updates:
        draw_heatmap(axes[3], updates["counts"])
    fig.tight_layout()
    save_png(fig, path)
    return fig
