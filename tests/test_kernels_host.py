"""The training-kernel C cores (tflm_ops/core), built for the host with gcc and loaded with
ctypes, against the NumPy reference (bit for bit) and against TensorFlow autodiff.

The library is built by this test (`make -C tflm_ops host`); a missing compiler or a
warning (-Werror) fails the test, it is never skipped.
"""
import numpy as np
import pytest

from dgst_tf.core.keras_compat import tf
from dgst_tf.tflm_ops import host as H
from dgst_tf.tflm_ops import reference as R


@pytest.fixture(scope="module")
def K():
    return H.Kernels(H.build())


def bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


def random_geometry(rng, explicit=False, max_in=11):
    """A random Conv2D geometry: TFLite SAME/VALID, or any explicit padding and output size
    (taps entirely in the padding included)."""
    while True:
        kh, kw = (int(v) for v in rng.integers(1, 5, 2))
        sh, sw = (int(v) for v in rng.integers(1, 4, 2))
        dh, dw = (int(v) for v in rng.integers(1, 3, 2))
        ih, iw = (int(v) for v in rng.integers(1, max_in + 1, 2))
        if explicit:
            pt, pl, pb, pr = (int(v) for v in rng.integers(0, 4, 4))
            oh = (ih + pt + pb - (kh - 1) * dh - 1) // sh + 1
            ow = (iw + pl + pr - (kw - 1) * dw - 1) // sw + 1
            if oh >= 1 and ow >= 1:
                return R.Geometry(ih, iw, oh, ow, kh, kw, sh, sw, dh, dw, pt, pl)
        else:
            g = R.Geometry.conv(ih, iw, kh, kw, (sh, sw), (dh, dw),
                                str(rng.choice(["same", "valid"])))
            if g.out_h >= 1 and g.out_w >= 1:
                return g


def int8(rng, shape, lo=-128):
    return rng.integers(lo, 128, shape).astype(np.int8)


# ---------------------------------------------------------------------------- bit-exact
def test_conv2d_weight_grad_bit_exact_on_random_shapes(K):
    rng = np.random.default_rng(1)
    n_kept_lt_cin = 0
    for trial in range(160):
        g = random_geometry(rng, explicit=trial % 2 == 1)
        c_in, c_out = int(rng.integers(1, 13)), int(rng.integers(1, 11))
        k = int(rng.integers(1, c_in + 1))
        n_kept_lt_cin += k < c_in
        kept = np.sort(rng.choice(c_in, k, replace=False))
        x = int8(rng, (g.in_h, g.in_w, c_in))
        x_kept = np.ascontiguousarray(x[:, :, kept])
        dy = int8(rng, (g.out_h, g.out_w, c_out))
        zp = int(rng.integers(-128, 128))
        want = R.conv2d_weight_grad(g, x_kept, zp, dy)
        assert want.shape == (c_out, g.kernel_h, g.kernel_w, k)
        np.testing.assert_array_equal(K.conv2d_weight_grad(g, x_kept, zp, dy), want,
                                      err_msg=str(g))
        np.testing.assert_array_equal(K.conv2d_weight_grad(g, x_kept, zp, dy, ref=True), want,
                                      err_msg=str(g))
    assert n_kept_lt_cin > 50


def test_conv2d_weight_grad_mobilenet_shapes_and_extremes(K):
    rng = np.random.default_rng(2)
    # pointwise expand 16x16x16 -> 96 at k = 1, 2, 4, 16; saturated int8 values everywhere
    g = R.Geometry.conv(16, 16, 1)
    for k in (1, 2, 4, 16):
        x = np.full((16, 16, k), -128, np.int8)
        x[::3] = 127
        dy = np.where(rng.random((16, 16, 96)) < 0.5, -128, 127).astype(np.int8)
        for zp in (-128, 0, 127):
            np.testing.assert_array_equal(K.conv2d_weight_grad(g, x, zp, dy),
                                          R.conv2d_weight_grad(g, x, zp, dy))
    # classifier as a 1x1 conv on a 1x1 image, and a stride-2 3x3 conv
    for g, c_in, c_out in ((R.Geometry.conv(1, 1, 1), 1280, 10),
                           (R.Geometry.conv(32, 32, 3, stride=2), 8, 16)):
        x, dy = int8(rng, (g.in_h, g.in_w, c_in)), int8(rng, (g.out_h, g.out_w, c_out))
        np.testing.assert_array_equal(K.conv2d_weight_grad(g, x, -3, dy),
                                      R.conv2d_weight_grad(g, x, -3, dy))


