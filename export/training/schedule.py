"""The training step's counter and layer schedule: with ``layers_per_step=n`` only n of the
weight-updated layers update their weights at each step, in turn (DGSU's stage-aware layer
choice; the rule is `dgst_tf.tflm_ops.reference.layer_active`), exactly the layers
`DynamicChannelSelection(layers_per_step=n)` activates in Keras; the others still train their
biases.

On device the schedule needs no state of its own: the ops of a scheduled layer (its
``DGST_SELECT_CHANNELS`` under policy "traversal", its ``DGST_*_WEIGHT_GRAD`` and its
weights' ``DGST_SGD_QAS_UPDATE``) carry 3 more option words ``(index, layers, n)`` and read
the step counter ``sgd/step`` -- the int32 variable stochastic rounding uses too, advanced
once per step by the last update op -- so the position persists across Invokes in the
arena. An inactive layer's weight gradient is not computed and its weights and visited
channels stay as they are.

    assign_layer_schedule(graph, model)   # after add_variables, before the passes
    schedule_words(layer)                 # () or (index, layers, n): option words
    step_counter(graph)                   # the sgd/step variable (made on first use)
"""
from __future__ import annotations

import numpy as np

from dgst_tf.export.training.plan import TrainedLayer, TrainingExportError
from dgst_tf.export.training.state import TrainingGraph

__all__ = ["MAX_SCHEDULED_LAYERS", "assign_layer_schedule", "schedule_words", "step_counter"]

MAX_SCHEDULED_LAYERS = 255  # the schedule words are uint8 in the ops' OpData (no arena bytes)


def step_counter(graph: TrainingGraph) -> int:
    """The int32 step counter variable ``sgd/step`` (zero at start), shared by stochastic
    rounding and the layer schedule."""
    if graph.sgd_step < 0:
        graph.sgd_step = graph.editor.add_tensor("sgd/step", (1,), np.int32, variable=True)
    return graph.sgd_step


def assign_layer_schedule(graph: TrainingGraph, model) -> None:
    """Number the weight-updated layers (classifier excluded) in the Keras model's execution
    order, as `SparseUpdateModel.weight_layers` does, and give each its schedule words when
    ``layers_per_step`` leaves some of them out at a step (fewer than all of them)."""
    from dgst_tf.training.scheme import updatable_layers

    per_step = graph.settings.layers_per_step
    if per_step is None:
        return
    if not isinstance(per_step, (int, np.integer)) or isinstance(per_step, bool) \
            or per_step < 1:
        raise TrainingExportError(f"{graph.where}: layers_per_step must be None or an int "
                                  f">= 1, got {per_step!r}")
    by_name = {layer.name: layer for layer in graph.layers.values()}
    order = [layer.name for layer in updatable_layers(model) if layer.name in by_name
             and layer.name != graph.plan.classifier and by_name[layer.name].update.updates_weights]
    if per_step >= len(order):
        return  # every layer every step: nothing to schedule
    if len(order) > MAX_SCHEDULED_LAYERS:
        raise TrainingExportError(f"{graph.where}: layers_per_step schedules at most "
                                  f"{MAX_SCHEDULED_LAYERS} weight-updated layers, the scheme "
                                  f"has {len(order)}")
    for index, name in enumerate(order):
        by_name[name].schedule = (index, len(order), int(per_step))


def schedule_words(layer: TrainedLayer) -> tuple:
    """The option words ``(index, layers, per_step)`` of ``layer``'s scheduled ops, or ()
    when it updates its weights every step."""
    return tuple(layer.schedule or ())
