import json

import numpy as np
import pytest

from dgst_tf import cli
from dgst_tf.core.keras_compat import tf


def _image_folder(root, classes=("cat", "dog"), per_class=6, size=16):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                image = rng.integers(0, 60, (size, size, 3)) + 150 * c
                tf.io.write_file(str(folder / f"{i}.png"),
                                 tf.io.encode_png(image.astype(np.uint8)))
    return root


def test_info_reports_every_section(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for key in ("tensorflow", "tf-keras", "tflite-micro", "cifar10", "fashion_mnist",
                "mobilenet_v2", "host interpreter", "qemu-system-arm", "arm-none-eabi-gcc"):
        assert key in out


@pytest.mark.parametrize("method", ["dgsu", "last_layer"])
def test_train_on_an_image_folder_writes_results(tmp_path, capsys, method):
    data = _image_folder(tmp_path / "data")
    code = cli.main(["train", "--dataset", "folder", "--data", str(data), "--weights", "none",
                     "--width", "0.35", "--image-size", "32", "--epochs", "1",
                     "--method", method, "--verbose", "0",
                     "--output-dir", str(tmp_path / "out")])
    assert code == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "updated per step" in out
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["train_examples"] == 12 and result["test_examples"] == 12
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert (result["updated_fraction"] > 0) == (method == "dgsu")
    memory = result["memory"]
    assert 0 < memory["inference_peak_bytes"] <= memory["training_peak_bytes"]
    assert memory["training_peak_bytes"] < memory["dense_training_bytes"]
    assert "training step" in out and "KB peak SRAM" in out


def test_an_interrupted_train_resumes_from_its_backup(tmp_path, capsys, monkeypatch):
    from dgst_tf.jobs import adapt
    from dgst_tf.core.keras_compat import keras

    class Killed(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    data = _image_folder(tmp_path / "data")
    argv = ["train", "--dataset", "folder", "--data", str(data), "--weights", "none",
            "--width", "0.35", "--image-size", "32", "--epochs", "2", "--verbose", "2",
            "--backup-dir", str(tmp_path / "backup")]
    build = adapt.build_model

    def build_and_kill_after_epoch_1(*args):
        model, callbacks = build(*args)
        return model, [*callbacks, Killed()]

    monkeypatch.setattr(adapt, "build_model", build_and_kill_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv)
    assert "Epoch 1/2" in capsys.readouterr().out
    monkeypatch.setattr(adapt, "build_model", build)
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "Epoch 2/2" in out and "Epoch 1/2" not in out  # epoch 1 came from the backup


def test_train_refuses_a_budget_the_step_exceeds_before_training(tmp_path, capsys):
    data = _image_folder(tmp_path / "data")
    code = cli.main(["train", "--dataset", "folder", "--data", str(data), "--weights", "none",
                     "--width", "0.35", "--image-size", "32", "--verbose", "0",
                     "--budget", "4KB", "--output-dir", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "4.0 KB" in err and "block_" in err  # the budget and the largest contributors
    assert not (tmp_path / "out").exists()


def test_train_with_an_activation_pattern_counts_its_memory(tmp_path, capsys):
    data = _image_folder(tmp_path / "data")
    results = {}
    for pattern in (None, "stride2"):
        out = tmp_path / f"out-{pattern}"
        extra = ["--activation-pattern", pattern] if pattern else []
        code = cli.main(["train", "--dataset", "folder", "--data", str(data), "--weights",
                         "none", "--width", "0.35", "--image-size", "32", "--verbose", "0",
                         "--epochs", "1", "--output-dir", str(out), *extra])
        assert code == 0, capsys.readouterr().err
        results[pattern] = json.loads((out / "result.json").read_text())
    assert results["stride2"]["config"]["activation_pattern"] == "stride2"
    assert 0.0 <= results["stride2"]["test_accuracy"] <= 1.0
    peak = {k: r["memory"]["training_peak_bytes"] for k, r in results.items()}
    assert peak["stride2"] <= peak[None]


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code = cli.main(["train", "--dataset", "cifar10", "--data", str(missing), "--verbose", "0",
                     "--output-dir", str(tmp_path / "out")])
    assert code == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_train_with_a_scheme_file(tmp_path, capsys):
    from dgst_tf.training.scheme import UpdateScheme

    data = _image_folder(tmp_path / "data")
    UpdateScheme({"block_16_expand": 0.25, "block_16_project": "bias"}).save(
        tmp_path / "scheme.json")
    code = cli.main(["train", "--dataset", "folder", "--data", str(data), "--weights", "none",
                     "--width", "0.35", "--image-size", "32", "--verbose", "0",
                     "--scheme", str(tmp_path / "scheme.json"), "--selection", "static"])
    assert code == 0, capsys.readouterr().err
    assert "scheme.json (static)" in capsys.readouterr().out


def test_bad_scheme_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "scheme.json").write_text("{not json")
    data = _image_folder(tmp_path / "data")
    code = cli.main(["train", "--dataset", "folder", "--data", str(data), "--weights", "none",
                     "--width", "0.35", "--image-size", "32", "--verbose", "0",
                     "--scheme", str(tmp_path / "scheme.json")])
    assert code == 2
    assert "scheme.json" in capsys.readouterr().err


def test_train_export_tflm_train_chain_connects(tmp_path, capsys):
    """`dgst train --output-dir OUT && dgst export --from-train OUT && dgst tflm-train`: the
    exported training step keeps exactly the channels training left selected."""
    from dgst_tf.training.scheme import UpdateScheme

    data = _image_folder(tmp_path / "data")
    out = tmp_path / "out"
    dataset = ["--dataset", "folder", "--data", str(data)]
    assert cli.main(["train", *dataset, "--weights", "none", "--width", "0.35",
                     "--image-size", "32", "--epochs", "1", "--method", "sparse_update",
                     "--verbose", "0", "--output-dir", str(out)]) == 0, capsys.readouterr().err
    assert f"--from-train {out}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "accuracy.png", "model.keras", "result.json", "scheme.json", "selection.json",
        "selection.png"]  # no temp files left
    selection = json.loads((out / "selection.json").read_text())
    assert selection["selection"] == "static" and selection["layers"]
    assert UpdateScheme.load(out / "scheme.json").layers

    tflite = out / "train.tflite"
    assert cli.main(["export", "--from-train", str(out), *dataset,
                     "--calibration-examples", "4", "--output", str(tflite)]) == 0, \
        capsys.readouterr().err
    manifest = json.loads((out / "train.json").read_text())
    exported = {layer["name"]: layer["kept"] for layer in manifest["layers"]}
    for name, saved in selection["layers"].items():
        assert exported[name] == sorted(saved["kept"]), name

    assert cli.main(["tflm-train", str(tflite), *dataset, "--steps", "4",
                     "--test-examples", "4", "--output-dir", str(tmp_path / "tflm")]) == 0, \
        capsys.readouterr().err
    assert "loss" in capsys.readouterr().out
    result = json.loads((tmp_path / "tflm" / "result.json").read_text())
    # a confident correct prediction makes the float32 loss exactly 0 (margin >= 17)
    assert result["steps"] == 4 and result["loss_first"] > 0 and result["loss_last"] >= 0


def test_dynamic_training_exports_its_on_device_rule_and_layer_schedule(tmp_path, capsys):
    """`dgst train --method dgsu --layers-per-step 1 --output-dir OUT` then `dgst export
    --from-train OUT`: the device runs DGSU's traversal with the same layer schedule."""
    data = _image_folder(tmp_path / "data")
    out = tmp_path / "out"
    dataset = ["--dataset", "folder", "--data", str(data)]
    assert cli.main(["train", *dataset, "--weights", "none", "--width", "0.35",
                     "--image-size", "32", "--epochs", "1", "--method", "dgsu",
                     "--layers-per-step", "1", "--verbose", "0",
                     "--output-dir", str(out)]) == 0, capsys.readouterr().err
    selection = json.loads((out / "selection.json").read_text())
    assert selection["selection"] == "dynamic"
    assert selection["policy"] == "traversal" and selection["layers_per_step"] == 1
    assert cli.main(["export", "--from-train", str(out), *dataset, "--calibration-examples",
                     "4", "--output", str(out / "train.tflite")]) == 0, capsys.readouterr().err
    manifest = json.loads((out / "train.json").read_text())
    assert manifest["policy"] == "traversal" and manifest["layers_per_step"] == 1
    assert cli.main(["export", "--from-train", str(out), *dataset, "--calibration-examples",
                     "4", "--selection", "static", "--output", str(out / "static.tflite")]) == 0
    static = json.loads((out / "static.json").read_text())
    assert static["policy"] is None
    exported = {layer["name"]: layer["kept"] for layer in static["layers"]}
    for name, layer in selection["layers"].items():
        assert exported[name] == sorted(layer["kept"]), name


def test_layers_per_step_needs_dynamic_selection(capsys):
    code = cli.main(["train", "--weights", "none", "--method", "sparse_update",
                     "--layers-per-step", "2"])
    assert code == 2
    assert "layers_per_step" in capsys.readouterr().err


def test_export_from_a_folder_without_training_outputs_is_a_clear_error(tmp_path, capsys):
    code = cli.main(["export", "--from-train", str(tmp_path), "--output",
                     str(tmp_path / "train.tflite")])
    assert code == 2
    err = capsys.readouterr().err
    assert "model.keras" in err and "dgst train" in err


@pytest.mark.parametrize("flags, message", [
    (["--selection", "static", "--policy", "traversal"], "--policy"),
    (["--selection", "dynamic", "--static-channels", "first"], "--static-channels"),
    (["--selection-state", "s.json", "--static-channels", "first"], "not both"),
])
def test_export_rejects_contradicting_channel_selection_flags(tmp_path, capsys, flags,
                                                              message):
    code = cli.main(["export", "--weights", "none", "--output", str(tmp_path / "t.tflite"),
                     *flags])
    assert code == 2
    assert message in capsys.readouterr().err
