"""The layer schedule (``layers_per_step``, DGSU's stage-aware layer choice): one rule,
`reference.layer_active`, in the C core (``dgst_layer_active``), the TFLM ops (weight
gradient skipped, weights and visited channels left alone at inactive steps, the position
in the persistent step counter ``sgd/step``) and the Keras callback
(`DynamicChannelSelection(layers_per_step=n)`), which choose the same layers and channels
at every step of a real training run."""
import ctypes

import numpy as np
import pytest

from small_models import batch, residual_cnn

from dgst_tf.core.bn_folding import fold_batchnorm
from dgst_tf.core.keras_compat import keras
from dgst_tf.core.layer_kinds import kernel_of
from dgst_tf.core.tflite_builder import ModelBuilder, int32_options
from dgst_tf.export.tflm.ops_loader import host_ops
from dgst_tf.export.tflm.runner import TflmError, run_tflm
from dgst_tf.export.training import (TrainingExportError, export_training, initial_params,
                                     train_tflm)
from dgst_tf.planning.memory import MemoryModel
from dgst_tf.tflm_ops import host as H
from dgst_tf.tflm_ops import reference as R
from dgst_tf.training.int8_graph import int8_training_graph
from dgst_tf.training.qas import QuantizationAwareScalingSGD
from dgst_tf.training.scheme import UpdateScheme
from dgst_tf.training.selection import DynamicChannelSelection
from dgst_tf.training.sparse_model import SparseUpdateModel

SCHEME = {"depthwise": 0.25, "project": 0.25, "head": 0.25}
LAYERS = ["depthwise", "project", "head"]  # the weight-updated layers, execution order
DEPTHWISE = {"depthwise": True, "project": False, "head": False}
STEPS = 30
LR = 0.5  # large, so that an active layer's int8 weights move at every step


@pytest.fixture(scope="module")
def K():
    return H.Kernels(H.build())


def _layer_active_c(K, step, layer, layers, per_step) -> bool:
    K.lib.dgst_layer_active.argtypes = [ctypes.c_uint32] + [ctypes.c_int32] * 3
    K.lib.dgst_layer_active.restype = ctypes.c_int32
    return bool(K.lib.dgst_layer_active(step, layer, layers, per_step))


# ----------------------------------------------------------------------------- the rule
CASES = [(1, 1), (3, 1), (3, 2), (3, 3), (5, 2), (6, 4), (7, 3), (4, 9)]  # (layers, per_step)


@pytest.mark.parametrize("layers,per_step", CASES)
def test_c_core_equals_the_reference_at_every_step(K, layers, per_step):
    """dgst_layer_active == reference.layer_active over 3 * 7 * layers steps and near the
    end of the uint32 counter; per_step layers per step, in turn from layer 0, each one
    active per_step times in every window of `layers` steps (all of them when
    per_step >= layers, and a single layer always)."""
    steps = list(range(21 * layers)) + [2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1]
    table = np.array([[R.layer_active(s, i, layers, per_step) for i in range(layers)]
                      for s in steps], bool)
    for row, s in zip(table, steps):
        for i in range(layers):
            assert _layer_active_c(K, s, i, layers, per_step) == row[i], (s, i)
    assert (table.sum(axis=1) == min(per_step, layers)).all()
    first = table[:layers]
    assert (first.sum(axis=0) == min(per_step, layers)).all()
    assert first[0].tolist() == [i < per_step for i in range(layers)]
    if per_step < layers:  # step 1 continues where step 0 stopped
        assert first[1].tolist() == [(i - per_step) % layers < per_step
                                     for i in range(layers)]


def test_the_rule_works_on_arrays_and_checks_its_arguments():
    steps = np.arange(12)
    np.testing.assert_array_equal(R.layer_active(steps, 2, 4, 1), steps % 4 == 2)
    assert R.layer_active(5, 0, 3, None) is True
    for bad in ((0, 3, 3, 0), (0, 3, 3, 1), (0, -1, 3, 1)):
        with pytest.raises(ValueError, match="layer schedule"):
            R.layer_active(bad[0], bad[1], bad[2], bad[3])


