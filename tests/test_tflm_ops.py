"""dgst custom TFLM ops in the pip interpreter, against NumPy and TensorFlow autodiff.

Each test builds a one-op `.tflite` through the flatbuffer object API and runs it in TFLM in
a child process. The module fixture checks the wheel's ABI before any kernel runs.
"""
import dataclasses
import shutil

import numpy as np
import pytest

from dgst_tf.core.tflite_builder import ModelBuilder, int32_options
from dgst_tf.export.tflm.abi_check import check_abi
from dgst_tf.export.tflm.ops_loader import host_ops
from dgst_tf.export.tflm.runner import TflmError, run_tflm
from dgst_tf.core.keras_compat import tf


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    built = host_ops()  # make -C tflm_ops/tflm if the sources changed
    # a private copy: tflm_ops/build is shared with other builds that may clean it
    library = tmp_path_factory.mktemp("tflm_ops") / built.library.name
    shutil.copy2(built.library, library)
    check_abi(library)  # the layout assumptions hold before any kernel runs
    return dataclasses.replace(built, library=library)


def run_op(ops, tmp_path, op, inputs, outputs, options=b"", name=None):
    """Run custom ``op`` once per stacked input; ``inputs``: arrays (graph inputs; with a
    leading invocation axis) and ``outputs``: (shape, dtype)."""
    b = ModelBuilder()
    graph_inputs = [b.add_tensor(f"in{i}", x.shape[1:], x.dtype) for i, x in enumerate(inputs)]
    graph_outputs = [b.add_tensor(f"out{i}", shape, dtype)
                     for i, (shape, dtype) in enumerate(outputs)]
    b.add_custom_op(op, graph_inputs, graph_outputs, options)
    path = tmp_path / f"{name or op.lower()}.tflite"
    path.write_bytes(b.build(graph_inputs, graph_outputs))
    return run_tflm(path, list(inputs), libraries=[ops.library], registerers=ops.registerers)


def int8(rng, shape, low=-128, high=128):
    return rng.integers(low, high, shape).astype(np.int8)


# ------------------------------------------------------------------------- DGST_BIAS_GRAD

def test_bias_grad_matches_numpy_and_tf_autodiff(ops, tmp_path):
    rng = np.random.default_rng(0)
    dy = int8(rng, (3, 1, 5, 6, 8))  # three invocations of a [1, 5, 6, 8] dy
    result = run_op(ops, tmp_path, "DGST_BIAS_GRAD", [dy], [((8,), np.int32)],
                    int32_options())
    grad = result.outputs[0]
    assert grad.dtype == np.int32 and grad.shape == (3, 8)
    np.testing.assert_array_equal(grad, dy.astype(np.int32).sum(axis=(1, 2, 3)))

    # TF: y = conv(x) + b; dL/db for the upstream gradient dy is the sum of dy over pixels
    x = tf.constant(rng.normal(size=(1, 7, 8, 3)), tf.float32)
    kernel = tf.constant(rng.normal(size=(3, 3, 3, 8)), tf.float32)
    bias = tf.Variable(tf.zeros(8))
    for i in range(3):
        with tf.GradientTape() as tape:
            y = tf.nn.bias_add(tf.nn.conv2d(x, kernel, 1, "VALID"), bias)  # [1, 5, 6, 8]
            loss = tf.reduce_sum(y * tf.constant(dy[i], tf.float32))
        np.testing.assert_array_equal(grad[i], tape.gradient(loss, bias).numpy())


def test_bias_grad_extremes_and_dense_shapes(ops, tmp_path):
    # 1024 pixels of -128 and of 127: past the core's 16-bit lanes (flushed every 256 pixels)
    dy = np.stack([np.full((1, 32, 32, 5), -128, np.int8), np.full((1, 32, 32, 5), 127, np.int8)])
    grad = run_op(ops, tmp_path, "DGST_BIAS_GRAD", [dy], [((5,), np.int32)]).outputs[0]
    np.testing.assert_array_equal(grad, [[-128 * 1024] * 5, [127 * 1024] * 5])
    dense_dy = np.array([[3, -7, 127, -128, 0]], np.int8)  # a Dense layer's [1, C]
    grad = run_op(ops, tmp_path, "DGST_BIAS_GRAD", [dense_dy[None]], [((5,), np.int32)],
                  name="dense").outputs[0]
    np.testing.assert_array_equal(grad[0], dense_dy[0])


