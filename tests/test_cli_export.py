"""`dgst export` and `dgst tflm-train` (dgst_tf.cli.export) on a tiny MobileNetV2 and real
CIFAR-10 images."""
import argparse
import json
import re

import pytest

from dgst_tf.cli.export import add_export_parsers


def run(argv):
    parser = argparse.ArgumentParser(prog="dgst")
    add_export_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_export_then_tflm_train(tmp_path, capsys):
    model = tmp_path / "train.tflite"
    assert run(["export", "--width", "0.35", "--image-size", "32", "--weights", "none",
                "--backward-config", "4/48-49/0.25-0.25", "--calibration-examples", "8",
                "--policy", "traversal", "--layers-per-step", "1",
                "--output", str(model)]) == 0
    out = capsys.readouterr().out
    assert "train.json" in out and "chosen on device (traversal)" in out
    assert "weights at 1 of every 2 steps (layer 0)" in out
    assert json.loads(model.with_suffix(".json").read_text())["layers_per_step"] == 1
    assert re.search(r"trainable tensors in RAM: \d+ bytes; [1-9]\d* frozen blocks fused", out)
    assert run(["tflm-train", str(model), "--steps", "6", "--test-examples", "10",
                "--output-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "loss" in out and "arena" in out and "test accuracy" in out
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["steps"] == 6 and result["arena_bytes"] > 0
    assert 0 <= result["test_accuracy_after"] <= 1
    assert (tmp_path / "out" / "after.tflite").is_file()


def test_tflm_train_without_a_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "x.tflite").write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match=r"x.json: no such file"):
        run(["tflm-train", str(tmp_path / "x.tflite"), "--steps", "1"])


def test_export_rounding_option():
    parser = argparse.ArgumentParser(prog="dgst")
    add_export_parsers(parser.add_subparsers(dest="command", required=True))
    assert parser.parse_args(["export"]).rounding == "stochastic"
    args = parser.parse_args(["export", "--rounding", "nearest", "--seed", "3"])
    assert (args.rounding, args.seed) == ("nearest", 3)
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "--rounding", "up"])