def test_an_inactive_selection_chooses_the_same_and_marks_nothing(K):
    """dgst_select_ranked_scheduled == reference.select_ranked(active=...) over a random
    activity pattern, across finished sweeps restarting at inactive steps too."""
    i32p, i64p, u8p = (ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_int64),
                       ctypes.POINTER(ctypes.c_uint8))
    K.lib.dgst_select_ranked_scheduled.argtypes = [i64p, ctypes.c_int32, ctypes.c_int32, u8p,
                                                   ctypes.c_int32, i32p]
    rng = np.random.default_rng(5)
    c_in, k = 11, 4
    scores = rng.integers(0, 50, c_in).astype(np.int64)
    mask = np.zeros(2, np.uint8)
    restarted_inactive = 0
    for step in range(40):
        active = bool(rng.integers(0, 2))
        want, want_mask = R.select_ranked(scores, k, mask, active)
        got, work = np.zeros(k, np.int32), scores.copy()
        full = np.unpackbits(mask, bitorder="little")[:c_in].all()
        K.lib.dgst_select_ranked_scheduled(work.ctypes.data_as(i64p), c_in, k,
                                           mask.ctypes.data_as(u8p), int(active),
                                           got.ctypes.data_as(i32p))
        np.testing.assert_array_equal(got, want, err_msg=f"step {step}")
        np.testing.assert_array_equal(mask, want_mask, err_msg=f"step {step}")
        restarted_inactive += full and not active
    assert restarted_inactive > 0
    _, unmarked = R.select_ranked(scores, k, np.zeros(2, np.uint8), active=False)
    assert not unmarked.any()