def test_bias_grad_prepare_errors(ops, tmp_path):
    dy = np.zeros((1, 1, 2, 2, 8), np.int8)
    with pytest.raises(TflmError, match=r"DGST_BIAS_GRAD: output 0 \(grad\) must have shape "
                                        r"\[8\] \(the channels of dy\), got \[7\]"):
        run_op(ops, tmp_path, "DGST_BIAS_GRAD", [dy], [((7,), np.int32)], name="shape")
    with pytest.raises(TflmError, match=r"DGST_BIAS_GRAD: input 0 \(dy\) must be int8, got "
                                        r"int16"):
        run_op(ops, tmp_path, "DGST_BIAS_GRAD", [dy.astype(np.int16)], [((8,), np.int32)],
               name="dtype")
    with pytest.raises(TflmError, match=r"DGST_BIAS_GRAD: output 0 \(grad\) must be int32, "
                                        r"got float32"):
        run_op(ops, tmp_path, "DGST_BIAS_GRAD", [dy], [((8,), np.float32)], name="out_dtype")
    with pytest.raises(TflmError, match=r"format version 2 is not supported"):
        run_op(ops, tmp_path, "DGST_BIAS_GRAD", [dy], [((8,), np.int32)],
               np.array([2], "<i4").tobytes(), name="version")


# ---------------------------------------------------------------- DGST_CONV2D_WEIGHT_GRAD

def weight_grad_numpy(x, dy, zp, kh, kw, stride, dilation, pad):
    """grad[o, i, j, c] from the definition in dgst_train_kernels.h."""
    _, in_h, in_w, k = x.shape
    _, out_h, out_w, c_out = dy.shape
    xr = x[0].astype(np.int64) - zp
    grad = np.zeros((c_out, kh, kw, k), np.int64)
    for i in range(kh):
        for j in range(kw):
            for oy in range(out_h):
                iy = oy * stride[0] - pad[0] + i * dilation[0]
                if not 0 <= iy < in_h:
                    continue
                for ox in range(out_w):
                    ix = ox * stride[1] - pad[1] + j * dilation[1]
                    if 0 <= ix < in_w:
                        grad[:, i, j, :] += np.outer(dy[0, oy, ox].astype(np.int64), xr[iy, ix])
    return grad


def weight_grad_tf(x, dy, zp, kh, kw, stride, dilation, pad):
    """dL/dW of L = sum(conv2d(x - zp, W) * dy), transposed from HWIO to OHWI."""
    _, in_h, in_w, k = x.shape
    _, out_h, out_w, c_out = dy.shape
    xr = x.astype(np.float32) - zp
    # explicit padding; a negative implied trailing pad means unused trailing rows/columns
    ends = [(out - 1) * s + (kern - 1) * d + 1 - size - p for out, s, kern, d, size, p in
            ((out_h, stride[0], kh, dilation[0], in_h, pad[0]),
             (out_w, stride[1], kw, dilation[1], in_w, pad[1]))]
    xr = xr[:, :in_h + min(ends[0], 0), :in_w + min(ends[1], 0)]
    xr = np.pad(xr, [(0, 0), (pad[0], max(ends[0], 0)), (pad[1], max(ends[1], 0)), (0, 0)])
    weights = tf.Variable(tf.zeros((kh, kw, k, c_out)))
    with tf.GradientTape() as tape:
        y = tf.nn.conv2d(tf.constant(xr), weights, stride, "VALID", dilations=dilation)
        assert tuple(y.shape) == dy.shape
        loss = tf.reduce_sum(y * tf.constant(dy, tf.float32))
    return np.transpose(tape.gradient(loss, weights).numpy(), (3, 0, 1, 2))


