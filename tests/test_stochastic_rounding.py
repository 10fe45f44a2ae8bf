"""Stochastic rounding of the int8 QAS weight updates (``rounding="stochastic"``): the
counter-based PRNG identical in C, NumPy and TensorFlow, the C cores bit-exact against the
NumPy reference, the exported graph moving depthwise and pointwise weights at a realistic
learning rate where round-to-nearest moves none, and the Keras int8 QAS simulation drawing
the same numbers as the TFLM graph."""

import numpy as np
import pytest

from small_models import batch, residual_cnn

from dgst_tf.core.bn_folding import fold_batchnorm
from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.core.tflite_builder import ModelBuilder, int32_options
from dgst_tf.export.tflm.ops_loader import host_ops
from dgst_tf.export.tflm.runner import run_tflm
from dgst_tf.export.training import export_training, initial_params, train_tflm
from dgst_tf.planning.memory import MemoryModel
from dgst_tf.tflm_ops import host as H
from dgst_tf.tflm_ops import reference as R
from dgst_tf.training.int8_graph import int8_training_graph
from dgst_tf.training.qas import (QuantizationAwareScalingSGD, layer_stream,
                                  stochastic_uniform_bits, tflite_weight_index)
from dgst_tf.training.scheme import UpdateScheme
from dgst_tf.training.sparse_model import SparseUpdateModel

LR = 0.003  # the order of the benchmarks' 1e-3 on this tiny model
STEPS = 12
SCHEME = {"head": "bias", "project": 0.5, "depthwise": 1.0}
WEIGHT_LAYERS = ["depthwise", "project", "classifier"]


@pytest.fixture(scope="module")
def K():
    return H.Kernels(H.build())


# ----------------------------------------------------------------------------- the PRNG
def test_prng_is_identical_in_c_numpy_and_tensorflow(K):
    rng = np.random.default_rng(0)
    cases = [(0, 0, 0, 0), (2**32 - 1, 2**32 - 1, 2**32 - 1, 2**32 - 1), (1, 2, 3, 4)]
    cases += [tuple(int(v) for v in rng.integers(0, 2**32, 4, dtype=np.uint64))
              for _ in range(200)]
    for seed, stream, step, index in cases:
        want = K.stochastic_rounding_bits(seed, stream, step, index)
        assert int(R.stochastic_uniform_bits(seed, stream, step, [index])[0]) == want
    seed, stream, step = cases[-1][:3]
    index = rng.integers(0, 2**32, 5000, dtype=np.uint64).astype(np.int64)
    np.testing.assert_array_equal(
        stochastic_uniform_bits(seed, stream, step, tf.constant(index)).numpy(),
        R.stochastic_uniform_bits(seed, stream, step, index).astype(np.int64))
    np.testing.assert_array_equal(
        [K.stochastic_rounding_bits(seed, stream, step, int(i)) for i in index[:300]],
        R.stochastic_uniform_bits(seed, stream, step, index[:300]))


def test_prng_is_uniform_and_decorrelated():
    u = (R.stochastic_uniform_bits(0, layer_stream("a"), 0, np.arange(20000)) >> 8) / 2**24
    assert abs(u.mean() - 0.5) < 0.01 and abs(np.mean(u < 0.1) - 0.1) < 0.01
    other = (R.stochastic_uniform_bits(0, layer_stream("a"), 1, np.arange(20000)) >> 8) / 2**24
    assert abs(np.corrcoef(u, other)[0, 1]) < 0.03  # the next step draws new numbers


# ----------------------------------------------------------------------------- C == NumPy
def _conv_case(rng, c_out, kh, kw, c_in, k, scale=1.0):
    w = rng.integers(-127, 128, (c_out, kh, kw, c_in)).astype(np.int8)
    kept = np.sort(rng.choice(c_in, k, replace=False)).astype(np.int32)
    grad = (rng.normal(0, 2000 * scale, (c_out, kh, kw, k))).astype(np.int32)
    ws = rng.uniform(0.002, 0.02, c_out).astype(np.float32)
    return w, kept, grad, ws


@pytest.mark.parametrize("shape", [(4, 3, 3, 6, 3), (8, 1, 1, 12, 12), (5, 1, 1, 16, 4),
                                   (3, 5, 5, 2, 1)])
