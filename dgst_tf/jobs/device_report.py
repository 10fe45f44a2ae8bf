"""The device pipeline's figure: memory per stage against the budgets, accuracy per epoch,
and channel coverage over the training steps (matplotlib, written atomically)::

    from dgst_tf.jobs.device_report import plot_report
    plot_report(json.load(open("out/report.json")), "out/report.png")
"""
from __future__ import annotations

import io

from dgst_tf.core.files import write_atomically

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
    epochs = range(1, len(train["val_accuracy_per_epoch"]) + 1)
    ax.plot(epochs, [100 * a for a in train["val_accuracy_per_epoch"]], "o-",
            label="validation (Keras int8)")
    ax.plot(epochs, [100 * a for a in train["train_accuracy_per_epoch"]], "s--",
            label="training (Keras int8)")
    evaluate = report.get("evaluate", {})
    if "accuracy" in evaluate:
        ax.axhline(100 * evaluate["accuracy"], color="k", linestyle=":",
                   label=f"{evaluate['evaluated_on']}, adapted int8 (TFLM)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 %")
    ax.set_title("accuracy per epoch")
    ax.legend(fontsize=7)


def _coverage(ax, report: dict) -> None:
    coverage = report["train"]["steps"]["coverage"]
    ax.plot(range(1, len(coverage) + 1), [100 * c for c in coverage])
    ax.set_xlabel("training step (batch 1)")
    ax.set_ylabel("% of updated layers' weights visited")
    ax.set_title("channel coverage")


def plot_report(report: dict, path) -> None:
    """Write the three panels of ``report`` (as `run_device_pipeline` returns it) to
    ``path`` as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    _memory(axes[0], report)
    _accuracy(axes[1], report)
    _coverage(axes[2], report)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_atomically(path, buffer.getvalue())