# (in_h, in_w, k, c_out, kh, kw, stride, dilation, pad_top_left, out_h, out_w)
GEOMETRIES = {
    "3x3-same": (6, 5, 3, 4, 3, 3, (1, 1), (1, 1), (1, 1), 6, 5),
    "3x3-s2-torchvision-pad": (8, 8, 2, 3, 3, 3, (2, 2), (1, 1), (1, 1), 4, 4),
    "3x3-s2-tf-same": (8, 8, 2, 3, 3, 3, (2, 2), (1, 1), (0, 0), 4, 4),
    "1x1-pointwise": (4, 4, 5, 6, 1, 1, (1, 1), (1, 1), (0, 0), 4, 4),
    "3x3-dilation2-valid": (7, 7, 2, 2, 3, 3, (1, 1), (2, 2), (0, 0), 3, 3),
    "3x1-s2x1-unused-row": (8, 5, 3, 2, 3, 1, (2, 1), (1, 1), (0, 0), 3, 5),
}


@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_conv2d_weight_grad_matches_numpy_and_tf_autodiff(ops, tmp_path, geometry):
    in_h, in_w, k, c_out, kh, kw, stride, dilation, pad, out_h, out_w = geometry
    rng = np.random.default_rng(in_h * 100 + k)
    zp = -5
    x = int8(rng, (2, 1, in_h, in_w, k))
    dy = int8(rng, (2, 1, out_h, out_w, c_out))
    options = int32_options(*stride, *dilation, *pad, zp)
    result = run_op(ops, tmp_path, "DGST_CONV2D_WEIGHT_GRAD", [x, dy],
                    [((c_out, kh, kw, k), np.int32)], options)
    grad = result.outputs[0]
    assert grad.dtype == np.int32 and grad.shape == (2, c_out, kh, kw, k)
    for i in range(2):
        args = (x[i], dy[i], zp, kh, kw, stride, dilation, pad)
        np.testing.assert_array_equal(grad[i], weight_grad_numpy(*args))
        np.testing.assert_array_equal(grad[i], weight_grad_tf(*args))


def test_conv2d_weight_grad_prepare_errors(ops, tmp_path):
    x = np.zeros((1, 1, 8, 8, 2), np.int8)
    dy = np.zeros((1, 1, 4, 4, 3), np.int8)
    good = int32_options(2, 2, 1, 1, 1, 1, 0)
    with pytest.raises(TflmError, match=r"DGST_CONV2D_WEIGHT_GRAD: custom options must be 8 "
                                        r"little-endian int32 words \(32 bytes"):
        run_op(ops, tmp_path, "DGST_CONV2D_WEIGHT_GRAD", [x, dy], [((3, 3, 3, 2), np.int32)],
               int32_options(2, 2), name="short_options")
    with pytest.raises(TflmError, match=r"stride 0x2, dilation 1x1 \(must be >= 1\)"):
        run_op(ops, tmp_path, "DGST_CONV2D_WEIGHT_GRAD", [x, dy], [((3, 3, 3, 2), np.int32)],
               int32_options(0, 2, 1, 1, 1, 1, 0), name="stride")
    with pytest.raises(TflmError, match=r"output 0 \(grad\) must have shape \[c_out=3, kh, kw, "
                                        r"k=2\], got \[3, 3, 3, 4\]"):
        run_op(ops, tmp_path, "DGST_CONV2D_WEIGHT_GRAD", [x, dy], [((3, 3, 3, 4), np.int32)],
               good, name="grad_shape")
    with pytest.raises(TflmError, match=r"height sizes are not a convolution: input 8, output "
                                        r"6, kernel 3, stride 2"):
        run_op(ops, tmp_path, "DGST_CONV2D_WEIGHT_GRAD",
               [x, np.zeros((1, 1, 6, 4, 3), np.int8)], [((3, 3, 3, 2), np.int32)], good,
               name="geometry")
    with pytest.raises(TflmError, match=r"batch size must be 1, got x_kept batch 2"):
        run_op(ops, tmp_path, "DGST_CONV2D_WEIGHT_GRAD",
               [np.zeros((1, 2, 8, 8, 2), np.int8), dy], [((3, 3, 3, 2), np.int32)], good,
               name="batch")
    with pytest.raises(TflmError, match=r"expected 2 inputs and 1 outputs, the node has 1"):
        run_op(ops, tmp_path, "DGST_CONV2D_WEIGHT_GRAD", [x], [((3, 3, 3, 2), np.int32)], good,
               name="arity")


