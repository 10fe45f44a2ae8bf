"""The backward-pass TFLM kernels of the training step (DGST_CONV2D_INPUT_GRAD,
DGST_DEPTHWISE_INPUT_GRAD, DGST_DEPTHWISE_WEIGHT_GRAD, DGST_SOFTMAX_XENT_GRAD,
DGST_QUANTIZE_GRAD, DGST_RELU_MASK, DGST_ACTIVATION_GRAD, DGST_GATHER_CHANNELS, and the Dense forms of
DGST_CONV2D_WEIGHT_GRAD / DGST_SGD_QAS_UPDATE) in the pip interpreter, against
tflm_ops/reference.py (bit for bit) and TensorFlow autodiff of the same computation.
"""
import dataclasses
import shutil

import numpy as np
import pytest

from dgst_tf.core.tflite_builder import ModelBuilder, int32_options
from dgst_tf.export.tflm.abi_check import check_abi
from dgst_tf.export.tflm.ops_loader import OPS, host_ops
from dgst_tf.export.tflm.runner import TflmError, run_tflm
from dgst_tf.core.keras_compat import tf
from dgst_tf.tflm_ops import reference as R


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    built = host_ops()
    library = tmp_path_factory.mktemp("tflm_train_ops") / built.library.name
    shutil.copy2(built.library, library)
    check_abi(library)
    return dataclasses.replace(built, library=library)


def run_graph(ops, tmp_path, name, build):
    """``build(b) -> (inputs {tensor: array}, outputs [tensor])``; runs once in TFLM."""
    b = ModelBuilder()
    inputs, outputs = build(b)
    path = tmp_path / f"{name}.tflite"
    path.write_bytes(b.build(list(inputs), outputs))
    return run_tflm(path, list(inputs.values()), libraries=[ops.library],
                    registerers=ops.registerers).outputs


def test_every_op_is_registered(ops):
    for op in ("DGST_CONV2D_INPUT_GRAD", "DGST_DEPTHWISE_INPUT_GRAD",
               "DGST_DEPTHWISE_WEIGHT_GRAD", "DGST_SOFTMAX_XENT_GRAD", "DGST_QUANTIZE_GRAD",
               "DGST_RELU_MASK", "DGST_GATHER_CHANNELS", "DGST_ACTIVATION_GRAD"):
        assert op in OPS


GEOMETRIES = [  # (in_h, in_w, kernel, stride, pad_top) and c_in, c_out
    ((6, 7, 3, 1, 1), 5, 6),
    ((8, 8, 3, 2, 1), 4, 3),   # stride 2 with symmetric padding (explicit PAD + VALID)
    ((5, 5, 1, 1, 0), 9, 4),   # pointwise
]


def _geometry(spec):
    in_h, in_w, k, s, p = spec
    out_h = (in_h + 2 * p - k) // s + 1
    out_w = (in_w + 2 * p - k) // s + 1
    return R.Geometry(in_h, in_w, out_h, out_w, k, k, s, s, 1, 1, p, p)


@pytest.mark.parametrize("spec,c_in,c_out", GEOMETRIES)
def test_conv2d_input_grad_matches_reference_and_tf(ops, tmp_path, spec, c_in, c_out):
    rng = np.random.default_rng(1)
    g = _geometry(spec)
    dy = rng.integers(-127, 128, (1, g.out_h, g.out_w, c_out)).astype(np.int8)
    w = rng.integers(-127, 128, (c_out, g.kernel_h, g.kernel_w, c_in)).astype(np.int8)
    ws = rng.uniform(0.001, 0.02, c_out).astype(np.float32)
    dy_scale = np.array([0.0123], np.float32)

    def build(b):
        t_dy = b.add_tensor("dy", dy.shape, np.int8)
        t_s = b.add_tensor("dy_scale", (1,), np.float32)
        t_w = b.add_tensor("w", w.shape, np.int8, data=w)
        t_ws = b.add_tensor("ws", ws.shape, np.float32, data=ws)
        dx = b.add_tensor("dx", (1, g.in_h, g.in_w, c_in), np.float32)
        b.add_custom_op("DGST_CONV2D_INPUT_GRAD", [t_dy, t_s, t_w, t_ws], [dx],
                        int32_options(g.stride_h, g.stride_w, 1, 1, g.pad_top, g.pad_left))
        return {t_dy: dy, t_s: dy_scale}, [dx]

    dx = run_graph(ops, tmp_path, "cig", build)[0][0]
    np.testing.assert_array_equal(dx, R.conv2d_input_grad(g, dy[0], dy_scale[0], w, ws))
    # TF: dL/dx of L = sum(conv(pad(x), W_real) * dy_real)
    x = tf.Variable(tf.zeros((1, g.in_h, g.in_w, c_in)))
    w_real = (w.astype(np.float32) * ws[:, None, None, None]).transpose(1, 2, 3, 0)
    with tf.GradientTape() as tape:
        xp = tf.pad(x, [[0, 0], [g.pad_top] * 2, [g.pad_left] * 2, [0, 0]])
        y = tf.nn.conv2d(xp, w_real, g.stride_h, "VALID")
        loss = tf.reduce_sum(y * (dy.astype(np.float32) * dy_scale[0]))
    np.testing.assert_allclose(dx, tape.gradient(loss, x).numpy()[0], rtol=1e-4, atol=1e-5)