# ----------------------------------------------------------------------------- TFLM ops
def _op_graph(path, kind, layer, layers, per_step, data):
    """select (traversal) -> weight gradient -> update of a weight variable, the three
    scheduled as `layer` of `layers`, the update counting the step; returns the path."""
    b = ModelBuilder()
    w0, m, ws = data["w"], data["m"], data["ws"]
    k = data["x"].shape[-1]
    words = (layer, layers, per_step)
    depthwise = kind == "depthwise"
    t_x = b.add_tensor("x_kept", data["x"].shape[1:], np.int8)
    t_dy = b.add_tensor("dy", data["dy"].shape[1:], np.int8)
    t_w = b.add_tensor("w", w0.shape, np.int8, variable=True, scale=ws,
                       zero_point=[0] * len(ws), quantized_dimension=3 if depthwise else 0)
    t_w0 = b.add_tensor("w0", w0.shape, np.int8, data=w0)
    t_m = b.add_tensor("m", m.shape, np.int32, data=m)
    t_ws = b.add_tensor("ws", ws.shape, np.float32, data=ws)
    t_s = b.add_tensor("dy_scale", (1,), np.float32, data=np.array([0.01], np.float32))
    t_step = b.add_tensor("step", (1,), np.int32, variable=True)
    visited = b.add_tensor("visited", ((w0.shape[-1] + 7) // 8,), np.uint8, variable=True)
    kept = b.add_tensor("kept", (k,), np.int32)
    grad = b.add_tensor("grad", (3, 3, k) if depthwise else (w0.shape[0], 1, 1, k), np.int32)
    b.add_custom_op("DGST_VARIABLE_INIT", [t_w, t_w0], [])
    b.add_custom_op("DGST_SELECT_CHANNELS", [t_w, t_m, visited, t_step], [kept],
                    int32_options(2, int(depthwise), *words))
    geometry = (1, 1, 1, 1, 1 if depthwise else 0, 1 if depthwise else 0, -3)
    if depthwise:
        b.add_custom_op("DGST_DEPTHWISE_WEIGHT_GRAD", [t_x, kept, t_dy, t_step], [grad],
                        int32_options(*geometry, *words))
    else:
        b.add_custom_op("DGST_CONV2D_WEIGHT_GRAD", [t_x, t_dy, t_step], [grad],
                        int32_options(*geometry, *words))
    b.add_custom_op("DGST_SGD_QAS_UPDATE", [t_w, grad, kept, t_ws, t_s, t_step, -1], [],
                    int32_options(int(depthwise), 2.0, 0.05, 0, 0, 0, 0, 1, *words))
    path.write_bytes(b.build([t_x, t_dy], [grad, t_w, kept, t_step]))
    return path


@pytest.mark.parametrize("kind", ["conv", "depthwise"])
def test_tflm_ops_follow_the_schedule_across_invokes(tmp_path, kind):
    """Layer 1 of 3, one per step: active at steps 1, 4, 7 only. Then the selection marks its
    channels, the weight gradient is computed and the weights move, as in the reference;
    otherwise the gradient is not even computed (its output is not written), nothing is
    marked and the weights stay. The step counter persists and counts every Invoke."""
    rng = np.random.default_rng(11 if kind == "conv" else 12)
    steps, c_in, k = 9, 8, 3
    depthwise = kind == "depthwise"
    shape = (1, 3, 3, c_in) if depthwise else (5, 1, 1, c_in)
    data = {"w": rng.integers(-100, 101, shape).astype(np.int8),
            "x": rng.integers(-128, 128, (steps, 1, 4, 4, k)).astype(np.int8),
            "dy": rng.integers(-127, 128, (steps, 1, 4, 4, c_in if depthwise else 5)
                               ).astype(np.int8)}
    data["ws"] = rng.uniform(0.01, 0.02, shape[-1] if depthwise else 5).astype(np.float32)
    data["m"] = R.score_multipliers(data["ws"])
    path = _op_graph(tmp_path / f"{kind}.tflite", kind, 1, 3, 1, data)
    ops = host_ops()
    grad, w, kept, step = run_tflm(path, [data["x"], data["dy"]], libraries=[ops.library],
                                   registerers=ops.registerers).outputs
    want_w, mask = data["w"], np.zeros(1, np.uint8)
    g = R.Geometry.conv(4, 4, 3 if depthwise else 1)
    for s in range(steps):
        active = R.layer_active(s, 1, 3, 1)
        assert active == (s % 3 == 1)
        want_kept, mask = R.select_channels(want_w, data["m"], k, depthwise, mask, active)
        np.testing.assert_array_equal(kept[s], want_kept, err_msg=f"step {s}")
        x, dy = data["x"][s][0], data["dy"][s][0]
        want_grad = (R.depthwise_weight_grad(g, x, want_kept, -3, dy) if depthwise
                     else R.conv2d_weight_grad(g, x, -3, dy))
        if active:
            np.testing.assert_array_equal(grad[s], want_grad, err_msg=f"step {s}")
            update = R.sgd_qas_update_depthwise if depthwise else R.sgd_qas_update_conv
            want_w = update(want_w, want_kept, want_grad, 2.0, 0.05, np.float32(0.01),
                            data["ws"])
            assert (want_w != w[s - 1]).any()  # the update is not trivial
        else:  # the output buffer holds whatever the arena had there (scratch of the
            # selection, an earlier gradient): not this step's gradient
            assert not np.array_equal(grad[s], want_grad), f"step {s}: computed"
        np.testing.assert_array_equal(w[s], want_w, err_msg=f"step {s}")
        assert step[s][0] == s + 1


@pytest.mark.parametrize("words,message", [
    ((3, 3, 1), "invalid layer schedule: layer 3 of 3"),
    ((0, 3, 3), "invalid layer schedule: layer 0 of 3 .at most 255., 3 per step"),
    ((0, 300, 1), "invalid layer schedule: layer 0 of 300 .at most 255."),
])
def test_bad_schedule_words_are_refused(tmp_path, words, message):
    rng = np.random.default_rng(1)
    data = {"w": rng.integers(-100, 101, (5, 1, 1, 8)).astype(np.int8),
            "x": np.zeros((1, 1, 4, 4, 3), np.int8), "dy": np.zeros((1, 1, 4, 4, 5), np.int8),
            "ws": np.full(5, 0.01, np.float32)}
    data["m"] = R.score_multipliers(data["ws"])
    path = _op_graph(tmp_path / "bad.tflite", "conv", *words, data)
    ops = host_ops()
    with pytest.raises(TflmError, match=f"DGST_SELECT_CHANNELS: {message}"):
        run_tflm(path, [data["x"], data["dy"]], libraries=[ops.library],
                 registerers=ops.registerers)


def test_a_bias_update_and_a_magnitude_selection_take_no_schedule(tmp_path):
    ops = host_ops()
    for op, inputs, options, message in [
        ("DGST_SGD_QAS_UPDATE", "bias", int32_options(2, 0.1, 0.05, 0, 0, 0, 0, 0, 0, 2, 1),
         "a bias update has no layer schedule"),
        ("DGST_SELECT_CHANNELS", "select", int32_options(1, 0, 0, 2, 1),
         r"a layer schedule needs policy 2 \(traversal\)")]:
        b = ModelBuilder()
        t_in = b.add_tensor("in", (1,), np.float32)
        t_step = b.add_tensor("step", (1,), np.int32, variable=True)
        if inputs == "bias":
            t_b = b.add_tensor("b", (2,), np.int32, variable=True)
            t_g = b.add_tensor("g", (2,), np.int32, data=np.ones(2, np.int32))
            t_ws = b.add_tensor("ws", (2,), np.float32, data=np.ones(2, np.float32))
            b.add_custom_op(op, [t_b, t_g, -1, t_ws, t_in, t_step, -1], [], options)
            outputs = [t_b]
        else:
            t_w = b.add_tensor("w", (2, 1, 1, 4), np.int8, data=np.ones((2, 1, 1, 4), np.int8))
            t_m = b.add_tensor("m", (2,), np.int32, data=np.ones(2, np.int32))
            kept = b.add_tensor("kept", (2,), np.int32)
            b.add_custom_op(op, [t_w, t_m, -1, t_step], [kept], options)
            outputs = [kept]
        path = tmp_path / f"{inputs}.tflite"
        path.write_bytes(b.build([t_in], outputs))
        with pytest.raises(TflmError, match=f"{op}: {message}"):
            run_tflm(path, [np.ones((1, 1), np.float32)], libraries=[ops.library],
                     registerers=ops.registerers)


# ----------------------------------------------------------------------------- Keras = TFLM
def _to_keras(w, depthwise):
    """TFLite OHWI / [1, kh, kw, C] int8 weights -> the Keras kernel (HWIO / HWC1)."""
    w = np.asarray(w, np.float32)
    return w[0][..., None] if depthwise else w.transpose(1, 2, 3, 0)


@pytest.fixture(scope="module")
def model_and_data():
    model = fold_batchnorm(residual_cnn())
    calibration, _ = batch(32)
    x, y = batch(STEPS, seed=3)
    return model, calibration, x, y


@pytest.mark.parametrize("per_step", [1, 2])
def test_keras_and_tflm_update_the_same_layers_and_channels_every_step(model_and_data,
                                                                      tmp_path, per_step):
    """Oracle: 30 steps of `DynamicChannelSelection(layers_per_step=n)` on the Keras int8
    simulation and of its export in TFLM. Before each Keras step its kernels are set to
    TFLM's weights of that moment (float and int8 forward passes round gradients apart, so
    free-running weights drift; the schedule and the channel choice must not). At every
    step both activate the layers of `reference.layer_active`, choose the same channels in
    every layer, leave the weights of the inactive layers unchanged and move the active
    ones' at almost every active step (so a schedule off by one, or a counter that does not
    persist, fails)."""
    model, calibration, x, y = model_and_data
    callback = DynamicChannelSelection("weight_l2", traversal=True, layers_per_step=per_step)
    info = export_training(model, UpdateScheme(SCHEME), calibration, tmp_path / "s.tflite",
                           learning_rate=LR, policy=callback)
    assert info.manifest["layers_per_step"] == per_step
    assert {l["name"]: l["schedule"] for l in info.manifest["layers"]} == {
        **{name: [i, 3, per_step] for i, name in enumerate(LAYERS)}, "classifier": None}
    run = train_tflm(info.path, x, y)
    names = run.manifest["outputs"]
    tflm = {name: run.result.outputs[names.index(f"{name}/weights")] for name in LAYERS}
    before = {name: initial_params(info.path)[f"{name}/weights"] for name in LAYERS}

    graph = int8_training_graph(model, calibration)
    sparse = SparseUpdateModel(graph.model, UpdateScheme(SCHEME), fold_bn=False)
    sparse.compile(optimizer=QuantizationAwareScalingSGD(LR, graph.qas_scales),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callback.set_model(sparse)
    callback.on_train_begin()
    kernels = {name: kernel_of(graph.model.get_layer(name)) for name in LAYERS}
    moved = {name: np.zeros(3, int) for name in LAYERS}  # active, Keras moved, TFLM moved
    for s in range(STEPS):
        for name in LAYERS:
            kernels[name].assign(_to_keras(before[name], DEPTHWISE[name]))
        sparse.train_on_batch(x[s:s + 1], y[s:s + 1])
        for i, name in enumerate(LAYERS):
            where = f"{name} step {s}"
            state = sparse.selection.numpy(name)
            active = R.layer_active(s, i, len(LAYERS), per_step)
            assert bool(state["active"]) == active, where
            np.testing.assert_array_equal(state["indices"], run.kept[f"{name}/kept"][s],
                                          err_msg=where)
            keras_moved = not np.array_equal(kernels[name].numpy(),
                                             _to_keras(before[name], DEPTHWISE[name]))
            tflm_moved = not np.array_equal(tflm[name][s], before[name])
            assert active or not (keras_moved or tflm_moved), where
            moved[name] += np.array([active, keras_moved, tflm_moved])
            before[name] = tflm[name][s]
    assert int(sparse.selection.step.numpy()) == STEPS
    for name, (active, keras_moved, tflm_moved) in moved.items():
        # an active step may move nothing (project: 16 of 20 move, on both sides)
        assert active == STEPS * per_step // 3, (name, moved[name])
        assert min(keras_moved, tflm_moved) >= 0.6 * active, (name, moved[name])


def test_static_selection_and_round_to_nearest_share_the_schedule_and_its_counter(
        model_and_data, tmp_path):
    """With a static selection (the kept channels' weights in RAM) and round-to-nearest the
    schedule holds too (the counter is then the schedule's alone); it costs TFLM's arena
    the 4 bytes of ``sgd/step``, as the memory model counts, and nothing more with
    stochastic rounding (which has the counter anyway). Bad values are refused."""
    model, calibration, x, y = model_and_data
    scheme = UpdateScheme(SCHEME)
    runs, paths = {}, {}
    for rounding in ("nearest", "stochastic"):
        for n in (None, 1):
            paths[rounding, n] = tmp_path / f"{rounding}_{n}.tflite"
            export_training(model, scheme, calibration, paths[rounding, n], learning_rate=LR,
                            rounding=rounding, layers_per_step=n)
            runs[rounding, n] = train_tflm(paths[rounding, n], x[:9], y[:9])
    run = runs["nearest", 1]
    names = run.manifest["outputs"]
    start = initial_params(paths["nearest", 1])
    kept = {layer["name"]: layer["kept"] for layer in run.manifest["layers"]}
    for i, name in enumerate(LAYERS):
        per_step = run.result.outputs[names.index(f"{name}/weights")]
        previous = start[f"{name}/weights"][..., kept[name]]  # the RAM copy's channels
        assert per_step.shape[1:] == previous.shape
        for s in range(9):
            moved = not np.array_equal(per_step[s], previous)
            assert moved == R.layer_active(s, i, 3, 1), (name, s)
            previous = per_step[s]
    arena = {key: r.arena_bytes for key, r in runs.items()}
    assert arena["nearest", 1] >= arena["nearest", None] + 4  # sgd/step
    # the schedule's option words sit in the ops' OpData padding: no arena bytes
    assert arena["stochastic", 1] == arena["stochastic", None]

    def peak(rounding, n):
        return MemoryModel(model, rounding=rounding, layers_per_step=n).report(
            scheme, dense=False).training_peak_bytes

    assert peak("nearest", 1) == peak("nearest", None) + 4
    assert peak("nearest", 3) == peak("nearest", None)  # 3 of 3 layers: no schedule
    assert peak("stochastic", 1) == peak("stochastic", None) == peak("nearest", 1)
    for bad in (0, 1.5):
        with pytest.raises(TrainingExportError, match="layers_per_step must be None or an int"):
            export_training(model, scheme, calibration, tmp_path / "bad.tflite",
                            layers_per_step=bad)
