"""Memory budgets: read "256KB", check a scheme against one, stop training that would not fit.

    from dgst_tf.planning.budget import MemoryBudget, check_budget, parse_budget

    parse_budget("256KB")                                    # 262144
    check_budget(model, scheme, (128, 128, 3), "256KB")      # raises MemoryBudgetError
    sparse.fit(ds, callbacks=[MemoryBudget("256KB")])        # fails before the first step

The budget is compared with the whole training-step peak (`MemoryReport.training_peak_bytes`)
by default, with TFLM's whole arena for the step, its structs included
(``accounting="arena"``, `MemoryReport.arena_bytes`), or with Lin et al.'s "extra memory"
label (``accounting="extra_memory"``).
"""
from __future__ import annotations

import re

from dgst_tf.core.keras_compat import keras
from dgst_tf.planning.memory import MemoryModel
from dgst_tf.planning.memory_report import KB, MemoryReport, kb

ACCOUNTINGS = ("training_peak", "arena", "extra_memory")
_UNITS = {"": 1, "b": 1, "kb": KB, "kib": KB, "k": KB, "mb": KB * KB, "mib": KB * KB,
          "m": KB * KB}
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


class MemoryBudgetError(ValueError):
    """A scheme needs more memory than the budget (the message has the breakdown)."""

    def __init__(self, message: str, report: MemoryReport | None = None,
                 budget_bytes: int | None = None):
        super().__init__(message)
        self.report = report
        self.budget_bytes = budget_bytes


def parse_budget(value) -> int:
    """Bytes from 262144, "262144", "256KB", "256 KiB", "1MB" or "1.5MB" (KB = 1024 bytes).

        parse_budget("256KB") == 262144
    """
    if isinstance(value, bool):
        raise ValueError(f"cannot read memory budget {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    elif isinstance(value, str) and _BUDGET.match(value):
        match = _BUDGET.match(value)
        number, unit = float(match.group(1)), match.group(2).lower()
    else:
        number, unit = None, None
    if number is None or unit not in _UNITS:
        raise ValueError(f"cannot read memory budget {value!r}: give bytes (262144) or a size "
                         "such as '256KB', '256KiB' or '1MB' (KB = 1024 bytes)")
    n_bytes = int(round(number * _UNITS[unit]))
    if n_bytes <= 0:
        raise ValueError(f"memory budget {value!r} must be more than 0 bytes")
    return n_bytes


def report_value(report: MemoryReport, accounting: str) -> int:
    """The number a budget is compared with: the training peak, TFLM's arena or Lin's
    label, in bytes."""
    if accounting == "training_peak":
        return report.training_peak_bytes
    if accounting == "arena":
        return report.arena_bytes
    if accounting == "extra_memory":
        return report.extra_memory_bytes
    raise ValueError(f"accounting must be one of {ACCOUNTINGS}, got {accounting!r}")


def budget_message(report: MemoryReport, budget_bytes: int,
                   accounting: str = "training_peak", n_largest: int = 5) -> str:
    """Why ``report`` does not fit ``budget_bytes``: totals, the largest layers, the table."""
    needed = report_value(report, accounting)
    what = {"training_peak": "a training step", "arena": "TFLM's arena of a training step",
            "extra_memory": "Lin et al.'s extra memory"}[accounting]
    lines = [f"scheme {report.scheme_name!r} on {report.model_name} needs {kb(needed)} for "
             f"{what} but the budget is {kb(budget_bytes)} ({budget_bytes} bytes): "
             f"{kb(needed - budget_bytes)} over."]
    if accounting != "extra_memory":
        lines.append(f"Peak: {report.peak_phase} pass at {report.peak_layer}: " + ", ".join(
            f"{k} {kb(v)}" for k, v in report.peak_breakdown.items() if v) + ".")
        if report.forward_peak_bytes >= budget_bytes:
            lines.append(f"The forward activations alone need {kb(report.forward_peak_bytes)}: "
                         "no update scheme fits; use a smaller input or model, or a runtime "
                         "with in-place depthwise convs.")
    largest = report.largest(n_largest)
    if largest:
        lines.append("Largest contributors (held for the whole step):")
        lines += [f"  {row.describe()}" for row in largest]
    lines.append(report.table())
    return "\n".join(lines)


def check_budget(model: keras.Model, scheme, input_shape=None, budget_bytes=None,
                 accounting: str = "training_peak", **memory_options) -> MemoryReport:
    """The scheme's `MemoryReport` if it fits ``budget_bytes``; else `MemoryBudgetError`.

        report = check_budget(model, scheme, (128, 128, 3), "256KB")
        check_budget(model, scheme, budget_bytes="100KB", accounting="extra_memory")

    ``memory_options`` go to `MemoryModel` (its defaults: the graph `export_training` emits
    by default; e.g. ``policy="traversal"``, ``output_params=False``, ``optimizer``).
    """
    if budget_bytes is None:
        raise ValueError("check_budget needs budget_bytes, e.g. '256KB'")
    budget = parse_budget(budget_bytes)
    if accounting not in ACCOUNTINGS:
        raise ValueError(f"accounting must be one of {ACCOUNTINGS}, got {accounting!r}")
    report = MemoryModel(model, input_shape, **memory_options).report(scheme)
    if report_value(report, accounting) > budget:
        raise MemoryBudgetError(budget_message(report, budget, accounting), report, budget)
    return report


class MemoryBudget(keras.callbacks.Callback):
    """Fails ``fit`` of a `SparseUpdateModel` before the first step if its scheme does not fit.

        sparse.fit(ds, callbacks=[MemoryBudget("256KB")])
        sparse.fit(ds, callbacks=[MemoryBudget("256KB", policy="traversal"),
                                  DynamicChannelSelection()])   # DGSU: whole kernels in SRAM

    Uses the model's optimizer for the optimizer state (SGD 0, momentum 1, Adam 2 slots)
    unless ``optimizer`` is given; ``input_shape`` defaults to the model's. The report is
    kept in ``self.report``.
    """

    def __init__(self, budget_bytes, accounting: str = "training_peak", input_shape=None,
                 optimizer=None, verbose: bool = False, **memory_options):
        super().__init__()
        self.budget_bytes = parse_budget(budget_bytes)
        if accounting not in ACCOUNTINGS:
            raise ValueError(f"accounting must be one of {ACCOUNTINGS}, got {accounting!r}")
        self.accounting, self.input_shape = accounting, input_shape
        self.optimizer, self.verbose = optimizer, verbose
        self.memory_options = memory_options
        self.report = None

    def on_train_begin(self, logs=None):
        model = self.model
        if not (hasattr(model, "base") and hasattr(model, "scheme")):
            raise TypeError(f"MemoryBudget needs a dgst_tf.SparseUpdateModel, got "
                            f"{type(model).__name__}")
        optimizer = self.optimizer
        if optimizer is None:
            optimizer = getattr(model, "optimizer", None) or "sgd"
        options = {"activation_patterns": getattr(model, "activation_patterns", None) or None,
                   **self.memory_options}  # count what the train step really stores
        self.report = check_budget(model.base, model.scheme, self.input_shape,
                                   self.budget_bytes, self.accounting, optimizer=optimizer,
                                   **options)
        if self.verbose:
            print(f"MemoryBudget: {kb(report_value(self.report, self.accounting))} of "
                  f"{kb(self.budget_bytes)} ({self.accounting})")


__all__ = ["ACCOUNTINGS", "MemoryBudget", "MemoryBudgetError", "budget_message",
           "check_budget", "parse_budget", "report_value"]
