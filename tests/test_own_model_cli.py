"""`dgst ... --model my_cnn.keras`: a user's own saved tf-keras model through `dgst train` and
`dgst device` end to end, and the refusals every command gives before writing anything.

The user's model is a tiny MobileNet-v1-style CNN (separable blocks, a 1x1-Conv2D classifier
after keepdims pooling, Reshape, softmax) trained for a few float steps on Fashion-MNIST, so
its logits are not flat. Oracles: the input file itself (what training may change: only the
updated channels), the files the commands wrote measured again (deployable file size, TFLM's
arena, the adapted int8 model run in TFLM against the Keras int8 simulation rebuilt here)."""
import json
import re

import numpy as np
import pytest

from dgst_tf import data
from dgst_tf.cli.main import main
from dgst_tf.core.bn_folding import fold_batchnorm
from dgst_tf.core.classifier import find_classifier, logits_model, training_form
from dgst_tf.core.keras_compat import keras
from dgst_tf.export.inference import quantize
from dgst_tf.export.tflite_file import read_tflite, tensor_details
from dgst_tf.export.training import load_manifest, run_inference_tflm, train_tflm
from dgst_tf.jobs import device_int8
from dgst_tf.jobs.device_plan import device_export_options, dgsu_scheme, export_deployable
from dgst_tf.training.scheme import UpdateScheme

SIZE, CLASSES = 32, 10  # Fashion-MNIST
ALLOWANCE = 20000
DEVICE = ["--dataset", "fashion_mnist", "--weights", "none", "--sram-budget", "256KB",
          "--firmware-allowance", str(ALLOWANCE), "--prune-examples", "64",
          "--prune-batch-size", "16", "--blocks", "2", "--target-fraction", "0.05",
          "--train-examples", "24", "--validation-examples", "16",
          "--calibration-examples", "16", "--epochs", "2", "--check-steps", "3",
          "--test-examples", "40", "--seed", "0", "--verbose", "0"]
TRAIN = ["--dataset", "fashion_mnist", "--weights", "none", "--train-examples", "32",
         "--test-examples", "32", "--epochs", "1", "--target-fraction", "0.05",
         "--verbose", "0"]


def _separable(x, filters, name, strides=1):
    for layer in (keras.layers.DepthwiseConv2D(3, strides, padding="same", use_bias=False,
                                               name=f"{name}_dw"),
                  keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_dw_bn"),
                  keras.layers.ReLU(6.0, name=f"{name}_dw_relu"),
                  keras.layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_pw"),
                  keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_pw_bn"),
                  keras.layers.ReLU(6.0, name=f"{name}_pw_relu")):
        x = layer(x)
    return x


