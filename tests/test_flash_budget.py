"""Flash budget of the deployable training .tflite: the analytic size
(`dgst_tf.pruning.model_size.deployable_size`) against the file `export_training` really
writes, pruning to a deployable budget, and the firmware allowance check."""
import numpy as np
import pytest

from dgst_tf import models
from dgst_tf.export.training import export_training
from dgst_tf.jobs.flash_budget import (FIRMWARE_ALLOWANCE_BYTES, FlashBudgetError,
                                       deployable_training_bytes, flash_budget_check)
from dgst_tf.pruning import (DependencyGraph, flash_bytes, groups_to_prune, remove_channels,
                             select_groups, sparsity_for_budget)
from dgst_tf.pruning.model_size import DeployableSizeModel, deployable_size
from dgst_tf.pruning.prune_to_budget import DEPLOYABLE_MARGIN, pruned_name
from dgst_tf.training.scheme import UpdateScheme

from small_models import residual_cnn

TOLERANCE = 0.03  # the analytic size must be this close to the exported file


def _assert_close(analytic: int, real: int):
    assert abs(analytic - real) <= TOLERANCE * real, (
        f"analytic {analytic} B vs exported {real} B ({(analytic - real) / real:+.2%})")


@pytest.fixture(scope="module")
def tiny():
    images = np.random.default_rng(0).normal(size=(16, 8, 8, 3)).astype(np.float32)
    return residual_cnn(), images


@pytest.fixture(scope="module")
def mobilenet():
    model = models.mobilenet_v2(0.35, (96, 96, 3), classes=10, weights=None, seed=0)
    images = np.random.default_rng(0).uniform(-1, 1, (16, 96, 96, 3)).astype(np.float32)
    return model, DependencyGraph(model), images


# (scheme, export options): the classifier only; weights, biases and kept slices in three
# layers; the exporter's simplifications switched off; on-device channel selection
TINY_CASES = {
    "classifier": ({}, {}),
    "scheme": ({"expand": 0.5, "depthwise": "bias", "head": 0.5}, {}),
    "plain": ({"head": "bias"}, dict(fuse_blocks=False, requant_in_flash=False,
                                     fold_pads=False, rounding="nearest")),
    "traversal": ({"expand": 0.5, "head": 0.5}, dict(policy="traversal")),
}


@pytest.mark.parametrize("case", list(TINY_CASES))
def test_tiny_analytic_size_matches_the_exported_file(tiny, case):
    model, images = tiny
    layers, options = TINY_CASES[case]
    scheme = UpdateScheme(layers)
    real = deployable_training_bytes(model, images, scheme, **options)
    size = deployable_size(model, scheme=scheme, **options)
    _assert_close(size.total, real)
    if case == "plain":  # no DGST_CONV2D and no fused blocks: no requantization constants
        assert size.requantization == 0
    else:
        assert size.requantization > 0


def test_tiny_pruned_size_is_counted_without_building_the_model(tiny):
    model, images = tiny
    graph = DependencyGraph(model)
    removed = select_groups(model, 0.5, graph=graph)
    small = remove_channels(model, removed, graph, name=pruned_name(model))
    counted = deployable_size(model, removed, graph, name=small.name)
    assert counted == deployable_size(small)  # same file, with or without building it
    assert counted.total < deployable_size(model).total
    _assert_close(counted.total, deployable_training_bytes(small, images))


def test_deployable_training_bytes_is_the_exported_file_and_leaves_nothing(tiny, tmp_path,
                                                                          monkeypatch):
    import tempfile

    model, images = tiny
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    nbytes = deployable_training_bytes(model, images, learning_rate=0.1)
    assert list(scratch.iterdir()) == []
    monkeypatch.undo()
    info = export_training(model, UpdateScheme({}), images, tmp_path / "train.tflite",
                           learning_rate=0.1)
    assert nbytes == info.path.stat().st_size


def test_mobilenet_analytic_size_matches_the_exported_file(mobilenet):
    model, _, images = mobilenet
    size = deployable_size(model)
    _assert_close(size.total, deployable_training_bytes(model, images, num_samples=16))
    # what the weights-only count leaves out is a fifth of the file
    assert size.weights + size.biases >= flash_bytes(model)
    assert size.total > 1.2 * flash_bytes(model)


def _with_trained_biases(model, seed=0):
    """A copy whose BatchNorms have random statistics, so that every folded bias is
    non-zero, as after training (an untrained BatchNorm folds to zero biases)."""
    from dgst_tf.core.keras_compat import keras

    copy = keras.models.clone_model(model)
    rng = np.random.default_rng(seed)
    copy.set_weights([rng.uniform(0.5, 1.5, w.shape).astype(w.dtype)
                      if "variance" in v.name or "gamma" in v.name else
                      rng.normal(0, 0.1, w.shape).astype(w.dtype) if "beta" in v.name
                      or "moving_mean" in v.name else w
                      for v, w in zip(copy.weights, model.get_weights())])
    return copy


def test_sparsity_for_budget_fits_the_exported_file_of_the_pruned_model(mobilenet):
    _, _, images = mobilenet
    model = _with_trained_biases(mobilenet[0])
    graph = DependencyGraph(model)
    scheme = UpdateScheme({"block_16_project": 0.25, "block_16_expand": "bias",
                           "block_15_project": 0.5, "block_15_depthwise": 0.5})
    budget = int(0.6 * deployable_size(model, scheme=scheme).total)
    sparsity, predicted = sparsity_for_budget(model, budget, graph, scheme=scheme)
    assert predicted * (1 + DEPLOYABLE_MARGIN) <= budget
    looser = DeployableSizeModel(model, scheme, graph, name=pruned_name(model),
                                 fine_tuned=True).size(groups_to_prune(graph, sparsity - 0.01))
    assert looser.total * (1 + DEPLOYABLE_MARGIN) > budget  # the smallest sparsity that fits
    small = remove_channels(model, select_groups(model, sparsity, graph=graph), graph,
                            name=pruned_name(model))
    real = deployable_training_bytes(small, images, scheme, num_samples=16)
    assert real <= budget
    _assert_close(predicted, real)


def test_impossible_budget_names_the_budget_and_the_minimum(tiny):
    model, _ = tiny
    graph = DependencyGraph(model)
    minimum = deployable_size(model, groups_to_prune(graph, 0.999), graph,
                              name=pruned_name(model), fine_tuned=True).total
    with pytest.raises(ValueError, match=rf"budget 1000 bytes .* minimum deployable size .* "
                                         rf"{minimum} bytes"):
        sparsity_for_budget(model, 1000, graph)


def test_flash_budget_check_names_the_file_the_allowance_and_the_budget():
    assert flash_budget_check(600_000, 1_000_000, allowance_bytes=300_000) == 100_000
    with pytest.raises(FlashBudgetError, match=r"\(800000 bytes\) \+ the firmware allowance "
                                               r"\(300000 bytes\) = 1100000 bytes, 100000 "
                                               r"bytes over the flash budget of 1000000"):
        flash_budget_check(800_000, 1_000_000, allowance_bytes=300_000)
    assert flash_budget_check(0, FIRMWARE_ALLOWANCE_BYTES) == 0  # the default allowance
    with pytest.raises(FlashBudgetError, match=f"allowance \\({FIRMWARE_ALLOWANCE_BYTES} "):
        flash_budget_check(1, FIRMWARE_ALLOWANCE_BYTES)
    with pytest.raises(ValueError, match="file_bytes must be >= 0"):
        flash_budget_check(-1, 10)