# ------------------------------------------- DGST_VARIABLE_INIT + DGST_SGD_QAS_UPDATE

def round_half_away(x):
    """C99 roundf on float32 values, as the cores do it (no float32 `x + 0.5` rounding)."""
    x = np.asarray(x, np.float32)
    t = np.trunc(x)
    frac = x - t
    return (t + (frac >= 0.5) - (frac <= -0.5)).astype(np.int64)


def sgd_conv_numpy(w, grad, kept, lr, x_scale, dy_scale, ws, depthwise=False):
    """The float32 operation order of tflm_ops/core/sgd_qas_update.c."""
    f32 = np.float32
    base = f32(f32(f32(lr) * f32(x_scale)) * f32(dy_scale))
    w = w.astype(np.int64).copy()
    for c, channel in enumerate(kept):
        if depthwise:  # w [1, kh, kw, C], grad [kh, kw, k]
            factor = f32(base / f32(ws[channel]))
            s = np.clip(f32(factor) * grad[:, :, c].astype(f32), -1024, 1024)
            w[0, :, :, channel] = np.clip(w[0, :, :, channel] - round_half_away(s), -127, 127)
        else:  # w [c_out, kh, kw, c_in], grad [c_out, kh, kw, k]
            factor = (base / ws.astype(f32)).astype(f32)[:, None, None]
            s = np.clip(factor * grad[..., c].astype(f32), -1024, 1024)
            w[..., channel] = np.clip(w[..., channel] - round_half_away(s), -127, 127)
    return w.astype(np.int8)


def sgd_bias_numpy(b, grad, lr, x_scale, dy_scale, ws):
    f32 = np.float32
    base = f32(f32(lr) * f32(dy_scale))
    v = (base * grad.astype(f32)).astype(f32) / (ws.astype(f32) * f32(x_scale)).astype(f32)
    step = np.where(np.abs(v) >= 2**23, np.trunc(v), round_half_away(np.clip(v, -2**31, 2**31)))
    return np.clip(b.astype(np.int64) - step.astype(np.int64), -2**31, 2**31 - 1).astype(np.int32)


def training_step_model(w0, b0, ws, geometry, zp, lr, x_scale):
    """One layer's training step: weight and bias gradients, then in-place QAS SGD on
    weights and bias held in variable tensors initialised from constants."""
    c_out, kh, kw, c_in = w0.shape
    (in_h, in_w, k), (out_h, out_w), (stride, dilation, pad) = geometry
    b = ModelBuilder()
    x = b.add_tensor("x_kept", (1, in_h, in_w, k), np.int8)
    dy = b.add_tensor("dy", (1, out_h, out_w, c_out), np.int8)
    kept = b.add_tensor("kept", (k,), np.int32)
    dy_scale = b.add_tensor("dy_scale", (1,), np.float32)
    w = b.add_tensor("w", w0.shape, np.int8, scale=ws, zero_point=[0] * c_out,
                     quantized_dimension=0, variable=True)
    bias = b.add_tensor("b", b0.shape, np.int32, variable=True)
    w_init = b.add_tensor("w_init", w0.shape, np.int8, data=w0)
    b_init = b.add_tensor("b_init", b0.shape, np.int32, data=b0)
    scales = b.add_tensor("weight_scale", ws.shape, np.float32, data=ws)
    grad_w = b.add_tensor("grad_w", (c_out, kh, kw, k), np.int32)
    grad_b = b.add_tensor("grad_b", (c_out,), np.int32)
    b.add_custom_op("DGST_VARIABLE_INIT", [w, w_init], [])
    b.add_custom_op("DGST_VARIABLE_INIT", [bias, b_init], [])
    b.add_custom_op("DGST_CONV2D_WEIGHT_GRAD", [x, dy], [grad_w],
                    int32_options(*stride, *dilation, *pad, zp))
    b.add_custom_op("DGST_BIAS_GRAD", [dy], [grad_b])
    b.add_custom_op("DGST_SGD_QAS_UPDATE", [w, grad_w, kept, scales, dy_scale], [],
                    int32_options(0, lr, x_scale))
    b.add_custom_op("DGST_SGD_QAS_UPDATE", [bias, grad_b, -1, scales, dy_scale], [],
                    int32_options(2, lr, x_scale))
    return b.build([x, dy, kept, dy_scale], [w, bias])


