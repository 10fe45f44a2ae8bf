"""The training-step export (dgst_tf.export.training) in TFLM: one step against the Keras
int8 QAS simulation, loss going down over a few steps, writing the updated weights back into
an inference model, and clear errors for bad files, manifests and layers."""
import json

import numpy as np
import pytest

from small_models import batch, residual_cnn

from dgst_tf.core.bn_folding import fold_batchnorm
from dgst_tf.export.inference import reference_outputs
from dgst_tf.export.tflite_file import TfliteFileError
from dgst_tf.export.tflm.runner import run_tflm
from dgst_tf.export.training import (TrainingExportError, TrainingManifestError,
                                     export_training, initial_params, load_manifest,
                                     train_tflm,
                                     write_inference_model)
from dgst_tf.core.keras_compat import keras
from dgst_tf.training.int8_graph import int8_training_graph
from dgst_tf.training.qas import QuantizationAwareScalingSGD
from dgst_tf.training.scheme import UpdateScheme
from dgst_tf.training.sparse_model import SparseUpdateModel

LR = 0.05
SCHEME = {"head": "bias", "project": 0.5, "depthwise": "bias"}
LAYERS = ["depthwise", "project", "head", "classifier"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = fold_batchnorm(residual_cnn())
    x, y = batch(32)
    path = tmp_path_factory.mktemp("train") / "train.tflite"
    info = export_training(model, UpdateScheme(SCHEME), x, path, learning_rate=LR,
                           selection="first")
    return model, x, y, info


def test_manifest_describes_the_step(exported):
    _, _, _, info = exported
    m = info.manifest
    assert info.path.is_file() and info.manifest_path.is_file()
    assert load_manifest(info.path) == m
    assert [l["name"] for l in m["layers"]] == LAYERS
    assert {l["name"]: l["kept"] for l in m["layers"]}["project"] == list(range(6))
    assert m["outputs"][:2] == ["loss", "logits"]
    assert "project/weights" in m["outputs"] and "expand/bias" not in m["outputs"]
    # backward stops at the first updated layer: no input gradient of the depthwise conv
    assert "DGST_DEPTHWISE_INPUT_GRAD" not in m["custom_ops"]
    assert m["ops"]["CUSTOM:DGST_VARIABLE_INIT"] == len(m["params"]) == 6
    assert m["ops"]["CUSTOM:DGST_GATHER_CHANNELS"] == 1  # project's kept input channels


def test_the_file_holds_no_dead_data(exported):
    """Every constant buffer in the file is read by an op (or is a graph input / output):
    data the edits replaced (converter weights, requantized copies) is not flashed."""
    from dgst_tf.export.tflite_file import read_tflite

    _, _, _, info = exported
    _, model = read_tflite(info.path)
    graph = model.subgraphs[0]
    used = set(graph.inputs) | set(graph.outputs)
    for op in graph.operators:
        used |= {int(i) for i in list(op.inputs) + list(op.outputs) if i >= 0}
    live = {int(graph.tensors[i].buffer) for i in used} | {
        int(m.buffer) for m in model.metadata or []}  # the converter's version records
    dead = [b for b, buffer in enumerate(model.buffers)
            if buffer.data is not None and len(buffer.data) and b not in live]
    assert not dead, f"{sum(len(model.buffers[b].data) for b in dead)} bytes in {len(dead)} " \
                     f"buffers no op reads"


def test_one_step_matches_the_keras_int8_qas_simulation(exported):
    model, x, y, info = exported
    run = train_tflm(info.path, x[:1], y[:1])
    graph = int8_training_graph(model, x)
    sparse = SparseUpdateModel(graph.model, UpdateScheme(SCHEME), fold_bn=False)
    sparse.compile(optimizer=QuantizationAwareScalingSGD(LR, graph.qas_scales),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = {l: [v.numpy().copy() for v in graph.model.get_layer(l).weights] for l in LAYERS}
    keras_loss = sparse.train_on_batch(x[:1], y[:1])
    keras_loss = keras_loss[0] if isinstance(keras_loss, list) else keras_loss
    assert abs(run.losses[0] - keras_loss) < 0.02 * keras_loss
    for name in LAYERS:
        kernel, bias = [v.numpy() for v in graph.model.get_layer(name).weights]
        kernel0, bias0 = before[name]
        if f"{name}/weights" in run.params:
            to_tflite = (lambda k: k.transpose(3, 0, 1, 2)) if kernel.ndim == 4 else np.transpose
            w = run.params[f"{name}/weights"].astype(np.float64)
            assert np.abs(w - to_tflite(kernel)).max() <= 1.0, name  # within 1 LSB
            assert np.abs(w - np.round(to_tflite(kernel0))).max() >= 1, name  # it did move
        delta_tflm = run.params[f"{name}/bias"] - np.round(bias0)
        delta_keras = bias - bias0
        assert np.abs(delta_keras).max() > 100, name
        np.testing.assert_allclose(delta_tflm, delta_keras, rtol=0.02,
                                   atol=0.02 * np.abs(delta_keras).max(), err_msg=name)


def test_a_few_steps_reduce_the_loss_and_write_back(exported, tmp_path):
    _, x, y, info = exported
    epochs = 4
    run = train_tflm(info.path, np.concatenate([x[:16]] * epochs),
                     np.concatenate([y[:16]] * epochs))
    losses = run.losses.reshape(epochs, 16).mean(axis=1)
    assert losses[-1] < 0.9 * losses[0], losses
    assert run.arena_bytes > 0
    # the updated weights, written back, give exactly the next step's forward pass
    probe = x[20:21]
    steps = np.concatenate([x[:16]] * epochs)
    after = train_tflm(info.path, np.concatenate([steps, probe]),
                       np.concatenate([np.concatenate([y[:16]] * epochs), y[20:21]]))
    out = write_inference_model(info.path, run.params, tmp_path / "updated.tflite")
    spec = info.manifest["inputs"][0]
    q = np.clip(np.round(probe / spec["scale"]) + spec["zero_point"], -128, 127).astype(np.int8)
    logits = run_tflm(out, [q]).outputs[0]
    np.testing.assert_array_equal(logits[0], after.logits[-1])
    np.testing.assert_array_equal(logits, reference_outputs(out, [q])[0])
    # and the initial values give the first step's forward pass
    before = write_inference_model(info.path, initial_params(info.path), tmp_path / "b.tflite")
    q0 = np.clip(np.round(x[:1] / spec["scale"]) + spec["zero_point"], -128, 127)
    first = run_tflm(before, [q0.astype(np.int8)]).outputs[0]
    np.testing.assert_array_equal(first[0], run.logits[0])


def test_bad_files_and_manifests_give_clear_errors(exported, tmp_path):
    _, x, y, info = exported
    data = info.path.read_bytes()
    truncated = tmp_path / "train.tflite"
    truncated.write_bytes(data[: len(data) // 2])
    (tmp_path / "train.json").write_text(info.manifest_path.read_text())
    with pytest.raises(TfliteFileError, match=r"train.tflite"):
        train_tflm(truncated, x[:1], y[:1])
    truncated.write_bytes(data)
    manifest = json.loads(info.manifest_path.read_text())
    manifest["sha256"] = "0" * 64
    (tmp_path / "train.json").write_text(json.dumps(manifest))
    with pytest.raises(TrainingManifestError, match=r"train.json: SHA-256 does not match"):
        train_tflm(truncated, x[:1], y[:1])
    (tmp_path / "train.json").write_text("{not json")
    with pytest.raises(TrainingManifestError, match=r"train.json: not valid JSON"):
        load_manifest(truncated)
    del manifest["params"]
    (tmp_path / "train.json").write_text(json.dumps(manifest))
    with pytest.raises(TrainingManifestError, match=r"field 'params' is missing"):
        load_manifest(truncated)
    (tmp_path / "train.json").unlink()
    with pytest.raises(TrainingManifestError, match=r"no such file"):
        load_manifest(truncated)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
        train_tflm(info.path, x[:1], [7])
    with pytest.raises(ValueError, match=r"images must have shape \(N, 8, 8, 3\)"):
        train_tflm(info.path, x[:1, :4], y[:1])


def test_unsupported_layer_is_named(tmp_path):
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inp)
    h = keras.layers.MaxPooling2D(2, name="maxpool")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    out = keras.layers.Dense(3, name="fc")(h)
    model = keras.Model(inp, out)
    x = np.random.default_rng(0).normal(size=(8, 8, 8, 3)).astype(np.float32)
    with pytest.raises(TrainingExportError, match=r"MAX_POOL_2D.*lies between the first "
                                                  r"updated layer 'conv' and the loss"):
        export_training(model, UpdateScheme({"conv": "bias"}), x, tmp_path / "t.tflite")
    assert not (tmp_path / "t.tflite").exists()
    # the same model trains when only the classifier is updated
    info = export_training(model, UpdateScheme({}), x, tmp_path / "t.tflite")
    assert [l["name"] for l in info.manifest["layers"]] == ["fc"]


def test_folding_pads_into_same_convs_is_exact(exported, tmp_path):
    model, x, y, info = exported
    assert info.manifest["folded_pads"] == 1 and "PAD" not in info.ops  # PAD before 'head'
    plain = export_training(model, UpdateScheme(SCHEME), x, tmp_path / "plain.tflite",
                            learning_rate=LR, selection="first", fold_pads=False)
    assert plain.ops["PAD"] == 1
    a = train_tflm(info.path, x[:4], y[:4])
    b = train_tflm(plain.path, x[:4], y[:4])
    np.testing.assert_array_equal(a.losses, b.losses)
    for key in a.params:
        np.testing.assert_array_equal(a.params[key], b.params[key])
    assert a.arena_bytes < b.arena_bytes


@pytest.mark.parametrize("policy", ["traversal", "magnitude", "window"])
def test_dynamic_selection_on_device(exported, tmp_path, policy):
    model, x, y, _ = exported
    info = export_training(model, UpdateScheme(SCHEME), x, tmp_path / "dyn.tflite",
                           learning_rate=LR, policy=policy)
    assert info.manifest["policy"] == policy
    assert "project/kept" in info.manifest["outputs"]
    assert info.ops["CUSTOM:DGST_SELECT_CHANNELS"] == 1
    start = initial_params(info.path)
    one = train_tflm(info.path, x[:1], y[:1])
    three = train_tflm(info.path, x[:3], y[:3])
    kept = three.kept["project/kept"]
    assert kept.shape == (3, 6)
    if policy == "window":
        np.testing.assert_array_equal(kept, [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11],
                                             [0, 1, 2, 3, 4, 5]])
    if policy == "traversal":  # one sweep of two steps covers the 12 channels
        assert sorted(kept[:2].ravel().tolist()) == list(range(12))
        layer = next(l for l in info.manifest["layers"] if l["name"] == "project")
        assert layer["selection_state_bytes"] == 2 and layer["policy"] == "traversal"
    # one step changes only the input channels chosen for it
    moved = np.abs(one.params["project/weights"].astype(int)
                   - start["project/weights"].astype(int)).reshape(-1, 12).max(axis=0)
    assert set(np.flatnonzero(moved).tolist()) <= set(one.kept["project/kept"][0].tolist())
    assert moved.any()


def test_depthwise_stride2_pad_folding_is_exact(tmp_path):
    """PAD(1) + 3x3 stride-2 VALID depthwise (MobileNetV2's downsampling) becomes a 4x4 SAME
    depthwise with zero taps: same losses and updates, no PAD op, smaller arena."""
    inp = keras.Input((10, 10, 3))
    h = keras.layers.Conv2D(8, 1, activation="relu6", name="pw")(inp)
    h = keras.layers.ZeroPadding2D(1, name="pad")(h)
    h = keras.layers.DepthwiseConv2D(3, strides=2, activation="relu6", name="dw")(h)
    h = keras.layers.Conv2D(6, 1, name="project")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    model = keras.Model(inp, keras.layers.Dense(3, name="fc")(h))
    x = np.random.default_rng(1).normal(size=(12, 10, 10, 3)).astype(np.float32)
    y = np.arange(12) % 3
    scheme = UpdateScheme({"dw": "bias", "project": 0.5, "pw": "bias"})
    runs = []
    for fold in (True, False):
        info = export_training(model, scheme, x, tmp_path / f"f{fold}.tflite", learning_rate=LR,
                               fold_pads=fold)
        assert ("PAD" in info.ops) != fold
        runs.append(train_tflm(info.path, x[:4], y[:4]))
    np.testing.assert_array_equal(runs[0].losses, runs[1].losses)
    for key in runs[0].params:
        np.testing.assert_array_equal(runs[0].params[key], runs[1].params[key])
    assert runs[0].arena_bytes < runs[1].arena_bytes


def test_kept_weights_in_ram_is_exact_and_smaller(tmp_path):
    """Only the kept input channels' weights as RAM variables (conv and depthwise, the
    full kernels assembled by DGST_SCATTER_CHANNELS before the forward conv and the input
    gradient) trains exactly as whole-kernel variables, in less arena."""
    model = fold_batchnorm(residual_cnn())
    x, y = batch(16)
    scheme = UpdateScheme({"expand": "bias", "depthwise": 0.5, "project": 0.5, "head": 0.25})
    infos, runs = [], []
    for compact in (True, False):
        info = export_training(model, scheme, x, tmp_path / f"k{compact}.tflite",
                               learning_rate=LR, kept_weights_in_ram=compact)
        infos.append(info)
        runs.append(train_tflm(info.path, x[:6], y[:6]))
    shapes = {f"{p['layer']}/{p['param']}": p["shape"] for p in infos[0].manifest["params"]}
    assert shapes["head/weights"] == [16, 3, 3, 2] and shapes["depthwise/weights"] == [1, 3, 3, 6]
    # before each forward conv and each input gradient (all three pass the gradient on)
    assert infos[0].ops["CUSTOM:DGST_SCATTER_CHANNELS"] == 3 + 3
    assert "CUSTOM:DGST_SCATTER_CHANNELS" not in infos[1].ops
    np.testing.assert_array_equal(runs[0].losses, runs[1].losses)
    for key in runs[1].params:
        np.testing.assert_array_equal(runs[0].params[key], runs[1].params[key], err_msg=key)
    kept = next(p["kept"] for p in infos[0].manifest["params"] if p["layer"] == "head"
                and p["param"] == "weights")
    moved = runs[0].params["head/weights"] != initial_params(infos[0].path)["head/weights"]
    assert moved[..., kept].any() and not np.delete(moved, kept, axis=-1).any()
    assert runs[0].result.allocations["TfLiteTensor variable buffer data"] < \
        runs[1].result.allocations["TfLiteTensor variable buffer data"]
    out = [write_inference_model(info.path, run.params, tmp_path / f"u{n}.tflite")
           for n, (info, run) in enumerate(zip(infos, runs))]
    spec = infos[0].manifest["inputs"][0]
    q = np.clip(np.round(x[8:10] / spec["scale"]) + spec["zero_point"], -128, 127)
    q = q.astype(np.int8)[:, None]
    np.testing.assert_array_equal(run_tflm(out[0], [q]).outputs[0],
                                  run_tflm(out[1], [q]).outputs[0])
    # a manifest whose kept channels do not fit the kernel is refused, naming the entry
    manifest = json.loads(infos[0].manifest_path.read_text())
    entry = next(p for p in manifest["params"] if "flash" in p)
    entry["kept"] = entry["kept"][:-1] + [999]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(manifest))
    with pytest.raises(TrainingManifestError, match=r"parameter entry .*'kept'"):
        initial_params(infos[0].path, manifest=bad)


def test_the_training_subpackage_keeps_every_name_of_the_old_module():
    import dgst_tf.export.training as training

    old_names = ["export_training", "TrainingExport", "TrainingExportError",
                 "TrainingManifestError", "train_tflm", "TrainingRun", "load_manifest",
                 "write_inference_model", "initial_params", "run_inference_tflm",
                 "manifest_path_for", "MANIFEST_FORMAT", "MANIFEST_VERSION"]
    assert [name for name in old_names if getattr(training, name, None) is None] == []


def test_magnitude_selection_is_the_reference_top_k_of_real_weights():
    """The export's static "magnitude" choice is the NumPy reference's top-k (one oracle)."""
    from dgst_tf.export.tflite_editor import ModelEditor
    from dgst_tf.export.tflite_file import schema
    from dgst_tf.export.training.plan import select_kept_channels
    from dgst_tf.tflm_ops.reference import top_k_channels

    rng = np.random.default_rng(3)
    weights = rng.integers(-127, 128, (5, 3, 3, 8)).astype(np.int8)
    scales = rng.uniform(0.01, 0.1, 5).astype(np.float32)
    model = schema.ModelT()  # an empty graph holding just the conv kernel
    model.subgraphs = [schema.SubGraphT()]
    editor = ModelEditor(model)
    w = editor.add_tensor("w", weights.shape, np.int8, data=weights, scale=scales)
    op = schema.OperatorT()
    op.inputs = [-1, w]
    kept = select_kept_channels(editor, op, "conv", "conv", 3, "magnitude", "test")
    real = weights.astype(np.float64) * scales.reshape(-1, 1, 1, 1)
    np.testing.assert_array_equal(kept, top_k_channels(real, 3))
    norms = np.sqrt((real ** 2).sum(axis=(0, 1, 2)))
    assert sorted(kept.tolist()) == sorted(np.argsort(-norms)[:3].tolist())


# ----------------------------------------------------------------------------- DGSU oracle
ORACLE_SCHEME = {"depthwise": 0.25, "project": 0.25, "head": 0.25}
ORACLE_KINDS = {"depthwise": True, "project": False, "head": False}  # depthwise?


def _tensor_by_name(path, name):
    from dgst_tf.export.tflite_editor import ModelEditor
    from dgst_tf.export.tflite_file import read_tflite

    editor = ModelEditor(read_tflite(path)[1])
    index = next(i for i in range(len(editor.subgraph.tensors)) if editor.name(i) == name)
    return np.array(editor.data(index))


def _keras_kernel(w, depthwise):
    """TFLite OHWI / 1HWC int8 weights -> the Keras kernel layout (HWIO / HWC1), float."""
    w = np.asarray(w, np.float32)
    return w[0][..., None] if depthwise else w.transpose(1, 2, 3, 0)


def replay_dgsu(run, path, steps):
    """Per step and layer: the channels the NumPy reference and the Keras definition
    (`dgsu_select` of `int8_channel_scores`) choose from the state and the weights the TFLM
    run had at that step; asserts both equal TFLM's choice. Returns the steps in which
    some weight-updated layer's weights changed."""
    from dgst_tf.core.keras_compat import tf
    from dgst_tf.tflm_ops import reference as R
    from dgst_tf.training.channel_importance import int8_channel_scores
    from dgst_tf.training.selection import dgsu_select

    names = run.manifest["outputs"]
    start = initial_params(path)
    moved = 0
    for layer, depthwise in ORACLE_KINDS.items():
        m = _tensor_by_name(path, f"{layer}/selection_multipliers")
        chosen = run.kept[f"{layer}/kept"]
        per_step = run.result.outputs[names.index(f"{layer}/weights")]
        k, channels = chosen.shape[1], start[f"{layer}/weights"].shape[-1]
        mask, sweep = np.zeros((channels + 7) // 8, np.uint8), tf.zeros([channels], tf.bool)
        w = start[f"{layer}/weights"]
        for s in range(steps):
            want, mask = R.select_channels(w, m, k, depthwise, mask)
            scores = int8_channel_scores(_keras_kernel(w, depthwise), m, depthwise)
            keras_kept, sweep = dgsu_select(scores, k, sweep, traversal=True)
            np.testing.assert_array_equal(chosen[s], want, err_msg=f"{layer} step {s}: TFLM")
            np.testing.assert_array_equal(keras_kept.numpy(), want,
                                          err_msg=f"{layer} step {s}: Keras")
            moved += int((per_step[s] != w).any())
            w = per_step[s]
    return moved


def test_dgsu_traversal_tflm_equals_keras_and_reference_every_step(tmp_path):
    """Oracle: 200 TFLM steps of policy "traversal" on 3 weight-updated layers choose, at
    every step, the channels the NumPy reference and the Keras definition choose from the
    same visited state and the same (updated) weights."""
    model = fold_batchnorm(residual_cnn())
    x, y = batch(200, seed=3)
    info = export_training(model, UpdateScheme(ORACLE_SCHEME), x[:32],
                           tmp_path / "dgsu.tflite", learning_rate=0.5, policy="traversal")
    assert info.ops["CUSTOM:DGST_SELECT_CHANNELS"] == 3
    run = train_tflm(info.path, x, y)
    moved = replay_dgsu(run, info.path, 200)
    assert moved >= 20  # the weights (hence the importances) really change during the run
    for layer in ORACLE_KINDS:  # every sweep covers every channel
        kept = run.kept[f"{layer}/kept"]
        channels = initial_params(info.path)[f"{layer}/weights"].shape[-1]
        steps = -(-channels // kept.shape[1])
        assert set(kept[:steps].ravel().tolist()) == set(range(channels))


def test_keras_dgsu_callback_uses_the_device_integer_score(tmp_path):
    """The callback on the int8 training graph ranks with the device's integer score: its
    multipliers equal the exported graph's, and over 30 steps (learning rate 0: fixed
    weights) it chooses what the reference chooses, sweep after sweep."""
    from dgst_tf.core.layer_kinds import kernel_of
    from dgst_tf.tflm_ops import reference as R
    from dgst_tf.training.selection import DynamicChannelSelection, int8_multipliers

    model = fold_batchnorm(residual_cnn())
    x, y = batch(30, seed=4)
    info = export_training(model, UpdateScheme(ORACLE_SCHEME), x, tmp_path / "k.tflite",
                           learning_rate=LR, policy="traversal")
    graph = int8_training_graph(model, x)
    sparse = SparseUpdateModel(graph.model, UpdateScheme(ORACLE_SCHEME), fold_bn=False)
    sparse.compile(optimizer=QuantizationAwareScalingSGD(0.0, graph.qas_scales),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callback = DynamicChannelSelection("weight_l2", traversal=True)
    assert callback.device_policy == "traversal"
    chosen = {layer: [] for layer in ORACLE_KINDS}

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            for layer in ORACLE_KINDS:
                chosen[layer].append(sparse.selection.numpy(layer)["indices"].copy())

    sparse.fit(x, y, batch_size=1, epochs=1, verbose=0, callbacks=[callback, Record()])
    for layer, depthwise in ORACLE_KINDS.items():
        m = int8_multipliers(sparse, graph.model.get_layer(layer))
        np.testing.assert_array_equal(m, _tensor_by_name(info.path,
                                                         f"{layer}/selection_multipliers"))
        kernel = kernel_of(graph.model.get_layer(layer)).numpy()
        w = kernel[..., 0][None] if depthwise else kernel.transpose(3, 0, 1, 2)
        mask = np.zeros((w.shape[-1] + 7) // 8, np.uint8)
        for s, got in enumerate(chosen[layer]):
            want, mask = R.select_channels(w, m, len(got), depthwise, mask)
            np.testing.assert_array_equal(got, want, err_msg=f"{layer} step {s}")


def test_export_refuses_a_callback_without_device_equivalent(exported, tmp_path):
    from dgst_tf.training.selection import DynamicChannelSelection, WindowChannelSelection

    model, x, _, _ = exported
    with pytest.raises(TrainingExportError, match="layers_per_step=2 but the policy callback "
                                                  "has layers_per_step=1"):
        export_training(model, UpdateScheme(SCHEME), x, tmp_path / "a.tflite",
                        policy=DynamicChannelSelection(layers_per_step=1), layers_per_step=2)
    with pytest.raises(TrainingExportError, match="importance 'grad_norm'"):
        export_training(model, UpdateScheme(SCHEME), x, tmp_path / "b.tflite",
                        policy=DynamicChannelSelection("grad_norm"))
    info = export_training(model, UpdateScheme(SCHEME), x, tmp_path / "c.tflite",
                           policy=WindowChannelSelection())
    assert info.manifest["policy"] == "window"


def test_keras_static_selection_on_the_int8_graph_is_the_exporters(tmp_path):
    """Lin's static choice: `StaticChannelSelection("magnitude+")` on the int8 training graph
    keeps exactly the channels the exporter's static "magnitude" selection keeps (both rank
    the real weights, int8 codes x scale, by the NumPy reference). Ranking the raw codes
    instead (a plausible slip: the scales differ per output channel) picks others."""
    from dgst_tf.training.selection import StaticChannelSelection

    model = fold_batchnorm(residual_cnn(seed=3))
    x, _ = batch(16)
    scheme = UpdateScheme({"depthwise": 0.25, "project": 0.5, "head": 0.25})
    info = export_training(model, scheme, x, tmp_path / "static.tflite", selection="magnitude")
    exported = {l["name"]: l["kept"] for l in info.manifest["layers"]}
    graph = int8_training_graph(model, x)
    sparse = SparseUpdateModel(graph.model, scheme, fold_bn=False)
    sparse.compile(optimizer=QuantizationAwareScalingSGD(LR, graph.qas_scales),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callback = StaticChannelSelection("magnitude+")
    callback.set_model(sparse)
    callback.on_train_begin()
    for name in ("depthwise", "project", "head"):
        keras_kept = sorted(int(c) for c in sparse.selection.vars[name]["indices"].numpy())
        assert keras_kept == exported[name], name
