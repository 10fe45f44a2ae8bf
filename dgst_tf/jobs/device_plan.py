"""The device plan: the DGSU scheme whose training step fits the SRAM budget, first by the
analytic memory model, then confirmed by TFLM's arena of the exported graph.

DGSU (Li & Chang 2024) updates <= ``target_fraction`` of the conv weights per step, spread
over the pointwise convs of the last ``blocks`` inverted-residual blocks, with channels
chosen on device every step (``policy="traversal"``), so the whole kernels of the updated
layers sit in SRAM. `plan_dgsu` tries ``blocks`` = max, max - 1, ..., 1 and keeps the first
(deepest) scheme whose analytic arena (`dgst_tf.planning.memory` describing the exporter's
graph: fused blocks, stochastic rounding, dynamic selection) and whose TFLM
arena (the firmware graph: ``export_training(..., policy="traversal",
output_params=False)``) both fit the SRAM budget and whose file fits the flash left for it.
`planned_blocks` is the same choice by the analytic model alone: the prune stage sizes the
file of that scheme, not of the deepest one allowed, and prunes until at least
``min_blocks`` fit (`plan_dgsu` refuses fewer). Example::

    plan = plan_dgsu(folded_model, images, labels, "out/deploy_train.tflite",
                     sram_budget=256 * 1024, blocks=8, target_fraction=0.02,
                     learning_rate=0.001, seed=0)
    plan.blocks, plan.analytic_bytes, plan.arena_bytes, plan.file_bytes
"""
from __future__ import annotations

import dataclasses
import pathlib

from dgst_tf.export.training import export_training, train_tflm
from dgst_tf.jobs.stages import StageBudgetError
from dgst_tf.planning.memory import training_memory
from dgst_tf.training.methods import build_method

__all__ = ["DevicePlan", "deployable_memory", "device_export_options", "export_deployable",
           "plan_dgsu", "planned_blocks", "dgsu_scheme"]


@dataclasses.dataclass
class DevicePlan:
    """The chosen scheme and its memory, analytic and measured by TFLM."""

    scheme: object  # UpdateScheme
    blocks: int
    analytic_bytes: int
    arena_bytes: int
    file_bytes: int
    tried: list  # [{"blocks", "analytic_bytes", "arena_bytes" (None: not exported)}]


def device_export_options(learning_rate: float, seed: int,
                          layers_per_step: int | None = None) -> dict:
    """The `export_training` options of the on-device DGSU step (the Keras int8 simulation
    `dgst_tf.jobs.device_int8` runs the same algorithm)."""
    return dict(learning_rate=learning_rate, policy="traversal", rounding="stochastic",
                seed=seed, layers_per_step=layers_per_step)


def dgsu_scheme(model, blocks: int, target_fraction: float, seed: int = 0):
    """DGSU's `UpdateScheme` over the last ``blocks`` blocks of ``model``."""
    scheme, _ = build_method("dgsu", model, target_fraction, blocks=blocks, seed=seed)
    return scheme


def export_deployable(model, scheme, images, path, **options) -> pathlib.Path:
    """Write the firmware's training graph (no parameter outputs) for ``scheme``; its path."""
    return export_training(model, scheme, images, path, output_params=False, **options).path


def deployable_memory(model, scheme, layers_per_step=None):
    """The analytic memory report (`dgst_tf.planning.memory_report.MemoryReport`) of one step
    of the firmware graph `export_deployable` writes (traversal selection, stochastic
    rounding, no parameter outputs); its ``arena_bytes`` is the planned arena and
    `dgst_tf.jobs.figures.memory_bars` draws it."""
    return training_memory(model, scheme, dense=False, policy="traversal",
                           rounding="stochastic", output_params=False,
                           layers_per_step=layers_per_step)


def _analytic_bytes(model, scheme, layers_per_step) -> int:
    return int(deployable_memory(model, scheme, layers_per_step).arena_bytes)