def test_training_step_updates_weights_in_place_across_invocations(ops, tmp_path):
    rng = np.random.default_rng(7)
    c_out, kh, kw, c_in, k = 4, 3, 3, 6, 2
    w0 = int8(rng, (c_out, kh, kw, c_in), -127)
    b0 = rng.integers(-3000, 3000, c_out).astype(np.int32)
    ws = rng.uniform(0.002, 0.02, c_out).astype(np.float32)
    geometry = ((6, 6, k), (3, 3), ((2, 2), (1, 1), (1, 1)))
    zp, lr, x_scale = 3, 0.05, 0.03
    path = tmp_path / "train_step.tflite"
    path.write_bytes(training_step_model(w0, b0, ws, geometry, zp, lr, x_scale))

    steps = 3
    x = int8(rng, (steps, 1, 6, 6, k))
    dy = int8(rng, (steps, 1, 3, 3, c_out))
    kept = np.array([[1, 4], [0, 5], [1, 4]], np.int32)  # the selection changes per step
    dy_scale = np.array([[0.01], [0.004], [0.02]], np.float32)
    result = run_tflm(path, [x, dy, kept, dy_scale], libraries=[ops.library],
                      registerers=ops.registerers)
    w_after, b_after = result.outputs
    assert result.allocations["TfLiteTensor variable buffer data"] >= w0.size + 4 * c_out

    w, b = w0, b0
    for step in range(steps):
        grad_w = weight_grad_numpy(x[step], dy[step], zp, kh, kw, (2, 2), (1, 1), (1, 1))
        grad_b = dy[step].astype(np.int64).sum(axis=(0, 1, 2))
        w = sgd_conv_numpy(w, grad_w, kept[step], lr, x_scale, dy_scale[step, 0], ws)
        b = sgd_bias_numpy(b, grad_b, lr, x_scale, dy_scale[step, 0], ws)
        np.testing.assert_array_equal(w_after[step], w, err_msg=f"weights after step {step}")
        np.testing.assert_array_equal(b_after[step], b, err_msg=f"bias after step {step}")
        untouched = [c for c in range(c_in) if c not in kept[:step + 1]]
        np.testing.assert_array_equal(w_after[step][..., untouched], w0[..., untouched])
    assert not np.array_equal(w_after[-1], w0) and not np.array_equal(b_after[-1], b0)


def test_sgd_step_agrees_with_the_qas_optimizer(ops, tmp_path):
    """The on-device step is dgst_tf.training.qas.QuantizationAwareScalingSGD rounded to int8."""
    from dgst_tf.training.qas import QuantizationAwareScalingSGD

    rng = np.random.default_rng(11)
    c_out, kh, kw, c_in = 8, 1, 1, 16
    kept = np.arange(0, c_in, 2, dtype=np.int32)
    w0 = int8(rng, (c_out, kh, kw, c_in), -100, 100)
    ws = rng.uniform(0.005, 0.02, c_out).astype(np.float32)
    grad = rng.integers(-20000, 20000, (c_out, kh, kw, len(kept))).astype(np.int32)
    lr, x_scale, dy_scale = 0.02, 0.05, 0.003

    b = ModelBuilder()
    w = b.add_tensor("w", w0.shape, np.int8, scale=ws, zero_point=[0] * c_out, variable=True)
    g = b.add_tensor("grad", grad.shape, np.int32)
    k = b.add_tensor("kept", kept.shape, np.int32, data=kept)
    s = b.add_tensor("weight_scale", ws.shape, np.float32, data=ws)
    d = b.add_tensor("dy_scale", (1,), np.float32, data=[dy_scale])
    b.add_custom_op("DGST_VARIABLE_INIT", [w, b.add_tensor("w0", w0.shape, np.int8, data=w0)],
                    [])
    b.add_custom_op("DGST_SGD_QAS_UPDATE", [w, g, k, s, d], [], int32_options(0, lr, x_scale))
    path = tmp_path / "sgd.tflite"
    path.write_bytes(b.build([g], [w]))
    device = run_tflm(path, [grad], libraries=[ops.library],
                      registerers=ops.registerers).outputs[0]

    # QAS on W_bar: the real-loss gradient of W_bar is s_w * x_scale * dy_scale * grad
    w_bar = tf.Variable(w0.astype(np.float32))
    full = np.zeros(w0.shape, np.float32)
    full[..., kept] = grad
    g_wbar = ws[:, None, None, None] * x_scale * dy_scale * full
    optimizer = QuantizationAwareScalingSGD(lr, {w_bar.ref(): tf.constant(
        ws[:, None, None, None])})
    optimizer.apply_gradients([(tf.constant(g_wbar), w_bar)])
    expected = np.clip(np.round(w_bar.numpy()), -127, 127)
    diff = np.abs(device.astype(np.int64) - expected)
    assert diff.max() <= 1 and (diff == 0).mean() > 0.97, diff.max()
    np.testing.assert_array_equal(device[..., 1::2], w0[..., 1::2])  # channels not kept
    assert (device[..., kept] != w0[..., kept]).mean() > 0.5  # a real step was taken