def test_depthwise_weight_grad_bit_exact_on_random_shapes(K):
    rng = np.random.default_rng(3)
    for trial in range(120):
        g = random_geometry(rng, explicit=trial % 2 == 1)
        channels = int(rng.integers(1, 14))
        k = int(rng.integers(1, channels + 1))
        kept = np.sort(rng.choice(channels, k, replace=False)).astype(np.int32)
        x = int8(rng, (g.in_h, g.in_w, channels))
        x_kept = np.ascontiguousarray(x[:, :, kept])
        dy = int8(rng, (g.out_h, g.out_w, channels))
        zp = int(rng.integers(-128, 128))
        np.testing.assert_array_equal(K.depthwise_weight_grad(g, x_kept, kept, zp, dy),
                                      R.depthwise_weight_grad(g, x_kept, kept, zp, dy),
                                      err_msg=str(g))


def test_bias_grad_bit_exact(K):
    rng = np.random.default_rng(4)
    for pixels, channels in ((1, 1), (3, 7), (256, 96), (300, 13), (1000, 4)):
        dy = int8(rng, (pixels, channels))
        np.testing.assert_array_equal(K.bias_grad(dy), R.bias_grad(dy))
    dy = np.full((600, 8), -128, np.int8)  # > 256 pixels of -128: no 16-bit lane overflow
    np.testing.assert_array_equal(K.bias_grad(dy), np.full(8, -128 * 600, np.int32))


def test_input_grads_bit_exact_on_random_shapes(K):
    rng = np.random.default_rng(5)
    for trial in range(100):
        g = random_geometry(rng, explicit=trial % 2 == 1)
        c_in, c_out = int(rng.integers(1, 11)), int(rng.integers(1, 11))
        dy = int8(rng, (g.out_h, g.out_w, c_out))
        w = int8(rng, (c_out, g.kernel_h, g.kernel_w, c_in), lo=-127)
        ws = rng.uniform(1e-3, 5e-2, c_out).astype(np.float32)
        dy_scale = float(np.float32(rng.uniform(1e-4, 1e-1)))
        got = K.conv2d_input_grad(g, dy, dy_scale, w, ws)
        np.testing.assert_array_equal(bits(got), bits(R.conv2d_input_grad(g, dy, dy_scale, w,
                                                                          ws)), err_msg=str(g))
        wd = int8(rng, (1, g.kernel_h, g.kernel_w, c_out), lo=-127)
        got = K.depthwise_input_grad(g, dy, dy_scale, wd, ws)
        np.testing.assert_array_equal(bits(got), bits(R.depthwise_input_grad(g, dy, dy_scale,
                                                                             wd, ws)),
                                      err_msg=str(g))


def test_masks_bit_exact(K):
    rng = np.random.default_rng(6)
    for n in (1, 7, 8, 9, 64, 1001):
        y = int8(rng, (n,))
        for lo, hi in ((-128, 127), (-5, 100), (0, 1), (126, 127), (-128, -126), (120, 127)):
            mask = K.build_mask(y, lo, hi)
            np.testing.assert_array_equal(mask, R.build_mask(y, lo, hi))
            bits_set = np.unpackbits(mask, bitorder="little")
            np.testing.assert_array_equal(bits_set[:n], ((y > lo) & (y < hi)).astype(np.uint8))
            assert not bits_set[n:].any()  # padding bits are 0
        g = rng.normal(size=n).astype(np.float32)
        got = K.apply_mask(g, mask)
        np.testing.assert_array_equal(bits(got), bits(R.apply_mask(g, mask)))
        np.testing.assert_array_equal(got, np.where(bits_set[:n] == 1, g, 0))


