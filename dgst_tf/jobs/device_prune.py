"""Pruning until the deployable training `.tflite` plus the firmware allowance fits flash.

The deployable file is the firmware's training graph of the DGSU step
(`dgst_tf.jobs.device_plan.export_deployable`): int8 weights with their per-channel
quantization, int32 biases, the flatbuffer, the training graph's extra tensors. Channel
pruning is dependency-aware (`dgst_tf.pruning`, TF-MOT's ``PolynomialDecay`` over channel
groups) with recovery by knowledge distillation from the unpruned model on the target
images (no ImageNet images are available). `sparsity_for_budget` chooses the sparsity whose
analytic deployable file (`dgst_tf.pruning.model_size.deployable_size`, with ``size_options``:
the `UpdateScheme` as ``scheme`` and `export_training`'s options) fits ``flash budget - allowance``; the pruned model's real file
is then measured, and if it still misses, the target shrinks by what it misses (``attempts``
tries, each from the unpruned model).

The teacher is the pretrained model with its own classifier (for MobileNetV2, ImageNet's
1000 classes): the student is pruned and recovered under that classifier, so the whole
1000-way output carries the teacher's knowledge, and only then gets the target task's
classifier, newly initialised (`with_new_classifier`). Distilling into a newly initialised
10-class head instead transfers almost nothing (its logits are a random projection of the
features). Example::

    model, record = prune_to_flash(task_model, x, y, flash_budget=1 << 20,
                                   allowance=160 * 1024, deployable_bytes=measure,
                                   teacher=imagenet_model,
                                   size_options={"scheme": scheme, "policy": "traversal"})
    record["deployable_bytes"], record["family_sparsity"]
"""
from __future__ import annotations

from dgst_tf.core.classifier import with_new_classifier
from dgst_tf.core.graph import copy_model
from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.jobs.stages import StageBudgetError
from dgst_tf.pruning import flash_bytes, prune_while_training, sparsity_for_budget

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


def prune_to_flash(model, x, y, *, flash_budget: int, allowance: int, deployable_bytes,
                   epochs: int = 1, batch_size: int = 32, learning_rate: float = 0.003,
                   temperature: float = 4.0, attempts: int = 3, seed: int = 0,
                   size_options: dict | None = None, teacher=None):
    """(model that fits, record). ``model``: the target task's model (its classifier is
    what is deployed); ``deployable_bytes(model) -> int`` measures the deployable training
    file; the model is returned unchanged (``record["pruned"]`` False) if it fits already.
    ``teacher``: the pretrained model with the same backbone and its own classifier (see the
    module doc); default ``model`` itself. Raises `StageBudgetError` (stage "prune") with the
    numbers if it cannot fit."""
    room = flash_budget - allowance
    if room <= 0:
        _refuse(f"the firmware allowance {allowance} B leaves nothing of the flash budget "
                f"{flash_budget} B")
    unpruned = int(deployable_bytes(model))
    record = {"flash_budget_bytes": flash_budget, "allowance_bytes": allowance,
              "unpruned_deployable_bytes": unpruned, "unpruned_weights_bytes":
              int(flash_bytes(model)), "pruned": False, "attempts": []}
    if unpruned + allowance <= flash_budget:
        return model, record | {"deployable_bytes": unpruned}
    target = room
    teacher = copy_model(model if teacher is None else teacher)
    record["teacher_classes"] = int(teacher.output_shape[-1])
    for _ in range(attempts):
        try:
            sparsity, _ = sparsity_for_budget(model, int(target), size="deployable",
                                              **(size_options or {}))
        except ValueError as error:
            _refuse(f"deployable file target {int(target)} B (unpruned file {unpruned} B; "
                    f"flash budget {flash_budget} B - allowance {allowance} B = {room} B): "
                    f"{error}")
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
