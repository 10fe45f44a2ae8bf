"""`dgst device` / `run_device_pipeline` end to end on a tiny MobileNetV2 and a few
Fashion-MNIST images: budgets enforced (flash of the deployable training file, TFLM's arena),
the adapted int8 model's TFLM logits equal to the Keras int8 simulation's, resuming, and
refusals that name the stage and the numbers and leave no half-written files.

Oracles: the files the pipeline wrote, measured again here (file sizes, TFLM's arena of the
firmware graph, the adapted model run in TFLM, the Keras int8 simulation rebuilt from the
pruned model and the trained weights)."""
import dataclasses
import json
import pathlib
import shutil

import numpy as np
import pytest

from dgst_tf import models
from dgst_tf.cli.main import main
from dgst_tf.core.bn_folding import fold_batchnorm
from dgst_tf.export.inference import quantize
from dgst_tf.export.tflite_file import read_tflite, tensor_details
from dgst_tf.export.training import (initial_params, load_manifest, run_inference_tflm,
                                     train_tflm, write_inference_model)
from dgst_tf.jobs import device_int8, device_pipeline
from dgst_tf.jobs.device_pipeline import (STAGES, DeviceConfig, StageBudgetError,
                                          _load_data, run_device_pipeline)
from dgst_tf.jobs.device_plan import device_export_options, dgsu_scheme, export_deployable
from dgst_tf.training.scheme import UpdateScheme
from test_sparse_update import _StopAfterEpoch

ALLOWANCE = 20000
TINY = dict(dataset="fashion_mnist", width=0.25, image_size=32, weights=None,
            sram_budget="256KB", firmware_allowance=ALLOWANCE, prune_examples=64,
            prune_epochs=1, prune_batch_size=16, blocks=2, min_blocks=1, train_examples=24,
            validation_examples=16, calibration_examples=16, epochs=2, check_steps=3,
            test_examples=40, seed=0)