def test_activation_grad_bit_exact(K):
    """dgst_activation_grad_f32 against the NumPy reference on every int8 code, signed
    zeros, zero and negative table entries, odd lengths; and against TensorFlow autodiff
    of swish at the dequantized codes."""
    from dgst_tf.training.int8_activations import derivative_table

    rng = np.random.default_rng(7)
    for n in (1, 7, 256, 1001):
        x = rng.integers(-128, 128, n).astype(np.int8)
        x[: min(n, 2)] = [-128, 127][: min(n, 2)]
        g = rng.normal(size=n).astype(np.float32)
        g[: min(n, 3)] = [-0.0, 0.0, -2.5][: min(n, 3)]
        table = rng.normal(size=256).astype(np.float32)
        table[:40] = 0.0
        table[40:50] = -0.0
        got = K.activation_grad(g, x, table)
        np.testing.assert_array_equal(bits(got), bits(R.activation_grad(g, x, table)))
    scale, zero_point = 0.07, 12
    x = np.arange(-128, 128).astype(np.int8)
    g = rng.normal(size=256).astype(np.float32)
    real = tf.Variable(np.float32(scale) * (x.astype(np.float32) - zero_point))
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(tf.nn.silu(real) * g)
    np.testing.assert_allclose(K.activation_grad(g, x, derivative_table("swish", scale,
                                                                        zero_point)),
                               tape.gradient(y, real).numpy(), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="256 entries"):
        K.activation_grad(g, x, table[:255])


def test_quantize_grad_bit_exact_and_rounding(K):
    rng = np.random.default_rng(7)
    for n in (1, 5, 4096):
        g = (rng.standard_t(3, size=n) * 10 ** rng.uniform(-6, 2)).astype(np.float32)
        q, scale = K.quantize_grad(g)
        wq, wscale = R.quantize_grad(g)
        np.testing.assert_array_equal(q, wq)
        assert bits(scale) == bits(wscale)
        assert np.abs(q).max() == 127
    q, scale = K.quantize_grad(np.zeros(9, np.float32))  # all zero: scale 1, codes 0
    assert scale == 1.0 and not q.any()
    # ties round half away from zero: max 127 -> scale 1, so g / scale == g exactly
    g = np.array([127, 2.5, -2.5, 0.5, -0.5, 1.5, 0.49999997, -126.5], np.float32)
    q, scale = K.quantize_grad(g)
    assert scale == 1.0
    np.testing.assert_array_equal(q, [127, 3, -3, 1, -1, 2, 0, -127])


def test_softmax_xent_grad(K):
    rng = np.random.default_rng(8)
    for classes in (2, 10, 100):
        logits = int8(rng, (classes,))
        label = int(rng.integers(classes))
        loss, grad = K.softmax_xent_grad(logits, 0.1, -3, label)
        wloss, wgrad = R.softmax_xent_grad(logits, 0.1, -3, label)
        np.testing.assert_allclose(grad, wgrad, rtol=1e-5, atol=1e-7)
        assert loss == pytest.approx(wloss, rel=1e-5, abs=1e-6)
        assert abs(grad.sum()) < 1e-5  # p sums to 1, minus the one-hot
    # extreme logits: no overflow (max subtracted first)
    loss, grad = K.softmax_xent_grad(np.array([127, -128, 0], np.int8), 10.0, 0, 1)
    assert np.isfinite(loss) and loss == pytest.approx(2550.0, rel=1e-5)
    assert np.all(np.isfinite(grad))