def mobilenet_v1_like(classes=CLASSES, size=SIZE, softmax=True, extra=None):
    """MobileNet v1 in miniature: stem, three separable blocks, pooled with keepdims, a 1x1
    Conv2D classifier, Reshape and (``softmax``) a softmax Activation, as
    keras.applications.MobileNet's head. ``extra(x) -> x``: a layer inserted after the
    stem (for refusals)."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((size, size, 3), name="image")
    x = keras.layers.Conv2D(16, 3, 2, padding="same", use_bias=False, name="stem")(inp)
    x = keras.layers.BatchNormalization(momentum=0.9, name="stem_bn")(x)
    x = keras.layers.ReLU(6.0, name="stem_relu")(x)
    if extra is not None:
        x = extra(x)
    x = _separable(x, 32, "block1")
    x = _separable(x, 48, "block2", strides=2)
    x = _separable(x, 64, "block3", strides=2)
    x = keras.layers.GlobalAveragePooling2D(keepdims=True, name="pool")(x)
    x = keras.layers.Conv2D(classes, 1, name="conv_preds")(x)
    x = keras.layers.Reshape((classes,), name="reshape")(x)
    if softmax:
        x = keras.layers.Activation("softmax", name="predictions")(x)
    return keras.Model(inp, x, name="tiny_mobilenet_v1")


@pytest.fixture(scope="module")
def own_file(tmp_path_factory):
    """The user's model file: trained 10 float epochs on 256 Fashion-MNIST images (about
    70% test accuracy)."""
    model = mobilenet_v1_like()
    x, y = data.load_arrays("fashion_mnist", "train", image_size=(SIZE, SIZE), limit=256,
                            seed=1)
    model.compile(keras.optimizers.Adam(0.003), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=32, epochs=10, verbose=0)
    path = tmp_path_factory.mktemp("own") / "my_cnn.keras"
    model.save(path)
    return path


def _weights_by_layer(model):
    return {layer.name: [w.numpy() for w in layer.weights] for layer in model.layers}


# ----------------------------------------------------------------------------- dgst train
def test_train_adapts_the_own_model_and_changes_only_the_updated_channels(own_file, tmp_path,
                                                                          capsys):
    out = tmp_path / "out"
    assert main(["train", "--model", str(own_file), *TRAIN, "--output-dir", str(out)]) == 0, \
        capsys.readouterr().err
    assert "at 32x32" in capsys.readouterr().out  # the size came from the file
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["model"] == str(own_file)
    assert 0 < result["updated_fraction"] <= 0.05 and 0 <= result["test_accuracy"] <= 1
    # what training started from: the file with BatchNorm folded, its head as the Dense it is
    start = training_form(fold_batchnorm(keras.models.load_model(own_file, compile=False)))
    trained = keras.models.load_model(out / "model.keras", compile=False)
    assert [l.name for l in trained.layers] == [l.name for l in start.layers]
    scheme = UpdateScheme.load(out / "scheme.json")
    selection = json.loads((out / "selection.json").read_text())["layers"]
    before, after = _weights_by_layer(start), _weights_by_layer(trained)
    classifier = find_classifier(start).name
    weight_updated = {n for n, u in scheme.layers.items() if u.updates_weights}
    assert weight_updated and weight_updated <= {"block1_pw", "block2_pw", "block3_pw"}
    moved = 0
    for name, weights in before.items():
        if name == classifier:  # trained whole
            assert all((a != b).any() for a, b in zip(weights, after[name]))
        elif name in weight_updated:  # only the input channels the selection updated
            changed = np.flatnonzero((weights[0] != after[name][0]).any(axis=(0, 1, 3)))
            updated = np.flatnonzero(np.asarray(selection[name]["updates"]) > 0)
            assert changed.size and set(changed) <= set(updated), name
            moved += changed.size
        elif name in scheme.layers:  # bias only: the kernel is bit-identical
            np.testing.assert_array_equal(weights[0], after[name][0], err_msg=name)
        else:  # frozen: every weight bit-identical
            for a, b in zip(weights, after[name]):
                np.testing.assert_array_equal(a, b, err_msg=name)
    assert moved > 0
    # the adapted model still ends in the user's softmax
    x, _ = data.load_arrays("fashion_mnist", "test", image_size=(SIZE, SIZE), limit=4)
    np.testing.assert_allclose(trained(x).numpy().sum(axis=-1), 1, atol=1e-5)


# ---------------------------------------------------------------------------- dgst device
def _device_images():
    """The train images the device run carves its parts from (calibration first)."""
    return data.load_arrays("fashion_mnist", "train", image_size=(SIZE, SIZE),
                            limit=16 + 24 + 16 + 3, seed=0)[0]


def _unpruned_file_bytes(path, folder) -> int:
    """The deployable training file of the unpruned model file, measured here."""
    model = fold_batchnorm(logits_model(keras.models.load_model(path, compile=False)))
    calibration = _device_images()[:16]
    scheme = dgsu_scheme(model, 2, 0.05, 0)
    written = export_deployable(model, scheme, calibration, folder / "unpruned.tflite",
                                **device_export_options(0.001, 0))
    return written.stat().st_size


@pytest.fixture(scope="module")
def device_run(own_file, tmp_path_factory):
    """(folder, report, flash budget, unpruned file bytes) of `dgst device --model` with a
    flash budget the unpruned model misses."""
    unpruned = _unpruned_file_bytes(own_file, tmp_path_factory.mktemp("measure"))
    budget = int(0.85 * unpruned) + ALLOWANCE
    folder = tmp_path_factory.mktemp("device") / "run"
    code = main(["device", "--model", str(own_file), *DEVICE, "--flash-budget", str(budget),
                 "--output-dir", str(folder)])
    assert code == 0
    return folder, json.loads((folder / "report.json").read_text()), budget, unpruned


def test_device_prunes_the_own_model_into_its_budgets(device_run, own_file):
    folder, report, budget, unpruned = device_run
    assert report["config"]["model"] == str(own_file) and report["config"]["image_size"] == SIZE
    prune, plan = report["prune"], report["plan"]
    assert prune["pruned"] and prune["unpruned_deployable_bytes"] == unpruned > budget - ALLOWANCE
    deployed = folder / "deploy_train.tflite"
    assert deployed.stat().st_size == plan["file_bytes"]
    assert deployed.stat().st_size + ALLOWANCE <= budget
    x, _ = data.load_arrays("fashion_mnist", "train", image_size=(SIZE, SIZE), limit=1)
    arena = train_tflm(deployed, x, np.array([0])).arena_bytes
    assert arena == plan["arena_bytes"] <= 256 * 1024
    # pruned.keras: the user's model, channels physically removed, in its logits form
    original = keras.models.load_model(own_file, compile=False)
    pruned = keras.models.load_model(folder / "pruned.keras", compile=False)
    assert pruned.count_params() < original.count_params()
    widths = {n: pruned.get_layer(n).filters for n in ("stem", "block1_pw", "block2_pw",
                                                       "block3_pw")}
    assert sum(widths.values()) < 16 + 32 + 48 + 64
    head = find_classifier(pruned)
    assert (head.name, head.kind, head.softmax) == ("conv_preds", "dense", None)
    assert pruned.get_layer("conv_preds").kernel.shape == (widths["block3_pw"], CLASSES)
    # training: within the weight budget every step, and TFLM continued it bit for bit
    train, check = report["train"], report["check"]
    assert 0 < max(train["steps"]["updated_fraction"]) <= 0.05
    assert check["channel_mismatches"] == [] and check["param_mismatches"] == {}
    assert check["params_moved"] > 0


def test_device_adapted_model_in_tflm_equals_the_keras_int8_simulation(device_run):
    folder, report, _, _ = device_run
    x, y = data.load_arrays("fashion_mnist", "test", image_size=(SIZE, SIZE), limit=40,
                            seed=0)
    path = folder / "adapted.tflite"
    _, parsed = read_tflite(path)
    codes = quantize(x, tensor_details(parsed, int(parsed.subgraphs[0].inputs[0])))
    tflm = run_inference_tflm(path, codes[:, None]).outputs[0].reshape(len(x), -1)
    folded = fold_batchnorm(keras.models.load_model(folder / "pruned.keras", compile=False))
    sim = device_int8.Int8Dgsu.build(folded, _device_images()[:16],
                                     UpdateScheme.load(folder / "scheme.json"),
                                     learning_rate=0.001, seed=0)
    device_int8.load_weights(sim.graph.model, folder / "trained_weights.npz")
    np.testing.assert_array_equal(tflm, sim.int8_logits(
        x, load_manifest(folder / "check_start.tflite")))
    assert len(np.unique(tflm)) > 10  # not a saturated, trivially equal output
    assert report["evaluate"]["test_accuracy"] == pytest.approx(float((tflm.argmax(1) ==
                                                                       y).mean()))
    assert report["evaluate"]["test_accuracy"] > 0.2  # the user's training carried over


# ------------------------------------------------------------------------------- refusals
def _keras3_file(folder):
    import keras as keras3  # TensorFlow 2.21's tf.keras

    model = keras3.Sequential([keras3.Input((SIZE, SIZE, 3)),
                               keras3.layers.Conv2D(4, 3, name="conv"),
                               keras3.layers.GlobalAveragePooling2D(),
                               keras3.layers.Dense(CLASSES, name="fc")])
    model.save(folder / "keras3.keras")
    return folder / "keras3.keras"


def _saved(model, folder, name):
    model.save(folder / name)
    return folder / name


BAD_MODELS = {
    "missing": (lambda folder: folder / "nowhere.keras", [r"nowhere\.keras", "no such file"]),
    "keras3": (_keras3_file, [r"keras3\.keras", "Keras 3", "TF_USE_LEGACY_KERAS=1"]),
    "unsupported_layer": (lambda folder: _saved(mobilenet_v1_like(extra=lambda x: (
        keras.layers.SeparableConv2D(16, 3, padding="same", name="sep"))(x)), folder,
        "separable.h5"), [r"separable\.h5", "layer 'sep'", "SeparableConv2D"]),
    "input_size": (lambda folder: _saved(mobilenet_v1_like(), folder, "small.keras"),
                   [r"small\.keras", "32x32x3", "--image-size is 64"]),
    "classes": (lambda folder: _saved(mobilenet_v1_like(classes=5), folder, "five.keras"),
                [r"five\.keras", "'conv_preds' has 5 outputs", "10 classes"]),
}


# plan and export read no dataset, federate's clients read it later: any number of classes
# is valid there
CASES = [(command, bad) for bad in BAD_MODELS
         for command in ("train", "device", "prune", "plan", "export", "federate")
         if not (bad == "classes" and command in ("plan", "export", "federate"))]


@pytest.mark.parametrize("command, bad", CASES)
def test_bad_model_files_are_refused_before_anything_is_written(command, bad, tmp_path,
                                                                 capsys):
    make, expected = BAD_MODELS[bad]
    path = make(tmp_path)
    out = tmp_path / "out"
    size = ["--image-size", "64"] if bad == "input_size" else []
    argv = {"train": ["train", *TRAIN, "--output-dir", str(out)],
            "device": ["device", *DEVICE, "--output-dir", str(out)],
            "prune": ["prune", "--dataset", "fashion_mnist", "--train-examples", "16",
                      "--test-examples", "16", "--epochs", "0", "--sparsity", "0.2",
                      "--output", str(out / "pruned.keras")],
            "plan": ["plan", "--output", str(out / "scheme.json"), "--evaluations", "10"],
            "export": ["export", "--dataset", "fashion_mnist", "--output",
                       str(out / "train.tflite")],
            "federate": ["federate", "--clients", "2", "--rounds", "1", "--train-examples",
                         "8", "--test-examples", "8", "--output-dir", str(out)]}[command]
    assert main([*argv, "--model", str(path), *size]) == 2
    message = capsys.readouterr().err
    assert f"dgst {command}: error:" in message
    for part in expected:
        assert re.search(part, message), (part, message)
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []


def plain_cnn(head="pool"):
    """A plain Sequential 3x3 CNN (no depthwise, no 1x1 conv): global average pooling
    (``head="pool"``) or Flatten (``"flatten"``), then a Dense classifier."""
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((SIZE, SIZE, 3)),
        keras.layers.Conv2D(16, 3, 2, activation="relu", name="c1"),
        keras.layers.Conv2D(32, 3, 2, activation="relu", name="c2"),
        keras.layers.Conv2D(48, 3, 2, activation="relu", name="c3"),
        keras.layers.GlobalAveragePooling2D(name="pool") if head == "pool"
        else keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(CLASSES, name="fc")], name="plain_cnn")


@pytest.mark.parametrize("head", ["pool", "flatten"])
def test_device_trains_a_plain_3x3_cnn_one_block_per_conv(head, tmp_path):
    """Without depthwise convs every Conv2D is a block: DGSU over the last 2 blocks updates
    the 3x3 convs c2 and c3 (through the Flatten too), the pruned file fits the flash budget
    the unpruned one misses, TFLM's arena is the planned one, and TFLM continued the
    training bit for bit."""
    path = _saved(plain_cnn(head), tmp_path, "plain.keras")
    unpruned = _unpruned_file_bytes(path, tmp_path)
    budget = int(0.85 * unpruned) + ALLOWANCE
    folder = tmp_path / "out"
    assert main(["device", "--model", str(path), *DEVICE, "--flash-budget", str(budget),
                 "--output-dir", str(folder)]) == 0
    report = json.loads((folder / "report.json").read_text())
    plan, check = report["plan"], report["check"]
    assert plan["layers"] == ["c2", "c3"] and report["prune"]["pruned"]
    deployed = folder / "deploy_train.tflite"
    assert deployed.stat().st_size == plan["file_bytes"] <= budget - ALLOWANCE < unpruned
    x, _ = data.load_arrays("fashion_mnist", "train", image_size=(SIZE, SIZE), limit=1)
    assert train_tflm(deployed, x, np.array([0])).arena_bytes == plan["arena_bytes"]
    assert 0 < max(report["train"]["steps"]["updated_fraction"]) <= 0.05
    assert check["channel_mismatches"] == [] and check["param_mismatches"] == {}
    assert check["params_moved"] > 0


@pytest.mark.parametrize("build, expected", [
    # a max pooling between the updated layers and the loss has no int8 backward
    (lambda: _with_max_pool(), [r"plain\.keras", "layer 'maxpool'", "MAX_POOL_2D",
                                "lies between the first updated layer"]),
])
def test_device_refuses_a_model_its_training_step_cannot_train_naming_the_layer(
        build, expected, tmp_path, capsys):
    path = _saved(build(), tmp_path, "plain.keras")
    out = tmp_path / "out"
    assert main(["device", "--model", str(path), *DEVICE, "--output-dir", str(out)]) == 2
    message = capsys.readouterr().err
    for part in expected:
        assert re.search(part, message), (part, message)
    assert not out.exists()


def _with_max_pool():
    keras.utils.set_random_seed(0)
    inp = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 3, 2, padding="same", activation="relu", name="stem")(inp)
    x = keras.layers.Conv2D(16, 1, activation="relu", name="expand")(x)
    x = keras.layers.Conv2D(24, 1, activation="relu", name="expand2")(x)
    x = keras.layers.MaxPooling2D(name="maxpool")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inp, keras.layers.Dense(CLASSES, name="fc")(x), name="max_pool_cnn")


def test_image_size_defaults_to_the_model_files(own_file, capsys, tmp_path):
    """``dgst plan --model f.h5`` without --image-size plans at the file's input size."""
    h5 = _saved(keras.models.load_model(own_file, compile=False), tmp_path, "my_cnn.h5")
    scheme = tmp_path / "scheme.json"
    assert main(["plan", "--model", str(h5), "--budget", "256KB", "--evaluations", "20",
                 "--output", str(scheme)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "input 32x32x3, 10 classes" in out and f"--model {h5}" in out
    assert UpdateScheme.load(scheme).layers  # a scheme over the file's layers
    assert set(UpdateScheme.load(scheme).layers) <= {layer.name for layer in
                                                     keras.models.load_model(h5).layers}


@pytest.mark.parametrize("softmax", [True, False])
def test_device_starts_from_the_logits_form_of_the_file(softmax, tmp_path):
    """With or without a softmax, the device pipeline starts from the file's logits: a Dense
    classifier with the 1x1 conv's weights, no softmax; the same function as the file."""
    from dgst_tf.core.keras_compat import tf
    from dgst_tf.jobs.device_pipeline import DeviceConfig, own_model

    original = mobilenet_v1_like(softmax=softmax)
    path = _saved(original, tmp_path, "head.keras")
    config = DeviceConfig(output_dir=str(tmp_path / "out"), model=str(path), image_size=SIZE,
                          blocks=2, target_fraction=0.05)
    model = own_model(config, CLASSES)
    head = find_classifier(model)
    assert (head.name, head.kind, head.softmax) == ("conv_preds", "dense", None)
    np.testing.assert_array_equal(model.get_layer("conv_preds").kernel.numpy(),
                                  original.get_layer("conv_preds").kernel.numpy()[0, 0])
    x = np.random.default_rng(0).uniform(-1, 1, (3, SIZE, SIZE, 3)).astype(np.float32)
    outputs = tf.nn.softmax(model(x)) if softmax else model(x)
    np.testing.assert_allclose(outputs, original(x), atol=1e-5)
    assert not (tmp_path / "out").exists()