def _unpruned_file_bytes(tmp_path) -> int:
    """The deployable training file of the unpruned tiny model, measured here."""
    config = DeviceConfig(output_dir=str(tmp_path), **TINY)
    model = fold_batchnorm(models.mobilenet_v2(0.25, (32, 32, 3), classes=10, weights=None,
                                               seed=0))
    calibration = _load_data(config).calibration
    scheme = dgsu_scheme(model, config.blocks, config.target_fraction, config.seed)
    path = export_deployable(model, scheme, calibration, tmp_path / "unpruned.tflite",
                             **device_export_options(config.learning_rate, config.seed))
    return path.stat().st_size


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(config, report) of one finished run whose flash budget forces pruning."""
    folder = tmp_path_factory.mktemp("device")
    unpruned = _unpruned_file_bytes(tmp_path_factory.mktemp("measure"))
    budget = int(0.85 * unpruned) + ALLOWANCE  # the unpruned file does not fit
    config = DeviceConfig(output_dir=str(folder), flash_budget=str(budget), **TINY)
    with pytest.MonkeyPatch.context() as patch:  # 40 test images in chunks of 16, 16, 8
        patch.setattr(device_pipeline, "EVALUATE_CHUNK", 16)
        return config, run_device_pipeline(config, verbose=0), unpruned


def test_every_stage_meets_its_budget(finished):
    config, report, unpruned = finished
    folder = config.output_dir
    prune, plan, train = report["prune"], report["plan"], report["train"]
    # flash: the unpruned file did not fit, the pruned deployable file does
    assert prune["pruned"] and prune["unpruned_deployable_bytes"] == unpruned
    assert unpruned + ALLOWANCE > config.flash_budget_bytes
    config_path = pathlib.Path(folder, "deploy_train.tflite")
    deployed = read_tflite(config_path)[0]
    assert len(deployed) == plan["file_bytes"]
    assert len(deployed) + ALLOWANCE <= config.flash_budget_bytes
    # the prune stage sized and measured the file the plan deploys, not a deeper scheme's
    assert prune["sized_for_layers"] == plan["layers"]
    assert prune["deployable_bytes"] == plan["file_bytes"]
    assert prune["weights_bytes"] < prune["unpruned_weights_bytes"]
    # SRAM: TFLM's arena of the firmware graph, measured again
    manifest = load_manifest(config_path)
    assert manifest["policy"] == "traversal"
    assert all(entry["output"] is None for entry in manifest["params"])  # firmware graph
    run = train_tflm(config_path, _load_data(config).x_check[:1], np.array([0]))
    assert run.arena_bytes == plan["arena_bytes"] <= config.sram_budget_bytes
    assert plan["analytic_bytes"] <= config.sram_budget_bytes
    # training: <= 2% of conv weights per step, every step, and they did change
    fractions = train["steps"]["updated_fraction"]
    assert len(fractions) == config.epochs * config.train_examples
    assert 0 < max(fractions) <= config.target_fraction
    assert len(train["val_accuracy_per_epoch"]) == config.epochs
    assert 0 < train["steps"]["coverage"][-1] <= 1
    # the report's heat map: every step's channels counted, in the plan's layers
    updates = train["channel_updates"]
    assert updates["steps"] == len(fractions) and updates["coverage"] == train["steps"]["coverage"]
    scheme = UpdateScheme.load(pathlib.Path(folder, "scheme.json"))
    assert set(updates["counts"]) == {n for n, u in scheme.layers.items() if u.updates_weights}
    assert all(sum(c) > 0 for c in updates["counts"].values())
    # TFLM continued from the trained state and matched Keras, after moving weights
    check = report["check"]
    assert check["channel_mismatches"] == [] and check["param_mismatches"] == {}
    assert check["params_moved"] > 0 and check["params_compared"] >= 3
    for name in ("report.json", "report.png", "memory.png", "adapted.tflite", "pruned.keras"):
        assert pathlib.Path(folder, name).stat().st_size > 0
    assert json.loads((pathlib.Path(folder) / "report.json").read_text()) == \
        json.loads(json.dumps(report))


def test_adapted_model_tflm_logits_equal_the_keras_int8_simulation(finished):
    config, report, _ = finished
    folder = pathlib.Path(config.output_dir)
    d = _load_data(config)
    path = folder / "adapted.tflite"
    _, parsed = read_tflite(path)
    codes = quantize(d.x_test, tensor_details(parsed, int(parsed.subgraphs[0].inputs[0])))
    tflm = run_inference_tflm(path, codes[:, None]).outputs[0].reshape(len(d.x_test), -1)
    # the Keras int8 simulation, rebuilt from the pruned model and the trained weights
    from dgst_tf.core.keras_compat import keras

    folded = fold_batchnorm(keras.models.load_model(folder / "pruned.keras", compile=False))
    sim = device_int8.Int8Dgsu.build(folded, d.calibration,
                                     UpdateScheme.load(folder / "scheme.json"),
                                     learning_rate=config.learning_rate, seed=config.seed)
    device_int8.load_weights(sim.graph.model, folder / "trained_weights.npz")
    keras_codes = sim.int8_logits(d.x_test, load_manifest(folder / "check_start.tflite"))
    np.testing.assert_array_equal(tflm, keras_codes)
    assert len(np.unique(tflm)) > 10  # not a saturated, trivially equal output
    accuracy = float((tflm.argmax(1) == d.y_test).mean())
    assert report["evaluate"]["test_accuracy"] == pytest.approx(accuracy)
    assert report["evaluate"]["test_examples"] == report["evaluate"]["logits_equal_keras"] == 40
    # and training changed the model: the deployed starting state gives other logits
    before = folder / "before.tflite"
    write_inference_model(folder / "check_start.tflite",
                          initial_params(folder / "check_start.tflite"), before)
    untrained = run_inference_tflm(before, codes[:, None]).outputs[0].reshape(len(d.x_test), -1)
    before.unlink()
    assert (untrained != tflm).any()


def test_a_second_call_skips_the_finished_stages(finished):
    config, report, _ = finished
    folder = pathlib.Path(config.output_dir)
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name != "report.json"
              and p.name != "report.png"}
    again = run_device_pipeline(config, verbose=0)
    assert again == report
    after = {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name in stamps}
    assert after == stamps  # no stage output nor marker was written again


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_an_sram_budget_no_pruning_meets_is_refused_by_the_prune_stage(finished, tmp_path):
    """The prune stage prunes as far as SRAM needs for ``min_blocks``; 2 KB is below the
    32x32x3 input image alone, so even 99.9% pruning cannot reach it: refused, naming the
    stage and the numbers, the finished run's outputs gone, nothing half-written."""
    config, report, _ = finished
    folder = tmp_path / "copy"
    shutil.copytree(config.output_dir, folder)
    tight = dataclasses.replace(config, output_dir=str(folder), sram_budget="2KB")
    with pytest.raises(StageBudgetError, match=r"stage 'prune'.*99.9% of every family pruned, "
                                               r"0 blocks fit the SRAM budget within the "
                                               r"per-step weight fraction.*not the 1 asked "
                                               r"for \(min_blocks\)"):
        run_device_pipeline(tight, verbose=0)
    names = {p.name for p in folder.iterdir()}
    for stage in STAGES:
        assert f"{stage}.stage.json" not in names
    assert not names & {"pruned.keras", "scheme.json", "deploy_train.tflite",
                        "trained_weights.npz", "adapted.tflite", "report.json"}
    assert _leftovers(folder) == []