def test_conv_and_dense_stochastic_update_bit_exact(K, shape):
    rng = np.random.default_rng(sum(shape))
    w, kept, grad, ws = _conv_case(rng, *shape)
    args = (0.01, 0.03, 0.002, ws)
    moved = 0
    for step in range(3):
        got = K.sgd_qas_update_conv_sr(w, kept, grad, *args, 7, 123, step)
        want = R.sgd_qas_update_conv_sr(w, kept, grad, *args, 7, 123, step)
        np.testing.assert_array_equal(got, want)
        moved += int((got != w).sum())
        others = np.setdiff1d(np.arange(w.shape[-1]), kept)
        np.testing.assert_array_equal(got[..., others], w[..., others])
    assert moved > 0
    # a compact copy of the kept channels draws the numbers of the full kernel
    compact = K.sgd_qas_update_conv_sr(w[..., kept], np.arange(len(kept)), grad, *args, 7, 123,
                                       2, index_channels=kept, index_c_in=w.shape[-1])
    np.testing.assert_array_equal(compact, want[..., kept])


@pytest.mark.parametrize("shape", [(3, 3, 8, 5), (5, 5, 4, 4), (3, 3, 16, 1)])
def test_depthwise_stochastic_update_bit_exact(K, shape):
    kh, kw, channels, k = shape
    rng = np.random.default_rng(channels)
    w = rng.integers(-127, 128, (1, kh, kw, channels)).astype(np.int8)
    kept = np.sort(rng.choice(channels, k, replace=False)).astype(np.int32)
    grad = rng.normal(0, 3000, (kh, kw, k)).astype(np.int32)
    ws = rng.uniform(0.002, 0.02, channels).astype(np.float32)
    for step in (0, 5, 2**31 + 3):
        got = K.sgd_qas_update_depthwise_sr(w, kept, grad, 0.01, 0.03, 0.002, ws, 1, 99, step)
        want = R.sgd_qas_update_depthwise_sr(w, kept, grad, 0.01, 0.03, 0.002, ws, 1, 99, step)
        np.testing.assert_array_equal(got, want)
    compact = K.sgd_qas_update_depthwise_sr(w[..., kept], np.arange(k), grad, 0.01, 0.03, 0.002,
                                            ws[kept], 1, 99, 2**31 + 3, index_channels=kept,
                                            index_c_in=channels)
    np.testing.assert_array_equal(compact, want[..., kept])


def test_the_reference_tells_u_and_the_index_order_apart(K):
    """The bit-exact tests above would catch a core that drops u (floor(-step)) or draws u
    at another index order (HWIO instead of OHWI): both give other weights here."""
    rng = np.random.default_rng(5)
    w, kept, grad, ws = _conv_case(rng, 6, 3, 3, 8, 8, scale=0.3)
    factor = (np.float32(np.float32(0.01) * np.float32(0.03)) * np.float32(0.002)) / ws
    s = np.clip(factor[:, None, None, None] * grad.astype(np.float32), -1024, 1024)
    got = K.sgd_qas_update_conv_sr(w, kept, grad, 0.01, 0.03, 0.002, ws, 3, 4, 5)
    no_u = np.clip(w + np.floor(-s), -127, 127)
    assert (got != no_u).sum() > 20
    c_out, kh, kw, c_in = w.shape
    hwio = np.arange(w.size).reshape(kh, kw, c_in, c_out).transpose(3, 0, 1, 2)
    u = (R.stochastic_uniform_bits(3, 4, 5, hwio) >> 8).astype(np.float32) * 2.0**-24
    other_order = np.clip(w + np.floor((u - s).astype(np.float32)), -127, 127)
    assert (got != other_order).sum() > 20