def plan_dgsu(model, images, labels, path, *, sram_budget: int, blocks: int,
              target_fraction: float, learning_rate: float, seed: int,
              layers_per_step: int | None = None,
              max_file_bytes: int | None = None, min_blocks: int = 1) -> DevicePlan:
    """The deepest DGSU scheme (``min_blocks`` <= its blocks <= ``blocks``) whose step fits
    ``sram_budget`` bytes both analytically and in TFLM's arena, updates <= ``target_fraction``
    of the conv weights per step (whole channels) and whose firmware graph, left at ``path``,
    is at most ``max_file_bytes`` (None: any size). Raises `StageBudgetError` (stage "plan")
    with every size tried if none fits."""
    options = device_export_options(learning_rate, seed, layers_per_step)
    tried = []
    for n in range(int(blocks), int(min_blocks) - 1, -1):
        scheme, fits, tried_n = _analytic_try(model, n, sram_budget, target_fraction, seed,
                                              layers_per_step)
        tried.append(tried_n)
        if not fits:
            continue
        written = export_deployable(model, scheme, images, path, **options)
        tried_n["arena_bytes"] = int(train_tflm(written, images[:1], labels[:1]).arena_bytes)
        tried_n["file_bytes"] = written.stat().st_size
        if tried_n["arena_bytes"] <= sram_budget and (
                max_file_bytes is None or tried_n["file_bytes"] <= max_file_bytes):
            return DevicePlan(scheme, n, tried_n["analytic_bytes"], tried_n["arena_bytes"],
                              tried_n["file_bytes"], tried)
    pathlib.Path(path).unlink(missing_ok=True)
    pathlib.Path(path).with_suffix(".json").unlink(missing_ok=True)
    sizes = "; ".join(f"{t['blocks']} blocks: {100 * t['updated_fraction']:.2f}% of conv "
                      f"weights, analytic {t['analytic_bytes']} B"
                      + ("" if t["arena_bytes"] is None else f", TFLM arena {t['arena_bytes']} B"
                         f", file {t['file_bytes']} B")
                      for t in tried)
    files = "" if max_file_bytes is None else f"the file limit of {max_file_bytes} B and "
    raise StageBudgetError("plan", f"no DGSU scheme ({min_blocks}..{blocks} blocks, "
                           f"{100 * target_fraction:g}% of conv weights per step) fits {files}"
                           f"the SRAM budget of {sram_budget} B: {sizes}")


def planned_blocks(model, *, sram_budget: int, blocks: int, target_fraction: float,
                   seed: int, layers_per_step: int | None = None) -> int:
    """How many blocks `plan_dgsu` will train on ``model`` as far as the analytic model can
    tell (TFLM's arena can only make it fewer): the most (<= ``blocks``) whose DGSU step fits
    ``sram_budget`` and ``target_fraction``; 0 if none does. The prune stage sizes the flash
    of this scheme's file and prunes until enough blocks fit::

        n = planned_blocks(fold_batchnorm(pruned), sram_budget=256 * 1024, blocks=8,
                           target_fraction=0.02, seed=0)
        scheme = dgsu_scheme(fold_batchnorm(pruned), max(n, 1), 0.02)
    """
    for n in range(int(blocks), 0, -1):
        if _analytic_try(model, n, sram_budget, target_fraction, seed, layers_per_step)[1]:
            return n
    return 0


def _analytic_try(model, blocks, sram_budget, target_fraction, seed, layers_per_step):
    """(scheme over ``blocks`` blocks, whether it fits by the analytic model, its record)."""
    scheme = dgsu_scheme(model, blocks, target_fraction, seed)
    fraction = float(scheme.updated_weight_fraction(model))
    analytic = _analytic_bytes(model, scheme, layers_per_step)
    fits = analytic <= sram_budget and fraction <= target_fraction  # whole channels: can be over
    return scheme, fits, {"blocks": blocks, "updated_fraction": fraction,
                          "analytic_bytes": analytic, "arena_bytes": None, "file_bytes": None}