def test_depthwise_update(ops, tmp_path):
    rng = np.random.default_rng(5)
    kh, kw, channels = 3, 3, 6
    kept = np.array([1, 2, 5], np.int32)
    w0 = int8(rng, (1, kh, kw, channels), -127)
    ws = rng.uniform(0.005, 0.02, channels).astype(np.float32)
    grad = rng.integers(-3000, 3000, (2, kh, kw, len(kept))).astype(np.int32)
    b = ModelBuilder()
    w = b.add_tensor("w", w0.shape, np.int8, scale=ws, zero_point=[0] * channels,
                     quantized_dimension=3, variable=True)
    g = b.add_tensor("grad", grad.shape[1:], np.int32)
    b.add_custom_op("DGST_VARIABLE_INIT", [w, b.add_tensor("w0", w0.shape, np.int8, data=w0)],
                    [])
    b.add_custom_op("DGST_SGD_QAS_UPDATE",
                    [w, g, b.add_tensor("kept", kept.shape, np.int32, data=kept),
                     b.add_tensor("ws", ws.shape, np.float32, data=ws),
                     b.add_tensor("dys", (1,), np.float32, data=[0.01])], [],
                    int32_options(1, 0.1, 0.02))
    path = tmp_path / "depthwise.tflite"
    path.write_bytes(b.build([g], [w]))
    out = run_tflm(path, [grad], libraries=[ops.library], registerers=ops.registerers).outputs[0]
    expected = sgd_conv_numpy(w0, grad[0], kept, 0.1, 0.02, 0.01, ws, depthwise=True)
    np.testing.assert_array_equal(out[0], expected)
    np.testing.assert_array_equal(
        out[1], sgd_conv_numpy(expected, grad[1], kept, 0.1, 0.02, 0.01, ws, depthwise=True))