def test_sgd_qas_updates_bit_exact(K):
    rng = np.random.default_rng(9)
    for _ in range(20):
        c_out, kh, kw, c_in = (int(v) for v in rng.integers(1, 9, 4))
        k = int(rng.integers(1, c_in + 1))
        kept = np.sort(rng.choice(c_in, k, replace=False)).astype(np.int32)
        w = int8(rng, (c_out, kh, kw, c_in), lo=-127)
        grad = rng.integers(-300000, 300000, (c_out, kh, kw, k)).astype(np.int32)
        ws = rng.uniform(1e-3, 5e-2, c_out).astype(np.float32)
        args = (float(rng.uniform(1e-3, 0.5)), float(rng.uniform(1e-3, 0.1)),
                float(rng.uniform(1e-5, 1e-2)))
        got = K.sgd_qas_update_conv(w, kept, grad, *args, ws)
        np.testing.assert_array_equal(got, R.sgd_qas_update_conv(w, kept, grad, *args, ws))
        frozen = np.setdiff1d(np.arange(c_in), kept)
        np.testing.assert_array_equal(got[..., frozen], w[..., frozen])
        wd = int8(rng, (1, kh, kw, c_in), lo=-127)
        gd = rng.integers(-300000, 300000, (kh, kw, k)).astype(np.int32)
        wsd = rng.uniform(1e-3, 5e-2, c_in).astype(np.float32)
        np.testing.assert_array_equal(K.sgd_qas_update_depthwise(wd, kept, gd, *args, wsd),
                                      R.sgd_qas_update_depthwise(wd, kept, gd, *args, wsd))
        b = rng.integers(-10**6, 10**6, c_out).astype(np.int32)
        gb = rng.integers(-10**5, 10**5, c_out).astype(np.int32)
        np.testing.assert_array_equal(K.sgd_qas_update_bias(b, gb, *args, ws),
                                      R.sgd_qas_update_bias(b, gb, *args, ws))
    # saturation: int8 weights clamp to [-127, 127], int32 biases saturate
    w = np.array([[[[120, -120]]]], np.int8)
    got = K.sgd_qas_update_conv(w, [0, 1], np.array([[[[-10**9, 10**9]]]], np.int32),
                                1.0, 1.0, 1.0, np.ones(1, np.float32))
    np.testing.assert_array_equal(got, [[[[127, -127]]]])
    b = np.array([2**31 - 10, -2**31 + 10], np.int32)
    got = K.sgd_qas_update_bias(b, np.array([-10**9, 10**9], np.int32), 100.0, 1.0, 1.0,
                                np.full(2, 1e-3, np.float32))
    np.testing.assert_array_equal(got, [2**31 - 1, -2**31])


def test_round_half_away_is_exact():
    x = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, -0.49999997, 8388607.5, 1e9],
                 np.float32)
    np.testing.assert_array_equal(R.round_half_away(x),
                                  [1, 2, 3, -1, -3, 0, 0, 8388608, 1e9])


# ---------------------------------------------------------------------------- math oracle
def tf_padding(g):
    """'SAME' or 'VALID', whichever TFLite padding gives g."""
    for padding in ("same", "valid"):
        if R.Geometry.conv(g.in_h, g.in_w, g.kernel_h, g.kernel_w, (g.stride_h, g.stride_w),
                           (g.dilation_h, g.dilation_w), padding) == g:
            return padding.upper()
    raise AssertionError(g)


def tf_grads(g, x, w, dy, depthwise):
    """(dL/dW, dL/dx) of L = sum(conv(x, W) * dy) by TensorFlow, float64, NHWC batch 1."""
    x, w, dy = (tf.constant(np.asarray(a, np.float64)) for a in (x, w, dy))
    x, dy = x[None], dy[None]
    padding, strides = tf_padding(g), [1, g.stride_h, g.stride_w, 1]
    dil = [g.dilation_h, g.dilation_w]
    if dil == [1, 1]:  # the raw backprop ops named in the contract
        if depthwise:
            dw = tf.raw_ops.DepthwiseConv2dNativeBackpropFilter(
                input=x, filter_sizes=w.shape, out_backprop=dy, strides=strides, padding=padding)
            dx = tf.raw_ops.DepthwiseConv2dNativeBackpropInput(
                input_sizes=x.shape, filter=w, out_backprop=dy, strides=strides, padding=padding)
        else:
            dw = tf.raw_ops.Conv2DBackpropFilter(input=x, filter_sizes=w.shape, out_backprop=dy,
                                                 strides=strides, padding=padding)
            dx = tf.raw_ops.Conv2DBackpropInput(input_sizes=x.shape, filter=w, out_backprop=dy,
                                                strides=strides, padding=padding)
        return dw.numpy(), dx.numpy()[0]
    with tf.GradientTape(persistent=True) as tape:  # dilated: CPU raw ops refuse, autodiff
        tape.watch(x)
        tape.watch(w)
        if depthwise:
            y = tf.nn.depthwise_conv2d(x, w, strides, padding, dilations=dil)
        else:
            y = tf.nn.convolution(x, w, strides=strides[1:3], padding=padding, dilations=dil)
        loss = tf.reduce_sum(y * dy)
    return tape.gradient(loss, w).numpy(), tape.gradient(loss, x).numpy()[0]


