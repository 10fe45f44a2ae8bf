"""Pruning until the deployable training `.tflite` plus the firmware allowance fits flash.

The deployable file is the firmware's training graph of the DGSU step
(`dgst_tf.jobs.device_plan.export_deployable`): int8 weights with their per-channel
quantization, int32 biases, the flatbuffer, the training graph's extra tensors. Channel
pruning is dependency-aware (`dgst_tf.pruning`, TF-MOT's ``PolynomialDecay`` over channel
groups) with recovery by knowledge distillation from the unpruned model on the target
images (no ImageNet images are available). `sparsity_for_budget` chooses the sparsity whose
analytic deployable file (`dgst_tf.pruning.model_size.deployable_size` with
`export_training`'s ``size_options``) fits ``flash budget - allowance``; the pruned model's
real file is then measured, and if it still misses, the target shrinks by what it misses
(``attempts`` tries, each from the unpruned model).

The file is sized for the scheme that will be deployed: ``deployment(model)`` gives the
(depth, `UpdateScheme`) the plan stage will train on a model (for DGSU: the most blocks that
fit SRAM, see `dgst_tf.jobs.device_plan.planned_blocks`), and it depends on the pruning
(narrower activations and kernels let more blocks fit). Pruning goes at least as far as
``min_depth`` needs (the smallest sparsity whose channel structure, pruned without
training, has that depth), then the sizing scheme is found as a fixed point: size for a
scheme, prune the structure to that sparsity, take that model's scheme, until it stops
changing. Sizing for the deepest scheme allowed instead wastes the flash of every block
SRAM cannot hold (MobileNetV2-1.0 at 128 px under 256 KB: 8 blocks sized, 2 deployed).
Example::

    model, record = prune_to_flash(task_model, x, y, flash_budget=1 << 20,
                                   allowance=160 * 1024, deployable_bytes=measure,
                                   teacher=imagenet_model, deployment=planned,
                                   min_depth=2, size_options={"policy": "traversal"})
    record["deployable_bytes"], record["family_sparsity"]
"""
from __future__ import annotations

import functools

from dgst_tf.core.classifier import with_new_classifier
from dgst_tf.core.graph import copy_model
from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.jobs.stages import StageBudgetError
from dgst_tf.pruning import (MOST_SPARSITY, DependencyGraph, flash_bytes, groups_to_prune,
                             prune_while_training, remove_channels, sparsity_for_budget)

__all__ = ["prune_to_flash"]


def _refuse(message: str):
    raise StageBudgetError("prune", message)


