"""Pruning a model to a flash budget: pick the sparsity, prune while fine-tuning, remove.

DGSU's offline step (Li & Chang 2024) before on-device training: `sparsity_for_budget` finds
the smallest family sparsity whose pruned model fits the budget (counted on group sets of
the right size, no weights looked at): by default the deployable training-step ``.tflite``
(`dgst_tf.pruning.model_size.deployable_size`: weights, biases, requantization constants,
per-channel quantization, the training step's constants, the flatbuffer), or only the int8
weights + int32 biases (``size="weights"``). `prune_while_training` ramps TF-MOT's
``PolynomialDecay`` up to it while the model is fine-tuned, strips the wrappers and removes
the masked channels physically::

    from dgst_tf.pruning import prune_while_training, sparsity_for_budget

    sparsity, _ = sparsity_for_budget(model, 1024 * 1024)      # a 1 MB training .tflite
    result = prune_while_training(model, train_ds, sparsity, epochs=2)
    result.model, result.family_sparsity
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np
from tensorflow_model_optimization.python.core.sparsity.keras import prune as tfmot_prune
from tensorflow_model_optimization.python.core.sparsity.keras import pruning_callbacks
from tensorflow_model_optimization.python.core.sparsity.keras import (
    pruning_schedule as tfmot_schedule)

from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.pruning.channel_removal import mask_groups, remove_channels, zeroed_groups
from dgst_tf.pruning.dependency_graph import DependencyGraph
from dgst_tf.pruning.group_selection import GroupSelector, groups_to_prune, select_groups
from dgst_tf.pruning.model_size import DeployableSizeModel, flash_bytes
from dgst_tf.pruning.tfmot_wrapper import prune_channel_groups
from dgst_tf.training.distillation import Distiller

__all__ = ["sparsity_for_budget", "prune_while_training", "PruningResult", "pruned_name",
           "SIZES", "DEPLOYABLE_MARGIN"]

SIZES = ("deployable", "weights")  # what sparsity_for_budget fits into the budget
MOST_SPARSITY = 0.999  # the highest family sparsity sparsity_for_budget tries
# The analytic deployable size is within -0.1 % .. +1.5 % of the file export_training writes
# for the models tests/test_flash_budget.py exports (MobileNetV2: within 0.1 %): fit it with
# this much room so that the real file fits too.
DEPLOYABLE_MARGIN = 0.01


def pruned_name(model: keras.Model) -> str:
    """The name `prune_while_training` gives the pruned model (it is in the exported
    file's tensor names, so the deployable size counts it)."""
    return f"{model.name}_pruned"


def sparsity_for_budget(model: keras.Model, budget_bytes: int,
                        graph: DependencyGraph | None = None, exclude=(), round_to: int = 1,
                        min_channels: int = 1, tolerance: float = 1e-4, *,
                        size: str = "deployable", scheme=None, input_shape=None,
                        margin: float | None = None, **export_options) -> tuple[float, int]:
    """The smallest family sparsity whose pruned model fits ``budget_bytes``, and its size.

    ``size``: ``"deployable"`` (default) counts the training-step ``.tflite``
    `export_training` writes for the pruned, fine-tuned model (`deployable_size` with
    ``fine_tuned=True``; ``scheme``: its `UpdateScheme`, None = classifier only;
    ``export_options``: `export_training`'s);
    ``"weights"`` counts int8 weights + int32 biases (`flash_bytes`). ``margin``: the size
    times ``1 + margin`` must fit (default `DEPLOYABLE_MARGIN` for the deployable estimate,
    0 for the exact weights count). Raises ValueError naming the budget and the minimum
    size when even 99.9 % of every prunable family leaves too many bytes.

        sparsity, nbytes = sparsity_for_budget(model, parse_budget("1MB"))
    """
    graph = graph or DependencyGraph(model)
    measure = _size_measure(model, graph, size, scheme, input_shape, export_options)
    if margin is None:
        margin = DEPLOYABLE_MARGIN if size == "deployable" else 0.0

    def size_at(s):
        return measure(groups_to_prune(graph, s, exclude, round_to, min_channels))

    def fits(s):
        return size_at(s) * (1.0 + margin) <= budget_bytes

    if fits(0.0):
        return 0.0, int(size_at(0.0))
    high = MOST_SPARSITY
    if not fits(high):
        raise ValueError(f"flash budget {budget_bytes} bytes is below the minimum {size} size "
                         f"pruning can reach: {size_at(high)} bytes (+{margin:.1%} margin) "
                         f"with {high:.1%} of every prunable family pruned; the unprunable "
                         f"parts are too large")
    low = 0.0
    while high - low > tolerance:
        mid = (low + high) / 2
        if fits(mid):
            high = mid
        else:
            low = mid
    return float(high), int(size_at(high))


def _size_measure(model, graph, size, scheme, input_shape, export_options):
    """removed groups -> bytes, for ``size`` (see `sparsity_for_budget`)."""
    if size == "weights":
        if scheme is not None or export_options:
            raise ValueError("sparsity_for_budget: scheme and export options only apply to "
                             "size='deployable'")
        return lambda removed: flash_bytes(model, removed, graph)
    if size != "deployable":
        raise ValueError(f"sparsity_for_budget: size must be one of {SIZES}, got {size!r}")
    sizer = DeployableSizeModel(model, scheme, graph, input_shape, pruned_name(model),
                                fine_tuned=True, **export_options)
    return lambda removed: sizer.size(removed).total


def _output_softmax(model: keras.Model) -> str | None:
    """The name of the softmax the model's classifier ends in (its own activation: the
    classifier's name), None if it outputs logits; for a model without a classifier
    dgst-tf finds, the output layer's name if that is a softmax."""
    from dgst_tf.core.classifier import ClassifierError, find_classifier, is_softmax_layer

    try:
        head = find_classifier(model)
    except ClassifierError:
        last = model.outputs[0]._keras_history.layer
        own = getattr(getattr(last, "activation", None), "__name__", None)
        return last.name if is_softmax_layer(last) or own == "softmax" else None
    return head.name if head.softmax == "activation" else head.softmax


@dataclasses.dataclass
class PruningResult:
    """What `prune_while_training` returns: the smaller model and how it got there."""

    model: keras.Model            # channels physically removed
    masked_model: keras.Model     # stripped TF-MOT model (zeros, original shapes)
    removed_groups: np.ndarray
    family_sparsity: dict
    history: dict
    schedule: object


def _ramp_schedule(total_steps: int, final_sparsity: float, ramp_fraction: float,
                   updates: int, power: int) -> tfmot_schedule.PolynomialDecay:
    """``PolynomialDecay`` from 0 to ``final_sparsity`` over the first ``ramp_fraction`` of
    ``total_steps``, in about ``updates`` mask updates."""
    frequency = max(1, int(total_steps * ramp_fraction) // max(1, int(updates)))
    end_step = max(frequency, int(total_steps * ramp_fraction) // frequency * frequency)
    return tfmot_schedule.PolynomialDecay(
        initial_sparsity=0.0, final_sparsity=float(final_sparsity), begin_step=0,
        end_step=end_step, power=power, frequency=frequency)


def _mask_at_least(masked: keras.Model, graph: DependencyGraph, target: np.ndarray
                   ) -> tuple[keras.Model, DependencyGraph, np.ndarray]:
    """``masked`` with ``target`` masked too if training stopped before the schedule's last
    update masked that many groups; returns (model, its graph, its zeroed groups)."""
    removed = zeroed_groups(masked, graph)
    if len(target) > len(removed):
        masked = mask_groups(masked, target, graph)
        graph = DependencyGraph(masked)
        removed = zeroed_groups(masked, graph)
    return masked, graph, removed


def prune_while_training(model: keras.Model, dataset, final_sparsity: float, *,
                         epochs: int = 1, steps_per_epoch: int | None = None,
                         optimizer=None, loss=None, metrics=("accuracy",),
                         ramp_fraction: float = 0.75, updates: int = 10, power: int = 3,
                         importance="l2", exclude: Iterable[str] = (), round_to: int = 1,
                         min_channels: int = 1, callbacks=(), verbose: int = 0,
                         validation_data=None, teacher: keras.Model | None = None,
                         temperature: float = 4.0, label_weight: float = 0.0
                         ) -> PruningResult:
    """Fine-tune ``model`` on ``dataset`` while TF-MOT's ``PolynomialDecay`` raises the
    channel-group sparsity from 0 to ``final_sparsity`` over the first ``ramp_fraction`` of
    the steps (``updates`` mask updates), then strip and physically remove the channels.

    Default optimizer: SGD, learning rate 0.003, momentum 0.9; default loss: cross-entropy
    on the logits, or on the probabilities when the classifier ends in a softmax
    (`dgst_tf.core.classifier`; distillation needs logits: prune `logits_model` then).
    Trains ``model``'s own variables (as ``prune_low_magnitude`` does). With ``teacher`` (e.g. the unpruned model)
    the fine-tuning is knowledge distillation (`dgst_tf.training.distillation.Distiller`,
    ``temperature``, ``label_weight``; labels in ``dataset`` are then optional and
    ``metrics`` unused): the history logs ``distillation`` and ``agreement``. If the data ran out
    before the last scheduled update, the final sparsity is applied once at the end, so
    the result always has it.

        result = prune_while_training(model, train.dataset, 0.35, epochs=2,
                                      steps_per_epoch=train.steps_per_epoch)
        result.model.save("pruned.h5")
    """
    if not 0.0 <= final_sparsity < 1.0:
        raise ValueError(f"final_sparsity must be in [0, 1), got {final_sparsity}")
    if steps_per_epoch is None:
        cardinality = int(tf.data.experimental.cardinality(dataset))
        if cardinality < 1:
            raise ValueError("dataset has unknown length: pass steps_per_epoch")
        steps_per_epoch = cardinality
    total = max(1, int(epochs) * int(steps_per_epoch))
    schedule = _ramp_schedule(total, final_sparsity, ramp_fraction, updates, power)
    selection = dict(importance=importance, exclude=exclude, round_to=round_to,
                     min_channels=min_channels)
    softmax = _output_softmax(model)
    if teacher is not None and softmax is not None:
        raise ValueError(f"prune_while_training: model {model.name!r} ends in softmax "
                         f"{softmax!r}; distillation matches logits: prune "
                         "dgst_tf.core.classifier.logits_model(model) (and its teacher)")
    pruning = prune_channel_groups(model, schedule, graph=DependencyGraph(model), **selection)
    optimizer = optimizer or keras.optimizers.SGD(0.003, momentum=0.9)
    if teacher is None:
        trainer = pruning
        trainer.compile(optimizer=optimizer, metrics=list(metrics), loss=loss or
                        keras.losses.SparseCategoricalCrossentropy(
                            from_logits=softmax is None))
    else:
        trainer = Distiller(pruning, teacher, temperature, label_weight)
        trainer.compile(optimizer=optimizer)
    history = trainer.fit(dataset, epochs=epochs, steps_per_epoch=steps_per_epoch,
                          callbacks=[pruning_callbacks.UpdatePruningStep(), *callbacks],
                          verbose=verbose, validation_data=validation_data)
    masked = tfmot_prune.strip_pruning(pruning)
    masked_graph = DependencyGraph(masked)
    target = select_groups(masked, final_sparsity, graph=masked_graph, **selection)
    masked, masked_graph, removed = _mask_at_least(masked, masked_graph, target)
    small = remove_channels(masked, removed, masked_graph, name=pruned_name(model))
    family = GroupSelector(masked_graph, None, exclude).family_sparsity_of(
        masked_graph.keep_vector(removed))
    return PruningResult(small, masked, removed, family, dict(history.history), schedule)
