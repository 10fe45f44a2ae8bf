"""The training step's arena as TFLM reports it, against the memory model, under on-device
DGSU selection (policy="traversal"), and ``DGST_CONV2D``: the convolutions whose
requantization multipliers and shifts are constants (flash) instead of TFLM op data.

Oracles: the builtin int8 convolutions (TFLM and TFLite's reference kernels) bit for bit;
TFLM's arena report (``print_allocations``) of graphs that differ only in channel counts;
the tensors of the exported graph against `dgst_tf.planning.memory.MemoryModel`."""
import numpy as np
import pytest
from small_models import residual_cnn

from dgst_tf.core.bn_folding import fold_batchnorm
from dgst_tf.core.keras_compat import keras
from dgst_tf.export.inference import export_int8, reference_outputs
from dgst_tf.core.tflite_builder import ModelBuilder
from dgst_tf.export.tflite_editor import ModelEditor
from dgst_tf.export.tflite_file import numpy_dtype, read_tflite
from dgst_tf.export.tflm.ops_loader import host_ops
from dgst_tf.export.tflm.runner import TflmError, run_tflm
from dgst_tf.export.training import (TrainingExportError, export_training, initial_params,
                                     train_tflm)
from dgst_tf.export.training.flash_requant import builtin_conv_op, flash_requant_op
from dgst_tf.planning import tflm_runtime
from dgst_tf.planning.memory import MemoryModel
from dgst_tf.training.scheme import UpdateScheme

L = keras.layers
OP_DATA = "Persistent buffer data"
VARIABLES = "TfLiteTensor variable buffer data"


def _run(path, x):
    ops = host_ops()
    return run_tflm(path, [x], libraries=[ops.library], registerers=ops.registerers)