def _prune_once(model, teacher, x, y, sparsity, *, epochs, batch_size, learning_rate,
                temperature, seed):
    """One run of `prune_while_training` with distillation; (pruned model, its history)."""
    data = (tf.data.Dataset.from_tensor_slices((x, y))
            .shuffle(len(x), seed=seed).batch(batch_size))
    steps = -(-len(x) // batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, max(1, steps * epochs))
    result = prune_while_training(copy_model(model), data, sparsity, epochs=epochs,
                                  steps_per_epoch=steps, teacher=teacher,
                                  temperature=temperature,
                                  optimizer=keras.optimizers.SGD(schedule, momentum=0.9))
    return result, {k: [float(v) for v in vals] for k, vals in result.history.items()}


def _with_task_classifier(pruned, task_model, seed: int):
    """``pruned`` as the task's model: with ``task_model``'s classifier width (a new
    classifier, seeded) when the teacher's differs, else ``pruned`` itself."""
    classes = int(task_model.output_shape[-1])
    if int(pruned.output_shape[-1]) == classes:
        return pruned
    return with_new_classifier(pruned, classes, seed=seed, name=pruned.name)


def _structure_depths(model, graph, deployment):
    """``deployed_at(sparsity) -> (depth, scheme)``: ``deployment`` of ``model``'s channel
    structure pruned to ``sparsity`` without training, cached (sizing asks again)."""
    @functools.lru_cache(maxsize=None)
    def deployed_at(sparsity: float):
        return deployment(remove_channels(model, groups_to_prune(graph, sparsity), graph)
                          if sparsity else model)
    return deployed_at


def _sizing(model, graph, target: int, deployed_at, floor: float, size_options: dict,
            rounds: int = 4):
    """(sparsity, the scheme it is sized for): the smallest sparsity >= ``floor`` whose
    analytic file fits ``target`` bytes, sized for its own structure's scheme (module doc)."""
    def sparsity_for(scheme):
        return sparsity_for_budget(model, target, graph, size="deployable", scheme=scheme,
                                   **size_options)[0]

    if deployed_at is None:
        return sparsity_for(None), None
    scheme = deployed_at(floor)[1]
    for _ in range(rounds):
        sparsity = max(floor, sparsity_for(scheme))
        deployed = deployed_at(sparsity)[1]
        if _updated_layers(deployed) == _updated_layers(scheme):
            return sparsity, scheme
        scheme = deployed
    return max(floor, sparsity_for(scheme)), scheme


def _sparsity_for_depth(deployed_at, min_depth: int, tolerance: float = 2e-3) -> float:
    """The smallest sparsity (to ``tolerance``) whose depth is >= ``min_depth``; depth grows
    with sparsity. Raises ValueError if even the most pruning leaves less."""
    if deployed_at(0.0)[0] >= min_depth:
        return 0.0
    most = deployed_at(MOST_SPARSITY)[0]
    if most < min_depth:
        raise ValueError(f"even {MOST_SPARSITY:.1%} of every family pruned, {most} blocks fit "
                         "the SRAM budget within the per-step weight fraction (whole input "
                         "channels, at least one per updated layer), not the "
                         f"{min_depth} asked for (min_blocks)")
    low, high = 0.0, MOST_SPARSITY
    while high - low > tolerance:
        mid = (low + high) / 2
        low, high = (low, mid) if deployed_at(mid)[0] >= min_depth else (mid, high)
    return high


def _updated_layers(scheme) -> list:
    return sorted(name for name, update in scheme.layers.items() if update.mode != "frozen")


def prune_to_flash(model, x, y, *, flash_budget: int, allowance: int, deployable_bytes,
                   epochs: int = 1, batch_size: int = 32, learning_rate: float = 0.003,
                   temperature: float = 4.0, attempts: int = 3, seed: int = 0,
                   size_options: dict | None = None, teacher=None, deployment=None,
                   min_depth: int = 0):
    """(model that fits, record). ``model``: the target task's model (its classifier is
    what is deployed); ``deployable_bytes(model) -> int`` measures the deployable training
    file; the model is returned unchanged (``record["pruned"]`` False) if it fits already.
    ``teacher``: the pretrained model with the same backbone and its own classifier (see the
    module doc); default ``model`` itself. ``deployment(model) -> (depth, UpdateScheme)``:
    what will be trained on a model, whose file is sized, pruned until its depth is at least
    ``min_depth`` (module doc); None: the classifier only. Raises `StageBudgetError` (stage
    "prune") with the numbers if it cannot fit."""
    room = flash_budget - allowance
    if room <= 0:
        _refuse(f"the firmware allowance {allowance} B leaves nothing of the flash budget "
                f"{flash_budget} B")
    unpruned = int(deployable_bytes(model))
    record = {"flash_budget_bytes": flash_budget, "allowance_bytes": allowance,
              "unpruned_deployable_bytes": unpruned, "unpruned_weights_bytes":
              int(flash_bytes(model)), "pruned": False, "attempts": []}
    graph = DependencyGraph(model)
    deployed_at = None if deployment is None else _structure_depths(model, graph, deployment)
    deep_enough = deployed_at is None or deployed_at(0.0)[0] >= min_depth
    if unpruned + allowance <= flash_budget and deep_enough:
        return model, record | {"deployable_bytes": unpruned}
    try:
        floor = 0.0 if deep_enough else _sparsity_for_depth(deployed_at, min_depth)
    except ValueError as error:
        _refuse(str(error))
    target = room
    teacher = copy_model(model if teacher is None else teacher)
    record["teacher_classes"] = int(teacher.output_shape[-1])
    for _ in range(attempts):
        try:
            sparsity, scheme = _sizing(model, graph, int(target), deployed_at, floor,
                                       size_options or {})
        except ValueError as error:
            _refuse(f"deployable file target {int(target)} B (unpruned file {unpruned} B; "
                    f"flash budget {flash_budget} B - allowance {allowance} B = {room} B): "
                    f"{error}")
        record["sized_for_layers"] = _updated_layers(scheme) if scheme else []
        result, history = _prune_once(teacher, teacher, x, y, sparsity, epochs=epochs,
                                      batch_size=batch_size, learning_rate=learning_rate,
                                      temperature=temperature, seed=seed)
        pruned = _with_task_classifier(result.model, model, seed)
        size = int(deployable_bytes(pruned))
        record["attempts"].append({"file_target_bytes": int(target),
                                   "sparsity": float(sparsity), "deployable_bytes": size})
        if size <= room:
            return pruned, record | {
                "pruned": True, "deployable_bytes": size, "sparsity": float(sparsity),
                "family_sparsity": {str(k): float(v)
                                    for k, v in result.family_sparsity.items()},
                "weights_bytes": int(flash_bytes(result.model)), "history": history}
        target *= 0.98 * room / size
    _refuse(f"after {attempts} tries the deployable training file is {size} B + allowance "
            f"{allowance} B = {size + allowance} B, over the flash budget of {flash_budget} B")