def oracle_geometries(rng, n, depthwise=False):
    out = []
    while len(out) < n:
        g = random_geometry(rng, max_in=12)
        if g.dilation_h * g.dilation_w > 1 and g.stride_h * g.stride_w > 1:
            continue  # TF: strides > 1 together with dilation > 1 are not supported
        if depthwise and g.stride_h != g.stride_w:
            continue  # TF's depthwise backprop ops: equal strides only
        out.append(g)
    return out + [R.Geometry.conv(16, 16, 1), R.Geometry.conv(16, 16, 3, stride=2),
                  R.Geometry.conv(8, 8, 3, dilation=2)]


def test_conv2d_weight_grad_equals_tensorflow_autodiff(K):
    """int32 weight gradient of the kept channels == TF's filter gradient of the integer
    valued input minus its zero point (exact in float64), channels sliced."""
    rng = np.random.default_rng(10)
    for g in oracle_geometries(rng, 25):
        c_in, c_out = int(rng.integers(2, 9)), int(rng.integers(1, 9))
        k = int(rng.integers(1, c_in))  # k < C_in
        kept = np.sort(rng.choice(c_in, k, replace=False))
        x, zp = int8(rng, (g.in_h, g.in_w, c_in)), int(rng.integers(-128, 128))
        dy = int8(rng, (g.out_h, g.out_w, c_out))
        w = rng.normal(size=(g.kernel_h, g.kernel_w, c_in, c_out))  # HWIO, values unused
        dw, _ = tf_grads(g, x.astype(np.float64) - zp, w, dy, depthwise=False)
        want = np.transpose(dw[:, :, kept, :], (3, 0, 1, 2))  # HWIO -> [C_out][kh][kw][k]
        got = K.conv2d_weight_grad(g, np.ascontiguousarray(x[:, :, kept]), zp, dy)
        np.testing.assert_array_equal(got, want.astype(np.int64), err_msg=str(g))


def test_depthwise_weight_grad_equals_tensorflow_autodiff(K):
    rng = np.random.default_rng(11)
    for g in oracle_geometries(rng, 20, depthwise=True):
        channels = int(rng.integers(2, 9))
        k = int(rng.integers(1, channels))
        kept = np.sort(rng.choice(channels, k, replace=False)).astype(np.int32)
        x, zp = int8(rng, (g.in_h, g.in_w, channels)), int(rng.integers(-128, 128))
        dy = int8(rng, (g.out_h, g.out_w, channels))
        w = rng.normal(size=(g.kernel_h, g.kernel_w, channels, 1))
        dw, _ = tf_grads(g, x.astype(np.float64) - zp, w, dy, depthwise=True)
        got = K.depthwise_weight_grad(g, np.ascontiguousarray(x[:, :, kept]), kept, zp, dy)
        np.testing.assert_array_equal(got, dw[:, :, kept, 0].astype(np.int64), err_msg=str(g))