def test_dense_input_and_weight_grad_and_update(ops, tmp_path):
    """Dense layers use rank-2 tensors: dy [1, C_out], w [C_out, C_in], x [1, C_in]."""
    rng = np.random.default_rng(2)
    c_in, c_out = 12, 5
    dy = rng.integers(-127, 128, (1, c_out)).astype(np.int8)
    x = rng.integers(-128, 128, (1, c_in)).astype(np.int8)
    w0 = rng.integers(-127, 128, (c_out, c_in)).astype(np.int8)
    ws = rng.uniform(0.001, 0.02, c_out).astype(np.float32)
    dy_scale, zp, lr, x_scale = np.array([0.01], np.float32), -3, 0.5, 0.05
    kept = np.arange(c_in, dtype=np.int32)

    def build(b):
        t_dy = b.add_tensor("dy", dy.shape, np.int8)
        t_x = b.add_tensor("x", x.shape, np.int8)
        t_s = b.add_tensor("dy_scale", (1,), np.float32)
        t_w = b.add_tensor("w", w0.shape, np.int8, scale=ws, zero_point=[0] * c_out,
                           variable=True)
        t_w0 = b.add_tensor("w0", w0.shape, np.int8, data=w0)
        t_ws = b.add_tensor("ws", ws.shape, np.float32, data=ws)
        t_kept = b.add_tensor("kept", kept.shape, np.int32, data=kept)
        dx = b.add_tensor("dx", (1, c_in), np.float32)
        gw = b.add_tensor("gw", (c_out, c_in), np.int32)
        b.add_custom_op("DGST_VARIABLE_INIT", [t_w, t_w0], [])
        b.add_custom_op("DGST_CONV2D_INPUT_GRAD", [t_dy, t_s, t_w, t_ws], [dx],
                        int32_options(1, 1, 1, 1, 0, 0))
        b.add_custom_op("DGST_CONV2D_WEIGHT_GRAD", [t_x, t_dy], [gw],
                        int32_options(1, 1, 1, 1, 0, 0, zp))
        b.add_custom_op("DGST_SGD_QAS_UPDATE", [t_w, gw, t_kept, t_ws, t_s], [],
                        int32_options(0, lr, x_scale))
        return {t_dy: dy, t_x: x, t_s: dy_scale}, [dx, gw, t_w]

    dx, gw, w1 = run_graph(ops, tmp_path, "dense", build)
    g1 = R.Geometry(1, 1, 1, 1, 1, 1)
    w4 = w0[:, None, None, :]
    np.testing.assert_array_equal(dx[0], R.conv2d_input_grad(g1, dy.reshape(1, 1, -1),
                                                             dy_scale[0], w4, ws).reshape(-1))
    want_gw = R.conv2d_weight_grad(g1, x.reshape(1, 1, -1), zp, dy.reshape(1, 1, -1))
    np.testing.assert_array_equal(gw, want_gw.reshape(c_out, c_in))
    np.testing.assert_array_equal(
        gw, np.outer(dy[0].astype(np.int64), x[0].astype(np.int64) - zp))  # autodiff of y=Wx
    want_w = R.sgd_qas_update_conv(w4, kept, want_gw, lr, x_scale, dy_scale[0], ws)
    np.testing.assert_array_equal(w1, want_w.reshape(c_out, c_in))