def test_stochastic_rounding_is_unbiased():
    """E[update] = -step: 2000 steps of a 0.3-LSB step move the weight ~ -600 LSB (nearest:
    0), with the C core's float order (NumPy reference)."""
    w = np.zeros((1, 1, 1, 1), np.int8)
    total = 0
    for step in range(2000):
        out = R.sgd_qas_update_conv_sr(w, [0], np.array([[[[3]]]], np.int32), 0.1, 1.0, 1.0,
                                       np.ones(1, np.float32), 0, 0, step)
        total += int(out[0, 0, 0, 0])
    assert abs(total + 600) < 60
    nearest = R.sgd_qas_update_conv(w, [0], np.array([[[[3]]]], np.int32), 0.1, 1.0, 1.0,
                                    np.ones(1, np.float32))
    assert nearest[0, 0, 0, 0] == 0


def test_keras_index_is_the_tflite_layout():
    conv = tflite_weight_index((3, 2, 4, 5), depthwise=False)  # HWIO
    assert conv[1, 0, 2, 3] == ((3 * 3 + 1) * 2 + 0) * 4 + 2  # OHWI
    assert tflite_weight_index((3, 3, 6, 1), depthwise=True)[2, 1, 4, 0] == (2 * 3 + 1) * 6 + 4
    assert tflite_weight_index((7, 3), depthwise=False)[5, 2] == 2 * 7 + 5  # Dense IO -> OI


# ----------------------------------------------------------------------------- TFLM op
def test_tflm_op_rounds_stochastically_and_counts_the_step(tmp_path):
    ops = host_ops()
    rng = np.random.default_rng(3)
    w0, kept, grad, ws = _conv_case(rng, 4, 3, 3, 6, 3)
    lr, x_scale, dy_scale, seed, stream = 0.01, 0.03, np.float32(0.002), 11, 2**31 + 5

    def build(advance):
        b = ModelBuilder()
        t_w = b.add_tensor("w", w0.shape, np.int8, variable=True, scale=ws,
                           zero_point=[0] * 4)
        t_w0 = b.add_tensor("w0", w0.shape, np.int8, data=w0)
        t_g = b.add_tensor("g", grad.shape, np.int32, data=grad)
        t_kept = b.add_tensor("kept", kept.shape, np.int32, data=kept)
        t_ws = b.add_tensor("ws", ws.shape, np.float32, data=ws)
        t_s = b.add_tensor("dy_scale", (1,), np.float32)
        t_step = b.add_tensor("step", (1,), np.int32, variable=True)
        b.add_custom_op("DGST_VARIABLE_INIT", [t_w, t_w0], [])
        b.add_custom_op("DGST_SGD_QAS_UPDATE", [t_w, t_g, t_kept, t_ws, t_s, t_step, -1], [],
                        int32_options(0, lr, x_scale, 1, seed, stream - 2**32, 0, advance))
        path = tmp_path / f"sr{advance}.tflite"
        path.write_bytes(b.build([t_s], [t_w, t_step]))
        return path

    for advance in (1, 0):
        out = run_tflm(build(advance), [np.full((3, 1), dy_scale)], libraries=[ops.library],
                       registerers=ops.registerers).outputs
        w = w0
        for step in range(3):  # DGST_VARIABLE_INIT runs once: the weights carry over
            w = R.sgd_qas_update_conv_sr(w, kept, grad, lr, x_scale, dy_scale, ws, seed, stream,
                                         step if advance else 0)
            np.testing.assert_array_equal(out[0][step], w)
            assert out[1][step][0] == (step + 1 if advance else 0)


# ----------------------------------------------------------------------------- exported graph
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model = fold_batchnorm(residual_cnn())
    x, y = batch(32)
    folder = tmp_path_factory.mktemp("sr")
    runs = {}
    for rounding in ("stochastic", "nearest"):
        info = export_training(model, UpdateScheme(SCHEME), x, folder / f"{rounding}.tflite",
                               learning_rate=LR, selection="first", rounding=rounding)
        runs[rounding] = (info, initial_params(info.path), train_tflm(info.path, x[:STEPS],
                                                                      y[:STEPS]))
    return model, x, y, runs


def _moved(runs, rounding):
    _, start, run = runs[rounding]
    return {name: int((run.params[f"{name}/weights"] != start[f"{name}/weights"]).sum())
            for name in WEIGHT_LAYERS}