def test_update_errors(ops, tmp_path):
    rng = np.random.default_rng(1)
    w0 = int8(rng, (4, 3, 3, 6), -127)
    ws = np.full(4, 0.01, np.float32)
    path = tmp_path / "bad_kept.tflite"
    path.write_bytes(training_step_model(w0, np.zeros(4, np.int32), ws,
                                         ((6, 6, 2), (3, 3), ((2, 2), (1, 1), (1, 1))),
                                         0, 0.1, 0.02))
    inputs = [np.zeros((1, 6, 6, 2), np.int8), np.ones((1, 3, 3, 4), np.int8),
              np.array([1, 9], np.int32), np.array([0.01], np.float32)]
    with pytest.raises(TflmError, match=r"invoke 1 of 1 of model .*bad_kept\.tflite[\s\S]*"
                                        r"kept\[1\] = 9 is not a channel index in \[0, 6\)"):
        run_tflm(path, inputs, libraries=[ops.library], registerers=ops.registerers)

    b = ModelBuilder()
    v = b.add_tensor("v", (4,), np.int32, variable=True)
    b.add_custom_op("DGST_VARIABLE_INIT", [v, b.add_tensor("c", (5,), np.int32, data=range(5))],
                    [])
    path = tmp_path / "bad_init.tflite"
    path.write_bytes(b.build([], [v]))
    with pytest.raises(TflmError, match=r"DGST_VARIABLE_INIT: input 1 \(initial\) must match "
                                        r"input 0 \(variable\): got int32 x 5 and int32 x 4"):
        run_tflm(path, [], libraries=[ops.library], registerers=ops.registerers)

    b = ModelBuilder()
    v = b.add_tensor("v", (4,), np.int32, variable=True)
    g = b.add_tensor("g", (4,), np.int32)
    k = b.add_tensor("k", (2,), np.int32, data=[0, 1])
    s = b.add_tensor("s", (4,), np.float32, data=ws)
    d = b.add_tensor("d", (1,), np.float32, data=[0.1])
    b.add_custom_op("DGST_SGD_QAS_UPDATE", [v, g, k, s, d], [], int32_options(2, 0.1, 0.02))
    path = tmp_path / "bias_with_kept.tflite"
    path.write_bytes(b.build([g], [v]))
    with pytest.raises(TflmError, match=r"input 2 \(kept\) must be omitted \(-1\) for a bias"):
        run_tflm(path, [np.zeros(4, np.int32)], libraries=[ops.library],
                 registerers=ops.registerers)
    b._operators[-1].customOptions = list(int32_options(3, 0.1, 0.02))
    path.write_bytes(b.build([g], [v]))
    with pytest.raises(TflmError, match=r"invalid options: kind 3 \(0 conv, 1 depthwise, 2 "
                                        r"bias\)"):
        run_tflm(path, [np.zeros(4, np.int32)], libraries=[ops.library],
                 registerers=ops.registerers)


def test_builtin_conv_reads_trainable_weights_from_a_variable(ops, tmp_path):
    """The training graph's mechanism: a builtin CONV_2D whose filter is a variable tensor
    (initialised by DGST_VARIABLE_INIT, updated in place by DGST_SGD_QAS_UPDATE) computes
    what the same conv with a constant filter does."""
    from dgst_tf.export.inference import reference_outputs
    from dgst_tf.export.tflite_file import schema

    rng = np.random.default_rng(3)
    w0 = int8(rng, (4, 3, 3, 3), -127)
    ws = rng.uniform(0.01, 0.02, 4).astype(np.float32)
    bias = rng.integers(-100, 100, 4).astype(np.int32)

    def conv_model(variable):
        b = ModelBuilder()
        x = b.add_tensor("x", (1, 6, 6, 3), np.int8, scale=0.05, zero_point=-3)
        w = b.add_tensor("w_init", w0.shape, np.int8, data=w0, scale=ws, zero_point=[0] * 4)
        if variable:
            constant = w
            w = b.add_tensor("w", w0.shape, np.int8, scale=ws, zero_point=[0] * 4,
                             variable=True)
            b.add_custom_op("DGST_VARIABLE_INIT", [w, constant], [])
        bt = b.add_tensor("b", (4,), np.int32, data=bias, scale=ws * 0.05, zero_point=[0] * 4)
        y = b.add_tensor("y", (1, 6, 6, 4), np.int8, scale=0.1, zero_point=2)
        options = schema.Conv2DOptionsT()
        options.padding = schema.Padding.SAME
        options.strideH = options.strideW = options.dilationHFactor = options.dilationWFactor = 1
        b.add_builtin_op(schema.BuiltinOperator.CONV_2D, [x, w, bt], [y],
                         schema.BuiltinOptions.Conv2DOptions, options)
        path = tmp_path / f"conv_{'variable' if variable else 'constant'}.tflite"
        path.write_bytes(b.build([x], [y]))
        return path

    x = int8(rng, (2, 1, 6, 6, 3))
    constant = run_tflm(conv_model(False), [x])
    variable = run_tflm(conv_model(True), [x], libraries=[ops.library],
                        registerers=ops.registerers)
    np.testing.assert_array_equal(variable.outputs[0], constant.outputs[0])
    np.testing.assert_array_equal(constant.outputs[0][0],
                                  reference_outputs(conv_model(False), [x[0]])[0])
    assert variable.allocations["TfLiteTensor variable buffer data"] >= w0.size