@pytest.mark.parametrize("spec", [(7, 6, 3, 1, 1), (8, 8, 3, 2, 1)])
def test_depthwise_input_and_weight_grad(ops, tmp_path, spec):
    rng = np.random.default_rng(3)
    g, c = _geometry(spec), 6
    kept = np.array([0, 2, 5], np.int32)
    dy = rng.integers(-127, 128, (1, g.out_h, g.out_w, c)).astype(np.int8)
    w = rng.integers(-127, 128, (1, g.kernel_h, g.kernel_w, c)).astype(np.int8)
    x = rng.integers(-128, 128, (1, g.in_h, g.in_w, c)).astype(np.int8)
    ws = rng.uniform(0.001, 0.02, c).astype(np.float32)
    dy_scale, zp = np.array([0.02], np.float32), 5
    geo = (g.stride_h, g.stride_w, 1, 1, g.pad_top, g.pad_left)

    def build(b):
        t_dy = b.add_tensor("dy", dy.shape, np.int8)
        t_x = b.add_tensor("x", x.shape, np.int8)
        t_s = b.add_tensor("dy_scale", (1,), np.float32)
        t_w = b.add_tensor("w", w.shape, np.int8, data=w)
        t_ws = b.add_tensor("ws", ws.shape, np.float32, data=ws)
        t_kept = b.add_tensor("kept", kept.shape, np.int32, data=kept)
        xk = b.add_tensor("x_kept", (1, g.in_h, g.in_w, len(kept)), np.int8)
        dx = b.add_tensor("dx", x.shape, np.float32)
        gw = b.add_tensor("gw", (g.kernel_h, g.kernel_w, len(kept)), np.int32)
        b.add_custom_op("DGST_GATHER_CHANNELS", [t_x, t_kept], [xk])
        b.add_custom_op("DGST_DEPTHWISE_INPUT_GRAD", [t_dy, t_s, t_w, t_ws], [dx],
                        int32_options(*geo))
        b.add_custom_op("DGST_DEPTHWISE_WEIGHT_GRAD", [xk, t_kept, t_dy], [gw],
                        int32_options(*geo, zp))
        return {t_dy: dy, t_x: x, t_s: dy_scale}, [dx, gw, xk]

    dx, gw, xk = run_graph(ops, tmp_path, "dw", build)
    np.testing.assert_array_equal(xk[0], R.gather_channels(x[0], kept))
    np.testing.assert_array_equal(dx[0], R.depthwise_input_grad(g, dy[0], dy_scale[0], w, ws))
    np.testing.assert_array_equal(gw, R.depthwise_weight_grad(g, xk[0], kept, zp, dy[0]))
    # TF autodiff of L = sum(depthwise(pad(x_real), W_real) * dy_real)
    xv = tf.Variable(x.astype(np.float32) - zp)
    wv = tf.Variable((w[0].astype(np.float32))[:, :, :, None])
    with tf.GradientTape() as tape:
        xp = tf.pad(xv, [[0, 0], [g.pad_top] * 2, [g.pad_left] * 2, [0, 0]])
        y = tf.nn.depthwise_conv2d(xp, wv * ws[None, None, :, None], [1, g.stride_h,
                                                                       g.stride_w, 1], "VALID")
        loss = tf.reduce_sum(y * (dy.astype(np.float32) * dy_scale[0]))
    d_x, d_w = tape.gradient(loss, [xv, wv])
    # dL/dW_bar = ws * dy_scale * grad_int (exact integers before scaling)
    np.testing.assert_allclose(gw * ws[kept] * dy_scale[0], d_w.numpy()[:, :, kept, 0],
                               rtol=1e-5)
    # the input gradient in real units: d/dx_real = d/d(x - zp)
    np.testing.assert_allclose(dx[0], d_x.numpy()[0], rtol=1e-4, atol=1e-5)