def test_exported_graph_moves_depthwise_and_pointwise_weights(trained):
    """lr 3e-3, 12 steps: the int8 steps are below one LSB; stochastic rounding moves
    weights of every weight-updated layer, round-to-nearest moves fewer (here: none)."""
    _, _, _, runs = trained
    stochastic, nearest = _moved(runs, "stochastic"), _moved(runs, "nearest")
    assert all(stochastic[name] > 0 for name in WEIGHT_LAYERS), stochastic
    assert all(nearest[name] < stochastic[name] for name in WEIGHT_LAYERS), (nearest,
                                                                             stochastic)


def test_the_step_counter_is_in_the_graph_and_counted(trained):
    model, _, _, runs = trained
    info, _, run = runs["stochastic"]
    nearest_info, _, nearest_run = runs["nearest"]
    assert info.ops["CUSTOM:DGST_SGD_QAS_UPDATE"] == nearest_info.ops["CUSTOM:DGST_SGD_QAS_UPDATE"]
    assert (info.manifest["rounding"], nearest_info.manifest["rounding"]) == ("stochastic",
                                                                              "nearest")
    assert run.arena_bytes >= nearest_run.arena_bytes + 4  # the int32 variable sgd/step
    memory = {r: MemoryModel(model, rounding=r).report(UpdateScheme(SCHEME), dense=False)
              for r in ("stochastic", "nearest")}
    assert (memory["stochastic"].training_peak_bytes
            == memory["nearest"].training_peak_bytes + 4)
    with pytest.raises(Exception, match="rounding"):
        MemoryModel(model, rounding="up")


def test_keras_int8_simulation_draws_the_same_numbers_as_tflm(trained):
    """Keras (float forward of the int8 graph) and TFLM (int8 forward) compute slightly
    different gradients, so a step lying within that difference of an integer boundary of
    ``u - step`` can round the other way: weights may differ by 1 LSB where that happened
    (2 when it happened twice to one weight). With the same u at the same (step, stream,
    TFLite index) almost all moved weights move identically; a Keras simulation that drew
    u at another index or without u would move other weights."""
    model, x, y, runs = trained
    _, start, run = runs["stochastic"]
    graph = int8_training_graph(model, x)
    sparse = SparseUpdateModel(graph.model, UpdateScheme(SCHEME), fold_bn=False)
    sparse.compile(optimizer=QuantizationAwareScalingSGD(LR, graph.qas_scales),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    names = run.manifest["outputs"]
    kept = {layer["name"]: layer["kept"] for layer in run.manifest["layers"]}
    for step in range(STEPS):
        sparse.train_on_batch(x[step:step + 1], y[step:step + 1])
        for name in WEIGHT_LAYERS:
            kernel = graph.model.get_layer(name).weights[0].numpy()
            to_tflite = (lambda k: k.transpose(3, 0, 1, 2)) if kernel.ndim == 4 else np.transpose
            keras_w = to_tflite(kernel)
            assert np.array_equal(keras_w, np.round(keras_w)), name  # integer int8 values
            tflm_w = run.result.outputs[names.index(f"{name}/weights")][step]
            first = start[f"{name}/weights"]
            if tflm_w.shape != keras_w.shape:  # the RAM copy of the kept channels
                keras_w, first = keras_w[..., kept[name]], first[..., kept[name]]
            diff = np.abs(keras_w - tflm_w)
            assert diff.max() <= 2, (name, step)
            moved = (tflm_w != first) | (keras_w != first)
            if step == STEPS - 1:
                same = (keras_w == tflm_w) & moved
                assert moved.sum() > 0 and same.sum() >= 0.7 * moved.sum(), (name, same.sum(),
                                                                             moved.sum())


def test_rounding_options_are_checked(tmp_path):
    x, _ = batch(4)
    with pytest.raises(Exception, match="rounding must be one of"):
        export_training(fold_batchnorm(residual_cnn()), UpdateScheme(SCHEME), x,
                        tmp_path / "t.tflite", rounding="up")
    with pytest.raises(ValueError, match="rounding"):
        QuantizationAwareScalingSGD(0.01, rounding="up")
    with pytest.raises(ValueError, match="momentum"):
        QuantizationAwareScalingSGD(0.01, momentum=0.9)
    with pytest.raises(ValueError, match="momentum"):
        QuantizationAwareScalingSGD(0.01, momentum=0.9, rounding="nearest")