def test_input_grads_equal_tensorflow_autodiff(K):
    """dx == TF's input gradient of dy_real = dy * dy_scale through W_real = W * s_w."""
    rng = np.random.default_rng(12)
    for g in oracle_geometries(rng, 20, depthwise=True):
        c_in, c_out = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        dy = int8(rng, (g.out_h, g.out_w, c_out))
        dy_scale = float(np.float32(rng.uniform(1e-3, 1e-1)))
        w = int8(rng, (c_out, g.kernel_h, g.kernel_w, c_in), lo=-127)
        ws = rng.uniform(1e-3, 5e-2, c_out).astype(np.float32)
        w_real = np.transpose(w * ws.astype(np.float64)[:, None, None, None], (1, 2, 3, 0))
        x0 = np.zeros((g.in_h, g.in_w, c_in))
        _, dx = tf_grads(g, x0, w_real, dy * dy_scale, depthwise=False)
        got = K.conv2d_input_grad(g, dy, dy_scale, w, ws)
        np.testing.assert_allclose(got, dx, rtol=2e-5, atol=1e-6 * np.abs(dx).max(),
                                   err_msg=str(g))
        # depthwise: channels = c_out
        wd = int8(rng, (1, g.kernel_h, g.kernel_w, c_out), lo=-127)
        wd_real = (wd[0] * ws.astype(np.float64))[:, :, :, None]
        x0 = np.zeros((g.in_h, g.in_w, c_out))
        _, dx = tf_grads(g, x0, wd_real, dy * dy_scale, depthwise=True)
        got = K.depthwise_input_grad(g, dy, dy_scale, wd, ws)
        np.testing.assert_allclose(got, dx, rtol=2e-5, atol=1e-6 * np.abs(dx).max(),
                                   err_msg=str(g))


def test_qas_update_equals_the_formula(K):
    """QAS step: W_bar -= lr * g(W_bar) * s_w^-2, with g(W_bar) from TF autodiff of the
    real-valued loss sum(conv(x_real, s_w * W_bar) * dy_real); bias likewise with
    (s_w * s_x)^-2. Compared where float32 rounding cannot flip the rounding of a step."""
    rng = np.random.default_rng(13)
    g = R.Geometry.conv(6, 6, 3, stride=2)
    c_in, c_out, k = 6, 5, 3
    kept = np.array([0, 2, 5], np.int32)
    x, zp = int8(rng, (6, 6, c_in)), -20
    dy = int8(rng, (g.out_h, g.out_w, c_out))
    x_scale, dy_scale, lr = 0.05, 0.002, 0.3
    w = int8(rng, (c_out, 3, 3, c_in), lo=-100)
    ws = rng.uniform(5e-3, 2e-2, c_out).astype(np.float32)
    b = rng.integers(-1000, 1000, c_out).astype(np.int32)
    # TF: gradient with respect to W_bar and b_bar of the real-valued loss
    x_real = tf.constant(((x.astype(np.float64) - zp) * x_scale)[None])
    w_bar = tf.Variable(np.transpose(w, (1, 2, 3, 0)).astype(np.float64))
    b_bar = tf.Variable(b.astype(np.float64))
    s_w = tf.constant(ws.astype(np.float64))
    with tf.GradientTape() as tape:
        y = tf.nn.conv2d(x_real, w_bar * s_w, [1, 2, 2, 1], tf_padding(g)) + b_bar * s_w * x_scale
        loss = tf.reduce_sum(y * (dy.astype(np.float64) * dy_scale)[None])
    g_w, g_b = tape.gradient(loss, [w_bar, b_bar])
    step_w = lr * np.transpose(g_w.numpy(), (3, 0, 1, 2)) / ws.astype(np.float64)[:, None, None,
                                                                                    None] ** 2
    step_b = lr * g_b.numpy() / (ws.astype(np.float64) * x_scale) ** 2
    # the kernels: int gradients, then the QAS update
    grad = K.conv2d_weight_grad(g, np.ascontiguousarray(x[:, :, kept]), zp, dy)
    got_w = K.sgd_qas_update_conv(w, kept, grad, lr, x_scale, dy_scale, ws)
    got_b = K.sgd_qas_update_bias(b, K.bias_grad(dy), lr, x_scale, dy_scale, ws)
    want_w = w.astype(np.int64).copy()
    want_w[..., kept] = np.clip(w[..., kept] - R.round_half_away(step_w[..., kept]), -127, 127)
    want_b = b - R.round_half_away(step_b)
    safe_w = np.abs(np.abs(step_w[..., kept]) % 1 - 0.5) > 1e-3
    safe_b = np.abs(np.abs(step_b) % 1 - 0.5) > 1e-3
    assert safe_w.mean() > 0.9 and np.abs(step_w).max() > 2  # the updates are not trivial
    np.testing.assert_array_equal(got_w[..., kept][safe_w], want_w[..., kept][safe_w])
    np.testing.assert_array_equal(np.delete(got_w, kept, axis=3), np.delete(w, kept, axis=3))
    np.testing.assert_array_equal(got_b[safe_b], want_b[safe_b])