def test_cli_refuses_a_flash_budget_the_firmware_allowance_fills(tmp_path, capsys):
    args = ["device", "--output-dir", str(tmp_path / "out"), "--width", "0.25",
            "--image-size", "32", "--weights", "none", "--flash-budget", "40KB",
            "--firmware-allowance", "50000", "--train-examples", "8", "--test-examples", "8",
            "--calibration-examples", "8", "--validation-examples", "8", "--verbose", "0"]
    assert main(args) == 2
    message = capsys.readouterr().err
    assert "stage 'prune'" in message and "50000 B" in message and "40960 B" in message
    folder = tmp_path / "out"
    assert not folder.exists() or sorted(p.name for p in folder.iterdir()) == []


def test_int8_training_killed_and_resumed_from_its_backup_equals_an_uninterrupted_run(
        tmp_path):
    """The train stage's in-stage resume: int8 weights, the optimizer step (so the cosine
    schedule and the stochastic rounding), the selection's sweep and the per-step records
    all continue where the killed run stopped."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, size=6)
    folded = fold_batchnorm(models.mobilenet_v2(0.25, (32, 32, 3), classes=10, weights=None,
                                                seed=0))
    scheme = dgsu_scheme(folded, 2, 0.02, 0)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(1)  # same order every epoch

    def sim():
        schedule = device_int8.keras.optimizers.schedules.CosineDecay(0.05, 3 * len(x))
        return device_int8.Int8Dgsu.build(folded, x[:4], scheme, learning_rate=schedule,
                                          seed=0)

    straight = sim()
    history, steps = straight.fit(data, epochs=3)
    killed = sim()
    with pytest.raises(KeyboardInterrupt):
        killed.fit(data, epochs=3, backup_dir=tmp_path / "backup",
                   callbacks=[_StopAfterEpoch(2)])  # a killed session
    assert (tmp_path / "backup" / "records.json").is_file()
    resumed = sim()
    history_resumed, steps_resumed = resumed.fit(data, epochs=3,
                                                 backup_dir=tmp_path / "backup")
    for a, b in zip(straight.sparse.weights, resumed.sparse.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)
    assert int(resumed.sparse.optimizer.iterations.numpy()) == 3 * len(x)
    assert steps_resumed == steps and len(steps["loss"]) == 3 * len(x)
    assert (straight.resumed_at_epoch, resumed.resumed_at_epoch) == (0, 2)
    assert history_resumed == history and len(history["loss"]) == 3
    assert not (tmp_path / "backup").exists()  # removed once the fit finished
    moved = sum(int((a.numpy() != b.numpy()).sum()) for a, b in
                zip(straight.sparse.weights, sim().sparse.weights))
    assert moved > 0


def test_validation_evaluation_never_reads_the_test_set_and_augment_needs_a_stream():
    config = DeviceConfig(output_dir="unused", evaluate_on="validation", stream=True,
                          augment=True, **(TINY | dict(train_examples=40)))
    d = _load_data(config)
    x, y = d.evaluation()
    assert x is d.x_val and len(x) == config.validation_examples
    assert d._test is None  # the test split was not loaded
    dataset, examples = d.training()
    assert examples == 40 and len(list(dataset)) == 40
    with pytest.raises(ValueError, match="augment needs stream=True"):
        DeviceConfig(augment=True)
    with pytest.raises(ValueError, match="evaluate_on must be one of"):
        DeviceConfig(evaluate_on="train")


@pytest.mark.slow
def test_the_prune_stage_distils_from_the_imagenet_classifier_of_the_pretrained_model():
    """With ImageNet weights the teacher keeps its 1,000 ImageNet outputs (distilling into the
    new 10-class head teaches almost nothing: benchmarks/pruning_recovery_probe.py); with
    random weights or a model file the base model teaches itself."""
    from dgst_tf.jobs.device_pipeline import _Run

    pretrained = _Run(DeviceConfig(output_dir="unused", **(TINY | dict(
        width=1.0, weights="imagenet"))), verbose=0)
    teacher, base = pretrained.teacher_model(), pretrained.base_model()
    assert teacher.output_shape == (None, 1000) and base.output_shape == (None, 10)
    for layer in ("stem_conv", "block_16_project", "head_conv"):
        for a, b in zip(teacher.get_layer(layer).get_weights(),
                        base.get_layer(layer).get_weights()):
            np.testing.assert_array_equal(a, b)
    assert _Run(DeviceConfig(output_dir="unused", **TINY), verbose=0).teacher_model() is None
