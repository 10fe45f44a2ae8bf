"""The prune stage sizes the flash of the scheme that will be deployed: the plan's choice by
the analytic model (`planned_blocks`), found for the pruned model as a fixed point, not the
deepest scheme allowed (which wastes the flash of every block SRAM cannot hold); and it
prunes until at least ``min_blocks`` fit SRAM."""
import pytest
import numpy as np

from dgst_tf import models
from dgst_tf.core.bn_folding import fold_batchnorm
from dgst_tf.core.classifier import with_new_classifier
from dgst_tf.jobs.device_plan import deployable_memory, dgsu_scheme, plan_dgsu, planned_blocks
from dgst_tf.jobs.stages import StageBudgetError
from dgst_tf.jobs.device_prune import prune_to_flash
from dgst_tf.pruning.model_size import deployable_size

FRACTION = 0.1  # of conv weights per step: the tiny model's channels are few


def _updated(scheme) -> list:
    return sorted(name for name, update in scheme.layers.items() if update.mode != "frozen")


def _tiny(classes=10):
    return models.mobilenet_v2(0.25, (32, 32, 3), classes=classes, weights=None, seed=0)


def test_planned_blocks_is_the_deepest_scheme_that_fits_the_analytic_sram_budget():
    folded = fold_batchnorm(_tiny())
    arena = {n: int(deployable_memory(folded, dgsu_scheme(folded, n, FRACTION)).arena_bytes)
             for n in (1, 2, 3)}
    assert arena[1] < arena[2] < arena[3]  # deeper schemes save more for the backward pass

    def planned(budget, blocks=3):
        return planned_blocks(folded, sram_budget=budget, blocks=blocks,
                              target_fraction=FRACTION, seed=0)

    assert planned(arena[3]) == 3 and planned(arena[3] - 1) == 2
    assert planned(arena[2] - 1) == 1 and planned(arena[3], blocks=2) == 2
    assert planned(arena[1] - 1) == 0  # nothing fits


def _prune_setup():
    teacher = _tiny(classes=7)
    task = with_new_classifier(teacher, 3, seed=9)
    wide = task.count_params()

    def deployment(model):  # narrower models afford deeper schemes, as in SRAM
        blocks = 3 if model.count_params() < 0.9 * wide else 1
        return blocks, dgsu_scheme(fold_batchnorm(model), blocks, FRACTION)

    def file_bytes(model):
        return deployable_size(model, scheme=deployment(model)[1], policy="traversal").total

    x = np.random.default_rng(0).normal(size=(16, 32, 32, 3)).astype(np.float32)
    return teacher, task, deployment, file_bytes, x


def _prune(task, teacher, x, room, deployment, file_bytes, **options):
    return prune_to_flash(task, x, np.arange(16) % 3, flash_budget=room + 1000,
                          allowance=1000, deployable_bytes=file_bytes, batch_size=8, seed=2,
                          teacher=teacher, deployment=deployment,
                          size_options={"policy": "traversal"}, **options)


def test_prune_to_flash_sizes_the_scheme_the_pruned_model_will_deploy():
    """The unpruned model's scheme is 1 block, the pruned model's 3: the file must be sized
    for the 3 blocks deployed (sizing for the unpruned model's 1 block under-counts it)."""
    teacher, task, deployment, file_bytes, x = _prune_setup()
    room = int(0.8 * file_bytes(task))
    pruned, record = _prune(task, teacher, x, room, deployment, file_bytes)
    deployed = _updated(deployment(pruned)[1])
    assert deployed == _updated(dgsu_scheme(fold_batchnorm(task), 3, FRACTION))
    assert record["sized_for_layers"] == deployed
    assert len(record["attempts"]) == 1  # the analytic sizing was right the first time
    assert record["deployable_bytes"] == file_bytes(pruned) <= room


def test_prune_to_flash_prunes_a_model_that_fits_flash_until_min_depth_fits():
    teacher, task, deployment, file_bytes, x = _prune_setup()
    room = 2 * file_bytes(task)  # flash is no constraint
    same, record = _prune(task, teacher, x, room, deployment, file_bytes, min_depth=1)
    assert same is task and not record["pruned"]
    pruned, record = _prune(task, teacher, x, room, deployment, file_bytes, min_depth=3)
    assert record["pruned"] and deployment(pruned)[0] == 3
    # the least pruning that reaches it: the params threshold is 0.9 of the unpruned model's
    assert 0.8 * task.count_params() < pruned.count_params() < 0.9 * task.count_params()
    with pytest.raises(StageBudgetError, match=r"stage 'prune'.*3 blocks fit the SRAM budget.*"
                                               r"not the 4 asked for \(min_blocks\)"):
        _prune(task, teacher, x, room, deployment, file_bytes, min_depth=4)


def test_plan_refuses_an_sram_budget_no_scheme_meets_with_every_size_tried(tmp_path):
    folded = fold_batchnorm(_tiny())
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    with pytest.raises(StageBudgetError, match=r"stage 'plan': no DGSU scheme \(1..2 blocks, "
                                               r"10% of conv weights per step\) fits the file "
                                               r"limit of 900000 B and the SRAM budget of "
                                               r"16384 B: 2 blocks: [\d.]+% of conv weights, "
                                               r"analytic \d+ B; 1 blocks"):
        plan_dgsu(folded, images, np.array([0, 1]), tmp_path / "plan.tflite",
                  sram_budget=16384, blocks=2, target_fraction=FRACTION, learning_rate=0.001,
                  seed=0, max_file_bytes=900000)
    assert list(tmp_path.iterdir()) == []