def _dgsu_select(K, w, m, k, depthwise, visited):
    """dgst_channel_scores_s8 + dgst_select_ranked through ctypes (visited updated)."""
    import ctypes

    lib = K.lib
    i8p, i32p = ctypes.POINTER(ctypes.c_int8), ctypes.POINTER(ctypes.c_int32)
    i64p, u8p, i32 = ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_uint8), ctypes.c_int32
    lib.dgst_channel_scores_s8.argtypes = [i8p, i32p, i32, i32, i32, i32, i64p]
    lib.dgst_select_ranked.argtypes = [i64p, i32, i32, u8p, i32p]
    wq, mm = np.ascontiguousarray(w, np.int8), np.ascontiguousarray(m, np.int32)
    c_in = wq.shape[-1]
    c_out = c_in if depthwise else wq.shape[0]
    taps = wq.size // (c_in if depthwise else c_out * c_in)
    scores = np.full(c_in, -7, np.int64)
    kept = np.full(k, -7, np.int32)
    lib.dgst_channel_scores_s8(wq.ctypes.data_as(i8p), mm.ctypes.data_as(i32p), c_out, taps,
                               c_in, int(depthwise), scores.ctypes.data_as(i64p))
    np.testing.assert_array_equal(scores, R.channel_scores(wq, mm, depthwise))
    mask = None if visited is None else np.array(visited, np.uint8)
    lib.dgst_select_ranked(scores.ctypes.data_as(i64p), c_in, k,
                           None if mask is None else mask.ctypes.data_as(u8p),
                           kept.ctypes.data_as(i32p))
    return kept, mask


def test_dgsu_selection_bit_exact(K):
    """Integer channel importance and DGSU ranking (visited bitmask across steps, ties,
    extreme weights, sweeps restarting) equal the reference bit for bit."""
    rng = np.random.default_rng(17)
    for case in range(40):
        depthwise = bool(case % 2)
        c_in = int(rng.integers(1, 40))
        k = int(rng.integers(1, c_in + 1))
        shape = ((1, *rng.integers(1, 4, 2), c_in) if depthwise
                 else (int(rng.integers(1, 9)), *rng.integers(1, 4, 2), c_in))
        w = int8(rng, shape, lo=-127)
        if case % 5 == 0:
            w[...] = 127 if case % 10 == 0 else rng.choice([-1, 0, 1], shape)
        m = R.score_multipliers(rng.uniform(1e-4, 0.05, c_in if depthwise else shape[0]))
        visited = np.zeros((c_in + 7) // 8, np.uint8)
        for _ in range(4):
            want, want_mask = R.select_channels(w, m, k, depthwise, visited)
            got, visited = _dgsu_select(K, w, m, k, depthwise, visited)
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(visited, want_mask)
        got, _ = _dgsu_select(K, w, m, k, depthwise, None)
        np.testing.assert_array_equal(got, R.select_channels(w, m, k, depthwise)[0])


def test_score_multipliers():
    np.testing.assert_array_equal(R.score_multipliers([0.02, 0.01, 0.0]), [65536, 16384, 0])
    assert R.score_multipliers([1e-9, 1e-9]).tolist() == [65536, 65536]