def test_softmax_xent_grad_matches_reference_and_tf(ops, tmp_path):
    rng = np.random.default_rng(4)
    logits = rng.integers(-128, 128, (3, 1, 10)).astype(np.int8)
    labels = np.array([[3], [0], [9]], np.int32)
    scale, zp = 0.11, -7

    def build(b):
        t_l = b.add_tensor("logits", (1, 10), np.int8)
        t_y = b.add_tensor("label", (1,), np.int32)
        grad = b.add_tensor("grad", (1, 10), np.float32)
        loss = b.add_tensor("loss", (1,), np.float32)
        b.add_custom_op("DGST_SOFTMAX_XENT_GRAD", [t_l, t_y], [grad, loss],
                        int32_options(scale, zp))
        return {t_l: logits, t_y: labels}, [grad, loss]

    grad, loss = run_graph(ops, tmp_path, "xent", build)
    for i in range(3):
        want_loss, want_grad = R.softmax_xent_grad(logits[i, 0], np.float32(scale), zp,
                                                   labels[i, 0])
        np.testing.assert_allclose(loss[i, 0], want_loss, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(grad[i, 0], want_grad, atol=1e-6)
        z = tf.Variable(np.float32(scale) * (logits[i].astype(np.float32) - zp))
        with tf.GradientTape() as tape:
            l = tf.nn.sparse_softmax_cross_entropy_with_logits(labels[i], z)
        np.testing.assert_allclose(grad[i, 0], tape.gradient(l, z).numpy()[0], atol=1e-6)


def test_softmax_xent_rejects_a_bad_label(ops, tmp_path):
    def build(b):
        t_l = b.add_tensor("logits", (1, 4), np.int8)
        t_y = b.add_tensor("label", (1,), np.int32)
        grad = b.add_tensor("grad", (1, 4), np.float32)
        loss = b.add_tensor("loss", (1,), np.float32)
        b.add_custom_op("DGST_SOFTMAX_XENT_GRAD", [t_l, t_y], [grad, loss],
                        int32_options(0.1, 0))
        return {t_l: np.zeros((1, 4), np.int8), t_y: np.array([4], np.int32)}, [grad, loss]

    with pytest.raises(TflmError, match=r"DGST_SOFTMAX_XENT_GRAD: label 4 is not a class "
                                        r"index in \[0, 4\)"):
        run_graph(ops, tmp_path, "badlabel", build)


def test_relu_mask_then_quantize_grad(ops, tmp_path):
    """Mask built from an int8 ReLU6 output in the forward pass, applied to the float
    gradient in the backward pass, then quantized: as tf.nn.relu6's gradient."""
    rng = np.random.default_rng(5)
    shape, lo, hi = (1, 3, 5, 7), -128, 127  # ReLU6 output codes: real 0 -> -128, 6 -> 127
    y = rng.integers(-128, 128, shape).astype(np.int8)
    y.flat[:20] = -128
    y.flat[20:30] = 127
    g = rng.normal(size=shape).astype(np.float32)
    n = y.size

    def build(b):
        t_y = b.add_tensor("y", shape, np.int8)
        t_g = b.add_tensor("g", shape, np.float32)
        mask = b.add_tensor("mask", ((n + 7) // 8,), np.uint8)
        q = b.add_tensor("dy", shape, np.int8)
        s = b.add_tensor("dy_scale", (1,), np.float32)
        b.add_custom_op("DGST_RELU_MASK", [t_y], [mask], int32_options(lo, hi))
        b.add_custom_op("DGST_QUANTIZE_GRAD", [t_g, mask], [q, s])
        return {t_y: y, t_g: g}, [mask, q, s]

    mask, q, s = run_graph(ops, tmp_path, "mask", build)
    want_mask = R.build_mask(y, lo, hi)
    np.testing.assert_array_equal(mask, want_mask)
    want_q, want_s = R.quantize_grad(R.apply_mask(g, want_mask))
    np.testing.assert_array_equal(q.reshape(-1), want_q)
    assert s[0] == want_s
    # the mask is relu6's derivative at the real values of y
    real = (y.astype(np.float32) + 128) * (6 / 255)
    x = tf.Variable(real)
    with tf.GradientTape() as tape:
        out = tf.reduce_sum(tf.nn.relu6(x) * g)
    np.testing.assert_allclose(R.apply_mask(g, want_mask), tape.gradient(out, x).numpy()
                               .reshape(-1), atol=0)


def test_quantize_grad_without_mask_and_prepare_errors(ops, tmp_path):
    g = np.array([[0.5, -1.0, 0.25, 0.0, 2.0]], np.float32)

    def build(b):
        t_g = b.add_tensor("g", g.shape, np.float32)
        q = b.add_tensor("dy", g.shape, np.int8)
        s = b.add_tensor("s", (1,), np.float32)
        b.add_custom_op("DGST_QUANTIZE_GRAD", [t_g, -1], [q, s])
        return {t_g: g}, [q, s]

    q, s = run_graph(ops, tmp_path, "quant", build)
    want_q, want_s = R.quantize_grad(g)
    np.testing.assert_array_equal(q.reshape(-1), want_q)
    assert s[0] == want_s

    def bad_mask(b):
        t_g = b.add_tensor("g", (1, 20), np.float32)
        mask = b.add_tensor("mask", (2,), np.uint8)
        q = b.add_tensor("dy", (1, 20), np.int8)
        s = b.add_tensor("s", (1,), np.float32)
        b.add_custom_op("DGST_QUANTIZE_GRAD", [t_g, mask], [q, s])
        return {t_g: np.zeros((1, 20), np.float32), mask: np.zeros(2, np.uint8)}, [q]

    with pytest.raises(TflmError, match=r"DGST_QUANTIZE_GRAD: input 1 \(mask\) must have 3 "
                                        r"bytes"):
        run_graph(ops, tmp_path, "badmask", bad_mask)


def test_gather_channels_checks_kept_at_runtime(ops, tmp_path):
    x = np.arange(24, dtype=np.int8).reshape(1, 2, 3, 4)

    def build(b, kept):
        def f(b):
            t_x = b.add_tensor("x", x.shape, np.int8)
            t_k = b.add_tensor("kept", (2,), np.int32)
            out = b.add_tensor("out", (1, 2, 3, 2), np.int8)
            b.add_custom_op("DGST_GATHER_CHANNELS", [t_x, t_k], [out])
            return {t_x: x, t_k: np.array(kept, np.int32)}, [out]
        return f

    out = run_graph(ops, tmp_path, "gather", build(None, [3, 1]))[0]
    np.testing.assert_array_equal(out, x[..., [3, 1]])
    with pytest.raises(TflmError, match=r"DGST_GATHER_CHANNELS: kept\[1\] = 4 is not a "
                                        r"channel index in \[0, 4\)"):
        run_graph(ops, tmp_path, "gather_bad", build(None, [0, 4]))


def test_input_grad_prepare_errors(ops, tmp_path):
    def build(b):
        t_dy = b.add_tensor("dy", (1, 4, 4, 3), np.int8)
        t_s = b.add_tensor("dy_scale", (1,), np.float32)
        t_w = b.add_tensor("w", (3, 3, 3, 2), np.int8, data=np.zeros((3, 3, 3, 2), np.int8))
        t_ws = b.add_tensor("ws", (3,), np.float32, data=np.ones(3, np.float32))
        dx = b.add_tensor("dx", (1, 9, 9, 2), np.float32)  # 9x9 -> 4x4 needs stride 2
        b.add_custom_op("DGST_CONV2D_INPUT_GRAD", [t_dy, t_s, t_w, t_ws], [dx],
                        int32_options(1, 1, 1, 1, 1, 1))
        return {t_dy: np.zeros((1, 4, 4, 3), np.int8), t_s: np.ones(1, np.float32)}, [dx]

    with pytest.raises(TflmError, match=r"DGST_CONV2D_INPUT_GRAD: height sizes are not a "
                                        r"convolution: input 9, output 4"):
        run_graph(ops, tmp_path, "badgeo", build)


@pytest.mark.parametrize("policy", ["window", "magnitude"])
@pytest.mark.parametrize("depthwise", [False, True])
def test_select_channels_window_and_float_magnitude_on_device(ops, tmp_path, policy, depthwise):
    rng = np.random.default_rng(6)
    c_in, k, steps = 10, 4, 5
    shape = (1, 3, 3, c_in) if depthwise else (6, 1, 1, c_in)
    w = rng.integers(-127, 128, shape).astype(np.int8)
    ws = rng.uniform(0.001, 0.02, c_in if depthwise else 6).astype(np.float32)

    def build(b):
        t_x = b.add_tensor("x", (1,), np.float32)  # a dummy input: one Invoke per step
        t_w = b.add_tensor("w", shape, np.int8, data=w)
        t_ws = b.add_tensor("ws", ws.shape, np.float32, data=ws)
        step = (b.add_tensor("step", (1,), np.int32, variable=True)
                if policy == "window" else -1)
        kept = b.add_tensor("kept", (k,), np.int32)
        b.add_custom_op("DGST_SELECT_CHANNELS", [t_w, t_ws, step], [kept],
                        int32_options(0 if policy == "window" else 1, int(depthwise)))
        return {t_x: np.zeros((steps, 1), np.float32)}, [kept]

    kept = run_graph(ops, tmp_path, f"select_{policy}", build)[0]
    for s in range(steps):
        want = (R.select_window(s, c_in, k) if policy == "window"
                else R.select_magnitude(w, ws, k, depthwise))
        np.testing.assert_array_equal(kept[s], want)
    if policy == "window":  # every channel is visited within ceil(c_in / k) steps
        assert set(kept[:3].ravel().tolist()) == set(range(c_in))


@pytest.mark.parametrize("policy", ["traversal", "magnitude"])
@pytest.mark.parametrize("depthwise", [False, True])
def test_dgsu_selection_on_device_equals_the_reference(ops, tmp_path, policy, depthwise):
    """DGSU selection with integer importance: N Invokes = N steps of the reference, the
    visited bitmask persisting in the arena; traversal covers all channels every sweep."""
    rng = np.random.default_rng(7)
    c_in, k, steps = 11, 3, 13
    shape = (1, 3, 3, c_in) if depthwise else (5, 1, 2, c_in)
    w = rng.integers(-127, 128, shape).astype(np.int8)
    w[..., 4] = w[..., 2]  # equal scores: the lower index must win
    m = R.score_multipliers(rng.uniform(0.001, 0.02, c_in if depthwise else 5))

    def build(b):
        t_x = b.add_tensor("x", (1,), np.float32)  # a dummy input: one Invoke per step
        t_w = b.add_tensor("w", shape, np.int8, data=w)
        t_m = b.add_tensor("m", m.shape, np.int32, data=m)
        mask = (b.add_tensor("visited", ((c_in + 7) // 8,), np.uint8, variable=True)
                if policy == "traversal" else -1)
        kept = b.add_tensor("kept", (k,), np.int32)
        b.add_custom_op("DGST_SELECT_CHANNELS", [t_w, t_m, mask], [kept],
                        int32_options(2 if policy == "traversal" else 1, int(depthwise)))
        return {t_x: np.zeros((steps, 1), np.float32)}, [kept]

    kept = run_graph(ops, tmp_path, f"dgsu_{policy}_{depthwise}", build)[0]
    visited = np.zeros(2, np.uint8) if policy == "traversal" else None
    for s in range(steps):
        want, visited = R.select_channels(w, m, k, depthwise, visited)
        np.testing.assert_array_equal(kept[s], want, err_msg=f"step {s}")
    if policy == "traversal":  # sweeps of ceil(11 / 3) = 4 steps cover every channel
        assert set(kept[:4].ravel().tolist()) == set(range(c_in))
        assert len(set(kept[:3].ravel().tolist())) == 9
    else:
        assert (kept == kept[0]).all()


def test_quantize_grad_broadcast_mode_equals_the_materialized_pooling_gradient(ops, tmp_path):
    """With a factor input, DGST_QUANTIZE_GRAD quantizes g[c] * factor broadcast over the
    pixels (the gradient of a global average pooling's input) without the float tensor:
    bit-identical to MUL by 1/pixels, mask, then quantize."""
    rng = np.random.default_rng(8)
    shape = (1, 3, 4, 5)
    g = rng.normal(size=(1, 5)).astype(np.float32)
    y = rng.integers(-128, 128, shape).astype(np.int8)
    factor = np.float32(1.0 / 12)
    n = y.size

    def build(b):
        t_y = b.add_tensor("y", shape, np.int8)
        t_g = b.add_tensor("g", g.shape, np.float32)
        t_f = b.add_tensor("factor", (1,), np.float32, data=np.array([factor]))
        mask = b.add_tensor("mask", ((n + 7) // 8,), np.uint8)
        q = b.add_tensor("dy", shape, np.int8)
        s = b.add_tensor("dy_scale", (1,), np.float32)
        b.add_custom_op("DGST_RELU_MASK", [t_y], [mask], int32_options(-100, 100))
        b.add_custom_op("DGST_QUANTIZE_GRAD", [t_g, mask, t_f], [q, s])
        return {t_y: y, t_g: g}, [mask, q, s]

    mask, q, s = run_graph(ops, tmp_path, "broadcast", build)
    dense = (np.broadcast_to(g.reshape(1, 1, 1, 5), shape) * factor).astype(np.float32)
    want_q, want_s = R.quantize_grad(R.apply_mask(dense, mask))
    np.testing.assert_array_equal(q.reshape(-1), want_q)
    assert s[0] == want_s and np.count_nonzero(q) > 0

    def bad_factor(b):
        t_g = b.add_tensor("g", (1, 4), np.float32)
        t_f = b.add_tensor("factor", (2,), np.float32, data=np.ones(2, np.float32))
        q = b.add_tensor("dy", (1, 2, 2, 4), np.int8)
        s = b.add_tensor("s", (1,), np.float32)
        b.add_custom_op("DGST_QUANTIZE_GRAD", [t_g, -1, t_f], [q, s])
        return {t_g: np.zeros((1, 4), np.float32)}, [q]

    with pytest.raises(TflmError, match=r"DGST_QUANTIZE_GRAD: broadcast mode needs input 2 "
                                        r"\(factor\) with one element"):
        run_graph(ops, tmp_path, "badfactor", bad_factor)


FUSED_CASES = [  # x (H, W, C), conv (C_mid, K, stride), dw (K, stride), C_out
    ((9, 7, 3), (10, 3, 2), (3, 1), 5),
    ((8, 8, 4), (12, 1, 1), (3, 2), 6),   # MobileNetV2 block with stride-2 depthwise
    ((6, 5, 5), (7, 1, 1), (5, 1), 3),    # 5x5 depthwise, odd sizes
]


def fused_block_options(stages, g):
    """DGST_FUSED_BLOCK's custom options for R.fused_block_case's stages and geometry."""
    return int32_options(*g["mid_hw"], *g["conv_stride"], *g["conv_pad"], *g["dw_stride"],
                         *g["dw_pad"], -stages[0].input_offset,
                         *[s.output_offset for s in stages],
                         *[v for s in stages for v in (s.act_min, s.act_max)])


@pytest.mark.parametrize("x_shape,conv_spec,dw_spec,c_out", FUSED_CASES)
def test_fused_block_matches_reference(ops, tmp_path, x_shape, conv_spec, dw_spec, c_out):
    rng = np.random.default_rng(11)
    x, stages, geometry = R.fused_block_case(rng, x_shape, conv_spec, dw_spec, c_out)
    options = fused_block_options(stages, geometry)
    want = R.fused_block(x, *stages, **geometry)
    assert len(np.unique(want)) > 10  # requantization leaves a spread of codes

    def build(b):
        t_x = b.add_tensor("x", (1, *x.shape), np.int8)
        inputs = [t_x]
        for n, s in enumerate(stages):
            inputs.append(b.add_tensor(f"w{n}", s.weights.shape, np.int8, data=s.weights))
            requant = np.stack([s.bias, s.multiplier, s.shift]).astype(np.int32)
            inputs.append(b.add_tensor(f"q{n}", requant.shape, np.int32, data=requant))
        y = b.add_tensor("y", (1, *want.shape), np.int8)
        b.add_custom_op("DGST_FUSED_BLOCK", inputs, [y], options)
        return {t_x: x[None]}, [y]

    (got,) = run_graph(ops, tmp_path, "fused", build)
    np.testing.assert_array_equal(got[0], want)


def test_scatter_channels_matches_reference(ops, tmp_path):
    rng = np.random.default_rng(12)
    base = rng.integers(-127, 128, (4, 3, 3, 9)).astype(np.int8)
    src = rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)
    kept = np.array([7, 0, 4], np.int32)

    def build(b):
        t_b = b.add_tensor("base", base.shape, np.int8, data=base)
        t_s = b.add_tensor("src", src.shape, np.int8)
        t_k = b.add_tensor("kept", (3,), np.int32, data=kept)
        out = b.add_tensor("out", base.shape, np.int8)
        b.add_custom_op("DGST_SCATTER_CHANNELS", [t_b, t_s, t_k], [out])
        return {t_s: src}, [out]

    (got,) = run_graph(ops, tmp_path, "scatter", build)
    np.testing.assert_array_equal(got, R.scatter_channels(base, src, kept))
    assert np.array_equal(got[..., kept], src) and np.array_equal(got[..., 1], base[..., 1])


@pytest.mark.parametrize("kind, quantizations", [
    ("swish", [(0.05, -10), (1 / 256, -128), (0.03, -118)]),
    ("hard_swish", [(0.05, -10), (0.04, -117)]),
    ("hard_swish", [(0.3, 90), (0.25, -110)]),  # far beyond +-3: saturating branches
    ("sigmoid", [(0.08, 5), (1 / 256, -128)]),
])
def test_activation_forward_table_is_tflm_and_activation_grad_is_the_reference(
        ops, tmp_path, kind, quantizations):
    """TFLM's builtin int8 ops (LOGISTIC + MUL, HARD_SWISH, LOGISTIC) on all 256 input
    codes give the Keras simulation's forward table (computed with TFLite's reference
    kernels), and DGST_ACTIVATION_GRAD in the same graph is the NumPy reference bit for bit
    with the derivative table of the input quantization."""
    from dgst_tf.export.tflite_file import schema
    from dgst_tf.training.int8_activations import derivative_table, forward_table

    rng = np.random.default_rng(11)
    codes = np.arange(-128, 128).astype(np.int8).reshape(1, 16, 16, 1)
    g = rng.normal(size=codes.shape).astype(np.float32)
    g.flat[:2] = [-0.0, 0.0]
    table = derivative_table(kind, *quantizations[0])

    def build(b):
        t = [b.add_tensor(f"t{i}", codes.shape, np.int8, scale=s, zero_point=z)
             for i, (s, z) in enumerate(quantizations)]
        if kind == "swish":
            b.add_builtin_op(schema.BuiltinOperator.LOGISTIC, [t[0]], [t[1]])
            b.add_builtin_op(schema.BuiltinOperator.MUL, [t[0], t[1]], [t[2]],
                             schema.BuiltinOptions.MulOptions, schema.MulOptionsT())
        else:
            op = {"hard_swish": "HARD_SWISH", "sigmoid": "LOGISTIC"}[kind]
            b.add_builtin_op(getattr(schema.BuiltinOperator, op), [t[0]], [t[1]])
        t_g = b.add_tensor("g", codes.shape, np.float32)
        t_table = b.add_tensor("table", (256,), np.float32, data=table)
        dx = b.add_tensor("dx", codes.shape, np.float32)
        b.add_custom_op("DGST_ACTIVATION_GRAD", [t_g, t[0], t_table], [dx])
        return {t[0]: codes, t_g: g}, [t[-1], dx]

    y, dx = run_graph(ops, tmp_path, f"act_{kind}", build)
    np.testing.assert_array_equal(y.reshape(-1), forward_table(kind, quantizations))
    want = R.activation_grad(g, codes, table)
    np.testing.assert_array_equal(dx.reshape(-1).view(np.uint32), want.view(np.uint32))


def test_activation_grad_prepare_errors(ops, tmp_path):
    def build(b):
        x = b.add_tensor("x", (1, 8), np.int8, scale=0.1, zero_point=0)
        g = b.add_tensor("g", (1, 8), np.float32)
        table = b.add_tensor("table", (255,), np.float32, data=np.zeros(255, np.float32))
        dx = b.add_tensor("dx", (1, 8), np.float32)
        b.add_custom_op("DGST_ACTIVATION_GRAD", [g, x, table], [dx])
        return {x: np.zeros((1, 8), np.int8), g: np.zeros((1, 8), np.float32)}, [dx]

    with pytest.raises(TflmError, match=r"DGST_ACTIVATION_GRAD: input 2 \(table\) must have "
                                        r"256 entries"):
        run_graph(ops, tmp_path, "act_bad", build)