def _convs(size):
    """Every convolution case DGST_CONV2D covers: stride 2 SAME on odd sizes (asymmetric
    padding), VALID, 5x5 depthwise, no bias, activations none / ReLU / ReLU6."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((size, size, 3))
    x = L.Conv2D(8, 3, strides=2, padding="same", activation="relu6")(inp)
    x = L.DepthwiseConv2D(3, strides=2, padding="same", activation="relu")(x)
    x = L.Conv2D(12, 1, use_bias=False)(x)
    x = L.DepthwiseConv2D(5, padding="same", activation="relu6")(x)
    x = L.Conv2D(6, 2, padding="valid", activation="relu")(x)
    return keras.Model(inp, x)


@pytest.mark.parametrize("size", [17, 16])
def test_dgst_conv2d_is_the_builtin_convolution_bit_for_bit(tmp_path, size):
    rng = np.random.default_rng(0)
    export_int8(_convs(size), rng.uniform(-1, 1, (32, size, size, 3)).astype(np.float32),
                tmp_path / "builtin.tflite", head_logit_range=0)  # no classifier head here
    _, parsed = read_tflite(tmp_path / "builtin.tflite")
    editor = ModelEditor(parsed)
    ops = editor.subgraph.operators
    custom = [flash_requant_op(editor, op) for op in ops]
    assert all(op is not None for op in custom) and len(custom) == 5
    editor.subgraph.operators = custom
    (tmp_path / "flash.tflite").write_bytes(editor.pack())
    x = rng.integers(-128, 128, (4, 1, size, size, 3)).astype(np.int8)
    builtin, flash = _run(tmp_path / "builtin.tflite", x), _run(tmp_path / "flash.tflite", x)
    np.testing.assert_array_equal(flash.outputs[0], builtin.outputs[0])
    assert len(np.unique(builtin.outputs[0])) > 20  # not a saturated, trivially equal output
    # per-channel multipliers and shifts are flash constants now: 8 bytes per output
    # channel less op data (the OpData structs differ by a few bytes per op)
    channels = 8 + 8 + 12 + 12 + 6
    saved = builtin.allocations[OP_DATA] - flash.allocations[OP_DATA]
    assert 8 * channels - 16 * len(ops) <= saved <= 8 * channels
    # and back to the builtin ops (the inference graph of a training step)
    editor.subgraph.operators = [builtin_conv_op(editor, op) for op in custom]
    editor.prune()
    (tmp_path / "back.tflite").write_bytes(editor.pack())
    np.testing.assert_array_equal(reference_outputs(tmp_path / "back.tflite", [x[0]])[0],
                                  builtin.outputs[0][0])


def test_dgst_conv2d_prepare_names_a_bad_requant_tensor(tmp_path):
    b = ModelBuilder()
    x = b.add_tensor("x", (1, 4, 4, 2), np.int8)
    y = b.add_tensor("y", (1, 4, 4, 3), np.int8)
    w = b.add_tensor("w", (3, 1, 1, 2), np.int8, data=np.ones((3, 1, 1, 2), np.int8))
    bias = b.add_tensor("b", (3,), np.int32, data=np.zeros(3, np.int32))
    q = b.add_tensor("q", (3, 3), np.int32, data=np.zeros((3, 3), np.int32))  # not [2, 3]
    options = np.array([1, 0, 1, 1, 0, 0, 0, 0, -128, 127, 1, 0], "<i4").tobytes()
    b.add_custom_op("DGST_CONV2D", [x, w, bias, q], [y], options)
    (tmp_path / "bad.tflite").write_bytes(b.build([x], [y]))
    with pytest.raises(TflmError, match=r"DGST_CONV2D: input 2 \(bias\) must have shape \[3\] "
                                        r"and input 3 \(requant: multiplier, shift\) \[2, 3\]"):
        _run(tmp_path / "bad.tflite", np.zeros((1, 4, 4, 2), np.int8))


def _cnn(width):
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(width, 3, padding="same", activation="relu6", name="stem")(inp)
    x = L.DepthwiseConv2D(3, padding="same", activation="relu6", name="depthwise")(x)
    x = L.Conv2D(width, 1, activation="relu6", name="expand")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(4, name="classifier")(x))


_DGSU = {"stem": "bias", "depthwise": 0.25, "expand": 0.5}


def _dgsu_step(tmp_path, model, scheme, flash, name):
    x = np.random.default_rng(1).normal(size=(8, 8, 8, 3)).astype(np.float32)
    info = export_training(model, UpdateScheme(scheme), x, tmp_path / f"{name}.tflite",
                           learning_rate=0.05, policy="traversal", output_params=False,
                           requant_in_flash=flash)
    return info, train_tflm(info.path, x[:2], np.array([0, 1]))


def test_dynamic_policy_op_data_does_not_grow_with_the_channels(tmp_path):
    """Two graphs that differ only in width (3 convs of 8 or 16 channels): with
    DGST_CONV2D TFLM's op data is the same, so nothing per channel is in the arena; with the
    builtin convolutions it grows by 8 bytes per output channel."""
    op_data, arena = {}, {}
    for flash in (True, False):
        for width in (8, 16):
            info, run = _dgsu_step(tmp_path, _cnn(width), _DGSU, flash, f"w{width}{flash}")
            assert ("CONV_2D" in info.ops) is not flash
            assert ("DEPTHWISE_CONV_2D" in info.ops) is not flash
            op_data[flash, width] = run.result.allocations[OP_DATA]
            arena[flash, width] = run.arena_bytes
    assert op_data[True, 16] == op_data[True, 8]
    assert op_data[False, 16] - op_data[False, 8] == 8 * 3 * (16 - 8)
    for width in (8, 16):
        assert arena[True, width] < arena[False, width]


def _tensor_bytes(editor, index):
    return int(np.prod(editor.shape(index))) * np.dtype(
        numpy_dtype(editor.tensor(index).type)).itemsize


def test_dynamic_policy_arena_is_what_the_memory_model_counts(tmp_path):
    """Under DGSU the step holds the whole kernels of partly updated layers, their visited
    bitmasks, the kept indices and the step counter: TFLM's variables plus the kept tensors
    are exactly the model's SRAM parameters and optimizer/selection state, and the rest of
    TFLM's arena (its structs and op data aside) is within the model's training peak."""
    model = fold_batchnorm(residual_cnn())
    scheme = {"expand": 0.5, "depthwise": 0.25, "project": "bias", "head": 0.5}
    info, run = _dgsu_step(tmp_path, model, scheme, True, "dgsu")
    report = MemoryModel(model, fused_blocks=True, rounding="stochastic",
                         full_weights_in_sram=True).report(UpdateScheme(scheme))
    held = (report.peak_breakdown["parameters in SRAM"]
            + report.peak_breakdown["optimizer state"])  # with the step counter sgd/step
    editor = ModelEditor(read_tflite(info.path)[1])
    names = [editor.name(i) for i in range(len(editor.subgraph.tensors))]
    variables = [i for i, t in enumerate(editor.subgraph.tensors) if t.isVariable]
    kept = [names.index(f"{layer}/kept") for layer in ("expand", "depthwise", "head")]
    assert [_tensor_bytes(editor, i) for i in kept] == [4 * 4, 4 * 3, 4 * 4]
    variable_bytes = sum(_tensor_bytes(editor, i) for i in variables)
    assert variable_bytes + sum(_tensor_bytes(editor, i) for i in kept) == held
    # TFLM aligns each variable buffer to 16 bytes
    assert variable_bytes <= run.result.allocations[VARIABLES] <= variable_bytes + 16 * len(
        variables)
    # and the model's arena is TFLM's (its structs and op data included)
    graph = MemoryModel(model, fused_blocks=True, rounding="stochastic", policy="traversal",
                        output_params=False).report(UpdateScheme(scheme))
    assert run.arena_bytes == pytest.approx(graph.arena_bytes, rel=0.05)


def test_mobilenet_v2_035_lin_49kb_dgsu_on_device_fits_256kb(tmp_path):
    """Issue 17's memory target, as TFLM reports it: MobileNetV2-0.35 at 128x128, Lin's 49 KB
    scheme, DGSU traversal selection on device (firmware graph). Weights do not matter."""
    from dgst_tf.models import mobilenet_v2

    model = fold_batchnorm(mobilenet_v2(0.35, (128, 128, 3), classes=10, weights=None, seed=0))
    scheme = UpdateScheme.from_backward_config(
        model, 16, [36, 39, 40, 41, 42, 45, 48, 49], [1, 1, 0, 0.25, 0.125, 0.125, 0.125, 0.125])
    x = np.random.default_rng(0).uniform(-1, 1, (8, 128, 128, 3)).astype(np.float32)
    info = export_training(model, scheme, x, tmp_path / "train.tflite", learning_rate=0.001,
                           output_params=False, num_samples=8, policy="traversal")
    run = train_tflm(info.path, x[:2], np.array([1, 2]))
    assert info.ops["CUSTOM:DGST_SELECT_CHANNELS"] == 5
    assert np.isfinite(run.losses).all()
    assert run.arena_bytes <= 256 * 1024, run.result.allocations
    report = MemoryModel(model, fused_blocks=True, rounding="stochastic",
                         full_weights_in_sram=True).report(scheme)
    params = report.peak_breakdown["parameters in SRAM"]
    assert params <= run.result.allocations[VARIABLES] <= params + 1024


# -- the offline memory plan and chunked weight gradients ---------------------------------
# frozen blocks in front (fused, in place over their input), bias-only depthwise layers on
# the gradient path (their float input gradient written around their dy), weight-updated
# convs and the classifier (chunked weight gradients), every error signal in place
_PLAN_SCHEME = {"block_15_expand": 0.25, "block_15_depthwise": "bias",
                "block_15_project": "bias", "block_16_expand": 0.5,
                "block_16_depthwise": "bias", "block_16_project": 0.25, "head_conv": "bias"}


@pytest.fixture(scope="module")
def small_mobilenet():
    from dgst_tf.models import mobilenet_v2

    model = fold_batchnorm(mobilenet_v2(0.35, (32, 32, 3), classes=4, weights=None, seed=0))
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (14, 32, 32, 3)).astype(np.float32)
    return model, x[:8], x[8:], rng.integers(0, 4, 6)


@pytest.mark.parametrize("policy", [None, "traversal"])
def test_offline_plan_and_weight_grad_chunks_change_no_value(small_mobilenet, tmp_path,
                                                             policy):
    """The step with TFLM's offline memory plan (ops in place: fused blocks, error signals,
    depthwise input gradients) and weight gradients in chunks trains bit for bit as the
    step TFLM plans online with whole gradients -- losses, logits, every trainable tensor
    and the channels chosen on device over 6 steps -- in no larger an arena head."""
    from dgst_tf.export.training.offline_plan import in_place_aliases, tensor_lifetimes

    model, calibration, x, y = small_mobilenet
    runs, infos = {}, {}
    for planned in (True, False):
        info = export_training(model, UpdateScheme(_PLAN_SCHEME), calibration,
                               tmp_path / f"{planned}.tflite", learning_rate=0.05,
                               num_samples=8, policy=policy, output_params=True,
                               offline_plan=planned,
                               weight_grad_chunk_bytes=2048 if planned else 0)
        infos[planned], runs[planned] = info, train_tflm(info.path, x, y)
    planned, online = runs[True], runs[False]
    np.testing.assert_array_equal(planned.losses, online.losses)
    np.testing.assert_array_equal(planned.logits, online.logits)
    assert planned.params.keys() == online.params.keys()
    for name in planned.params:
        np.testing.assert_array_equal(planned.params[name], online.params[name], err_msg=name)
    for name in online.kept:
        np.testing.assert_array_equal(planned.kept[name], online.kept[name], err_msg=name)
    assert any(np.any(planned.params[n] != v) for n, v in initial_params(
        infos[True].path).items())  # the step trains
    # every in-place kind is used, the gradients are chunked
    editor = ModelEditor(read_tflite(infos[True].path)[1])
    writers = {int(t): editor.builtin(op) for op in editor.subgraph.operators
               for t in op.outputs}
    kinds = {writers[y] for _, y, _ in in_place_aliases(editor, tensor_lifetimes(editor))}
    assert kinds == {"CUSTOM:DGST_FUSED_BLOCK", "CUSTOM:DGST_QUANTIZE_GRAD",
                     "CUSTOM:DGST_DEPTHWISE_INPUT_GRAD"}
    grads = "CUSTOM:DGST_CONV2D_WEIGHT_GRAD"
    assert infos[True].ops[grads] > infos[False].ops[grads]
    assert infos[True].manifest["offline_plan"]["in_place"] >= 3
    assert infos[False].manifest["offline_plan"] is None
    assert planned.result.arena_head_bytes <= online.result.arena_head_bytes
    # the memory model places both as TFLM does: the offline plan (and the scratch buffers
    # around it) and TFLM's own greedy planner, byte for byte
    for flag, run in ((True, planned), (False, online)):
        timeline = MemoryModel(model, policy=policy, offline_plan=flag,
                               weight_grad_chunk_bytes=2048 if flag else 0).timeline(
            UpdateScheme(_PLAN_SCHEME))
        assert tflm_runtime.planned_peak_bytes(timeline) == run.result.arena_head_bytes, flag


def test_offline_plan_is_in_the_model_metadata(small_mobilenet, tmp_path):
    """The plan is the ``OfflineMemoryAllocation`` metadata TFLM reads: one offset per
    tensor, -1 for constants and variables, 16-byte aligned offsets below the head TFLM
    reports for the planned ones (its head: the plan plus the scratch buffers)."""
    from dgst_tf.export.training.offline_plan import OFFLINE_PLAN_METADATA

    model, calibration, x, y = small_mobilenet
    info = export_training(model, UpdateScheme(_PLAN_SCHEME), calibration,
                           tmp_path / "t.tflite", learning_rate=0.05, num_samples=8,
                           output_params=False)
    editor = ModelEditor(read_tflite(info.path)[1])
    entry = [m for m in editor.model.metadata if m.name == OFFLINE_PLAN_METADATA]
    assert len(entry) == 1
    words = np.frombuffer(bytes(editor.model.buffers[entry[0].buffer].data), "<i4")
    tensors = editor.subgraph.tensors
    assert words[2] == len(tensors) and len(words) == 3 + len(tensors)
    offsets = words[3:]
    for index, tensor in enumerate(tensors):
        if editor.data(index) is not None or tensor.isVariable:
            assert offsets[index] == -1, editor.name(index)
    planned = offsets[offsets >= 0]
    assert len(planned) > 20 and not np.any(planned % 16)
    run = train_tflm(info.path, x[:1], y[:1])
    assert info.manifest["offline_plan"]["head_bytes"] <= run.result.arena_head_bytes


def test_weight_grad_chunk_bytes_is_checked(small_mobilenet, tmp_path):
    model, calibration, _, _ = small_mobilenet
    with pytest.raises(TrainingExportError, match="weight_grad_chunk_bytes must be an int"):
        export_training(model, UpdateScheme(_PLAN_SCHEME), calibration, tmp_path / "t.tflite",
                        weight_grad_chunk_bytes=-1)
